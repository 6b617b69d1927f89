"""The default job, end to end, from a built wheel outside the repository (README's command 1).

Slow by nature (about 3 minutes on a 2-core machine): it is the promise README makes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """ptm-dist built as a wheel and unpacked into a directory put first on PYTHONPATH."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True, timeout=300)
    site = out / "site"
    (wheel,) = out.glob("ptm_dist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


@pytest.mark.slow
def test_default_job_from_wheel(wheel_site, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(wheel_site), "PTM_DIST_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    where = subprocess.run([sys.executable, "-c", "import ptm_dist; print(ptm_dist.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(wheel_site))
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "pretrain"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    run_dir = work / "runs" / "tiny"
    assert last == f"run_dir: {run_dir}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    train = [m for m in lines if "loss" in m]
    print(f"default job: eval loss {evals[0]:.3f} -> {evals[-1]:.3f} ({evals[-1] / evals[0]:.1%})")
    assert evals[-1] <= 0.6 * evals[0]
    assert train[-1]["step"] == 500
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data_wait_frac"):
        assert all(isinstance(m[key], float) for m in train), key
    assert (run_dir / "job.yaml").exists()
    assert (run_dir / "checkpoint_00000500" / "COMPLETE").exists()
    assert len(list(run_dir.glob("checkpoint_0*"))) == 2  # train.keep_ckpts
