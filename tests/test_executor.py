"""The executor against a simulated fleet behind FakeTransport.

`SimFleet` interprets the exact commands steps.py builds (by their `@@` markers) and keeps per-host
state: files, snapshots, loaded connections, SAs with SPIs and byte counters. Its `collect.sh` answer
is generated from that state in the real output format, so the gates judge it through rollout.health.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rollout import errors, journal
from rollout.events import GATE, RecordingReporter
from rollout.executor import Executor, HostState, Runtime
from rollout.inventory import build_fleet
from rollout.lock import RunLock
from rollout.model import Fleet
from rollout.pairing import compute_pairs, pairs_by_host
from rollout.planner import Plan, build_plan
from rollout.playbook import parse_playbook
from rollout.render import render_host
from rollout.testing import FakeTransport, result

INVENTORY: dict[str, Any] = {
    "sites": {"eqiad": {"tier": "core"}, "codfw": {"tier": "core"}},
    "clusters": {"cache_text": {}},
    "hosts": {
        "cp1001.eqiad.example.net": {"site": "eqiad", "cluster": "cache_text", "ipv4": "198.18.1.1",
                                     "ipv6": "fd00:1::1"},
        "cp1002.eqiad.example.net": {"site": "eqiad", "cluster": "cache_text", "ipv4": "198.18.1.2",
                                     "ipv6": "fd00:1::2"},
        "cp2001.codfw.example.net": {"site": "codfw", "cluster": "cache_text", "ipv4": "198.18.2.1",
                                     "ipv6": "fd00:2::1"},
        "cp2002.codfw.example.net": {"site": "codfw", "cluster": "cache_text", "ipv4": "198.18.2.2",
                                     "ipv6": "fd00:2::2"},
    },
    "pairing": [{"name": "core", "a": {"sites": ["eqiad"]}, "b": {"sites": ["codfw"]}}],
}

PLAYBOOK = """
name: test
defaults:
  gates: {timeout: 20, soak: 10, samples: 2, rekey: true}
  parallelism: 4
stages:
  - name: canary
    select: {pair: true, a: {sites: [eqiad]}, b: {sites: [codfw]}}
    batch: 2
  - name: rest
    select: {clusters: [cache_text]}
    batch: 1
    on_failure: {on_failure}
    budgets:
      max_unreachable: {unreach}
      max_ipsec_failures: {ipsec}
