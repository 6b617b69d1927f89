"""Fault tolerance: killed workers and drivers, crashes inside checkpoint saves, non-finite
steps, loss spikes, storage trouble and retention, each against an uninterrupted run.

Faults are real (SIGKILL, os._exit, exceptions, ENOSPC, NaN losses through DeepSpeed), injected
at named points with ptm_dist.faults (PTM_FAULT). Every test prints its figure.

Ray runs: 2 workers, ZeRO-2, CPU fp32, 40 steps with a checkpoint every 10 (the reference run is
shared). Checkpoint-save crashes run in one process without Ray (ptm_dist.train.local.run_local,
the same Trainer and save_checkpoint), which is cheap enough to cover every save point; one
more crashes a save on Ray. The spike detector and retention on plain directories alone are unit
tests (tests/unit/test_step.py, tests/unit/test_checkpoint.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import DEBUG_OVERRIDES, debug_job, read_lines

from ptm_dist import checkpoint as ck
from ptm_dist import faults
from ptm_dist.data.idlog import read_sequence_log
from ptm_dist.errors import WorkerFailedError, user_message
from ptm_dist.train.loop import STARTUP_FILE
from ptm_dist.train.pretrain import pretrain

TESTS = Path(__file__).parent  # this file's directory; tests/ (conftest) is its parent
LONG = ["train.max_steps=40", "train.ckpt_every=10", "train.eval_every=20", "train.keep_ckpts=5",
        "zero.stage=2", "tracking.wandb=disabled", "data.log_sequence_ids=true"]


# ---------------------------------------------------------------- helpers


def flat_tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, by path."""
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two tensor dicts (inf if keys or shapes differ)."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf")
        if not torch.equal(x, y):
            worst = max(worst, (x.double() - y.double()).abs().max().item())
            worst = worst or float("nan")  # unequal but no numeric difference (NaN): not equal
    return worst


def checkpoint_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    """Weights and optimizer state (every rank's ZeRO partition) of a checkpoint, plus the LR
    schedule and each rank's trainer state (data position, counters)."""
    out = {}
    for f in sorted(Path(ckpt, ck.DS_TAG).glob("*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        out.update(flat_tensors({k: v for k, v in state.items() if k not in ("ds_config", "ds_version")}, f.name))
        sched = state.get("lr_scheduler")
        if sched:
            out[f"{f.name}/lr_last_epoch"] = torch.tensor(sched["last_epoch"])
    for f in sorted(Path(ckpt).glob("rank_*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        out[f"{f.name}/data"] = torch.tensor([state["data"]["epoch"], state["data"]["last_id"] or -1,
                                              state["data"]["consumed"]])
        out[f"{f.name}/nonfinite"] = torch.tensor(state.get("nonfinite_skipped", 0))
    return out


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_lines(run_dir) if "loss" in m}


# Set in every run_python process, whatever this pytest process inherited: results of different
# processes are compared bit for bit, and the intra-op thread count decides the order of CPU
# reductions (the debug GPT-2's gradients differ bitwise between 1 and 2 threads). Unset, it
# follows the CPU affinity each process happens to start with: a crash subprocess started on one
# CPU made its resume differ from the reference (reproduced by pinning it with sched_setaffinity).
HERMETIC_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# A process group of one picks its own port, never one an in-process run left in os.environ.
NOT_INHERITED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def run_python(script: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]\n" + textwrap.dedent(script)
    base = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**base, **HERMETIC_ENV, **(env or {})}, check=False)


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    """The uninterrupted 40-step run every interrupted one is compared with."""
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = pretrain(debug_job(tmp, "run.name=ref", *LONG))
    return run_dir, losses(run_dir), checkpoint_tensors(f"{run_dir}/checkpoint_00000040")


# ---------------------------------------------------------------- 1. bitwise resume, max_failures=0


def test_stop_at_20_and_resume_is_bitwise_the_uninterrupted_run(reference, tmp_path, monkeypatch, ray_session):
    """Rank 1 is SIGKILLed as it starts step 21 with train.max_failures=0: the run stops with a
    one-line error naming the worker; the same job again resumes from step 20 and its losses of
    steps 21-40, final weights and optimizer state equal the uninterrupted run's exactly."""
    _, ref_losses, ref_final = reference
    cfg = debug_job(tmp_path, "run.name=stop", *LONG, "train.max_failures=0")
    monkeypatch.setenv("PTM_FAULT", "train.step@21#1:kill")
    with pytest.raises(WorkerFailedError) as err:
        pretrain(cfg)
    line = user_message(err.value)
    print("max_failures=0:", line)
    assert line is not None and "\n" not in line
    assert line.startswith("worker rank 1 (pid ") and "its process died" in line
    assert "train.max_failures=0" in line and "checkpoint_00000020" in line
    monkeypatch.delenv("PTM_FAULT")
    run_dir = pretrain(cfg)
    got = losses(run_dir)
    resumed = [m for m in read_lines(run_dir) if "resumed_from" in m]
    assert [m["step"] for m in resumed] == [20]
    same = [s for s in range(21, 41) if got[s] == ref_losses[s]]
    diff = max_diff(checkpoint_tensors(f"{run_dir}/checkpoint_00000040"), ref_final)
    print(f"bitwise resume: steps 21-40 with == losses: {len(same)}/20; max |weights/optimizer diff| = {diff}")
    assert len(same) == 20 and diff == 0.0


