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


def test_staging_copies_cached_shards_into_storage_once_and_keeps_the_identity(tmp_path, tok_dir):
    """Shards under the machine's ptm cache (the built-in corpus) are copied to
    <storage>/.ptm-cache once, named by content; the user's own shards are left where they are;
    the data identity a checkpoint records does not change (file names, not locations)."""
    from ptm_dist.data.prepare import PreparedData

    cache, user = tmp_path / "cache", tmp_path / "user"
    cache.mkdir()
    user.mkdir()
    cached, own = _shards(cache, 2), _shards(user, 1, prefix="u")
    data = PreparedData(cached[:1] + own, cached[1:], tok_dir)
    staged = data.staged(cache, str(tmp_path / "runs"))
    copies = sorted((tmp_path / "runs" / ".ptm-cache").glob("*/*"), key=lambda p: p.name)
    assert [p.name for p in copies] == ["s0.jsonl", "s1.jsonl"] and len(copies[0].parent.name) == 16
    assert staged.train[0].uri == str(copies[0]) and staged.val[0].uri == str(copies[1])
    assert staged.train[1] == own[0]  # not in the cache: not copied
    assert copies[0].read_bytes() == (cache / "s0.jsonl").read_bytes()
    mtime = copies[0].stat().st_mtime_ns
    assert data.staged(cache, str(tmp_path / "runs")) == staged and copies[0].stat().st_mtime_ns == mtime
    assert staged.for_workers().identity == data.for_workers().identity


def test_token_shards_of_another_tokenizer_than_the_init_models_are_refused(tmp_path, tok_dir, tok_json):
    """A token set made with one tokenizer, read by a job whose model.init has another: a
    one-line error naming both (the ids would mean other tokens); with the same one it passes.
    A re-saved copy of the same tokenizer (other file, same vocabulary) is the same."""
    from conftest import debug_job
    from hub_helpers import make_tokenizer
    from tokenizers import Tokenizer

    from ptm_dist.data.prepare import prepare_data

    shards = _shards(tmp_path, 2)
    write_token_dataset(str(tmp_path / "t"), {"train": shards, "val": shards[1:]}, tok_dir, 32, _eos(tok_json), 300)
    cfg = debug_job(tmp_path, f"data.sources=[{{path: {tmp_path / 't'}}}]")
    other = tmp_path / "other"
    make_tokenizer("bytelevel", other)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, model_tokenizer=other)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "t") in msg and f"model.init's ({other})" in msg
    copy = tmp_path / "copy"
    copy.mkdir()
    Tokenizer.from_str(tok_json).save(str(copy / "tokenizer.json"), pretty=False)
    assert (copy / "tokenizer.json").read_text() != (tok_dir / "tokenizer.json").read_text()
    assert prepare_data(cfg, model_tokenizer=copy).tokenizer_dir.name == "tokenizer"
