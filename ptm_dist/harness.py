"""lm-evaluation-harness inside ptm-dist: the built-in tasks, task files that travel to Ray
workers, and one call that scores a model object with the harness's own ``HFLM`` adapter.

    manager, bundle = check_tasks(["ptm_builtin_word_order"], cache, what="train.eval_tasks")
    scores, harness, seconds = run_tasks(model, tokenizer, bundle.names, manager, limit=200)

Used by ``ptm eval`` (ptm_dist.evaluate, on a saved model) and by the pretraining loop
(``train.eval_tasks``, on the weights being trained). Nothing of the harness's scoring is
reimplemented: the model and tokenizer are handed to ``HFLM`` as objects, which keeps it from
building an accelerator of its own from the distributed environment (inside a Ray Train worker it
would join the training group), so it evaluates on one process, world size 1.

Two built-in tasks (multiple choice, 4 options, chance 25%) are made from the held-out side of
the built-in corpus only (modules the default pretraining run never trains on,
ptm_dist.data.corpus; passages that recur in training modules are left out). Each item gives 12
words of a standard-library docstring and asks for the 6 that follow:

- ``ptm_builtin_docstrings``: the wrong choices are the 6 words at such a place in three other
  held-out docstrings (knowing what the text is about helps);
- ``ptm_builtin_word_order``: the wrong choices are the true 6 words in three other orders
  (knowing how the text is written is enough; a small model learns this first).

They are written once into the data cache as harness task YAML plus jsonl files, so they work
offline, for any model.

A ``TaskBundle`` carries the files of the built-in tasks and of local task YAML files (with their
local ``data_files`` and the Python files next to them) as text, so that workers on other nodes,
which cannot read this machine's cache, write them into a directory of their own; tasks named by
their harness names travel as names (the harness downloads their data on each node).
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ptm_dist.errors import ConfigError
from ptm_dist.runlogs import quiet_output

DOCSTRINGS = "ptm_builtin_docstrings"
WORD_ORDER = "ptm_builtin_word_order"
BUILTIN_TASKS = (DOCSTRINGS, WORD_ORDER)
BUILTIN_VERSION = 2
BUILTIN_ITEMS = 1000  # at most, per task
CONTEXT_WORDS = 12  # the docstring's words the model is given
CHOICE_WORDS = 6  # the length of each of the four continuations
_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def _windows(texts: Iterable[str], exclude: str, seed: int) -> list[tuple[int, str, list[str]]]:
    """(text index, context, continuation words) of every run of CONTEXT_WORDS + CHOICE_WORDS
    words in ``texts`` (whitespace collapsed) whose words do not occur in ``exclude``, shuffled."""
    size = CONTEXT_WORDS + CHOICE_WORDS
    windows = []
    for t, text in enumerate(texts):
        words = text.split()
        for k in range(len(words) // size):
            w = words[k * size:(k + 1) * size]
            context, ending = " ".join(w[:CONTEXT_WORDS]), w[CONTEXT_WORDS:]
            if f"{context} {' '.join(ending)}" not in exclude:
                windows.append((t, context, ending))
    random.Random(seed).shuffle(windows)
    return windows


def _item(context: str, true: str, wrong: list[str], rng: random.Random) -> dict:
    label = rng.randrange(4)
    return {"context": context, "choices": wrong[:label] + [true] + wrong[label:], "label": label}


def docstring_items(texts: Iterable[str], n: int = BUILTIN_ITEMS, seed: int = 0, exclude: str = "") -> list[dict]:
    """Up to ``n`` items of ptm_builtin_docstrings: CONTEXT_WORDS words of a text as context, the
    CHOICE_WORDS that follow as the true continuation, and the continuations of three windows of
    other texts as the wrong ones. Windows whose words occur in ``exclude`` (the training text)
    are left out. Deterministic for a seed."""
    windows = _windows(texts, exclude, seed)
    endings = [" " + " ".join(e) for _, _, e in windows]
    rng = random.Random(seed)
    items = []
    for i, (t, context, _) in enumerate(windows[:n]):
        wrong: list[str] = []
        for j in rng.sample(range(len(windows)), len(windows)):
            if windows[j][0] != t and endings[j] != endings[i] and endings[j] not in wrong:
                wrong.append(endings[j])
            if len(wrong) == 3:
                break
        if len(wrong) == 3:
            items.append(_item(context, endings[i], wrong, rng))
    return items


def word_order_items(texts: Iterable[str], n: int = BUILTIN_ITEMS, seed: int = 0, exclude: str = "") -> list[dict]:
    """Up to ``n`` items of ptm_builtin_word_order: the same windows as docstring_items, but the
    wrong choices are the true continuation's words in three other orders (a model that has
    learnt how the language is written prefers the true order; no topic knowledge needed)."""
    rng = random.Random(seed)
    items = []
    for _, context, ending in _windows(texts, exclude, seed)[:n]:
        true = " " + " ".join(ending)
        if len(set(ending)) < 3:  # too few distinct words for three other orders
            continue
        wrong: list[str] = []
        while len(wrong) < 3:
            order = rng.sample(ending, len(ending))
            text = " " + " ".join(order)
            if text != true and text not in wrong:
                wrong.append(text)
        items.append(_item(context, true, wrong, rng))
    return items


def builtin_task_dir(cache: Path) -> Path:
    """The built-in tasks' directory (a task YAML and a jsonl file per task), written once per
    Python version from the built-in corpus's held-out shards."""
    from ptm_dist.data.corpus import builtin_dir, ensure_builtin_corpus

    corpus = ensure_builtin_corpus(cache)
    out = cache / "eval-tasks" / f"{builtin_dir(cache).name}-v{BUILTIN_VERSION}"
    if all((out / f"{task}.yaml").exists() for task in BUILTIN_TASKS):
        return out

    def texts(side: str) -> list[str]:
        found = []
        for shard in sorted(corpus.glob(f"{side}-*.jsonl")):
            with open(shard, encoding="utf-8") as f:
                found.extend(json.loads(line)["text"] for line in f if line.strip())
        return found

    # A module is wholly held out, but some docstrings are repeated in training modules (a
    # subclass or a wrapper documents the same call): those passages are left out.
    seen = "\n".join(" ".join(t.split()) for t in texts("train"))
    held_out = texts("val")
    tmp = Path(tempfile.mkdtemp(prefix="ptm-tasks-", dir=cache))
    for task, make in ((DOCSTRINGS, docstring_items), (WORD_ORDER, word_order_items)):
        items = make(held_out, exclude=seen)
        (tmp / f"{task}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
        (tmp / f"{task}.yaml").write_text(
            _TASK_YAML.format(task=task, data=json.dumps(str(out / f"{task}.jsonl")), version=BUILTIN_VERSION))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)  # whole or not at all; a concurrent writer that won leaves the same files
    except OSError:
        if not (out / f"{WORD_ORDER}.yaml").exists():
            raise
    return out


