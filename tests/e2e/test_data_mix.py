"""Source weights, the bounded shuffle, token shards (`ptm prepare --tokens`) and the tokenizer
sample read by Ray tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from ptm_dist.data.pipeline import SequenceStream, epoch_slots, pack_shard, split_id
from ptm_dist.data.sources import DataError, Shard
from ptm_dist.data.tokenizer import EOS, _sample, train_tokenizer
from ptm_dist.data.tokens import token_shards, write_token_dataset

DOCS = [f"text {i} " + "alpha beta gamma delta " * (i % 5 + 1) for i in range(240)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from ptm_dist.data.tokenizer import save_for_transformers

    out = tmp_path_factory.mktemp("tok")
    save_for_transformers(train_tokenizer(DOCS, 300), out)
    return out


@pytest.fixture(scope="module")
def tok_json(tok_dir):
    return (tok_dir / "tokenizer.json").read_text()


def _shards(tmp_path, n=6, weight=1.0, prefix="s"):
    out = []
    for i in range(n):
        p = tmp_path / f"{prefix}{i}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[i * 40 : (i + 1) * 40]))
        out.append(Shard(str(p), "jsonl", "text", weight))
    return out


def _eos(tok_json):
    return Tokenizer.from_str(tok_json).token_to_id(EOS)


def _epoch(stream):
    """[(id, tokens bytes)] of the stream's first epoch."""
    out = []
    for seq_id, tokens in stream:
        if stream.position.epoch > 0:
            break
        out.append((seq_id, tokens.tobytes()))
    return out


def test_epoch_slots_follow_the_weights():
    weights = [2.0] * 3 + [0.5] * 8 + [1.0] * 2
    for epoch in range(4):
        counts = Counter(epoch_slots(weights, seed=3, epoch=epoch))
        assert all(counts[i] == 2 for i in range(3))
        assert sum(counts[i] for i in range(3, 11)) == 4 and all(counts[i] <= 1 for i in range(3, 11))
        assert all(counts[i] == 1 for i in (11, 12))
    halves = [frozenset(i for i in epoch_slots(weights, 3, e) if 3 <= i < 11) for e in range(6)]
    assert len(set(halves)) > 1, "the half of a weight-0.5 source read changes with the epoch"
    assert epoch_slots(weights, 3, 0) == epoch_slots(weights, 3, 0)
    print("weights 2/0.5/1 -> reads per epoch", [Counter(epoch_slots(weights, 3, 0))[i] for i in range(13)])


def test_weighted_shuffled_stream_resumes_exactly(tmp_path, tok_json):
    shards = _shards(tmp_path, 4, 2.0, "a") + _shards(tmp_path, 4, 0.5, "b")
    eos = _eos(tok_json)

    def make():
        return SequenceStream(shards, tok_json, 16, eos, seed=1, rank=0, world=2, use_ray=False, shuffle_window=7)

    it = iter(make())
    full = [next(it)[0] for _ in range(500)]
    for cut in (1, 6, 7, 8, 123, 301):
        first = make()
        fi = iter(first)
        head = [next(fi)[0] for _ in range(cut)]
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as saved in a checkpoint
        ri = iter(resumed)
        assert head + [next(ri)[0] for _ in range(500 - cut)] == full, cut
    # The upsampled source appears twice per epoch, the downsampled one about half as often.
    ids = [i for i, _ in _epoch(make())]
    per_source = Counter("a" if split_id(i)[0] < 4 else "b" for i in ids)
    assert per_source["a"] > 2 * per_source["b"]


def test_shuffle_window_permutes_within_bounds(tmp_path, tok_json):
    shards = _shards(tmp_path)
    eos = _eos(tok_json)
    plain = _epoch(SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False))
    shuffled = _epoch(SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False, shuffle_window=10))
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    # Each window of 10 holds the same sequences as the unshuffled window.
    for k in range(0, len(plain), 10):
        assert sorted(shuffled[k : k + 10]) == sorted(plain[k : k + 10])
    again = _epoch(SequenceStream(shards, tok_json, 16, eos, 0, 0, 2, use_ray=False, shuffle_window=10))
    assert again == shuffled


