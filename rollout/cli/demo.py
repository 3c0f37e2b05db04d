"""`ipsec-rollout demo`: the guided tour of the main job on the built-in lab."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from rollout.cli import app
from rollout.demo import DemoOptions, Tour

console = Console()


class RichNarrator:
    def chapter(self, number: int, title: str, why: str) -> None:
        console.print()
        console.print(Panel(escape(why), title=f"[bold]{number}. {escape(title)}[/]", title_align="left"))

    def command(self, argv: Sequence[str]) -> None:
        console.print(f"[bold cyan]$ {escape(shlex.join(_short(argv)))}[/]", highlight=False)

    def output(self, text: str) -> None:
        console.print(escape(text), highlight=False, soft_wrap=True)

    def verdict(self, ok: bool, text: str) -> None:
        mark = "[bold green]PROVEN[/]" if ok else "[bold red]FAILED[/]"
        console.print(f"{mark} {escape(text)}", highlight=False)


def _short(argv: Sequence[str]) -> list[str]:
    """Show the console script by its name, as the reader would type it."""
    return [Path(argv[0]).name, *argv[1:]]


@app.command("demo")
def demo(
    keep: Annotated[bool, typer.Option("--keep", help="Leave the lab running at the end.")] = False,
    state_dir: Annotated[Path | None, typer.Option(help="Lab state dir (default: the lab's).")] = None,
    playbooks: Annotated[Path, typer.Option(help="Playbook names dir.")] = Path("playbooks"),
) -> None:
    """Boot the lab, roll IPsec out in stages with gates, prove ESP on the wire, pull the kill switch,
    prove cleartext still flows, and tear the lab down."""
    started = time.monotonic()
    evidence = Tour(DemoOptions(keep=keep, state_dir=state_dir, playbooks=playbooks),
                    RichNarrator()).run_all()
    console.print()
    console.print(f"[bold green]Demo complete[/] in {time.monotonic() - started:.0f}s: "
                  f"{len(evidence)} proofs, all passed.")
