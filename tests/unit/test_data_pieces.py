"""ptm_dist.data.pieces: shards cut into pieces read on their own, planned without reading the
shards; streams over pieces in process (no Ray). The same through Ray Data, big shards, time to
first sequence and memory: tests/e2e/test_data_pieces.py."""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from data_helpers import DOCS, _eos, write_jsonl

from ptm_dist.data import pieces as pieces_lib
from ptm_dist.data.packing import pack_piece, pack_shard, split_id
from ptm_dist.data.pieces import Piece, plan_pieces, shard_pieces
from ptm_dist.data.pipeline import BadShardBudgetExceeded, SequenceStream
from ptm_dist.data.sources import Shard, read_documents

MANY = [f"doc {i}: " + "lorem ipsum dolor sit amet " * (i % 11 + 1) for i in range(600)]


def _docs_of(shard: Shard, pieces: list[Piece]) -> list[str]:
    return [d for p in pieces for d in read_documents(shard, p.start, p.stop)]


def test_jsonl_pieces_cut_at_line_ends_and_hold_every_document_once(tmp_path):
    shard = Shard(str(write_jsonl(tmp_path / "a.jsonl", MANY)), "jsonl", "text")
    size = (tmp_path / "a.jsonl").stat().st_size
    pieces = shard_pieces(shard, 3, 4096)
    assert [p.index for p in pieces] == list(range(len(pieces))) and {p.shard for p in pieces} == {3}
    raw = (tmp_path / "a.jsonl").read_bytes()
    # a cut just after the first line end at or after each multiple of 4096 (lines are shorter)
    cuts = sorted({raw.index(b"\n", t - 1) + 1 for t in range(4096, size, 4096)} - {size})
    assert [p.start for p in pieces] == [0, *cuts]
    assert pieces[0].start == 0 and pieces[-1].stop == size
    for a, b in itertools.pairwise(pieces):
        assert a.stop == b.start and raw[a.stop - 1 : a.stop] == b"\n"
    assert _docs_of(shard, pieces) == MANY
    # a line ending exactly at a multiple: the cut is that multiple (lines of 512 bytes)
    line = json.dumps({"text": "y" * 499}) + "\n"
    assert len(line) == 512
    (tmp_path / "b.jsonl").write_text(line * 40)
    even = shard_pieces(Shard(str(tmp_path / "b.jsonl"), "jsonl", "text"), 0, 4096)
    assert [(p.start, p.stop) for p in even] == [(k, k + 4096) for k in range(0, 40 * 512, 4096)]
    # a piece no bigger than the shard, and piece_bytes 0, keep it whole
    assert shard_pieces(shard, 3, size) == [Piece(3, 0)] == shard_pieces(shard, 3, 0)


class _CountingFS:
    """A local filesystem that counts the bytes read through it (planning must not read shards)."""

    def __init__(self):
        self.fs, self.read = pafs.LocalFileSystem(), 0

    def open_input_file(self, path):
        outer, f = self, self.fs.open_input_file(path)

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def read_at(self, n, offset):
                data = f.read_at(n, offset)
                outer.read += len(data)
                return data

        return File()