"""

H1, H2, H3, H4 = sorted(INVENTORY["hosts"])  # cp1001, cp1002, cp2001, cp2002


def make_playbook(on_failure: str = "rollback", unreach: int = 0, ipsec: int = 0) -> str:
    return PLAYBOOK.replace("{on_failure}", on_failure).replace("{unreach}", str(unreach)) \
        .replace("{ipsec}", str(ipsec))


# ================================================================================================
# The simulated fleet
# ================================================================================================
@dataclass
class SimHost:
    fqdn: str
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    material: set[str] = field(default_factory=set)
    snapshots: dict[str, dict[str, str | None]] = field(default_factory=dict)
    loaded: tuple[str, ...] = ()
    charon: bool = True
    latched: bool = False


class Crash(BaseException):
    """Stands in for SIGKILL: nothing in the executor may catch it."""


class SimFleet:
    """Interprets the executor's commands; thread-safe."""

    def __init__(self, fleet: Fleet, *, enforce: bool = False) -> None:
        self.fleet = fleet
        self.pairs = compute_pairs(fleet)
        by_host = pairs_by_host(self.pairs)
        self.rendered = {f: render_host(fleet, by_host.get(f, ()), f, enforce=enforce) for f in fleet.hosts}
        self.conf = {f: {x.path: x.sha256 for x in r.files} for f, r in self.rendered.items()}
        self.hosts = {f: SimHost(f) for f in fleet.hosts}
        self.sas: dict[tuple[str, str, str], dict[str, Any]] = {}  # (a, b, family) -> SA
        self.bad_cert: set[str] = set()
        self.fail_load: set[str] = set()
        self.fail_restore: set[str] = set()
        self.crash_after: int | None = None  # crash before the N+1th mutating command
        self.mutations = 0
        self._spi = itertools.count(0x10000000)
        self._lock = threading.RLock()
        self.fake = FakeTransport(default=self.handle)  # type: ignore[arg-type]

    # -- state summary (what "converged" means) -------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "files": {f: dict(sorted(h.files.items())) for f, h in self.hosts.items()},
            "loaded": {f: h.loaded for f, h in self.hosts.items()},
            "sas": sorted(self.sas),
        }

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, host: Any, command: str, stdin: str | None) -> Any:
        with self._lock:
            return self._handle(self.hosts[host.fqdn], command, stdin)

    def _mutate(self) -> None:
        if self.crash_after is not None and self.mutations >= self.crash_after:
            raise Crash()
        self.mutations += 1

    def _handle(self, h: SimHost, command: str, stdin: str | None) -> Any:
        if command == "sh -s":
            return self.collect(h)
        if "then echo latched" in command:
            return "latched\n" if h.latched else ""
        if "@@pf begin" in command:
            return self.preflight(h)
        if "@@digest" in command:
            return self.current(h)
        if command.startswith("ping"):
            return self.ping(h, command)
        if "swanctl --rekey" in command:
            return self.rekey(h, command)
        self._mutate()
        return self.mutating(h, command, stdin)

    def mutating(self, h: SimHost, command: str, stdin: str | None) -> Any:
        if "@@snapshot" in command:
            run_id = re.search(r"snapshot/([^/']+)", command).group(1)  # type: ignore[union-attr]
            h.snapshots.setdefault(run_id, {p: h.files.get(p) for p in self.conf[h.fqdn]})
            return "@@snapshot taken\n"
        if "@@written" in command:
            path = re.search(r"@@written '?([^'\s]+)", command).group(1)  # type: ignore[union-attr]
            h.files[path] = hashlib.sha256((stdin or "").encode()).hexdigest()
            return ""
        if "@@copied" in command:
            h.material.add(re.search(r"@@copied '?([^'\s]+)", command).group(1))  # type: ignore[union-attr]
            return ""
        if "@@restore done" in command:
            return self.restore(h, command)
        if "@@removed" in command:
            for path in self.conf[h.fqdn]:
                h.files.pop(path, None)
            h.material.clear()
            return ""
        if "swanctl --load-all" in command:
            return self.load(h)
        if "swanctl --initiate" in command:
            return self.initiate(h, command)
        if "@@terminated" in command:
            return self.terminate(h, command)
        return ""

    # -- read-only ----------------------------------------------------------------------------
    def preflight(self, h: SimHost) -> str:
        lines = ["begin", "stack swanctl", "swanctl yes", "charon yes", "cert_present yes", "key_present yes",
                 "ca_present yes", "cert_valid yes", "ca_valid yes", "cert_chain yes", "key_matches yes",
                 "clock_synced yes", f"latched {'yes' if h.latched else 'no'}", "end"]
        return "".join(f"@@pf {x}\n" for x in lines)

    def current(self, h: SimHost) -> str:
        out = [f"@@digest {h.files.get(p, 'absent')} {p}" for p in self.conf[h.fqdn]]
        out += [f"@@material {'same' if m.dest in h.material else 'differs'} {m.mode:o} {m.dest}"
                for m in self.rendered[h.fqdn].material]
        return "\n".join([*out, "@@end"]) + "\n"

    # -- charon -------------------------------------------------------------------------------
    def _configured(self, h: SimHost) -> bool:
        return all(h.files.get(p) == d for p, d in self.conf[h.fqdn].items())

    def load(self, h: SimHost) -> Any:
        if h.fqdn in self.fail_load and self._configured(h):  # the new config is what fails
            return result(stdout="loading connection 'x' failed", exit_code=1)
        h.loaded = tuple(c.name for c in self.rendered[h.fqdn].connections) if self._configured(h) else ()
        for key in [k for k in self.sas if h.fqdn in k[:2]]:
            if not self._conn_loaded(key):
                del self.sas[key]
        return "loaded\n"

    def _conn(self, local: str, peer: str, family: str) -> str:
        return f"{peer.split('.', 1)[0]}_{family}"

    def _conn_loaded(self, key: tuple[str, str, str]) -> bool:
        a, b, fam = key
        return (self._conn(a, b, fam) in self.hosts[a].loaded
                and self._conn(b, a, fam) in self.hosts[b].loaded)

    def _peer_by_conn(self, h: SimHost, name: str) -> tuple[str, str]:
        short, fam = name.rsplit("_", 1)
        peer = next(f for f in self.hosts if f.startswith(short + "."))
        return peer, fam

    def initiate(self, h: SimHost, command: str) -> Any:
        name = re.search(r"--initiate --ike (\S+)", command).group(1).strip("'")  # type: ignore[union-attr]
        peer, fam = self._peer_by_conn(h, name)
        key = (min(h.fqdn, peer), max(h.fqdn, peer), fam)
        if not self._conn_loaded(key) or {h.fqdn, peer} & self.bad_cert:
            return result(stderr="establishing CHILD_SA failed", exit_code=1)
        self.sas.setdefault(key, self._new_sa())
        return "initiate completed successfully\n"

    def _new_sa(self) -> dict[str, Any]:
        return {"spi_a": f"{next(self._spi):08x}", "spi_b": f"{next(self._spi):08x}", "bytes": 0}

    def terminate(self, h: SimHost, command: str) -> str:
        for name in re.findall(r"--terminate --ike (\S+)", command):
            name = name.strip("'")
            if "--list-conns" in command and name in h.loaded:
                continue  # terminate-removed: still configured
            peer, fam = self._peer_by_conn(h, name)
            self.sas.pop((min(h.fqdn, peer), max(h.fqdn, peer), fam), None)
        return "@@terminated\n"

    def restore(self, h: SimHost, command: str) -> Any:
        if h.fqdn in self.fail_restore:
            return result(stderr="restore failed", exit_code=1)
        run_id = re.search(r"snapshot/([^/']+)", command).group(1)  # type: ignore[union-attr]
        snap = h.snapshots.get(run_id)
        if snap is None:
            return result(stderr="@@restore no-snapshot", exit_code=1)
        for path, digest in snap.items():
            if digest is None:
                h.files.pop(path, None)
            else:
                h.files[path] = digest
        return "@@restore done\n"

    def ping(self, h: SimHost, command: str) -> str:
        peer_addr = command.split()[-4].strip("'")
        for key, sa in self.sas.items():
            if h.fqdn in key[:2]:
                other = key[1] if key[0] == h.fqdn else key[0]
                if str(self.fleet.host(other).address(key[2])) == peer_addr:  # type: ignore[arg-type]
                    sa["bytes"] += 300
        return ""

    def rekey(self, h: SimHost, command: str) -> str:
        name = re.search(r"--child (\S+)", command).group(1).strip("'")  # type: ignore[union-attr]
        peer, fam = self._peer_by_conn(h, name)
        key = (min(h.fqdn, peer), max(h.fqdn, peer), fam)
        if key in self.sas:
            self.sas[key] = {**self._new_sa(), "bytes": 0}
        return ""

    # -- collect.sh ---------------------------------------------------------------------------
    def collect(self, h: SimHost) -> str:
        out = ["@@meta", "format=1", f"host={h.fqdn}", "@@stack", "swanctl", "@@charon",
               f"running={'yes' if h.charon else 'no'}", "vici=yes", "@@latch",
               f"latched={'yes' if h.latched else 'no'}", "@@swanctl"]
        states, policies = [], []
        for (a, b, fam), sa in sorted(self.sas.items()):
            if h.fqdn not in (a, b):
                continue
            peer = b if h.fqdn == a else a
            me, other = self.fleet.host(h.fqdn).address(fam), self.fleet.host(peer).address(fam)  # type: ignore[arg-type]
            spi_in, spi_out = (sa["spi_a"], sa["spi_b"]) if h.fqdn == a else (sa["spi_b"], sa["spi_a"])
            name = self._conn(h.fqdn, peer, fam)
            bits = "32" if fam == "v4" else "128"
            out += ["list-sa event {", f"  {name} {{", "    uniqueid = 1", "    state = ESTABLISHED",
                    f"    local-host = {me}", f"    remote-host = {other}", "    child-sas {",
                    f"      {name}-1 {{", f"        name = {name}", "        uniqueid = 1",
                    "        state = INSTALLED", "        mode = TRANSPORT", "        protocol = ESP",
                    f"        spi-in = {spi_in}", f"        spi-out = {spi_out}",
                    f"        bytes-in = {sa['bytes']}", f"        bytes-out = {sa['bytes']}",
                    "      }", "    }", "  }", "}"]
            states += [f"src {other} dst {me}", f"\tproto esp spi 0x{spi_in} reqid 1 mode transport",
                       f"src {me} dst {other}", f"\tproto esp spi 0x{spi_out} reqid 1 mode transport"]
            policies += [f"src {me}/{bits} dst {other}/{bits} ", "\tdir out priority 1 ptype main ",
                         f"src {other}/{bits} dst {me}/{bits} ", "\tdir in priority 1 ptype main "]
        out += ["@@swanctl-conns"]
        out += [line for name in h.loaded for line in ("list-conn event {", f"  {name} {{", "  }", "}")]
        out += ["@@xfrm-state", *states, "@@xfrm-policy", *policies, "@@xfrm-stat", "XfrmOutNoStates 0",
                "@@exit", "swanctl 0"]
        return "\n".join(out) + "\n"


