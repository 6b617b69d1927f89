"""`ptm tune`: a Ray Tune sweep over the fine-tuning hyperparameters.

    sweep_dir = tune(load("jobs/tune.yaml"))

Every trial is a fine-tuning run with the trial's values of ``tune.space`` applied to the job.
With ``tune.num_workers: 1`` a trial trains in its Tune trial process (DeepSpeed over a world
of one); with more it launches a Ray Train job of that many DeepSpeed workers from the trial
(Ray Train V2 inside a Tune function trainable; the trial hands each epoch's line of the
job's metrics.jsonl to the scheduler, and the driver frees the job's placement group when the
trial ends). Trials checkpoint every epoch; Tune's experiment state lives in
``<sweep_dir>/tune``, so re-running the same command after an interruption resumes the sweep
(unfinished trials continue from their last epoch checkpoint).

The sweep directory holds sweep.json, trials.csv, best.json, best/ (the best trial's best
epoch, a Hugging Face directory), base/ (the exported start model, when it is a ptm run) and
trials/<trial_id>/ (metrics.jsonl, params.json, best/).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ptm_dist import launch, storage, tracking
from ptm_dist.config import JobConfig, apply_override
from ptm_dist.errors import ConfigError
from ptm_dist.finetune.driver import (
    LOG_PREFIX,
    baseline_name,
    prepare_task,
    resolve_start,
)
from ptm_dist.finetune.worker import (
    PLACEMENT_GROUP_FILE,
    FinetuneSpec,
    better,
    finetune_worker,
    read_epochs,
    run_in_trial,
)


def trial_job(base_job: dict, params: dict) -> JobConfig:
    """The job of one trial: the sweep's job with the trial's values (dotted keys) applied."""
    doc = json.loads(json.dumps(base_job))
    for key, value in params.items():
        apply_override(doc, f"{key}={json.dumps(value)}")
    return JobConfig.model_validate(doc)


def to_tune(parsed: dict[str, dict[str, list]], grid_ok: bool = True) -> dict[str, Any]:
    """Ray Tune domains for a parsed space (ptm_dist.space; grid -> tune.grid_search)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in parsed.items():
        dist, args = next(iter(spec.items()))
        if dist == "grid":
            out[key] = tune.grid_search(list(args)) if grid_ok else tune.choice(list(args))
        elif dist == "choice":
            out[key] = tune.choice(list(args))
        elif dist == "randint":
            out[key] = tune.randint(args[0], args[1])
        else:
            out[key] = getattr(tune, dist)(args[0], args[1])
    return out


def run_trial(config: dict, *, job: dict, sweep_dir: str, base_dir: str, data: dict, pad_id: int,
              how: launch.Launch) -> None:
    """The Tune function trainable: one fine-tuning run with this trial's hyperparameters.
    ``how``: the resources of one worker of a multi-worker trial's Ray Train job."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    params = {k: config[k] for k in sorted(config)}
    cfg = trial_job(job, params)
    out = storage.join(sweep_dir, "trials", trial_id)  # a local path or URI
    storage.write_text(storage.join(out, "params.json"), json.dumps(params, indent=1) + "\n")
    spec = FinetuneSpec(job=cfg, out_dir=out, base_dir=base_dir, task=data, pad_id=pad_id, trial_id=trial_id)
    if cfg.tune.num_workers == 1:
        run_in_trial(spec)
        return
    # Same name and storage when Tune restarts the trial: Ray Train resumes from its last
    # checkpoint (ray.train.get_checkpoint in the workers).
    trainer = launch.make_trainer(finetune_worker, {"spec": spec}, how, name="train", storage_path=out,
                                  keep_checkpoints=1)
    relay_epochs(trainer, out)


def relay_epochs(trainer, out: str) -> None:
    """Run a trial's Ray Train job and hand each epoch's line of its metrics.jsonl to Tune.

    When the scheduler stops the trial (also when ASHA stops a trial that reached max_t),
    ray.tune.report raises SystemExit here and Tune terminates the trial's actor. The job's
    controller and workers are the actor's children and end with it (their last epoch's
    checkpoint is already in storage); the job's placement group outlives them and is removed
    by the sweep's driver (ReleaseTrialJobs), so the next trial's job gets the resources.
    """
    import threading

    import ray.tune

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial below
            failure.append(e)

    seen = len(read_epochs(out))  # epochs Tune already has from before a restart
    poll = 2.0 if storage.is_uri(out) else 0.5  # seconds between reads of metrics.jsonl
    thread = threading.Thread(target=fit, name="ptm-trial-train", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        epochs = read_epochs(out)
        for record in epochs[seen:]:
            ray.tune.report(record)
        seen = max(seen, len(epochs))
        if not alive:
            break
        thread.join(timeout=poll)
    if failure:
        raise failure[0]


def release_trial_job(trial_dir: str) -> None:
    """Remove the placement group of a trial's Ray Train job if it is still there (called by
    the sweep's driver once Tune has ended the trial)."""
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    path = storage.join(trial_dir, PLACEMENT_GROUP_FILE)
    if not storage.exists(path):
        return
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(storage.read_text(path).strip())))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)


