"""What a pretraining worker receives from the driver: one frozen spec, whole.

    spec = PretrainSpec(job=cfg, run_dir=run_dir, data=prepare_data(cfg).for_workers())
    TorchTrainer(train_loop, train_loop_config={"spec": spec}, ...)

The job is the validated JobConfig (with the resolved run name); nothing is looked up by string
keys on the worker side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ptm_dist.config import JobConfig
from ptm_dist.data.prepare import WorkerData
from ptm_dist.harness import TaskBundle
from ptm_dist.pretrained import ModelStart


@dataclass(frozen=True)
class PretrainSpec:
    job: JobConfig
    run_dir: str  # <run.storage>/<run.name>: local path or URI
    data: WorkerData
    start: ModelStart | None = None  # model.init resolved: the weights to start from
    faults: dict[str, str] = field(default_factory=dict)  # PTM_FAULT settings (tests)
    progress_board: Any = None  # a progress.Board actor handle when the driver draws a live bar
    use_ray_data: bool = True  # False: pack shards in the worker's own process (no Ray)
    eval_tasks: TaskBundle | None = None  # train.eval_tasks with their local task files
    # the job's (train.micro_batch, train.grad_accum) before a resume on another number of
    # workers changed grad_accum to keep the global batch (ptm_dist.checkpoint.resume_batch)
    batch_given: tuple[int, int] | None = None