# ================================================================================================
# Fixtures
# ================================================================================================
class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)


@pytest.fixture
def fleet() -> Fleet:
    return build_fleet([("inv.yaml", INVENTORY)])


def plan_for(fleet: Fleet, text: str | None = None) -> Plan:
    return build_plan(fleet, compute_pairs(fleet), parse_playbook(text or make_playbook()))


@dataclass
class Env:
    fleet: Fleet
    sim: SimFleet
    state_dir: Path
    clock: Clock
    reporter: RecordingReporter
    stop_flag: Path

    def executor(self, **overrides: Any) -> Executor:
        rt = Runtime(transport=self.sim.fake, state_dir=self.state_dir, reporter=self.reporter,
                     clock=self.clock, sleep=self.clock.sleep, operator="tester@control", reason="T1",
                     stop_flags=(self.stop_flag,), syslog_address=None, poll_interval=1.0,
                     **overrides)
        return Executor(self.fleet, rt)


@pytest.fixture
def env(fleet: Fleet, tmp_path: Path) -> Env:
    return Env(fleet=fleet, sim=SimFleet(fleet), state_dir=tmp_path / "state", clock=Clock(),
               reporter=RecordingReporter(), stop_flag=tmp_path / "kill-requested")


ALL_SAS = sorted((a, b, f) for a in (H1, H2) for b in (H3, H4) for f in ("v4", "v6"))


