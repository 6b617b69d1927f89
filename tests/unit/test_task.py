"""ptm_dist.finetune.task: task files (jsonl, csv, parquet) and their errors, and the built-in
task (balanced, deterministic). Fine-tuning runs: tests/e2e/test_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptm_dist.config import FinetuneSection
from ptm_dist.errors import DataError
from ptm_dist.finetune.task import FAMILIES, ensure_builtin_task, load_task


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_task_files_csv_and_parquet(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("body,y\n" + "".join(f'"text number {i}, with a comma",{i % 3}\n' for i in range(30)))
    task = load_task(FinetuneSection(data=str(csv_file), text_column="body", label_column="y",
                                     val_fraction=0.2), tmp_path)
    assert task.labels == ["0", "1", "2"]  # integer labels, in numeric order
    assert len(task.val_texts) == 6 and sorted(task.val_labels) == [0, 0, 1, 1, 2, 2]  # per label
    assert not set(task.val_texts) & set(task.train_texts)
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(8)], "label": ["b", "a"] * 4}), tmp_path / "tr.parquet")
    pq.write_table(pa.table({"text": ["x", "y"], "label": ["a", "b"]}), tmp_path / "va.parquet")
    task = load_task(FinetuneSection(data=str(tmp_path / "tr.parquet"), val_data=str(tmp_path / "va.parquet")),
                     tmp_path)
    assert task.labels == ["a", "b"] and task.val_labels == [0, 1] and len(task.train_texts) == 8
    assert task.majority_baseline()[1] == 0.5


@pytest.mark.parametrize("rows, val_rows, expected", [
    ([{"text": "a", "labl": "x"}], None, "no column 'label'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], None, "labels mix strings and integers"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}],
     "do not occur in the training data"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], [{"text": "c", "label": "x"}], "at least 2 labels"),
    ([{"text": "", "label": "x"}], None, "must be non-empty text"),
    ([{"text": "a", "label": [1]}], None, "must be a string or an integer"),
])
def test_task_file_errors(tmp_path, rows, val_rows, expected):
    ft = FinetuneSection(data=_jsonl(tmp_path / "train.jsonl", rows),
                         val_data=_jsonl(tmp_path / "val.jsonl", val_rows) if val_rows else None)
    with pytest.raises(DataError, match=expected) as e:
        load_task(ft, tmp_path)
    assert "\n" not in str(e.value)


def test_task_file_bad_json_and_missing_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not valid JSON"):
        load_task(FinetuneSection(data=str(tmp_path / "bad.jsonl")), tmp_path)
    with pytest.raises(DataError, match="finetune.data .*nope.csv: no such file"):
        load_task(FinetuneSection(data=str(tmp_path / "nope.csv")), tmp_path)


def test_builtin_task_is_balanced_and_deterministic(cache_dir, tmp_path):
    root = ensure_builtin_task(cache_dir)
    task = load_task(FinetuneSection(), cache_dir)
    assert task.labels == list(FAMILIES)
    for split in (task.train_labels, task.val_labels):
        counts = [split.count(i) for i in range(len(task.labels))]
        assert len(set(counts)) == 1, counts  # every family equally often
    _, baseline = task.majority_baseline()
    assert baseline == pytest.approx(1 / len(FAMILIES))
    assert not set(task.train_texts) & set(task.val_texts)
    # Each docstring's own module name is masked, so the family's biggest module rarely names itself.
    conc = [t for t, y in zip(task.train_texts, task.train_labels) if task.labels[y] == "concurrency"]
    assert sum("asyncio" in t.lower() for t in conc) < 0.05 * len(conc)
    again = ensure_builtin_task(tmp_path)  # built from scratch elsewhere: the same bytes
    for name in ("train.jsonl", "val.jsonl", "task.json"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
