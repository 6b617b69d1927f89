"""The job schema: shipped files load, and bad input gets the messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ptm_dist.config import ConfigError, JobConfig, load

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


def test_jobs_directory_is_not_empty():
    names = {p.stem for p in JOBS}
    assert {"tiny", "gpt2-124m", "llama-1b-zero3"} <= names


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_shipped_job_loads(path):
    cfg = load(path)
    assert isinstance(cfg, JobConfig)


def test_tiny_job_file_is_the_default_job():
    assert load(Path(__file__).parents[2] / "jobs" / "tiny.yaml") == load(None)


def test_overrides_are_applied_and_typed():
    cfg = load(None, ["train.lr=3e-4", "scaling.num_workers=4", "run.resume=false", "zero.stage=3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.scaling.num_workers == 4 and cfg.run.resume is False and cfg.zero.stage == 3


def _error(*overrides, text=None, tmp_path=None) -> str:
    path = None
    if text is not None:
        path = tmp_path / "job.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path, list(overrides))
    return str(e.value)


def test_unknown_key_names_path_and_suggests():
    msg = _error("train.lrr=1")
    assert "train.lrr: unknown key (did you mean train.lr?)" in msg


def test_unknown_section_lists_allowed():
    msg = _error("bogus.x=1")
    assert "bogus: unknown key" in msg


def test_bad_value_names_field_value_and_rule():
    msg = _error("train.lr=-1")
    assert "train.lr = -1" in msg and "greater than 0" in msg


def test_bad_choice_lists_allowed_values():
    msg = _error("train.precision=fp8")
    assert "train.precision = 'fp8'" in msg and "'bf16'" in msg


def test_bad_model_size_lists_sizes():
    msg = _error("model.family=llama", "model.size=350m")
    assert "model.size '350m' does not exist for family 'llama'" in msg and "1b" in msg


def test_one_line_per_problem():
    msg = _error("train.lr=-1", "zero.stage=7", "train.max_steps=0")
    assert len(msg.splitlines()) == 3


def test_offload_params_needs_stage_3():
    assert "zero.offload_params needs zero.stage 3" in _error("zero.offload_params=true")


def test_bad_yaml_names_file_and_line(tmp_path):
    msg = _error(text="train:\n  lr: [1,\n", tmp_path=tmp_path)
    assert "job.yaml" in msg and "line" in msg and "not valid YAML" in msg


def test_non_mapping_file(tmp_path):
    assert "must be a mapping" in _error(text="- 1\n- 2\n", tmp_path=tmp_path)


def test_missing_file():
    with pytest.raises(ConfigError, match="job file not found"):
        load("/nonexistent/job.yaml")


def test_override_without_equals():
    assert "expected KEY=VALUE" in _error("train.lr")


def test_resolved_job_round_trips():
    cfg = load(None, ["train.lr=3e-4"])
    assert JobConfig.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("overrides, expected", [
    (["tune.scheduler=pbt", "tune.num_workers=2"], "pbt needs tune.num_workers 1"),
    (["tune.search=optuna", "tune.space.finetune.lr={grid: [0.1, 0.2]}"], "optuna cannot expand grid entries"),
    (["tune.metric=eval_loss"], "eval_loss needs tune.mode min"),
])
def test_tune_section_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load(None, overrides)


@pytest.mark.parametrize("overrides, expected", [
    (["train.schedule=linear"], "train.schedule = 'linear'"),
    (["train.schedule=wsd", "train.decay_fraction=0"], "train.decay_fraction = 0"),
    (["train.schedule=wsd", "train.decay_fraction=1.5"], "train.decay_fraction = 1.5"),
    (["train.cooldown_steps=-1"], "train.cooldown_steps = -1"),
    (["train.schedule=wsd", "train.cooldown_steps=10"], "train.cooldown_steps 10 applies to train.schedule constant"),
    (["train.schedule=constant", "train.cooldown_steps=600"], "cooldown_steps 600 must not exceed train.max_steps 500"),
])
def test_schedule_errors(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load(None, overrides)


def test_schedules_load():
    assert load(None, []).train.schedule == "cosine"
    t = load(None, ["train.schedule=wsd", "train.decay_fraction=1"]).train
    assert (t.schedule, t.decay_fraction, t.cooldown_steps) == ("wsd", 1.0, 0)
    t = load(None, ["train.schedule=constant", "train.cooldown_steps=500"]).train
    assert (t.schedule, t.cooldown_steps) == ("constant", 500)


HEAVY = ("torch", "transformers", "deepspeed", "ray")


def test_validating_a_job_imports_neither_torch_nor_ray():
    """Loading and validating every shipped job (model sizes included) and rejecting a typo
    needs pydantic and YAML only, so a mistake is reported before torch or Ray load."""
    import subprocess
    import sys

    code = (
        "import sys, pathlib\n"
        "from ptm_dist.config import ConfigError, load\n"
        f"for p in sorted(pathlib.Path({str(JOBS[0].parent)!r}).glob('*.yaml')): load(p)\n"
        "load(None, ['model.family=llama', 'model.size=1b'])\n"
        "try:\n    load(None, ['model.size=huge'])\nexcept ConfigError as e:\n    print(e)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "model.size 'huge' does not exist for family 'gpt2'; allowed: debug, tiny, 124m, 350m, 1b" in out
    assert out.strip().splitlines()[-1] == "[]"
