"""Monitoring: the per-host Nagios check and the fleet status view, on top of rollout.health.

Collection runs rollout/remote/collect.sh on the host (fed to `sh -s` over the transport, so the host
needs nothing of the tool) or locally; judging is rollout.health's. Everything here returns values:
printing is the CLI's job (rollout/cli/monitor.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any

from rollout import errors, health, pairing
from rollout.health import HostHealth, HostObservation, PairHealth, Verdict
from rollout.model import Connection, Fleet, Host, Pair
from rollout.transport import Transport

COLLECT_COMMAND = "sh -s"  # the script itself comes on stdin
DEFAULT_WORKERS = 16
MAX_NAMES = 12  # per summary group


class NagiosState(IntEnum):
    """Plugin exit codes (Nagios plugin API)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


# Summary order: the worst classes first; each group lists its sorted connection names.
CRITICAL_VERDICTS = (Verdict.NOT_CONN, Verdict.CONNECTING, Verdict.NO_CHILD_SA, Verdict.NO_XFRM,
                     Verdict.WRONG_MODE)
WARNING_VERDICTS = (Verdict.DUPLICATE,)
GROUP_ORDER = (*CRITICAL_VERDICTS, *WARNING_VERDICTS, Verdict.UNREACHABLE, Verdict.WAITING_FOR_PEER,
               Verdict.LATCHED)
PERF_COUNTERS = ("XfrmOutNoStates", "XfrmInNoStates", "XfrmInStateSeqError", "XfrmInStateProtoError",
                 "XfrmInTmplMismatch", "XfrmOutPolBlock")

# --------------------------------------------------------------------------------------- collection


def collect_script() -> str:
    """The text of rollout/remote/collect.sh (shipped as package data)."""
    return resources.files("rollout").joinpath("remote/collect.sh").read_text()


def collect(transport: Transport, host: Host, *, timeout: float | None = None) -> HostObservation:
    """Run collect.sh on `host`; a host that cannot be reached becomes an `unreachable` observation."""
    limit = timeout if timeout is not None else host.ssh.command_timeout
    try:
        res = transport.run(host, COLLECT_COMMAND, timeout=limit, stdin=collect_script())
    except errors.TransportError as exc:
        reason = _one_line(exc.message.removeprefix(f"{host.fqdn}: "))
        return health.unreachable_observation(host.fqdn, reason)
    return observation_from_output(host.fqdn, res.stdout, res.exit_code, res.stderr)


def collect_local(host: str, *, timeout: float = 60.0, script: Path | None = None) -> HostObservation:
    """Run collect.sh on this machine (an operator on the host, or NRPE with the tool installed)."""
    argv = ["sh", str(script)] if script else ["sh", "-s"]
    stdin = None if script else collect_script()
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return health.unreachable_observation(host, f"collect.sh did not finish within {timeout:g}s")
    return observation_from_output(host, done.stdout, done.returncode, done.stderr)


def observation_from_output(host: str, stdout: str, exit_code: int = 0, stderr: str = "") -> HostObservation:
    """Parse collect.sh output; output without its sections means the script could not run."""
    if "@@meta" not in stdout:
        reason = _one_line(stderr) or f"collect.sh exited {exit_code} without output"
        return health.unreachable_observation(host, f"collect failed: {reason}")
    return health.parse_collect(stdout, host=host)


def collect_many(transport: Transport, hosts: Iterable[Host], *, timeout: float | None = None,
                 workers: int = DEFAULT_WORKERS) -> dict[str, HostObservation]:
    """Collect from every host in parallel through a bounded pool; one result per host, always."""
    targets = list(hosts)
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(targets)))) as pool:
        results = pool.map(lambda h: collect(transport, h, timeout=timeout), targets)
        return {h.fqdn: obs for h, obs in zip(targets, results, strict=True)}


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return sanitize(lines[0] if lines else "")


def sanitize(text: str) -> str:
    """Plugin output must be one line without `|` (Icinga takes what follows as perfdata)."""
    return " ".join(text.replace("|", "/").split())[:300]


# ------------------------------------------------------------------------------------------- check


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    host: str
    state: NagiosState
    text: str  # `IPSEC CRITICAL - ...`: never contains `|`
    perfdata: str
    health: HostHealth

    @property
    def line(self) -> str:
        return f"{self.text} | {self.perfdata}" if self.perfdata else self.text


