"""`ptm submit` and `ptm jobs`: send a job file to a Ray cluster through the Ray Jobs API.

    job_id = submit("jobs/gpt2-124m.yaml", "http://127.0.0.1:8265", ["train.lr=3e-4"])

The job runs ``python -m ptm_dist.cli <command> job.yaml`` on the cluster. Its runtime
environment carries the resolved job file (overrides applied and validated here, before
anything is sent) and this ptm_dist package, so the cluster runs the code you submitted from.
The Ray token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) is sent by Ray's client; keep the Jobs
API on localhost and reach it through `ray dashboard`, an SSH tunnel or `kubectl port-forward`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from ptm_dist import storage
from ptm_dist.config import load
from ptm_dist.errors import ConfigError, SubmitError
from ptm_dist.launch import WORKER_ENV, send_cluster_token_if_available

# Object-store settings a job's workers need to reach the same storage as the submitting
# machine (S3, and S3-compatible stores such as MinIO or R2 through AWS_ENDPOINT_URL). Forwarded
# in the job's runtime environment when set here; never written to the run directory or logs.
STORAGE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def storage_env() -> dict[str, str]:
    """The STORAGE_ENV variables set in this process."""
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}


SUBMITTABLE = ("pretrain", "prepare", "bench", "finetune", "tune", "pipeline")  # commands a cluster job may run
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None):
    """A JobSubmissionClient, with unreachable addresses and rejected tokens as one-line errors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    send_cluster_token_if_available()
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SubmitError(
            f"the Ray cluster at {address} rejected the authentication token "
            "(set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token)"
        ) from None
    except (ConnectionError, OSError) as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _call(fn, address: str | None, *args, **kwargs):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise SubmitError(f"the Ray cluster at {resolve_address(address)} rejected the authentication token") from None
    except (ConnectionError, OSError) as e:
        raise SubmitError(f"lost the Ray Jobs API at {resolve_address(address)}: {_first_line(e)}") from None
    except RuntimeError as e:  # the Jobs API answers errors (unknown job id...) as RuntimeError
        raise SubmitError(_first_line(e)) from None


# `ptm jobs stop` (the Jobs API's stop) sends SIGTERM to the driver, then SIGKILL after this many
# seconds (Ray's default: 3). Its job supervisor reads it from the job's runtime environment.
STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"


def stop_wait_s(cfg) -> int:
    """Long enough for the driver to have its workers checkpoint on SIGTERM (train.preempt_grace_s)
    and then shut down."""
    return math.ceil(cfg.train.preempt_grace_s) + 30


def submit(job: str | None, address: str | None, overrides: list[str], command: str = "pretrain") -> str:
    if command not in SUBMITTABLE:
        raise ConfigError(f"--command {command!r} is not available; allowed: {', '.join(SUBMITTABLE)}")
    cfg = load(job, overrides)  # invalid jobs fail here, not on the cluster
    if not storage.is_uri(cfg.run.storage) and not Path(cfg.run.storage).is_absolute():
        raise ConfigError(
            f"run.storage {cfg.run.storage!r} is relative: on a cluster it would land in the job's "
            "temporary directory; use a shared absolute path or a URI such as s3://bucket/runs"
        )
    c = client(address)
    import ptm_dist

    with tempfile.TemporaryDirectory(prefix="ptm-submit-") as tmp:
        (Path(tmp) / "job.yaml").write_text(cfg.to_yaml())
        pkg = Path(tmp) / "ptm_dist"
        shutil.copytree(Path(ptm_dist.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
        job_id = _call(
            c.submit_job, address,
            entrypoint=f"python -m ptm_dist.cli {command} job.yaml",
            runtime_env={"working_dir": tmp, "py_modules": [str(pkg)],
                         "env_vars": {**storage_env(), **WORKER_ENV, "PYTHONUNBUFFERED": "1",
                                      STOP_WAIT: str(stop_wait_s(cfg))}},
            metadata={"ptm_command": command, "run_name": cfg.run.name},
        )
    return job_id


def wait(address: str | None, job_id: str, timeout: float | None = None, poll: float = 2.0) -> str:
    c = client(address)
    deadline = None if timeout is None else time.time() + timeout
    while True:
        status = str(_call(c.get_job_status, address, job_id)).split(".")[-1]
        if status in TERMINAL or (deadline is not None and time.time() > deadline):
            return status
        time.sleep(poll)


def list_jobs(address: str | None) -> list[dict]:
    c = client(address)
    out = []
    for j in _call(c.list_jobs, address):
        out.append({
            "job_id": j.submission_id or j.job_id,
            "status": str(j.status).split(".")[-1],
            "entrypoint": j.entrypoint,
            "start_time": j.start_time,
        })
    return sorted(out, key=lambda j: j["start_time"] or 0)


def status(address: str | None, job_id: str) -> dict:
    info = _call(client(address).get_job_info, address, job_id)
    return {"job_id": job_id, "status": str(info.status).split(".")[-1], "message": info.message}


def logs(address: str | None, job_id: str) -> str:
    return _call(client(address).get_job_logs, address, job_id)


def follow_logs(address: str | None, job_id: str):
    """Yield log chunks as the job writes them, until it ends."""
    import asyncio

    c = client(address)
    loop = asyncio.new_event_loop()
    try:
        agen = c.tail_job_logs(job_id)
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(address: str | None, job_id: str) -> bool:
    return bool(_call(client(address).stop_job, address, job_id))
