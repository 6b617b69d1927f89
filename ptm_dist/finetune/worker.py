"""The fine-tuning loop on each worker: sequence or token classification with a DeepSpeed engine.

    model = AutoModelFor{Sequence,Token}Classification(start model) -> engine (ptm_dist.engine:
    the same ZeRO config, AdamW and warmup + cosine schedule as pretraining) -> restore the last
    epoch's checkpoint -> per epoch: train on this rank's slice -> evaluate over all ranks (loss,
    accuracy, and macro precision/recall/F1 per class, or entity-level precision/recall/F1 per
    tag sequence) -> metrics.jsonl -> best/ when the metric improved -> checkpoint and report
    (every rank, every epoch)

It runs as a Ray Train worker (``finetune_worker``, inside ``ptm finetune`` and multi-worker
sweep trials) or as a world of one in a Ray Tune trial's own process (``run_in_trial``); the
two differ only in how they report (``TrainReporter`` / ``TuneReporter``).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ptm_dist import runlogs, storage
from ptm_dist.checkpoint import DS_TAG
from ptm_dist.config import JobConfig
from ptm_dist.dist import init_single_process, mean_over_ranks, rng_state, set_rng_state
from ptm_dist.engine import EngineSpec, OptimSpec, manual_clip, prepare
from ptm_dist.finetune.tagging import IGNORE, tagging_metrics
from ptm_dist.tracking import Tracker, forget_inherited_wandb_service, start_finetune


@dataclass(frozen=True)
class FinetuneSpec:
    """What a fine-tuning worker (or a sweep trial) receives from the driver, whole."""

    job: JobConfig  # the trial's job in a sweep: the sweep's job with the trial's values
    out_dir: str  # the run directory, or trials/<trial_id> of a sweep (a local path or URI)
    base_dir: str  # the start model, a Hugging Face directory (a local path or URI)
    task: dict  # tokenized task: labels, train_ids, train_labels, val_ids, val_labels (token
    # classification: kind, per-token labels and val_tags, every validation word's tag)
    pad_id: int
    trial_id: str | None = None

    @property
    def log_prefix(self) -> str:
        return f"[ptm trial {self.trial_id}]" if self.trial_id else "[ptm]"


def load_tokenizer(model_dir: str):
    """The start model's tokenizer, with a pad token (GPT-2 and Llama tokenizers may lack one:
    '<pad>' when the vocabulary has it, else the EOS token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = "<pad>" if "<pad>" in tok.get_vocab() else tok.eos_token
    if tok.pad_token is None:
        raise ValueError(f"{model_dir}: the tokenizer has no pad, '<pad>' or EOS token to pad with")
    return tok


def load_model(model_dir: str, labels: list[str], pad_id: int, seed: int, kind: str = "sequence_classification"):
    """AutoModelForSequenceClassification (or ...ForTokenClassification) from ``model_dir``
    with a new, seeded head."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    try:
        auto = AutoModelForTokenClassification if kind == "token_classification" else AutoModelForSequenceClassification
        model = auto.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, pad_token_id=pad_id, dtype=torch.float32,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_id
    return model


def engine_spec(cfg: JobConfig, total_steps: int) -> EngineSpec:
    """The engine for fine-tuning: the ``finetune`` section's optimiser and schedule over
    ``total_steps``, the job's ZeRO settings and precision."""
    ft = cfg.finetune
    optim = OptimSpec(lr=ft.lr, min_lr=ft.lr * ft.min_lr_ratio, warmup_steps=round(ft.warmup_ratio * total_steps),
                      max_steps=total_steps, weight_decay=ft.weight_decay, grad_clip=ft.grad_clip,
                      micro_batch=ft.batch_size, grad_accum=1, betas=tuple(cfg.train.betas))
    z = cfg.zero
    return EngineSpec(optim, z.stage, z.offload_optimizer, z.offload_params, cfg.train.precision)


