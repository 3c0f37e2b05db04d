"""One error hierarchy; every exit code of the tool is decided here and only here."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes. Stable: scripts and runbooks depend on them."""

    OK = 0
    FAILURE = 1  # generic, unexpected
    USAGE = 2  # bad flags (typer/click use 2 as well)
    PARTIAL = 3  # kill switch: some hosts not confirmed clean
    INVENTORY_YAML = 10
    INVENTORY_SCHEMA = 11  # unknown key, wrong type, malformed address
    INVENTORY_DUPLICATE = 12  # duplicate host or address
    INVENTORY_REFERENCE = 13  # unknown site / cluster / OS flavour
    INVENTORY_NO_ADDRESS = 14
    PAIRING_EMPTY = 15  # a pairing rule selects nothing
    PLAYBOOK_INVALID = 16
    PLAN_STALE = 17  # apply --plan FILE whose digest no longer matches
    RENDER_INVALID = 18  # profile / proposal / rekey sanity
    LOCKED = 20  # another apply holds the lock
    HOST_LATCHED = 21  # apply refused: host latched off by ipsec-kill
    PREFLIGHT_FAILED = 22
    GATE_FAILED_ROLLED_BACK = 23
    GATE_FAILED_PAUSED = 24
    ROLLBACK_FAILED = 25  # loud and distinct: the fleet is not as it was
    KILLED_DURING_APPLY = 26  # ipsec-kill made a running apply stop
    UNREACHABLE = 27
    LAB = 30
    ABORTED = 31  # operator declined a confirmation
    REFUSED = 32  # needs confirmation but no terminal and no --yes


class RolloutError(Exception):
    """Root of every error the tool reports to an operator (never shown as a traceback)."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class InputError(RolloutError):
    """Bad inventory, playbook or flags. Always raised before any host is touched."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 hint: str | None = None) -> None:
        where = ""
        if file:
            where = file
        if key:
            where = f"{where}: {key}" if where else key
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.file = file
        self.key = key


class InventoryYamlError(InputError):
    exit_code = ExitCode.INVENTORY_YAML


class InventorySchemaError(InputError):
    exit_code = ExitCode.INVENTORY_SCHEMA


class DuplicateError(InputError):
    exit_code = ExitCode.INVENTORY_DUPLICATE


class ReferenceError_(InputError):
    exit_code = ExitCode.INVENTORY_REFERENCE


class NoAddressError(InputError):
    exit_code = ExitCode.INVENTORY_NO_ADDRESS


class EmptyPairingRuleError(InputError):
    exit_code = ExitCode.PAIRING_EMPTY


class PlaybookError(InputError):
    exit_code = ExitCode.PLAYBOOK_INVALID


class RenderError(InputError):
    exit_code = ExitCode.RENDER_INVALID


class PlanStaleError(RolloutError):
    exit_code = ExitCode.PLAN_STALE


class LockedError(RolloutError):
    exit_code = ExitCode.LOCKED


class HostLatchedError(RolloutError):
    exit_code = ExitCode.HOST_LATCHED


class PreflightError(RolloutError):
    exit_code = ExitCode.PREFLIGHT_FAILED


class GateFailedRolledBack(RolloutError):
    exit_code = ExitCode.GATE_FAILED_ROLLED_BACK


class GateFailedPaused(RolloutError):
    exit_code = ExitCode.GATE_FAILED_PAUSED


class RollbackFailed(RolloutError):
    exit_code = ExitCode.ROLLBACK_FAILED


class KilledDuringApply(RolloutError):
    exit_code = ExitCode.KILLED_DURING_APPLY


class UnreachableError(RolloutError):
    exit_code = ExitCode.UNREACHABLE


class LabError(RolloutError):
    exit_code = ExitCode.LAB


class Aborted(RolloutError):
    exit_code = ExitCode.ABORTED


class Refused(RolloutError):
    exit_code = ExitCode.REFUSED


# Transport-level errors (raised by the SSH module, caught by executor / kill switch per host).
class TransportError(RolloutError):
    """A host could not be reached or a command on it did not complete."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


class HostUnreachable(TransportError):
    """TCP connect, banner, host key or authentication failed (the command never ran)."""


class HostKeyMismatch(HostUnreachable):
    """Unknown or changed host key: never auto-added."""


class CommandTimeout(TransportError):
    """The command started but did not finish within its bound."""
