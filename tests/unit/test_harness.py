"""ptm_dist.harness without a model: train.eval_tasks as a TaskBundle that workers on other nodes
can write out (the built-in tasks and local task YAML files travel as text, with their data),
checked against the real harness's task index, and the one-line errors of bad entries. Scoring
the weights being trained: tests/e2e/test_train.py (ZeRO-2 and ZeRO-3 runs)."""

from __future__ import annotations

import json
import shutil

import pytest

from ptm_dist.config import load
from ptm_dist.errors import ConfigError
from ptm_dist.harness import TASK_DIR, builtin_task_dir, bundle_tasks, check_bundle, task_manager

TASK = """\
task: my_local_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: !function helpers.text
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def _user_task(root):
    root.mkdir()
    data = root / "items.jsonl"
    data.write_text(json.dumps({"q": "a", "choices": ["x", "y"], "label": 0}) + "\n")
    (root / "helpers.py").write_text("def text(doc):\n    return doc['q']\n")
    (root / "task.yaml").write_text(TASK.format(data=data))
    return root / "task.yaml", data


def test_bundle_carries_builtin_and_local_task_files_to_a_directory_of_their_own(cache_dir, tmp_path):
    """Written under another root (a worker's temporary directory) after the originals are gone,
    every file is there, every path in a YAML points into the new root, and the harness knows
    all the names from that root alone."""
    yaml_path, _ = _user_task(tmp_path / "mine")
    bundle = bundle_tasks(["ptm_builtin_word_order", str(yaml_path), "ptm_builtin_docstrings", "arc_easy"],
                          cache_dir, "train.eval_tasks")
    assert bundle.names == ("ptm_builtin_word_order", "my_local_task", "ptm_builtin_docstrings", "arc_easy")
    assert bundle.harness_names == ("arc_easy",)  # the harness's own: its data is downloaded by each node
    rels = dict(bundle.files)
    assert all(TASK_DIR in rels[r] for r in rels if r.endswith(".yaml"))
    assert str(tmp_path) not in "".join(rels.values()) and str(builtin_task_dir(cache_dir)) not in "".join(
        rels.values())
    shutil.rmtree(tmp_path / "mine")
    other = tmp_path / "worker"
    include = bundle.write(other)
    assert include == str(other)
    written = (other / "file1" / "task.yaml").read_text()
    assert f"test: {other}/file1/data/0-items.jsonl" in written and "!function helpers.text" in written
    assert (other / "file1" / "helpers.py").exists()
    assert (other / "file1" / "data" / "0-items.jsonl").read_text() == json.dumps(
        {"q": "a", "choices": ["x", "y"], "label": 0}) + "\n"
    for task in ("ptm_builtin_word_order", "ptm_builtin_docstrings"):
        yaml_text = (other / "builtin" / f"{task}.yaml").read_text()
        assert json.dumps(f"{other}/builtin/{task}.jsonl") in yaml_text
        assert (other / "builtin" / f"{task}.jsonl").read_text() == (
            builtin_task_dir(cache_dir) / f"{task}.jsonl").read_text()
    # The local tasks alone (no index of the harness's own thousands of tasks: seconds saved).
    manager = task_manager([include], harness_tasks=False)
    assert set(manager.all_tasks) == {"my_local_task", "ptm_builtin_word_order", "ptm_builtin_docstrings"}
    check_bundle(bundle_tasks(["ptm_builtin_docstrings", str(other / "file1" / "task.yaml")], cache_dir, "x"), "x")


def test_bad_task_entries_are_one_line_errors_naming_the_entry(cache_dir, tmp_path):
    yaml_path, data = _user_task(tmp_path / "mine")
    cases = []
    with pytest.raises(ConfigError) as err:
        check_bundle(bundle_tasks(["ptm_builtin_word_order", "no_such_task_xyz"], cache_dir, "train.eval_tasks"),
                     "train.eval_tasks")
    cases.append((err, "train.eval_tasks: unknown task(s) no_such_task_xyz"))
    with pytest.raises(ConfigError) as err:
        bundle_tasks([str(tmp_path / "missing.yaml")], cache_dir, "train.eval_tasks")
    cases.append((err, f"train.eval_tasks: {tmp_path}/missing.yaml: not a readable task YAML file"))
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError) as err:
        bundle_tasks([str(tmp_path / "nameless.yaml")], cache_dir, "train.eval_tasks")
    cases.append((err, f"{tmp_path}/nameless.yaml: a task file needs a 'task: NAME' line"))
    data.unlink()
    with pytest.raises(ConfigError) as err:
        bundle_tasks([str(yaml_path)], cache_dir, "train.eval_tasks")
    cases.append((err, f"{yaml_path}: dataset_kwargs.data_files {data}: no such file"))
    for err, want in cases:
        assert want in str(err.value) and "\n" not in str(err.value), str(err.value)
    for bad, want in ((["a b"], "'a b' is neither a task name nor a task YAML file"),
                      (["x", "x"], "a task is listed twice")):
        with pytest.raises(ConfigError, match=want):
            load(None, [f"train.eval_tasks={json.dumps(bad)}"])
    assert load(None, []).train.eval_tasks == [] and load(None, []).train.eval_tasks_limit == 200
