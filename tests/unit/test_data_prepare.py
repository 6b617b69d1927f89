"""ptm_dist.data.prepare: a job's sources resolved into shards; token shards cannot be mixed with
raw text."""

from __future__ import annotations

import pytest
from data_helpers import _eos, _shards

from ptm_dist.data.tokens import write_token_dataset
from ptm_dist.errors import DataError


def test_token_sources_cannot_mix_with_raw_text(tmp_path, tok_dir, tok_json, cache_dir):
    from conftest import debug_job

    from ptm_dist.data.prepare import prepare_data

    shards = _shards(tmp_path, 2)
    write_token_dataset(str(tmp_path / "t"), {"train": shards, "val": []}, tok_dir, 32, _eos(tok_json), 300)
    cfg = debug_job(tmp_path, f"data.sources=[{{path: {tmp_path / 't'}}}, {{path: {shards[0].uri}}}]")
    with pytest.raises(DataError, match="cannot be mixed with raw text"):
        prepare_data(cfg)
