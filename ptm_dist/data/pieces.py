"""Pieces: the parts of a shard that are read on their own.

A shard of hundreds of MB or a few GB is split into pieces of about ``data.piece_bytes`` each,
found without reading the shard (its size, its parquet footer, a short scan for a line end):

    jsonl, txt (uncompressed)   byte ranges [start, stop) cut just after a newline
    jsonl.gz / .zst, txt.gz     one piece (a compressed stream cannot be entered in the middle)
    parquet                     consecutive row groups [start, stop) of about piece_bytes
                                (uncompressed); a bigger row group is a piece of its own
    hf (datasets arrow files)   consecutive record batches [start, stop)
    tokens                      one piece per part file that ``ptm prepare --tokens`` wrote
                                for a raw piece (older token sets: one per file)

A piece is the unit of a Ray Data task, of the epoch's order, of the data position and of the
bad-input budget: the first sequences of a big shard flow while the rest of it is still being
read, memory is bounded by the pieces in flight, and a resume re-reads at most one piece.
A document never straddles two pieces; a txt file larger than a piece is read as one document
per piece. ``piece_bytes`` 0 keeps every shard whole (one piece), as runs written before pieces.

The plan of a shard list is deterministic for a given list and piece size, and cached in the
run directory (``data_pieces.json``) so thousands of shards are planned once.
"""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ptm_dist import storage
from ptm_dist.data.sources import Shard, open_arrow, resolve_fs

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".lz4", ".br")
SCAN_BYTES = 1 << 16  # bytes read at a time while looking for the line end after a cut
PLAN_FILE = "data_pieces.json"
PLAN_VERSION = 1
WHOLE = -1  # a piece's ``stop`` when it runs to the end of its shard


@dataclass(frozen=True)
class Piece:
    """Piece ``index`` of shard ``shard`` (its position in the shard list): the range
    [start, stop) in the format's unit (bytes, row groups, record batches; stop WHOLE: to the
    end). ``uri``, when set, is a file of its own that holds the piece (token part files).
    ``size``: its bytes where known (0: unknown), used only to group small pieces into tasks."""

    shard: int
    index: int
    start: int = 0
    stop: int = WHOLE
    uri: str | None = None
    size: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        return f"{self.shard}.{self.index}"


