"""Sweeps: a sweep end to end (real Ray Tune, ASHA, real DeepSpeed in every trial), a sweep
killed mid-way and resumed with the same command, multi-worker trials queueing, and the
pretrain-then-sweep pipeline. Search-space parsing and its errors: tests/unit/test_space.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import debug_job
from ft_helpers import make_start, plain_transformers_accuracy, start_overrides

REPO = Path(__file__).resolve().parents[2]


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_end_to_end(tmp_path_factory, tmp_path, ray_session, capsys):
    """4 trials (a grid over lr, 2 samples of batch size each), ASHA, 3 epochs, 2 at a time."""
    from ptm_dist.finetune.sweep import tune

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    cfg = debug_job(tmp_path, *start_overrides(start, tmp_path), "finetune.epochs=3",
                    "tune.space={finetune.lr: {grid: [0.0003, 0.01]}, finetune.batch_size: {choice: [8, 16]}}",
                    "tune.num_samples=2", "tune.max_concurrent=2")
    sweep_dir = Path(tune(cfg))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"sweep_dir: {sweep_dir}"
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert {k: sweep[k] for k in ("metric", "mode", "scheduler", "search", "num_samples")} == {
        "metric": "accuracy", "mode": "max", "scheduler": "asha", "search": "random", "num_samples": 2}
    rows = _csv(sweep_dir / "trials.csv")
    assert list(rows[0]) == ["trial_id", "status", "epochs", "accuracy", "finetune.lr", "finetune.batch_size"]
    assert sorted(float(r["finetune.lr"]) for r in rows) == [0.0003, 0.0003, 0.01, 0.01]
    for r in rows:
        trial = sweep_dir / "trials" / r["trial_id"]
        epochs = [json.loads(ln) for ln in (trial / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in epochs] == list(range(1, int(r["epochs"]) + 1))
        assert r["status"] == ("done" if int(r["epochs"]) == 3 else "stopped early")
        assert float(r["accuracy"]) == max(e["accuracy"] for e in epochs)
        assert json.loads((trial / "params.json").read_text()) == {
            "finetune.batch_size": int(r["finetune.batch_size"]), "finetune.lr": float(r["finetune.lr"])}
    assert any(ln.startswith("trials: 4; epochs run: ") for ln in out)
    best = json.loads((sweep_dir / "best.json").read_text())
    top = max(rows, key=lambda r: float(r["accuracy"]))
    assert best["metric"] == "accuracy" and best["value"] == float(top["accuracy"])
    assert best["config"] == {"finetune.lr": float(top["finetune.lr"]),
                              "finetune.batch_size": int(top["finetune.batch_size"])}
    acc = plain_transformers_accuracy(sweep_dir / "best", start["val"])
    assert abs(acc - best["value"]) <= 0.005, (acc, best["value"])


def _trial_epochs(sweep_dir: Path) -> dict[str, int]:
    out = {}
    for m in (sweep_dir / "trials").glob("*/metrics.jsonl"):
        out[m.parent.name] = len([ln for ln in m.read_text().splitlines() if ln.strip()])
    return out


def test_sweep_killed_and_resumed(tmp_path_factory, tmp_path, cache_dir):
    """`ptm tune` is killed (SIGKILL, whole process group) after one trial finished and another
    has started; the same command resumes: finished trials are not run again, the interrupted
    trial continues from its last epoch checkpoint, and the sweep completes."""
    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    sets = [*start_overrides(start, tmp_path), "finetune.epochs=3", "tune.scheduler=fifo", "tune.num_samples=3",
            "tune.max_concurrent=1", "tune.space={finetune.lr: {loguniform: [0.001, 0.01]}}"]
    cmd = [sys.executable, "-m", "ptm_dist.cli", "tune", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PTM_DIST_CACHE": str(cache_dir), "PYTHONPATH": str(REPO)}
    sweep_dir = tmp_path / "tune"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            counts = sorted(_trial_epochs(sweep_dir).values()) if sweep_dir.exists() else []
            if len(counts) >= 2 and counts[-1] == 3 and 1 <= counts[0] < 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _trial_epochs(sweep_dir)
    done = [t for t, n in before.items() if n == 3]
    finished_mtime = {t: (sweep_dir / "trials" / t / "best" / "model.safetensors").stat().st_mtime_ns for t in done}
    second = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    lines = second.stdout.strip().splitlines()
    assert lines[-1] == f"sweep_dir: {sweep_dir}"
    text = second.stdout + second.stderr
    assert "resuming the sweep" in text
    assert "resumed after epoch" in text  # the interrupted trial continued from its checkpoint
    after = _trial_epochs(sweep_dir)
    assert len(after) == 3 and set(after.values()) == {3}, after
    for t in done:  # finished before the kill: not trained again
        assert (sweep_dir / "trials" / t / "best" / "model.safetensors").stat().st_mtime_ns == finished_mtime[t]
    for t in after:
        lines = (sweep_dir / "trials" / t / "metrics.jsonl").read_text().splitlines()
        epochs = [json.loads(ln)["epoch"] for ln in lines]
        assert epochs == [1, 2, 3]
    rows = _csv(sweep_dir / "trials.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}


def test_multiworker_trials_queue(tmp_path_factory, tmp_path, ray_session, capsys):
    """Trials that are 2-worker Ray Train jobs, one at a time: every trial after the first
    waits for the previous trial's workers. ASHA ends trials by stopping them (also at max_t),
    which terminates the trial's actor; each trial's placement group must still be given back,
    or the next trial's job waits for workers in vain and the sweep fails."""
    import ray

    from ptm_dist.finetune.sweep import tune

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    cfg = debug_job(tmp_path, *start_overrides(start, tmp_path), "finetune.epochs=2",
                    "tune.space={finetune.lr: {grid: [0.003, 0.0001, 0.000001]}}", "tune.num_samples=1",
                    "tune.max_concurrent=1", "tune.num_workers=2")
    sweep_dir = Path(tune(cfg))
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"sweep_dir: {sweep_dir}"
    rows = _csv(sweep_dir / "trials.csv")
    assert len(rows) == 3 and all(r["status"] in ("done", "stopped early") for r in rows), rows
    for r in rows:
        trial = sweep_dir / "trials" / r["trial_id"]
        assert (trial / "placement_group").exists()  # the trial ran as a Ray Train job
        epochs = [json.loads(ln) for ln in (trial / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in epochs] == list(range(1, int(r["epochs"]) + 1))
    assert ray.is_initialized()  # the shared instance: placement_group_table must not start another
    left = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert left == [], left


def test_pipeline_pretrains_then_sweeps(tmp_path_factory, tmp_path, ray_session, capsys):
    """`ptm pipeline`: the job's pretraining run, then a sweep that starts from that run."""
    import yaml

    from ptm_dist.pipeline import pipeline
    from ptm_dist.tracking import read_metrics

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    cfg = debug_job(
        tmp_path, "run.name=pre", "train.max_steps=4", "train.eval_every=4", "train.ckpt_every=4",
        f"finetune.data={start['train']}", f"finetune.val_data={start['val']}", "finetune.max_length=32",
        "finetune.batch_size=8", "finetune.epochs=1", "tune.scheduler=fifo", "tune.num_samples=1",
        "tune.space={finetune.lr: {grid: [0.001, 0.01]}}", "tune.max_concurrent=2",
    )
    sweep_dir = Path(pipeline(cfg))
    out = capsys.readouterr().out.strip().splitlines()
    run_dir = tmp_path / "pre"
    assert out[-1] == f"sweep_dir: {sweep_dir}"
    assert f"run_dir: {run_dir}" in out[:-1]  # pretraining printed its own last line first
    assert [m["step"] for m in read_metrics(str(run_dir)) if "eval_loss" in m] == [0, 4]
    swept = yaml.safe_load((sweep_dir / "job.yaml").read_text())
    assert swept["finetune"]["init"] == str(run_dir)  # the sweep started from that run
    assert (sweep_dir / "base" / "config.json").exists()  # exported as a Hugging Face model
    rows = _csv(sweep_dir / "trials.csv")
    assert sorted(float(r["finetune.lr"]) for r in rows) == [0.001, 0.01]
    assert {r["status"] for r in rows} == {"done"} and {r["epochs"] for r in rows} == {"1"}
    assert json.loads((sweep_dir / "best.json").read_text())["metric"] == "accuracy"
