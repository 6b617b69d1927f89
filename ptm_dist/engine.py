"""DeepSpeed from a spec: the generated config, the optimizer and LR schedule, and one function
that prepares a model for training (activation checkpointing, ZeRO engine, compile).

    spec = EngineSpec.for_pretraining(cfg)          # or EngineSpec(OptimSpec(...), ...) to fine-tune
    model = build_model(hf_config, seed, zero3_conf, init_dir)  # ZeRO-3: built or loaded partitioned
    engine, precision = prepare(model, spec, device)

The engine knows the optimiser and schedule (``OptimSpec``) and the ZeRO settings, nothing of
the job sections they come from. The optimizer (AdamW, no decay on biases and norms) and the
schedule (linear warmup, then cosine decay to ``min_lr``, warmup-stable-decay or constant; see
LRSchedule) are also used by the plain single-process loop of ``ptm bench``, so the two train
with the same hyperparameters.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch

from ptm_dist.errors import ConfigError

# DeepSpeed's gradient reduce bucket (elements); ptm plan counts it in its memory estimate.
REDUCE_BUCKET_ELEMENTS = 50_000_000


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with a learning-rate schedule (``schedule``: cosine, wsd or constant, see
    LRSchedule), per worker batch and accumulation."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    grad_clip: float
    micro_batch: int
    grad_accum: int = 1
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays
    cooldown_steps: int = 0  # constant: the last steps that decay (0: none)


@dataclass(frozen=True)
class EngineSpec:
    """Everything ``prepare`` needs: the optimiser spec, ZeRO settings and precision."""

    optim: OptimSpec
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False

    @classmethod
    def for_pretraining(cls, cfg) -> EngineSpec:
        """From a job's ``train`` and ``zero`` sections (``cfg``: a JobConfig)."""
        t, z = cfg.train, cfg.zero
        optim = OptimSpec(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                          weight_decay=t.weight_decay, grad_clip=t.grad_clip, micro_batch=t.micro_batch,
                          grad_accum=t.grad_accum, betas=tuple(t.betas), schedule=t.schedule,
                          decay_fraction=t.decay_fraction, cooldown_steps=t.cooldown_steps)
        return cls(optim, z.stage, z.offload_optimizer, z.offload_params, t.precision,
                   t.activation_checkpointing, t.compile)


def check_precision(precision: str, on_gpu: bool, zero_stage: int) -> None:
    """What the driver can tell before workers start: fp16 needs a GPU, and bf16 needs ZeRO
    stage 1 or more (DeepSpeed keeps fp32 gradient accumulation only under ZeRO: at stage 0 it
    refuses bf16 with fp32 gradients, and would otherwise accumulate and reduce them in bf16)."""
    if precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if precision == "bf16" and zero_stage == 0:
        raise ConfigError("train.precision bf16 needs zero.stage 1, 2 or 3 (at stage 0 DeepSpeed has no fp32 "
                          "gradient accumulation for bf16); use zero.stage=1 (same memory for weights and "
                          "gradients as stage 0) or train.precision=fp32")


def resolve_precision(precision: str, device: torch.device, zero_stage: int = 1) -> str:
    """The precision a worker trains in: ``auto`` is bf16 on GPUs that have it, else fp16 on
    GPU, fp32 on CPU (see check_precision for what is refused)."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
        if precision == "bf16" and zero_stage == 0:
            raise ConfigError("train.precision auto is bf16 on this GPU, which needs zero.stage 1, 2 or 3; "
                              "use zero.stage=1 or set train.precision (fp16 or fp32) for stage 0")
    check_precision(precision, device.type == "cuda", zero_stage)
    return precision


def ds_config(spec: EngineSpec, precision: str, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config (also logged as part of the run's config)."""
    o = spec.optim
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.zero_stage > 0:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=REDUCE_BUCKET_ELEMENTS)
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": o.micro_batch,
        "gradient_accumulation_steps": o.grad_accum,
        # Plain fp32 DDP (stage 0) clips inside DeepSpeed without keeping the norm, so the step
        # clips itself there (see manual_clip) and the metric stays available for every stage.
        "gradient_clipping": 0.0 if manual_clip(spec, precision) else o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        # bf16 weights and activations; gradients accumulated and all-reduced in fp32 (DeepSpeed
        # otherwise uses the model's dtype for both), fp32 master weights in the optimizer.
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
        conf["communication_data_type"] = "fp32"
    if spec.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; the param groups still carry the decay split.
        conf["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay},
        }
    return conf


