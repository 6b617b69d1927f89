"""`ptm finetune`: the driver.

    run_dir = finetune(load("jobs/finetune.yaml"))

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

from ptm_dist import launch, runlogs, storage
from ptm_dist.config import JobConfig
from ptm_dist.engine import check_precision
from ptm_dist.finetune.driver import baseline_name, prepare_task, resolve_start
from ptm_dist.finetune.worker import FinetuneSpec, better, finetune_worker, read_epochs


def finetune(cfg: JobConfig) -> str:
    """Run the fine-tuning job; returns its run directory."""
    cfg.scaling.fixed_workers("ptm finetune")  # a range [MIN, MAX] is for ptm pretrain only
    import ray

    base = storage.absolute(cfg.run.storage)  # a local or shared path, or an object-store URI
    t0 = time.time()
    cfg, run_dir = storage.resolve_run_dir(cfg, "finetune")
    base_dir = resolve_start(cfg, run_dir)
    data, info = prepare_task(cfg, base_dir)
    launch.check_local_cpus(cfg.scaling.num_workers, cfg.scaling.resources_per_worker)
    with runlogs.RunLogs(run_dir, "finetune") as logs:  # library output to <run_dir>/logs/
        owns_ray = launch.connect_ray(cfg.scaling.num_workers, cfg.scaling.resources_per_worker)
        try:
            how = launch.Launch.from_scaling(cfg.scaling)
            check_precision(cfg.train.precision, how.use_gpu, cfg.zero.stage)
            launch.check_capacity(how, local=owns_ray and not launch.joins_cluster())
            storage.write_text(storage.join(run_dir, "job.yaml"), cfg.to_yaml())
            storage.write_text(storage.join(run_dir, "task.json"), json.dumps(info, indent=1) + "\n")
            spec = FinetuneSpec(job=cfg, out_dir=run_dir, base_dir=base_dir, task=data, pad_id=info["pad_id"])
            trainer = launch.make_trainer(finetune_worker, {"spec": spec}, how, name=cfg.finetune.name,
                                          storage_path=base, keep_checkpoints=1)
            trainer.fit()
        finally:
            if owns_ray:
                ray.shutdown()
    print_summary(run_dir, info, cfg, time.time() - t0, logs.where)
    return run_dir


def print_summary(run_dir: str, info: dict, cfg: JobConfig, seconds: float, logs: str | None = None) -> None:
    epochs = read_epochs(run_dir)
    print("\n== ptm finetune summary ==")
    f1 = "f1" if cfg.finetune.task == "token_classification" else "f1_macro"
    print(f"{'epoch':>5} {'loss':>8} {'eval_loss':>9} {'accuracy':>8} {f1:>8}")
    best = None
    for r in epochs:
        print(f"{r['epoch']:>5} {r['loss']:>8.4f} {r['eval_loss']:>9.4f} {r['accuracy']:>8.4f} {r[f1]:>8.4f}")
        if better(r[cfg.tune.metric], best and best[cfg.tune.metric], cfg.tune.mode):
            best = r
    if best:
        print(f"best epoch {best['epoch']}: {cfg.tune.metric} {best[cfg.tune.metric]:.4f} "
              f"({baseline_name(info)} {info['majority_baseline']:.4f})")
    print(f"best model: {storage.join(run_dir, 'best')}")
    if logs:
        print(f"logs: {logs} (library output; --verbose or PTM_VERBOSE=1 shows it here)")
    print(f"wall time: {seconds:.0f}s")
    print(f"run_dir: {run_dir}", flush=True)
