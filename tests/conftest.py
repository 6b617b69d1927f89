"""Shared fixtures: one local Ray instance per session, a session cache for the built-in corpus
and tokenizer, and debug-size jobs."""

from __future__ import annotations

import json
import os

import pytest

from ptm_dist.config import JobConfig, load

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ptm-cache")
    os.environ["PTM_DIST_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(cache_dir):
    import ray

    if not ray.is_initialized():
        from ptm_dist.train.pretrain import worker_env_vars

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env_vars()})
    yield ray
    ray.shutdown()


DEBUG_OVERRIDES = [
    "model.size=debug",
    "data.seq_len=32",
    "data.tokenizer.vocab_size=512",
    "train.micro_batch=4",
    "train.max_steps=12",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=6",
    "train.ckpt_every=6",
    "train.eval_sequences=16",
    "train.precision=fp32",
]


def debug_job(tmp_path, *overrides: str) -> JobConfig:
    """A debug-size job writing under tmp_path; later overrides win."""
    return load(None, [*DEBUG_OVERRIDES, f"run.storage={tmp_path}", *overrides])


def read_lines(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
