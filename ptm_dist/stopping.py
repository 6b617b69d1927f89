"""Stopping a run at a step boundary when asked: SIGTERM to the driver (a spot instance's
preemption notice, Kubernetes ending a pod, ``kill PID``) -> a complete checkpoint at the next
step boundary, then the run ends and the same command continues from that step.

    driver (ptm pretrain)                         workers (every rank)
    SIGTERM -> writes <run_dir>/STOP_REQUEST      rank 0 polls for the file (a thread, once a
               starts the grace timer             second: one metadata read, also on S3)
                                                  after every step all ranks agree (one all-reduce
                                                  of a flag), checkpoint that step, end the loop
    fit() returns -> RunStopped (exit 143)

The request is a file in run storage because that is what driver and workers share on every
kind of cluster; the driver removes a stale one before its workers start. Past
``train.preempt_grace_s`` the driver stops without waiting further (Ctrl-C's path): a checkpoint
left half written has no ``COMPLETE`` marker and is never resumed from. A second SIGTERM stops
at once the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

from ptm_dist import storage

STOP_FILE = "STOP_REQUEST"
POLL_S = 1.0
PREEMPTION_CHECK_S = 1.0
EXIT_STATUS = 143  # 128 + SIGTERM, what a process ended by SIGTERM reports: schedulers re-queue it


class RunStopped(Exception):
    """The run stopped on request after writing a checkpoint; the message says where and how to
    continue. Not an error of the user's: the CLI prints it and exits with EXIT_STATUS."""


def request(run_dir: str, reason: str, grace_s: float) -> None:
    storage.write_text(storage.join(run_dir, STOP_FILE), json.dumps(
        {"reason": reason, "time": time.time(), "grace_s": grace_s, "pid": os.getpid()}) + "\n")


def clear(run_dir: str) -> None:
    """Remove a request left by an earlier command, so it does not stop this one."""
    storage.delete_file(storage.join(run_dir, STOP_FILE))


def read(run_dir: str) -> dict | None:
    return storage.read_json(storage.join(run_dir, STOP_FILE))  # caught mid-write: the next poll


class DriverStop:
    """What the driver's SIGTERM handler did: ``reason`` once a stop was requested."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.timer: threading.Timer | None = None


@contextlib.contextmanager
def on_sigterm(run_dir: str, grace_s: float, say=print) -> Iterator[DriverStop]:
    """While the block runs (the driver waiting on its workers), SIGTERM asks the workers to
    checkpoint and stop instead of ending this process; restores the previous handler after.
    Outside the main thread (where signal handlers cannot be set) it does nothing."""
    state = DriverStop()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def give_up() -> None:
        say(f"[ptm] no checkpoint within train.preempt_grace_s={grace_s:g}s of the stop request: "
            "stopping without one (the newest complete checkpoint is kept)")
        # A second SIGTERM to ourselves: the handler below raises KeyboardInterrupt in the main
        # thread. (_thread.interrupt_main runs whatever SIGINT handler is set, or nothing.)
        os.kill(os.getpid(), signal.SIGTERM)

    def handler(signum, frame) -> None:
        if state.reason is not None:  # a second SIGTERM: stop at once
            raise KeyboardInterrupt
        state.reason = signal.Signals(signum).name
        request(run_dir, state.reason, grace_s)
        say(f"[ptm] {state.reason}: checkpointing at the next step boundary, then stopping "
            f"(train.preempt_grace_s={grace_s:g}s; a second {state.reason} stops at once)")
        state.timer = threading.Timer(grace_s, give_up)
        state.timer.daemon = True
        state.timer.start()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        if state.timer is not None:
            state.timer.cancel()
        # None: a handler installed outside Python, which Python cannot put back; the default
        # (end the process) is the nearest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class StopWatch:
    """Worker side: rank 0 watches for the request; ``requested()`` is a collective every rank
    calls after each step, so that all ranks stop after the same one.

    ``preemption`` (on Ray Train: ``ray.train.get_preemption_info``, itself a collective) is
    asked about once every PREEMPTION_CHECK_S, on every rank at the same step (rank 0's clock
    decides, through the same all-reduce); ``drained`` then holds what it said once a node of
    the run is being drained (a preemption notice)."""

    def __init__(self, run_dir: str, rank: int, world: int, preemption=None) -> None:
        self.run_dir, self.world, self.rank = run_dir, world, rank
        self.reason: str | None = None
        self.preemption = preemption
        self.drained = None
        self.all_idle = True
        self._last_check = time.monotonic()
        self._seen = threading.Event()
        self._done = threading.Event()
        self._group = None
        if world > 1:
            import torch.distributed as dist

            # The flag is a CPU tensor: a gloo group of its own when the training group is NCCL.
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")
        if rank == 0:
            threading.Thread(target=self._poll, name="ptm-stop-watch", daemon=True).start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                info = read(self.run_dir)
            except OSError:  # storage unreachable for a moment: look again next time
                info = None
            if info is not None:
                self.reason = str(info.get("reason", "a stop request"))
                self._seen.set()
                # (no "[ptm]" prefix: this goes to the worker's log only, the driver said it already)
                print(f"stop request received ({self.reason})", flush=True)
                return
            self._done.wait(POLL_S)

    def requested(self, busy: bool = False) -> bool:
        """Whether to stop after this step. ``busy``: this rank is still uploading a checkpoint;
        ``self.all_idle`` then tells whether no rank is (the same answer on every rank)."""
        flag = self._seen.is_set()
        check = self.preemption is not None and self.rank == 0 and \
            time.monotonic() - self._last_check >= PREEMPTION_CHECK_S
        if self.world > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor([int(flag), int(check), int(busy)], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag, check, busy = bool(t[0]), bool(t[1]), bool(t[2])
        self.all_idle = not busy
        if check:
            self._last_check = time.monotonic()
            self.drained = self.preemption()
        return flag

    def close(self) -> None:
        self._done.set()


def describe_drain(info) -> str:
    """A PreemptionInfo (ray.train) in a few words."""
    nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
    left = f", {info.deadline_ms / 1000 - time.time():.0f}s before the deadline" if info.deadline_ms else ""
    return f"node {nodes or '?'} with ranks {info.preempted_ranks}{left}"