def expected_connections(fleet: Fleet, pairs: Iterable[Pair], fqdn: str) -> tuple[Connection, ...]:
    if fqdn not in fleet.hosts:
        raise errors.InputError(f"unknown host {fqdn!r}", key="hosts",
                                hint="give the FQDN as written in the inventory")
    return pairing.connections_for(fleet, pairs, fqdn)


def check_host(obs: HostObservation, expected: Iterable[Connection],
               enabled_hosts: Collection[str] | None = None) -> CheckResult:
    """Judge one host's observation and phrase it as a Nagios check result."""
    return nagios_result(health.judge_host(obs, expected, enabled_hosts), obs)


def nagios_result(hh: HostHealth, obs: HostObservation | None = None) -> CheckResult:
    state = nagios_state(hh)
    parts = [f"IPSEC {state.name}"]
    if hh.latched:
        parts.append(latch_text(hh.latch_marker))
    parts.extend(sanitize(p) for p in hh.problems if not (hh.latched and p == "charon not running"))
    parts.append(summary_groups(hh) if hh.conns else "no IPsec peers expected for this host")
    return CheckResult(host=hh.host, state=state, text=" - ".join(parts), perfdata=perfdata(hh, obs),
                       health=hh)


def nagios_state(hh: HostHealth) -> NagiosState:
    verdicts = {c.verdict for c in hh.conns}
    if not hh.reachable:
        return NagiosState.UNKNOWN
    if verdicts & set(CRITICAL_VERDICTS):
        return NagiosState.CRITICAL
    if hh.latched or verdicts & set(WARNING_VERDICTS):
        return NagiosState.WARNING
    if hh.problems and hh.conns:
        return NagiosState.CRITICAL
    return NagiosState.OK


def summary_groups(hh: HostHealth) -> str:
    """`ok: 3 no-xfrm: cp2_v4 not-conn: cp3_v4,cp3_v6` (Wikimedia's format, names sorted)."""
    groups = hh.by_verdict()
    words = [f"ok: {len(groups.get(Verdict.OK, ()))}"]
    words += [f"{v.value}: {_names(groups[v])}" for v in GROUP_ORDER if v in groups]
    return " ".join(words)


def _names(names: tuple[str, ...]) -> str:
    """Sorted names, at most MAX_NAMES of them (NRPE truncates long plugin output)."""
    shown = ",".join(names[:MAX_NAMES])
    return shown if len(names) <= MAX_NAMES else f"{shown} (+{len(names) - MAX_NAMES} more)"


def latch_text(marker: str) -> str:
    """`latched by ipsec-kill (who, when, reason)` from the marker's JSON (or its raw text)."""
    try:
        data = json.loads(marker) if marker else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {"note": marker}
    details = [str(data[k]) for k in ("who", "when", "reason", "note") if data.get(k)]
    return sanitize("latched by ipsec-kill" + (f" ({', '.join(details)})" if details else ""))


def perfdata(hh: HostHealth, obs: HostObservation | None = None) -> str:
    """`'label'=value[UOM];warn;crit;min;max` items: counts per class, plus xfrm counters (`c`)."""
    groups = hh.by_verdict()
    failed = sum(1 for c in hh.conns if c.failed)
    items = [f"ok={len(groups.get(Verdict.OK, ()))};;;0", f"failed={failed};;1;0",
             f"waiting={len(groups.get(Verdict.WAITING_FOR_PEER, ()))};;;0", f"expected={len(hh.conns)};;;0"]
    if obs is not None and obs.reachable:
        items += [f"states={len(obs.kernel_states)};;;0", f"policies={obs.policy_count()};;;0"]
        items += [f"{name}={obs.counter(name)}c" for name in PERF_COUNTERS if obs.counter(name) is not None]
    return " ".join(items)


