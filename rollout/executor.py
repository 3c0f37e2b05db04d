"""The executor: carries out a Plan on the fleet, stage by stage, batch by batch (issue 4).

Per batch, phase by phase over a bounded worker pool (so both ends of a pair in one batch have loaded
their config before either initiates): preflight (read-only; latched hosts refused) -> idempotence
check (hosts that already carry the plan's files are `unchanged`) -> snapshot -> atomic install ->
load -> initiate from the designated initiator (and on earlier hosts whose peer this batch enables).
Then a health gate (`rollout.gates`, built on `rollout.health`). On a
failed gate the batch is rolled back (restore the snapshots, terminate the peers' SAs towards the
batch), the rollback is verified, and the run stops or pauses as the stage says.

Everything with a side effect is injected (`Runtime`: transport, reporter, clock, sleep, state dir),
every step is journaled (fsync) so `resume` converges after a SIGKILL, every mutating step is audited,
and the kill switch's stop flag is checked before every step.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from rollout import errors, health, journal, steps
from rollout.audit import AuditLog
from rollout.events import (
    BATCH_END,
    BATCH_START,
    GATE,
    HOST,
    ROLLBACK,
    RUN_END,
    RUN_START,
    STAGE_END,
    STAGE_START,
    WARNING,
    Event,
    NullReporter,
    Reporter,
)
from rollout.gates import Gate, GateResult
from rollout.lock import DEFAULT_TTL, RunLock
from rollout.model import Connection, Fleet, Host, Pair
from rollout.pairing import compute_pairs, pairs_by_host
from rollout.planner import BatchPlan, HostPlan, Plan, StagePlan, bind_run_id, plan_to_json
from rollout.playbook import Gates
from rollout.pool import pool
from rollout.render import RenderedHost, render_host
from rollout.steps import Step
from rollout.transport import CommandResult, Transport

T = TypeVar("T")
LOCK_NAME = "apply.lock"
AUDIT_NAME = "audit.jsonl"


# ================================================================================================
# Injected runtime and results
# ================================================================================================
@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Everything the executor touches outside itself."""

    transport: Transport
    state_dir: Path
    reporter: Reporter = field(default_factory=NullReporter)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    operator: str = ""  # user@host; "" = the current user
    reason: str = ""
    stop_flags: tuple[Path, ...] = ()  # the kill switch's STOP_FLAG (the CLI passes it)
    lock_ttl: float = DEFAULT_TTL
    syslog_address: str | None = "/dev/log"
    save_hosts: Callable[[Fleet], object] | None = None  # hostcache.save_hosts (kill-switch fallback)
    poll_interval: float = 3.0  # between gate samples while waiting for SAs
    collect_timeout: float = 60.0
    warn: Callable[[str], None] | None = None


class HostState(str, Enum):
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    FAILED = "failed"  # a step failed or its IPsec gate failed (then it was rolled back)
    UNREACHABLE = "unreachable"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"
    REMOVED = "removed"  # teardown
    WOULD_CHANGE = "would-change"  # dry run


@dataclass(frozen=True, kw_only=True)
class HostOutcome:
    fqdn: str
    stage: str
    batch: int
    state: HostState
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """How a run ended. `error` is the RolloutError the CLI re-raises (its exit code), None = ok."""

    run_id: str
    kind: str
    status: str
    hosts: tuple[HostOutcome, ...]
    stages_done: tuple[str, ...]
    message: str = ""
    error: errors.RolloutError | None = None
    seconds: float = 0.0
    stage_seconds: tuple[tuple[str, float], ...] = ()

    def state_of(self, fqdn: str) -> HostState | None:
        found = [h.state for h in self.hosts if h.fqdn == fqdn]
        return found[-1] if found else None


# ================================================================================================
# Internal run state
# ================================================================================================
@dataclass(kw_only=True)
class _Budget:
    max_unreachable: int
    max_ipsec: int
    unreachable: set[str] = field(default_factory=set)
    ipsec: set[str] = field(default_factory=set)

    def over(self) -> str:
        parts = []
        if len(self.unreachable) > self.max_unreachable:
            parts.append(f"{len(self.unreachable)} unreachable (budget {self.max_unreachable}): "
                         + ", ".join(sorted(self.unreachable)))
        if len(self.ipsec) > self.max_ipsec:
            parts.append(f"{len(self.ipsec)} IPsec failures (budget {self.max_ipsec}): "
                         + ", ".join(sorted(self.ipsec)))
        return "; ".join(parts)


@dataclass(kw_only=True)
class _Run:
    run_id: str
    kind: str
    plan: Plan
    jrnl: journal.Journal | None
    audit: AuditLog | None
    lock: RunLock | None
    dry_run: bool = False
    past: journal.JournalState | None = None  # resume: what the journal says is already done
    enabled: set[str] = field(default_factory=set)  # hosts carrying the config (gates judge these)
    excluded: set[str] = field(default_factory=set)  # tolerated failures: left out of later gates
    changed: set[tuple[str, str]] = field(default_factory=set)  # (stage, host) this run changed
    outcomes: list[HostOutcome] = field(default_factory=list)
    stages_done: list[str] = field(default_factory=list)
    stage_seconds: list[tuple[str, float]] = field(default_factory=list)
    last_refresh: float = 0.0
    guard: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, kw_only=True)
class _StepOutcome:
    ok: bool
    unreachable: bool = False
    detail: str = ""
    stdout: str = ""


_STATUS_OF: dict[type[errors.RolloutError], str] = {
    errors.GateFailedPaused: journal.PAUSED,
    errors.GateFailedRolledBack: journal.STOPPED,
    errors.KilledDuringApply: journal.KILLED,
}


def _collect_script() -> str:
    return (resources.files("rollout") / "remote" / "collect.sh").read_text(encoding="utf-8")


def _tail(text: str, limit: int = 300) -> str:
    text = " ".join(line for line in text.strip().splitlines()[-4:] if not line.startswith("plugin '"))
    return text[-limit:]


