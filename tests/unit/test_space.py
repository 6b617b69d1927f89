"""ptm_dist.space: the sweep's search space (tune.space) parsed flat or nested, turned into Ray
Tune domains, and its errors as one line each through the job loader."""

from __future__ import annotations

import pytest

from ptm_dist.config import ConfigError, load
from ptm_dist.finetune.sweep import to_tune
from ptm_dist.space import parse_space


def test_space_parsing_flat_and_nested():
    space = parse_space({
        "finetune.lr": {"loguniform": [1e-4, 1e-2]},
        "finetune": {"batch_size": {"choice": [8, 16]}, "weight_decay": {"uniform": [0, 0.1]}},
        "run.seed": {"randint": [0, 10]},
        "finetune.warmup_ratio": {"grid": [0.0, 0.1]},
    })
    assert space == {
        "finetune.lr": {"loguniform": [1e-4, 1e-2]},
        "finetune.batch_size": {"choice": [8, 16]},
        "finetune.weight_decay": {"uniform": [0.0, 0.1]},
        "run.seed": {"randint": [0, 10]},
        "finetune.warmup_ratio": {"grid": [0.0, 0.1]},
    }
    domains = to_tune(space)
    assert domains["finetune.warmup_ratio"] == {"grid_search": [0.0, 0.1]}
    assert domains["finetune.lr"].lower == 1e-4 and domains["finetune.lr"].upper == 1e-2
    assert domains["finetune.batch_size"].categories == [8, 16]
    # --set with a dotted key under tune.space gives the nested form
    cfg = load(None, ["tune.space.finetune.lr={loguniform: [0.0001, 0.01]}"])
    assert cfg.tune.space == {"finetune.lr": {"loguniform": [0.0001, 0.01]}}


@pytest.mark.parametrize("override, expected", [
    ("tune.space.finetune.lr={logunif: [1e-4, 1e-2]}",
     "tune.space: finetune.lr: unknown distribution 'logunif'; allowed: uniform, loguniform, choice, randint, grid"),
    ("tune.space.finetune.lr={loguniform: [0, 0.1]}", "tune.space: finetune.lr: loguniform needs low > 0"),
    ("tune.space.finetune.lr={uniform: [0.1, 0.01]}", "tune.space: finetune.lr: uniform needs low < high"),
    ("tune.space.finetune.lr={uniform: [0.1]}", "tune.space: finetune.lr: uniform needs [low, high]"),
    ("tune.space.finetune.lr={uniform: [a, 1]}", "tune.space: finetune.lr: uniform bound must be a number"),
    ("tune.space.run.seed={randint: [0, 2.5]}", "tune.space: run.seed: randint needs integer bounds"),
    ("tune.space.finetune.lr={choice: []}", "tune.space: finetune.lr: choice needs a non-empty list"),
    ("tune.space.finetune.lr=0.1", "tune.space: finetune.lr: expected one distribution"),
    ("tune.space.finetune.data={choice: [a.csv]}", "tune.space: finetune.data: cannot be swept; allowed keys:"),
    ("tune.space.finetune.batch_size={choice: [0, 8]}",
     "tune.space: finetune.batch_size: value 0 is not allowed: Input should be greater than or equal to 1"),
    ("tune.space={}", "tune.space: empty"),
    ("tune.scheduler=hyperband", "tune.scheduler = 'hyperband': Input should be 'asha', 'pbt' or 'fifo'"),
    ("tune.metric=acc", "tune.metric = 'acc'"),
])
def test_space_errors_are_one_line(override, expected):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    msg = str(e.value)
    assert "\n" not in msg and expected in msg, msg
