"""Faults against the UML lab, through the real SSH transport and executor (or the real CLI).

Each test holds the lab's exclusive lock, uses the lab playbook's first stage (one core host and one
edge host) to stay within seconds-to-tens-of-seconds, and resets only the hosts it touched.
"""

from __future__ import annotations

import io
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

from rollout import errors, journal
from rollout.errors import ExitCode
from rollout.events import RecordingReporter
from tests.lab_fixture import LabHandle

pytestmark = pytest.mark.lab
CONF = "/etc/swanctl/conf.d/ipsec-rollout.conf"


def _plan(lab: LabHandle) -> tuple[Any, Any, list[str]]:
    from rollout import pairing
    from rollout.planner import build_plan
    from rollout.playbook import load_playbook

    fleet = lab.fleet()
    pairs = pairing.compute_pairs(fleet)
    plan = build_plan(fleet, pairs, load_playbook(lab.playbook_file, fleet, pairs))
    first = plan.stages[0]
    return fleet, plan, [h.fqdn for h in first.hosts]


def _apply(lab: LabHandle, state: Path, reporter: RecordingReporter | None = None) -> Any:
    from rollout.executor import Executor, Runtime
    from rollout.ssh import SshTransport

    fleet, plan, _ = _plan(lab)
    transport = SshTransport(ssh_config=None, agent=False)
    try:
        rt = Runtime(transport=transport, state_dir=state, reporter=reporter or RecordingReporter(),
                     syslog_address=None, operator="faults@test", reason="issue 7", poll_interval=3.0,
                     collect_timeout=120.0)
        return Executor(fleet, rt).apply(plan, stages=[plan.stages[0].name])
    finally:
        transport.close()


@pytest.fixture
def pair_lab(lab: LabHandle) -> Iterator[tuple[LabHandle, list[str]]]:
    """The lab held exclusively; the first stage's two hosts reset before and after."""
    _, _, fqdns = _plan(lab)
    with lab.exclusive():
        lab.reset(fqdns)
        try:
            yield lab, fqdns
        finally:
            lab.reset(fqdns)


def _has_conf(lab: LabHandle, fqdn: str) -> bool:
    return lab.host(fqdn).run(f"test -e {CONF}", timeout=120).exit_code == 0


def _installed(lab: LabHandle, fqdn: str) -> int:
    out = lab.host(fqdn).run("swanctl --list-sas --noblock 2>/dev/null", timeout=120).stdout
    return out.count("INSTALLED, TRANSPORT")


# ------------------------------------------------------------------------------------------- F1
def test_apply_with_port_22_blackholed_changes_nothing(pair_lab: tuple[LabHandle, list[str]],
                                                       tmp_path: Path) -> None:
    from rollout.lab import faults

    lab, (a, b) = pair_lab
    faults.set_fault(lab.lab, b, "ssh-blackhole")
    began = time.monotonic()
    try:
        res = _apply(lab, tmp_path / "state")
    finally:
        faults.clear_fault(lab.lab, b, "ssh-blackhole")
    took = time.monotonic() - began
    assert isinstance(res.error, errors.UnreachableError), res.message
    assert b in res.message and took < 180, (res.message, took)
    assert not _has_conf(lab, a) and not _has_conf(lab, b)  # nothing changed anywhere
    assert journal.load_run(tmp_path / "state", res.run_id).status == journal.FAILED


# ------------------------------------------------------------------------------------------- F7
def test_wrong_ca_certificate_is_refused_by_preflight(pair_lab: tuple[LabHandle, list[str]],
                                                      tmp_path: Path) -> None:
    from rollout.lab import faults

    lab, (a, b) = pair_lab
    faults.set_fault(lab.lab, a, "bad-cert", cert_mode="wrong-ca")
    try:
        res = _apply(lab, tmp_path / "state")
    finally:
        faults.clear_fault(lab.lab, a, "bad-cert")
    assert isinstance(res.error, errors.PreflightError), res.message
    assert res.error.exit_code == ExitCode.PREFLIGHT_FAILED
    assert a in res.message and "does not verify against the CA" in res.message
    assert not _has_conf(lab, a) and not _has_conf(lab, b)


# ------------------------------------------------------------------------------------------- F5
@pytest.mark.drill
def test_ten_percent_loss_sa_comes_up_and_gate_takes_every_sample(pair_lab: tuple[LabHandle, list[str]],
                                                                   tmp_path: Path) -> None:
    from rollout.lab import faults

    lab, (a, b) = pair_lab
    reporter = RecordingReporter()
    faults.set_fault(lab.lab, b, "loss", percent=10.0)
    try:
        res = _apply(lab, tmp_path / "state", reporter)
        up = (_installed(lab, a), _installed(lab, b))
    finally:
        faults.clear_fault(lab.lab, b, "loss")
    assert res.error is None, res.message
    assert up == (2, 2), up  # v4 + v6, transport mode, on both ends
    passed = [e for e in reporter.events if e.kind == "gate" and e.state == "passed" and e.batch]
    assert passed and all(e.data["samples"] >= 1 + 1 + 2 for e in passed), passed  # wait, probe, soak x2


