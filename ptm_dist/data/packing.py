"""Packing: documents -> EOS-joined token stream -> fixed-length sequences with stable ids.

    for batch in pack_shard(shard, shard_index, tokenizer_json, seq_len, eos_id):
        batch["id"], batch["input_ids"]      # int64[n], int32[n, seq_len]

Every packed sequence has an id ``shard_index << 32 | sequence``, the same whether the shard is
tokenized on the fly or read from token shards (``ptm prepare --tokens``); the data position
of a run and its sequence log are made of these ids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from ptm_dist.data.sources import Shard, read_documents, resolve_fs
from ptm_dist.errors import DataError, ShardError

ID_SHIFT = 32
_DOCS_PER_ENCODE = 256


def sequence_id(shard_index: int, chunk: int) -> int:
    return (shard_index << ID_SHIFT) | chunk


def split_id(seq_id: int) -> tuple[int, int]:
    return seq_id >> ID_SHIFT, seq_id & ((1 << ID_SHIFT) - 1)


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def pack_shard(
    shard: Shard, shard_index: int, tokenizer_json: str, seq_len: int, eos_id: int, skip: int = 0,
    out_rows: int = 256, stats: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {"id": int64[n], "input_ids": int32[n, seq_len]} of one shard's packed sequences.

    The first ``skip`` sequences are not emitted (used on resume). Memory is bounded by one
    encode batch plus ``out_rows`` sequences, whatever the shard size. ``stats["documents"]``
    counts the documents read, when a dict is given.
    """
    if shard.format == "tokens":
        yield from read_token_shard(shard, shard_index, seq_len, skip, out_rows)
        return
    tok = _tokenizer(tokenizer_json)
    buf = np.empty(0, dtype=np.int32)
    chunk = 0
    ids: list[int] = []
    rows: list[np.ndarray] = []

    def encode(docs: list[str]) -> np.ndarray:
        encs = tok.encode_batch_fast(docs, add_special_tokens=False)
        parts = []
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

    docs: list[str] = []
    doc_iter = read_documents(shard)
    done = False
    n_docs = 0
    while not done:
        try:
            docs.append(next(doc_iter))
            n_docs += 1
            if stats is not None:
                stats["documents"] = n_docs
        except StopIteration:
            done = True
            if n_docs == 0:
                raise ShardError(f"{shard.uri}: empty shard (no documents)", shard.uri) from None
        if docs and (done or len(docs) >= _DOCS_PER_ENCODE):
            buf = np.concatenate([buf, encode(docs)])
            docs = []
            n_full = len(buf) // seq_len
            for k in range(n_full):
                if chunk >= skip:
                    ids.append(sequence_id(shard_index, chunk))
                    rows.append(buf[k * seq_len : (k + 1) * seq_len])
                chunk += 1
            buf = buf[n_full * seq_len :]
            if len(rows) >= out_rows or (done and rows):
                yield {"id": np.asarray(ids, dtype=np.int64), "input_ids": np.stack(rows)}
                ids, rows = [], []
    if rows:
        yield {"id": np.asarray(ids, dtype=np.int64), "input_ids": np.stack(rows)}


def read_token_shard(
    shard: Shard, shard_index: int, seq_len: int, skip: int = 0, out_rows: int = 256
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {"id", "input_ids"} of a token shard from sequence ``skip`` on."""
    dtype = np.dtype(shard.dtype or "uint16")
    row_bytes = seq_len * dtype.itemsize
    fs, p = resolve_fs(shard.uri)
    try:
        with fs.open_input_file(p) as f:
            size = f.size()
            if size == 0 or size % row_bytes:
                raise ShardError(
                    f"{shard.uri}: {size} bytes is not a whole number of {seq_len}-token rows of "
                    f"{dtype.name} (truncated, or written for another data.seq_len)", shard.uri
                )
            n = size // row_bytes
            for start in range(skip, n, out_rows):
                stop = min(n, start + out_rows)
                buf = f.read_at((stop - start) * row_bytes, start * row_bytes)
                rows = np.frombuffer(buf, dtype=dtype).reshape(stop - start, seq_len).astype(np.int32)
                ids = np.array([sequence_id(shard_index, c) for c in range(start, stop)], dtype=np.int64)
                yield {"id": ids, "input_ids": rows}
    except DataError:
        raise
    except OSError as e:
        raise ShardError(f"{shard.uri}: cannot read token shard: {e}", shard.uri) from None
