"""rollout.monitor + `ipsec-rollout check/status`, against captured collect.sh output and a fake transport."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rollout.cli.monitor  # noqa: F401  (registers check/status on the app)
from rollout import health, monitor, pairing
from rollout.cli import app
from rollout.errors import RolloutError
from rollout.model import Cluster, Fleet, Host, IpsecSettings, PairingRule, Selector, Site, SshSettings, Tier
from rollout.monitor import NagiosState
from rollout.testing import FakeTransport, result

DATA = Path(__file__).parent / "data" / "health"
A, B = "cp1001.eqiad.example.net", "cp2001.codfw.example.net"
CRIT, BOTH = "IPSEC CRITICAL - ok: 0", "cp2001_v4,cp2001_v6"
KEYS = re.compile(r"0x[0-9a-f]{32,}|PRIVATE KEY", re.I)
INVENTORY = """
sites: {eqiad: {tier: core}, codfw: {tier: core}}
clusters: {cache_text: {description: text}}
hosts:
  cp1001.eqiad.example.net: {site: eqiad, cluster: cache_text, os: debian-bookworm,
                             ipv4: 198.18.99.1, ipv6: "fd99::1"}
  cp2001.codfw.example.net: {site: codfw, cluster: cache_text, os: debian-bookworm,
                             ipv4: 198.18.99.2, ipv6: "fd99::2"}
pairing:
  - {name: core-core, a: {sites: [eqiad]}, b: {sites: [codfw]}}
