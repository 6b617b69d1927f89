"""`ptm bench job`: a whole pretraining job through the system against the strongest simple
trainer, side by side in one run: tokens/s, held-out loss at equal tokens, wall time.

(a) system: ``pretrain(cfg)`` exactly as ``ptm pretrain`` runs it (data preparation, Ray, the
    Ray Train workers, DeepSpeed, evaluations, checkpoints, tracking), into a scratch run
    directory that is deleted afterwards;
(b) strong: one plain process on this machine with the cores the workers share (on GPU: one
    GPU), the compact GPT-2 of ``ptm_dist.compact`` starting from the system's initial weights,
    trained the way nanoGPT's ``train.py`` trains (``bench.strong_parts``: its own AdamW groups,
    warmup-cosine schedule, clipping and loss), on exactly the global batches the system's workers drew: step i
    is every rank's micro batches of step i, read in-process from each rank's stream. It is
    evaluated on the same held-out sequences at the same steps with its own loss code.

    ratio = system tokens/s / (strong tokens/s x GPUs)     (on CPU: x 1)

Both tokens/s are the mean of the per-``log_every`` window rates after the first window, with
evaluation and checkpoint time left out (the system's summary figure). The strong trainer's
batches are read and tokenized before its clock starts (a minimal trainer reads pre-tokenized
data); its wall time is given with and without that reading.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ptm_dist.config import JobConfig


def strong_trainer(spec: dict) -> dict:
    """The strong trainer (run in a subprocess: ``python -m ptm_dist.bench_job SPEC OUT``)."""
    t_start = time.perf_counter()
    from ptm_dist import models
    from ptm_dist.bench import strong_parts, strong_update
    from ptm_dist.data.pieces import Piece
    from ptm_dist.data.pipeline import SequenceStream, take_sequences
    from ptm_dist.data.sources import Shard

    torch.set_num_threads(spec["threads"])
    cfg = JobConfig.model_validate(spec["job"])
    t, world, device = cfg.train, spec["world"], torch.device(spec["device"])
    wd = spec["data"]
    special = wd["special"]
    hf = models.config_for(cfg.model, wd["vocab_size"], cfg.data.seq_len, models.SpecialTokens(**special))

    # Every rank's stream, built as a worker builds it, read in this process.
    shards = [Shard(**s) for s in wd["train_shards"]]
    streams = [iter(SequenceStream(shards, wd["tokenizer_json"], cfg.data.seq_len, special["eos"], cfg.run.seed,
                                   rank, world, cfg.data.read_concurrency, use_ray=False,
                                   max_bad_shards=cfg.data.max_bad_shards, shuffle_window=cfg.data.shuffle_window,
                                   pieces=[Piece(**p) for p in wd["train_pieces"]]))
               for rank in range(world)]
    per_rank = t.grad_accum * t.micro_batch
    steps = np.empty((t.max_steps, world * t.grad_accum, t.micro_batch, cfg.data.seq_len), dtype=np.int64)
    for s in range(t.max_steps):
        for rank, it in enumerate(streams):
            rows = np.stack([next(it)[1] for _ in range(per_rank)])
            steps[s, rank * t.grad_accum:(rank + 1) * t.grad_accum] = rows.reshape(
                t.grad_accum, t.micro_batch, cfg.data.seq_len)
    _, val = take_sequences([Shard(**s) for s in wd["val_shards"]], wd["tokenizer_json"], cfg.data.seq_len,
                            special["eos"], t.eval_sequences)
    val = torch.as_tensor(val, dtype=torch.long, device=device)
    batches = torch.as_tensor(steps, device=device)
    del steps, streams
    data_s = time.perf_counter() - t_start

    model, opt, step_fn, lr_at = strong_parts(cfg, hf, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])

    @torch.no_grad()
    def held_out_loss() -> float:  # token-weighted mean next-token loss over every held-out token
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val), t.micro_batch):
            ids = val[i:i + t.micro_batch]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(ids, return_logits=True)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                    ids[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
        model.train()
        return total / count

    eval_steps = set(spec["eval_steps"])
    evals, losses, rates = {}, {}, []
    if 0 in eval_steps:
        evals[0] = held_out_loss()
    n_micro = world * t.grad_accum
    window_losses, window_s = [], 0.0
    for s in range(t.max_steps):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in batches[s]:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = step_fn(micro) / n_micro
            loss.backward()
            total += loss.detach()
        strong_update(cfg, model, opt, lr_at(s))
        window_losses.append(float(total))  # waits for the device: the step is done
        window_s += time.perf_counter() - t0
        done = s + 1
        if done % t.log_every == 0 or done == t.max_steps:
            losses[done] = sum(window_losses) / len(window_losses)
            rates.append(len(window_losses) * n_micro * t.micro_batch * cfg.data.seq_len / window_s)
            window_losses, window_s = [], 0.0
        if done in eval_steps:
            evals[done] = held_out_loss()
    return {"eval_loss": {str(k): v for k, v in evals.items()}, "loss": {str(k): v for k, v in losses.items()},
            "tokens_per_s": sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[-1],
            "data_s": data_s, "wall_s": time.perf_counter() - t_start}


def bench_job(cfg: JobConfig) -> dict:
    cfg.scaling.fixed_workers("ptm bench job")  # a range [MIN, MAX] is for ptm pretrain only
    from dataclasses import asdict

    from ptm_dist.bench import compact_unsupported, run_baseline
    from ptm_dist.data.prepare import prepare_data
    from ptm_dist.engine import resolve_precision
    from ptm_dist.errors import ConfigError
    from ptm_dist.tracking import read_metrics
    from ptm_dist.train.pretrain import pretrain, summarize

    worker_data = prepare_data(cfg).for_workers()  # the corpus and tokenizer are cached for both
    why = compact_unsupported(cfg, worker_data.vocab_size)
    if why is not None:
        raise ConfigError(f"ptm bench job: no strong baseline for this job ({why})")
    scratch = tempfile.mkdtemp(prefix="ptm-bench-job-")
    try:
        job = cfg.model_copy(deep=True)
        job.run.storage, job.run.name = scratch, "system"
        print(f"[bench] system: ptm pretrain of the job ({cfg.train.max_steps} steps, "
              f"{cfg.scaling.num_workers} workers), run directory in {scratch}", flush=True)
        t0 = time.time()
        run_dir = pretrain(job)
        system_wall = time.time() - t0
        metrics = read_metrics(run_dir)
        summary = summarize(run_dir)
        sys_evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
        sys_losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
        startup = json.loads(Path(run_dir, "startup.json").read_text())
        first_step_s = startup["first_step"] - t0

        # The strong trainer runs here: on a GPU when the job asks for GPUs and this machine has one.
        gpu = cfg.scaling.use_gpu is True or (cfg.scaling.use_gpu == "auto" and torch.cuda.is_available())
        device = torch.device("cuda:0" if gpu else "cpu")
        threads = torch.get_num_threads() if gpu else os.cpu_count() or 1
        spec = {"job": cfg.to_dict(), "data": asdict(worker_data), "world": cfg.scaling.num_workers,
                "device": str(device), "threads": threads, "eval_steps": sorted(sys_evals),
                "precision": resolve_precision(cfg.train.precision, device, cfg.zero.stage)}
        print(f"[bench] strong: one process, {threads} thread(s), compact GPT-2, the same "
              f"{cfg.train.max_steps} global batches", flush=True)
        t1 = time.time()
        strong = run_baseline(spec, module="ptm_dist.bench_job")
        strong_wall = time.time() - t1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    strong_evals = {int(k): v for k, v in strong["eval_loss"].items()}
    strong_losses = {int(k): v for k, v in strong["loss"].items()}
    last = max(sys_evals)
    devices = cfg.scaling.num_workers if gpu else 1
    return {
        "model": f"{cfg.model.family}-{cfg.model.size}", "workers": cfg.scaling.num_workers,
        "zero_stage": cfg.zero.stage, "precision": spec["precision"], "steps": cfg.train.max_steps,
        "tokens": cfg.train.max_steps * cfg.train.micro_batch * cfg.train.grad_accum * cfg.data.seq_len
        * cfg.scaling.num_workers,
        "strong_threads": threads,
        "system_tokens_per_s": summary["tokens_per_s"], "strong_tokens_per_s": strong["tokens_per_s"],
        "ratio": summary["tokens_per_s"] / (strong["tokens_per_s"] * devices),
        "system_eval_loss": sys_evals, "strong_eval_loss": strong_evals,
        "system_loss": sys_losses, "strong_loss": strong_losses,
        "final_eval_step": last,
        "eval_loss_difference": sys_evals[last] - strong_evals[last],  # above 0: the system is worse
        "system_wall_s": system_wall, "system_first_step_s": first_step_s,
        "strong_wall_s": strong_wall, "strong_data_s": strong["data_s"],
    }


def format_job_report(r: dict) -> str:
    steps = sorted(r["system_eval_loss"])
    lines = [
        (f"{r['model']}: {r['steps']} steps, {r['tokens']:,} tokens; system: {r['workers']} workers, "
         f"ZeRO-{r['zero_stage']}, {r['precision']}; strong: one process, {r['strong_threads']} thread(s)"),
        f"{'':34}{'system':>12}{'strong':>12}",
        f"{'tokens/s':34}{r['system_tokens_per_s']:>12,.0f}{r['strong_tokens_per_s']:>12,.0f}",
    ]
    for s in steps:
        lines.append(f"{f'held-out loss, step {s}':34}{r['system_eval_loss'][s]:>12.4f}"
                     f"{r['strong_eval_loss'][s]:>12.4f}")
    lines += [
        f"{'wall, start to end (s)':34}{r['system_wall_s']:>12.1f}{r['strong_wall_s']:>12.1f}",
        f"{'  of it: to first step / reading':34}{r['system_first_step_s']:>12.1f}{r['strong_data_s']:>12.1f}",
        f"ratio (system / strong tokens/s): {r['ratio']:.3f}",
        f"held-out loss at step {r['final_eval_step']}, system - strong: {r['eval_loss_difference']:+.4f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # the strong trainer's subprocess: python -m ptm_dist.bench_job SPEC OUT
    spec_path, out_path = sys.argv[1], sys.argv[2]
    Path(out_path).write_text(json.dumps(strong_trainer(json.loads(Path(spec_path).read_text()))))
