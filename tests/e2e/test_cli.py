"""`ptm` as a user runs it, in a subprocess (`python -m ptm_dist.cli`): a bad override is one
line on stderr with exit status 2, and `ptm plan` prints its table and JSON. Argument parsing
alone: tests/unit/test_cli.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

JOBS = Path(__file__).parents[2] / "jobs"


def test_cli_prints_one_line_error_not_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "ptm_dist.cli", "pretrain", "--set", "train.lrr=1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("ptm pretrain: error:")
    assert "train.lrr: unknown key" in proc.stderr


def test_cli_prints_table_and_json():
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "plan", str(JOBS / "gpt2-124m.yaml"),
                           "--gpus", "8", "--gpu-mem", "80"], capture_output=True, text=True, check=True)
    table, _, js = proc.stdout.partition("\n{")
    assert "recommended: zero" in table and "GPU-hours" in table
    assert json.loads("{" + js)["gpus"] == 8


def test_cli_rejects_bad_numbers():
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "plan", "--gpus", "0", "--gpu-mem", "80"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--gpus must be >= 1" in proc.stderr.strip().splitlines()[-1]
