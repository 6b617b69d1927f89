"""Sweeps: a sweep end to end (real Ray Tune, ASHA, real DeepSpeed in every trial), a sweep
killed mid-way and resumed with the same command, multi-worker trials queueing, and the
pretrain-then-sweep pipeline. Search-space parsing and its errors: tests/unit/test_space.py."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import debug_job
from ft_helpers import make_start, plain_transformers_accuracy, start_overrides

from ptm_dist import storage

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


def _trial_epochs(sweep_dir: str) -> dict[str, int]:
    """Epoch lines of each trial's metrics.jsonl (a local sweep directory or a URI)."""
    out = {}
    trials = storage.join(sweep_dir, "trials")
    for t in storage.list_dirs(trials):
        m = storage.join(trials, t, "metrics.jsonl")
        if storage.exists(m):
            out[t] = len([ln for ln in storage.read_text(m).splitlines() if ln.strip()])
    return out


def _saved_trials(sweep_dir: str) -> list[tuple[str, int]]:
    """(status, epoch of the last result) of each trial in Tune's saved experiment state (its
    newest experiment_state-*.json in <sweep_dir>/tune, local or in the bucket). A result comes
    with its epoch's checkpoint, persisted before Tune receives it."""
    import pyarrow.fs as pafs

    fs, p = storage.resolve(storage.join(sweep_dir, "tune"))
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    states = sorted((i for i in fs.get_file_info(pafs.FileSelector(p))
                     if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")),
                    key=lambda i: i.mtime_ns)
    if not states:
        return []
    try:
        with fs.open_input_stream(states[-1].path) as f:
            data = json.loads(f.read())
    except (OSError, json.JSONDecodeError):  # being replaced
        return []
    return [(json.loads(trial)["status"], json.loads(meta).get("last_result", {}).get("epoch", 0))
            for trial, meta in data["trial_data"]]


def _mtime(path: str) -> int:
    fs, p = storage.resolve(path)
    return fs.get_file_info(p).mtime_ns


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sweep_killed_and_resumed(where, tmp_path_factory, tmp_path, cache_dir, s3_endpoint):
    """`ptm tune` is killed (SIGKILL, whole process group) after one trial finished and another
    has started; the same command resumes: finished trials are not run again, the interrupted
    trial continues from its last epoch checkpoint, and the sweep completes. On S3 (moto) the
    whole sweep lives in the bucket (Tune's state, trial checkpoints, metrics, best/), and the
    sweep's best/ read back from it loads with plain transformers and scores what best.json says."""
    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    root = str(tmp_path) if where == "local" else f"s3://ptm/sweeps/{tmp_path.name}"
    sets = [*start_overrides(start, root), "finetune.epochs=3", "tune.scheduler=fifo", "tune.num_samples=3",
            "tune.max_concurrent=1", "tune.space={finetune.lr: {loguniform: [0.001, 0.01]}}"]
    cmd = [sys.executable, "-m", "ptm_dist.cli", "tune", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PTM_DIST_CACHE": str(cache_dir), "PYTHONPATH": str(REPO)}
    sweep_dir = storage.join(root, "tune")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        # Killed once Tune's saved state (written at most every few seconds, later than the
        # trials' own files) has one trial finished and another past an epoch: what a resume
        # can know. Killing on the trials' files alone could land before that state was saved,
        # and the resumed sweep would run the interrupted trial from its start.
        while time.time() < deadline and proc.poll() is None:
            saved = _saved_trials(sweep_dir)
            if ("TERMINATED", 3) in saved and any(st == "RUNNING" and 1 <= e < 3 for st, e in saved):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _trial_epochs(sweep_dir)
    done = [t for t, n in before.items() if n == 3]
    finished_mtime = {t: _mtime(storage.join(sweep_dir, "trials", t, "best", "model.safetensors")) for t in done}
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
        assert _mtime(storage.join(sweep_dir, "trials", t, "best", "model.safetensors")) == finished_mtime[t]
    for t in after:
        lines = storage.read_text(storage.join(sweep_dir, "trials", t, "metrics.jsonl")).splitlines()
        epochs = [json.loads(ln)["epoch"] for ln in lines]
        assert epochs == [1, 2, 3]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep_dir, "trials.csv")))))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}
    if where == "s3":
        assert not (tmp_path / "tune").exists()  # nothing of the sweep on this machine's disk
        best = json.loads(storage.read_text(storage.join(sweep_dir, "best.json")))
        local, is_tmp = storage.local_copy(storage.join(sweep_dir, "best"))
        try:
            acc = plain_transformers_accuracy(local, start["val"])
        finally:
            storage.drop_local_copy(local, is_tmp)
        assert abs(acc - best["value"]) <= 0.005, (acc, best["value"])


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
