"""`ptm eval` on a trained run (a copy of the session's tracked run, tests/conftest.py) with the
real lm-evaluation-harness, offline: the built-in task and a user's task file (--include-path),
the table, the results file and the run's metrics line; a bad SRC is one line. The parts without
a model: tests/unit/test_evaluate.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

MY_TASK = """\
task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _my_task(tmp_path: Path) -> Path:
    """A user's own multiple-choice task: harness YAML next to its jsonl data (6 questions)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"def f{i}(x): return", "choices": [" x", " (", " def", " import"], "answer": 0}
            for i in range(6)]
    (tasks / "my_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "my_mc.yaml").write_text(MY_TASK.format(data=json.dumps(str(tasks / "my_mc.jsonl"))))
    return tasks


def _error_lines(stderr: str) -> list[str]:
    """ptm's error lines and tracebacks in captured stderr (a library's progress bar may end
    without a newline just before ptm's line)."""
    lines = [ln[ln.index("ptm eval:"):] if "ptm eval:" in ln else ln for ln in stderr.splitlines()]
    return [ln for ln in lines if ln.startswith("ptm eval:") or "Traceback" in ln]


def _accuracies(metrics: dict, n: int) -> bool:
    """Accuracies over ``n`` questions: counts of right answers over n."""
    return bool(metrics) and all(0 <= v <= 1 and abs(v * n - round(v * n)) < 1e-9 for v in metrics.values())


def test_eval_of_a_run_writes_results_and_a_metrics_line(tracked_run, tmp_path):
    """`ptm eval RUN --tasks my_mc --include-path DIR` in a subprocess: the table, the results
    file under the run, and the run's metrics.jsonl gaining one line at the evaluated step."""
    run = tmp_path / "run"
    shutil.copytree(tracked_run.run_dir, run)
    before = (run / "metrics.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "eval", str(run), "--tasks", "my_mc",
                           "--include-path", str(_my_task(tmp_path))],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0].split() == ["task", "metric", "value"] and out[1].split()[:2] == ["my_mc", "acc"]
    assert out[2].startswith(f"(step 18 of {run};")
    path = Path(out[3].removeprefix("results: "))
    assert path.parent == run / "eval" and path.suffix == ".json" and len(out) == 4
    result = json.loads(path.read_text())
    assert result["step"] == 18 and result["n_samples"]["my_mc"]["effective"] == 6
    assert _accuracies(result["tasks"]["my_mc"], 6)
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(before)
    line = json.loads(after[len(before):])
    assert line == {"step": 18, "eval/my_mc/acc": result["tasks"]["my_mc"]["acc"]}


def test_eval_builtin_task_on_a_hub_model_and_one_line_errors(tracked_run, tmp_path, capsys):
    """In this process (ptm_dist.cli.main, so what libraries write to sys.stdout and sys.stderr
    is captured with ptm's lines; the subprocess test checks the terminal): the built-in tasks on
    a Hugging Face directory (results under it, no metrics line); the same task on the tracked
    run, whose model sees 32 tokens, and a missing SRC: one error line each, exit 2."""
    from hub_helpers import make_hub_model

    from ptm_dist.cli import main

    hub = make_hub_model(tmp_path / "gpt2", "gpt2")
    tasks = ["ptm_builtin_docstrings", "ptm_builtin_word_order"]
    assert main(["eval", str(hub), "--tasks", ",".join(tasks), "--limit", "24"]) == 0
    out = capsys.readouterr().out.splitlines()
    out = out[out.index(next(ln for ln in out if ln.split() == ["task", "metric", "value"])):]
    assert [ln.split()[:2] for ln in out[1:5]] == [[t, m] for t in tasks for m in ("acc", "acc_norm")]
    assert out[5].startswith(f"({hub};")
    result = json.loads(Path(out[6].removeprefix("results: ")).read_text())
    assert result["step"] is None
    for task in tasks:
        assert result["n_samples"][task]["effective"] == 24 and _accuracies(result["tasks"][task], 24)
    assert not (hub / "metrics.jsonl").exists()

    assert main(["eval", str(tracked_run.run_dir), "--tasks", "ptm_builtin_docstrings", "--limit", "24"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("ptm eval: error: "), err
    assert "longer than the model's context (32 tokens)" in err[0]
    assert main(["eval", str(tmp_path / "nothing"), "--tasks", "ptm_builtin_docstrings"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("ptm eval: error: ") and "nothing" in err[0], err
