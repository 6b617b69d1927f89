"""Exactly-once data across a real kill: `ptm pretrain` is SIGKILLed mid-epoch (driver, Ray and
workers), the same command is run again, and the sequence ids every step trained on
(data.log_sequence_ids) are compared with the corpus: across the kill, epoch 0 holds every
packed sequence exactly once. The re-run also keeps the killed run's wandb run id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from conftest import DEBUG_OVERRIDES

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist.config import load
from ptm_dist.data.idlog import read_sequence_log
from ptm_dist.data.packing import pack_shard
from ptm_dist.data.prepare import prepare_data

WORDS = ["north", "south", "river", "stone", "light", "ember", "copper", "violet", "maple", "harbor", "signal",
         "quartz", "meadow", "falcon", "lantern", "orbit", "canyon", "thistle", "glacier", "pepper", "velvet",
         "summit", "anchor", "willow"]
DOCS = [f"record {i}: " + " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(28)) for i in range(160)]


def _step(ckpt_dir: str) -> int:
    return int(ckpt_dir.rstrip("/").rsplit("_", 1)[1])


def _corpus(root):
    root.mkdir()
    for k in range(6):
        (root / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in DOCS[k * 24 : (k + 1) * 24]))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[144:]))


def test_driver_kill_mid_epoch_then_rerun_consumes_each_sequence_once(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    _corpus(corpus)
    overrides = [*DEBUG_OVERRIDES, f"run.storage={tmp_path}", "run.name=killed",
                 f"data.sources=[{{path: '{corpus}/part-*.jsonl'}}]",
                 f"data.val_sources=[{{path: '{corpus}/val.jsonl'}}]",
                 "data.seq_len=16", "data.shuffle_window=16", "data.log_sequence_ids=true",
                 "train.max_steps=60", "train.ckpt_every=8", "train.eval_every=100", "train.keep_ckpts=3",
                 "tracking.wandb=offline"]
    cfg = load(None, overrides)
    data = prepare_data(cfg)
    tok_json = (data.tokenizer_dir / "tokenizer.json").read_text()
    eos = json.loads(tok_json)["added_tokens"][0]["id"]
    every = Counter()
    for k, shard in enumerate(data.train):
        for batch in pack_shard(shard, k, tok_json, 16, eos):
            every.update(batch["id"].tolist())
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ptm_dist.cli", "pretrain", *[f"--set={o}" for o in overrides]]
    # An in-process wandb run leaves its service's address in WANDB_SERVICE, which every child
    # inherits (here: the ptm driver, its Ray and the workers). The workers must not use that
    # longer-lived service: a killed worker's run would stay registered there and the re-run
    # could not continue the same wandb run ('run ID ... is in use').
    import wandb

    wandb.init(mode="offline", dir=str(tmp_path), project="probe").finish()
    assert os.environ.get("WANDB_SERVICE")
    env = {**os.environ, "PTM_PROGRESS": "plain"}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            done = ckpt_lib.latest_complete_checkpoint(str(run_dir)) if run_dir.exists() else None
            if done and _step(done) >= 16:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(1.0)  # a few steps past the checkpoint: work that the kill loses
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(line["step"] for line in read_sequence_log(str(run_dir))[0])
    wandb_id = (run_dir / "wandb_run_id").read_text().strip()
    resumed_from = _step(ckpt_lib.latest_complete_checkpoint(str(run_dir)))

    rerun = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    logs = read_sequence_log(str(run_dir))
    epoch0 = Counter()
    for rank, lines in logs.items():
        assert [ln["step"] for ln in lines] == list(range(1, 61)), f"rank {rank}: steps missing or repeated"
        epoch0.update(seq_id for ln in lines for epoch, seq_id in ln["seqs"] if epoch == 0)
    print(f"driver killed at step ~{killed_at}, resumed from checkpoint step {resumed_from}; epoch 0: "
          f"{len(epoch0)} distinct sequences of {len(every)}, max count {max(epoch0.values())}")
    assert killed_at > resumed_from
    # The re-run continues the killed run's wandb run: one id, in every offline run directory.
    assert (run_dir / "wandb_run_id").read_text().strip() == wandb_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) >= 2 and all(name.endswith(f"-{wandb_id}") for name in offline), offline
    assert epoch0 == every  # every sequence once: none replayed, none skipped
    assert all(ln["seqs"][0][0] >= 1 for lines in logs.values() for ln in lines[-1:]), "epoch 0 finished"
