"""ptm_dist.cli in-process: build_parser parses every command's arguments, an unknown command
or a missing required argument exits with status 2, and main() turns a user error into one line
on stderr with status 2. `ptm` run as a subprocess: tests/e2e/test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptm_dist.cli import build_parser, main

JOBS = Path(__file__).parents[2] / "jobs"


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_job_commands_take_a_job_file_and_repeated_sets():
    for command in ("pretrain", "finetune", "tune", "pipeline", "prepare"):
        a = parse(command, "jobs/tiny.yaml", "--set", "train.lr=1e-3", "--set", "zero.stage=3")
        assert (a.command, a.job, a.overrides) == (command, "jobs/tiny.yaml", ["train.lr=1e-3", "zero.stage=3"])
    a = parse("pretrain")
    assert (a.job, a.overrides) == (None, [])  # the built-in tiny job
    a = parse("pretrain", "--set=run.name=x", "--set", "run.seed=3")
    assert a.overrides == ["run.name=x", "run.seed=3"]
    assert parse("prepare", "--tokens", "s3://b/tok").tokens == "s3://b/tok"
    assert parse("prepare").tokens is None


def test_bench_export_report_and_plan():
    a = parse("bench", "train", "--steps", "7", "--set", "train.micro_batch=2")
    got = (a.command, a.bench, a.steps, a.warmup, a.search_micro_batch, a.json)
    assert got == ("bench", "train", 7, 5, False, None)
    assert a.overrides == ["train.micro_batch=2"]
    assert parse("bench", "train").steps == 20
    a = parse("bench", "data", "--max-shards", "3", "--scale", "4", "--memory", "--json", "out.json")
    assert (a.bench, a.max_shards, a.scale, a.memory, a.json) == ("data", 3, 4, True, "out.json")
    a = parse("bench", "ckpt", "--storage", "s3://b/p", "--every", "5", "--repeat", "3")
    assert (a.bench, a.storage, a.every, a.repeat, a.json) == ("ckpt", "s3://b/p", 5, 3, None)
    assert (parse("bench", "ckpt").storage, parse("bench", "ckpt").every) == (None, 10)
    a = parse("export", "runs/tiny", "--out", "hf")
    assert (a.command, a.src, a.out) == ("export", "runs/tiny", "hf")
    assert parse("report", "runs/tiny").dir == "runs/tiny"
    a = parse("plan", "job.yaml", "--gpus", "8", "--gpu-mem", "80")
    assert (a.job, a.gpus, a.gpu_mem, a.mfu, a.gpu_tflops, a.precision) == ("job.yaml", 8, 80.0, 0.4, 989.0, "bf16")
    a = parse("plan", "--gpus", "2", "--gpu-mem", "24.5", "--mfu", "0.3", "--precision", "fp32")
    assert (a.job, a.gpus, a.gpu_mem, a.mfu, a.precision) == (None, 2, 24.5, 0.3, "fp32")


def test_submit_and_jobs():
    a = parse("submit", "j.yaml", "--address", "http://h:8265", "--command", "finetune", "--wait", "--set", "a.b=1")
    assert (a.job, a.address, a.job_command, a.wait, a.overrides) == ("j.yaml", "http://h:8265", "finetune", True,
                                                                      ["a.b=1"])
    assert (parse("submit").job_command, parse("submit").wait) == ("pretrain", False)
    a = parse("jobs", "logs", "raysubmit_1", "--follow", "--address", "http://h:8265")
    assert (a.command, a.jobs, a.job_id, a.follow, a.address) == ("jobs", "logs", "raysubmit_1", True, "http://h:8265")
    assert parse("jobs", "logs", "raysubmit_1").follow is False
    assert parse("jobs", "list").jobs == "list" and parse("jobs", "stop", "j1").job_id == "j1"
    assert parse("jobs", "status", "j2").job_id == "j2"


@pytest.mark.parametrize("argv", [
    ["nope"],  # unknown command
    [],  # no command
    ["plan", "--gpus", "8"],  # --gpu-mem is required
    ["plan", "--gpus", "eight", "--gpu-mem", "80"],  # not an int
    ["bench"],  # bench needs train or data
    ["jobs", "logs"],  # a job id
    ["export", "runs/x"],  # --out is required
    ["jobs", "list", "--follow"],  # --follow is for logs only
])
def test_bad_arguments_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("usage: ptm")


def test_main_turns_a_user_error_into_one_line(capsys):
    assert main(["pretrain", "--set", "train.lrr=1"]) == 2  # the job is checked before anything starts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptm pretrain: error: ") and "train.lrr: unknown key" in err[0]
    assert main(["plan", "--gpus", "0", "--gpu-mem", "80"]) == 2
    assert capsys.readouterr().err.strip() == "ptm plan: error: --gpus must be >= 1, --gpu-mem > 0 and --mfu in (0, 1]"


def test_main_runs_plan_in_process(capsys):
    assert main(["plan", str(JOBS / "gpt2-124m.yaml"), "--gpus", "8", "--gpu-mem", "80"]) == 0
    table, _, js = capsys.readouterr().out.partition("\n{")
    assert "recommended: zero" in table and json.loads("{" + js)["gpus"] == 8


def test_a_typo_is_reported_in_a_second_without_loading_torch_or_ray():
    """`ptm pretrain --set train.lrr=1` in a fresh interpreter: one line, before torch, DeepSpeed,
    transformers or Ray are imported (it took 5-7 s when the command imported them first)."""
    import subprocess
    import sys
    import time

    code = ("import sys\nfrom ptm_dist.cli import main\nrc = main(['pretrain', '--set', 'train.lrr=1'])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'deepspeed', 'ray') if m in sys.modules))\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    print(f"typo reported in {seconds:.2f}s (interpreter start included)")
    assert proc.stdout.strip() == "2 []"
    assert proc.stderr.strip() == ("ptm pretrain: error: default job with --set train.lrr=1: train.lrr: unknown key "
                                   "(did you mean train.lr?)")
    assert seconds < 3  # about 0.3 s on the 2-core machine; importing torch alone takes longer


def test_verbose_flag_on_the_job_commands():
    assert parse("pretrain", "--verbose").verbose and parse("finetune", "-v").verbose
    assert not parse("tune").verbose


def test_submit_forwards_only_the_storage_settings_that_are_set(monkeypatch):
    from ptm_dist.submit import STORAGE_ENV, storage_env

    for key in STORAGE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # set but empty: not forwarded
    monkeypatch.setenv("HOME_SECRET", "x")
    assert storage_env() == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "id"}
