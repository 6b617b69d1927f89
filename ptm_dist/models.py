"""Models: the registry's families and sizes, any architecture transformers knows, and
pretrained starting points.

    config = config_for(cfg.model, vocab_size, seq_len, special, init_config)  # a PretrainedConfig
    model = build(config, seed=0)                     # random weights
    model = build(config, init_dir="path/to/hf-dir")  # a pretrained model's weights (model.init)

``model.family`` is a registry family (gpt2, llama, bert: sizes in ptm_dist.sizes) or any model
type of the installed transformers (qwen2, mistral, gemma, roberta, ...: the generic sizes,
with standard config names); ``model.config`` sets any field of the architecture's config on
top. A model is causal or masked by its architecture (``is_causal``). Model code here is
single-device and knows nothing of DeepSpeed or Ray; distribution is applied from outside
(ptm_dist.engine). ``flops_per_token`` gives the training FLOPs per token used for MFU (6N for
the matmuls with weights plus the attention term, as in nanoGPT and the PaLM paper's appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

from ptm_dist.errors import ConfigError
from ptm_dist.sizes import CAUSAL_FAMILIES, GENERIC_SIZES, SIZES, Size  # noqa: F401 - the registry, re-exported

# Config fields that hold a dropout probability, across architectures: model.dropout sets those
# the architecture has (a pretrained model's own values included: pretraining runs without).
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout", "dropout",
                  "embd_dropout", "summary_first_dropout")


@dataclass(frozen=True)
class SpecialTokens:
    eos: int
    pad: int
    mask: int


def hf_config(
    family: str, size: str, vocab_size: int, seq_len: int, special: SpecialTokens, dropout: float = 0.0,
    overrides: dict | None = None,
) -> PretrainedConfig:
    """A registry family's config at a named size; ``overrides`` (model.config) set any field of
    it, checked against the architecture's config."""
    kw = _registry_kwargs(family, size, vocab_size, seq_len, special, dropout)
    cls = {"gpt2": GPT2Config, "llama": LlamaConfig, "bert": BertConfig}[family]
    _check_fields(cls, overrides or {}, "model.config")
    return cls(**{**kw, **(overrides or {})})


def _registry_kwargs(family: str, size: str, vocab_size: int, seq_len: int, special: SpecialTokens,
                     dropout: float) -> dict:
    s = SIZES[family][size]
    inter = s.intermediate or 4 * s.hidden
    if family == "gpt2":
        return {
            "vocab_size": vocab_size,
            "n_positions": max(seq_len, 1024 if size != "debug" else seq_len),
            "n_embd": s.hidden,
            "n_layer": s.layers,
            "n_head": s.heads,
            "n_inner": inter,
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
            "activation_function": FUSED_GELU_TANH,  # GPT-2's tanh GELU, one fused op (see config_for)
            "bos_token_id": special.eos,
            "eos_token_id": special.eos,
            "pad_token_id": special.pad,
        }
    if family == "llama":
        return {
            "vocab_size": vocab_size,
            "hidden_size": s.hidden,
            "intermediate_size": inter,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads or s.heads,
            "max_position_embeddings": max(seq_len, 2048 if size != "debug" else seq_len),
            "attention_dropout": dropout,
            "tie_word_embeddings": True,  # as Llama 3.2 1B and 3B
            "bos_token_id": special.eos,
            "eos_token_id": special.eos,
            "pad_token_id": special.pad,
        }
    if family == "bert":
        return {
            "vocab_size": vocab_size,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "intermediate_size": inter,
            "max_position_embeddings": max(seq_len, 512 if size != "debug" else seq_len),
            "hidden_dropout_prob": dropout,
            "attention_probs_dropout_prob": dropout,
            "pad_token_id": special.pad,
        }
    raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(SIZES)}")


def _config_class(family: str) -> type[PretrainedConfig]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(family, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.family {family!r}: not a model type of the installed transformers "
                          f"(e.g. {', '.join(SIZES)}, qwen2, mistral, gemma, roberta){hint}")
    return CONFIG_MAPPING[family]


def _check_fields(cls: type[PretrainedConfig], fields: dict, what: str) -> None:
    """Every key of ``fields`` must be a field of the architecture's config (a typo is an error)."""
    if not fields:
        return
    known = set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for key in fields:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{what}.{key}: not a field of {cls.__name__}{hint}")


def generic_config(family: str, size: str, vocab_size: int, seq_len: int, special: SpecialTokens,
                   overrides: dict | None = None) -> PretrainedConfig:
    """A config for a family outside the registry: the generic named size written with the
    standard config names (hidden_size, num_hidden_layers, ...), then ``overrides``."""
    cls = _config_class(family)
    s = GENERIC_SIZES[size]
    defaults = cls().to_dict()
    kw = {"vocab_size": vocab_size, "hidden_size": s.hidden, "num_hidden_layers": s.layers,
          "num_attention_heads": s.heads, "intermediate_size": s.intermediate or 4 * s.hidden,
          "max_position_embeddings": max(seq_len, defaults.get("max_position_embeddings") or 0
                                         if size != "debug" else seq_len),
          "bos_token_id": special.eos, "eos_token_id": special.eos, "pad_token_id": special.pad}
    if "num_key_value_heads" in defaults:
        kw["num_key_value_heads"] = s.kv_heads or s.heads
    if "head_dim" in defaults:  # Gemma's default (256) is not hidden / heads
        kw["head_dim"] = s.hidden // s.heads
    if "tie_word_embeddings" in defaults:
        kw["tie_word_embeddings"] = True
    _check_fields(cls, overrides or {}, "model.config")
    return cls(**{**kw, **(overrides or {})})


