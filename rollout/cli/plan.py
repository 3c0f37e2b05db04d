"""`ipsec-rollout plan PLAYBOOK`: the dry run. No SSH; nothing changes (except the --out file)."""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rollout import inventory, pairing, planformat
from rollout.cli import app
from rollout.errors import InputError, PlaybookError
from rollout.planner import Plan, build_plan
from rollout.playbook import load_playbook

console = Console(highlight=False, soft_wrap=True)
_INVENTORY, _PLAYBOOKS = Path("inventory"), Path("playbooks")


def resolve_playbook(name: str, playbooks_dir: Path) -> Path:
    """PLAYBOOK is a file path, or a name in --playbooks DIR (with or without .yaml)."""
    given = Path(name)
    if given.is_file():
        return given
    for candidate in (playbooks_dir / name, playbooks_dir / f"{name}.yaml", playbooks_dir / f"{name}.yml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in playbooks_dir.glob("*.y*ml")) if playbooks_dir.is_dir() else []
    close = difflib.get_close_matches(name, known, n=1)
    hint = (f"did you mean {close[0]!r}?" if close else
            f"playbooks in {playbooks_dir}: {', '.join(known)}" if known else
            f"give a path, or a name in --playbooks DIR (now {playbooks_dir}, which has none)")
    raise PlaybookError(f"no playbook {name!r}", hint=hint)


def make_plan(playbook: str, inventory_dir: Path, playbooks_dir: Path) -> Plan:
    """Load and validate everything, then plan (pure from here on)."""
    fleet = inventory.load_dir(inventory_dir)
    pairs = pairing.compute_pairs(fleet)
    book = load_playbook(resolve_playbook(playbook, playbooks_dir), fleet, pairs)
    return build_plan(fleet, pairs, book)


def _plain(markup: str) -> str:
    """Terminal text without colours (for --out)."""
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=False, no_color=True, width=200, highlight=False,
            soft_wrap=True).print(markup, end="")
    return buffer.getvalue()


def _known_host(plan: Plan, fqdn: str) -> str:
    hosts = [h.fqdn for s in plan.stages for h in s.hosts]
    if fqdn in hosts:
        return fqdn
    matches = [h for h in hosts if h.split(".", 1)[0] == fqdn]  # short names are accepted
    if len(matches) == 1:
        return matches[0]
    close = difflib.get_close_matches(fqdn, hosts, n=1)
    raise InputError(f"host {fqdn!r} is not enabled by any stage of this plan",
                     hint=f"did you mean {close[0]!r}?" if close else "pick a host the plan lists")


@app.command("plan")
def plan_cmd(
    playbook: Annotated[str, typer.Argument(help="Playbook file, or a name in --playbooks DIR.")],
    inventory_dir: Annotated[Path, typer.Option("--inventory", "-i", help="Inventory dir.")] = _INVENTORY,
    playbooks_dir: Annotated[Path, typer.Option("--playbooks", help="Playbook names dir.")] = _PLAYBOOKS,
    fmt: Annotated[str, typer.Option("--format", "-f", help="text | markdown | json")] = "text",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the plan to FILE.")] = None,
    show_config: Annotated[str | None, typer.Option("--show-config",
                                                    help="Print HOST's files whole.")] = None,
    show_commands: Annotated[str | None, typer.Option("--show-commands",
                                                      help="Print HOST's remote commands in order.")] = None,
) -> None:
    """Dry run: stages -> batches -> hosts, the SA delta per stage, files and exact commands.
    Contacts no host and changes nothing."""
    if fmt not in planformat.FORMATS:
        raise InputError(f"unknown format {fmt!r}", key="--format", hint="use text, markdown or json")
    plan = make_plan(playbook, inventory_dir, playbooks_dir)
    if show_config or show_commands:
        _show_host(plan, show_config, show_commands)
        return
    text = planformat.render(plan, fmt)
    if out is not None:
        out.write_text(_plain(text) if fmt == "text" else text, encoding="utf-8")
        console.print(f"plan written to {out} (digest {plan.digest[:12]})", markup=False)
    elif fmt == "text":
        console.print(text, end="")
    else:
        typer.echo(text, nl=False)


def _show_host(plan: Plan, show_config: str | None, show_commands: str | None) -> None:
    if show_config:
        typer.echo(planformat.host_config(plan, _known_host(plan, show_config)) or "", nl=False)
    if show_commands:
        typer.echo(planformat.host_commands(plan, _known_host(plan, show_commands)) or "", nl=False)