# ================================================================================================
# The executor
# ================================================================================================
class Executor:
    """Carries out plans against `fleet` through `runtime.transport`."""

    def __init__(self, fleet: Fleet, runtime: Runtime, *, pairs: Sequence[Pair] | None = None) -> None:
        self.fleet = fleet
        self.rt = runtime
        self.pairs = tuple(pairs) if pairs is not None else compute_pairs(fleet)
        self._by_host = pairs_by_host(self.pairs)
        self._pair_index = {(p.a, p.b): p for p in self.pairs}
        self._rendered: dict[tuple[str, bool], RenderedHost] = {}
        self._collect = _collect_script()

    # -------------------------------------------------------------------------- public entry points
    def apply(self, plan: Plan, *, stages: Sequence[str] | None = None, dry_run: bool = False,
              meta: Mapping[str, Any] | None = None) -> RunResult:
        """Run the selected stages (default: all) of `plan`. Stages before the first selected one
        are taken as done by earlier runs (their hosts count as enabled for the gates)."""
        selected = self._select(plan, stages)
        run = self._start(plan, "apply", dry_run=dry_run)
        run.enabled = set(self._hosts_before(plan, selected[0]))
        start_fields = {"stages": selected, "meta": dict(meta or {})}
        return self._guarded(run, start_fields, lambda: self._forward(run, selected))

    def teardown(self, plan: Plan, *, stages: Sequence[str] | None = None, dry_run: bool = False,
                 meta: Mapping[str, Any] | None = None) -> RunResult:
        """Remove IPsec stage by stage in reverse (last stage first, last batch first), gated."""
        selected = self._select(plan, stages)
        run = self._start(plan, "teardown", dry_run=dry_run)
        run.enabled = set(self._hosts_before(plan, None))
        start_fields = {"stages": selected, "meta": dict(meta or {})}
        return self._guarded(run, start_fields, lambda: self._backward(run, selected))

    def resume(self, past: journal.JournalState, plan: Plan) -> RunResult:
        """Carry on an interrupted, paused or stopped run; completed steps are not redone."""
        if past.status in (journal.COMPLETED, journal.ROLLED_BACK):
            raise errors.InputError(f"run {past.run_id} is {past.status}: nothing to resume",
                                    hint="start a new apply instead")
        selected = [str(s) for s in past.start.get("stages", [])] or [s.name for s in plan.stages]
        run = self._start(plan, past.kind, run_id=past.run_id, past=past)
        if past.kind == "teardown":
            run.enabled = set(self._hosts_before(plan, None))
            body: Callable[[], None] = lambda: self._backward(run, selected)  # noqa: E731
        else:
            run.enabled = set(self._hosts_before(plan, selected[0]))
            body = lambda: self._forward(run, selected)  # noqa: E731
        return self._guarded(run, {"stages": selected, "resume": True, "meta": past.start.get("meta", {})},
                             body)

    def rollback(self, past: journal.JournalState, plan: Plan, *, to_stage: str | None = None) -> RunResult:
        """Undo the completed (and partly done) stages of a run in reverse, down to `to_stage`
        (kept), restoring each changed host's snapshot from that run."""
        names = [s.name for s in plan.stages]
        if to_stage is not None and to_stage not in names:
            raise errors.InputError(f"unknown stage {to_stage!r}", key="--to-stage",
                                    hint=f"stages of this run: {', '.join(names)}")
        keep = names[: names.index(to_stage) + 1] if to_stage else []
        undo = [n for n in reversed(names) if n not in keep and past.changed.get(n)]
        run = self._start(plan, "rollback", run_id=past.run_id, past=past)
        run.enabled = self._hosts_done(past, plan)
        fields = {"stages": undo, "rollback": True, "to_stage": to_stage}
        return self._guarded(run, fields, lambda: self._undo_stages(run, undo))

    # -------------------------------------------------------------------------- run lifecycle
    def _select(self, plan: Plan, stages: Sequence[str] | None) -> list[str]:
        names = [s.name for s in plan.stages]
        if not stages:
            return names
        unknown = [s for s in stages if s not in names]
        if unknown:
            raise errors.InputError(f"unknown stage(s) {', '.join(unknown)}", key="--stage",
                                    hint=f"stages of this playbook: {', '.join(names)}")
        return [n for n in names if n in stages]

    def _start(self, plan: Plan, kind: str, *, dry_run: bool = False, run_id: str | None = None,
               past: journal.JournalState | None = None) -> _Run:
        run_id = run_id or journal.new_run_id(self.rt.clock())
        plan = bind_run_id(plan, run_id)
        if dry_run:
            return _Run(run_id=run_id, kind=kind, plan=plan, jrnl=None, audit=None, lock=None,
                        dry_run=True)
        self._check_stop()
        lock = RunLock(self.rt.state_dir / LOCK_NAME, ttl=self.rt.lock_ttl, clock=self.rt.clock,
                       warn=self._warn)
        lock.acquire(run_id, command=kind)
        try:
            jr = journal.Journal.for_run(self.rt.state_dir, run_id, clock=self.rt.clock)
        except BaseException:
            lock.release()
            raise
        audit = AuditLog(self.rt.state_dir / AUDIT_NAME, operator=self.rt.operator or _operator(),
                         reason=self.rt.reason, run_id=run_id, syslog_address=self.rt.syslog_address,
                         clock=self.rt.clock)
        return _Run(run_id=run_id, kind=kind, plan=plan, jrnl=jr, audit=audit, lock=lock, past=past)

    def _guarded(self, run: _Run, start_fields: dict[str, Any], body: Callable[[], None]) -> RunResult:
        began = self.rt.clock()
        error: errors.RolloutError | None = None
        self._record_start(run, start_fields)
        try:
            if self.rt.save_hosts is not None and not run.dry_run:
                self.rt.save_hosts(self.fleet)
            if not run.dry_run:
                self._latch_sweep(run, start_fields.get("stages", []))
            body()
            status = "dry-run" if run.dry_run else (
                journal.ROLLED_BACK if run.kind == "rollback" else journal.COMPLETED)
        except errors.RolloutError as exc:
            error = exc
            status = _STATUS_OF.get(type(exc), journal.FAILED)
        except KeyboardInterrupt:
            self._release(run)  # journal left open-ended: the run is resumable
            raise
        except Exception as exc:  # a bug: record it, free the lock, show the traceback
            self._finish(run, self._result(run, journal.FAILED, errors.RolloutError(repr(exc)), began))
            raise
        result = self._result(run, status, error, began)
        self._finish(run, result)
        return result

    def _result(self, run: _Run, status: str, error: errors.RolloutError | None, began: float) -> RunResult:
        return RunResult(run_id=run.run_id, kind=run.kind, status=status, hosts=tuple(run.outcomes),
                         stages_done=tuple(run.stages_done), message=str(error) if error else "",
                         error=error, seconds=self.rt.clock() - began,
                         stage_seconds=tuple(run.stage_seconds))

    def _release(self, run: _Run) -> None:
        if run.jrnl is not None:
            run.jrnl.close()
        if run.lock is not None:
            run.lock.release()

    def _record_start(self, run: _Run, fields: dict[str, Any]) -> None:
        if run.jrnl is not None:
            run.jrnl.append(journal.RUN_START, run_id=run.run_id, kind=run.kind,
                               operator=run.audit.operator if run.audit else "", reason=self.rt.reason,
                               plan_digest=run.plan.digest, plan=plan_to_json(run.plan), **fields)
        self._emit(run, RUN_START, message=f"{run.kind} {run.plan.playbook.name}",
                   data={"stages": fields.get("stages", []), "dry_run": run.dry_run,
                         "resume": bool(fields.get("resume"))})

    def _finish(self, run: _Run, result: RunResult) -> None:
        try:
            if run.jrnl is not None:
                run.jrnl.append(journal.RUN_END, status=result.status, message=result.message)
                run.jrnl.close()
            if run.audit is not None:
                run.audit.record("-", f"{run.kind}-end", result.status, result.message[:500])
                run.audit.close()
        finally:
            if run.lock is not None:
                run.lock.release()
        self._emit(run, RUN_END, state=result.status, message=result.message,
                   data={"seconds": round(result.seconds, 1),
                         "error": type(result.error).__name__ if result.error else None})

    # -------------------------------------------------------------------------- forward (apply)
    def _forward(self, run: _Run, selected: list[str]) -> None:
        for sp in run.plan.stages:
            if sp.name not in selected:
                continue
            if run.past is not None and sp.name in run.past.stages_done:
                run.enabled.update(sp_hosts(sp))
                run.stages_done.append(sp.name)
                self._emit(run, STAGE_END, stage=sp.name, state="done-earlier")
                continue
            self._stage(run, sp)

    def _stage(self, run: _Run, sp: StagePlan) -> None:
        began = self.rt.clock()
        self._journal(run, journal.STAGE_START, stage=sp.name)
        self._emit(run, STAGE_START, stage=sp.name,
                   data={"batches": len(sp.batches), "hosts": len(sp.hosts), "enforce": sp.enforce})
        budget = self._budget_for(run, sp)
        for bp in sp.batches:
            if run.past is not None and (sp.name, bp.index) in run.past.batches_done:
                run.enabled.update(h for h in bp.fqdns if h not in run.excluded)
                continue
            self._batch(run, sp, bp, budget)
        if not run.dry_run:
            self._stage_gate(run, sp, budget)
        self._journal(run, journal.STAGE_DONE, stage=sp.name)
        run.stages_done.append(sp.name)
        run.stage_seconds.append((sp.name, self.rt.clock() - began))
        self._emit(run, STAGE_END, stage=sp.name, state="done",
                   data={"seconds": round(self.rt.clock() - began, 1)})

    def _budget_for(self, run: _Run, sp: StagePlan) -> _Budget:
        budget = _Budget(max_unreachable=sp.max_unreachable, max_ipsec=sp.max_ipsec_failures)
        if run.past is not None:
            for rec in _past_records(self.rt.state_dir, run.run_id, journal.BATCH_DONE):
                if rec.get("stage") == sp.name:
                    budget.unreachable.update(rec.get("unreachable", []))
                    budget.ipsec.update(rec.get("ipsec_failed", []))
                    run.excluded.update(rec.get("excluded", []))
        return budget

    def _batch(self, run: _Run, sp: StagePlan, bp: BatchPlan, budget: _Budget) -> None:
        self._journal(run, journal.BATCH_START, stage=sp.name, batch=bp.index)
        self._emit(run, BATCH_START, stage=sp.name, batch=bp.index, data={"hosts": list(bp.fqdns)})
        hosts = [h for h in bp.hosts if h.fqdn not in run.excluded]
        ready = self._preflight(run, sp, bp, hosts, budget)
        if run.dry_run:
            self._dry_run_batch(run, sp, bp, ready)
            return
        todo = self._idempotence(run, sp, bp, ready)
        unchanged = not todo
        failed: set[str] = set()
        for phase in ("snapshot", "install", "load"):
            todo = self._phase(run, sp, bp, todo, phase, budget, failed)
        alive = [h for h in ready if h.fqdn not in failed]
        self._initiate(run, sp, bp, alive, changed={h.fqdn for h in todo}, budget=budget, failed=failed)
        run.enabled.update(h.fqdn for h in alive if h.fqdn not in failed)
        gate = self._batch_gate(run, sp, bp, failed, unchanged=unchanged)
        budget.ipsec.update(gate.ipsec_failed)
        budget.unreachable.update(gate.unreachable)
        self._settle_batch(run, sp, bp, budget, failed | set(gate.ipsec_failed) | set(gate.unreachable), gate)

    def _settle_batch(self, run: _Run, sp: StagePlan, bp: BatchPlan, budget: _Budget, bad: set[str],
                      gate: GateResult) -> None:
        over = budget.over()
        if over or (not gate.passed and not bad):
            why = over or "; ".join(gate.failing[:10]) or "gate failed"
            self._fail_batch(run, sp, [bp], why)
        if bad:
            self._rollback_hosts(run, sp, bp, sorted(bad & set(bp.fqdns)), verify=True)
            run.excluded.update(bad)
            run.enabled.difference_update(bad)
        self._journal(run, journal.BATCH_DONE, stage=sp.name, batch=bp.index,
                      unreachable=sorted(budget.unreachable), ipsec_failed=sorted(budget.ipsec),
                      excluded=sorted(run.excluded))
        self._emit(run, BATCH_END, stage=sp.name, batch=bp.index, state="done",
                   data={"excluded": sorted(bad)})

    def _fail_batch(self, run: _Run, sp: StagePlan, batches: list[BatchPlan], why: str) -> None:
        """Roll back `batches` (latest first), verify, then raise per the stage's on_failure."""
        for bp in reversed(batches):
            self._rollback_hosts(run, sp, bp, list(bp.fqdns), verify=True)
            self._journal(run, journal.BATCH_ROLLED_BACK, stage=sp.name, batch=bp.index,
                          hosts=list(bp.fqdns))
        where = f"stage {sp.name!r}" + (f" batch {batches[0].index}" if len(batches) == 1 else "")
        if sp.stage.on_failure == "pause":
            raise errors.GateFailedPaused(
                f"{where}: {why}; the batch was rolled back and the run is paused",
                hint=f"investigate, then `ipsec-rollout resume {run.run_id}` retries it, or "
                     f"`ipsec-rollout rollback {run.run_id}` undoes the run")
        raise errors.GateFailedRolledBack(
            f"{where}: {why}; the batch was rolled back and the run stopped",
            hint=f"`ipsec-rollout rollback {run.run_id}` undoes the earlier stages too")

    # -------------------------------------------------------------------------- phases
    def _preflight(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan],
                   budget: _Budget) -> list[HostPlan]:
        """Read-only checks; refuses latched hosts and failed preflights before any change."""
        results = self._each(run, sp, hosts, lambda h: self._steps(run, sp, bp, h, h.preflight, "preflight"))
        ready, latched, problems = [], [], []
        for hp, out in zip(hosts, results, strict=True):
            if out.unreachable:
                budget.unreachable.add(hp.fqdn)
                run.excluded.add(hp.fqdn)
                self._host(run, sp, bp, hp.fqdn, HostState.UNREACHABLE, out.detail)
                continue
            verdict = steps.parse_preflight(out.stdout)
            if verdict.latched:
                latched.append(hp.fqdn)
            elif not out.ok:
                problems.append(f"{hp.fqdn}: preflight did not complete: {out.detail}")
            elif not verdict.ok:
                problems.append(f"{hp.fqdn}: {'; '.join(verdict.problems)}")
            else:
                for warning in verdict.warnings:
                    self._emit(run, WARNING, stage=sp.name, batch=bp.index, host=hp.fqdn, message=warning)
                ready.append(hp)
        if latched:
            raise errors.HostLatchedError(
                f"refusing latched host(s) (ipsec-kill): {', '.join(sorted(latched))}",
                hint="lift the latch with `ipsec-kill --rearm --host H` once the incident is over")
        if problems:
            raise errors.PreflightError("preflight failed, nothing was changed in this batch:\n  "
                                        + "\n  ".join(problems), hint="fix the hosts, then resume the run")
        if len(budget.unreachable) > budget.max_unreachable:
            raise errors.UnreachableError(budget.over(), hint="nothing was changed in this batch; "
                                          f"`ipsec-rollout resume {run.run_id}` once they are back")
        return ready

    def _idempotence(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan]) -> list[HostPlan]:
        """The hosts that need changing. A host with steps journaled in this batch is mid-change
        (resume): it is not re-checked, its remaining steps run."""
        def check(hp: HostPlan) -> bool:
            if run.past is not None and any(k[:3] == (sp.name, bp.index, hp.fqdn)
                                            for k in run.past.steps_done):
                return True
            rendered = self._render(hp)
            out = self._steps(run, sp, bp, hp, steps.check_current_steps(rendered), "check")
            return not (out.ok and steps.parse_current(out.stdout).unchanged(rendered))

        needs = self._each(run, sp, hosts, check)
        todo = []
        for hp, need in zip(hosts, needs, strict=True):
            if need:
                todo.append(hp)
            else:
                self._host(run, sp, bp, hp.fqdn, HostState.UNCHANGED)
                self._journal(run, journal.HOST_DONE, stage=sp.name, batch=bp.index, host=hp.fqdn,
                              outcome="unchanged")
        return todo

    def _phase(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan], phase: str,
               budget: _Budget, failed: set[str]) -> list[HostPlan]:
        results = self._each(run, sp, hosts, lambda h: self._steps(run, sp, bp, h, getattr(h, phase), phase))
        alive = []
        for hp, out in zip(hosts, results, strict=True):
            if phase == "snapshot" and out.ok:
                run.changed.add((sp.name, hp.fqdn))
                self._journal(run, journal.HOST_DONE, stage=sp.name, batch=bp.index, host=hp.fqdn,
                              outcome="changed")
            if out.ok:
                alive.append(hp)
                continue
            failed.add(hp.fqdn)
            (budget.unreachable if out.unreachable else budget.ipsec).add(hp.fqdn)
            state = HostState.UNREACHABLE if out.unreachable else HostState.FAILED
            self._host(run, sp, bp, hp.fqdn, state, f"{phase}: {out.detail}")
        return alive

    def _initiate(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan], *,
                  changed: set[str], budget: _Budget, failed: set[str]) -> None:
        """Batch hosts that changed initiate; so do earlier hosts whose peer this batch enabled."""
        jobs: list[tuple[str, tuple[Step, ...]]] = [(h.fqdn, h.initiate) for h in hosts
                                                     if h.fqdn in changed and h.initiate]
        if changed:
            jobs += [(pa.host, pa.steps) for pa in bp.peer_actions
                     if pa.host in run.enabled and pa.host not in run.excluded]
        results = self._each(run, sp, jobs, lambda j: self._host_steps(run, sp, bp, j[0], j[1], "initiate"))
        for (fqdn, _), out in zip(jobs, results, strict=True):
            if out.unreachable and fqdn in bp.fqdns:
                failed.add(fqdn)
                budget.unreachable.add(fqdn)
                self._host(run, sp, bp, fqdn, HostState.UNREACHABLE, f"initiate: {out.detail}")
            elif not out.ok:
                # Not a verdict: start_action=start may already be negotiating the same SA (a race
                # that makes `swanctl --initiate` fail), and the peer may still be loading. The gate,
                # which waits for every SA up to its timeout, decides.
                self._emit(run, WARNING, stage=sp.name, batch=bp.index, host=fqdn,
                           message=f"initiate failed (the gate decides): {out.detail}")
        for hp in hosts:
            if hp.fqdn in changed and hp.fqdn not in failed:
                self._host(run, sp, bp, hp.fqdn, HostState.CHANGED)

    def _dry_run_batch(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan]) -> None:
        for hp in self._idempotence(run, sp, bp, hosts):
            mutating = [s.name for s in hp.steps if s.mutating]
            self._host(run, sp, bp, hp.fqdn, HostState.WOULD_CHANGE, ", ".join(mutating))
        run.enabled.update(h.fqdn for h in hosts)

    # -------------------------------------------------------------------------- steps
    def _steps(self, run: _Run, sp: StagePlan, bp: BatchPlan, hp: HostPlan, seq: Iterable[Step],
               phase: str) -> _StepOutcome:
        return self._host_steps(run, sp, bp, hp.fqdn, tuple(seq), phase)

    def _host_steps(self, run: _Run, sp: StagePlan, bp: BatchPlan, fqdn: str, seq: tuple[Step, ...],
                    phase: str) -> _StepOutcome:
        """Run `seq` on one host in order, stopping at the first failure. Journaled steps are
        skipped (resume); in dry-run, mutating steps are not run."""
        host = self.fleet.host(fqdn)
        last = _StepOutcome(ok=True)
        failed: _StepOutcome | None = None  # initiate keeps going: each SA is its own nudge
        for index, step in enumerate(seq):
            key = f"{phase}:{index}:{step.name}"
            if run.past is not None and run.past.step_done(sp.name, bp.index, fqdn, key):
                continue
            if run.dry_run and step.mutating:
                continue
            self._emit(run, HOST, stage=sp.name, batch=bp.index, host=fqdn, state=phase, message=step.name)
            last = self._run_step(run, host, step)
            if step.mutating:
                self._journal(run, journal.STEP, stage=sp.name, batch=bp.index, host=fqdn, step=key,
                              ok=last.ok)
            if not last.ok and (phase != "initiate" or last.unreachable):
                return last
            failed = failed if last.ok else last
        return failed or last

    def _run_step(self, run: _Run, host: Host, step: Step) -> _StepOutcome:
        self._check_stop()
        self._heartbeat(run)
        try:
            res = self._transport_run(host, step)
        except errors.HostUnreachable as exc:
            out = _StepOutcome(ok=False, unreachable=True, detail=exc.message)
        except errors.TransportError as exc:  # CommandTimeout: it ran, maybe partly
            out = _StepOutcome(ok=False, detail=exc.message)
        else:
            detail = "" if res.ok else f"exit {res.exit_code}: {_tail(res.stderr or res.stdout)}"
            out = _StepOutcome(ok=res.ok, stdout=res.stdout, detail=detail)
        if step.mutating and run.audit is not None:
            run.audit.record(host.fqdn, step.name, "ok" if out.ok else "failed", out.detail)
        return out

    def _transport_run(self, host: Host, step: Step) -> CommandResult:
        """Read-only steps are retried once on a transport error; mutating ones never are. A step
        gets at least the host's `ssh.command_timeout` (the inventory's bound for slow hosts)."""
        timeout = max(step.timeout, host.ssh.command_timeout)
        try:
            return self.rt.transport.run(host, step.command, timeout=timeout, stdin=step.stdin)
        except errors.TransportError:
            if step.mutating:
                raise
        return self.rt.transport.run(host, step.command, timeout=timeout, stdin=step.stdin)

    def _check_stop(self) -> None:
        for flag in self.rt.stop_flags:
            record = _read_flag(flag)
            if record is not None:
                raise errors.KilledDuringApply(
                    f"ipsec-kill requested a stop ({record.get('who', 'unknown')}, "
                    f"{record.get('when', '?')}: {record.get('reason', '')})",
                    hint=f"the kill switch owns the fleet now; {flag} is cleared by `ipsec-kill --rearm`")

    def _heartbeat(self, run: _Run) -> None:
        if run.lock is None:
            return
        now = self.rt.clock()
        with run.guard:
            if now - run.last_refresh < min(30.0, run.lock.ttl / 4):
                return
            run.last_refresh = now
        run.lock.refresh()

    # -------------------------------------------------------------------------- gates
    def _batch_gate(self, run: _Run, sp: StagePlan, bp: BatchPlan, failed: set[str], *,
                    unchanged: bool) -> GateResult:
        """The stage's full gate. A batch that changed nothing (a re-run) is still checked, but not
        soaked or rekeyed again: a 2 h soak per untouched batch would make re-runs unusable."""
        focus = set(bp.fqdns) - failed - run.excluded
        pairs = self._pairs_touching(focus, run)
        gates = _wait_and_probe(sp.stage.gates) if unchanged else sp.stage.gates
        return self._gate(run, sp, bp.index, pairs, gates, focus)

    def _stage_gate(self, run: _Run, sp: StagePlan, budget: _Budget) -> None:
        """Every pair with both ends enabled (cumulative), without the soak: each batch had it."""
        focus = set(sp_hosts(sp)) - run.excluded
        pairs = self._pairs_touching(set(run.enabled), run)
        gates = _wait_and_probe(sp.stage.gates)
        gate = self._gate(run, sp, None, pairs, gates, focus)
        budget.ipsec.update(gate.ipsec_failed)
        budget.unreachable.update(gate.unreachable)
        if not gate.passed or budget.over():
            done = [b for b in sp.batches if b.fqdns]
            self._fail_batch(run, sp, done, budget.over() or "; ".join(gate.failing[:10]))

    def _pairs_touching(self, hosts: set[str], run: _Run) -> list[Pair]:
        live = run.enabled - run.excluded
        found = {(p.a, p.b): p for h in hosts for p in self._by_host.get(h, ())
                 if p.a in live and p.b in live}
        return [found[k] for k in sorted(found)]

    def _gate(self, run: _Run, sp: StagePlan, batch: int | None, pairs: list[Pair], gates: Gates,
              focus: set[str]) -> GateResult:
        began = self.rt.clock()
        if not pairs:
            self._emit(run, GATE, stage=sp.name, batch=batch, state="passed", message="no pair to check")
            return GateResult(passed=True)
        result = Gate(_GateIO(self, run, sp.name, batch), pairs, focus).run(gates)
        result = replace(result, seconds=self.rt.clock() - began)
        self._journal(run, journal.GATE, stage=sp.name, batch=batch, passed=result.passed,
                      failing=list(result.failing[:20]))
        self._emit(run, GATE, stage=sp.name, batch=batch, state="passed" if result.passed else "failed",
                   message="; ".join(result.failing[:5]),
                   data={"samples": result.samples, "seconds": round(result.seconds, 1),
                         "pairs": len(pairs)})
        return result

    def collect(self, hosts: Iterable[str]) -> dict[str, health.HostObservation]:
        """One health observation per host (collect.sh over the transport), in parallel."""
        names = sorted(set(hosts))

        def one(fqdn: str) -> health.HostObservation:
            # Read-only, so retried once: one slow answer (a loaded control host, a busy guest)
            # must not make a host "unreachable" and burn the failure budget.
            for attempt in (1, 2):
                try:
                    res = self.rt.transport.run(self.fleet.host(fqdn), "sh -s",
                                                timeout=self.rt.collect_timeout, stdin=self._collect)
                except errors.TransportError as exc:
                    if attempt == 2:
                        return health.unreachable_observation(fqdn, exc.message)
                    continue
                return health.parse_collect(res.stdout, host=fqdn)
            raise AssertionError("unreachable")

        return dict(zip(names, pool(one, names, 32), strict=True))

    def run_on(self, run: _Run, fqdn: str, command: str, *, timeout: float = 60.0) -> CommandResult | None:
        """A read-only or gate command (probe, rekey); None when the host is unreachable."""
        self._check_stop()
        try:
            return self.rt.transport.run(self.fleet.host(fqdn), command, timeout=timeout)
        except errors.TransportError:
            return None

    # -------------------------------------------------------------------------- rollback
    def _rollback_hosts(self, run: _Run, sp: StagePlan, bp: BatchPlan, fqdns: list[str], *,
                        verify: bool) -> None:
        """Restore the snapshot on every changed host of `fqdns`, terminate their peers' SAs towards
        them, verify. Raises errors.RollbackFailed (loud) when any of it fails."""
        changed = [h for h in bp.hosts if h.fqdn in fqdns and self._was_changed(run, sp, bp, h.fqdn)]
        if not changed:
            return
        names = [h.fqdn for h in changed]
        self._emit(run, ROLLBACK, stage=sp.name, batch=bp.index, state="start", data={"hosts": names})
        for fqdn in names:
            self._host(run, sp, bp, fqdn, None, "rolling back", event_state="rolling-back")
        run.enabled.difference_update(names)
        problems = self._restore(run, sp, bp, changed)
        problems += self._terminate_peers(run, sp, bp, names)
        if verify and not problems:
            problems += self._verify_rollback(run, sp, names)
        for fqdn in names:
            state = HostState.ROLLBACK_FAILED if any(p.startswith(fqdn) for p in problems) or problems \
                else HostState.ROLLED_BACK
            self._host(run, sp, bp, fqdn, state)
        self._emit(run, ROLLBACK, stage=sp.name, batch=bp.index, state="failed" if problems else "done",
                   message="; ".join(problems[:5]))
        if problems:
            self._journal(run, journal.GATE, stage=sp.name, batch=bp.index, rollback_failed=problems[:20])
            raise errors.RollbackFailed(
                "ROLLBACK FAILED - the fleet is NOT as it was before this batch:\n  " + "\n  ".join(problems),
                hint=f"fix these hosts by hand (snapshots in {steps.snapshot_dir(run.run_id)}), or stop "
                     "IPsec on them with `ipsec-kill --host H`")

    def _was_changed(self, run: _Run, sp: StagePlan, bp: BatchPlan, fqdn: str) -> bool:
        earlier = run.past is not None and fqdn in run.past.changed.get(sp.name, [])
        return earlier or (sp.name, fqdn) in run.changed

    def _restore(self, run: _Run, sp: StagePlan, bp: BatchPlan, hosts: list[HostPlan]) -> list[str]:
        results = self._each(run, sp, hosts, lambda h: self._plain_steps(run, h.fqdn, h.restore))
        return [f"{h.fqdn}: restore failed: {out.detail}" for h, out in zip(hosts, results, strict=True)
                if not out.ok]

    def _terminate_peers(self, run: _Run, sp: StagePlan, bp: BatchPlan, gone: list[str]) -> list[str]:
        """Peers that stay enabled drop their SAs towards the rolled-back hosts."""
        jobs: dict[str, list[Connection]] = {}
        for fqdn in gone:
            for pair in self._by_host.get(fqdn, ()):
                peer = pair.peer_of(fqdn)
                if peer in gone or peer not in run.enabled:
                    continue
                jobs.setdefault(peer, []).extend(
                    Connection(local=peer, peer=fqdn, family=f, initiator=pair.initiator == peer)
                    for f in pair.families)
        items = sorted(jobs.items())

        def terminate(item: tuple[str, list[Connection]]) -> _StepOutcome:
            peer, conns = item
            hp = run.plan.host(peer)
            rendered = self._render(hp) if hp else self._render_plain(peer)
            return self._plain_steps(run, peer, steps.unload_steps(rendered, conns))

        results = self._each(run, sp, items, terminate)
        enforcing = sorted(peer for peer, _ in items if (hp := run.plan.host(peer)) and hp.enforce)
        if enforcing:
            self._warn(f"{len(enforcing)} enforcing peer(s) ({', '.join(enforcing[:5])}) dropped their trap "
                       f"policies towards {', '.join(gone[:5])}, but their swanctl config still names "
                       "them: a strongSwan reload or restart there holds that traffic again until the "
                       "hosts are fixed and applied, or the run is rolled back")
        return [f"{peer}: terminating SAs towards rolled-back hosts failed: {out.detail}"
                for (peer, _), out in zip(items, results, strict=True) if not out.ok]

    def _verify_rollback(self, run: _Run, sp: StagePlan, gone: list[str]) -> list[str]:
        """Every pair between a rolled-back host and a peer is either gone on both ends or fully
        healthy (the snapshot had it too); pairs among the remaining hosts still pass."""
        pairs = sorted({p for h in gone for p in self._by_host.get(h, ())
                        if p.peer_of(h) in run.enabled or p.peer_of(h) in gone})
        deadline = self.rt.clock() + max(30.0, self.rt.poll_interval * 5)
        while True:
            obs = self.collect({x for p in pairs for x in (p.a, p.b)})
            problems = [msg for p in pairs for msg in _half_open(obs, p)]
            if not problems or self.rt.clock() >= deadline:
                return problems
            self.rt.sleep(self.rt.poll_interval)

    def _plain_steps(self, run: _Run, fqdn: str, seq: Iterable[Step]) -> _StepOutcome:
        """Steps outside the journal's forward bookkeeping (rollback, teardown peers): always run."""
        host = self.fleet.host(fqdn)
        out = _StepOutcome(ok=True)
        for step in seq:
            out = self._run_step(run, host, step)
            if not out.ok:
                return out
        return out

    def _undo_stages(self, run: _Run, names: list[str]) -> None:
        by_name = {s.name: s for s in run.plan.stages}
        for name in names:
            sp = by_name[name]
            changed = set(run.past.changed.get(name, [])) if run.past else set()
            self._emit(run, STAGE_START, stage=name, data={"rollback": True, "hosts": sorted(changed)})
            for bp in reversed(sp.batches):
                targets = [h for h in bp.fqdns if h in changed]
                if targets:
                    self._rollback_hosts(run, sp, bp, targets, verify=True)
            self._journal(run, journal.STAGE_UNDONE, stage=name)
            self._emit(run, STAGE_END, stage=name, state="rolled-back")
            run.stages_done.append(name)

    # -------------------------------------------------------------------------- teardown
    def _backward(self, run: _Run, selected: list[str]) -> None:
        for sp in reversed(run.plan.stages):
            if sp.name not in selected:
                continue
            if run.past is not None and sp.name in run.past.stages_done:
                run.enabled.difference_update(sp_hosts(sp))
                continue
            began = self.rt.clock()
            self._journal(run, journal.STAGE_START, stage=sp.name)
            self._emit(run, STAGE_START, stage=sp.name, data={"teardown": True, "hosts": len(sp.hosts)})
            budget = self._budget_for(run, sp)
            for bp in reversed(sp.batches):
                if run.past is not None and (sp.name, bp.index) in run.past.batches_done:
                    run.enabled.difference_update(bp.fqdns)
                    continue
                self._teardown_batch(run, sp, bp, budget)
            self._journal(run, journal.STAGE_DONE, stage=sp.name)
            run.stages_done.append(sp.name)
            run.stage_seconds.append((sp.name, self.rt.clock() - began))
            self._emit(run, STAGE_END, stage=sp.name, state="removed")

    def _teardown_batch(self, run: _Run, sp: StagePlan, bp: BatchPlan, budget: _Budget) -> None:
        self._journal(run, journal.BATCH_START, stage=sp.name, batch=bp.index)
        self._emit(run, BATCH_START, stage=sp.name, batch=bp.index, data={"hosts": list(bp.fqdns)})
        hosts = list(bp.hosts)
        if run.dry_run:
            for hp in hosts:
                self._host(run, sp, bp, hp.fqdn, HostState.WOULD_CHANGE, "teardown")
            return
        failed: set[str] = set()
        todo = self._phase(run, sp, bp, hosts, "snapshot", budget, failed)
        removal = [replace(h, install=steps.teardown_steps(self._render(h))) for h in todo]
        gone = self._phase(run, sp, bp, removal, "install", budget, failed)
        run.enabled.difference_update(bp.fqdns)
        problems = self._terminate_peers(run, sp, bp, [h.fqdn for h in gone])
        verdict = [] if problems else self._verify_rollback(run, sp, [h.fqdn for h in gone])
        if failed or problems or verdict or budget.over():
            run.enabled.update(bp.fqdns)
            why = (budget.over() or "; ".join((problems + verdict)[:10])
                   or f"failed: {', '.join(sorted(failed))}")
            self._fail_batch(run, sp, [bp], f"teardown {why}")
        for hp in gone:
            self._host(run, sp, bp, hp.fqdn, HostState.REMOVED)
        gate = self._gate(run, sp, bp.index, self._pairs_touching(_peers_of(self._by_host, bp.fqdns), run),
                          _wait_and_probe(sp.stage.gates), set())
        if not gate.passed:
            run.enabled.update(bp.fqdns)
            self._fail_batch(run, sp, [bp], "teardown broke remaining pairs: " + "; ".join(gate.failing[:5]))
        self._journal(run, journal.BATCH_DONE, stage=sp.name, batch=bp.index, unreachable=[],
                      ipsec_failed=[], excluded=[])
        self._emit(run, BATCH_END, stage=sp.name, batch=bp.index, state="removed")

    # -------------------------------------------------------------------------- helpers
    def _latch_sweep(self, run: _Run, stage_names: Iterable[str]) -> None:
        """Refuse the whole run up front when any of its hosts is latched off by ipsec-kill."""
        wanted = set(stage_names)
        hosts = sorted({h.fqdn for s in run.plan.stages if s.name in wanted for h in s.hosts})
        if run.kind in ("rollback", "teardown") or not hosts:
            return
        command = f"if [ -e {steps.q(steps.LATCH)} ]; then echo latched; fi"
        answers = pool(lambda f: self.run_on(run, f, command, timeout=self.rt.collect_timeout), hosts, 32)
        latched = [f for f, res in zip(hosts, answers, strict=True)
                   if res is not None and "latched" in res.stdout]
        if latched:
            raise errors.HostLatchedError(
                f"refusing to run: {len(latched)} host(s) latched off by ipsec-kill: {', '.join(latched)}",
                hint="lift the latch with `ipsec-kill --rearm --host H` once the incident is over")

    def _render(self, hp: HostPlan) -> RenderedHost:
        key = (hp.fqdn, hp.enforce)
        if key not in self._rendered:
            rendered = render_host(self.fleet, self._by_host.get(hp.fqdn, ()), hp.fqdn, enforce=hp.enforce)
            if tuple(sorted(steps.expected_digests(rendered).items())) != tuple(sorted(hp.digests)):
                raise errors.PlanStaleError(f"{hp.fqdn}: the plan's files differ from what the inventory "
                                            "renders now", hint="re-create the plan")
            self._rendered[key] = rendered
        return self._rendered[key]

    def _render_plain(self, fqdn: str) -> RenderedHost:
        return render_host(self.fleet, self._by_host.get(fqdn, ()), fqdn)

    def _hosts_before(self, plan: Plan, first: str | None) -> list[str]:
        """Hosts of the stages before `first` (None: all stages)."""
        out: list[str] = []
        for sp in plan.stages:
            if sp.name == first:
                break
            out.extend(sp_hosts(sp))
        return out

    def _hosts_done(self, past: journal.JournalState, plan: Plan) -> set[str]:
        changed = {h for hosts in past.changed.values() for h in hosts}
        return changed | set(self._hosts_before(plan, str((past.start.get("stages") or [None])[0])))

    def _each(self, run: _Run, sp: StagePlan, items: Sequence[T], fn: Callable[[T], _R]) -> list[_R]:
        return pool(fn, items, sp.stage.parallelism)

    def _host(self, run: _Run, sp: StagePlan, bp: BatchPlan, fqdn: str, state: HostState | None,
              detail: str = "", *, event_state: str | None = None) -> None:
        if state is not None:
            with run.guard:
                run.outcomes.append(HostOutcome(fqdn=fqdn, stage=sp.name, batch=bp.index, state=state,
                                                detail=detail))
        self._emit(run, HOST, stage=sp.name, batch=bp.index, host=fqdn,
                   state=event_state or (state.value if state else None), message=detail)

    def _journal(self, run: _Run, type_: str, **fields: Any) -> None:
        if run.jrnl is not None:
            run.jrnl.append(type_, **fields)

    def _emit(self, run: _Run, kind: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):  # a broken reporter must never break a rollout
            self.rt.reporter.emit(Event(kind=kind, run_id=run.run_id, time=self.rt.clock(), **fields))

    def _warn(self, message: str) -> None:
        if self.rt.warn is not None:
            self.rt.warn(message)


