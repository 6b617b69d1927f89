"""The per-worker training code in one plain process, without Ray: for a debugger, for
profiling, and for single-GPU benchmarks.

    tr = local_trainer(load("jobs/tiny.yaml", ["model.size=debug"]))
    it = iter(tr.stream)
    loss, grad_norm, data_wait = tr.train_one_step(it)

    tr = run_local(cfg)   # the whole run: resume, train, checkpoint (as a worker does, minus Ray)

It builds the same ``Trainer`` (model, DeepSpeed engine, data stream) a Ray Train worker
builds, as rank 0 of a world of one; the data stream packs shards in this process.
"""

from __future__ import annotations

import torch

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import storage
from ptm_dist.config import JobConfig, cache_dir
from ptm_dist.data.prepare import prepare_data
from ptm_dist.dist import init_single_process
from ptm_dist.harness import job_tasks
from ptm_dist.pretrained import check_model, resolve_init
from ptm_dist.train.loop import Trainer, copy_report, save_checkpoint
from ptm_dist.train.spec import PretrainSpec


def local_trainer(cfg: JobConfig, device: torch.device | None = None) -> Trainer:
    device = device or torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    init_single_process(device)
    cfg = cfg.model_copy(deep=True)
    cfg.scaling.num_workers = 1
    batch_given = (cfg.train.micro_batch, cfg.train.grad_accum)
    newest = ckpt_lib.latest_complete_checkpoint(storage.join(storage.absolute(cfg.run.storage), cfg.run.name))
    if newest is not None:  # written by more workers: keep its global batch (as the driver does)
        cfg.train.grad_accum, line = ckpt_lib.resume_batch(newest, cfg.to_dict(), 1)
        if line:
            print(line, flush=True)
    start = resolve_init(cfg, cache_dir(cfg))
    data = prepare_data(cfg, start.tokenizer_dir if start else None)
    worker_data = data.for_workers()
    check_model(cfg, start, data.tokenizer_dir, worker_data.vocab_size)
    spec = PretrainSpec(job=cfg, run_dir=storage.join(storage.absolute(cfg.run.storage), cfg.run.name),
                        data=worker_data, start=start, use_ray_data=False, eval_tasks=job_tasks(cfg),
                        batch_given=batch_given)
    return Trainer(spec, rank=0, world=1, device=device)


def run_local(cfg: JobConfig, device: torch.device | None = None) -> Trainer:
    """Run ``cfg``'s job to train.max_steps in this process with a worker's checkpoint logic:
    resume from the newest complete checkpoint of the run directory, drop newer partial ones,
    checkpoint every train.ckpt_every steps (files copied to storage directly instead of through
    ray.train.report). No metrics or evaluation. Returns the trainer at the end."""
    tr = local_trainer(cfg, device)
    resume = ckpt_lib.latest_complete_checkpoint(tr.run_dir)
    if resume:
        tr.restore(resume)
        print(f"[ptm] resumed from {resume} at step {tr.step}", flush=True)
    ckpt_lib.discard_after(tr.run_dir, tr.step)
    it = iter(tr.stream)
    while tr.step < tr.cfg.train.max_steps:
        tr.train_one_step(it)
        if tr.step % tr.cfg.train.ckpt_every == 0 or tr.step == tr.cfg.train.max_steps:
            save_checkpoint(tr, None, report=copy_report)
    return tr
