"""Source mixing through Ray: token shards (`ptm prepare --tokens`) give the same stream as raw
text in process and through Ray Data, the tokenizer sample read by Ray tasks equals the
in-process one, pretraining on token shards equals pretraining on raw text, and `ptm prepare
--tokens` end to end. The in-process parts alone: tests/unit/test_data_pipeline_mix.py,
test_data_tokens.py, test_data_prepare.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import _eos, _epoch, _shards

from ptm_dist.data.packing import split_id
from ptm_dist.data.pipeline import SequenceStream
from ptm_dist.data.tokenizer import _sample
from ptm_dist.data.tokens import token_shards, write_token_dataset
from ptm_dist.errors import DataError


def test_token_shards_give_the_same_stream(tmp_path, tok_dir, tok_json, ray_session):
    shards = _shards(tmp_path)
    eos = _eos(tok_json)
    seen = []
    # pieces of about a third of a shard: each raw piece is tokenized by its own task into a part file
    piece_bytes = min(Path(s.uri).stat().st_size for s in shards) // 3
    index = write_token_dataset(str(tmp_path / "tokens"), {"train": shards[:5], "val": shards[5:]}, tok_dir,
                                16, eos, 300, progress=lambda *a: seen.append(a), piece_bytes=piece_bytes)
    assert index["dtype"] == "uint16" and len(index["train"]) == 5
    n_pieces = sum(len(e["pieces"]) for e in index["train"] + index["val"])
    assert n_pieces >= 18 and seen[-1][:2] == (n_pieces, n_pieces) and seen[-1][2] == 240
    assert seen[-1][3] == sum(e["tokens"] for e in index["train"] + index["val"])
    tokens = token_shards(str(tmp_path / "tokens"), "train")
    for rank in (0, 1):
        raw = SequenceStream(shards[:5], tok_json, 16, eos, 4, rank, 2, use_ray=False, shuffle_window=5,
                             piece_bytes=piece_bytes)
        tok_local = SequenceStream(tokens, tok_json, 16, eos, 4, rank, 2, use_ray=False, shuffle_window=5)
        tok_ray = SequenceStream(tokens, tok_json, 16, eos, 4, rank, 2, use_ray=True, shuffle_window=5)
        expected = _epoch(raw)
        assert len({split_id(i)[1] for i, _ in expected}) >= 3  # sequences of several pieces of a shard
        assert _epoch(tok_local) == expected and _epoch(tok_ray) == expected
    # A second call keeps the finished pieces (an interrupted prepare resumes).
    part = tmp_path / "tokens" / "train" / "000000" / "00001.bin"
    mtime = part.stat().st_mtime_ns
    write_token_dataset(str(tmp_path / "tokens"), {"train": shards[:5], "val": shards[5:]}, tok_dir, 16, eos, 300,
                        piece_bytes=piece_bytes)
    assert part.stat().st_mtime_ns == mtime


def test_tokenizer_sample_through_ray_equals_in_process(tmp_path, ray_session):
    import ray

    shards = _shards(tmp_path)
    assert ray.is_initialized()
    through_ray = list(_sample(shards, 4000))
    ray_session.shutdown()
    try:
        local = list(_sample(shards, 4000))
    finally:
        from ptm_dist.launch import worker_env_vars

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


def test_prepare_tokens_cli_progress_and_bad_shard(tmp_path, cache_dir):
    """`ptm prepare --tokens` end to end in a subprocess, for a job that starts from a pretrained
    model (model.init): its own local Ray, the progress lines, the summary, the shards made with
    the model's own tokenizer; then a corrupt shard: one line naming shard and line, exit 2, the
    shards already written kept."""
    import os
    import subprocess
    import sys

    from hub_helpers import make_hub_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shards = _shards(corpus)
    init = make_hub_model(tmp_path / "gpt2", "gpt2")
    cmd = [sys.executable, "-m", "ptm_dist.cli", "prepare", "--tokens", str(tmp_path / "tok"),
           f"--set=data.sources=[{{path: {corpus}}}]", "--set=data.seq_len=16", "--set=data.val_fraction=0.2",
           f"--set=model.init={init}"]
    env = {**os.environ, "PTM_PROGRESS": "plain"}
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "tokenize 6/6" in ok.stdout and "docs 240" in ok.stdout, ok.stdout
    assert "token shards: 5 train" in ok.stdout and "1 held-out" in ok.stdout
    assert f"tokenizer: {init}\n" in ok.stdout
    assert (tmp_path / "tok" / "tokenizer" / "tokenizer.json").read_text() == (init / "tokenizer.json").read_text()
    lines = Path(shards[3].uri).read_text().splitlines()
    Path(shards[3].uri).write_text("\n".join(lines[:5] + ["{oops"] + lines[5:]) + "\n")
    (tmp_path / "tok" / "train" / "000003" / "00000.json").unlink()  # that shard (one piece) must be redone
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2
    err = [ln for ln in bad.stderr.splitlines() if "ptm prepare" in ln or "Traceback" in ln]
    assert len(err) == 1 and err[0].startswith("ptm prepare: error: ") and "s3.jsonl: line 6" in err[0], bad.stderr
    assert (tmp_path / "tok" / "train" / "000000" / "00000.json").exists()