_R = TypeVar("_R")


def _wait_and_probe(gates: Gates) -> Gates:
    """The gate without its soak and forced rekey: for checks after the soak was already done."""
    return replace(gates, soak=0.0, samples=0, rekey=False)


# ================================================================================================
# The gate's view of a run
# ================================================================================================
class _GateIO:
    """`gates.GateIO` for one gate of one run."""

    def __init__(self, ex: Executor, run: _Run, stage: str, batch: int | None) -> None:
        self._ex, self._run, self._stage, self._batch = ex, run, stage, batch
        self.fleet = ex.fleet
        self.poll_interval = ex.rt.poll_interval

    def clock(self) -> float:
        return self._ex.rt.clock()

    def sleep(self, seconds: float) -> None:
        self._ex.rt.sleep(seconds)

    def checkpoint(self) -> None:
        self._ex._check_stop()
        self._ex._heartbeat(self._run)  # a long soak must not let the lock go stale

    def collect(self, hosts: Iterable[str]) -> dict[str, health.HostObservation]:
        return self._ex.collect(hosts)

    def run_on(self, fqdn: str, command: str, *, timeout: float = 60.0) -> CommandResult | None:
        return self._ex.run_on(self._run, fqdn, command, timeout=timeout)

    def sampled(self, sample: int, pairs: int, bad: int) -> None:
        self._ex._emit(self._run, GATE, stage=self._stage, batch=self._batch, state="sample",
                       data={"sample": sample, "pairs": pairs, "bad": bad})

    def warn(self, message: str) -> None:
        self._ex._emit(self._run, WARNING, stage=self._stage, batch=self._batch, message=message)


