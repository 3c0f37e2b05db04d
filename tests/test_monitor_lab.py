"""Monitoring against a UML lab (issue 6 "done means"): real charon, real ESP SAs, real SSH.

One core<->core pair is deployed by hand with rollout.render, then broken in the ways the check must
name: charon stopped, kernel state flushed under a charon that still believes in its SAs, and the
ipsec-kill latch. The tests boot a private two-host lab (own state dir and namespace) because they break
hosts on purpose and the shared session lab is in use by other test modules at the same time;
ROLLOUT_MONITOR_SHARED_LAB=1 runs them on the shared `lab` fixture (hosts cp1002 <-> cp2002) instead.

Set ROLLOUT_CAPTURE_DIR=DIR to also save every collect.sh output the tests see (that is how the
lab-*.txt fixtures in tests/data/health/ were made).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout import health, monitor, pairing, render
from rollout.health import HostObservation
from rollout.model import Connection, Family, Fleet, Pair
from rollout.monitor import NagiosState
from tests.lab_fixture import LabHandle, lab_skip_reason

pytestmark = pytest.mark.lab

SHARED_PAIR = ("cp1002", "cp2002")
PRIVATE_NETNS = "ipsec-lab-mon"
KEYS = re.compile(r"0x[0-9a-f]{32,}|PRIVATE KEY", re.I)


class PairLab:
    """The deployed pair plus a transport and helpers to collect and judge it."""

    def __init__(self, lab: LabHandle, shorts: tuple[str, str]) -> None:
        from rollout.ssh import SshTransport

        self.lab = lab
        self.shorts = shorts
        self.fleet: Fleet = lab.fleet()
        self.a, self.b = lab.host(shorts[0]).fqdn, lab.host(shorts[1]).fqdn
        self.short_a, self.short_b = shorts
        (self.pair,) = [p for p in pairing.compute_pairs(self.fleet) if {p.a, p.b} == {self.a, self.b}]
        self.transport = SshTransport(ssh_config=None)

    def deploy(self) -> None:
        """Render both ends (only this pair), install with the certificate copies, load; B first."""
        for fqdn in (self.b, self.a) if self.pair.a == self.a else (self.a, self.b):
            rendered = render.render_host(self.fleet, (self.pair,), fqdn)
            script = ["install -d -m 0700 /etc/swanctl/private"]
            script += [f"install -m {m.mode:o} {shlex.quote(m.source)} {shlex.quote(m.dest)}"
                       for m in rendered.material]
            script += [f"cat > {shlex.quote(f.path)} <<'LABEOF'\n{f.content}LABEOF" for f in rendered.files]
            script.append("swanctl --reload-settings && swanctl --load-all")
            self.lab.host(fqdn).run("\n".join(script), check=True, timeout=90)

    def observe(self, fqdn: str, tag: str = "") -> HostObservation:
        obs = monitor.collect(self.transport, self.fleet.host(fqdn), timeout=60)
        assert obs.reachable, obs.error
        if tag:
            self._save(fqdn, tag)
        return obs

    def _save(self, fqdn: str, tag: str) -> None:
        target = os.environ.get("ROLLOUT_CAPTURE_DIR")
        if target:
            res = self.transport.run(self.fleet.host(fqdn), monitor.COLLECT_COMMAND, timeout=60,
                                     stdin=monitor.collect_script())
            Path(target, f"lab-{tag}-{fqdn.split('.')[0]}.txt").write_text(res.stdout)

    def check(self, fqdn: str, tag: str = "") -> monitor.CheckResult:
        res = monitor.check_host(self.observe(fqdn, tag), self.expected(fqdn))
        assert "|" not in res.text and not KEYS.search(res.line)
        return res

    def expected(self, fqdn: str) -> tuple[Connection, ...]:
        return pairing.connections_of(fqdn, (self.pair,))

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(2)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_ok(self) -> None:
        self.wait(lambda: all(self.check(h).state == NagiosState.OK for h in (self.a, self.b)),
                  "both ends OK")


@pytest.fixture(scope="module")
def mon_lab(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabHandle, tuple[str, str]]]:
    if os.environ.get("ROLLOUT_MONITOR_SHARED_LAB") == "1":
        yield request.getfixturevalue("lab"), SHARED_PAIR
        return
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from rollout import lab as labmod
    from rollout.lab.spec import build_spec

    state = Path("/tmp") / f"ipsec-lab-mon-{tmp_path_factory.getbasetemp().name}"
    spec = build_spec(("core1", "core2"), hosts_per_cluster=1, netns=PRIVATE_NETNS)
    try:
        handle = LabHandle(lab=labmod.up(spec, state_dir=state, boot_timeout=240), booted_here=True)
        a, b = (h.short for h in handle.lab.hosts)
        yield handle, (a, b)
        handle.lab.close()
    finally:
        labmod.down(state, purge=True)


@pytest.fixture
def pair_lab(mon_lab: tuple[LabHandle, tuple[str, str]]) -> Iterator[PairLab]:
    lab, shorts = mon_lab
    lab.reset(shorts)
    pl = PairLab(lab, shorts)
    try:
        pl.deploy()
        pl.wait_ok()
        yield pl
    finally:
        pl.transport.close()
        lab.reset(shorts)


def test_all_ok_with_crossing_spis_and_traffic_in_both_directions(pair_lab: PairLab) -> None:
    pl = pair_lab
    for fqdn in (pl.a, pl.b):
        res = pl.check(fqdn, "ok")
        assert res.text == "IPSEC OK - ok: 2", res.line
    before = {h: pl.observe(h) for h in (pl.a, pl.b)}
    pair = health.judge_pair(before[pl.pair.a], before[pl.pair.b], pl.pair)
    assert pair.ok and all(f.spis_match for f in pair.families)
    for family in pl.pair.families:
        _probe(pl, pl.pair, family)
    after = {h: pl.observe(h) for h in (pl.a, pl.b)}
    for family in pl.pair.families:
        a, b = pl.pair.a, pl.pair.b
        assert health.pair_traffic_rose((before[a], after[a]), (before[b], after[b]), pl.pair, family), family
    assert health.xfrm_out_nostates_delta(before[pl.a], after[pl.a]) == 0
    _cli_check_over_ssh_and_status(pl)


def _probe(pl: PairLab, pair: Pair, family: Family) -> None:
    local, peer = pl.fleet.host(pair.a), pl.fleet.host(pair.b)
    cmd = health.probe_command(str(local.address(family)), str(peer.address(family)), family)
    pl.lab.host(pair.a).run(cmd, timeout=60, check=True)


def _cli_check_over_ssh_and_status(pl: PairLab) -> None:
    """`ipsec-rollout check HOST --with-peers` and `status --json` over real SSH. Other peers of the
    host (in the shared lab) may or may not be deployed: only this pair's connections are asserted."""
    import rollout.cli.monitor  # noqa: F401  (registers check/status on the app)
    from rollout.cli import app

    inv = str(pl.lab.inventory_dir)
    res = CliRunner().invoke(app, ["check", pl.a, "-i", inv, "--with-peers"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("IPSEC OK - ok: ") and not KEYS.search(res.output)
    res = CliRunner().invoke(app, ["status", "-i", inv, "--site", pl.fleet.host(pl.a).site, "--json"])
    doc = json.loads(res.output)
    conns = {(h["host"], c["name"]): c["verdict"] for h in doc["hosts"] for c in h["connections"]}
    assert conns[(pl.a, f"{pl.short_b}_v4")] == "ok" and conns[(pl.a, f"{pl.short_b}_v6")] == "ok"
    assert not KEYS.search(res.output)


def test_charon_stopped_turns_both_ends_critical(pair_lab: PairLab) -> None:
    pl = pair_lab
    pl.lab.host(pl.b).run("/etc/lab/svc disable && /etc/lab/svc stop", check=True, timeout=90)
    res = pl.check(pl.b, "charon-stopped")
    assert res.state == NagiosState.CRITICAL
    names = f"{pl.short_a}_v4,{pl.short_a}_v6"
    assert res.text == f"IPSEC CRITICAL - charon not running - ok: 0 not-conn: {names}"
    pl.wait(lambda: pl.check(pl.a).state == NagiosState.CRITICAL, "the peer's check to turn CRITICAL", 120)
    res = pl.check(pl.a, "peer-charon-stopped")
    assert f"{pl.short_b}_v4" in res.text and f"{pl.short_b}_v6" in res.text
    pair = health.judge_pair(pl.observe(pl.pair.a), pl.observe(pl.pair.b), pl.pair)
    assert pair.failed


def test_kernel_flush_under_charon_is_no_xfrm(pair_lab: PairLab) -> None:
    pl = pair_lab
    pl.lab.host(pl.a).run("ip xfrm state flush", check=True)
    res = pl.check(pl.a, "no-xfrm")
    names = f"{pl.short_b}_v4,{pl.short_b}_v6"
    assert (res.state, res.text) == (NagiosState.CRITICAL, f"IPSEC CRITICAL - ok: 0 no-xfrm: {names}")


def test_latched_host_is_latched_not_failed(pair_lab: PairLab) -> None:
    pl = pair_lab
    kill = (Path(monitor.__file__).parent / "remote" / "kill.sh").read_text()
    pl.lab.host(pl.a).run("sh -s kill monitor-test 'lab latch test' run-lab", stdin=kill, timeout=120)
    res = pl.check(pl.a, "latched")
    assert res.state == NagiosState.WARNING
    assert res.text.startswith("IPSEC WARNING - latched by ipsec-kill (monitor-test")
    assert res.text.endswith(f"ok: 0 latched: {pl.short_b}_v4,{pl.short_b}_v6")
    observations = {h: pl.observe(h) for h in (pl.a, pl.b)}
    enabled = monitor.enabled_hosts(observations, {h: pl.expected(h) for h in observations})
    peer = monitor.check_host(observations[pl.b], pl.expected(pl.b), enabled)
    assert peer.state == NagiosState.OK and "waiting-for-peer" in peer.text
