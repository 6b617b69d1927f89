"""Packing: documents -> EOS-joined token stream -> fixed-length sequences with stable ids.

    for batch in pack_piece(shard, piece, tokenizer_json, seq_len, eos_id):
        batch["id"], batch["input_ids"]      # int64[n], int32[n, seq_len]

Each piece of a shard (``ptm_dist.data.pieces``) is packed on its own: its documents, each with
the special tokens its tokenizer puts around a text (a pretrained model's bos, or [CLS] ... [SEP];
none for ptm's own tokenizers) and then EOS, are joined and cut into ``seq_len`` rows, and the
tail shorter than ``seq_len`` is dropped. Every packed sequence has an id
``shard << 40 | piece << 24 | index``, the same whether the shard is tokenized on the fly or read
from token shards (``ptm prepare --tokens``); the data position of a run and its sequence log are
made of these ids.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from ptm_dist.data.pieces import WHOLE, Piece
from ptm_dist.data.sources import Shard, read_documents, resolve_fs
from ptm_dist.errors import DataError, ShardError

SHARD_SHIFT, PIECE_SHIFT = 40, 24  # id bits: shard 23, piece 16, index 24
MAX_INDEX = 1 << PIECE_SHIFT
_DOCS_PER_ENCODE = 256


def sequence_id(shard_index: int, piece: int, index: int) -> int:
    return (shard_index << SHARD_SHIFT) | (piece << PIECE_SHIFT) | index


def split_id(seq_id: int) -> tuple[int, int, int]:
    """(shard, piece, index) of a sequence id."""
    return (seq_id >> SHARD_SHIFT, (seq_id >> PIECE_SHIFT) & ((1 << (SHARD_SHIFT - PIECE_SHIFT)) - 1),
            seq_id & (MAX_INDEX - 1))


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()  # a pretrained tokenizer may carry its own (BERT's: 512 tokens), or padding
    tok.no_padding()
    return tok


def pack_shard(
    shard: Shard, shard_index: int, tokenizer_json: str, seq_len: int, eos_id: int, skip: int = 0,
    out_rows: int = 256, stats: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """pack_piece over a whole shard read as one piece (held-out data, tests)."""
    yield from pack_piece(shard, Piece(shard_index, 0), tokenizer_json, seq_len, eos_id, skip, out_rows, stats)


def pack_piece(
    shard: Shard, piece: Piece, tokenizer_json: str, seq_len: int, eos_id: int, skip: int = 0,
    out_rows: int = 256, stats: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {"id": int64[n], "input_ids": int32[n, seq_len]} of one piece's packed sequences.

    The first ``skip`` sequences are not emitted (used on resume). Memory is bounded by one
    encode batch plus ``out_rows`` sequences, whatever the piece size. ``stats["documents"]``
    counts the documents read, ``stats["bytes_read"]`` the bytes (jsonl, txt), when a dict is
    given. A ShardError raised here carries the piece's index.
    """
    try:
        if shard.format == "tokens":
            yield from read_token_shard(shard, piece, seq_len, skip, out_rows, stats)
        else:
            yield from _pack_text(shard, piece, tokenizer_json, seq_len, eos_id, skip, out_rows, stats)
    except ShardError as e:
        e.piece = piece.index
        raise


def _pack_text(
    shard: Shard, piece: Piece, tokenizer_json: str, seq_len: int, eos_id: int, skip: int, out_rows: int,
    stats: dict | None,
) -> Iterator[dict[str, np.ndarray]]:
    tok = _tokenizer(tokenizer_json)
    buf = np.empty(0, dtype=np.int32)
    chunk = 0
    ids: list[int] = []
    rows: list[np.ndarray] = []

    def encode(docs: list[str]) -> np.ndarray:
        # The tokenizer's own special tokens around each document (Llama's <s>, BERT's [CLS] ...
        # [SEP]; none for GPT-2 style and ptm's own), then the end-of-text token unless there.
        encs = tok.encode_batch_fast(docs, add_special_tokens=True)
        parts = []
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=np.int32))
            if not e.ids or e.ids[-1] != eos_id:
                parts.append(np.array([eos_id], dtype=np.int32))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

    docs: list[str] = []
    stats = {} if stats is None else stats
    doc_iter = read_documents(shard, piece.start, piece.stop, stats)
    done = False
    n_docs = 0
    while not done:
        try:
            docs.append(next(doc_iter))
            n_docs += 1
            stats["documents"] = n_docs
        except StopIteration:
            done = True
            if n_docs == 0:
                what = "shard" if piece.stop == WHOLE else f"piece {piece.index} of the shard"
                raise ShardError(f"{shard.uri}: empty {what} (no documents)", shard.uri) from None
        if docs and (done or len(docs) >= _DOCS_PER_ENCODE):
            buf = np.concatenate([buf, encode(docs)])
            docs = []
            n_full = len(buf) // seq_len
            if chunk + n_full > MAX_INDEX:
                raise DataError(
                    f"{shard.uri}: piece {piece.index} holds over {MAX_INDEX} sequences of {seq_len} tokens; "
                    "lower data.piece_bytes"
                )
            for k in range(n_full):
                if chunk >= skip:
                    ids.append(sequence_id(piece.shard, piece.index, chunk))
                    rows.append(buf[k * seq_len : (k + 1) * seq_len])
                chunk += 1
            buf = buf[n_full * seq_len :]
            if len(rows) >= out_rows or (done and rows):
                yield {"id": np.asarray(ids, dtype=np.int64), "input_ids": np.stack(rows)}
                ids, rows = [], []
    if rows:
        yield {"id": np.asarray(ids, dtype=np.int64), "input_ids": np.stack(rows)}


def read_token_shard(
    shard: Shard, piece: Piece, seq_len: int, skip: int = 0, out_rows: int = 256, stats: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches {"id", "input_ids"} of a token shard's piece (its part file, or the whole file)
    from sequence ``skip`` on."""
    dtype = np.dtype(shard.dtype or "uint16")
    row_bytes = seq_len * dtype.itemsize
    uri = piece.uri or shard.uri
    fs, p = resolve_fs(uri)
    try:
        with fs.open_input_file(p) as f:
            size = f.size()
            if size == 0 or size % row_bytes:
                raise ShardError(
                    f"{uri}: {size} bytes is not a whole number of {seq_len}-token rows of "
                    f"{dtype.name} (truncated, or written for another data.seq_len)", shard.uri
                )
            n = size // row_bytes
            if n > MAX_INDEX:
                raise DataError(f"{uri}: {n} rows, over the {MAX_INDEX} one piece may hold; "
                                "re-run `ptm prepare --tokens`")
            stats = {} if stats is None else stats
            stats.setdefault("bytes_read", 0)
            for start in range(skip, n, out_rows):
                stop = min(n, start + out_rows)
                buf = f.read_at((stop - start) * row_bytes, start * row_bytes)
                stats["bytes_read"] += len(buf)
                rows = np.frombuffer(buf, dtype=dtype).reshape(stop - start, seq_len).astype(np.int32)
                ids = np.array([sequence_id(piece.shard, piece.index, c) for c in range(start, stop)], dtype=np.int64)
                yield {"id": ids, "input_ids": rows}
    except DataError:
        raise
    except OSError as e:
        raise ShardError(f"{uri}: cannot read token shard: {e}", shard.uri) from None
