"""Session fixture `lab`: the UML lab, booted once per test session and shared by every lab test.

Use it from any test module (tests/conftest.py loads this plugin):

    @pytest.mark.lab
    def test_something(lab):                 # LabHandle
        lab.host("cp1001").run("swanctl --list-sas")
        fleet = lab.fleet()                  # the lab inventory, loaded by rollout.inventory

    @pytest.mark.lab
    def test_other(clean_lab):               # the same handle, reset before and after the test,
                                             # holding the lab's exclusive lock meanwhile

Environment: ROLLOUT_SKIP_LAB=1 skips every lab test; ROLLOUT_KEEP_LAB=1 leaves the lab running at the
end; ROLLOUT_LAB_DIR picks the state dir. A lab that is already up (e.g. `ipsec-rollout lab up`) is
reused and left running; a lab this session booted is torn down at the end unless another session
still uses it (they hold a shared lock on <state>/.users).

Several test sessions (other people's) may share one lab: a test that changes hosts should hold
`lab.exclusive()` (clean_lab does) so that two sessions never reconfigure the same hosts at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

EXCLUSIVE_TIMEOUT = float(os.environ.get("ROLLOUT_LAB_LOCK_TIMEOUT", "1800"))
REQUIRED_TOOLS = ("linux.uml", "ip", "tcpdump", "ssh", "ssh-keygen", "pki", "busybox", "modprobe")


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run here, or None."""
    if os.environ.get("ROLLOUT_SKIP_LAB") == "1":
        return "ROLLOUT_SKIP_LAB=1"
    if os.geteuid() != 0:
        return "the UML lab needs root (network namespaces, tap devices)"
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        return f"lab tools missing: {', '.join(missing)} (see docs/lab.md)"
    return None


@dataclass(frozen=True)
class LabHandle:
    """What lab tests get: the lab, its paths, and runners for its hosts."""

    lab: Any  # rollout.lab.Lab (typed loosely so importing this plugin never needs the lab package)
    booted_here: bool

    @property
    def state_dir(self) -> Path:
        return self.lab.state_dir

    @property
    def inventory_dir(self) -> Path:
        return self.lab.inventory_dir

    @property
    def inventory_file(self) -> Path:
        return self.lab.inventory_file

    @property
    def playbook_file(self) -> Path:
        return self.lab.paths.playbook_file

    @property
    def netns(self) -> str:
        return self.lab.netns

    @property
    def hosts(self) -> dict[str, Any]:
        """LabHost runners by short name (cp1001, ...), in layout order."""
        return {h.short: h for h in self.lab.hosts}

    def host(self, name: str) -> Any:
        """A LabHost by short name, FQDN or address."""
        return self.lab.host(name)

    def fleet(self) -> Any:
        from rollout import inventory

        return inventory.load_dir(self.inventory_dir)

    @contextlib.contextmanager
    def exclusive(self, timeout: float = EXCLUSIVE_TIMEOUT) -> Iterator[LabHandle]:
        """Hold the lab alone (across test sessions) while changing its hosts."""
        with (self.state_dir / ".exclusive").open("a") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"another session held {self.state_dir}/.exclusive for {timeout:.0f} s")
                    time.sleep(1.0)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def reset(self, names: Iterable[str] | None = None) -> None:
        """No faults, no IPsec config/SAs/policies/latch, charon enabled and running."""
        from rollout.lab.reset import reset

        reset(self.lab, names)


def _hold_users_lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def _last_user(handle: Any) -> bool:
    """Trade our shared lock for an exclusive one: succeeds only if no other session holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _all_running(state_dir: Path) -> bool:
    from rollout.lab import boot, load

    if not (state_dir / "lab.json").exists():
        return False
    existing = load(state_dir)
    return all(boot.host_running(existing.paths, h.short) for h in existing.hosts)


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from rollout import lab as labmod

    state_dir = labmod.default_state_dir()
    users = _hold_users_lock(state_dir / ".users")
    was_up = True
    try:
        was_up = _all_running(state_dir)
        handle = LabHandle(lab=labmod.up(state_dir=state_dir), booted_here=not was_up)
        yield handle
        handle.lab.close()
    finally:
        keep = os.environ.get("ROLLOUT_KEEP_LAB") == "1"
        if not keep and not was_up and _last_user(users):
            labmod.down(state_dir)
        users.close()


@pytest.fixture
def clean_lab(lab: LabHandle) -> Iterator[LabHandle]:
    """The shared lab, held exclusively and reset before and after the test."""
    with lab.exclusive():
        lab.reset()
        yield lab
        lab.reset()
