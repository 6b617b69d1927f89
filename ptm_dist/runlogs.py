"""What the terminal shows during a run, and where everything else goes: ``<run_dir>/logs/``.

    with RunLogs(run_dir, "pretrain") as logs:   # before Ray starts
        ...                                        # start Ray, train
    print(f"logs: {logs.where}")

The terminal shows ptm's own lines: what the driver prints on stdout (progress, evaluations,
checkpoints, warnings, the summary) and the lines Ray workers print starting with ``[ptm]``
(or ``[ptm trial <id>]``).
Everything else goes to files in ``logs/``:

- ``driver.log``: this process's stderr at the file-descriptor level (Python logging and
  warnings, Ray's own messages and its C++ core), and what Ray forwards from its other
  processes (the Train controller, raylet, Ray Data tasks), each line prefixed with its
  process as Ray prints it; a traceback of whatever stopped the command.
- ``worker<rank>.log``: everything Ray Train worker ``rank`` printed (stdout and stderr:
  DeepSpeed, transformers, PyTorch, Ray Train, Ray Data), across worker-group restarts.

A command appends to the files, under a header line with the command and the time.
``PTM_VERBOSE=1`` (or ``--verbose``) prints everything on the terminal as Ray does; the files
are still written (without the driver's own stderr). Object-store run directories: the files
are written to a local temporary directory and copied to ``<run_dir>/logs/`` (appended to what
earlier commands left) when the command ends; the summary names both.

Ray's forwarded output reaches :func:`route` through ptm_dist.launch, which owns every Ray
internal; this module does not import Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Self, TextIO

from ptm_dist import progress, storage

# A worker announces its rank with this line (train_loop's first line); the router maps the
# worker's process to worker<rank>.log and shows the line nowhere.
RANK_MARK = "[ptm-log] rank "
_MARK = re.compile(re.escape(RANK_MARK) + r"(\d+)$")
_PTM_LINE = re.compile(r"\[ptm[\] ]")  # [ptm] ..., [ptm trial 3] ...


def verbose() -> bool:
    """PTM_VERBOSE=1 (``--verbose`` sets it): library output on the terminal too."""
    return os.environ.get("PTM_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def rank_mark(rank: int) -> str:
    return f"{RANK_MARK}{rank}"


def source_of(data: dict) -> str:
    """'(TrainController pid=1674, ip=10.0.0.2)': the process a forwarded batch comes from."""
    name = data.get("actor_name") or data.get("task_name") or ""
    pid = data.get("pid")
    who = f"{name} pid={pid}" if name else f"pid={pid}" if pid not in ("raylet", "autoscaler") else str(pid)
    return f"({who}, ip={data.get('ip')})" if data.get("ip") else f"({who})"


def shown_on_terminal(line: str) -> bool:
    """Whether a line forwarded from a Ray process is one of ptm's own."""
    return _PTM_LINE.match(line) is not None


