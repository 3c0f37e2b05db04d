"""Imports point one way: a pure core, one SSH module, one terminal layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rollout"
PURE = ["model", "errors", "pairing", "profiles", "render", "steps", "planner", "health"]
IO_MODULES = {"subprocess", "socket", "paramiko", "fabric", "invoke", "asyncssh", "asyncio", "typer", "rich",
              "threading"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_ssh_module_imports_paramiko_or_fabric() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in modules() if p.name != "ssh.py"
                 and {i.split(".")[0] for i in imports_of(p)} & {"paramiko", "fabric"}]
    assert offenders == []


def test_only_sshasync_module_imports_asyncssh() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in modules() if p.name != "sshasync.py"
                 and "asyncssh" in {i.split(".")[0] for i in imports_of(p)}]
    assert offenders == []


def test_only_cli_imports_typer() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in modules() if "cli" not in p.parts
                 and "typer" in {i.split(".")[0] for i in imports_of(p)}]
    assert offenders == []


@pytest.mark.parametrize("name", PURE)
def test_pure_core_has_no_io(name: str) -> None:
    path = PACKAGE / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{name}.py not written yet")
    bad = {i.split(".")[0] for i in imports_of(path)} & IO_MODULES
    assert bad == set(), f"{name} imports {bad}"


def test_core_never_imports_cli() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in modules() if "cli" not in p.parts
                 and any(i.startswith("rollout.cli") for i in imports_of(p))]
    assert offenders == []
