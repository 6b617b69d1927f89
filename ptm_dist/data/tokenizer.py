"""Byte-level BPE tokenizers: trained with Hugging Face ``tokenizers``, saved for transformers.

A trained tokenizer is a directory that ``AutoTokenizer.from_pretrained`` loads offline
(tokenizer.json, tokenizer_config.json, special tokens). It is cached by a key made of the
corpus shard list and the vocabulary size, so a second run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ptm_dist import storage
from ptm_dist.data.sources import Shard, find_shard_error, read_documents
from ptm_dist.errors import DataError

EOS = "<|endoftext|>"
PAD = "<pad>"
MASK = "<mask>"
SPECIAL_TOKENS = [EOS, PAD, MASK]
TRAIN_SAMPLE_BYTES = 64 << 20  # text sampled for tokenizer training
# The files of a saved Hugging Face tokenizer (fast tokenizers; a model directory holds them
# next to its weights): what a run copies into its checkpoints.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")
# A tokenizer saved without tokenizer.json: a SentencePiece model (Llama, T5, XLM-R style) next to
# tokenizer_config.json; vocab.txt (WordPiece) and vocab.json + merges.txt (BPE) are in
# TOKENIZER_FILES. transformers converts them to a fast tokenizer (convert_to_fast).
SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_key(shards: list[Shard], vocab_size: int) -> str:
    h = hashlib.sha1(json.dumps([[s.uri, s.format, s.text_column] for s in shards]).encode())
    return f"bpe-{vocab_size}-{h.hexdigest()[:12]}"


def _sample_shard(shard: Shard, budget: int) -> list[str]:
    """Documents from the start of one shard, about ``budget`` characters."""
    docs, taken = [], 0
    for doc in read_documents(shard):
        docs.append(doc)
        taken += len(doc)
        if taken >= budget:
            break
    return docs


def _sample(shards: list[Shard], budget: int, max_bad_shards: int = 0) -> Iterator[str]:
    """Documents from up to ~64 shards spread over the list, ``budget`` characters in all, read
    by Ray tasks in parallel when Ray is initialised (in this process otherwise). Bad shards are
    skipped (and reported) within ``max_bad_shards``, as in training."""
    step = max(1, len(shards) // 64)
    picked = shards[::step]
    per_shard = budget // len(picked) + 1
    results: list = picked
    import ray

    if ray.is_initialized() and len(picked) > 1:
        task = ray.remote(num_cpus=1, max_retries=0)(_sample_shard)
        results = [task.remote(s, per_shard) for s in picked]
    bad = 0
    for shard, result in zip(picked, results):
        try:
            docs = ray.get(result) if result is not shard else _sample_shard(shard, per_shard)
        except Exception as e:  # Ray wraps the task's ShardError
            error = find_shard_error(e)
            if error is None:
                raise
            bad += 1
            if bad > max_bad_shards:
                raise error from None
            print(f"[ptm] tokenizer sample: skipping bad shard ({bad}/{max_bad_shards}): "
                  f"{str(error).splitlines()[0]}", flush=True)
            continue
        yield from docs


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_for_transformers(tok: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=PAD, mask_token=MASK
    )
    fast.save_pretrained(str(out))


def ensure_tokenizer(shards: list[Shard], vocab_size: int, cache: Path, max_bad_shards: int = 0) -> Path:
    """Directory of the cached tokenizer for these shards, training it first if missing."""
    out = cache / "tokenizers" / tokenizer_key(shards, vocab_size)
    if (out / "tokenizer.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_sample(shards, TRAIN_SAMPLE_BYTES, max_bad_shards), vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent))
    try:
        save_for_transformers(tok, tmp)
        storage.publish_local_dir(tmp, out, "tokenizer.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# Where a saved tokenizer names its special tokens (transformers writes both; later files win).
_SPECIAL_FILES = ("special_tokens_map.json", "tokenizer_config.json")


def special_tokens(tok_dir: Path) -> dict[str, str]:
    """The special tokens a saved tokenizer names: {"eos": "</s>", "pad": ..., ...} for eos, bos,
    pad, mask, sep, cls and unk (read from its JSON files, without transformers)."""
    names: dict[str, str] = {}
    for f in _SPECIAL_FILES:
        p = Path(tok_dir) / f
        if not p.is_file():
            continue
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not readable JSON ({e})") from None
        for key in ("eos", "bos", "pad", "mask", "sep", "cls", "unk"):
            value = doc.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value:
                names[key] = value
    return names


def special_ids(tok_dir: Path, tok: Tokenizer) -> dict[str, int]:
    """Token ids of the end-of-text token that separates packed documents (the tokenizer's eos,
    else its sep: [SEP] for BERT-style WordPiece), of the padding token (the tokenizer's pad,
    else eos: the documented default) and of the mask token (mask, else pad; masked LMs need a
    real one, which the driver checks with ``has_mask``)."""
    ids = {k: tok.token_to_id(v) for k, v in special_tokens(tok_dir).items()}
    ids = {k: v for k, v in ids.items() if v is not None}
    eos = ids.get("eos", ids.get("sep"))
    if eos is None:
        raise DataError(f"{tok_dir}: the tokenizer names no end-of-text token (eos_token or sep_token in "
                        "tokenizer_config.json); ptm separates packed documents with it")
    pad = ids.get("pad", eos)
    return {"eos": eos, "pad": pad, "mask": ids.get("mask", pad)}


def has_mask(tok_dir: Path, tok: Tokenizer) -> bool:
    mask = special_tokens(tok_dir).get("mask")
    return mask is not None and tok.token_to_id(mask) is not None


def convert_to_fast(src: Path, cache: Path, what: str) -> Path:
    """``src``, a local tokenizer directory, as one with a tokenizer.json: itself when it has
    one, else the fast tokenizer transformers converts from its slow files (a SentencePiece
    model, vocab.txt, vocab.json + merges.txt), saved once under ``cache/converted-tokenizers/``
    (keyed by the directory and its files' sizes and times) and reused. ``what`` names the job
    field in errors."""
    if (src / "tokenizer.json").is_file():
        return src
    present = sorted(p.name for p in src.iterdir() if p.name in SLOW_TOKENIZER_FILES + TOKENIZER_FILES) \
        if src.is_dir() else []
    if not present:
        raise DataError(f"{what} {src}: no tokenizer there (neither tokenizer.json nor "
                        f"{', '.join(SLOW_TOKENIZER_FILES)}, vocab.txt, vocab.json)")
    stamp = json.dumps([str(src.resolve()), [(n, (src / n).stat().st_size, (src / n).stat().st_mtime_ns)
                                            for n in present]])
    out = cache / "converted-tokenizers" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line for the user
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DataError(f"{what} {src}: transformers cannot load its tokenizer ({', '.join(present)}): "
                        f"{first}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{what} {src}: {type(tok).__name__} has no fast (tokenizers) version; save one "
                        "with a tokenizer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tok.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise DataError(f"{what} {src}: the converted tokenizer saved no tokenizer.json")
        storage.publish_local_dir(tmp, out, "tokenizer.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[ptm] tokenizer {src} ({', '.join(present)}) converted to a fast tokenizer: {out}", flush=True)
    return out
