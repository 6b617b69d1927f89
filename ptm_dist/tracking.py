"""Run tracking: ``metrics.jsonl`` (always) and Weights & Biases (``tracking:`` in the job).

``metrics.jsonl`` in the run directory has one JSON object per line: training lines carry
step, loss, lr, grad_norm, tokens_per_s, data_wait_frac (and mfu where a GPU peak is known);
eval lines carry step and eval_loss. Only rank 0 writes. For object storage the file is kept
locally and uploaded at every checkpoint and at the end.

:class:`Tracker` is the one wandb run of a job, started on rank 0 (or the driver) only:

    tracker = Tracker.start(cfg, run_dir, job_type="pretrain", config={"job": cfg.to_dict()})
    tracker.log({"loss": 3.2}, step=10); tracker.summary({"eval_loss": 3.1}); tracker.finish()

Offline runs live in ``<run_dir>/wandb/`` (upload them later with ``wandb sync``); the run id
is kept in ``<run_dir>/wandb_run_id`` so that a resumed job continues the same wandb run.
The API key stays in the environment (or netrc) where wandb reads it: it is never put in the
run's config, in job files or in anything this module writes.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from ptm_dist import storage

# Dense bf16 datasheet peaks (FLOP/s) used for MFU, matched in this order against the name
# torch reports ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA L40S", "NVIDIA A100-SXM4-80GB"):
# whole words, the variants before the family, so an L40S is not taken for an L40 or an L4.
GPU_PEAK_FLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
)


def gpu_peak_flops(device_name: str) -> float | None:
    """The datasheet peak of a GPU by its name, or None for a GPU not listed (no MFU then)."""
    for pattern, peak in GPU_PEAK_FLOPS:
        if re.search(pattern, device_name):
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


# ------------------------------------------------------------------------------ wandb

RUN_ID_FILE = "wandb_run_id"
_WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                "disabled": "disabled"}


def wandb_logged_in() -> bool:
    """Whether wandb would find credentials: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return bool(host) and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(setting: str) -> str:
    """online | offline | disabled for a ``tracking.wandb`` setting on this machine."""
    if setting != "auto":
        return setting
    env = _WANDB_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env:
        return env
    return "online" if wandb_logged_in() else "offline"


def run_id(run_dir: str, *, fresh: bool = False) -> str:
    """The wandb run id of the job in ``run_dir``: the stored one, or a new one (also when
    ``fresh``) that is stored there so that a resumed job continues the same run."""
    path = storage.join(run_dir, RUN_ID_FILE)
    if not fresh and storage.exists(path):
        stored = storage.read_text(path).strip()
        if stored:
            return stored
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    new = "".join(secrets.choice(alphabet) for _ in range(8))
    storage.write_text(path, new + "\n")
    return new


def forget_inherited_wandb_service() -> None:
    """Called where a worker process starts: its wandb runs use a wandb service of its own.

    wandb records the address of the service a process starts in WANDB_SERVICE, and child
    processes inherit it: a driver (or notebook, or test session) that used wandb before
    starting Ray hands its service to every Ray worker. A worker killed with its driver then
    leaves its run registered in that longer-lived service, and the re-run's worker, continuing
    the same run id, fails with 'run ID ... is in use' (seen when a test session's earlier
    in-process wandb run had set it)."""
    os.environ.pop("WANDB_SERVICE", None)


def _scrub(value, secrets_: tuple[str, ...]):
    """``value`` with any string holding one of ``secrets_`` replaced (belt and braces: the
    config is built from the job, which never reads the environment)."""
    if isinstance(value, dict):
        return {k: _scrub(v, secrets_) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets_) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets_):
        return "<redacted>"
    return value


