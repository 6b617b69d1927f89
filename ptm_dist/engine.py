"""DeepSpeed from a JobConfig: the generated config, the optimizer and LR schedule, initialize.

The optimizer (AdamW, no decay on biases and norms) and the schedule (linear warmup, cosine
decay to train.min_lr) are built here for both DeepSpeed and the plain PyTorch reference loop,
so the two are the same by construction.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ptm_dist.config import JobConfig

# DeepSpeed's gradient reduce bucket (elements); ptm plan counts it in its memory estimate.
REDUCE_BUCKET_ELEMENTS = 50_000_000


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("train.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def ds_config(cfg: JobConfig, precision: str, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for this job (also logged as part of the run's config)."""
    t, z = cfg.train, cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage > 0:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=REDUCE_BUCKET_ELEMENTS)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        # Plain fp32 DDP (stage 0) clips inside DeepSpeed without keeping the norm, so the step
        # clips itself there (see manual_clip) and the metric stays available for every stage.
        "gradient_clipping": 0.0 if manual_clip(cfg, precision) else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if z.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; the param groups still carry the decay split.
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay},
        }
    return conf


def manual_clip(cfg: JobConfig, precision: str) -> float:
    """Clip norm the step applies itself (0: DeepSpeed clips and reports the norm)."""
    return cfg.train.grad_clip if cfg.zero.stage == 0 and precision == "fp32" else 0.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=1e-8,
        fused=device.type == "cuda",
    )


def lr_lambda(cfg: JobConfig):
    """Multiplier on train.lr for optimizer step s (0-based): warmup then cosine to min_lr."""
    t = cfg.train
    floor = t.min_lr / t.lr

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def initialize(model: torch.nn.Module, cfg: JobConfig, device: torch.device):
    """(engine, precision): a DeepSpeed engine over ``model`` with optimizer and schedule."""
    import deepspeed

    precision = resolve_precision(cfg.train.precision, device)
    conf = ds_config(cfg, precision, device.type == "cuda")
    if cfg.zero.offload_optimizer:
        optimizer = None
        params = param_groups(model, cfg.train.weight_decay)
    else:
        optimizer = build_optimizer(model, cfg, device)
        params = None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg),
        config=conf,
    )
    return engine, precision
