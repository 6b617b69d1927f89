"""ptm_dist.data.pipeline in process (use_ray=False): shard order, exact resume mid-epoch and
across epochs, and the bad-shard budget. The same streams through Ray Data: tests/e2e/test_data.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import _bad_stream_setup, _epoch_ids, _stream_shards, _take, docs_tok_json
from tokenizers import Tokenizer

from ptm_dist.data.packing import split_id
from ptm_dist.data.pipeline import SequenceStream, redistribute, shard_order, take_sequences
from ptm_dist.data.tokenizer import EOS
from ptm_dist.errors import DataError


@pytest.fixture(scope="module")
def tok_json():
    return docs_tok_json()


def test_shard_order_partitions_every_epoch():
    for epoch in range(3):
        parts = [shard_order(10, 1, epoch, r, 3) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(10))
    assert shard_order(10, 1, 0, 0, 3) != shard_order(10, 1, 1, 0, 3)


def test_stream_resumes_exactly_mid_epoch_and_across_epochs(tmp_path, tok_json):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)

    def make():
        return SequenceStream(shards, tok_json, 16, eos, seed=0, rank=1, world=2, use_ray=False)

    full = _take(make(), 400)  # more than one epoch of this rank's shards
    assert len(set(full[:50])) == 50
    for cut in (1, 37, 150, 333):
        first = make()
        head = _take(first, cut)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert head + _take(resumed, 400 - cut) == full


def test_stream_needs_a_shard_per_worker(tmp_path, tok_json):
    with pytest.raises(DataError, match="1 shard.* 2 workers"):
        SequenceStream(_stream_shards(tmp_path, 1), tok_json, 16, 0, 0, 0, 2, use_ray=False)


def test_take_sequences_is_a_prefix(tmp_path, tok_json):
    shards = _stream_shards(tmp_path, 2)
    ids, rows = take_sequences(shards, tok_json, 16, 0, 10)
    assert rows.shape == (10, 16) and [split_id(int(i))[0] for i in ids] == [0] * 10


def test_strict_by_default_a_bad_shard_stops_the_stream_naming_it(tmp_path, tok_json):
    shards, bad_uri, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False)
    with pytest.raises(DataError, match=rf"{bad_uri}: line 11: not valid JSON"):
        _epoch_ids(stream)


def test_bad_shard_budget_skips_the_rest_of_the_shard_and_counts_it(tmp_path, tok_json):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    got = _epoch_ids(stream)
    assert list(stream.bad) == ["2.0"] and "line 11: not valid JSON" in stream.bad["2.0"]
    assert len(got) == len(set(got))  # nothing replayed
    # Everything from the good shards, and from the bad one only what precedes the bad line.
    clean = SequenceStream([s for s in shards], tok_json, 16, eos, 0, rank, 2, use_ray=False)
    clean.bad = {"2.0": "skip"}
    expected_good = _epoch_ids(clean)
    from_bad = [i for i in got if split_id(i)[0] == 2]
    assert [i for i in got if split_id(i)[0] != 2] == expected_good
    # Documents are read in batches, so at most what precedes the corrupt line was emitted.
    assert len(from_bad) < 30


def test_the_shard_past_the_budget_fails_the_run(tmp_path, tok_json):
    from ptm_dist.data.pipeline import BadShardBudgetExceeded

    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    other = next(i for i in shard_order(6, 0, 0, rank, 2) if i != 2)
    Path(shards[other].uri).write_text("")  # an empty shard: the second bad one
    stream = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    with pytest.raises(BadShardBudgetExceeded, match=r"bad shard 2, over data.max_bad_shards=1"):
        _epoch_ids(stream)


def test_skipped_shards_are_remembered_across_resume(tmp_path, tok_json):
    shards, _, eos = _bad_stream_setup(tmp_path, tok_json)
    rank = next(r for r in (0, 1) if 2 in shard_order(6, 0, 0, r, 2))
    first = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    full = _epoch_ids(first)
    cut = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    head = []
    for seq_id, _ in cut:
        head.append(seq_id)
        if len(head) == len(full) - 5:
            break
    assert cut.bad  # the bad shard was met before the cut
    resumed = SequenceStream(shards, tok_json, 16, eos, 0, rank, 2, use_ray=False, max_bad_shards=1)
    resumed.load_state_dict(cut.state_dict())
    assert head + _epoch_ids(resumed) == full
    assert list(resumed.bad) == ["2.0"]


# ---------------------------------------------------------------- a change of worker count


def _consume(stream, n=None, until_epoch=None):
    """(epoch, id) of the next ``n`` sequences, or of those before the first of ``until_epoch``."""
    out, it = [], iter(stream)
    while n is None or len(out) < n:
        seq_id, _ = next(it)
        if until_epoch is not None and stream.position.epoch >= until_epoch:
            break
        out.append((stream.position.epoch, seq_id))
    return out


def _resize_setup(tmp_path, tok_json):
    shards = _stream_shards(tmp_path)
    eos = Tokenizer.from_str(tok_json).token_to_id(EOS)

    def make(rank, world):
        return SequenceStream(shards, tok_json, 16, eos, seed=3, rank=rank, world=world, use_ray=False,
                              shuffle_window=5, piece_bytes=600)

    one = make(0, 1)  # every piece once per epoch: the ids any worker count must consume
    two_epochs = _consume(one, until_epoch=2)
    expected = {e: sorted(i for ep, i in two_epochs if ep == e) for e in (0, 1)}
    return make, expected


def _assert_exactly_once(consumed, expected):
    for epoch, ids in expected.items():
        got = sorted(i for e, i in consumed if e == epoch)
        assert got == ids, f"epoch {epoch}: {len(got)} consumed, {len(set(got))} distinct, {len(ids)} in the epoch"


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_resized_streams_consume_every_sequence_of_each_epoch_exactly_once(tmp_path, tok_json, new_world):
    make, expected = _resize_setup(tmp_path, tok_json)
    assert len(make(0, 1).pieces) >= 8  # pieces, not only whole shards, are handed over
    old = [make(r, 2) for r in range(2)]
    consumed = _consume(old[0], 7) + _consume(old[1], 12)  # mid-window on both ranks
    states = redistribute([s.state_dict() for s in old], new_world, old[0].plan_length)
    handed = []  # sequences each new rank finishes for the old ranks before its own plan
    for rank, state in enumerate(states):
        stream = make(rank, new_world)
        stream.load_state_dict(state)
        mine = _consume(stream, until_epoch=2)
        handed.append(sum(1 for e, _ in mine if e == 0))
        consumed += mine
    _assert_exactly_once(consumed, expected)
    print(f"2 -> {new_world} workers: rest of epoch 0 per new worker {handed}")
    assert min(handed) > 0 and max(handed) <= 2 * min(handed)  # shared out, not left to a few


def test_two_resizes_in_a_row_and_a_resume_inside_a_handed_over_plan(tmp_path, tok_json):
    make, expected = _resize_setup(tmp_path, tok_json)
    old = [make(r, 2) for r in range(2)]
    consumed = _consume(old[0], 9) + _consume(old[1], 9)
    three = []
    for rank, state in enumerate(redistribute([s.state_dict() for s in old], 3, old[0].plan_length)):
        three.append(make(rank, 3))
        three[-1].load_state_dict(state)
    assert three[0].position.owner == [0, 2] and all(t.position.owner is not None for t in three)
    consumed += _consume(three[0], 4) + _consume(three[1], 4) + _consume(three[2], 4)
    two_states = redistribute([s.state_dict() for s in three], 2, old[0].plan_length)
    # a resume inside the handed-over plan continues it exactly
    a = make(0, 2)
    a.load_state_dict(two_states[0])
    straight = _consume(a, 30)
    b = make(0, 2)
    b.load_state_dict(two_states[0])
    head = _consume(b, 11)
    c = make(0, 2)
    c.load_state_dict(b.state_dict())
    assert head + _consume(c, 19) == straight
    for rank, state in enumerate(two_states):
        stream = make(rank, 2)
        stream.load_state_dict(state)
        consumed += _consume(stream, until_epoch=2)
    _assert_exactly_once(consumed, expected)