def test_token_shards_give_the_same_stream(tmp_path, tok_dir, tok_json, ray_session):
    shards = _shards(tmp_path)
    eos = _eos(tok_json)
    seen = []
    index = write_token_dataset(str(tmp_path / "tokens"), {"train": shards[:5], "val": shards[5:]}, tok_dir,
                                16, eos, 300, progress=lambda *a: seen.append(a))
    assert index["dtype"] == "uint16" and len(index["train"]) == 5
    assert seen[-1][:3] == (6, 6, 240) and seen[-1][3] == sum(e["tokens"] for e in index["train"] + index["val"])
    tokens = token_shards(str(tmp_path / "tokens"), "train")
    for rank in (0, 1):
        raw = SequenceStream(shards[:5], tok_json, 16, eos, 4, rank, 2, use_ray=False, shuffle_window=5)
        tok_local = SequenceStream(tokens, tok_json, 16, eos, 4, rank, 2, use_ray=False, shuffle_window=5)
        tok_ray = SequenceStream(tokens, tok_json, 16, eos, 4, rank, 2, use_ray=True, shuffle_window=5)
        expected = _epoch(raw)
        assert _epoch(tok_local) == expected and _epoch(tok_ray) == expected
    # A second call keeps the finished shards (an interrupted prepare resumes).
    mtime = (tmp_path / "tokens" / "train" / "000000.bin").stat().st_mtime_ns
    write_token_dataset(str(tmp_path / "tokens"), {"train": shards[:5], "val": shards[5:]}, tok_dir, 16, eos, 300)
    assert (tmp_path / "tokens" / "train" / "000000.bin").stat().st_mtime_ns == mtime


def test_truncated_token_shard_is_named(tmp_path, tok_dir, tok_json):
    shards = _shards(tmp_path, 2)
    write_token_dataset(str(tmp_path / "t"), {"train": shards, "val": []}, tok_dir, 16, _eos(tok_json), 300)
    path = tmp_path / "t" / "train" / "000001.bin"
    path.write_bytes(path.read_bytes()[:-3])
    (bad,) = [s for s in token_shards(str(tmp_path / "t"), "train") if s.uri.endswith("000001.bin")]
    with pytest.raises(DataError, match=r"000001.bin: \d+ bytes is not a whole number of 16-token rows of uint16"):
        list(pack_shard(bad, 1, tok_json, 16, 0))


def test_tokenizer_sample_through_ray_equals_in_process(tmp_path, ray_session):
    import ray

    shards = _shards(tmp_path)
    assert ray.is_initialized()
    through_ray = list(_sample(shards, 4000))
    ray_session.shutdown()
    try:
        local = list(_sample(shards, 4000))
    finally:
        from ptm_dist.train.pretrain import worker_env_vars

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env_vars()})
    assert through_ray == local and 4000 <= sum(map(len, local)) < 4000 + 6 * 400


def test_pretraining_on_token_shards_equals_raw_text(tmp_path, ray_session, cache_dir):
    """The full job path: `ptm prepare --tokens` then pretraining from the token set gives the
    same losses as tokenizing on the fly."""
    from conftest import debug_job, read_lines

    from ptm_dist.data.prepare import prepare_data, write_tokens
    from ptm_dist.train.pretrain import pretrain

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _shards(corpus)
    common = [f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.2", "data.shuffle_window=8",
              "train.max_steps=6", "train.eval_every=3", "train.ckpt_every=6", "data.seq_len=16"]
    raw_cfg = debug_job(tmp_path, "run.name=raw", *common)
    write_tokens(raw_cfg, prepare_data(raw_cfg), str(tmp_path / "tokens"))
    tok_cfg = debug_job(tmp_path, "run.name=tok", *common, f"data.sources=[{{path: {tmp_path / 'tokens'}}}]")
    assert [s.format for s in prepare_data(tok_cfg).train] == ["tokens"] * 5
    raw = read_lines(pretrain(raw_cfg))
    tok = read_lines(pretrain(tok_cfg))
    key = [(r.get("step"), r.get("loss"), r.get("eval_loss")) for r in raw]
    assert key == [(r.get("step"), r.get("loss"), r.get("eval_loss")) for r in tok]
    print("raw vs token shards, losses:", [r["loss"] for r in raw if "loss" in r])
    with pytest.raises(DataError, match="token shards hold 16-token sequences but data.seq_len is 32"):
        prepare_data(debug_job(tmp_path, *common, f"data.sources=[{{path: {tmp_path / 'tokens'}}}]",
                               "data.seq_len=32"))