def quiet_harness() -> None:
    """The harness's and datasets' logging and progress bars kept to warnings and off."""
    import logging

    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def metrics_of(task_results: dict) -> dict[str, float]:
    """{metric: value} of one task's harness results (``acc,none`` -> ``acc``), stderr left out."""
    out = {}
    for key, value in task_results.items():
        metric, comma, filt = key.partition(",")  # the harness names metrics "metric,filter"
        if not comma or not isinstance(value, int | float) or isinstance(value, bool) or "stderr" in metric:
            continue
        out[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


def last_frame(e: BaseException) -> str:
    """The source line an exception was raised at."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return frames[-1].line or "" if frames else ""


# ------------------------------------------------------------------ task files that travel

TASK_DIR = "@PTM_TASK_DIR@"  # stands for the directory a bundle is written into
MAX_BUNDLE_BYTES = 64 << 20  # task files travel inside the workers' spec (Ray's object store)


@dataclass(frozen=True)
class TaskBundle:
    """Task names, and the files (relative path -> text, with TASK_DIR for the directory they are
    written to) that define the local ones."""

    names: tuple[str, ...]
    files: tuple[tuple[str, str], ...] = ()
    harness_names: tuple[str, ...] = ()  # the names that are the harness's own tasks (not in files)

    def write(self, root: Path) -> str | None:
        """Write the files under ``root``; the include path for the harness (None: no files)."""
        if not self.files:
            return None
        root.mkdir(parents=True, exist_ok=True)
        for rel, text in self.files:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.replace(TASK_DIR, str(root)), encoding="utf-8")
        return str(root)


class _TagsAsText(yaml.SafeLoader):
    """A YAML loader that reads the harness's tags (``!function utils.x``) as plain text."""


_TagsAsText.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


def _data_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _data_files(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _data_files(item)]
    return []


def task_file(path: Path, what: str, index: int) -> tuple[str, list[tuple[str, str]]]:
    """(task name, files) of a local harness task YAML: the YAML with its local ``data_files``
    pointed at copies under TASK_DIR, and the ``.py`` files next to it (``!function`` helpers)."""
    where = f"{what}: {path}"
    try:
        text = path.read_text(encoding="utf-8")
        conf = yaml.load(text, Loader=_TagsAsText)  # a SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: not a readable task YAML file ({str(e).splitlines()[0]})") from e
    name = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a task file needs a 'task: NAME' line (groups of tasks: name them instead)")
    prefix = f"file{index}"
    files = []
    kwargs = conf.get("dataset_kwargs") or {}
    for k, src in enumerate(_data_files(kwargs.get("data_files") if isinstance(kwargs, dict) else None)):
        if "://" in src:
            continue  # read by each worker itself
        local = Path(src)
        if not local.is_file():
            raise ConfigError(f"{where}: dataset_kwargs.data_files {src}: no such file")
        if src not in text:
            raise ConfigError(f"{where}: dataset_kwargs.data_files {src}: write the path as plain text "
                              "(it is rewritten where the workers put their copy)")
        rel = f"{prefix}/data/{k}-{local.name}"
        text = text.replace(src, f"{TASK_DIR}/{rel}")
        files.append((rel, local.read_text(encoding="utf-8")))
    files.append((f"{prefix}/{path.name}", text))
    files += [(f"{prefix}/{py.name}", py.read_text(encoding="utf-8")) for py in sorted(path.parent.glob("*.py"))]
    return name, files


def bundle_tasks(entries: Iterable[str], cache: Path, what: str) -> TaskBundle:
    """A TaskBundle of task names (built-in, or the harness's), and task YAML file paths."""
    names, files, own = [], [], []
    builtin_added = False
    for i, entry in enumerate(entries):
        if entry.endswith((".yaml", ".yml")):
            name, found = task_file(Path(entry), what, i)
            names.append(name)
            files += found
        elif entry in BUILTIN_TASKS:
            names.append(entry)
            if not builtin_added:
                root = builtin_task_dir(cache)
                for f in sorted(root.iterdir()):
                    text = f.read_text(encoding="utf-8").replace(str(root), f"{TASK_DIR}/builtin")
                    files.append((f"builtin/{f.name}", text))
                builtin_added = True
        else:
            names.append(entry)
            own.append(entry)
    size = sum(len(text.encode()) for _, text in files)
    if size > MAX_BUNDLE_BYTES:
        raise ConfigError(f"{what}: the local task files hold {size / 2**20:.0f} MiB; at most "
                          f"{MAX_BUNDLE_BYTES >> 20} MiB travel to the workers (evaluate larger tasks with ptm eval)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{what}: a task is named twice ({', '.join(names)})")
    return TaskBundle(names=tuple(names), files=tuple(files), harness_names=tuple(own))


def task_manager(include_paths: list[str], harness_tasks: bool = True):
    """The harness's TaskManager over ``include_paths`` and, with ``harness_tasks``, its own
    tasks (indexing those thousands of YAML files takes seconds: left out when no name needs them)."""
    from lm_eval.tasks import TaskManager

    quiet_harness()
    with quiet_output():
        return TaskManager(include_path=include_paths or None, include_defaults=harness_tasks)


def check_names(names: Iterable[str], manager, what: str) -> None:
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{what}: unknown task(s) {', '.join(unknown)}; the harness knows {len(manager.all_tasks)} "
                          f"(lm-eval ls tasks), {' and '.join(BUILTIN_TASKS)} are built in, and task YAML files "
                          "add more")