def manual_clip(spec: EngineSpec, precision: str) -> float:
    """Clip norm the step applies itself (0: DeepSpeed clips and reports the norm)."""
    return spec.optim.grad_clip if spec.zero_stage == 0 and precision == "fp32" else 0.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # A ZeRO-3 partitioned parameter is a flat piece of this rank's (ds_shape: its shape).
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, optim: OptimSpec, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=1e-8,
        fused=device.type == "cuda",
    )


class LRSchedule:
    """Multiplier on ``lr`` for optimizer step s (0-based). Every kind starts with a linear
    warmup, (s + 1) / warmup for s < warmup, then:

    cosine    half a cosine down to ``min_lr`` at ``max_steps``, and ``min_lr`` after.
    wsd       warmup-stable-decay: the peak until the last round(decay_fraction * max_steps)
              steps (at least 1), then a straight line down to ``min_lr`` at ``max_steps``.
    constant  the peak; with ``cooldown_steps`` > 0, a straight line down to ``min_lr`` over the
              last cooldown_steps steps (0: the peak to the end, and after).

    A decay window never reaches into the warmup: one longer than the steps after warmup begins
    where warmup ends. From multiplier m at the window's first step d, the line gives
    floor + (m - floor) * (1 - (s - d) / (end - d)) at step s, and the floor from ``end`` on.

    ``extend(at, end)`` changes the end of a run that has trained ``at`` steps without a jump.
    cosine: from step max(at, warmup) on, half a cosine goes from the multiplier there down to
    the floor at ``end``. wsd and constant: if the decay had not begun at ``at`` (warmup or
    stable phase) and the new end's window does not begin before ``at``, the schedule is the
    plain one with the new end (the decay moves). Otherwise (decaying, or finished, at ``at``)
    nothing warms up again: the multiplier stays at its value at ``at`` until the new end's
    decay window, then goes down the line from there to the floor at ``end`` (a finished run
    stays at the floor). Raised during warmup, every kind is the plain schedule with the new
    end. Extensions chain.

    The object holds only numbers and the kind's name: LambdaLR saves a callable object's
    ``__dict__`` in its state dict, so a checkpoint carries the schedule it trained with,
    extensions included. A state saved before ``kind`` existed sets the fields it has and
    leaves the others as built (checkpoint.check_resume refuses to resume one as other than
    cosine).
    """

    KINDS = ("cosine", "wsd", "constant")

    def __init__(self, optim: OptimSpec):
        if optim.schedule not in self.KINDS:
            raise ValueError(f"unknown learning-rate schedule {optim.schedule!r}; allowed: {', '.join(self.KINDS)}")
        self.floor = optim.min_lr / optim.lr
        self.warmup, self.max_steps = optim.warmup_steps, optim.max_steps
        self.extensions: list[list[int]] = []  # [at, end], in the order they were made
        self.kind = optim.schedule
        self.decay_fraction, self.cooldown_steps = optim.decay_fraction, optim.cooldown_steps

    @property
    def end(self) -> int:
        """The step at which the schedule reaches min_lr (constant without cooldown: its last step)."""
        return self.extensions[-1][1] if self.extensions else self.max_steps

    def extend(self, at: int, end: int) -> None:
        if end <= at:
            raise ValueError(f"a schedule extended at step {at} must end after it, not at {end}")
        self.extensions.append([at, end])

    def _cosine(self, step: int, start: int, end: int, top: float) -> float:
        progress = min(1.0, (step - start) / max(1, end - start))
        return self.floor + (top - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _decay_start(self, start: int, end: int) -> float:
        """First step of the decay window before ``end`` of a hold that began at ``start`` (wsd,
        constant); inf for a constant schedule without cooldown."""
        if self.kind == "wsd":
            return max(start, end - max(1, round(self.decay_fraction * end)))
        return max(start, end - self.cooldown_steps) if self.cooldown_steps > 0 else math.inf

    def _hold_then_decay(self, step: int, start: int, top: float, end: int) -> float:
        begin = self._decay_start(start, end)
        if step < begin:
            return top
        progress = min(1.0, (step - begin) / max(1, end - begin))
        return self.floor + (top - self.floor) * (1.0 - progress)

    def _piece(self, step: int, extensions: list[list[int]]) -> tuple[int, float, int]:
        """(start, top, end) of the hold-then-decay piece that ``step`` lies in (wsd, constant)."""
        start, top, end = self.warmup, 1.0, self.max_steps
        for at, new_end in extensions:
            if step < at:
                break
            if at > self._decay_start(start, end) or at > self._decay_start(start, new_end):
                # Decaying or done at ``at`` (or the new window would begin before it): hold
                # the multiplier reached there until the new window.
                start, top = at, self._hold_then_decay(at, start, top, end)
            end = new_end
        return start, top, end

    def value(self, step: int, n_extensions: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind != "cosine":
            return self._hold_then_decay(step, *self._piece(step, self.extensions[:n_extensions]))
        if n_extensions == 0:
            return self._cosine(step, self.warmup, self.max_steps, 1.0)
        at, end = self.extensions[n_extensions - 1]
        start = max(at, self.warmup)
        if step < start:
            return self.value(step, n_extensions - 1)
        return self._cosine(step, start, end, self.value(start, n_extensions - 1))

    def __call__(self, step: int) -> float:
        return self.value(step, len(self.extensions))


def lr_lambda(optim: OptimSpec) -> LRSchedule:
    """Multiplier on ``lr`` for optimizer step s (0-based): warmup, then ``optim.schedule``."""
    return LRSchedule(optim)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(optim))


def lr_schedule(engine) -> LRSchedule:
    """The LRSchedule inside a DeepSpeed engine built by ``prepare``."""
    return engine.lr_scheduler.lr_lambdas[0]


# DeepSpeed's ZeRO and bf16 optimizers import its Muon modules only to ask whether ours is a
# Muon optimizer (isinstance) and, inside every ZeRO-1/2 gradient reduction, to fetch the Muon
# update they apply to parameters marked ``use_muon``. Both modules compile kernels when imported
# (torch.compile loads all of TorchInductor): one process building and stepping an engine of each
# ZeRO stage took 12.7-12.8 s of CPU without stand-ins and 10.1-10.7 s with them, and a debug Ray
# Train job 51.3 against 43.5 CPU-s (2-core machine). ptm never builds a Muon optimizer nor marks a
# parameter for it, so a process that has not imported them gets stand-ins: a class nothing is an
# instance of, and update functions that refuse to run.
_MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


class _NotMuon:
    """Stand-in for DeepSpeed's MuonWithAuxAdam: no optimizer ptm builds is one."""


def _no_muon_update(*args, **kwargs):
    raise RuntimeError("ptm_dist does not train with DeepSpeed's Muon optimizer (its modules are stand-ins "
                       "in this process; see engine.skip_muon_import)")


def skip_muon_import() -> None:
    """Put stand-ins for the Muon modules DeepSpeed imports (call before importing deepspeed)."""
    for name in _MUON_MODULES:
        if name not in sys.modules:
            stand_in = types.ModuleType(name)
            stand_in.MuonWithAuxAdam = _NotMuon
            stand_in.muon_update = stand_in.adam_update = _no_muon_update
            sys.modules[name] = stand_in


def prepare(model: torch.nn.Module, spec: EngineSpec, device: torch.device):
    """(engine, precision): ``model`` made ready to train, the way one function applies every
    change to a single-device model: activation checkpointing, the DeepSpeed ZeRO engine with
    optimizer and schedule, then torch.compile."""
    from ptm_dist.dist import use_environment_extensions_dir

    use_environment_extensions_dir()  # before DeepSpeed builds its CPU communication op
    import deepspeed

    skip_muon_import()

    if spec.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    precision = resolve_precision(spec.precision, device, spec.zero_stage)
    conf = ds_config(spec, precision, device.type == "cuda")
    if spec.offload_optimizer:
        optimizer = None
        params = param_groups(model, spec.optim.weight_decay)
    else:
        optimizer = build_optimizer(model, spec.optim, device)
        params = None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        lr_scheduler=lambda opt: build_scheduler(opt, spec.optim),
        config=conf,
    )
    if spec.compile:
        engine.compile()
    return engine, precision