class ReleaseTrialJobs(Callback):
    """Tune callback: frees each multi-worker trial's Ray Train job when Tune ends the trial.

    Module-level so that Tune's pickled experiment state restores it on a resumed sweep.
    """

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def _release(self, trial) -> None:
        try:
            release_trial_job(storage.join(self.sweep_dir, "trials", trial.trial_id))
        except Exception as e:  # noqa: BLE001 - never fail the sweep over the clean-up
            print(f"{LOG_PREFIX} trial {trial.trial_id}: could not free its Ray Train job: {e}", flush=True)


def _scheduler(cfg: JobConfig, space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=cfg.finetune.epochs, grace_period=min(t.grace_period,
                             cfg.finetune.epochs), reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=t.perturbation_interval,
                                       hyperparam_mutations=to_tune(space, grid_ok=False))
    return FIFOScheduler()


def _search(cfg: JobConfig):
    if cfg.tune.search == "random":
        return None  # Tune's default: random sampling, grid entries crossed
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.search optuna needs the optuna package: pip install optuna "
                          "(or use tune.search random)") from None
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), max_concurrent=cfg.tune.max_concurrent)


def sweep_description(cfg: JobConfig) -> dict:
    t = cfg.tune
    return {"metric": t.metric, "mode": t.mode, "scheduler": t.scheduler, "search": t.search,
            "space": t.space, "num_samples": t.num_samples, "max_epochs": cfg.finetune.epochs,
            "num_workers": t.num_workers}


def _check_same_sweep(sweep_dir: str, desc: dict) -> None:
    path = storage.join(sweep_dir, "sweep.json")
    if not storage.exists(path):
        return
    old = json.loads(storage.read_text(path))
    changed = [k for k in desc if k in old and old[k] != desc[k]]
    if changed:
        raise ConfigError(f"{sweep_dir} holds a sweep with a different {', '.join(changed)}; use another "
                          "tune.name, or --set run.resume=false for a fresh directory")


def tune(cfg: JobConfig) -> str:
    """Run (or resume) the sweep; returns the sweep directory."""
    import ray
    from ray import tune as rt

    t0 = time.time()
    cfg, sweep_dir = storage.resolve_run_dir(cfg, "tune")
    desc = sweep_description(cfg)
    _check_same_sweep(sweep_dir, desc)
    base_dir = resolve_start(cfg, sweep_dir)
    data, info = prepare_task(cfg, base_dir)
    search = _search(cfg)
    # A local Ray sized for max_concurrent trials of num_workers workers each.
    per_worker = cfg.tune.resources_per_worker or cfg.scaling.resources_per_worker
    owns_ray = launch.connect_ray(cfg.tune.num_workers * cfg.tune.max_concurrent, per_worker)
    try:
        how = launch.Launch.resolve(cfg.tune.num_workers, cfg.scaling.use_gpu, per_worker, cfg.scaling.placement)
        storage.write_text(storage.join(sweep_dir, "job.yaml"), cfg.to_yaml())
        storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps(desc, indent=1) + "\n")
        storage.write_text(storage.join(sweep_dir, "task.json"), json.dumps(info, indent=1) + "\n")
        trainable = rt.with_parameters(run_trial, job=cfg.to_dict(), sweep_dir=sweep_dir, base_dir=base_dir,
                                       data=data, pad_id=info["pad_id"], how=how)
        if cfg.tune.num_workers == 1:
            trial_resources = how.resources_per_worker
        else:
            # The trial only drives its Ray Train job (whose workers hold their own resources);
            # Ray Tune needs a non-empty request, so it asks for a sliver of a CPU.
            trial_resources = {"CPU": 0.1}
        trainable = rt.with_resources(trainable, {k.lower() if k in ("CPU", "GPU") else k: v
                                                  for k, v in trial_resources.items()})
        experiment = storage.join(sweep_dir, "tune")  # Tune's own state: a local path or URI
        if rt.Tuner.can_restore(experiment):
            print(f"{LOG_PREFIX} resuming the sweep in {experiment}", flush=True)
            tuner = rt.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                     resume_errored=True)
        else:
            tuner = rt.Tuner(
                trainable,
                param_space=to_tune(cfg.tune.space, grid_ok=cfg.tune.search == "random"),
                tune_config=rt.TuneConfig(
                    metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg, cfg.tune.space),
                    search_alg=search, num_samples=cfg.tune.num_samples,
                    max_concurrent_trials=cfg.tune.max_concurrent, reuse_actors=False,
                    trial_dirname_creator=lambda trial: trial.trial_id,
                ),
                run_config=rt.RunConfig(
                    name="tune", storage_path=sweep_dir, verbose=1,
                    callbacks=[ReleaseTrialJobs(sweep_dir)] if cfg.tune.num_workers > 1 else None,
                    checkpoint_config=rt.CheckpointConfig(num_to_keep=1),
                    failure_config=rt.FailureConfig(max_failures=0),
                ),
            )
        grid = tuner.fit()
        errors = {r.path.rstrip("/").rsplit("/", 1)[-1]: r.error for r in grid if r.error is not None}
    finally:
        if owns_ray:
            ray.shutdown()
    summary = summarize(sweep_dir, cfg, errors)
    tracking.log_sweep(cfg, sweep_dir)  # best trial and trials table, in the trials' wandb group
    print_summary(summary, info, cfg, time.time() - t0)
    for trial_id, err in errors.items():
        print(f"{LOG_PREFIX} trial {trial_id} failed: {str(err).strip().splitlines()[-1]}", flush=True)
    if summary["best"] is None:
        raise RuntimeError(f"no trial of the sweep in {sweep_dir} finished an epoch") from next(
            iter(errors.values()), None)
    print(f"sweep_dir: {sweep_dir}", flush=True)
    return sweep_dir


