"""Driver-side launch code: connect to or start Ray, decide on GPUs, build the worker
environment and THE TorchTrainer every command uses (pretrain, finetune, sweep trials, bench).

Every import of Ray's private modules in ptm_dist is in this module, so a Ray upgrade that
moves them breaks one file.

    owns_ray = connect_ray(num_workers=2)
    trainer = make_trainer(train_loop, {"spec": spec}, Launch.from_scaling(cfg.scaling),
                           name="tiny", storage_path="/runs", max_failures=3)
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ptm_dist.dist import free_port

# Environment for Ray workers. Ray Train's print patch would echo every progress line twice
# (once through its logger, once to the captured stdout); the loops print plainly.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def worker_env_vars() -> dict[str, str]:
    """WORKER_ENV plus this machine's cache and thread settings, for local clusters."""
    env = dict(WORKER_ENV)
    for key in ("PTM_DIST_CACHE", "OMP_NUM_THREADS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def connect_ray(num_workers: int, resources_per_worker: dict | None = None) -> bool:
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
    per_worker = (resources_per_worker or {}).get("CPU", 1)
    cpus = int(num_workers * per_worker + max(2, os.cpu_count() or 1))
    print(f"[ptm] starting local Ray with {cpus} logical CPUs "
          f"({num_workers} workers x {per_worker} CPU + room for data tasks)")
    # The dashboard (on localhost only) serves the state API Ray Train polls; without it Ray
    # logs a warning every few seconds. Ray processes find the state API by auto-detecting the
    # cluster, which can pick a stale address left by an earlier `ray start` (Ray Train's
    # placement-group cleaner then fails): tell them where it is.
    port = free_port()
    env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=env, log_to_driver=True)
    return True


def use_gpu(setting: bool | str) -> bool:
    """``scaling.use_gpu``: true, false, or auto (GPUs when the connected cluster has them)."""
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


@dataclass(frozen=True)
class Launch:
    """How many workers a Ray Train job gets, on what, placed how."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict
    placement: str = "pack"  # pack | spread

    @classmethod
    def resolve(cls, num_workers: int, use_gpu_setting: bool | str, resources: dict | None,
                placement: str = "pack") -> Launch:
        """Decide GPUs against the connected cluster (call after connect_ray)."""
        gpu = use_gpu(use_gpu_setting)
        return cls(num_workers, gpu, dict(resources or ({"GPU": 1} if gpu else {"CPU": 1})), placement)

    @classmethod
    def from_scaling(cls, scaling) -> Launch:
        """From a job's ``scaling`` section (call after connect_ray)."""
        return cls.resolve(scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker, scaling.placement)


def make_trainer(loop, loop_config: dict, launch: Launch, *, name: str, storage_path: str,
                 max_failures: int = 0, keep_checkpoints: int | None = None):
    """The one TorchTrainer factory: gloo on CPU, NCCL on GPU, the placement, the failure
    budget and where Ray Train writes (``<storage_path>/<name>``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if launch.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch.num_workers, use_gpu=launch.use_gpu,
            resources_per_worker=launch.resources_per_worker, placement_strategy=launch.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def forget_ray_checkpoint_index(run_dir: str) -> None:
    """Remove Ray Train's index of the run's checkpoints before a new fit.

    Ray Train refuses to start in a run directory whose index names a checkpoint that no longer
    exists, and ptm's retention deletes old checkpoints. ptm picks the checkpoint to resume from
    itself (the newest with a COMPLETE marker), so Ray's index is not needed across fits.
    """
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from ptm_dist import storage

    path = storage.join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    if storage.exists(path):
        fs, p = storage.resolve(path)
        fs.delete_file(p)


_COLLECTIVE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|timed out|broken pipe", re.IGNORECASE)


def first_worker_failure(e: BaseException) -> str | None:
    """'<who> failed: <why>' for the worker of a failed Ray Train job that failed first, or None.

    A worker that dies takes the others down in their next collective (a gloo/NCCL error on
    their side), so a dead worker or a non-collective error is named before those."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

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
    return f"{who} failed: {why}"


def send_cluster_token_if_available() -> None:
    """Ray's HTTP client sends the cluster token only in token mode; like the `ray` CLI, turn
    that mode on when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    unless RAY_AUTH_MODE says otherwise."""
    from ray._private.authentication import authentication_token_setup as setup

    log = logging.getLogger(setup.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its warning speaks of starting clusters, not of clients
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)