def test_background_uploads_a_failed_one_stops_the_run_and_the_resume_is_bitwise(
        reference, tmp_path, monkeypatch, ray_session):
    """Checkpoints uploaded in the background (train.ckpt_upload; the reference uploads in the
    foreground). Rank 1's upload of step 20's checkpoint fails in Ray Train's upload thread (disk
    full) while training goes on: the run stops with the one-line storage error, not a retry,
    and step 10's checkpoint (committed before step 20's save began) is the newest complete one.
    The same job again resumes from step 10 and ends bit-identical to the reference."""
    _, ref_losses, ref_final = reference
    cfg = debug_job(tmp_path, "run.name=bg", *LONG, "train.ckpt_upload=background")
    monkeypatch.setenv("PTM_FAULT", "save.upload@20#1:enospc")
    with pytest.raises(Exception) as err:
        pretrain(cfg)
    line = user_message(err.value)
    print("background upload failed:", line)
    run_dir = tmp_path / "bg"
    assert line is not None and "\n" not in line
    assert line.startswith(f"cannot write checkpoint {run_dir}/checkpoint_00000020: [Errno 28]")
    assert line.endswith(f"newest complete checkpoint {run_dir}/checkpoint_00000010 is intact")
    assert ck.latest_complete_checkpoint(str(run_dir)).endswith("checkpoint_00000010")
    monkeypatch.delenv("PTM_FAULT")
    pretrain(cfg)
    assert [m["step"] for m in read_lines(run_dir) if "resumed_from" in m] == [10]
    got = losses(run_dir)
    diff = max_diff(checkpoint_tensors(f"{run_dir}/checkpoint_00000040"), ref_final)
    meta = ck.read_meta(f"{run_dir}/checkpoint_00000030")
    print(f"background uploads: steps 11-40 with == losses: {sum(got[s] == ref_losses[s] for s in range(11, 41))}/30; "
          f"max |weights/optimizer diff| = {diff}; step 30's marker:",
          {k: meta[k] for k in ("upload", "pause_s", "upload_s")})
    assert [got[s] for s in range(11, 41)] == [ref_losses[s] for s in range(11, 41)] and diff == 0.0
    assert meta["upload"] == "background" and meta["upload_s"] > 0 and meta["pause_s"] > 0
    assert ck.read_meta(f"{reference[0]}/checkpoint_00000030")["upload"] == "foreground"


# ---------------------------------------------------------------- 2. worker kill and a crash in a save, max_failures=2


def test_a_killed_worker_and_a_worker_crashing_inside_a_save_are_replaced_and_the_run_ends_identical(
        reference, tmp_path, monkeypatch, ray_session):
    """Two faults in one run with train.max_failures=2, each firing once. Rank 1 is SIGKILLed as
    it starts step 25: the workers are replaced and resume from step 20. Then rank 0 exits
    (os._exit) inside step 30's save after every rank's files are in storage and before the
    COMPLETE marker: the partial checkpoint_00000030 is never loaded (the workers resume from
    step 20 again) and is replaced by a complete one. The run ends bit-identical to the
    uninterrupted one. (One run for both faults: each Ray Train job costs about 30 s of start-up.)"""
    _, ref_losses, ref_final = reference
    kill, save_crash = "train.step@25#1:kill", "save.before_marker@30#0:exit"
    monkeypatch.setenv("PTM_FAULT", f"{kill},{save_crash}")
    monkeypatch.setenv("PTM_FAULT_ONCE", str(tmp_path / "fired"))
    run_dir = pretrain(debug_job(tmp_path, "run.name=kill", *LONG, "train.max_failures=2"))
    fired = {p.name: p.read_text().strip() for p in (tmp_path / "fired").iterdir()}  # "pid P step S"
    print("fired:", fired)
    assert sorted(fired) == sorted(faults.once_file(f) for f in (kill, save_crash))
    killed_at, crashed_at = (int(fired[faults.once_file(f)].split()[-1]) for f in (kill, save_crash))
    resumed = [m["step"] for m in read_lines(run_dir) if "resumed_from" in m]
    lost = killed_at - 1 - resumed[0]  # steps finished before the kill and done again
    diff = max_diff(checkpoint_tensors(f"{run_dir}/checkpoint_00000040"), ref_final)
    got = losses(run_dir)
    print(f"worker kill at step {killed_at}, crash in step {crashed_at}'s save: resumed from steps {resumed}, "
          f"lost {lost} steps at the kill; max |w diff| = {diff}")
    assert killed_at == 25 and crashed_at == 30 and resumed == [20, 20] and lost <= 10
    assert (Path(run_dir) / "checkpoint_00000030" / "COMPLETE").exists()
    assert [got[s] for s in range(1, 41)] == [ref_losses[s] for s in range(1, 41)]
    assert diff == 0.0
    # The summary's start-up stays the first group's (its first step is step 1), not a replaced one's.
    assert json.loads((Path(run_dir) / STARTUP_FILE).read_text())["step"] == 1


