"""ptm_dist.dist and the rank agreement built on it, in a real 2-process gloo group (no Ray)."""

from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from ptm_dist import checkpoint as ck
from ptm_dist.dist import free_port


def _agree(rank: int, port: int, run_dirs: list[str], out: str) -> None:
    from ptm_dist.train.loop import agreed_resume_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        chosen = agreed_resume_checkpoint(run_dirs[rank], rank)
        with open(f"{out}/{rank}", "w") as f:
            f.write(str(chosen))
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    """Rank 1's listing shows a newer complete checkpoint than rank 0's (a listing that differs
    between nodes): both resume from rank 0's choice."""
    run0, run1 = tmp_path / "seen_by_0", tmp_path / "seen_by_1"
    for run, steps in ((run0, (10,)), (run1, (10, 20))):
        for step in steps:
            d = run / ck.checkpoint_name(step)
            d.mkdir(parents=True)
            ck.mark_complete(str(d), {"step": step})
    assert ck.latest_complete_checkpoint(str(run1)).endswith("checkpoint_00000020")
    mp.start_processes(_agree, args=(free_port(), [str(run0), str(run1)], str(tmp_path)), nprocs=2,
                       start_method="spawn")
    want = str(run0 / "checkpoint_00000010")
    assert (tmp_path / "0").read_text() == want and (tmp_path / "1").read_text() == want


def test_each_python_environment_builds_torch_extensions_in_its_own_directory(monkeypatch, tmp_path):
    import sys

    from ptm_dist.dist import use_environment_extensions_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dirs = []
    for prefix in ("/work/main/.venv", "/tmp/ci/.venv"):
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        monkeypatch.setattr(sys, "prefix", prefix)
        path = use_environment_extensions_dir()
        assert os.environ["TORCH_EXTENSIONS_DIR"] == path  # what torch's JIT builder reads
        assert os.path.dirname(path) == str(tmp_path / "torch_extensions")
        assert os.path.basename(path).startswith(f"py{sys.version_info.major}{sys.version_info.minor}_")
        dirs.append(path)
    assert dirs[0] != dirs[1]
    monkeypatch.setattr(sys, "prefix", "/work/main/.venv")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert use_environment_extensions_dir() == dirs[0]  # stable: built once per environment
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert use_environment_extensions_dir() == str(tmp_path / "mine")  # the user's choice is kept


def test_a_group_of_one_is_destroyed_before_the_interpreter_exits(tmp_path):
    """init_single_process's group is ended by an exit hook of its own, while the interpreter is
    still whole (left to finalization, gloo's threads can abort a finished process with
    "terminate called without an active exception"). Exit hooks run last-registered first, so a
    hook registered before the group sees what finalization will see."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import atexit
        import torch
        import torch.distributed as dist
        from ptm_dist.dist import init_single_process
        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        init_single_process(torch.device("cpu"))
        t = torch.ones(3)
        dist.all_reduce(t)
        print("sum", t.tolist(), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-2:] == ["sum [1.0, 1.0, 1.0]", "initialized at exit: False"], proc.stdout
