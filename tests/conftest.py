"""Shared fixtures of both tiers (tests/unit, tests/e2e): one local Ray instance per session, a
session cache for the built-in corpus and tokenizer, debug-size jobs, and the e2e marker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ptm_dist.config import JobConfig, load

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ is marked e2e, so `pytest -m "not e2e"` is the unit tier."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptm-cache")
    os.environ["PTM_DIST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto, server mode) on localhost with a bucket 'ptm'.

    Started before Ray so that Ray's workers inherit the endpoint and the test credentials."""
    from ptm_dist.bench_ckpt import moto_server

    with moto_server("ptm") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_session(cache_dir, s3_endpoint):
    import ray

    if not ray.is_initialized():
        from ptm_dist.dist import free_port
        from ptm_dist.launch import worker_env_vars

        # As ptm's own local Ray (launch.connect_ray): a dashboard on localhost serving the state
        # API, and its address in every Ray process. Without them Ray Train's placement-group
        # cleaner cannot reach the state API and each Train job waits on it (a one-step debug job
        # on a warm session took 35-37 s without it, 24-26 s with it, on the quiet 2-core machine).
        port = free_port()
        env = {**worker_env_vars(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """The tokenizer trained on data_helpers.MIX_DOCS (saved for transformers), shared by the data
    tests of both tiers that only read it; a module may define its own ``tok_json`` instead."""
    from data_helpers import mix_tok_dir

    return mix_tok_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok_json(tok_dir):
    return (tok_dir / "tokenizer.json").read_text()


DEBUG_OVERRIDES = [
    "model.size=debug",
    "data.seq_len=32",
    "data.tokenizer.vocab_size=512",
    "train.micro_batch=4",
    "train.max_steps=12",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=6",
    "train.ckpt_every=6",
    "train.eval_sequences=16",
    "train.precision=fp32",
]


def debug_job(tmp_path, *overrides: str) -> JobConfig:
    """A debug-size job writing under tmp_path; later overrides win."""
    return load(None, [*DEBUG_OVERRIDES, f"run.storage={tmp_path}", *overrides])


def read_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- tracking and reports (issue 5)

# A recognisable fake wandb API key, planted in the environment of tracked runs: no file a run
# writes may contain it.
FAKE_WANDB_KEY = "ptmfakekey" + "5eCrEt" * 5 + "0123456789"


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory, cache_dir):
    """`ptm pretrain` (debug model, wandb offline, FAKE_WANDB_KEY in its environment) run twice
    on one run directory: 12 steps with the live progress bar forced on, then resumed to 18
    steps with plain progress lines. Each call starts its own local Ray, like a user's."""
    import subprocess
    import sys
    from types import SimpleNamespace

    storage = tmp_path_factory.mktemp("tracked")
    sets = [*DEBUG_OVERRIDES, "train.log_every=2", f"run.storage={storage}", "run.name=tracked",
            "tracking.wandb=offline", "tracking.tags=[ci, debug]"]
    env = dict(os.environ, WANDB_API_KEY=FAKE_WANDB_KEY, PTM_PROGRESS="bar")
    for key in ("RAY_ADDRESS", "WANDB_MODE", "WANDB_DIR"):
        env.pop(key, None)

    def pretrain(*extra: str) -> SimpleNamespace:
        args = [a for s in [*sets, *extra] for a in ("--set", s)]
        proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "pretrain", *args], env=env,
                              capture_output=True, timeout=900, check=False)
        # Decoded by hand: text mode would turn the progress bar's carriage returns into newlines.
        out = SimpleNamespace(stdout=proc.stdout.decode(errors="replace"), stderr=proc.stderr.decode(errors="replace"))
        assert proc.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + run_logs_tail(storage / "tracked")
        return out

    run_dir = storage / "tracked"
    first = pretrain()
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    env["PTM_PROGRESS"] = "plain"
    second = pretrain("train.max_steps=18")
    return SimpleNamespace(run_dir=run_dir, first=first, second=second, first_id=first_id)


