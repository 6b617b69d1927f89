"""Shards, packing and the resumable stream (in-process and through Ray Data)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from ptm_dist.data.pipeline import SequenceStream, pack_shard, shard_order, split_id, take_sequences
from ptm_dist.data.sources import DataError, Shard, find_shards, read_documents
from ptm_dist.data.tokenizer import EOS, ensure_tokenizer, train_tokenizer

DOCS = [f"document number {i} " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(200)]


@pytest.fixture(scope="module")
def tok_json():
    return train_tokenizer(DOCS, 300).to_str()


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def test_formats_found_and_read_alike(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS[3:6]))
    pq.write_table(pa.table({"text": DOCS[6:9]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(DOCS[9])
    (tmp_path / "README.md").write_text("not a shard")
    shards = find_shards(str(tmp_path))
    assert [s.format for s in shards] == ["jsonl", "jsonl", "parquet", "txt"]
    got = [d for s in shards for d in read_documents(s)]
    assert got == DOCS[:10]


def test_glob_selects_matching_files(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"train-{i}.jsonl", DOCS[i : i + 1])
    write_jsonl(tmp_path / "val-0.jsonl", DOCS[:1])
    assert [s.uri.rsplit("/", 1)[1] for s in find_shards(str(tmp_path / "train-*.jsonl"))] == [
        "train-0.jsonl", "train-1.jsonl", "train-2.jsonl"]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or directory"):
        find_shards(str(tmp_path / "nope"))


def test_bad_json_line_names_shard_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        list(read_documents(Shard(str(p), "jsonl", "text")))


def test_missing_text_column_names_shard_line_and_keys(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", ["a"], key="body")
    with pytest.raises(DataError, match=r"x.jsonl: line 1: no text column 'text' \(found: body\)"):
        list(read_documents(Shard(str(p), "jsonl", "text")))


def test_packing_is_exact_eos_joined_and_ids_stable(tmp_path, tok_json):
    p = write_jsonl(tmp_path / "s.jsonl", DOCS[:50])
    shard = Shard(str(p), "jsonl", "text")
    tok = Tokenizer.from_str(tok_json)
    eos = tok.token_to_id(EOS)
    batches = list(pack_shard(shard, 7, tok_json, 16, eos))
    ids = np.concatenate([b["id"] for b in batches])
    rows = np.concatenate([b["input_ids"] for b in batches])
    flat = np.concatenate([np.r_[tok.encode(d).ids, eos] for d in DOCS[:50]])
    n = len(flat) // 16
    assert rows.shape == (n, 16)
    assert np.array_equal(rows.reshape(-1), flat[: n * 16])  # no padding, nothing reordered
    assert [split_id(int(i)) for i in ids] == [(7, c) for c in range(n)]
    skipped = np.concatenate([b["input_ids"] for b in pack_shard(shard, 7, tok_json, 16, eos, skip=5)])
    assert np.array_equal(skipped, rows[5:])


def test_shard_order_partitions_every_epoch():
    for epoch in range(3):
        parts = [shard_order(10, 1, epoch, r, 3) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(10))
    assert shard_order(10, 1, 0, 0, 3) != shard_order(10, 1, 1, 0, 3)


def _stream_shards(tmp_path, n=6):
    return [Shard(str(write_jsonl(tmp_path / f"s{i}.jsonl", DOCS[i * 30 : (i + 1) * 30])), "jsonl", "text")
            for i in range(n)]


def _take(stream, n):
    it = iter(stream)
    return [next(it)[0] for _ in range(n)]


def test_stream_resumes_exactly_mid_epoch_and_across_epochs(tmp_path, tok_json):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)

    def make():
        return SequenceStream(shards, tok_json, 16, eos, seed=0, rank=1, world=2, use_ray=False)

    full = _take(make(), 400)  # more than one epoch of this rank's shards
    assert len(set(full[:50])) == 50
    for cut in (1, 37, 150, 333):
        first = make()
        head = _take(first, cut)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert head + _take(resumed, 400 - cut) == full


def test_stream_needs_a_shard_per_worker(tmp_path, tok_json):
    with pytest.raises(DataError, match="1 shard.* 2 workers"):
        SequenceStream(_stream_shards(tmp_path, 1), tok_json, 16, 0, 0, 0, 2, use_ray=False)


def test_ray_data_stream_equals_in_process_stream(tmp_path, tok_json, ray_session):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)
    local = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False)
    remote = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=True)
    assert _take(remote, 300) == _take(local, 300)


def test_take_sequences_is_a_prefix(tmp_path, tok_json):
    shards = _stream_shards(tmp_path, 2)
    ids, rows = take_sequences(shards, tok_json, 16, 0, 10)
    assert rows.shape == (10, 16) and [split_id(int(i))[0] for i in ids] == [0] * 10


def test_builtin_tokenizer_is_cached_and_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    shards = _stream_shards(tmp_path, 2)
    d1 = ensure_tokenizer(shards, 300, tmp_path / "cache")
    mtime = (d1 / "tokenizer.json").stat().st_mtime
    assert ensure_tokenizer(shards, 300, tmp_path / "cache") == d1
    assert (d1 / "tokenizer.json").stat().st_mtime == mtime
    tok = AutoTokenizer.from_pretrained(str(d1))
    assert tok.eos_token == EOS and tok.mask_token == "<mask>" and len(tok) == 300


def _corrupt(path, after_line: int):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:after_line]) + "{broken json\n" + "".join(lines[after_line:]))


def _bad_stream_setup(tmp_path, tok_json, corrupt_after=10):
    shards = _stream_shards(tmp_path)
    bad_uri = shards[2].uri
    _corrupt(Path(bad_uri), corrupt_after)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)
    return shards, bad_uri, eos


def _epoch_ids(stream, n=2000):
    """ids of the first epoch of a stream (stops at the epoch boundary)."""
    out = []
    for seq_id, _ in stream:
        if stream.position.epoch > 0:
            break
        out.append(seq_id)
    return out


def test_strict_by_default_a_bad_shard_stops_the_stream_naming_it(tmp_path, tok_json):
    shards, bad_uri, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False)
    with pytest.raises(DataError, match=rf"{bad_uri}: line 11: not valid JSON"):
        _epoch_ids(stream)


def test_bad_shard_budget_skips_the_rest_of_the_shard_and_counts_it(tmp_path, tok_json):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    got = _epoch_ids(stream)
    assert list(stream.bad) == [2] and "line 11: not valid JSON" in stream.bad[2]
    assert len(got) == len(set(got))  # nothing replayed
    # Everything from the good shards, and from the bad one only what precedes the bad line.
    clean = SequenceStream([s for s in shards], tok_json, 16, eos, 0, rank, 2, use_ray=False)
    clean.bad = {2: "skip"}
    expected_good = _epoch_ids(clean)
    from_bad = [i for i in got if split_id(i)[0] == 2]
    assert [i for i in got if split_id(i)[0] != 2] == expected_good
    # Documents are read in batches, so at most what precedes the corrupt line was emitted.
    assert len(from_bad) < 30


def test_the_shard_past_the_budget_fails_the_run(tmp_path, tok_json):
    from ptm_dist.data.pipeline import BadShardBudgetExceeded

    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    other = next(i for i in shard_order(6, 0, 0, rank, 2) if i != 2)
    Path(shards[other].uri).write_text("")  # an empty shard: the second bad one
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    with pytest.raises(BadShardBudgetExceeded, match=r"bad shard 2, over data.max_bad_shards=1"):
        _epoch_ids(stream)


def test_empty_shard_is_bad_input(tmp_path, tok_json):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: empty shard"):
        list(pack_shard(Shard(str(p), "jsonl", "text"), 0, tok_json, 16, 0))


def test_skipped_shards_are_remembered_across_resume(tmp_path, tok_json):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    first = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    full = _epoch_ids(first)
    cut = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    head = []
    for seq_id, _ in cut:
        head.append(seq_id)
        if len(head) == len(full) - 5:
            break
    assert cut.bad  # the bad shard was met before the cut
    resumed = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    resumed.load_state_dict(cut.state_dict())
    assert head + _epoch_ids(resumed) == full
    assert list(resumed.bad) == [2]


def test_ray_data_stream_skips_a_bad_shard_like_the_local_one(tmp_path, tok_json, ray_session):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    local = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    remote = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=True, max_bad_shards=1)
    assert _epoch_ids(remote) == _epoch_ids(local)
    assert list(remote.bad) == [2]


def test_hugging_face_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": DOCS[:40], "n": list(range(40))}).save_to_disk(
        str(tmp_path / "ds"), num_shards=2)
    shards = find_shards(str(tmp_path / "ds"), text_column="body")
    assert [s.format for s in shards] == ["hf", "hf"]
    assert [d for s in shards for d in read_documents(s)] == DOCS[:40]
    with pytest.raises(DataError, match=r"no text column 'text' \(columns: body, n\)"):
        list(read_documents(find_shards(str(tmp_path / "ds"))[0]))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['train'\]; name one split"):
        find_shards(str(tmp_path / "dd"))


def test_zstd_jsonl(tmp_path):
    import pyarrow as pa

    raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:5]).encode()
    with pa.output_stream(str(tmp_path / "a.jsonl.zst"), compression="zstd") as f:
        f.write(raw)
    (shard,) = find_shards(str(tmp_path))
    assert shard.format == "jsonl" and list(read_documents(shard)) == DOCS[:5]


def test_truncated_gzip_shard_is_named(tmp_path):
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:50]).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    (shard,) = find_shards(str(tmp_path))
    with pytest.raises(DataError, match="t.jsonl.gz: cannot read shard"):
        list(read_documents(shard))


def test_shards_on_s3_through_pyarrow_and_ray_data(tmp_path, tok_json, s3_endpoint, ray_session):
    import boto3

    s3 = boto3.client("s3")
    for i in range(4):
        s3.put_object(Bucket="ptm", Key=f"corpus/part-{i}.jsonl",
                      Body="".join(json.dumps({"text": d}) + "\n" for d in DOCS[i * 40 : (i + 1) * 40]))
    s3.put_object(Bucket="ptm", Key="corpus/README.md", Body="not a shard")
    shards = find_shards("s3://ptm/corpus/*.jsonl")
    assert [s.uri for s in shards] == [f"s3://ptm/corpus/part-{i}.jsonl" for i in range(4)]
    assert list(read_documents(shards[1])) == DOCS[40:80]
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)
    remote = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=True)
    local = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False)
    assert _take(remote, 100) == _take(local, 100)
    with pytest.raises(DataError, match="s3://ptm/nothing-here: no such file or directory"):
        find_shards("s3://ptm/nothing-here")


def test_same_seed_same_stream_across_reruns_other_seed_other_order(tmp_path, tok_json, ray_session):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)
    runs = [_take(SequenceStream(shards, tok_json, 16, eos, 7, 0, 2, use_ray=True), 200) for _ in range(2)]
    assert runs[0] == runs[1]
    assert _take(SequenceStream(shards, tok_json, 16, eos, 8, 0, 2, use_ray=True), 200) != runs[0]