# ================================================================================================
# Module helpers
# ================================================================================================
def sp_hosts(sp: StagePlan) -> list[str]:
    return [h.fqdn for b in sp.batches for h in b.hosts]


def _peers_of(by_host: Mapping[str, tuple[Pair, ...]], fqdns: Iterable[str]) -> set[str]:
    return {p.peer_of(h) for h in fqdns for p in by_host.get(h, ())}


def _half_open(obs: Mapping[str, health.HostObservation], pair: Pair) -> list[str]:
    """A pair after a rollback must be fully up (the snapshot had it) or gone on both ends."""
    ph = health.judge_pair(obs[pair.a], obs[pair.b], pair)
    if ph.ok:
        return []
    out = []
    for fam in pair.families:
        conn_a, conn_b = health.pair_connections(pair, fam)
        active = [end for end, conn in ((pair.a, conn_a), (pair.b, conn_b))
                  if any(c.active for c in obs[end].children(conn.name))]
        unreachable = [h for h in (pair.a, pair.b) if not obs[h].reachable]
        if unreachable:
            out.append(f"{unreachable[0]}: unreachable, cannot verify the rollback")
        elif active:
            out.append(f"{active[0]}: {conn_a.name if active[0] == pair.a else conn_b.name} still has an "
                       "active CHILD_SA after rollback")
    return out


def _read_flag(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"who": "unknown", "reason": f"unreadable stop flag {path}"}
    return data if isinstance(data, dict) else {"who": "unknown", "reason": str(data)}


def _operator() -> str:
    from rollout.lock import current_owner

    user, host, _ = current_owner()
    return f"{user}@{host}"


def _past_records(state_dir: Path, run_id: str, type_: str) -> list[dict[str, Any]]:
    path = journal.journal_path(state_dir, run_id)
    return [r for r in journal.read_records(path) if r.get("type") == type_] if path.exists() else []

