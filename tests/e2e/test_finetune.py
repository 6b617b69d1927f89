"""Fine-tuning: a fine-tuning run on real Ray Train workers with real DeepSpeed (gloo, CPU)
starting from a ptm pretraining run. Task files and the built-in task: tests/unit/test_task.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import debug_job
from ft_helpers import make_start, plain_transformers_accuracy

METRIC_KEYS = {"epoch", "step", "loss", "eval_loss", "accuracy", "precision_macro", "recall_macro", "f1_macro", "lr"}


def test_finetune_from_pretraining_run(tmp_path_factory, tmp_path, ray_session, capsys):
    """finetune.init empty: the job's own pretraining run is trained first, exported, then
    fine-tuned by 2 Ray Train workers with DeepSpeed ZeRO-2; re-running resumes (no new epochs)."""
    from ptm_dist.finetune.run import finetune
    from ptm_dist.tracking import read_metrics

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    cfg = debug_job(
        tmp_path, "run.name=pre", "train.max_steps=4", "train.eval_every=4", "train.ckpt_every=4",
        f"finetune.data={start['train']}", f"finetune.val_data={start['val']}", "finetune.max_length=32",
        "finetune.batch_size=8", "finetune.epochs=2", "finetune.lr=0.005", "scaling.num_workers=2", "zero.stage=2",
    )
    run_dir = finetune(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"run_dir: {run_dir}"
    assert any("pretraining it first" in ln for ln in out)
    assert (tmp_path / "pre" / "COMPLETE").exists() or list((tmp_path / "pre").glob("checkpoint_*/COMPLETE"))
    lines = read_metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert METRIC_KEYS <= set(m), set(m)
        assert 0.0 <= m["accuracy"] <= 1.0 and m["eval_loss"] > 0
    best_line = max(lines, key=lambda m: m["accuracy"])
    best = Path(run_dir) / "best"
    config = json.loads((best / "config.json").read_text())
    train_labels = {json.loads(ln)["label"] for ln in start["train"].read_text().splitlines()}
    assert set(config["id2label"].values()) == train_labels
    acc = plain_transformers_accuracy(best, start["val"], max_length=32)
    assert abs(acc - best_line["accuracy"]) <= 0.005, (acc, best_line["accuracy"])
    before = (Path(run_dir) / "metrics.jsonl").read_text()
    weights = (best / "model.safetensors").stat().st_mtime_ns
    finetune(cfg)  # the same command again: Ray Train restores the last epoch's checkpoint
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    assert (Path(run_dir) / "metrics.jsonl").read_text() == before
    assert (best / "model.safetensors").stat().st_mtime_ns == weights  # no epoch was trained again