# ---------------------------------------------------------------- 4. driver kill, same command again


def _descendants_session(sid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def test_killed_driver_then_same_command_resumes_exactly_once(reference, tmp_path, cache_dir):
    """`ptm pretrain` (its own local Ray, wandb offline) is SIGKILLed with its whole process group
    while its workers are at step 25; the same command again resumes from step 20 and ends with
    the uninterrupted run's losses, weights, optimizer state and data positions, trains on the
    same sequences at every step (data.log_sequence_ids, ids compared with ==: every sequence
    consumed exactly once across the kill), and continues the killed run's wandb run. While the
    first driver lives, a second one on its run directory is refused; once it is killed, its
    lease does not hold the re-run up (same machine, process gone)."""
    ref_dir, ref_losses, ref_final = reference
    sets = [*DEBUG_OVERRIDES, *LONG, f"run.storage={tmp_path}", "run.name=drv", "tracking.wandb=offline"]
    cmd = [sys.executable, "-m", "ptm_dist.cli", "pretrain", *[a for s in sets for a in ("--set", s)]]
    # An in-process wandb run leaves its service's address in WANDB_SERVICE, which every child
    # inherits (here: the ptm driver, its Ray and the workers). The workers must not use that
    # longer-lived service: a killed worker's run would stay registered there and the re-run
    # could not continue the same wandb run ('run ID ... is in use').
    import wandb

    wandb.init(mode="offline", dir=str(tmp_path), project="probe").finish()
    assert os.environ.get("WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PTM_FAULT", "PTM_FAULT_ONCE")}
    env["PTM_PROGRESS"] = "plain"
    run_dir = tmp_path / "drv"
    proc = subprocess.Popen(cmd, env={**env, "PTM_FAULT": "train.step@25:hang"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            if (run_dir / "checkpoint_00000020" / "COMPLETE").exists() and (run_dir / "metrics.jsonl").exists() \
                    and any(m.get("step") == 24 and "loss" in m for m in read_lines(run_dir)):
                break
            assert proc.poll() is None, "driver ended before the kill"
            time.sleep(0.5)
        else:
            pytest.fail("the run never reached step 24")
        # A second driver on the live run directory (the same command in another terminal, a
        # resubmitted job) is refused with a line naming the one that holds it.
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
        line = second.stderr.strip().splitlines()[-1]
        print("second driver:", line)
        assert second.returncode == 2
        assert line.startswith(f"ptm pretrain: error: {run_dir} is in use by the driver on host ")
        assert f", pid {proc.pid}, started " in line and "Traceback" not in second.stderr
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        for pid in _descendants_session(proc.pid):  # Ray processes the driver started
            os.kill(pid, signal.SIGKILL)
    steps_before = max(m["step"] for m in read_lines(run_dir) if "loss" in m)
    logged_before = max(ln["step"] for ln in read_sequence_log(str(run_dir))[0])
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == f"run_dir: {run_dir}"
    resumed = [m["step"] for m in read_lines(run_dir) if "resumed_from" in m]
    got = losses(run_dir)
    final = checkpoint_tensors(f"{run_dir}/checkpoint_00000040")
    data_equal = all(torch.equal(final[k], ref_final[k]) for k in final if k.endswith("/data"))
    diff = max_diff(final, ref_final)
    seqs, ref_seqs = read_sequence_log(str(run_dir)), read_sequence_log(str(ref_dir))
    n_ids = sum(len(ln["seqs"]) for lines in seqs.values() for ln in lines)
    print(f"driver kill at step {steps_before + 1} (ids logged to step {logged_before}): resumed from {resumed}, "
          f"lost {steps_before - resumed[0]} steps; steps 21-40 equal losses: "
          f"{sum(got[s] == ref_losses[s] for s in range(21, 41))}/20; data positions equal: {data_equal}; "
          f"max |w diff| = {diff}; {n_ids} sequence ids over {len(seqs)} ranks")
    assert resumed == [20] and logged_before > 20 and data_equal and diff == 0.0
    assert [got[s] for s in range(1, 41)] == [ref_losses[s] for s in range(1, 41)]
    # The sequences each rank trained on at each step: the steps the kill lost are logged once,
    # by the re-run, with the ids of the uninterrupted run.
    for rank, lines in seqs.items():
        assert [ln["step"] for ln in lines] == list(range(1, 41)), f"rank {rank}: steps missing or repeated"
    assert seqs == ref_seqs and len(seqs) == 2
    all_ids = [tuple(x) for lines in seqs.values() for ln in lines for x in ln["seqs"]]
    assert len(all_ids) == len(set(all_ids)) == 40 * 2 * 4  # no sequence twice (epoch, id) in 40 steps
    # The re-run continues the killed run's wandb run: one id, in every offline run directory.
    assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) >= 2 and all(name.endswith(f"-{wandb_id}") for name in offline), offline


def test_sigterm_checkpoints_at_the_next_step_and_the_same_command_resumes_there(reference, tmp_path, cache_dir):
    """SIGTERM to `ptm pretrain` (only the driver's pid, as a scheduler sends it) while both
    workers are held at the start of step 15 (released once rank 0 has seen the request): the
    run writes a complete checkpoint at step 15, the step boundary after the request, between
    periodic checkpoints (every 10), exits 143 with one line
    saying where it stopped, and leaves no Ray process behind. The same command again resumes
    from exactly that step and ends with the uninterrupted run's losses, weights, optimizer state,
    data positions and per-step sequence ids."""
    ref_dir, ref_losses, ref_final = reference
    sets = [*DEBUG_OVERRIDES, *LONG, f"run.storage={tmp_path}", "run.name=sig"]
    cmd = [sys.executable, "-m", "ptm_dist.cli", "pretrain", *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PTM_FAULT", "PTM_FAULT_ONCE")}
    env["PTM_PROGRESS"] = "plain"
    run_dir, release = tmp_path / "sig", tmp_path / "release"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, env={**env, "PTM_FAULT": "train.step@15:wait", "PTM_FAULT_RELEASE": str(release)},
                                start_new_session=True, stdout=fo, stderr=fe)
    try:
        deadline = time.time() + 400
        while not ((run_dir / "metrics.jsonl").exists()
                   and any(m.get("step") == 14 and "loss" in m for m in read_lines(run_dir))):
            assert proc.poll() is None, "driver ended before step 15: " + err.read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 14"
            time.sleep(0.2)
        t_signal = time.time()
        os.kill(proc.pid, signal.SIGTERM)
        log0 = run_dir / "logs" / "worker0.log"
        while "stop request received (SIGTERM)" not in (log0.read_text() if log0.exists() else ""):
            assert proc.poll() is None and time.time() < deadline, "rank 0 never saw the request: " + err.read_text()
            time.sleep(0.05)
        release.touch()  # the workers take step 15 and stop at the boundary after it
        rc = proc.wait(120)
        took = time.time() - t_signal
        # The driver's children (Ray's processes, a multiprocessing fork server) see it gone and
        # exit within moments; none may stay.
        gone_by = time.time() + 15
        while (left := _descendants_session(proc.pid)) and time.time() < gone_by:
            time.sleep(0.1)
    finally:
        release.touch()
        for pid in _descendants_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    stdout, stderr = out.read_text(), err.read_text()
    stopped = [m for m in read_lines(run_dir) if "stopped" in m]
    assert rc == 143, stdout[-3000:] + stderr[-3000:]
    assert len(stopped) == 1 and stopped[0]["stopped"] == "SIGTERM", stopped
    step = stopped[0]["step"]
    print(f"SIGTERM at step 15: checkpoint at step {step}, process ended {took:.1f}s after the signal; "
          f"last line: {stderr.strip().splitlines()[-1]}")
    assert step == 15 and left == []
    assert stderr.strip().splitlines()[-1] == (
        f"ptm pretrain: stopped by SIGTERM at step {step} of 40: {run_dir}/checkpoint_{step:08d} is complete; "
        f"the same command continues from step {step}")
    assert "Traceback" not in stdout + stderr
    assert "[ptm] SIGTERM: checkpointing at the next step boundary" in stdout
    assert (run_dir / f"checkpoint_{step:08d}" / "COMPLETE").exists()
    assert ck.latest_complete_checkpoint(str(run_dir)) == f"{run_dir}/checkpoint_{step:08d}"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (run_dir / "STOP_REQUEST").exists()  # the old request did not stop the re-run
    resumed = [m["step"] for m in read_lines(run_dir) if "resumed_from" in m]
    got = losses(run_dir)
    final = checkpoint_tensors(f"{run_dir}/checkpoint_00000040")
    data_equal = all(torch.equal(final[k], ref_final[k]) for k in final if k.endswith("/data"))
    diff = max_diff(final, ref_final)
    print(f"resumed from {resumed}; steps 1-40 equal losses: {sum(got[s] == ref_losses[s] for s in range(1, 41))}/40; "
          f"data positions equal: {data_equal}; max |w diff| = {diff}")
    assert resumed == [step] and data_equal and diff == 0.0
    assert [got[s] for s in range(1, 41)] == [ref_losses[s] for s in range(1, 41)]
    seqs = read_sequence_log(str(run_dir))
    for rank, lines in seqs.items():
        assert [ln["step"] for ln in lines] == list(range(1, 41)), f"rank {rank}: steps missing or repeated"
    assert seqs == read_sequence_log(str(ref_dir)) and len(seqs) == 2


def test_ctrl_c_stops_the_run_with_one_line_and_nothing_left_running(tmp_path, cache_dir):
    """SIGINT to the whole process group (what a terminal's Ctrl-C sends) while the workers are
    held at step 15: exit 130, one line, no traceback, no process of the run left, the newest
    complete checkpoint (step 10) intact and the run directory's lease released, so the same
    command resumes from it (the resume itself: the killed-driver test above)."""
    sets = [*DEBUG_OVERRIDES, *LONG, f"run.storage={tmp_path}", "run.name=int"]
    cmd = [sys.executable, "-m", "ptm_dist.cli", "pretrain", *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PTM_FAULT", "PTM_FAULT_ONCE")}
    run_dir = tmp_path / "int"
    proc = subprocess.Popen(cmd, env={**env, "PTM_PROGRESS": "plain", "PTM_FAULT": "train.step@15:wait"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while not ((run_dir / "metrics.jsonl").exists()
                   and any(m.get("step") == 14 and "loss" in m for m in read_lines(run_dir))):
            assert proc.poll() is None and time.time() < deadline, "the run never reached step 14"
            time.sleep(0.2)
        t_signal = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.time() - t_signal
        gone_by = time.time() + 15
        while (left := _descendants_session(proc.pid)) and time.time() < gone_by:
            time.sleep(0.1)
    finally:
        for pid in _descendants_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    print(f"Ctrl-C: exit {proc.returncode} {took:.1f}s after SIGINT; last line: {stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 130 and left == [], stdout[-2000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "ptm: interrupted; the newest complete checkpoint is kept"
    assert "Traceback" not in stdout + stderr
    assert ck.latest_complete_checkpoint(str(run_dir)) == f"{run_dir}/checkpoint_00000010"
    assert not (run_dir / "DRIVER_LEASE").exists()


# ---------------------------------------------------------------- 5. non-finite steps and spikes


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_past_the_budget(tmp_path, monkeypatch, ray_session):
    """A NaN loss on rank 1 only (step 4) and finite loss with NaN gradients on rank 0 only
    (step 9) are skipped on both ranks with train.skip_nonfinite=2; a loss 10x too high for
    steps 14-17 gives one spike warning; an inf loss at step 21 is one too many and stops the
    run. Re-running resumes from step 20 with the count (2) restored from the checkpoint."""
    sets = ["train.max_steps=24", "train.ckpt_every=10", "train.eval_every=24", "train.keep_ckpts=5",
            "train.skip_nonfinite=2", "train.spike_patience=3", "tracking.wandb=disabled", "run.name=nf",
            "train.max_failures=1"]  # a user error is not retried: no restart is made
    cfg = debug_job(tmp_path, *sets)
    monkeypatch.setenv("PTM_FAULT", "train.loss@4#1:nan,train.loss@9#0:gradnan,train.loss@14-17:spike,"
                                    "train.loss@21:inf")
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError) as err:
        pretrain(cfg)
    line = user_message(err.value)
    print("non-finite past the budget:", line)
    assert line.startswith("step 21: non-finite loss or gradients") and "exceed train.skip_nonfinite=2" in line
    # Not retried: a restarted worker group would have resumed from step 20 (and said so in
    # metrics.jsonl) before failing again.
    assert not [m for m in read_lines(tmp_path / "nf") if "resumed_from" in m]
    lines = {m["step"]: m for m in read_lines(tmp_path / "nf") if "loss" in m}
    counts = {s: lines[s]["nonfinite_skipped"] for s in (3, 4, 8, 9, 20)}
    spikes = {s: lines[s]["loss_spikes"] for s in (15, 16, 20)}
    print(f"nonfinite_skipped by step: {counts}; loss_spikes by step: {spikes}")
    assert counts == {3: 0, 4: 1, 8: 1, 9: 2, 20: 2}
    assert spikes == {15: 0, 16: 1, 20: 1}
    assert lines[4]["loss"] != lines[4]["loss"] and lines[5]["loss"] == lines[5]["loss"]  # NaN only where skipped
    ckpt = checkpoint_tensors(f"{tmp_path}/nf/checkpoint_00000020")
    assert int(ckpt["rank_0.pt/nonfinite"]) == int(ckpt["rank_1.pt/nonfinite"]) == 2
    monkeypatch.delenv("PTM_FAULT")
    run_dir = pretrain(cfg)
    final = checkpoint_tensors(f"{run_dir}/checkpoint_00000024")
    after = [m for m in read_lines(run_dir) if "loss" in m][-1]
    print(f"after resume: nonfinite_skipped {after['nonfinite_skipped']}, loss_spikes {after['loss_spikes']}")
    assert int(final["rank_0.pt/nonfinite"]) == 2 and after["nonfinite_skipped"] == 2 and after["loss_spikes"] == 1


NONFINITE_SCRIPT = """
import json, os
from conftest import debug_job
from test_faults import snapshot_engine, same
from ptm_dist.train.local import local_trainer
from ptm_dist.errors import NonFiniteError
out = {}
for stage, precision in ((0, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16")):
    cfg = debug_job(TMP, f"run.name=nf{stage}{precision}", f"zero.stage={stage}", "train.skip_nonfinite=1",
                    f"train.precision={precision}", "tracking.wandb=disabled")
    tr = local_trainer(cfg)
    it = iter(tr.stream)
    tr.train_one_step(it); tr.train_one_step(it)
    before = snapshot_engine(tr.engine)
    os.environ["PTM_FAULT"] = "train.loss@3:gradnan"
    tr.train_one_step(it)
    skipped_same = same(before, snapshot_engine(tr.engine))
    os.environ["PTM_FAULT"] = "train.loss@4:nan"
    try:
        tr.train_one_step(it)
        message = None
    except NonFiniteError as e:
        message = str(e)
    stopped_same = same(before, snapshot_engine(tr.engine))
    del os.environ["PTM_FAULT"]
    tr.train_one_step(it)
    out[f"{stage} {precision}"] = {"skipped_unchanged": skipped_same, "stopped_unchanged": stopped_same,
                  "count": tr.nonfinite_skipped, "message": message,
                  "next_step_changes": not same(before, snapshot_engine(tr.engine)),
                  "engine_optimizer": type(tr.engine.optimizer).__name__}
print(json.dumps(out))
"""


def snapshot_engine(engine) -> dict:
    """Weights (ZeRO partitions where partitioned), fp32 master copies, optimizer state, LR."""
    out = {"params": [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]}
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            out[attr] = [t.detach().clone() for t in getattr(opt, attr)]
    inner = getattr(opt, "optimizer", opt)
    state = [inner.state[p] for g in inner.param_groups for p in g["params"] if p in inner.state]
    out["state"] = {k: v.clone() for k, v in flat_tensors(state).items()}
    out["lr"] = [g["lr"] for g in inner.param_groups]
    out["sched"] = dict(engine.lr_scheduler.state_dict())
    return out


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_nonfinite_step_leaves_weights_optimizer_and_schedule_unchanged(tmp_path, cache_dir):
    """ZeRO-0, 2 and 3 in fp32 and ZeRO-1 (BF16_Optimizer), 2 and 3 in bf16 (one process): a
    step with NaN gradients (finite loss) is skipped and a NaN loss past train.skip_nonfinite=1
    stops; both leave weights, master weights, optimizer state and LR schedule bit-identical;
    the next step trains normally."""
    out = last_json(run_python(f"TMP = {str(tmp_path)!r}\n" + textwrap.dedent(NONFINITE_SCRIPT)))
    for stage, r in out.items():
        print(f"ZeRO-{stage} ({r['engine_optimizer']}): skipped step unchanged={r['skipped_unchanged']}, "
              f"stopped step unchanged={r['stopped_unchanged']}, next step trains={r['next_step_changes']}")
        assert r["skipped_unchanged"] and r["stopped_unchanged"] and r["next_step_changes"]
        assert r["count"] == 2 and r["message"].startswith("step 4: non-finite loss or gradients")


# ---------------------------------------------------------------- 3, 6, 7. saves that crash


SAVE_POINTS = ["save.begin", "save.after_deepspeed", "save.after_rank_state", "save.before_report",
               "save.after_report", "save.before_marker", "save.marker_partial", "save.after_marker",
               "save.during_retention", "save.before_metrics_sync", "save.end"]
# Points after which step 4's checkpoint is complete.
AFTER_MARKER = {"save.after_marker", "save.during_retention", "save.before_metrics_sync", "save.end"}
# Points at which step 4's files are in storage without the COMPLETE marker.
IN_STORAGE_UNMARKED = {"save.after_report", "save.before_marker", "save.marker_partial"}
EXIT_POINTS = ["save.after_deepspeed", "save.marker_partial", "save.during_retention"]
LOCAL = ["train.max_steps=6", "train.ckpt_every=2", "train.keep_ckpts=1", "tracking.wandb=disabled"]

SWEEP_SCRIPT = """
import json, os, subprocess
from pathlib import Path
from conftest import debug_job
from test_faults import LOCAL, snapshot_engine, same
from ptm_dist import checkpoint as ck
from ptm_dist import faults
from ptm_dist.faults import InjectedFault
from ptm_dist.train.local import run_local

ref = snapshot_engine(run_local(debug_job(TMP, "run.name=ref", *LOCAL)).engine)
out = {}

def state_of(name):
    run = f"{TMP}/{name}"
    listing = ck.list_checkpoints(run)
    return {"complete": [s for s, _, ok in listing if ok], "partial": [s for s, _, ok in listing if not ok],
            "marker_tmp": os.path.exists(f"{run}/checkpoint_00000004/COMPLETE.tmp")}

def resume(name):
    latest = ck.latest_complete_checkpoint(f"{TMP}/{name}")
    tr = run_local(debug_job(TMP, f"run.name={name}", *LOCAL))
    snap = snapshot_engine(tr.engine)
    # which parts differ, for the failure message (params, master copies, optimizer state, LR)
    return {"resumed_from": int(latest[-8:]), "equal_to_uninterrupted": same(ref, snap),
            "differs": [k for k in ref if not same(ref[k], snap.get(k))]}

for point in POINTS:
    name = point.replace(".", "_")
    os.environ["PTM_FAULT"] = point + ("" if point == "save.during_retention" else "@4") + ":raise"
    try:
        run_local(debug_job(TMP, f"run.name={name}", *LOCAL))
        error = None
    except InjectedFault as e:
        error = str(e)
    del os.environ["PTM_FAULT"]
    out[point] = {"error": error, **state_of(name), **resume(name)}

for point in EXITED:  # crashed with os._exit in their own processes before this one started
    name = "exit_" + point.replace(".", "_")
    out["exit:" + point] = {**state_of(name), **resume(name)}

# disk full inside the COMPLETE marker write (injected ENOSPC, a real OSError in the write path)
os.environ["PTM_FAULT"] = "save.marker_partial@4:enospc"
try:
    run_local(debug_job(TMP, "run.name=full", *LOCAL))
except Exception as e:
    err = e
del os.environ["PTM_FAULT"]
out["enospc"] = {"error": f"{type(err).__name__}: {err}", **state_of("full"), **resume("full")}

# disk really full: the run directory on a tmpfs with room for about one and a half checkpoints
def on_tiny_tmpfs(mnt):
    try:
        run_local(debug_job(mnt, "run.name=full", *LOCAL))
        err = None
    except Exception as e:
        err = e
    listing = ck.list_checkpoints(f"{mnt}/full")
    from ptm_dist.train.local import local_trainer
    tr = local_trainer(debug_job(mnt, "run.name=full", *LOCAL))
    tr.restore(ck.latest_complete_checkpoint(f"{mnt}/full"))  # the earlier checkpoint still loads
    return {"error": f"{type(err).__name__}: {err}", "complete": [s for s, _, ok in listing if ok],
            "partial": [s for s, _, ok in listing if not ok], "restored_step": tr.step}

if MOUNT:
    ckpt_bytes = sum(f.stat().st_size for f in Path(f"{TMP}/ref/checkpoint_00000006").rglob("*") if f.is_file())
    mnt = f"{TMP}/tmpfs"
    os.makedirs(mnt)
    size = (int(ckpt_bytes * 1.6) // 4096 + 1) * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=False).returncode == 0:
        try:
            out["tmpfs"] = {"size": size, "checkpoint_bytes": ckpt_bytes, **on_tiny_tmpfs(mnt)}
        finally:
            subprocess.run(["umount", mnt], check=False)
print(json.dumps(out))
"""


def _can_mount() -> bool:
    import shutil

    return os.geteuid() == 0 and shutil.which("mount") is not None


def test_a_crash_anywhere_in_a_save_never_loses_the_newest_complete_checkpoint(tmp_path, cache_dir):
    """Step 4's save (ckpt every 2 steps, keep_ckpts=1) fails at each of 11 points (an exception
    in-process; os._exit for 3 of them): the newest complete checkpoint is step 2 before the
    COMPLETE marker and step 4 after it, retention never removed it, a partial directory is
    never chosen, and resuming ends bit-identical to the uninterrupted run. Then a full disk
    (injected ENOSPC in the marker write, and a real tiny tmpfs when root may mount one)."""
    for point in EXIT_POINTS:
        name = "exit_" + point.replace(".", "_")
        proc = run_python(f"""
            from conftest import debug_job
            from test_faults import LOCAL
            from ptm_dist.train.local import run_local
            run_local(debug_job({str(tmp_path)!r}, "run.name={name}", *LOCAL))
        """, env={"PTM_FAULT": point + ("" if point == "save.during_retention" else "@4") + ":exit"})
        assert proc.returncode == 3, proc.stderr[-3000:]
    script = (f"TMP = {str(tmp_path)!r}\nPOINTS = {SAVE_POINTS!r}\nEXITED = {EXIT_POINTS!r}\n"
              f"MOUNT = {_can_mount()!r}\n" + textwrap.dedent(SWEEP_SCRIPT))
    out = last_json(run_python(script))
    for key, r in out.items():
        print(f"crash at {key}: complete {r.get('complete')}, partial {r.get('partial')}, "
              f"resumed from {r.get('resumed_from', r.get('restored_step'))}, "
              f"equal to uninterrupted: {r.get('equal_to_uninterrupted')}; {(r.get('error') or '')[:160]}")
    for point in SAVE_POINTS + ["exit:" + p for p in EXIT_POINTS]:
        r, bare = out[point], point.removeprefix("exit:")
        want = 4 if bare in AFTER_MARKER else 2
        assert r["resumed_from"] == want and r["complete"][-1] == want, (point, r)
        # a partial directory, where the save got as far as storage, was there and not used
        assert r["partial"] == ([4] if bare in IN_STORAGE_UNMARKED else []), (point, r)
    assert out["save.marker_partial"]["marker_tmp"] and out["exit:save.marker_partial"]["marker_tmp"]
    full = out["enospc"]
    assert full["error"].startswith("CheckpointWriteError: cannot write checkpoint ") and \
        "No space left on device" in full["error"] and "checkpoint_00000002 is intact" in full["error"]
    assert full["resumed_from"] == 2
    if "tmpfs" in out:
        t = out["tmpfs"]
        assert t["error"].startswith("CheckpointWriteError") and "No space left" in t["error"], t
        assert t["complete"] and t["restored_step"] == t["complete"][-1]
    # Bit-identical to the uninterrupted run after every crash (every process runs with the same
    # thread count: see HERMETIC_ENV).
    unequal = {k: r["differs"] for k, r in out.items() if r.get("equal_to_uninterrupted") is False}
    assert not unequal, f"resume not bit-identical after a crash in a save: {unequal}"


def test_an_unwritable_run_directory_gets_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, cache_dir):
    """The run directory becomes unwritable after step 2's checkpoint (chmod for a normal user,
    the immutable attribute for root): step 4's save fails with CheckpointWriteError naming the
    checkpoint and the intact step-2 one; made writable again, the run resumes from step 2."""
    proc = run_python(f"""
        import json, os, shutil, subprocess
        from conftest import debug_job
        from test_faults import LOCAL
        from ptm_dist.errors import CheckpointWriteError
        from ptm_dist.faults import InjectedFault
        from ptm_dist.train.local import run_local
        TMP = {str(tmp_path)!r}
        cfg = debug_job(TMP, "run.name=ro", *LOCAL)
        os.environ["PTM_FAULT"] = "train.step@3:raise"
        try:
            run_local(cfg)
        except InjectedFault:
            pass
        del os.environ["PTM_FAULT"]
        run = TMP + "/ro"
        if os.geteuid() == 0:  # root writes through chmod; the immutable attribute stops it
            lock = ["chattr", "+i", run]; unlock = ["chattr", "-i", run]
        else:
            lock = ["chmod", "555", run]; unlock = ["chmod", "755", run]
        locked = shutil.which(lock[0]) is not None and subprocess.run(lock, capture_output=True).returncode == 0
        error = None
        if locked:
            try:
                run_local(cfg)
            except CheckpointWriteError as e:
                error = str(e)
            finally:
                subprocess.run(unlock, check=False)
        tr = run_local(cfg)
        print(json.dumps({{"locked": locked, "error": error, "final_step": tr.step}}))
    """)
    out = last_json(proc)
    print("unwritable run directory:", out)
    if not out["locked"]:
        pytest.skip("cannot make a directory unwritable here (no chmod effect and no chattr)")
    assert out["error"].startswith(f"cannot write checkpoint {tmp_path}/ro/checkpoint_00000004: ")
    assert f"newest complete checkpoint {tmp_path}/ro/checkpoint_00000002 is intact" in out["error"]
    assert "\n" not in out["error"] and out["final_step"] == 6


def _lock_dir(path) -> tuple[list[str], list[str]] | None:
    """Commands that make a directory unwritable and writable again (None if nothing can)."""
    import shutil

    if os.geteuid() == 0:  # root writes through chmod; the immutable attribute stops it
        cmds = (["chattr", "+i", str(path)], ["chattr", "-i", str(path)])
    else:
        cmds = (["chmod", "555", str(path)], ["chmod", "755", str(path)])
    return cmds if shutil.which(cmds[0][0]) else None


def test_a_run_directory_made_unwritable_mid_run_on_ray_stops_with_one_line(tmp_path, ray_session):
    """After step 10's checkpoint the run directory becomes unwritable: Ray Train's own write
    there fails, and the run stops with one line naming the directory and the intact step-10
    checkpoint, which still loads (the same job resumes from it once writable again)."""
    import threading

    run_dir = tmp_path / "lockme"
    cmds = _lock_dir(run_dir)
    if cmds is None:
        pytest.skip("no way to make a directory unwritable here")
    state = {}

    def lock_after_first_checkpoint():
        deadline = time.time() + 600
        while not (run_dir / "checkpoint_00000010" / "COMPLETE").exists() and time.time() < deadline:
            time.sleep(0.02)
        state["locked"] = subprocess.run(cmds[0], capture_output=True, check=False).returncode == 0

    cfg = debug_job(tmp_path, "run.name=lockme", "train.max_steps=20", "train.ckpt_every=10",
                    "train.eval_every=20", "train.max_failures=0", "tracking.wandb=disabled")
    locker = threading.Thread(target=lock_after_first_checkpoint, daemon=True)
    locker.start()
    try:
        with pytest.raises(Exception) as err:
            pretrain(cfg)
    finally:
        locker.join(5)
        subprocess.run(cmds[1], capture_output=True, check=False)
    if not state.get("locked"):
        pytest.skip("could not lock the run directory")
    line = user_message(err.value)
    print("run directory unwritable mid-run (Ray):", line)
    assert line is not None and "\n" not in line
    assert line.startswith((f"cannot write to run directory {run_dir}: ",
                            f"cannot write checkpoint {run_dir}/checkpoint_00000020: "))
    assert line.endswith(f"newest complete checkpoint {run_dir}/checkpoint_00000010 is intact")
    assert ck.latest_complete_checkpoint(str(run_dir)).endswith("checkpoint_00000010")
    pretrain(cfg)  # writable again: resumes from step 10 and finishes
    assert [m["step"] for m in read_lines(run_dir) if "resumed_from" in m] == [10]