def build_model(config, seed: int | None, zero3: dict[str, Any] | None, init_dir: str | None = None):
    """The model a worker trains: ``models.build``, except that a pretrained model (``init_dir``)
    loaded under ZeRO-3 from safetensors files is read partitioned by ``load_partitioned``."""
    from ptm_dist import models
    from ptm_dist.dist import use_environment_extensions_dir

    use_environment_extensions_dir()  # ZeRO-3's zero.Init starts DeepSpeed's communication
    if zero3 is not None and init_dir is not None:
        model = load_partitioned(config, init_dir, zero3)
        if model is not None:
            return model
    return models.build(config, seed=seed, zero3=zero3, init_dir=init_dir)


def _safetensors_files(init_dir: str) -> dict[str, str] | None:
    """{checkpoint key: file path} of a model directory's safetensors weights (one file or an
    index of shards); None when it has none (``.bin`` weights: pickles cannot be read in part)."""
    import json

    single = os.path.join(init_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    index = os.path.join(init_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(init_dir, v) for k, v in weight_map.items()}
    return None


@contextlib.contextmanager
def _zero_init(conf: dict[str, Any]):
    """DeepSpeed's ``zero.Init`` that builds each parameter partitioned without initialising it
    and without broadcasting rank 0's values (the caller overwrites every partition): the whole
    parameter it allocates while a module is built is never written, so its pages never become
    resident. Transformers' own loading instead initialises, broadcasts and gathers each one."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param

    def partition_only(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        with Init(config_dict_or_path=conf):
            yield
    finally:
        Init._zero_init_param = original


def load_partitioned(config, init_dir: str, zero3: dict[str, Any]):
    """A pretrained model under ZeRO-3 with each rank reading only its own partition of every
    parameter from the safetensors files (memory-mapped; the rows that hold the partition), so
    no rank ever holds a whole parameter's values, let alone the whole model: measured with
    ``ptm bench init``. It needs a process group. Returns None, and the caller loads through
    transformers (rank 0 reads the whole state dict and scatters it), when the directory has no
    safetensors weights, transformers converts this model type's checkpoint keys, or a
    parameter of the model is not in the checkpoint (transformers would initialise it)."""
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import GenerationConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.integrations import HfDeepSpeedConfig

    from ptm_dist import models

    files = _safetensors_files(init_dir)
    if files is None or get_checkpoint_conversion_mapping(config.model_type):
        return None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5 releases
        from transformers.modeling_utils import no_init_weights
    try:  # keeps RoPE's arange buffers in their own dtype under zero.Init
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        prevent_arange_dtype_change = contextlib.nullcontext
    config._attn_implementation = "sdpa"
    keep = HfDeepSpeedConfig(zero3)  # transformers' later calls (generate, save) see ZeRO-3, as after models.build
    with no_init_weights(), prevent_arange_dtype_change(), _zero_init(zero3):
        model = models.model_class(config)(config)
    model.tie_weights()
    prefix = model.base_model_prefix + "."

    def key_of(name: str) -> str | None:
        for key in (name, name.removeprefix(prefix), prefix + name):
            if key in files:
                return key
        return None

    params = list(model.named_parameters())  # tied parameters once
    keys = [key_of(name) for name, _ in params]
    if None in keys or any(p.ds_shape == () for _, p in params):
        return None
    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        opened: dict[str, Any] = {}

        def tensor_slice(key: str):
            if files[key] not in opened:
                opened[files[key]] = stack.enter_context(safe_open(files[key], "pt"))
            return opened[files[key]].get_slice(key)

        with torch.no_grad():
            for (name, param), key in zip(params, keys, strict=True):
                piece = tensor_slice(key)
                shape = tuple(piece.get_shape())
                if shape != tuple(param.ds_shape):
                    raise ConfigError(f"model.init: {files[key]}: {key} has shape {list(shape)}, the model's "
                                      f"{name} {list(param.ds_shape)}")
                size = param.ds_tensor.numel()  # this rank's part of the flattened parameter, padded
                lo, hi = min(rank * size, param.ds_numel), min((rank + 1) * size, param.ds_numel)
                if hi == lo:
                    continue
                row = math.prod(shape[1:])
                first = lo // row
                values = piece[first:-(-hi // row)].reshape(-1)[lo - first * row:hi - first * row]
                param.ds_tensor[:hi - lo].copy_(values)
            for name, buf in model.named_buffers():  # not partitioned: read whole
                key = key_of(name)
                if key is not None and buf is not None:
                    buf.copy_(tensor_slice(key)[:])
    if os.path.isfile(os.path.join(init_dir, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(init_dir)
    model._ptm_hf_deepspeed_config = keep
    return model
