"""One driver per run directory: a lease file in run storage.

    with lease.hold(run_dir):     # refuses if another live driver holds it
        ...train...

``<run_dir>/DRIVER_LEASE`` names its holder (host, pid, start time) and when it was last renewed;
the holder renews it every RENEW_S from a thread and removes it when it ends. Another driver
(a resubmitted job, the same command in a second terminal) is refused while the lease is live:
two drivers on one run directory would write the same checkpoints and metrics. A holder that
died without removing it (SIGKILL, a lost node) stops renewing: its lease expires TTL_S after
the last renewal, and at once when the holder was on this machine and its process is gone.

Not covered: two drivers that start within the same moment can both see no lease (the check and
the write are two steps; pyarrow's object-store filesystems offer no create-if-absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from ptm_dist import storage
from ptm_dist.errors import UserError

LEASE_FILE = "DRIVER_LEASE"
TTL_S = 90.0
RENEW_S = 20.0


_HELD: set[str] = set()  # run directories this process holds now


class RunInUseError(UserError, RuntimeError):
    """Another live driver holds the run directory's lease."""


def machine() -> str:
    """This machine: its host name and boot id (processes of one boot share pid numbers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder_is_live(lease: dict) -> bool:
    if lease.get("machine") == machine() and lease.get("pid") != os.getpid() \
            and not _pid_alive(int(lease.get("pid", -1))):
        return False  # died on this machine: no need to wait for the expiry
    return time.time() - float(lease.get("renewed", 0)) < TTL_S


def read(run_dir: str) -> dict | None:
    return storage.read_json(storage.join(run_dir, LEASE_FILE))  # None: free (or being replaced)


def _describe(lease: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    ago = time.time() - float(lease.get("renewed", 0))
    return (f"the driver on host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, started {started} "
            f"(lease renewed {ago:.0f}s ago)")


class Lease:
    def __init__(self, run_dir: str, command: str) -> None:
        self.run_dir, self.path = run_dir, storage.join(run_dir, LEASE_FILE)
        self.record = {"host": socket.gethostname(), "machine": machine(), "pid": os.getpid(),
                       "command": command, "started": time.time(), "renewed": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        current = read(self.run_dir)
        if current is not None and holder_is_live(current):
            if current.get("machine") == machine() and current.get("pid") == os.getpid():
                if self.run_dir in _HELD:
                    raise RunInUseError(f"{self.run_dir} is already in use by this process")
                # else: left by an earlier command of this process whose release could not
                # delete it (the directory was unwritable then): stale, taken over below
            else:
                raise RunInUseError(
                    f"{self.run_dir} is in use by {_describe(current)}; stop that run first "
                    f"(a driver that died without ending frees it {TTL_S:.0f}s after its last renewal)")
        self._write()
        _HELD.add(self.run_dir)
        self._thread = threading.Thread(target=self._renew, name="ptm-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.record["renewed"] = time.time()
        storage.write_text(self.path, json.dumps(self.record) + "\n")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            with contextlib.suppress(OSError):  # storage away for a moment: the next renewal
                self._write()

    def release(self) -> None:
        _HELD.discard(self.run_dir)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = read(self.run_dir)
        if current is not None and current.get("pid") == os.getpid() and current.get("machine") == machine():
            with contextlib.suppress(OSError):
                storage.delete_file(self.path)


@contextlib.contextmanager
def hold(run_dir: str, command: str = "pretrain") -> Iterator[Lease]:
    lease = Lease(run_dir, command)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()
