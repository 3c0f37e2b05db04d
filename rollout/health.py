"""Parse collect.sh output into observations and judge them. PURE: data in, data out, no I/O.

One module for both the rollout's health gates and monitoring (`check`, `status`):

    obs = parse_collect(text, host=fqdn)                 # one host's rollout/remote/collect.sh output
    hh = judge_host(obs, expected_conns, enabled_hosts)  # per-connection Verdicts
    ph = judge_pair(obs_a, obs_b, pair)                  # both ends ok + SPIs cross-match
    traffic_rose(before, after, conn_name)               # CHILD SA bytes rose in both directions

The checks follow Wikimedia's check_strongswan (IKE SPIs correlated with kernel SPIs), extended with
the transport-mode assertion, kernel policies, the kill-switch latch and transient rekey duplicates.
Key material is never parsed or stored: the collector asks for `ip xfrm state list nokeys`, and the
xfrm parser below keeps only addresses, protocol, SPI and mode.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from rollout.model import Connection, Family, Pair

# --------------------------------------------------------------------------------------------- values


class Verdict(str, Enum):
    """What one expected connection looks like on one host."""

    OK = "ok"
    NO_CHILD_SA = "no-child-sa"  # IKE_SA established, no CHILD_SA
    CONNECTING = "connecting"  # IKE_SA not established yet (or stuck: auth / proposal mismatch)
    NOT_CONN = "not-conn"  # no IKE_SA at all (not loaded, not initiated, charon down)
    NO_XFRM = "no-xfrm"  # charon says INSTALLED, the kernel lacks an SPI or the policies
    WRONG_MODE = "wrong-mode"  # TUNNEL negotiated instead of TRANSPORT
    DUPLICATE = "duplicate"  # >1 established IKE_SA or >1 INSTALLED CHILD_SA (rekey overlaps excluded)
    WAITING_FOR_PEER = "waiting-for-peer"  # the peer is not enabled yet: not a failure
    LATCHED = "latched"  # the host was switched off on purpose by ipsec-kill
    UNREACHABLE = "unreachable"  # could not collect from the host

    @property
    def failed(self) -> bool:
        return self not in _NOT_FAILED


_NOT_FAILED = frozenset({Verdict.OK, Verdict.WAITING_FOR_PEER, Verdict.LATCHED})

# CHILD_SA states in which the SA is (still) carrying traffic; REKEYED/DELETING/DELETED ones are the
# old half of a rekey overlap and are ignored (Linuxfabrik's "rekeying-duplicate-sa" lesson).
ACTIVE_CHILD_STATES = frozenset({"INSTALLED", "REKEYING", "UPDATING"})
TRANSIENT_CHILD_STATES = frozenset({"REKEYED", "DELETING", "DELETED", "CREATED", "INSTALLING", "RETRYING"})


@dataclass(frozen=True, kw_only=True)
class ChildSa:
    name: str
    uniqueid: int
    state: str  # INSTALLED, REKEYING, REKEYED, DELETED, ...
    mode: str  # TRANSPORT | TUNNEL | ...
    protocol: str = "ESP"
    spi_in: str = ""  # 8 lowercase hex digits, "" when unknown
    spi_out: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    rekey_time: int | None = None  # seconds until rekey
    install_time: int | None = None  # seconds since installed

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_CHILD_STATES


@dataclass(frozen=True, kw_only=True)
class IkeSa:
    name: str
    uniqueid: int
    state: str  # ESTABLISHED, CONNECTING, REKEYING, REKEYED, DELETING, ...
    local_host: str = ""
    remote_host: str = ""
    children: tuple[ChildSa, ...] = ()


@dataclass(frozen=True, kw_only=True)
class XfrmState:
    src: str
    dst: str
    proto: str  # esp, ah, comp
    spi: str  # 8 lowercase hex digits
    mode: str  # transport, tunnel


@dataclass(frozen=True, kw_only=True)
class XfrmPolicy:
    src: str  # selector, e.g. 192.0.2.1/32
    dst: str
    dir: str  # in | out | fwd (charon's per-socket `socket` policies are not kept)


@dataclass(frozen=True, kw_only=True)
class HostObservation:
    """Everything collect.sh reported about one host, parsed. `reachable=False`: nothing collected."""

    host: str
    reachable: bool = True
    error: str = ""  # why it is unreachable / what failed
    time: int | None = None  # the host's clock (epoch seconds) at collection
    stack: str = "swanctl"  # swanctl | stroke | none
    charon_running: bool = False
    vici_answering: bool = False
    latched: bool = False
    latch_marker: str = ""  # the marker's content (JSON: who/when/reason), one line
    ike_sas: tuple[IkeSa, ...] = ()
    configured: tuple[str, ...] | None = None  # loaded connection names; None = not listed
    kernel_states: tuple[XfrmState, ...] = ()
    policies: tuple[XfrmPolicy, ...] = ()
    xfrm_stat: tuple[tuple[str, int], ...] = ()
    exit_codes: tuple[tuple[str, int], ...] = ()

    @property
    def charon_up(self) -> bool:
        return self.charon_running and (self.vici_answering or self.stack == "stroke")

    @property
    def kernel_spis(self) -> frozenset[str]:
        return frozenset(s.spi for s in self.kernel_states if s.proto == "esp")

    def counter(self, name: str) -> int | None:
        return dict(self.xfrm_stat).get(name)

    def policy_count(self, direction: str | None = None) -> int:
        return sum(1 for p in self.policies if direction in (None, p.dir))

    def children(self, name: str) -> tuple[ChildSa, ...]:
        return tuple(c for ike in self.ike_sas for c in ike.children if c.name == name)

    def ikes(self, name: str) -> tuple[IkeSa, ...]:
        return tuple(ike for ike in self.ike_sas if ike.name == name)

    def failed_sections(self) -> tuple[str, ...]:
        return tuple(name for name, rc in self.exit_codes if rc != 0)


def unreachable_observation(host: str, reason: str) -> HostObservation:
    """The observation of a host that could not be collected from (the caller's transport failed)."""
    return HostObservation(host=host, reachable=False, error=reason)


# ----------------------------------------------------------------------------------------- sections

_SECTION = re.compile(r"^@@([A-Za-z0-9_.-]+)\s*$")


def split_sections(text: str) -> dict[str, str]:
    """`@@name` lines start sections; lines before the first one (comments in fixtures) are ignored."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _SECTION.match(line)
        if match:
            current = sections.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def _key_values(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _yes(value: str | None) -> bool:
    return value == "yes"


def parse_collect(text: str, host: str = "") -> HostObservation:
    """Parse the whole output of rollout/remote/collect.sh. `host` overrides the reported name."""
    sec = split_sections(text)
    meta, charon, latch = (_key_values(sec.get(n, "")) for n in ("meta", "charon", "latch"))
    stack = sec.get("stack", "").strip() or "none"
    ike_sas, configured = _parse_stack(stack, sec)
    return HostObservation(
        host=host or meta.get("host", ""),
        time=_int(meta.get("time")),
        stack=stack,
        charon_running=_yes(charon.get("running")),
        vici_answering=_yes(charon.get("vici")),
        latched=_yes(latch.get("latched")),
        latch_marker=latch.get("marker", ""),
        ike_sas=ike_sas,
        configured=configured,
        kernel_states=parse_xfrm_state(sec.get("xfrm-state", "")),
        policies=parse_xfrm_policy(sec.get("xfrm-policy", "")),
        xfrm_stat=parse_xfrm_stat(sec.get("xfrm-stat", "")),
        exit_codes=_parse_exit_codes(sec.get("exit", "")),
    )


def _parse_stack(stack: str, sec: dict[str, str]) -> tuple[tuple[IkeSa, ...], tuple[str, ...] | None]:
    if stack == "stroke" and "statusall" in sec:
        return parse_statusall(sec["statusall"])
    conns = sec.get("swanctl-conns")
    configured = parse_list_conns(conns) if conns is not None and conns.strip() else None
    return parse_list_sas(sec.get("swanctl", "")), configured


def _parse_exit_codes(text: str) -> tuple[tuple[str, int], ...]:
    rows = (line.split() for line in text.splitlines())
    return tuple((r[0], int(r[1])) for r in rows if len(r) == 2 and r[1].lstrip("-").isdigit())


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------- swanctl --pretty (vici message tree)

Tree = dict[str, Any]  # values: str, list[str], or Tree


def parse_pretty(text: str) -> list[tuple[str, Tree]]:
    """Parse `swanctl --pretty` output: a sequence of `<event> {` blocks, one `key = value` per line,
    `key = [` ... `]` lists and `name {` ... `}` sections. Values may contain spaces and `=`."""
    blocks: list[tuple[str, Tree]] = []
    stack: list[Tree] = []
    in_list: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if in_list is not None:
            if line == "]":
                in_list = None
            else:
                in_list.append(line)
        elif line.endswith(" = [") and stack:
            in_list = stack[-1].setdefault(line[: -len(" = [")], [])
        elif " = " in line and stack:
            key, value = line.split(" = ", 1)
            stack[-1][key] = value
        elif line.endswith(" {"):
            node: Tree = {}
            if stack:
                stack[-1][line[:-2]] = node
            else:
                blocks.append((line[:-2], node))
            stack.append(node)
        elif line == "}" and stack:
            stack.pop()
    return blocks


def parse_list_sas(text: str) -> tuple[IkeSa, ...]:
    """`swanctl --list-sas --pretty`: one `list-sa event` block per IKE_SA, keyed by connection name."""
    return tuple(
        _ike_from_tree(name, node)
        for event, body in parse_pretty(text)
        if event == "list-sa event"
        for name, node in body.items()
        if isinstance(node, dict)
    )


def _ike_from_tree(name: str, node: Tree) -> IkeSa:
    kids = node.get("child-sas", {})
    return IkeSa(
        name=name,
        uniqueid=_int(node.get("uniqueid")) or 0,
        state=str(node.get("state", "")),
        local_host=str(node.get("local-host", "")),
        remote_host=str(node.get("remote-host", "")),
        children=tuple(_child_from_tree(key, c) for key, c in kids.items() if isinstance(c, dict)),
    )


def _child_from_tree(key: str, node: Tree) -> ChildSa:
    # vici keys CHILD_SAs `<name>-<uniqueid>` and carries `name` inside (5.x); older: the key is the name.
    def num(k: str) -> int:
        return _int(node.get(k)) or 0

    return ChildSa(
        name=str(node.get("name") or key),
        uniqueid=num("uniqueid"),
        state=str(node.get("state", "")),
        mode=str(node.get("mode", "")),
        protocol=str(node.get("protocol", "ESP")),
        spi_in=str(node.get("spi-in", "")).lower(),
        spi_out=str(node.get("spi-out", "")).lower(),
        bytes_in=num("bytes-in"),
        bytes_out=num("bytes-out"),
        packets_in=num("packets-in"),
        packets_out=num("packets-out"),
        rekey_time=_int(node.get("rekey-time")),
        install_time=_int(node.get("install-time")),
    )


def parse_list_conns(text: str) -> tuple[str, ...]:
    """`swanctl --list-conns --pretty`: the names of the loaded connections."""
    names = (name for event, body in parse_pretty(text) if event == "list-conn event" for name in body)
    return tuple(sorted(set(names)))


# ------------------------------------------------------------------ stroke: ipsec statusall (legacy)

_CONN_LINE = re.compile(r"^\s*([^\s\[{:]+):\s+(\S+)\.\.\.(\S+)\s")
_IKE_LINE = re.compile(r"^\s*([^\s\[{]+)\[(\d+)\]:\s+([A-Z_]+)\b(.*)$")
_IKE_HOSTS = re.compile(r"([0-9A-Fa-f:.]+)\[[^\]]*\]\.\.\.([0-9A-Fa-f:.]+)\[")
_CHILD_LINE = re.compile(r"^\s*([^\s\[{]+)\{(\d+)\}:\s+(.*)$")
_CHILD_STATE = re.compile(r"^([A-Z_]+), ([A-Z_]+),.*?SPIs: ([0-9a-f]+)_i(?: ([0-9a-f]+)_o)?")
_CHILD_BYTES = re.compile(r"(\d+) bytes_i(?: \((\d+) pkts?[^)]*\))?, (\d+) bytes_o(?: \((\d+) pkts?[^)]*\))?")


@dataclass
class _StrokeIke:
    name: str
    uniqueid: int
    state: str
    local_host: str = ""
    remote_host: str = ""
    children: dict[int, dict[str, Any]] = field(default_factory=dict)


def parse_statusall(text: str) -> tuple[tuple[IkeSa, ...], tuple[str, ...]]:
    """`ipsec statusall` / `stroke statusall-nb` (Wikimedia's source): IKE_SAs and configured conns."""
    configured: set[str] = set()
    ikes: list[_StrokeIke] = []
    in_sas = False
    for line in text.splitlines():
        if line.startswith("Security Associations"):
            in_sas = True
        elif not in_sas:
            match = _CONN_LINE.match(line)
            if match:
                configured.add(match.group(1))
        else:
            _statusall_sa_line(line, ikes)
    return tuple(_stroke_ike(i) for i in ikes), tuple(sorted(configured))


def _statusall_sa_line(line: str, ikes: list[_StrokeIke]) -> None:
    ike = _IKE_LINE.match(line)
    if ike:
        name, uid, state, rest = ike.group(1), int(ike.group(2)), ike.group(3), ike.group(4)
        if not any(i.name == name and i.uniqueid == uid for i in ikes):
            hosts = _IKE_HOSTS.search(rest)
            local, remote = (hosts.group(1), hosts.group(2)) if hosts else ("", "")
            ikes.append(_StrokeIke(name, uid, state, local, remote))
        return
    child = _CHILD_LINE.match(line)
    owner = next((i for i in reversed(ikes) if child and i.name == child.group(1)), None)
    if child and owner is not None:
        _statusall_child_line(owner.children.setdefault(int(child.group(2)), {}), child.group(3))


def _statusall_child_line(child: dict[str, Any], rest: str) -> None:
    state = _CHILD_STATE.match(rest)
    if state:
        child.update(state=state.group(1), mode=state.group(2), spi_in=state.group(3),
                     spi_out=state.group(4) or "")
        child["protocol"] = "AH" if " AH " in rest.split("SPIs")[0] else "ESP"
    counters = _CHILD_BYTES.search(rest)
    if counters:
        b_in, p_in, b_out, p_out = (int(g or 0) for g in counters.groups())
        child.update(bytes_in=b_in, packets_in=p_in, bytes_out=b_out, packets_out=p_out)


def _stroke_ike(ike: _StrokeIke) -> IkeSa:
    children = tuple(
        ChildSa(name=ike.name, uniqueid=uid, state=c.get("state", ""), mode=c.get("mode", ""),
                **{k: v for k, v in c.items() if k not in ("state", "mode")})
        for uid, c in sorted(ike.children.items())
        if "state" in c
    )
    return IkeSa(name=ike.name, uniqueid=ike.uniqueid, state=ike.state, local_host=ike.local_host,
                 remote_host=ike.remote_host, children=children)


# ----------------------------------------------------------------------------------- kernel (xfrm)

_XFRM_HEAD = re.compile(r"^src (\S+) dst (\S+)")
_XFRM_ID = re.compile(r"^\s+proto (\S+) spi 0x([0-9a-fA-F]+)(?: reqid \d+)?(?: mode (\S+))?")
_POLICY_DIR = re.compile(r"^\s+dir (in|out|fwd)\b")


def parse_xfrm_state(text: str) -> tuple[XfrmState, ...]:
    """`ip xfrm state list nokeys`: keeps src, dst, proto, SPI and mode of each state, nothing else."""
    states: list[XfrmState] = []
    head: tuple[str, str] | None = None
    for line in text.splitlines():
        match = _XFRM_HEAD.match(line)
        if match:
            head = (match.group(1), match.group(2))
            continue
        ident = _XFRM_ID.match(line)
        if ident and head:
            proto, spi, mode = ident.groups()
            states.append(XfrmState(src=head[0], dst=head[1], proto=proto, spi=f"{int(spi, 16):08x}",
                                    mode=mode or ""))
            head = None
    return tuple(states)


def parse_xfrm_policy(text: str) -> tuple[XfrmPolicy, ...]:
    """`ip xfrm policy list`: `dir in|out|fwd` policies only (charon's `socket` bypasses are skipped)."""
    policies: list[XfrmPolicy] = []
    head: tuple[str, str] | None = None
    for line in text.splitlines():
        match = _XFRM_HEAD.match(line)
        if match:
            head = (match.group(1), match.group(2))
            continue
        direction = _POLICY_DIR.match(line)
        if direction and head:
            policies.append(XfrmPolicy(src=head[0], dst=head[1], dir=direction.group(1)))
            head = None
    return tuple(policies)


def parse_xfrm_stat(text: str) -> tuple[tuple[str, int], ...]:
    """`/proc/net/xfrm_stat`: `XfrmOutNoStates   3` lines."""
    rows = (line.split() for line in text.splitlines())
    return tuple((r[0], int(r[1])) for r in rows if len(r) == 2 and r[1].isdigit())


# ------------------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True, kw_only=True)
class ConnHealth:
    """One expected connection on one host."""

    name: str
    local: str
    peer: str
    family: Family
    verdict: Verdict
    detail: str = ""
    child: ChildSa | None = None  # the INSTALLED CHILD_SA judged, when there is one

    @property
    def failed(self) -> bool:
        return self.verdict.failed


@dataclass(frozen=True, kw_only=True)
class HostHealth:
    host: str
    conns: tuple[ConnHealth, ...]
    reachable: bool = True
    latched: bool = False
    latch_marker: str = ""
    charon_up: bool = True
    problems: tuple[str, ...] = ()  # host-level: charon not running, vici not answering, ...
    unexpected: tuple[str, ...] = ()  # loaded connections that nothing expects (stale config)

    @property
    def ok(self) -> bool:
        return self.reachable and not any(c.failed for c in self.conns)

    def by_verdict(self) -> dict[Verdict, tuple[str, ...]]:
        out: dict[Verdict, list[str]] = {}
        for conn in self.conns:
            out.setdefault(conn.verdict, []).append(conn.name)
        return {v: tuple(sorted(names)) for v, names in out.items()}

    def conn(self, name: str) -> ConnHealth | None:
        return next((c for c in self.conns if c.name == name), None)


def judge_host(obs: HostObservation, expected: Iterable[Connection],
               enabled_hosts: Collection[str] | None = None) -> HostHealth:
    """Judge every expected connection of `obs.host`. `enabled_hosts`: FQDNs that already run the
    rollout's config (None = all): a broken connection with an end not in it is `waiting-for-peer`."""
    conns = tuple(sorted(expected, key=lambda c: c.name))
    results = tuple(judge_conn(obs, c, enabled_hosts) for c in conns)
    names = {c.name for c in conns}
    return HostHealth(
        host=obs.host,
        conns=results,
        reachable=obs.reachable,
        latched=obs.latched,
        latch_marker=obs.latch_marker,
        charon_up=obs.charon_up,
        problems=host_problems(obs),
        unexpected=tuple(n for n in (obs.configured or ()) if n not in names),
    )


def host_problems(obs: HostObservation) -> tuple[str, ...]:
    """Host-level trouble worth a word in a summary line."""
    if not obs.reachable:
        return (f"unreachable: {obs.error}" if obs.error else "unreachable",)
    problems = []
    if not obs.charon_running:
        problems.append("charon not running")
    elif obs.stack == "swanctl" and not obs.vici_answering:
        problems.append("vici not answering")
    if obs.stack == "none":
        problems.append("no strongSwan control tool (swanctl/ipsec) found")
    failed = [s for s in obs.failed_sections() if s not in ("swanctl", "swanctl-conns", "statusall")
              or obs.charon_running]
    if failed:
        problems.append("failed: " + " ".join(failed))
    return tuple(problems)


def judge_conn(obs: HostObservation, conn: Connection,
               enabled_hosts: Collection[str] | None = None) -> ConnHealth:
    """One connection's verdict, in order of precedence: unreachable, latched, the IPsec state
    (not-conn, connecting, no-child-sa, wrong-mode, no-xfrm, duplicate, ok); a failure towards a peer
    that is not enabled yet becomes waiting-for-peer."""
    base = ConnHealth(name=conn.name, local=conn.local, peer=conn.peer, family=conn.family,
                      verdict=Verdict.OK)
    if not obs.reachable:
        return replace(base, verdict=Verdict.UNREACHABLE, detail=obs.error)
    if obs.latched:
        return replace(base, verdict=Verdict.LATCHED, detail="latched by ipsec-kill")
    verdict, detail, child = _ipsec_verdict(obs, conn.name)
    if verdict.failed and enabled_hosts is not None:
        idle = [h for h in (conn.peer, conn.local) if h not in enabled_hosts]
        if idle:
            who = "peer" if idle[0] == conn.peer else "host"
            detail = f"{verdict.value}; {who} not enabled"
            return replace(base, verdict=Verdict.WAITING_FOR_PEER, detail=detail)
    return replace(base, verdict=verdict, detail=detail, child=child)


def _ipsec_verdict(obs: HostObservation, name: str) -> tuple[Verdict, str, ChildSa | None]:
    if not obs.charon_up:
        return Verdict.NOT_CONN, host_problems(obs)[0] if host_problems(obs) else "charon down", None
    ikes = obs.ikes(name)
    established = [i for i in ikes if i.state == "ESTABLISHED"]
    if not established:
        return _not_established(obs, name, ikes)
    installed = [c for c in obs.children(name) if c.state == "INSTALLED"]
    active = [c for c in obs.children(name) if c.active]
    if not active:
        return Verdict.NO_CHILD_SA, "IKE_SA established, no CHILD_SA", None
    child = installed[-1] if installed else active[-1]
    wrong = [c.mode for c in active if c.mode.upper() != "TRANSPORT"]
    if wrong:
        return Verdict.WRONG_MODE, f"mode {wrong[0]} negotiated", child
    missing = _kernel_missing(obs, child)
    if missing:
        return Verdict.NO_XFRM, missing, child
    if len(established) > 1 or len(installed) > 1:
        return Verdict.DUPLICATE, f"{len(established)} IKE_SAs, {len(installed)} CHILD_SAs installed", child
    return Verdict.OK, "", child


def _not_established(obs: HostObservation, name: str,
                     ikes: tuple[IkeSa, ...]) -> tuple[Verdict, str, ChildSa | None]:
    if any(i.state == "CONNECTING" for i in ikes):
        return Verdict.CONNECTING, "IKE_SA connecting", None
    if ikes:
        return Verdict.NOT_CONN, "IKE_SA " + ",".join(sorted({i.state for i in ikes})), None
    if obs.configured is not None and name not in obs.configured:
        return Verdict.NOT_CONN, "connection not loaded", None
    return Verdict.NOT_CONN, "no IKE_SA", None


def _kernel_missing(obs: HostObservation, child: ChildSa) -> str:
    """Why the kernel does not carry `child` ("" = it does): both SPIs as ESP states (Wikimedia's
    check) and, for every active CHILD, an in and an out policy between the IKE addresses."""
    spis = obs.kernel_spis
    missing = [f"spi {d} {s}" for d, s in (("in", child.spi_in), ("out", child.spi_out)) if s not in spis]
    if missing:
        return "kernel lacks " + ", ".join(missing)
    ike = next((i for i in obs.ike_sas if child in i.children), None)
    if ike and ike.local_host and ike.remote_host:
        dirs = _policy_dirs(obs.policies, ike.local_host, ike.remote_host)
        if not {"in", "out"} <= dirs:
            return "kernel lacks policy " + " ".join(sorted({"in", "out"} - dirs))
    return ""


def _policy_dirs(policies: Iterable[XfrmPolicy], local: str, remote: str) -> set[str]:
    def covers(selector: str, addr: str) -> bool:
        try:
            return ipaddress.ip_address(addr) in ipaddress.ip_network(selector, strict=False)
        except ValueError:
            return False

    dirs = set()
    for p in policies:
        if p.dir == "out" and covers(p.src, local) and covers(p.dst, remote):
            dirs.add("out")
        elif p.dir == "in" and covers(p.src, remote) and covers(p.dst, local):
            dirs.add("in")
    return dirs


# --------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True, kw_only=True)
class PairFamilyHealth:
    family: Family
    a: ConnHealth  # the connection as seen from pair.a (named after b)
    b: ConnHealth
    spis_match: bool

    @property
    def ok(self) -> bool:
        return self.a.verdict == Verdict.OK and self.b.verdict == Verdict.OK and self.spis_match

    @property
    def waiting(self) -> bool:
        return Verdict.WAITING_FOR_PEER in (self.a.verdict, self.b.verdict) and not self.failed

    @property
    def failed(self) -> bool:
        return self.a.failed or self.b.failed or (not self.spis_match and not self._excused)

    @property
    def _excused(self) -> bool:
        excused = {Verdict.WAITING_FOR_PEER, Verdict.LATCHED}
        return self.a.verdict in excused or self.b.verdict in excused


@dataclass(frozen=True, kw_only=True)
class PairHealth:
    pair: Pair
    families: tuple[PairFamilyHealth, ...]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.families)

    @property
    def failed(self) -> bool:
        return any(f.failed for f in self.families)

    def failing_names(self) -> tuple[str, ...]:
        """`a:conn b:conn` strings of the failing ends, for messages."""
        return tuple(f"{end.local.split('.', 1)[0]}:{end.name}({end.verdict.value})"
                     for f in self.families for end in (f.a, f.b) if end.failed or not f.spis_match)


def pair_connections(pair: Pair, family: Family) -> tuple[Connection, Connection]:
    """The two ends of a pair for one family: (as seen from a, as seen from b)."""
    return (Connection(local=pair.a, peer=pair.b, family=family, initiator=True),
            Connection(local=pair.b, peer=pair.a, family=family, initiator=False))


def judge_pair(obs_a: HostObservation, obs_b: HostObservation, pair: Pair,
               enabled_hosts: Collection[str] | None = None) -> PairHealth:
    """Both ends of `pair`: healthy only if both are ok and the SPIs cross-match
    (a.spi_out == b.spi_in and a.spi_in == b.spi_out) for every family of the pair."""
    return PairHealth(pair=pair, families=tuple(
        _judge_pair_family(obs_a, obs_b, pair, fam, enabled_hosts) for fam in pair.families))


def _judge_pair_family(obs_a: HostObservation, obs_b: HostObservation, pair: Pair, family: Family,
                       enabled_hosts: Collection[str] | None) -> PairFamilyHealth:
    conn_a, conn_b = pair_connections(pair, family)
    a, b = judge_conn(obs_a, conn_a, enabled_hosts), judge_conn(obs_b, conn_b, enabled_hosts)
    return PairFamilyHealth(family=family, a=a, b=b, spis_match=spis_cross_match(a.child, b.child))


def spis_cross_match(a: ChildSa | None, b: ChildSa | None) -> bool:
    if a is None or b is None or not (a.spi_in and a.spi_out):
        return False
    return a.spi_out == b.spi_in and a.spi_in == b.spi_out


# ------------------------------------------------------------------------------------------- traffic


def traffic_rose(before: HostObservation, after: HostObservation, conn_name: str) -> bool:
    """Did the CHILD_SA of `conn_name` carry traffic in BOTH directions between the two samples?
    Compares the same SA (same inbound SPI); if it was rekeyed in between, the new SA's counters
    must both be non-zero. Call it for both ends of a pair (see pair_traffic_rose)."""
    now = _installed_child(after, conn_name)
    if now is None:
        return False
    then = next((c for c in before.children(conn_name) if c.spi_in == now.spi_in), None)
    base_in, base_out = (then.bytes_in, then.bytes_out) if then else (0, 0)
    return now.bytes_in > base_in and now.bytes_out > base_out


def pair_traffic_rose(a: tuple[HostObservation, HostObservation], b: tuple[HostObservation, HostObservation],
                      pair: Pair, family: Family) -> bool:
    """traffic_rose on both ends of a pair: `a`/`b` are (before, after) observations of pair.a/pair.b."""
    conn_a, conn_b = pair_connections(pair, family)
    return traffic_rose(*a, conn_a.name) and traffic_rose(*b, conn_b.name)


def _installed_child(obs: HostObservation, name: str) -> ChildSa | None:
    installed = [c for c in obs.children(name) if c.state == "INSTALLED"]
    return installed[-1] if installed else None


def counter_delta(before: HostObservation, after: HostObservation, name: str) -> int:
    """Rise of one /proc/net/xfrm_stat counter between two samples (0 when unknown)."""
    b, a = before.counter(name), after.counter(name)
    return a - b if a is not None and b is not None else 0


def xfrm_out_nostates_delta(before: HostObservation, after: HostObservation) -> int:
    """XfrmOutNoStates rising = a policy matched but no SA exists: traffic is being blackholed."""
    return counter_delta(before, after, "XfrmOutNoStates")


def probe_command(local_addr: str, peer_addr: str, family: Family, *, count: int = 3) -> str:
    """Shell command (every value quoted) that pings `peer_addr` from `local_addr` a few times, for
    the traffic probe. Addresses are validated; ping's exit code is ignored (the counters judge)."""
    local, peer = ipaddress.ip_address(local_addr), ipaddress.ip_address(peer_addr)
    version = 4 if family == "v4" else 6
    if local.version != version or peer.version != version:
        raise ValueError(f"{local_addr} / {peer_addr} are not both IP{family}")
    argv = ["ping", f"-{version}", "-q", "-n", "-c", str(int(count)), "-i", "0.2", "-W", "2",
            "-I", str(local), str(peer)]
    return " ".join(shlex.quote(a) for a in argv) + " >/dev/null 2>&1; true"


def iter_failing(health: HostHealth) -> Iterator[ConnHealth]:
    return (c for c in health.conns if c.failed)
