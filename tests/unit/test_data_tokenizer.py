"""ptm_dist.data.tokenizer: the tokenizer built from a corpus is cached and loads in transformers."""

from __future__ import annotations

from data_helpers import _stream_shards

from ptm_dist.data.tokenizer import EOS, ensure_tokenizer


def test_builtin_tokenizer_is_cached_and_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    shards = _stream_shards(tmp_path, 2)
    d1 = ensure_tokenizer(shards, 300, tmp_path / "cache")
    mtime = (d1 / "tokenizer.json").stat().st_mtime
    assert ensure_tokenizer(shards, 300, tmp_path / "cache") == d1
    assert (d1 / "tokenizer.json").stat().st_mtime == mtime
    tok = AutoTokenizer.from_pretrained(str(d1))
    assert tok.eos_token == EOS and tok.mask_token == "<mask>" and len(tok) == 300
