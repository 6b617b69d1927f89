"""ptm_dist.data.tokens: token shards (`ptm prepare --tokens`) written in process; a truncated
one is named. Token shards against the raw-text stream through Ray: tests/e2e/test_data_mix.py."""

from __future__ import annotations

import pytest
from data_helpers import _eos, _shards

from ptm_dist.data.packing import pack_piece
from ptm_dist.data.pieces import shard_pieces
from ptm_dist.data.tokens import token_shards, write_token_dataset
from ptm_dist.errors import DataError


def test_truncated_token_shard_is_named(tmp_path, tok_dir, tok_json):
    shards = _shards(tmp_path, 2)
    write_token_dataset(str(tmp_path / "t"), {"train": shards, "val": []}, tok_dir, 16, _eos(tok_json), 300)
    path = tmp_path / "t" / "train" / "000001" / "00000.bin"
    path.write_bytes(path.read_bytes()[:-3])
    (bad,) = [s for s in token_shards(str(tmp_path / "t"), "train") if s.uri.endswith("000001")]
    (piece,) = shard_pieces(bad, 1, 0)
    with pytest.raises(DataError, match=r"000001/00000.bin: \d+ bytes is not a whole number of 16-token rows of"):
        list(pack_piece(bad, piece, tok_json, 16, 0))
