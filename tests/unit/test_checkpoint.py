"""ptm_dist.checkpoint on plain directories: commit markers, resume selection, retention, the
versioned format (marker "format", per-rank RankState) and the run identity check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ptm_dist import checkpoint as ck
from ptm_dist.config import load
from ptm_dist.errors import CheckpointFormatError, ConfigError, user_message


def make(run, step, complete=True):
    d = run / ck.checkpoint_name(step)
    (d / "ds").mkdir(parents=True)
    (d / "ds" / "x.pt").write_text("x")
    if complete:
        ck.mark_complete(str(d), {"step": step})
    return d


def test_latest_complete_skips_partial_newer_ones(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    assert ck.latest_complete_checkpoint(str(tmp_path)).endswith("checkpoint_00000020")


def test_no_checkpoint(tmp_path):
    make(tmp_path, 10, complete=False)
    assert ck.latest_complete_checkpoint(str(tmp_path)) is None
    assert ck.latest_complete_checkpoint(str(tmp_path / "missing")) is None


def test_retention_keeps_newest_complete_and_drops_stale_partials(tmp_path):
    for s in (10, 20, 30):
        make(tmp_path, s)
    make(tmp_path, 25, complete=False)
    make(tmp_path, 40, complete=False)  # a save in progress: newer than the newest complete
    gone = ck.apply_retention(str(tmp_path), keep=1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_00000030", "checkpoint_00000040"]
    assert len(gone) == 3


def test_retention_never_deletes_the_only_complete_checkpoint(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20, complete=False)
    ck.apply_retention(str(tmp_path), keep=1)
    assert ck.latest_complete_checkpoint(str(tmp_path)).endswith("checkpoint_00000010")


def test_discard_after_removes_newer_partials(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20, complete=False)
    ck.discard_after(str(tmp_path), 10)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_00000010"]


def test_resolve_source_accepts_run_or_checkpoint(tmp_path):
    make(tmp_path, 10)
    d = make(tmp_path, 20)
    assert ck.resolve_source(str(tmp_path)) == str(d)
    assert ck.resolve_source(str(d)) == str(d)


def test_retention_never_deletes_the_only_complete_checkpoint_when_saves_fail(tmp_path):
    """checkpoint.py level: keep=1 with failed (partial) saves after the only complete one."""
    def make(step, complete):
        d = tmp_path / ck.checkpoint_name(step)
        (d / "ds").mkdir(parents=True)
        (d / "ds" / "x.pt").write_text("x")
        if complete:
            ck.mark_complete(str(d), {"step": step})

    make(2, True)
    for step in (4, 6):
        make(step, False)
        gone = ck.apply_retention(str(tmp_path), keep=1)
        assert gone == []
    make(8, True)
    gone = ck.apply_retention(str(tmp_path), keep=1)
    left = [s for s, _, ok in ck.list_checkpoints(str(tmp_path)) if ok]
    print("retention after failed saves 4, 6 and a complete 8: deleted", [Path(g).name for g in gone],
          "complete left", left)
    assert left == [8] and sorted(Path(g).name for g in gone) == [
        "checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000006"]


# ---------------------------------------------------------------- the versioned format


def test_mark_complete_writes_the_format_version(tmp_path):
    d = make(tmp_path, 10)
    marker = json.loads((d / ck.MARKER).read_text())
    assert marker == {"step": 10, "format": ck.FORMAT_VERSION}
    assert ck.read_meta(str(d)) == marker
    assert not (d / f"{ck.MARKER}.tmp").exists()  # written atomically


def test_a_marker_without_format_reads_as_format_1(tmp_path):
    d = make(tmp_path, 10, complete=False)
    (d / ck.MARKER).write_text(json.dumps({"step": 10, "tokens_seen": 640}))  # written before "format" existed
    assert ck.read_meta(str(d)) == {"step": 10, "tokens_seen": 640, "format": 1}


@pytest.mark.parametrize("version", [99, "2", None])
def test_a_newer_or_unknown_format_is_refused_naming_the_directory(tmp_path, version):
    d = make(tmp_path, 10, complete=False)
    (d / ck.MARKER).write_text(json.dumps({"step": 10, "format": version}))
    with pytest.raises(CheckpointFormatError) as e:
        ck.read_meta(str(d))
    msg = str(e.value)
    assert msg.startswith(f"{d}: checkpoint format {version!r} ") and f"up to {ck.FORMAT_VERSION}" in msg
    assert "\n" not in msg and user_message(e.value) == msg


def test_rank_state_round_trip_keeps_unknown_keys_in_extra(tmp_path):
    state = ck.RankState(step=12, tokens_seen=1536, data={"epoch": 1, "last_id": 77, "consumed": 40},
                         rng={"python": [3, 1, 4], "torch": torch.arange(5)}, nonfinite_skipped=2,
                         spikes={"mean": 3.5, "seen": 12, "high": 0, "count": 1})
    state.save(tmp_path, rank=1)
    assert (tmp_path / "rank_1.pt").exists() and not (tmp_path / "rank_0.pt").exists()
    back = ck.RankState.load(tmp_path, rank=1)
    assert (back.step, back.tokens_seen, back.data, back.nonfinite_skipped, back.spikes, back.extra) == (
        12, 1536, state.data, 2, state.spikes, {})
    assert back.rng["python"] == [3, 1, 4] and torch.equal(back.rng["torch"], torch.arange(5))
    # a later format's file: unknown fields (top level or already under extra) land in .extra
    raw = torch.load(tmp_path / "rank_1.pt", weights_only=False)
    torch.save({**raw, "new_field": [1, 2], "extra": {"older_extra": "x"}}, tmp_path / "rank_0.pt")
    later = ck.RankState.load(tmp_path, rank=0)
    assert later.extra == {"new_field": [1, 2], "older_extra": "x"} and later.step == 12
    # an older file without the optional fields gets their defaults
    torch.save({k: raw[k] for k in ("step", "tokens_seen", "data", "rng")}, tmp_path / "rank_2.pt")
    old = ck.RankState.load(tmp_path, rank=2)
    assert (old.nonfinite_skipped, old.spikes, old.extra) == (0, None, {})


def test_rank_state_missing_or_not_ours_is_a_format_error(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"rank_3.pt: missing; the checkpoint holds no state for rank 3"):
        ck.RankState.load(tmp_path, rank=3)
    torch.save({"step": 1, "rng": {}}, tmp_path / "rank_0.pt")
    with pytest.raises(CheckpointFormatError, match=r"rank_0.pt: not a ptm rank state \(no tokens_seen, data\)"):
        ck.RankState.load(tmp_path, rank=0)


def test_check_same_run_refuses_a_changed_identity_key(tmp_path):
    job = load(None, ["data.seq_len=32"]).to_dict()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    make(tmp_path, 10)
    ck.check_same_run(str(tmp_path), job)  # the same job resumes
    ck.check_same_run(str(tmp_path), {**job, "train": {**job["train"], "lr": 1.0}})  # not an identity key
    changed = load(None, ["data.seq_len=64"]).to_dict()
    with pytest.raises(ConfigError) as e:
        ck.check_same_run(str(tmp_path), changed)
    msg = str(e.value)
    assert f"{tmp_path} holds a run with a different data.seq_len (data.seq_len: 32 -> 64)" in msg
    assert "run.resume=false" in msg
    stage = load(None, ["data.seq_len=32", "zero.stage=3"]).to_dict()
    with pytest.raises(ConfigError, match=r"different zero.stage \(zero.stage: 2 -> 3\)"):
        ck.check_same_run(str(tmp_path), stage)


def test_check_same_run_lets_a_run_without_a_complete_checkpoint_start_over(tmp_path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(load(None, ["data.seq_len=32"]).to_dict()))
    make(tmp_path, 10, complete=False)
    ck.check_same_run(str(tmp_path), load(None, ["data.seq_len=64"]).to_dict())


def test_the_piece_size_is_part_of_the_identity_and_a_run_from_before_pieces_read_whole_shards(tmp_path):
    job = load(None, []).to_dict()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    make(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"data.piece_bytes: 33554432 -> 1048576"):
        ck.check_same_run(str(tmp_path), load(None, ["data.piece_bytes=1048576"]).to_dict())
    old = {**job, "data": {k: v for k, v in job["data"].items() if k != "piece_bytes"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(old))  # written before data.piece_bytes existed
    with pytest.raises(ConfigError, match=r"data.piece_bytes: 0 -> 33554432.*piece_bytes=0 resumes it"):
        ck.check_same_run(str(tmp_path), job)
    ck.check_same_run(str(tmp_path), load(None, ["data.piece_bytes=0"]).to_dict())


def test_check_resume_refuses_a_new_schedule_and_other_data_unless_allowed(tmp_path):
    job = load(None, ["train.max_steps=100"]).to_dict()
    data = {"tokenizer_sha256": "a" * 64, "shards_sha256": "b" * 64, "shards": 3, "vocab_size": 512}
    d = tmp_path / ck.checkpoint_name(50)
    d.mkdir()
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    ck.mark_complete(str(d), {"step": 50, "data": data, "lr_schedule_end": 100})
    assert ck.check_resume(str(d), job, data, allow_data_change=False) is False
    # The end may move (the saved schedule is extended), not to before the checkpoint's step,
    # and no other schedule key may change.
    assert ck.check_resume(str(d), load(None, ["train.max_steps=200"]).to_dict(), data, False) is False
    with pytest.raises(ConfigError, match=r"is at step 50, beyond train.max_steps=40"):
        ck.check_resume(str(d), load(None, ["train.max_steps=40"]).to_dict(), data, False)
    with pytest.raises(ConfigError, match=r"schedule \(train.lr: 0.003 -> 0.001\)"):
        ck.check_resume(str(d), load(None, ["train.max_steps=100", "train.lr=1e-3"]).to_dict(), data, False)
    shards = {**data, "shards_sha256": "c" * 64, "shards": 4}
    with pytest.raises(ConfigError, match=r"the training shard list \(3 shards, sha256 bbbbbbbbbbbb -> 4 shards"):
        ck.check_resume(str(d), job, shards, False)
    assert ck.check_resume(str(d), job, shards, allow_data_change=True) is True
    tok = {**data, "tokenizer_sha256": "d" * 64}
    with pytest.raises(ConfigError, match=r"other data: the tokenizer \(sha256 aaaaaaaaaaaa -> dddddddddddd"):
        ck.check_resume(str(d), job, tok, False)
    with pytest.raises(ConfigError, match="tokenizer of 512 tokens, this job's has 400"):
        ck.check_resume(str(d), job, {**tok, "vocab_size": 400}, allow_data_change=True)
    ck.mark_complete(str(d), {"step": 50})  # written before the data and schedule were recorded
    assert ck.check_resume(str(d), job, tok, False) is False  # data not checked
    with pytest.raises(ConfigError, match=r"train.max_steps: 100 -> 200"):  # its schedule is not saved
        ck.check_resume(str(d), load(None, ["train.max_steps=200"]).to_dict(), data, False)


def test_check_resume_refuses_another_schedule_kind_or_its_decay_and_reads_old_jobs_as_cosine(tmp_path):
    """train.schedule may not change on resume, nor the key that shapes the kind's decay
    (decay_fraction for wsd, cooldown_steps for constant): the checkpoint's saved schedule
    would otherwise jump or silently keep the old value. Another kind's key may change. A job
    written before train.schedule existed was cosine."""
    data = {"tokenizer_sha256": "a" * 64, "shards_sha256": "b" * 64, "shards": 3, "vocab_size": 512}

    def checkpoint(job: dict):
        d = tmp_path / ck.checkpoint_name(50)
        d.mkdir(exist_ok=True)
        (d / "job.yaml").write_text(yaml.safe_dump(job))
        ck.mark_complete(str(d), {"step": 50, "data": data, "lr_schedule_end": 100})
        return str(d)

    def resume(d: str, *sets: str):
        return ck.check_resume(d, load(None, ["train.max_steps=100", *sets]).to_dict(), data, False)

    wsd = checkpoint(load(None, ["train.max_steps=100", "train.schedule=wsd"]).to_dict())
    assert resume(wsd, "train.schedule=wsd", "train.max_steps=300") is False  # extending is fine
    with pytest.raises(ConfigError) as e:
        resume(wsd)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "schedule (train.schedule: 'wsd' -> 'cosine')" in msg, msg
    with pytest.raises(ConfigError, match=r"\(train.decay_fraction: 0.2 -> 0.1\)"):
        resume(wsd, "train.schedule=wsd", "train.decay_fraction=0.1")
    constant = checkpoint(load(None, ["train.max_steps=100", "train.schedule=constant",
                                      "train.cooldown_steps=10"]).to_dict())
    with pytest.raises(ConfigError, match=r"\(train.cooldown_steps: 10 -> 0\)"):
        resume(constant, "train.schedule=constant")
    assert resume(constant, "train.schedule=constant", "train.cooldown_steps=10", "train.decay_fraction=0.5") is False
    cosine = checkpoint(load(None, ["train.max_steps=100"]).to_dict())
    assert resume(cosine, "train.decay_fraction=0.5") is False  # not a key of the cosine schedule
    old = load(None, ["train.max_steps=100"]).to_dict()
    for key in ("schedule", "decay_fraction", "cooldown_steps"):
        del old["train"][key]
    before = checkpoint(old)
    assert resume(before) is False
    with pytest.raises(ConfigError, match=r"\(train.schedule: 'cosine' -> 'constant'\)"):
        resume(before, "train.schedule=constant")


def test_the_number_of_workers_may_change_and_the_global_batch_is_kept(tmp_path):
    """scaling.num_workers is not part of the identity; resume_batch keeps the checkpoint's
    global batch (micro 4 x 2 workers x grad_accum 3 = 24) by choosing grad_accum, refuses worker
    counts that cannot keep it with one line naming those that can, and lets a job that changes
    its own batch settings have them."""
    job = load(None, ["train.micro_batch=4", "train.grad_accum=3", "scaling.num_workers=2"]).to_dict()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    d = make(tmp_path, 10, complete=False)
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    ck.mark_complete(str(d), {"step": 10, "world_size": 2})  # no "batch": written before it was recorded
    ck.check_same_run(str(tmp_path), {**job, "scaling": {**job["scaling"], "num_workers": 3}})
    assert ck.resume_batch(str(d), job, 2) == (3, None)
    accum, line = ck.resume_batch(str(d), job, 1)
    assert accum == 6 and line == ("[ptm] 2 -> 1 workers: train.grad_accum 3 -> 6 keeps the global batch of 24 "
                                   "sequences per step (train.micro_batch 4 x 1 x 6)")
    assert ck.resume_batch(str(d), job, 6) == (1, line.replace("2 -> 1", "2 -> 6").replace("3 -> 6", "3 -> 1")
                                               .replace("4 x 1 x 6", "4 x 6 x 1"))
    with pytest.raises(ConfigError) as e:
        ck.resume_batch(str(d), job, 4)
    assert str(e.value) == (
        f"{d} was trained with a global batch of 24 sequences per step (2 workers); 4 workers x "
        "train.micro_batch 4 cannot keep it (grad_accum would be 1.5): use scaling.num_workers in [1, 2, 3, 6], "
        "or a train.micro_batch that makes micro_batch x 4 divide 24")
    # after a resize: the marker's batch wins over the job.yaml written with the adjusted grad_accum
    resized = {**job, "train": {**job["train"], "grad_accum": 6}}
    (d / "job.yaml").write_text(yaml.safe_dump(resized))
    ck.mark_complete(str(d), {"step": 10, "world_size": 1, "batch": {"global": 24, "given": [4, 3]}})
    kept = ("[ptm] on 1 workers (as resized): train.grad_accum 3 -> 6 keeps the global batch of 24 sequences per "
            "step (train.micro_batch 4 x 1 x 6)")
    assert ck.resume_batch(str(d), job, 1) == (6, kept)
    assert ck.resume_batch(str(d), job, 2)[0] == 3
    # a job that changes its batch settings runs with them, and says the global batch changes
    own = {**job, "train": {**job["train"], "grad_accum": 1}}
    changes = ("[ptm] the global batch changes at step 10: 24 -> 8 sequences per step (train.micro_batch 4 x 2 "
               "workers x train.grad_accum 1)")
    assert ck.resume_batch(str(d), own, 2) == (1, changes)


def test_an_elastic_range_keeps_one_global_batch_on_every_size_or_says_what_to_set(tmp_path):
    """scaling.num_workers [MIN, MAX]: the job's batch is defined at MAX workers and every size of
    the range must keep it with a whole grad_accum; refused when the job is loaded (naming the
    sizes and the grad_accum that works), and on resume against the checkpoint's global batch.
    Each worker group's spec then carries the grad_accum for its size."""
    from ptm_dist.train.spec import PretrainSpec

    with pytest.raises(ConfigError) as e:
        load(None, ["train.micro_batch=4", "scaling.num_workers=[2, 3]"])
    assert str(e.value).endswith(
        "scaling.num_workers [2, 3]: the global batch of 12 sequences per step (train.micro_batch 4 x 3 workers x "
        "grad_accum 1) cannot be kept on 2 workers (grad_accum would not be whole): use train.grad_accum a "
        "multiple of 2, or a range without those counts") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"on 3 workers .* a multiple of 3"):
        load(None, ["train.micro_batch=4", "scaling.num_workers=[1, 4]"])
    cfg = load(None, ["train.micro_batch=4", "train.grad_accum=2", "scaling.num_workers=[2, 3]"])
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers, cfg.scaling.elastic) == (2, 3, True)
    assert load(None, ["scaling.num_workers=[2, 2]"]).scaling.num_workers == 2  # one size: not elastic
    job = cfg.to_dict()
    assert job["scaling"]["num_workers"] == [2, 3]
    assert ck.elastic_batch(None, job, 2, 3) == (24, None)

    spec = PretrainSpec(job=cfg, run_dir=str(tmp_path), data=None, batch_given=(4, 2), global_batch=24)
    assert spec.for_world(3) is spec
    assert spec.for_world(2).job.train.grad_accum == 3 and cfg.train.grad_accum == 2
    with pytest.raises(ConfigError, match="5 workers x train.micro_batch 4 cannot keep the global batch of 24"):
        spec.for_world(5)

    # a checkpoint written on 2 workers of the range (grad_accum 3): its global batch is kept
    d = make(tmp_path, 10, complete=False)
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    ck.mark_complete(str(d), {"step": 10, "world_size": 2, "batch": {"global": 24, "given": [4, 2]}})
    assert ck.elastic_batch(str(d), job, 2, 3) == (24, None)
    assert ck.elastic_batch(str(d), job, 1, 3) == (24, None)  # 24 / 4 = 6 divides by 1, 2 and 3 workers
    with pytest.raises(ConfigError) as e:
        ck.elastic_batch(str(d), job, 4, 5)
    assert str(e.value) == (
        "scaling.num_workers [4, 5]: the global batch of 24 sequences per step (train.micro_batch 4 x 5 workers x "
        "grad_accum 1.2) cannot be kept on 4, 5 workers (grad_accum would not be whole): use a range whose every "
        "worker count divides 6 (the checkpoint's 24 sequences per step / train.micro_batch 4)")
    # a job that changes its own batch runs with it (defined at MAX), and says so
    own = {**job, "train": {**job["train"], "grad_accum": 4}}
    assert ck.elastic_batch(str(d), own, 2, 3) == (48, ("[ptm] the global batch changes at step 10: 24 -> 48 "
                                                   "sequences per step (train.micro_batch 4 x 3 workers x "
                                                   "train.grad_accum 4)"))


def test_only_pretraining_takes_a_range_of_workers():
    cfg = load(None, ["train.grad_accum=2", "scaling.num_workers=[2, 3]"])
    with pytest.raises(ConfigError) as e:
        cfg.scaling.fixed_workers("ptm finetune")
    assert str(e.value) == ("scaling.num_workers [2, 3]: ptm finetune runs on a fixed number of workers, not a "
                            "range (only ptm pretrain is elastic); set one number, e.g. --set scaling.num_workers=3")
    for bad in ("[3, 2]", "[0, 2]", "[1, 2, 3]", "0", "two"):
        with pytest.raises(ConfigError, match="scaling.num_workers") as e:
            load(None, [f"scaling.num_workers={bad}"])
        assert "\n" not in str(e.value), bad
