"""Faults during `apply`, against the simulated fleet (FakeTransport): unreachable hosts, hanging
commands, partial load failure, a flapping gate, two operators, the kill switch during an apply.

Every test checks the outcome (exit code / host states) AND that nothing was lost: the journal, the
lock, the hosts outside the failing batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rollout import errors, journal, killswitch
from rollout.executor import HostState
from rollout.model import Fleet
from rollout.testing import FakeTransport, Hang, result
from tests.test_executor import ALL_SAS, H1, H2, H3, H4, Env, make_playbook, plan_for

REST_BATCH_OF_TWO = make_playbook().replace("batch: 1", "batch: 2")


def _records(env: Env, run_id: str, type_: str) -> list[dict[str, Any]]:
    return [r for r in journal.read_records(journal.journal_path(env.state_dir, run_id))
            if r["type"] == type_]


def _lock_free(env: Env) -> bool:
    return not (env.state_dir / "apply.lock").exists()


# ------------------------------------------------------------------------------------- unreachable
def test_unreachable_before_batch_changes_nothing_then_resume_converges(env: Env, fleet: Fleet) -> None:
    env.sim.fake.set_unreachable(H4)
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.UnreachableError) and H4 in res.message
    assert res.error.exit_code == errors.ExitCode.UNREACHABLE
    assert env.sim.hosts[H4].files == {} and all(H4 not in k for k in env.sim.sas)
    assert res.state_of(H4) == HostState.UNREACHABLE and _lock_free(env)
    env.sim.fake.set_unreachable(H4, unreachable=False)
    again = env.executor().resume(journal.load_run(env.state_dir, res.run_id), plan_for(fleet))
    assert again.error is None, again.message
    assert sorted(env.sim.sas) == ALL_SAS


def test_unreachable_mid_batch_is_loud_and_rollback_run_recovers(env: Env, fleet: Fleet) -> None:
    """H4 drops off right after its snapshot: the batch cannot be rolled back on H4 -> RollbackFailed
    (loud, distinct), the others of the batch are restored; `rollback RUN` once H4 is back."""
    def drop_after_snapshot(host: Any, command: str, stdin: str | None) -> Any:
        answer = env.sim.handle(host, command, stdin)
        if host.fqdn == H4 and "@@snapshot" in command:
            env.sim.fake.set_unreachable(H4)
        return answer

    env.sim.fake.default = drop_after_snapshot
    res = env.executor().apply(plan_for(fleet, REST_BATCH_OF_TWO))
    assert isinstance(res.error, errors.RollbackFailed), res.message
    assert H4 in res.message and "NOT as it was" in res.message
    assert res.state_of(H2) in (HostState.ROLLED_BACK, HostState.ROLLBACK_FAILED)
    assert env.sim.hosts[H2].files == {}  # H2 restored despite H4
    assert (H1, H3, "v4") in env.sim.sas  # the canary stage untouched
    assert journal.load_run(env.state_dir, res.run_id).status == journal.FAILED and _lock_free(env)
    env.sim.fake.set_unreachable(H4, unreachable=False)
    undo = env.executor().rollback(journal.load_run(env.state_dir, res.run_id), plan_for(fleet))
    assert undo.error is None, undo.message
    assert env.sim.sas == {} and all(h.files == {} for h in env.sim.hosts.values())


# ------------------------------------------------------------------------------------- hanging command
def test_hanging_load_fails_only_that_host_others_proceed(env: Env, fleet: Fleet) -> None:
    """A remote command that never returns (CommandTimeout) is a failure of that host only; with an
    IPsec budget of 1 the run completes and the host is rolled back."""
    env.sim.fake.on(r"swanctl --load-all", Hang(), host=H4, times=1)
    env.sim.fake.on(r".", env.sim.handle)  # everything else as usual
    res = env.executor().apply(plan_for(fleet, make_playbook(ipsec=1)))
    assert res.error is None, res.message
    assert res.state_of(H4) == HostState.ROLLED_BACK
    assert res.state_of(H2) == HostState.CHANGED
    assert sorted(k for k in env.sim.sas if H4 not in k) == sorted(k for k in ALL_SAS if H4 not in k)


# ------------------------------------------------------------------------------------- partial failure
def test_one_host_fails_load_only_its_batch_is_rolled_back(env: Env, fleet: Fleet) -> None:
    env.sim.fail_load.add(H4)  # rest stage: one batch [cp1002, cp2002]
    res = env.executor().apply(plan_for(fleet, REST_BATCH_OF_TWO))
    assert isinstance(res.error, errors.GateFailedRolledBack), res.message
    assert res.error.exit_code == errors.ExitCode.GATE_FAILED_ROLLED_BACK
    assert {res.state_of(H2), res.state_of(H4)} == {HostState.ROLLED_BACK}
    assert {res.state_of(H1), res.state_of(H3)} == {HostState.CHANGED}
    assert env.sim.hosts[H2].files == {} and env.sim.hosts[H4].files == {}
    assert sorted(env.sim.sas) == [(H1, H3, "v4"), (H1, H3, "v6")]  # canary batch kept
    assert env.sim.hosts[H1].files and env.sim.hosts[H3].files
    rolled = _records(env, res.run_id, journal.BATCH_ROLLED_BACK)
    assert [(r["stage"], r["batch"]) for r in rolled] == [("rest", 1)]
    assert journal.load_run(env.state_dir, res.run_id).stages_done == ["canary"]


# ------------------------------------------------------------------------------------- the gate
def _flapping(env: Env, fqdn: str, healthy_samples: int) -> None:
    """`fqdn`'s SAs look healthy for its first `healthy_samples` collects after they exist, then
    the CHILD_SAs vanish from the swanctl output (a lucky sample followed by the truth)."""
    seen = [0]

    def collect(host: Any, command: str, stdin: str | None) -> Any:
        out = env.sim.handle(host, command, stdin)
        if host.fqdn != fqdn or "state = INSTALLED" not in out:
            return out
        seen[0] += 1
        return out if seen[0] <= healthy_samples else out.replace("state = INSTALLED", "state = REKEYED")

    env.sim.fake.on(r"^sh -s$", collect, host=fqdn)
    env.sim.fake.on(r".", env.sim.handle)


def test_gate_does_not_pass_on_one_lucky_sample(env: Env, fleet: Fleet) -> None:
    _flapping(env, H3, healthy_samples=1)  # H3 is in the canary pair
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.GateFailedRolledBack), res.message
    assert res.state_of(H1) == HostState.ROLLED_BACK and env.sim.sas == {}


def test_a_passing_gate_takes_every_sample(env: Env, fleet: Fleet) -> None:
    res = env.executor().apply(plan_for(fleet))
    assert res.error is None
    gates = [e for e in env.reporter.events if e.kind == "gate" and e.state == "passed" and e.batch]
    samples = [e for e in env.reporter.events if e.kind == "gate" and e.state == "sample"]
    assert gates and all(e.data["samples"] >= 2 + 2 for e in gates)  # wait + probe + rekey + 2 soak
    assert len(samples) >= 4 * len(gates)


# ------------------------------------------------------------------------------------- two operators
class _Gate:
    """Holds every command of one host until released (an apply 'in progress')."""

    def __init__(self, env: Env, fqdn: str, marker: str) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.env, self.fqdn, self.marker = env, fqdn, marker

    def __call__(self, host: Any, command: str, stdin: str | None) -> Any:
        if host.fqdn == self.fqdn and self.marker in command and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return self.env.sim.handle(host, command, stdin)


def _background_apply(env: Env, fleet: Fleet, out: list[Any]) -> threading.Thread:
    worker = threading.Thread(target=lambda: out.append(env.executor().apply(plan_for(fleet))), daemon=True)
    worker.start()
    return worker


def test_second_apply_is_refused_naming_the_owner(env: Env, fleet: Fleet) -> None:
    hold = _Gate(env, H1, "@@written")
    env.sim.fake.default = hold
    first: list[Any] = []
    worker = _background_apply(env, fleet, first)
    assert hold.entered.wait(10)
    with pytest.raises(errors.LockedError) as refused:
        env.executor().apply(plan_for(fleet))
    assert refused.value.exit_code == errors.ExitCode.LOCKED
    assert "pid" in str(refused.value) and "apply run" in str(refused.value)
    assert len(list((env.state_dir / "runs").iterdir())) == 1  # the refused run has no journal
    hold.release.set()
    worker.join(60)
    assert first and first[0].error is None, first
    assert sorted(env.sim.sas) == ALL_SAS and _lock_free(env)


def test_kill_during_apply_wins(env: Env, fleet: Fleet, tmp_path: Path) -> None:
    """ipsec-kill never waits for the apply lock; the apply stops at its next step."""
    hold = _Gate(env, H1, "@@written")
    env.sim.fake.default = hold
    first: list[Any] = []
    worker = _background_apply(env, fleet, first)
    assert hold.entered.wait(10)
    assert (env.state_dir / "apply.lock").exists()
    clean = "IPSEC-KILL result=killed states=0 policies=0 charon=0 latched=1 errors=none version=1"
    kill_fake = FakeTransport([(r".", result(stdout=clean + "\n"))])
    began = time.monotonic()
    report = killswitch.run_kill(killswitch.Targets(hosts=tuple(fleet.hosts.values()), source="test"),
                                 kill_fake, killswitch.KillOptions(who="oncall@test", reason="incident"),
                                 stop_flag=env.stop_flag)
    assert time.monotonic() - began < 5  # did not wait for the lock
    assert report.exit_code == errors.ExitCode.OK
    mutations_at_kill = env.sim.mutations
    hold.release.set()
    worker.join(60)
    res = first[0]
    assert isinstance(res.error, errors.KilledDuringApply), res.message
    assert "oncall@test" in res.message and "incident" in res.message
    assert env.sim.mutations <= mutations_at_kill + 4  # only steps already in flight (parallelism 4)
    assert journal.load_run(env.state_dir, res.run_id).status == journal.KILLED and _lock_free(env)
