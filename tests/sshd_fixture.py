"""A real OpenSSH sshd in a throwaway network namespace, shared by the tests of both SSH clients.

The sshd listens on 127.0.0.1 *inside* the namespace, so the tests also prove that sockets are opened
in the namespace without moving the process. Root's shell is /bin/sh with an empty HOME there (a private
/etc/passwd bind-mounted in sshd's own mount namespace), so no shell profile runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rollout.model import Host, SshSettings

PORT = 2201


@dataclass(frozen=True)
class Sshd:
    netns: str
    dir: Path
    port: int
    client_key: Path
    known_hosts: Path

    def host(self, **ssh: object) -> Host:
        settings = SshSettings(**{"port": self.port, "identity": str(self.client_key),  # type: ignore[arg-type]
                                  "known_hosts": str(self.known_hosts), "netns": self.netns,
                                  "connect_timeout": 5.0, "use_ssh_config": False, **ssh})
        return Host(fqdn="t1.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1", ssh=settings)


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _sshd_config(d: Path, port: int) -> str:
    return "\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d}/host_key",
        f"AuthorizedKeysFile {d}/authorized",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "UseDNS no", "PidFile none", "StrictModes no", "AllowTcpForwarding yes", ""])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if os.geteuid() != 0 or not shutil.which("sshd") or not shutil.which("ip"):
        pytest.skip("needs root, OpenSSH sshd and iproute2")
    d = tmp_path_factory.mktemp("sshd")
    netns = f"rt-ssh-{uuid.uuid4().hex[:8]}"
    keygen(d / "host_key")
    keygen(d / "client_key")
    (d / "authorized").write_text((d / "client_key.pub").read_text())
    (d / "home").mkdir()
    passwd = Path("/etc/passwd").read_text().splitlines()
    (d / "passwd").write_text("\n".join(f"root:x:0:0:root:{d}/home:/bin/sh" if ln.startswith("root:") else ln
                                        for ln in passwd) + "\n")
    (d / "sshd_config").write_text(_sshd_config(d, PORT))
    host_pub = (d / "host_key.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{PORT} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    with open(d / "sshd.log", "w") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c",
             f"mount --bind {d}/passwd /etc/passwd && exec /usr/sbin/sshd -D -e -f {d}/sshd_config"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        _wait_port(netns, PORT)
        yield Sshd(netns=netns, dir=d, port=PORT, client_key=d / "client_key", known_hosts=d / "known_hosts")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _wait_port(netns: str, port: int) -> None:
    for _ in range(100):
        ss = subprocess.run(["ip", "netns", "exec", netns, "ss", "-ltn"], capture_output=True, text=True)
        if f"127.0.0.1:{port}" in ss.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError("sshd did not start")