def check_bundle(bundle: TaskBundle, what: str) -> None:
    """Write the bundle into a temporary directory and check that the harness knows every name."""
    with tempfile.TemporaryDirectory(prefix="ptm-tasks-") as tmp:
        include = bundle.write(Path(tmp))
        check_names(bundle.names, task_manager([include] if include else [], bool(bundle.harness_names)), what)


def job_tasks(cfg) -> TaskBundle | None:
    """A pretraining job's ``train.eval_tasks`` as a TaskBundle for its workers, every name checked
    against the harness (None when the job names none)."""
    if not cfg.train.eval_tasks:
        return None
    from ptm_dist.config import cache_dir

    bundle = bundle_tasks(cfg.train.eval_tasks, cache_dir(cfg), "train.eval_tasks")
    check_bundle(bundle, "train.eval_tasks")
    return bundle


@contextlib.contextmanager
def _as_local_rank_0():
    """LOCAL_RANK 0 while the harness runs: it returns results only where LOCAL_RANK is 0 (under
    tensor-parallel launchers every rank reports rank 0), and a Ray Train worker's LOCAL_RANK is
    its index on the node, although this process scores alone."""
    import os

    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def run_tasks(model, tokenizer, tasks: list[str], manager, *, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 8, seed: int = 0, quiet: bool = True,
              where: str = "the model") -> tuple[dict[str, dict[str, float]], dict, float]:
    """({task: {metric: value}}, the harness's results dict, seconds) of ``model`` (a causal LM
    object, on its device) on ``tasks``, scored by the harness's HFLM on this process alone.

    The harness seeds Python's, numpy's and torch's global generators; callers that train on
    (the pretraining loop) save and restore them around this call."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    quiet_harness()
    hush = quiet_output if quiet else contextlib.nullcontext
    with hush():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.time()
    try:
        with hush(), _as_local_rank_0():
            harness = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, log_samples=False, random_seed=seed,
                                              numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed, bootstrap_iters=0)
    except AssertionError as e:  # the harness asserts that an answer fits the model's context
        if "max_length" not in last_frame(e):
            raise
        raise ConfigError(f"{where}: an answer of {','.join(tasks)} is longer than the model's "
                          f"context ({lm.max_length} tokens); evaluate a model with a longer context") from e
    seconds = time.time() - t0
    if harness is None:
        raise ConfigError("lm-evaluation-harness returned no results")
    return {task: metrics_of(harness["results"].get(task, {})) for task in tasks}, harness, seconds
