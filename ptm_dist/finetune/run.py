"""`ptm finetune` and `ptm pipeline`: the drivers.

    run_dir = finetune(load("jobs/finetune.yaml"))
    sweep_dir = pipeline(load(None))        # pretrain, then the sweep on its result

The start model (``finetune.init``) is a Hugging Face directory, or a ptm run or checkpoint
that is exported to one first (``<run_dir>/base``). Empty ``finetune.init`` means this job's
own pretraining run, trained first when it has no complete checkpoint. The fine-tuning run
directory ``<run.storage>/<finetune.name>`` holds job.yaml, metrics.jsonl (one line per
epoch), Ray Train's last epoch checkpoint (re-running the same command resumes from it) and
``best/``, the best epoch's model as a Hugging Face directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import storage
from ptm_dist.config import ConfigError, JobConfig, cache_dir

LOG_PREFIX = "[ptm]"


def require_local_storage(cfg: JobConfig, command: str) -> str:
    base = storage.absolute(cfg.run.storage)
    if storage.is_uri(base):
        raise ConfigError(f"run.storage {cfg.run.storage!r}: ptm {command} needs a local or shared "
                          "filesystem path (object storage is supported by ptm pretrain only)")
    return base


def choose_dir(cfg: JobConfig, name: str, section: str) -> str:
    """<run.storage>/<name>, or a fresh <name>-N when run.resume is false and it holds a run."""
    base = storage.absolute(cfg.run.storage)
    out = storage.join(base, name)
    if cfg.run.resume or not Path(out, "job.yaml").exists():
        return out
    n = 2
    while Path(base, f"{name}-{n}", "job.yaml").exists():
        n += 1
    fresh = f"{name}-{n}"
    getattr(cfg, section).name = fresh
    print(f"{LOG_PREFIX} run.resume=false and {out} holds a run: starting fresh in {fresh}")
    return storage.join(base, fresh)


def resolve_start(cfg: JobConfig, out_dir: str) -> str:
    """A Hugging Face model directory to start from (exported into <out_dir>/base if needed)."""
    from ptm_dist.export import export
    from ptm_dist.train.pretrain import pretrain

    init = cfg.finetune.init
    if init is None:
        src = storage.join(storage.absolute(cfg.run.storage), cfg.run.name)
        if not ckpt_lib.latest_complete_checkpoint(src):
            print(f"{LOG_PREFIX} no complete pretraining checkpoint in {src}: pretraining it first", flush=True)
            pre = cfg.model_copy(deep=True)
            pre.run.resume = True
            src = pretrain(pre)
    else:
        src = storage.absolute(init)
        if not storage.exists(src):
            raise ConfigError(f"finetune.init {init}: no such directory")
    if storage.exists(storage.join(src, "config.json")):
        return src
    if storage.exists(storage.join(src, ckpt_lib.MARKER)):
        ckpt = src
    else:
        ckpt = ckpt_lib.latest_complete_checkpoint(src)
    if not ckpt:
        raise ConfigError(f"finetune.init {src}: neither a Hugging Face model directory (config.json) nor a "
                          "ptm run or checkpoint directory with a complete checkpoint")
    base = Path(out_dir) / "base"
    stamp = base / "ptm_source.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("checkpoint") == ckpt:
        return str(base)
    info = export(ckpt, str(base))
    stamp.write_text(json.dumps({"checkpoint": ckpt, "step": info["step"]}) + "\n")
    print(f"{LOG_PREFIX} start model: {ckpt} (step {info['step']}) exported to {base}", flush=True)
    return str(base)


def prepare_task(cfg: JobConfig, base_dir: str) -> tuple[dict, dict]:
    """(tokenized task for the workers, a description: labels, sizes, majority baseline)."""
    from ptm_dist.finetune.task import load_task, tokenize
    from ptm_dist.finetune.worker import load_tokenizer

    task = load_task(cfg.finetune, cache_dir(cfg))
    tok = load_tokenizer(base_dir)
    data = tokenize(task, tok, cfg.finetune.max_length)
    label, baseline = task.majority_baseline()
    info = {"source": task.source, "labels": task.labels, "train": len(task.train_texts),
            "val": len(task.val_texts), "majority_label": label, "majority_baseline": baseline,
            "pad_id": tok.pad_token_id}
    print(f"{LOG_PREFIX} task {task.source}: {info['train']} training / {info['val']} validation examples, "
          f"{len(task.labels)} labels; majority-class baseline accuracy {baseline:.4f} ({label})", flush=True)
    return data, info


def worker_config(cfg: JobConfig, out_dir: str, base_dir: str, data: dict, info: dict,
                  trial_id: str | None = None) -> dict:
    return {"job": cfg.to_dict(), "out_dir": out_dir, "base_dir": base_dir, "task": data,
            "pad_id": info["pad_id"], "trial_id": trial_id,
            "log_prefix": f"[ptm trial {trial_id}]" if trial_id else LOG_PREFIX}


def finetune(cfg: JobConfig) -> str:
    """Run the fine-tuning job; returns its run directory."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ptm_dist.finetune.worker import finetune_worker
    from ptm_dist.train.pretrain import connect_ray, use_gpu

    base = require_local_storage(cfg, "finetune")
    t0 = time.time()
    run_dir = choose_dir(cfg, cfg.finetune.name, "finetune")
    base_dir = resolve_start(cfg, run_dir)
    data, info = prepare_task(cfg, base_dir)
    owns_ray = connect_ray(cfg)
    try:
        gpu = use_gpu(cfg)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        storage.write_text(storage.join(run_dir, "job.yaml"), cfg.to_yaml())
        storage.write_text(storage.join(run_dir, "task.json"), json.dumps(info, indent=1) + "\n")
        resources = cfg.scaling.resources_per_worker or ({"GPU": 1} if gpu else {"CPU": 1})
        trainer = TorchTrainer(
            finetune_worker,
            train_loop_config=worker_config(cfg, run_dir, base_dir, data, info),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=gpu, resources_per_worker=resources,
                placement_strategy=cfg.scaling.placement.upper(),
            ),
            run_config=ray.train.RunConfig(
                name=cfg.finetune.name, storage_path=base,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )
        trainer.fit()
    finally:
        if owns_ray:
            ray.shutdown()
    print_summary(run_dir, info, cfg, time.time() - t0)
    return run_dir


