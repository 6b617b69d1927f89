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


def test_gpt2_style_tanh_gelu_trains_as_the_fused_kernel_with_the_same_outputs(tmp_path):
    from transformers import GPT2Config

    from ptm_dist.config import load

    # registry GPT-2s, pretrained configs that say gelu_new, and the phi-style hidden_act
    cfg = load(None, ["model.family=gpt2", "model.size=debug"])
    assert models.config_for(cfg.model, 512, 32, SPECIAL).activation_function == "gelu_pytorch_tanh"
    pretrained = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512, n_positions=32).to_dict()
    assert pretrained["activation_function"] == "gelu_new"
    init = load(None, ["model.family=gpt2", f"model.init={tmp_path}"])
    assert models.config_for(init.model, 512, 32, SPECIAL, pretrained).activation_function == "gelu_pytorch_tanh"
    # an activation named in model.config is kept
    named = load(None, ["model.family=gpt2", f"model.init={tmp_path}", "model.config={activation_function: gelu_new}"])
    assert models.config_for(named.model, 512, 32, SPECIAL, pretrained).activation_function == "gelu_new"
    # the same function: a model with transformers' gelu_new gives the same logits (fp32, 1e-5)
    slow = models.build(GPT2Config.from_dict(pretrained), seed=0).eval()
    fast = models.build(models.config_for(init.model, 512, 32, SPECIAL, pretrained), seed=0).eval()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (slow(input_ids=ids).logits - fast(input_ids=ids).logits).abs().max().item() < 1e-5