def test_token_sources_cannot_mix_with_raw_text(tmp_path, tok_dir, tok_json, cache_dir):
    from conftest import debug_job

    from ptm_dist.data.prepare import prepare_data

    shards = _shards(tmp_path, 2)
    write_token_dataset(str(tmp_path / "t"), {"train": shards, "val": []}, tok_dir, 32, _eos(tok_json), 300)
    cfg = debug_job(tmp_path, f"data.sources=[{{path: {tmp_path / 't'}}}, {{path: {shards[0].uri}}}]")
    with pytest.raises(DataError, match="cannot be mixed with raw text"):
        prepare_data(cfg)


def test_stream_memory_does_not_grow_with_the_corpus(tmp_path, tok_json):
    """Python-side peak allocations (tracemalloc: numpy buffers included) streaming one epoch of
    a corpus and of one 10 times larger: bounded by the window and one shard's encode batch."""
    import tracemalloc

    eos = _eos(tok_json)
    small = _shards(tmp_path, 3)
    large = [replace_uri(s, tmp_path, c) for c in range(10) for s in small]

    def peak(shards):
        stream = SequenceStream(shards, tok_json, 16, eos, 0, 0, 1, use_ray=False, shuffle_window=64)
        tracemalloc.start()
        n = sum(1 for _ in _epoch_iter(stream))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return n, top

    n_small, p_small = peak(small)
    n_large, p_large = peak(large)
    print(f"stream peak allocations: {p_small / 1024:.0f} KiB for {n_small} sequences, "
          f"{p_large / 1024:.0f} KiB for {n_large} ({p_large / p_small - 1:+.1%})")
    assert n_large == 10 * n_small
    assert p_large < 1.2 * p_small


def replace_uri(shard, tmp_path, copy):
    import shutil

    target = tmp_path / f"copy{copy}-{Path(shard.uri).name}"
    shutil.copyfile(shard.uri, target)
    return Shard(str(target), shard.format, shard.text_column)


def _epoch_iter(stream):
    for _ in stream:
        if stream.position.epoch > 0:
            return
        yield


def test_prepare_tokens_cli_progress_and_bad_shard(tmp_path, cache_dir):
    """`ptm prepare --tokens` end to end in a subprocess: its own local Ray, the progress lines,
    the summary; then a corrupt shard: one line naming shard and line, exit 2, the shards
    already written kept."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shards = _shards(corpus)
    cmd = [sys.executable, "-m", "ptm_dist.cli", "prepare", "--tokens", str(tmp_path / "tok"),
           f"--set=data.sources=[{{path: {corpus}}}]", "--set=data.seq_len=16", "--set=data.val_fraction=0.2"]
    env = {**os.environ, "PTM_PROGRESS": "plain"}
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "tokenize 6/6" in ok.stdout and "docs 240" in ok.stdout, ok.stdout
    assert "token shards: 5 train" in ok.stdout and "1 held-out" in ok.stdout
    lines = Path(shards[3].uri).read_text().splitlines()
    Path(shards[3].uri).write_text("\n".join(lines[:5] + ["{oops"] + lines[5:]) + "\n")
    (tmp_path / "tok" / "train" / "000003.json").unlink()  # that shard must be redone
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2
    err = [ln for ln in bad.stderr.splitlines() if "ptm prepare" in ln or "Traceback" in ln]
    assert len(err) == 1 and err[0].startswith("ptm prepare: error: ") and "s3.jsonl: line 6" in err[0], bad.stderr
    assert (tmp_path / "tok" / "train" / "000000.json").exists()
