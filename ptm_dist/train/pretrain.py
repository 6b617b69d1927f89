"""`ptm pretrain`: the driver. Checks the job and its data, starts or joins Ray, runs the TorchTrainer.

    run_dir = pretrain(load("jobs/tiny.yaml"))

The run directory is ``<run.storage>/<run.name>``. With ``run.resume`` (the default) a run
directory that holds checkpoints is continued from its newest complete one; otherwise a fresh
directory ``<name>-2``, ``<name>-3``... is used, so two runs never mix. The workers receive one
frozen ``PretrainSpec`` (ptm_dist.train.spec) built here.

Everything that can be checked without Ray (the workers' CPUs against this machine's, shard
lists, formats, the tokenizer) is checked before torch, DeepSpeed or Ray are imported or
started, so such mistakes are reported in seconds. Library output goes to ``<run_dir>/logs/``
(ptm_dist.runlogs); the terminal shows ptm's own lines.
"""

from __future__ import annotations

import contextlib
import json
import time

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import faults, launch, lease, progress, runlogs, stopping, storage, tracking
from ptm_dist.config import JobConfig, cache_dir
from ptm_dist.data.prepare import prepare_data
from ptm_dist.errors import UserError, WorkerFailedError, iter_causes
from ptm_dist.harness import job_tasks
from ptm_dist.pretrained import check_model, resolve_init
from ptm_dist.tracking import read_metrics


def pretrain(cfg: JobConfig) -> str:
    """Run the job; returns the run directory. One driver at a time per run directory
    (ptm_dist.lease): another live one is refused with a line naming it."""
    cfg, run_dir = storage.resolve_run_dir(cfg)
    ckpt_lib.check_same_run(run_dir, cfg.to_dict())
    t0 = time.time()
    launch.check_local_cpus(cfg.scaling.max_workers, cfg.scaling.resources_per_worker)
    # Before Ray starts: a missing path, an unknown format or an unreadable tokenizer is an
    # error in seconds. (A tokenizer still to train samples the shards in this process.)
    start = resolve_init(cfg, cache_dir(cfg), cluster=launch.joins_cluster())
    data = prepare_data(cfg, start.tokenizer_dir if start else None)
    if launch.joins_cluster():  # other nodes cannot read this machine's cache
        data = data.staged(cache_dir(cfg), storage.absolute(cfg.run.storage))
    worker_data = data.for_workers(cache=run_dir)
    check_model(cfg, start, data.tokenizer_dir, worker_data.vocab_size)
    tasks = job_tasks(cfg)  # train.eval_tasks checked against the harness before Ray starts
    # The job is valid: from here on this command writes into the run directory (the piece plan
    # above is a cache any driver would write the same).
    with lease.hold(run_dir, "pretrain"):
        return _pretrain(cfg, run_dir, t0, start, data, worker_data, tasks)


def _pretrain(cfg: JobConfig, run_dir: str, t0: float, start, data, worker_data, tasks) -> str:
    newest = ckpt_lib.latest_complete_checkpoint(run_dir)
    data_changed = newest is not None and ckpt_lib.check_resume(
        newest, cfg.to_dict(), worker_data.identity, cfg.run.allow_data_change)
    batch_given = (cfg.train.micro_batch, cfg.train.grad_accum)
    global_batch = None  # an elastic range: each worker group derives grad_accum from it
    if cfg.scaling.elastic:
        global_batch, line = ckpt_lib.elastic_batch(newest, cfg.to_dict(), cfg.scaling.min_workers,
                                                    cfg.scaling.max_workers)
        if line:
            progress.print_line(line)
    elif newest is not None:
        accum, line = ckpt_lib.resume_batch(newest, cfg.to_dict(), cfg.scaling.num_workers)
        if accum != cfg.train.grad_accum:
            cfg = cfg.model_copy(deep=True)
            cfg.train.grad_accum = accum
        if line:
            progress.print_line(line)
    if newest is not None:
        end = ckpt_lib.read_meta(newest).get("lr_schedule_end", cfg.train.max_steps)
        if end != cfg.train.max_steps:
            progress.print_line(
                f"[ptm] train.max_steps {end} -> {cfg.train.max_steps}: from {newest} the learning rate "
                f"continues from its value there without a jump (train.schedule {cfg.train.schedule})"
                + ("" if cfg.train.schedule == "constant" and not cfg.train.cooldown_steps
                   else f" and reaches train.min_lr at step {cfg.train.max_steps}"))
    if data_changed:
        progress.print_line(f"[ptm] warning: {newest} was trained on other data (run.allow_data_change): "
                            "its weights continue on the new data, from the start of the new shard list")
    print(f"[ptm] data: {len(data.train)} training shards in {len(worker_data.train_pieces)} pieces, "
          f"{len(data.val)} held-out shards, "
          f"tokenizer {data.tokenizer_dir}", flush=True)
    marks = {"start": t0, "prepared": time.time()}  # driver-side start-up, for the summary
    with runlogs.RunLogs(run_dir, "pretrain") as logs:
        stopped = _train(cfg, run_dir, worker_data, logs, start, tasks, marks, batch_given, global_batch)
        if stopped is None:
            from ptm_dist.generate import summary_sample

            sample = summary_sample(run_dir)  # inside RunLogs: what the libraries print goes to the logs
    if stopped is not None:
        raise stopping.RunStopped(stopped)
    print_summary(run_dir, time.time() - t0, logs.where, sample, marks)
    return run_dir


