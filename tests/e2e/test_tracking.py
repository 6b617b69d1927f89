"""wandb tracking and live progress, checked by reading wandb's own offline files back.

The offline ``.wandb`` logs are read with wandb's own reader (``wandb leet inspect --json``,
shipped with the wandb package), not by trusting what the code meant to log. wandb never goes
online here: every job sets ``tracking.wandb: offline`` (or disabled) explicitly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_WANDB_KEY, debug_job, make_sweep_dir, read_lines

from ptm_dist import tracking
from ptm_dist.progress import Progress
from ptm_dist.tracking import Tracker

WANDB = str(Path(sys.executable).with_name("wandb"))


def offline_runs(root: Path) -> dict[str, list[dict]]:
    """{offline run directory name: its records} for every offline run under root/wandb/."""
    out = {}
    for d in sorted((root / "wandb").glob("offline-run-*")):
        proc = subprocess.run([WANDB, "leet", "inspect", "--json", str(d)], capture_output=True,
                              text=True, timeout=120, check=True)
        out[d.name] = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    return out


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def history(records: list[dict]) -> list[dict]:
    return [h["item"] for h in of_type(records, "history")]


def test_one_offline_wandb_run_holds_the_job_history_and_config(tracked_run):
    runs = offline_runs(tracked_run.run_dir)
    assert len(runs) == 2, runs.keys()  # one per `ptm pretrain` call, the same wandb run
    first = runs[min(runs)]
    (run,) = of_type(first, "run")  # workers never create runs: one run record, from rank 0
    assert run["run_id"] == tracked_run.first_id
    assert run["job_type"] == "pretrain" and run["project"] == "ptm-dist"
    assert run["tags"] == ["ci", "debug"]
    config = run["config"]["update"]
    assert config["job"]["model"] == {"family": "gpt2", "size": "debug", "dropout": 0.0, "mlm_probability": 0.15}
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


def test_progress_helper_modes():
    out = io.StringIO()
    with Progress(total=4, desc="prepare", unit="shard", stream=out, bar=False, plain_interval=3600) as p:
        for i in range(1, 5):
            p.update(i, docs=i * 10, tok_s="1.2k")
    lines = out.getvalue().splitlines()
    # Plain: the first line, then nothing within the interval, and always the last position.
    assert lines[0].startswith("[ptm] prepare 1/4 shard docs 10 tok/s 1.2k")
    assert lines[-1].startswith("[ptm] prepare 4/4 shard docs 40") and len(lines) == 2
    tty = io.StringIO()
    with Progress(total=3, desc="pretrain", unit="step", stream=tty, bar=True) as p:
        p.update(1, loss="3.1")
        p.write("[ptm] step 1 eval_loss 3.0")
        p.update(3, loss="2.9")
    text = tty.getvalue()
    assert "\r" in text and "3/3" in text and "loss 2.9" in text and "[ptm] step 1 eval_loss 3.0\n" in text


def test_auto_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login x password y\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert tracking.resolve_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert tracking.resolve_mode("auto") == "online"
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("offline") == "offline" and tracking.resolve_mode("disabled") == "disabled"


def test_disabled_tracking_writes_no_wandb_files(tmp_path):
    cfg = debug_job(tmp_path, "tracking.wandb=disabled")
    t = Tracker.start(cfg, str(tmp_path / "run"), job_type="pretrain", config={"job": cfg.to_dict()})
    t.log({"loss": 1.0}, step=1)
    t.summary({"x": 1})
    t.finish()
    assert not t.enabled and t.id is None
    assert not (tmp_path / "run").exists()


def test_sweep_trials_are_separate_runs_grouped_by_sweep(tmp_path, monkeypatch):
    """Through the Tracker API the fine-tuning sweep uses: one run per trial (its
    hyperparameters as config) and a summary run, all in the sweep's group."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    sweep = tmp_path / "sweep-a"
    params = make_sweep_dir(sweep)
    cfg = debug_job(tmp_path, "tracking.wandb=offline")
    for tid, p in params.items():
        trial_dir = sweep / "trials" / tid
        t = Tracker.start(cfg, str(trial_dir), job_type="tune-trial", config=p, group="sweep-a", name=tid)
        for line in read_lines(trial_dir):
            t.log(line, step=line["epoch"])
        t.finish()
    summary = tracking.log_sweep(cfg, str(sweep))
    trial_runs = {tid: offline_runs(sweep / "trials" / tid) for tid in params}
    ids = set()
    for tid, runs in trial_runs.items():
        (records,) = runs.values()
        (run,) = of_type(records, "run")
        assert run["run_group"] == "sweep-a" and run["display_name"] == tid and run["job_type"] == "tune-trial"
        cfg_logged = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
        assert cfg_logged == params[tid]
        assert [h["accuracy"] for h in history(records)] == [m["accuracy"] for m in read_lines(sweep / "trials" / tid)]
        ids.add(run["run_id"])
    assert len(ids) == len(params)  # separate runs
    (records,) = offline_runs(sweep).values()
    (run,) = of_type(records, "run")
    assert run["run_group"] == "sweep-a" and run["job_type"] == "sweep" and run["run_id"] == summary.id
    summary_update = {}
    for s in of_type(records, "summary"):
        summary_update.update(s.get("update", {}))
    assert summary_update["best_trial_id"] == "t2" and summary_update["best_accuracy"] == 0.81
    tables = list((sweep / "wandb").rglob("trials_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["trial_id", "status", "epochs", "accuracy"]
    assert sorted(r[0] for r in table["data"]) == sorted(params)
    key = FAKE_WANDB_KEY.encode()
    assert [p for p in sweep.rglob("*") if p.is_file() and key in p.read_bytes()] == []



def test_object_storage_run_dir_gets_its_offline_run_uploaded(tmp_path, s3_endpoint):
    import pyarrow.fs as pafs

    from ptm_dist import storage

    run_dir = "s3://ptm/tracking-test/run"
    cfg = debug_job(tmp_path, "tracking.wandb=offline")
    t = Tracker.start(cfg, run_dir, job_type="pretrain", config={"job": cfg.to_dict()})
    t.log({"loss": 2.5}, step=1)
    local = t.local_root
    t.finish()
    assert storage.read_text(f"{run_dir}/wandb_run_id").strip() == t.id
    fs, path = storage.resolve(f"{run_dir}/wandb")
    names = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert any(n.endswith(f"run-{t.id}.wandb") for n in names), names
    assert not local.exists()  # the local staging copy is gone
    # The uploaded log is wandb's own, with the history in it.
    down = tmp_path / "down"
    pafs.copy_files(path, str(down / "wandb"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (records,) = offline_runs(down).values()
    assert [h["loss"] for h in history(records)] == [2.5]


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
