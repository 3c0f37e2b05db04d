"""ipsec-kill without SSH: FakeTransport-driven outcomes, fallbacks, CLI safety, quoting, and the real
kill.sh inside a throwaway namespace sandbox (no host state touched)."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout import errors, hostcache, killswitch
from rollout.audit import read_audit
from rollout.cli import kill as kill_cli
from rollout.errors import ExitCode
from rollout.killswitch import KillOptions, Outcome, Scope, Targets
from rollout.model import Cluster, Fleet, Host, IpsecSettings, Site, SshSettings, Tier
from rollout.testing import FakeTransport, Hang, Unreachable, result

KILLED = "IPSEC-KILL result=killed states=0 policies=0 charon=0 latched=1 errors=none version=1"
CLEAN = "IPSEC-KILL result=already-clean states=0 policies=0 charon=0 latched=1 errors=none version=1"


def make_host(fqdn: str, site: str = "eqiad", cluster: str = "cache") -> Host:
    return Host(fqdn=fqdn, site=site, cluster=cluster, os="debian-bookworm", ssh=SshSettings(netns="lab"))


def make_fleet(*hosts: Host) -> Fleet:
    return Fleet(sites={n: Site(name=n, tier=Tier.CORE) for n in ("eqiad", "codfw")},
                 clusters={"cache": Cluster(name="cache"), "kafka": Cluster(name="kafka")},
                 hosts={h.fqdn: h for h in hosts}, rules=(), ipsec=IpsecSettings(), ssh=SshSettings(),
                 sources=("test",))


HOSTS = (make_host("a1.eqiad.test"), make_host("a2.eqiad.test"), make_host("b1.codfw.test", "codfw"),
         make_host("k1.eqiad.test", cluster="kafka"))


def targets(*hosts: Host) -> Targets:
    return Targets(hosts=hosts or HOSTS, source="test")


def options(**kw: object) -> KillOptions:
    base: dict[str, object] = {"who": "tester@test", "reason": "unit test", "retry_delay": 0.0,
                               "deadline": 10.0}
    return KillOptions(**{**base, **kw})  # type: ignore[arg-type]


def run(fake: FakeTransport, tmp_path: Path, **kw: object) -> killswitch.KillReport:
    return killswitch.run_kill(targets(), fake, options(**kw), stop_flag=tmp_path / "kill-requested")


# ---- outcomes -------------------------------------------------------------------------------------
def test_all_killed_is_exit_ok_and_writes_stop_flag(tmp_path: Path) -> None:
    fake = FakeTransport([("ipsec-kill", result(stdout=KILLED))])
    report = run(fake, tmp_path)
    assert {r.outcome for r in report.results} == {Outcome.KILLED}
    assert report.exit_code == ExitCode.OK
    assert fake.hosts() == {h.fqdn for h in HOSTS}
    assert json.loads((tmp_path / "kill-requested").read_text())["who"] == "tester@test"


def test_mixed_outcomes_are_partial_and_named(tmp_path: Path) -> None:
    # rules are first-match: host-specific answers first
    fake2 = FakeTransport([], unreachable={"a2.eqiad.test"})
    fake2.on("ipsec-kill", Hang(), host="b1.codfw.test")
    fake2.on("ipsec-kill", result(stdout=CLEAN), host="k1.eqiad.test")
    fake2.on("ipsec-kill", result(stdout="IPSEC-KILL result=failed states=2 policies=0 charon=1 latched=1",
                                  exit_code=1))
    report = run(fake2, tmp_path, retries=1)
    by_host = {r.fqdn: r for r in report.results}
    assert by_host["a1.eqiad.test"].outcome is Outcome.FAILED
    assert "states=2" in by_host["a1.eqiad.test"].detail
    assert by_host["a2.eqiad.test"].outcome is Outcome.UNREACHABLE
    assert by_host["a2.eqiad.test"].attempts == 2
    assert by_host["b1.codfw.test"].outcome is Outcome.FAILED  # timed out: started, not confirmed
    assert by_host["k1.eqiad.test"].outcome is Outcome.ALREADY_CLEAN
    assert report.exit_code == ExitCode.PARTIAL
    assert set(report.to_dict()["not_clean"]) == {"a1.eqiad.test", "a2.eqiad.test", "b1.codfw.test"}
    assert "a2.eqiad.test" not in fake2.hosts()  # never ran there


def test_unreachable_host_is_retried_in_background(tmp_path: Path) -> None:
    fake = FakeTransport([]).on("ipsec-kill", Unreachable(), host="a1.eqiad.test", times=2)
    fake.on("ipsec-kill", result(stdout=KILLED))
    report = run(fake, tmp_path, retries=3)
    a1 = next(r for r in report.results if r.fqdn == "a1.eqiad.test")
    assert a1.outcome is Outcome.KILLED and a1.attempts == 3
    assert report.exit_code == ExitCode.OK


def test_host_key_mismatch_is_not_retried(tmp_path: Path) -> None:
    fake2 = FakeTransport([("ipsec-kill", errors.HostKeyMismatch("a1.eqiad.test", "changed key"))])
    report = killswitch.run_kill(targets(HOSTS[0]), fake2, options(retries=3), stop_flag=None)
    assert report.results[0].outcome is Outcome.UNREACHABLE
    assert len(fake2.calls) == 1
    assert "changed key" in report.results[0].detail


def test_claimed_kill_with_leftover_state_is_failed() -> None:
    out = result(stdout="noise\nIPSEC-KILL result=killed states=1 policies=0 charon=0 latched=1\n")
    judged = killswitch.judge("h", out, rearm=False, attempts=1)
    assert judged.outcome is Outcome.FAILED
    garbage = killswitch.judge("h", result(stdout="garbage", stderr="sh: boom"), False, 1)
    assert garbage.outcome is Outcome.FAILED and garbage.detail.endswith("boom")


def test_global_deadline_bounds_the_run(tmp_path: Path) -> None:
    fake = FakeTransport([("ipsec-kill", Hang())], sleep=True)
    started = time.monotonic()
    report = run(fake, tmp_path, deadline=1.0, command_timeout=30.0)
    assert time.monotonic() - started < 3.0
    assert {r.outcome for r in report.results} == {Outcome.FAILED}
    assert report.exit_code == ExitCode.PARTIAL


def test_parallelism_is_bounded(tmp_path: Path) -> None:
    import threading

    live, peak, lock = [0], [0], threading.Lock()

    def slow(host: Host, command: str, stdin: str | None) -> str:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return KILLED

    many = tuple(make_host(f"h{i}.eqiad.test") for i in range(20))
    report = killswitch.run_kill(targets(*many), FakeTransport([("ipsec-kill", slow)]), options(parallel=4),
                                 stop_flag=None)
    assert report.exit_code == ExitCode.OK and peak[0] <= 4


def test_idempotent_second_run_reports_already_clean(tmp_path: Path) -> None:
    state: dict[str, bool] = {}

    def host_script(host: Host, command: str, stdin: str | None) -> str:
        was_dirty = not state.get(host.fqdn)
        state[host.fqdn] = True
        return KILLED if was_dirty else CLEAN

    fake = FakeTransport([("ipsec-kill", host_script)])
    assert run(fake, tmp_path).count(Outcome.KILLED) == len(HOSTS)
    second = run(fake, tmp_path)
    assert second.count(Outcome.ALREADY_CLEAN) == len(HOSTS) and second.exit_code == ExitCode.OK


def test_rearm_clears_stop_flag_and_expects_unlatched(tmp_path: Path) -> None:
    flag = tmp_path / "kill-requested"
    flag.write_text("{}")
    fake = FakeTransport([("ipsec-kill rearm", result(
        stdout="IPSEC-KILL result=rearmed states=0 policies=0 charon=0 latched=0"))])
    report = killswitch.run_kill(targets(), fake, options(rearm=True), stop_flag=flag)
    assert report.exit_code == ExitCode.OK and not flag.exists()
    assert all(" rearm " in c for c in fake.commands())


# ---- targets and fallbacks -------------------------------------------------------------------------
def test_scope_filters() -> None:
    fleet = make_fleet(*HOSTS)

    def pick(scope: Scope) -> set[str]:
        got = killswitch.select_targets(scope, inventory=Path("x"), load_inventory=lambda _: fleet)
        return {h.fqdn for h in got.hosts}

    assert pick(Scope(all=True)) == set(fleet.hosts)
    assert pick(Scope(sites=("codfw",))) == {"b1.codfw.test"}
    assert pick(Scope(clusters=("kafka",))) == {"k1.eqiad.test"}
    assert pick(Scope(hosts=("a*.eqiad.test", "b1"))) == {"a1.eqiad.test", "a2.eqiad.test", "b1.codfw.test"}
    with pytest.raises(errors.InputError):
        Scope()
    with pytest.raises(errors.InputError):
        pick(Scope(sites=("nowhere",)))


def test_broken_inventory_falls_back_to_host_cache(tmp_path: Path) -> None:
    cache = hostcache.save_hosts(make_fleet(*HOSTS), tmp_path / "hosts.json")
    broken = tmp_path / "inventory"
    broken.mkdir()
    (broken / "hosts.yaml").write_text("hosts: [unclosed\n")
    got = killswitch.select_targets(Scope(all=True), inventory=broken, cache=cache)
    assert {h.fqdn for h in got.hosts} == {h.fqdn for h in HOSTS}
    assert "host cache" in got.source
    assert any("unusable" in w for w in got.warnings)
    assert got.hosts[0].ssh.netns == "lab"  # SSH settings survive the cache


def test_hosts_file_wins_and_parses_settings(tmp_path: Path) -> None:
    listed = tmp_path / "hosts.txt"
    listed.write_text("# emergency list\n"
                      "x1.test ssh_host=198.18.0.5 port=2222 netns=lab site=eqiad  # comment\nx2.test\n")
    got = killswitch.select_targets(Scope(all=True), inventory=None, hosts_file=listed,
                                    ssh_overrides={"connect_timeout": 2.0})
    x1 = got.hosts[0]
    assert (x1.fqdn, x1.connect_address, x1.ssh.port, x1.ssh.netns) == ("x1.test", "198.18.0.5", 2222, "lab")
    assert x1.ssh.connect_timeout == 2.0 and len(got.hosts) == 2
    listed.write_text("x1.test bogus=1\n")
    with pytest.raises(errors.InputError):
        killswitch.select_targets(Scope(all=True), inventory=None, hosts_file=listed)


def test_host_cache_round_trip(tmp_path: Path) -> None:
    fleet = make_fleet(*HOSTS)
    path = hostcache.save_hosts(fleet, tmp_path / "sub" / "hosts.json")
    loaded = hostcache.load_hosts(path)
    assert loaded.hosts == tuple(fleet.hosts.values())
    with pytest.raises(errors.InputError):
        hostcache.load_hosts(tmp_path / "missing.json")


# ---- quoting ---------------------------------------------------------------------------------------
NASTY = st.text(alphabet=st.sampled_from(list("a;$()`\\\n'\" -x*|&<>{}!#~")), max_size=30)


@settings(max_examples=60, deadline=None)
@given(who=NASTY, reason=NASTY)
def test_remote_command_quotes_every_value(who: str, reason: str) -> None:
    opts = options(who=who, reason=reason)
    command = killswitch.remote_command(opts, body='printf "%s\\n" "$1" "$2" "$3"; printf "<%s>" "$4"')
    words = shlex.split(command)
    assert words[4:] == ["kill", who, reason, opts.run_id]
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert out == f"kill\n{who}\n{reason}\n<{opts.run_id}>"


# ---- CLI safety ------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hostcache.save_hosts(make_fleet(*HOSTS), tmp_path / "hosts.json")
    monkeypatch.setenv(hostcache.ENV_OVERRIDE, str(tmp_path / "hosts.json"))
    monkeypatch.delenv("IPSEC_ROLLOUT_INVENTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return tmp_path


def cli(args: list[str], state: Path) -> int:
    old = sys.argv
    sys.argv = ["ipsec-kill", *args, "--state-dir", str(state)]
    try:
        kill_cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


def _refuse_transport(_: int = 0) -> FakeTransport:
    raise AssertionError("no transport may be created")


def test_dry_run_touches_nothing(cli_env: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(kill_cli, "transport_factory", _refuse_transport)
    state = cli_env / "state"
    assert cli(["--all", "--dry-run"], state) == 0
    out = capsys.readouterr().out
    assert "ip xfrm policy flush" in out and "a1.eqiad.test" in out and "DRY-RUN" in out
    assert not state.exists()
    assert not list(cli_env.glob("ipsec-kill-*.json"))


def test_refuses_without_tty_or_yes(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kill_cli, "transport_factory", _refuse_transport)
    assert cli(["--all"], cli_env / "state") == ExitCode.REFUSED


def test_cli_partial_exit_report_and_audit(cli_env: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTransport([("ipsec-kill", result(stdout=KILLED))], unreachable={"b1.codfw.test"})
    monkeypatch.setattr(kill_cli, "transport_factory", lambda _: fake)
    state = cli_env / "state"
    code = cli(["--all", "--yes", "--retries", "0", "--json", "--report", str(cli_env / "r.json")], state)
    assert code == ExitCode.PARTIAL
    report = json.loads((cli_env / "r.json").read_text())
    assert report["not_clean"] == ["b1.codfw.test"] and report["summary"]["killed"] == 3
    assert json.loads(capsys.readouterr().out)["run_id"] == report["run_id"]
    audit = read_audit(state / "audit.jsonl")  # the same trail and schema as apply's
    run = audit[-1]
    assert (run.host, run.action, run.result) == ("*", "ipsec-kill", f"exit {int(ExitCode.PARTIAL)}")
    assert json.loads(run.detail)["not_clean"] == ["b1.codfw.test"] and run.run_id == report["run_id"]
    per_host = {r.host: r.result for r in audit[:-1]}
    assert per_host == {h["host"]: h["outcome"] for h in report["hosts"]}
    assert per_host["b1.codfw.test"] == "unreachable"
    assert (state / "kill-requested").exists()
    assert fake.closed


def test_cli_default_report_in_cwd(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kill_cli, "transport_factory", lambda _: FakeTransport([("", result(stdout=CLEAN))]))
    assert cli(["--host", "a1", "--yes"], cli_env / "state") == 0
    [report] = cli_env.glob("ipsec-kill-*.json")
    assert json.loads(report.read_text())["hosts"][0]["outcome"] == "already-clean"


# ---- the real script, in a sandbox (own net/pid/mount namespaces, private /etc and /run) -----------
SANDBOX = """
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/u,workdir={d}/w /etc
mount -t tmpfs tmpfs /run
rm -f /etc/init.d/ipsec /etc/init.d/strongswan
ip link set lo up
ip xfrm policy add src 198.18.0.1 dst 198.18.0.2 dir out tmpl proto esp mode transport
ip xfrm policy add src fd00::1 dst fd00::2 dir in tmpl proto esp mode transport
set +e
for step in 1 2; do sh -c "$KILL_CMD"; echo "rc=$?"; done
cat /etc/ipsec-rollout/latched
sh -c "$REARM_CMD"; echo "rc=$?"
test -e /etc/ipsec-rollout/latched && echo STILL-LATCHED
ip xfrm policy list | grep -c dir || true
"""


def needs_sandbox() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and iproute2")


def test_kill_script_in_sandbox(tmp_path: Path) -> None:
    needs_sandbox()
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    kill = killswitch.remote_command(options(who="op'; touch /tmp/pwned-by-who; '", reason='x"$(id)"'))
    rearm = killswitch.remote_command(options(rearm=True))
    env = {**os.environ, "KILL_CMD": kill, "REARM_CMD": rearm}
    proc = subprocess.run(["unshare", "-n", "-m", "-p", "-f", "--mount-proc", "sh", "-c",
                           SANDBOX.format(d=tmp_path)], capture_output=True, text=True, env=env, timeout=60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("IPSEC-KILL")]
    assert len(lines) == 3, proc.stdout + proc.stderr
    first, second, third = (killswitch.parse_result_line(ln) or {} for ln in lines)
    assert first["result"] == "killed" and first["before_policies"] == "2" and first["policies"] == "0"
    assert second["result"] == "already-clean"
    assert third["result"] == "rearmed" and third["latched"] == "0"
    assert "STILL-LATCHED" not in proc.stdout
    latch = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert latch["who"] == "op'; touch /tmp/pwned-by-who; '" and latch["reason"] == 'x"$(id)"'
    assert not Path("/tmp/pwned-by-who").exists()
    assert "0x" not in proc.stdout  # never key material


def test_connections_are_released_after_each_host(tmp_path: Path) -> None:
    released: list[str] = []

    class Releasing(FakeTransport):
        def release(self, host: Host) -> None:
            released.append(host.fqdn)

    fake = Releasing([("ipsec-kill", result(stdout=KILLED))])
    report = killswitch.run_kill(targets(), fake, options(), stop_flag=None)
    assert report.exit_code == ExitCode.OK and sorted(released) == sorted(h.fqdn for h in HOSTS)
