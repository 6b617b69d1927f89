"""ptm_dist.runlogs: what Ray forwards is filed per process (worker<rank>.log once a worker
names its rank, driver.log otherwise), only ptm's own lines reach the terminal, the driver's
stderr (file-descriptor level) goes to driver.log while a command runs and comes back after,
a stopping error leaves its traceback there, and object-store run directories get the files
appended at the end (moto S3)."""

from __future__ import annotations

import os
import sys

import pytest

from ptm_dist import runlogs, storage
from ptm_dist.runlogs import RunLogs, rank_mark, route


def batch(lines, pid, actor="RayTrainWorker", is_err=False, ip="10.0.0.7"):
    """One batch of lines as Ray's log thread hands it to its handlers."""
    return {"lines": lines, "pid": pid, "ip": ip, "actor_name": actor, "task_name": "", "is_err": is_err,
            "job": "01000000"}


def test_forwarded_lines_are_filed_per_worker_and_only_ptm_lines_are_shown(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("PTM_VERBOSE", raising=False)
    printed_by_ray = []
    with RunLogs(str(tmp_path / "run"), "pretrain") as logs:
        # A worker's library lines arrive before it names its rank: held, then filed under it.
        route(batch(["[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."], 11),
              printed_by_ray.append)
        route(batch([rank_mark(1), "[transformers] `loss_type=None` was set in the config"], 11), printed_by_ray.append)
        route(batch([rank_mark(0), "[ptm] step 10/100 loss 5.95"], 10), printed_by_ray.append)
        route(batch(["Checkpoint successfully created at: Checkpoint(...)"], 10, is_err=True), printed_by_ray.append)
        route(batch(["Requesting resources: {'CPU': 1} * 2"], 5, actor="TrainController"), printed_by_ray.append)
        os.write(2, b"driver stderr at the fd level\n")  # Ray's C++ core and logging write here
        print("python stderr", file=sys.stderr, flush=True)
    out, err = capfd.readouterr()
    assert out == "[ptm] step 10/100 loss 5.95\n" and err == ""
    assert printed_by_ray == []
    w0, w1, driver = (logs.local / n for n in ("worker0.log", "worker1.log", "driver.log"))
    assert w0.read_text().splitlines()[2:] == ["[ptm] step 10/100 loss 5.95",
                                               "Checkpoint successfully created at: Checkpoint(...)"]
    lines1 = w1.read_text().splitlines()
    assert lines1[1] == "--- rank 1: (RayTrainWorker pid=11, ip=10.0.0.7) ---"
    assert "Setting accelerator to CPU" in lines1[2] and "loss_type=None" in lines1[3]
    text = driver.read_text()
    assert "(TrainController pid=5, ip=10.0.0.7) Requesting resources" in text
    assert "driver stderr at the fd level\n" in text and "python stderr\n" in text
    assert not any(rank_mark(0) in p.read_text() for p in (w0, w1, driver))
    os.write(2, b"after\n")  # stderr is the terminal's again
    assert capfd.readouterr().err == "after\n"
    assert runlogs.active() is None


def test_verbose_and_commands_without_run_logs_print_as_ray_does(tmp_path, monkeypatch):
    printed_by_ray = []
    route(batch([rank_mark(0), "Started training worker group"], 3), printed_by_ray.append)  # no RunLogs open
    assert [b["lines"] for b in printed_by_ray] == [["Started training worker group"]]
    monkeypatch.setenv("PTM_VERBOSE", "1")
    with RunLogs(str(tmp_path), "pretrain") as logs:
        assert not logs.redirected
        route(batch(["DeepSpeed info"], 4, actor="TrainController"), printed_by_ray.append)
    assert printed_by_ray[-1]["lines"] == ["DeepSpeed info"]
    assert "DeepSpeed info" in (tmp_path / "logs" / "driver.log").read_text()  # filed as well


def test_an_error_leaves_its_traceback_in_driver_log_and_its_path_on_the_exception(tmp_path, monkeypatch):
    monkeypatch.delenv("PTM_VERBOSE", raising=False)
    with pytest.raises(RuntimeError) as e, RunLogs(str(tmp_path), "pretrain"):
        raise RuntimeError("NCCL went away")
    assert e.value.ptm_logs == str(tmp_path / "logs" / "driver.log")
    text = (tmp_path / "logs" / "driver.log").read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: NCCL went away" in text


def test_a_second_command_appends_and_object_store_runs_get_their_logs_uploaded(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("PTM_VERBOSE", raising=False)
    run_dir = "s3://ptm/runlogs-test/run"
    for n in (1, 2):
        with RunLogs(run_dir, "pretrain") as logs:
            assert logs.where.startswith(f"{run_dir}/logs (written in ")
            route(batch([rank_mark(0), f"worker line {n}"], 20 + n), lambda data: None)
            os.write(2, f"driver line {n}\n".encode())
    worker = storage.read_text(f"{run_dir}/logs/worker0.log")
    driver = storage.read_text(f"{run_dir}/logs/driver.log")
    assert worker.count("=== ptm pretrain ") == 2 and "worker line 1" in worker and "worker line 2" in worker
    assert driver.index("driver line 1") < driver.index("driver line 2")
