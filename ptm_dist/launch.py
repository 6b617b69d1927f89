"""Driver-side launch code: connect to or start Ray, decide on GPUs, build the worker
environment and THE TorchTrainer every command uses (pretrain, finetune, sweep trials, bench).

Every import of Ray's private modules in ptm_dist is in this module, so a Ray upgrade that
moves them breaks one file.

    owns_ray = connect_ray(num_workers=2)
    trainer = make_trainer(train_loop, {"spec": spec}, Launch.from_scaling(cfg.scaling),
                           name="tiny", storage_path="/runs", max_failures=3)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
from dataclasses import dataclass

from ptm_dist import progress, runlogs
from ptm_dist.errors import ConfigError, user_message

# Environment for Ray workers. Ray Train's print patch would echo every progress line twice
# (once through its logger, once to the captured stdout); the loops print plainly. Ray Train's
# controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s): at
# 0.5 s a finished run, and a dead worker, are seen sooner (a 2-step debug job's fit() returned
# 1.9-2.0 s after its last checkpoint instead of 3.6-4.3 s); a value in the user's environment is kept.
HEALTH_CHECK_KEY = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
              HEALTH_CHECK_KEY: os.environ.get(HEALTH_CHECK_KEY, "0.5")}


def worker_env_vars() -> dict[str, str]:
    """WORKER_ENV plus this machine's thread settings and, for a local Ray, its cache directory
    (a path on this machine, which other nodes of a cluster do not have)."""
    env = dict(WORKER_ENV)
    for key in ("OMP_NUM_THREADS",) if joins_cluster() else ("PTM_DIST_CACHE", "OMP_NUM_THREADS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def joins_cluster() -> bool:
    """Whether connect_ray joins a running cluster (RAY_ADDRESS) rather than starting Ray here."""
    return bool(os.environ.get("RAY_ADDRESS"))


def machine_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Worker CPUs beyond this many times the machine's cores are refused; fewer are a warning.
OVERSUBSCRIPTION_REFUSED = 4


def local_cpu_problem(num_workers: int, resources_per_worker: dict | None, cores: int) -> tuple[bool, str] | None:
    """(refused, why) when a local run's workers ask for more CPUs than the machine has, or None.

    Each worker is a process with its own copy of the model and optimizer. A local Ray starts
    them all (it is given logical CPUs), so workers beyond the cores share them: slower, and
    far beyond (64 workers on 2 cores) minutes of start-up and silence, then memory trouble.
    Up to OVERSUBSCRIPTION_REFUSED times the cores is a warning, more is refused."""
    per_worker = (resources_per_worker or {}).get("CPU", 1)
    need = num_workers * per_worker
    if need <= cores:
        return None
    fit = max(int(cores // per_worker), 1)
    return need > OVERSUBSCRIPTION_REFUSED * cores, (
        f"scaling.num_workers={num_workers} x {per_worker:g} CPU = {need:g} CPUs, but this machine has "
        f"{cores} core{'s' if cores != 1 else ''}: use scaling.num_workers <= {fit}, give workers a fraction "
        "of a core each (scaling.resources_per_worker={CPU: 0.5}), or join a cluster (RAY_ADDRESS)")


def check_local_cpus(num_workers: int, resources_per_worker: dict | None = None) -> None:
    """Before Ray starts, refuse a local run whose workers need far more CPUs than this machine
    has, and warn when they need more (a no-op when joining a cluster or when Ray is up)."""
    ray = sys.modules.get("ray")  # not imported for this check
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return
    problem = local_cpu_problem(num_workers, resources_per_worker, machine_cpus())
    if problem is None:
        return
    refused, why = problem
    if refused:
        raise ConfigError(f"{why} (more than {OVERSUBSCRIPTION_REFUSED}x the cores is refused)")
    progress.print_line(f"[ptm] warning: {why}; the workers will share cores")


def capacity_shortfall(num_workers: int, per_worker: dict, total: dict, available: dict) -> str | None:
    """'need 64 CPU (64 workers x {CPU: 1}), the cluster has 4 CPU' when the workers do not fit
    in the cluster's resources now (``total``: all nodes; ``available``: not held by others)."""
    need = {k: v * num_workers for k, v in per_worker.items() if v}
    short = [k for k in need if need[k] > available.get(k, 0)]
    if not short:
        return None
    wants = ", ".join(f"{need[k]:g} {k}" for k in short)
    each = ", ".join(f"{k}: {v:g}" for k, v in per_worker.items())
    has = ", ".join(f"{total.get(k, 0):g} {k} ({available.get(k, 0):g} free)" for k in short)
    return f"need {wants} ({num_workers} workers x {{{each}}}), the cluster has {has}"


