"""Worker processes for tests/unit/test_reshard.py: one rank of a gloo group (spawned by
torch.multiprocessing) that trains a debug GPT-2 with the project's DeepSpeed engine at each
ZeRO stage. The reference is DeepSpeed's own view of the full state (``safe_get_full_*``, or the
plain optimizer's state at stage 0), taken from the run that wrote the checkpoint."""

from __future__ import annotations

import os

ROWS = 12  # sequences per optimizer step, all ranks together (the global batch): 1, 2, 3 or 4 ranks


def _batch(step: int):
    import torch

    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 64, (ROWS, 16), generator=g)


def _case(case: str) -> tuple[int, str]:
    """"2" -> (2, "fp32"); "2-bf16" -> (2, "bf16")."""
    stage, _, precision = case.partition("-")
    return int(stage), precision or "fp32"


def _engine(stage: int, world: int, precision: str = "fp32"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptm_dist.engine import EngineSpec, OptimSpec, prepare

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    micro = 2 if ROWS % (2 * world) == 0 else 1
    spec = EngineSpec(OptimSpec(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=20, weight_decay=0.1,
                                grad_clip=1.0, micro_batch=micro, grad_accum=ROWS // (world * micro)),
                      zero_stage=stage, precision=precision)
    return prepare(model, spec, torch.device("cpu"))[0], micro


def _step(engine, micro: int, rank: int, world: int, step: int) -> None:
    rows = _batch(step)
    mine = rows.chunk(world)[rank]
    for mb in mine.split(micro):  # grad_accum micro batches
        loss = engine(input_ids=mb, labels=mb).loss
        engine.backward(loss)
        engine.step()


def _full_state(engine, stage: int) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if stage in (1, 2):
        # DeepSpeed 0.19.8 links parameters to their optimizer-state fragments right after the
        # first param group's update, before the second group (no weight decay) has state:
        # link them again now that every group has it.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if stage == 0:
            state = engine.optimizer.state[p]
            out[name] = [p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
        else:
            out[name] = [safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                         safe_get_full_optimizer_state(p, "exp_avg_sq").clone()]
    return out


def _module_weights(engine) -> dict:
    """The weights the forward pass uses (gathered at ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


def reshard_worker(rank: int, world: int, port: int, phase: str, cases: list[str], out: str,
                   ckpt_root: str | None = None) -> None:
    """phase "save": 3 steps, checkpoint, then the full state and one more step's weights.
    phase "load": load the checkpoint with ptm_dist.train.reshard on this world size, then the
    same full state and step. Checkpoints live under ``ckpt_root`` (default ``out``: a local
    directory or, to load, an object-storage URI); records go to ``out``."""
    import torch
    import torch.distributed as dist

    from ptm_dist.train import reshard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for case in cases:
        stage, precision = _case(case)
        engine, micro = _engine(stage, world, precision)
        ckpt = f"{ckpt_root or out}/stage{case}"
        record = {}
        if phase == "save":
            for step in range(3):
                _step(engine, micro, rank, world, step)
            engine.save_checkpoint(ckpt, tag="ds", save_latest=False)
        else:
            record["load_s"] = reshard.load_engine(engine, ckpt, rank)
        record["state"] = _full_state(engine, stage)
        record["module"] = _module_weights(engine)
        record["global_steps"] = engine.global_steps
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        record["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        record["lr"] = engine.lr_scheduler.get_last_lr()
        _step(engine, micro, rank, world, 3)
        record["after"] = {k: v[0] for k, v in _full_state(engine, stage).items()}
        if rank == 0:
            where = "s3" if ckpt_root else ""
            torch.save(record, f"{out}/stage{case}-{phase}{where}-{world}.pt")
        dist.barrier()
    dist.destroy_process_group()