# ------------------------------------------------------------------------------------------- F6
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from rollout.cli import main; main()", *args]


def _steps_journaled(state: Path) -> int:
    runs = state / "runs"
    if not runs.is_dir():
        return 0
    return sum(1 for j in runs.glob("*/journal.jsonl") for r in journal.read_records(j)
               if r["type"] == "step")


@pytest.mark.parametrize("kill_after", [3, pytest.param(9, marks=pytest.mark.drill)])
def test_cli_sigkilled_mid_apply_then_resume_converges(pair_lab: tuple[LabHandle, list[str]], tmp_path: Path,
                                                       kill_after: int) -> None:
    lab, (a, b) = pair_lab
    _, plan, _ = _plan(lab)
    state = tmp_path / "state"
    common = ["-i", str(lab.inventory_dir), "--state-dir", str(state), "--yes"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(_cli("apply", str(lab.playbook_file), "--stage", plan.stages[0].name, "--json",
                                 *common), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 600
    while _steps_journaled(state) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"apply ended before step {kill_after}: {proc.stderr.read()!r}"  # type: ignore[union-attr]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    [past] = list(journal.list_runs(state))
    assert past.status is None and (state / "apply.lock").exists()
    done = subprocess.run(_cli("resume", past.run_id, *common[2:]), capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert journal.load_run(state, past.run_id).status == journal.COMPLETED
    assert (_installed(lab, a), _installed(lab, b)) == (2, 2)
    # the same final state as an uninterrupted run: the idempotence check finds nothing to change
    assert _unchanged(lab, a) and _unchanged(lab, b)


def _unchanged(lab: LabHandle, fqdn: str) -> bool:
    """What apply's idempotence check asks (steps.check_current_steps), with a generous timeout."""
    from rollout import pairing, render, steps

    fleet = lab.fleet()
    by_host = pairing.pairs_by_host(pairing.compute_pairs(fleet))
    rendered = render.render_host(fleet, by_host.get(fqdn, ()), fqdn)
    [step] = steps.check_current_steps(rendered)
    out = lab.host(fqdn).run(step.command, check=True, timeout=180).stdout
    return steps.parse_current(out).unchanged(rendered)


# ------------------------------------------------------------------------------------------- F8
def test_kill_switch_with_a_quarter_of_the_lab_unreachable(clean_lab: LabHandle, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """2 of 8 hosts (sshd SIGSTOPped: TCP accepted, no banner; port 22 blackholed): the other 6 are
    done within the deadline, exit PARTIAL, the report lists all 8, not_clean = the 2."""
    from rollout.cli import kill as kill_cli
    from rollout.lab import faults

    lab = clean_lab
    shorts = list(lab.hosts)
    hung, holed = lab.host(shorts[1]), lab.host(shorts[-2])
    report = tmp_path / "kill.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(sys, "argv", [
        "ipsec-kill", "--all", "--yes", "--inventory", str(lab.inventory_dir), "--connect-timeout", "10",
        "--command-timeout", "150", "--retries", "1", "--deadline", "300", "--parallel", "8",
        "--report", str(report), "--state-dir", str(tmp_path / "state"), "--reason", "issue 7 F8"])
    faults.set_fault(lab.lab, hung.short, "ssh-hang")
    faults.set_fault(lab.lab, holed.short, "ssh-blackhole")
    began = time.monotonic()
    try:
        try:
            kill_cli.main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    finally:
        faults.clear_fault(lab.lab, hung.short, "ssh-hang")
        faults.clear_fault(lab.lab, holed.short, "ssh-blackhole")
    took = time.monotonic() - began
    data = json.loads(report.read_text())
    assert code == ExitCode.PARTIAL, data
    assert took < 300 + 30, took
    assert sorted(data["not_clean"]) == sorted([hung.fqdn, holed.fqdn])
    assert sorted(h["host"] for h in data["hosts"]) == sorted(h.fqdn for h in lab.hosts.values())
    rows = {h["host"]: h for h in data["hosts"]}
    assert rows[hung.fqdn]["outcome"] == "unreachable" and rows[holed.fqdn]["outcome"] == "unreachable"
    assert data["summary"]["already-clean"] + data["summary"]["killed"] == len(shorts) - 2
