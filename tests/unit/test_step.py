"""ptm_dist.train.step: train_step over PlainEngine (the engine of the reference loops and the
benchmark baseline) against a step written out here by hand: the loss from the logits,
gradient accumulation, global-norm clipping, AdamW with decoupled weight decay (none on 1-D
parameters) and the warmup of the LR schedule. And the loss-spike detector."""

from __future__ import annotations

import math

import pytest
import torch

from ptm_dist import models
from ptm_dist.engine import OptimSpec, build_optimizer, build_scheduler
from ptm_dist.train.step import Objective, PlainEngine, SpikeDetector, eval_batches, eval_loss_sums, train_step

VOCAB, SEQ, MICRO, ACCUM = 64, 16, 4, 2
OPTIM = OptimSpec(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=10, weight_decay=0.1, grad_clip=0.05,
                  micro_batch=MICRO, grad_accum=ACCUM, betas=(0.9, 0.95))
EPS = 1e-8


def debug_model() -> torch.nn.Module:
    cfg = models.hf_config("gpt2", "debug", VOCAB, SEQ, models.SpecialTokens(eos=0, pad=1, mask=2))
    return models.build(cfg, seed=0).train()


def batches(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randint(0, VOCAB, (MICRO, SEQ), generator=g) for _ in range(ACCUM)]


class HandAdamW:
    """AdamW written out: m, v with bias correction, weight decay lr*wd*p on >=2-D parameters,
    lr of optimizer step s (0-based) = OPTIM.lr * (s+1)/warmup during warmup."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def lr(self) -> float:
        assert self.t < OPTIM.warmup_steps  # these tests stay in the warmup
        return OPTIM.lr * (self.t + 1) / OPTIM.warmup_steps

    @torch.no_grad()
    def step(self):
        lr, (b1, b2) = self.lr(), OPTIM.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            wd = OPTIM.weight_decay if p.dim() >= 2 else 0.0
            p.mul_(1 - lr * wd)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
            p.grad = None


def hand_step(model, opt: HandAdamW, micro_batches) -> tuple[float, float]:
    """(mean loss, pre-clip global gradient norm) of one step done by hand."""
    total = 0.0
    for ids in micro_batches:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        (loss / len(micro_batches)).backward()
        total += loss.item()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    scale = min(1.0, OPTIM.grad_clip / (norm + 1e-6))
    for p in params:
        p.grad.mul_(scale)
    opt.step()
    return total / len(micro_batches), norm


@pytest.mark.parametrize("clips", ["engine", "step"])
def test_train_step_on_plain_engine_is_the_hand_written_adamw_step(clips):
    """Two optimizer steps of 2 accumulated micro batches each; the clip (0.05) binds, so
    clipping is exercised. clips="engine": PlainEngine clips at its step (like DeepSpeed);
    "step": train_step clips itself (clip=..., the ZeRO-0 fp32 path)."""
    model, ref = debug_model(), debug_model()
    opt = build_optimizer(model, OPTIM, torch.device("cpu"))
    engine = PlainEngine(model, opt, build_scheduler(opt, OPTIM), grad_accum=ACCUM,
                         grad_clip=OPTIM.grad_clip if clips == "engine" else 0.0)
    hand = HandAdamW(ref)
    obj = Objective(causal=True)
    for step in range(2):
        loss, norm = train_step(engine, batches(step), obj, clip=OPTIM.grad_clip if clips == "step" else 0.0)
        want_loss, want_norm = hand_step(ref, hand, batches(step))
        # Measured: loss 5.7e-8 and norm 2.6e-8 relative apart, weights at most 2.6e-7 (float32
        # sums against the hand step's float64 norm); the bounds leave about 10x room.
        assert float(loss) == pytest.approx(want_loss, rel=1e-6)
        assert float(norm) == pytest.approx(want_norm, rel=1e-6) and want_norm > OPTIM.grad_clip
        worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        moved = min((a - b).abs().max().item() for a, b in zip(model.parameters(), debug_model().parameters()))
        print(f"step {step}: loss {want_loss:.5f}, grad norm {want_norm:.4f}, max weight difference {worst:.2e}")
        assert moved > 0  # every parameter tensor changed ...
        assert worst < 3e-6  # ... as by hand: float32 rounding is ~1e-7, a wrong update ~1e-4 or more
    # the schedule advanced once per optimizer step: step 2's lr is the warmup's end
    assert opt.param_groups[0]["lr"] == pytest.approx(OPTIM.lr)
    assert [g["weight_decay"] for g in opt.param_groups] == [OPTIM.weight_decay, 0.0]


def test_spike_detector():
    d = SpikeDetector(factor=2.0, patience=3, warmup=5)
    warnings = [d.update(s, v) for s, v in enumerate([5, 5, 4.9, 4.8, 4.8, 4.7, 12, 13, 12, 11, 4.6, 30], 1)]
    fired = [i + 1 for i, w in enumerate(warnings) if w]
    print("spike warnings at steps", fired, "-", next(w for w in warnings if w))
    assert fired == [9] and d.count == 1 and d.mean < 5  # the spike never entered the running mean
    assert SpikeDetector(0.0, 1).update(1, 1e9) is None


def test_eval_sums_are_token_weighted_and_every_rank_makes_the_same_forward_passes():
    """7 sequences on 3 "ranks" ([rank::3]: 3, 2, 2) in micro batches of 2: each rank makes
    eval_batches = 2 forward passes (counted by a wrapper), the padding pass counts nothing, and
    the summed sums give the loss over all 7 * (SEQ - 1) predicted tokens, computed here at once
    with the model's logits and F.cross_entropy."""
    model = debug_model().eval()
    seqs = torch.randint(0, VOCAB, (7, SEQ), generator=torch.Generator().manual_seed(5))
    calls = []

    def counted(**kw):
        calls.append(len(kw["input_ids"]))
        return model(**kw)

    n = eval_batches(len(seqs), 3, 2)
    total = torch.zeros(2, dtype=torch.float64)
    per_rank = []
    for rank in range(3):
        calls.clear()
        total += eval_loss_sums(counted, seqs[rank::3], 2, Objective(causal=True), seed=0,
                                n_batches=n, filler=seqs[:1])
        per_rank.append(list(calls))
    assert n == 2 and per_rank == [[2, 1], [2, 1], [2, 1]]  # rank 0: 2+1 sequences; 1, 2: 2 + a filler
    with torch.no_grad():
        logits = model(input_ids=seqs).logits.double()
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))
    assert int(total[1]) == 7 * (SEQ - 1)
    assert abs(float(total[0] / total[1]) - float(want)) < 1e-6 * float(want)
    assert eval_batches(33, 2, 4) == 5 and eval_batches(1, 4, 4) == 1  # a rank with none still runs one
