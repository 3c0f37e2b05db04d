"""Plans as text: terminal text (rich console markup, no rich import), markdown for change
reviews, JSON. Pure functions returning strings; the CLI only prints them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import groupby

from rollout.planner import BatchPlan, HostPlan, Plan, SaRef, StagePlan, plan_to_json
from rollout.playbook import StageSelector, describe

FORMATS = ("text", "markdown", "json")
WAITING_SHOWN = 8  # terminal text lists this many waiting host->peer rows per stage, then counts


def render(plan: Plan, fmt: str) -> str:
    """The plan in one of FORMATS."""
    if fmt == "json":
        return to_json(plan)
    if fmt == "markdown":
        return to_markdown(plan)
    return to_text(plan)


def to_json(plan: Plan) -> str:
    return json.dumps(plan_to_json(plan), indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _short(fqdn: str) -> str:
    return fqdn.split(".", 1)[0]


def grouped(refs: Iterable[SaRef]) -> list[tuple[str, str, str]]:
    """(host, peer, 'v4+v6') rows: one per host pair, families joined."""
    rows = []
    for (host, peer), group in groupby(sorted(refs), key=lambda r: (r.host, r.peer)):
        rows.append((host, peer, "+".join(r.family for r in group)))
    return rows


def waiting_by_host(refs: Iterable[SaRef]) -> list[tuple[str, str, str]]:
    """(host, peer count, SA count) for SAs waiting on peers."""
    rows = []
    for host, group in groupby(sorted(refs), key=lambda r: r.host):
        items = list(group)
        rows.append((host, str(len({r.peer for r in items})), str(len(items))))
    return rows


def selection(sel: StageSelector) -> str:
    text = describe(sel.criteria)
    if sel.pair:
        sides = f"a: {describe(sel.a) if sel.a else 'any'}; b: {describe(sel.b) if sel.b else 'any'}"
        return f"one pair ({text}; {sides})"
    if sel.fraction is not None:
        return f"{sel.fraction:g} of {text}"
    if sel.count is not None:
        return f"{sel.count} of {text}"
    return text


def gates(stage: StagePlan) -> str:
    g = stage.stage.gates
    extras = [x for x, on in (("forced rekey", g.rekey), ("traffic probe", g.probe)) if on]
    return (f"up within {_duration(g.timeout)}, soak {_duration(g.soak)} with {g.samples} samples"
            + (", " + ", ".join(extras) if extras else ""))


def budgets(stage: StagePlan) -> str:
    b = stage.stage.budgets
    return (f"unreachable <= {stage.max_unreachable} ({b.max_unreachable}), "
            f"IPsec failures <= {stage.max_ipsec_failures} ({b.max_ipsec_failures}) "
            "across the stage's batches")


def posture(enforce: bool) -> str:
    return "enforce (trap policies)" if enforce else "fail-open (cleartext while an SA is down)"


def phase_counts(host: HostPlan) -> str:
    phases = ("preflight", "snapshot", "install", "load", "initiate")
    return ", ".join(f"{p} {len(getattr(host, p))}" for p in phases if getattr(host, p))


def commands(host: HostPlan) -> Iterator[str]:
    """Every forward command of a host, in order, each prefixed by its step name."""
    for step in host.steps:
        yield f"# {step.name}" + ("" if step.mutating else " (read-only)")
        yield step.command


def summary_lines(plan: Plan) -> list[str]:
    enabled = plan.stages[-1].hosts_enabled_after if plan.stages else 0
    up = plan.stages[-1].sas_up_after if plan.stages else 0
    return [
        f"fleet: {plan.fleet_hosts} hosts, {plan.fleet_sas} SAs defined by the pairing rules",
        f"this plan: {_n(len(plan.stages), 'stage')}, enables {_n(enabled, 'host')}, brings up {up} SAs; "
        f"{len(plan.never_up)} SAs stay waiting for peers this playbook does not enable",
        f"digest: {plan.digest} (inventory {plan.digests.inventory[:12]}, playbook "
        f"{plan.digests.playbook[:12]}, configs {plan.digests.configs[:12]})",
    ]


# --------------------------------------------------------------------------------------------
# Terminal text (rich console markup; the CLI prints it with rich, which strips it off a TTY)
# --------------------------------------------------------------------------------------------
def esc(text: str) -> str:
    """Escape rich markup in data (commands contain `[ -f ... ]`)."""
    return text.replace("\\", "\\\\").replace("[", "\\[")


def to_text(plan: Plan) -> str:
    lines = [f"[bold]Plan {esc(plan.playbook.name)}[/]" + (
        f" - {esc(plan.playbook.description)}" if plan.playbook.description else "")]
    lines += [f"  {esc(line)}" for line in summary_lines(plan)]
    lines.append("  [dim]dry run: nothing was contacted or changed[/]")
    for number, stage in enumerate(plan.stages, start=1):
        lines += ["", *_text_stage(stage, number, len(plan.stages))]
    return "\n".join(lines) + "\n"


def _text_stage(stage: StagePlan, number: int, total: int) -> list[str]:
    head = f"[bold cyan]Stage {number}/{total}: {esc(stage.name)}[/]"
    if stage.stage.description:
        head += f" - {esc(stage.stage.description)}"
    out = [
        head,
        f"  selects  {esc(selection(stage.stage.selector))}",
        f"  posture  {posture(stage.enforce)}; batches of {stage.batch_size} ({stage.stage.batch}), "
        f"parallelism {stage.stage.parallelism}, on failure: [bold]{stage.stage.on_failure}[/]",
        f"  gates    {gates(stage)}",
        f"  budgets  {budgets(stage)}",
    ]
    for batch in stage.batches:
        out += _text_batch(batch)
    out += _text_delta(stage)
    return out


def _text_batch(batch: BatchPlan) -> list[str]:
    out = [f"  batch {batch.index}: {len(batch.hosts)} host(s), +{len(batch.sa_up)} SAs"]
    for host in batch.hosts:
        files = ", ".join(f.path for f in host.files)
        out.append(f"    {esc(host.fqdn)}  [dim]{esc(host.os)}; {esc(files)}; steps: {phase_counts(host)}[/]")
    for action in batch.peer_actions:
        out.append(f"    [dim]then on {esc(action.host)}: {', '.join(esc(s.name) for s in action.steps)}[/]")
    return out


def _text_delta(stage: StagePlan) -> list[str]:
    up, waiting = grouped(stage.sa_up), grouped(stage.sa_waiting)
    out = [f"  [green]SAs up +{len(stage.sa_up)}[/] (total {stage.sas_up_after}); "
           f"[yellow]waiting for peer {len(stage.sa_waiting)}[/]; hosts enabled {stage.hosts_enabled_after}"]
    out += [f"    [green]up[/]      {esc(_short(h))} <-> {esc(_short(p))}  {f}"
            for h, p, f in up[:WAITING_SHOWN]]
    if len(up) > WAITING_SHOWN:
        out.append(f"    ... and {len(up) - WAITING_SHOWN} more host pairs")
    out += [f"    [yellow]waiting[/] {esc(_short(h))} -> {esc(_short(p))}  {f}"
            for h, p, f in waiting[:WAITING_SHOWN]]
    if len(waiting) > WAITING_SHOWN:
        out.append(f"    ... and {len(waiting) - WAITING_SHOWN} more host pairs (see --format markdown)")
    return out


def host_config(plan: Plan, fqdn: str) -> str | None:
    """Every file a host gets, whole (for --show-config)."""
    host = plan.host(fqdn)
    if host is None:
        return None
    parts = []
    for f in host.files:
        parts.append(f"# ===== {f.path} (mode {f.mode:04o}) =====\n{f.content}")
    return "\n".join(parts)


def host_commands(plan: Plan, fqdn: str) -> str | None:
    """Every remote command for a host, in order (for --show-commands), incl. peer initiations
    and the rollback it would get."""
    host = plan.host(fqdn)
    if host is None:
        return None
    out = [f"# {fqdn}: forward steps in order", *commands(host)]
    for stage in plan.stages:
        for batch in stage.batches:
            for action in batch.peer_actions:
                if action.host == fqdn:
                    out.append(f"# later, stage {stage.name} batch {batch.index}: a new peer is enabled")
                    out += [f"# {s.name}\n{s.command}" for s in action.steps]
    out.append("# rollback (only if a gate fails)")
    out += [f"# {s.name}\n{s.command}" for s in host.restore]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Markdown (change review)
# --------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def to_markdown(plan: Plan) -> str:
    book = plan.playbook
    lines = [f"# IPsec rollout plan: {book.name}", ""]
    if book.description:
        lines += [book.description, ""]
    lines += [f"- {line}" for line in summary_lines(plan)]
    lines += ["", "## Stages", ""]
    lines += _table(("#", "stage", "selects", "hosts", "batches", "SAs up", "waiting", "on failure"),
                    ((str(i), s.name, selection(s.stage.selector), str(len(s.hosts)), str(len(s.batches)),
                      f"+{len(s.sa_up)} (={s.sas_up_after})", str(len(s.sa_waiting)), s.stage.on_failure)
                     for i, s in enumerate(plan.stages, start=1)))
    for number, stage in enumerate(plan.stages, start=1):
        lines += ["", *_md_stage(stage, number)]
    if plan.never_up:
        lines += ["", "## SAs this playbook leaves waiting", ""]
        lines += _table(("host", "peer (not enabled)", "families"), grouped(plan.never_up))
    return "\n".join(lines) + "\n"


def _md_stage(stage: StagePlan, number: int) -> list[str]:
    lines = [f"## Stage {number}: {stage.name}", ""]
    if stage.stage.description:
        lines += [stage.stage.description, ""]
    lines += [
        f"- selects: {selection(stage.stage.selector)}",
        f"- posture: {posture(stage.enforce)}",
        f"- batches: {len(stage.batches)} of up to {stage.batch_size} host(s) ({stage.stage.batch}), "
        f"parallelism {stage.stage.parallelism}",
        f"- gates after every batch: {gates(stage)}",
        f"- failure budgets: {budgets(stage)}; on failure: **{stage.stage.on_failure}**",
        "",
        f"### SA delta: +{len(stage.sa_up)} up (cumulative {stage.sas_up_after}), "
        f"{len(stage.sa_waiting)} waiting for peer",
        "",
    ]
    lines += _table(("up: host", "peer", "families"), grouped(stage.sa_up))
    if stage.sa_waiting:
        lines += ["", "Waiting for a peer not enabled yet (per enabled host):", ""]
        lines += _table(("host", "peers not enabled yet", "SAs waiting"), waiting_by_host(stage.sa_waiting))
    for batch in stage.batches:
        lines += ["", *_md_batch(stage, batch)]
    return lines


def _md_batch(stage: StagePlan, batch: BatchPlan) -> list[str]:
    lines = [f"### {stage.name}, batch {batch.index}: {', '.join(batch.fqdns)}", "",
             f"Gate checks {len(batch.sa_up)} SAs coming up.", ""]
    for host in batch.hosts:
        lines += [f"#### {host.fqdn}", "", f"{host.site} / {host.cluster} / {host.os}", ""]
        digests = dict(host.digests)
        lines += _table(("file", "mode", "sha256 / source"),
                        [(f.path, f"{f.mode:04o}", digests.get(f.path, "")[:16]) for f in host.files]
                        + [(m.dest, f"{m.mode:04o}", f"copied on the host from {m.source}")
                           for m in host.material])
        lines += ["", "```sh", *commands(host), "```"]
    for action in batch.peer_actions:
        lines += ["", f"Then on {action.host} (enabled earlier), initiate towards the new peers:", "",
                  "```sh", *[s.command for s in action.steps], "```"]
    return lines
