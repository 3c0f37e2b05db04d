"""`ipsec-kill`: the global IPsec off switch (also `ipsec-rollout kill`). Thin: flags -> killswitch."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rollout import errors, killswitch
from rollout.cli import app, run_guarded
from rollout.killswitch import HostResult, KillOptions, KillReport, Outcome, Scope, Targets
from rollout.transport import AsyncTransport, Transport

kill_app = typer.Typer(name="ipsec-kill", add_completion=False, pretty_exceptions_enable=False,
                       help="Turn host-to-host IPsec OFF now (latch, stop charon, flush xfrm, verify).")
err = Console(stderr=True)
out = Console()
FULL_TABLE_MAX = 60  # above this many hosts the table lists only hosts that are not clean


def _ssh_transport(handshakes: int) -> Transport | AsyncTransport:
    from rollout.sshasync import AsyncSshTransport  # event-driven: one loop, no thread per host

    return AsyncSshTransport(max_handshakes=handshakes)


transport_factory: Callable[[int], Transport | AsyncTransport] = _ssh_transport  # tests replace this


def kill_command(
    all_hosts: Annotated[bool, typer.Option("--all", help="Every host in the inventory.")] = False,
    site: Annotated[list[str] | None, typer.Option("--site", help="Hosts of this site (repeatable).")] = None,
    cluster: Annotated[list[str] | None, typer.Option("--cluster", help="Hosts of this cluster (repeatable).")
                       ] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="FQDN, short name or glob (repeatable).")]
    = None,
    rearm: Annotated[bool, typer.Option("--rearm", help="Lift the latch (does not start IPsec).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script and targets; touch nothing.")]
    = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="No confirmation prompt (scripts).")] = False,
    parallel: Annotated[int, typer.Option(help="Hosts in flight at once.")] = 256,
    handshakes: Annotated[int, typer.Option(help="SSH handshakes at once (CPU-bound on this side).")] = 32,
    connect_timeout: Annotated[float | None, typer.Option(help="Seconds per connect/handshake/auth step.")]
    = 5.0,
    command_timeout: Annotated[float, typer.Option(help="Seconds for the script on one host.")] = 60.0,
    deadline: Annotated[float, typer.Option(help="Global bound for the whole run, seconds.")] = 180.0,
    retries: Annotated[int, typer.Option(help="Extra attempts for unreachable hosts.")] = 3,
    reason: Annotated[str, typer.Option(help="Why (goes into the latch, the report and the audit log).")]
    = "ipsec-kill",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")] = False,
    report: Annotated[Path | None, typer.Option(help="Report file (default ./ipsec-kill-<run>.json).")
                      ] = None,
    inventory: Annotated[Path | None, typer.Option("--inventory", "-i", help="Inventory directory.")] = None,
    hosts_file: Annotated[Path | None, typer.Option(help="Lines 'fqdn key=value ...' or JSON.")]
    = None,
    state_dir: Annotated[Path, typer.Option(hidden=True, help="Stop flag + audit log directory.")]
    = killswitch.STATE_DIR,
) -> None:
    """Kill IPsec on the selected hosts. Exit 0 only if every host is confirmed clean; 3 = partial."""
    scope = Scope(all=all_hosts, sites=tuple(site or ()), clusters=tuple(cluster or ()),
                  hosts=tuple(host or ()))
    overrides = {"connect_timeout": connect_timeout} if connect_timeout else None
    targets = killswitch.select_targets(scope, inventory=_inventory_dir(inventory), hosts_file=hosts_file,
                                        ssh_overrides=overrides)
    for warning in targets.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    options = KillOptions(who=killswitch.default_who(), reason=reason, rearm=rearm, parallel=parallel,
                          command_timeout=command_timeout, deadline=deadline, retries=retries)
    if dry_run:
        _print_dry_run(targets, options)
        return
    _confirm(targets, options, yes)
    result = _execute(targets, options, state_dir, handshakes)
    path = killswitch.write_report(result, report or killswitch.default_report_path(options.run_id))
    killswitch.audit(result, path=state_dir / killswitch.AUDIT_LOG.name, report_path=path)
    _print_outcome(result, path, as_json)
    raise typer.Exit(int(result.exit_code))


def _inventory_dir(given: Path | None) -> Path | None:
    if given is not None:
        return given
    env = os.environ.get("IPSEC_ROLLOUT_INVENTORY")
    if env:
        return Path(env)
    return Path("inventory") if Path("inventory").is_dir() else None


def _confirm(targets: Targets, options: KillOptions, yes: bool) -> None:
    count = len(targets.hosts)
    if yes:
        return
    if not sys.stdin.isatty():
        raise errors.Refused(f"refusing to {options.mode} {count} host(s) without confirmation",
                             hint="run on a terminal, or pass --yes")
    verb = "LIFT the kill latch on" if options.rearm else "KILL IPsec on"
    err.print(f"About to [bold red]{verb} {count} host(s)[/] from {escape(targets.source)}.")
    answer = typer.prompt(f"Type the number of hosts ({count}) to proceed", default="", show_default=False)
    if answer.strip() != str(count):
        raise errors.Aborted("confirmation did not match; nothing was done")


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Cyclic GC took ~9 % of the client's CPU at 1,000 hosts (asyncssh allocates per packet): for the
    run, freeze what start-up built and collect the young generation 10x less often. Memory stays
    bounded (cycles are still collected, later); the process is as before afterwards."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(threshold[0] * 10, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _execute(targets: Targets, options: KillOptions, state_dir: Path, handshakes: int) -> KillReport:
    transport = transport_factory(max(1, handshakes))
    total = len(targets.hosts)
    done = [0]

    def progress(result: HostResult) -> None:
        done[0] += 1
        if result.outcome.clean:
            return
        err.print(f"  [{done[0]}/{total}] {escape(result.fqdn)}: [red]{result.outcome.value}[/] "
                  f"{escape(result.detail)}", highlight=False)

    err.print(f"{options.mode}: {total} host(s), parallel {options.parallel}, "
              f"deadline {options.deadline:g} s, run {options.run_id}", highlight=False)
    try:
        with _fewer_collections():
            return killswitch.run_kill(targets, transport, options, on_result=progress,
                                       stop_flag=state_dir / killswitch.STOP_FLAG.name)
    finally:
        transport.close()


def _print_dry_run(targets: Targets, options: KillOptions) -> None:
    out.print("# DRY-RUN: nothing was touched. Script run on each host via one SSH exec:", highlight=False)
    out.print(killswitch.script(), markup=False, highlight=False)
    command = killswitch.remote_command(options, body="<the script above>")
    out.print(f"# exact command per host: {command}", markup=False, highlight=False)
    out.print(f"# {len(targets.hosts)} target(s) from {targets.source}:", markup=False, highlight=False)
    for line in killswitch.describe(targets.hosts):
        out.print(f"#   {line}", markup=False, highlight=False)


def _print_outcome(result: KillReport, path: Path, as_json: bool) -> None:
    console = err if as_json else out
    console.print(_table(result))
    summary = ", ".join(f"{result.count(o)} {o.value}" for o in Outcome if result.count(o))
    colour = "green" if result.exit_code == errors.ExitCode.OK else "bold red"
    console.print(f"[{colour}]{summary}[/] in {result.finished - result.started:.1f} s; "
                  f"report: {escape(str(path))}", highlight=False)
    if result.not_clean():
        names = " ".join(r.fqdn for r in result.not_clean())
        console.print(f"[bold red]NOT confirmed clean:[/] {escape(names)}", highlight=False)
    if as_json:
        typer.echo(result.to_json())


def _table(result: KillReport) -> Table:
    rows = result.results if len(result.results) <= FULL_TABLE_MAX else result.not_clean()
    table = Table(title=f"ipsec-kill {result.mode} {result.run_id}")
    table.add_column("host", no_wrap=True)
    for column in ("outcome", "states", "policies", "charon", "latched", "tries", "detail"):
        table.add_column(column)
    for row in sorted(rows, key=lambda r: (r.outcome.clean, r.fqdn)):
        fields = dict(row.fields)
        colour = "green" if row.outcome.clean else "red"
        table.add_row(row.fqdn, f"[{colour}]{row.outcome.value}[/]", *(fields.get(k, "-") for k in
                      ("states", "policies", "charon", "latched")), str(row.attempts), escape(row.detail))
    return table


kill_app.command(name="ipsec-kill")(kill_command)
app.command(name="kill", help="Alias of ipsec-kill: turn host-to-host IPsec OFF now.")(kill_command)


def main() -> None:
    sys.exit(run_guarded(lambda: kill_app(standalone_mode=True)))


if __name__ == "__main__":
    main()
