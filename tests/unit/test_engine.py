"""ptm_dist.engine: the LR schedules (cosine, wsd, constant) against references written out here
at every step, extended on resume without a jump (also through a real DeepSpeed engine's
checkpoint, on CPU), the DeepSpeed config for the precisions, ZeRO stages and offloads the code
defines, the optimizer's weight-decay split, and precision resolution."""

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


# ---------------------------------------------------------------- wsd and constant schedules
# References written out here from the schedules' description (README, config field docs):
# linear warmup (step+1)/warmup of lr; wsd holds lr until its last round(fraction x max_steps)
# steps (at least 1, never inside the warmup), constant until its last cooldown_steps (0: never);
# then a straight line from lr at the window's first step to min_lr at max_steps, min_lr after.


def hold_then_line(step: int, top: float, first: int, end: int, min_lr: float) -> float:
    """``top`` before step ``first``, then linear from ``top`` at ``first`` to ``min_lr`` at ``end``."""
    if step <= first:
        return top
    if step >= end:
        return min_lr
    return top - (top - min_lr) * (step - first) / (end - first)


def reference_wsd(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, fraction: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    first = max(warmup, max_steps - max(1, round(fraction * max_steps)))
    return hold_then_line(step, lr, first, max_steps, min_lr)


def reference_constant(step: int, lr: float, min_lr: float, warmup: int, max_steps: int, cooldown: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    if cooldown == 0:
        return lr
    return hold_then_line(step, lr, max(warmup, max_steps - cooldown), max_steps, min_lr)


def lrs_of_a_real_scheduler(o: OptimSpec, steps: int) -> list[float]:
    """The lr of each optimizer step, from the scheduler built on a real optimizer."""
    opt = build_optimizer(torch.nn.Linear(3, 2), o, CPU)
    sched = build_scheduler(opt, o)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("warmup,max_steps,fraction", [
    (4, 20, 0.2),    # 4 decay steps: 16-20
    (4, 20, 0.25),   # 5: 15-20
    (0, 10, 0.5),    # no warmup
    (2, 50, 0.1),
    (3, 4, 1.0),     # the whole run decays: the window begins where warmup ends
    (5, 7, 0.01),    # round() gives 0: at least one step decays
    (10, 100, 0.15),
])
def test_wsd_schedule_is_the_reference_at_every_step(warmup, max_steps, fraction):
    o = optim(warmup, max_steps, schedule="wsd", decay_fraction=fraction)
    steps = range(max_steps + 6)  # past max_steps too: it stays at min_lr
    want = [reference_wsd(s, o.lr, o.min_lr, warmup, max_steps, fraction) for s in steps]
    f = lr_lambda(o)
    # rel=1e-12: float rounding between two formulas of the same value
    assert [o.lr * f(s) for s in steps] == pytest.approx(want, rel=1e-12)
    assert lrs_of_a_real_scheduler(o, len(steps)) == pytest.approx(want, rel=1e-12)
    assert o.lr * f(max_steps) == pytest.approx(o.min_lr, rel=1e-12) and max(want) == pytest.approx(o.lr)


def test_wsd_landmarks():
    o = optim(4, 20, schedule="wsd", decay_fraction=0.25)  # warmup 0-3, stable 4-15, decay 15-20
    f = lr_lambda(o)
    assert f(0) == pytest.approx(0.25) and f(3) == 1.0 and f(4) == 1.0 and f(15) == 1.0
    assert o.lr * f(16) == pytest.approx(o.lr - (o.lr - o.min_lr) / 5, rel=1e-12)
    assert o.lr * f(20) == pytest.approx(o.min_lr, rel=1e-12) and o.lr * f(1000) == pytest.approx(o.min_lr)


@pytest.mark.parametrize("warmup,max_steps,cooldown", [(4, 20, 0), (4, 20, 5), (0, 10, 10), (3, 6, 6), (2, 30, 1)])
def test_constant_schedule_is_the_reference_at_every_step(warmup, max_steps, cooldown):
    o = optim(warmup, max_steps, schedule="constant", cooldown_steps=cooldown)
    steps = range(max_steps + 6)
    want = [reference_constant(s, o.lr, o.min_lr, warmup, max_steps, cooldown) for s in steps]
    f = lr_lambda(o)
    assert [o.lr * f(s) for s in steps] == pytest.approx(want, rel=1e-12)
    assert lrs_of_a_real_scheduler(o, len(steps)) == pytest.approx(want, rel=1e-12)
    assert o.lr * f(max_steps + 5) == pytest.approx(o.min_lr if cooldown else o.lr, rel=1e-12)


def test_the_default_schedule_is_the_cosine_one_bit_for_bit():
    """OptimSpec's and the job's default is cosine, and a cosine schedule with the new fields set
    to anything gives exactly (==) the closed form's values as before."""
    assert optim(4, 20).schedule == "cosine" and load(None, []).train.schedule == "cosine"
    plain = lr_lambda(optim(4, 20))
    other = lr_lambda(optim(4, 20, decay_fraction=0.7, cooldown_steps=3))
    assert [plain(s) for s in range(30)] == [other(s) for s in range(30)]
    assert [optim(4, 20).lr * plain(s) for s in range(30)] == pytest.approx(
        [closed_form_lr(s, optim(4, 20)) for s in range(30)], rel=1e-12)


def extended(o: OptimSpec, *extensions: tuple[int, int]) -> list[float]:
    """lr at steps 0 .. the last end + 5 of ``o``'s schedule extended at (at, end) in order,
    each extension made after its state dict went through a fresh scheduler (as a resume does):
    the values at steps before an extension's ``at`` are those before it."""
    opt = build_optimizer(torch.nn.Linear(3, 2), o, CPU)
    sched = build_scheduler(opt, o)
    for at, end in extensions:
        fresh = build_scheduler(build_optimizer(torch.nn.Linear(3, 2), o, CPU), o)
        fresh.load_state_dict(sched.state_dict())
        before = [lr_schedule_of(fresh)(s) for s in range(at + 1)]
        lr_schedule_of(fresh).extend(at, end)
        assert [lr_schedule_of(fresh)(s) for s in range(at + 1)] == pytest.approx(before, rel=1e-12)
        sched = fresh
    f = lr_schedule_of(sched)
    return [o.lr * f(s) for s in range(extensions[-1][1] + 6)]


def assert_no_jump(lrs: list[float], o: OptimSpec) -> None:
    """After warmup, no step changes the lr by more than the unextended schedule's steepest step."""
    plain = lr_lambda(o)
    steepest = max(abs(o.lr * (plain(s + 1) - plain(s))) for s in range(o.warmup_steps, o.max_steps + 1))
    changes = [abs(b - a) for a, b in zip(lrs[o.warmup_steps:], lrs[o.warmup_steps + 1:])]
    assert max(changes) <= steepest * (1 + 1e-9), (max(changes), steepest)


def test_a_wsd_run_extended_in_its_stable_phase_moves_its_decay_to_the_new_end():
    """20 steps (warmup 4, decay over the last 5: from 15) extended at step 10 to 40: the plain
    wsd schedule of 40 steps (decay over the last 10: from 30), so it reaches min_lr at 40."""
    o = optim(4, 20, schedule="wsd", decay_fraction=0.25)
    lrs = extended(o, (10, 40))
    want = [reference_wsd(s, o.lr, o.min_lr, 4, 40, 0.25) for s in range(46)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[10] == o.lr and lrs[29] == o.lr and lrs[40] == pytest.approx(o.min_lr, rel=1e-12)
    assert_no_jump(lrs, o)
    # raised during warmup (at 2): the plain schedule with the new end as well
    assert extended(o, (2, 40)) == pytest.approx(want, rel=1e-12)
    # raised at the stable phase's last step (15: the decay's first step, still at the peak)
    assert extended(o, (15, 40)) == pytest.approx(want, rel=1e-12)


def test_a_wsd_run_extended_while_decaying_holds_its_lr_then_decays_to_the_new_end():
    """Extended at step 17, two steps into its decay (15-20): no re-warmup; the lr it had at 17
    stays until the new end's decay window (the last 10 of 40 steps: from 30), then goes down a
    straight line to min_lr at 40. Then extended again at 35 (in that window) to 60: the lr at 35
    stays until 60's window (from 45) and goes down to min_lr at 60."""
    o = optim(4, 20, schedule="wsd", decay_fraction=0.25)
    at17 = reference_wsd(17, o.lr, o.min_lr, 4, 20, 0.25)
    first = [reference_wsd(s, o.lr, o.min_lr, 4, 20, 0.25) if s < 17 else hold_then_line(s, at17, 30, 40, o.min_lr)
             for s in range(46)]
    lrs = extended(o, (17, 40))
    assert lrs == pytest.approx(first, rel=1e-12)
    assert lrs[17] == pytest.approx(at17, rel=1e-12) and lrs[30] == pytest.approx(at17, rel=1e-12)
    assert lrs[40] == pytest.approx(o.min_lr, rel=1e-12)
    assert_no_jump(lrs, o)
    at35 = first[35]
    chained = extended(o, (17, 40), (35, 60))
    assert chained == pytest.approx(first[:35] + [hold_then_line(s, at35, 45, 60, o.min_lr) for s in range(35, 66)],
                                    rel=1e-12)
    assert chained[60] == pytest.approx(o.min_lr, rel=1e-12)
    assert_no_jump(chained, o)
    # resumed from a finished run: it stays at min_lr
    finished = extended(o, (20, 40))
    assert finished[:20] == pytest.approx(first[:17] + [reference_wsd(s, o.lr, o.min_lr, 4, 20, 0.25)
                                                        for s in range(17, 20)], rel=1e-12)
    assert finished[20:] == pytest.approx([o.min_lr] * 26, rel=1e-12)


def test_a_shortened_wsd_run_whose_new_window_began_before_the_resume_decays_from_there():
    """max_steps lowered from 100 to 60 at step 55 (stable until 80 before; 60's window would
    begin at 48): from 55 a straight line from the peak to min_lr at 60, no jump at 55."""
    o = optim(4, 100, schedule="wsd", decay_fraction=0.2)
    lrs = extended(o, (55, 60))
    assert lrs[:56] == pytest.approx([reference_wsd(s, o.lr, o.min_lr, 4, 100, 0.2) for s in range(56)], rel=1e-12)
    assert lrs[55:] == pytest.approx([hold_then_line(s, o.lr, 55, 60, o.min_lr) for s in range(55, 66)], rel=1e-12)


def test_a_constant_run_extended_moves_its_cooldown_and_holds_the_lr_it_reached_in_one():
    o = optim(4, 20, schedule="constant", cooldown_steps=5)  # cooldown 15-20
    ref = [reference_constant(s, o.lr, o.min_lr, 4, 40, 5) for s in range(46)]
    stable = extended(o, (10, 40))
    assert stable == pytest.approx(ref, rel=1e-12) and stable[40] == pytest.approx(o.min_lr, rel=1e-12)
    assert_no_jump(stable, o)
    at18 = reference_constant(18, o.lr, o.min_lr, 4, 20, 5)
    cooling = extended(o, (18, 40))
    assert cooling == pytest.approx([reference_constant(s, o.lr, o.min_lr, 4, 20, 5) if s < 18
                                     else hold_then_line(s, at18, 35, 40, o.min_lr) for s in range(46)], rel=1e-12)
    assert cooling[40] == pytest.approx(o.min_lr, rel=1e-12)
    assert_no_jump(cooling, o)
    # without a cooldown it never decays: extended, it stays at the peak
    none = optim(4, 20, schedule="constant")
    assert extended(none, (10, 40)) == pytest.approx([reference_constant(s, o.lr, o.min_lr, 4, 40, 0)
                                                      for s in range(46)], rel=1e-12)


def test_a_schedule_state_saved_before_the_kinds_existed_loads_as_cosine():
    """A LambdaLR state from before train.schedule (no kind, decay_fraction or cooldown_steps
    in the schedule's fields) loaded into the scheduler a resume builds (cosine: check_resume
    refuses anything else for such a checkpoint) gives the old values exactly."""
    o = optim(4, 20)
    sched = build_scheduler(build_optimizer(torch.nn.Linear(3, 2), o, CPU), o)
    lr_schedule_of(sched).extend(10, 40)
    state = sched.state_dict()
    state["lr_lambdas"] = [{k: v for k, v in state["lr_lambdas"][0].items()
                            if k in ("floor", "warmup", "max_steps", "extensions")}]
    fresh = build_scheduler(build_optimizer(torch.nn.Linear(3, 2), optim(4, 40), CPU), optim(4, 40))
    fresh.load_state_dict(state)
    assert [lr_schedule_of(fresh)(s) for s in range(50)] == [lr_schedule_of(sched)(s) for s in range(50)]
    assert lr_schedule_of(fresh).kind == "cosine" and lr_schedule_of(fresh).end == 40


def test_engine_spec_carries_the_schedule():
    cfg = load(None, ["train.schedule=constant", "train.cooldown_steps=50"])
    o = EngineSpec.for_pretraining(cfg).optim
    assert (o.schedule, o.cooldown_steps, o.decay_fraction) == ("constant", 50, 0.2)
    o = EngineSpec.for_pretraining(load(None, ["train.schedule=wsd", "train.decay_fraction=0.1"])).optim
    assert (o.schedule, o.decay_fraction) == ("wsd", 0.1)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        lr_lambda(optim(4, 20, schedule="linear"))


@pytest.fixture
def process_group():
    """A gloo group of one for DeepSpeed engines, left in place for the rest of the session as a
    worker keeps its group: DeepSpeed caches the groups it derives from the first one, so an
    engine built after a destroy and re-create would broadcast over a group torch no longer knows
    (test_tagging's in-process fine-tune failed that way when it ran after this test)."""
    from ptm_dist.dist import init_single_process

    init_single_process(CPU)


def test_a_deepspeed_engine_checkpoint_of_a_wsd_run_resumes_and_extends_without_a_jump(tmp_path, process_group):
    """A real DeepSpeed engine (ZeRO stage 0, fp32, CPU) trains a 12-step wsd schedule (warmup
    2, decay over the last 3: from 9) and saves at steps 6 (stable) and 10 (decaying). Engines
    built from a job with train.max_steps 20 load each checkpoint and extend the saved schedule
    as Trainer.restore does; the lr they train with follows the references, and a resume with
    the same max_steps trains with exactly (==) the uninterrupted run's lrs."""
    from ptm_dist.engine import lr_schedule, prepare

    def engine(max_steps: int):
        torch.manual_seed(0)
        o = optim(2, max_steps, schedule="wsd", decay_fraction=0.25, micro_batch=2)
        return prepare(torch.nn.Linear(4, 1), EngineSpec(o, zero_stage=0, precision="fp32"), CPU)[0]

    def train(e, start: int, stop: int, save: tuple[int, ...] = ()) -> list[float]:
        lrs = []
        for step in range(start, stop):
            lrs.append(e.get_lr()[0])  # this step's (the schedule moves on inside e.step)
            e.backward(e(torch.ones(2, 4)).sum())
            e.step()
            if step + 1 in save:
                e.save_checkpoint(str(tmp_path / f"c{step + 1}"), tag="ds", save_latest=False)
        return lrs

    def resume(at: int, max_steps: int):
        e = engine(max_steps)
        path, _ = e.load_checkpoint(str(tmp_path / f"c{at}"), tag="ds", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        assert path is not None
        schedule = lr_schedule(e)  # as loop.Trainer.restore: extended when train.max_steps moved
        if schedule.end != max_steps and max_steps > at:
            schedule.extend(at, max_steps)
        return e

    o = optim(2, 12, schedule="wsd", decay_fraction=0.25)
    full = train(engine(12), 0, 12, save=(6, 10))
    assert full == pytest.approx([reference_wsd(s, o.lr, o.min_lr, 2, 12, 0.25) for s in range(12)], rel=1e-12)
    assert train(resume(6, 12), 6, 12) == full[6:]  # resume is exact
    from_stable = train(resume(6, 20), 6, 20)
    assert full[:6] + from_stable == pytest.approx([reference_wsd(s, o.lr, o.min_lr, 2, 20, 0.25)
                                                    for s in range(20)], rel=1e-12)
    at10 = full[10]
    from_decay = train(resume(10, 20), 10, 20)  # 20's window: the last 5 steps, from 15
    assert from_decay == pytest.approx([hold_then_line(s, at10, 15, 20, o.min_lr) for s in range(10, 20)],
                                       rel=1e-12)
    for lrs in (full[:6] + from_stable, full[:10] + from_decay):
        assert_no_jump(lrs + [o.min_lr], o)  # and on to min_lr at step 20


MUON_FREE_SCRIPT = """
import json, sys, torch
from ptm_dist import engine as E, models
from ptm_dist.dist import init_single_process
init_single_process(torch.device("cpu"))
o = E.OptimSpec(lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=4, weight_decay=0.1, grad_clip=1.0, micro_batch=2)
hf = models.hf_config("gpt2", "debug", 64, 16, models.SpecialTokens(eos=0, pad=1, mask=2))
for stage, precision in ((0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")):
    engine, _ = E.prepare(models.build(hf, seed=0), E.EngineSpec(o, zero_stage=stage, precision=precision),
                          torch.device("cpu"))
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
muon = {n: getattr(m, "muon_update", None) is E._no_muon_update for n, m in sys.modules.items() if ".muon." in n}
print(json.dumps({"muon_stand_ins": muon, "compile_fx": "torch._inductor.compile_fx" in sys.modules}))
"""


def test_engines_train_without_importing_deepspeeds_muon_or_torchinductors_compiler():
    """Engines of every ZeRO stage (bf16 ZeRO-1 too) built and stepped twice in a fresh process
    never load DeepSpeed's Muon modules, which compile kernels when imported (TorchInductor's
    compiler: this script took 12.7-12.8 s of CPU without stand-ins, 10.1-10.7 s with them): the
    Muon modules DeepSpeed imports are the stand-ins of engine.skip_muon_import."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MUON_FREE_SCRIPT], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"muon_stand_ins": {"deepspeed.runtime.zero.muon.original_muon": True,
                                      "deepspeed.runtime.zero.muon.muon_optimizer": True},
                   "compile_fx": False}, got
