"""`ptm generate` on a trained run (the session's tracked run, tests/conftest.py): the run is
exported and sampled, the same seed gives the same text in another process, and the pretraining
summary showed its greedy sample. Ray-free cases: tests/unit/test_generate.py."""

from __future__ import annotations

import subprocess
import sys

from ptm_dist.generate import SUMMARY_PROMPT, Sampling, generate


def test_generate_on_a_trained_run_repeats_with_its_seed(tracked_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The function\nThe function\n")  # each prompt starts from --seed: twice the same text
    proc = subprocess.run([sys.executable, "-m", "ptm_dist.cli", "generate", str(tracked_run.run_dir),
                           "--prompt-file", str(prompts), "--max-new-tokens", "12", "--temperature", "1.0",
                           "--seed", "7"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # DeepSpeed's and transformers' messages stay off the terminal
    first, second = proc.stdout.split("--- prompt 2/2 ---\n")
    assert first.startswith("--- prompt 1/2 ---\nThe function") and first == "--- prompt 1/2 ---\n" + second
    continuation = second.removeprefix("The function").removesuffix("\n")
    assert continuation.strip()
    # ... and the same in this process, from the same seed.
    (again,) = generate(str(tracked_run.run_dir), ["The function"], Sampling(max_new_tokens=12, temperature=1.0,
                                                                             seed=7))
    assert again.text == continuation


def test_the_pretraining_summary_shows_a_greedy_sample(tracked_run):
    for out in (tracked_run.first.stdout, tracked_run.second.stdout):
        summary = out[out.index("== ptm pretrain summary =="):].splitlines()
        lines = [ln for ln in summary if ln.startswith("sample")]
        assert len(lines) == 1 and lines[0].startswith("sample (greedy, "), lines
        assert f"new tokens): {SUMMARY_PROMPT!r} -> '" in lines[0]
