"""Checkpoint layout, commit markers, retention, resume selection and Hugging Face export.

A checkpoint is ``<run_dir>/checkpoint_<step:08d>/``:

    ds/            DeepSpeed's checkpoint (model states and every rank's ZeRO shard)
    rank_<r>.pt    per-rank trainer state: data position, RNG states
    job.yaml       the resolved job        tokenizer/   the tokenizer
    probe.pt       logits of the live model on one held-out sequence (export checks them)
    COMPLETE       written last, after every rank's files are in storage

DeepSpeed writes its files with no commit point of its own, so only a directory with
``COMPLETE`` counts: resume and export use the newest complete checkpoint and never a partial one.
"""

from __future__ import annotations

import json
import re

from ptm_dist import faults, storage

MARKER = "COMPLETE"
DS_TAG = "ds"
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


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (unwritable or full storage); earlier ones are untouched."""

    def __init__(self, target: str, error: OSError, *, run_dir: str | None = None):
        """``target``: the checkpoint directory, or with ``run_dir`` given, what in the run
        directory could not be written."""
        try:
            newest = latest_complete_checkpoint(run_dir or target.rsplit("/", 1)[0])
        except OSError:
            newest = None
        kept = f"newest complete checkpoint {newest} is intact" if newest else "no earlier complete checkpoint"
        if run_dir:
            super().__init__(f"cannot write to run directory {run_dir}: {error}; {kept}")
        else:
            super().__init__(f"cannot write checkpoint {target}: {error}; it is left incomplete and "
                             f"will not be used; {kept}")


def mark_complete(ckpt_dir: str, meta: dict, fault_step: int | None = None) -> None:
    storage.write_text(storage.join(ckpt_dir, MARKER), json.dumps(meta, sort_keys=True) + "\n",
                       fault=("save.marker_partial", fault_step))


def read_meta(ckpt_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(ckpt_dir, MARKER)))


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
