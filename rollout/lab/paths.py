"""Where the lab keeps its state on the machine (keys, certificates, PIDs, consoles, inventory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/ipsec-rollout-lab"
STATE_DIR_ENV = "ROLLOUT_LAB_DIR"
NETNS_ENV = "ROLLOUT_LAB_NETNS"
OWNERS_DIR = Path("/run/ipsec-rollout-lab")  # which state dir owns which namespace (gone at reboot)


def default_state_dir() -> Path:
    """$ROLLOUT_LAB_DIR, else /var/lib/ipsec-rollout-lab."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).absolute()


def default_netns() -> str:
    """$ROLLOUT_LAB_NETNS, else ipsec-lab (a second lab on the machine needs its own namespace)."""
    return os.environ.get(NETNS_ENV) or "ipsec-lab"


@dataclass(frozen=True)
class LabPaths:
    """The state dir layout. Guests see it read-only through hostfs (mounted at /run/lab/state)."""

    root: Path

    @property
    def spec_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def users_lock(self) -> Path:
        return self.root / ".users"

    @property
    def identity(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def uml_dir(self) -> Path:
        return self.root / "uml"

    @property
    def guest_dir(self) -> Path:
        return self.root / "guest"

    @property
    def init_script(self) -> Path:
        return self.root / "init.sh"

    @property
    def inventory_dir(self) -> Path:
        return self.root / "inventory"

    @property
    def inventory_file(self) -> Path:
        return self.inventory_dir / "lab.yaml"

    @property
    def playbook_file(self) -> Path:
        return self.root / "playbooks" / "lab.yaml"

    @property
    def control_dir(self) -> Path:
        """SSH control sockets (kept short: unix socket paths are limited to ~108 bytes)."""
        return self.root / "cm"

    def host_dir(self, short: str) -> Path:
        return self.root / "hosts" / short

    def pid_file(self, short: str) -> Path:
        return self.host_dir(short) / "pid"

    def console(self, short: str) -> Path:
        return self.host_dir(short) / "console.log"

    def ctl_dir(self, short: str) -> Path:
        """Read by the guest's labd every second: faults that SSH cannot set or clear."""
        return self.host_dir(short) / "ctl"

    def faults_dir(self, short: str) -> Path:
        """The record of faults set on a host (one file per fault kind)."""
        return self.host_dir(short) / "faults"
