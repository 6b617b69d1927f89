"""Token shards: a corpus tokenized and packed once by ``ptm prepare --tokens DIR``.

Layout of DIR (a local directory or a URI)::

    index.json          {"format": "ptm-tokens", "version": 2, "seq_len", "dtype", "eos_id",
                         "vocab_size", "tokenizer_sha1", "piece_bytes", "train": [entry...],
                         "val": [entry...]}
                        entry: {"file": "train/000003", "source": <raw shard URI>, "documents": n,
                                "sequences": n, "tokens": n * seq_len, "pieces": [[piece, n], ...]}
    tokenizer/          the tokenizer the ids belong to (loads with AutoTokenizer)
    train/000003/00002.bin   piece 2 of raw shard 3: a row-major [sequences, seq_len] array of
                             dtype (uint16 or uint32), no header
    train/000003/00002.json  the piece's entry, written once its .bin is complete (a re-run
                             skips the piece)

One Ray task tokenizes one piece of a raw shard (``ptm_dist.data.pieces``, ``data.piece_bytes``),
so a big shard is tokenized in parallel. Part ``j`` of token shard ``k`` holds exactly the
sequences ``pack_piece`` makes from piece ``j`` of raw shard ``k``, in the same order and with
the same ids, so a run over token shards sees the same batches as one that tokenizes on the
fly with the same piece size. A piece with no complete sequence has no part file. Token sets
of version 1 (one ``train/000003.bin`` per shard) are read as one piece per shard. Reading is
by byte range: memory per read is ``out_rows`` rows.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ptm_dist import storage
from ptm_dist.data.packing import pack_piece
from ptm_dist.data.pieces import Piece, plan_pieces
from ptm_dist.data.sources import Shard, find_shard_error
from ptm_dist.data.tokenizer import TOKENIZER_FILES
from ptm_dist.errors import DataError, ShardError

INDEX = "index.json"
FORMAT = "ptm-tokens"
VERSION = 2


def is_token_dir(path: str) -> bool:
    try:
        return storage.exists(storage.join(path, INDEX))
    except Exception:  # noqa: BLE001 - an unreachable path is reported by find_shards
        return False


def load_index(path: str) -> dict:
    where = storage.join(path, INDEX)
    if not storage.exists(where):
        raise DataError(f"{path}: not a token-shard directory (no {INDEX}; write one with `ptm prepare --tokens`)")
    try:
        index = json.loads(storage.read_text(where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{where}: field 'format' is {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("version", 1) > VERSION:
        raise DataError(f"{where}: token-set version {index['version']} is newer than this ptm reads ({VERSION})")
    for key in ("seq_len", "dtype", "train", "val"):
        if key not in index:
            raise DataError(f"{where}: missing field {key!r}")
    return index


def part_file(file: str, piece: int) -> str:
    return f"{file}/{piece:05d}.bin"


def token_shards(path: str, split: str, weight: float = 1.0) -> list[Shard]:
    index = load_index(path)
    out = []
    for e in index[split]:
        parts = tuple((j, storage.join(path, part_file(e["file"], j))) for j, n in e.get("pieces", ()) if n)
        out.append(Shard(storage.join(path, e["file"]), "tokens", "", weight, index["dtype"], parts))
    return out


def _tokenize_piece(shard: Shard, piece: Piece, out_dir: str, file: str, tokenizer_json: str,
                    seq_len: int, eos_id: int, dtype: str) -> dict:
    """Pack one piece of a raw shard into ``out_dir/<file>/<piece>.bin``; returns the piece's
    entry (written beside it)."""
    target = storage.join(out_dir, part_file(file, piece.index))
    local_dir = Path(tempfile.mkdtemp(prefix="ptm-tokens-"))
    local = local_dir / "piece.bin"
    n = 0
    stats: dict = {}
    try:
        with open(local, "wb") as f:
            for batch in pack_piece(shard, piece, tokenizer_json, seq_len, eos_id, stats=stats):
                f.write(batch["input_ids"].astype(dtype).tobytes())
                n += len(batch["id"])
        entry = {"piece": piece.index, "source": shard.uri, "start": piece.start, "stop": piece.stop,
                 "documents": stats.get("documents", 0), "sequences": n}
        if n:
            _upload(local, target)
        storage.write_text(target[: -len(".bin")] + ".json", json.dumps(entry))
        return entry
    finally:
        local.unlink(missing_ok=True)
        local_dir.rmdir()


def _upload(local: Path, target: str) -> None:
    import pyarrow.fs as pafs

    fs, p = storage.resolve(target)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _done_entry(out_dir: str, file: str, piece: Piece, source: str) -> dict | None:
    meta = storage.join(out_dir, part_file(file, piece.index)[: -len(".bin")] + ".json")
    if not storage.exists(meta):
        return None
    entry = json.loads(storage.read_text(meta))
    same = (entry.get("source"), entry.get("start"), entry.get("stop")) == (source, piece.start, piece.stop)
    return entry if same else None


def write_token_dataset(
    out_dir: str, splits: dict[str, list[Shard]], tokenizer_dir: Path, seq_len: int, eos_id: int,
    vocab_size: int, max_bad_shards: int = 0, concurrency: int = 2,
    progress: Callable[[int, int, int, int, float], None] | None = None, piece_bytes: int = 0,
) -> dict:
    """Tokenize and pack every piece of every shard of ``splits`` into ``out_dir``; returns the
    index.

    Pieces already written by an earlier, interrupted call (same source and range) are kept.
    With Ray initialised the pieces are packed by Ray tasks, ``concurrency`` at a time.
    ``progress(done_pieces, total_pieces, documents, tokens, seconds)`` is called as pieces
    finish. A bad piece is skipped within ``max_bad_shards`` (counted per piece, as in training).
    """
    tokenizer_json = (tokenizer_dir / "tokenizer.json").read_text()
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    jobs, entries, bad = [], {}, []
    bad_shards: set[str] = set()  # URIs of shards with a bad piece
    total = 0
    for split, shards in splits.items():
        for piece in plan_pieces(shards, piece_bytes):
            total += 1
            shard = shards[piece.shard]
            file = f"{split}/{piece.shard:06d}"
            done = _done_entry(out_dir, file, piece, shard.uri)
            if done:
                entries[(split, piece.shard, piece.index)] = done
            else:
                jobs.append((split, shard, piece, file))
    t0 = time.perf_counter()
    tokens = documents = 0  # this call's work, for its rate

    def finished(key, entry):
        nonlocal tokens, documents
        entries[key] = entry
        tokens += entry["sequences"] * seq_len
        documents += entry.get("documents", 0)
        if progress:
            progress(len(entries) + len(bad), total, documents, tokens, time.perf_counter() - t0)

    def failed(shard: Shard, error: BaseException):
        shard_error = find_shard_error(error)
        if shard_error is None:
            raise error
        bad.append(shard.uri if shard_error.piece is None else f"{shard.uri} (piece {shard_error.piece})")
        bad_shards.add(shard.uri)
        message = str(shard_error).splitlines()[0]
        if len(bad) > max_bad_shards:
            raise DataError(f"{message} (bad shard {len(bad)}, over data.max_bad_shards={max_bad_shards})") from None
        print(f"[ptm] skipping bad shard ({len(bad)}/{max_bad_shards}): {message}", flush=True)

    args = (out_dir,)
    import ray

    if ray.is_initialized() and jobs:
        task = ray.remote(num_cpus=1, max_retries=0)(_tokenize_piece)
        pending: dict = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < concurrency:
                split, shard, piece, file = queue.pop(0)
                ref = task.remote(shard, piece, *args, file, tokenizer_json, seq_len, eos_id, dtype)
                pending[ref] = (split, shard, piece)
            ready, _ = ray.wait(list(pending), num_returns=1)
            split, shard, piece = pending.pop(ready[0])
            try:
                finished((split, piece.shard, piece.index), ray.get(ready[0]))
            except Exception as e:  # noqa: BLE001 - Ray wraps the task's error
                failed(shard, e)
    else:
        for split, shard, piece, file in jobs:
            try:
                entry = _tokenize_piece(shard, piece, *args, file, tokenizer_json, seq_len, eos_id, dtype)
                finished((split, piece.shard, piece.index), entry)
            except ShardError as e:
                failed(shard, e)
    # Only the tokenizer's files: with model.init, tokenizer_dir is the model's directory (weights too).
    tok_files = {p.name: p.read_text() for p in sorted(tokenizer_dir.iterdir())
                 if p.is_file() and p.name in TOKENIZER_FILES}
    for name, text in tok_files.items():
        storage.write_text(storage.join(out_dir, "tokenizer", name), text)
    index = {
        "format": FORMAT, "version": VERSION, "seq_len": seq_len, "dtype": dtype, "eos_id": eos_id,
        "vocab_size": vocab_size, "tokenizer_sha1": hashlib.sha1(tokenizer_json.encode()).hexdigest(),
        "piece_bytes": piece_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "skipped_bad_shards": bad,
    }
    for split, shards in splits.items():
        index[split] = []
        for k, shard in enumerate(shards):
            parts = sorted((key[2], e) for key, e in entries.items() if key[:2] == (split, k))
            n = sum(e["sequences"] for _, e in parts)
            if not n:
                if parts and shard.uri not in bad_shards:
                    failed(shard, ShardError(
                        f"{shard.uri}: no complete sequence of data.seq_len={seq_len} tokens", shard.uri))
                continue
            index[split].append({
                "file": f"{split}/{k:06d}", "source": shard.uri, "documents": sum(e["documents"] for _, e in parts),
                "sequences": n, "tokens": n * seq_len, "pieces": [[j, e["sequences"]] for j, e in parts],
            })
    storage.write_text(storage.join(out_dir, INDEX), json.dumps(index, indent=1))
    return index


def check_compatible(path: str, index: dict, seq_len: int) -> None:
    if index["seq_len"] != seq_len:
        raise DataError(
            f"{path}: token shards hold {index['seq_len']}-token sequences but data.seq_len is {seq_len}; "
            f"set data.seq_len={index['seq_len']} or re-run `ptm prepare --tokens` with this seq_len"
        )


def tokenizer_dir(path: str) -> Path:
    """A local directory holding the token set's tokenizer (copied when the set is remote)."""
    if not storage.is_uri(path):
        return Path(path).expanduser().resolve() / "tokenizer"
    local = Path(tempfile.mkdtemp(prefix="ptm-tokenizer-"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = storage.join(path, "tokenizer", name)
        if storage.exists(src):
            (local / name).write_text(storage.read_text(src))
    return local

