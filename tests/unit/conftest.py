"""The unit tier's own rule, checked around every unit test: it neither starts nor stops Ray
(Ray clusters belong to tests/e2e). Shared fixtures live in tests/conftest.py."""

from __future__ import annotations

import sys

import pytest


def _ray_up() -> bool:
    ray = sys.modules.get("ray")  # never imports Ray itself
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray_cluster():
    was_up = _ray_up()
    yield
    assert _ray_up() == was_up, "this unit test started or stopped Ray; tests that need Ray go in tests/e2e"
