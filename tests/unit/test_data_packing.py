"""ptm_dist.data.packing: documents tokenized, EOS-joined and cut into fixed-length sequences
with stable ids."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import DOCS, docs_tok_json, write_jsonl
from tokenizers import Tokenizer

from ptm_dist.data.packing import pack_shard, split_id
from ptm_dist.data.sources import Shard
from ptm_dist.data.tokenizer import EOS
from ptm_dist.errors import DataError


@pytest.fixture(scope="module")
def tok_json():
    return docs_tok_json()


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
    assert [split_id(int(i)) for i in ids] == [(7, 0, c) for c in range(n)]
    skipped = np.concatenate([b["input_ids"] for b in pack_shard(shard, 7, tok_json, 16, eos, skip=5)])
    assert np.array_equal(skipped, rows[5:])


def test_empty_shard_is_bad_input(tmp_path, tok_json):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: empty shard"):
        list(pack_shard(Shard(str(p), "jsonl", "text"), 0, tok_json, 16, 0))
