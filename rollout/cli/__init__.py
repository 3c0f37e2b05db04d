"""The `ipsec-rollout` command line. Thin: parse flags, call the core, print. Errors -> exit codes here."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from rollout.errors import ExitCode, RolloutError

app = typer.Typer(
    name="ipsec-rollout",
    help="Staged host-to-host IPsec rollouts (strongSwan, IKEv2, transport mode) with health gates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

# Each sub-module registers its commands on `app` when imported (keeps this file small and lets
# several people work on separate command groups).
_COMMAND_MODULES = ("inventory", "plan", "apply", "monitor", "kill", "lab", "demo")


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"rollout.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rollout.cli.{name}":
                raise


def run_guarded(func: Callable[[], Any]) -> int:
    """Run a click/typer entry point; turn every RolloutError into its message and exit code."""
    try:
        func()
    except RolloutError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        return int(ExitCode.ABORTED)
    return 0


def main() -> None:
    _register()
    sys.exit(run_guarded(lambda: app(standalone_mode=True)))
