"""`ptm bench init`: peak host memory per rank of ZeRO-3 training with the model built whole on
every rank, against the model built partitioned (``engine.build_model`` with a ZeRO-3 config), side by side.

    ptm bench init jobs/gpt2-124m.yaml --set data.seq_len=128 --set train.micro_batch=1
    ptm bench init --set model.init=DIR --set scaling.num_workers=2   # loading a pretrained model

For each way of building, ``scaling.num_workers`` fresh processes (a gloo or NCCL process group
on this machine, no Ray: the figure is the model's, not Ray's) build the model, make the
DeepSpeed ZeRO-3 engine and train ``--steps`` steps on random tokens. Each reports its peak
resident set size (``ru_maxrss``, the kernel's high-water mark of the process's RSS: private and
shared pages it touched, mapped files included) after building and at the end, and the peak of
its anonymous resident memory while building (RssAnon from /proc/self/status sampled every 5 ms:
the process's own copies of weights; the weight files transformers maps are not counted).
With ``model.init`` each way loads that pretrained model instead of building a random one.
"""

from __future__ import annotations

import os
import resource
import tempfile

import torch


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _AnonPeak:
    """The highest RssAnon seen while the block runs (a sampling thread, every 5 ms)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_anon(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_anon())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _rank(rank: int, world: int, port: int, job_yaml: str, partitioned: bool, steps: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from ptm_dist import models
    from ptm_dist.config import load
    from ptm_dist.engine import EngineSpec, build_model, ds_config, prepare, resolve_precision
    from ptm_dist.train.step import Objective, train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    device = torch.device(f"cuda:{rank}" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    cfg = load(job_yaml, [])
    cfg.zero.stage = 3
    spec = EngineSpec.for_pretraining(cfg)
    init_config = None
    if cfg.model.init:
        with open(os.path.join(cfg.model.init, "config.json")) as f:
            init_config = json.load(f)
    hf = models.config_for(cfg.model, cfg.data.tokenizer.vocab_size, cfg.data.seq_len,
                           models.SpecialTokens(eos=0, pad=1, mask=2), init_config)
    conf = ds_config(spec, resolve_precision(cfg.train.precision, device, 3), device.type == "cuda")
    start, anon_start = _peak_rss(), _rss_anon()
    with _AnonPeak() as anon:
        model = build_model(hf, cfg.run.seed, conf if partitioned else None, cfg.model.init)
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
                   "anon_start": anon_start, "anon_build_peak": anon.peak, "n_params": models.num_params(model)}, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_init(cfg, steps: int = 3) -> dict:
    """Per-rank peak RSS with the model built whole and built partitioned (see module doc)."""
    cfg.scaling.fixed_workers("ptm bench init")  # a range [MIN, MAX] is for ptm pretrain only
    import json

    import torch.multiprocessing as mp

    from ptm_dist.dist import free_port

    world = cfg.scaling.num_workers
    name = cfg.model.init or f"{cfg.model.family}-{cfg.model.size}"
    out: dict = {"model": name, "loaded": bool(cfg.model.init), "workers": world, "steps": steps,
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
    for key in ("after_build", "peak", "anon_build_peak"):
        whole = max(r[key] for r in out["whole"])
        part = max(r[key] for r in out["partitioned"])
        out[f"{key}_ratio"] = part / whole
    return out


def format_init_report(r: dict) -> str:
    mib = 2**20
    how = "loaded from model.init" if r.get("loaded") else "built"
    fp32 = r["n_params"] * 4 / mib
    lines = [(f"ZeRO-3, {r['model']} ({r['n_params'] / 1e6:.1f}M parameters, {fp32:,.0f} MiB in fp32) {how}, "
              f"{r['workers']} workers, {r['steps']} steps of {r['micro_batch']} x {r['seq_len']} tokens; "
              "per rank (MiB):"),
             (f"{'build':<12} {'rank':>4} {'anon before':>12} {'anon peak in build':>19} {'maxrss before':>14} "
              f"{'after build':>12} {'RSS then':>9} {'after steps':>12}")]
    for name in ("whole", "partitioned"):
        for rank, x in enumerate(r[name]):
            lines.append(f"{name:<12} {rank:>4} {x['anon_start'] / mib:>12,.0f} {x['anon_build_peak'] / mib:>19,.0f} "
                         f"{x['start'] / mib:>14,.0f} {x['after_build'] / mib:>12,.0f} "
                         f"{x['held_after_build'] / mib:>9,.0f} {x['peak'] / mib:>12,.0f}")
    lines.append(f"partitioned / whole (largest rank): anonymous peak in build {r['anon_build_peak_ratio']:.2f}, "
                 f"maxrss after build {r['after_build_ratio']:.2f}, at the end {r['peak_ratio']:.2f}")
    lines.append("anon: RssAnon (the process's own memory; mapped weight files not counted), sampled every 5 ms; "
                 "maxrss: ru_maxrss (mapped files counted)")
    return "\n".join(lines)
