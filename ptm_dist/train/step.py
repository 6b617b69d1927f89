"""The per-worker step: a plain function of (engine, batch), with no Ray in it.

It runs the same under Ray Train, in a single process (debugger, GPU benchmarks) and in the
reference loops of the tests. ``engine`` is a DeepSpeed engine or anything with the same
``__call__``/``backward``/``step`` (see ``PlainEngine``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch


class SpikeDetector:
    """Warns when the loss stays above ``factor`` times its running mean for ``patience`` steps.

    The running mean is an exponential moving average of the steps that are not high, so a
    spike does not raise its own baseline; the first ``warmup`` steps only build the mean.
    """

    def __init__(self, factor: float, patience: int, decay: float = 0.98, warmup: int = 10):
        self.factor, self.patience, self.decay, self.warmup = factor, patience, decay, warmup
        self.mean, self.seen, self.high, self.count = 0.0, 0, 0, 0

    def update(self, step: int, loss: float) -> str | None:
        """Feed one step's loss; returns a warning when a spike has lasted ``patience`` steps."""
        if self.factor <= 0 or not math.isfinite(loss):
            return None
        if self.seen >= self.warmup and loss > self.factor * self.mean:
            self.high += 1
            if self.high == self.patience:
                self.count += 1
                return (f"loss spike: loss {loss:.4f} at step {step} has stayed above "
                        f"{self.factor:g} x its running mean {self.mean:.4f} for {self.patience} steps")
            return None
        self.high = 0
        self.mean = loss if self.seen == 0 else self.decay * self.mean + (1 - self.decay) * loss
        self.seen += 1
        return None

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "high": self.high, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.seen, self.high, self.count = (state[k] for k in ("mean", "seen", "high", "count"))


@dataclass(frozen=True)
class Objective:
    """What the model learns: causal LM, or masked LM (BERT) with its masking settings."""

    causal: bool
    mask_id: int = 0
    vocab_size: int = 0
    mlm_probability: float = 0.15
    special_ids: tuple[int, ...] = ()


def mask_tokens(
    input_ids: torch.Tensor, obj: Objective, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick mlm_probability of tokens; 80% -> <mask>, 10% random, 10% kept."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    gen_dev = generator.device
    prob = torch.full(ids.shape, obj.mlm_probability, device=gen_dev)
    special = torch.zeros(ids.shape, dtype=torch.bool, device=gen_dev)
    ids_g = ids.to(gen_dev)
    for s in obj.special_ids:
        special |= ids_g == s
    prob.masked_fill_(special, 0.0)
    picked = torch.bernoulli(prob, generator=generator).bool()
    labels[~picked.to(ids.device)] = -100
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=gen_dev), generator=generator).bool() & picked
    to_rand = (
        torch.bernoulli(torch.full(ids.shape, 0.5, device=gen_dev), generator=generator).bool()
        & picked & ~to_mask
    )
    rand = torch.randint(obj.vocab_size, ids.shape, generator=generator, device=gen_dev)
    ids_g = torch.where(to_mask, torch.full_like(ids_g, obj.mask_id), ids_g)
    ids_g = torch.where(to_rand, rand, ids_g)
    return ids_g.to(ids.device), labels


def loss_on(model, input_ids: torch.Tensor, obj: Objective, generator: torch.Generator | None) -> torch.Tensor:
    """Mean token loss of one micro batch (next-token for causal LMs, masked tokens for MLM)."""
    if obj.causal:
        return model(input_ids=input_ids, labels=input_ids).loss
    ids, labels = mask_tokens(input_ids, obj, generator)
    return model(input_ids=ids, labels=labels).loss


class PhaseTimer:
    """Wall time per phase of the step, for benchmarks: ``with timer("forward"): ...``.

    On GPUs it synchronizes around each phase, which costs throughput: only benchmarks use it.
    """

    def __init__(self, device: torch.device):
        self.totals: dict[str, float] = defaultdict(float)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.totals[phase] += time.perf_counter() - t0


def _untimed(phase: str):
    return contextlib.nullcontext()


