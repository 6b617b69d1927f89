"""ptm_dist.evaluate and ptm_dist.harness without a model: the built-in multiple-choice task (made from held-out text
only), the harness's metric names, and the one-line errors of task lists. `ptm eval` itself on a
trained run: tests/e2e/test_evaluate.py."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ptm_dist.errors import ConfigError
from ptm_dist.evaluate import evaluate, parse_tasks
from ptm_dist.harness import (
    BUILTIN_TASKS,
    CHOICE_WORDS,
    CONTEXT_WORDS,
    builtin_task_dir,
    docstring_items,
    metrics_of,
    word_order_items,
)


def _texts(n: int) -> list[str]:
    return [" ".join(f"t{t}w{w}" for w in range(40)) for t in range(n)]


def test_items_pair_each_context_with_its_own_continuation_and_three_from_other_texts():
    texts = _texts(30)
    items = docstring_items(texts, n=60, seed=3)
    assert items == docstring_items(texts, n=60, seed=3) and items != docstring_items(texts, n=60, seed=4)
    assert len(items) == 60  # 30 texts x 2 windows of 18 words
    for it in items:
        ctx = it["context"].split()
        assert len(ctx) == CONTEXT_WORDS and len(set(it["choices"])) == 4
        text = ctx[0].split("w")[0]
        true = it["choices"][it["label"]]
        start = int(ctx[-1].split("w")[1]) + 1
        assert true == " " + " ".join(f"{text}w{w}" for w in range(start, start + CHOICE_WORDS))
        wrong = [c for i, c in enumerate(it["choices"]) if i != it["label"]]
        assert all(c.split()[0].split("w")[0] != text for c in wrong)  # never from the same text
    labels = Counter(it["label"] for it in items)
    assert set(labels) == {0, 1, 2, 3} and max(labels.values()) <= 25  # the answer's place is not a giveaway


def test_word_order_items_offer_the_true_words_in_three_other_orders():
    texts = _texts(20)
    items = word_order_items(texts, n=30, seed=1)
    assert len(items) == 30 and items == word_order_items(texts, n=30, seed=1)
    for it in items:
        true = it["choices"][it["label"]]
        assert len(set(it["choices"])) == 4 and all(sorted(c.split()) == sorted(true.split()) for c in it["choices"])
        start = int(it["context"].split()[-1].split("w")[1]) + 1
        text = it["context"].split()[0].split("w")[0]
        assert true == " " + " ".join(f"{text}w{w}" for w in range(start, start + CHOICE_WORDS))


def test_builtin_tasks_are_made_from_held_out_text_only(cache_dir):
    """Every item's context and true continuation is in the built-in corpus's held-out shards and
    in none of its training shards; each task YAML names the jsonl it was written with."""
    from ptm_dist.data.corpus import ensure_builtin_corpus

    task_dir = builtin_task_dir(cache_dir)
    assert builtin_task_dir(cache_dir) == task_dir  # written once
    corpus = ensure_builtin_corpus(cache_dir)

    def collapsed(side: str) -> str:
        return "\n".join(" ".join(json.loads(ln)["text"].split()) for p in sorted(corpus.glob(f"{side}-*.jsonl"))
                         for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip())

    val, train = collapsed("val"), collapsed("train")
    for task in BUILTIN_TASKS:
        items = [json.loads(ln) for ln in (task_dir / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) >= 300, task
        passages = [it["context"] + it["choices"][it["label"]] for it in items]
        assert all(p in val for p in passages)
        leaked = [p for p in passages if p in train]
        assert not leaked, leaked[:3]
        yaml_text = (task_dir / f"{task}.yaml").read_text()
        assert f"task: {task}\n" in yaml_text and json.dumps(str(task_dir / f"{task}.jsonl")) in yaml_text


def test_harness_metric_names_and_task_list_errors(cache_dir):
    assert metrics_of({"alias": "x", "sample_len": 40, "acc,none": 0.5, "acc_stderr,none": "N/A",
                     "acc_norm,none": 0.25, "exact_match,strict-match": 1.0}) == {
        "acc": 0.5, "acc_norm": 0.25, "exact_match_strict-match": 1.0}
    assert parse_tasks(" a_b , c.d-e ") == ["a_b", "c.d-e"]
    for bad in ("", " , ", "a;b"):
        with pytest.raises(ConfigError, match="--tasks"):
            parse_tasks(bad)
    with pytest.raises(ConfigError) as err:
        evaluate("/nonexistent", ["ptm_builtin_docstrings", "no_such_task_xyz"], cache=cache_dir)
    assert "unknown task(s) no_such_task_xyz" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--include-path /nonexistent: no such directory"):
        evaluate("/nonexistent", ["x"], include_path="/nonexistent")
