"""`ipsec-rollout check HOST` (Nagios/Icinga plugin) and `ipsec-rollout status` (fleet view)."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rollout import inventory, monitor, pairing
from rollout.cli import app
from rollout.errors import RolloutError
from rollout.health import HostObservation
from rollout.model import Fleet, Host, Pair
from rollout.transport import Transport

console = Console()
InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="Inventory directory (*.yaml).")]
TimeoutOpt = Annotated[float | None, typer.Option(help="Seconds per host (default: its command_timeout).")]
DEFAULT_INVENTORY = Path("inventory")
STYLE = {"OK": "green", "WARNING": "yellow", "CRITICAL": "red", "UNKNOWN": "magenta"}


def _load(path: Path) -> tuple[Fleet, tuple[Pair, ...]]:
    fleet = inventory.load_dir(path)
    return fleet, pairing.compute_pairs(fleet)


@contextmanager
def _transport() -> Iterator[Transport]:
    from rollout.ssh import SshTransport  # imported late: `check --local` needs no SSH stack

    transport = SshTransport()
    try:
        yield transport
    finally:
        transport.close()


# ------------------------------------------------------------------------------------------- check


@app.command("check")
def check(
    host: Annotated[str | None, typer.Argument(help="FQDN as in the inventory (default with --local: this "
                                                    "machine's FQDN).")] = None,
    inventory_dir: InventoryOpt = DEFAULT_INVENTORY,
    local: Annotated[bool, typer.Option("--local", help="Run the collector on this machine, not over SSH.")]
    = False,
    from_file: Annotated[Path | None, typer.Option("--from-file", help="Judge saved collect.sh output "
                                                   "('-' = stdin) instead of collecting.")] = None,
    with_peers: Annotated[bool, typer.Option("--with-peers", help="Also collect from the peers, so that "
                                             "peers not enabled yet (or latched) count as waiting.")] = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Nagios/Icinga plugin: one line, perfdata after `|`, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    try:
        result = _check(host, inventory_dir, local=local, from_file=from_file, with_peers=with_peers,
                        timeout=timeout)
    except RolloutError as exc:  # a plugin answers UNKNOWN, never a traceback or a foreign exit code
        typer.echo(f"IPSEC UNKNOWN - {monitor.sanitize(exc.message)}")
        raise typer.Exit(int(monitor.NagiosState.UNKNOWN)) from None
    typer.echo(result.line)
    raise typer.Exit(int(result.state))


def _check(host: str | None, inventory_dir: Path, *, local: bool, from_file: Path | None, with_peers: bool,
           timeout: float | None) -> monitor.CheckResult:
    fleet, pairs = _load(inventory_dir)
    fqdn = host or (socket.getfqdn() if local or from_file else None)
    if fqdn is None:
        raise RolloutError("give a HOST (or --local / --from-file)")
    expected = monitor.expected_connections(fleet, pairs, fqdn)
    if from_file is not None:
        text = sys.stdin.read() if str(from_file) == "-" else from_file.read_text()
        obs = monitor.observation_from_output(fqdn, text)
    elif local:
        obs = monitor.collect_local(fqdn, timeout=timeout or 60.0)
    else:
        with _transport() as transport:
            obs = monitor.collect(transport, fleet.host(fqdn), timeout=timeout)
            enabled = _enabled_from_peers(transport, fleet, pairs, fqdn, obs, timeout) if with_peers else None
            return monitor.check_host(obs, expected, enabled)
    return monitor.check_host(obs, expected)


def _enabled_from_peers(transport: Transport, fleet: Fleet, pairs: tuple[Pair, ...], fqdn: str,
                        obs: HostObservation, timeout: float | None) -> frozenset[str]:
    peers = [fleet.host(p.peer_of(fqdn)) for p in pairs if fqdn in (p.a, p.b)]
    observations = {fqdn: obs, **monitor.collect_many(transport, peers, timeout=timeout)}
    return monitor.enabled_hosts(observations, pairing.connections_by_host(pairs))


# ------------------------------------------------------------------------------------------ status


@app.command("status")
def status(
    inventory_dir: InventoryOpt = DEFAULT_INVENTORY,
    site: Annotated[str | None, typer.Option(help="Only hosts of this site.")] = None,
    cluster: Annotated[str | None, typer.Option(help="Only hosts of this cluster.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (one document per "
                                          "round with --watch).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until interrupted.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between rounds with --watch.")] = 30.0,
    prometheus: Annotated[Path | None, typer.Option("--prometheus", help="Also write a node-exporter "
                                                    "textfile (*.prom), atomically.")] = None,
    workers: Annotated[int, typer.Option(help="Hosts collected in parallel.")] = monitor.DEFAULT_WORKERS,
    timeout: TimeoutOpt = None,
) -> None:
    """Fleet view: site x cluster table of expected vs healthy SAs, failing pairs, latched and unreachable
    hosts. Exit status as a Nagios check of the whole selection (0 OK ... 3 UNKNOWN)."""
    fleet, pairs = _load(inventory_dir)
    monitor.select_hosts(fleet, site=site, cluster=cluster)  # bad --site / --cluster: fail before SSH
    with _transport() as transport:
        collector = partial(_collect, transport, workers=workers, timeout=timeout)
        rounds = _rounds(fleet, pairs, collector, site=site, cluster=cluster, watch=watch, interval=interval)
        last = _show(rounds, as_json=as_json, watch=watch, prometheus=prometheus)
    raise typer.Exit(int(last.state) if last is not None and not watch else 0)


def _collect(transport: Transport, hosts: Iterable[Host], *, workers: int,
             timeout: float | None) -> dict[str, HostObservation]:
    return monitor.collect_many(transport, hosts, workers=workers, timeout=timeout)


def _rounds(fleet: Fleet, pairs: tuple[Pair, ...], collector: monitor.Collector, *, site: str | None,
            cluster: str | None, watch: bool, interval: float) -> Iterator[monitor.FleetStatus]:
    while True:
        started = time.monotonic()
        yield monitor.fleet_status(fleet, pairs, collector, site=site, cluster=cluster)
        if not watch:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _show(rounds: Iterator[monitor.FleetStatus], *, as_json: bool, watch: bool,
          prometheus: Path | None) -> monitor.FleetStatus | None:
    last = None
    try:
        if watch and not as_json:
            with Live(Text("collecting..."), console=console, auto_refresh=False) as live:
                for last in rounds:
                    _export(last, prometheus)
                    live.update(render_status(last), refresh=True)
        else:
            for last in rounds:
                _export(last, prometheus)
                _print(last, as_json=as_json)
    except KeyboardInterrupt:
        pass
    return last


def _export(status_: monitor.FleetStatus, prometheus: Path | None) -> None:
    if prometheus is not None:
        monitor.write_textfile(prometheus, monitor.prometheus_text(status_))


def _print(status_: monitor.FleetStatus, *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(monitor.status_json(status_), sort_keys=True))
    else:
        console.print(render_status(status_))


def render_status(status_: monitor.FleetStatus) -> Group:
    """The rich view: the site x cluster table, then failing pairs, latched and unreachable hosts."""
    when = time.strftime("%H:%M:%S", time.localtime(status_.time))
    table = Table(title=f"IPsec {status_.state.name} - {when}", title_style=STYLE[status_.state.name])
    for col in ("site", "cluster", "hosts", "expected SAs", "healthy", "waiting", "failed", "latched",
                "unreachable"):
        table.add_column(col, justify="left" if col in ("site", "cluster") else "right")
    for c in status_.cells:
        style = "red" if c.failed or c.unreachable_hosts else ("yellow" if c.latched_hosts else "green")
        table.add_row(c.site, c.cluster, str(c.hosts), str(c.expected), str(c.healthy), str(c.waiting),
                      str(c.failed), str(c.latched_hosts), str(c.unreachable_hosts), style=style)
    parts: list[Table | Text] = [table]
    parts += _failing_lines(status_)
    return Group(*parts)


def _failing_lines(status_: monitor.FleetStatus) -> list[Text]:
    lines = [Text(f"failing pair {p.pair.a} <-> {p.pair.b}: {' '.join(p.failing_names())}", style="red")
             for p in status_.failing_pairs]
    if status_.latched:
        lines.append(Text("latched by ipsec-kill: " + " ".join(status_.latched), style="yellow"))
    for hh in status_.hosts:
        if not hh.reachable:
            lines.append(Text(f"unreachable: {hh.host} ({'; '.join(hh.problems)})", style="magenta"))
        elif hh.problems:
            lines.append(Text(f"{hh.host}: {'; '.join(hh.problems)}", style="red"))
    if not lines:
        lines.append(Text("every expected SA is healthy", style="green"))
    return lines
