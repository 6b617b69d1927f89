"""The sweep's search space (``tune.space``), parsed and checked without Ray.

A job's ``tune.space`` maps dotted job keys to one distribution each::

    tune:
      space:
        finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}   # low, high (low > 0)
        finetune.batch_size: {choice: [16, 32]}        # one of the values, sampled
        finetune.weight_decay: {uniform: [0.0, 0.1]}   # low, high
        run.seed: {randint: [0, 1000]}                 # integers, low included, high excluded
        finetune.warmup_ratio: {grid: [0.0, 0.1]}      # every value, crossed with num_samples

Nested mappings are accepted too (``{finetune: {lr: {loguniform: [...]}}}``), which is what
``--set tune.space.finetune.lr='{loguniform: [1e-4, 1e-2]}'`` produces.
"""

from __future__ import annotations

from typing import Any

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
# Job keys a trial may change: what fine-tuning does with the start model, not the task or
# the start model itself (those are fixed for the sweep so that trials are comparable).
TUNABLE = (
    "finetune.lr", "finetune.batch_size", "finetune.weight_decay", "finetune.warmup_ratio",
    "finetune.min_lr_ratio", "finetune.grad_clip", "run.seed",
)


class SpaceError(ValueError):
    """A search-space entry is malformed; the message names the key."""


def _is_spec(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in DISTRIBUTIONS


def flatten(space: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(space, dict):
        raise SpaceError(f"tune.space{'.' + prefix if prefix else ''}: expected a mapping of job keys "
                         f"to distributions, got {space!r}")
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if _is_spec(v) or not isinstance(v, dict) or not v:
            out[key] = v
        elif len(v) == 1 and isinstance(next(iter(v.values())), list):
            out[key] = v  # {'logunifrm': [...]}: a misspelt distribution, reported below
        else:
            out.update(flatten(v, key))
    return out


def _number(key: str, v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpaceError(f"tune.space.{key}: {what} must be a number, got {v!r}")
    return float(v)


def parse_space(space: Any) -> dict[str, dict[str, list]]:
    """Check ``space`` and return it flat: {dotted key: {distribution: [args]}}."""
    out: dict[str, dict[str, list]] = {}
    for key, spec in flatten(space).items():
        if key not in TUNABLE:
            raise SpaceError(f"tune.space.{key}: cannot be swept; allowed keys: {', '.join(TUNABLE)}")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SpaceError(f"tune.space.{key}: expected one distribution such as "
                             f"{{loguniform: [1e-4, 1e-2]}}, got {spec!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        dist, args = next(iter(spec.items()))
        if dist not in DISTRIBUTIONS:
            raise SpaceError(f"tune.space.{key}: unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise SpaceError(f"tune.space.{key}: {dist} needs a non-empty list, got {args!r}")
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2:
                raise SpaceError(f"tune.space.{key}: {dist} needs [low, high], got {args!r}")
            lo, hi = (_number(key, a, f"{dist} bound") for a in args)
            if not lo < hi:
                raise SpaceError(f"tune.space.{key}: {dist} needs low < high, got {args!r}")
            if dist == "loguniform" and lo <= 0:
                raise SpaceError(f"tune.space.{key}: loguniform needs low > 0, got {args!r}")
            if dist == "randint" and not all(float(a).is_integer() for a in args):
                raise SpaceError(f"tune.space.{key}: randint needs integer bounds, got {args!r}")
            args = [int(a) for a in args] if dist == "randint" else [lo, hi]
        out[key] = {dist: list(args)}
    if not out:
        raise SpaceError("tune.space: empty; name at least one job key to sweep, e.g. finetune.lr")
    return out


def sample_values(parsed: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    """Concrete assignments covering every entry's extremes and every listed value, so that the
    job can be validated with them before any trial starts."""
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    singles: list[dict[str, Any]] = []
    for key, spec in parsed.items():
        dist, args = next(iter(spec.items()))
        if dist in ("choice", "grid"):
            singles += [{key: a} for a in args]
            lows[key], highs[key] = args[0], args[-1]
        elif dist == "randint":
            lows[key], highs[key] = args[0], args[1] - 1
        else:
            lows[key], highs[key] = args
    return [lows, highs, *singles]
