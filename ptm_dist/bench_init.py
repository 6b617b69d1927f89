"""`ptm bench init`: peak host memory per rank of ZeRO-3 training with the model built whole on
every rank, against the model built partitioned (``models.build(..., zero3=...)``), side by side.

    ptm bench init jobs/gpt2-124m.yaml --set data.seq_len=128 --set train.micro_batch=1

For each way of building, ``scaling.num_workers`` fresh processes (a gloo or NCCL process group
on this machine, no Ray: the figure is the model's, not Ray's) build the model, make the
DeepSpeed ZeRO-3 engine and train ``--steps`` steps on random tokens. Each reports its peak
resident set size (``ru_maxrss``, the kernel's high-water mark of the process's RSS: private and
shared pages it touched, mapped files included) after building and at the end.
"""

from __future__ import annotations

import os
import resource
import tempfile

import torch


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(rank: int, world: int, port: int, job_yaml: str, partitioned: bool, steps: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from ptm_dist import models
    from ptm_dist.config import load
    from ptm_dist.engine import EngineSpec, ds_config, prepare, resolve_precision
    from ptm_dist.train.step import Objective, train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    cfg = load(job_yaml, [])
    cfg.zero.stage = 3
    spec = EngineSpec.for_pretraining(cfg)
    start = _peak_rss()
    hf = models.hf_config(cfg.model.family, cfg.model.size, cfg.data.tokenizer.vocab_size, cfg.data.seq_len,
                          models.SpecialTokens(eos=0, pad=1, mask=2))
    conf = ds_config(spec, resolve_precision(cfg.train.precision, device, 3), device.type == "cuda")
    model = models.build(hf, seed=cfg.run.seed, zero3=conf if partitioned else None)
    built = _peak_rss()
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # RSS now: what the build kept
    engine, _ = prepare(model, spec, device)
    g = torch.Generator().manual_seed(rank)
    shape = (cfg.train.micro_batch, cfg.data.seq_len)
    for _ in range(steps):
        batches = [torch.randint(0, hf.vocab_size, shape, generator=g).to(device) for _ in range(cfg.train.grad_accum)]
        train_step(engine, batches, Objective(causal=True))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"start": start, "after_build": built, "held_after_build": held, "peak": _peak_rss(),
                   "n_params": models.num_params(model)}, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_init(cfg, steps: int = 3) -> dict:
    """Per-rank peak RSS with the model built whole and built partitioned (see module doc)."""
    import json

    import torch.multiprocessing as mp

    from ptm_dist.dist import free_port

    world = cfg.scaling.num_workers
    out: dict = {"model": f"{cfg.model.family}-{cfg.model.size}", "workers": world, "steps": steps,
                 "seq_len": cfg.data.seq_len, "micro_batch": cfg.train.micro_batch}
    with tempfile.TemporaryDirectory(prefix="ptm-bench-init-") as tmp:
        job = f"{tmp}/job.yaml"
        with open(job, "w") as f:
            f.write(cfg.to_yaml())
        for name, partitioned in (("whole", False), ("partitioned", True)):
            res = f"{tmp}/{name}"
            os.mkdir(res)
            mp.start_processes(_rank, args=(world, free_port(), job, partitioned, steps, res), nprocs=world,
                               start_method="spawn")
            out[name] = [json.load(open(f"{res}/{r}.json")) for r in range(world)]  # noqa: SIM115
    out["n_params"] = out["whole"][0]["n_params"]
    for key in ("after_build", "peak"):
        whole = max(r[key] for r in out["whole"])
        part = max(r[key] for r in out["partitioned"])
        out[f"{key}_ratio"] = part / whole
    return out


def format_init_report(r: dict) -> str:
    mib = 2**20
    lines = [(f"ZeRO-3, {r['model']} ({r['n_params'] / 1e6:.1f}M parameters), {r['workers']} workers, "
             f"{r['steps']} steps of {r['micro_batch']} x {r['seq_len']} tokens; peak RSS per rank (MiB):"),
             (f"{'build':<12} {'rank':>4} {'before build':>13} {'after build':>12} {'RSS then':>9} "
             f"{'after steps':>12}")]
    for name in ("whole", "partitioned"):
        for rank, x in enumerate(r[name]):
            lines.append(f"{name:<12} {rank:>4} {x['start'] / mib:>13,.0f} {x['after_build'] / mib:>12,.0f} "
                         f"{x['held_after_build'] / mib:>9,.0f} {x['peak'] / mib:>12,.0f}")
    lines.append(f"partitioned / whole (largest rank): after build {r['after_build_ratio']:.2f}, "
                 f"peak {r['peak_ratio']:.2f}")
    return "\n".join(lines)