def _train(cfg: JobConfig, run_dir: str, worker_data, logs: runlogs.RunLogs, start=None, tasks=None,
           marks: dict | None = None, batch_given: tuple[int, int] | None = None,
           global_batch: int | None = None) -> str | None:
    """Runs the workers to the end of the job; returns None, or the line saying where the run
    stopped when a SIGTERM stopped it early (ptm_dist.stopping)."""
    import ray
    import ray.train

    from ptm_dist.engine import check_precision
    from ptm_dist.train.entry import train_loop  # the loop's heavy imports happen on the workers
    from ptm_dist.train.spec import PretrainSpec

    marks = {} if marks is None else marks
    owns_ray = launch.connect_ray(cfg.scaling.max_workers, cfg.scaling.resources_per_worker)
    marks["ray"] = time.time()
    try:
        how = launch.Launch.from_scaling(cfg.scaling)
        check_precision(cfg.train.precision, how.use_gpu, cfg.zero.stage)
        launch.check_capacity(how, local=owns_ray and not launch.joins_cluster())
        if launch.joins_cluster():
            n = launch.PREFLIGHT_SHARDS
            sample = (*worker_data.train_shards[:n], *worker_data.val_shards[:n])
            paths = [s.uri for s in sample] + ([storage.join(start.init_dir, "config.json")] if start else [])
            launch.preflight_nodes(run_dir, paths)
        storage.write_text(storage.join(run_dir, "job.yaml"), cfg.to_yaml())
        launch.forget_ray_checkpoint_index(run_dir)
        resume_from = ckpt_lib.latest_complete_checkpoint(run_dir)
        if tracking.resolve_mode(cfg.tracking.wandb) != "disabled":
            # Stored before training so that a resumed job (even after a killed driver) continues
            # the same wandb run; a job that starts from step 0 is a new run.
            tracking.run_id(run_dir, fresh=resume_from is None)
        follower = contextlib.nullcontext()
        board = None
        if progress.use_bar():
            board = progress.start_board()
            first_step = ckpt_lib.read_meta(resume_from)["step"] if resume_from else 0
            follower = progress.BoardFollower(board, cfg.train.max_steps, first_step)
        spec = PretrainSpec(job=cfg, run_dir=run_dir, data=worker_data, start=start, faults=faults.for_workers(),
                            progress_board=board, eval_tasks=tasks, batch_given=batch_given,
                            global_batch=global_batch, launched_at=time.time())
        trainer = launch.make_trainer(train_loop, {"spec": spec}, how, name=cfg.run.name,
                                      storage_path=storage.absolute(cfg.run.storage),
                                      max_failures=cfg.train.max_failures)
        stopping.clear(run_dir)  # a request an earlier command left must not stop this one
        try:
            with follower, stopping.on_sigterm(run_dir, cfg.train.preempt_grace_s, progress.print_line) as stop:
                marks["fit"] = time.time()
                try:
                    trainer.fit()
                except SystemExit:  # Ray Train's SIGINT handler ends fit() with sys.exit
                    raise KeyboardInterrupt from None
        except ray.train.TrainingFailedError as e:
            failure = getattr(e, "controller_failure", None)
            if isinstance(failure, OSError):  # Ray Train's own writes to an unwritable or full run dir
                raise ckpt_lib.write_error(run_dir, failure, run_dir=run_dir) from e
            message = worker_failure_message(e, cfg.train.max_failures, run_dir)
            if message is None:
                raise
            raise WorkerFailedError(f"{message}; worker output: {logs.local}") from e
        return stopped_line(run_dir, cfg.train.max_steps, stop.reason)
    finally:
        if owns_ray:
            ray.shutdown()  # also flushes forwarded worker logs, so the summary comes last


