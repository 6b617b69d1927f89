"""A compact GPT-2 in the style of the minimal trainers (nanoGPT, llm.c's PyTorch reference):
one fused QKV projection, PyTorch's scaled_dot_product_attention, tied embeddings, and the loss
computed in the module. It is the same architecture as Hugging Face's ``GPT2LMHeadModel``
(pre-norm blocks, tanh GELU, learned positions), so weights convert one to one.

``ptm bench train`` uses it as the strong baseline: a plain loop over this module shows what
the model code costs apart from what the framework costs.

    model = CompactGPT.from_hf(hf_model)            # the HF module's weights, copied
    loss = model(ids)                               # next-token loss, mean over ids[:, 1:]
    logits = model(ids, return_logits=True)
    hf_model.load_state_dict(model.hf_state_dict()) # and back
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, inner: int, eps: float, resid_p: float, attn_p: float):
        super().__init__()
        self.heads, self.attn_p = heads, attn_p
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.fc = nn.Linear(d, inner)
        self.fc_out = nn.Linear(inner, d)
        self.drop = nn.Dropout(resid_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_p if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh")))


class CompactGPT(nn.Module):
    def __init__(self, vocab: int, positions: int, d: int, layers: int, heads: int, inner: int,
                 eps: float = 1e-5, embd_p: float = 0.0, resid_p: float = 0.0, attn_p: float = 0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(positions, d)
        self.drop = nn.Dropout(embd_p)
        self.blocks = nn.ModuleList(Block(d, heads, inner, eps, resid_p, attn_p) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the projections into the residual
            for w in (block.proj.weight, block.fc_out.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if return_logits:
            return x @ self.wte.weight.t()
        logits = x[:, :-1] @ self.wte.weight.t()  # tied head; the last position has no target
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    # -------------------------------------------------------------- Hugging Face boundary

    @classmethod
    def from_hf_config(cls, c) -> CompactGPT:
        """A randomly initialised module of a ``GPT2Config``'s shape (gpt2 only)."""
        if c.model_type != "gpt2":
            raise ValueError(f"the compact module is a GPT-2; got model type {c.model_type!r}")
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"the compact GPT-2 uses the tanh GELU; config has {c.activation_function!r}")
        for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if getattr(c, field, want) != want:
                raise ValueError(f"the compact GPT-2 has {field}={want}; config has {getattr(c, field)!r}")
        return cls(c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head, c.n_inner or 4 * c.n_embd,
                   c.layer_norm_epsilon, c.embd_pdrop, c.resid_pdrop, c.attn_pdrop)

    @classmethod
    def from_hf(cls, hf_model) -> CompactGPT:
        """The module with ``hf_model``'s (a GPT2LMHeadModel) weights, in fp32."""
        model = cls.from_hf_config(hf_model.config)
        tr = hf_model.transformer
        sd = {"wte.weight": tr.wte.weight, "wpe.weight": tr.wpe.weight,
              "ln_f.weight": tr.ln_f.weight, "ln_f.bias": tr.ln_f.bias}
        for i, h in enumerate(tr.h):
            # HF's Conv1D keeps weights as (in, out); nn.Linear as (out, in).
            pairs = {"ln_1": h.ln_1, "ln_2": h.ln_2, "qkv": h.attn.c_attn, "proj": h.attn.c_proj,
                     "fc": h.mlp.c_fc, "fc_out": h.mlp.c_proj}
            for name, mod in pairs.items():
                conv = name not in ("ln_1", "ln_2")
                sd[f"blocks.{i}.{name}.weight"] = mod.weight.t() if conv else mod.weight
                sd[f"blocks.{i}.{name}.bias"] = mod.bias
        model.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()})
        return model

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under GPT2LMHeadModel's names and layouts."""
        out = {"transformer.wte.weight": self.wte.weight, "transformer.wpe.weight": self.wpe.weight,
               "transformer.ln_f.weight": self.ln_f.weight, "transformer.ln_f.bias": self.ln_f.bias,
               "lm_head.weight": self.wte.weight}
        hf_names = {"ln_1": "ln_1", "ln_2": "ln_2", "qkv": "attn.c_attn", "proj": "attn.c_proj",
                    "fc": "mlp.c_fc", "fc_out": "mlp.c_proj"}
        for i, block in enumerate(self.blocks):
            for name, hf in hf_names.items():
                mod = getattr(block, name)
                conv = name not in ("ln_1", "ln_2")
                out[f"transformer.h.{i}.{hf}.weight"] = mod.weight.t() if conv else mod.weight
                out[f"transformer.h.{i}.{hf}.bias"] = mod.bias
        return {k: v.detach().clone().contiguous() for k, v in out.items()}
