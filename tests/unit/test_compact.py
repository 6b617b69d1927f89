"""The compact GPT-2 of ``ptm bench train``'s strong baseline is the Hugging Face GPT-2: with
converted weights it gives the same logits, loss and gradients (fp32, 1e-5), and its weights
convert back into a directory plain transformers loads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from ptm_dist import models
from ptm_dist.compact import CompactGPT

SPECIAL = models.SpecialTokens(eos=0, pad=1, mask=2)
TOL = 1e-5

# compact parameter -> (HF parameter, stored transposed: HF's Conv1D keeps (in, out))
NAMES = {"wte.weight": ("transformer.wte.weight", False), "wpe.weight": ("transformer.wpe.weight", False),
         "ln_f.weight": ("transformer.ln_f.weight", False), "ln_f.bias": ("transformer.ln_f.bias", False)}
for _i in range(2):
    for _c, (_h, _t) in {"ln_1": ("ln_1", False), "ln_2": ("ln_2", False), "qkv": ("attn.c_attn", True),
                         "proj": ("attn.c_proj", True), "fc": ("mlp.c_fc", True),
                         "fc_out": ("mlp.c_proj", True)}.items():
        NAMES[f"blocks.{_i}.{_c}.weight"] = (f"transformer.h.{_i}.{_h}.weight", _t)
        NAMES[f"blocks.{_i}.{_c}.bias"] = (f"transformer.h.{_i}.{_h}.bias", False)


@pytest.fixture(scope="module")
def pair():
    cfg = models.hf_config("gpt2", "debug", 512, 64, SPECIAL)
    assert cfg.n_layer == 2  # NAMES above lists two blocks
    hf = models.build(cfg, seed=0).float()
    return hf, CompactGPT.from_hf(hf)


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(seed))


def test_converted_weights_give_the_same_logits_loss_and_gradients(pair):
    hf, compact = pair
    ids = _batch()
    hf.zero_grad(set_to_none=True)
    compact.zero_grad(set_to_none=True)
    out = hf(input_ids=ids, labels=ids)
    logits = compact(ids, return_logits=True)
    assert (logits - out.logits).abs().max().item() < TOL
    loss = compact(ids)
    assert abs(loss.item() - out.loss.item()) < TOL
    out.loss.backward()
    loss.backward()
    hf_params = dict(hf.named_parameters())
    compact_params = dict(compact.named_parameters())
    assert set(compact_params) == set(NAMES)
    for name, p in compact_params.items():
        hf_name, transposed = NAMES[name]
        g = hf_params[hf_name].grad
        g = g.t() if transposed else g
        assert (p.grad - g).abs().max().item() < TOL, name
    # every HF parameter is one of the compact module's (lm_head is tied to wte)
    assert set(hf_params) - {h for h, _ in NAMES.values()} <= {"lm_head.weight"}


def test_weights_convert_back_to_a_directory_plain_transformers_loads(pair, tmp_path):
    hf, compact = pair
    with torch.no_grad():  # make the compact module's weights its own, not the HF ones
        for p in compact.parameters():
            p.add_(0.01 * torch.randn_like(p))
    target = GPT2LMHeadModel(hf.config)
    target.load_state_dict(compact.hf_state_dict())
    target.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _batch(2)
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - compact(ids, return_logits=True)).abs().max().item()
    assert diff < TOL


def test_other_architectures_are_refused_in_one_line():
    cfg = models.hf_config("llama", "debug", 512, 64, SPECIAL)
    with pytest.raises(ValueError, match="compact module is a GPT-2; got model type 'llama'"):
        CompactGPT.from_hf_config(cfg)