# ================================================================================================
# Tests
# ================================================================================================
def test_happy_path_brings_up_every_sa(env: Env, fleet: Fleet) -> None:
    res = env.executor().apply(plan_for(fleet))
    assert res.error is None, res.message
    assert res.status == journal.COMPLETED
    assert res.stages_done == ("canary", "rest")
    assert sorted(env.sim.sas) == ALL_SAS
    assert {res.state_of(h) for h in (H1, H2, H3, H4)} == {HostState.CHANGED}
    # journal and audit exist, lock released
    state = journal.load_run(env.state_dir, res.run_id)
    assert state.status == journal.COMPLETED and state.stages_done == ["canary", "rest"]
    assert not (env.state_dir / "apply.lock").exists()
    audit = (env.state_dir / "audit.jsonl").read_text()
    assert '"operator": "tester@control"' in audit and '"reason": "T1"' in audit


def test_reapply_is_unchanged(env: Env, fleet: Fleet) -> None:
    env.executor().apply(plan_for(fleet))
    before, began, seen = env.sim.mutations, env.clock.now, len(env.reporter.events)
    rekeys = sum("swanctl --rekey" in c for c in env.sim.fake.commands())
    res = env.executor().apply(plan_for(fleet))
    assert res.error is None, res.message
    assert {res.state_of(h) for h in (H1, H2, H3, H4)} == {HostState.UNCHANGED}
    assert env.sim.mutations == before  # not one mutating command
    # every batch is still gated (health checked), but an untouched batch is not soaked or rekeyed
    gates = [e for e in env.reporter.events[seen:] if e.kind == GATE and e.state == "passed"]
    assert gates and all(e.data["samples"] == 2 for e in gates), gates  # wait + probe, no soak samples
    assert sum("swanctl --rekey" in c for c in env.sim.fake.commands()) == rekeys
    assert env.clock.now - began < 10  # the playbook's soak is 10 s per batch


def test_dry_run_changes_nothing(env: Env, fleet: Fleet) -> None:
    res = env.executor().apply(plan_for(fleet), dry_run=True)
    assert res.status == "dry-run" and res.error is None
    assert env.sim.mutations == 0 and not env.sim.sas
    assert res.state_of(H1) == HostState.WOULD_CHANGE
    assert not (env.state_dir / "runs").exists()


