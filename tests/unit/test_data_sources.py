"""ptm_dist.data.sources: finding shards (formats, globs, Hugging Face directories, compression)
and reading documents from them, with errors naming the shard and line."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import DOCS, write_jsonl

from ptm_dist.data.sources import Shard, find_shards, read_documents
from ptm_dist.errors import DataError


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
