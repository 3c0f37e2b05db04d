"""`apply`, `teardown`, `resume`, `rollback`, `runs`: the executor on the command line (thin).

Parses flags, builds the plan (or reads `--plan FILE` and refuses it when stale), asks for
confirmation, runs `rollout.executor.Executor` with a reporter (rich live progress on a terminal,
plain lines otherwise, an event stream with --json), prints a summary, exits with the error's code.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from rollout import errors, hostcache, inventory, journal, killswitch, pairing
from rollout.cli import app
from rollout.cli.plan import resolve_playbook
from rollout.events import HOST, Event, JsonReporter, Reporter
from rollout.executor import Executor, RunResult, Runtime
from rollout.model import Fleet
from rollout.planner import Plan, build_plan, plan_from_json, verify_digest
from rollout.playbook import load_playbook
from rollout.transport import Transport

console = Console(stderr=True, highlight=False, soft_wrap=True)
DEFAULT_STATE_DIR = Path("/var/lib/ipsec-rollout")
STATE_ENV = "ROLLOUT_STATE_DIR"
_INVENTORY, _PLAYBOOKS = Path("inventory"), Path("playbooks")


def _ssh_transport() -> Transport:
    from rollout.ssh import SshTransport  # the only importer of paramiko

    return SshTransport()


transport_factory: Callable[[], Transport] = _ssh_transport  # tests replace this

# ------------------------------------------------------------------------------------------ options
InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="Inventory dir.")]
PlaybooksOpt = Annotated[Path, typer.Option("--playbooks", help="Playbook names dir.")]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help=f"Journal/lock/audit dir "
                                               f"(env {STATE_ENV}; default {DEFAULT_STATE_DIR}).")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Emit the event stream as JSON lines on stdout.")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="Why (task id); goes to the audit log.")]
StageOpt = Annotated[list[str] | None, typer.Option("--stage", "-s", help="Run only this stage (repeat).")]


def state_dir_of(option: Path | None) -> Path:
    return option or Path(os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR)


# ------------------------------------------------------------------------------------------ reporters
class LiveReporter:
    """rich live view: one row per host (stage, batch, state, last step) plus the gate line."""

    def __init__(self, console_: Console) -> None:
        self.console = console_
        self._rows: dict[str, list[str]] = {}
        self._status = ""
        self._lock = threading.Lock()
        self.live = Live(self._render(), console=console_, refresh_per_second=4, transient=False)

    def emit(self, event: Event) -> None:
        with self._lock:
            if event.kind == HOST and event.host:
                self._rows[event.host] = [event.stage or "", str(event.batch or ""), event.state or "",
                                          event.message[:60]]
            elif event.kind in ("stage-start", "batch-start", "gate", "rollback"):
                where = f"{event.stage or ''} batch {event.batch}" if event.batch else (event.stage or "")
                self._status = f"{event.kind} {where} {event.state or ''} {event.message[:100]}".strip()
            elif event.kind == "warning":
                self.console.print(f"[yellow]warning[/] {escape(event.host or '')}: {escape(event.message)}")
            self.live.update(self._render())

    def _render(self) -> Any:
        table = Table(box=None, pad_edge=False)
        for col in ("host", "stage", "batch", "state", "step"):
            table.add_column(col)
        for host, row in self._rows.items():
            colour = {"failed": "red", "rollback-failed": "bold red", "unreachable": "magenta",
                      "rolled-back": "yellow", "changed": "green", "unchanged": "cyan"}.get(row[2], "")
            state = f"[{colour}]{row[2]}[/]" if colour else row[2]
            table.add_row(escape(host), escape(row[0]), row[1], state, escape(row[3]))
        return Group(table, f"[dim]{escape(self._status)}[/]")


class LineReporter:
    """No terminal: one plain line per stage/batch/gate event and per final host state."""

    FINAL = frozenset({"changed", "unchanged", "failed", "unreachable", "rolled-back", "rollback-failed",
                       "removed", "would-change"})

    def __init__(self, console_: Console) -> None:
        self.console = console_

    def emit(self, event: Event) -> None:
        if event.kind == HOST and event.state not in self.FINAL:
            return
        if event.kind == "gate" and event.state == "sample":
            return
        parts = [time.strftime("%H:%M:%S", time.localtime(event.time)), event.kind]
        parts += [x for x in (event.stage, f"batch {event.batch}" if event.batch else None, event.host,
                              event.state, event.message) if x]
        self.console.print(escape(" ".join(str(p) for p in parts)))


# ------------------------------------------------------------------------------------------ plumbing
def _load_plan(playbook: str | None, plan_file: Path | None, inventory_dir: Path,
               playbooks_dir: Path) -> tuple[Fleet, Plan, dict[str, Any]]:
    if (playbook is None) == (plan_file is None):
        raise errors.InputError("give a PLAYBOOK or --plan FILE (exactly one)", key="PLAYBOOK")
    fleet = inventory.load_dir(inventory_dir)
    pairs = pairing.compute_pairs(fleet)
    meta: dict[str, Any] = {"inventory": str(inventory_dir.absolute())}
    if plan_file is not None:
        try:
            data = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise errors.InputError(f"cannot read the plan: {exc}", file=str(plan_file)) from None
        plan = plan_from_json(data)
        verify_digest(data, fleet, plan.playbook, pairs)
        meta["plan_file"] = str(plan_file.absolute())
        return fleet, plan, meta
    assert playbook is not None
    path = resolve_playbook(playbook, playbooks_dir)
    meta["playbook"] = str(path.absolute())
    return fleet, build_plan(fleet, pairs, load_playbook(path, fleet, pairs)), meta


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise errors.Refused(f"{question}: needs confirmation, but there is no terminal",
                             hint="pass --yes to run without a prompt")
    if not typer.confirm(question, default=False, err=True):
        raise errors.Aborted("aborted by the operator")


def _describe(plan: Plan, stages: list[str] | None, kind: str) -> str:
    chosen = [s for s in plan.stages if not stages or s.name in stages]
    hosts = sum(len(s.hosts) for s in chosen)
    names = ", ".join(s.name for s in chosen)
    return f"{kind} {plan.playbook.name!r}: {len(chosen)} stage(s) ({names}), {hosts} host(s)"


def _runtime(state_dir: Path, reporter: Reporter, reason: str) -> Runtime:
    flags = tuple(dict.fromkeys([killswitch.STOP_FLAG, state_dir / killswitch.STOP_FLAG.name]))
    return Runtime(transport=transport_factory(), state_dir=state_dir, reporter=reporter, reason=reason,
                   stop_flags=flags, save_hosts=_save_hosts,
                   warn=lambda m: console.print(f"[yellow]warning:[/] {escape(m)}"))


def _save_hosts(fleet: Fleet) -> None:
    try:
        hostcache.save_hosts(fleet)
    except OSError as exc:  # the cache helps the kill switch; it must not stop an apply
        console.print(f"[yellow]warning:[/] could not save the host cache: {escape(str(exc))}")


def _execute(as_json: bool, body: Callable[[Reporter], RunResult]) -> None:
    """Run with the right reporter, print the summary, raise the run's error (its exit code)."""
    if as_json:
        result = body(JsonReporter(sys.stdout))
    elif console.is_terminal:
        live = LiveReporter(console)
        with live.live:
            result = body(live)
    else:
        result = body(LineReporter(console))
    if not as_json:
        _summary(result)
    if result.error is not None:
        raise result.error


