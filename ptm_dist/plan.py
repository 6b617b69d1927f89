"""`ptm plan`: per-GPU memory for each ZeRO stage and offload choice, a recommended stage and
micro batch, and the time and GPU-hours to the job's token budget at a stated MFU.

Memory model (bytes per parameter, N workers sharing the states):

    fp32 training           params 4, grads 4, Adam m+v 8
    bf16/fp16 mixed         params 2, grads 2, fp32 master + m + v 12
    ZeRO-1 shards the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the parameters;
    offload moves optimizer states (and with ZeRO-3 parameters) to CPU memory.

Activations per layer follow Korthikanti et al. (2022), ``s*b*h*34`` bytes in 16-bit with fused
(flash) attention (no ``5*a*s/h`` term), doubled in fp32; activation checkpointing keeps only
each layer's input (``2*s*b*h``) plus one layer's working set. The logits and their gradient
(``s*b*V``, kept in fp32 for the loss) are added, as are DeepSpeed's reduce buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptm_dist import models
from ptm_dist.config import JobConfig
from ptm_dist.engine import REDUCE_BUCKET_ELEMENTS

GiB = 1024**3
OPTIONS = [  # (label, stage, offload_optimizer, offload_params), in order of preference
    ("zero0", 0, False, False),
    ("zero1", 1, False, False),
    ("zero2", 2, False, False),
    ("zero3", 3, False, False),
    ("zero2+offload_opt", 2, True, False),
    ("zero3+offload_opt", 3, True, False),
    ("zero3+offload_all", 3, True, True),
]


@dataclass
class ModelShape:
    n_params: int
    layers: int
    hidden: int
    vocab: int
    flops_per_token: float


def model_shape(cfg: JobConfig, vocab_size: int) -> ModelShape:
    from ptm_dist.pretrained import init_config

    special = models.SpecialTokens(eos=0, pad=1, mask=2)
    hf = models.config_for(cfg.model, vocab_size, cfg.data.seq_len, special,
                           init_config(cfg.model.init) if cfg.model.init else None)
    with torch.device("meta"):
        model = models.build(hf)
    n_all = sum(p.numel() for p in model.parameters())
    return ModelShape(n_all, hf.num_hidden_layers, hf.hidden_size, hf.vocab_size,
                      models.flops_per_token(hf, models.matmul_params(model), cfg.data.seq_len))


def memory_bytes(
    shape: ModelShape, workers: int, stage: int, offload_opt: bool, offload_params: bool,
    micro_batch: int, seq_len: int, precision: str, activation_checkpointing: bool,
) -> dict[str, float]:
    """Per-worker device memory by component, in bytes."""
    n = shape.n_params
    half = precision in ("bf16", "fp16")
    p_b, g_b, o_b = (2, 2, 12) if half else (4, 4, 8)
    params = n * p_b / (workers if stage >= 3 else 1)
    grads = n * g_b / (workers if stage >= 2 else 1)
    optim = n * o_b / (workers if stage >= 1 else 1)
    if offload_opt:
        optim = 0.0
    if offload_params:
        params = 0.0
    act_b = 2 if half else 4
    tokens = micro_batch * seq_len
    per_layer_full = 17 * act_b * tokens * shape.hidden  # 34 bytes/token/hidden in 16-bit
    if activation_checkpointing:
        acts = shape.layers * act_b * tokens * shape.hidden + per_layer_full
    else:
        acts = shape.layers * per_layer_full
    logits = tokens * shape.vocab * (act_b + 4 + 4)  # logits, fp32 upcast for the loss, its grad
    buffers = REDUCE_BUCKET_ELEMENTS * g_b if stage in (1, 2) else 0.0
    if stage in (1, 2):
        buffers = min(buffers, n * g_b)
    return {"params": params, "grads": grads, "optimizer": optim, "activations": acts, "logits": logits,
            "buffers": buffers}


def plan(cfg: JobConfig, gpus: int, gpu_mem_gb: float, vocab_size: int, mfu: float = 0.4,
         peak_flops: float = 989e12, precision: str = "bf16") -> dict:
    shape = model_shape(cfg, vocab_size)
    budget = gpu_mem_gb * GiB * 0.9  # leave room for the CUDA context and fragmentation
    t = cfg.train
    rows = []
    for label, stage, off_opt, off_par in OPTIONS:
        mem = memory_bytes(shape, gpus, stage, off_opt, off_par, t.micro_batch, cfg.data.seq_len,
                           precision, t.activation_checkpointing)
        best_mb = 0
        for mb in (1, 2, 4, 8, 16, 32, 64, 128):
            m = memory_bytes(shape, gpus, stage, off_opt, off_par, mb, cfg.data.seq_len, precision,
                             t.activation_checkpointing)
            if sum(m.values()) <= budget:
                best_mb = mb
        rows.append({"option": label, "stage": stage, "offload_optimizer": off_opt,
                     "offload_params": off_par, "bytes": mem, "total_gb": sum(mem.values()) / GiB,
                     "fits": sum(mem.values()) <= budget, "max_micro_batch": best_mb})
    fitting = [r for r in rows if r["fits"]]
    choice = fitting[0] if fitting else next((r for r in rows if r["max_micro_batch"] > 0), None)
    tokens_per_s = mfu * peak_flops * gpus / shape.flops_per_token
    total_tokens = t.max_steps * t.micro_batch * t.grad_accum * cfg.data.seq_len * gpus
    hours = total_tokens / tokens_per_s / 3600
    return {
        "model": f"{cfg.model.family}-{cfg.model.size}",
        "n_params": shape.n_params,
        "gpus": gpus,
        "gpu_mem_gb": gpu_mem_gb,
        "precision": precision,
        "micro_batch": t.micro_batch,
        "seq_len": cfg.data.seq_len,
        "options": rows,
        "recommended": None if choice is None else {
            "option": choice["option"], "zero_stage": choice["stage"],
            "micro_batch": t.micro_batch if choice["fits"] else choice["max_micro_batch"],
            "max_micro_batch": choice["max_micro_batch"],
        },
        "assumed_mfu": mfu,
        "peak_flops_per_gpu": peak_flops,
        "flops_per_token": shape.flops_per_token,
        "tokens_per_s": tokens_per_s,
        "total_tokens": total_tokens,
        "wall_hours": hours,
        "gpu_hours": hours * gpus,
    }


def format_plan(p: dict) -> str:
    lines = [
        (f"{p['model']}: {p['n_params'] / 1e6:,.1f}M parameters, {p['gpus']} GPUs x {p['gpu_mem_gb']:g} GiB, "
        f"{p['precision']}, micro batch {p['micro_batch']} x {p['seq_len']} tokens"),
        (f"{'option':<20}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'logits':>9}{'buffers':>9}{'total':>9}"
        f"{'fits':>6}{'max mb':>8}"),
    ]
    for r in p["options"]:
        b = {k: v / GiB for k, v in r["bytes"].items()}
        lines.append(
            f"{r['option']:<20}{b['params']:>9.2f}{b['grads']:>9.2f}{b['optimizer']:>9.2f}"
            f"{b['activations']:>9.2f}{b['logits']:>9.2f}{b['buffers']:>9.2f}{r['total_gb']:>9.2f}"
            f"{'yes' if r['fits'] else 'no':>6}{r['max_micro_batch']:>8}"
        )
    rec = p["recommended"]
    lines.append("(GiB per GPU)")
    lines.append("recommended: " + (f"{rec['option']} with micro batch {rec['micro_batch']}" if rec
                                     else "nothing fits: use more GPUs or a smaller model"))
    lines.append(
        f"at {p['assumed_mfu']:.0%} MFU of {p['peak_flops_per_gpu'] / 1e12:,.0f} TFLOP/s: "
        f"{p['tokens_per_s']:,.0f} tokens/s; {p['total_tokens'] / 1e9:,.2f}B tokens take "
        f"{p['wall_hours']:,.1f} h ({p['gpu_hours']:,.0f} GPU-hours)"
    )
    return "\n".join(lines)
