"""ptm_dist.stopping in one process: the driver's SIGTERM handler (request file, grace timer,
second signal) and the workers' watch for the request (world of one). The whole path through
Ray Train (a checkpoint at the next step, exit 143, an exact resume) is
tests/e2e/test_faults.py::test_sigterm_checkpoints_at_the_next_step_and_the_same_command_resumes_there."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ptm_dist import stopping


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_writes_the_request_and_past_the_grace_period_interrupts_the_driver(tmp_path):
    said: list[str] = []

    def outer(signum, frame):  # a known Python handler (what pytest's process had may be none)
        raise AssertionError("the outer handler ran")

    inherited = signal.signal(signal.SIGTERM, outer)
    # Whatever SIGINT does in this process must not matter (in CI an earlier test left it
    # ignored, and the first version of the grace timer, which simulated a SIGINT, did nothing).
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), stopping.on_sigterm(str(tmp_path), 0.3, said.append) as state:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait_for(lambda: state.reason is not None)
            request = stopping.read(str(tmp_path))
            assert request["reason"] == "SIGTERM" and request["grace_s"] == 0.3 and request["pid"] == os.getpid()
            _wait_for(lambda: False)  # only the grace timer's interrupt ends this
        assert signal.getsignal(signal.SIGTERM) is outer  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if inherited is None else inherited)
        signal.signal(signal.SIGINT, signal.SIG_DFL if sigint is None else sigint)
    assert said[0].startswith("[ptm] SIGTERM: checkpointing at the next step boundary")
    assert said[1].startswith("[ptm] no checkpoint within train.preempt_grace_s=0.3s")


def test_a_handler_python_cannot_put_back_is_replaced_by_the_default(tmp_path, monkeypatch):
    """signal.signal returns None for a handler installed outside Python (C code); restoring None
    would raise TypeError as the driver ends."""
    real = signal.signal
    calls = []

    def fake(signum, handler):
        calls.append(handler)
        old = real(signum, handler)
        return None if len(calls) == 1 else old

    monkeypatch.setattr(stopping.signal, "signal", fake)
    try:
        with stopping.on_sigterm(str(tmp_path), 60, lambda line: None):
            pass
        assert calls[-1] is signal.SIG_DFL
    finally:
        real(signal.SIGTERM, signal.SIG_DFL)


def test_a_second_sigterm_stops_at_once_and_leaving_the_block_cancels_the_timer(tmp_path):
    with pytest.raises(KeyboardInterrupt), stopping.on_sigterm(str(tmp_path), 60, lambda line: None) as state:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: state.reason is not None)
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: False)
    assert state.timer.finished.is_set()  # cancelled: no interrupt 60 s from now

    with stopping.on_sigterm(str(tmp_path / "b"), 60, lambda line: None) as quiet:
        pass
    assert quiet.reason is None and quiet.timer is None


def test_workers_see_a_request_and_a_cleared_one_is_gone(tmp_path):
    run_dir = str(tmp_path)
    stopping.request(run_dir, "SIGTERM", 30)
    stopping.clear(run_dir)  # a new command removes an earlier request before its workers start
    assert stopping.read(run_dir) is None
    stopping.clear(run_dir)  # nothing to remove: no error

    watch = stopping.StopWatch(run_dir, rank=0, world=1)
    try:
        assert not watch.requested()
        stopping.request(run_dir, "SIGTERM", 30)
        _wait_for(watch.requested, seconds=5 * stopping.POLL_S)
        assert watch.reason == "SIGTERM"
    finally:
        watch.close()



def _busy_ranks(rank: int, port: int, run_dir: str, out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    watch = stopping.StopWatch(run_dir, rank=rank, world=2)
    try:
        seen = []
        # rank 1 still uploading, then neither; the flag each rank passes is its own
        for busy in ((False, True), (False, False)):
            stop = watch.requested(busy=busy[rank])
            seen.append([stop, watch.all_idle])
        if rank == 0:
            stopping.request(run_dir, "SIGTERM", 30)
            _wait_for(lambda: watch._seen.is_set(), seconds=5 * stopping.POLL_S)
        dist.barrier()
        seen.append([watch.requested(busy=False), watch.all_idle])  # rank 0 saw it: both stop
        with open(f"{out}/{rank}", "w") as f:
            json.dump(seen, f)
    finally:
        watch.close()
        dist.destroy_process_group()


def test_every_rank_gets_the_same_answers_from_the_per_step_all_reduce(tmp_path):
    """Two gloo ranks: while one rank's background upload is running neither commits the
    checkpoint; once no rank is busy both do; a stop request only rank 0 has seen stops both."""
    import json

    import torch.multiprocessing as mp

    from ptm_dist.dist import free_port

    mp.start_processes(_busy_ranks, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    want = [[False, False], [False, True], [True, True]]
    assert [json.loads((tmp_path / str(r)).read_text()) for r in (0, 1)] == [want, want]
