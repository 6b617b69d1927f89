"""Shared pieces of the data tests (unit tier: in-process streams; e2e tier: the same streams
through Ray Data): two small synthetic corpora and the helpers that write them as shards and
read streams back.

``DOCS`` and its helpers serve the shard, packing and stream tests; ``MIX_DOCS`` and its helpers
the source-weight, shuffle and token-shard tests. Each test file trains its own tokenizer on the
corpus it uses (module-scoped ``tok_json`` / ``tok_dir`` fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from ptm_dist.data.sources import Shard
from ptm_dist.data.tokenizer import EOS, save_for_transformers, train_tokenizer

# ---------------------------------------------------------------- shards, packing, streams

DOCS = [f"document number {i} " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(200)]


def docs_tok_json() -> str:
    return train_tokenizer(DOCS, 300).to_str()


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs))
    return path


def _stream_shards(tmp_path, n=6):
    return [Shard(str(write_jsonl(tmp_path / f"s{i}.jsonl", DOCS[i * 30 : (i + 1) * 30])), "jsonl", "text")
            for i in range(n)]


def _take(stream, n):
    it = iter(stream)
    return [next(it)[0] for _ in range(n)]


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


# ---------------------------------------------------------------- source weights, shuffle, token shards

MIX_DOCS = [f"text {i} " + "alpha beta gamma delta " * (i % 5 + 1) for i in range(240)]


def mix_tok_dir(out: Path) -> Path:
    """The tokenizer trained on MIX_DOCS, saved for transformers under ``out``."""
    save_for_transformers(train_tokenizer(MIX_DOCS, 300), out)
    return out


def _shards(tmp_path, n=6, weight=1.0, prefix="s"):
    out = []
    for i in range(n):
        p = tmp_path / f"{prefix}{i}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in MIX_DOCS[i * 40 : (i + 1) * 40]))
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


def plan_epoch_ids(cfg, epochs: int = 2) -> dict[int, list[int]]:
    """The sequence ids of a job's first ``epochs`` epochs (sorted): one worker's plain plan, read
    in this process, to compare with what a run's workers logged (data.log_sequence_ids)."""
    from ptm_dist.data.pipeline import SequenceStream
    from ptm_dist.data.prepare import prepare_data

    data = prepare_data(cfg).for_workers()
    stream = SequenceStream(list(data.train_shards), data.tokenizer_json, cfg.data.seq_len, data.special["eos"],
                            cfg.run.seed, 0, 1, use_ray=False, shuffle_window=cfg.data.shuffle_window,
                            pieces=list(data.train_pieces))
    out: dict[int, list[int]] = {e: [] for e in range(epochs)}
    for seq_id, _ in stream:
        if stream.position.epoch >= epochs:
            return {e: sorted(ids) for e, ids in out.items()}
        out[stream.position.epoch].append(seq_id)
    raise AssertionError("unreachable: the stream is endless")