def summarize(sweep_dir: str, cfg: JobConfig, errors: dict) -> dict:
    """Write trials.csv, best.json and best/ from the trials' own files; return the table."""
    metric, mode, max_epochs = cfg.tune.metric, cfg.tune.mode, cfg.finetune.epochs
    keys = list(cfg.tune.space)
    rows = []
    trials_dir = storage.join(sweep_dir, "trials")
    for name in storage.list_dirs(trials_dir):
        d = storage.join(trials_dir, name)
        params_path = storage.join(d, "params.json")
        params = json.loads(storage.read_text(params_path)) if storage.exists(params_path) else {}
        epochs = read_epochs(d)
        value = None
        for r in epochs:
            if better(r[metric], value, mode):
                value = r[metric]
        n = len(epochs)
        status = "error" if name in errors else ("done" if n >= max_epochs else "stopped early")
        rows.append({"trial_id": name, "status": status, "epochs": n, metric: value,
                     **{k: params.get(k) for k in keys}})
    scored = [r for r in rows if r[metric] is not None]
    best = None
    for r in scored:
        if best is None or better(r[metric], best[metric], mode):
            best = r
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["trial_id", "status", "epochs", metric, *keys])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(sweep_dir, "trials.csv"), buf.getvalue())
    if best is not None:
        storage.write_text(storage.join(sweep_dir, "best.json"), json.dumps(
            {"trial_id": best["trial_id"], "metric": metric, "value": best[metric],
             "config": {k: best[k] for k in keys}}, indent=1) + "\n")
        copy_best(storage.join(trials_dir, best["trial_id"], "best"), storage.join(sweep_dir, "best"))
    return {"rows": rows, "best": best, "total_epochs": sum(r["epochs"] for r in rows)}


def copy_best(src: str, dst: str) -> None:
    """The best trial's best/ as the sweep's best/: a local copy renamed into place, or in object
    storage the old one deleted and the copy uploaded with its marker (ptm_best.json) last."""
    if not storage.is_uri(dst):
        tmp = Path(dst).parent / ".best-new"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        return
    local, is_tmp = storage.local_copy(src)
    try:
        marker = (local / "ptm_best.json").read_text()
        (local / "ptm_best.json").unlink()
        storage.delete_dir(dst)
        storage.upload_dir(local, dst)
        storage.write_text(storage.join(dst, "ptm_best.json"), marker)
    finally:
        storage.drop_local_copy(local, is_tmp)


def print_summary(summary: dict, info: dict, cfg: JobConfig, seconds: float) -> None:
    metric = cfg.tune.metric
    keys = list(cfg.tune.space)
    rows, best = summary["rows"], summary["best"]
    print("\n== ptm tune summary ==")
    header = f"{'trial_id':<13} {'status':<14} {'epochs':>6} {metric:>10}  " + "  ".join(keys)
    print(header)
    for r in rows:
        value = f"{r[metric]:.4f}" if r[metric] is not None else "-"
        params = "  ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        print(f"{r['trial_id']:<13} {r['status']:<14} {r['epochs']:>6} {value:>10}  {params}")
    print(f"trials: {len(rows)}; epochs run: {summary['total_epochs']} of {len(rows) * cfg.finetune.epochs} "
          f"(trials x finetune.epochs) with scheduler {cfg.tune.scheduler}")
    if best is not None:
        print(f"best trial {best['trial_id']}: {metric} {best[metric]:.4f}; {baseline_name(info)} "
              f"{info['majority_baseline']:.4f}")
    print(f"wall time: {seconds:.0f}s")
