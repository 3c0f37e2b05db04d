"""`ipsec-rollout inventory validate | show | pairs`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rollout import inventory, pairing
from rollout.cli import app
from rollout.errors import InputError
from rollout.model import Fleet, Pair

inventory_app = typer.Typer(help="Validate and inspect the fleet inventory.", no_args_is_help=True)
app.add_typer(inventory_app, name="inventory")
console = Console()

InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="Inventory directory (*.yaml).")]
DEFAULT_INVENTORY = Path("inventory")


def load(path: Path) -> tuple[Fleet, tuple[Pair, ...]]:
    """Load, validate and pair: everything a command needs before it may touch a host."""
    fleet = inventory.load_dir(path)
    return fleet, pairing.compute_pairs(fleet)


@inventory_app.command("validate")
def validate(inventory_dir: InventoryOpt = DEFAULT_INVENTORY) -> None:
    """Check the inventory; exit non-zero with one clear message on the first problem."""
    fleet, pairs = load(inventory_dir)
    counts = pairing.family_counts(pairs)
    console.print(f"[green]OK[/] {len(fleet.sources)} files, {len(fleet.sites)} sites, "
                  f"{len(fleet.clusters)} clusters, {len(fleet.hosts)} hosts, {len(fleet.rules)} rules, "
                  f"{len(pairs)} pairs ({counts['v4']} IPv4 + {counts['v6']} IPv6 connections)")


@inventory_app.command("show")
def show(inventory_dir: InventoryOpt = DEFAULT_INVENTORY,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List sites, clusters and hosts."""
    fleet, pairs = load(inventory_dir)
    peers = pairing.pairs_by_host(pairs)
    if as_json:
        typer.echo(json.dumps([_host_row(fleet, h, len(peers.get(h, ()))) for h in fleet.hosts], indent=2))
        return
    table = Table(title=f"{len(fleet.hosts)} hosts")
    for col in ("host", "site", "tier", "cluster", "os", "IPv4", "IPv6", "peers"):
        table.add_column(col)
    for fqdn in fleet.hosts:
        row = _host_row(fleet, fqdn, len(peers.get(fqdn, ())))
        table.add_row(*(str(row[k]) if row[k] is not None else "-" for k in row))
    console.print(table)


def _host_row(fleet: Fleet, fqdn: str, peer_count: int) -> dict[str, object]:
    h = fleet.hosts[fqdn]
    return {"host": fqdn, "site": h.site, "tier": fleet.sites[h.site].tier.value, "cluster": h.cluster,
            "os": h.os, "ipv4": str(h.ipv4) if h.ipv4 else None, "ipv6": str(h.ipv6) if h.ipv6 else None,
            "peers": peer_count}


@inventory_app.command("pairs")
def pairs_cmd(inventory_dir: InventoryOpt = DEFAULT_INVENTORY,
              host: Annotated[str | None, typer.Option(help="Only pairs with this host.")] = None,
              site: Annotated[str | None, typer.Option(help="Only pairs touching this site.")] = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List host pairs and their per-family connections (initiator first)."""
    fleet, pairs = load(inventory_dir)
    _check_filter(fleet, host, site)
    selected = pairing.filter_pairs(pairs, fleet, host=host, site=site)
    if as_json:
        typer.echo(json.dumps([{"initiator": p.a, "responder": p.b, "families": list(p.families),
                                "rule": p.rule} for p in selected], indent=2))
        return
    table = Table(title=f"{len(selected)} pairs, {pairing.sa_count(selected)} connections")
    for col in ("initiator", "responder", "families", "rule"):
        table.add_column(col)
    for p in selected:
        table.add_row(p.a, p.b, " ".join(p.families), p.rule)
    console.print(table)


def _check_filter(fleet: Fleet, host: str | None, site: str | None) -> None:
    if host and host not in fleet.hosts:
        raise InputError(f"unknown host {host!r}", key="--host", hint="see 'ipsec-rollout inventory show'")
    if site and site not in fleet.sites:
        raise InputError(f"unknown site {site!r}", key="--site",
                         hint=f"known sites: {', '.join(fleet.sites)}")
