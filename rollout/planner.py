"""The planner (pure): fleet + pairs + playbook -> the Plan that `apply` executes.

No I/O. `build_plan` decides, for every stage, its batches, the hosts in each batch with the
files they get and the exact remote steps in order, and the SA delta (which SAs come up, which
wait for a peer). The plan digest binds it to its inputs so `apply --plan FILE` can refuse a
plan that no longer matches the fleet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from rollout import model, steps
from rollout.errors import PlanStaleError, PlaybookError
from rollout.pairing import compute_pairs, pairs_by_host
from rollout.playbook import Playbook, Stage, playbook_from_json, playbook_to_json, resolve_stages
from rollout.render import FleetRenderer, MaterialCopy, RenderedFile, RenderedHost
from rollout.steps import Step

SCHEMA_VERSION = 1
PLAN_RUN_ID = "RUN_ID"  # placeholder run id in a plan's snapshot/restore paths; see bind_run_id


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, order=True)
class SaRef:
    """One CHILD SA (one pair, one family). For SAs coming up: host < peer. For SAs waiting:
    `host` is enabled, `peer` is not yet."""

    host: str
    peer: str
    family: model.Family


@dataclass(frozen=True, kw_only=True)
class HostPlan:
    """What one host gets: its files and the remote steps, grouped in phases. The executor runs
    a batch phase by phase (every host's preflight, then every snapshot, ...), so both ends of a
    pair in one batch have loaded their config before either initiates."""

    fqdn: str
    site: str
    cluster: str
    os: str
    enforce: bool
    files: tuple[RenderedFile, ...]
    material: tuple[MaterialCopy, ...]  # certificate/key/CA copied on the host by the install steps
    digests: tuple[tuple[str, str], ...]  # (path, sha256) of every installed file, as apply verifies
    preflight: tuple[Step, ...]
    snapshot: tuple[Step, ...]
    install: tuple[Step, ...]
    load: tuple[Step, ...]
    initiate: tuple[Step, ...]  # connections this host initiates whose peer is up by this batch
    restore: tuple[Step, ...]  # rollback of this host (not part of `steps`)

    @property
    def steps(self) -> tuple[Step, ...]:
        """The forward steps in execution order."""
        return self.preflight + self.snapshot + self.install + self.load + self.initiate


@dataclass(frozen=True, kw_only=True)
class PeerAction:
    """Steps on a host enabled earlier: it initiates SAs whose peer this batch enables."""

    host: str
    steps: tuple[Step, ...]


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    index: int  # 1-based within its stage
    hosts: tuple[HostPlan, ...]
    sa_up: tuple[SaRef, ...]  # SAs whose second end this batch enables (what its gate checks)
    sa_waiting: tuple[SaRef, ...] = ()  # this batch's hosts' SAs whose peer is not enabled yet
    peer_actions: tuple[PeerAction, ...] = ()

    @property
    def fqdns(self) -> tuple[str, ...]:
        return tuple(h.fqdn for h in self.hosts)


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    name: str
    stage: Stage  # the playbook stage: gates, on_failure, selector as written
    enforce: bool  # resolved: the stage's, else the inventory's
    batch_size: int  # resolved from the stage's count or percent
    max_unreachable: int  # resolved budgets (counts across the stage's batches)
    max_ipsec_failures: int
    batches: tuple[BatchPlan, ...]
    sa_up: tuple[SaRef, ...]  # both ends enabled by the end of this stage, not before
    sa_waiting: tuple[SaRef, ...]  # at the end of this stage: host enabled, peer not (yet)
    hosts_enabled_after: int  # cumulative
    sas_up_after: int  # cumulative

    @property
    def hosts(self) -> tuple[HostPlan, ...]:
        return tuple(h for b in self.batches for h in b.hosts)


@dataclass(frozen=True, kw_only=True)
class Digests:
    """sha256 hex digests of the canonical JSON of each input, and of all of them together."""

    inventory: str
    playbook: str
    configs: str
    plan: str


@dataclass(frozen=True, kw_only=True)
class Plan:
    playbook: Playbook
    stages: tuple[StagePlan, ...]
    digests: Digests
    fleet_hosts: int  # hosts in the inventory
    fleet_sas: int  # CHILD SAs the pairing rules define over the whole fleet
    never_up: tuple[SaRef, ...]  # waiting after the last stage: a peer this playbook never enables
    schema_version: int = SCHEMA_VERSION

    @property
    def digest(self) -> str:
        return self.digests.plan

    def host(self, fqdn: str) -> HostPlan | None:
        return next((h for s in self.stages for h in s.hosts if h.fqdn == fqdn), None)


# --------------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _Ctx:
    fleet: model.Fleet
    by_host: Mapping[str, tuple[model.Pair, ...]]
    run_id: str
    renderer: FleetRenderer
    playbook_source: str = ""
    refs: dict[tuple[str, str, str], SaRef] = dataclasses.field(default_factory=dict)

    def sa_ref(self, host: str, peer: str, family: model.Family) -> SaRef:
        """One SaRef object per SA: a plan lists each SA ~4 times (batch and stage, up and waiting)."""
        ref = self.refs.get((host, peer, family))
        if ref is None:
            ref = self.refs[host, peer, family] = SaRef(host=host, peer=peer, family=family)
        return ref


def build_plan(fleet: model.Fleet, pairs: Iterable[model.Pair], playbook: Playbook, *,
               run_id: str = PLAN_RUN_ID) -> Plan:
    """The complete plan. Raises errors.PlaybookError (selection) or errors.RenderError.
    `run_id` only names the snapshot directory in snapshot/restore steps; it is not digested."""
    pair_list = tuple(pairs)
    ctx = _Ctx(fleet=fleet, by_host=pairs_by_host(pair_list), run_id=run_id, renderer=FleetRenderer(fleet),
               playbook_source=playbook.source)
    enabled: set[str] = set()
    up: dict[tuple[str, str], int] = {}  # pairs with both ends enabled -> their SA count
    stages = []
    for stage, added in zip(playbook.stages, resolve_stages(playbook, fleet, pair_list), strict=True):
        stages.append(_stage_plan(ctx, stage, added, enabled, up))
    stage_plans = tuple(stages)
    return Plan(
        playbook=playbook, stages=stage_plans,
        digests=compute_digests(fleet, playbook, _configs(stage_plans)),
        fleet_hosts=len(fleet.hosts), fleet_sas=sum(len(p.families) for p in pair_list),
        never_up=stage_plans[-1].sa_waiting if stage_plans else (),
    )


def _stage_plan(ctx: _Ctx, stage: Stage, added: tuple[str, ...], enabled: set[str],
                up: dict[tuple[str, str], int]) -> StagePlan:
    """Plan one stage; updates `enabled` and `up` (the pairs with both ends enabled)."""
    enforce = ctx.fleet.ipsec.enforce if stage.enforce is None else stage.enforce
    size = stage.batch.of(len(added), round_up=True)
    batches = []
    stage_up: list[SaRef] = []
    for index, start in enumerate(range(0, len(added), size), start=1):
        batch = _batch_plan(ctx, index, added[start:start + size], enforce, enabled, up)
        if enforce:
            _refuse_held_traffic(ctx, stage, index, batch)
        batches.append(batch)
        stage_up.extend(batch.sa_up)
    return StagePlan(
        name=stage.name, stage=stage, enforce=enforce, batch_size=size,
        max_unreachable=stage.budgets.max_unreachable.of(len(added), round_up=False),
        max_ipsec_failures=stage.budgets.max_ipsec_failures.of(len(added), round_up=False),
        batches=tuple(batches), sa_up=_sorted_refs(stage_up), sa_waiting=_waiting(ctx, enabled),
        hosts_enabled_after=len(enabled), sas_up_after=sum(up.values()),
    )


def _batch_plan(ctx: _Ctx, index: int, fqdns: tuple[str, ...], enforce: bool, enabled: set[str],
                up: dict[tuple[str, str], int]) -> BatchPlan:
    new = set(fqdns)
    enabled.update(fqdns)
    completing = _completing_pairs(ctx, fqdns, enabled, up)
    up.update(((p.a, p.b), len(p.families)) for p in completing)
    initiate: dict[str, list[model.Connection]] = {}
    for pair in completing:
        for family in pair.families:
            initiate.setdefault(pair.initiator, []).append(
                model.Connection(local=pair.a, peer=pair.b, family=family, initiator=True))
    hosts = tuple(_host_plan(ctx, f, enforce, tuple(initiate.get(f, ()))) for f in fqdns)
    peers = tuple(PeerAction(host=h, steps=_initiate_steps(ctx, h, tuple(conns)))
                  for h, conns in sorted(initiate.items()) if h not in new)
    sa_up = _sorted_refs(ctx.sa_ref(p.a, p.b, f) for p in completing for f in p.families)
    return BatchPlan(index=index, hosts=hosts, sa_up=sa_up, sa_waiting=_waiting(ctx, enabled, fqdns),
                     peer_actions=peers)


def _refuse_held_traffic(ctx: _Ctx, stage: Stage, index: int, batch: BatchPlan) -> None:
    """Enforce = trap policies: a host would hold (drop) its traffic to every peer that is not enabled
    by the end of its batch. That blackholes production (Wikimedia's 2015 `auto=route`), so refuse."""
    if not batch.sa_waiting:
        return
    peers = sorted({r.peer for r in batch.sa_waiting})
    hosts = sorted({r.host for r in batch.sa_waiting})
    origin = ("key 'enforce' of this stage" if stage.enforce is not None
              else "'ipsec.enforce: true' in the inventory (the stage does not set 'enforce')")
    raise PlaybookError(
        f"enforce (trap policies) would blackhole traffic: after batch {index}, "
        f"{len(hosts)} host(s) ({_some(hosts)}) would hold their traffic to {len(peers)} peer(s) that "
        f"are not enabled yet ({_some(peers)}); this comes from the {origin}",
        file=ctx.playbook_source or None, key=f"stage {stage.name!r}",
        hint="roll out fail-open first (enforce: false); enforce only in a batch that holds every host "
             "together with all its peers (e.g. a re-apply with batch: 100%)")


def _some(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _completing_pairs(ctx: _Ctx, fqdns: tuple[str, ...], enabled: set[str],
                      up: Mapping[tuple[str, str], int]) -> list[model.Pair]:
    found: dict[tuple[str, str], model.Pair] = {}
    for fqdn in fqdns:
        for pair in ctx.by_host.get(fqdn, ()):
            key = (pair.a, pair.b)
            if key not in up and pair.peer_of(fqdn) in enabled:
                found[key] = pair
    return [found[k] for k in sorted(found)]


def _waiting(ctx: _Ctx, enabled: set[str], hosts: Iterable[str] | None = None) -> tuple[SaRef, ...]:
    """SAs of `hosts` (default: every enabled host) whose peer is not enabled."""
    refs = [ctx.sa_ref(h, peer, f)
            for h in (enabled if hosts is None else hosts) for p in ctx.by_host.get(h, ())
            if (peer := p.peer_of(h)) not in enabled for f in p.families]
    return _sorted_refs(refs)


_SA_ORDER = attrgetter("host", "peer", "family")  # SaRef's own order, compared in C (not by __lt__)


def _sorted_refs(refs: Iterable[SaRef]) -> tuple[SaRef, ...]:
    return tuple(sorted(refs, key=_SA_ORDER))


def _host_plan(ctx: _Ctx, fqdn: str, enforce: bool, initiate: tuple[model.Connection, ...]) -> HostPlan:
    host = ctx.fleet.host(fqdn)
    rendered = ctx.renderer.render(ctx.by_host.get(fqdn, ()), fqdn, enforce=enforce)
    return HostPlan(
        fqdn=fqdn, site=host.site, cluster=host.cluster, os=host.os, enforce=enforce,
        files=rendered.files, material=rendered.material,
        digests=tuple(sorted(steps.expected_digests(rendered).items())),
        initiate=_initiate_steps(ctx, fqdn, initiate), **_phases(ctx, host, rendered),
    )


# --------------------------------------------------------------------------------------------
# Steps (the one place that calls rollout.steps)
# --------------------------------------------------------------------------------------------
def _phases(ctx: _Ctx, host: model.Host, rendered: RenderedHost) -> dict[str, tuple[Step, ...]]:
    return {
        "preflight": steps.preflight_steps(ctx.fleet, host),
        "snapshot": steps.snapshot_steps(rendered, ctx.run_id),
        "install": steps.install_steps(rendered),
        "load": steps.load_steps(rendered),
        "restore": steps.restore_steps(rendered, ctx.run_id),
    }


def _initiate_steps(ctx: _Ctx, fqdn: str, conns: tuple[model.Connection, ...]) -> tuple[Step, ...]:
    stack = ctx.fleet.flavour(ctx.fleet.host(fqdn)).stack
    return steps.initiate_steps_for(stack, conns) if conns else ()


def bind_run_id(plan: Plan, run_id: str) -> Plan:
    """The plan with its snapshot/restore steps pointing at `run_id`'s snapshot directory
    (plans are made before a run exists and use PLAN_RUN_ID)."""
    old, new = steps.snapshot_dir(PLAN_RUN_ID), steps.snapshot_dir(run_id)

    def fix(seq: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(dataclasses.replace(s, command=s.command.replace(old, new)) for s in seq)

    def host(h: HostPlan) -> HostPlan:
        return dataclasses.replace(h, snapshot=fix(h.snapshot), restore=fix(h.restore))

    def batch(b: BatchPlan) -> BatchPlan:
        return dataclasses.replace(b, hosts=tuple(host(h) for h in b.hosts))

    return dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(s, batches=tuple(batch(b) for b in s.batches)) for s in plan.stages))


# --------------------------------------------------------------------------------------------
# Digests: canonical JSON, no timestamps, no paths of the machine that planned
# --------------------------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def fleet_to_json(fleet: model.Fleet) -> dict[str, Any]:
    """The inventory model as plain JSON values, without the file names it was read from."""
    plain: dict[str, Any] = _plain(fleet)
    return plain


_NOT_DIGESTED = ("source", "sources")


def _plain(value: Any) -> Any:
    """dataclasses.asdict without 'source'/'sources' keys, and without its deep copies of the
    leaves (json.dumps only reads them): a third of the time at 5,000 hosts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k not in _NOT_DIGESTED}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in _NOT_DIGESTED}
    return value


def _configs(stages: Iterable[StagePlan]) -> dict[str, dict[str, list[str]]]:
    """fqdn -> path -> [mode, sha256(content)] for every rendered file."""
    configs = {}
    for host in (h for s in stages for h in s.hosts):
        digests = dict(host.digests)  # already sha256(content), from steps.expected_digests
        configs[host.fqdn] = {f.path: [_mode(f.mode), digests.get(f.path) or _sha256(f.content)]
                              for f in host.files}
    return configs


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _mode(mode: int | str) -> str:
    return f"{mode:04o}" if isinstance(mode, int) else str(mode)


def compute_digests(fleet: model.Fleet, playbook: Playbook,
                    configs: Mapping[str, Mapping[str, list[str]]]) -> Digests:
    inventory, book, rendered = sha256_json(fleet_to_json(fleet)), sha256_json(playbook_to_json(playbook)), \
        sha256_json(configs)
    whole = sha256_json({"schema_version": SCHEMA_VERSION, "inventory": inventory, "playbook": book,
                         "configs": rendered})
    return Digests(inventory=inventory, playbook=book, configs=rendered, plan=whole)


# --------------------------------------------------------------------------------------------
# Plan JSON (schema_version 1; documented in docs/playbooks.md) and staleness checks
# --------------------------------------------------------------------------------------------
PLAN_KIND = "ipsec-rollout-plan"


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _sa_json(refs: Iterable[SaRef]) -> list[list[str]]:
    return [[r.host, r.peer, r.family] for r in refs]


def _sa_back(rows: Iterable[list[str]]) -> tuple[SaRef, ...]:
    return tuple(SaRef(host=h, peer=p, family=f) for h, p, f in rows)  # type: ignore[arg-type]


_PHASES = ("preflight", "snapshot", "install", "load", "initiate", "restore")


def _host_json(h: HostPlan) -> dict[str, Any]:
    return {
        "fqdn": h.fqdn, "site": h.site, "cluster": h.cluster, "os": h.os, "enforce": h.enforce,
        "files": [_fields(f) for f in h.files], "material": [_fields(m) for m in h.material],
        "digests": dict(h.digests),
        **{phase: [_fields(s) for s in getattr(h, phase)] for phase in _PHASES},
    }


def _host_back(d: Mapping[str, Any]) -> HostPlan:
    return HostPlan(
        fqdn=d["fqdn"], site=d["site"], cluster=d["cluster"], os=d["os"], enforce=d["enforce"],
        files=tuple(RenderedFile(**f) for f in d["files"]),
        material=tuple(MaterialCopy(**m) for m in d["material"]),
        digests=tuple(sorted(d["digests"].items())),
        **{phase: tuple(Step(**s) for s in d[phase]) for phase in _PHASES},
    )


def _batch_json(b: BatchPlan) -> dict[str, Any]:
    return {"index": b.index, "sa_up": _sa_json(b.sa_up), "sa_waiting": _sa_json(b.sa_waiting),
            "hosts": [_host_json(h) for h in b.hosts],
            "peer_actions": [{"host": a.host, "steps": [_fields(s) for s in a.steps]}
                             for a in b.peer_actions]}


def _batch_back(d: Mapping[str, Any]) -> BatchPlan:
    return BatchPlan(index=d["index"], sa_up=_sa_back(d["sa_up"]), sa_waiting=_sa_back(d["sa_waiting"]),
                     hosts=tuple(_host_back(h) for h in d["hosts"]),
                     peer_actions=tuple(PeerAction(host=a["host"], steps=tuple(Step(**s) for s in a["steps"]))
                                        for a in d["peer_actions"]))


def _stage_json(s: StagePlan) -> dict[str, Any]:
    return {
        "name": s.name, "enforce": s.enforce, "batch_size": s.batch_size,
        "budgets": {"max_unreachable": s.max_unreachable, "max_ipsec_failures": s.max_ipsec_failures},
        "hosts_enabled_after": s.hosts_enabled_after, "sas_up_after": s.sas_up_after,
        "sa_up": _sa_json(s.sa_up), "sa_waiting": _sa_json(s.sa_waiting),
        "batches": [_batch_json(b) for b in s.batches],
    }


def _stage_back(d: Mapping[str, Any], stage: Stage) -> StagePlan:
    return StagePlan(
        name=d["name"], stage=stage, enforce=d["enforce"], batch_size=d["batch_size"],
        max_unreachable=d["budgets"]["max_unreachable"],
        max_ipsec_failures=d["budgets"]["max_ipsec_failures"],
        batches=tuple(_batch_back(b) for b in d["batches"]), sa_up=_sa_back(d["sa_up"]),
        sa_waiting=_sa_back(d["sa_waiting"]), hosts_enabled_after=d["hosts_enabled_after"],
        sas_up_after=d["sas_up_after"],
    )


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON values (stable schema, see docs/playbooks.md). Deterministic: the same
    inputs give byte-identical output once dumped with sort_keys."""
    return {
        "kind": PLAN_KIND, "schema_version": plan.schema_version, "digest": plan.digest,
        "digests": _fields(plan.digests), "playbook": playbook_to_json(plan.playbook),
        "fleet": {"hosts": plan.fleet_hosts, "sas": plan.fleet_sas},
        "stages": [_stage_json(s) for s in plan.stages], "never_up": _sa_json(plan.never_up),
    }


def plan_from_json(data: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from `plan_to_json` output. Raises errors.PlanStaleError for another
    kind or schema version (a plan file from an incompatible tool version)."""
    if data.get("kind") != PLAN_KIND or data.get("schema_version") != SCHEMA_VERSION:
        raise PlanStaleError(
            f"not an ipsec-rollout plan of schema_version {SCHEMA_VERSION} "
            f"(kind={data.get('kind')!r}, schema_version={data.get('schema_version')!r})",
            hint="re-create it with `ipsec-rollout plan PLAYBOOK --format json --out FILE`")
    book = playbook_from_json(data["playbook"])
    return Plan(
        playbook=book,
        stages=tuple(_stage_back(s, st) for s, st in zip(data["stages"], book.stages, strict=True)),
        digests=Digests(**data["digests"]), fleet_hosts=data["fleet"]["hosts"],
        fleet_sas=data["fleet"]["sas"],
        never_up=_sa_back(data["never_up"]), schema_version=data["schema_version"],
    )


def verify_digest(plan_json: Mapping[str, Any], fleet: model.Fleet, playbook: Playbook,
                  pairs: Iterable[model.Pair] | None = None) -> None:
    """Raise errors.PlanStaleError unless re-planning `playbook` on `fleet` gives the digest
    recorded in `plan_json`; the message says which input changed (inventory, playbook, the
    rendered configs and of which hosts)."""
    current = build_plan(fleet, compute_pairs(fleet) if pairs is None else pairs, playbook)
    recorded = plan_json.get("digests") or {}
    if plan_json.get("schema_version") != SCHEMA_VERSION:
        plan_from_json(plan_json)  # raises with the version message
    if recorded.get("plan") == current.digest and plan_json.get("digest") == current.digest:
        return
    changed = [name for name in ("inventory", "playbook", "configs")
               if recorded.get(name) != getattr(current.digests, name)]
    detail = _changed_hosts(plan_json, current) if "configs" in changed else ""
    raise PlanStaleError(
        f"the plan no longer matches its inputs: {', '.join(changed) or 'digest'} changed{detail} "
        f"(plan {str(plan_json.get('digest'))[:12]}, now {current.digest[:12]})",
        hint="review and re-create the plan with `ipsec-rollout plan PLAYBOOK --out FILE`")


def _changed_hosts(plan_json: Mapping[str, Any], current: Plan) -> str:
    old = {h["fqdn"]: h["digests"]
           for s in plan_json.get("stages", ()) for b in s["batches"] for h in b["hosts"]}
    new = {h.fqdn: dict(h.digests) for s in current.stages for h in s.hosts}
    hosts = sorted(f for f in old.keys() | new.keys() if old.get(f) != new.get(f))
    if not hosts:
        return ""
    shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
    return f" (configs of {len(hosts)} host(s): {shown})"
