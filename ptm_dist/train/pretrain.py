"""`ptm pretrain`: the driver. Prepares data, starts or joins Ray, runs the TorchTrainer.

    run_dir = pretrain(load("jobs/tiny.yaml"))

The run directory is ``<run.storage>/<run.name>``. With ``run.resume`` (the default) a run
directory that holds checkpoints is continued from its newest complete one; otherwise a fresh
directory ``<name>-2``, ``<name>-3``... is used, so two runs never mix.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import yaml

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import faults, progress, storage, tracking
from ptm_dist.config import ConfigError, JobConfig
from ptm_dist.data.prepare import prepare_data
from ptm_dist.tracking import read_metrics

# Job fields that must not change when a run is resumed: they change what the weights mean.
_IDENTITY = ("model", "data.seq_len", "data.tokenizer", "zero.stage", "scaling.num_workers")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def choose_run_dir(cfg: JobConfig) -> str:
    """The run directory to use, honouring run.resume (may rename cfg.run.name)."""
    base = storage.absolute(cfg.run.storage)
    run_dir = storage.join(base, cfg.run.name)
    if cfg.run.resume or not storage.exists(storage.join(run_dir, "job.yaml")):
        return run_dir
    n = 2
    while storage.exists(storage.join(base, f"{cfg.run.name}-{n}", "job.yaml")):
        n += 1
    cfg.run.name = f"{cfg.run.name}-{n}"
    print(f"[ptm] run.resume=false and {run_dir} holds a run: starting fresh in {cfg.run.name}")
    return storage.join(base, cfg.run.name)


def check_resumable(cfg: JobConfig, run_dir: str) -> None:
    path = storage.join(run_dir, "job.yaml")
    if not storage.exists(path) or not ckpt_lib.latest_complete_checkpoint(run_dir):
        return
    old = yaml.safe_load(storage.read_text(path)) or {}
    new = cfg.to_dict()
    changed = [k for k in _IDENTITY if _get(old, k) != _get(new, k)]
    if changed:
        details = "; ".join(f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in changed)
        raise ConfigError(
            f"{run_dir} holds a run with a different {', '.join(changed)} ({details}); "
            "use another run.name, or --set run.resume=false for a fresh directory"
        )


# Environment for Ray workers. Ray Train's print patch would echo every progress line twice
# (once through its logger, once to the captured stdout); the loop prints plainly.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_env_vars() -> dict[str, str]:
    """WORKER_ENV plus this machine's cache and thread settings, for local clusters."""
    env = dict(WORKER_ENV)
    for key in ("PTM_DIST_CACHE", "OMP_NUM_THREADS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def forget_ray_checkpoint_index(run_dir: str) -> None:
    """Remove Ray Train's index of the run's checkpoints before a new fit.

    Ray Train refuses to start in a run directory whose index names a checkpoint that no longer
    exists, and ptm's retention deletes old checkpoints. ptm picks the checkpoint to resume from
    itself (the newest with a COMPLETE marker), so Ray's index is not needed across fits.
    """
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    path = storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    if storage.exists(path):
        fs, p = storage.resolve(path)
        fs.delete_file(p)


def clear_fatal_error(run_dir: str) -> None:
    """A new command is a new attempt: forget the error that stopped the previous one."""
    from ptm_dist.train.loop import FATAL_ERROR

    path = storage.join(run_dir, FATAL_ERROR)
    if storage.exists(path):
        fs, p = storage.resolve(path)
        fs.delete_file(p)


def connect_ray(cfg: JobConfig) -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local Ray with room for data tasks.

    Ray Data's read/tokenize/pack tasks need CPUs that the training workers hold: on a small
    machine the local instance gets extra logical CPUs so the stream never stalls. Returns
    whether this call connected (the caller then disconnects when done).
    """
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": worker_env_vars()}
    if os.environ.get("RAY_ADDRESS"):
        # Inside a submitted job the job's runtime env already carries these (ptm submit sets
        # them) and Ray refuses to merge the same keys twice: pass only what differs.
        missing = {k: v for k, v in env["env_vars"].items() if os.environ.get(k) != v}
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": missing} if missing else None,
                 log_to_driver=True)
        return True
    per_worker = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    cpus = int(cfg.scaling.num_workers * per_worker + max(2, os.cpu_count() or 1))
    print(f"[ptm] starting local Ray with {cpus} logical CPUs "
          f"({cfg.scaling.num_workers} workers x {per_worker} CPU + room for data tasks)")
    # The dashboard (on localhost only) serves the state API Ray Train polls; without it Ray
    # logs a warning every few seconds. Ray processes find the state API by auto-detecting the
    # cluster, which can pick a stale address left by an earlier `ray start` (Ray Train's
    # placement-group cleaner then fails): tell them where it is.
    port = free_port()
    env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=env, log_to_driver=True)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_gpu(cfg: JobConfig) -> bool:
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def pretrain(cfg: JobConfig) -> str:
    """Run the job; returns the run directory."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ptm_dist.train.loop import train_loop

    run_dir = choose_run_dir(cfg)
    check_resumable(cfg, run_dir)
    t0 = time.time()
    owns_ray = connect_ray(cfg)
    data = prepare_data(cfg)  # after Ray is up: a tokenizer still to train samples shards with Ray tasks
    print(f"[ptm] data: {len(data.train)} training shards, {len(data.val)} held-out shards, "
          f"tokenizer {data.tokenizer_dir}")
    gpu = use_gpu(cfg)
    storage.write_text(storage.join(run_dir, "job.yaml"), cfg.to_yaml())
    forget_ray_checkpoint_index(run_dir)
    clear_fatal_error(run_dir)
    resume_from = ckpt_lib.latest_complete_checkpoint(run_dir)
    if tracking.resolve_mode(cfg.tracking.wandb) != "disabled":
        # Stored before training so that a resumed job (even after a killed driver) continues
        # the same wandb run; a job that starts from step 0 is a new run.
        tracking.run_id(run_dir, fresh=resume_from is None)
    follower = contextlib.nullcontext()
    loop_config = {"job": cfg.to_dict(), "run_dir": run_dir, "faults": faults.for_workers(),
                   **data.worker_config()}
    if progress.use_bar():
        loop_config["progress_board"] = board = progress.start_board()
        start = ckpt_lib.read_meta(resume_from)["step"] if resume_from else 0
        follower = progress.BoardFollower(board, cfg.train.max_steps, start)
    resources = cfg.scaling.resources_per_worker or ({"GPU": 1} if gpu else {"CPU": 1})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.absolute(cfg.run.storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    try:
        with follower:
            trainer.fit()
    except ray.train.TrainingFailedError as e:
        failure = getattr(e, "controller_failure", None)
        if isinstance(failure, OSError):  # Ray Train's own writes to an unwritable or full run dir
            raise ckpt_lib.CheckpointWriteError(run_dir, failure, run_dir=run_dir) from e
        message = worker_failure_message(e, cfg.train.max_failures, run_dir)
        if message is None:
            raise
        raise WorkerFailedError(message) from e
    finally:
        if owns_ray:
            ray.shutdown()  # also flushes forwarded worker logs, so the summary comes last
    print_summary(run_dir, time.time() - t0)
    return run_dir


class WorkerFailedError(RuntimeError):
    """Ray Train gave up on the workers (train.max_failures used up); the message names the worker."""


_COLLECTIVE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|broken pipe", re.IGNORECASE)


def worker_failure_message(e: BaseException, max_failures: int, run_dir: str) -> str | None:
    """One line naming the worker that failed first and why, or None when the failure is one of
    ptm's own errors (bad data, non-finite loss, storage), which the CLI prints as they are.

    A worker that dies takes the others down in their next collective (a gloo/NCCL error on
    their side), so a dead worker or a non-collective error is named before those."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from ptm_dist.checkpoint import CheckpointWriteError
    from ptm_dist.data.sources import DataError, iter_causes
    from ptm_dist.train.loop import RunStopped
    from ptm_dist.train.step import NonFiniteError

    own = (ConfigError, DataError, NonFiniteError, CheckpointWriteError, RunStopped)
    if any(isinstance(c, own) for c in iter_causes(e)):
        return None
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return None

    def rank_order(item):
        rank, err = item
        dead = isinstance(err, WorkerHealthCheckFailedError)
        return (0 if dead else 2 if _COLLECTIVE.search(str(err)) else 1, rank)

    rank, err = min(failures.items(), key=rank_order)
    text = str(err)
    if isinstance(err, WorkerHealthCheckFailedError):
        found = {k: re.search(rf"{k}='?([^',\n)]+)", text) for k in ("pid", "node_id", "node_ip", "hostname")}
        info = {k: m.group(1) for k, m in found.items() if m}
        exit_type = re.search(r"Worker exit type: (\w+)", text)
        who = (f"worker rank {rank} (pid {info.get('pid', '?')} on {info.get('hostname', '?')} "
               f"{info.get('node_ip', '')}, node {info.get('node_id', '?')[:12]})")
        why = ("its process died (killed by a signal, the OOM killer or a crash"
               + (f"; Ray exit type {exit_type.group(1)}" if exit_type else "") + ")")
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        who, why = f"worker rank {rank}", f"{type(err).__name__}: {first}"
    newest = ckpt_lib.latest_complete_checkpoint(run_dir)
    resume = f"re-running the same command resumes from {newest}" if newest else "no checkpoint was written yet"
    limit = "no restarts allowed" if max_failures == 0 else f"all {max_failures} restarts used"
    return f"{who} failed: {why}; train.max_failures={max_failures} ({limit}); {resume}"


def summarize(run_dir: str) -> dict:
    lines = read_metrics(run_dir)
    evals = [m for m in lines if "eval_loss" in m]
    train = [m for m in lines if "loss" in m]
    out: dict = {"checkpoint": ckpt_lib.latest_complete_checkpoint(run_dir)}
    if train:
        out.update(step=train[-1]["step"], loss=train[-1]["loss"])
        rates = [m["tokens_per_s"] for m in train[1:]] or [train[-1]["tokens_per_s"]]
        out["tokens_per_s"] = sum(rates) / len(rates)
    if evals:
        out.update(first_eval_loss=evals[0]["eval_loss"], eval_loss=evals[-1]["eval_loss"])
    return out


def print_summary(run_dir: str, seconds: float) -> None:
    s = summarize(run_dir)
    print("\n== ptm pretrain summary ==")
    if "step" in s:
        print(f"steps: {s['step']}   final train loss: {s['loss']:.4f}   "
              f"mean tokens/s: {s['tokens_per_s']:,.0f}")
    if "eval_loss" in s:
        ratio = s["eval_loss"] / s["first_eval_loss"]
        print(f"eval loss: {s['first_eval_loss']:.4f} (first) -> {s['eval_loss']:.4f} (last), "
              f"{ratio:.0%} of the first")
    print(f"checkpoint: {s['checkpoint']}")
    wandb_line = tracking.summary_line(run_dir)
    if wandb_line:
        print(wandb_line)
    print(f"report: ptm report {run_dir}")
    print(f"wall time: {seconds:.0f}s")
    print(f"run_dir: {run_dir}", flush=True)
