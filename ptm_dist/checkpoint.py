"""The run directory's versioned format: checkpoints, their commit marker, per-rank trainer
state, and the run's identity. Everything a resume, an export or a report reads from a run
is defined here.

A checkpoint is ``<run_dir>/checkpoint_<step:08d>/``:

    ds/            DeepSpeed's checkpoint (model states and every rank's ZeRO shard)
    rank_<r>.pt    per-rank trainer state (RankState): step, tokens, data position, RNG states
    job.yaml       the resolved job        tokenizer/   the tokenizer
    model_config.json  the model's transformers config (its architecture; export builds from it)
    probe.pt       logits of the live model on one held-out sequence (export checks them)
    COMPLETE       written last, after every rank's files are in storage: JSON with
                   "format" (FORMAT_VERSION), step, tokens_seen, world_size, zero_stage,
                   precision, device, nodes, time, batch ({"global": sequences per step,
                   "given": the job's [micro_batch, grad_accum] before a resize changed it}),
                   resizes ([{"step", "from", "to", "convert_s"}]: each change of worker count)
    universal/     DeepSpeed's universal form of ds/, made on the first resume on another
                   number of workers (ptm_dist.train.reshard), DONE written last

DeepSpeed writes its files with no commit point of its own, so only a directory with
``COMPLETE`` counts: resume and export use the newest complete checkpoint and never a partial one.

The run's identity is the set of job keys (IDENTITY) that must not change when a run directory
is resumed: they change what the weights or the data position mean.

Format history (bump FORMAT_VERSION when a field changes meaning or a reader needs a new one):
    1   the layout above. Checkpoints written before the marker carried "format" have this
        layout too and are read as format 1.
A checkpoint of a newer format than this version reads is refused with a one-line message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ptm_dist import faults, storage
from ptm_dist.config import range_batch_problem
from ptm_dist.errors import CheckpointFormatError, CheckpointWriteError, ConfigError

FORMAT_VERSION = 1
MARKER = "COMPLETE"
DS_TAG = "ds"  # DeepSpeed's tag: its files live in <checkpoint>/ds/
MODEL_CONFIG = "model_config.json"
IDENTITY = ("model", "data.seq_len", "data.tokenizer", "data.piece_bytes", "zero.stage")
# What an IDENTITY key meant in a job.yaml written before the key existed.
IDENTITY_BEFORE = {"data.piece_bytes": 0}  # runs before pieces read every shard whole
_NAME = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def list_checkpoints(run_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint directory, oldest first."""
    out = []
    for name in storage.list_dirs(run_dir):
        m = _NAME.match(name)
        if m:
            path = storage.join(run_dir, name)
            out.append((int(m.group(1)), path, storage.exists(storage.join(path, MARKER))))
    return sorted(out)


def latest_complete_checkpoint(run_dir: str) -> str | None:
    complete = [path for _, path, ok in list_checkpoints(run_dir) if ok]
    return complete[-1] if complete else None


def is_checkpoint_dir(path: str) -> bool:
    return _NAME.match(path.rstrip("/").rsplit("/", 1)[-1]) is not None


def write_error(target: str, error: OSError, *, run_dir: str | None = None) -> CheckpointWriteError:
    """The error for a failed write: ``target`` is the checkpoint directory, or with ``run_dir``
    given, what in the run directory could not be written. It names the newest complete
    checkpoint, which the failure left untouched."""
    try:
        newest = latest_complete_checkpoint(run_dir or target.rsplit("/", 1)[0])
    except OSError:
        newest = None
    kept = f"newest complete checkpoint {newest} is intact" if newest else "no earlier complete checkpoint"
    if run_dir:
        return CheckpointWriteError(f"cannot write to run directory {run_dir}: {error}; {kept}")
    return CheckpointWriteError(f"cannot write checkpoint {target}: {error}; it is left incomplete and "
                                f"will not be used; {kept}")


def mark_complete(ckpt_dir: str, meta: dict, fault_step: int | None = None) -> None:
    """Commit a checkpoint: write its COMPLETE marker (atomically) with ``meta`` and the format."""
    meta = {**meta, "format": FORMAT_VERSION}
    storage.write_text(storage.join(ckpt_dir, MARKER), json.dumps(meta, sort_keys=True) + "\n",
                       fault=("save.marker_partial", fault_step))


def read_meta(ckpt_dir: str) -> dict:
    """The COMPLETE marker of a checkpoint; a format newer than this version's is refused."""
    meta = json.loads(storage.read_text(storage.join(ckpt_dir, MARKER)))
    version = meta.setdefault("format", 1)  # markers without the field predate it: format 1
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{ckpt_dir}: checkpoint format {version!r} was written by a newer ptm-dist; this version "
            f"reads formats up to {FORMAT_VERSION} (upgrade ptm-dist to resume or export it)")
    return meta