# --------------------------------------------------------------------------------------- the fleet


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One site x cluster cell of the status table (counts of connection ends)."""

    site: str
    cluster: str
    hosts: int
    expected: int
    healthy: int
    waiting: int
    failed: int
    latched_hosts: int
    unreachable_hosts: int


@dataclass(frozen=True, kw_only=True)
class FleetStatus:
    time: float
    hosts: tuple[HostHealth, ...]
    pairs: tuple[PairHealth, ...]
    cells: tuple[Cell, ...]
    observations: Mapping[str, HostObservation]
    site_of: Mapping[str, tuple[str, str]]  # fqdn -> (site, cluster)

    @property
    def latched(self) -> tuple[str, ...]:
        return tuple(h.host for h in self.hosts if h.latched)

    @property
    def unreachable(self) -> tuple[str, ...]:
        return tuple(h.host for h in self.hosts if not h.reachable)

    @property
    def failing_pairs(self) -> tuple[PairHealth, ...]:
        return tuple(p for p in self.pairs if p.failed)

    @property
    def state(self) -> NagiosState:
        return max((nagios_state(h) for h in self.hosts), default=NagiosState.OK)


def select_hosts(fleet: Fleet, *, site: str | None = None, cluster: str | None = None) -> tuple[Host, ...]:
    for value, known, what in ((site, fleet.sites, "site"), (cluster, fleet.clusters, "cluster")):
        if value is not None and value not in known:
            raise errors.InputError(f"unknown {what} {value!r}", key=f"--{what}",
                                    hint=f"one of: {', '.join(sorted(known))}")
    return tuple(h for h in fleet.hosts.values()
                 if (site is None or h.site == site) and (cluster is None or h.cluster == cluster))


def enabled_hosts(observations: Mapping[str, HostObservation],
                  conns_by_host: Mapping[str, tuple[Connection, ...]]) -> frozenset[str]:
    """Hosts that carry the rollout's config. A host counts as not enabled only on positive evidence:
    it answered, vici works, and none of its expected connections is loaded or has an SA. Latched
    hosts are out on purpose, so their peers' broken connections count as waiting, not failed."""
    return frozenset(h for h, obs in observations.items()
                     if not obs.latched and not _positively_not_deployed(obs, conns_by_host.get(h, ())))


def _positively_not_deployed(obs: HostObservation, conns: tuple[Connection, ...]) -> bool:
    if not obs.reachable or not obs.charon_up or obs.configured is None:
        return False
    names = {c.name for c in conns}
    return not (names & set(obs.configured)) and not any(i.name in names for i in obs.ike_sas)


Collector = Callable[[Iterable[Host]], dict[str, HostObservation]]


def fleet_status(fleet: Fleet, pairs: tuple[Pair, ...], collector: Collector, *, site: str | None = None,
                 cluster: str | None = None) -> FleetStatus:
    """Collect from the selected hosts and their peers (`collector`, e.g. a bound collect_many) and
    judge every host and pair that touches the selection."""
    selected = select_hosts(fleet, site=site, cluster=cluster)
    chosen = {h.fqdn for h in selected}
    touching = tuple(p for p in pairs if p.a in chosen or p.b in chosen)
    needed = sorted(chosen | {p.a for p in touching} | {p.b for p in touching})
    observations = collector(fleet.hosts[h] for h in needed)
    conns = pairing.connections_by_host(pairs)
    enabled = enabled_hosts(observations, conns)
    hosts = tuple(health.judge_host(observations[h.fqdn], conns.get(h.fqdn, ()), enabled) for h in selected)
    judged = tuple(health.judge_pair(observations[p.a], observations[p.b], p, enabled) for p in touching)
    site_of = {h.fqdn: (h.site, h.cluster) for h in fleet.hosts.values()}
    return FleetStatus(time=time.time(), hosts=hosts, pairs=judged, cells=_cells(hosts, site_of),
                       observations=observations, site_of=site_of)


def _cells(hosts: Iterable[HostHealth], site_of: Mapping[str, tuple[str, str]]) -> tuple[Cell, ...]:
    grouped: dict[tuple[str, str], list[HostHealth]] = {}
    for hh in hosts:
        grouped.setdefault(site_of[hh.host], []).append(hh)
    return tuple(_cell(site, cluster, members) for (site, cluster), members in sorted(grouped.items()))


def _cell(site: str, cluster: str, members: list[HostHealth]) -> Cell:
    ends = [c for hh in members for c in hh.conns]
    return Cell(site=site, cluster=cluster, hosts=len(members), expected=len(ends),
                healthy=sum(c.verdict == Verdict.OK for c in ends),
                waiting=sum(c.verdict == Verdict.WAITING_FOR_PEER for c in ends),
                failed=sum(c.failed for c in ends),
                latched_hosts=sum(hh.latched for hh in members),
                unreachable_hosts=sum(not hh.reachable for hh in members))


# ------------------------------------------------------------------------------------------ output