def train_step(
    engine, micro_batches: list[torch.Tensor], obj: Objective, generator=None, clip: float = 0.0,
    timer: PhaseTimer | None = None, poison=None,
):
    """One optimizer step over ``micro_batches`` (grad_accum of them): (mean loss, grad norm).

    DeepSpeed scales each backward by 1/grad_accum, averages gradients over ranks, clips and
    steps the optimizer and LR schedule at the last micro batch. ``clip`` > 0 clips here
    instead, just before that last step (engines that do not report the norm themselves).
    Both results may be device tensors: reading them waits for the GPU, so callers read them
    only when they log. A step whose loss or gradients are non-finite on any rank has its update
    dropped on every rank (DeepSpeed engines then report ``was_step_applied()`` False).
    ``poison`` (tests only, see ptm_dist.faults) may replace the last micro batch's loss.
    """
    timed = timer or _untimed
    total = torch.zeros((), device=micro_batches[0].device)
    norm = None
    last = len(micro_batches) - 1
    for i, ids in enumerate(micro_batches):
        with timed("forward"):
            loss = loss_on(engine, ids, obj, generator)
            if poison is not None and i == last:
                loss = poison(loss)
        total += loss.detach().float()
        with timed("backward"):
            if i == last:
                # A non-finite loss on any micro batch of this rank makes every gradient NaN, so
                # the global gradient norm (all-reduced by the engine) is non-finite on every
                # rank and the update is dropped everywhere alike (see drop_nonfinite_update).
                # Multiplying by exactly 1.0 changes nothing otherwise; no host sync.
                loss = loss * torch.where(torch.isfinite(total), 1.0, float("nan")).to(loss.dtype)
            engine.backward(loss)
        with timed("optimizer" if i == last else "backward"):
            if clip > 0 and i == last:
                norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)
                drop_nonfinite_update(engine, norm)
            engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return total / len(micro_batches), norm


def drop_nonfinite_update(engine, norm: torch.Tensor) -> None:
    """Make the coming ``engine.step()`` drop its update if the gradient norm is non-finite.

    DeepSpeed's ZeRO optimizers (stages 1-3) do this themselves: a non-finite global gradient
    norm is an "overflow", the step returns before touching weights or optimizer state, the
    partitioned gradient buffers are cleared and the engine leaves the LR schedule alone
    (``engine.was_step_applied()`` is False). Without ZeRO the engine steps the plain torch
    optimizer, so take its path: no gradients (AdamW skips parameters without one) and the
    optimizer's ``overflow`` flag, which the engine reads to skip the schedule. Reading the norm
    waits for the device once per step; only this path (ZeRO-0 with clipping here) pays it.
    """
    bad = not bool(torch.isfinite(norm))
    if bad:
        for p in engine.module.parameters():
            p.grad = None
    optimizer = getattr(engine, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.overflow = bad


def eval_batches(n_sequences: int, world: int, micro_batch: int) -> int:
    """Forward passes each rank makes to evaluate ``n_sequences`` held-out sequences split
    ``[rank::world]``: the count of the rank with the most, so that every rank makes the same
    number (ZeRO-3 forwards are collective: a rank that stops early leaves the others waiting)."""
    return math.ceil(math.ceil(n_sequences / world) / micro_batch)


@torch.no_grad()
def eval_loss_sums(model, sequences: torch.Tensor, micro_batch: int, obj: Objective, seed: int,
                   n_batches: int | None = None, filler: torch.Tensor | None = None) -> torch.Tensor:
    """[summed token loss, number of tokens scored] over ``sequences``: summed over ranks and
    divided, the token-weighted mean loss over every held-out token, whichever way the sequences
    fall into ranks and batches. Masking is seeded so that every evaluation of the same model
    gives the same number.

    With ``n_batches`` the model runs exactly that many forward passes: past the end of
    ``sequences`` it runs ``filler`` (one sequence) and counts nothing."""
    gen = torch.Generator(device=sequences.device).manual_seed(seed) if not obj.causal else None
    out = torch.zeros(2, dtype=torch.float64, device=sequences.device)
    n = math.ceil(len(sequences) / micro_batch) if n_batches is None else n_batches
    for b in range(n):
        ids = sequences[b * micro_batch : (b + 1) * micro_batch]
        if len(ids) == 0:
            loss_on(model, filler, obj, gen)
            continue
        if obj.causal:
            loss, count = loss_on(model, ids, obj, gen), ids[:, 1:].numel()
        else:
            masked, labels = mask_tokens(ids, obj, gen)
            loss, count = model(input_ids=masked, labels=labels).loss, int((labels != -100).sum())
        if count:  # an MLM batch with nothing masked has a NaN mean loss and adds nothing
            out[0] += loss.double() * count
            out[1] += count
    return out


class PlainEngine:
    """A single-process stand-in for a DeepSpeed engine: plain PyTorch AdamW, same schedule.

    Used by the reference loop in tests and by benchmarks for the baseline. ``backward`` scales
    by 1/grad_accum and ``step`` steps the optimizer at the accumulation boundary, as DeepSpeed.
    """

    def __init__(self, model, optimizer, scheduler, grad_accum: int = 1, grad_clip: float = 0.0):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.micro_steps = 0
        self.last_grad_norm: float | None = None

    def get_global_grad_norm(self) -> float | None:
        return self.last_grad_norm

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.grad_clip > 0:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
