"""ipsec-kill: the global off switch (issue 5). No terminal I/O here; the CLI prints.

Flow: `select_targets` (inventory → last-known host cache → --hosts-file; a broken inventory never stops
the kill) → `request_stop` (the STOP_FLAG a running apply checks before each step) → `run_kill` (one
SSH exec of `remote/kill.sh` per host, bounded pool, short timeouts, unreachable hosts retried in the
background until the global deadline) → `KillReport` (per-host outcomes, exit code, JSON) →
`write_report` + `audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import getpass
import heapq
import json
import logging
import logging.handlers
import os
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

from rollout import errors, hostcache
from rollout.audit import AuditLog
from rollout.errors import ExitCode
from rollout.model import Fleet, Host, SshSettings
from rollout.transport import AsyncTransport, CommandResult, Transport

STATE_DIR = Path("/var/lib/ipsec-rollout")
# The executor checks this before every step: present = stop now (errors.KilledDuringApply).
STOP_FLAG = STATE_DIR / "kill-requested"
AUDIT_LOG = STATE_DIR / "audit.jsonl"  # shared with the executor (rollout.audit)
RESULT_PREFIX = "IPSEC-KILL "
log = logging.getLogger(__name__)


class Outcome(str, Enum):
    KILLED = "killed"  # IPsec was found and is now gone; host latched
    ALREADY_CLEAN = "already-clean"  # nothing to remove; host latched
    UNREACHABLE = "unreachable"  # the script never ran (connect/host key/auth), after all retries
    FAILED = "failed"  # ran but could not confirm clean (or timed out mid-way)
    REARMED = "rearmed"  # --rearm: latch lifted

    @property
    def clean(self) -> bool:
        return self in {Outcome.KILLED, Outcome.ALREADY_CLEAN, Outcome.REARMED}


@dataclass(frozen=True, kw_only=True)
class Scope:
    """Which hosts: `all`, or every host matching any of sites / clusters / host globs."""

    all: bool = False
    sites: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # FQDN, short name or fnmatch glob

    def __post_init__(self) -> None:
        if not self.all and not (self.sites or self.clusters or self.hosts):
            raise errors.InputError("no scope given", hint="use --all, --site S, --cluster C or --host H")

    def matches(self, host: Host) -> bool:
        if self.all:
            return True
        return (host.site in self.sites or host.cluster in self.clusters
                or any(fnmatch.fnmatchcase(host.fqdn, p) or host.short == p for p in self.hosts))


@dataclass(frozen=True, kw_only=True)
class Targets:
    hosts: tuple[Host, ...]
    source: str  # where the host list came from, for the report
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class KillOptions:
    who: str
    reason: str = "ipsec-kill"
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                        + "-" + uuid.uuid4().hex[:6])
    rearm: bool = False
    parallel: int = 256
    command_timeout: float = 60.0
    deadline: float = 180.0
    retries: int = 3  # extra attempts for hosts that were unreachable
    retry_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.deadline <= 0 or self.command_timeout <= 0 or self.retries < 0:
            raise errors.InputError("--parallel, --deadline and timeouts must be positive")

    @property
    def mode(self) -> str:
        return "rearm" if self.rearm else "kill"


@dataclass(frozen=True, kw_only=True)
class HostResult:
    fqdn: str
    outcome: Outcome
    detail: str = ""
    attempts: int = 1
    duration: float = 0.0
    fields: tuple[tuple[str, str], ...] = ()  # parsed from the host's IPSEC-KILL line

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.duration < 0:
            raise ValueError(f"inconsistent HostResult for {self.fqdn}")

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.fqdn, "outcome": self.outcome.value, "detail": self.detail,
                "attempts": self.attempts, "duration_s": round(self.duration, 3), "remote": dict(self.fields)}


@dataclass(frozen=True, kw_only=True)
class KillReport:
    run_id: str
    mode: str
    who: str
    reason: str
    started: float
    finished: float
    source: str
    warnings: tuple[str, ...]
    results: tuple[HostResult, ...]

    @property
    def exit_code(self) -> ExitCode:
        clean = bool(self.results) and all(r.outcome.clean for r in self.results)
        return ExitCode.OK if clean else ExitCode.PARTIAL

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    def not_clean(self) -> tuple[HostResult, ...]:
        return tuple(r for r in self.results if not r.outcome.clean)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "ipsec-kill", "version": 1, "run_id": self.run_id, "mode": self.mode, "who": self.who,
            "reason": self.reason, "started": _iso(self.started), "finished": _iso(self.finished),
            "duration_s": round(self.finished - self.started, 3), "targets_source": self.source,
            "warnings": list(self.warnings), "exit_code": int(self.exit_code),
            "summary": {o.value: self.count(o) for o in Outcome} | {"total": len(self.results)},
            "not_clean": [r.fqdn for r in self.not_clean()],
            "hosts": [r.to_dict() for r in sorted(self.results, key=lambda r: r.fqdn)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ------------------------------------------------------------------------------------------------
# The remote script and the exact command
# ------------------------------------------------------------------------------------------------
def script() -> str:
    """The self-contained POSIX sh kill script (rollout/remote/kill.sh)."""
    return resources.files("rollout").joinpath("remote/kill.sh").read_text(encoding="utf-8")


def remote_command(options: KillOptions, body: str | None = None) -> str:
    """The exact string run on each host: `sh -c <script> ipsec-kill <mode> <who> <reason> <run-id>`."""
    return shlex.join(["sh", "-c", body if body is not None else script(), "ipsec-kill",
                       options.mode, options.who, options.reason, options.run_id])


def parse_result_line(stdout: str) -> dict[str, str] | None:
    """The last `IPSEC-KILL k=v ...` line as a dict, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        return None
    pairs = (word.partition("=") for word in lines[-1][len(RESULT_PREFIX):].split())
    return {k: v for k, sep, v in pairs if sep}


