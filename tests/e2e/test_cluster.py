"""A real two-node Ray cluster on this machine (`ray start` head + worker, token auth on),
driven only through the CLI a user types: ptm submit, ptm jobs.

The worker node is a machine of its own as far as files go: its `ray start` runs in its own
mount namespace with empty tmpfs mounts over the head's Ray temp directory, the test session's
temporary directories (where the driver's ptm cache and corpora live), ~/.cache and ~/.ray, and
with its own HOME and temp directory. The nodes share only the run storage (a directory outside
those) and the installed code, as nodes built from one image and mounting one filesystem do.
The worker node is handed the cluster token in RAY_AUTH_TOKEN (its ~/.ray is hidden)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from data_helpers import _shards, plan_epoch_ids

from ptm_dist import checkpoint as ck
from ptm_dist import storage as st
from ptm_dist.config import load
from ptm_dist.data.idlog import read_sequence_log
from ptm_dist.submit import STORAGE_ENV

BIN = str(Path(sys.executable).parent)


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict, hide: list[str] = ()) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops this cluster only
    (`ray stop` would stop every Ray on the machine). ``hide``: directories the node must not
    see; it then runs in its own mount namespace with an empty tmpfs over each."""
    agent, grpc, rt_env, metrics = _ports(4)
    cmd = [f"{BIN}/ray", "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=3",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}", *args]
    if hide:
        mounts = " && ".join(f"mount -t tmpfs ptm-hidden {shlex.quote(d)}" for d in hide)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {shlex.join(cmd)}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def ptm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptm_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


GCS: dict[str, str] = {}  # the cluster's GCS address, for `ray` commands
NODE: dict = {}  # what starting another worker node takes: its environment and the directories it hides
# Each node offers one of these: a job asking for it per worker gets one worker per node.
SLOT = "ptm_slot"


def _start_worker_node() -> tuple[subprocess.Popen, str]:
    """Another worker node of the module's cluster, a machine of its own as far as files go:
    (its `ray start` process, its temp directory)."""
    # Its own temp dir and HOME, as on a separate machine (two nodes sharing one
    # runtime_resources directory also unpack and garbage-collect the job's package under
    # each other's feet), and the head's files hidden.
    worker_tmp = tempfile.mkdtemp(prefix="rayw-", dir="/tmp")
    home = Path.home()
    worker_env = {k: v for k, v in NODE["env"].items() if k != "PTM_DIST_CACHE"}
    worker_env.update(HOME=f"{worker_tmp}/home", RAY_AUTH_TOKEN=(home / ".ray" / "auth_token").read_text().strip())
    # DeepSpeed's CPU comm op, built once per machine (30 s to 2 minutes): the node reads a copy
    # of this environment's build, as an image would carry it, instead of building it again.
    shutil.copytree(NODE["comm_op"], f"{worker_tmp}/torch_extensions")
    worker_env["TORCH_EXTENSIONS_DIR"] = f"{worker_tmp}/torch_extensions"
    proc = _ray_start([f"--address={GCS['address']}", f"--temp-dir={worker_tmp}", f"--resources={{\"{SLOT}\": 1}}"],
                      worker_env, hide=[d for d in NODE["hidden"] if Path(d).is_dir()])
    return proc, worker_tmp


def _comm_op_build() -> str:
    """The directory holding this Python environment's build of DeepSpeed's CPU comm op (built
    here if no earlier test built it). A build records the paths of the DeepSpeed it was made
    from: a node given another environment's build (~/.cache/torch_extensions as a whole, which
    holds every checkout's) rebuilt it, 30 s alone on the 2-core machine, once per node."""
    from ptm_dist.dist import use_environment_extensions_dir

    path = use_environment_extensions_dir()
    if not os.path.isdir(os.path.join(path, "deepspeed_shm_comm")):
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    return path