@dataclass
class RankState:
    """One rank's trainer state in a checkpoint (``rank_<r>.pt``), beside DeepSpeed's files."""

    step: int
    tokens_seen: int
    data: dict  # the data stream's position (SequenceStream.state_dict)
    rng: dict  # ptm_dist.dist.rng_state()
    nonfinite_skipped: int = 0
    spikes: dict | None = None  # SpikeDetector.state_dict()
    extra: dict = field(default_factory=dict)  # fields added by later formats

    @staticmethod
    def file(rank: int) -> str:
        return f"rank_{rank}.pt"

    def save(self, ckpt_dir: Path, rank: int) -> None:
        import torch

        torch.save({f: getattr(self, f) for f in self.__dataclass_fields__}, Path(ckpt_dir) / self.file(rank))

    @classmethod
    def load(cls, ckpt_dir: Path, rank: int) -> RankState:
        import torch

        path = Path(ckpt_dir) / cls.file(rank)
        if not path.exists():
            raise CheckpointFormatError(f"{path}: missing; the checkpoint holds no state for rank {rank}")
        state = torch.load(path, weights_only=False)
        missing = [k for k in ("step", "tokens_seen", "data", "rng") if k not in state]
        if missing:
            raise CheckpointFormatError(f"{path}: not a ptm rank state (no {', '.join(missing)})")
        known = {k: state.pop(k) for k in list(state) if k in cls.__dataclass_fields__ and k != "extra"}
        return cls(**known, extra={**state.pop("extra", {}), **state})


