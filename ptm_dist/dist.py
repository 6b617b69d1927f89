"""Worker-side distributed helpers, with no Ray in them: a process group of one, ports, RNG
state and reductions over ranks.

    init_single_process(device)       # rank 0 of a world of one (debugger, benchmarks, trials)
    state = rng_state(); set_rng_state(state)
    mean = mean_over_ranks(loss)      # plain float; a no-op reduction without a process group
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_environment_extensions_dir() -> str:
    """Point torch's JIT extension builds (DeepSpeed's CPU communication op) at a directory of
    this Python environment's own, unless TORCH_EXTENSIONS_DIR is set; returns the directory.

    torch's default, ``~/.cache/torch_extensions/py311_cpu``, is shared by every environment on
    the machine, while a build records the paths of the DeepSpeed sources it was made from: two
    virtual environments (a checkout's and a CI clone's) using it in turn rebuilt the op for
    each other, 40-60 s at each switch. Keyed by ``sys.prefix``, each builds once."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    env = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(cache, "torch_extensions",
                        f"py{sys.version_info.major}{sys.version_info.minor}_{accel}-env{env}")
    os.environ["TORCH_EXTENSIONS_DIR"] = path
    return path


def init_single_process(device: torch.device) -> None:
    """Start a process group of one (gloo on CPU, NCCL on GPU) unless one is running, and make
    ``device`` current. DeepSpeed needs a process group even for one process."""
    if not dist.is_initialized():
        # Set, not defaulted: values inherited from another process (a parent that ran a group
        # of its own) would point this group at a port that process holds.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        # An in-process store: a group of one needs no TCP rendezvous, and binding MASTER_PORT
        # raced with other processes (two sweep trials starting at once: EADDRINUSE).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        # The group is ours: end it while the interpreter is whole. Left to interpreter
        # finalization, gloo's worker threads can die holding Python objects and the process
        # aborts at exit ("terminate called without an active exception", exit -6: seen once
        # in CI, a test script that trains with local_trainer).
        atexit.register(_destroy_own_group)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _destroy_own_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rng_state() -> dict:
    """Every random generator a worker draws from (torch, numpy, python, CUDA when present)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of ``value`` over all ranks (``value`` itself without a process group)."""
    if world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size()
    return float(value)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