def _wait_for_nodes(n: int, exactly: bool = False) -> None:
    """Until the cluster has ``n`` live nodes (or more, unless ``exactly``)."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run([f"{BIN}/ray", "status", f"--address={GCS['address']}"], capture_output=True,
                             text=True, env=NODE["env"], check=False).stdout
        active = out.split("Pending:")[0]
        if active.count("node_") == n or (active.count("node_") > n and not exactly):
            return
        assert time.time() < deadline, f"the cluster did not reach {n} nodes:\n{out}"
        time.sleep(2)


def _stop_node(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop_nodes(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every node's `ray start`, then SIGKILL to those still running ``grace_s``
    seconds later (one deadline for all: each took 10-30 s to end on SIGTERM, so waiting on
    them in turn added up; the fixture's teardown took 32 s that way)."""
    for p in procs:
        _stop_node(p)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _stop_node(p, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    gcs, dash = _ports(2)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}  # what cluster/ sets: token authentication on every node
    env.pop("RAY_ADDRESS", None)
    # The nodes know nothing of the S3 server: jobs reach it through what `ptm submit` forwards.
    for key in STORAGE_ENV:
        env.pop(key, None)
    GCS["address"] = f"127.0.0.1:{gcs}"
    home = Path.home()
    hidden = [str(tmp_path_factory.getbasetemp().parent), "/tmp/ray", str(home / ".cache"), str(home / ".ray")]
    NODE.update(env=env, comm_op=_comm_op_build(), hidden=hidden)
    # A worker group that cannot start (a node gone but not yet declared dead) is given up after
    # this long and the next size tried: 30 s instead of Ray Train's 60 (the controller runs here).
    head = _ray_start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dash}", f"--resources={{\"{SLOT}\": 1}}"],
                      {**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"})
    procs = [head]
    temps = []
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while ptm("jobs", "list", "--address", address).returncode != 0:
            assert time.time() < deadline, "the head node did not come up"
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        proc, worker_tmp = _start_worker_node()
        procs.append(proc)
        temps.append(worker_tmp)
        _wait_for_nodes(2)
        yield address
    finally:
        _stop_nodes(procs, grace_s=10)  # this test cluster is done with
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


@pytest.fixture(scope="module")
def shared():
    """The run storage both nodes see: a directory outside everything the worker node hides."""
    path = Path(tempfile.mkdtemp(prefix="ptm-shared-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


DEBUG = ["model.size=debug", "data.seq_len=32", "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3",
         "train.micro_batch=4", "scaling.placement=spread"]


def submit_job(cluster: str, sets: list[str]) -> str:
    """`ptm submit` with these overrides; its job id."""
    proc = ptm("submit", "--address", cluster, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1].removeprefix("job_id: ")


def metric_lines(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl so far (run storage on the shared directory)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in (path.read_text() if path.exists() else "").splitlines() if ln.strip()]


def submit_and_wait(cluster: str, sets: list[str]) -> tuple[str, str, str]:
    """(job id, final status line, job logs) of a `ptm submit` followed with `ptm jobs`."""
    proc = ptm("submit", "--address", cluster, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("job_id: ")
    job_id = last.removeprefix("job_id: ")
    assert f"ptm jobs logs {job_id} --follow" in proc.stdout
    forwarded = next(ln for ln in proc.stdout.splitlines() if "storage settings forwarded" in ln)
    assert "AWS_ENDPOINT_URL" in forwarded and os.environ["AWS_SECRET_ACCESS_KEY"] not in forwarded.split(":")[1]
    deadline = time.time() + 600
    while True:
        status = ptm("jobs", "status", job_id, "--address", cluster)
        assert status.returncode == 0, status.stderr
        if any(s in status.stdout for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        assert time.time() < deadline, "job did not finish in 10 minutes"
        time.sleep(3)
    return job_id, status.stdout, ptm("jobs", "logs", job_id, "--address", cluster).stdout


def test_submit_spread_job_and_follow_it_to_success(cluster):
    """Run storage on the S3 server, which the nodes reach only through the settings `ptm submit`
    forwards. The driver (on the head node) builds the built-in corpus in its own cache, which
    the worker node cannot see; it stages the shards into the run storage, and the worker on the
    other node trains from there."""
    storage = "s3://ptm/cluster-runs"
    job_id, status, logs = submit_and_wait(cluster, [*DEBUG, "run.name=cluster-debug", f"run.storage={storage}"])
    assert "SUCCEEDED" in status, logs[-3000:]
    assert f"run_dir: {storage}/cluster-debug" in logs
    fs, root = st.resolve(f"{storage}/.ptm-cache")
    staged = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    if i.type == pafs.FileType.File)
    assert staged and all(p.startswith(("train-", "val-")) and p.endswith(".jsonl") for p in staged), staged
    assert job_id in ptm("jobs", "list", "--address", cluster).stdout
    ckpt = ck.latest_complete_checkpoint(f"{storage}/cluster-debug")
    assert ckpt is not None and ckpt.endswith("checkpoint_00000006")
    nodes = ck.read_meta(ckpt)["nodes"]
    assert len(nodes) == 2 and nodes[0] != nodes[1], nodes  # spread: one worker per node


def test_ptm_jobs_stop_checkpoints_the_step_the_run_was_stopped_at(cluster, shared):
    """`ptm jobs stop` (Ray's Jobs API: SIGTERM to the driver, SIGKILL after
    RAY_JOB_STOP_WAIT_TIME_S, which `ptm submit` sets from train.preempt_grace_s) on a running
    job: the workers on both nodes write a complete checkpoint at the step boundary after the
    request, far from any periodic checkpoint, and the driver says where the run stopped."""
    storage, name = shared / "runs", "stopped"
    sets = [*DEBUG, "train.max_steps=3000", "train.ckpt_every=1000", "train.eval_every=1000",
            f"run.name={name}", f"run.storage={storage}", "tracking.wandb=disabled"]
    job_id = submit_job(cluster, sets)

    def steps() -> list[int]:
        return [m["step"] for m in metric_lines(storage / name) if "loss" in m]

    deadline = time.time() + 400
    while not [s for s in steps() if s >= 20]:
        assert time.time() < deadline, "the job never reached step 20: " + ptm(
            "jobs", "logs", job_id, "--address", cluster).stdout[-3000:]
        time.sleep(0.5)
    seen = max(steps())
    stopped = ptm("jobs", "stop", job_id, "--address", cluster)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout, stopped.stdout + stopped.stderr
    while "STOPPED" not in (status := ptm("jobs", "status", job_id, "--address", cluster).stdout):
        assert time.time() < deadline and not any(s in status for s in ("SUCCEEDED", "FAILED")), status
        time.sleep(1)
    logs = ptm("jobs", "logs", job_id, "--address", cluster).stdout
    newest = ck.latest_complete_checkpoint(str(storage / name))
    assert newest is not None, logs[-3000:]
    step = ck.read_meta(newest)["step"]
    line = next((ln for ln in logs.splitlines() if ln.startswith("ptm pretrain: stopped by SIGTERM")), None)
    print(f"ptm jobs stop once step {seen} was logged: {line}")
    assert seen <= step < 1000 and len(ck.read_meta(newest)["nodes"]) == 2
    assert line == (f"ptm pretrain: stopped by SIGTERM at step {step} of 3000: {newest} is complete; "
                    f"the same command continues from step {step}"), logs[-3000:]


def test_data_only_on_the_head_node_fails_in_preflight_naming_path_and_node(cluster, shared, tmp_path):
    """A corpus in the head node's local temporary directory: the driver reads it (and trains
    the tokenizer on it), the preflight task on the worker node cannot, and the job stops with
    one line naming the shard and that node before any Ray Train worker starts."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        (corpus / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{name} says hello world {i} " * 20}) + "\n" for i in range(150)))
    storage = shared / "runs"
    _, status, logs = submit_and_wait(cluster, [*DEBUG, "run.name=head-data", f"run.storage={storage}",
                                                f"data.sources=[{{path: {corpus}}}]", "data.val_fraction=0.34"])
    assert "FAILED" in status, logs[-3000:]
    last = next(ln for ln in reversed(logs.splitlines()) if ln.startswith("ptm pretrain: error:"))
    print(last)
    assert re.fullmatch(rf"ptm pretrain: error: data: {re.escape(str(corpus))}/a\.jsonl cannot be read from node "
                        r"[0-9a-f]{12} \(.+\); workers run on every node, .*", last), last
    assert not (storage / "head-data" / "metrics.jsonl").exists()  # no worker trained


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


def test_an_elastic_run_loses_a_node_goes_on_with_two_and_grows_back_to_three(cluster, shared, tmp_path):
    """Issue 15's elastic range on three nodes: a third worker node joins; `ptm pretrain` with
    scaling.num_workers [2, 3] (one worker per node, through a resource each node offers once)
    starts on all three. Once it has a complete checkpoint, every process of the third node is
    SIGKILLed (a machine gone, no notice): the run resumes from its newest complete checkpoint
    on the two nodes left, grad_accum 2 -> 3 keeping the global batch of 24. Once it has written
    a checkpoint on two, a fresh node joins and Ray Train's elastic policy (scaling.resize_check_s
    5) grows the run back to three from its newest checkpoint. Every sequence of the first five
    epochs is consumed exactly once across both changes.

    The driver runs here with RAY_ADDRESS (as on a login node), so that a fault point can hold
    the workers at step 40 until the test has seen the grow: the run cannot end on two workers
    before capacity returns, however slow this machine is."""
    storage, name = shared / "runs", "elastic3"
    run_dir = storage / name
    release = shared / "elastic-release"  # where every node's workers can see it
    sets = [*DEBUG, f"data.sources=[{{path: {shared / 'elastic-corpus'}}}]", "data.val_fraction=0.2",
            "data.shuffle_window=8", "data.seq_len=16", "data.piece_bytes=2000", "data.log_sequence_ids=true",
            "scaling.num_workers=[2, 3]", f"scaling.resources_per_worker={{CPU: 1, {SLOT}: 1}}",
            "scaling.resize_check_s=5", "train.grad_accum=2", "train.max_steps=45", "train.ckpt_every=5",
            "train.eval_every=1000", "train.keep_ckpts=20", "train.max_failures=3", f"run.name={name}",
            f"run.storage={storage}", "tracking.wandb=disabled"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": GCS["address"],
           "PTM_FAULT": "train.step@40:wait", "PTM_FAULT_RELEASE": str(release)}
    nodes = [_start_worker_node()]
    driver = None
    out = tmp_path / "driver.log"
    try:
        _wait_for_nodes(3)
        (shared / "elastic-corpus").mkdir()
        _shards(shared / "elastic-corpus")
        with open(out, "w") as log:
            driver = subprocess.Popen([sys.executable, "-m", "ptm_dist.cli", "pretrain",
                                       *[a for x in sets for a in ("--set", x)]],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600

        def until(what: str, ready) -> float:
            while not ready():
                assert driver.poll() is None, f"the driver exited before {what}:\n{out.read_text()[-3000:]}"
                assert time.time() < deadline, f"no {what} in time:\n{out.read_text()[-3000:]}"
                time.sleep(0.5)
            return time.time()

        def resizes() -> list[dict]:
            return [m for m in metric_lines(run_dir) if "resize_from_workers" in m]

        def complete(step: int) -> bool:
            return (run_dir / ck.checkpoint_name(step) / ck.MARKER).exists()

        until("checkpoint at step 5", lambda: complete(5) and [m for m in metric_lines(run_dir)
                                                              if m.get("step", 0) >= 7])
        assert ck.read_meta(str(run_dir / ck.checkpoint_name(5)))["world_size"] == 3
        killed = time.time()
        third, third_tmp = nodes[0]
        _stop_node(third, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", third_tmp], check=False)  # what the process group missed
        shrunk = until("resize to 2 workers", lambda: resizes())
        step = resizes()[0]["step"]
        until("checkpoint on 2 workers", lambda: complete(step + 5))
        nodes.append(_start_worker_node())
        joined = time.time()
        grown = until("resize back to 3 workers", lambda: len(resizes()) >= 2)
        release.write_text("go")
        assert driver.wait(timeout=max(1, deadline - time.time())) == 0, out.read_text()[-3000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        # The node that joined stops cleanly (SIGTERM first): Ray knows at once it is gone.
        _stop_nodes([proc for proc, _ in nodes], grace_s=30)
        for _, tmp in nodes:
            shutil.rmtree(tmp, ignore_errors=True)
        _wait_for_nodes(2, exactly=True)  # the next test finds the cluster as the fixture made it
    text = out.read_text()
    print(text[-1500:])
    lines = metric_lines(run_dir)
    changes = [(m["step"], m["resize_from_workers"], m["workers"], m["grad_accum"]) for m in resizes()]
    print(f"resizes {changes}; the shrink {shrunk - killed:.0f} s after the kill, the grow {grown - joined:.0f} s "
          "after the new node's `ray start`")
    (down, up) = changes
    assert down[1:] == (3, 2, 3) and up[1:] == (2, 3, 2) and 5 <= down[0] < up[0] <= 40
    resumed = [m["step"] for m in lines if "resumed_from" in m]
    assert resumed == [down[0], up[0]]
    worlds = {s: ck.read_meta(str(run_dir / ck.checkpoint_name(s)))["world_size"]
              for s in range(5, 46, 5) if complete(s)}
    print("world size of each complete checkpoint:", worlds)
    assert worlds == {s: 3 if s <= down[0] or s > up[0] else 2 for s in range(5, 46, 5)}
    final = ck.read_meta(str(run_dir / ck.checkpoint_name(45)))
    assert final["batch"] == {"global": 24, "given": [4, 2]}
    assert [(r["from"], r["to"]) for r in final["resizes"]] == [(3, 2), (2, 3)]
    assert "2 workers of scaling.num_workers [2, 3] (train.grad_accum 3 keeps the global batch of 24" in text

    seqs = read_sequence_log(str(run_dir))
    per_step: dict[int, int] = {}
    for rank_lines in seqs.values():
        for ln in rank_lines:
            per_step[ln["step"]] = per_step.get(ln["step"], 0) + len(ln["seqs"])
    assert per_step == {s: 24 for s in range(1, 46)}  # the global batch on 3, 2 and 3 workers
    consumed = [tuple(x) for rank_lines in seqs.values() for ln in rank_lines for x in ln["seqs"]]
    for epoch, ids in plan_epoch_ids(load(None, sets), epochs=5).items():
        got = sorted(i for e, i in consumed if e == epoch)
        print(f"epoch {epoch}: {len(got)} consumed, {len(set(got))} distinct, {len(ids)} in the epoch")
        assert got == ids


def test_a_drained_node_checkpoints_at_once_and_the_run_goes_on_without_it(cluster, shared):
    """`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on the worker node (what Ray's
    autoscaler and KubeRay do before a node goes) while a spread job trains on both nodes: the
    workers write a complete checkpoint at the step boundary after the notice (far from any
    periodic one), and once the deadline passes Ray Train restarts the workers on the head node
    from it, and the job succeeds there. Last in this file: the drained node takes no more work."""
    storage, name = shared / "runs", "drained"
    sets = [*DEBUG, "train.max_steps=3000", "train.ckpt_every=1000", "train.eval_every=1000",
            "train.keep_ckpts=10", f"run.name={name}", f"run.storage={storage}", "tracking.wandb=disabled"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    code = (f"import json, ray; ray.init(address={GCS['address']!r}, logging_level='ERROR'); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "and 'node:__internal_head__' not in n['Resources']]))")
    probe = subprocess.run([sys.executable, "-c", code],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr[-2000:]
    (worker_node,) = json.loads(probe.stdout.strip().splitlines()[-1])
    job_id = submit_job(cluster, sets)

    def lines() -> list[dict]:
        return metric_lines(storage / name)

    deadline = time.time() + 400
    while not [m for m in lines() if m.get("step", 0) >= 20 and "loss" in m]:
        assert time.time() < deadline, "the job never reached step 20"
        time.sleep(0.5)
    drain = subprocess.run([f"{BIN}/ray", "drain-node", f"--address={GCS['address']}", f"--node-id={worker_node}",
                            "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=ptm test",
                            "--deadline-remaining-seconds=20"], capture_output=True, text=True, env=env, timeout=60,
                           check=False)
    assert drain.returncode == 0, drain.stdout + drain.stderr
    while "SUCCEEDED" not in (status := ptm("jobs", "status", job_id, "--address", cluster).stdout):
        assert time.time() < deadline and not any(s in status for s in ("STOPPED", "FAILED")), \
            status + ptm("jobs", "logs", job_id, "--address", cluster).stdout[-3000:]
        time.sleep(2)
    logs = ptm("jobs", "logs", job_id, "--address", cluster).stdout
    notice = next((ln for ln in logs.splitlines() if "node drain notice at step" in ln), None)
    assert notice is not None, logs[-3000:]
    step = int(re.search(r"node drain notice at step (\d+)", notice).group(1))
    meta = ck.read_meta(f"{storage}/{name}/checkpoint_{step:08d}")
    resumed = [m["step"] for m in lines() if "resumed_from" in m]
    final = ck.read_meta(ck.latest_complete_checkpoint(str(storage / name)))
    print(f"drain notice: {notice.strip()}; resumed from {resumed}; final nodes {final['nodes']}")
    assert step % 1000 and len(set(meta["nodes"])) == 2 and worker_node in meta["nodes"]
    assert resumed and resumed[0] >= step and final["step"] == 3000
    assert worker_node not in final["nodes"]  # the rest of the run on the head node