def test_gate_failure_rolls_back_the_batch(env: Env, fleet: Fleet) -> None:
    env.sim.bad_cert.add(H4)  # cp2002 is in the "rest" stage, batch 2 (sorted: cp1002, cp2002)
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.GateFailedRolledBack), res.message
    assert res.state_of(H4) == HostState.ROLLED_BACK
    assert all(H4 not in k for k in env.sim.sas)
    assert env.sim.hosts[H4].files == {}  # back to nothing, as before
    assert (H1, H3, "v4") in env.sim.sas  # the canary pair is untouched
    assert journal.load_run(env.state_dir, res.run_id).status == journal.STOPPED


def test_gate_failure_pause(env: Env, fleet: Fleet) -> None:
    env.sim.bad_cert.add(H4)
    res = env.executor().apply(plan_for(fleet, make_playbook(on_failure="pause")))
    assert isinstance(res.error, errors.GateFailedPaused)
    assert journal.load_run(env.state_dir, res.run_id).status == journal.PAUSED
    env.sim.bad_cert.clear()
    past = journal.load_run(env.state_dir, res.run_id)
    again = env.executor().resume(past, plan_for(fleet, make_playbook(on_failure="pause")))
    assert again.error is None, again.message
    assert sorted(env.sim.sas) == ALL_SAS


def test_rollback_failure_is_distinct(env: Env, fleet: Fleet) -> None:
    env.sim.bad_cert.add(H4)
    env.sim.fail_restore.add(H4)
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.RollbackFailed)
    assert res.error.exit_code == errors.ExitCode.ROLLBACK_FAILED
    assert "ROLLBACK FAILED" in res.message and H4 in res.message
    assert res.state_of(H4) == HostState.ROLLBACK_FAILED


def test_load_failure_counts_as_ipsec_failure(env: Env, fleet: Fleet) -> None:
    env.sim.fail_load.add(H4)
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.GateFailedRolledBack)
    assert "IPsec failures" in res.message and H4 in res.message


def test_budgets_separate_unreachable_from_ipsec(env: Env, fleet: Fleet) -> None:
    # one unreachable host is within max_unreachable=1 even though max_ipsec_failures=0
    env.sim.fake.set_unreachable(H4)
    res = env.executor().apply(plan_for(fleet, make_playbook(unreach=1, ipsec=0)))
    assert res.error is None, res.message
    assert res.state_of(H4) == HostState.UNREACHABLE
    assert (H2, H3, "v4") in env.sim.sas


def test_unreachable_over_budget(env: Env, fleet: Fleet) -> None:
    env.sim.fake.set_unreachable(H4)
    res = env.executor().apply(plan_for(fleet, make_playbook(unreach=0, ipsec=5)))
    assert isinstance(res.error, errors.UnreachableError)
    assert H4 in res.message


def test_ipsec_failure_within_budget_rolls_back_only_that_host(env: Env, fleet: Fleet) -> None:
    env.sim.bad_cert.add(H4)
    res = env.executor().apply(plan_for(fleet, make_playbook(unreach=0, ipsec=1)))
    assert res.error is None, res.message
    assert res.state_of(H4) == HostState.ROLLED_BACK
    assert res.state_of(H2) == HostState.CHANGED
    assert all(H4 not in k for k in env.sim.sas)


def test_latched_host_refused_naming_it(env: Env, fleet: Fleet) -> None:
    env.sim.hosts[H3].latched = True
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.HostLatchedError)
    assert H3 in res.message
    assert env.sim.mutations == 0


def test_lock_refusal_names_owner(env: Env, fleet: Fleet) -> None:
    other = RunLock(env.state_dir / "apply.lock", owner=("alice", "cumin1001", 4242), clock=env.clock)
    other.acquire("20260101T000000Z-abcdef")
    with pytest.raises(errors.LockedError, match="alice@cumin1001 pid 4242"):
        env.executor().apply(plan_for(fleet))
    assert env.sim.mutations == 0


def test_stale_lock_is_taken_over(env: Env, fleet: Fleet) -> None:
    warnings: list[str] = []
    other = RunLock(env.state_dir / "apply.lock", owner=("alice", "cumin1001", 4242), clock=env.clock, ttl=60)
    other.acquire("20260101T000000Z-abcdef")
    env.clock.now += 120
    res = env.executor(warn=warnings.append).apply(plan_for(fleet))
    assert res.error is None
    assert any("stale" in w and "alice" in w for w in warnings)


