"""Shared pieces of the fine-tuning and sweep tests: a debug start model and a small task.

The start model is a randomly initialised debug GPT-2 saved as a Hugging Face directory with the
session's BPE tokenizer (start point (b), any local HF model); the task files are the first
examples of the built-in task (real docstrings, real labels) as jsonl.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import debug_job

MAX_LENGTH = 64
N_TRAIN, N_VAL = 320, 200  # 200 validation examples: one changed prediction is 0.5 points


def make_start(base: Path) -> dict:
    """{'model': HF dir, 'train': jsonl, 'val': jsonl} under ``base`` (built once per session)."""
    from tokenizers import Tokenizer

    from ptm_dist import models
    from ptm_dist.config import cache_dir
    from ptm_dist.data.prepare import prepare_data
    from ptm_dist.data.tokenizer import special_ids
    from ptm_dist.finetune.task import ensure_builtin_task

    out = {"model": base / "hf-debug", "train": base / "train.jsonl", "val": base / "val.jsonl"}
    if (base / "DONE").exists():
        return out
    cfg = debug_job(base / "runs")
    data = prepare_data(cfg)
    tok = Tokenizer.from_file(str(data.tokenizer_dir / "tokenizer.json"))
    hf = models.hf_config("gpt2", "debug", tok.get_vocab_size(), MAX_LENGTH,
                          models.SpecialTokens(**special_ids(data.tokenizer_dir, tok)))
    models.build(hf, seed=0).save_pretrained(str(out["model"]))
    for f in data.tokenizer_dir.iterdir():
        shutil.copy2(f, out["model"] / f.name)
    task = ensure_builtin_task(cache_dir(cfg))
    train = (task / "train.jsonl").read_text().splitlines()[:N_TRAIN]
    val = (task / "val.jsonl").read_text().splitlines()[:N_VAL]
    out["train"].write_text("\n".join(train) + "\n")
    out["val"].write_text("\n".join(val) + "\n")
    (base / "DONE").write_text("")
    return out


def start_overrides(start: dict, storage: Path) -> list[str]:
    return [
        f"run.storage={storage}", f"finetune.init={start['model']}", f"finetune.data={start['train']}",
        f"finetune.val_data={start['val']}", f"finetune.max_length={MAX_LENGTH}", "finetune.batch_size=8",
        "train.precision=fp32",
    ]


def plain_transformers_accuracy(model_dir: Path, val_file: Path, max_length: int = MAX_LENGTH) -> float:
    """Validation accuracy of an exported model, one example at a time, with plain transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = [json.loads(ln) for ln in val_file.read_text().splitlines() if ln.strip()]
    right = 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r["text"], truncation=True, max_length=max_length, return_tensors="pt")
            pred = int(model(**enc).logits.argmax(-1))
            right += model.config.id2label[pred] == r["label"]
    return right / len(rows)


def plain_transformers_tagging(best: Path, val_rows: list[dict], max_length: int) -> tuple[float, int, int]:
    """(word accuracy, entities found, gold entities) of an exported model, one row at a time,
    with plain transformers: a word's tag is its first token's prediction (B/I tags only)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(best))
    model = AutoModelForTokenClassification.from_pretrained(str(best)).eval()
    names = model.config.id2label

    def spans(tags):
        out, cur = set(), None
        for i, t in enumerate([*tags, "O"]):
            if cur and not (t.startswith("I-") and t[2:] == cur[0]):
                out.add((cur[0], cur[1], i - 1))
                cur = None
            if t.startswith("B-") or (t.startswith("I-") and cur is None):
                cur = (t[2:], i)
        return out

    right = words = found = n_gold = 0
    with torch.no_grad():
        for r in val_rows:
            text = " ".join(r["tokens"])
            starts = [sum(len(w) + 1 for w in r["tokens"][:i]) for i in range(len(r["tokens"]))]
            enc = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0].tolist()
            pred_ids = model(**enc).logits[0].argmax(-1).tolist()
            pred = ["O"] * len(r["tokens"])
            for (a, b), p in zip(offsets, pred_ids, strict=True):
                a = a + 1 if b > a and text[a] == " " else a
                if b > a and a in starts:
                    pred[starts.index(a)] = names[p]
            right += sum(p == g for p, g in zip(pred, r["tags"], strict=True))
            words += len(pred)
            found += len(spans(pred) & spans(r["tags"]))
            n_gold += len(spans(r["tags"]))
    return right / words, found, n_gold