def rank_files(rank: int):
    """Which files of a checkpoint rank ``rank`` reads to resume (for ``storage.local_copy``):
    its own trainer state and ZeRO partition (``*zero_pp_rank_<rank>_*``: optimizer states, and
    at ZeRO-3 the weights), and the whole weights that every rank loads below ZeRO-3
    (``mp_rank_00_model_states.pt``). DeepSpeed reads only its own rank's ZeRO files unless
    ZeRO's elastic checkpoints are on, which ptm never sets."""
    own = f"zero_pp_rank_{rank}_"

    def select(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if rel == RankState.file(rank):
            return True
        return rel.startswith(f"{DS_TAG}/") and (own in name or name == "mp_rank_00_model_states.pt")

    return select


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_same_run(run_dir: str, job: dict) -> None:
    """Refuse to resume ``run_dir`` with a job whose IDENTITY keys differ from the job it holds
    (only when it holds a complete checkpoint: a run that never saved can start over)."""
    import yaml

    path = storage.join(run_dir, "job.yaml")
    if not storage.exists(path) or not latest_complete_checkpoint(run_dir):
        return
    old = yaml.safe_load(storage.read_text(path)) or {}

    def before(k: str):
        value = _get(old, k)
        return IDENTITY_BEFORE.get(k, value) if value == {} else value  # {}: not in the old job

    changed = [k for k in IDENTITY if before(k) != _get(job, k)]
    if changed:
        details = "; ".join(f"{k}: {before(k)!r} -> {_get(job, k)!r}" for k in changed)
        hint = ("; it was written before shards were read in pieces: --set data.piece_bytes=0 resumes it"
                if "data.piece_bytes" in changed and _get(old, "data.piece_bytes") == {} else "")
        raise ConfigError(
            f"{run_dir} holds a run with a different {', '.join(changed)} ({details}); "
            f"use another run.name, or --set run.resume=false for a fresh directory{hint}"
        )


# Keys of the learning-rate schedule other than its end: the schedule is a function of them and
# the step, so changing one on resume would make the learning rate jump at the resumed step.
SCHEDULE = ("train.lr", "train.min_lr", "train.warmup_steps", "train.schedule")
# The key that shapes each kind's decay (another kind's is not used, and may change).
SCHEDULE_PARAMETER = {"wsd": "train.decay_fraction", "constant": "train.cooldown_steps"}
# What a schedule key meant in a job.yaml written before the key existed: today's defaults,
# so a checkpoint from before train.schedule resumes as the cosine schedule it trained with.
SCHEDULE_BEFORE = {"train.schedule": "cosine", "train.decay_fraction": 0.2, "train.cooldown_steps": 0}


def check_resume(ckpt_dir: str, job: dict, data_identity: dict, allow_data_change: bool) -> bool:
    """Refuse to resume ``ckpt_dir`` with a changed schedule (SCHEDULE keys and the kind's
    SCHEDULE_PARAMETER; train.max_steps may change, see ptm_dist.engine.LRSchedule.extend, but
    not to before the checkpoint's step) or,
    unless ``allow_data_change``, a changed tokenizer or training shard list (``data_identity``:
    WorkerData.identity, against the one in its COMPLETE marker; markers written before it was
    recorded are not checked). Returns whether the data changed (and was allowed to)."""
    import yaml

    old_job = yaml.safe_load(storage.read_text(storage.join(ckpt_dir, "job.yaml"))) or {}
    meta = read_meta(ckpt_dir)

    def before(k: str):
        value = _get(old_job, k)
        return SCHEDULE_BEFORE.get(k, value) if value == {} else value  # {}: not in the old job

    kind = before("train.schedule")
    keys = SCHEDULE + ((SCHEDULE_PARAMETER[kind],) if kind in SCHEDULE_PARAMETER else ())
    changed = [k for k in keys if before(k) != _get(job, k)]
    if "lr_schedule_end" not in meta and _get(old_job, "train.max_steps") != _get(job, "train.max_steps"):
        changed.append("train.max_steps")  # written before checkpoints kept their schedule
    if changed:
        details = "; ".join(f"{k}: {before(k)!r} -> {_get(job, k)!r}" for k in changed)
        raise ConfigError(
            f"{ckpt_dir} was trained with a different learning-rate schedule ({details}): resuming "
            "would make the learning rate jump at the resumed step; keep the checkpoint's values, "
            "or start a new run (--set run.resume=false)")
    if _get(job, "train.max_steps") < meta["step"]:
        raise ConfigError(
            f"{ckpt_dir} is at step {meta['step']}, beyond train.max_steps={_get(job, 'train.max_steps')}; "
            "use its step or more, or start a new run (--set run.resume=false)")
    old = meta.get("data")
    if not old:
        return False
    if old.get("vocab_size", data_identity["vocab_size"]) != data_identity["vocab_size"]:
        raise ConfigError(
            f"{ckpt_dir} was trained with a tokenizer of {old['vocab_size']} tokens, this job's has "
            f"{data_identity['vocab_size']}: the weights cannot continue with it (run.allow_data_change "
            "keeps the model's shape); start a new run (--set run.resume=false)")
    what = []
    if old["tokenizer_sha256"] != data_identity["tokenizer_sha256"]:
        what.append(f"the tokenizer (sha256 {old['tokenizer_sha256'][:12]} -> "
                    f"{data_identity['tokenizer_sha256'][:12]}: token ids would mean other tokens)")
    if old["shards_sha256"] != data_identity["shards_sha256"]:
        what.append(f"the training shard list ({old['shards']} shards, sha256 {old['shards_sha256'][:12]} -> "
                    f"{data_identity['shards']} shards, {data_identity['shards_sha256'][:12]}: the saved "
                    "data position indexes the old list)")
    if what and not allow_data_change:
        raise ConfigError(
            f"{ckpt_dir} was trained on other data: {' and '.join(what)}; restore the data it was "
            "trained on, start a new run (--set run.resume=false), or --set run.allow_data_change=true "
            "to continue its weights on the new data from the start of the new shard list")
    return bool(what)


def resume_batch(ckpt_dir: str, job: dict, workers: int) -> tuple[int, str | None]:
    """(train.grad_accum to resume ``ckpt_dir`` with on ``workers`` workers, a line saying what
    changed or None).

    The global batch (sequences per optimizer step: micro batch x workers x grad_accum) that
    wrote the checkpoint is kept when the job's micro batch and grad_accum are those the run was
    given (its marker's ``batch.given``; the checkpoint's job.yaml before it was recorded): on
    another number of workers grad_accum is chosen to keep it, and when no whole number does,
    this is a ConfigError naming the numbers and what to set. A job that changes train.micro_batch
    or train.grad_accum itself runs with its own values, as on any resume."""
    meta, given, total = _checkpoint_batch(ckpt_dir)
    micro, grad_accum = _get(job, "train.micro_batch"), _get(job, "train.grad_accum")
    old_world = meta["world_size"]
    if (micro, grad_accum) != given:
        if micro * grad_accum * workers == total:
            return grad_accum, None
        return grad_accum, _batch_changes(meta["step"], total, micro, workers, grad_accum)
    if total % (micro * workers):
        fits = [w for w in range(1, total // micro + 1) if total % (micro * w) == 0]
        raise ConfigError(
            f"{ckpt_dir} was trained with a global batch of {total} sequences per step ({old_world} workers); "
            f"{workers} workers x train.micro_batch {micro} cannot keep it (grad_accum would be "
            f"{total / (micro * workers):g}): use scaling.num_workers in {fits}, or a train.micro_batch that "
            f"makes micro_batch x {workers} divide {total}")
    accum = total // (micro * workers)
    if accum == grad_accum:
        return accum, None
    moved = f"{old_world} -> {workers} workers: " if old_world != workers else f"on {workers} workers (as resized): "
    return accum, (f"[ptm] {moved}train.grad_accum {grad_accum} -> {accum} keeps the global batch of {total} "
                   f"sequences per step (train.micro_batch {micro} x {workers} x {accum})")


def _batch_changes(step: int, old_total: int, micro: int, workers: int, grad_accum: int) -> str:
    """The line saying that a job which changed its own batch settings changes the global batch."""
    return (f"[ptm] the global batch changes at step {step}: {old_total} -> {micro * grad_accum * workers} "
            f"sequences per step (train.micro_batch {micro} x {workers} workers x train.grad_accum {grad_accum})")


def _checkpoint_batch(ckpt_dir: str) -> tuple[dict, tuple[int, int], int]:
    """(marker, the job's own (micro_batch, grad_accum), global batch) of a checkpoint."""
    import yaml

    meta = read_meta(ckpt_dir)
    batch = meta.get("batch") or {}
    if "given" in batch and "global" in batch:
        return meta, tuple(batch["given"]), batch["global"]
    old_job = yaml.safe_load(storage.read_text(storage.join(ckpt_dir, "job.yaml"))) or {}
    old_micro, old_accum = _get(old_job, "train.micro_batch"), _get(old_job, "train.grad_accum")
    return (meta, tuple(batch.get("given", (old_micro, old_accum))),
            batch.get("global", old_micro * old_accum * meta["world_size"]))


def elastic_batch(ckpt_dir: str | None, job: dict, low: int, high: int) -> tuple[int, str | None]:
    """(the global batch an elastic run, ``scaling.num_workers: [low, high]``, keeps on every
    number of workers in its range, a line saying it changed or None).

    The job's batch is defined at ``high`` workers: micro_batch x high x grad_accum; a resume
    with the job's own micro batch and grad_accum keeps the checkpoint's global batch (as
    resume_batch does). Each worker group then runs grad_accum = global / (micro_batch x its
    size), so every size in the range must divide it: otherwise a ConfigError naming the sizes
    that do not and what to set."""
    micro, grad_accum = _get(job, "train.micro_batch"), _get(job, "train.grad_accum")
    total, line, kept = micro * grad_accum * high, None, False
    if ckpt_dir is not None:
        meta, given, old_total = _checkpoint_batch(ckpt_dir)
        if (micro, grad_accum) == given:
            total, kept = old_total, True
        elif old_total != total:
            line = _batch_changes(meta["step"], old_total, micro, high, grad_accum)
    problem = range_batch_problem(total, micro, low, high, kept)
    if problem:
        raise ConfigError(f"scaling.num_workers [{low}, {high}]: {problem}")
    return total, line


def apply_retention(run_dir: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints, and partial ones older than the
    newest complete one. The newest complete checkpoint is never deleted. Returns what went."""
    ckpts = list_checkpoints(run_dir)
    complete = [(s, p) for s, p, ok in ckpts if ok]
    if not complete:
        return []
    newest_step = complete[-1][0]
    doomed = [p for _, p in complete[: -max(1, keep)]]
    doomed += [p for s, p, ok in ckpts if not ok and s < newest_step]
    for i, p in enumerate(doomed):
        storage.delete_dir(p)
        if i == 0:
            faults.fault_point("save.during_retention")
    return doomed


def discard_after(run_dir: str, step: int) -> list[str]:
    """On resume from ``step``: remove checkpoint directories newer than it (partial ones left by
    a crash), so later saves at those steps never mix with stale files."""
    doomed = [p for s, p, _ in list_checkpoints(run_dir) if s > step]
    for p in doomed:
        storage.delete_dir(p)
    return doomed


def resolve_source(src: str) -> str:
    """A run directory or a checkpoint directory -> the checkpoint to read (complete only)."""
    src = storage.absolute(src)
    if is_checkpoint_dir(src):
        if not storage.exists(storage.join(src, MARKER)):
            raise FileNotFoundError(f"{src}: checkpoint is incomplete (no {MARKER} marker); not using it")
        return src
    ckpt = latest_complete_checkpoint(src)
    if ckpt is None:
        raise FileNotFoundError(f"{src}: no complete checkpoint found (expected checkpoint_*/ with {MARKER})")
    return ckpt
