"""Shared fixtures. The lab fixture lives in tests/lab_fixture.py (boots the UML lab once per session)."""

from pathlib import Path

pytest_plugins = ["tests.lab_fixture"] if (Path(__file__).parent / "lab_fixture.py").exists() else []
