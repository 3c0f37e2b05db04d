"""Audit trail: every mutating action (operator, reason, host, action, result, run id) goes to a local
JSONL file and to syslog. Syslog is best effort: its failure never stops a rollout."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SYSLOG_ADDRESS = "/dev/log"


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    time: float
    operator: str
    reason: str
    run_id: str
    host: str
    action: str
    result: str
    detail: str = ""
    dry_run: bool = False

    def line(self) -> str:
        prefix = "DRY-RUN " if self.dry_run else ""
        return (f"{prefix}ipsec-rollout run={self.run_id} operator={self.operator} host={self.host} "
                f"action={self.action} result={self.result} reason={json.dumps(self.reason)}"
                + (f" detail={json.dumps(self.detail)}" if self.detail else ""))


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        return None  # syslog down must never disturb a rollout (or print tracebacks)


def _syslog_logger(address: str) -> logging.Logger | None:
    try:
        handler = _QuietSysLogHandler(address=address,
                                      facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
    except OSError:
        return None
    logger = logging.getLogger(f"ipsec-rollout.audit.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


class AuditLog:
    """Append-only audit file (one JSON object per line, fsynced) plus syslog."""

    def __init__(self, path: Path, *, operator: str, reason: str, run_id: str, dry_run: bool = False,
                 syslog_address: str | None = SYSLOG_ADDRESS,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.operator = operator
        self.reason = reason
        self.run_id = run_id
        self.dry_run = dry_run
        self._clock = clock
        self._lock = threading.Lock()
        self._syslog = _syslog_logger(syslog_address) if syslog_address else None

    def record(self, host: str, action: str, result: str, detail: str = "") -> AuditRecord:
        rec = AuditRecord(time=self._clock(), operator=self.operator, reason=self.reason,
                          run_id=self.run_id, host=host, action=action, result=result, detail=detail,
                          dry_run=self.dry_run)
        with self._lock:
            self._append(rec)
        self._to_syslog(rec)
        return rec

    def record_many(self, entries: list[tuple[str, str, str, str]]) -> list[AuditRecord]:
        """(host, action, result, detail) each: appended with one fsync (1,000 hosts of a kill)."""
        now = self._clock()
        recs = [AuditRecord(time=now, operator=self.operator, reason=self.reason, run_id=self.run_id,
                            host=host, action=action, result=result, detail=detail, dry_run=self.dry_run)
                for host, action, result, detail in entries]
        with self._lock:
            self._append(*recs)
        for rec in recs:
            self._to_syslog(rec)
        return recs

    def close(self) -> None:
        if self._syslog is not None:
            for handler in list(self._syslog.handlers):
                with contextlib.suppress(Exception):
                    handler.close()
                self._syslog.removeHandler(handler)

    def _append(self, *recs: AuditRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in recs).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _to_syslog(self, rec: AuditRecord) -> None:
        if self._syslog is None:
            return
        with contextlib.suppress(Exception):
            self._syslog.info(rec.line())


def read_audit(path: Path) -> list[AuditRecord]:
    """Every record in an audit file (tests, `runs`)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(AuditRecord(**json.loads(line)))
    return out
