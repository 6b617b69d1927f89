"""The job schema: YAML job files loaded into typed, validated pydantic models.

    cfg = load("jobs/tiny.yaml", ["train.lr=3e-4", "scaling.num_workers=4"])

Every field has a description (``ptm pretrain --help`` and README point here). Unknown keys
and bad values raise :class:`ConfigError`, whose message has one line per problem naming the
field path, the value given and what is allowed. The schema defaults are the default job
(``jobs/tiny.yaml`` spells them out), so ``ptm pretrain`` with no file needs nothing on disk.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ptm_dist.errors import ConfigError
from ptm_dist.space import SpaceError, parse_space, sample_values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(_Section):
    name: str = Field("tiny", description="Run name; the run directory is <storage>/<name>.")
    storage: str = Field(
        "./runs",
        description="Where run directories live: a local path (relative paths are taken from "
        "the current directory) or a URI such as s3://bucket/prefix.",
    )
    seed: int = Field(0, ge=0, description="Seed for weights, data order and dropout.")
    resume: bool = Field(
        True,
        description="true: continue from the newest complete checkpoint of <storage>/<name>. "
        "false: never reuse it; a run directory that already holds a run gets a fresh "
        "directory <name>-2, <name>-3, ...",
    )
    allow_data_change: bool = Field(
        False,
        description="Resume even though the tokenizer or the training shard list differs from the "
        "checkpoint's (both are recorded in it): the weights and optimizer continue, the data "
        "stream starts at the beginning of the new shard list. false: such a resume is refused.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or v.strip() != v:
            raise ValueError("must be a non-empty directory name without '/' or spaces at the ends")
        return v


class ModelSection(_Section):
    family: str = Field(
        "gpt2",
        description="Architecture: a registry family (gpt2 and llama are causal LMs, bert a masked "
        "LM; sizes in ptm_dist/sizes.py) or any model type the installed transformers knows "
        "(qwen2, mistral, gemma, roberta, ...: causal or masked by its architecture). Ignored "
        "with model.init, which brings its own.",
    )
    size: str = Field(
        "tiny",
        description="Named size: the family's own in ptm_dist.sizes.SIZES, or for families "
        "outside the registry the generic sizes (debug, tiny, 124m, 1b) written with the "
        "standard config names. Ignored with model.init.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of the architecture's transformers config set on top of the size "
        "(or of model.init's config), e.g. {hidden_size: 256, num_hidden_layers: 6}; a name the "
        "config does not have is an error.",
    )
    init: str | None = Field(
        None,
        description="Start from these weights: a Hugging Face model directory (config.json and "
        "weights, local or a URI), or a ptm run or checkpoint directory (exported first). Its "
        "tokenizer is used unless data.tokenizer.path is set. Empty: random weights.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout probability on every dropout field the architecture has (0 for "
        "pretraining; with model.init it replaces the pretrained model's own values).",
    )
    mlm_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="Fraction of tokens masked for masked LMs (bert, ...)."
    )

    @field_validator("family")
    @classmethod
    def _family_is_a_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", v):
            raise ValueError(f"model.family {v!r}: a model type name such as gpt2, llama, bert or qwen2")
        return v

    @model_validator(mode="after")
    def _size_exists(self) -> ModelSection:
        from ptm_dist.sizes import GENERIC_SIZES, SIZES

        sizes = SIZES.get(self.family, GENERIC_SIZES)
        if self.init is None and self.size not in sizes:
            raise ValueError(
                f"model.size {self.size!r} does not exist for family {self.family!r}; "
                f"allowed: {', '.join(sizes)} (or set fields with model.config)"
            )
        return self


class SourceSection(_Section):
    path: str = Field(
        ...,
        description="'builtin' (the corpus built from Python's own documentation), a local "
        "directory, file or glob, or a URI (s3://, gs://, file://).",
    )
    format: Literal["auto", "jsonl", "parquet", "txt", "hf", "tokens"] = Field(
        "auto",
        description="Shard format; auto picks it from the file extension (a directory written by "
        "datasets' save_to_disk is read as hf, one written by `ptm prepare --tokens` as tokens).",
    )
    text_column: str = Field("text", description="Column (jsonl key) holding the document text.")
    weight: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Times each shard of this source is read per epoch, on average: 2 upsamples it, "
        "0.5 reads a different half of its shards each epoch. Sets the mix between sources.",
    )


class TokenizerSection(_Section):
    path: str | None = Field(
        None,
        description="Directory with a Hugging Face tokenizer (tokenizer.json). Empty: a byte-level "
        "BPE tokenizer is trained on the corpus and cached under data.cache_dir.",
    )
    vocab_size: int = Field(512, ge=260, le=262144, description="Vocabulary size when training one.")


class DataSection(_Section):
    sources: list[SourceSection] = Field(
        default_factory=lambda: [SourceSection(path="builtin")],
        description="Training shards.",
    )
    val_sources: list[SourceSection] = Field(
        default_factory=list,
        description="Held-out shards. Empty: the builtin corpus's own held-out split, or "
        "data.val_fraction of the training shards (never both train and val).",
    )
    val_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Fraction of training shards held out when val_sources is empty."
    )
    seq_len: int = Field(128, ge=8, le=131072, description="Tokens per packed training sequence.")
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    cache_dir: str | None = Field(
        None,
        description="Where the builtin corpus and trained tokenizers are kept. Empty: "
        "$PTM_DIST_CACHE, else ~/.cache/ptm-dist.",
    )
    max_bad_shards: int = Field(
        0, ge=0,
        description="Bad pieces of shards (corrupt, undecodable, empty, missing the text column) a run "
        "may skip, each reported by shard name; one more stops the run. 0: the first bad one stops it.",
    )
    piece_bytes: int = Field(
        32 << 20, ge=0,
        description="Shards are read in pieces of about this many bytes (byte ranges cut at line ends "
        "for jsonl/txt, groups of row groups for parquet, of record batches for Hugging Face arrow "
        "files; compressed files stay whole): the unit of parallel reading, ordering, resume and the "
        "bad-shard budget. Part of the run's identity. 0: every shard whole.",
    )
    read_concurrency: int = Field(
        2, ge=1, description="Pieces of shards read, tokenized and packed in parallel per worker stream."
    )
    shuffle_window: int = Field(
        1024, ge=1,
        description="Sequences shuffled together (seeded by run.seed) after the shard order is "
        "shuffled; memory grows with it. 1: no shuffle within shards.",
    )
    log_sequence_ids: bool = Field(
        False,
        description="Write the ids of every step's sequences to <run_dir>/sequence_ids/rank<r>.jsonl "
        "(find the data behind a loss spike; audit exactly-once resume). Local run directories only.",
    )

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must name at least one source")
        return v


class TrainSection(_Section):
    max_steps: int = Field(500, ge=1, description="Optimizer steps to train for.")
    micro_batch: int = Field(16, ge=1, description="Sequences per worker per forward/backward.")
    grad_accum: int = Field(1, ge=1, description="Micro batches accumulated per optimizer step.")
    lr: float = Field(3e-3, gt=0.0, description="Peak learning rate (AdamW).")
    min_lr: float = Field(
        3e-4, ge=0.0, description="Learning rate at the end of the decay (cosine, wsd, constant with cooldown)."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps from 0 to train.lr, before the schedule.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine",
        description="Learning rate after warmup. cosine: half a cosine from train.lr down to train.min_lr "
        "at train.max_steps. wsd (warmup-stable-decay): train.lr, then a linear decay to train.min_lr "
        "over the last train.decay_fraction of the steps. constant: train.lr, with a linear decay to "
        "train.min_lr over the last train.cooldown_steps steps when that is > 0. wsd and constant runs "
        "extend (train.max_steps raised on resume) by moving their decay to the new end.",
    )
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0,
        description="train.schedule wsd: the fraction of train.max_steps at the end over which the "
        "learning rate decays from train.lr to train.min_lr, linearly (the standard shape in the WSD "
        "literature); round(decay_fraction x max_steps) steps, at least 1, never into the warmup.",
    )
    cooldown_steps: int = Field(
        0, ge=0,
        description="train.schedule constant: the last steps, over which the learning rate decays "
        "linearly from train.lr to train.min_lr (never into the warmup); 0: train.lr to the end.",
    )
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Global gradient-norm clip (0: off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."
    )
    eval_every: int = Field(100, ge=1, description="Evaluate on held-out data every N steps (and at 0 and the end).")
    eval_sequences: int = Field(64, ge=1, description="Held-out sequences per evaluation (all workers together).")
    eval_tasks: list[str] = Field(
        default_factory=list,
        description="Downstream tasks scored with lm-evaluation-harness on the weights being trained "
        "(causal models): built-in names (ptm_builtin_word_order, ptm_builtin_docstrings; offline), "
        "the harness's task names (each node downloads their data) or paths of local task YAML files. "
        "Logged as eval/<task>/<metric>; timed apart from training.",
    )
    eval_tasks_every: int = Field(
        0, ge=0, description="Score train.eval_tasks every N steps (and at step 0 and the end); 0: at the end only."
    )
    eval_tasks_limit: int | None = Field(
        200, ge=1, description="Items per task and evaluation (the harness's limit); null: every item."
    )
    ckpt_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_ckpts: int = Field(2, ge=1, description="Complete checkpoints kept; the newest is never deleted.")
    ckpt_upload: Literal["auto", "background", "foreground"] = Field(
        "auto",
        description="How workers copy a checkpoint into the run directory. background: training "
        "goes on while the files upload (COMPLETE is written once every rank's upload finished; "
        "one upload in flight at a time); foreground: training waits for the upload; auto: "
        "background for object-storage run directories, foreground for local paths.",
    )
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")
    activation_checkpointing: bool = Field(
        False, description="Recompute layer activations in the backward pass: less memory, ~30% more compute."
    )
    compile: bool = Field(False, description="torch.compile the model (DeepSpeed engine.compile).")
    max_failures: int = Field(
        3, ge=-1,
        description="Worker failures (a dead process or node, an error on a worker) Ray Train "
        "recovers from by restarting the workers from the newest complete checkpoint; -1: no "
        "limit. 0: the first failure stops the run with an error naming the failed worker.",
    )
    preempt_grace_s: float = Field(
        30.0, gt=0,
        description="After SIGTERM to the driver (a preemption notice, Kubernetes ending a pod) the "
        "run writes a checkpoint at the next step boundary and stops; past this many seconds it "
        "stops without one (the newest complete checkpoint is kept). Keep it under the notice "
        "your platform gives (spot instances: 30-120 s; Kubernetes: terminationGracePeriodSeconds).",
    )
    skip_nonfinite: int = Field(
        0, ge=0,
        description="Steps with a non-finite loss or gradient that a run may skip (the update is "
        "dropped: weights, optimizer state and LR schedule stay as they were), each reported "
        "and counted as nonfinite_skipped in metrics and checkpoints; one more stops the run. "
        "0: the first one stops it.",
    )
    spike_factor: float = Field(
        2.0, ge=0.0,
        description="Warn when the loss stays above this multiple of its running mean for "
        "train.spike_patience steps (counted as loss_spikes in metrics). 0: no warning.",
    )
    spike_patience: int = Field(5, ge=1, description="Steps the loss must stay high before a spike warning.")

    @field_validator("eval_tasks")
    @classmethod
    def _task_names(cls, tasks: list[str]) -> list[str]:
        for t in tasks:
            if not (t.endswith((".yaml", ".yml")) or re.fullmatch(r"[\w.\-]+", t)):
                raise ValueError(f"train.eval_tasks: {t!r} is neither a task name nor a task YAML file (*.yaml)")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"train.eval_tasks: a task is listed twice ({', '.join(tasks)})")
        return tasks

    @model_validator(mode="after")
    def _lr_order(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr {self.min_lr} must not exceed train.lr {self.lr}")
        return self

    @model_validator(mode="after")
    def _cooldown_fits(self) -> TrainSection:
        if self.cooldown_steps and self.schedule != "constant":
            raise ValueError(f"train.cooldown_steps {self.cooldown_steps} applies to train.schedule constant, "
                             f"not {self.schedule} (wsd decays over train.decay_fraction of the steps)")
        if self.cooldown_steps > self.max_steps:
            raise ValueError(f"train.cooldown_steps {self.cooldown_steps} must not exceed train.max_steps "
                             f"{self.max_steps}")
        return self


class ZeroSection(_Section):
    stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 (plain DDP) to 3.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO-Offload).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO-3 only).")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> ZeroSection:
        if self.offload_params and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage 1, 2 or 3")
        return self


class ScalingSection(_Section):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Ray Train workers (one per GPU, or CPU slots); [MIN, MAX]: an elastic range "
        "(ptm pretrain): as many as the cluster offers, at least MIN, continuing on fewer when "
        "nodes are lost and growing back when capacity returns. The job's batch is defined at MAX.",
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="auto: use GPUs when the Ray cluster has any."
    )
    resources_per_worker: dict[str, float] | None = Field(
        None,
        description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}. Empty: 1 GPU on GPU runs, "
        "1 CPU on CPU runs.",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="pack: workers on as few nodes as possible; spread: across nodes."
    )
    resize_check_s: float = Field(
        60.0, gt=0,
        description="With an elastic range: how often Ray Train looks for room for more workers "
        "while the run is healthy; growing restarts the workers from the newest checkpoint.",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> int | tuple[int, int]:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"must be at least 1, not {v}")
            return v
        if not (isinstance(v, (list, tuple)) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"must be a number of workers or a range [MIN, MAX], not {v!r}")
        low, high = v
        if not 1 <= low <= high:
            raise ValueError(f"[MIN, MAX] needs 1 <= MIN <= MAX, not {list(v)}")
        return low if low == high else (low, high)

    @property
    def elastic(self) -> bool:
        """Whether num_workers is a range [MIN, MAX]."""
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def fixed_workers(self, command: str) -> int:
        """num_workers for a command that runs on a fixed number of workers (all but ptm pretrain)."""
        if not self.elastic:
            return self.num_workers
        raise ConfigError(
            f"scaling.num_workers {list(self.num_workers)}: {command} runs on a fixed number of workers, "
            f"not a range (only ptm pretrain is elastic); set one number, e.g. --set "
            f"scaling.num_workers={self.max_workers}")


class TrackingSection(_Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="Weights & Biases logging. auto: online when WANDB_API_KEY is set or wandb is "
        "logged in (netrc), else offline (WANDB_MODE, when set, decides instead); offline: files "
        "under <run_dir>/wandb/, upload later with `wandb sync`; disabled: no wandb at all "
        "(metrics.jsonl and job.yaml are always written).",
    )
    project: str = Field("ptm-dist", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity (user or team). Empty: your default.")
    tags: list[str] = Field(default_factory=list, description="wandb tags for the run.")
    group: str | None = Field(
        None, description="wandb group. Empty: none for single runs, the sweep's name for tune trials."
    )


class FinetuneSection(_Section):
    """`ptm finetune`: sequence or token classification from a pretrained model (README, Fine-tuning)."""

    name: str = Field("finetune", description="Fine-tuning run name; its directory is <run.storage>/<name>.")
    task: Literal["sequence_classification", "token_classification"] = Field(
        "sequence_classification",
        description="sequence_classification: one label per text; token_classification: one tag per "
        "word (rows of tokens and tags; tags O or B-/I-/E-/S-TYPE), entity-level metrics.",
    )
    init: str | None = Field(
        None,
        description="Start model: a ptm run or checkpoint directory (exported to Hugging Face format "
        "first), or a Hugging Face model directory (config.json). Empty: this job's pretraining run "
        "<run.storage>/<run.name>, trained first when it has no complete checkpoint.",
    )
    data: str = Field(
        "builtin",
        description="Labeled examples: 'builtin' (sequence_classification: docstrings of Python's "
        "standard library labeled with their module family; token_classification: lines of its code "
        "with their module, function, class and keyword-argument names tagged), or a jsonl, csv or "
        "parquet file or glob (token_classification: jsonl or parquet).",
    )
    val_data: str | None = Field(
        None, description="Validation file or glob. Empty: val_fraction of data, split per label."
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out when val_data is empty.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto picks it from the extension."
    )
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label (strings or integers).")
    tokens_column: str = Field("tokens", description="token_classification: column holding the list of words.")
    tags_column: str = Field("tags", description="token_classification: column holding one tag per word.")
    max_length: int = Field(128, ge=4, le=131072, description="Tokens per example; longer texts are cut.")
    epochs: int = Field(4, ge=1, description="Passes over the training examples.")
    batch_size: int = Field(16, ge=1, description="Examples per worker per optimizer step.")
    lr: float = Field(2e-3, gt=0.0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr (cosine).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of the steps spent in linear warmup.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on biases and norms).")
    grad_clip: float = Field(1.0, ge=0.0, description="Global gradient-norm clip (0: off).")

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        return RunSection._name_is_a_path_component(v)


class TuneSection(_Section):
    """`ptm tune`: a Ray Tune sweep over the fine-tuning hyperparameters (README, Sweeps)."""

    name: str = Field("tune", description="Sweep name; its directory is <run.storage>/<name>.")
    space: dict[str, Any] = Field(
        default_factory=lambda: {
            "finetune.lr": {"loguniform": [3e-4, 1e-2]},
            "finetune.batch_size": {"choice": [16, 32]},
            "finetune.weight_decay": {"uniform": [0.0, 0.1]},
        },
        description="Dotted job key -> distribution: {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
        "{choice: [values]}, {randint: [lo, hi)} or {grid: [values]} (see ptm_dist/space.py).",
    )
    scheduler: Literal["asha", "pbt", "fifo"] = Field(
        "asha", description="asha: stop poor trials early; pbt: population based training; fifo: none."
    )
    search: Literal["random", "optuna"] = Field(
        "random", description="random: sample (grid entries are crossed); optuna: TPE (needs optuna installed)."
    )
    num_samples: int = Field(8, ge=1, description="Trials (times the grid's size when the space has grid entries).")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    metric: Literal["accuracy", "f1_macro", "precision_macro", "recall_macro", "f1", "precision", "recall",
                    "eval_loss"] = Field(
        "accuracy",
        description="Validation metric that ranks trials (and picks each run's best epoch). accuracy and "
        "eval_loss: both tasks; f1_macro, precision_macro, recall_macro: sequence_classification; f1, "
        "precision, recall (entity level): token_classification.",
    )
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or lower metric is better.")
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="asha: 1/reduction_factor of trials go on at each rung.")
    perturbation_interval: int = Field(1, ge=1, description="pbt: epochs between exploit/explore steps.")
    num_workers: int = Field(
        1, ge=1,
        description="Ray Train workers per trial (a DeepSpeed job each). 1: the trial trains in its own "
        "process, without starting a separate Ray Train job.",
    )
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources per trial worker. Empty: scaling.resources_per_worker, else "
        "1 GPU on GPU clusters, 1 CPU on CPU.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        return RunSection._name_is_a_path_component(v)

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, v: Any) -> dict:
        try:
            parsed = parse_space(v)
        except SpaceError as e:  # the path 'tune.space' is added by the error formatter
            raise ValueError(str(e).removeprefix("tune.space").lstrip(".: ")) from None
        sections = {"finetune": FinetuneSection, "run": RunSection}
        for values in sample_values(parsed):
            for key, value in values.items():
                section, field = key.split(".", 1)
                try:
                    sections[section].model_validate({field: value})
                except ValidationError as e:
                    msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{key}: value {value!r} is not allowed: {msg}") from None
        return parsed

    @model_validator(mode="after")
    def _scheduler_fits(self) -> TuneSection:
        if self.scheduler == "pbt" and self.num_workers > 1:
            raise ValueError("tune.scheduler pbt needs tune.num_workers 1 (PBT moves checkpoints between "
                             "trials, which multi-worker trials do not hand to Tune)")
        if self.search == "optuna" and any("grid" in s for s in self.space.values()):
            raise ValueError("tune.search optuna cannot expand grid entries; use choice instead of grid")
        if self.metric == "eval_loss" and self.mode == "max":
            raise ValueError("tune.metric eval_loss needs tune.mode min")
        return self


def range_batch_problem(total: int, micro: int, low: int, high: int, kept: bool = False) -> str | None:
    """Why a global batch of ``total`` sequences per step cannot be kept on every worker count of
    the elastic range [low, high] with ``micro`` sequences per micro batch (each group runs
    grad_accum = total / (micro x workers)), or None. ``kept``: the total is a checkpoint's."""
    bad = [n for n in range(low, high + 1) if total % (micro * n)]
    if not bad:
        return None
    span = math.lcm(*range(low, high + 1))
    what = (f"a range whose every worker count divides {total // micro} (the checkpoint's {total} sequences per "
            f"step / train.micro_batch {micro})" if kept else
            f"train.grad_accum a multiple of {span // math.gcd(span, high)}, or a range without those counts")
    return (f"the global batch of {total} sequences per step (train.micro_batch {micro} x {high} workers x "
            f"grad_accum {total / (micro * high):g}) cannot be kept on {', '.join(map(str, bad))} "
            f"worker{'s' if bad != [1] else ''} (grad_accum would not be whole): use {what}")