def check_capacity(launch: Launch, local: bool) -> None:
    """Say at once when the workers cannot be placed: a local Ray never grows, so that is an
    error; on a cluster a line says what Ray Train is waiting for (nodes may join, other jobs
    may end). Call after connect_ray."""
    import ray

    total, available = ray.cluster_resources(), ray.available_resources()
    short = capacity_shortfall(launch.min_workers or launch.num_workers, launch.resources_per_worker, total,
                               available)
    if short is None:
        if launch.min_workers and (fewer := capacity_shortfall(launch.num_workers, launch.resources_per_worker,
                                                               total, available)):
            progress.print_line(f"[ptm] elastic range [{launch.min_workers}, {launch.num_workers}]: {fewer}; "
                                "the run starts on the workers that fit and grows when room appears")
        return
    if local:
        raise ConfigError(f"the workers do not fit on this machine: {short}; lower scaling.num_workers or "
                          "change scaling.resources_per_worker / scaling.use_gpu")
    progress.print_line(f"[ptm] waiting for resources: {short}; Ray Train starts the workers when "
                                "they fit (an autoscaler may add nodes; Ctrl-C to stop)")


# Shards each node checks in the preflight (the first ones of each list): enough to find data
# that only the driver's machine has, without listing a large corpus once per node.
PREFLIGHT_SHARDS = 4


