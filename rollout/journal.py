"""The run journal: one append-only JSONL file per run, fsynced per record.

`<state>/runs/<run-id>/journal.jsonl`. The first record (`run-start`) carries everything needed to
carry the run on (the plan JSON, the operator, the reason, the kind of run), so `resume RUN_ID` needs
nothing else. `replay` folds the records into a `JournalState`: which stages, batches and host steps
completed, and how the run ended (None when the orchestrator died: the run is resumable).

A torn last line (the process was killed while writing it) is ignored: the record it would have held
is simply not there, and the step it describes is idempotent, so resume does it again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.errors import InputError

RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")

# record types
RUN_START = "run-start"
STAGE_START = "stage-start"
BATCH_START = "batch-start"
STEP = "step"
HOST_DONE = "host-done"
GATE = "gate"
BATCH_DONE = "batch-done"
BATCH_ROLLED_BACK = "batch-rolled-back"
STAGE_DONE = "stage-done"
STAGE_UNDONE = "stage-undone"
RUN_END = "run-end"

# run-end statuses
COMPLETED = "completed"
STOPPED = "stopped"  # gate failed, batch rolled back, run stopped
PAUSED = "paused"  # gate failed, batch rolled back, resumable
KILLED = "killed"  # the kill switch stopped it
FAILED = "failed"  # anything else (rollback failed, preflight, budgets...)
ROLLED_BACK = "rolled-back"  # `rollback RUN_ID` undid it


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise InputError(f"invalid run id {run_id!r}", key="RUN_ID",
                         hint="run ids look like 20260101T120000Z-a1b2c3 (see `ipsec-rollout runs`)")
    return run_id


def runs_dir(state_dir: Path) -> Path:
    return state_dir / "runs"


def journal_path(state_dir: Path, run_id: str) -> Path:
    return runs_dir(state_dir) / check_run_id(run_id) / "journal.jsonl"


class Journal:
    """Appends records to one run's journal; each record is on disk (fsynced) when `append` returns."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(path)
        self._seq = len(read_records(path)) if path.exists() else 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    @classmethod
    def for_run(cls, state_dir: Path, run_id: str, *, clock: Callable[[], float] = time.time) -> Journal:
        return cls(journal_path(state_dir, run_id), clock=clock)

    def append(self, type_: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            record = {"seq": self._seq, "time": round(self._clock(), 3), "type": type_, **fields}
            os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(self._fd)
            return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """A writer killed mid-record leaves a line without its newline; cut it off so the next record
    starts on a line of its own (otherwise it would be glued to the torn one and never read back)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record; a torn final line (killed mid-write) is dropped."""
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


StepKey = tuple[str, int, str, str]  # stage, batch, host, step


@dataclass(kw_only=True)
class JournalState:
    """A run as its journal tells it."""

    run_id: str
    start: dict[str, Any]
    stages_done: list[str] = field(default_factory=list)
    stages_undone: list[str] = field(default_factory=list)
    batches_done: set[tuple[str, int]] = field(default_factory=set)
    steps_done: set[StepKey] = field(default_factory=set)
    changed: dict[str, list[str]] = field(default_factory=dict)  # stage -> hosts changed, in order
    current_stage: str | None = None
    status: str | None = None  # the last run-end status; None = interrupted (resumable)
    message: str = ""
    records: int = 0
    ended: float | None = None

    @property
    def kind(self) -> str:
        return str(self.start.get("kind", "apply"))

    @property
    def started(self) -> float:
        return float(self.start.get("time", 0.0))

    def step_done(self, stage: str, batch: int, host: str, step: str) -> bool:
        return (stage, batch, host, step) in self.steps_done


def _fold(state: JournalState, rec: dict[str, Any]) -> None:
    kind = rec.get("type")
    if kind == STAGE_START:
        state.current_stage = rec["stage"]
        state.status = None
    elif kind == STEP and rec.get("ok", True):
        state.steps_done.add((rec["stage"], rec["batch"], rec["host"], rec["step"]))
    elif kind == HOST_DONE and rec.get("outcome") == "changed":
        hosts = state.changed.setdefault(rec["stage"], [])
        if rec["host"] not in hosts:
            hosts.append(rec["host"])
    elif kind == BATCH_DONE:
        state.batches_done.add((rec["stage"], rec["batch"]))
    elif kind == BATCH_ROLLED_BACK:
        _forget_batch(state, rec["stage"], rec["batch"], rec.get("hosts", []))
    elif kind == STAGE_DONE and rec["stage"] not in state.stages_done:
        state.stages_done.append(rec["stage"])
    elif kind == STAGE_UNDONE:
        _forget_stage(state, rec["stage"])
    elif kind == RUN_END:
        state.status = rec.get("status")
        state.message = rec.get("message", "")
        state.ended = rec.get("time")
    elif kind == RUN_START and state.status is not None:
        state.status = None  # a resume started again


def _forget_batch(state: JournalState, stage: str, batch: int, hosts: list[str]) -> None:
    """A rolled-back batch is as if it never ran: resume redoes it from the start."""
    state.batches_done.discard((stage, batch))
    state.steps_done = {k for k in state.steps_done if (k[0], k[1]) != (stage, batch)}
    if stage in state.changed:
        state.changed[stage] = [h for h in state.changed[stage] if h not in hosts]


def _forget_stage(state: JournalState, stage: str) -> None:
    if stage in state.stages_done:
        state.stages_done.remove(stage)
    state.stages_undone.append(stage)
    state.batches_done = {b for b in state.batches_done if b[0] != stage}
    state.steps_done = {k for k in state.steps_done if k[0] != stage}
    state.changed.pop(stage, None)


def replay(path: Path) -> JournalState:
    records = read_records(path)
    if not records or records[0].get("type") != RUN_START:
        raise InputError(f"{path}: not a run journal (no run-start record)",
                         hint="pick a run id from `ipsec-rollout runs`")
    state = JournalState(run_id=records[0]["run_id"], start=records[0], records=len(records))
    for rec in records[1:]:
        _fold(state, rec)
    return state


def load_run(state_dir: Path, run_id: str) -> JournalState:
    path = journal_path(state_dir, run_id)
    if not path.exists():
        raise InputError(f"no run {run_id} in {runs_dir(state_dir)}",
                         hint="list runs with `ipsec-rollout runs`")
    return replay(path)


def list_runs(state_dir: Path) -> Iterator[JournalState]:
    """Every run in the state dir, oldest first (unreadable journals are skipped)."""
    root = runs_dir(state_dir)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        path = child / "journal.jsonl"
        if RUN_ID_RE.match(child.name) and path.exists():
            try:
                yield replay(path)
            except (InputError, OSError, KeyError, ValueError):
                continue
