"""AsyncSshTransport (asyncssh, the kill switch's client) against a real OpenSSH sshd in a network namespace.

The same safety contract as SshTransport: strict host keys checked before anything runs, nothing ever
added to known_hosts, every wait bounded, sockets opened inside the host's network namespace.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout import errors
from rollout.model import Host, SshSettings
from rollout.ssh import sh_join
from rollout.sshasync import AsyncSshTransport
from rollout.transport import CommandResult
from tests.sshd_fixture import Sshd, keygen, sshd

__all__ = ["sshd"]  # the module-scoped fixture, used by the tests below


@pytest.fixture
def transport() -> Iterator[AsyncSshTransport]:
    t = AsyncSshTransport(ssh_config=None, agent=False)
    yield t
    t.close()


def run(transport: AsyncSshTransport, host: Host, command: str, *, timeout: float = 10,
        stdin: str | None = None) -> CommandResult:
    async def once() -> CommandResult:
        try:
            return await transport.run_async(host, command, timeout=timeout, stdin=stdin)
        finally:
            await transport.aclose()

    return asyncio.run(once())


def test_runs_commands_with_stdin_exit_code_and_stderr(sshd: Sshd, transport: AsyncSshTransport) -> None:
    r = run(transport, sshd.host(), "cat; echo oops >&2; exit 3", stdin="hello\n")
    assert (r.exit_code, r.stdout, r.stderr, r.host) == (3, "hello\n", "oops\n", "t1.test")


def test_many_hosts_on_one_loop_with_bounded_handshakes(sshd: Sshd) -> None:
    transport = AsyncSshTransport(ssh_config=None, agent=False, max_handshakes=2)

    async def fan_out() -> list[CommandResult]:
        try:
            return await asyncio.gather(*(transport.run_async(sshd.host(), f"echo {i}", timeout=20)
                                          for i in range(12)))
        finally:
            await transport.aclose()

    results = asyncio.run(fan_out())
    assert sorted(int(r.stdout) for r in results) == list(range(12))


def test_command_timeout_is_bounded(sshd: Sshd, transport: AsyncSshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(errors.CommandTimeout, match="within 1 s"):
        run(transport, sshd.host(), "sleep 30", timeout=1)
    assert time.monotonic() - started < 3


def test_unknown_host_key_is_rejected_before_anything_runs(sshd: Sshd, transport: AsyncSshTransport,
                                                          tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    marker = tmp_path / "marker"
    with pytest.raises(errors.HostKeyMismatch) as info:
        run(transport, sshd.host(known_hosts=str(empty)), sh_join(["touch", str(marker)]))
    message = str(info.value)
    assert "unknown host key" in message and str(empty) in message and "ssh-keyscan" in message
    assert "SHA256:" in message  # the presented key's fingerprint, to compare out of band
    assert not marker.exists()
    assert empty.read_text() == ""  # never auto-added


def test_changed_host_key_is_rejected(sshd: Sshd, transport: AsyncSshTransport, tmp_path: Path) -> None:
    keygen(tmp_path / "other")
    other = (tmp_path / "other.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    marker = tmp_path / "marker"
    with pytest.raises(errors.HostKeyMismatch, match="DIFFERS"):
        run(transport, sshd.host(known_hosts=str(wrong)), sh_join(["touch", str(marker)]))
    assert not marker.exists()


def test_revoked_and_hashed_known_hosts(sshd: Sshd, transport: AsyncSshTransport, tmp_path: Path) -> None:
    hashed = tmp_path / "hashed"
    shutil.copy(sshd.known_hosts, hashed)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "|1|" in hashed.read_text()
    assert run(transport, sshd.host(known_hosts=str(hashed)), "echo hashed").stdout == "hashed\n"
    key = (sshd.dir / "host_key.pub").read_text().split()
    revoked = tmp_path / "revoked"
    revoked.write_text(sshd.known_hosts.read_text() + f"@revoked * {key[0]} {key[1]}\n")
    with pytest.raises(errors.HostKeyMismatch, match="revoked"):
        run(AsyncSshTransport(ssh_config=None, agent=False), sshd.host(known_hosts=str(revoked)), "true")


def test_wrong_client_key_fails_authentication(sshd: Sshd, transport: AsyncSshTransport,
                                               tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    with pytest.raises(errors.HostUnreachable, match="authentication as 'root' failed"):
        run(transport, sshd.host(identity=str(tmp_path / "stranger")), "true", timeout=5)


def test_refused_port_is_unreachable_fast(sshd: Sshd, transport: AsyncSshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(errors.HostUnreachable, match="TCP connect"):
        run(transport, sshd.host(port=2), "true", timeout=5)
    assert time.monotonic() - started < 2


def test_silent_server_hits_handshake_timeout(sshd: Sshd, transport: AsyncSshTransport) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    host = Host(fqdn="silent.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1",
                ssh=SshSettings(port=silent.getsockname()[1], connect_timeout=1.0, use_ssh_config=False,
                                known_hosts=str(sshd.known_hosts)))
    started = time.monotonic()
    with pytest.raises(errors.HostUnreachable, match="handshake"):
        run(transport, host, "true", timeout=5)
    assert time.monotonic() - started < 4
    silent.close()


def test_ssh_config_and_proxyjump_through_one_shared_jump_connection(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  IdentityFile {sshd.client_key}\n\n"
        f"Host target.test\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n  ProxyJump jump\n")
    host = Host(fqdn="target.test", site="s", cluster="c", os="lab-uml",
                ssh=SshSettings(known_hosts=str(sshd.known_hosts), netns=sshd.netns, use_ssh_config=True))
    transport = AsyncSshTransport(ssh_config=str(config), agent=False)
    assert transport.endpoint(host).via is not None

    async def twice() -> list[CommandResult]:
        try:
            return await asyncio.gather(*(transport.run_async(host, 'echo "$SSH_CONNECTION"', timeout=10)
                                          for _ in range(3)))
        finally:
            assert len(transport._jumps) == 1  # one jump connection, shared by every target
            await transport.aclose()

    outputs = [r.stdout.split() for r in asyncio.run(twice())]
    assert all(out[0] == "127.0.0.1" for out in outputs)
    assert len({out[1] for out in outputs}) == 3  # three target sessions, each its own TCP stream


NASTY = ["a b", "'", '"', "$(touch /tmp/pwned-sshasync)", "`id`", "; rm -rf /nonexistent", "\\", "*", "-n"]


def test_sh_join_round_trips_through_a_real_shell(sshd: Sshd, transport: AsyncSshTransport) -> None:
    out = run(transport, sshd.host(), sh_join(["printf", "%s\\0", *NASTY])).stdout
    assert out.split("\0")[:-1] == NASTY
    assert not Path("/tmp/pwned-sshasync").exists()


def test_algorithm_lists_prefer_x25519_and_gcm_and_keep_every_default() -> None:
    """Pre-expanded once (asyncssh re-expands patterns on every options build): same preference order,
    and every algorithm asyncssh offers by default is still offered, so old servers still connect."""
    import asyncssh

    from rollout.sshasync import _algorithms

    kex, ciphers = _algorithms()
    assert kex[:2] == ["curve25519-sha256", "curve25519-sha256@libssh.org"]
    assert ciphers[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    defaults = asyncssh.SSHClientConnectionOptions(config=[], known_hosts=None, client_keys=(),
                                                   agent_path=None, username="-")
    for chosen, default in ((kex, defaults.kex_algs), (ciphers, defaults.encryption_algs)):
        assert {a.decode() for a in default} <= set(chosen) and len(set(chosen)) == len(chosen)
