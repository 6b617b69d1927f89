"""Run metrics: ``metrics.jsonl`` in the run directory, one JSON object per line.

Training lines carry step, loss, lr, grad_norm, tokens_per_s, data_wait_frac (and mfu where
a GPU peak is known); eval lines carry step and eval_loss. Only rank 0 writes. For object
storage the file is kept locally and uploaded at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ptm_dist import storage

# Dense bf16 datasheet peaks (FLOP/s) used for MFU.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "L40": 181e12}


def gpu_peak_flops(device_name: str) -> float | None:
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


class MetricsLog:
    def __init__(self, run_dir: str, resume_step: int | None = None):
        self.target = storage.join(run_dir, "metrics.jsonl")
        if storage.is_uri(run_dir):
            self.local = Path(tempfile.mkdtemp(prefix="ptm-metrics-")) / "metrics.jsonl"
            old = storage.read_text(self.target) if storage.exists(self.target) else ""
        else:
            self.local = Path(self.target)
            old = self.local.read_text() if self.local.exists() else ""
        # Lines past the step we resume from belong to work that was lost with the crash.
        keep = [ln for ln in old.splitlines() if ln.strip() and resume_step is not None
                and json.loads(ln).get("step", 0) <= resume_step]
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.write_text("".join(ln + "\n" for ln in keep))
        self._f = open(self.local, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> None:
        if str(self.local) != self.target:
            storage.write_text(self.target, self.local.read_text())

    def close(self) -> None:
        self._f.close()
        self.sync()


def read_metrics(run_dir: str) -> list[dict]:
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]
