"""`ptm pipeline`: pretrain (or resume) the job's run, then sweep fine-tuning from it.

    sweep_dir = pipeline(load(None))

It sits above both halves: ptm_dist.train for pretraining, ptm_dist.finetune for the sweep.
"""

from __future__ import annotations

from ptm_dist.config import JobConfig
from ptm_dist.finetune.sweep import tune
from ptm_dist.train.pretrain import pretrain


def pipeline(cfg: JobConfig) -> str:
    """Pretrain the job's run, then run its sweep with finetune.init set to that run; returns
    the sweep directory. ``run.storage`` may be a local path or an object-store URI."""
    run_dir = pretrain(cfg)
    swept = cfg.model_copy(deep=True)
    swept.finetune.init = run_dir
    return tune(swept)