def test_planning_reads_a_short_scan_per_cut_not_the_shard(tmp_path):
    # 64 MiB of lines of about 100 KiB, cut every 4 MiB
    path = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "x" * (100 * 1024 - 14)}) + "\n").encode()
    path.write_bytes(line * ((64 << 20) // len(line)))
    fs = _CountingFS()
    size, n, piece, scan = path.stat().st_size, len(line), 4 << 20, pieces_lib.SCAN_BYTES
    cuts = pieces_lib._line_cuts(fs, str(path), size, piece)
    targets = [t for t in range(piece, size, piece) if -(-t // n) * n < size]
    assert cuts == [0, *(-(-t // n) * n for t in targets), size]  # just after the line holding byte t-1
    # what is read: 64 KiB scans from byte t-1 up to that line end, and nothing else
    assert fs.read == sum(-(-(c - t + 1) // scan) * scan for t, c in zip(targets, cuts[1:]))
    print(f"planning read {fs.read:,} of {size:,} bytes")


def _assert_greedy(pieces: list[Piece], sizes: list[int], limit: int) -> None:
    """The pieces are consecutive runs covering every item, each as long as it can be: within
    ``limit`` bytes (or one item alone), and over it with the next item added."""
    bounds = [(p.start, p.stop) for p in pieces]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for start, stop in bounds:
        assert stop - start == 1 or sum(sizes[start:stop]) <= limit
        assert stop == len(sizes) or sum(sizes[start : stop + 1]) > limit


def test_parquet_and_arrow_pieces_are_groups_of_row_groups_and_batches(tmp_path):
    table = pa.table({"text": MANY, "n": list(range(len(MANY)))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=50)  # 12 row groups
    shard = Shard(str(tmp_path / "a.parquet"), "parquet", "text")
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    group_sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    pieces = shard_pieces(shard, 0, 3 * group_sizes[0])
    assert len(pieces) > 2
    _assert_greedy(pieces, group_sizes, 3 * group_sizes[0])
    assert _docs_of(shard, pieces) == MANY

    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(
        sink, table.schema
    ) as writer:
        for b in table.to_batches(max_chunksize=40):  # 15 record batches, as datasets writes them
            writer.write_batch(b)
    shard = Shard(str(tmp_path / "data-00000-of-00001.arrow"), "hf", "text")
    batch_sizes = [b.nbytes for b in table.to_batches(max_chunksize=40)]
    pieces = shard_pieces(shard, 0, 4 * batch_sizes[0])
    assert len(pieces) > 2
    _assert_greedy(pieces, batch_sizes, 4 * batch_sizes[0])
    assert _docs_of(shard, pieces) == MANY


def test_compressed_and_unplannable_shards_are_one_piece(tmp_path):
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in MANY).encode()))
    assert shard_pieces(Shard(str(gz), "jsonl", "text"), 0, 1024) == [Piece(0, 0)]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all" * 1000)
    assert shard_pieces(Shard(str(tmp_path / "bad.parquet"), "parquet", "text"), 1, 1024) == [Piece(1, 0)]


def test_a_big_txt_file_is_one_document_per_piece(tmp_path):
    text = "".join(f"line {i} of a long book\n" for i in range(2000))
    (tmp_path / "book.txt").write_text(text)
    shard = Shard(str(tmp_path / "book.txt"), "txt", "text")
    pieces = shard_pieces(shard, 0, 8192)
    docs = _docs_of(shard, pieces)
    assert len(docs) == len(pieces) > 3 and "".join(docs) == text and all(d.endswith("\n") for d in docs)


def test_the_plan_is_cached_in_the_run_directory_and_redone_for_a_changed_shard(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", MANY)
    b = write_jsonl(tmp_path / "b.jsonl", MANY[:300])
    shards = [Shard(str(a), "jsonl", "text"), Shard(str(b), "jsonl", "text")]
    run = tmp_path / "run"
    first = plan_pieces(shards, 4096, cache=str(run))
    saved = json.loads((run / pieces_lib.PLAN_FILE).read_text())
    assert saved["piece_bytes"] == 4096 and set(saved["shards"]) == {str(a), str(b)}
    # the cached plan is what a second call returns: doctor it to prove it is read
    saved["shards"][str(a)]["pieces"] = [[0, saved["shards"][str(a)]["size"]]]
    (run / pieces_lib.PLAN_FILE).write_text(json.dumps(saved))
    assert [p for p in plan_pieces(shards, 4096, cache=str(run)) if p.shard == 0] == [Piece(0, 0, 0, a.stat().st_size)]
    write_jsonl(a, MANY + ["one more document"])  # its size changed: planned again
    again = plan_pieces(shards, 4096, cache=str(run))
    assert len([p for p in again if p.shard == 0]) >= len([p for p in first if p.shard == 0])
    assert [p for p in again if p.shard == 1] == [p for p in first if p.shard == 1]


def test_ids_name_shard_piece_and_index_and_each_piece_packs_alone(tmp_path, tok_json):
    shard = Shard(str(write_jsonl(tmp_path / "a.jsonl", MANY)), "jsonl", "text")
    eos = _eos(tok_json)
    pieces = shard_pieces(shard, 5, 4096)
    for p in pieces:
        batches = list(pack_piece(shard, p, tok_json, 16, eos))
        ids = np.concatenate([b["id"] for b in batches])
        assert [split_id(int(i)) for i in ids] == [(5, p.index, c) for c in range(len(ids))]
        # exactly the EOS-joined tokens of the piece's own documents, cut into rows
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tok_json)
        flat = [t for d in read_documents(shard, p.start, p.stop) for t in tok.encode(d, add_special_tokens=False).ids
                + [eos]]
        rows = np.concatenate([b["input_ids"] for b in batches])
        assert rows.ravel().tolist() == flat[: len(rows) * 16]
        assert len(flat) - len(rows) * 16 < 16  # only the tail shorter than a row is dropped
    whole = list(pack_shard(shard, 5, tok_json, 16, eos))
    assert split_id(int(whole[0]["id"][0])) == (5, 0, 0)


def _stream(shards, tok_json, rank=0, world=1, **kw):
    return SequenceStream(shards, tok_json, 16, _eos(tok_json), 0, rank, world, use_ray=False, **kw)


def _epoch(stream):
    out = []
    for seq_id, _ in stream:
        out.append(seq_id)
        if stream.position.epoch > 0:
            return out[:-1]


def test_one_shard_feeds_two_workers_and_the_pieces_cover_it_once(tmp_path, tok_json):
    shards = [Shard(str(write_jsonl(tmp_path / "a.jsonl", MANY)), "jsonl", "text")]
    ranks = [_epoch(_stream(shards, tok_json, r, 2, piece_bytes=4096)) for r in (0, 1)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    every = {int(i) for p in shard_pieces(shards[0], 0, 4096)
             for b in pack_piece(shards[0], p, tok_json, 16, _eos(tok_json)) for i in b["id"]}
    assert set(ranks[0]) | set(ranks[1]) == every
    with pytest.raises(Exception, match="every worker needs at least one piece"):
        _stream(shards, tok_json, 0, 2, piece_bytes=0)


@pytest.mark.parametrize("cut", [3, 40, 137])  # inside the first piece, across pieces, later
def test_resume_inside_and_across_pieces_is_exactly_once(tmp_path, tok_json, cut):
    shards = [Shard(str(write_jsonl(tmp_path / f"{k}.jsonl", MANY[k::2])), "jsonl", "text") for k in range(2)]
    full = _epoch(_stream(shards, tok_json, shuffle_window=8, piece_bytes=4096))
    first = _stream(shards, tok_json, shuffle_window=8, piece_bytes=4096)
    it = iter(first)
    head = [next(it)[0] for _ in range(cut)]
    resumed = _stream(shards, tok_json, shuffle_window=8, piece_bytes=4096)
    resumed.load_state_dict(first.state_dict())
    assert head + _epoch(resumed) == full


def test_a_bad_piece_is_skipped_alone_and_counted(tmp_path, tok_json):
    docs = [json.dumps({"text": d}) + "\n" for d in MANY]
    docs[300] = "{broken json\n"
    path = tmp_path / "a.jsonl"
    path.write_text("".join(docs))
    shards = [Shard(str(path), "jsonl", "text")]
    pieces = shard_pieces(shards[0], 0, 4096)
    offset = len("".join(docs[:300]).encode())
    bad = next(p for p in pieces if p.start <= offset < p.stop)
    got = _epoch(_stream(shards, tok_json, piece_bytes=4096, max_bad_shards=1))
    stream = _stream(shards, tok_json, piece_bytes=4096, max_bad_shards=1)
    _epoch(stream)
    assert list(stream.bad) == [bad.key] and "not valid JSON" in stream.bad[bad.key]
    assert f"of the piece at byte {bad.start}" in stream.bad[bad.key]
    good = {p.index for p in pieces} - {bad.index}
    assert good <= {split_id(i)[1] for i in got}
    with pytest.raises(BadShardBudgetExceeded):
        _epoch(_stream(shards, tok_json, piece_bytes=4096, max_bad_shards=0))


def test_old_positions_name_bad_shards_by_index(tmp_path, tok_json):
    shards = [Shard(str(write_jsonl(tmp_path / f"{k}.jsonl", DOCS[k * 40 : (k + 1) * 40])), "jsonl", "text")
              for k in range(3)]
    stream = _stream(shards, tok_json, max_bad_shards=1)
    stream.load_state_dict({"epoch": 0, "slot": 0, "chunk": 0, "taken": 0, "consumed": 0, "bad": {"1": "why"}})
    assert stream.bad == {"1.0": "why"}
    assert all(split_id(i)[0] != 1 for i in _epoch(stream))


def test_small_pieces_are_grouped_into_tasks_but_never_into_too_few(tmp_path):
    from ptm_dist.data.pieces import task_groups

    small = [Piece(k, 0, size=100_000) for k in range(32)]  # a corpus of small shards: 32 plan entries
    groups = task_groups(small, 32 << 20, 4)
    assert [len(g) for g in groups] == [8, 8, 8, 8] and [i for g in groups for i in g] == list(range(32))
    big = [Piece(0, j, size=30 << 20) for j in range(7)]  # pieces of a big shard: one task each
    assert task_groups(big, 32 << 20, 4) == [[j] for j in range(7)]
    unknown = [Piece(k, 0) for k in range(5)]  # sizes unknown (token parts): one task each
    assert task_groups(unknown, 32 << 20, 1) == [[k] for k in range(5)]


def test_pieces_are_planned_and_read_on_object_storage(tmp_path, s3_endpoint):
    from ptm_dist import storage

    text = "".join(json.dumps({"text": d}) + "\n" for d in MANY)
    uri = f"s3://ptm/pieces-test/{tmp_path.name}/a.jsonl"
    storage.write_text(uri, text)
    (tmp_path / "up").mkdir()
    pq.write_table(pa.table({"text": MANY}), tmp_path / "up" / "a.parquet", row_group_size=50)
    storage.upload_dir(tmp_path / "up", f"s3://ptm/pieces-test/{tmp_path.name}")
    pq_uri = f"s3://ptm/pieces-test/{tmp_path.name}/a.parquet"
    shard = Shard(uri, "jsonl", "text")
    pieces = plan_pieces([shard, Shard(pq_uri, "parquet", "text")], 4096)
    jsonl = [p for p in pieces if p.shard == 0]
    parquet = [p for p in pieces if p.shard == 1]
    assert len(jsonl) > 10 and len(parquet) > 1
    assert _docs_of(shard, jsonl) == MANY and _docs_of(Shard(pq_uri, "parquet", "text"), parquet) == MANY
