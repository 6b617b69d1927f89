"""ptm_dist.train.step: the loss-spike detector."""

from __future__ import annotations

from ptm_dist.train.step import SpikeDetector


def test_spike_detector():
    d = SpikeDetector(factor=2.0, patience=3, warmup=5)
    warnings = [d.update(s, v) for s, v in enumerate([5, 5, 4.9, 4.8, 4.8, 4.7, 12, 13, 12, 11, 4.6, 30], 1)]
    fired = [i + 1 for i, w in enumerate(warnings) if w]
    print("spike warnings at steps", fired, "-", next(w for w in warnings if w))
    assert fired == [9] and d.count == 1 and d.mean < 5  # the spike never entered the running mean
    assert SpikeDetector(0.0, 1).update(1, 1e9) is None