def pad_labels(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Per-token labels right-padded with IGNORE to the longest row."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out.to(device)


def pad_batch(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 (a class never predicted has precision 0)."""
    precision, recall, f1 = [], [], []
    for c in range(num_labels):
        tp = float(np.sum((pred == c) & (gold == c)))
        p = tp / max(1, int(np.sum(pred == c)))
        r = tp / max(1, int(np.sum(gold == c)))
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {
        "accuracy": float(np.mean(pred == gold)),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
    }


class EpochLog:
    """metrics.jsonl of a fine-tuning run or trial: one line per epoch (rank 0 only).

    ``write`` is the one place every per-epoch record goes through (console, file): hook
    experiment trackers there.
    """

    def __init__(self, out_dir: str, resume_epoch: int, prefix: str = "[ptm]", total_epochs: int | None = None):
        self.path = storage.join(out_dir, "metrics.jsonl")
        old = storage.read_text(self.path).splitlines() if storage.exists(self.path) else []
        # Epochs past the restored checkpoint were lost with the interruption and run again.
        self.lines = [ln for ln in old if ln.strip() and json.loads(ln).get("epoch", 0) <= resume_epoch]
        self._save()
        self.prefix = prefix
        self.total_epochs = total_epochs
        self.epoch_seconds: list[float] = []  # epochs timed in this process, for the ETA
        self.tracker = Tracker()  # the run's (or trial's) wandb run, started by run_epochs

    def _save(self) -> None:
        # The whole file each time (a few lines): object stores have no append, and a PUT
        # replaces an object atomically; a local file is replaced by a rename (storage.write_text).
        storage.write_text(self.path, "".join(ln + "\n" for ln in self.lines))

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        self._save()
        self.tracker.log(record, step=record["epoch"])
        progress = ""
        if "epoch_s" in record:
            self.epoch_seconds.append(record["epoch_s"])
            progress = f" ({record['epoch_s']:.1f}s"
            if "examples_per_s" in record:
                progress += f", {record['examples_per_s']:,.0f} examples/s"
            if self.total_epochs:
                left = self.total_epochs - record["epoch"]
                progress += f", eta {left * sum(self.epoch_seconds) / len(self.epoch_seconds):.0f}s"
            progress += ")"
        of = f"/{self.total_epochs}" if self.total_epochs else ""
        f1 = "f1" if "f1" in record else "f1_macro"
        print(f"{self.prefix} epoch {record['epoch']}{of}: loss {record['loss']:.4f} eval_loss "
              f"{record['eval_loss']:.4f} accuracy {record['accuracy']:.4f} {f1} {record[f1]:.4f}"
              f"{progress}", flush=True)


def read_epochs(out_dir: str) -> list[dict]:
    path = storage.join(out_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    # A line without its newline (a file written by an older version as it appended) is left out.
    complete = storage.read_text(path).split("\n")[:-1]
    return [json.loads(ln) for ln in complete if ln.strip()]


def better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


class FinetuneRun:
    """One worker's state: model, engine, data slices, epoch counters. Usable without Ray."""

    def __init__(self, spec: FinetuneSpec, rank: int, world: int, device: torch.device):
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.cfg = cfg = spec.job
        ft = cfg.finetune
        task = spec.task
        self.labels: list[str] = task["labels"]
        self.kind: str = task.get("kind", "sequence_classification")
        self.pad_id: int = spec.pad_id
        self.train_ids, self.train_y = task["train_ids"], task["train_labels"]
        self.val_ids, self.val_y = task["val_ids"], task["val_labels"]
        self.batch = ft.batch_size
        self.steps_per_epoch = len(self.train_ids) // (world * self.batch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.train_ids)} training examples are fewer than one step of "
                             f"{world} workers x finetune.batch_size {self.batch}")
        # A start model in object storage (a run on a cluster whose nodes share only that) is
        # copied to this node for the run's lifetime (close() drops the copy).
        self.base_local, self._base_is_tmp = storage.local_copy(spec.base_dir)
        model = load_model(str(self.base_local), self.labels, self.pad_id, cfg.run.seed, self.kind)
        self.engine_spec = engine_spec(cfg, self.steps_per_epoch * ft.epochs)
        self.engine, self.precision = prepare(model, self.engine_spec, device)
        self.clip = manual_clip(self.engine_spec, self.precision)
        self.epoch, self.step = 0, 0
        self.best: float | None = None
        self.best_epoch = 0

    def close(self) -> None:
        storage.drop_local_copy(self.base_local, self._base_is_tmp)

    # ------------------------------------------------------------------ state

    def save_local(self, out: Path) -> None:
        self.engine.save_checkpoint(str(out), tag=DS_TAG, save_latest=False)
        torch.save({"epoch": self.epoch, "step": self.step, "best": self.best, "best_epoch": self.best_epoch,
                    "rng": rng_state()}, out / f"rank_{self.rank}.pt")

    def restore(self, ckpt_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{ckpt_dir}: DeepSpeed could not load its checkpoint")
        state = torch.load(Path(ckpt_dir) / f"rank_{self.rank}.pt", weights_only=False)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ epochs

    def train_epoch(self) -> float:
        """Train one epoch on this rank's slice of a seeded permutation; mean loss over ranks."""
        order = np.random.default_rng(self.cfg.run.seed * 1009 + self.epoch).permutation(len(self.train_ids))
        mine = order[self.rank :: self.world][: self.steps_per_epoch * self.batch]
        self.engine.module.train()
        total = torch.zeros((), device=self.device)
        for s in range(self.steps_per_epoch):
            idx = mine[s * self.batch : (s + 1) * self.batch]
            ids, mask = pad_batch([self.train_ids[i] for i in idx], self.pad_id, self.device)
            y = self._labels(self.train_y, idx)
            loss = self.engine(input_ids=ids, attention_mask=mask, labels=y).loss
            self.engine.backward(loss)
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.engine.module.parameters(), self.clip)
            self.engine.step()
            total += loss.detach().float()
            self.step += 1
        return mean_over_ranks(total / self.steps_per_epoch)

    def _labels(self, labels: list, idx) -> torch.Tensor:
        if self.kind == "token_classification":
            return pad_labels([labels[i] for i in idx], self.device)
        return torch.as_tensor([labels[i] for i in idx], device=self.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics over the whole validation set. Every rank runs the same number of
        forward passes (ZeRO-3 gathers parameters collectively), padding its slice if short."""
        n = len(self.val_ids)
        mine = list(range(self.rank, n, self.world))
        per_rank = -(-n // self.world)
        batches = -(-per_rank // self.batch)
        self.engine.module.eval()
        preds, golds, loss_sum = [], [], torch.zeros(2, device=self.device)
        for b in range(batches):
            idx = mine[b * self.batch : (b + 1) * self.batch]
            rows = [self.val_ids[i] for i in idx] or [self.val_ids[0]]
            ids, mask = pad_batch(rows, self.pad_id, self.device)
            logits = self.engine(input_ids=ids, attention_mask=mask).logits.float()
            if idx:
                y = self._labels(self.val_y, idx)
                flat = logits.reshape(-1, logits.shape[-1])
                loss_sum[0] += torch.nn.functional.cross_entropy(flat, y.reshape(-1), reduction="sum",
                                                                 ignore_index=IGNORE)
                loss_sum[1] += int((y != IGNORE).sum())
                if self.kind == "token_classification":
                    # A word's prediction is its first sub-word's (the labelled positions, in order).
                    for row, i in enumerate(idx):
                        preds.append((i, logits[row].argmax(-1)[y[row] != IGNORE].tolist()))
                else:
                    preds += logits.argmax(-1).tolist()
                    golds += y.tolist()
        self.engine.module.train()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(loss_sum)
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, (preds, golds))
            preds = [p for g in gathered for p in g[0]]
            golds = [y for g in gathered for y in g[1]]
        if self.kind == "token_classification":
            out = self._tagging_metrics(dict(preds))
        else:
            out = classification_metrics(np.array(preds), np.array(golds), len(self.labels))
        out["eval_loss"] = float(loss_sum[0] / loss_sum[1])
        return out

    def _tagging_metrics(self, preds: dict[int, list[int]]) -> dict[str, float]:
        """Entity-level metrics over every validation word: a word that max_length cut off
        counts as predicted O."""
        names, task = self.labels, self.spec.task
        gold = [[names[t] for t in tags] for tags in task["val_tags"]]
        pred = []
        for i, g in enumerate(gold):
            row = ["O"] * len(g)
            for word, t in zip(task["val_words"][i], preds[i], strict=True):
                row[word] = names[t]
            pred.append(row)
        return tagging_metrics(pred, gold)

    def state_dict_fp32(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (all ranks must call it: ZeRO-3 gathers them)."""
        module = self.engine.module
        if self.cfg.zero.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        else:
            sd = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
        return sd if self.rank == 0 else None

    def export_best(self, out_dir: str) -> None:
        """Write ``<out_dir>/best``: a Hugging Face directory plain transformers loads."""
        sd = self.state_dict_fp32()
        if self.rank != 0:
            return
        remote = storage.is_uri(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".best-", dir=None if remote else out_dir))
        try:
            module = self.engine.module
            module.config.torch_dtype = torch.float32
            module.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
            load_tokenizer(str(self.base_local)).save_pretrained(str(tmp))
            marker = json.dumps({"epoch": self.epoch, "metric": self.cfg.tune.metric, "value": self.best}) + "\n"
            if remote:  # no rename in an object store: the old best/ goes, and the marker comes last
                final_uri = storage.join(out_dir, "best")
                storage.delete_dir(final_uri)
                storage.upload_dir(tmp, final_uri)
                storage.write_text(storage.join(final_uri, "ptm_best.json"), marker)
                return
            (tmp / "ptm_best.json").write_text(marker)
            final = Path(out_dir) / "best"
            old = Path(out_dir) / ".best-old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- reporting


class TrainReporter:
    """Inside a Ray Train worker: checkpoints and metrics through ray.train."""

    # The metrics line is written once the epoch's checkpoint is in storage: a multi-worker
    # trial hands the line to its scheduler, which may end the trial's job right away.
    log_first = False

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, ckpt_dir: str, epoch: int) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")


