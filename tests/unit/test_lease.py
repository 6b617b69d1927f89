"""ptm_dist.lease: one driver per run directory. The refusal of a second `ptm pretrain` while the
first lives, and the re-run after the first was SIGKILLed, are in
tests/e2e/test_faults.py::test_killed_driver_then_same_command_resumes_exactly_once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ptm_dist import lease


def _plant(run_dir, **fields) -> dict:
    record = {"host": "elsewhere", "machine": "elsewhere/boot", "pid": 4242, "command": "pretrain",
              "started": time.time() - 100, "renewed": time.time(), **fields}
    (run_dir / lease.LEASE_FILE).write_text(json.dumps(record))
    return record


def test_a_live_lease_of_another_machine_is_refused_with_its_holder_named(tmp_path):
    _plant(tmp_path)
    with pytest.raises(lease.RunInUseError) as err:
        lease.Lease(str(tmp_path), "pretrain").acquire()
    msg = str(err.value)
    print(msg)
    assert msg.startswith(f"{tmp_path} is in use by the driver on host elsewhere, pid 4242, started ")
    assert "lease renewed 0s ago" in msg and f"{lease.TTL_S:.0f}s after its last renewal" in msg
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["pid"] == 4242  # left as it was


def test_an_expired_lease_is_taken_over_and_released_at_the_end(tmp_path):
    _plant(tmp_path, renewed=time.time() - lease.TTL_S - 1)
    with lease.hold(str(tmp_path)) as held:
        mine = json.loads((tmp_path / lease.LEASE_FILE).read_text())
        assert mine["pid"] == os.getpid() and mine["machine"] == lease.machine() and held.record == mine
    assert not (tmp_path / lease.LEASE_FILE).exists()


def test_on_this_machine_a_dead_holder_frees_the_lease_at_once_and_a_live_one_keeps_it(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    _plant(tmp_path, machine=lease.machine(), pid=int(dead.stdout))
    with lease.hold(str(tmp_path)):
        pass
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path, machine=lease.machine(), pid=live.pid)
        with pytest.raises(lease.RunInUseError, match=f"pid {live.pid}"):
            lease.Lease(str(tmp_path), "pretrain").acquire()
    finally:
        live.kill()
        live.wait()


def test_the_holder_renews_its_lease_and_leaves_a_taken_over_one_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    held = lease.Lease(str(tmp_path), "pretrain")
    held.acquire()
    first = lease.read(str(tmp_path))["renewed"]
    deadline = time.monotonic() + 10
    while lease.read(str(tmp_path))["renewed"] == first:
        assert time.monotonic() < deadline, "never renewed"
        time.sleep(0.02)
    held._stop.set()  # stop renewing, then another driver takes the (expired) lease over
    held._thread.join()
    other = _plant(tmp_path)
    held.release()
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text()) == other


def test_this_process_takes_over_its_own_stale_lease_but_not_one_it_holds(tmp_path):
    """A lease of this process that no `hold` has now was left by an earlier command whose
    release could not delete it (its directory was unwritable then): the next command takes it."""
    _plant(tmp_path, machine=lease.machine(), pid=os.getpid())
    with lease.hold(str(tmp_path)), pytest.raises(lease.RunInUseError, match="already in use by this process"):
        lease.Lease(str(tmp_path), "pretrain").acquire()
    assert not (tmp_path / lease.LEASE_FILE).exists()
