"""ptm_dist.report on a sweep directory in `ptm tune`'s layout and on one trial's run directory
(conftest.make_sweep_dir, no run): the PNGs exist, decode, are real pictures, and report.md
links every one of them. Reports on real runs: tests/e2e/test_report.py."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import check_figures, make_sweep_dir

from ptm_dist.report import report


def test_report_on_a_sweep_directory(tmp_path):
    sweep = tmp_path / "sweep-b"
    params = make_sweep_dir(sweep)
    out = Path(report(str(sweep)))
    md = check_figures(out, {"metric_per_trial.png", "eval_loss_per_trial.png", "hp_finetune_lr.png",
                             "hp_finetune_batch_size.png"})
    assert "`t2`: accuracy = 0.81" in md
    rows = [ln for ln in md.splitlines() if re.match(r"\| t\d \|", ln)]
    assert [r.split("|")[1].strip() for r in rows] == ["t2", "t1", "t0", "t3"]  # best first
    assert len(rows) == len(params)
    assert "| metric | accuracy (max) |" in md and "| scheduler | asha |" in md


def test_report_on_a_finetuning_run_directory(tmp_path):
    """A fine-tuning run (or one trial) directory: one metrics line per epoch."""
    make_sweep_dir(tmp_path / "sweep-c")
    out = Path(report(str(tmp_path / "sweep-c" / "trials" / "t2")))
    md = check_figures(out, {"loss.png", "eval_metrics.png", "lr.png"})
    assert "| epochs | 3 |" in md and "| accuracy (last epoch) | 0.8100 |" in md
