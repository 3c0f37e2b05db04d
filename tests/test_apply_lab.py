"""Issue 4's "done means", against the UML lab (real SSH, real charon, real ESP).

- playbooks/lab.yaml applied stage by stage: every expected SA INSTALLED in transport mode, v4 and v6,
  ESP on the wire (lab probe, tcpdump on the bridge); re-apply = unchanged; teardown removes it all;
- a batch whose certificate goes bad after preflight fails its gate and is rolled back, leaving the
  fleet as it was;
- a second concurrent apply is refused naming the owner; the orchestrator SIGKILLed mid-run (CLI as a
  subprocess, kill -9 once the journal shows N steps) then `resume` converges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollout import errors, health, journal
from rollout.events import RecordingReporter
from rollout.executor import Executor, HostState, Runtime
from rollout.model import Fleet
from rollout.pairing import compute_pairs
from rollout.planner import Plan, build_plan
from rollout.playbook import load_playbook, parse_playbook
from tests.lab_fixture import LabHandle

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
LAB_PLAYBOOK = ROOT / "playbooks" / "lab.yaml"
# The same stages with a lighter gate (the end-to-end test uses the real file).
FAST = (LAB_PLAYBOOK.read_text()
        .replace("soak: 10s, samples: 2, rekey: true", "soak: 2s, samples: 1, rekey: false")
        .replace("soak: 10s, samples: 2", "soak: 2s, samples: 1"))
CLI = [sys.executable, "-c", "from rollout.cli import main; main()"]


@pytest.fixture
def transport() -> Iterator[Any]:
    from rollout.ssh import SshTransport

    t = SshTransport()
    yield t
    t.close()


def executor(lab: LabHandle, transport: Any, state_dir: Path, fleet: Fleet | None = None) -> Executor:
    rt = Runtime(transport=transport, state_dir=state_dir, reporter=RecordingReporter(),
                 reason="lab test", syslog_address=None, poll_interval=3.0, stop_flags=())
    return Executor(fleet or lab.fleet(), rt)


def plan_of(fleet: Fleet, text: str | None = None) -> Plan:
    pairs = compute_pairs(fleet)
    book = parse_playbook(text) if text else load_playbook(LAB_PLAYBOOK, fleet, pairs)
    return build_plan(fleet, pairs, book)


def pair_health(ex: Executor, hosts: set[str]) -> dict[tuple[str, str], health.PairHealth]:
    pairs = [p for p in ex.pairs if p.a in hosts and p.b in hosts]
    obs = ex.collect({h for p in pairs for h in (p.a, p.b)})
    return {(p.a, p.b): health.judge_pair(obs[p.a], obs[p.b], p) for p in pairs}


def no_ipsec(ex: Executor, hosts: set[str]) -> list[str]:
    """Hosts (of `hosts`) that still carry an IKE SA, a kernel ESP state or a loaded rollout conn."""
    obs = ex.collect(hosts)
    return sorted(h for h, o in obs.items()
                  if o.ike_sas or o.kernel_spis or (o.configured and any("_v" in c for c in o.configured)))


def test_lab_playbook_stage_by_stage_then_teardown(clean_lab: LabHandle, transport: Any,
                                                  tmp_path: Path) -> None:
    from rollout.lab.probe import count_packets

    fleet = clean_lab.fleet()
    plan = plan_of(fleet)
    ex = executor(clean_lab, transport, tmp_path, fleet)
    timings = {}
    enabled: set[str] = set()
    for stage in plan.stages:
        began = time.monotonic()
        res = ex.apply(plan, stages=[stage.name])
        timings[stage.name] = round(time.monotonic() - began, 1)
        assert res.error is None, res.message
        enabled.update(h.fqdn for h in stage.hosts)
        judged = pair_health(ex, enabled)
        bad = {k: v.failing_names() for k, v in judged.items() if not v.ok}
        assert not bad, f"after stage {stage.name}: {bad}"
    print(f"\nlab apply seconds per stage: {timings}")
    # every pair of the fleet: both families, INSTALLED in TRANSPORT mode (judge_pair asserts the
    # mode, both SPIs in the kernel, policies and cross-matching SPIs) and ESP on the wire
    assert len(judged) == len(ex.pairs) == 20
    for (a, b), verdict in judged.items():
        assert [f.family for f in verdict.families] == ["v4", "v6"]
        assert all(f.a.child and f.a.child.mode == "TRANSPORT" for f in verdict.families)
    for pair in ex.pairs[:: max(1, len(ex.pairs) // 5)]:
        for family in ("v4", "v6"):
            probe = count_packets(clean_lab.lab, pair.a.split(".")[0], pair.b.split(".")[0], family, 1.5)
            assert probe.esp > 0 and probe.cleartext_icmp == 0, probe
    # idempotent: a second apply changes nothing
    again = ex.apply(plan)
    assert again.error is None, again.message
    assert {again.state_of(h) for h in enabled} == {HostState.UNCHANGED}
    # teardown, stage by stage in reverse, removes everything
    began = time.monotonic()
    down = ex.teardown(plan)
    print(f"lab teardown seconds: {time.monotonic() - began:.1f}")
    assert down.error is None, down.message
    assert no_ipsec(ex, enabled) == []
    probe = count_packets(clean_lab.lab, "cp1001", "cp3001", "v4", 1.5)
    assert probe.esp == 0 and probe.cleartext_icmp > 0


class SpoilCertAfterPreflight:
    """A transport wrapper: once `victim`'s preflight has passed, its certificate goes bad (signed by
    a CA nobody trusts), so the batch installs it and only the gate can notice."""

    def __init__(self, inner: Any, lab: LabHandle, victim: str) -> None:
        self.inner, self.lab, self.victim, self.spoiled = inner, lab, victim, False

    def run(self, host: Any, command: str, *, timeout: float, stdin: str | None = None) -> Any:
        res = self.inner.run(host, command, timeout=timeout, stdin=stdin)
        if host.fqdn == self.victim and "@@pf begin" in command and not self.spoiled:
            from rollout.lab.faults import set_fault

            set_fault(self.lab.lab, self.victim, "bad-cert", cert_mode="wrong-ca")
            self.spoiled = True
        return res

    def close(self) -> None:
        self.inner.close()


@pytest.mark.drill
def test_lab_bad_certificate_batch_is_rolled_back(clean_lab: LabHandle, transport: Any,
                                                  tmp_path: Path) -> None:
    fleet = clean_lab.fleet()
    plan = plan_of(fleet, FAST.replace("timeout: 3m", "timeout: 90s"))
    ex = executor(clean_lab, transport, tmp_path, fleet)
    assert ex.apply(plan, stages=["first-pair"]).error is None
    first = {h.fqdn for h in plan.stages[0].hosts}
    before = pair_health(ex, first)
    half = [h.fqdn for h in plan.stages[1].hosts]
    victim = half[-1]
    bad = executor(clean_lab, SpoilCertAfterPreflight(transport, clean_lab, victim), tmp_path, fleet)
    res = bad.apply(plan, stages=["half"])
    assert isinstance(res.error, errors.GateFailedRolledBack), res.message
    assert {res.state_of(h) for h in half} == {HostState.ROLLED_BACK}
    # the fleet is as it was: the first pair healthy, the batch hosts without any IPsec
    after = pair_health(ex, first)
    assert all(v.ok for v in after.values()) and after.keys() == before.keys()
    assert no_ipsec(ex, set(half)) == []
    files = clean_lab.host(victim).run("ls /etc/swanctl/conf.d /etc/swanctl/x509").stdout
    assert "ipsec-rollout.conf" not in files


def _journal_steps(state_dir: Path) -> tuple[str | None, int]:
    runs = sorted((state_dir / "runs").glob("*/journal.jsonl")) if (state_dir / "runs").exists() else []
    if not runs:
        return None, 0
    records = journal.read_records(runs[-1])
    return runs[-1].parent.name, sum(1 for r in records if r.get("type") == journal.STEP)


@pytest.mark.drill
def test_lab_concurrent_apply_refused_then_sigkill_and_resume(clean_lab: LabHandle, transport: Any,
                                                              tmp_path: Path) -> None:
    book = tmp_path / "lab-fast.yaml"
    book.write_text(FAST)
    state = tmp_path / "state"
    args = [*CLI, "apply", str(book), "--stage", "first-pair", "--stage", "half", "--inventory",
            str(clean_lab.inventory_dir), "--state-dir", str(state), "--yes", "--json"]
    env = {**os.environ, "IPSEC_ROLLOUT_HOST_CACHE": str(tmp_path / "hosts.json")}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        run_id, steps = None, 0
        while time.monotonic() < deadline and steps < 12 and first.poll() is None:
            time.sleep(0.5)
            run_id, steps = _journal_steps(state)
        assert first.poll() is None and run_id and steps >= 12, "the apply never got going"
        # a second operator is refused, and told who holds the lock
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == errors.ExitCode.LOCKED, second.stderr
        assert f"pid {first.pid}" in second.stderr and "@" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert journal.load_run(state, run_id).status is None  # interrupted, resumable
    resumed = subprocess.run([*CLI, "resume", run_id, "--state-dir", str(state), "--yes", "--json"],
                             capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["kind"] == "run-end" and events[-1]["state"] == journal.COMPLETED
    # converged: the same state an uninterrupted run reaches (every pair of both stages healthy)
    fleet = clean_lab.fleet()
    plan = plan_of(fleet, FAST)
    hosts = {h.fqdn for s in plan.stages[:2] for h in s.hosts}
    ex = executor(clean_lab, transport, tmp_path / "check", fleet)
    judged = pair_health(ex, hosts)
    assert judged and all(v.ok for v in judged.values()), {k: v.failing_names() for k, v in judged.items()}
    again = ex.apply(plan, stages=["first-pair", "half"])
    assert again.error is None and {again.state_of(h) for h in hosts} == {HostState.UNCHANGED}
