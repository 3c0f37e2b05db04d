"""Shared fixtures. The lab fixture lives in tests/lab_fixture.py (boots the UML lab once per session)."""

pytest_plugins = ["tests.lab_fixture"]