def print_summary(run_dir: str, info: dict, cfg: JobConfig, seconds: float) -> None:
    from ptm_dist.finetune.worker import better, read_epochs

    epochs = read_epochs(run_dir)
    print("\n== ptm finetune summary ==")
    print(f"{'epoch':>5} {'loss':>8} {'eval_loss':>9} {'accuracy':>8} {'f1_macro':>8}")
    best = None
    for r in epochs:
        print(f"{r['epoch']:>5} {r['loss']:>8.4f} {r['eval_loss']:>9.4f} {r['accuracy']:>8.4f} {r['f1_macro']:>8.4f}")
        if better(r[cfg.tune.metric], best and best[cfg.tune.metric], cfg.tune.mode):
            best = r
    if best:
        print(f"best epoch {best['epoch']}: {cfg.tune.metric} {best[cfg.tune.metric]:.4f} "
              f"(majority-class baseline accuracy {info['majority_baseline']:.4f})")
    print(f"best model: {Path(run_dir) / 'best'}")
    print(f"wall time: {seconds:.0f}s")
    print(f"run_dir: {run_dir}", flush=True)


def pipeline(cfg: JobConfig) -> str:
    """Pretrain (or resume) the job's run, then sweep fine-tuning from it; returns the sweep dir."""
    from ptm_dist.finetune.sweep import tune
    from ptm_dist.train.pretrain import pretrain

    require_local_storage(cfg, "pipeline")
    run_dir = pretrain(cfg.model_copy(deep=True))
    swept = cfg.model_copy(deep=True)
    swept.finetune.init = run_dir
    return tune(swept)
