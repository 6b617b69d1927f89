"""`ptm bench train`: this system against a plain PyTorch loop, measured side by side.

(a) system: Ray Train workers, DeepSpeed engines, the Ray Data stream, running the same
    ``Trainer.train_one_step`` the pretraining loop runs, with a phase timer;
(b) baseline: one plain process, the same model, micro batch, precision, device and threads
    per worker, plain torch AdamW, its batches already in memory.

    ratio = system tokens/s / (baseline tokens/s x GPUs)     on GPUs (one baseline per GPU)
    ratio = system tokens/s / baseline tokens/s              on CPU (the baseline gets the cores
                                                             all workers share)

On CPU it also reports the scaling efficiency against the plain loop with one worker's threads
times the number of workers. The baseline runs in a fresh subprocess so that its memory
high-water mark is its own; memory is the GPU allocator's peak, or on CPU the growth of the
process's resident memory over training (after a one-layer priming step loads lazy imports).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ptm_dist import models
from ptm_dist.config import JobConfig
from ptm_dist.tracking import gpu_peak_flops


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_mem(device: torch.device, rss0: int) -> int:
    """Training memory high-water mark: GPU allocations, or the process's RSS growth on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _peak_rss() - rss0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, n: int = 8192, reps: int = 20) -> float | None:
    """bf16 matmul FLOP/s measured on this GPU (the practical ceiling for MFU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _prime(hf_config, device: torch.device) -> None:
    """Run one step of a one-layer copy of the model, so that lazy imports and kernel
    libraries are loaded before memory is measured (they are not training memory)."""
    small = hf_config.__class__.from_dict({**hf_config.to_dict(), "num_hidden_layers": 1, "n_layer": 1})
    model = models.build(small).to(device)
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    del model


def _phase_report(totals: dict, steps: int, elapsed: float, wait: float) -> dict:
    out = {"step_s": elapsed / steps, "data_wait_s": wait / steps}
    for phase in ("forward", "backward", "optimizer"):
        out[f"{phase}_s"] = totals.get(phase, 0.0) / steps
    return out


# ------------------------------------------------------------------ (a) the system


def system_worker(config: dict) -> None:
    """Ray Train worker: warm up, then time ``steps`` optimizer steps of the real step."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ptm_dist.dist import gather_objects
    from ptm_dist.train.loop import Trainer
    from ptm_dist.train.step import PhaseTimer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    spec = config["spec"]
    job, data = spec.job, spec.data
    _prime(models.hf_config(job.model.family, job.model.size, data.vocab_size, job.data.seq_len,
                            models.SpecialTokens(**data.special)), device)
    rss0 = _rss()
    tr = Trainer(spec, rank, world, device)
    it = iter(tr.stream)
    for _ in range(config["warmup"]):
        tr.train_one_step(it)
    timer = PhaseTimer(device)
    steps, wait = config["steps"], 0.0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, waited = tr.train_one_step(it, timer)
        wait += waited
    _sync(device)
    elapsed = time.perf_counter() - t0
    # Communication: an all-reduce of one gradient's worth of data, timed on its own.
    grads = torch.zeros(tr.n_params, device=device)
    dist.all_reduce(grads)
    _sync(device)
    c0 = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(grads)
    _sync(device)
    allreduce_s = (time.perf_counter() - c0) / 3
    del grads
    stats = torch.tensor([float(_peak_mem(device, rss0)), elapsed], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    # The slowest rank sets the system's tokens/s, so its step breakdown is the one reported
    # (rank 0's own could disagree with the tokens/s figure by the ranks' spread).
    phases = max(gather_objects((elapsed, _phase_report(timer.totals, steps, elapsed, wait))),
                 key=lambda ranked: ranked[0])[1]
    metrics = {
        "tokens_per_s": tr.tokens_per_step * steps / float(stats[1]),
        "peak_mem_bytes": int(stats[0]),
        "threads_per_worker": torch.get_num_threads(),
        "precision": tr.precision,
        "n_params": tr.n_params,
        "flops_per_token": tr.flops_per_token,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "allreduce_grads_s": allreduce_s,
        **phases,
    }
    # Ray Train returns the metrics of checkpointed reports only: rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "bench.json").write_text(json.dumps(metrics))
        ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def run_system(cfg: JobConfig, worker_data, steps: int, warmup: int, how) -> dict:
    from ptm_dist import storage
    from ptm_dist.launch import make_trainer
    from ptm_dist.train.spec import PretrainSpec

    base = storage.absolute(cfg.run.storage)  # shared storage on clusters, as for real runs
    name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    spec = PretrainSpec(job=cfg, run_dir=storage.join(base, name), data=worker_data)
    trainer = make_trainer(system_worker, {"spec": spec, "steps": steps, "warmup": warmup}, how,
                           name=name, storage_path=base)
    try:
        return dict(trainer.fit().metrics)
    finally:
        storage.delete_dir(storage.join(base, name))


# ------------------------------------------------------------------ (b) the plain baseline


def baseline(spec: dict) -> dict:
    """A plain single-process PyTorch loop over in-memory batches (run in a subprocess)."""
    from ptm_dist.data.pipeline import SequenceStream
    from ptm_dist.data.sources import Shard
    from ptm_dist.train.loop import objective_for
    from ptm_dist.train.step import PhaseTimer

    torch.set_num_threads(spec["threads"])
    cfg = JobConfig.model_validate(spec["job"])
    device = torch.device(spec["device"])
    wd = spec["data"]
    special = wd["special"]
    hf = models.config_for(cfg.model, wd["vocab_size"], cfg.data.seq_len, models.SpecialTokens(**special))
    steps, warmup = spec["steps"], spec["warmup"]
    obj = objective_for(cfg, hf, special, wd["vocab_size"])
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])
    compact = spec.get("module") == "compact"
    results = []
    for mb in spec["micro_batches"]:
        # every run trains on the stream's first sequences: the same batches at the same micro
        # batch, whichever loop and whichever micro batches ran before
        stream = iter(SequenceStream([Shard(**s) for s in wd["train_shards"]], wd["tokenizer_json"],
                                     cfg.data.seq_len, special["eos"], cfg.run.seed, 0, 1, use_ray=False,
                                     shuffle_window=cfg.data.shuffle_window))
        n_seq = (steps + warmup) * mb * cfg.train.grad_accum
        seqs = torch.as_tensor(np.stack([next(stream)[1] for _ in range(n_seq)]), dtype=torch.long, device=device)
        batches = seqs.view(steps + warmup, cfg.train.grad_accum, mb, cfg.data.seq_len)
        _prime(hf, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _rss()
        timer = PhaseTimer(device)
        try:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if compact:
                    elapsed, loss = _compact_loop(cfg, hf, device, batches, warmup, timer)
                else:
                    elapsed, loss = _module_loop(cfg, hf, device, batches, warmup, timer, obj)
        except torch.OutOfMemoryError:
            results.append({"micro_batch": mb, "oom": True})
            break
        tokens = steps * mb * cfg.train.grad_accum * cfg.data.seq_len
        results.append({"micro_batch": mb, "tokens_per_s": tokens / elapsed, "last_loss": loss,
                        "peak_mem_bytes": _peak_mem(device, rss0),
                        **_phase_report(timer.totals, steps, elapsed, 0.0)})
        del seqs, batches, stream
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"runs": results, "matmul_peak_flops": matmul_peak_flops(device)}


