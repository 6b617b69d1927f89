"""A run that changes its number of workers: 2 workers, then 1, then 2 again (ZeRO-3 on Ray,
CPU), keeping the global batch and consuming every sequence of each epoch exactly once across
both changes. The resharding itself is checked against the writing run's state in
tests/unit/test_reshard.py, the redistribution of the data stream in
tests/unit/test_data_pipeline.py."""

from __future__ import annotations

import math

import pytest
from conftest import debug_job, read_lines
from data_helpers import _shards, plan_epoch_ids

from ptm_dist import checkpoint as ck
from ptm_dist.data.idlog import read_sequence_log
from ptm_dist.errors import ConfigError
from ptm_dist.train.pretrain import pretrain


def test_two_workers_then_one_then_two_keep_the_global_batch_and_each_sequence_once(tmp_path, ray_session):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _shards(corpus)
    common = [f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.2", "data.shuffle_window=8",
              "data.seq_len=16", "data.piece_bytes=2000", "zero.stage=3", "train.ckpt_every=100",
              "train.eval_every=100", "train.keep_ckpts=5", "data.log_sequence_ids=true", "tracking.wandb=disabled",
              "run.name=elastic"]

    def job(workers: int, steps: int, *more: str):
        return debug_job(tmp_path, *common, f"scaling.num_workers={workers}", f"train.max_steps={steps}", *more)

    run_dir = pretrain(job(2, 10))
    # 3 workers x micro batch 4 cannot make the global batch of 8: refused before Ray starts
    with pytest.raises(ConfigError) as err:
        pretrain(job(3, 25, "scaling.resources_per_worker={CPU: 0.5}"))
    print("3 workers:", err.value)
    assert "global batch of 8 sequences per step (2 workers)" in str(err.value)
    assert "use scaling.num_workers in [1, 2]" in str(err.value) and "\n" not in str(err.value)
    pretrain(job(1, 25))
    pretrain(job(2, 60))

    lines = read_lines(run_dir)
    resizes = [(m["step"], m["resize_from_workers"], m["workers"], m["grad_accum"]) for m in lines
               if "resize_from_workers" in m]
    assert resizes == [(10, 2, 1, 2), (25, 1, 2, 1)]
    meta = ck.read_meta(f"{run_dir}/checkpoint_00000060")
    assert meta["world_size"] == 2 and meta["batch"] == {"global": 8, "given": [4, 1]}
    assert [(r["step"], r["from"], r["to"]) for r in meta["resizes"]] == [(10, 2, 1), (25, 1, 2)]
    for step in (10, 25):  # converted once each, beside the checkpoint
        assert (tmp_path / "elastic" / ck.checkpoint_name(step) / "universal" / "DONE").exists(), step
    losses = {m["step"]: m["loss"] for m in lines if "loss" in m}
    assert sorted(losses) == list(range(1, 61)) and all(math.isfinite(v) for v in losses.values())
    assert max(losses[s] for s in range(11, 16)) < losses[1] and max(losses[s] for s in range(26, 31)) < losses[1]
    print("losses at steps 1, 10, 11, 25, 26, 60:", [round(losses[s], 3) for s in (1, 10, 11, 25, 26, 60)])

    seqs = read_sequence_log(run_dir)
    per_step: dict[int, int] = {}
    for rank, rank_lines in seqs.items():
        steps = [ln["step"] for ln in rank_lines]
        assert steps == (list(range(1, 61)) if rank == 0 else [*range(1, 11), *range(26, 61)]), rank
        for ln in rank_lines:
            per_step[ln["step"]] = per_step.get(ln["step"], 0) + len(ln["seqs"])
    assert set(per_step.values()) == {8}  # the global batch, on 2, 1 and 2 workers
    consumed = [tuple(x) for rank_lines in seqs.values() for ln in rank_lines for x in ln["seqs"]]
    expected = plan_epoch_ids(job(1, 60))
    for epoch, ids in expected.items():
        got = sorted(i for e, i in consumed if e == epoch)
        print(f"epoch {epoch}: {len(got)} consumed, {len(set(got))} distinct, {len(ids)} in the epoch")
        assert got == ids
