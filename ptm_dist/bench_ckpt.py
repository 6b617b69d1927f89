"""`ptm bench ckpt`: what a checkpoint costs training, with the upload in the foreground and in
the background (``train.ckpt_upload``), measured side by side in one run.

The job runs three times into object storage (``--storage s3://bucket/prefix``, or a moto S3
server this command starts on localhost), each into a scratch run directory deleted afterwards:

    none        one checkpoint, at the end (train.ckpt_every = train.max_steps)
    foreground  a checkpoint every ``every`` steps, training waits for each upload
    background  the same checkpoints, uploaded while training goes on

    training wall = time of the last step's save (its COMPLETE marker's "time") - end of the
                    first step (startup.json): every checkpoint inside the run, none of start-up
    lost per checkpoint = (training wall - training wall of "none") / checkpoints inside the run

With ``repeat`` > 1 the three runs are repeated in turn and the training walls are medians: on
a noisy machine the whole-run difference is within run-to-run noise unless repeated.

The markers also give, per checkpoint, how long rank 0's training loop was held (``pause_s``)
and, in the background, how long the upload itself took (``upload_s``). Evaluations are moved
to the end so that only checkpoints differ between the runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import uuid

from ptm_dist.config import JobConfig
from ptm_dist.errors import ConfigError

MODES = ("none", "foreground", "background")


@contextlib.contextmanager
def moto_server(bucket: str):
    """A moto S3 server (server mode) on localhost with ``bucket``; yields its endpoint URL and
    sets AWS_ENDPOINT_URL and test credentials in the environment meanwhile. Start it before Ray
    so that Ray's workers inherit them. (The test suite's S3 server is this one.)"""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ConfigError("ptm bench ckpt: needs object storage: pass --storage s3://BUCKET/PREFIX (with "
                          "AWS_ENDPOINT_URL and credentials set), or install moto[server] and boto3 "
                          "(pip install -e '.[test]') for a local S3 server") from e
    import logging

    from ptm_dist.dist import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(cfg: JobConfig, storage_uri: str, mode: str, every: int) -> dict:
    from ptm_dist import checkpoint as ck
    from ptm_dist import storage
    from ptm_dist.train.loop import STARTUP_FILE
    from ptm_dist.train.pretrain import pretrain

    steps = cfg.train.max_steps
    job = cfg.model_copy(deep=True)
    job.run.storage, job.run.name = storage_uri, f"bench-ckpt-{mode}-{uuid.uuid4().hex[:8]}"
    job.train.ckpt_every = steps if mode == "none" else every
    job.train.ckpt_upload = "background" if mode == "background" else "foreground"
    job.train.keep_ckpts = steps  # every marker stays readable
    job.train.eval_every = steps
    job.train.eval_tasks_every = 0
    job.tracking.wandb = "disabled"
    print(f"[bench] {mode}: {steps} steps, checkpoint every {job.train.ckpt_every}, into {storage_uri}", flush=True)
    run_dir = pretrain(job)
    try:
        startup = json.loads(storage.read_text(storage.join(run_dir, STARTUP_FILE)))
        metas = [ck.read_meta(path) for step, path, ok in ck.list_checkpoints(run_dir) if ok]
        final = next(m for m in metas if m["step"] == steps)
        inside = [m for m in metas if m["step"] < steps]
        final_dir = storage.join(run_dir, ck.checkpoint_name(steps))
        fs, path = storage.resolve(final_dir)
        import pyarrow.fs as pafs

        size = sum(i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File)
        return {
            "mode": mode, "train_wall_s": final["time"] - startup["first_step"],
            "checkpoints_inside": len(inside), "checkpoint_bytes": size,
            "pause_s": [m.get("pause_s") for m in inside],
            "upload_s": [m.get("upload_s") for m in inside],
        }
    finally:
        storage.delete_dir(run_dir)


def bench_ckpt(cfg: JobConfig, storage_uri: str | None = None, every: int = 10, repeat: int = 1) -> dict:
    cfg.scaling.fixed_workers("ptm bench ckpt")  # a range [MIN, MAX] is for ptm pretrain only
    from ptm_dist import storage

    if every >= cfg.train.max_steps:
        raise ConfigError(f"ptm bench ckpt: --every {every} leaves no checkpoint inside a run of "
                          f"train.max_steps={cfg.train.max_steps} steps; use a smaller --every or more steps")
    if storage_uri is not None and not storage.is_uri(storage_uri):
        raise ConfigError(f"ptm bench ckpt: --storage {storage_uri}: an object-storage URI is needed "
                          "(s3://BUCKET/PREFIX, gs://...); the background upload is for object storage")
    if repeat < 1:
        raise ConfigError(f"ptm bench ckpt: --repeat {repeat}: at least 1")
    done: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stack:
        uri = storage_uri
        if uri is None:
            stack.enter_context(moto_server("ptm-bench"))
            uri = "s3://ptm-bench/runs"
        for _ in range(repeat):  # the modes interleaved, so that a slow spell of the machine hits each
            for mode in MODES:
                done[mode].append(_run(cfg, uri, mode, every))
    runs = {}
    for mode, rs in done.items():
        runs[mode] = {
            "mode": mode, "train_wall_s": statistics.median(r["train_wall_s"] for r in rs),
            "train_wall_each_s": [r["train_wall_s"] for r in rs],
            "checkpoints_inside": rs[0]["checkpoints_inside"], "checkpoint_bytes": rs[0]["checkpoint_bytes"],
            "pause_s": [p for r in rs for p in r["pause_s"]], "upload_s": [u for r in rs for u in r["upload_s"]],
        }
    base = runs["none"]["train_wall_s"]
    for r in runs.values():
        n = r["checkpoints_inside"]
        r["lost_per_checkpoint_s"] = (r["train_wall_s"] - base) / n if n else None
        r["mean_pause_s"] = statistics.mean(r["pause_s"]) if n else None
        ups = [u for u in r["upload_s"] if u is not None]
        r["mean_upload_s"] = statistics.mean(ups) if ups else None
    fg, bg = runs["foreground"]["lost_per_checkpoint_s"], runs["background"]["lost_per_checkpoint_s"]
    return {
        "job": {"model": f"{cfg.model.family}-{cfg.model.size}", "steps": cfg.train.max_steps, "every": every,
                "workers": cfg.scaling.num_workers, "zero_stage": cfg.zero.stage, "repeat": repeat},
        "storage": storage_uri or "moto S3 server on localhost",
        "checkpoint_bytes": runs["foreground"]["checkpoint_bytes"],
        "runs": runs,
        "background_over_foreground": bg / fg if fg and fg > 0 else None,
        "time": time.time(),
    }


def format_ckpt_report(r: dict) -> str:
    j = r["job"]

    def s(v) -> str:
        return "-" if v is None else f"{v:.2f} s"

    lines = [
        (f"checkpoint cost: {j['model']}, {j['workers']} workers, ZeRO-{j['zero_stage']}, {j['steps']} steps, "
         f"a checkpoint every {j['every']} steps, {r['checkpoint_bytes'] / 2**20:,.1f} MiB per checkpoint, "
         f"into {r['storage']}" + (f"; medians of {j['repeat']} runs each" if j.get("repeat", 1) > 1 else "")),
        (f"{'upload':<12} {'checkpoints':>11} {'training wall':>14} {'lost per ckpt':>14} "
         f"{'held (mean)':>12} {'upload (mean)':>14}"),
    ]
    for mode in MODES:
        x = r["runs"][mode]
        lines.append(f"{mode:<12} {x['checkpoints_inside']:>11} {x['train_wall_s']:>12.2f} s "
                     f"{s(x['lost_per_checkpoint_s']):>14} {s(x['mean_pause_s']):>12} {s(x['mean_upload_s']):>14}")
    ratio = r["background_over_foreground"]
    lines.append("background / foreground, time lost per checkpoint: "
                 + ("-" if ratio is None else f"{ratio:.2f}"))
    return "\n".join(lines)