def status_json(status: FleetStatus) -> dict[str, Any]:
    """A JSON-ready document of the fleet status (no key material: only names, verdicts, SPIs)."""
    return {
        "time": status.time,
        "state": status.state.name,
        "cells": [c.__dict__ for c in status.cells],
        "latched": list(status.latched),
        "unreachable": list(status.unreachable),
        "hosts": [_host_json(hh, status.site_of) for hh in status.hosts],
        "failing_pairs": [{"a": p.pair.a, "b": p.pair.b, "ends": list(p.failing_names())}
                          for p in status.failing_pairs],
    }


def _host_json(hh: HostHealth, site_of: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    site, cluster = site_of.get(hh.host, ("", ""))
    return {"host": hh.host, "site": site, "cluster": cluster, "state": nagios_state(hh).name,
            "reachable": hh.reachable, "latched": hh.latched, "problems": list(hh.problems),
            "connections": [{"name": c.name, "peer": c.peer, "family": c.family, "verdict": c.verdict.value,
                             "detail": c.detail} for c in hh.conns]}


# Prometheus status values follow Wikimedia's ipsec_status convention (4 = ignored).
PROM_STATUS = {Verdict.OK: 0, Verdict.DUPLICATE: 1, Verdict.UNREACHABLE: 3, Verdict.WAITING_FOR_PEER: 4,
               Verdict.LATCHED: 4}


def prometheus_text(status: FleetStatus) -> str:
    """node-exporter textfile: per-host, per-connection gauges."""
    lines = [
        "# HELP ipsec_rollout_connection_status 0 ok, 1 warning, 2 critical, 3 unknown, 4 ignored "
        "(waiting-for-peer, latched); the verdict label says which.",
        "# TYPE ipsec_rollout_connection_status gauge",
    ]
    for hh in status.hosts:
        base = _labels(hh.host, status.site_of)
        lines += [f"ipsec_rollout_connection_status{{{base},conn=\"{c.name}\",peer=\"{c.peer}\","
                  f"family=\"{c.family}\",verdict=\"{c.verdict.value}\"}} {PROM_STATUS.get(c.verdict, 2)}"
                  for c in hh.conns]
    lines += _host_gauges(status)
    lines += _byte_gauges(status)
    lines += ["# HELP ipsec_rollout_status_timestamp_seconds When this file was computed.",
              "# TYPE ipsec_rollout_status_timestamp_seconds gauge",
              f"ipsec_rollout_status_timestamp_seconds {status.time:.3f}"]
    return "\n".join(lines) + "\n"


def _labels(host: str, site_of: Mapping[str, tuple[str, str]]) -> str:
    site, cluster = site_of.get(host, ("", ""))
    return f'host="{host}",site="{site}",cluster="{cluster}"'


def _host_gauges(status: FleetStatus) -> list[str]:
    gauges: dict[str, Callable[[HostHealth], int]] = {
        "ipsec_rollout_host_reachable": lambda hh: int(hh.reachable),
        "ipsec_rollout_host_latched": lambda hh: int(hh.latched),
        "ipsec_rollout_host_charon_up": lambda hh: int(hh.charon_up),
    }
    lines: list[str] = []
    for name, value in gauges.items():
        lines += [f"# TYPE {name} gauge"]
        lines += [f"{name}{{{_labels(hh.host, status.site_of)}}} {value(hh)}" for hh in status.hosts]
    lines += ["# TYPE ipsec_rollout_xfrm_stat counter"]
    for hh in status.hosts:
        obs = status.observations.get(hh.host)
        for counter in PERF_COUNTERS:
            count = obs.counter(counter) if obs is not None else None
            if count is not None:
                labels = f'{_labels(hh.host, status.site_of)},counter="{counter}"'
                lines.append(f"ipsec_rollout_xfrm_stat{{{labels}}} {count}")
    return lines


def _byte_gauges(status: FleetStatus) -> list[str]:
    lines = ["# HELP ipsec_rollout_child_sa_bytes Bytes through the installed CHILD_SA (resets at rekey).",
             "# TYPE ipsec_rollout_child_sa_bytes gauge"]
    for hh in status.hosts:
        for c in hh.conns:
            if c.child is None:
                continue
            base = f'{_labels(hh.host, status.site_of)},conn="{c.name}"'
            lines += [f'ipsec_rollout_child_sa_bytes{{{base},direction="in"}} {c.child.bytes_in}',
                      f'ipsec_rollout_child_sa_bytes{{{base},direction="out"}} {c.child.bytes_out}']
    return lines


def write_textfile(path: Path, text: str) -> None:
    """Atomically replace `path` (temp file in the same directory + rename), mode 0644."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
