"""What a pretraining worker receives from the driver: one frozen spec, whole.

    spec = PretrainSpec(job=cfg, run_dir=run_dir, data=prepare_data(cfg).for_workers())
    TorchTrainer(train_loop, train_loop_config={"spec": spec}, ...)

The job is the validated JobConfig (with the resolved run name); nothing is looked up by string
keys on the worker side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ptm_dist.config import JobConfig
from ptm_dist.data.prepare import WorkerData
from ptm_dist.errors import ConfigError
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
    # scaling.num_workers [MIN, MAX]: the sequences per optimizer step every worker group keeps
    # (ptm_dist.checkpoint.elastic_batch); its train.grad_accum follows from its size (for_world)
    global_batch: int | None = None
    # the driver's time.time() when this command launched the workers: a group that Ray Train
    # restarted later (a lost worker, an elastic resize) leaves the command's start-up record alone
    launched_at: float | None = None

    def for_world(self, world: int) -> PretrainSpec:
        """This spec for a group of ``world`` workers: with a global batch, train.grad_accum set to
        keep it (the driver checked that every size of the range divides it)."""
        if self.global_batch is None:
            return self
        micro = self.job.train.micro_batch
        accum, rest = divmod(self.global_batch, micro * world)
        if rest or not accum:
            raise ConfigError(f"scaling.num_workers {list(self.job.scaling.num_workers)}: {world} workers x "
                              f"train.micro_batch {micro} cannot keep the global batch of {self.global_batch}")
        if accum == self.job.train.grad_accum:
            return self
        job = self.job.model_copy(deep=True)
        job.train.grad_accum = accum
        return dataclasses.replace(self, job=job)
