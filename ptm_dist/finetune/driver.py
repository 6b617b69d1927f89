"""Driver steps shared by ``ptm finetune`` (run.py) and ``ptm tune`` (sweep.py): where the run
goes, which model it starts from, the task, and the spec the workers receive.

    cfg, run_dir = storage.resolve_run_dir(cfg, "finetune")   # <run.storage>/<finetune.name>
    base_dir = resolve_start(cfg, run_dir)              # a Hugging Face directory
    data, info = prepare_task(cfg, base_dir)
    spec = FinetuneSpec(cfg, run_dir, base_dir, data, info["pad_id"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ptm_dist import checkpoint as ckpt_lib
from ptm_dist import storage
from ptm_dist.config import JobConfig, cache_dir

LOG_PREFIX = "[ptm]"
UPLOAD_STAMP = "ptm_upload.json"  # in <run_dir>/base when the start model was uploaded there


def resolve_start(cfg: JobConfig, out_dir: str) -> str:
    """A Hugging Face model directory to start from (exported into <out_dir>/base if needed).

    With ``out_dir`` in object storage the export is made in this machine's cache and uploaded
    to <out_dir>/base, which the workers read on whichever node they run: the returned path is
    then a URI (a Hugging Face directory given as a URI is returned as it is)."""
    from ptm_dist.pretrained import hf_model_dir
    from ptm_dist.train.pretrain import pretrain

    init = cfg.finetune.init
    if init is None:
        src = storage.join(storage.absolute(cfg.run.storage), cfg.run.name)
        if not ckpt_lib.latest_complete_checkpoint(src):
            print(f"{LOG_PREFIX} no complete pretraining checkpoint in {src}: pretraining it first", flush=True)
            pre = cfg.model_copy(deep=True)
            pre.run.resume = True
            src = pretrain(pre)
    else:
        src = init
    if not storage.is_uri(out_dir):
        return hf_model_dir(src, Path(out_dir) / "base", "finetune.init")
    key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    local = hf_model_dir(src, cache_dir(cfg) / "finetune-base" / key, "finetune.init")
    if storage.is_uri(local):
        return local  # a Hugging Face directory in object storage: every node reads it there
    # What was uploaded, by file name, size and modification time: a re-run uploads only when
    # the start model changed (a newer checkpoint exported, another directory).
    files = sorted((str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in Path(local).rglob("*") if f.is_file())
    stamp = json.dumps({"source": local, "files": files}) + "\n"
    target = storage.join(out_dir, "base")
    uploaded = storage.join(target, UPLOAD_STAMP)
    if not storage.exists(uploaded) or storage.read_text(uploaded) != stamp:
        storage.delete_dir(target)
        storage.upload_dir(Path(local), target)
        storage.write_text(uploaded, stamp)  # last: a partial upload is uploaded again
        print(f"{LOG_PREFIX} start model {local} uploaded to {target}", flush=True)
    return target


def prepare_task(cfg: JobConfig, base_dir: str) -> tuple[dict, dict]:
    """(tokenized task for the workers, a description: labels, sizes, majority baseline)."""
    from ptm_dist.finetune.worker import load_tokenizer

    local, is_tmp = storage.local_copy(base_dir)
    try:
        tok = load_tokenizer(str(local))
    finally:
        storage.drop_local_copy(local, is_tmp)
    if cfg.finetune.task == "token_classification":
        from ptm_dist.finetune.tagging import load_tagging_task, tokenize_tagged

        task = load_tagging_task(cfg.finetune, cache_dir(cfg))
        data = tokenize_tagged(task, tok, cfg.finetune.max_length)
        n_train, n_val, what = len(task.train_words), len(task.val_words), "tags"
        baseline_of = "majority-tag baseline: word accuracy"
    else:
        from ptm_dist.finetune.task import load_task, tokenize

        task = load_task(cfg.finetune, cache_dir(cfg))
        data = tokenize(task, tok, cfg.finetune.max_length)
        n_train, n_val, what = len(task.train_texts), len(task.val_texts), "labels"
        baseline_of = "majority-class baseline accuracy"
    label, baseline = task.majority_baseline()
    info = {"task": cfg.finetune.task, "source": task.source, "labels": task.labels, "train": n_train,
            "val": n_val, "majority_label": label, "majority_baseline": baseline, "pad_id": tok.pad_token_id}
    print(f"{LOG_PREFIX} task {task.source}: {n_train} training / {n_val} validation examples, "
          f"{len(task.labels)} {what}; {baseline_of} {baseline:.4f} ({label})", flush=True)
    return data, info


def baseline_name(info: dict) -> str:
    if info.get("task") == "token_classification":
        return "majority-tag baseline: word accuracy"
    return "majority-class baseline accuracy"
