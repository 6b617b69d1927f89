"""The default job, end to end, from a built wheel outside the repository (README's command 1),
and what its terminal shows: ptm's own lines only, the libraries' output in <run_dir>/logs/.

Slow by nature (about 3 minutes on a 2-core machine): it is the promise README makes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lines Ray, DeepSpeed, transformers and PyTorch print (the prefix Ray puts on forwarded lines,
# Python logging and warnings, the messages the default job printed before issue 18).
LIBRARY_LINE = re.compile(
    r"\((RayTrainWorker|TrainController|raylet|autoscaler)|pid=|WARNING|INFO|Warning|DeepSpeed|deepspeed|"
    r"transformers|loss_type|all_gather|Dataset|Checkpoint successfully|Reporting training result|core_worker|"
    r"PreemptionWatcher|worker group|Traceback")


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
    run_dir = work / "runs" / "tiny"
    logs = run_dir / "logs"
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(p.read_text()[-3000:] for p in logs.glob("*.log"))
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"run_dir: {run_dir}"

    # The terminal: ptm's lines only (about 110 lines, most from libraries, before issue 18). The
    # summary's sample is the model's own text, which may say anything: checked on its own.
    samples = [ln for ln in proc.stdout.splitlines() if re.match(r"sample \(greedy, \d+ new tokens\): 'The' -> ", ln)]
    assert len(samples) == 1, proc.stdout[-3000:]
    print(f"default job: {samples[0]}")
    shown = [ln for ln in proc.stdout.splitlines() if ln not in samples]
    print(f"default job: {len(shown)} lines on stdout, {len(proc.stderr.splitlines())} on stderr")
    assert proc.stderr == ""
    summary = shown.index("== ptm pretrain summary ==")
    assert all(ln.startswith("[ptm] ") for ln in shown[:summary - 1]), shown[:summary]
    assert [ln for ln in shown if LIBRARY_LINE.search(ln)] == []
    assert sum(" checkpoint " in ln for ln in shown) == 5 and sum("eval_loss" in ln for ln in shown) >= 5
    assert len(shown) <= 80
    # The summary's start-up: driver phases, then rank 0's, each of them measured (none negative:
    # one machine, one clock), ending within the command's wall time.
    (startup,) = [ln for ln in shown if ln.startswith("time to first step: ")]
    print(f"default job: {startup}")
    total, *phases = [float(x) for x in re.findall(r"(-?\d+\.\d)s\b", startup)]
    wall = float(re.search(r"^wall time: (\d+)s$", proc.stdout, re.MULTILINE).group(1))
    assert len(phases) == 7 and min(phases) >= -0.05 and 0 < total <= wall + 1, startup
    assert f"logs: {logs} " in proc.stdout
    # ... and the libraries' output is in the run directory, each worker's in its own file.
    worker_logs = [(logs / f"worker{r}.log").read_text() for r in (0, 1)]
    driver_log = (logs / "driver.log").read_text()
    for text in worker_logs:
        assert "Setting accelerator to CPU" in text and "Checkpoint successfully created" in text
        assert "loss_type=None" in text
    assert "(TrainController pid=" in driver_log and "Started a local Ray instance" in driver_log
    assert "[ptm] step 500/500 " in worker_logs[0]
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
