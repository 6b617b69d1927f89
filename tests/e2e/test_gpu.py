"""GPU checks: the same per-worker code on CUDA with bf16. Skipped cleanly without a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_tiny_model_trains_on_gpu_with_bf16(tmp_path):
    script = textwrap.dedent(f"""
        import json
        from ptm_dist.config import load
        from ptm_dist.train.local import local_trainer
        cfg = load(None, ["model.size=tiny", "train.max_steps=20", "run.storage={tmp_path}"])
        tr = local_trainer(cfg)
        it = iter(tr.stream)
        losses = [float(tr.train_one_step(it)[0]) for _ in range(20)]
        print(json.dumps({{"precision": tr.precision, "losses": losses}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert all(math.isfinite(x) for x in out["losses"]) and out["losses"][-1] < out["losses"][0]
