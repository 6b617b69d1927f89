"""`ptm eval`: downstream evaluation with EleutherAI's lm-evaluation-harness.

    ptm eval runs/tiny --tasks ptm_builtin_docstrings            # the built-in task, offline
    ptm eval /models/gpt2 --tasks hellaswag,arc_easy --num-fewshot 0   # harness tasks (downloaded)
    ptm eval runs/tiny --tasks my_task --include-path my_tasks/   # harness task YAML + local data

SRC is what ``ptm generate`` takes: a Hugging Face model directory, a ptm run (its newest complete
checkpoint) or a ptm checkpoint, local or in object storage; a run or checkpoint is exported
first. The model (a causal LM) is handed, as an object, to the harness's own Hugging Face adapter
(``HFLM``), which does the scoring; nothing of the harness is reimplemented here.

Results go to ``<SRC>/eval/<UTC time>.json`` (the harness's per-task metrics, the task configs
and versions, and what was evaluated) and, for a run, into ``metrics.jsonl`` as one line at the
evaluated checkpoint's step with ``eval/<task>/<metric>`` keys, next to the training lines
(``ptm report`` does not plot them yet). A table is printed.

Two built-in tasks (multiple choice, 4 options, chance 25%) are made from the held-out side of
the built-in corpus only (modules the default pretraining run never trains on,
ptm_dist.data.corpus; passages that recur in training modules are left out). Each item gives 12
words of a standard-library docstring and asks for the 6 that follow:

- ``ptm_builtin_docstrings``: the wrong choices are the 6 words at such a place in three other
  held-out docstrings (knowing what the text is about helps);
- ``ptm_builtin_word_order``: the wrong choices are the true 6 words in three other orders
  (knowing how the text is written is enough; a small model learns this first).

They are written once into the data cache as harness task YAML plus jsonl files, so they work
offline, for any SRC.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ptm_dist import storage
from ptm_dist.errors import ConfigError

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


def _quiet_harness():
    """The harness's and datasets' logging and progress bars kept to warnings and off."""
    import logging

    for name in ("lm-eval", "lm_eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def _metrics(task_results: dict) -> dict[str, float]:
    """{metric: value} of one task's harness results (``acc,none`` -> ``acc``), stderr left out."""
    out = {}
    for key, value in task_results.items():
        metric, comma, filt = key.partition(",")  # the harness names metrics "metric,filter"
        if not comma or not isinstance(value, int | float) or isinstance(value, bool) or "stderr" in metric:
            continue
        out[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


def _last_frame(e: BaseException) -> str:
    """The source line an exception was raised at."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return frames[-1].line or "" if frames else ""


def evaluate(src: str, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, include_path: str | None = None, device: str | None = None,
             cache: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the harness on ``src``: {"src", "step" (a run's or checkpoint's, else None),
    "tasks": {task: {metric: value}}, "harness": the harness's own results dict}."""
    from ptm_dist.config import cache_dir, load
    from ptm_dist.generate import open_model, quiet_output

    if not tasks:
        raise ConfigError("--tasks: name at least one task (for example ptm_builtin_docstrings)")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such directory")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError(f"ptm eval needs lm-evaluation-harness (pip install lm-eval): {e}") from e
    _quiet_harness()
    builtin = any(t in BUILTIN_TASKS for t in tasks)
    paths = [str(builtin_task_dir(cache or cache_dir(load(None, []))))] if builtin else []
    if include_path is not None:
        paths.append(str(Path(include_path).resolve()))
    with quiet_output():
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)}; the harness knows {len(manager.all_tasks)} "
                          f"(lm-eval ls tasks), {' and '.join(BUILTIN_TASKS)} are built in, and --include-path adds "
                          "task YAML files")
    src = storage.absolute(src)
    with open_model(src, device) as gen:
        with quiet_output():
            lm = HFLM(pretrained=gen.model, tokenizer=gen.tokenizer, batch_size=batch_size, device=gen.device)
        t0 = time.time()
        try:
            with quiet_output():
                harness = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                                  task_manager=manager, log_samples=False, random_seed=seed,
                                                  numpy_random_seed=seed, torch_random_seed=seed,
                                                  fewshot_random_seed=seed, bootstrap_iters=0)
        except AssertionError as e:  # the harness asserts that an answer fits the model's context
            if "max_length" not in _last_frame(e):
                raise
            raise ConfigError(f"{src}: an answer of --tasks {','.join(tasks)} is longer than the model's "
                              f"context ({lm.max_length} tokens); evaluate a model with a longer context") from e
        seconds, step = time.time() - t0, gen.step
    if harness is None:
        raise ConfigError("lm-evaluation-harness returned no results")
    results = {task: _metrics(harness["results"].get(task, {})) for task in tasks}
    return {"src": src, "step": step, "tasks": results, "seconds": seconds, "num_fewshot": num_fewshot,
            "limit": limit, "n_samples": harness.get("n-samples", {}),
            "harness": {k: harness.get(k) for k in ("results", "configs", "versions", "n-shot")}}


def format_table(result: dict) -> str:
    rows = [(task, metric, f"{value:.4f}") for task, metrics in result["tasks"].items()
            for metric, value in metrics.items()]
    widths = [max(len(r[i]) for r in [("task", "metric", "value"), *rows]) for i in range(3)]
    lines = [f"{'task':<{widths[0]}}  {'metric':<{widths[1]}}  {'value':>{widths[2]}}"]
    lines += [f"{t:<{widths[0]}}  {m:<{widths[1]}}  {v:>{widths[2]}}" for t, m, v in rows]
    where = f"step {result['step']} of " if result["step"] is not None else ""
    lines.append(f"({where}{result['src']}; {result['seconds']:.1f} s)")
    return "\n".join(lines)


def save_results(result: dict) -> str:
    """Write ``<SRC>/eval/<time>.json`` and, for a run, a metrics.jsonl line; returns the json's path."""
    src = result["src"]
    path = storage.join(src, "eval", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ".json")
    storage.write_text(path, json.dumps(result, indent=1, default=str) + "\n")
    metrics = storage.join(src, "metrics.jsonl")
    if result["step"] is not None and storage.exists(metrics):  # a run (a checkpoint has no metrics.jsonl)
        line = {"step": result["step"]}
        line.update({f"eval/{task}/{m}": v for task, ms in result["tasks"].items() for m, v in ms.items()})
        text = storage.read_text(metrics)
        storage.write_text(metrics, text + ("" if not text or text.endswith("\n") else "\n") + json.dumps(line) + "\n")
    return path


def parse_tasks(tasks: str) -> list[str]:
    """``--tasks T1,T2`` as a list of names."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names or not all(re.fullmatch(r"[\w.\-]+", t) for t in names):
        raise ConfigError(f"--tasks {tasks!r}: a comma-separated list of task names")
    return names
