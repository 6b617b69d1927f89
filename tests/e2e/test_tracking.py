"""wandb tracking and live progress of real runs (`ptm pretrain`, `ptm tune`), checked by
reading wandb's own offline files back. Tracking without a run: tests/unit/test_tracking.py.

The offline ``.wandb`` logs are read with wandb's own reader (``wandb leet inspect --json``,
shipped with the wandb package), not by trusting what the code meant to log. wandb never goes
online here: every job sets ``tracking.wandb: offline`` (or disabled) explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_WANDB_KEY, history, of_type, offline_runs, read_lines


def test_one_offline_wandb_run_holds_the_job_history_and_config(tracked_run):
    runs = offline_runs(tracked_run.run_dir)
    assert len(runs) == 2, runs.keys()  # one per `ptm pretrain` call, the same wandb run
    first = runs[min(runs)]
    (run,) = of_type(first, "run")  # workers never create runs: one run record, from rank 0
    assert run["run_id"] == tracked_run.first_id
    assert run["job_type"] == "pretrain" and run["project"] == "ptm-dist"
    assert run["tags"] == ["ci", "debug"]
    config = run["config"]["update"]
    assert config["job"]["model"] == {"family": "gpt2", "size": "debug", "config": {}, "init": None, "dropout": 0.0,
                                      "mlm_probability": 0.15}
    assert config["job"]["train"]["max_steps"] == 12
    assert config["deepspeed"]["zero_optimization"]["stage"] == 2
    assert config["deepspeed"]["train_micro_batch_size_per_gpu"] == 4
    assert config["world_size"] == 2
    # The history is the metrics.jsonl of the first call, line for line.
    logged = {(h["step"], k): h[k] for h in history(first) for k in ("loss", "eval_loss") if k in h}
    assert {k for k in logged if k[1] == "loss"} == {(s, "loss") for s in (2, 4, 6, 8, 10, 12)}
    assert {k for k in logged if k[1] == "eval_loss"} == {(s, "eval_loss") for s in (0, 6, 12)}
    lines = read_lines(tracked_run.run_dir)
    for m in lines:
        if m["step"] <= 12:
            for k in ("loss", "eval_loss"):
                if k in m:
                    assert logged[(m["step"], k)] == pytest.approx(m[k], rel=1e-12)
    assert of_type(first, "exit")[0]["exit_code"] == 0
    # The summary says how to upload it.
    assert (f"wandb: offline run {tracked_run.first_id}; upload: wandb sync "
            f"{tracked_run.run_dir}/wandb/offline-run-*-{tracked_run.first_id}") in tracked_run.first.stdout


def test_a_resumed_job_continues_the_same_wandb_run(tracked_run):
    runs = offline_runs(tracked_run.run_dir)
    second = runs[max(runs)]
    ids = {r["run_id"] for recs in runs.values() for r in of_type(recs, "run")}
    assert ids == {tracked_run.first_id}
    assert (tracked_run.run_dir / "wandb_run_id").read_text().strip() == tracked_run.first_id
    (run,) = of_type(second, "run")
    assert run["resume"] is True
    steps = sorted({h["step"] for h in history(second) if "loss" in h})
    assert steps == [14, 16, 18]  # continues after the step-12 checkpoint
    assert "resumed from" in tracked_run.second.stdout


def test_the_api_key_is_in_no_file_the_runs_wrote(tracked_run):
    key = FAKE_WANDB_KEY.encode()
    files = [p for p in tracked_run.run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # Non-vacuous: the job file, metrics, checkpoints and wandb's binary log are all searched.
    assert {"job.yaml", "metrics.jsonl", "COMPLETE", "probe.pt", "wandb_run_id"} <= names
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "debug-internal.log" for p in files)
    leaked = [str(p) for p in files if key in p.read_bytes()]
    assert leaked == []
    for proc in (tracked_run.first, tracked_run.second):
        assert FAKE_WANDB_KEY not in proc.stdout + proc.stderr


def test_live_progress_bar_on_a_terminal_and_plain_lines_otherwise(tracked_run):
    bar = tracked_run.first.stdout
    # The driver draws one updating bar (carriage returns) from rank 0's records ...
    assert "\r" in bar and "12/12" in bar and "loss " in bar and "tok/s " in bar
    assert "[ptm] step 6 eval_loss" in bar
    assert "[ptm] step 4/12" not in bar  # ... instead of the workers' plain lines
    plain = tracked_run.second.stdout
    assert "\r" not in plain
    assert "[ptm] step 16/18 loss" in plain and "tok/s eta" in plain
    assert "[ptm] wandb: offline run " + tracked_run.first_id in plain


def test_a_real_sweep_logs_grouped_trial_runs_and_its_summary(tmp_path_factory, tmp_path, cache_dir):
    """`ptm tune` (2 trials, 1 worker each, ASHA may stop one after epoch 1, wandb offline, fake
    key planted): every trial is its own wandb run in the sweep's group with its hyperparameters
    as config, the sweep's summary run holds the trials table, and no file holds the key."""
    from conftest import DEBUG_OVERRIDES
    from ft_helpers import make_start, start_overrides

    from ptm_dist.report import report

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    sets = [*DEBUG_OVERRIDES, *start_overrides(start, tmp_path), "finetune.epochs=2", "tune.name=sweep-x",
            "tune.space={finetune.lr: {loguniform: [0.0003, 0.01]}}", "tune.num_samples=2",
            "tune.num_workers=1", "tune.max_concurrent=2", "tracking.wandb=offline"]
    env = dict(os.environ, WANDB_API_KEY=FAKE_WANDB_KEY)
    for key in ("RAY_ADDRESS", "WANDB_MODE", "WANDB_DIR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "tune", *[a for s in sets for a in ("--set", s)]],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = tmp_path / "sweep-x"
    trials = sorted(p for p in (sweep / "trials").iterdir() if p.is_dir())
    assert len(trials) == 2
    ids = set()
    for trial in trials:
        # A trial's run is closed before each report to Tune (which may end the trial) and
        # continued with the same id next epoch: one offline session per epoch, one run.
        sessions = offline_runs(trial).values()
        runs = [r for records in sessions for r in of_type(records, "run")]
        assert len(runs) == len(read_lines(trial)) and len({r["run_id"] for r in runs}) == 1
        for run in runs:
            assert (run["run_group"], run["job_type"], run["display_name"]) == ("sweep-x", "tune-trial", trial.name)
            config = run["config"]["update"]
            params = json.loads((trial / "params.json").read_text())
            assert {k: config[k] for k in params} == params and config["job"]["finetune"]["epochs"] == 2
        logged = [h["accuracy"] for records in sessions for h in history(records)]
        assert logged == [m["accuracy"] for m in read_lines(trial)]
        ids.add(runs[0]["run_id"])
    assert len(ids) == 2  # separate runs
    (records,) = offline_runs(sweep).values()
    (run,) = of_type(records, "run")
    assert (run["run_group"], run["job_type"]) == ("sweep-x", "sweep")
    (table,) = (sweep / "wandb").rglob("trials_*.table.json")
    assert sorted(r[0] for r in json.loads(table.read_text())["data"]) == [t.name for t in trials]
    key = FAKE_WANDB_KEY.encode()
    assert [str(p) for p in sweep.rglob("*") if p.is_file() and key in p.read_bytes()] == []
    out = Path(report(str(sweep)))
    assert {"metric_per_trial.png", "hp_finetune_lr.png"} <= {p.name for p in out.glob("*.png")}
