"""Small "hub" model directories built locally, as a download would leave them: a random
debug-size model saved with ``save_pretrained`` next to a tokenizer of its own kind, trained on
local text (no model hub is reachable from the test machines).

    make_hub_model(tmp_path / "llama", "llama")  # -> the directory

Tokenizer kinds, as the real families ship them:
- ``bytelevel``: GPT-2 / Qwen2 style byte-level BPE whose only special token is ``<|endoftext|>``
  (eos = bos = unk, no pad);
- ``llama``: SentencePiece-style BPE (Metaspace) with ``<unk>``, ``<s>``, ``</s>``, no pad, and a
  post-processor that puts ``<s>`` before every text;
- ``wordpiece``: BERT style, ``[CLS] text [SEP]`` with ``[PAD]``, ``[MASK]``, ``[UNK]``.

``make_sentencepiece_model`` saves a Llama the way older checkpoints ship it: a SentencePiece
``tokenizer.model`` (trained with the sentencepiece library) and ``tokenizer_config.json``, no
tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Text of its own (not the built-in corpus), varied enough for a few hundred tokens.
HUB_TEXT = [
    f"The {a} {b} of the {c} was {d} in {n} ways."
    for n, (a, b, c, d) in enumerate(
        (a, b, c, d)
        for a in ("first", "second", "last", "small", "large")
        for b in ("river", "mountain", "city", "garden", "library", "harbor")
        for c in ("north", "south", "old town", "valley")
        for d in ("quiet", "bright", "famous", "hidden")
    )
]

KINDS = {  # family -> (tokenizer kind, model config kwargs, vocabulary padding of the model)
    "gpt2": ("bytelevel", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}, 0),
    "qwen2": ("bytelevel", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256,
                            "tie_word_embeddings": True}, 0),
    "llama": ("llama", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256,
                        "tie_word_embeddings": False}, 64),
    "mistral": ("llama", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256,
                          "head_dim": 8}, 64),
    "bert": ("wordpiece", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "max_position_embeddings": 256}, 0),
}


def make_tokenizer(kind: str, out: Path, vocab_size: int = 400) -> None:
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(HUB_TEXT, trainer=trainer)
        names = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    elif kind == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      show_progress=False)
        tok.train_from_iterator(HUB_TEXT, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(HUB_TEXT, trainer=trainer)
        tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                       ("[CLS]", tok.token_to_id("[CLS]")))
        names = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
                 "unk_token": "[UNK]"}
    else:
        raise ValueError(kind)
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(str(out))


def make_hub_model(out: Path, family: str) -> Path:
    """A random debug-size ``family`` model and its tokenizer saved in ``out`` (built once). Each
    family has its own seed (llama and mistral have the same shapes and math here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    kind, kwargs, pad_to = KINDS[family]
    make_tokenizer(kind, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n = tok.get_vocab_size()
    vocab = -(-n // pad_to) * pad_to if pad_to else n  # real models often round their vocabulary up
    ids = {}
    for key, name in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "[PAD]")):
        if tok.token_to_id(name) is not None:
            ids[key] = tok.token_to_id(name)
    if kind == "bytelevel":
        ids = {"bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|endoftext|>")}
    config = AutoConfig.for_model(family, vocab_size=vocab, **kwargs, **ids)
    torch.manual_seed(list(KINDS).index(family))
    cls = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    cls.from_config(config).save_pretrained(str(out))
    return out


def make_sentencepiece_model(out: Path, vocab_size: int = 400) -> Path:
    """A random debug-size Llama whose tokenizer is only a SentencePiece model (``<unk>`` 0,
    ``<s>`` 1, ``</s>`` 2, no pad; byte fallback, as Llama's: a character outside the
    vocabulary is its UTF-8 bytes, ``<0x00>``..``<0xFF>``) with a LlamaTokenizer
    tokenizer_config.json (built once)."""
    import io
    import json

    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(HUB_TEXT), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    config = AutoConfig.for_model("llama", vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                  **KINDS["llama"][1])
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    return out


def partitioned_load_worker(rank: int, world: int, port: int, dirs: list[str], out: str) -> None:
    """One rank of a gloo group (``torch.multiprocessing`` spawns it) that loads each model
    directory under ZeRO-3 with ``engine.build_model`` and saves, from rank 0, the gathered
    state dict and whether each rank read its own partitions (``engine.load_partitioned``)."""
    import json
    import os

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from ptm_dist.engine import build_model, load_partitioned

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    conf = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    partitioned = {}
    for i, d in enumerate(dirs):
        config = AutoConfig.from_pretrained(d)
        partitioned[d] = load_partitioned(config, d, conf) is not None
        model = build_model(AutoConfig.from_pretrained(d), 0, conf, d)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, f"{out}/{i}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(partitioned, f)
    dist.barrier()
    dist.destroy_process_group()
