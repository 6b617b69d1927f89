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


def test_report_plots_downstream_task_scores_against_tokens(tmp_path):
    """A pretraining run's metrics with train.eval_tasks lines (eval/<task>/<metric>, as the
    loop writes them at steps 0, 10 and 20): a figure of the scores and their first and last
    values in the table."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(0, 21, 5):
        if step:
            lines.append({"step": step, "loss": 5 - step / 10, "lr": 1e-3, "grad_norm": 1.0 + step / 20,
                          "tokens_per_s": 1000.0 + step, "data_wait_frac": 0.01, "tokens": step * 512, "epoch": 0})
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": 5.2 - step / 10, "tokens": step * 512})
            lines.append({"step": step, "tokens": step * 512, "eval/ptm_builtin_word_order/acc": 0.25 + step / 100,
                          "eval/ptm_builtin_word_order/acc_norm": 0.24 + step / 90, "eval_tasks_s": 3.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    md = check_figures(Path(report(str(run))), {"loss.png", "eval_tasks.png", "throughput.png"})
    assert "| ptm_builtin_word_order/acc, step 0 -> 20 | 0.2500 -> 0.4500 |" in md
    assert "### Downstream task scores against tokens seen" in md
