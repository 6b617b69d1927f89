"""`ptm bench train` on CPU with a debug model: the structure and internal consistency of what it
prints (speed is for the benchmark itself, not for tests)."""

from __future__ import annotations

import pytest
from conftest import debug_job

from ptm_dist.bench import bench_train, format_report


def test_bench_train_reports_consistent_figures(tmp_path, ray_session):
    cfg = debug_job(tmp_path)
    r = bench_train(cfg, steps=4, warmup=1, search_micro_batch=True)
    for key in ("system_tokens_per_s", "baseline_tokens_per_s", "ratio", "system_breakdown_s",
                "system_peak_mem_bytes", "baseline_peak_mem_bytes", "plan_estimate_bytes"):
        assert key in r
    for key in ("strong_baseline_tokens_per_s", "strong_baseline_breakdown_s", "strong_baseline_peak_mem_bytes",
                "module_ratio", "ratio_same_module"):
        assert key in r
    fastest = max(r["baseline_tokens_per_s"], r["strong_baseline_tokens_per_s"])
    assert r["ratio"] == pytest.approx(r["system_tokens_per_s"] / fastest)
    assert r["ratio_same_module"] == pytest.approx(r["system_tokens_per_s"] / r["baseline_tokens_per_s"])
    assert r["module_ratio"] == pytest.approx(r["baseline_tokens_per_s"] / r["strong_baseline_tokens_per_s"])
    # Both plain loops start from the same weights and train on the same batches with the same
    # hyperparameters (each with its own optimizer groups, schedule and loss code): after 5 steps
    # their losses agree to float rounding.
    assert r["strong_baseline_last_loss"] == pytest.approx(r["baseline_last_loss"], abs=1e-4)
    strong = r["strong_baseline_breakdown_s"]
    timed = strong["forward_s"] + strong["backward_s"] + strong["optimizer_s"]
    assert 0.5 * strong["step_s"] < timed <= strong["step_s"] * 1.01
    tokens_per_step = cfg.train.micro_batch * cfg.data.seq_len * cfg.scaling.num_workers
    sb = r["system_breakdown_s"]
    assert r["system_tokens_per_s"] == pytest.approx(tokens_per_step / sb["step_s"], rel=0.05)
    parts = sb["data_wait_s"] + sb["forward_s"] + sb["backward_s"] + sb["optimizer_s"]
    assert 0.5 * sb["step_s"] < parts <= sb["step_s"] * 1.01
    assert r["system_peak_mem_bytes"] > 0 and r["baseline_peak_mem_bytes"] > 0
    assert [m["micro_batch"] for m in r["micro_batch_search"]] == [1, 2, 4, 8, 16]
    assert r["best_micro_batch"] in (1, 2, 4, 8, 16)
    assert "mfu" not in r  # CPU: no datasheet peak
    text = format_report(r)
    assert "ratio (system / faster baseline on the same CPU)" in text
    assert "framework: system / plain loop over the same module" in text
    assert "model module: Hugging Face module / compact module" in text
    assert not list(tmp_path.glob("bench-*"))  # the bench leaves no run directory behind


def test_bench_data_reports_consistent_figures(tmp_path, ray_session):
    from ptm_dist.bench import bench_data

    r = bench_data(debug_job(tmp_path), max_shards=2, scale=2, memory=True)
    assert r["shards"] == 2 and r["scale"] == 2 and r["documents"] > 0
    assert r["peak_mem_bytes"] > 0 and r["peak_mem_bytes_1x"] > 0 and r["memory_scope"] == "driver + Ray task workers"
    assert r["memory_growth"] == pytest.approx(r["peak_mem_bytes"] / r["peak_mem_bytes_1x"] - 1)
    assert r["raw_tokens_per_s"] == pytest.approx(r["raw_tokens"] / r["raw_seconds"])
    assert r["pipeline_tokens_per_s"] == pytest.approx(r["pipeline_tokens"] / r["pipeline_seconds"])
    assert r["ratio"] == pytest.approx(r["pipeline_tokens_per_s"] / r["raw_tokens_per_s"])
    # Packing drops at most one partial sequence per shard, and adds one EOS per document.
    assert r["raw_tokens"] - 4 * 32 <= r["pipeline_tokens"] <= r["raw_tokens"] + r["documents"]


def test_bench_job_trains_the_strong_baseline_on_the_systems_batches(tmp_path, ray_session):
    """`ptm bench job` on the debug job: the system (a real `pretrain` on the shared Ray) and the
    strong trainer (compact GPT-2, its own AdamW groups, schedule, clipping and loss code) start
    from the same weights and train on the same global batches, so every logged training loss
    and every held-out loss agree to float rounding (measured: 9.5e-7 and 4.7e-7 at most over 12
    steps; 1e-5 allowed). That is what makes "held-out loss at equal tokens" a fair comparison."""
    from ptm_dist.bench_job import bench_job, format_job_report

    cfg = debug_job(tmp_path, "tracking.wandb=disabled")
    r = bench_job(cfg)
    assert sorted(r["system_eval_loss"]) == sorted(r["strong_eval_loss"]) == [0, 6, 12]
    assert sorted(r["system_loss"]) == sorted(r["strong_loss"]) == list(range(1, 13))
    for step, loss in r["system_eval_loss"].items():
        assert r["strong_eval_loss"][step] == pytest.approx(loss, abs=1e-5), step
    for step, loss in r["system_loss"].items():
        assert r["strong_loss"][step] == pytest.approx(loss, abs=1e-5), step
    assert r["system_eval_loss"][12] < r["system_eval_loss"][0] - 0.1  # it trained
    assert r["eval_loss_difference"] == pytest.approx(r["system_eval_loss"][12] - r["strong_eval_loss"][12])
    assert r["ratio"] == pytest.approx(r["system_tokens_per_s"] / r["strong_tokens_per_s"])
    assert r["tokens"] == 12 * 4 * 32 * 2
    assert 0 < r["system_first_step_s"] < r["system_wall_s"] and 0 < r["strong_data_s"] < r["strong_wall_s"]
    text = format_job_report(r)
    assert "ratio (system / strong tokens/s)" in text and "held-out loss, step 12" in text
    assert not list(tmp_path.iterdir())  # the scratch run directory is elsewhere and gone