def _summary(result: RunResult) -> None:
    counts: dict[str, int] = {}
    final: dict[str, str] = {}
    for outcome in result.hosts:
        final[outcome.fqdn] = outcome.state.value
    for state in final.values():
        counts[state] = counts.get(state, 0) + 1
    per_stage = ", ".join(f"{n} {s:.0f}s" for n, s in result.stage_seconds)
    colour = "green" if result.error is None else "red"
    console.print(f"[{colour}]{result.kind} {result.status}[/] run {result.run_id} in {result.seconds:.0f}s"
                  + (f" ({per_stage})" if per_stage else "") + ": "
                  + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no host touched"))


# ------------------------------------------------------------------------------------------ commands
@app.command("apply")
def apply_cmd(
    playbook: Annotated[str | None, typer.Argument(help="Playbook file or name.")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="A plan made by `plan --format json`; "
                                                   "refused if the fleet drifted.")] = None,
    stage: StageOpt = None, reason: ReasonOpt = "", yes: YesOpt = False, as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read-only checks; change nothing.")] = False,
    inventory_dir: InventoryOpt = _INVENTORY, playbooks_dir: PlaybooksOpt = _PLAYBOOKS,
    state: StateOpt = None,
) -> None:
    """Roll IPsec out, stage by stage, batch by batch, with health gates and automatic rollback."""
    fleet, plan, meta = _load_plan(playbook, plan_file, inventory_dir, playbooks_dir)
    if not dry_run:
        _confirm(_describe(plan, stage, "apply"), yes)
    state_dir = state_dir_of(state)
    _execute(as_json, lambda rep: Executor(fleet, _runtime(state_dir, rep, reason)).apply(
        plan, stages=stage, dry_run=dry_run, meta=meta))


