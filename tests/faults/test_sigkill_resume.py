"""The orchestrator SIGKILLed at every mutating step of a scripted apply, then `resume`.

Unlike tests/test_executor.py (which unwinds with an exception), this forks a real orchestrator
process and SIGKILLs it: no finally blocks run, the lock file stays with a dead pid, the journal is
whatever was fsynced. The simulated hosts' state is saved just before the kill (hosts outlive the
orchestrator). `resume` in a fresh process state must converge to the state of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest

from rollout import journal
from rollout.model import Fleet
from tests.faults.conftest import make_env
from tests.test_executor import SimFleet, make_playbook, plan_for

# parallelism 4: kills land while other workers are mid-step; light gates keep ~60 kills fast
PLAYBOOK = make_playbook().replace("samples: 2, rekey: true", "samples: 1, rekey: false")


class _DyingSim(SimFleet):
    """Saves the hosts' state and SIGKILLs its own process before mutation number `die_at`."""

    def __init__(self, fleet: Fleet, die_at: int, dump: Path) -> None:
        super().__init__(fleet)
        self.die_at, self.dump = die_at, dump

    def _mutate(self) -> None:  # called with the sim's lock held: the state is consistent
        if self.mutations >= self.die_at:
            save(self, self.dump)
            os.kill(os.getpid(), signal.SIGKILL)
        self.mutations += 1


def save(sim: SimFleet, path: Path) -> None:
    spi = next(sim._spi)
    path.write_bytes(pickle.dumps({"hosts": sim.hosts, "sas": sim.sas, "spi": spi}))


def load(sim: SimFleet, path: Path) -> None:
    data: dict[str, Any] = pickle.loads(path.read_bytes())
    sim.hosts, sim.sas, sim._spi = data["hosts"], data["sas"], itertools.count(data["spi"])


def _crash_at(fleet: Fleet, root: Path, n: int) -> int:
    """Fork an orchestrator that dies at mutation n; returns the signal that ended it."""
    dump = root / "hosts.pickle"
    pid = os.fork()
    if pid == 0:  # the orchestrator
        code = 0
        try:
            env = make_env(fleet, root, _DyingSim(fleet, n, dump))
            env.executor().apply(plan_for(fleet, PLAYBOOK))
            save(env.sim, dump)
        except BaseException:  # anything but SIGKILL is a failure of the test
            code = 70
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def _reference(fleet: Fleet, root: Path) -> tuple[dict[str, Any], int]:
    env = make_env(fleet, root)
    assert env.executor().apply(plan_for(fleet, PLAYBOOK)).error is None
    return env.sim.state(), env.sim.mutations


def _resume(fleet: Fleet, root: Path) -> tuple[Any, SimFleet]:
    env = make_env(fleet, root)
    load(env.sim, root / "hosts.pickle")
    [past] = list(journal.list_runs(env.state_dir))
    assert past.status is None  # interrupted, resumable
    lock = env.state_dir / "apply.lock"
    assert lock.exists()  # SIGKILL left it behind; its pid is dead, so resume takes it over
    warnings: list[str] = []
    res = env.executor(warn=warnings.append).resume(past, plan_for(fleet, PLAYBOOK))
    assert any("stale" in w for w in warnings), warnings
    return res, env.sim


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_every_step_then_resume_converges(fleet: Fleet, tmp_path: Path) -> None:
    final, total = _reference(fleet, tmp_path / "ref")
    assert total > 10
    for n in range(total):
        root = tmp_path / f"k{n}"
        root.mkdir()
        assert _crash_at(fleet, root, n) == signal.SIGKILL, f"step {n}: the orchestrator was not killed"
        res, sim = _resume(fleet, root)
        assert res.error is None, f"killed before mutation {n}: {res.message}"
        assert sim.state() == final, f"killed before mutation {n}: diverged"
        assert journal.load_run(root / "state", res.run_id).status == journal.COMPLETED


def _tear_last_record(path: Path) -> None:
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last + (len(data) - last) // 2])


def test_sigkill_mid_journal_write_then_resume_is_recorded(fleet: Fleet, tmp_path: Path) -> None:
    """A kill while a journal record is half written (torn last line): the resumed run must still be
    recorded, i.e. `runs` shows it completed and a second resume has nothing to do."""
    final, total = _reference(fleet, tmp_path / "ref")
    root = tmp_path / "torn"
    root.mkdir()
    assert _crash_at(fleet, root, total // 2) == signal.SIGKILL
    [past] = list(journal.list_runs(root / "state"))
    _tear_last_record(journal.journal_path(root / "state", past.run_id))
    res, sim = _resume(fleet, root)
    assert res.error is None, res.message
    assert sim.state() == final
    assert journal.load_run(root / "state", res.run_id).status == journal.COMPLETED
