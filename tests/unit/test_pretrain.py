"""`ptm pretrain` (ptm_dist.train.pretrain) checks the job's data before Ray starts: a missing data
path or an unreadable tokenizer is one line in about a second, and no run directory is written."""

from __future__ import annotations

import json
import time

from ptm_dist.cli import main


def run(tmp_path, capsys, *sets: str) -> tuple[int, list[str], float]:
    t0 = time.perf_counter()
    rc = main(["pretrain", "--set", f"run.storage={tmp_path / 'runs'}", *[a for s in sets for a in ("--set", s)]])
    return rc, capsys.readouterr().err.strip().splitlines(), time.perf_counter() - t0


def test_a_missing_data_path_is_reported_before_ray_starts(tmp_path, capsys):
    rc, err, seconds = run(tmp_path, capsys, f"data.sources=[{{path: {tmp_path}/nowhere/*.jsonl}}]")
    print(f"missing data path reported in {seconds:.2f}s")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"ptm pretrain: error: {tmp_path}/nowhere")
    assert seconds < 5  # 14 s when it was checked after Ray had started
    assert not (tmp_path / "runs").exists()


def test_an_unreadable_tokenizer_is_one_line_before_ray_starts(tmp_path, capsys):
    corpus, tok = tmp_path / "corpus", tmp_path / "tok"
    corpus.mkdir()
    tok.mkdir()
    for name in ("a", "b"):
        (corpus / f"{name}.jsonl").write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    (tok / "tokenizer.json").write_text('{"model": 3}')
    rc, err, seconds = run(tmp_path, capsys, f"data.sources=[{{path: {corpus}}}]", f"data.tokenizer.path={tok}")
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"ptm pretrain: error: {tok}/tokenizer.json: not a tokenizer ptm can use: ")
    assert seconds < 5 and not (tmp_path / "runs").exists()


def test_a_restarted_worker_group_keeps_the_commands_start_up_record(tmp_path):
    """The summary's "time to first step" is the command's first worker group's: a group Ray
    Train starts later (a replaced worker, an elastic resize) does not write its own over it."""
    from ptm_dist.train.loop import STARTUP_FILE, first_group_of_command
    from ptm_dist.train.pretrain import startup_line

    run_dir = str(tmp_path)
    marks = {"start": 100.0, "prepared": 102.0, "ray": 110.0, "fit": 111.0}
    launched_at = 110.5
    assert first_group_of_command(run_dir, launched_at)  # no record yet
    record = {"worker_start": 112.0, "model_ready": 115.0, "loop_start": 116.0, "first_batch_wait_s": 0.5,
              "first_step": 117.0, "step": 1}
    (tmp_path / STARTUP_FILE).write_text(json.dumps({**record, "worker_start": 50.0}))  # an earlier command's
    assert first_group_of_command(run_dir, launched_at)
    (tmp_path / STARTUP_FILE).write_text(json.dumps(record))  # this command's first group
    assert not first_group_of_command(run_dir, launched_at)  # a restarted group leaves it alone
    assert first_group_of_command(run_dir, None)  # callers without a launch time always write
    line = startup_line(run_dir, marks)
    assert line == ("time to first step: 17.0s (data and tokenizer 2.0s, Ray start 8.0s, workers start 2.0s, "
                    "model and engine 3.0s, resume, tracking, step-0 evaluation 1.0s, first batch 0.5s, "
                    "first step 0.5s)"), line
