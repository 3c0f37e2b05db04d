"""Run commands on a lab host: OpenSSH from inside the lab namespace, strict host-key checking.

Kept separate from rollout/ssh.py on purpose: the lab and its tests must not depend on the transport
they are used to test. Connections are multiplexed (ControlMaster/ControlPersist) because a fresh SSH
handshake costs about a second of the slow guest's CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rollout.errors import LabError
from rollout.lab.paths import LabPaths
from rollout.lab.proc import netns_argv
from rollout.lab.spec import HostSpec
from rollout.transport import CommandResult

SSH_UNREACHABLE = 255  # OpenSSH's exit code when it could not connect / authenticate


@dataclass(frozen=True, kw_only=True)
class LabHost:
    """One lab host, as seen from the machine. Cheap to copy; holds no connection itself."""

    spec: HostSpec
    paths: LabPaths
    netns: str

    @property
    def short(self) -> str:
        return self.spec.short

    @property
    def fqdn(self) -> str:
        return self.spec.fqdn

    @property
    def address(self) -> str:
        """Where the lab SSHes to (the inventory's ssh_host)."""
        return str(self.spec.ipv4)

    def _control_path(self) -> Path:
        digest = hashlib.sha1(f"{self.paths.root}:{self.address}".encode()).hexdigest()[:16]  # noqa: S324
        path = self.paths.control_dir / digest
        return path if len(str(path)) < 100 else Path("/tmp") / f"ipsec-lab-{digest}"

    def _options(self, connect_timeout: float, multiplex: bool) -> list[str]:
        options = [
            "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.paths.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-i", str(self.paths.identity),
            "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
        ]
        if multiplex:
            options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_path()}",
                        "-o", "ControlPersist=600"]
        return options

    def ssh_argv(self, command: str, *, connect_timeout: float = 20.0, multiplex: bool = True) -> list[str]:
        """The full argv (inside the namespace) that runs `command` on this host."""
        options = self._options(connect_timeout, multiplex)
        return netns_argv(self.netns, ["ssh", *options, f"root@{self.address}", command])

    def run(self, command: str, *, timeout: float = 60.0, check: bool = False, stdin: str | None = None,
            multiplex: bool = True) -> CommandResult:
        """Run a POSIX-shell command string on the host. exit_code 255 means SSH itself failed.

        With check=True a non-zero exit raises LabError. A timeout always raises LabError.
        """
        argv = self.ssh_argv(command, connect_timeout=min(timeout, 60.0), multiplex=multiplex)
        started = time.monotonic()
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                                  check=False, stdin=None if stdin is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.short}: {_brief(command)} did not finish within {timeout:.0f} s") from exc
        result = CommandResult(host=self.fqdn, exit_code=done.returncode, stdout=done.stdout,
                               stderr=_filter_noise(done.stderr), duration=time.monotonic() - started)
        if check and not result.ok:
            detail = result.stderr.strip()
            raise LabError(f"{self.short}: {_brief(command)} exited {result.exit_code}: {detail}")
        return result

    def reachable(self, *, timeout: float = 15.0) -> bool:
        """A fresh SSH connection (no multiplexing) with strict host-key checking runs `true`."""
        try:
            return self.run("true", timeout=timeout, multiplex=False).ok
        except LabError:
            return False

    def close(self) -> None:
        """Stop this host's multiplexing master, if any."""
        path = self._control_path()
        if path.exists():
            argv = ["ssh", *self._options(5, True), "-O", "exit", f"root@{self.address}"]
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(netns_argv(self.netns, argv), capture_output=True, timeout=10, check=False,
                               stdin=subprocess.DEVNULL)
            path.unlink(missing_ok=True)

    def sh(self, *words: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        """Run argv-style words (each shell-quoted) on the host."""
        return self.run(" ".join(shlex.quote(w) for w in words), timeout=timeout, check=check)


def _brief(command: str) -> str:
    one_line = " ".join(command.split())
    return repr(one_line if len(one_line) <= 100 else one_line[:97] + "...")


def _filter_noise(stderr: str) -> str:
    """Debian's strongSwan tools print 'plugin ...: failed to load' for absent plugins: harmless."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not (line.startswith("plugin '") and "failed to load" in line))
