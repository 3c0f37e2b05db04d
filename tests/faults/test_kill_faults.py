"""ipsec-kill under stress (F1, F2, F3, F8): 20% of hosts unreachable, a silent SSH server, a hanging
remote command. The rest are done within the deadline, the exit code is PARTIAL, the report lists
every host exactly once.

The real-SSH test, once per SSH client, uses the throwaway sshd of tests/sshd_fixture.py, and runs a
harmless stand-in for the kill script there (the sshd shares this machine's filesystem: the real
kill.sh would latch it)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout import errors, hostcache, killswitch
from rollout.audit import read_audit
from rollout.cli import kill as kill_cli
from rollout.errors import ExitCode
from rollout.killswitch import KillOptions, Outcome, Targets
from rollout.model import Host, SshSettings
from rollout.testing import FakeTransport, Hang, result
from rollout.transport import CommandResult
from tests.sshd_fixture import Sshd, sshd  # noqa: F401  (module-scoped fixture)
from tests.test_killswitch import KILLED, make_fleet, make_host

FLEET = tuple(make_host(f"cp{i:04d}.eqiad.test") for i in range(1, 21))  # 20 hosts
DOWN = {FLEET[3].fqdn, FLEET[7].fqdn, FLEET[11].fqdn, FLEET[15].fqdn}  # 20%


def _cli(args: list[str], state: Path) -> int:
    old = sys.argv
    sys.argv = ["ipsec-kill", *args, "--state-dir", str(state)]
    try:
        kill_cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


def test_kill_with_20_percent_unreachable_and_one_hang(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: 4 of 20 unreachable (retried, then reported), 1 hanging until its command
    timeout; the other 15 killed well within the deadline; exit PARTIAL; report + audit complete."""
    hostcache.save_hosts(make_fleet(*FLEET), tmp_path / "hosts.json")
    monkeypatch.setenv(hostcache.ENV_OVERRIDE, str(tmp_path / "hosts.json"))
    monkeypatch.delenv("IPSEC_ROLLOUT_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    hung = FLEET[0].fqdn
    fake = FakeTransport([("ipsec-kill", result(stdout=KILLED))], unreachable=DOWN, sleep=True)
    fake.on("", Hang(), host=hung)
    fake._rules.insert(0, fake._rules.pop())  # the hang rule first
    monkeypatch.setattr(kill_cli, "transport_factory", lambda *_: fake)
    began = time.monotonic()
    code = _cli(["--all", "--yes", "--retries", "2", "--command-timeout", "3", "--deadline", "20",
                 "--report", str(tmp_path / "r.json")], tmp_path / "state")
    took = time.monotonic() - began
    assert code == ExitCode.PARTIAL
    assert took < 20, took
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(report["not_clean"]) == sorted(DOWN | {hung})
    assert report["summary"]["killed"] == 15 and report["summary"]["total"] == 20
    assert sorted(h["host"] for h in report["hosts"]) == sorted(h.fqdn for h in FLEET)  # each once
    rows = {h["host"]: h for h in report["hosts"]}
    assert all(rows[d]["outcome"] == "unreachable" and rows[d]["attempts"] == 3 for d in DOWN)
    assert rows[hung]["outcome"] == "failed" and "3 s" in rows[hung]["detail"]
    audit = read_audit(tmp_path / "state" / "audit.jsonl")
    assert sorted(r.host for r in audit[:-1]) == sorted(h.fqdn for h in FLEET)  # each host once
    run = json.loads(audit[-1].detail)
    assert sorted(run["not_clean"]) == sorted(DOWN | {hung}) and run["exit_code"] == ExitCode.PARTIAL


def test_deadline_bounds_a_fleet_of_hangs() -> None:
    """Every host hangs: the global deadline ends the run, each host is reported, none lost."""
    fake = FakeTransport([("", Hang())], sleep=True)
    began = time.monotonic()
    report = killswitch.run_kill(Targets(hosts=FLEET, source="test"), fake,
                                 KillOptions(who="t@t", command_timeout=60, deadline=3, parallel=8),
                                 stop_flag=None)
    assert time.monotonic() - began < 3 + 2
    assert report.exit_code == ExitCode.PARTIAL
    assert len(report.results) == len(FLEET) and all(not r.outcome.clean for r in report.results)


# -------------------------------------------------------------------------------- real SSH, real sockets
class _StandIn:
    """Delegates to SshTransport, replacing the kill script by a harmless command per host."""

    def __init__(self, inner: object, commands: dict[str, str]) -> None:
        self.inner, self.commands = inner, commands

    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        assert "IPSEC-KILL" in command or "ipsec-kill" in command
        return self.inner.run(host, self.commands[host.fqdn], timeout=timeout)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]


