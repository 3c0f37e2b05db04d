"""What the executor tells the outside world while it works: events and reporters.

The executor never prints. It emits `Event`s to a `Reporter`; the CLI passes a rich reporter (live
progress), tests pass a `RecordingReporter`, `--json` passes a `JsonReporter` (one JSON object per line).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

# Event kinds (the `kind` field). Host states travel in `state` on "host" events.
RUN_START = "run-start"
RUN_END = "run-end"
STAGE_START = "stage-start"
STAGE_END = "stage-end"
BATCH_START = "batch-start"
BATCH_END = "batch-end"
HOST = "host"  # a host changed state (see HOST_STATES)
STEP = "step"  # one on-host step finished
GATE = "gate"  # a gate sample or verdict
ROLLBACK = "rollback"
WARNING = "warning"

HOST_STATES = (
    "pending", "preflight", "snapshot", "install", "load", "initiate", "unchanged", "done",
    "failed", "unreachable", "rolling-back", "rolled-back", "rollback-failed", "skipped",
)


@dataclass(frozen=True, kw_only=True)
class Event:
    """One thing that happened during a run. `data` holds kind-specific JSON-able details."""

    kind: str
    run_id: str = ""
    stage: str | None = None
    batch: int | None = None
    host: str | None = None
    state: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "time": round(self.time, 3), "run_id": self.run_id}
        for key in ("stage", "batch", "host", "state"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.message:
            out["message"] = self.message
        if self.data:
            out["data"] = self.data
        return out


class Reporter(Protocol):
    """Receives events; must be thread-safe (host workers emit concurrently) and must not raise."""

    def emit(self, event: Event) -> None: ...


class NullReporter:
    def emit(self, event: Event) -> None:
        return None


class RecordingReporter:
    """Keeps every event (tests)."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def host_states(self, host: str) -> list[str]:
        return [e.state for e in self.events if e.kind == HOST and e.host == host and e.state]

    def final_states(self) -> dict[str, str]:
        """The last state each host reached."""
        out: dict[str, str] = {}
        for e in self.events:
            if e.kind == HOST and e.host and e.state:
                out[e.host] = e.state
        return out


class JsonReporter:
    """One JSON object per line on `stream` (flushed per event, so a consumer can follow it live)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        line = json.dumps(event.to_json(), sort_keys=True)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class TeeReporter:
    """Sends every event to several reporters."""

    def __init__(self, reporters: Iterable[Reporter]) -> None:
        self._reporters = tuple(reporters)

    def emit(self, event: Event) -> None:
        for reporter in self._reporters:
            reporter.emit(event)


def stamp(event: Event, clock: Any = time.time) -> Event:
    """The event with its time filled in (the executor stamps with its injected clock)."""
    if event.time:
        return event
    return Event(**{**event.__dict__, "time": float(clock())})
