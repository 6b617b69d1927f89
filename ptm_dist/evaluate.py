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
evaluated checkpoint's step with ``eval/<task>/<metric>`` keys, next to the training lines and
those of ``train.eval_tasks`` (``ptm report`` plots them against tokens). A table is printed.

The built-in tasks (``ptm_builtin_docstrings``, ``ptm_builtin_word_order``; offline, made from
held-out text only) and the call into the harness live in ptm_dist.harness, which the
pretraining loop shares.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ptm_dist import storage
from ptm_dist.errors import ConfigError
from ptm_dist.harness import BUILTIN_TASKS, builtin_task_dir, check_names, run_tasks, task_manager


def evaluate(src: str, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, include_path: str | None = None, device: str | None = None,
             cache: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Run the harness on ``src``: {"src", "step" (a run's or checkpoint's, else None),
    "tasks": {task: {metric: value}}, "harness": the harness's own results dict}."""
    from ptm_dist.config import cache_dir, load
    from ptm_dist.generate import open_model

    if not tasks:
        raise ConfigError("--tasks: name at least one task (for example ptm_builtin_docstrings)")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such directory")
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ConfigError(f"ptm eval needs lm-evaluation-harness (pip install lm-eval): {e}") from e
    builtin = any(t in BUILTIN_TASKS for t in tasks)
    paths = [str(builtin_task_dir(cache or cache_dir(load(None, []))))] if builtin else []
    if include_path is not None:
        paths.append(str(Path(include_path).resolve()))
    manager = task_manager(paths, harness_tasks=include_path is not None or not all(t in BUILTIN_TASKS for t in tasks))
    check_names(tasks, manager, "--tasks")
    src = storage.absolute(src)
    with open_model(src, device) as gen:
        results, harness, seconds = run_tasks(gen.model, gen.tokenizer, list(tasks), manager,
                                              num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                              seed=seed, where=src)
        step = gen.step
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