class JobConfig(_Section):
    """A whole job: what `ptm pretrain JOB` runs."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    zero: ZeroSection = Field(default_factory=ZeroSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _metric_fits_task(self) -> JobConfig:
        task_metrics = {"sequence_classification": ("f1_macro", "precision_macro", "recall_macro"),
                        "token_classification": ("f1", "precision", "recall")}
        mine = task_metrics[self.finetune.task]
        other = [m for ms in task_metrics.values() for m in ms if m not in mine]
        if self.tune.metric in other:
            raise ValueError(f"tune.metric {self.tune.metric} is not measured for finetune.task "
                             f"{self.finetune.task}; use accuracy, eval_loss, {', '.join(mine)}")
        return self

    @model_validator(mode="after")
    def _range_keeps_batch(self) -> JobConfig:
        s, t = self.scaling, self.train
        if s.elastic:  # the batch is defined at MAX workers and kept on each size of the range
            problem = range_batch_problem(t.micro_batch * t.grad_accum * s.max_workers, t.micro_batch,
                                          s.min_workers, s.max_workers)
            if problem:
                raise ValueError(f"scaling.num_workers {list(s.num_workers)}: {problem}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def cache_dir(cfg: JobConfig) -> Path:
    root = cfg.data.cache_dir or os.environ.get("PTM_DIST_CACHE") or "~/.cache/ptm-dist"
    return Path(root).expanduser().resolve()


# ---------------------------------------------------------------- loading and errors


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: {path}: unknown key{_suggest(e['loc'])}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"{origin}: {path or '(top level)'}{shown}: {msg}")
    return "\n".join(lines)


def _suggest(loc: tuple) -> str:
    """' (did you mean train.lr?)' for a misspelt key, else the allowed keys."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    prefix = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    if close:
        return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
    return f"; allowed: {', '.join(allowed)}"


def apply_override(doc: dict, override: str) -> None:
    """Apply one 'dotted.key=value' override in place; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    value = yaml.safe_load(raw) if raw.strip() else None
    node = doc
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job file (None: the defaults) and apply --set overrides, validating the result."""
    origin = str(path) if path else "default job"
    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: job file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a job file must be a mapping of sections, got {type(loaded).__name__}")
        doc = loaded
    for ov in overrides or []:
        apply_override(doc, ov)
    if overrides:
        origin += " with --set " + " ".join(overrides)
    try:
        return JobConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None