class Tracker:
    """One wandb run, or a no-op when ``tracking.wandb`` is disabled. Rank 0 / driver only."""

    def __init__(self, run=None, run_dir: str | None = None, local_root: Path | None = None):
        self.run, self.run_dir, self.local_root = run, run_dir, local_root
        self.id: str | None = run.id if run is not None else None  # kept after finish()

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def mode(self) -> str:
        if self.run is None:
            return "disabled"
        return "offline" if self.run.settings._offline else "online"

    @classmethod
    def start(cls, cfg, run_dir: str, *, job_type: str, config: dict, group: str | None = None,
              name: str | None = None, resume: bool = True) -> Tracker:
        """Start (or, with ``resume`` and an id stored in ``run_dir``, continue) the run.

        ``group`` defaults to ``tracking.group``; ``name`` to ``run.name``."""
        mode = resolve_mode(cfg.tracking.wandb)
        if mode == "disabled":
            return cls()
        os.environ.setdefault("WANDB_SILENT", "true")  # no banners from workers
        import wandb

        rid = run_id(run_dir, fresh=not resume)
        # wandb writes its files while it runs: for object-storage run dirs keep them locally
        # and copy them into <run_dir>/wandb/ at sync() and finish().
        local_root = Path(tempfile.mkdtemp(prefix="ptm-wandb-")) if storage.is_uri(run_dir) else None
        root = local_root or Path(run_dir)
        root.mkdir(parents=True, exist_ok=True)
        key = os.environ.get("WANDB_API_KEY", "").strip()
        secrets_ = (key,) if len(key) >= 8 else ()
        kwargs = {
            "dir": str(root), "id": rid, "resume": "allow", "project": cfg.tracking.project,
            "entity": cfg.tracking.entity, "group": group or cfg.tracking.group, "tags": list(cfg.tracking.tags),
            "name": name or cfg.run.name, "job_type": job_type, "config": _scrub(config, secrets_),
            "reinit": "finish_previous",
            "settings": wandb.Settings(silent=True, console="off", save_code=False, x_save_requirements=False),
        }
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # an unreachable server must not stop training
            if mode != "online":
                raise
            print(f"[ptm] wandb: online logging failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                  "logging offline instead (upload later with wandb sync)", flush=True)
            run = wandb.init(mode="offline", **kwargs)
        return cls(run, run_dir, local_root)

    def log(self, record: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if v is not None}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A wandb Table (e.g. the trials of a sweep) under ``key``."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def sync(self) -> None:
        """Copy local wandb files of an object-storage run dir into ``<run_dir>/wandb/``."""
        if self.local_root is None or not (self.local_root / "wandb").exists():
            return
        import pyarrow.fs as pafs

        fs, dest = storage.resolve(storage.join(self.run_dir, "wandb"))
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(self.local_root / "wandb"), dest,
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        self.run.finish(exit_code=exit_code)
        self.run = None
        self.sync()
        if self.local_root is not None:
            shutil.rmtree(self.local_root, ignore_errors=True)

    def describe(self) -> str:
        """One line saying where the run went (for the driver's output)."""
        if self.run is None:
            return "wandb: disabled"
        if self.mode == "offline":
            return (f"wandb: offline run {self.run.id} in {self.run_dir}/wandb/ "
                    f"(upload: wandb sync {self.run_dir}/wandb/offline-run-*-{self.run.id})")
        return f"wandb: {self.run.url}"


def start_finetune(cfg, out_dir: str, trial_id: str | None = None) -> Tracker:
    """The wandb run of a fine-tuning run, or of one sweep trial: its hyperparameters
    (``params.json``) as config, grouped by sweep (``<sweep_dir>/trials/<trial_id>``)."""
    if not trial_id:
        return Tracker.start(cfg, out_dir, job_type="finetune", config={"job": cfg.to_dict()},
                             name=cfg.finetune.name)
    params_path = storage.join(out_dir, "params.json")
    params = json.loads(storage.read_text(params_path)) if storage.exists(params_path) else {}
    sweep_name = out_dir.rstrip("/").rsplit("/", 3)[-3]
    return Tracker.start(cfg, out_dir, job_type="tune-trial", config={**params, "job": cfg.to_dict()},
                         group=cfg.tracking.group or sweep_name, name=trial_id)


def summary_line(run_dir: str) -> str | None:
    """'wandb: ...' for a job's summary: the run id and, for offline runs, how to upload them."""
    path = storage.join(run_dir, RUN_ID_FILE)
    if not storage.exists(path):
        return None
    rid = storage.read_text(path).strip()
    if not storage.is_uri(run_dir) and any(Path(run_dir, "wandb").glob(f"offline-run-*-{rid}")):
        return f"wandb: offline run {rid}; upload: wandb sync {run_dir}/wandb/offline-run-*-{rid}"
    return f"wandb: run {rid}"


def log_sweep(cfg, sweep_dir: str, group: str | None = None) -> Tracker:
    """Log a finished sweep's summary as its own run in the sweep's group: the sweep settings
    as config, the best trial in the summary and ``trials.csv`` as a table."""
    import csv
    import io

    sweep = json.loads(storage.read_text(storage.join(sweep_dir, "sweep.json")))
    best_path = storage.join(sweep_dir, "best.json")
    best = json.loads(storage.read_text(best_path)) if storage.exists(best_path) else {}
    rows = list(csv.reader(io.StringIO(storage.read_text(storage.join(sweep_dir, "trials.csv")))))
    name = sweep_dir.rstrip("/").rsplit("/", 1)[-1]
    tracker = Tracker.start(cfg, sweep_dir, job_type="sweep", config={"sweep": sweep},
                            group=group or cfg.tracking.group or name, name=f"{name}-summary")
    if rows:
        tracker.log_table("trials", rows[0], [[_cell(c) for c in r] for r in rows[1:]])
    if best:
        tracker.summary({"best_trial_id": best.get("trial_id"), f"best_{best.get('metric', 'metric')}":
                         best.get("value"), "best_config": best.get("config", {})})
    tracker.finish()
    return tracker


def _cell(text: str):
    if text == "":  # an errored or unfinished trial's missing metric: a gap in a number column
        return None
    if "_" in text:  # int() and float() accept digit separators: trial ids like 71002_00000
        return text
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text
