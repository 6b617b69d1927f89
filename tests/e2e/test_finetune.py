"""Fine-tuning: runs on real Ray Train workers with real DeepSpeed (gloo, CPU): sequence
classification starting from a ptm pretraining run, token classification at ZeRO-3. Task files
and the built-in tasks: tests/unit/test_task.py and test_tagging.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import debug_job
from ft_helpers import make_start, plain_transformers_accuracy, plain_transformers_tagging

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


def test_token_classification_on_two_workers_at_zero3(tmp_path_factory, tmp_path, ray_session, capsys, cache_dir):
    """The built-in tagging task on 2 Ray Train workers at ZeRO-3: each rank scores its share of
    the validation rows and rank 0 gathers them; the exported best/ is an
    AutoModelForTokenClassification that plain transformers scores the same, row by row."""
    from ptm_dist.finetune.run import finetune
    from ptm_dist.finetune.tagging import ensure_builtin_tagging
    from ptm_dist.tracking import read_metrics

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    cfg = debug_job(
        tmp_path, f"data.cache_dir={cache_dir}", f"finetune.init={start['model']}",
        "finetune.task=token_classification", "finetune.max_length=48", "finetune.batch_size=16",
        "finetune.epochs=2", "finetune.lr=0.005", "tune.metric=f1", "scaling.num_workers=2", "zero.stage=3",
    )
    run_dir = finetune(cfg)
    out = capsys.readouterr().out
    assert "majority-tag baseline: word accuracy" in out and "accuracy       f1" in out, out[-2000:]
    lines = read_metrics(run_dir)
    assert [m["epoch"] for m in lines] == [1, 2]
    best_line = max(lines, key=lambda m: m["f1"])
    info = json.loads((Path(run_dir) / "task.json").read_text())
    assert info["task"] == "token_classification" and info["majority_label"] == "O"
    assert best_line["accuracy"] > info["majority_baseline"] and best_line["f1"] > 0.2, (best_line, info)
    val_rows = [json.loads(ln) for ln in (ensure_builtin_tagging(cache_dir) / "val.jsonl").read_text().splitlines()]
    acc, found, n_gold = plain_transformers_tagging(Path(run_dir) / "best", val_rows, max_length=48)
    assert acc == pytest.approx(best_line["accuracy"], abs=1e-9)
    assert found / n_gold == pytest.approx(best_line["recall"], abs=1e-9)