@app.command("teardown")
def teardown_cmd(
    playbook: Annotated[str | None, typer.Argument(help="Playbook file or name.")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="A plan file.")] = None,
    stage: StageOpt = None, reason: ReasonOpt = "", yes: YesOpt = False, as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing.")] = False,
    inventory_dir: InventoryOpt = _INVENTORY, playbooks_dir: PlaybooksOpt = _PLAYBOOKS,
    state: StateOpt = None,
) -> None:
    """Remove IPsec stage by stage in reverse (last stage first), gated like apply."""
    fleet, plan, meta = _load_plan(playbook, plan_file, inventory_dir, playbooks_dir)
    if not dry_run:
        _confirm(_describe(plan, stage, "teardown"), yes)
    state_dir = state_dir_of(state)
    _execute(as_json, lambda rep: Executor(fleet, _runtime(state_dir, rep, reason)).teardown(
        plan, stages=stage, dry_run=dry_run, meta=meta))


def _past_run(run_id: str, state_dir: Path, inventory_dir: Path | None) -> tuple[Fleet, Plan,
                                                                                journal.JournalState]:
    past = journal.load_run(state_dir, journal.check_run_id(run_id))
    recorded = past.start.get("meta", {}).get("inventory")
    fleet = inventory.load_dir(inventory_dir or Path(recorded or _INVENTORY))
    data = past.start["plan"]
    plan = plan_from_json(data)
    verify_digest(data, fleet, plan.playbook)
    return fleet, plan, past


@app.command("resume")
def resume_cmd(
    run_id: Annotated[str, typer.Argument(help="The run to carry on (see `runs`).")],
    reason: ReasonOpt = "", yes: YesOpt = False, as_json: JsonOpt = False,
    inventory_dir: Annotated[Path | None, typer.Option("--inventory", "-i",
                                                       help="Default: the run's own.")] = None,
    state: StateOpt = None,
) -> None:
    """Carry on an interrupted, paused or stopped run; completed steps are not redone."""
    state_dir = state_dir_of(state)
    fleet, plan, past = _past_run(run_id, state_dir, inventory_dir)
    _confirm(f"resume {past.kind} run {run_id} ({past.status or 'interrupted'}, "
             f"stages done: {', '.join(past.stages_done) or 'none'})", yes)
    _execute(as_json, lambda rep: Executor(fleet, _runtime(state_dir, rep, reason or past.start.get(
        "reason", ""))).resume(past, plan))


@app.command("rollback")
def rollback_cmd(
    run_id: Annotated[str, typer.Argument(help="The run to undo (see `runs`).")],
    to_stage: Annotated[str | None, typer.Option("--to-stage", help="Keep this stage and the ones "
                                                 "before it; undo the later ones.")] = None,
    reason: ReasonOpt = "", yes: YesOpt = False, as_json: JsonOpt = False,
    inventory_dir: Annotated[Path | None, typer.Option("--inventory", "-i",
                                                       help="Default: the run's own.")] = None,
    state: StateOpt = None,
) -> None:
    """Undo a run's completed stages in reverse, restoring each changed host's snapshot."""
    state_dir = state_dir_of(state)
    fleet, plan, past = _past_run(run_id, state_dir, inventory_dir)
    _confirm(f"roll back run {run_id}" + (f" to stage {to_stage!r}" if to_stage else " entirely"), yes)
    _execute(as_json, lambda rep: Executor(fleet, _runtime(state_dir, rep, reason)).rollback(
        past, plan, to_stage=to_stage))


@app.command("runs")
def runs_cmd(as_json: JsonOpt = False, state: StateOpt = None) -> None:
    """Run history: id, kind, status, stages done, operator, reason."""
    rows = [{"run_id": r.run_id, "kind": r.kind, "status": r.status or "interrupted",
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
             "stages_done": r.stages_done, "operator": r.start.get("operator", ""),
             "reason": r.start.get("reason", ""), "playbook": r.start.get("plan", {}).get(
                 "playbook", {}).get("name", "")}
            for r in journal.list_runs(state_dir_of(state))]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return
    table = Table(title="ipsec-rollout runs")
    columns = ("run_id", "kind", "playbook", "status", "started", "stages_done", "operator", "reason")
    for col in columns:
        table.add_column(col, no_wrap=col in ("run_id", "started", "status"))
    for row in rows:
        table.add_row(*(escape(", ".join(v) if isinstance(v, list) else str(v))
                        for v in (row[c] for c in columns)))
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)
    out.print(table)