class RunLogs:
    """The log directory of one command on one run directory (see the module docstring)."""

    def __init__(self, run_dir: str, command: str):
        self.run_dir, self.command = run_dir, command
        self.target = storage.join(run_dir, "logs")
        if storage.is_uri(run_dir):
            self.local = Path(tempfile.mkdtemp(prefix="ptm-logs-"))
        else:
            self.local = Path(self.target)
        self.where = str(self.local) if not storage.is_uri(run_dir) else f"{self.target} (written in {self.local})"
        self.driver_log = self.local / "driver.log"
        self._files: dict[str, TextIO] = {}
        self._ranks: dict[tuple, int] = {}  # (ip, pid) of a worker -> its rank
        self._pending: dict[tuple, list[str]] = {}  # worker lines before its rank is known
        self._lock = threading.Lock()
        self._saved_stderr: int | None = None
        self._saved_sys_stderr: TextIO | None = None
        self.redirected = False
        self._closed = False

    # ---------------------------------------------------------------- files

    def _file(self, name: str) -> TextIO:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self.local / name, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            f.write(f"=== ptm {self.command} {time.strftime('%Y-%m-%d %H:%M:%S')} (driver pid {os.getpid()}) ===\n")
        return f

    def worker_log(self, rank: int) -> Path:
        return self.local / f"worker{rank}.log"

    def record(self, data: dict) -> None:
        """File one batch of lines Ray forwarded (called from Ray's log thread)."""
        lines = data.get("lines") or []
        key = (data.get("ip"), data.get("pid"))
        with self._lock:
            if self._closed:  # a batch that was under way when the command ended
                return
            for line in lines:
                m = _MARK.match(line)
                if m:
                    rank = self._ranks[key] = int(m.group(1))
                    f = self._file(f"worker{rank}.log")
                    f.write(f"--- rank {rank}: {source_of(data)} ---\n")
                    for held in self._pending.pop(key, []):
                        f.write(held + "\n")
                    continue
                if key in self._ranks:
                    self._file(f"worker{self._ranks[key]}.log").write(line + "\n")
                elif "TrainWorker" in (data.get("actor_name") or ""):
                    self._pending.setdefault(key, []).append(line)
                else:
                    self._file("driver.log").write(f"{source_of(data)} {line}\n")

    # ---------------------------------------------------------------- context

    def __enter__(self) -> Self:
        global _active
        self.local.mkdir(parents=True, exist_ok=True)
        f = self._file("driver.log")
        if not verbose():
            # fd 2, not only sys.stderr: Ray's C++ core, Python warnings and every logging
            # handler that captured the stream object at import time write there.
            sys.stderr.flush()
            self._saved_stderr = os.dup(2)
            os.dup2(f.fileno(), 2)
            self._saved_sys_stderr, sys.stderr = sys.stderr, f  # when sys.stderr is not fd 2 (tests)
            self.redirected = True
        _active = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _active
        _active = None
        with self._lock:
            for key, held in self._pending.items():  # workers that never announced a rank
                f = self._file("driver.log")
                for line in held:
                    f.write(f"(worker pid={key[1]}, ip={key[0]}) {line}\n")
            self._pending.clear()
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self._file("driver.log").write("".join(traceback.format_exception(exc_type, exc, tb)))
            if self.redirected:  # the CLI prints one line naming the file instead of the traceback
                exc.ptm_logs = str(self.driver_log)
        if self.redirected:
            sys.stderr.flush()
            sys.stderr = self._saved_sys_stderr
            os.dup2(self._saved_stderr, 2)
            os.close(self._saved_stderr)
            self.redirected = False
        with self._lock:
            self._closed = True
            for f in self._files.values():
                f.close()
            self._files.clear()
        if storage.is_uri(self.run_dir):
            self.upload()

    def upload(self) -> None:
        """Append this command's files to those in <run_dir>/logs/ (object storage)."""
        for path in sorted(self.local.iterdir()):
            target = storage.join(self.target, path.name)
            before = storage.read_text(target) if storage.exists(target) else ""
            storage.write_text(target, before + path.read_text())


_active: RunLogs | None = None


def active() -> RunLogs | None:
    return _active


def route(data: dict, ray_print) -> None:
    """Ray's forwarded output (one batch of lines of one process): into the open RunLogs'
    files, and onto the terminal either as Ray prints it (verbose, or no RunLogs open: commands
    that keep Ray's output) or only ptm's own lines."""
    logs = _active
    # The autoscaler's periodic status (Ray prints only its events) stays in Ray's own logs.
    if logs is not None and data.get("pid") != "autoscaler":
        logs.record(data)
    lines = [ln for ln in data.get("lines") or [] if not _MARK.match(ln)]
    if logs is None or not logs.redirected:
        if lines:
            ray_print({**data, "lines": lines})
        return
    for line in lines:
        if shown_on_terminal(line):
            progress.print_line(line)


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """What the libraries print while a model is exported and loaded (DeepSpeed's messages,
    progress bars), at the file-descriptor level: into the open RunLogs' driver log, else nowhere;
    PTM_VERBOSE=1 (--verbose) shows it."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    logs = active()
    # In a command that keeps <run_dir>/logs/ (pretrain's summary), fd 2 already goes there.
    sink = os.dup(2) if logs is not None and logs.redirected else os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, sink):
            os.close(fd)
