"""ptm_dist.data.pipeline's source mixing in process (use_ray=False): epoch slots follow the
source weights, a weighted and shuffled stream resumes exactly, the bounded shuffle permutes
within its window, and the stream's memory does not grow with the corpus."""

from __future__ import annotations

import json
from collections import Counter

from data_helpers import _eos, _epoch, _epoch_iter, _shards, replace_uri

from ptm_dist.data.packing import split_id
from ptm_dist.data.pipeline import SequenceStream, epoch_slots


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
