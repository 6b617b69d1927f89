"""ptm_dist.train.reshard: a checkpoint written by 2 DeepSpeed ranks is loaded by 1, 3 and 4
(3: partitions of uneven size, with padding; real engines, gloo ranks spawned by torch) at ZeRO
stages 0 to 3, and at ZeRO-2 in bf16. Weights (fp32 masters and those the forward pass uses),
Adam moments and each param group's hyperparameters equal the writing run's bitwise, and one
more step on the same global batch gives the weights the writing run reached with its 2 ranks,
to fp32 rounding of the other reduction order. (This caught two slips of DeepSpeed's ZeRO-3
universal load that ptm_dist.train.reshard undoes.)"""

from __future__ import annotations

import pytest
import torch

CASES = ["0", "1", "2", "3", "2-bf16"]  # ZeRO stage, and precision when not fp32


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, s3_endpoint):
    """Records of the writing run (2 ranks) and of loads on 1, 3 and 4 ranks; ZeRO-2 is also loaded
    on 1 rank from a copy in S3 (moto), where the conversion reads and writes object storage."""
    import torch.multiprocessing as mp
    from reshard_helpers import reshard_worker

    from ptm_dist import storage
    from ptm_dist.dist import free_port

    out = tmp_path_factory.mktemp("reshard")
    mp.start_processes(reshard_worker, args=(2, free_port(), "save", CASES, str(out)), nprocs=2,
                       start_method="spawn")
    s3 = f"s3://ptm/reshard-test/{out.name}"
    storage.upload_dir(out / "stage2", f"{s3}/stage2")
    mp.start_processes(reshard_worker, args=(1, free_port(), "load", ["2"], str(out), s3), nprocs=1,
                       start_method="spawn")
    for world in (1, 3, 4):
        mp.start_processes(reshard_worker, args=(world, free_port(), "load", CASES, str(out)), nprocs=world,
                           start_method="spawn")
    return out, s3


def test_a_checkpoint_in_object_storage_is_converted_there_once(resharded):
    from ptm_dist import storage

    out, s3 = resharded
    local = torch.load(out / "stage2-load-1.pt")
    remote = torch.load(out / "stage2-loads3-1.pt")
    for name, tensors in local["state"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, remote["state"][name])), name
    assert storage.exists(f"{s3}/stage2/universal/DONE")
    assert storage.exists(f"{s3}/stage2/universal/ds/zero/transformer.wte.weight/exp_avg.pt")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [1, 3, 4])
def test_a_checkpoint_of_two_ranks_continues_on_one_three_and_four(resharded, case, world):
    resharded, _ = resharded
    saved = torch.load(resharded / f"stage{case}-save-2.pt")
    loaded = torch.load(resharded / f"stage{case}-load-{world}.pt")
    assert loaded["global_steps"] == saved["global_steps"] == 3 and loaded["lr"] == saved["lr"]
    assert loaded["state"].keys() == saved["state"].keys() and len(saved["state"]) > 10
    for name, (w, m, v) in saved["state"].items():
        lw, lm, lv = loaded["state"][name]
        assert torch.equal(lw, w) and torch.equal(lm, m) and torch.equal(lv, v), name
    assert loaded["groups"] == saved["groups"]  # per-group weight decay included
    for name, weight in saved["module"].items():  # what the forward pass uses
        assert torch.equal(loaded["module"][name], weight), name
    if case != "0":  # converted once, on the first resize, and kept beside the checkpoint
        assert (resharded / f"stage{case}" / "universal" / "DONE").exists()
    else:
        assert not (resharded / f"stage{case}" / "universal").exists()
    # One more step on the same global batch. In bf16 on 4 ranks the micro batches are 1 row where
    # the writer's were 2, and bf16 rounding depends on the matmul's shape; on 3 ranks bf16
    # gradients are summed in another order and divided by 3, which is not exact: there only the
    # loaded state above is compared (measured after the step: 2.0e-4 apart on 4 ranks, 4.7e-4 on
    # 3, 0.0 on 1 rank).
    if case.endswith("bf16") and world in (3, 4):
        return
    after = dict(loaded["after"])
    if world == 3:
        # The attention key bias has a zero gradient in exact arithmetic (softmax ignores a
        # constant added to every score), so what it gets is rounding noise, and Adam scales that
        # noise to steps of the learning rate's size: with the division by 3 its noise differs
        # from the 2-rank run's (measured 3.2e-6 apart, every other weight within 6e-8). It is
        # compared as it was loaded (bitwise, above) and left out here.
        n = saved["after"]["transformer.h.0.attn.c_attn.bias"].numel() // 3
        for k in after:
            if k.endswith("attn.c_attn.bias"):
                after[k] = torch.cat([after[k][:n], saved["after"][k][n:2 * n], after[k][2 * n:]])
    worst = max((after[k] - saved["after"][k]).abs().max().item() for k in saved["after"])
    moved = max((saved["after"][k] - saved["state"][k][0]).abs().max().item() for k in saved["after"])
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)
