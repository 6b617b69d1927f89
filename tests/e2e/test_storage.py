"""run.storage as an object-store URI, against a real S3-compatible server on localhost."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
from conftest import debug_job

from ptm_dist import checkpoint as ck
from ptm_dist import storage
from ptm_dist.export import export
from ptm_dist.train.pretrain import pretrain


def test_run_checkpoints_resume_and_export_on_s3(tmp_path, ray_session, s3_endpoint):
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
