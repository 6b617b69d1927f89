"""Model registry: every family and size builds, debug sizes are tiny, FLOPs formula."""

from __future__ import annotations

import pytest
import torch

from ptm_dist import models

SPECIAL = models.SpecialTokens(eos=0, pad=1, mask=2)


@pytest.mark.parametrize("family", list(models.SIZES))
def test_debug_size_is_well_under_a_million_parameters(family):
    cfg = models.hf_config(family, "debug", 512, 32, SPECIAL)
    model = models.build(cfg, seed=0)
    assert models.num_params(model) < 300_000
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", list(models.SIZES))
def test_same_seed_same_weights(family):
    cfg = models.hf_config(family, "debug", 512, 32, SPECIAL)
    a, b = models.build(cfg, seed=3), models.build(cfg, seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


@pytest.mark.parametrize("family,size,expected_m", [("gpt2", "124m", 124), ("llama", "1b", 1236)])
def test_named_sizes_have_their_parameter_counts(family, size, expected_m):
    cfg = models.hf_config(family, size, 50304 if family == "gpt2" else 128256, 1024, SPECIAL)
    with torch.device("meta"):
        model = models.build(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - expected_m) / expected_m < 0.03


def test_flops_per_token_is_6n_plus_attention():
    cfg = models.hf_config("gpt2", "124m", 50304, 1024, SPECIAL)
    n = 124_000_000
    assert models.flops_per_token(cfg, n, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_activation_checkpointing_changes_memory_not_math():
    """Recomputing activations in the backward pass gives the same loss and gradients."""
    cfg = models.hf_config("llama", "debug", 512, 32, SPECIAL)
    ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = models.build(cfg, seed=0).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