def _module_loop(cfg: JobConfig, hf, device, batches, warmup: int, timer, obj) -> tuple[float, float]:
    """(seconds, last step's loss) of the plain loop over the Hugging Face module: the same
    ``train_step``, optimizer and schedule as the system, on one process."""
    from ptm_dist.engine import EngineSpec, build_optimizer, build_scheduler
    from ptm_dist.train.step import PlainEngine, train_step

    model = models.build(hf, seed=cfg.run.seed).to(device)
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = EngineSpec.for_pretraining(cfg).optim
    opt = build_optimizer(model, optim, device)
    engine = PlainEngine(model, opt, build_scheduler(opt, optim), cfg.train.grad_accum, cfg.train.grad_clip)
    if cfg.train.compile:
        engine.module = torch.compile(model)
    for i in range(warmup):
        train_step(engine, list(batches[i]), obj)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, len(batches)):
        loss, _ = train_step(engine, list(batches[i]), obj, timer=timer)
    _sync(device)
    return time.perf_counter() - t0, float(loss)


def strong_parts(cfg: JobConfig, hf, device) -> tuple:
    """(model, optimizer, forward, lr_at) of the strong baseline: a minimal trainer's set-up (its
    own AdamW groups and warmup-cosine schedule, written here as nanoGPT writes them) around the
    compact GPT-2 of ``ptm_dist.compact``, starting from the same weights as the system.
    ``forward(ids)`` is the mean next-token loss; ``lr_at(i)`` the learning rate of step i."""
    from ptm_dist.compact import CompactGPT

    t = cfg.train
    model = CompactGPT.from_hf(models.build(hf, seed=cfg.run.seed)).to(device)
    if t.activation_checkpointing:
        raise ValueError("the compact baseline has no activation checkpointing; bench with it off")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8, fused=device.type == "cuda")

    def lr_at(s: int) -> float:  # linear warmup, then cosine to min_lr at max_steps
        if s < t.warmup_steps:
            return t.lr * (s + 1) / t.warmup_steps
        frac = min(1.0, (s - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (t.lr - t.min_lr)

    return model, opt, torch.compile(model) if t.compile else model, lr_at


def strong_update(cfg: JobConfig, model, opt, lr: float) -> None:
    """The strong baseline's optimizer step: clip, set the learning rate, step, clear."""
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def _compact_loop(cfg: JobConfig, hf, device, batches, warmup: int, timer) -> tuple[float, float]:
    """(seconds, last step's loss) of the strong baseline (see strong_parts) on ``batches``."""
    model, opt, step_fn, lr_at = strong_parts(cfg, hf, device)

    def one_step(i: int, timed) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for micro in batches[i]:
            with timed("forward"):
                loss = step_fn(micro) / cfg.train.grad_accum
            with timed("backward"):
                loss.backward()
            total += loss.detach()
        with timed("optimizer"):
            strong_update(cfg, model, opt, lr_at(i))
        return total

    for i in range(warmup):
        one_step(i, lambda phase: contextlib.nullcontext())
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, len(batches)):
        loss = one_step(i, timer)
    _sync(device)
    return time.perf_counter() - t0, float(loss)


def run_baseline(spec: dict, module: str = "ptm_dist.bench") -> dict:
    """``module``'s baseline on ``spec`` in a fresh subprocess (``python -m MODULE SPEC OUT``)."""
    with tempfile.TemporaryDirectory(prefix="ptm-bench-") as tmp:
        src, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-m", module, str(src), str(out)], check=True)
        return json.loads(out.read_text())


# ------------------------------------------------------------------ both, side by side


def bench_train(cfg: JobConfig, steps: int = 20, warmup: int = 5, search_micro_batch: bool = False) -> dict:
    cfg.scaling.fixed_workers("ptm bench train")  # a range [MIN, MAX] is for ptm pretrain only
    from dataclasses import asdict

    from ptm_dist.data.prepare import prepare_data
    from ptm_dist.launch import Launch, connect_ray
    from ptm_dist.plan import memory_bytes, model_shape

    worker_data = prepare_data(cfg).for_workers()
    data = asdict(worker_data)  # for the baseline subprocess, as JSON
    connect_ray(cfg.scaling.num_workers, cfg.scaling.resources_per_worker)
    how = Launch.from_scaling(cfg.scaling)
    gpu = how.use_gpu
    print(f"[bench] system: {cfg.scaling.num_workers} Ray Train workers, {warmup} warm-up + {steps} timed steps",
          flush=True)
    system = run_system(cfg, worker_data, steps, warmup, how)
    mb = cfg.train.micro_batch
    micro_batches = [mb]
    if search_micro_batch:
        micro_batches = sorted({max(1, mb // 4), max(1, mb // 2), mb, mb * 2, mb * 4} | (
            {mb * 8, mb * 16} if gpu else set()))
    workers = cfg.scaling.num_workers
    tpw = system["threads_per_worker"]
    # The baseline gets one worker's device: a GPU, or on CPU the cores all workers share.
    threads = tpw if gpu else min(os.cpu_count() or 1, tpw * workers)
    devices = workers if gpu else 1
    spec = {"job": cfg.to_dict(), "data": data, "device": "cuda:0" if gpu else "cpu", "threads": threads,
            "precision": system["precision"], "steps": steps, "warmup": warmup, "micro_batches": micro_batches}
    print(f"[bench] baseline: plain PyTorch loop, {threads} thread(s), micro batches {micro_batches}", flush=True)
    base = run_baseline(spec)
    same_mb = next(r for r in base["runs"] if r["micro_batch"] == mb)
    strong, strong_why = None, compact_unsupported(cfg, data["vocab_size"])
    if strong_why is None:
        print(f"[bench] strong baseline: minimal loop over the compact GPT-2, {threads} thread(s)", flush=True)
        strong = run_baseline({**spec, "module": "compact", "micro_batches": [mb]})["runs"][0]
    else:
        print(f"[bench] strong baseline: skipped ({strong_why})", flush=True)
    per_worker = None
    if not gpu and threads != tpw:  # also: the plain loop with one worker's threads, x workers
        print(f"[bench] baseline: plain PyTorch loop, {tpw} thread(s)", flush=True)
        per_worker = run_baseline({**spec, "threads": tpw, "micro_batches": [mb]})["runs"][0]
    report = {
        "model": f"{cfg.model.family}-{cfg.model.size}",
        "n_params": system["n_params"],
        "device": system["device_name"],
        "workers": workers,
        "zero_stage": cfg.zero.stage,
        "precision": system["precision"],
        "micro_batch": mb,
        "grad_accum": cfg.train.grad_accum,
        "seq_len": cfg.data.seq_len,
        "threads_per_worker": system["threads_per_worker"],
        "steps": steps,
        "system_tokens_per_s": system["tokens_per_s"],
        "baseline_tokens_per_s": same_mb["tokens_per_s"],
        "baseline_threads": threads,
        "ratio_same_module": system["tokens_per_s"] / (same_mb["tokens_per_s"] * devices),
        "baseline_last_loss": same_mb["last_loss"],
        "system_breakdown_s": {k: system[k] for k in ("step_s", "data_wait_s", "forward_s", "backward_s",
                                                     "optimizer_s", "allreduce_grads_s")},
        "baseline_breakdown_s": {k: same_mb[k] for k in ("step_s", "forward_s", "backward_s", "optimizer_s")},
        "system_peak_mem_bytes": system["peak_mem_bytes"],
        "baseline_peak_mem_bytes": same_mb["peak_mem_bytes"],
    }
    fastest = same_mb["tokens_per_s"]
    if strong is not None and not strong.get("oom"):
        fastest = max(fastest, strong["tokens_per_s"])
        report.update({
            "strong_baseline_tokens_per_s": strong["tokens_per_s"],
            "strong_baseline_breakdown_s": {k: strong[k] for k in ("step_s", "forward_s", "backward_s",
                                                                   "optimizer_s")},
            "strong_baseline_peak_mem_bytes": strong["peak_mem_bytes"],
            "strong_baseline_last_loss": strong["last_loss"],
            # below 1: the Hugging Face module itself is slower than the compact one
            "module_ratio": same_mb["tokens_per_s"] / strong["tokens_per_s"],
        })
    else:
        report["strong_baseline_skipped"] = strong_why or "out of memory"
    report["ratio"] = system["tokens_per_s"] / (fastest * devices)
    if per_worker is not None:
        report["baseline_one_worker_threads_tokens_per_s"] = per_worker["tokens_per_s"]
        report["scaling_efficiency"] = system["tokens_per_s"] / (per_worker["tokens_per_s"] * workers)
    shape = model_shape(cfg, data["vocab_size"])
    est = memory_bytes(shape, workers, cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params,
                       mb, cfg.data.seq_len, system["precision"], cfg.train.activation_checkpointing)
    report["plan_estimate_bytes"] = sum(est.values())
    report["plan_error"] = report["plan_estimate_bytes"] / system["peak_mem_bytes"] - 1
    if gpu:
        peak = gpu_peak_flops(system["device_name"])
        achieved = system["tokens_per_s"] / workers * system["flops_per_token"]
        report["mfu"] = achieved / peak if peak else None
        report["mfu_vs_measured_matmul"] = achieved / base["matmul_peak_flops"]
        report["matmul_peak_flops"] = base["matmul_peak_flops"]
    if search_micro_batch:
        report["micro_batch_search"] = base["runs"]
        ok = [r for r in base["runs"] if not r.get("oom")]
        report["best_micro_batch"] = max(ok, key=lambda r: r["tokens_per_s"])["micro_batch"]
    return report


def compact_unsupported(cfg: JobConfig, vocab_size: int) -> str | None:
    """Why the strong baseline cannot run this job's model (None when it can): the compact
    module is a GPT-2 trained with the next-token loss."""
    from ptm_dist.compact import CompactGPT

    if cfg.model.family != "gpt2":
        return f"the compact module is a GPT-2; model.family is {cfg.model.family}"
    hf = models.config_for(cfg.model, vocab_size, cfg.data.seq_len, models.SpecialTokens(eos=0, pad=0, mask=0))
    try:
        CompactGPT.from_hf_config(hf)
    except ValueError as e:
        return str(e)
    if cfg.train.activation_checkpointing:
        return "train.activation_checkpointing is on; the compact baseline has none"
    return None


def format_report(r: dict) -> str:
    mib = 1024**2
    sb, bb = r["system_breakdown_s"], r["baseline_breakdown_s"]
    strong = "strong_baseline_tokens_per_s" in r
    sg = r.get("strong_baseline_breakdown_s", {})

    def row(label: str, system: str, base: str, strong_value: str = "") -> str:
        return f"{label:<22}{system:>14}{base:>14}" + (f"{strong_value:>14}" if strong else "")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.1f}"

    lines = [
        (f"{r['model']} ({r['n_params'] / 1e6:.2f}M params) on {r['device']}, {r['workers']} workers, "
        f"ZeRO-{r['zero_stage']}, {r['precision']}, micro batch {r['micro_batch']} x {r['seq_len']}, "
        f"{r['threads_per_worker']} thread(s) per worker"),
        ("baseline: plain loop over the same Hugging Face module"
         + ("; strong: minimal loop over the compact GPT-2 (ptm_dist.compact)" if strong else
            f"; strong baseline skipped: {r.get('strong_baseline_skipped')}")
         + f"; both with {r['baseline_threads']} thread(s)"),
        row("", "system", "baseline", "strong"),
        row("tokens/s", f"{r['system_tokens_per_s']:,.0f}", f"{r['baseline_tokens_per_s']:,.0f}",
            f"{r.get('strong_baseline_tokens_per_s', 0):,.0f}"),
        row("step (ms)", ms(sb["step_s"]), ms(bb["step_s"]), ms(sg.get("step_s"))),
        row("  data wait (ms)", ms(sb["data_wait_s"]), ms(0.0), ms(0.0)),
        row("  forward (ms)", ms(sb["forward_s"]), ms(bb["forward_s"]), ms(sg.get("forward_s"))),
        row("  backward (ms)", ms(sb["backward_s"]), ms(bb["backward_s"]), ms(sg.get("backward_s"))),
        row("  optimizer (ms)", ms(sb["optimizer_s"]), ms(bb["optimizer_s"]), ms(sg.get("optimizer_s"))),
        row("all-reduce grads (ms)", ms(sb["allreduce_grads_s"]), "-", "-"),
        row("peak memory (MiB)", f"{r['system_peak_mem_bytes'] / mib:.1f}", f"{r['baseline_peak_mem_bytes'] / mib:.1f}",
            f"{r.get('strong_baseline_peak_mem_bytes', 0) / mib:.1f}")
        + f"   (ptm plan estimate {r['plan_estimate_bytes'] / mib:.1f}, error {r['plan_error']:+.0%})",
        row("last step loss", "-", f"{r['baseline_last_loss']:.4f}", f"{r.get('strong_baseline_last_loss', 0):.4f}"),
        (f"ratio (system / faster baseline{' x GPUs' if r['device'] != 'cpu' else ' on the same CPU'}): "
         f"{r['ratio']:.3f}"),
        f"  framework: system / plain loop over the same module: {r['ratio_same_module']:.3f}",
    ]
    if strong:
        lines.append(f"  model module: Hugging Face module / compact module, both in plain loops: "
                     f"{r['module_ratio']:.3f}")
    if "scaling_efficiency" in r:
        lines.append(
            f"scaling efficiency (system / (baseline with {r['threads_per_worker']} thread(s) x "
            f"{r['workers']} workers = {r['baseline_one_worker_threads_tokens_per_s'] * r['workers']:,.0f} "
            f"tokens/s)): {r['scaling_efficiency']:.3f}")
    if "mfu" in r:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown peak"
        lines.append(f"MFU: {mfu} of datasheet bf16 peak, {r['mfu_vs_measured_matmul']:.1%} of measured "
                     f"matmul peak ({r['matmul_peak_flops'] / 1e12:,.0f} TFLOP/s)")
    return "\n".join(lines)


# ------------------------------------------------------------------ data


class PeakMemory:
    """Resident memory of this process plus the Ray task workers (``ray::`` processes under this
    node's raylet, when this process started Ray), sampled every ``interval`` seconds.

    ``peak`` is the largest sum seen. ``added`` is what the work inside the block added: this
    process's growth and each worker's growth over its size at the start; a worker that Ray starts
    during the block, or one idle at the start but smaller, counts from the size of an idle worker
    (the median at the start, or ``idle_rss``; in full when neither is known). Ray ends a worker
    whose task was cancelled (a stream closed early) and starts another for the next task, or
    reuses an idle one: the footprint of a fresh worker (about 210 MB with the tokenizer
    imported) is not the work's and would swing a sum by that much."""

    def __init__(self, interval: float = 0.05, idle_rss: int | None = None):
        import threading

        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.raylet = _raylet_pid()
        self._first: dict[int, int] = {}
        self._high: dict[int, int] = {}
        self._idle = idle_rss  # else the median idle worker at the start

    def sizes(self) -> dict[int, tuple[str, int]]:
        """{pid: (name, rss)} of this process and the task workers."""
        import psutil

        out = {os.getpid(): ("driver", _rss())}
        if self.raylet is None:
            return out
        try:
            workers = psutil.Process(self.raylet).children(recursive=True)
        except psutil.Error:
            return out
        for proc in workers:
            try:
                name = proc.name()
                if name.startswith("ray::") and "Agent" not in name:
                    out[proc.pid] = (name, proc.memory_info().rss)
            except psutil.Error:
                continue
        return out

    def _sample(self) -> None:
        sizes = self.sizes()
        self.peak = max(self.peak, sum(rss for _, rss in sizes.values()))
        for pid, (_, rss) in sizes.items():
            self._high[pid] = max(self._high.get(pid, 0), rss)

    @property
    def added(self) -> int:
        return sum(max(0, high - self._first.get(pid, self._idle or 0)) for pid, high in self._high.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        import statistics

        sizes = self.sizes()
        idle = [rss for name, rss in sizes.values() if name == "ray::IDLE"]
        if self._idle is None and idle:
            self._idle = int(statistics.median(idle))
        # an idle worker smaller than a warm one has yet to import what its task needs: not the work's
        self._first = {pid: max(rss, self._idle or 0) if name == "ray::IDLE" else rss
                       for pid, (name, rss) in sizes.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _raylet_pid() -> int | None:
    """The raylet of the Ray instance this process started (None when it joined a cluster)."""
    try:
        import ray

        return ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    except Exception:  # noqa: BLE001 - private API; memory is then this process only
        return None


def _scaled_copies(shards: list, scale: int, root: Path) -> list:
    """The shards, each made ``scale`` times larger by repeating its content (a corpus ``scale``
    times larger with the same shard count; jsonl and txt shards on local disk)."""
    import shutil as _shutil
    from dataclasses import replace

    out = []
    for k, shard in enumerate(shards):
        if "://" in shard.uri or shard.format not in ("jsonl", "txt") or shard.uri.endswith((".gz", ".zst")):
            raise ValueError(f"--scale repeats local uncompressed jsonl/txt shards only; {shard.uri} is not one")
        target = root / f"{k:05d}-{Path(shard.uri).name}"
        with open(target, "wb") as dst:
            for _ in range(scale):
                with open(shard.uri, "rb") as src:
                    _shutil.copyfileobj(src, dst)
        out.append(replace(shard, uri=str(target)))
    return out


def _big_shard(shards: list, mb: int, root: Path):
    """One jsonl shard of about ``mb`` MB: the documents of ``shards`` repeated, each copy's
    documents numbered so no two lines are the same (a corpus with large shards)."""
    from ptm_dist.data.sources import Shard, read_documents

    docs = [d for s in shards for d in read_documents(s)]
    target = root / f"big-{mb}mb.jsonl"
    size, copy = 0, 0
    with open(target, "w", encoding="utf-8") as f:
        while size < mb << 20:
            for doc in docs:
                line = json.dumps({"text": f"{copy} {doc}"}) + "\n"
                f.write(line)
                size += len(line)  # ascii-escaped by json.dumps: characters are bytes
            copy += 1
    return Shard(str(target), "jsonl", "text")


def _stream_epochs(shards: list, wc, cfg: JobConfig, epochs: int = 1) -> tuple[int, float, float]:
    """(sequences, seconds, seconds to the first sequence) of ``epochs`` epochs of the Ray Data
    stream into this process, through one stream (Ray's workers stay warm across epochs)."""
    from ptm_dist.data.pipeline import SequenceStream

    t0 = time.perf_counter()
    stream = SequenceStream(shards, wc.tokenizer_json, cfg.data.seq_len, wc.special["eos"],
                            cfg.run.seed, 0, 1, cfg.data.read_concurrency, use_ray=True,
                            shuffle_window=cfg.data.shuffle_window, piece_bytes=cfg.data.piece_bytes)
    n, first = 0, None
    it = iter(stream)
    for _ in it:
        if first is None:
            first = time.perf_counter() - t0
        if stream.position.epoch >= epochs:
            break
        n += 1
    it.close()
    return n, time.perf_counter() - t0, first or 0.0


def _raw_encode(docs: list[str], tokenizer_json: str) -> tuple[int, float]:
    """(tokens, seconds) of Hugging Face tokenizers batch encoding of ``docs``, all cores."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the raw baseline may use every core
    try:
        tok.encode_batch_fast(docs[:64])  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for k in range(0, len(docs), 50_000):  # batches: a GB corpus's encodings do not fit at once
            tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[k : k + 50_000]))
        return tokens, time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def bench_data(cfg: JobConfig, max_shards: int | None = None, scale: int = 1, memory: bool = False,
               epochs: int = 1, big_shard_mb: int = 0) -> dict:
    """Raw tokenizers batch encoding against this pipeline (read + tokenize + pack into a
    consumer through Ray Data), on the same shards, machine and cores.

    The raw figure encodes documents already in memory with all cores (reading is not timed).
    The pipeline is timed over ``epochs`` epochs of one stream after a warm-up over two shards
    (Ray worker processes started, modules imported: a one-time cost of a long run, reported
    apart as the cold figure), together with its time to the first sequence; it counts the
    tokens of the packed sequences it delivers (each piece's last partial sequence is dropped,
    so it slightly undercounts). ``scale`` > 1 runs on that many copies of the shards.
    ``memory`` also streams the unscaled corpus and reports the peak resident memory (this
    process + Ray workers) of both, to show it does not grow with the corpus. ``big_shard_mb``
    also measures a corpus of one shard of that many MB (time to first sequence, throughput
    and peak memory against raw encoding of the same documents), under ``result["big"]``."""
    cfg.scaling.fixed_workers("ptm bench data")  # a range [MIN, MAX] is for ptm pretrain only
    import tempfile

    from ptm_dist.data.pieces import plan_pieces
    from ptm_dist.data.prepare import prepare_data
    from ptm_dist.data.sources import read_documents
    from ptm_dist.launch import connect_ray

    data = prepare_data(cfg)
    wc = data.for_workers()
    base = data.train[:max_shards] if max_shards else data.train
    tmp = Path(tempfile.mkdtemp(prefix="ptm-bench-data-"))
    try:
        shards = _scaled_copies(base, scale, tmp) if scale > 1 else base
        docs = [d for s in shards for d in read_documents(s)]
        raw_tokens, raw_s = _raw_encode(docs, wc.tokenizer_json)
        raw_tokens *= epochs  # the same documents, once per epoch
        raw_s *= epochs
        n_docs = len(docs)
        del docs
        connect_ray(cfg.scaling.num_workers, cfg.scaling.resources_per_worker)
        cold_n, cold_s, cold_first = _stream_epochs(base[:2], wc, cfg)  # warm-up: starts the workers
        result: dict = {}
        if memory:
            with PeakMemory() as mem_1x:
                _stream_epochs(base, wc, cfg)
            result["peak_mem_bytes_1x"] = mem_1x.peak
        with PeakMemory() as mem:
            n, pipe_s, first_s = _stream_epochs(shards, wc, cfg, epochs)
        if big_shard_mb:
            big = _big_shard(base, big_shard_mb, tmp)
            big_docs = list(read_documents(big))
            big_raw, big_raw_s = _raw_encode(big_docs, wc.tokenizer_json)
            del big_docs
            with PeakMemory() as big_mem:
                big_n, big_s, big_first = _stream_epochs([big], wc, cfg)
            big_tokens = big_n * cfg.data.seq_len
            result["big"] = {
                "shard_bytes": os.path.getsize(big.uri), "pieces": len(plan_pieces([big], cfg.data.piece_bytes)),
                "piece_bytes": cfg.data.piece_bytes, "raw_tokens": big_raw, "raw_seconds": big_raw_s,
                "raw_tokens_per_s": big_raw / big_raw_s, "pipeline_tokens": big_tokens,
                "pipeline_seconds": big_s, "pipeline_tokens_per_s": big_tokens / big_s,
                "first_sequence_s": big_first, "ratio": (big_tokens / big_s) / (big_raw / big_raw_s),
                "peak_mem_bytes": big_mem.peak,
            }
    finally:
        import shutil as _shutil

        _shutil.rmtree(tmp, ignore_errors=True)
    pipeline_tokens = n * cfg.data.seq_len
    result.update({
        "shards": len(shards), "scale": scale, "epochs": epochs, "documents": n_docs, "cpus": os.cpu_count(),
        "read_concurrency": cfg.data.read_concurrency, "seq_len": cfg.data.seq_len,
        "raw_tokens": raw_tokens, "raw_seconds": raw_s, "raw_tokens_per_s": raw_tokens / raw_s,
        "pipeline_tokens": pipeline_tokens, "pipeline_seconds": pipe_s,
        "pipeline_tokens_per_s": pipeline_tokens / pipe_s, "first_sequence_s": first_s,
        "pipeline_cold_tokens_per_s": cold_n * cfg.data.seq_len / cold_s, "cold_first_sequence_s": cold_first,
        "ratio": (pipeline_tokens / pipe_s) / (raw_tokens / raw_s),
        "peak_mem_bytes": mem.peak,
    })
    if memory:
        result["memory_growth"] = mem.peak / result["peak_mem_bytes_1x"] - 1
        result["memory_scope"] = "driver + Ray task workers" if mem.raylet else "driver only (joined a cluster)"
    return result


if __name__ == "__main__":  # the baseline subprocess: python -m ptm_dist.bench SPEC OUT
    spec_path, out_path = sys.argv[1], sys.argv[2]
    Path(out_path).write_text(json.dumps(baseline(json.loads(Path(spec_path).read_text()))))
