"""The pretraining loop that runs on every Ray Train worker.

    model -> DeepSpeed engine -> restore newest complete checkpoint -> for each step:
    stream micro batches -> train_step -> metrics every log_every -> eval every eval_every
    -> downstream tasks every eval_tasks_every (lm-evaluation-harness, ptm_dist.harness)
    -> checkpoint every ckpt_every (on every rank, through ray.train.report)

Everything needed to resume exactly is restored: weights, optimizer, LR schedule (DeepSpeed),
step, RNG states and the data position (per rank files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import faults, models, runlogs, stopping, storage
from ptm_dist.checkpoint import RankState
from ptm_dist.config import JobConfig
from ptm_dist.data.idlog import SequenceLog
from ptm_dist.data.pipeline import BadShardBudgetExceeded, SequenceStream, redistribute, take_sequences
from ptm_dist.dist import broadcast_object, gather_objects, mean_over_ranks, rng_state, set_rng_state
from ptm_dist.engine import EngineSpec, build_model, ds_config, lr_schedule, manual_clip, prepare, resolve_precision
from ptm_dist.errors import NonFiniteError
from ptm_dist.tracking import MetricsLog, Tracker, forget_inherited_wandb_service, gpu_peak_flops
from ptm_dist.train import reshard
from ptm_dist.train.spec import PretrainSpec
from ptm_dist.train.step import (
    Objective,
    PhaseTimer,
    SpikeDetector,
    eval_batches,
    eval_loss_sums,
    train_step,
)


def objective_for(cfg: JobConfig, hf_config, special: dict, vocab_size: int) -> Objective:
    if models.is_causal(hf_config):
        return Objective(causal=True)
    return Objective(
        causal=False, mask_id=special["mask"], vocab_size=vocab_size,
        mlm_probability=cfg.model.mlm_probability, special_ids=(special["eos"], special["pad"]),
    )


class Trainer:
    """State of one worker's run: engine, stream, step counters. Usable without Ray."""

    def __init__(self, spec: PretrainSpec, rank: int, world: int, device: torch.device):
        self.spec, self.cfg = spec, spec.job
        cfg, data = self.cfg, spec.data
        self.rank, self.world, self.device = rank, world, device
        self.run_dir: str = spec.run_dir
        special = data.special
        start = spec.start
        self.hf_config = models.config_for(cfg.model, data.vocab_size, cfg.data.seq_len,
                                           models.SpecialTokens(**special), start.config if start else None)
        self.engine_spec = EngineSpec.for_pretraining(cfg)
        # ZeRO-3 builds the model partitioned: no rank holds a whole fp32 copy at any time.
        zero3 = (ds_config(self.engine_spec, resolve_precision(cfg.train.precision, device, 3), device.type == "cuda")
                 if cfg.zero.stage == 3 else None)
        if start is None:
            model = models.build(self.hf_config, seed=cfg.run.seed, zero3=zero3)
        else:
            local, is_tmp = storage.local_copy(start.init_dir)
            try:
                model = build_model(self.hf_config, cfg.run.seed, zero3, str(local))
            finally:
                storage.drop_local_copy(local, is_tmp)
        self.n_params = models.num_params(model)
        self.flops_per_token = models.flops_per_token(self.hf_config, models.matmul_params(model),
                                                      cfg.data.seq_len)
        self.engine, self.precision = prepare(model, self.engine_spec, device)
        self.clip = manual_clip(self.engine_spec, self.precision)
        self.obj = objective_for(cfg, self.hf_config, special, data.vocab_size)
        self.stream = SequenceStream(
            list(data.train_shards), data.tokenizer_json, cfg.data.seq_len, special["eos"], cfg.run.seed,
            rank, world, cfg.data.read_concurrency, use_ray=spec.use_ray_data,
            max_bad_shards=cfg.data.max_bad_shards, shuffle_window=cfg.data.shuffle_window,
            pieces=list(data.train_pieces),
        )
        _, val = take_sequences(
            list(data.val_shards), data.tokenizer_json, cfg.data.seq_len, special["eos"], cfg.train.eval_sequences,
        )
        self.probe = torch.as_tensor(val[:1], dtype=torch.long, device=device)
        self.val = torch.as_tensor(val[rank::world], dtype=torch.long, device=device)
        self.n_eval_batches = eval_batches(len(val), world, cfg.train.micro_batch)
        self.step = 0
        self.lr = 0.0  # learning rate of the last step
        self.tokens_seen = 0
        self.nodes: list[str] = []  # Ray node id of each rank (recorded in checkpoints)
        self.seq_log = None  # data.log_sequence_ids: opened by train_loop once restored
        self.batch_seqs: list[tuple[int, int]] = []  # (epoch, id) of the last step's sequences
        self.nonfinite_skipped = 0  # steps dropped for a non-finite loss or gradient
        self.last_step_applied = True
        self.spikes = SpikeDetector(cfg.train.spike_factor, cfg.train.spike_patience)
        self.tracker = Tracker()  # rank 0's wandb run; a no-op elsewhere
        self._tasks = None  # (task manager, tokenizer) for train.eval_tasks, made on first use
        self.pending: PendingSave | None = None  # a checkpoint uploading in the background
        self.resizes: list[dict] = []  # each change of worker count this run went through

    # ------------------------------------------------------------------ state

    def restore(self, ckpt_dir: str) -> None:
        """Continue from ``ckpt_dir``; written by another number of workers, its weights and
        optimizer are resharded (ptm_dist.train.reshard) and its data stream redistributed
        (ptm_dist.data.pipeline.redistribute)."""
        meta = ckpt_lib.read_meta(ckpt_dir)
        # The driver refused other data unless allowed (checkpoint.check_resume); this also
        # covers runs started without it (the local runner).
        data_changed = ckpt_lib.check_resume(ckpt_dir, self.cfg.to_dict(), self.spec.data.identity,
                                             self.cfg.run.allow_data_change)
        old_world = meta["world_size"]
        self.resizes = list(meta.get("resizes", []))
        if old_world == self.world:
            local, is_tmp = storage.local_copy(ckpt_dir, select=ckpt_lib.rank_files(self.rank))
            try:
                path, _ = self.engine.load_checkpoint(
                    str(local), tag=ckpt_lib.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
                if path is None:
                    raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load its checkpoint")
                state = RankState.load(local, self.rank)
            finally:
                storage.drop_local_copy(local, is_tmp)
            data, rng = state.data, state.rng
        else:
            seconds = reshard.load_engine(self.engine, ckpt_dir, self.rank)
            states = reshard.rank_states(ckpt_dir, old_world)
            state = states[0]  # step, tokens and counters are the same on every rank
            data = redistribute([s.data for s in states], self.world, self.stream.plan_length)[self.rank]
            rng = states[self.rank].rng if self.rank < old_world else None
            self.resizes.append({"step": state.step, "from": old_world, "to": self.world,
                                 "grad_accum": self.cfg.train.grad_accum, "load_s": round(seconds, 3)})
        self.step, self.tokens_seen = state.step, state.tokens_seen
        schedule = lr_schedule(self.engine)  # as the checkpoint saved it (extensions included)
        if schedule.end != self.cfg.train.max_steps and self.cfg.train.max_steps > self.step:
            schedule.extend(self.step, self.cfg.train.max_steps)  # train.max_steps changed: no jump
        self.nonfinite_skipped = state.nonfinite_skipped
        if state.spikes is not None:
            self.spikes.load_state_dict(state.spikes)
        if not data_changed:  # else the new shard list from its start (run.allow_data_change)
            self.stream.load_state_dict(data)
        if rng is not None:
            set_rng_state(rng)
        else:  # a rank the checkpoint has no state for (more workers than wrote it)
            reshard.seed_added_rank(self.cfg.run.seed, self.step, self.rank)

    def save_local(self, out: Path) -> None:
        """Write this rank's part of a checkpoint into local directory ``out``."""
        self.engine.save_checkpoint(str(out), tag=ckpt_lib.DS_TAG, save_latest=False)
        faults.fault_point("save.after_deepspeed", self.step, self.rank)
        RankState(step=self.step, tokens_seen=self.tokens_seen, data=self.stream.state_dict(), rng=rng_state(),
                  nonfinite_skipped=self.nonfinite_skipped, spikes=self.spikes.state_dict()).save(out, self.rank)
        faults.fault_point("save.after_rank_state", self.step, self.rank)
        logits = self.probe_logits()
        if self.rank == 0:
            job = self.cfg
            if self.spec.global_batch is not None and self.spec.batch_given:
                # an elastic range: the job as written (its batch defined at MAX workers), not this
                # group's grad_accum; the marker's batch records what ran
                job = self.cfg.model_copy(deep=True)
                job.train.grad_accum = self.spec.batch_given[1]
            (out / "job.yaml").write_text(job.to_yaml())
            self.hf_config.to_json_file(str(out / ckpt_lib.MODEL_CONFIG))  # the architecture, for export
            tok_dir = out / "tokenizer"
            tok_dir.mkdir()
            for name, text in self.spec.data.tokenizer_files.items():
                (tok_dir / name).write_text(text)
            torch.save({"input_ids": self.probe.cpu(), "logits": logits.cpu(), "precision": self.precision},
                       out / "probe.pt")

    @torch.no_grad()
    def probe_logits(self) -> torch.Tensor:
        module = self.engine.module
        was_training = module.training
        module.eval()
        out = self.engine(input_ids=self.probe).logits.float()
        module.train(was_training)
        return out

    # ------------------------------------------------------------------ steps

    def next_micro_batches(self, it) -> tuple[list[torch.Tensor], float]:
        t0 = time.perf_counter()
        mbs = []
        self.batch_seqs = []
        audit = self.seq_log is not None  # data.log_sequence_ids; nothing is kept otherwise
        for _ in range(self.cfg.train.grad_accum):
            rows = []
            for _ in range(self.cfg.train.micro_batch):
                seq_id, tokens = next(it)
                rows.append(tokens)
                if audit:
                    self.batch_seqs.append((self.stream.position.epoch, seq_id))
            mbs.append(torch.as_tensor(np.stack(rows), dtype=torch.long).to(self.device, non_blocking=True))
        return mbs, time.perf_counter() - t0

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch * t.grad_accum * self.cfg.data.seq_len * self.world

    def train_one_step(self, it, timer: PhaseTimer | None = None):
        """(local mean loss, grad norm, seconds waiting for data) of one optimizer step.

        A step whose loss or gradients are non-finite on any rank changes nothing on any rank
        (see train_step) and is counted in ``nonfinite_skipped``; past train.skip_nonfinite
        such steps it raises NonFiniteError. Its batch is consumed, not retried.
        """
        mbs, waited = self.next_micro_batches(it)
        step = self.step + 1
        faults.fault_point("train.step", step, self.rank)
        poison = (lambda loss: faults.poison_loss(loss, step, self.rank)) if "PTM_FAULT" in os.environ else None
        self.lr = float(self.engine.get_lr()[0])  # this step's: the schedule moves on inside the step
        loss, norm = train_step(self.engine, mbs, self.obj, self.generator(), self.clip, timer, poison)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if self.seq_log is not None:
            self.seq_log.write(self.step, self.batch_seqs)
        # DeepSpeed engines already waited for the device to decide this (the same on every
        # rank: it comes from the all-reduced gradient norm); no extra sync.
        self.last_step_applied = getattr(self.engine, "was_step_applied", lambda: True)()
        if not self.last_step_applied and self.precision == "fp16":
            # fp16 loss scaling also drops steps whose gradients overflow in half precision while
            # every loss is finite: normal, not counted. Decided on all ranks' losses alike.
            finite = torch.isfinite(loss.detach()).float()
            if dist.is_initialized():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            self.last_step_applied = bool(finite)
        if not self.last_step_applied:
            self.nonfinite_skipped += 1
            allowed = self.cfg.train.skip_nonfinite
            what = (f"step {self.step}: non-finite loss or gradients (loss {mean_over_ranks(loss):.4g}, "
                    f"grad norm {float(norm) if norm is not None else float('nan'):.4g})")
            if self.nonfinite_skipped > allowed:
                raise NonFiniteError(
                    f"{what}; stopped before the optimizer step (weights and optimizer state are those "
                    f"after step {self.step - 1}); {self.nonfinite_skipped} such steps exceed "
                    f"train.skip_nonfinite={allowed}")
            if self.rank == 0:
                print(f"[ptm] {what}: update skipped ({self.nonfinite_skipped}/{allowed} allowed by "
                      "train.skip_nonfinite)", flush=True)
        return loss, norm, waited

    def generator(self) -> torch.Generator | None:
        if self.obj.causal:
            return None
        seed = (self.cfg.run.seed * 1_000_003 + self.step) * 1024 + self.rank
        return torch.Generator(device=self.device).manual_seed(seed)

    def evaluate(self) -> float:
        """Token-weighted mean loss over all held-out tokens; every rank runs the same number of
        forward passes (see eval_loss_sums)."""
        module = self.engine.module
        module.eval()
        sums = eval_loss_sums(self.engine, self.val, self.cfg.train.micro_batch, self.obj, self.cfg.run.seed,
                              n_batches=self.n_eval_batches, filler=self.probe)
        module.train()
        if dist.is_initialized():
            dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def score_tasks(self) -> dict:
        """A metrics record of train.eval_tasks on the current weights: ``eval/<task>/<metric>``
        keys and ``eval_tasks_s``. Every rank scores the same items on a whole model of its own
        with the harness (no collective inside, so no rank waits on another beyond the gather of
        ZeRO-3 weights, which all ranks enter together at the same step); the random generators
        the harness reseeds are restored, so training continues as if nothing had run."""
        from ptm_dist.harness import run_tasks, task_manager

        bundle = self.spec.eval_tasks
        t0 = time.perf_counter()  # the first call's set-up (the harness's task index) included
        if self._tasks is None:
            from transformers import AutoTokenizer

            root = Path(tempfile.mkdtemp(prefix=f"ptm-tasks-rank{self.rank}-"))
            weakref.finalize(self, shutil.rmtree, root, True)  # the task files go with the trainer
            include = bundle.write(root / "tasks")
            tok_dir = root / "tokenizer"
            tok_dir.mkdir()
            for name, text in self.spec.data.tokenizer_files.items():
                (tok_dir / name).write_text(text)
            self._tasks = (task_manager([include] if include else [], bool(bundle.harness_names)),
                           AutoTokenizer.from_pretrained(str(tok_dir)))
        manager, tokenizer = self._tasks
        saved = rng_state()
        try:
            with self.whole_model() as model:
                scores, _, _ = run_tasks(model, tokenizer, list(bundle.names), manager,
                                         limit=self.cfg.train.eval_tasks_limit, batch_size=self.cfg.train.micro_batch,
                                         seed=self.cfg.run.seed, quiet=False,
                                         where=f"train.eval_tasks at step {self.step}")
        finally:
            set_rng_state(saved)
        record: dict = {"step": self.step, "tokens": self.tokens_seen}
        record.update({f"eval/{task}/{m}": v for task, metrics in scores.items() for m, v in metrics.items()})
        record["eval_tasks_s"] = time.perf_counter() - t0
        return record

    @contextlib.contextmanager
    def whole_model(self):
        """The model being trained, whole and in eval mode: below ZeRO-3 the engine's own module;
        at ZeRO-3 a copy built from the gathered weights (a forward pass of the partitioned module
        would fetch and release them again under ZeRO's hooks), dropped afterwards."""
        module = self.engine.module
        if self.cfg.zero.stage == 3:
            import deepspeed

            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            copy = models.build(self.hf_config)
            copy.load_state_dict(state)
            del state
            copy.to(device=self.device, dtype=params[0].dtype).eval()
            try:
                yield copy
            finally:
                del copy
            return
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield module
        finally:
            module.train(was_training)

    def bad_shards(self) -> dict[str, str]:
        """Bad shards skipped so far by all ranks; more than data.max_bad_shards stops the run
        (each rank also stops as soon as its own count passes the budget)."""
        bad: dict[str, str] = {}
        for shards in gather_objects(dict(self.stream.bad)):
            bad.update(shards)
        if len(bad) > self.cfg.data.max_bad_shards:
            names = "; ".join(bad[i] for i in sorted(bad))
            raise BadShardBudgetExceeded(
                f"{len(bad)} bad shards exceed data.max_bad_shards={self.cfg.data.max_bad_shards}: {names}"
            )
        return bad

    def window_loss(self, window: list[tuple[int, torch.Tensor]]) -> float:
        """Mean over ranks and steps of a metrics window's losses (NaN if every step in it was
        skipped); each step's mean over ranks goes through the loss-spike detector."""
        if not window:
            return float("nan")
        per_step = torch.stack([loss for _, loss in window]).float()
        if dist.is_initialized():
            dist.all_reduce(per_step)
            per_step /= self.world
        values = per_step.tolist()
        for (step, _), value in zip(window, values):
            warning = self.spikes.update(step, value)
            if warning and self.rank == 0:
                print(f"[ptm] warning: {warning}", flush=True)
        return sum(values) / len(values)


# Written by rank 0 after the first step of each launch: wall-clock times (time.time()) of its
# start-up, read by the driver for the summary's "time to first step".
STARTUP_FILE = "startup.json"


def first_group_of_command(run_dir: str, launched_at: float | None) -> bool:
    """True unless STARTUP_FILE already holds a worker group started by this command (one that
    started at or after ``launched_at``): a group Ray Train restarted after a failure or resize
    must not replace the command's own start-up with its own, which counts the steps before it."""
    path = storage.join(run_dir, STARTUP_FILE)
    if launched_at is None or not storage.exists(path):
        return True
    try:
        return json.loads(storage.read_text(path))["worker_start"] < launched_at
    except (ValueError, KeyError, TypeError):
        return True  # unreadable: write a fresh one


def train_loop(config: dict) -> None:
    """Ray Train entry point (one call per worker).

    Ray Train restarts the workers after a dead process or node (train.max_failures); an error
    that is the user's to fix (bad data, a non-finite loss past its budget, unwritable storage)
    would only repeat, so it ends the run at once (ptm_dist.launch's failure policy).
    """
    import ray.train

    # First line of every worker: the driver files this process's output as worker<rank>.log.
    print(runlogs.rank_mark(ray.train.get_context().get_world_rank()), flush=True)
    spec: PretrainSpec = config["spec"]
    faults.install(spec.faults)
    forget_inherited_wandb_service()
    _train_loop(spec)


def _train_loop(spec: PretrainSpec) -> None:
    import ray
    import ray.train
    import ray.train.torch

    worker_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = spec.for_world(world)  # an elastic range: grad_accum for this group's size
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tr = Trainer(spec, rank, world, device)
    model_ready = time.time()
    cfg = tr.cfg
    tr.nodes = gather_objects(ray.get_runtime_context().get_node_id())
    resume = agreed_resume_checkpoint(tr.run_dir, rank)
    if resume:
        tr.restore(resume)
        if rank == 0:
            print(f"[ptm] resumed from {resume} at step {tr.step}", flush=True)
    if cfg.data.log_sequence_ids:
        tr.seq_log = SequenceLog(tr.run_dir, rank, tr.step, world)
    if dist.is_initialized():
        dist.barrier()  # every rank has read the checkpoint before rank 0 tidies the directory
    log = None
    if rank == 0:
        ckpt_lib.discard_after(tr.run_dir, tr.step)
        log = MetricsLog(tr.run_dir, resume_step=tr.step if resume else None)
        if resume:
            log.write({"step": tr.step, "resumed_from": resume})  # where each restart picked up
        workers = f"{world} workers"
        if spec.global_batch is not None:
            workers += (f" of scaling.num_workers {list(cfg.scaling.num_workers)} (train.grad_accum "
                        f"{cfg.train.grad_accum} keeps the global batch of {spec.global_batch} sequences)")
        print(
            f"[ptm] {cfg.model.family}-{cfg.model.size}: {tr.n_params / 1e6:.2f}M params, {workers}, "
            f"ZeRO-{cfg.zero.stage}, {tr.precision}, device {device.type}", flush=True,
        )
        # One wandb run per job, from rank 0 only; its id is kept in the run dir for resumes.
        tr.tracker = Tracker.start(cfg, tr.run_dir, job_type="pretrain", config={
            "job": cfg.to_dict(), "deepspeed": ds_config(tr.engine_spec, tr.precision, device.type == "cuda"),
            "world_size": world, "n_params": tr.n_params, "tokens_per_step": tr.tokens_per_step,
        })
        print(f"[ptm] {tr.tracker.describe()}", flush=True)
        resize = tr.resizes[-1] if resume and tr.resizes else None
        if resize is not None and resize["step"] == tr.step and resize["to"] == world:  # resized just now
            record = {"step": tr.step, "resize_from_workers": resize["from"], "workers": world,
                      "grad_accum": resize["grad_accum"], "resize_load_s": resize["load_s"]}
            log.write(record)
            tr.tracker.log(record, step=tr.step)
            print(f"[ptm] resized from {resize['from']} to {world} workers at step {tr.step}: weights and "
                  f"optimizer resharded in {resize['load_s']:.1f} s, each old worker's rest of its epoch handed "
                  f"to a new one, train.grad_accum {resize['grad_accum']}", flush=True)
    # With a progress board the driver draws a live bar from rank 0's records instead of the
    # plain step lines below (Ray forwards worker output line by line, which breaks bars).
    board = spec.progress_board if rank == 0 else None
    peak = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_step = tr.tokens_per_step

    def write(record: dict) -> None:
        if log is not None:
            log.write(record)
            tr.tracker.log(record, step=record["step"])
            if board is not None:
                board.push.remote(record)

    tasks_every = cfg.train.eval_tasks_every

    def score_tasks() -> None:
        record = tr.score_tasks()
        write(record)
        if rank == 0 and board is None:
            scores = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval/"))
            print(f"[ptm] step {tr.step} eval_tasks {scores} ({record['eval_tasks_s']:.1f} s)", flush=True)

    if tr.step == 0:
        write({"step": 0, "eval_loss": tr.evaluate(), "tokens": 0})
        if spec.eval_tasks is not None:
            score_tasks()  # the starting weights' scores, to compare the trained ones with

    it = iter(tr.stream)
    window: list[tuple[int, torch.Tensor]] = []  # (step, local loss) of applied steps since the last line
    # A window of training steps between metrics lines; time spent evaluating and checkpointing
    # (paused) is left out of its tokens/s and data-wait fraction.
    n_in_window, wait, paused, window_start = 0, 0.0, 0.0, time.perf_counter()
    run_start = time.perf_counter()
    start_step = tr.step
    # A node drain (Ray's preemption notice) is checked with Ray Train's own collective.
    stop = stopping.StopWatch(tr.run_dir, rank, world, getattr(ray.train, "get_preemption_info", None))
    saved_for_drain = False
    loop_start = time.time()
    while tr.step < cfg.train.max_steps:
        loss, norm, waited = tr.train_one_step(it)
        # Every rank, every step: they all stop after the same one, and a background upload is
        # committed once no rank is still copying.
        stopping_now = stop.requested(busy=tr.pending is not None and not tr.pending.done.is_set())
        if tr.pending is not None and stop.all_idle:
            t_commit = time.perf_counter()
            finish_upload(tr, log)
            paused += time.perf_counter() - t_commit
        if rank == 0 and tr.step == start_step + 1 and first_group_of_command(tr.run_dir, spec.launched_at):
            storage.write_text(storage.join(tr.run_dir, STARTUP_FILE), json.dumps({
                "worker_start": worker_start, "model_ready": model_ready, "loop_start": loop_start,
                "first_batch_wait_s": waited, "first_step": time.time(), "step": tr.step}) + "\n")
        if tr.last_step_applied:
            window.append((tr.step, loss))
        wait += waited
        n_in_window += 1
        last = tr.step == cfg.train.max_steps
        if tr.step % cfg.train.log_every == 0 or last or stopping_now:
            elapsed = time.perf_counter() - window_start - paused
            tps = tokens_per_step * n_in_window / elapsed
            record = {
                "step": tr.step,
                "loss": tr.window_loss(window),
                "lr": tr.lr,
                "grad_norm": float(norm) if norm is not None else None,
                "tokens_per_s": tps,
                "data_wait_frac": wait / elapsed,
                "tokens": tr.tokens_seen,
                "epoch": tr.stream.position.epoch,
            }
            record["nonfinite_skipped"] = tr.nonfinite_skipped
            record["loss_spikes"] = tr.spikes.count
            if cfg.data.max_bad_shards:
                record["bad_shards"] = len(tr.bad_shards())
            if peak:
                record["mfu"] = tr.flops_per_token * tps / (peak * world)
            write(record)
            if rank == 0 and board is None:
                done = tr.step - start_step
                eta = (cfg.train.max_steps - tr.step) * (time.perf_counter() - run_start) / max(done, 1)
                print(
                    f"[ptm] step {tr.step}/{cfg.train.max_steps} loss {record['loss']:.4f} "
                    f"lr {record['lr']:.2e} {tps:,.0f} tok/s eta {eta:.0f}s", flush=True,
                )
            window.clear()
            n_in_window, wait, paused, window_start = 0, 0.0, 0.0, time.perf_counter()
        t_pause = time.perf_counter()
        if tr.step % cfg.train.eval_every == 0 or last:
            eval_loss = tr.evaluate()
            write({"step": tr.step, "eval_loss": eval_loss, "tokens": tr.tokens_seen})
            if rank == 0 and board is None:
                print(f"[ptm] step {tr.step} eval_loss {eval_loss:.4f}", flush=True)
        if spec.eval_tasks is not None and (last or (tasks_every and tr.step % tasks_every == 0)):
            score_tasks()
        drain_save = stop.drained is not None and not saved_for_drain
        if tr.step % cfg.train.ckpt_every == 0 or last or stopping_now or drain_save:
            if drain_save and rank == 0:
                print(f"[ptm] node drain notice at step {tr.step} ({stopping.describe_drain(stop.drained)}): "
                      "checkpointing now; Ray Train restarts the workers from it when the node goes", flush=True)
            saved_for_drain = saved_for_drain or drain_save
            save_checkpoint(tr, log)
        paused += time.perf_counter() - t_pause
        if stopping_now and not last:
            if log is not None:
                log.write({"step": tr.step, "stopped": stop.reason or "a stop request"})
            if rank == 0:
                print(f"[ptm] stopped at step {tr.step} on request ({stop.reason})", flush=True)
            break
    if tr.pending is not None:
        finish_upload(tr, log)  # the last checkpoint counts once it is complete
    stop.close()
    if log is not None:
        log.close()
        tr.tracker.summary({"n_params": tr.n_params, "world_size": world, "precision": tr.precision,
                            "device": device_name(device), "tokens_seen": tr.tokens_seen})
        tr.tracker.finish()
    if tr.seq_log is not None:
        tr.seq_log.close()


def agreed_resume_checkpoint(run_dir: str, rank: int) -> str | None:
    """The checkpoint every rank resumes from: rank 0 lists the run's checkpoints and the others
    take its choice, since listings of the same storage can differ between nodes (NFS attribute
    caches, an object store listed during an upload)."""
    return broadcast_object(ckpt_lib.latest_complete_checkpoint(run_dir) if rank == 0 else None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def ray_report(tr: Trainer, local: Path, name: str) -> None:
    """Hand this rank's checkpoint files to Ray Train, which copies them to <run_dir>/<name>."""
    import ray.train

    ray.train.report({"step": tr.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                     checkpoint_dir_name=name)


def ray_report_background(tr: Trainer, local: Path, name: str, pending: PendingSave) -> None:
    """As ray_report, but Ray Train copies the files from its upload thread
    (CheckpointUploadMode.ASYNC) while training goes on; ``pending.done`` is set when this rank's
    copy ended, and ``pending.error`` holds what stopped it."""
    import ray.train
    from ray.train import CheckpointUploadMode

    def upload(checkpoint, dir_name: str):
        pending.error = None  # Ray Train retries an upload that failed on a transient S3 error
        t0 = time.perf_counter()
        try:
            faults.fault_point("save.upload", pending.step, tr.rank)
            persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
            pending.upload_s = time.perf_counter() - t0
            return persisted
        except OSError as e:
            pending.error = ckpt_lib.write_error(pending.target, e)
            raise pending.error from e
        except BaseException as e:
            pending.error = e
            raise
        finally:
            pending.done.set()

    ray.train.report({"step": tr.step}, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                     checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=False)


def copy_report(tr: Trainer, local: Path, name: str) -> None:
    """Without Ray (local trainer, tests): copy this rank's files to <run_dir>/<name> directly."""
    storage.upload_dir(local, storage.join(tr.run_dir, name))


@dataclass
class PendingSave:
    """A checkpoint whose files this rank is uploading in the background (train.ckpt_upload)."""

    step: int
    target: str
    local: Path
    meta: dict
    pause_s: float = 0.0  # how long training waited for this save
    upload_s: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def uploads_in_background(tr: Trainer) -> bool:
    mode = tr.cfg.train.ckpt_upload
    return mode == "background" or (mode == "auto" and storage.is_uri(tr.run_dir))


def save_checkpoint(tr: Trainer, log: MetricsLog | None, report=ray_report) -> None:
    """Every rank writes its part locally, hands it to ray.train.report (which copies it into
    <run_dir>/checkpoint_<step>), then rank 0 marks the checkpoint complete once all have.

    With background uploads (``report`` is ray_report and train.ckpt_upload says so) this
    returns once the local files are written; the copy runs in Ray Train's upload thread and
    ``finish_upload`` marks the checkpoint complete at a later step boundary, once every rank's
    copy ended. One upload is in flight at a time: a save first finishes the previous one.

    A failure anywhere in here leaves at most an unmarked directory, which resume, export and
    retention ignore; a storage error (unwritable, full) is raised as CheckpointWriteError.
    The fault points (ptm_dist.faults) mark the stages tests crash in.
    """
    if tr.pending is not None:
        finish_upload(tr, log)
    t0 = time.perf_counter()
    name = ckpt_lib.checkpoint_name(tr.step)
    target = storage.join(tr.run_dir, name)
    step, rank = tr.step, tr.rank
    tmp = Path(tempfile.mkdtemp(prefix=f"ptm-{name}-rank{tr.rank}-"))
    meta = {
        "step": tr.step, "tokens_seen": tr.tokens_seen, "world_size": tr.world,
        "zero_stage": tr.cfg.zero.stage, "precision": tr.precision, "time": time.time(),
        "nodes": tr.nodes, "device": device_name(tr.device), "data": tr.spec.data.identity,
        "lr_schedule_end": lr_schedule(tr.engine).end, "resizes": tr.resizes,
        "batch": {"global": tr.cfg.train.micro_batch * tr.cfg.train.grad_accum * tr.world,
                  "given": list(tr.spec.batch_given or (tr.cfg.train.micro_batch, tr.cfg.train.grad_accum))},
    }
    handed_off = False
    try:
        faults.fault_point("save.begin", step, rank)
        tr.save_local(tmp)
        faults.fault_point("save.before_report", step, rank)
        if report is ray_report and uploads_in_background(tr):
            pending = PendingSave(step, target, tmp, meta)
            ray_report_background(tr, tmp, name, pending)
            handed_off = True
            tr.pending = pending
            faults.fault_point("save.after_report", step, rank)
            pending.pause_s = time.perf_counter() - t0
            return
        report(tr, tmp, name)
        faults.fault_point("save.after_report", step, rank)
        commit_checkpoint(tr, log, target, meta, {"upload": "foreground", "pause_s": time.perf_counter() - t0})
    except OSError as e:
        raise ckpt_lib.write_error(target, e) from e
    finally:
        if not handed_off:
            shutil.rmtree(tmp, ignore_errors=True)


def finish_upload(tr: Trainer, log: MetricsLog | None) -> None:
    """Wait for this rank's background upload, then mark the checkpoint complete (every rank
    calls this at the same step)."""
    pending, tr.pending = tr.pending, None
    t0 = time.perf_counter()
    pending.done.wait()
    shutil.rmtree(pending.local, ignore_errors=True)
    if pending.error is not None:
        raise pending.error
    commit_checkpoint(tr, log, pending.target, pending.meta, {
        "upload": "background", "pause_s": pending.pause_s + time.perf_counter() - t0,
        "upload_s": pending.upload_s,
    })


def commit_checkpoint(tr: Trainer, log: MetricsLog | None, target: str, meta: dict, timing: dict) -> None:
    """Once every rank's files are in storage: rank 0 writes the COMPLETE marker, applies
    retention and syncs the metrics. ``timing`` goes into the marker: how the files were
    uploaded, the seconds training waited for the save (rank 0) and, in the background, the
    upload's own length."""
    step, rank = meta["step"], tr.rank
    try:
        if dist.is_initialized():
            dist.barrier()  # every rank's files are in storage
        if rank == 0:
            faults.fault_point("save.before_marker", step, rank)
            ckpt_lib.mark_complete(target, {**meta, **timing}, fault_step=step)
            faults.fault_point("save.after_marker", step, rank)
            print(f"[ptm] step {step} checkpoint {target}", flush=True)
            ckpt_lib.apply_retention(tr.run_dir, tr.cfg.train.keep_ckpts)
            faults.fault_point("save.before_metrics_sync", step, rank)
            if log is not None:
                log.sync()
            tr.tracker.sync()
            faults.fault_point("save.end", step, rank)
    except OSError as e:
        raise ckpt_lib.write_error(target, e) from e
