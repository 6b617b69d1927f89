"""Commit markers, resume selection and retention (on plain directories)."""

from __future__ import annotations

from pathlib import Path

from ptm_dist import checkpoint as ck


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