def run_logs_tail(run_dir, chars: int = 3000) -> str:
    """The end of each file in <run_dir>/logs/ (library output a failed ptm subprocess left), for
    assertion messages."""
    logs = Path(run_dir) / "logs"
    return "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(logs.glob("*.log")))


def make_sweep_dir(root) -> dict:
    """A sweep directory in the layout `ptm tune` writes (see the notes on the fine-tuning
    contract): 4 trials over finetune.lr and finetune.batch_size, one stopped early by ASHA.
    Returns {trial_id: params}."""
    import csv

    root = Path(root)
    trials = {
        "t0": ({"finetune.lr": 1e-4, "finetune.batch_size": 16}, [0.52, 0.61, 0.66]),
        "t1": ({"finetune.lr": 3e-4, "finetune.batch_size": 32}, [0.58, 0.70, 0.74]),
        "t2": ({"finetune.lr": 1e-3, "finetune.batch_size": 16}, [0.63, 0.77, 0.81]),
        "t3": ({"finetune.lr": 3e-2, "finetune.batch_size": 32}, [0.31]),
    }
    (root / "trials").mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({
        "metric": "accuracy", "mode": "max", "scheduler": "asha", "search": "random",
        "space": {"finetune.lr": {"loguniform": [1e-4, 3e-2]}, "finetune.batch_size": {"choice": [16, 32]}},
        "num_samples": len(trials)}))
    with open(root / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "epochs", "accuracy", "finetune.lr", "finetune.batch_size"])
        for tid, (params, acc) in trials.items():
            w.writerow([tid, "TERMINATED", len(acc), acc[-1], params["finetune.lr"], params["finetune.batch_size"]])
            d = root / "trials" / tid
            d.mkdir()
            (d / "params.json").write_text(json.dumps(params))
            lines = [{"epoch": e, "step": 10 * e, "loss": 1.5 - a, "eval_loss": 1.6 - a, "accuracy": a,
                      "precision_macro": a - 0.02, "recall_macro": a - 0.01, "f1_macro": a - 0.015,
                      "lr": params["finetune.lr"] / e} for e, a in enumerate(acc, start=1)]
            (d / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    (root / "best.json").write_text(json.dumps({"trial_id": "t2", "metric": "accuracy", "value": 0.81,
                                                "config": trials["t2"][0]}))
    return {tid: params for tid, (params, _) in trials.items()}


# wandb's offline logs read back with wandb's own reader (``wandb leet inspect --json``), not by
# trusting what the code meant to log.


def offline_runs(root: Path) -> dict[str, list[dict]]:
    """{offline run directory name: its records} for every offline run under root/wandb/."""
    import subprocess
    import sys

    wandb = str(Path(sys.executable).with_name("wandb"))
    out = {}
    for d in sorted((root / "wandb").glob("offline-run-*")):
        proc = subprocess.run([wandb, "leet", "inspect", "--json", str(d)], capture_output=True,
                              text=True, timeout=120, check=True)
        out[d.name] = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    return out


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def history(records: list[dict]) -> list[dict]:
    return [h["item"] for h in of_type(records, "history")]


def check_figures(report_dir: Path, expected: set[str]) -> str:
    """The report's PNGs are the expected ones, non-trivial images, all linked from report.md."""
    import re

    from PIL import Image

    md = (report_dir / "report.md").read_text()
    pngs = {p.name for p in report_dir.glob("*.png")}
    assert expected <= pngs, pngs
    linked = set(re.findall(r"!\[[^\]]+\]\(([^)]+\.png)\)", md))
    assert linked == pngs
    digests = set()
    for name in pngs:
        with Image.open(report_dir / name) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 600 and img.height >= 350
            colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50, name  # lines, text, anti-aliasing
            assert max(c for c, _ in colors) < 0.98 * img.width * img.height, name  # not blank
        digests.add((report_dir / name).read_bytes())
    assert len(digests) == len(pngs)  # every figure is a different picture
    return md
