"""A real two-node Ray cluster on this machine (`ray start` head + worker, token auth on),
driven only through the CLI a user types: ptm submit, ptm jobs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ptm_dist import checkpoint as ck

BIN = str(Path(sys.executable).parent)


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops this cluster only
    (`ray stop` would stop every Ray on the machine)."""
    agent, grpc, rt_env, metrics = _ports(4)
    return subprocess.Popen(
        [f"{BIN}/ray", "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=3",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def ptm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptm_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gcs, dash = _ports(2)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}  # what cluster/ sets: token authentication on every node
    env.pop("RAY_ADDRESS", None)
    head = _ray_start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dash}"], env)
    procs = [head]
    worker_tmp = None
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while ptm("jobs", "list", "--address", address).returncode != 0:
            assert time.time() < deadline, "the head node did not come up"
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        # Its own temp dir, as on a separate machine: two nodes sharing one runtime_resources
        # directory unpack and garbage-collect the job's package under each other's feet.
        worker_tmp = tempfile.mkdtemp(prefix="rayw-", dir="/tmp")
        procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", f"--temp-dir={worker_tmp}"], env))
        deadline = time.time() + 120
        while True:
            out = subprocess.run([f"{BIN}/ray", "status", f"--address=127.0.0.1:{gcs}"], capture_output=True,
                                 text=True, env=env, check=False).stdout
            if out.count("node_") >= 2 or "2 node" in out:
                break
            assert time.time() < deadline, f"the worker node did not join:\n{out}"
            time.sleep(2)
        yield address
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if worker_tmp:
            shutil.rmtree(worker_tmp, ignore_errors=True)


def test_submit_spread_job_and_follow_it_to_success(cluster, tmp_path):
    storage = tmp_path / "runs"
    proc = ptm("submit", "--address", cluster, "--set", "model.size=debug", "--set", "data.seq_len=32",
               "--set", "train.max_steps=6", "--set", "train.ckpt_every=3", "--set", "train.eval_every=3",
               "--set", "train.micro_batch=4", "--set", "scaling.placement=spread",
               "--set", "run.name=cluster-debug", "--set", f"run.storage={storage}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("job_id: ")
    job_id = last.removeprefix("job_id: ")
    assert f"ptm jobs logs {job_id} --follow" in proc.stdout
    deadline = time.time() + 600
    while True:
        status = ptm("jobs", "status", job_id, "--address", cluster)
        assert status.returncode == 0, status.stderr
        if any(s in status.stdout for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(3)
    logs = ptm("jobs", "logs", job_id, "--address", cluster).stdout
    assert "SUCCEEDED" in status.stdout, logs[-3000:]
    assert f"run_dir: {storage}/cluster-debug" in logs
    assert job_id in ptm("jobs", "list", "--address", cluster).stdout
    ckpt = ck.latest_complete_checkpoint(str(storage / "cluster-debug"))
    assert ckpt is not None and ckpt.endswith("checkpoint_00000006")
    nodes = ck.read_meta(ckpt)["nodes"]
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes  # spread: one worker per node


def test_unreachable_address_is_one_line():
    (port,) = _ports(1)
    proc = ptm("jobs", "list", "--address", f"http://127.0.0.1:{port}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"ptm jobs: error: cannot reach the Ray Jobs API at http://127.0.0.1:{port}")


def test_a_bad_token_is_rejected_with_one_line(cluster):
    env = {**os.environ, "RAY_AUTH_TOKEN": "not-the-cluster-token-" + "x" * 20}
    proc = ptm("jobs", "list", "--address", cluster, env=env)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ptm jobs: error: the Ray cluster at {cluster} rejected the authentication token "
        "(set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token)")
