"""ptm_dist.finetune.tagging (finetune.task token_classification): entity-level metrics with
seqeval's conventions, tagged task files and their one-line errors, labels on first sub-words
with three kinds of tokenizer, the built-in tagging task, and a fine-tuning run on it with a real
DeepSpeed engine (a world of one, CPU) whose best/ plain transformers loads and scores the same.
Through Ray Train with 2 workers: tests/e2e/test_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ft_helpers import plain_transformers_tagging
from hub_helpers import make_hub_model

from ptm_dist.config import FinetuneSection, load
from ptm_dist.errors import ConfigError, DataError
from ptm_dist.finetune.tagging import (
    IGNORE,
    TYPES,
    align,
    ensure_builtin_tagging,
    entities,
    load_tagging_task,
    tagging_metrics,
    tokenize_tagged,
)


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- metrics


def test_metrics_match_seqevals_documented_example():
    # seqeval's README example: one of two predicted entities is right -> P = R = F1 = 0.5.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = tagging_metrics(pred, gold)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["accuracy"] == 8 / 10  # seqeval's accuracy_score: 0.80


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
    (["I-PER", "I-PER", "O"], {("PER", 0, 1)}),  # lenient: an I after O begins an entity
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 2)}),  # a type change splits
    (["B-X", "B-X", "I-X"], {("X", 0, 0), ("X", 1, 2)}),
    (["B-X", "E-X", "S-Y", "I-Y", "E-Y"], {("X", 0, 1), ("Y", 2, 2), ("Y", 3, 4)}),  # IOBES
    (["O", "O"], set()),
])
def test_entities_follow_seqevals_lenient_rules(tags, expected):
    assert entities(tags) == expected


def test_metrics_with_nothing_predicted_or_nothing_to_find():
    m = tagging_metrics([["O", "O"]], [["B-X", "O"]])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    m = tagging_metrics([["B-X", "O"]], [["O", "O"]])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- task files


GOOD = [{"tokens": ["import", "os"], "tags": ["O", "B-MOD"]}, {"tokens": ["f", "(", ")"], "tags": ["B-FUNC", "O", "O"]}]


@pytest.mark.parametrize("train, val, expected", [
    ([{"tokens": ["a", "b"], "tags": ["O"]}], None, r"train.jsonl line 1: 2 tokens but 1 tags"),
    ([*GOOD, {"tokens": ["a"], "tags": "O"}], None, r"train.jsonl line 3: 1 tokens but not a list tags"),
    (GOOD, [{"tokens": ["g"], "tags": ["B-CLS"]}], r"val.jsonl line 1: tag 'B-CLS' does not occur in the training"),
    (GOOD, ["", {"tokens": ["x", "y"], "tags": ["O", "B-MOD"]}, {"tokens": ["z"], "tags": ["B-PER"]}],
     r"val.jsonl line 3: tag 'B-PER' does not occur"),
    ([{"tokens": ["a"], "tags": ["PER"]}], None, r"line 1: tag 'PER' is not O or B-/I-/E-/S-"),
    ([{"tokens": ["a"], "tags": [3]}], None, r"line 1: tag 3 must be a string"),
    ([{"tokens": [], "tags": []}], None, r"line 1: 'tokens' must be a non-empty list"),
    ([{"words": ["a"], "tags": ["O"]}], None, r"line 1: no column 'tokens' .* set finetune.tokens_column"),
    ([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["O"]}], [{"tokens": ["c"], "tags": ["O"]}],
     "needs at least 2 tags"),
])
def test_tagged_file_errors_name_file_and_line(tmp_path, train, val, expected):
    ft = FinetuneSection(task="token_classification", data=_jsonl(tmp_path / "train.jsonl", train),
                         val_data=_jsonl(tmp_path / "val.jsonl", val) if val else None)
    with pytest.raises(DataError, match=expected) as e:
        load_tagging_task(ft, tmp_path)
    assert "\n" not in str(e.value)


def test_csv_is_refused_and_parquet_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.csv").write_text("tokens,tags\na,O\n")
    with pytest.raises(DataError, match=r"t.csv: csv cannot hold lists"):
        load_tagging_task(FinetuneSection(task="token_classification", data=str(tmp_path / "t.csv")), tmp_path)
    words = [["import", f"m{i}"] for i in range(10)]
    pq.write_table(pa.table({"w": words, "t": [["O", "B-MOD"]] * 10}), tmp_path / "t.parquet")
    ft = FinetuneSection(task="token_classification", data=str(tmp_path / "t.parquet"), tokens_column="w",
                         tags_column="t", val_fraction=0.2)
    task = load_tagging_task(ft, tmp_path)
    assert task.labels == ["O", "B-MOD"] and len(task.val_words) == 2 and len(task.train_words) == 8
    assert not {tuple(w) for w in task.val_words} & {tuple(w) for w in task.train_words}
    assert task.majority_baseline() == ("O", 0.5)


def test_metric_must_fit_the_task():
    with pytest.raises(ConfigError, match="tune.metric f1_macro is not measured for finetune.task token_"):
        load(None, ["finetune.task=token_classification", "tune.metric=f1_macro"])
    with pytest.raises(ConfigError, match="tune.metric f1 is not measured for finetune.task sequence_"):
        load(None, ["tune.metric=f1"])
    assert load(None, ["finetune.task=token_classification", "tune.metric=f1"]).tune.metric == "f1"


# ---------------------------------------------------------------- sub-words


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])  # byte-level BPE, SentencePiece-style, WordPiece
def test_first_subword_carries_the_tag(tmp_path_factory, family):
    from transformers import AutoTokenizer

    from ptm_dist.finetune.tagging import TaggingTask

    tok = AutoTokenizer.from_pretrained(str(make_hub_model(tmp_path_factory.getbasetemp() / f"hub-{family}", family)))
    words = ["the", "harbor", "library", "quietly", "(", "x", ")"]
    tags = [0, 1, 2, 0, 0, 1, 0]
    task = TaggingTask(["O", "B-A", "I-A"], [words], [tags], [words], [tags], "test")
    data = tokenize_tagged(task, tok, max_length=64)
    ids, labels = data["train_ids"][0], data["train_labels"][0]
    assert ids == tok(" ".join(words))["input_ids"]  # the text as pretraining sees it
    assert [y for y in labels if y != IGNORE] == tags  # one label per word, in order
    text = " ".join(words)
    starts = [text.index(f" {w}", 1) + 1 if i else 0 for i, w in enumerate(words)]
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    first_char = [a + (a < b and text[a] == " ") for a, b in offsets]
    assert [first_char[p] for p, y in enumerate(labels) if y != IGNORE] == starts  # each word's first token
    assert data["val_words"][0] == list(range(len(words)))
    cut = tokenize_tagged(task, tok, max_length=4)  # words past the cut have no label and no prediction
    assert len(cut["val_words"][0]) < len(words) and cut["val_words"][0] == list(range(len(cut["val_words"][0])))


def test_align_skips_special_tokens_and_later_subwords():
    assert align([None, 0, 0, 1, None, 2, 2], [5, 6, 7]) == [IGNORE, 5, IGNORE, 6, IGNORE, 7, IGNORE]


# ---------------------------------------------------------------- the built-in task


def test_builtin_tagging_task(cache_dir, tmp_path):
    root = ensure_builtin_tagging(cache_dir)
    task = load_tagging_task(FinetuneSection(task="token_classification"), cache_dir)
    assert set(task.labels) == {"O", *(f"B-{t}" for t in TYPES), "I-MOD"}
    for words, tags in ((task.train_words, task.train_tags), (task.val_words, task.val_tags)):
        for t in TYPES:  # every type is in many lines of both splits
            b = task.labels.index(f"B-{t}")
            assert sum(b in row for row in tags) >= 100, t
    assert not {tuple(w) for w in task.val_words} & {tuple(w) for w in task.train_words}
    label, baseline = task.majority_baseline()
    assert label == "O" and baseline < 0.86  # at least one word in seven is a name to tag
    rows = [json.loads(ln) for ln in (root / "train.jsonl").read_text().splitlines()]
    pairs = {(w, t) for r in rows for w, t in zip(r["tokens"], r["tags"], strict=True)}
    assert {("def", "O"), ("import", "O"), ("os", "B-MOD"), ("ValueError", "B-CLS")} <= pairs
    again = ensure_builtin_tagging(tmp_path)  # built from scratch elsewhere: the same bytes
    for name in ("train.jsonl", "val.jsonl", "task.json"):
        assert (again / name).read_bytes() == (root / name).read_bytes()


# ---------------------------------------------------------------- fine-tuning on it


def test_finetuning_on_the_builtin_task_beats_the_majority_baseline(tmp_path_factory, cache_dir, tmp_path):
    """3 epochs from a random debug GPT-2 through a real DeepSpeed ZeRO-2 engine in this process;
    best/ is an AutoModelForTokenClassification whose scores plain transformers reproduces."""
    import torch

    from ptm_dist.dist import init_single_process
    from ptm_dist.finetune.driver import prepare_task
    from ptm_dist.finetune.worker import FinetuneSpec, read_epochs, run_epochs

    model = make_hub_model(tmp_path_factory.getbasetemp() / "hub-gpt2", "gpt2")
    cfg = load(None, [f"data.cache_dir={cache_dir}", f"run.storage={tmp_path}", "finetune.task=token_classification",
                      "finetune.max_length=48", "finetune.batch_size=16", "finetune.epochs=3", "finetune.lr=5e-3",
                      "tune.metric=f1", "tracking.wandb=disabled", "zero.stage=2", "train.precision=fp32"])
    data, info = prepare_task(cfg, str(model))
    assert info["majority_label"] == "O"
    init_single_process(torch.device("cpu"))

    class Reporter:  # no Ray: checkpoints are made and dropped, as a trial's would be uploaded
        log_first = True

        def checkpoint(self):
            return None

        def report(self, metrics, ckpt_dir, epoch):
            assert (Path(ckpt_dir) / "rank_0.pt").exists()

    out = tmp_path / "run"
    spec = FinetuneSpec(job=cfg, out_dir=str(out), base_dir=str(model), task=data, pad_id=info["pad_id"])
    run_epochs(spec, 0, 1, torch.device("cpu"), Reporter())
    epochs = read_epochs(str(out))
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    best = max(epochs, key=lambda e: e["f1"])
    assert {"accuracy", "precision", "recall", "f1", "eval_loss"} <= set(best)
    print(f"best epoch {best}; majority baseline {info['majority_baseline']:.4f}")
    assert best["accuracy"] > info["majority_baseline"] + 0.03, (best, info["majority_baseline"])
    assert best["f1"] > 0.3, best  # the majority baseline finds no entity at all
    root = ensure_builtin_tagging(cache_dir)
    val_rows = [json.loads(ln) for ln in (root / "val.jsonl").read_text().splitlines()]
    acc, found, n_gold = plain_transformers_tagging(out / "best", val_rows, max_length=48)
    assert acc == pytest.approx(best["accuracy"], abs=1e-9)
    assert found / n_gold == pytest.approx(best["recall"], abs=1e-9)
