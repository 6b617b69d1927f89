"""ptm_dist.tracking without a training run: the wandb mode chosen from credentials, disabled
tracking writing nothing, the sweep's trial and summary runs through the Tracker API, and an
object-storage run directory getting its offline run uploaded (moto S3 server, no Ray).

The offline ``.wandb`` logs are read with wandb's own reader (``wandb leet inspect --json``), not
by trusting what the code meant to log. wandb never goes online here. Tracking of real runs:
tests/e2e/test_tracking.py."""

from __future__ import annotations

import json

from conftest import (
    FAKE_WANDB_KEY,
    debug_job,
    history,
    make_sweep_dir,
    of_type,
    offline_runs,
    read_lines,
)

from ptm_dist import tracking
from ptm_dist.tracking import Tracker


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


def test_gpu_peaks_match_whole_names_variants_first():
    from ptm_dist.tracking import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA L40S") == 362e12 and gpu_peak_flops("NVIDIA L40") == 181e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA A10") == 125e12 and gpu_peak_flops("NVIDIA A10G") is None
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") is None


def test_an_errored_trials_empty_metric_is_a_gap_in_the_sweep_table():
    """trials.csv leaves an errored trial's metric empty; the sweep's wandb table must take that
    row (a string in a number column made `ptm tune` end in wandb's TypeError)."""
    import wandb

    from ptm_dist.tracking import _cell

    rows = [["t1", "TERMINATED", "2", "0.52"], ["t2", "ERROR", "0", ""]]
    table = wandb.Table(columns=["trial_id", "status", "epochs", "accuracy"],
                        data=[[_cell(c) for c in r] for r in rows])
    assert table.data == [["t1", "TERMINATED", 2, 0.52], ["t2", "ERROR", 0, None]]
