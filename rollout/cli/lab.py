"""`ipsec-rollout lab up | down | status | run | probe | fault`: the UML lab (see docs/lab.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rollout import lab as labmod
from rollout.cli import app
from rollout.errors import LabError
from rollout.lab import faults, probe
from rollout.lab.paths import default_netns
from rollout.lab.spec import DEFAULT_CLUSTERS, DEFAULT_SITES

lab_app = typer.Typer(help="The User-Mode-Linux lab: real kernels with ESP in a private network namespace.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")
fault_app = typer.Typer(help="Break one thing on one lab host, and put it back.", no_args_is_help=True)
lab_app.add_typer(fault_app, name="fault")
console = Console()

StateOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="Lab state dir (default: $ROLLOUT_LAB_DIR or /var/lib/ipsec-rollout-lab).")]
HostArg = Annotated[str, typer.Argument(help="Lab host: short name, FQDN or address.")]


def _say(message: str) -> None:
    console.print(f"[dim]lab:[/] {escape(message)}", highlight=False)


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@lab_app.command("up")
def up(
    state_dir: StateOpt = None,
    sites: Annotated[str | None, typer.Option(
        help=f"Comma-separated sites, name or name:tier (default {','.join(DEFAULT_SITES)}).")] = None,
    hosts_per_cluster: Annotated[int | None, typer.Option(
        help="Hosts per site and cluster (default 2).")] = None,
    clusters: Annotated[str | None, typer.Option(
        help="Comma-separated clusters (default cache_text).")] = None,
    netns: Annotated[str | None, typer.Option(
        help="Network namespace (default $ROLLOUT_LAB_NETNS or ipsec-lab).")] = None,
    mem: Annotated[int | None, typer.Option(help="Guest memory in MiB (default 128).")] = None,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for every sshd.")] = 300.0,
) -> None:
    """Boot the lab, or finish booting it (healthy hosts are reused, dead ones restarted).

    Without layout options an existing lab keeps its recorded layout.
    """
    spec = None
    if any(v is not None for v in (sites, hosts_per_cluster, clusters, netns, mem)):
        spec = labmod.build_spec(_csv(sites) or DEFAULT_SITES, hosts_per_cluster=hosts_per_cluster or 2,
                                 clusters=_csv(clusters) or DEFAULT_CLUSTERS, netns=netns or default_netns(),
                                 mem_mb=mem or 128)
    lab = labmod.up(spec, state_dir=state_dir, boot_timeout=boot_timeout, progress=_say)
    console.print(f"[green]lab up[/]: {len(lab.spec.hosts)} hosts in namespace {lab.netns}")
    console.print(f"  inventory: {lab.inventory_file}")
    console.print(f"  playbook:  {lab.paths.playbook_file}")
    console.print(f"  try: ipsec-rollout inventory show -i {lab.inventory_dir}")


@lab_app.command("down")
def down(state_dir: StateOpt = None,
         purge: Annotated[bool, typer.Option(help="Also delete the state dir (keys, certificates).")] = False,
         ) -> None:
    """Stop every lab host, remove the namespace, and check that nothing is left."""
    report = labmod.down(state_dir, purge=purge, progress=_say)
    console.print(f"[green]lab down[/]: stopped {len(report.stopped)} host(s); namespace removed; "
                  "no UML process left")


@lab_app.command("status")
def status(state_dir: StateOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           timeout: Annotated[float, typer.Option(help="Seconds each SSH check may take.")] = 30.0) -> None:
    """Per host: kernel running (PID), sshd answering with the recorded host key. Exit 30 if any is not."""
    lab = labmod.load(state_dir)
    rows = lab.status(ssh_timeout=timeout)
    if as_json:
        typer.echo(json.dumps([{**r.__dict__, "healthy": r.healthy} for r in rows], indent=2))
    else:
        _status_table(lab, rows)
    sick = [r.short for r in rows if not r.healthy]
    if sick:
        raise LabError(f"{len(sick)} lab host(s) not healthy: {', '.join(sick)}",
                       hint="`ipsec-rollout lab fault list` shows deliberate faults; "
                            "`ipsec-rollout lab up` restarts the other unhealthy hosts")


def _status_table(lab: labmod.Lab, rows: tuple[labmod.HostStatus, ...]) -> None:
    table = Table(title=f"lab {lab.state_dir} (namespace {lab.netns})")
    for col in ("host", "fqdn", "address", "pid", "sshd"):
        table.add_column(col)
    for r in rows:
        sshd = "-" if r.ssh_ok is None else ("[green]ok[/]" if r.ssh_ok else "[red]no answer[/]")
        pid = str(r.pid) if r.pid else "[red]not running[/]"
        table.add_row(r.short, r.fqdn, r.address, pid, sshd)
    console.print(table)


@lab_app.command("run")
def run_cmd(host: HostArg, command: Annotated[str, typer.Argument(help="Shell command to run.")],
            state_dir: StateOpt = None,
            timeout: Annotated[float, typer.Option(help="Seconds.")] = 60.0) -> None:
    """Run a shell command on a lab host (strict host-key checking) and pass on its exit code."""
    result = labmod.load(state_dir).host(host).run(command, timeout=timeout)
    typer.echo(result.stdout, nl=False)
    typer.echo(result.stderr, nl=False, err=True)
    raise typer.Exit(result.exit_code)


@lab_app.command("probe")
def probe_cmd(a: HostArg, b: HostArg, state_dir: StateOpt = None,
              family: Annotated[str, typer.Option(help="v4 or v6.")] = "v4",
              seconds: Annotated[float, typer.Option(help="How long A pings B.")] = 3.0) -> None:
    """Capture on the lab bridge while A pings B: count ESP vs cleartext ICMP between them."""
    if family not in ("v4", "v6"):
        raise LabError(f"--family must be v4 or v6, not {family!r}")
    fam: Literal["v4", "v6"] = "v4" if family == "v4" else "v6"
    r = probe.count_packets(labmod.load(state_dir), a, b, fam, seconds)
    verdict = "[red]mixed[/]"
    if r.encrypted or r.cleartext:
        verdict = "[green]encrypted[/]" if r.encrypted else "[yellow]cleartext[/]"
    console.print(f"{r.a} -> {r.b} ({r.family}): {verdict}  ESP {r.esp}, cleartext ICMP {r.cleartext_icmp}, "
                  f"IKE {r.ike}, other {r.other}; pings {r.pings_received}/{r.pings_sent} answered")


@fault_app.command("set")
def fault_set(
    host: HostArg,
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(faults.FAULT_KINDS)}.")],
    state_dir: StateOpt = None,
    percent: Annotated[float, typer.Option(help="loss: percentage of packets dropped.")] = 10.0,
    delay_ms: Annotated[int, typer.Option(help="delay: added latency (ms).")] = 50,
    cert_mode: Annotated[str, typer.Option(help="bad-cert: garbage or wrong-ca.")] = "garbage",
    include_ssh: Annotated[bool, typer.Option(help="loss: drop SSH packets too.")] = False,
) -> None:
    """Apply a fault to a lab host."""
    mode: Literal["garbage", "wrong-ca"] = "wrong-ca" if cert_mode == "wrong-ca" else "garbage"
    faults.set_fault(labmod.load(state_dir), host, faults.parse_kind(kind), percent=percent,
                     delay_ms=delay_ms, cert_mode=mode, include_ssh=include_ssh)
    console.print(f"fault {kind} set on {host}")


@fault_app.command("clear")
def fault_clear(
    host: Annotated[str | None, typer.Argument(help="Lab host (default: every host).")] = None,
    kind: Annotated[str | None, typer.Argument(help="Fault kind (default: every fault).")] = None,
    state_dir: StateOpt = None,
) -> None:
    """Undo one fault on a host, every fault on a host, or every fault in the lab."""
    lab = labmod.load(state_dir)
    if host and kind:
        faults.clear_fault(lab, host, faults.parse_kind(kind))
    else:
        faults.clear_all(lab, [host] if host else None)
    console.print("faults cleared")


@fault_app.command("list")
def fault_list(state_dir: StateOpt = None) -> None:
    """The faults recorded as set, by host."""
    active = faults.active_faults(labmod.load(state_dir))
    if not active:
        console.print("no faults set")
    for short, kinds in active.items():
        console.print(f"{short}: {', '.join(kinds)}")
