"""ptm_dist.finetune.sweep without running a sweep: a missing optional search package is a
one-line error."""

from __future__ import annotations

import pytest

from ptm_dist.config import ConfigError, load


def test_optuna_missing_is_a_one_line_error():
    pytest.importorskip("ray.tune.search.optuna")
    try:
        import optuna  # noqa: F401
    except ImportError:
        from ptm_dist.finetune.sweep import _search

        with pytest.raises(ConfigError, match="needs the optuna package: pip install optuna"):
            _search(load(None, ["tune.search=optuna"]))
    else:
        pytest.skip("optuna is installed")
