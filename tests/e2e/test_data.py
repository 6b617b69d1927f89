"""The resumable stream through Ray Data (use_ray=True) against the in-process one, shards on
S3 through pyarrow and Ray Data, and the same seed giving the same stream across reruns. The
in-process stream alone: tests/unit/test_data_pipeline.py."""

from __future__ import annotations

import json

import pytest
from data_helpers import DOCS, _bad_stream_setup, _epoch_ids, _stream_shards, _take, docs_tok_json
from tokenizers import Tokenizer

from ptm_dist.data.pipeline import SequenceStream, shard_order
from ptm_dist.data.sources import find_shards, read_documents
from ptm_dist.data.tokenizer import EOS
from ptm_dist.errors import DataError


@pytest.fixture(scope="module")
def tok_json():
    return docs_tok_json()


def test_ray_data_stream_equals_in_process_stream(tmp_path, tok_json, ray_session):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)
    local = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False)
    remote = SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=True)
    assert _take(remote, 300) == _take(local, 300)


def test_ray_data_stream_skips_a_bad_shard_like_the_local_one(tmp_path, tok_json, ray_session):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    local = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    remote = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=True, max_bad_shards=1)
    assert _epoch_ids(remote) == _epoch_ids(local)
    assert list(remote.bad) == ["2.0"]


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