def _node_probe(paths: list[str], probe_file: str) -> dict:
    """Run on one node: which of ``paths`` it cannot read, and whether it can write ``probe_file``."""
    import socket

    from ptm_dist import storage

    out = {"host": socket.gethostname(), "missing": [], "write_error": None}
    for path in paths:
        try:
            if not storage.exists(path):
                out["missing"].append(path)
        except Exception as e:  # noqa: BLE001 - unreachable endpoints, bad credentials: reported as unreadable
            out["missing"].append(f"{path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    try:
        storage.write_text(probe_file, "ptm preflight\n")
    except Exception as e:  # noqa: BLE001
        out["write_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def preflight_nodes(run_dir: str, data_paths: list[str], timeout_s: float = 120) -> None:
    """On a cluster, before any worker starts: every node that can run workers reads the job's
    data (a few shards of each list) and writes into the run directory, and the driver reads
    what each wrote (so a local ``run.storage`` path that is not shared between nodes is found).
    Raises a one-line ConfigError naming the node and the path."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ptm_dist import storage

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    token = uuid.uuid4().hex[:12]
    probe_dir = storage.join(run_dir, ".preflight")
    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe)
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(data_paths, storage.join(probe_dir, f"{token}-{n['NodeID'][:12]}")) for n in nodes}
    try:
        results = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"preflight: the cluster's {len(nodes)} nodes did not answer a check task in "
                          f"{timeout_s:.0f} s") from None
    try:
        ip = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        for node, r in results.items():
            where = f"node {node[:12]} ({r['host']}, {ip[node]})"
            if r["missing"]:
                raise ConfigError(
                    f"data: {r['missing'][0]} cannot be read from {where}; workers run on every node, so the "
                    "data must be where all of them read it: an object store (s3://...) or a filesystem every "
                    "node mounts")
            if r["write_error"]:
                raise ConfigError(f"run.storage: {where} cannot write to {run_dir}: {r['write_error']}")
            if not storage.exists(storage.join(probe_dir, f"{token}-{node[:12]}")):
                raise ConfigError(
                    f"run.storage {run_dir} is not shared: what {where} wrote there is not visible to the "
                    "driver; use a filesystem every node mounts, or an object store (s3://...)")
    finally:
        try:
            storage.delete_dir(probe_dir)
        except OSError:
            pass


def connect_ray(num_workers: int, resources_per_worker: dict | None = None) -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local Ray with room for data tasks.

    Ray Data's read/tokenize/pack tasks need CPUs that the training workers hold: on a small
    machine the local instance gets extra logical CPUs so the stream never stalls. A local run
    whose workers need more CPUs than the machine has is refused (check_local_cpus). Ray's
    forwarded worker output goes through runlogs.route. Returns whether this call connected
    (the caller then disconnects when done).
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
        _route_ray_output()
        return True
    check_local_cpus(num_workers, resources_per_worker)
    from ptm_dist.dist import free_port

    per_worker = (resources_per_worker or {}).get("CPU", 1)
    cpus = int(num_workers * per_worker + max(2, os.cpu_count() or 1))
    print(f"[ptm] starting local Ray with {cpus} logical CPUs "
          f"({num_workers} workers x {per_worker} CPU + room for data tasks)", flush=True)
    # The dashboard (on localhost only) serves the state API Ray Train polls; without it Ray
    # logs a warning every few seconds. Ray processes find the state API by auto-detecting the
    # cluster, which can pick a stale address left by an earlier `ray start` (Ray Train's
    # placement-group cleaner then fails): tell them where it is.
    port = free_port()
    env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=env, log_to_driver=True)
    _route_ray_output()
    return True


def _route_ray_output() -> None:
    """Send what Ray forwards from its processes through runlogs.route instead of straight to
    the terminal (under Ray's own handler name, so ray.shutdown removes it)."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    ray_print = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", functools.partial(runlogs.route, ray_print=ray_print))


def use_gpu(setting: bool | str) -> bool:
    """``scaling.use_gpu``: true, false, or auto (GPUs when the connected cluster has them)."""
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


@dataclass(frozen=True)
class Launch:
    """How many workers a Ray Train job gets, on what, placed how."""

    num_workers: int  # with min_workers: the most (an elastic range)
    use_gpu: bool
    resources_per_worker: dict
    placement: str = "pack"  # pack | spread
    min_workers: int | None = None  # an elastic range [min_workers, num_workers] (Ray Train's elasticity)
    resize_check_s: float = 60.0  # how often Ray Train looks for room to grow an elastic group

    @classmethod
    def resolve(cls, num_workers: int, use_gpu_setting: bool | str, resources: dict | None,
                placement: str = "pack") -> Launch:
        """Decide GPUs against the connected cluster (call after connect_ray)."""
        gpu = use_gpu(use_gpu_setting)
        if not gpu and (resources or {}).get("GPU", 0) > 0:
            why = ("the Ray cluster has no GPUs (scaling.use_gpu: auto)" if use_gpu_setting == "auto"
                   else "scaling.use_gpu is false")
            raise ConfigError(f"scaling.resources_per_worker asks for {resources['GPU']:g} GPU per worker, but {why}; "
                              "drop GPU from scaling.resources_per_worker or run on GPU nodes")
        return cls(num_workers, gpu, dict(resources or ({"GPU": 1} if gpu else {"CPU": 1})), placement)

    @classmethod
    def from_scaling(cls, scaling) -> Launch:
        """From a job's ``scaling`` section (call after connect_ray)."""
        how = cls.resolve(scaling.max_workers, scaling.use_gpu, scaling.resources_per_worker, scaling.placement)
        if scaling.elastic:
            how = dataclasses.replace(how, min_workers=scaling.min_workers, resize_check_s=scaling.resize_check_s)
        return how


def make_trainer(loop, loop_config: dict, launch: Launch, *, name: str, storage_path: str,
                 max_failures: int = 0, keep_checkpoints: int | None = None):
    """The one TorchTrainer factory: gloo on CPU, NCCL on GPU, the placement, the failure
    budget and where Ray Train writes (``<storage_path>/<name>``)."""
    import ray.train
    from ray.train.torch import TorchConfig

    try:
        scaling = ray.train.ScalingConfig(
            num_workers=(launch.min_workers, launch.num_workers) if launch.min_workers else launch.num_workers,
            use_gpu=launch.use_gpu, resources_per_worker=launch.resources_per_worker,
            placement_strategy=launch.placement.upper(), elastic_resize_monitor_interval_s=launch.resize_check_s,
        )
    except ValueError as e:  # Ray's own checks of the combination: one line, not its traceback
        raise ConfigError(f"scaling: {str(e).splitlines()[0]}") from None
    return _trainer_class()(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if launch.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


@functools.cache
def _trainer_class():
    """TorchTrainer whose failure policy ends the run at the first error that is the user's to
    fix (ptm_dist.errors.user_message: bad data, a non-finite loss past its budget, full or
    unwritable storage, a bad config met on a worker). Ray Train's own policy retries every
    worker error up to max_failures, each retry a new worker group meeting the same error; dead
    processes and nodes, and preemptions, are still decided by Ray's policy. Ray 2.60 has no
    public hook for this: the policy is swapped where the trainer hands it to its controller."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy

    class UserErrorsEndTheRun(FailurePolicy):
        def __init__(self, inner: FailurePolicy):
            super().__init__(inner.failure_config)
            self.inner = inner

        def make_decision(self, training_failed_error):
            if user_message(training_failed_error) is not None:
                return FailureDecision.RAISE
            return self.inner.make_decision(training_failed_error)

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = UserErrorsEndTheRun(kwargs["failure_policy"])
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


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
