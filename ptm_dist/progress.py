"""Live progress for long commands: one updating bar on a terminal, plain lines otherwise.

    with Progress(total=500, desc="pretrain", unit="step") as bar:
        bar.update(10, loss="3.2100", tok_s="17.2k")     # absolute position, shown fields
        bar.write("[ptm] step 100 eval_loss 3.10")       # a line above the bar

On a terminal (or with ``PTM_PROGRESS=bar``) it is a tqdm bar with rate and ETA; when output is
not a terminal (CI, logs, ``| tee``) or with ``PTM_PROGRESS=plain`` it prints plain lines, at
most one per ``plain_interval`` seconds (and the last one), so logs stay readable.

Pretraining runs on Ray Train workers whose stdout Ray forwards line by line (which breaks
``\\r`` bars), so rank 0 pushes its metrics records to a small actor (:func:`start_board`) and
the driver draws the bar from them (:class:`BoardFollower`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Self, TextIO


def use_bar(stream: TextIO | None = None) -> bool:
    """Whether to draw an updating bar: PTM_PROGRESS=bar|plain, else whether it is a terminal."""
    forced = os.environ.get("PTM_PROGRESS", "").strip().lower()
    if forced in ("bar", "plain"):
        return forced == "bar"
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


_bar: Progress | None = None  # the bar on the terminal now, if any


def print_line(line: str) -> None:
    """A line of ptm's own on stdout: above the live bar when one is drawn."""
    bar = _bar
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def human(x: float) -> str:
    """17234 -> '17.2k', 3.4e6 -> '3.40M'."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Progress of ``total`` units (None: unknown) with free-form fields (name -> text)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0,
                 stream: TextIO | None = None, bar: bool | None = None, plain_interval: float = 0.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stdout
        self.bar = use_bar(self.stream) if bar is None else bar
        self.plain_interval = plain_interval
        self.n = self.start_n = initial
        self.fields: dict[str, str] = {}
        self.t0 = time.monotonic()
        self._last_line = -float("inf")
        self._printed_n: int | None = None
        self._tqdm = None
        self._closed = False
        if self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                              dynamic_ncols=True, smoothing=0.1, leave=True)
            global _bar
            _bar = self

    def update(self, n: int, total: int | None = None, **fields) -> None:
        """Move to absolute position ``n`` (of ``total``, when it is now known better) and show
        ``fields`` (values as given, or formatted)."""
        if total is not None and total != self.total:
            self.total = total
            if self._tqdm is not None:
                self._tqdm.total = total
        self.fields.update({k.replace("_", "/"): _text(v) for k, v in fields.items() if v is not None})
        step, self.n = n - self.n, n
        if self._closed:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(self._fields_text(), refresh=False)
            self._tqdm.update(step)
            if self.total is not None and n >= self.total:
                self.close()  # final rate and time are those of the work, not of what follows
            return
        now = time.monotonic()
        if now - self._last_line >= self.plain_interval or (self.total is not None and n >= self.total):
            self._print_line()
            self._last_line = now

    def eta(self) -> float | None:
        done = self.n - self.start_n
        if self.total is None or done <= 0:
            return None
        return (self.total - self.n) * (time.monotonic() - self.t0) / done

    def _fields_text(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.fields.items())

    def _print_line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        eta = self.eta()
        tail = f" eta {format_duration(eta)}" if eta is not None else ""
        print(f"[ptm] {self.desc} {self.n}{of} {self.unit} {self._fields_text()}{tail}".replace("  ", " "),
              file=self.stream, flush=True)
        self._printed_n = self.n

    def write(self, line: str) -> None:
        """A line of its own, above the bar."""
        if self._tqdm is not None and not self._closed:
            self._tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        global _bar
        if _bar is self:
            _bar = None
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._printed_n != self.n and self.n != self.start_n:
            self._print_line()  # the last position is always shown

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ------------------------------------------------------------------ pretraining on Ray


def start_board():
    """A Ray actor that holds the records rank 0 pushes, for the driver to draw."""
    import ray

    @ray.remote(num_cpus=0)
    class RecordBoard:
        def __init__(self):
            self.records: list[dict] = []

        def push(self, record: dict) -> None:
            self.records.append(record)

        def since(self, n: int) -> list[dict]:
            return self.records[n:]

    return RecordBoard.remote()


def step_fields(record: dict) -> dict:
    """The bar fields of one pretraining metrics record."""
    out = {"loss": f"{record['loss']:.4f}", "tok_s": human(record["tokens_per_s"])}
    if record.get("mfu") is not None:
        out["MFU"] = f"{record['mfu']:.1%}"
    return out


class BoardFollower:
    """Driver-side thread drawing a :class:`Progress` bar from a board's records."""

    def __init__(self, board, total: int, initial: int, stream: TextIO | None = None,
                 poll_s: float = 0.5):
        self.board, self.total, self.initial, self.stream, self.poll_s = board, total, initial, stream, poll_s
        self.seen = 0
        self.progress: Progress | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ptm-progress", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):  # Ray may already be gone; progress is best effort
            self._drain()
        if self.progress is not None:
            self.progress.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - never let the bar take the run down
                return

    def _drain(self) -> None:
        import ray

        records = ray.get(self.board.since.remote(self.seen), timeout=30)
        self.seen += len(records)
        for r in records:
            if "loss" in r:
                if self.progress is None:
                    # Created at the first step so the rate leaves out start-up time.
                    self.progress = Progress(self.total, "pretrain", "step", initial=self.initial,
                                             stream=self.stream, bar=True)
                self.progress.update(r["step"], **step_fields(r))
            elif "eval_loss" in r:
                line = f"[ptm] step {r['step']} eval_loss {r['eval_loss']:.4f}"
                if self.progress is None:
                    print(line, file=self.stream or sys.stdout, flush=True)
                else:
                    self.progress.write(line)
                    self.progress.update(r["step"], eval=f"{r['eval_loss']:.4f}")