def test_kill_stop_flag_stops_at_next_step(env: Env, fleet: Fleet) -> None:
    flag = env.stop_flag
    at_kill: list[int] = []

    def kill_after_first_install(host: Any, command: str, stdin: str | None) -> Any:
        answer = env.sim.handle(host, command, stdin)
        if "@@written" in command and not at_kill:
            flag.write_text('{"who": "oncall", "reason": "incident"}')
            at_kill.append(env.sim.mutations)
        return answer

    env.sim.fake.default = kill_after_first_install
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.KilledDuringApply)
    assert "oncall" in res.message
    # the other worker of the canary batch may finish the step it is in, then nothing more runs
    assert env.sim.mutations <= at_kill[0] + 1
    assert journal.load_run(env.state_dir, res.run_id).status == journal.KILLED
    assert not (env.state_dir / "apply.lock").exists()


def test_rollback_run_restores_everything(env: Env, fleet: Fleet) -> None:
    res = env.executor().apply(plan_for(fleet))
    past = journal.load_run(env.state_dir, res.run_id)
    undo = env.executor().rollback(past, plan_for(fleet), to_stage="canary")
    assert undo.error is None, undo.message
    assert sorted(env.sim.sas) == [(H1, H3, "v4"), (H1, H3, "v6")]
    assert env.sim.hosts[H2].files == {} and env.sim.hosts[H4].files == {}
    undo_all = env.executor().rollback(journal.load_run(env.state_dir, res.run_id), plan_for(fleet))
    assert undo_all.error is None, undo_all.message
    assert env.sim.sas == {}
    assert all(h.files == {} for h in env.sim.hosts.values())


def test_teardown_removes_everything(env: Env, fleet: Fleet) -> None:
    env.executor().apply(plan_for(fleet))
    res = env.executor().teardown(plan_for(fleet))
    assert res.error is None, res.message
    assert env.sim.sas == {}
    assert all(h.files == {} and h.loaded == () for h in env.sim.hosts.values())
    assert {res.state_of(h) for h in (H1, H2, H3, H4)} == {HostState.REMOVED}


def test_json_events(env: Env, fleet: Fleet) -> None:
    env.executor().apply(plan_for(fleet))
    kinds = [e.kind for e in env.reporter.events]
    assert kinds[0] == "run-start" and kinds[-1] == "run-end"
    assert "gate" in kinds and "batch-start" in kinds


def _reference_state(fleet: Fleet, tmp_path: Path) -> tuple[dict[str, Any], int]:
    ref = Env(fleet=fleet, sim=SimFleet(fleet), state_dir=tmp_path / "ref", clock=Clock(),
              reporter=RecordingReporter(), stop_flag=tmp_path / "nope")
    assert ref.executor().apply(plan_for(fleet)).error is None
    return ref.sim.state(), ref.sim.mutations


def test_resume_after_crash_at_every_step_converges(fleet: Fleet, tmp_path: Path) -> None:
    final, total = _reference_state(fleet, tmp_path)
    assert total > 10
    for n in range(total):
        env = Env(fleet=fleet, sim=SimFleet(fleet), state_dir=tmp_path / f"s{n}", clock=Clock(),
                  reporter=RecordingReporter(), stop_flag=tmp_path / "nope")
        env.sim.crash_after = n
        with pytest.raises(Crash):
            env.executor().apply(plan_for(fleet, make_playbook().replace("parallelism: 4", "parallelism: 1")))
        env.sim.crash_after = None
        runs = list(journal.list_runs(env.state_dir))
        assert len(runs) == 1 and runs[0].status is None  # interrupted
        env.clock.now += 3600  # the dead run's lock is stale by TTL
        res = env.executor().resume(runs[0], plan_for(fleet))
        assert res.error is None, f"crash after {n}: {res.message}"
        assert env.sim.state() == final, f"crash after {n} mutations"


def test_host_latched_during_gate_stops_as_killed(env: Env, fleet: Fleet) -> None:
    original = env.sim.collect

    def latch_then_collect(h: SimHost) -> str:
        if env.sim.sas:
            h.latched = True
        return original(h)

    env.sim.collect = latch_then_collect  # type: ignore[method-assign]
    res = env.executor().apply(plan_for(fleet))
    assert isinstance(res.error, errors.KilledDuringApply)
    assert "latched" in res.message


