"""The per-worker step: a plain function of (engine, batch), with no Ray in it.

It runs the same under Ray Train, in a single process (debugger, GPU benchmarks) and in the
reference loops of the tests. ``engine`` is a DeepSpeed engine or anything with the same
``__call__``/``backward``/``step`` (see ``PlainEngine``).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

import torch


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
    timer: PhaseTimer | None = None,
):
    """One optimizer step over ``micro_batches`` (grad_accum of them): (mean loss, grad norm).

    DeepSpeed scales each backward by 1/grad_accum, averages gradients over ranks, clips and
    steps the optimizer and LR schedule at the last micro batch. ``clip`` > 0 clips here
    instead, just before that last step (engines that do not report the norm themselves).
    Both results may be device tensors: reading them waits for the GPU, so callers read them
    only when they log.
    """
    timed = timer or _untimed
    total = torch.zeros((), device=micro_batches[0].device)
    norm = None
    last = len(micro_batches) - 1
    for i, ids in enumerate(micro_batches):
        with timed("forward"):
            loss = loss_on(engine, ids, obj, generator)
        with timed("backward"):
            engine.backward(loss)
        with timed("optimizer" if i == last else "backward"):
            if clip > 0 and i == last:
                norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip)
            engine.step()
        total += loss.detach().float()
    if norm is None:
        norm = engine.get_global_grad_norm()
    return total / len(micro_batches), norm


@torch.no_grad()
def eval_loss_sums(model, sequences: torch.Tensor, micro_batch: int, obj: Objective, seed: int) -> torch.Tensor:
    """[sum of per-batch mean losses, number of batches] over ``sequences``; masking is seeded
    so that every evaluation of the same model gives the same number."""
    gen = torch.Generator(device=sequences.device).manual_seed(seed) if not obj.causal else None
    out = torch.zeros(2, device=sequences.device)
    for i in range(0, len(sequences), micro_batch):
        out[0] += loss_on(model, sequences[i : i + micro_batch], obj, gen).float()
        out[1] += 1
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
