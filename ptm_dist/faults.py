"""Fault injection for testing fault tolerance: named points in the training and checkpoint code.

Off unless the environment variable ``PTM_FAULT`` is set; then each named point it lists fails
in the way it says. The failures are real (an exception, a process exit, a SIGKILL of the
process, an ``OSError(ENOSPC)`` inside a write, a NaN in the loss), so what happens next is the
system's own behaviour, not a mock's.

    PTM_FAULT="<point>[@<step>[-<step>]][#<rank>][:<action>], ..."

    point    a name passed to fault_point()/poison_loss(), e.g. save.after_report (see POINTS)
    @steps   only while the trainer is at these optimizer steps (the step being taken or saved)
    #rank    only on this worker rank
    action   raise (default: RuntimeError) | exit (os._exit(3)) | kill (SIGKILL this process) |
             enospc (OSError ENOSPC, "disk full") | hang (sleep until killed) |
             wait (sleep until the file $PTM_FAULT_RELEASE exists, at most 10 minutes) |
             nan | inf | gradnan | spike (train.loss only: a non-finite loss, a finite loss
             with NaN gradients, or the loss times 10)

``PTM_FAULT_ONCE=<dir>`` makes each entry fire once per directory, across processes and
restarts (a file per entry is created there when it fires), so a restarted run goes on.

``ptm pretrain`` forwards these variables to its Ray Train workers (see ``for_workers``).
Examples: ``PTM_FAULT=train.step@25#1:kill`` SIGKILLs rank 1 as it starts step 25;
``PTM_FAULT=save.marker_partial@20:exit`` exits with half of step 20's COMPLETE marker written.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time

# The points the code calls (checkpoint save order first), for documentation and tests.
POINTS = (
    "save.begin",              # a checkpoint save starts (every rank)
    "save.after_deepspeed",    # DeepSpeed wrote model and optimizer states to the local temp dir
    "save.after_rank_state",   # rank_<r>.pt written locally
    "save.before_report",      # all local files written, nothing in storage yet
    "save.after_report",       # this rank's files are in storage (ray.train.report returned;
                               # with train.ckpt_upload background: the upload was handed off)
    "save.upload",             # a background upload starts (Ray Train's upload thread)
    "save.before_marker",      # every rank's files are in storage (after the barrier), rank 0
    "save.marker_partial",     # half of the COMPLETE marker's temp file written
    "save.after_marker",       # checkpoint complete, retention not run
    "save.during_retention",   # after retention deleted its first directory
    "save.before_metrics_sync",
    "save.end",                # after metrics.jsonl is synced to storage
    "train.step",              # before optimizer step <step> (every rank)
    "train.loss",              # value hook on the step's last micro-batch loss
)

_ENTRY = re.compile(r"^(?P<point>[\w.]+)(?:@(?P<lo>\d+)(?:-(?P<hi>\d+))?)?(?:#(?P<rank>\d+))?"
                    r"(?::(?P<action>\w+))?$")


_VARIABLES = ("PTM_FAULT", "PTM_FAULT_ONCE", "PTM_FAULT_RELEASE")


class InjectedFault(RuntimeError):
    """Raised by an injected ``raise`` fault."""


def _entries():
    spec = os.environ.get("PTM_FAULT", "")
    for raw in filter(None, (s.strip() for s in spec.split(","))):
        m = _ENTRY.match(raw)
        if m is None:
            raise ValueError(f"PTM_FAULT entry {raw!r} is not <point>[@step[-step]][#rank][:action]")
        yield raw, m


def _matching(point: str, step: int | None, rank: int | None) -> tuple[str, str] | None:
    """(entry, action) of the first entry for ``point`` that applies now, else None."""
    for raw, m in _entries():
        if m["point"] != point:
            continue
        if m["lo"] is not None:
            lo = int(m["lo"])
            hi = int(m["hi"]) if m["hi"] else lo
            if step is None or not lo <= step <= hi:
                continue
        if m["rank"] is not None and rank is not None and int(m["rank"]) != rank:
            continue
        if not _claim(raw, step):
            continue
        return raw, (m["action"] or "raise")
    return None


def once_file(entry: str) -> str:
    """The file name under PTM_FAULT_ONCE that records when ``entry`` fired ("pid P step S")."""
    return re.sub(r"[^\w.-]", "_", entry)


def _claim(raw: str, step: int | None) -> bool:
    """With PTM_FAULT_ONCE, True only the first time (any process) this entry fires."""
    once = os.environ.get("PTM_FAULT_ONCE")
    if not once:
        return True
    os.makedirs(once, exist_ok=True)
    try:
        fd = os.open(os.path.join(once, once_file(raw)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"pid {os.getpid()} step {step}\n".encode())
    os.close(fd)
    return True


def fault_point(point: str, step: int | None = None, rank: int | None = None) -> None:
    """Fail here if PTM_FAULT names this point (and step and rank); nothing otherwise."""
    if "PTM_FAULT" not in os.environ:
        return
    hit = _matching(point, step, rank)
    if hit is None:
        return
    raw, action = hit
    where = f"{point} (step {step}, rank {rank})"
    print(f"[ptm] injected fault {raw!r} at {where}, pid {os.getpid()}", flush=True)
    if action == "raise":
        raise InjectedFault(f"injected fault at {where}")
    if action == "exit":
        os._exit(3)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is asynchronous; never run on past the point
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {point})")
    if action == "hang":
        while True:
            time.sleep(1)
    if action == "wait":
        release = os.environ.get("PTM_FAULT_RELEASE", "")
        deadline = time.monotonic() + 600
        while not (release and os.path.exists(release)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    raise ValueError(f"PTM_FAULT {raw!r}: action {action!r} does not apply at {point}")


def poison_loss(loss, step: int, rank: int):
    """train.loss value hook: nan/inf make the loss non-finite; gradnan keeps the loss finite
    but makes the gradients NaN (d sqrt(x)/dx at 0 is inf, times 0)."""
    if "PTM_FAULT" not in os.environ:
        return loss
    hit = _matching("train.loss", step, rank)
    if hit is None:
        return loss
    raw, action = hit
    print(f"[ptm] injected fault {raw!r} at train.loss (step {step}, rank {rank})", flush=True)
    if action in ("nan", "inf"):
        return loss * float(action)
    if action == "gradnan":
        return loss + (loss * 0).sqrt()
    if action == "spike":
        return loss * 10.0
    raise ValueError(f"PTM_FAULT {raw!r}: train.loss takes nan, inf, gradnan or spike, not {action!r}")


def for_workers() -> dict[str, str]:
    """The fault settings of this process, to hand to Ray Train workers."""
    return {k: os.environ[k] for k in _VARIABLES if k in os.environ}


def install(settings: dict[str, str] | None) -> None:
    """In a worker: take the driver's fault settings (and drop stale ones of a reused process)."""
    for key in _VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(settings or {})