class TuneReporter:
    """A trial trained in the Tune trial's own process: checkpoints and metrics through ray.tune."""

    # ray.tune.report does not return when the scheduler stops the trial: write the line first.
    log_first = True

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, ckpt_dir: str, epoch: int) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(ckpt_dir))


def run_epochs(spec: FinetuneSpec, rank: int, world: int, device: torch.device, reporter) -> None:
    """Restore, then train and evaluate epoch by epoch until finetune.epochs."""
    run = FinetuneRun(spec, rank, world, device)
    try:
        _run_epochs(run, spec, rank, world, reporter)
    finally:
        run.close()


def _run_epochs(run: FinetuneRun, spec: FinetuneSpec, rank: int, world: int, reporter) -> None:
    cfg = run.cfg
    out_dir = spec.out_dir
    prefix = spec.log_prefix
    metric, mode = cfg.tune.metric, cfg.tune.mode
    ckpt = reporter.checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            run.restore(d)
        if rank == 0:
            print(f"{prefix} resumed after epoch {run.epoch}", flush=True)
    log = EpochLog(out_dir, run.epoch, prefix, cfg.finetune.epochs) if rank == 0 else None
    if rank == 0 and run.epoch == 0:
        print(f"{prefix} {len(run.train_ids)} training / {len(run.val_ids)} validation examples, "
              f"{len(run.labels)} labels, {world} worker(s), ZeRO-{cfg.zero.stage}, {run.precision}, "
              f"{run.steps_per_epoch} steps per epoch", flush=True)
    while run.epoch < cfg.finetune.epochs:
        if log is not None and not log.tracker.enabled:
            log.tracker = start_finetune(cfg, out_dir, spec.trial_id)
        t0 = time.perf_counter()
        loss = run.train_epoch()
        run.epoch += 1
        train_s = time.perf_counter() - t0
        record = {"epoch": run.epoch, "step": run.step, "loss": loss, **run.evaluate(),
                  "lr": float(run.engine.get_lr()[0]), "epoch_s": time.perf_counter() - t0,
                  "examples_per_s": run.steps_per_epoch * run.batch * world / train_s}
        improved = better(record[metric], run.best, mode)
        if improved:
            run.best, run.best_epoch = record[metric], run.epoch
            run.export_best(out_dir)
        record["best"] = run.best
        if log is not None and reporter.log_first:
            log.write(record)
            # wandb writes its file in the background; the trial may end inside report(), so
            # the run is closed (and continued next epoch, same id) to keep its history whole.
            log.tracker.finish()
        tmp = Path(tempfile.mkdtemp(prefix=f"ptm-ft-epoch{run.epoch}-rank{rank}-"))
        try:
            run.save_local(tmp)
            reporter.report(record, str(tmp), run.epoch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if log is not None and not reporter.log_first:
            log.write(record)
    if log is not None:
        log.tracker.finish()


def finetune_worker(config: dict) -> None:
    """Ray Train entry point (one call per worker)."""
    import ray.train
    import ray.train.torch

    spec: FinetuneSpec = config["spec"]
    forget_inherited_wandb_service()
    ctx = ray.train.get_context()
    if not spec.trial_id:  # the driver files this process's output as worker<rank>.log
        print(runlogs.rank_mark(ctx.get_world_rank()), flush=True)
    if spec.trial_id and ctx.get_world_rank() == 0:
        record_placement_group(spec.out_dir)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_epochs(spec, ctx.get_world_rank(), ctx.get_world_size(), device, TrainReporter())


PLACEMENT_GROUP_FILE = "placement_group"


def record_placement_group(out_dir: str) -> None:
    """Write the id of this Ray Train job's placement group into the trial directory.

    The sweep's driver removes it when Tune ends the trial (see sweep.ReleaseTrialJobs): Tune
    ends a stopped trial by terminating its actor, which leaves the job's placement group, and
    the CPUs or GPUs it reserves, to a Ray Train helper that needs the state API.
    """
    import ray.util

    pg = ray.util.get_current_placement_group()
    if pg is not None:
        storage.write_text(storage.join(out_dir, PLACEMENT_GROUP_FILE), pg.id.hex() + "\n")


def run_in_trial(spec: FinetuneSpec) -> None:
    """A one-worker trial in the Tune trial's own process: DeepSpeed over a world of one."""
    import ray

    forget_inherited_wandb_service()
    gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    init_single_process(device)
    random.seed(0)
    run_epochs(spec, 0, 1, device, TuneReporter())
