"""Resume a checkpoint on a different number of workers than wrote it (a resize).

ZeRO shards are cut for the world size that wrote them. On the first resume of a checkpoint
with another worker count, rank 0 converts its ``ds/`` into DeepSpeed's universal format
(``deepspeed.checkpoint.ds_to_universal``: one file per parameter with its fp32 value and
optimizer moments, independent of the world size) and stores the result beside it:

    <checkpoint>/universal/ds/...   the universal checkpoint
    <checkpoint>/universal/DONE     written last: a conversion cut short is redone

so the conversion runs once per checkpoint, where every rank's shard can be read (the run
storage), and any later worker count reuses it. Every rank then loads its own new partition
from there (DeepSpeed's ``load_universal``). Plain data parallelism (ZeRO stage 0 in fp32) has
no shards: every rank loads the one whole state as usual.

The trainer state (ptm_dist.checkpoint.RankState) of every old rank is read: step and counters
are the same on all of them, the data stream is redistributed (ptm_dist.data.pipeline
.redistribute), and RNG states carry over for ranks that exist on both sides while an added
rank is seeded from (run.seed, step, rank).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import storage
from ptm_dist.checkpoint import RankState
from ptm_dist.dist import broadcast_object
from ptm_dist.errors import CheckpointFormatError

UNIVERSAL = "universal"
DONE = "DONE"
# bf16 runs name them bf16_zero_pp_rank_* (DeepSpeed engine._get_zero_ckpt_prefix)
_ZERO_SHARD = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")
_RANK_STATE = re.compile(r"^rank_\d+\.pt$")


def has_zero_shards(ds_dir: Path) -> bool:
    """Whether a DeepSpeed checkpoint directory holds per-rank optimizer partitions."""
    return any(_ZERO_SHARD.match(p.name) for p in ds_dir.iterdir())


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's ds_to_universal on ``ds_dir``, written to ``out_dir``, in this process (its
    progress output goes to this process's log, not the terminal)."""
    from ptm_dist.engine import skip_muon_import

    skip_muon_import()
    from deepspeed.checkpoint.ds_to_universal import main

    args = argparse.Namespace(
        input_folder=str(ds_dir), output_folder=str(out_dir), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # ptm saves no client state for it: DeepSpeed adds the version marker it checks for
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        main(args)


def convert(ckpt_dir: str) -> bool:
    """Store ``<ckpt_dir>/universal`` unless it is there; False when the checkpoint has no ZeRO
    shards (nothing to convert: every rank loads the whole state)."""
    target = storage.join(ckpt_dir, UNIVERSAL)
    if storage.exists(storage.join(target, DONE)):
        return True
    local, is_tmp = storage.local_copy(ckpt_dir, select=lambda rel: rel.startswith(f"{ckpt_lib.DS_TAG}/"))
    try:
        if not has_zero_shards(local / ckpt_lib.DS_TAG):
            return False
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="ptm-universal-") as out:
            to_universal(local / ckpt_lib.DS_TAG, Path(out) / ckpt_lib.DS_TAG)
            storage.upload_dir(Path(out), target)
        storage.write_text(storage.join(target, DONE), json.dumps({"seconds": round(time.time() - t0, 3)}))
    finally:
        storage.drop_local_copy(local, is_tmp)
    return True


def load_engine(engine, ckpt_dir: str, rank: int) -> float:
    """Load ``ckpt_dir`` (written by another number of workers) into ``engine`` on every rank;
    returns the seconds it took. Rank 0 converts (once per checkpoint) while the others wait."""
    t0 = time.time()
    answer = None
    if rank == 0:
        try:
            answer = {"sharded": convert(ckpt_dir)}
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, not only rank 0
            answer = {"error": f"{type(e).__name__}: {e}"}
    answer = broadcast_object(answer)
    if "error" in answer:
        raise CheckpointFormatError(
            f"{ckpt_dir}: converting it for another number of workers failed: {answer['error']}")
    if answer["sharded"]:
        local, is_tmp = storage.local_copy(ckpt_dir, select=lambda rel: rel.startswith(f"{UNIVERSAL}/"))
        load_dir = local / UNIVERSAL
    else:  # stage 0: the whole state is in the model states file every rank reads
        local, is_tmp = storage.local_copy(ckpt_dir, select=ckpt_lib.rank_files(0))
        load_dir = local
    config = engine._config  # DeepSpeed reads this flag only while loading
    config.load_universal_checkpoint = answer["sharded"]
    try:
        path, _ = engine.load_checkpoint(str(load_dir), tag=ckpt_lib.DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is not None and answer["sharded"] and engine.zero_optimization_stage() == 3:
            _fix_zero3_universal_load(engine, load_dir / ckpt_lib.DS_TAG)
    finally:
        config.load_universal_checkpoint = False
        storage.drop_local_copy(local, is_tmp)
    if path is None:
        raise CheckpointFormatError(f"{ckpt_dir}: DeepSpeed could not load its checkpoint on another number of workers")
    return time.time() - t0


def _fix_zero3_universal_load(engine, universal_ds: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load
    (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), found by tests/unit/test_reshard.py:

    - it copies the first param group's hyperparameters to every group, so the group ptm keeps
      free of weight decay (biases, norms) would decay: each group gets its own saved ones back;
    - it gives every group the same Adam ``step`` tensor, which the optimizer increments in
      place once per group and step, so the second group's bias correction would run ahead:
      each group gets its own copy.
    """
    saved = torch.load(universal_ds / "zero" / "optimizer_state.pt", weights_only=False)
    groups = saved["optimizer_state_dict"]["param_groups"]
    inner = engine.optimizer.optimizer
    if len(groups) != len(inner.param_groups):
        raise CheckpointFormatError(
            f"{universal_ds}: {len(groups)} optimizer param groups saved, the model has {len(inner.param_groups)}")
    for group, old in zip(inner.param_groups, groups):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def rank_states(ckpt_dir: str, world: int) -> list[RankState]:
    """Every old rank's trainer state."""
    local, is_tmp = storage.local_copy(ckpt_dir, select=lambda rel: bool(_RANK_STATE.match(rel)))
    try:
        return [RankState.load(local, r) for r in range(world)]
    finally:
        storage.drop_local_copy(local, is_tmp)


def seed_added_rank(seed: int, step: int, rank: int) -> None:
    """RNG states of a rank the checkpoint has none for: seeded from (seed, step, rank)."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
