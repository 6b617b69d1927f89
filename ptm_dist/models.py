"""Model registry: family + named size -> a randomly initialised transformers model.

Model code here is single-device and knows nothing of DeepSpeed or Ray; distribution is
applied from outside (ptm_dist.engine). ``flops_per_token`` gives the training FLOPs per token
used for MFU (6N plus the attention term, as in nanoGPT and the PaLM paper's appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from ptm_dist.sizes import CAUSAL_FAMILIES, SIZES, Size  # noqa: F401 - the registry, re-exported


@dataclass(frozen=True)
class SpecialTokens:
    eos: int
    pad: int
    mask: int


def hf_config(
    family: str, size: str, vocab_size: int, seq_len: int, special: SpecialTokens, dropout: float = 0.0
) -> PretrainedConfig:
    s = SIZES[family][size]
    inter = s.intermediate or 4 * s.hidden
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max(seq_len, 1024 if size != "debug" else seq_len),
            n_embd=s.hidden,
            n_layer=s.layers,
            n_head=s.heads,
            n_inner=inter,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=special.eos,
            eos_token_id=special.eos,
            pad_token_id=special.pad,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=s.hidden,
            intermediate_size=inter,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads or s.heads,
            max_position_embeddings=max(seq_len, 2048 if size != "debug" else seq_len),
            attention_dropout=dropout,
            tie_word_embeddings=True,  # as Llama 3.2 1B and 3B
            bos_token_id=special.eos,
            eos_token_id=special.eos,
            pad_token_id=special.pad,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=s.hidden,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            intermediate_size=inter,
            max_position_embeddings=max(seq_len, 512 if size != "debug" else seq_len),
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=special.pad,
        )
    raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(SIZES)}")


_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "bert": BertForMaskedLM}


def build(config: PretrainedConfig, seed: int | None = None, zero3: dict | None = None) -> PreTrainedModel:
    """A randomly initialised model with SDPA attention; the same seed gives the same weights.

    ``zero3``: a DeepSpeed ZeRO-3 config. The model is then built partitioned, each module's
    weights split over the ranks as soon as it is constructed (transformers' own path: an
    ``HfDeepSpeedConfig`` makes ``_from_config`` run under ``deepspeed.zero.Init`` and
    initialise each module's gathered weights on rank 0), so no rank ever holds the whole model.
    It needs a process group. The weights then differ from an unpartitioned build with the same
    seed (the initialisation runs in another order), but not with the number of ranks. The
    HfDeepSpeedConfig stays alive with the model (transformers checks it in later calls)."""
    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    cls = _CLASSES[config.model_type]
    if zero3 is None:
        return cls(config)
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(zero3)
    model = cls._from_config(config)
    model._ptm_hf_deepspeed_config = keep
    return model


def num_params(model: torch.nn.Module, exclude_position_embeddings: bool = True) -> int:
    """Parameters of the whole model (a ZeRO-3 partitioned one too: ``ds_numel`` is a
    parameter's full size there, ``numel()`` this rank's part)."""
    def size(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    n = sum(size(p) for p in model.parameters())
    if exclude_position_embeddings:
        for name, p in model.named_parameters():
            if name.endswith(("wpe.weight", "position_embeddings.weight")):
                n -= size(p)
    return n


def flops_per_token(config: PretrainedConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights plus 12*L*H*Q*T for attention."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len