def task_groups(pieces: list[Piece], target_bytes: int, min_groups: int) -> list[list[int]]:
    """Consecutive runs of ``pieces`` (their positions) read by one Ray Data task each: small
    pieces (a corpus of many small shards) are grouped up to ``target_bytes``, so the cost of a
    task is not paid per few kB, but into no fewer than ``min_groups`` runs (parallelism); a
    piece of unknown size stays alone."""
    most = max(1, -(-len(pieces) // max(1, min_groups)))
    groups: list[list[int]] = []
    total = 0
    for i, p in enumerate(pieces):
        if groups and p.size and total + p.size <= target_bytes and len(groups[-1]) < most \
                and pieces[groups[-1][-1]].size:
            groups[-1].append(i)
            total += p.size
        else:
            groups.append([i])
            total = p.size
    return groups


def _is_compressed(uri: str) -> bool:
    return uri.lower().endswith(COMPRESSED_SUFFIXES)


def _line_cuts(fs, path: str, size: int, piece_bytes: int) -> list[int]:
    """Offsets just after the first newline at or after each multiple of piece_bytes."""
    cuts = [0]
    with fs.open_input_file(path) as f:
        target = piece_bytes
        while target < size:
            at = max(target - 1, cuts[-1])  # a newline at target-1 makes target itself a cut
            cut = size
            while at < size:
                chunk = f.read_at(min(SCAN_BYTES, size - at), at)
                nl = chunk.find(b"\n")
                if nl >= 0:
                    cut = at + nl + 1
                    break
                at += len(chunk)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            target = max(target + piece_bytes, cut + 1)
    return cuts + [size]


def _group(sizes: list[int], piece_bytes: int) -> list[tuple[int, int]]:
    """Consecutive runs [start, stop) of items whose sizes add up to about piece_bytes."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > piece_bytes:
            out.append((start, i))
            start, total = i, 0
        total += n
    if sizes:
        out.append((start, len(sizes)))
    return out


def _arrow_batch_sizes(fs, path: str) -> list[int]:
    """Bytes of each record batch of a datasets arrow file."""
    from pyarrow import ipc

    with open_arrow(fs, path) as source:
        return [batch.nbytes for batch in ipc.open_stream(source)]


def shard_pieces(shard: Shard, k: int, piece_bytes: int) -> list[Piece]:
    """The pieces of shard ``k``. Anything that stops planning (a missing file, a corrupt
    footer) gives one whole piece: reading it then fails like any bad shard, within the budget."""
    if shard.format == "tokens":
        return [Piece(k, j, uri=uri) for j, uri in shard.parts] or [Piece(k, 0)]
    if piece_bytes <= 0 or _is_compressed(shard.uri):
        return [Piece(k, 0)]
    try:
        fs, path = resolve_fs(shard.uri)
        if shard.format in ("jsonl", "txt"):
            size = fs.get_file_info(path).size or 0
            if size <= piece_bytes:
                return [Piece(k, 0, size=size)]
            cuts = _line_cuts(fs, path, size, piece_bytes)
            ranges = list(itertools.pairwise(cuts))
            sizes = [b - a for a, b in ranges]
        elif shard.format == "parquet":
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                groups = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
            ranges = _group(groups, piece_bytes)
            sizes = [sum(groups[a:b]) for a, b in ranges]
        elif shard.format == "hf":
            batches = _arrow_batch_sizes(fs, path)
            ranges = _group(batches, piece_bytes)
            sizes = [sum(batches[a:b]) for a, b in ranges]
        else:
            return [Piece(k, 0)]
    except Exception:  # noqa: BLE001 - reported when the piece is read, as a bad shard
        return [Piece(k, 0)]
    if len(ranges) <= 1:
        return [Piece(k, 0, size=sum(sizes))]
    return [Piece(k, j, start, stop, size=n) for j, ((start, stop), n) in enumerate(zip(ranges, sizes))]


def plan_pieces(shards: list[Shard], piece_bytes: int, cache: str | None = None, threads: int = 16) -> list[Piece]:
    """The pieces of every shard, in shard order. With ``cache`` (a run directory) the plan is
    read from and written to ``<cache>/data_pieces.json``; shards whose URI, size or piece
    size differ from the cached entry are planned again."""
    cached: dict = {}
    cache_file = storage.join(cache, PLAN_FILE) if cache else None
    if cache_file and storage.exists(cache_file):
        try:
            saved = json.loads(storage.read_text(cache_file))
            if saved.get("version") == PLAN_VERSION and saved.get("piece_bytes") == piece_bytes:
                cached = saved.get("shards", {})
        except (json.JSONDecodeError, AttributeError):
            cached = {}

    def size_of(shard: Shard) -> int | None:
        try:
            fs, path = resolve_fs(shard.uri)
            return fs.get_file_info(path).size
        except Exception:  # noqa: BLE001 - a missing shard fails when read, within the budget
            return None

    def plan(k: int) -> tuple[list[Piece], int | None]:
        shard = shards[k]
        if shard.format == "tokens" or piece_bytes <= 0:
            return shard_pieces(shard, k, piece_bytes), None
        size = size_of(shard)
        hit = cached.get(shard.uri)
        if hit and size is not None and hit.get("size") == size:
            pieces = [Piece(k, j, a, b) for j, (a, b) in enumerate(hit["pieces"])]
            if len(pieces) == 1:
                return [replace(pieces[0], size=size)], size
            return [replace(p, size=(p.stop - p.start) if p.stop >= 0 else 0) for p in pieces], size
        return shard_pieces(shard, k, piece_bytes), size

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        planned = list(pool.map(plan, range(len(shards))))
    out = [pieces for pieces, _ in planned]
    sizes = {shard.uri: size for shard, (_, size) in zip(shards, planned)}
    flat = [p for pieces in out for p in pieces]
    if cache_file and piece_bytes > 0:
        entries = {shards[k].uri: {"size": sizes[shards[k].uri], "pieces": [[p.start, p.stop] for p in out[k]]}
                   for k in range(len(shards)) if sizes.get(shards[k].uri) is not None}
        if entries != cached:
            storage.write_text(cache_file, json.dumps(
                {"version": PLAN_VERSION, "piece_bytes": piece_bytes, "shards": entries}))
    return flat
