"""`ptm export`: a checkpoint -> a Hugging Face model directory that plain transformers loads.

Weights come from DeepSpeed's checkpoint (ZeRO shards are merged into fp32 weights with
DeepSpeed's own ``zero_to_fp32``); the tokenizer is copied. The export then checks itself:
the exported model's logits on the probe sequence saved with the checkpoint must equal the
logits the live, distributed model computed when it saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import models, storage
from ptm_dist.config import JobConfig
from ptm_dist.errors import ConfigError, ExportError

SOURCE_STAMP = "ptm_source.json"  # in an export made by hf_model_dir: the checkpoint it came from

# Logit tolerance for the self-check, which runs on CPU. fp32 and bf16 exports hold the weights
# the live model computed with (bf16 runs are exported in bf16): trained on CPU, only the order
# of reductions may differ (measured: 0.0 for bf16 at ZeRO 1-3). A GPU's bf16 kernels round
# differently from the CPU's; fp16 runs are exported from their fp32 master weights.
_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-5, "fp16": 1e-2}
_TOLERANCE_GPU = {"bf16": 5e-2}


def _state_dict(local: Path, zero_stage: int, precision: str) -> dict[str, torch.Tensor]:
    """The model's weights: fp32 (the optimizer's master weights under ZeRO) or, for bf16 runs,
    the bf16 weights the model trained with. Below ZeRO-3 every rank holds whole weights, which
    DeepSpeed saves in the model states file in the training dtype; that file also serves ZeRO-1
    bf16 runs, whose BF16_Optimizer files DeepSpeed's zero_to_fp32 does not read."""
    ds_dir = local / ckpt_lib.DS_TAG
    if zero_stage == 0 or (precision == "bf16" and zero_stage < 3):
        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return {k: v.to(dtype) for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=ckpt_lib.DS_TAG)
    # bf16 weights are the master weights rounded to bf16, as DeepSpeed copies them after each step
    return {k: v.to(torch.bfloat16) for k, v in sd.items()} if precision == "bf16" else sd


def export(src: str, out: str) -> dict:
    """Export the checkpoint named by ``src`` (run or checkpoint directory) into ``out``."""
    from transformers import AutoTokenizer

    ckpt = ckpt_lib.resolve_source(src)
    meta = ckpt_lib.read_meta(ckpt)
    local, is_tmp = storage.local_copy(ckpt)
    try:
        cfg = JobConfig.model_validate(yaml.safe_load((local / "job.yaml").read_text()))
        tok = AutoTokenizer.from_pretrained(str(local / "tokenizer"))
        if (local / ckpt_lib.MODEL_CONFIG).is_file():  # the architecture the run trained
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(str(local / ckpt_lib.MODEL_CONFIG))
        else:  # checkpoints written before model_config.json: a registry model
            special = models.SpecialTokens(eos=tok.eos_token_id, pad=tok.pad_token_id, mask=tok.mask_token_id)
            hf_cfg = models.hf_config(cfg.model.family, cfg.model.size, len(tok), cfg.data.seq_len, special)
        model = models.build(hf_cfg)
        precision = meta.get("precision", "fp32")
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        sd = _state_dict(local, meta["zero_stage"], precision)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ExportError(f"{ckpt}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
        model.tie_weights()
        model.eval()
        probe = torch.load(local / "probe.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"]).logits.float()
        diff = float((logits - probe["logits"]).abs().max())
        tol = _TOLERANCE[probe["precision"]]
        if meta.get("device", "cpu") != "cpu":
            tol = _TOLERANCE_GPU.get(probe["precision"], tol)
        if diff > tol:
            raise ExportError(f"{ckpt}: exported logits differ from the trained model's by {diff:.3g} (> {tol})")
        out_dir = Path(out).expanduser().resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        for f in (local / "tokenizer").iterdir():
            shutil.copy2(f, out_dir / f.name)
    finally:
        storage.drop_local_copy(local, is_tmp)
    return {"checkpoint": ckpt, "out": str(out_dir), "step": meta["step"], "max_abs_logit_diff": diff}


def hf_model_dir(src: str, out: str, what: str) -> tuple[str, dict | None]:
    """(a Hugging Face model directory for ``src``, export()'s result when one was made now).

    ``src`` (a path or URI) is returned as it is when it holds a config.json; a ptm checkpoint,
    or a ptm run's newest complete one, is exported into the local directory ``out``, unless
    ``out`` already holds that checkpoint's export. ``what`` starts the error messages (the
    option or key that named ``src``)."""
    if not storage.exists(src):
        raise ConfigError(f"{what}: no such directory")
    if storage.exists(storage.join(src, "config.json")):
        return src, None
    if storage.exists(storage.join(src, ckpt_lib.MARKER)):
        ckpt = src
    else:
        ckpt = ckpt_lib.latest_complete_checkpoint(src)
    if not ckpt:
        raise ConfigError(f"{what}: neither a Hugging Face model directory (config.json) nor a "
                          "ptm run or checkpoint directory with a complete checkpoint")
    stamp = Path(out) / SOURCE_STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("checkpoint") == ckpt:
        return out, None
    info = export(ckpt, out)
    stamp.write_text(json.dumps({"checkpoint": ckpt, "step": info["step"]}) + "\n")
    return out, info
