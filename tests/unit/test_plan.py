"""ptm_dist.plan: structure and internal consistency of the estimates (not their speed). The
`ptm plan` command in a subprocess: tests/e2e/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptm_dist.config import load
from ptm_dist.plan import GiB, memory_bytes, model_shape, plan

JOBS = Path(__file__).parents[2] / "jobs"


@pytest.fixture(scope="module")
def gpt2():
    return plan(load(JOBS / "gpt2-124m.yaml"), gpus=8, gpu_mem_gb=80, vocab_size=50304)


def test_components_add_up_and_sharding_only_shrinks(gpt2):
    rows = {r["option"]: r for r in gpt2["options"]}
    for r in gpt2["options"]:
        assert r["total_gb"] == pytest.approx(sum(r["bytes"].values()) / GiB)
    states = [sum(rows[k]["bytes"][c] for c in ("params", "grads", "optimizer"))
              for k in ("zero0", "zero1", "zero2", "zero3")]
    assert states == sorted(states, reverse=True) and states[0] > 2 * states[3]
    assert rows["zero2+offload_opt"]["bytes"]["optimizer"] == 0
    assert rows["zero3+offload_all"]["bytes"]["params"] == 0


def test_parameter_count_and_throughput_arithmetic(gpt2):
    assert 120e6 < gpt2["n_params"] < 130e6
    assert gpt2["tokens_per_s"] * gpt2["flops_per_token"] == pytest.approx(0.4 * 989e12 * 8)
    assert gpt2["total_tokens"] == 19000 * 16 * 4 * 1024 * 8
    assert gpt2["wall_hours"] == pytest.approx(gpt2["total_tokens"] / gpt2["tokens_per_s"] / 3600)
    assert gpt2["gpu_hours"] == pytest.approx(gpt2["wall_hours"] * 8)


def test_recommendation_fits_and_prefers_the_lowest_stage(gpt2):
    rec = gpt2["recommended"]
    row = next(r for r in gpt2["options"] if r["option"] == rec["option"])
    assert row["fits"] and row is next(r for r in gpt2["options"] if r["fits"])


def test_a_large_model_on_small_gpus_needs_sharding():
    cfg = load(JOBS / "llama-1b-zero3.yaml", ["train.micro_batch=1"])
    p = plan(cfg, gpus=16, gpu_mem_gb=12, vocab_size=32000)
    rows = {r["option"]: r for r in p["options"]}
    assert not rows["zero0"]["fits"] and p["recommended"]["zero_stage"] >= 1


def test_activation_checkpointing_and_micro_batch_move_activations():
    cfg = load(JOBS / "gpt2-124m.yaml")
    shape = model_shape(cfg, 50304)
    full = memory_bytes(shape, 8, 1, False, False, 16, 1024, "bf16", False)["activations"]
    ckpt = memory_bytes(shape, 8, 1, False, False, 16, 1024, "bf16", True)["activations"]
    half = memory_bytes(shape, 8, 1, False, False, 8, 1024, "bf16", False)["activations"]
    assert ckpt < full / 3 and half == pytest.approx(full / 2)


