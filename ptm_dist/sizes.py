"""The model registry's table: families and their named sizes, without torch or transformers.

    SIZES["gpt2"]["tiny"]  # Size(hidden=128, layers=4, heads=4)

The job schema validates ``model.family`` and ``model.size`` against this table, so checking a
job imports neither torch nor transformers; ptm_dist.models turns an entry into a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int | None = None  # llama grouped-query attention
    intermediate: int | None = None  # defaults to 4 * hidden


# The debug sizes stay well under 1M parameters (with a small vocabulary) for tests.
SIZES: dict[str, dict[str, Size]] = {
    "gpt2": {
        "debug": Size(32, 2, 2),
        "tiny": Size(128, 4, 4),
        "124m": Size(768, 12, 12),
        "350m": Size(1024, 24, 16),
        "1b": Size(2048, 24, 16),
    },
    "llama": {
        "debug": Size(32, 2, 2, kv_heads=1, intermediate=64),
        "tiny": Size(128, 4, 4, kv_heads=2, intermediate=352),
        "124m": Size(768, 12, 12, kv_heads=4, intermediate=2048),
        "1b": Size(2048, 16, 32, kv_heads=8, intermediate=8192),
    },
    "bert": {
        "debug": Size(32, 2, 2),
        "tiny": Size(128, 4, 4),
        "124m": Size(768, 12, 12),
        "350m": Size(1024, 24, 16),
    },
}

CAUSAL_FAMILIES = ("gpt2", "llama")

# Named sizes for any other architecture transformers knows (qwen2, mistral, gemma, ...),
# written with the standard config names; model.config sets any field on top.
GENERIC_SIZES: dict[str, Size] = SIZES["llama"]
