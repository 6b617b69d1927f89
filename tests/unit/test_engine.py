"""ptm_dist.engine without DeepSpeed running: the LR schedule against its closed form at every
step, the DeepSpeed config for the precisions, ZeRO stages and offloads the code defines, the
optimizer's weight-decay split, and precision resolution."""

from __future__ import annotations

import math

import pytest
import torch

from ptm_dist import models
from ptm_dist.config import load
from ptm_dist.engine import (
    REDUCE_BUCKET_ELEMENTS,
    EngineSpec,
    OptimSpec,
    build_optimizer,
    build_scheduler,
    check_precision,
    ds_config,
    lr_lambda,
    manual_clip,
    param_groups,
    resolve_precision,
)
from ptm_dist.errors import ConfigError, UserError

CPU = torch.device("cpu")


def optim(warmup: int, max_steps: int, **kw) -> OptimSpec:
    args = {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": warmup, "max_steps": max_steps, "weight_decay": 0.1,
            "grad_clip": 1.0, "micro_batch": 4}
    return OptimSpec(**{**args, **kw})


def closed_form_lr(step: int, o: OptimSpec) -> float:
    """Linear warmup to lr over warmup_steps ((step+1)/warmup of it), then half a cosine from lr
    down to min_lr over max_steps - warmup_steps, and min_lr from then on."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = min(step - o.warmup_steps, o.max_steps - o.warmup_steps) / (o.max_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup,max_steps", [(4, 20), (0, 10), (3, 4), (1, 7)])
def test_lr_schedule_is_the_closed_form_at_every_step(warmup, max_steps):
    o = optim(warmup, max_steps)
    f = lr_lambda(o)
    steps = range(max_steps + 6)  # past max_steps too: it stays at min_lr
    assert [o.lr * f(s) for s in steps] == pytest.approx([closed_form_lr(s, o) for s in steps], rel=1e-12)
    # the scheduler built on a real optimizer gives the same lr after each optimizer step
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, o, CPU)
    sched = build_scheduler(opt, o)
    seen = []
    for _ in steps:
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([closed_form_lr(s, o) for s in steps], rel=1e-12)
    assert seen[-1] == pytest.approx(o.min_lr) and max(seen) == pytest.approx(o.lr)


def test_lr_schedule_landmarks():
    o = optim(4, 20)
    f = lr_lambda(o)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)  # warmup ends at the peak
    assert o.lr * f(12) == pytest.approx((o.lr + o.min_lr) / 2)  # half-way down the cosine
    assert o.lr * f(20) == pytest.approx(o.min_lr) and o.lr * f(1000) == pytest.approx(o.min_lr)


def test_an_extended_schedule_continues_without_a_jump_and_survives_the_state_dict():
    """A 20-step schedule (warmup 4) extended at step 10 to end at 40, then at 30 to end at 50:
    from each extension on, half a cosine from the value there to min_lr at the new end
    (written out here); the same steps before. The extensions travel in LambdaLR's state dict
    into a scheduler built from the original spec, as a resume builds it."""
    o = optim(4, 20)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, o, CPU)
    sched = build_scheduler(opt, o)
    f = lr_schedule_of(sched)
    f.extend(10, 40)
    f.extend(30, 50)

    def half_cosine(step, start, end, top):
        return o.min_lr + 0.5 * (top - o.min_lr) * (1 + math.cos(math.pi * min(1.0, (step - start) / (end - start))))

    at10 = closed_form_lr(10, o)
    at30 = half_cosine(30, 10, 40, at10)
    want = [closed_form_lr(s, o) if s < 10 else half_cosine(s, 10, 40, at10) if s < 30 else half_cosine(s, 30, 50, at30)
            for s in range(60)]
    # rel=1e-12: two float formulas of the same value (measured max difference 4.0e-16)
    assert [o.lr * f(s) for s in range(60)] == pytest.approx(want, rel=1e-12)
    # no jump: at each extension the lr is the one the schedule had reached there
    assert o.lr * f(10) == pytest.approx(at10, rel=1e-12) and o.lr * f(30) == pytest.approx(at30, rel=1e-12)
    assert f.end == 50 and o.lr * f(50) == pytest.approx(o.min_lr)
    fresh = build_scheduler(build_optimizer(model, o, CPU), o)
    fresh.load_state_dict(sched.state_dict())
    assert [lr_schedule_of(fresh)(s) for s in range(60)] == [f(s) for s in range(60)]
    # raised during warmup: the plain schedule with the new end
    g = lr_schedule_of(build_scheduler(build_optimizer(model, o, CPU), o))
    g.extend(2, 30)
    assert [o.lr * g(s) for s in range(40)] == pytest.approx([closed_form_lr(s, optim(4, 30)) for s in range(40)],
                                                         rel=1e-12)


def lr_schedule_of(sched):
    return sched.lr_lambdas[0]


def test_ds_config_stage_0_fp32_clips_in_the_step():
    spec = EngineSpec(optim(2, 10, grad_accum=3), zero_stage=0, precision="fp32")
    conf = ds_config(spec, "fp32", on_gpu=False)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 3
    assert conf["zero_optimization"] == {"stage": 0}
    assert conf["bf16"] == {"enabled": False} and conf["fp16"]["enabled"] is False
    assert conf["gradient_clipping"] == 0.0 and manual_clip(spec, "fp32") == 1.0  # the step clips itself
    assert "optimizer" not in conf  # the torch AdamW built by build_optimizer


def test_ds_config_bf16_zero2_lets_deepspeed_clip():
    spec = EngineSpec(optim(2, 10), zero_stage=2, precision="bf16")
    for on_gpu in (True, False):
        conf = ds_config(spec, "bf16", on_gpu=on_gpu)
        assert conf["bf16"] == {"enabled": True} and conf["fp16"]["enabled"] is False
        assert conf["gradient_clipping"] == 1.0 and manual_clip(spec, "bf16") == 0.0
        assert conf["zero_optimization"] == {"stage": 2, "overlap_comm": on_gpu, "contiguous_gradients": True,
                                             "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}
        # gradients accumulated and all-reduced in fp32, not in the model's bf16
        assert conf["data_types"] == {"grad_accum_dtype": "fp32"} and conf["communication_data_type"] == "fp32"
    assert "data_types" not in ds_config(spec, "fp32", False) and "communication_data_type" not in ds_config(
        spec, "fp16", True)
    assert ds_config(EngineSpec(optim(2, 10)), "fp16", True)["fp16"] == {"enabled": True, "initial_scale_power": 16}


def test_ds_config_zero3_with_offloads():
    o = optim(2, 10, weight_decay=0.05, betas=(0.8, 0.99))
    spec = EngineSpec(o, zero_stage=3, offload_optimizer=True, offload_params=True, precision="bf16")
    conf = ds_config(spec, "bf16", on_gpu=True)
    zero = conf["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    # ZeRO-Offload: DeepSpeed's own CPU AdamW, with the job's hyperparameters
    assert conf["optimizer"] == {"type": "AdamW", "params": {"lr": o.lr, "betas": [0.8, 0.99], "eps": 1e-8,
                                                             "weight_decay": 0.05}}
    cpu = ds_config(spec, "bf16", on_gpu=False)["zero_optimization"]
    assert cpu["offload_param"]["pin_memory"] is False and cpu["offload_optimizer"]["pin_memory"] is False
    only_opt = ds_config(EngineSpec(o, zero_stage=2, offload_optimizer=True), "bf16", True)["zero_optimization"]
    assert "offload_param" not in only_opt and only_opt["offload_optimizer"]["device"] == "cpu"


def test_engine_spec_from_a_job():
    cfg = load(None, ["train.lr=2e-3", "train.min_lr=1e-4", "train.warmup_steps=7", "train.max_steps=70",
                      "train.grad_accum=2", "train.micro_batch=8", "train.weight_decay=0.01", "train.grad_clip=0.5",
                      "train.betas=[0.8, 0.9]", "train.precision=bf16", "zero.stage=3", "zero.offload_optimizer=true",
                      "zero.offload_params=true", "train.activation_checkpointing=true"])
    spec = EngineSpec.for_pretraining(cfg)
    assert spec.optim == OptimSpec(lr=2e-3, min_lr=1e-4, warmup_steps=7, max_steps=70, weight_decay=0.01,
                                   grad_clip=0.5, micro_batch=8, grad_accum=2, betas=(0.8, 0.9))
    assert (spec.zero_stage, spec.offload_optimizer, spec.offload_params) == (3, True, True)
    assert (spec.precision, spec.activation_checkpointing, spec.compile) == ("bf16", True, False)


def test_param_groups_no_decay_on_one_dimensional_parameters():
    cfg = models.hf_config("gpt2", "debug", 64, 16, models.SpecialTokens(eos=0, pad=1, mask=2))
    model = models.build(cfg, seed=0)
    model.transformer.wpe.weight.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    not_decayed = {by_id[id(p)] for p in no_decay["params"]}
    assert decayed == {n for n, p in named.items() if p.dim() >= 2 and n != "transformer.wpe.weight"}
    assert not_decayed == {n for n, p in named.items() if p.dim() == 1}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.h.0.ln_1.weight" in not_decayed and "transformer.h.0.attn.c_attn.bias" in not_decayed
    opt = build_optimizer(model, optim(2, 10), CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_resolve_precision():
    with pytest.raises(ConfigError, match="train.precision fp16 needs a GPU; use fp32 or bf16 on CPU") as e:
        resolve_precision("fp16", CPU)
    assert isinstance(e.value, UserError)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"  # named explicitly: kept, not probed
    # bf16 needs ZeRO >= 1 (DeepSpeed's stage 0 has no fp32 gradient accumulation for it)
    with pytest.raises(ConfigError, match="train.precision bf16 needs zero.stage 1, 2 or 3"):
        resolve_precision("bf16", CPU, zero_stage=0)
    with pytest.raises(ConfigError, match="train.precision bf16 needs zero.stage"):
        check_precision("bf16", on_gpu=True, zero_stage=0)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check_precision("fp16", on_gpu=False, zero_stage=2)
    check_precision("bf16", on_gpu=False, zero_stage=1)
    check_precision("auto", on_gpu=True, zero_stage=0)  # decided on the worker, which knows its GPU


def test_param_groups_use_the_full_shape_of_zero3_partitioned_parameters():
    """A ZeRO-3 partitioned parameter is a flat 1-D piece whose shape is in ``ds_shape``: a
    partitioned matrix is still decayed (a run that missed this trained without weight decay)."""
    matrix, bias = torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(2))
    matrix.ds_shape, bias.ds_shape = torch.Size([3, 4]), torch.Size([4])
    model = torch.nn.Module()
    model.w, model.b = matrix, bias
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [matrix] and no_decay["params"] == [bias]
