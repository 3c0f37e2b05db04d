"""Shared pieces of the fault suite: the simulated fleet of tests/test_executor.py, re-exported."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.events import RecordingReporter
from rollout.inventory import build_fleet
from rollout.model import Fleet
from tests.test_executor import INVENTORY, Clock, Env, SimFleet


@pytest.fixture
def fleet() -> Fleet:
    return build_fleet([("inv.yaml", INVENTORY)])


def make_env(fleet: Fleet, root: Path, sim: SimFleet | None = None) -> Env:
    return Env(fleet=fleet, sim=sim or SimFleet(fleet), state_dir=root / "state", clock=Clock(),
               reporter=RecordingReporter(), stop_flag=root / "kill-requested")


@pytest.fixture
def env(fleet: Fleet, tmp_path: Path) -> Env:
    return make_env(fleet, tmp_path)