# ================================================================================================
# CLI (typer runner, FakeTransport-backed simulated fleet)
# ================================================================================================
@pytest.fixture
def cli_env(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    import yaml

    from rollout import killswitch
    from rollout.cli import apply as cli_apply

    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "fleet.yaml").write_text(yaml.safe_dump(INVENTORY))
    book = tmp_path / "book.yaml"
    book.write_text(make_playbook().replace("soak: 10, samples: 2", "soak: 0, samples: 1"))
    monkeypatch.setattr(cli_apply, "transport_factory", lambda: env.sim.fake)
    monkeypatch.setattr(killswitch, "STOP_FLAG", tmp_path / "kill-requested")
    monkeypatch.setenv("IPSEC_ROLLOUT_HOST_CACHE", str(tmp_path / "hosts.json"))
    return {"inventory": inv, "book": book, "state": tmp_path / "cli-state"}


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from rollout.cli import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_cli_refuses_without_terminal_or_yes(cli_env: dict[str, Path], env: Env) -> None:
    res = _cli("apply", str(cli_env["book"]), "--inventory", str(cli_env["inventory"]),
               "--state-dir", str(cli_env["state"]))
    assert isinstance(res.exception, errors.Refused)
    assert env.sim.mutations == 0


def test_cli_apply_json_then_runs(cli_env: dict[str, Path], env: Env) -> None:
    import json

    res = _cli("apply", str(cli_env["book"]), "--inventory", str(cli_env["inventory"]),
               "--state-dir", str(cli_env["state"]), "--yes", "--json", "--reason", "T42")
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert events[0]["kind"] == "run-start" and events[-1]["state"] == "completed"
    assert sorted(env.sim.sas) == ALL_SAS
    assert (cli_env["state"].parent / "hosts.json").exists()  # the kill switch's host cache
    listing = _cli("runs", "--json", "--state-dir", str(cli_env["state"]))
    runs = json.loads(listing.stdout)
    assert runs[0]["status"] == "completed" and runs[0]["reason"] == "T42"
    assert runs[0]["stages_done"] == ["canary", "rest"]


# ------------------------------------------------------------------------------------------------
# Enforce (trap policies): never hold traffic towards a peer that is not enabled
# ------------------------------------------------------------------------------------------------
ENFORCE_ALL_AT_ONCE = """
name: enforce
defaults: {gates: {timeout: 20, soak: 10, samples: 2}, parallelism: 4}
stages:
  - name: all
    select: {clusters: [cache_text]}
    batch: 100%
    enforce: true
    budgets: {max_ipsec_failures: 1}
"""


def test_enforce_stage_that_would_blackhole_unenabled_peers_is_refused(fleet: Fleet) -> None:
    staged = make_playbook().replace("    batch: 1\n", "    batch: 1\n    enforce: true\n")
    playbook = parse_playbook(staged, source="playbooks/staged.yaml")
    with pytest.raises(errors.PlaybookError) as exc:
        build_plan(fleet, compute_pairs(fleet), playbook)
    text = str(exc.value)
    assert text.startswith("playbooks/staged.yaml: stage 'rest': enforce (trap policies) would blackhole")
    assert f"({H2})" in text and f"({H4})" in text  # the host that would hold, the peer not enabled
    assert "enforce: false" in (exc.value.hint or "")


def test_enforce_with_every_peer_in_the_batch_is_planned(fleet: Fleet) -> None:
    plan = build_plan(fleet, compute_pairs(fleet), parse_playbook(ENFORCE_ALL_AT_ONCE))
    assert all(h.enforce for h in plan.stages[0].batches[0].hosts)


def test_enforcing_peer_drops_its_trap_towards_a_rolled_back_host(env: Env, fleet: Fleet) -> None:
    warnings: list[str] = []
    env.sim = SimFleet(fleet, enforce=True)
    env.sim.bad_cert.add(H4)
    plan = build_plan(fleet, compute_pairs(fleet), parse_playbook(ENFORCE_ALL_AT_ONCE))
    res = env.executor(warn=warnings.append).apply(plan)
    assert res.error is None, res.message
    assert res.state_of(H4) == HostState.ROLLED_BACK
    for peer in (H1, H2):  # both stay enabled; neither may keep holding traffic towards H4
        untrapped = [c for c in env.sim.fake.commands(peer) if "swanctl --uninstall --child" in c]
        assert untrapped and all(H4.split(".")[0] in c for c in untrapped), untrapped
    assert not any("--uninstall" in c for c in env.sim.fake.commands(H3))  # not a peer of H4
    assert any("trap policies towards" in w and H4 in w for w in warnings), warnings