def judge(host: str, result: CommandResult, rearm: bool, attempts: int) -> HostResult:
    """Outcome of one host from its script output; claims are re-checked against the counts."""
    fields = parse_result_line(result.stdout)
    common = {"fqdn": host, "attempts": attempts, "duration": result.duration}
    if fields is None:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
        return HostResult(outcome=Outcome.FAILED, detail=f"no result line (exit {result.exit_code}): {tail}",
                          **common)  # type: ignore[arg-type]
    claimed = fields.get("result", "")
    zero = all(fields.get(k) == "0" for k in ("states", "policies", "charon"))
    expected = {"rearmed"} if rearm else {"killed", "already-clean"}
    latched_ok = fields.get("latched") == ("0" if rearm else "1")
    ok = claimed in expected and latched_ok and (rearm or zero) and result.exit_code == 0
    outcome = Outcome(claimed) if ok else Outcome.FAILED
    detail = "" if ok else _failure_detail(fields, result)
    return HostResult(outcome=outcome, detail=detail, fields=tuple(sorted(fields.items())),
                      **common)  # type: ignore[arg-type]


def _failure_detail(fields: dict[str, str], result: CommandResult) -> str:
    keys = ("result", "states", "policies", "charon", "latched", "errors")
    return " ".join(f"{k}={fields.get(k, '?')}" for k in keys) + f" exit={result.exit_code}"


# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------
def select_targets(scope: Scope, *, inventory: Path | None, hosts_file: Path | None = None,
                   cache: Path | None = None, load_inventory: Callable[[Path], Fleet] | None = None,
                   ssh_overrides: dict[str, Any] | None = None) -> Targets:
    """Hosts to act on. `--hosts-file` wins; else the inventory; else (missing or broken inventory) the
    last-known host cache, with a warning saying so."""
    warnings: list[str] = []
    if hosts_file is not None:
        listed = hostcache.read_hosts_file(hosts_file)
        return _targets(scope, listed.hosts, f"hosts file {hosts_file}", warnings, ssh_overrides)
    if inventory is not None:
        try:
            fleet = (load_inventory or _load_inventory)(inventory)
            return _targets(scope, tuple(fleet.hosts.values()), f"inventory {inventory}", warnings,
                            ssh_overrides)
        except Exception as exc:  # a broken inventory must never stop the kill
            warnings.append(f"inventory {inventory} unusable ({type(exc).__name__}: {exc}); "
                            "falling back to the last-known host list")
    cached = hostcache.load_hosts(cache)
    warnings.append(f"using the last-known host list {cached.path} (saved {cached.saved_at or 'unknown'})")
    return _targets(scope, cached.hosts, f"host cache {cached.path}", warnings, ssh_overrides)


