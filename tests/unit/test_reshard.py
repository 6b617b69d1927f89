"""ptm_dist.train.reshard: a checkpoint written by 2 DeepSpeed ranks is loaded by 1 and by 4
(real engines, gloo ranks spawned by torch) at ZeRO stages 0 to 3. Weights (fp32 masters and
those the forward pass uses), Adam moments and each param group's hyperparameters equal the
writing run's bitwise, and one more step on the same global batch gives the weights the writing
run reached with its 2 ranks, to fp32 rounding of the other reduction order. (This caught two
slips of DeepSpeed's ZeRO-3 universal load that ptm_dist.train.reshard undoes.)"""

from __future__ import annotations

import pytest
import torch

STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    import torch.multiprocessing as mp
    from reshard_helpers import reshard_worker

    from ptm_dist.dist import free_port

    out = tmp_path_factory.mktemp("reshard")
    for phase, world in (("save", 2), ("load", 1), ("load", 4)):
        mp.start_processes(reshard_worker, args=(world, free_port(), phase, STAGES, str(out)), nprocs=world,
                           start_method="spawn")
    return out


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world", [1, 4])
def test_a_checkpoint_of_two_ranks_continues_on_one_and_on_four(resharded, stage, world):
    saved = torch.load(resharded / f"stage{stage}-save-2.pt")
    loaded = torch.load(resharded / f"stage{stage}-load-{world}.pt")
    assert loaded["global_steps"] == saved["global_steps"] == 3 and loaded["lr"] == saved["lr"]
    assert loaded["state"].keys() == saved["state"].keys() and len(saved["state"]) > 10
    for name, (w, m, v) in saved["state"].items():
        lw, lm, lv = loaded["state"][name]
        assert torch.equal(lw, w) and torch.equal(lm, m) and torch.equal(lv, v), name
    assert loaded["groups"] == saved["groups"]  # per-group weight decay included
    for name, weight in saved["module"].items():  # what the forward pass uses
        assert torch.equal(loaded["module"][name], weight), name
    worst = max((loaded["after"][k] - saved["after"][k]).abs().max().item() for k in saved["after"])
    moved = max((saved["after"][k] - saved["state"][k][0]).abs().max().item() for k in saved["after"])
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)
    if stage > 0:  # converted once, on the first resize, and kept beside the checkpoint
        assert (resharded / f"stage{stage}" / "universal" / "DONE").exists()
    else:
        assert not (resharded / f"stage{stage}" / "universal").exists()
