"""ptm_dist.bench_ckpt without running it: arguments refused before anything starts, and the
table it prints. The benchmark itself (three runs into a moto S3 server) is measured with
`ptm bench ckpt`; its figures are in README's Fault tolerance section."""

from __future__ import annotations

import pytest

from ptm_dist.bench_ckpt import MODES, bench_ckpt, format_ckpt_report
from ptm_dist.config import load
from ptm_dist.errors import ConfigError


def test_a_bench_without_checkpoints_inside_the_run_or_on_a_local_path_is_refused():
    cfg = load(None, ["train.max_steps=20"])
    with pytest.raises(ConfigError, match=r"--every 20 leaves no checkpoint inside a run of train.max_steps=20"):
        bench_ckpt(cfg, "s3://b/p", every=20)
    with pytest.raises(ConfigError, match=r"--storage /tmp/x: an object-storage URI is needed"):
        bench_ckpt(cfg, "/tmp/x", every=5)


def test_the_table_has_a_row_per_upload_mode_and_the_ratio():
    def run(mode, wall, pauses, uploads):
        n = len(pauses)
        return {"mode": mode, "train_wall_s": wall, "checkpoints_inside": n, "checkpoint_bytes": 3 << 20,
                "pause_s": pauses, "upload_s": uploads, "lost_per_checkpoint_s": (wall - 10.0) / n if n else None,
                "mean_pause_s": sum(pauses) / n if n else None,
                "mean_upload_s": sum(uploads) / n if uploads else None}

    r = {"job": {"model": "gpt2-tiny", "steps": 40, "every": 10, "workers": 2, "zero_stage": 2},
         "storage": "moto S3 server on localhost", "checkpoint_bytes": 3 << 20,
         "runs": {"none": run("none", 10.0, [], []), "foreground": run("foreground", 16.0, [2.0] * 3, []),
                  "background": run("background", 11.5, [0.3] * 3, [1.5] * 3)},
         "background_over_foreground": 0.25}
    lines = format_ckpt_report(r).splitlines()
    assert lines[0].startswith("checkpoint cost: gpt2-tiny, 2 workers, ZeRO-2, 40 steps, a checkpoint every 10")
    assert "3.0 MiB per checkpoint" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert list(rows) == list(MODES)
    assert rows["none"][1:] == ["0", "10.00", "s", "-", "-", "-"]
    assert rows["foreground"][1:] == ["3", "16.00", "s", "2.00", "s", "2.00", "s", "-"]
    assert rows["background"][1:] == ["3", "11.50", "s", "0.50", "s", "0.30", "s", "1.50", "s"]
    assert lines[5] == "background / foreground, time lost per checkpoint: 0.25"