"""


def host(fqdn: str, n: int, site: str) -> Host:
    return Host(fqdn=fqdn, site=site, cluster="cache_text", os="lab-uml",
                ipv4=ipaddress.IPv4Address(f"10.99.0.{n}"),
                ipv6=ipaddress.IPv6Address(f"fd99::{n}"))


FLEET = Fleet(
    sites={"eqiad": Site(name="eqiad", tier=Tier.CORE), "codfw": Site(name="codfw", tier=Tier.CORE)},
    clusters={"cache_text": Cluster(name="cache_text")},
    hosts={A: host(A, 1, "eqiad"), B: host(B, 2, "codfw")},
    rules=(PairingRule(name="core-core", a=Selector(sites=("eqiad",)), b=Selector(sites=("codfw",))),),
    ipsec=IpsecSettings(), ssh=SshSettings(),
)
PAIRS = pairing.compute_pairs(FLEET)


def capture(name: str) -> str:
    return (DATA / name).read_text()


def _fake(a: str, b: str, **kwargs: object) -> FakeTransport:
    t = FakeTransport(**kwargs)  # type: ignore[arg-type]
    t.on(r"^sh -s$", result(stdout=capture(a)), host=A)
    t.on(r"^sh -s$", result(stdout=capture(b)), host=B)
    return t


def check(name: str, fqdn: str = A, enabled: set[str] | None = None) -> monitor.CheckResult:
    obs = health.parse_collect(capture(name), host=fqdn)
    return monitor.check_host(obs, monitor.expected_connections(FLEET, PAIRS, fqdn), enabled)


def assert_plugin_line(res: monitor.CheckResult) -> None:
    assert "|" not in res.text and "\n" not in res.line
    assert res.line.count("|") == 1
    assert not KEYS.search(res.line)


# ------------------------------------------------------------------------------------------- check

def test_check_ok() -> None:
    res = check("swanctl-ok.txt")
    assert res.state == NagiosState.OK
    assert res.text == "IPSEC OK - ok: 2"
    assert res.perfdata.startswith("ok=2;;;0 failed=0;;1;0 waiting=0;;;0 expected=2;;;0 states=4;;;0 "
                                   "policies=4")
    assert "XfrmOutNoStates=0c" in res.perfdata
    assert_plugin_line(res)


@pytest.mark.parametrize(("name", "fqdn", "state", "text"), [
    ("swanctl-no-xfrm.txt", A, NagiosState.CRITICAL, "IPSEC CRITICAL - ok: 1 no-xfrm: cp2001_v4"),
    ("swanctl-connecting.txt", A, NagiosState.CRITICAL, f"{CRIT} connecting: {BOTH}"),
    ("swanctl-no-child-sa.txt", A, NagiosState.CRITICAL, f"{CRIT} no-child-sa: {BOTH}"),
    ("swanctl-wrong-mode-tunnel.txt", A, NagiosState.CRITICAL,
     "IPSEC CRITICAL - ok: 0 wrong-mode: cp2001_v4,cp2001_v6"),
    ("swanctl-charon-down.txt", B, NagiosState.CRITICAL,
     "IPSEC CRITICAL - charon not running - ok: 0 not-conn: cp1001_v4,cp1001_v6"),
    ("swanctl-duplicate.txt", A, NagiosState.WARNING, "IPSEC WARNING - ok: 1 duplicate: cp2001_v4"),
    ("swanctl-rekey-overlap.txt", A, NagiosState.OK, "IPSEC OK - ok: 2"),
    ("stroke-ok.txt", A, NagiosState.OK, "IPSEC OK - ok: 2"),
    ("stroke-connecting.txt", A, NagiosState.CRITICAL, f"{CRIT} connecting: {BOTH}"),
])
def test_check_states(name: str, fqdn: str, state: NagiosState, text: str) -> None:
    res = check(name, fqdn)
    assert (res.state, res.text) == (state, text)
    assert_plugin_line(res)


def test_latched_is_a_warning_with_who_and_why() -> None:
    res = check("swanctl-latched.txt", B)
    assert res.state == NagiosState.WARNING
    assert res.text == ("IPSEC WARNING - latched by ipsec-kill (alice@bastion1, 2026-12-03T17:45:00Z, "
                        "T1234 emergency) - ok: 0 latched: cp1001_v4,cp1001_v6")
    assert_plugin_line(res)


def test_pipes_and_newlines_never_reach_the_text() -> None:
    text = capture("swanctl-latched.txt").replace("T1234 emergency", "a|b")
    obs = health.parse_collect(text, host=B)
    res = monitor.check_host(obs, monitor.expected_connections(FLEET, PAIRS, B))
    assert "a/b" in res.text
    assert_plugin_line(res)


def test_waiting_for_peer_is_ok() -> None:
    res = check("swanctl-not-conn.txt", A, enabled={A})
    assert res.state == NagiosState.OK
    assert res.text == "IPSEC OK - ok: 0 waiting-for-peer: cp2001_v4,cp2001_v6"


def test_unreachable_is_unknown() -> None:
    obs = monitor.collect(FakeTransport(unreachable={A}), FLEET.host(A))
    res = monitor.check_host(obs, monitor.expected_connections(FLEET, PAIRS, A))
    assert res.state == NagiosState.UNKNOWN
    assert res.text.startswith("IPSEC UNKNOWN - unreachable: connection refused")
    assert_plugin_line(res)


def test_collect_sends_the_script_on_stdin() -> None:
    t = _fake("swanctl-ok.txt", "swanctl-ok-peer.txt")
    obs = monitor.collect(t, FLEET.host(A), timeout=5)
    assert obs.reachable and obs.host == A
    (call,) = t.calls
    assert call.command == "sh -s" and call.timeout == 5
    assert call.stdin is not None and "ip xfrm state list nokeys" in call.stdin


def test_collect_without_sections_is_unreachable_with_reason() -> None:
    t = FakeTransport([(r"", result(stderr="sh: 1: cannot open\n", exit_code=2))])
    obs = monitor.collect(t, FLEET.host(A))
    assert not obs.reachable and obs.error == "collect failed: sh: 1: cannot open"


def test_long_groups_are_capped() -> None:
    names = tuple(f"cp{i}_v4" for i in range(20))
    assert monitor._names(names).endswith("(+8 more)")


# ------------------------------------------------------------------------------------------ status

def collector(t: FakeTransport) -> monitor.Collector:
    return lambda hosts: monitor.collect_many(t, hosts, workers=4)


def test_fleet_status_all_ok() -> None:
    st = monitor.fleet_status(FLEET, PAIRS, collector(_fake("swanctl-ok.txt", "swanctl-ok-peer.txt")))
    assert st.state == NagiosState.OK and not st.failing_pairs and all(p.ok for p in st.pairs)
    cells = [(c.site, c.expected, c.healthy, c.failed) for c in st.cells]
    assert cells == [("codfw", 2, 2, 0), ("eqiad", 2, 2, 0)]


def test_fleet_status_names_failing_pair_and_unreachable() -> None:
    t = _fake("swanctl-no-xfrm.txt", "swanctl-ok-peer.txt", unreachable={B})
    st = monitor.fleet_status(FLEET, PAIRS, collector(t))
    assert st.unreachable == (B,) and st.state == NagiosState.UNKNOWN
    (bad,) = st.failing_pairs
    assert "cp1001:cp2001_v4(no-xfrm)" in bad.failing_names()
    doc = monitor.status_json(st)
    assert json.loads(json.dumps(doc))["unreachable"] == [B]


def test_fleet_status_latched_host_makes_its_peers_wait() -> None:
    st = monitor.fleet_status(FLEET, PAIRS, collector(_fake("swanctl-not-conn.txt", "swanctl-latched.txt")))
    assert st.latched == (B,)
    by_host = {h.host: h for h in st.hosts}
    assert {c.verdict for c in by_host[A].conns} == {health.Verdict.WAITING_FOR_PEER}
    assert st.state == NagiosState.WARNING and not st.failing_pairs


def test_not_deployed_peer_counts_as_waiting() -> None:
    text = capture("swanctl-ok-peer.txt")
    not_deployed = text.replace("list-conn event {\n  cp1001", "list-conn event {\n  zz")
    t = _fake("swanctl-not-conn.txt", "swanctl-ok-peer.txt")
    t.on(r"^sh -s$", result(stdout=not_deployed), host=B)
    obs = monitor.collect_many(t, FLEET.hosts.values())
    obs[B] = health.parse_collect(_strip_sas(not_deployed), host=B)
    assert monitor.enabled_hosts(obs, pairing.connections_by_host(PAIRS)) == {A}


def _strip_sas(text: str) -> str:
    sections = re.split(r"(?m)^(?=@@)", text)
    return "".join("@@swanctl\n" if s.startswith("@@swanctl\n") else s for s in sections)


def test_selection_errors_before_collecting() -> None:
    with pytest.raises(Exception, match="unknown site 'nowhere'"):
        monitor.select_hosts(FLEET, site="nowhere")


def test_prometheus_textfile(tmp_path: Path) -> None:
    st = monitor.fleet_status(FLEET, PAIRS, collector(_fake("swanctl-no-xfrm.txt", "swanctl-ok-peer.txt")))
    text = monitor.prometheus_text(st)
    latched = monitor.fleet_status(FLEET, PAIRS, collector(_fake("swanctl-ok.txt", "swanctl-latched.txt")))
    text_latched = monitor.prometheus_text(latched)
    assert ('ipsec_rollout_connection_status{host="cp1001.eqiad.example.net",site="eqiad",'
            'cluster="cache_text",conn="cp2001_v4",peer="cp2001.codfw.example.net",family="v4",'
            'verdict="no-xfrm"} 2') in text
    assert 'verdict="latched"} 4' in text_latched
    assert ('ipsec_rollout_host_latched{host="cp2001.codfw.example.net",site="codfw",cluster="cache_text"} 1'
            in text_latched)
    assert 'counter="XfrmOutNoStates"} 0' in text
    assert 'conn="cp2001_v6",direction="in"} 728' in text
    out = tmp_path / "ipsec.prom"
    monitor.write_textfile(out, text)
    monitor.write_textfile(out, text)
    assert out.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["ipsec.prom"]
    assert out.stat().st_mode & 0o777 == 0o644
    assert not KEYS.search(text)


# --------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def inventory_dir(tmp_path: Path) -> Path:
    (tmp_path / "fleet.yaml").write_text(INVENTORY)
    return tmp_path


def run_cli(*args: str, stdin: str | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args), input=stdin)
    if isinstance(res.exception, RolloutError):  # what run_guarded turns into the exit code
        return int(res.exception.exit_code), str(res.exception)
    return res.exit_code, res.output


def test_cli_check_from_file(inventory_dir: Path) -> None:
    saved = str(DATA / "swanctl-no-xfrm.txt")
    code, out = run_cli("check", A, "-i", str(inventory_dir), "--from-file", saved)
    assert code == 2
    assert out.startswith("IPSEC CRITICAL - ok: 1 no-xfrm: cp2001_v4 | ok=1;")
    assert out.count("\n") == 1


def test_cli_check_from_stdin(inventory_dir: Path) -> None:
    code, out = run_cli("check", B, "-i", str(inventory_dir), "--from-file", "-",
                        stdin=capture("swanctl-latched.txt"))
    assert code == 1 and "latched by ipsec-kill" in out


def test_cli_check_problems_are_unknown(inventory_dir: Path, tmp_path: Path) -> None:
    code, out = run_cli("check", "nosuch.example.net", "-i", str(inventory_dir), "--from-file", "-", stdin="")
    assert (code, out) == (3, "IPSEC UNKNOWN - hosts: unknown host 'nosuch.example.net'\n")
    code, out = run_cli("check", A, "-i", str(tmp_path / "missing"), "--from-file", "-", stdin="")
    assert code == 3 and out.startswith("IPSEC UNKNOWN - ") and "Traceback" not in out


def test_cli_status_rejects_unknown_site(inventory_dir: Path) -> None:
    code, out = run_cli("status", "-i", str(inventory_dir), "--site", "nowhere")
    assert code == 2 and "Traceback" not in out


# --------------------------------------------------------------------------- collect.sh on this machine

def test_collect_script_runs_here_read_only_and_without_keys() -> None:
    script = Path(monitor.__file__).parent / "remote" / "collect.sh"
    subprocess.run(["sh", "-n", str(script)], check=True)
    obs = monitor.collect_local("here.example.net", timeout=60)
    assert obs.reachable and obs.host == "here.example.net" and obs.stack in ("swanctl", "stroke", "none")
    assert dict(obs.exit_codes).get("xfrm-stat", 0) == 0
    text = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert "@@exit" in text.stdout and not KEYS.search(text.stdout + text.stderr)
    assert "failed to load" not in text.stderr


def test_collect_script_never_lists_xfrm_state_with_keys() -> None:
    script = (Path(monitor.__file__).parent / "remote" / "collect.sh").read_text()
    lines = [line.strip() for line in script.splitlines()]
    calls = [line for line in lines if "xfrm state" in line and not line.startswith("#")]
    assert calls and all("nokeys" in c or "Keys hidden" in c or c.startswith("echo") for c in calls)
    scrub = re.search(r"sed (-e '[^']*' ?)+", script)
    assert scrub is not None
    leaky = ("\tenc cbc(aes) 0x" + "0123456789abcdef" * 2 +
             "\n\tproto esp spi 0x00c0ffee reqid 1 mode transport\n")
    done = subprocess.run(["sh", "-c", scrub.group(0)], input=leaky, capture_output=True, text=True,
                          check=True)
    assert not KEYS.search(done.stdout) and "spi 0x00c0ffee" in done.stdout