# transformers' "gelu_new" (GPT-2, Phi, CodeGen) computes the tanh GELU in six elementwise ops
# from Python; "gelu_pytorch_tanh" is the same function as PyTorch's one fused kernel. Measured on
# the 2-core machine (gpt2-tiny, micro batch 16 x 128, one thread): forward + backward 320 ms with
# gelu_new, 273 ms fused, the same as the compact GPT-2 of ptm bench; logits differ by 7e-7.
# Jobs train with the fused one unless model.config names an activation.
FUSED_GELU_TANH = "gelu_pytorch_tanh"


def config_for(model, vocab_size: int, seq_len: int, special: SpecialTokens,
               init_config: dict | None = None) -> PretrainedConfig:
    """The transformers config a job trains (``model``: the job's ModelSection). With
    ``init_config`` (a pretrained model's config.json) it is that config; else the registry's
    named size for registry families and the generic one for others. ``model.config`` is set on
    top, and ``model.dropout`` on every dropout field the architecture has. A field that the
    architecture's config does not have is a ConfigError naming it."""
    overrides = dict(model.config)
    if init_config is not None:
        d = dict(init_config)
        family = d.pop("model_type", None)
        if not family:
            raise ConfigError(f"model.init {model.init}: its config.json has no model_type")
        cls = _config_class(family)
        _check_fields(cls, overrides, "model.config")
        config = cls.from_dict({**d, **overrides})
    elif model.family in SIZES:
        config = hf_config(model.family, model.size, vocab_size, seq_len, special, model.dropout, overrides)
    else:
        config = generic_config(model.family, model.size, vocab_size, seq_len, special, overrides)
    for key in DROPOUT_FIELDS:
        if key not in overrides and isinstance(getattr(config, key, None), float):
            setattr(config, key, model.dropout)
    for key in ("activation_function", "hidden_act"):
        if key not in overrides and getattr(config, key, None) == "gelu_new":
            setattr(config, key, FUSED_GELU_TANH)
    is_causal(config)  # an architecture that is neither causal nor masked LM is an error here
    return config


def is_causal(config: PretrainedConfig) -> bool:
    """True for a causal LM, False for a masked LM (by the config's architectures when it names
    them, as pretrained models do; else by model type: encoders such as bert are masked LMs)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"model type {config.model_type!r} is an encoder-decoder model; ptm pretrains "
                          "causal and masked language models")
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    raise ConfigError(f"model type {config.model_type!r}: transformers has neither a causal nor a masked "
                      "language model for it")


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    return (MODEL_FOR_CAUSAL_LM_MAPPING if is_causal(config) else MODEL_FOR_MASKED_LM_MAPPING)[type(config)]


def build(config: PretrainedConfig, seed: int | None = None, zero3: dict | None = None,
          init_dir: str | None = None) -> PreTrainedModel:
    """A randomly initialised model with SDPA attention; the same seed gives the same weights.
    ``init_dir``: a local Hugging Face model directory whose weights it starts from instead.

    ``zero3``: a DeepSpeed ZeRO-3 config. The model is then built partitioned, each module's
    weights split over the ranks as soon as it is constructed (transformers' own path: an
    ``HfDeepSpeedConfig`` makes ``_from_config`` run under ``deepspeed.zero.Init`` and
    initialise each module's gathered weights on rank 0), so no rank ever holds the whole model.
    It needs a process group. The weights then differ from an unpartitioned build with the same
    seed (the initialisation runs in another order), but not with the number of ranks. The
    HfDeepSpeedConfig stays alive with the model (transformers checks it in later calls).
    Loading ``init_dir`` under ZeRO-3 here goes through transformers: it reads the whole state
    dict on rank 0 only and scatters each module's weights as it loads them. Workers call
    ``engine.build_model``, which reads each rank's partition from safetensors files instead and
    comes here only for checkpoints it cannot read that way."""
    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    cls = model_class(config)
    keep = None
    if zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(zero3)
    if init_dir is not None:
        model = cls.from_pretrained(init_dir, config=config, dtype=torch.float32, attn_implementation="sdpa")
    elif keep is not None:
        model = cls._from_config(config)
    else:
        model = cls(config)
    if keep is not None:
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


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix multiply per token: all but position embeddings
    and an input embedding not tied to the output layer (a lookup: no FLOPs)."""
    n = num_params(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is not emb:
        n -= getattr(emb, "ds_numel", None) or emb.numel()
    return n


def flops_per_token(config: PretrainedConfig, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with weights (N from ``matmul_params``) plus
    12*L*A*T for attention, where A is the width of the attention (heads x head_dim, which
    differs from the hidden size in Gemma)."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 6.0 * n_matmul_params + 12.0 * layers * heads * head_dim * seq_len
