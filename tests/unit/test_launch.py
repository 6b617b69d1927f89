"""ptm_dist.launch without Ray: asking for more than the machine or cluster has gets words at
once (a refusal with the numbers locally, before Ray starts; what is missing on a cluster)."""

from __future__ import annotations

import time

import pytest

from ptm_dist.cli import main
from ptm_dist.errors import ConfigError
from ptm_dist.launch import capacity_shortfall, check_local_cpus, local_cpu_problem, machine_cpus


def test_local_workers_needing_more_cpus_than_the_machine_has_are_a_warning_then_refused():
    assert local_cpu_problem(2, None, cores=2) is None  # the default job on the 2-core machine
    assert local_cpu_problem(4, {"CPU": 0.5}, cores=2) is None  # fractions of a core
    assert local_cpu_problem(64, None, cores=2) == (True, (
        "scaling.num_workers=64 x 1 CPU = 64 CPUs, but this machine has 2 cores: use scaling.num_workers <= 2, "
        "give workers a fraction of a core each (scaling.resources_per_worker={CPU: 0.5}), or join a cluster "
        "(RAY_ADDRESS)"))
    refused, why = local_cpu_problem(2, {"CPU": 4}, cores=4)
    assert not refused and "= 8 CPUs, but this machine has 4 cores: use scaling.num_workers <= 1," in why
    assert local_cpu_problem(8, None, cores=2)[0] is False and local_cpu_problem(9, None, cores=2)[0] is True
    assert local_cpu_problem(1, {"GPU": 1}, cores=1) is None  # GPUs are checked once Ray sees them


def test_what_a_cluster_lacks_is_named_with_the_numbers():
    total, free = {"CPU": 8.0, "GPU": 2.0, "memory": 1e10}, {"CPU": 3.0, "GPU": 2.0}
    assert capacity_shortfall(2, {"CPU": 1}, total, free) is None
    assert capacity_shortfall(4, {"CPU": 1}, total, free) == (
        "need 4 CPU (4 workers x {CPU: 1}), the cluster has 8 CPU (3 free)")
    assert capacity_shortfall(64, {"GPU": 1, "CPU": 0}, total, free) == (
        "need 64 GPU (64 workers x {GPU: 1, CPU: 0}), the cluster has 2 GPU (2 free)")
    assert capacity_shortfall(2, {"GPU": 1}, {"CPU": 4.0}, {"CPU": 4.0}) == (
        "need 2 GPU (2 workers x {GPU: 1}), the cluster has 0 GPU (0 free)")


def test_64_workers_on_this_machine_are_refused_in_a_second_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = 32 * machine_cpus()
    with pytest.raises(ConfigError, match=f"scaling.num_workers={n} x 1 CPU = {n} CPUs, but this machine has"):
        check_local_cpus(n)
    check_local_cpus(2 * machine_cpus())  # shares cores: a warning, and the run goes on
    assert capsys.readouterr().out.startswith(f"[ptm] warning: scaling.num_workers={2 * machine_cpus()} x 1 CPU")
    t0 = time.perf_counter()
    assert main(["pretrain", "--set", f"scaling.num_workers={n}", "--set", f"run.storage={tmp_path}"]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    print(f"{n} workers on {machine_cpus()} cores refused in {seconds:.2f}s")
    assert len(err) == 1 and err[0].startswith(f"ptm pretrain: error: scaling.num_workers={n} x 1 CPU")
    assert seconds < 5  # before any corpus, tokenizer or Ray work (about 0.1 s here)
    assert list(tmp_path.iterdir()) == []  # and before the run directory is written


def test_gpu_resources_without_gpus_are_one_line_config_errors():
    from ptm_dist.errors import ConfigError
    from ptm_dist.launch import Launch

    with pytest.raises(ConfigError, match=r"asks for 1 GPU per worker, but scaling.use_gpu is false"):
        Launch.resolve(2, False, {"GPU": 1})
    assert Launch.resolve(2, False, {"CPU": 2}).resources_per_worker == {"CPU": 2}


def test_an_elastic_range_reaches_ray_train_as_min_and_max_with_its_resize_check():
    from ptm_dist.config import load
    from ptm_dist.launch import Launch, make_trainer

    cfg = load(None, ["train.grad_accum=2", "scaling.num_workers=[2, 3]", "scaling.resize_check_s=15",
                      "scaling.use_gpu=false"])
    how = Launch.from_scaling(cfg.scaling)
    assert (how.min_workers, how.num_workers, how.resize_check_s) == (2, 3, 15)
    trainer = make_trainer(lambda config: None, {}, how, name="elastic", storage_path="/tmp/unused")
    assert trainer.scaling_config.num_workers == (2, 3)
    assert trainer.scaling_config.elastic_resize_monitor_interval_s == 15
    fixed = make_trainer(lambda config: None, {}, Launch.from_scaling(load(None, ["scaling.use_gpu=false"]).scaling),
                         name="fixed", storage_path="/tmp/unused")
    assert fixed.scaling_config.num_workers == 2


def test_ray_trains_controller_polls_every_half_second_unless_the_user_set_it():
    """Every Ray process of a ptm job (local or submitted) gets the controller's poll interval;
    a value already in the user's environment wins. A bare interpreter per case: WORKER_ENV is
    fixed when ptm_dist.launch is imported."""
    import os
    import subprocess
    import sys

    from ptm_dist.launch import HEALTH_CHECK_KEY

    code = "from ptm_dist.launch import WORKER_ENV; print(WORKER_ENV['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'])"
    for given, want in ((None, "0.5"), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != HEALTH_CHECK_KEY}
        if given is not None:
            env[HEALTH_CHECK_KEY] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, out.stderr
