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
def s3_endpoint():
    """A real S3-compatible server (moto, server mode) on localhost with a bucket 'ptm'.

    Started before Ray so that Ray's workers inherit the endpoint and the test credentials."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="ptm")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(cache_dir, s3_endpoint):
    import ray

    if not ray.is_initialized():
        from ptm_dist.train.pretrain import worker_env_vars

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
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