def stopped_line(run_dir: str, max_steps: int, reason: str | None) -> str | None:
    """None when the run reached train.max_steps (a stop request that came too late changes
    nothing); else where it stopped and how to continue."""
    newest = ckpt_lib.latest_complete_checkpoint(run_dir)
    step = ckpt_lib.read_meta(newest)["step"] if newest else 0
    if reason is None or step >= max_steps:
        return None
    where = f"{newest} is complete; the same command continues from step {step}" if newest \
        else "no checkpoint was written"
    return f"stopped by {reason} at step {step} of {max_steps}: {where}"


def worker_failure_message(e: BaseException, max_failures: int, run_dir: str) -> str | None:
    """One line naming the worker that failed first and why, with the failure budget and the
    checkpoint a re-run resumes from; None when the failure is one of ptm's own errors (bad
    data, non-finite loss, storage), which the CLI prints as they are."""
    if any(isinstance(c, UserError) for c in iter_causes(e)):
        return None
    failed = launch.first_worker_failure(e)
    if failed is None:
        return None
    newest = ckpt_lib.latest_complete_checkpoint(run_dir)
    resume = f"re-running the same command resumes from {newest}" if newest else "no checkpoint was written yet"
    limit = "no restarts allowed" if max_failures == 0 else f"all {max_failures} restarts used"
    return f"{failed}; train.max_failures={max_failures} ({limit}); {resume}"


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
    # train.eval_tasks: each task's main score (acc when the harness gives one), first and last.
    keys = list(dict.fromkeys(k for m in lines for k in m if k.startswith("eval/")))
    tasks: dict = {}
    for key in keys:
        task, metric = key[len("eval/"):].rsplit("/", 1)
        if task not in tasks or metric == "acc":
            scored = [(m["step"], m[key]) for m in lines if key in m]
            tasks[task] = {"metric": metric, "first": scored[0], "last": scored[-1]}
    if tasks:
        out["tasks"] = tasks
    return out


def startup_line(run_dir: str, marks: dict) -> str | None:
    """'time to first step: ...' from the driver's marks and the workers' STARTUP_FILE (this
    command's launch; None when no step ran). Driver and rank-0 clocks are compared: on a
    cluster their difference (NTP: milliseconds) goes into the worker start."""
    from ptm_dist.train.loop import STARTUP_FILE

    path = storage.join(run_dir, STARTUP_FILE)
    if "fit" not in marks or not storage.exists(path):
        return None
    w = json.loads(storage.read_text(path))
    if w["worker_start"] < marks["fit"]:
        return None  # from an earlier command
    phases = [("data and tokenizer", marks["prepared"] - marks["start"]),
              ("Ray start", marks["ray"] - marks["prepared"]),
              ("workers start", w["worker_start"] - marks["ray"]),
              ("model and engine", w["model_ready"] - w["worker_start"]),
              ("resume, tracking, step-0 evaluation", w["loop_start"] - w["model_ready"]),
              ("first batch", w["first_batch_wait_s"]),
              ("first step", w["first_step"] - w["loop_start"] - w["first_batch_wait_s"])]
    total = w["first_step"] - marks["start"]
    return f"time to first step: {total:.1f}s (" + ", ".join(f"{name} {sec:.1f}s" for name, sec in phases) + ")"


def print_summary(run_dir: str, seconds: float, logs: str | None = None, sample: str | None = None,
                  marks: dict | None = None) -> None:
    s = summarize(run_dir)
    print("\n== ptm pretrain summary ==")
    if "step" in s:
        print(f"steps: {s['step']}   final train loss: {s['loss']:.4f}   "
              f"mean tokens/s: {s['tokens_per_s']:,.0f}")
    if "eval_loss" in s:
        ratio = s["eval_loss"] / s["first_eval_loss"]
        print(f"eval loss: {s['first_eval_loss']:.4f} (first) -> {s['eval_loss']:.4f} (last), "
              f"{ratio:.0%} of the first")
    for task, t in s.get("tasks", {}).items():
        (s0, v0), (s1, v1) = t["first"], t["last"]
        print(f"{task} {t['metric']}: {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1})")
    startup = startup_line(run_dir, marks or {})
    if startup:
        print(startup)
    print(f"checkpoint: {s['checkpoint']}")
    if sample:
        print(sample)
    wandb_line = tracking.summary_line(run_dir)
    if wandb_line:
        print(wandb_line)
    print(f"report: ptm report {run_dir}")
    if logs:
        print(f"logs: {logs} (library output; --verbose or PTM_VERBOSE=1 shows it here)")
    print(f"wall time: {seconds:.0f}s")
    print(f"run_dir: {run_dir}", flush=True)
