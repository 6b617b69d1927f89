"""run.storage as an object-store URI, against a real S3-compatible server on localhost."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
from conftest import debug_job
from ft_helpers import make_start, plain_transformers_accuracy

from ptm_dist import checkpoint as ck
from ptm_dist import storage
from ptm_dist.export import export
from ptm_dist.train.pretrain import pretrain


def test_run_checkpoints_resume_export_and_finetune_on_s3(tmp_path_factory, tmp_path, ray_session, s3_endpoint):
    job = ["run.name=s3run", "run.storage=s3://ptm/runs", "train.max_steps=6", "train.ckpt_every=3",
           "train.eval_every=3", "train.keep_ckpts=1"]
    run_dir = pretrain(debug_job(tmp_path, *job))
    assert run_dir == "s3://ptm/runs/s3run"
    assert [(s, ok) for s, _, ok in ck.list_checkpoints(run_dir)] == [(6, True)]  # retention on S3
    # The same job with a longer schedule continues from step 6 (resume from object storage).
    pretrain(debug_job(tmp_path, *job, "train.max_steps=9"))
    lines = [json.loads(x) for x in storage.read_text(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 10))
    assert ck.latest_complete_checkpoint(run_dir) == f"{run_dir}/checkpoint_00000009"
    meta = ck.read_meta(f"{run_dir}/checkpoint_00000009")  # object storage: uploaded in the background
    assert meta["upload"] == "background" and meta["upload_s"] > 0, meta
    for rank in (0, 1):
        assert storage.exists(f"{run_dir}/checkpoint_00000009/rank_{rank}.pt")
    # The resume above read each rank's files only (ck.rank_files); what that is, by rank.
    fs, path = storage.resolve(f"{run_dir}/checkpoint_00000009")
    sizes = {i.path[len(path) + 1:]: i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if i.type == pafs.FileType.File}
    whole = sum(sizes.values())
    for rank in (0, 1):
        mine = sorted(rel for rel in sizes if ck.rank_files(rank)(rel))
        print(f"rank {rank} reads {sum(sizes[r] for r in mine):,} of {whole:,} bytes: {mine}")
        assert mine == ["ds/mp_rank_00_model_states.pt", f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                        f"rank_{rank}.pt"]
    info = export(run_dir, str(tmp_path / "hf"))
    assert info["step"] == 9 and info["max_abs_logit_diff"] <= 1e-5

    # ptm finetune from that run with run.storage on S3: the start model is exported on this
    # machine and uploaded to <run_dir>/base, which the workers read from S3; metrics.jsonl,
    # best/ and Ray Train's epoch checkpoints go to S3; the same command again restores the last
    # epoch's checkpoint from S3 and trains nothing.
    from ptm_dist.finetune.run import finetune
    from ptm_dist.finetune.worker import read_epochs

    start = make_start(tmp_path_factory.getbasetemp() / "ft-start")
    ft = debug_job(tmp_path, "run.storage=s3://ptm/runs", f"finetune.init={run_dir}", "finetune.name=s3ft",
                   f"finetune.data={start['train']}", f"finetune.val_data={start['val']}", "finetune.max_length=32",
                   "finetune.batch_size=8", "finetune.lr=0.005", "finetune.epochs=2")
    ft_dir = finetune(ft)
    assert ft_dir == "s3://ptm/runs/s3ft"
    assert storage.exists(f"{ft_dir}/base/ptm_upload.json") and storage.exists(f"{ft_dir}/base/model.safetensors")
    assert not (tmp_path / "s3ft").exists()  # nothing of the run on this machine's disk
    lines = read_epochs(ft_dir)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert any(d.rsplit("/", 1)[-1] == "checkpoint_epoch_0002" for d in storage.list_dirs(ft_dir))
    best_line = max(lines, key=lambda m: m["accuracy"])
    best, is_tmp = storage.local_copy(f"{ft_dir}/best")
    try:
        marker = json.loads((best / "ptm_best.json").read_text())
        assert (marker["epoch"], marker["value"]) == (best_line["epoch"], best_line["accuracy"])
        acc = plain_transformers_accuracy(best, start["val"], max_length=32)
        assert abs(acc - best_line["accuracy"]) <= 0.005, (acc, best_line["accuracy"])
    finally:
        storage.drop_local_copy(best, is_tmp)
    before = storage.read_text(f"{ft_dir}/metrics.jsonl")
    finetune(ft)
    assert storage.read_text(f"{ft_dir}/metrics.jsonl") == before  # no epoch was trained again
