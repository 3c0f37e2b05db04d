"""rollout.health: captured collect.sh output in -> expected verdicts out, one scenario per file.

Each file in tests/data/health/ starts with `# host:`, `# peer:`, `# expect: conn=verdict ...` and an
optional `# expect-problem:` line; the rest is what rollout/remote/collect.sh printed (REAL captures,
or HAND-EDITED copies of real ones where the file says so).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from rollout import health
from rollout.health import Verdict
from rollout.model import Connection, Pair

DATA = Path(__file__).parent / "data" / "health"
SCENARIOS = sorted(p.name for p in DATA.glob("*.txt"))
KEYS = re.compile(r"0x[0-9a-f]{32,}|PRIVATE KEY", re.I)
A, B = "cp1001.example.net", "cp2001.example.net"
PAIR = Pair(a=A, b=B, families=("v4", "v6"), rule="test")


def header(name: str) -> dict[str, str]:
    text = (DATA / name).read_text()
    return dict(re.findall(r"^# ([a-z-]+): (.*)$", text, re.M))


def observe(name: str, host: str | None = None) -> health.HostObservation:
    return health.parse_collect((DATA / name).read_text(), host=host or header(name)["host"])


def conns(host: str, peer: str) -> list[Connection]:
    return [Connection(local=host, peer=peer, family=f, initiator=host < peer) for f in ("v4", "v6")]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_verdicts(name: str) -> None:
    head = header(name)
    result = health.judge_host(observe(name), conns(head["host"], head["peer"]))
    got = {c.name: c.verdict.value for c in result.conns}
    want = dict(pair.split("=") for pair in head["expect"].split())
    assert got == want
    if "expect-problem" in head:
        assert head["expect-problem"] in result.problems
    assert result.ok == all(v in ("ok", "waiting-for-peer", "latched") for v in want.values())


@pytest.mark.parametrize("name", SCENARIOS)
def test_fixtures_and_parsed_values_hold_no_key_material(name: str) -> None:
    text = (DATA / name).read_text()
    assert not KEYS.search(text)
    assert not KEYS.search(repr(health.parse_collect(text)))


def test_swanctl_child_fields() -> None:
    obs = observe("traffic-after-cp1001.txt")
    (child,) = obs.children("cp2001_v4")
    assert (child.state, child.mode) == ("INSTALLED", "TUNNEL")
    assert (child.spi_in, child.spi_out) == ("5669c82c", "5aa94fbd")
    assert (child.bytes_in, child.bytes_out, child.packets_in, child.packets_out) == (588, 588, 7, 7)
    assert obs.configured == ("cp2001_v4", "cp2001_v6")
    assert obs.charon_up and obs.stack == "swanctl" and not obs.latched


def test_stroke_statusall_fields() -> None:
    obs = observe("stroke-wrong-mode-tunnel.txt")
    (child,) = obs.children("cp2001_v6")
    assert (child.state, child.mode) == ("INSTALLED", "TUNNEL")
    assert (child.spi_in, child.spi_out) == ("38fe7d5f", "3a830bc2")
    assert (child.bytes_in, child.packets_in, child.bytes_out, child.packets_out) == (312, 3, 312, 3)
    assert obs.ikes("cp2001_v6")[0].local_host == "fd99::1"
    assert obs.configured == ("cp2001_v4", "cp2001_v6")


def test_statusall_zero_counters_without_packet_details() -> None:
    text = ("Security Associations (1 up, 0 connecting):\n"
            "   cp3_v4[1]: ESTABLISHED 5 minutes ago, 192.0.2.1[CN=a]...192.0.2.3[CN=c]\n"
            "   cp3_v4{4}:  INSTALLED, TRANSPORT, reqid 1, ESP SPIs: c471b24b_i c65454f9_o\n"
            "   cp3_v4{4}:  AES_GCM_16_128, 0 bytes_i, 0 bytes_o, rekeying in 40 minutes\n")
    ikes, _ = health.parse_statusall(text)
    (child,) = ikes[0].children
    assert (child.spi_in, child.spi_out, child.bytes_in, child.bytes_out) == ("c471b24b", "c65454f9", 0, 0)
    assert (ikes[0].local_host, ikes[0].remote_host) == ("192.0.2.1", "192.0.2.3")


def test_pretty_values_with_spaces_and_equals() -> None:
    text = "list-sa event {\n  cp9_v4 {\n    local-id = C=CH, O=strong Swan, CN=moon = x\n" \
           "    state = ESTABLISHED\n    child-sas {\n    }\n  }\n}\n"
    ((event, body),) = health.parse_pretty(text)
    assert event == "list-sa event"
    assert body["cp9_v4"]["local-id"] == "C=CH, O=strong Swan, CN=moon = x"


def test_xfrm_policies_skip_socket_policies() -> None:
    obs = observe("swanctl-ok.txt")
    assert obs.policy_count() == 4 and obs.policy_count("out") == 2 and obs.policy_count("in") == 2
    socket_only = "src 0.0.0.0/0 dst 0.0.0.0/0 \n\tsocket in priority 0 ptype main \n"
    assert health.parse_xfrm_policy(socket_only) == ()


def test_xfrm_state_with_keys_keeps_only_identity() -> None:
    text = ("src 198.18.0.1 dst 198.18.0.2\n\tproto esp spi 0x00c0ffee reqid 1 mode transport\n"
            "\taead rfc4106(gcm(aes)) 0x" + "ab" * 36 + " 128\n")
    (state,) = health.parse_xfrm_state(text)
    assert state == health.XfrmState(src="198.18.0.1", dst="198.18.0.2", proto="esp", spi="00c0ffee",
                                     mode="transport")
    assert not KEYS.search(repr(state))


def test_no_xfrm_when_policies_missing() -> None:
    obs = observe("swanctl-ok.txt")
    obs = replace(obs, policies=tuple(p for p in obs.policies if not p.src.startswith("10.")))
    v4 = health.judge_conn(obs, conns(A, B)[0])
    assert v4.verdict == Verdict.NO_XFRM and "policy" in v4.detail


def test_waiting_for_peer_only_when_failing_and_peer_not_enabled() -> None:
    down = observe("swanctl-not-conn.txt")
    assert {c.verdict for c in health.judge_host(down, conns(A, B), {A}).conns} == {Verdict.WAITING_FOR_PEER}
    assert {c.verdict for c in health.judge_host(down, conns(A, B), {A, B}).conns} == {Verdict.NOT_CONN}
    up = observe("swanctl-ok.txt")
    assert {c.verdict for c in health.judge_host(up, conns(A, B), {A}).conns} == {Verdict.OK}
    assert health.judge_host(down, conns(A, B), {A}).ok


def test_unreachable() -> None:
    obs = health.unreachable_observation(A, "connect timed out")
    result = health.judge_host(obs, conns(A, B))
    assert {c.verdict for c in result.conns} == {Verdict.UNREACHABLE}
    assert not result.ok and result.problems == ("unreachable: connect timed out",)


def test_latched_carries_marker() -> None:
    result = health.judge_host(observe("swanctl-latched.txt"), conns(B, A))
    assert result.latched and "T1234" in result.latch_marker and result.ok


def test_unexpected_configured_connections_are_listed() -> None:
    result = health.judge_host(observe("swanctl-ok.txt"), conns(A, B)[:1])
    assert result.unexpected == ("cp2001_v6",)


def test_pair_ok_and_spis_cross_match() -> None:
    ph = health.judge_pair(observe("swanctl-ok.txt"), observe("swanctl-ok-peer.txt"), PAIR)
    assert ph.ok and not ph.failed and all(f.spis_match for f in ph.families)


def test_lab_pair_ok_and_spis_cross_match() -> None:
    lab = Pair(a="cp1001.core1.lab.example", b="cp2001.core2.lab.example", families=("v4", "v6"), rule="lab")
    ph = health.judge_pair(observe("lab-ok-cp1001.txt"), observe("lab-ok-cp2001.txt"), lab)
    assert ph.ok and all(f.spis_match for f in ph.families)
    assert not health.judge_pair(observe("lab-no-xfrm-cp1001.txt"), observe("lab-ok-cp2001.txt"), lab).ok


def test_pair_spi_mismatch_fails() -> None:
    peer = observe("swanctl-ok-peer.txt")
    text = (DATA / "swanctl-ok-peer.txt").read_text()
    stale = health.parse_collect(text.replace("5669c82c", "0badf00d"), host=B)
    ph = health.judge_pair(observe("swanctl-ok.txt"), stale, PAIR)
    assert not ph.ok and ph.failed
    assert [f.family for f in ph.families if not f.spis_match] == ["v4"]
    assert health.judge_pair(observe("swanctl-ok.txt"), peer, PAIR).ok


def test_pair_one_end_down() -> None:
    ph = health.judge_pair(observe("swanctl-connecting.txt"), observe("swanctl-charon-down.txt"), PAIR)
    assert ph.failed and not ph.ok
    assert ph.failing_names()[0] == "cp1001:cp2001_v4(connecting)"


def test_pair_waiting_for_peer_is_not_failed() -> None:
    ph = health.judge_pair(observe("swanctl-not-conn.txt"), observe("swanctl-charon-down.txt"), PAIR,
                           enabled_hosts={A})
    assert not ph.failed and not ph.ok and all(f.waiting for f in ph.families)


@pytest.mark.parametrize("conn", ["cp2001_v4", "cp2001_v6"])
def test_traffic_rose_on_both_ends(conn: str) -> None:
    before, after = observe("traffic-before-cp1001.txt"), observe("traffic-after-cp1001.txt")
    assert health.traffic_rose(before, after, conn)
    assert not health.traffic_rose(after, after, conn)
    assert not health.traffic_rose(after, before, conn)


def test_pair_traffic_rose() -> None:
    a = (observe("traffic-before-cp1001.txt"), observe("traffic-after-cp1001.txt"))
    b = (observe("traffic-before-cp2001.txt"), observe("traffic-after-cp2001.txt"))
    assert health.pair_traffic_rose(a, b, PAIR, "v4") and health.pair_traffic_rose(a, b, PAIR, "v6")
    assert not health.pair_traffic_rose(a, (b[1], b[1]), PAIR, "v4")


def test_traffic_after_rekey_needs_both_counters_of_the_new_sa() -> None:
    # right after the rekey the new CHILD_SA has counted nothing yet
    assert not health.traffic_rose(observe("traffic-after-cp1001.txt"), observe("rekey-overlap-cp1001.txt"),
                                   "cp2001_v4")
    down = observe("swanctl-not-conn.txt")
    assert not health.traffic_rose(down, down, "cp2001_v4")


def test_xfrm_out_nostates_delta() -> None:
    before = observe("swanctl-ok.txt")
    after = replace(before, xfrm_stat=tuple((k, v + 5 if k == "XfrmOutNoStates" else v)
                                            for k, v in before.xfrm_stat))
    assert health.xfrm_out_nostates_delta(before, after) == 5
    assert health.xfrm_out_nostates_delta(before, before) == 0
    assert health.xfrm_out_nostates_delta(health.HostObservation(host=A), after) == 0


def test_probe_command() -> None:
    cmd = health.probe_command("198.18.99.1", "198.18.99.2", "v4")
    assert cmd.startswith("ping -4 -q -n -c 3 ") and "-I 198.18.99.1 198.18.99.2" in cmd
    assert "-6" in health.probe_command("fd99::1", "fd99::2", "v6", count=5)
    with pytest.raises(ValueError):
        health.probe_command("198.18.99.1", "fd99::2", "v4")
    with pytest.raises(ValueError):
        health.probe_command("198.18.99.1; rm -rf /", "198.18.99.2", "v4")


def test_sections_and_exit_codes() -> None:
    obs = observe("swanctl-charon-down.txt")
    assert dict(obs.exit_codes)["swanctl"] != 0
    assert not obs.charon_up and obs.configured is None
    assert health.split_sections("junk\n@@a\nx\n@@b\n") == {"a": "x", "b": ""}