def _load_inventory(path: Path) -> Fleet:
    from rollout import inventory  # imported lazily: a broken inventory module must not break the kill

    return inventory.load_dir(path)


def _targets(scope: Scope, hosts: Sequence[Host], source: str, warnings: list[str],
             ssh_overrides: dict[str, Any] | None) -> Targets:
    chosen = tuple(sorted((h for h in hosts if scope.matches(h)), key=lambda h: h.fqdn))
    if not chosen:
        raise errors.InputError(f"no host in {source} matches the scope",
                                hint="check --site/--cluster/--host spelling, or use --hosts-file")
    if ssh_overrides:
        chosen = tuple(_with_ssh(h, ssh_overrides) for h in chosen)
    return Targets(hosts=chosen, source=source, warnings=tuple(warnings))


def _with_ssh(host: Host, overrides: dict[str, Any]) -> Host:
    settings: SshSettings = host.ssh.merged(**overrides)
    return Host(**{**host.__dict__, "ssh": settings})


# ------------------------------------------------------------------------------------------------
# Stop flag (how a running apply learns about the kill; the kill never takes the rollout lock)
# ------------------------------------------------------------------------------------------------
def request_stop(options: KillOptions, path: Path = STOP_FLAG) -> Path | None:
    """Write the stop flag (JSON who/when/why). Best effort: a failure here must not stop the kill."""
    record = {"who": options.who, "reason": options.reason, "run_id": options.run_id,
              "when": _iso(time.time()), "pid": os.getpid()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the stop flag %s: %s", path, exc)
        return None
    return path


def stop_requested(path: Path = STOP_FLAG) -> dict[str, Any] | None:
    """For the executor: the stop record if a kill was requested (then raise KilledDuringApply)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"who": "unknown", "reason": f"unreadable stop flag {path}"}
    return data if isinstance(data, dict) else {"who": "unknown", "reason": str(data)}


def clear_stop(path: Path = STOP_FLAG) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ------------------------------------------------------------------------------------------------
# Fan-out
# ------------------------------------------------------------------------------------------------
OnResult = Callable[[HostResult], None]


@dataclass(order=True, frozen=True)
class _Job:
    ready_at: float
    fqdn: str = field(compare=True)
    attempt: int = field(compare=False, default=1)


class _Runner:
    """Bounded fan-out on one asyncio loop, fed from a retry-aware schedule, with one global deadline.

    An `AsyncTransport` (the real SSH client) runs every host on the loop itself. A blocking `Transport`
    (fakes, paramiko) runs each command in its own daemon thread: a host stuck past the deadline can
    never keep the process alive."""

    def __init__(self, hosts: Sequence[Host], transport: Transport | AsyncTransport, options: KillOptions,
                 on_result: OnResult | None) -> None:
        self.hosts = {h.fqdn: h for h in hosts}
        self.transport = transport
        self.options = options
        self.on_result = on_result
        self.command = remote_command(options)
        self.started = time.monotonic()
        self.deadline = self.started + options.deadline
        self.schedule: list[_Job] = [_Job(self.started, f) for f in self.hosts]
        heapq.heapify(self.schedule)
        self.results: dict[str, HostResult] = {}
        self.last_error: dict[str, str] = {}
        self.attempted: set[str] = set()  # hosts a command was started for (at least once)
        self.slots: asyncio.Semaphore | None = None

    def run(self) -> dict[str, HostResult]:
        return asyncio.run(self._run())

    async def _run(self) -> dict[str, HostResult]:
        self.slots = asyncio.Semaphore(self.options.parallel)
        in_flight: set[asyncio.Task[tuple[_Job, HostResult | None]]] = set()
        try:
            while len(self.results) < len(self.hosts):
                now = time.monotonic()
                while self.schedule and self.schedule[0].ready_at <= now:
                    in_flight.add(asyncio.ensure_future(self._attempt(heapq.heappop(self.schedule))))
                if now >= self.deadline or not (in_flight or self.schedule):
                    break
                wake = min(self.deadline, self.schedule[0].ready_at if self.schedule else self.deadline)
                if not in_flight:
                    await asyncio.sleep(max(wake - now, 0.001))
                    continue
                done, in_flight = await asyncio.wait(in_flight, timeout=max(wake - now, 0.001),
                                                     return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._settle(*task.result())
        finally:
            for task in in_flight:  # keep what finished right at the deadline, abandon the rest
                if task.done() and not task.cancelled() and task.exception() is None:
                    job, result = task.result()
                    if job.fqdn not in self.results:
                        self._settle(_Job(0, job.fqdn, max(job.attempt, self.options.retries + 1)), result)
                else:
                    task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await self._close_transport()
        return self._finish()

    async def _attempt(self, job: _Job) -> tuple[_Job, HostResult | None]:
        """A HostResult, or None when the host was unreachable (the command never ran)."""
        assert self.slots is not None
        async with self.slots:
            return job, await self._attempt_now(job)

    async def _attempt_now(self, job: _Job) -> HostResult | None:
        remaining = self.deadline - time.monotonic()
        host = self.hosts[job.fqdn]
        if remaining <= 0:
            self.last_error[job.fqdn] = "deadline reached before the attempt"
            return None
        self.attempted.add(job.fqdn)
        self.last_error.pop(job.fqdn, None)
        try:
            output = await self._call(host, min(self.options.command_timeout, remaining))
        except errors.HostUnreachable as exc:
            self.last_error[job.fqdn] = exc.message
            if isinstance(exc, errors.HostKeyMismatch):  # retrying cannot help; say so now
                return HostResult(fqdn=job.fqdn, outcome=Outcome.UNREACHABLE, detail=exc.message,
                                  attempts=job.attempt)
            return None
        except errors.TransportError as exc:
            return HostResult(fqdn=job.fqdn, outcome=Outcome.FAILED, detail=exc.message, attempts=job.attempt)
        except Exception as exc:  # one host's surprise must not lose the others
            return HostResult(fqdn=job.fqdn, outcome=Outcome.FAILED, attempts=job.attempt,
                              detail=f"internal error: {type(exc).__name__}: {exc}")
        return judge(job.fqdn, output, self.options.rearm, job.attempt)

    async def _call(self, host: Host, timeout: float) -> CommandResult:
        run_async = getattr(self.transport, "run_async", None)
        if run_async is not None:
            result: CommandResult = await run_async(host, self.command, timeout=timeout)
            return result
        transport = cast(Transport, self.transport)
        return await _in_daemon_thread(lambda: self._run_blocking(transport, host, timeout))

    def _run_blocking(self, transport: Transport, host: Host, timeout: float) -> CommandResult:
        try:
            return transport.run(host, self.command, timeout=timeout)
        finally:
            # One command per host: a transport that caches connections (SshTransport.release) closes
            # this one now rather than keep hundreds of idle connections (threads, wake-ups) to the end.
            release = getattr(transport, "release", None)
            if callable(release):
                with contextlib.suppress(Exception):
                    release(host)

    async def _close_transport(self) -> None:
        aclose = getattr(self.transport, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    def _settle(self, job: _Job, result: HostResult | None) -> None:
        if result is None and job.attempt <= self.options.retries:
            retry_at = time.monotonic() + self.options.retry_delay
            if retry_at < self.deadline:
                heapq.heappush(self.schedule, _Job(retry_at, job.fqdn, job.attempt + 1))
                return
        final = result or HostResult(fqdn=job.fqdn, outcome=Outcome.UNREACHABLE, attempts=job.attempt,
                                     detail=self.last_error.get(job.fqdn, "unreachable"))
        self.results[job.fqdn] = final
        if self.on_result is not None:
            self.on_result(final)

    def _finish(self) -> dict[str, HostResult]:
        for fqdn in self.hosts:
            if fqdn not in self.results:
                ran = fqdn in self.attempted and fqdn not in self.last_error
                why = "the script was still running" if ran else self.last_error.get(fqdn, "not reached")
                self._settle(_Job(0, fqdn, self.options.retries + 1), HostResult(
                    fqdn=fqdn, outcome=Outcome.FAILED if ran else Outcome.UNREACHABLE,
                    detail=f"global deadline ({self.options.deadline:g} s) reached; {why}"))
        return self.results


_T = TypeVar("_T")


async def _in_daemon_thread(call: Callable[[], _T]) -> _T:
    """Await a blocking call run in a fresh daemon thread (cancelling the await abandons the thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            value = call()
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            settle = functools.partial(deliver, functools.partial(future.set_exception, exc))
        else:
            settle = functools.partial(deliver, functools.partial(future.set_result, value))
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            loop.call_soon_threadsafe(settle)

    threading.Thread(target=target, daemon=True, name="kill-blocking").start()
    return await future


def run_kill(targets: Targets, transport: Transport | AsyncTransport, options: KillOptions, *,
             on_result: OnResult | None = None, stop_flag: Path | None = STOP_FLAG) -> KillReport:
    """Kill (or rearm) IPsec on every target host; never raises for per-host problems."""
    started = time.time()
    warnings = list(targets.warnings)
    if stop_flag is not None:
        if options.rearm:
            clear_stop(stop_flag)
        elif request_stop(options, stop_flag) is None:
            warnings.append(f"could not write the stop flag {stop_flag}: a running apply may not notice")
    results = _Runner(targets.hosts, transport, options, on_result).run()
    return KillReport(run_id=options.run_id, mode=options.mode, who=options.who, reason=options.reason,
                      started=started, finished=time.time(), source=targets.source,
                      warnings=tuple(warnings), results=tuple(results[h.fqdn] for h in targets.hosts))


# ------------------------------------------------------------------------------------------------
# Report and audit
# ------------------------------------------------------------------------------------------------
def default_report_path(run_id: str) -> Path:
    return Path.cwd() / f"ipsec-kill-{run_id}.json"


def write_report(report: KillReport, path: Path) -> Path:
    """Write the JSON report; if `path` is not writable, fall back to $HOME then /tmp (never lose it)."""
    text = report.to_json() + "\n"
    candidates = [path, Path.home() / path.name, Path("/tmp") / path.name]
    last: OSError | None = None
    for candidate in candidates:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.write_text(text, encoding="utf-8")
            return candidate
        except OSError as exc:
            last = exc
    raise errors.RolloutError(f"could not write the kill report anywhere: {last}")


def audit(report: KillReport, *, dry_run: bool = False, path: Path = AUDIT_LOG,
          report_path: Path | None = None, syslog_address: str | None = "/dev/log") -> None:
    """The run into the audit trail that `apply` writes too (`audit.AuditRecord`, one JSON object per
    line, fsynced, and syslog): one record per host (result = its outcome), then one for the run
    (host "*", result "exit N", detail = summary, hosts not clean, report path). Never raises."""
    action = "ipsec-kill --rearm" if report.mode == "rearm" else "ipsec-kill"
    entries = [(r.fqdn, action, r.outcome.value, r.detail) for r in report.results]
    summary = {"summary": report.to_dict()["summary"], "not_clean": [r.fqdn for r in report.not_clean()],
               "exit_code": int(report.exit_code), "report": str(report_path) if report_path else None,
               "pid": os.getpid()}
    entries.append(("*", action, f"exit {int(report.exit_code)}", json.dumps(summary, sort_keys=True)))
    log = AuditLog(path, operator=report.who, reason=report.reason, run_id=report.run_id, dry_run=dry_run,
                   syslog_address=syslog_address, clock=lambda: report.finished)
    try:
        with contextlib.suppress(OSError):  # an unwritable state dir must not crash a finished kill
            log.record_many(entries)
    finally:
        log.close()


def default_who() -> str:
    user = os.environ.get("SUDO_USER") or _login()
    return f"{user}@{socket.gethostname()}"


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def describe(hosts: Iterable[Host]) -> list[str]:
    """One line per target for dry runs and confirmations."""
    return [f"{h.fqdn}  ({h.connect_address}:{h.ssh.port}{' netns ' + h.ssh.netns if h.ssh.netns else ''})"
            for h in hosts]
