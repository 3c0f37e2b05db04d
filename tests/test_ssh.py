"""SshTransport (paramiko) against a real OpenSSH sshd in a throwaway network namespace (S1, S3, S7)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollout import errors
from rollout.model import Host, SshSettings
from rollout.ssh import SshTransport, load_known_hosts, sh_join
from tests.sshd_fixture import Sshd, keygen, sshd

__all__ = ["sshd"]  # the module-scoped fixture, used by the tests below


@pytest.fixture
def transport() -> Iterator[SshTransport]:
    t = SshTransport(ssh_config=None, agent=False)
    yield t
    t.close()


def test_runs_commands_with_stdin_exit_code_and_stderr(sshd: Sshd, transport: SshTransport) -> None:
    r = transport.run(sshd.host(), "cat; echo oops >&2; exit 3", timeout=10, stdin="hello\n")
    assert (r.exit_code, r.stdout, r.stderr, r.host) == (3, "hello\n", "oops\n", "t1.test")


def test_connection_is_cached_and_reused(sshd: Sshd, transport: SshTransport) -> None:
    first = transport.run(sshd.host(), 'echo "$SSH_CLIENT"', timeout=10).stdout
    second = transport.run(sshd.host(), 'echo "$SSH_CLIENT"', timeout=10).stdout
    assert first == second  # same client port: one TCP connection


def test_parallel_commands_share_one_connection(sshd: Sshd, transport: SshTransport) -> None:
    outputs: list[str] = []
    threads = [threading.Thread(target=lambda: outputs.append(
        transport.run(sshd.host(), 'echo "$SSH_CLIENT"', timeout=10).stdout)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(outputs) == 8 and len(set(outputs)) == 1


def test_command_timeout_is_bounded_and_connection_survives(sshd: Sshd, transport: SshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(errors.CommandTimeout):
        transport.run(sshd.host(), "sleep 30", timeout=1)
    assert time.monotonic() - started < 3
    assert transport.run(sshd.host(), "echo ok", timeout=10).stdout == "ok\n"


def test_unknown_host_key_is_rejected_before_anything_runs(sshd: Sshd, transport: SshTransport,
                                                          tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    marker = tmp_path / "marker"
    with pytest.raises(errors.HostKeyMismatch) as info:
        transport.run(sshd.host(known_hosts=str(empty)), sh_join(["touch", str(marker)]), timeout=10)
    message = str(info.value)
    assert "unknown host key" in message and str(empty) in message and "ssh-keyscan" in message
    assert not marker.exists()
    assert empty.read_text() == ""  # never auto-added


def test_changed_host_key_is_rejected(sshd: Sshd, transport: SshTransport, tmp_path: Path) -> None:
    keygen(tmp_path / "other")
    other = (tmp_path / "other.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    marker = tmp_path / "marker"
    with pytest.raises(errors.HostKeyMismatch, match="DIFFERS"):
        transport.run(sshd.host(known_hosts=str(wrong)), sh_join(["touch", str(marker)]), timeout=10)
    assert not marker.exists()


def test_revoked_and_hashed_known_hosts(sshd: Sshd, transport: SshTransport, tmp_path: Path) -> None:
    hashed = tmp_path / "hashed"
    shutil.copy(sshd.known_hosts, hashed)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert "|1|" in hashed.read_text()
    assert transport.run(sshd.host(known_hosts=str(hashed)), "echo hashed", timeout=10).stdout == "hashed\n"
    key = (sshd.dir / "host_key.pub").read_text().split()
    revoked = tmp_path / "revoked"
    revoked.write_text(sshd.known_hosts.read_text() + f"@revoked * {key[0]} {key[1]}\n")
    with pytest.raises(errors.HostKeyMismatch, match="revoked"):
        SshTransport(ssh_config=None, agent=False).run(sshd.host(known_hosts=str(revoked)), "true", timeout=5)


def test_wrong_client_key_fails_authentication(sshd: Sshd, transport: SshTransport, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    with pytest.raises(errors.HostUnreachable, match="authentication"):
        transport.run(sshd.host(identity=str(tmp_path / "stranger")), "true", timeout=5)


def test_refused_port_is_unreachable_fast(sshd: Sshd, transport: SshTransport) -> None:
    started = time.monotonic()
    with pytest.raises(errors.HostUnreachable, match="TCP connect"):
        transport.run(sshd.host(port=2), "true", timeout=5)
    assert time.monotonic() - started < 2


def test_silent_server_hits_banner_timeout(sshd: Sshd, transport: SshTransport) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    host = Host(fqdn="silent.test", site="s", cluster="c", os="lab-uml", ssh_host="127.0.0.1",
                ssh=SshSettings(port=silent.getsockname()[1], connect_timeout=1.0, use_ssh_config=False,
                                known_hosts=str(sshd.known_hosts)))
    started = time.monotonic()
    with pytest.raises(errors.HostUnreachable, match="handshake"):
        transport.run(host, "true", timeout=5)
    assert time.monotonic() - started < 4
    silent.close()


def test_ssh_config_hostname_port_user_identity_and_proxyjump(sshd: Sshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  IdentityFile {sshd.client_key}\n\n"
        f"Host target.test\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
        f"  IdentityFile {sshd.client_key}\n  ProxyJump jump\n")
    host = Host(fqdn="target.test", site="s", cluster="c", os="lab-uml",
                ssh=SshSettings(known_hosts=str(sshd.known_hosts), netns=sshd.netns, use_ssh_config=True))
    t = SshTransport(ssh_config=str(config), agent=False)
    try:
        endpoint = t.endpoint(host)
        assert endpoint.via is not None and endpoint.via.alias == "jump" and endpoint.port == sshd.port
        out = t.run(host, 'echo "$SSH_CONNECTION"', timeout=10).stdout.split()
        assert out[0] == "127.0.0.1"
        assert len(t._slots) == 2  # two SSH connections: the jump host's, and the target's through it
    finally:
        t.close()


NASTY = ["a b", "'", '"', "$(touch /tmp/pwned-ssh)", "`id`", "; rm -rf /nonexistent", "\\", "*", "-n", "\n"]


def test_sh_join_round_trips_through_a_real_shell(sshd: Sshd, transport: SshTransport) -> None:
    out = transport.run(sshd.host(), sh_join(["printf", "%s\\0", *NASTY]), timeout=10).stdout
    assert out.split("\0")[:-1] == NASTY
    assert not Path("/tmp/pwned-ssh").exists()


def test_known_hosts_parser_ignores_garbage(tmp_path: Path) -> None:
    f = tmp_path / "kh"
    f.write_text("# c\n\nbad line\nhost ssh-ed25519 !!notbase64\n@cert-authority * ssh-ed25519 AAAA\n"
                 "h1,h2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    known = load_known_hosts([str(f), str(tmp_path / "missing")])
    assert len(known.keys_for("h2")) == 1 and not known.keys_for("host")