class _AsyncStandIn(_StandIn):
    """The same for AsyncSshTransport (the kill switch's own client)."""

    async def run_async(self, host: Host, command: str, *, timeout: float,
                        stdin: str | None = None) -> CommandResult:
        assert "IPSEC-KILL" in command or "ipsec-kill" in command
        return await self.inner.run_async(host, self.commands[host.fqdn], timeout=timeout)  # type: ignore

    async def aclose(self) -> None:
        await self.inner.aclose()  # type: ignore[attr-defined]


def _stand_in(client: str, commands: dict[str, str]) -> _StandIn:
    if client == "asyncssh":
        from rollout.sshasync import AsyncSshTransport

        return _AsyncStandIn(AsyncSshTransport(ssh_config=None, agent=False), commands)
    from rollout.ssh import SshTransport

    return _StandIn(SshTransport(ssh_config=None, agent=False), commands)


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """Accepts TCP and never sends an SSH banner."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def blackhole(sshd: Sshd) -> Iterator[str]:  # noqa: F811
    """An address inside the sshd's namespace that silently drops every packet (no RST, no ICMP)."""
    address = "198.18.255.1"
    ns = ["ip", "netns", "exec", sshd.netns]
    subprocess.run(["ip", "-n", sshd.netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    subprocess.run([*ns, "iptables", "-I", "INPUT", "-d", address, "-j", "DROP"], check=True)
    try:
        yield address
    finally:
        subprocess.run([*ns, "iptables", "-D", "INPUT", "-d", address, "-j", "DROP"], check=False)
        subprocess.run(["ip", "-n", sshd.netns, "addr", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.mark.parametrize("client", ["paramiko", "asyncssh"])
def test_silent_banner_blackhole_and_hang_are_bounded_others_proceed(sshd: Sshd,  # noqa: F811
                                                                     silent_listener: int, blackhole: str,
                                                                     client: str) -> None:
    good = [sshd.host(connect_timeout=5.0) for _ in range(3)]
    good = [Host(fqdn=f"ok{i}.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1", ssh=h.ssh)
            for i, h in enumerate(good)]
    hang = Host(fqdn="hang.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1", ssh=good[0].ssh)
    quiet = SshSettings(port=silent_listener, connect_timeout=2.0, use_ssh_config=False,
                        known_hosts=str(sshd.known_hosts), identity=str(sshd.client_key))
    silent = Host(fqdn="silent.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1", ssh=quiet)
    hole = Host(fqdn="hole.test", site="s", cluster="c", os="lab-uml", ssh_host=blackhole,
                ssh=SshSettings(connect_timeout=2.0, use_ssh_config=False, known_hosts=str(sshd.known_hosts),
                                identity=str(sshd.client_key), netns=sshd.netns))
    ok_line = "echo 'IPSEC-KILL result=killed states=0 policies=0 charon=0 latched=1 errors=none version=1'"
    commands = {h.fqdn: ok_line for h in good} | {"hang.test": "sleep 120", "silent.test": ok_line,
                                                   "hole.test": ok_line}
    transport = _stand_in(client, commands)
    done_at: dict[str, float] = {}
    began = time.monotonic()
    try:
        report = killswitch.run_kill(
            Targets(hosts=(silent, hole, hang, *good), source="test"), transport,
            KillOptions(who="t@t", command_timeout=4, deadline=30, retries=1, retry_delay=0.5, parallel=8),
            on_result=lambda r: done_at.setdefault(r.fqdn, time.monotonic() - began), stop_flag=None)
    finally:
        transport.close()
    took = time.monotonic() - began
    by = {r.fqdn: r for r in report.results}
    assert report.exit_code == ExitCode.PARTIAL
    assert all(by[h.fqdn].outcome is Outcome.KILLED for h in good), report.to_json()
    assert all(done_at[h.fqdn] < 15 for h in good), done_at  # not held up by the others
    assert by["silent.test"].outcome is Outcome.UNREACHABLE
    assert by["hole.test"].outcome is Outcome.UNREACHABLE and "timed out" in by["hole.test"].detail
    assert by["hang.test"].outcome is Outcome.FAILED
    # silent / blackhole: 2 attempts x (2 s connect/banner bound + slack) + retry delay
    assert done_at["silent.test"] < 2 * 2 * 3 + 2 and done_at["hole.test"] < 2 * 2 * 3 + 2, done_at
    assert done_at["hang.test"] < 4 + 4, done_at
    assert took < 30


def test_transport_errors_are_typed() -> None:
    """The contract the bounds rely on: never-ran vs started-but-hung are distinct types."""
    assert issubclass(errors.HostKeyMismatch, errors.HostUnreachable)
    assert not issubclass(errors.CommandTimeout, errors.HostUnreachable)
