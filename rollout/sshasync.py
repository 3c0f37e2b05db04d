"""Event-driven SSH for wide fan-out (the kill switch): the ONLY module that imports asyncssh.

Why a second client: `rollout.ssh` (paramiko) spends a thread and a pure-Python packet layer per
connection; at 1,000 hosts that is ~10 ms of client CPU per host, twice this client's figure
(bench/kill_fanout.py). Here every connection lives on one asyncio loop.

Same policy as `rollout.ssh`, whose `Endpoints` (inventory + ssh_config + known_hosts) and host-key
refusal messages it reuses:

* strict host keys: only keys from the endpoint's known_hosts files are trusted, checked during the key
  exchange, before authentication; unknown, changed or @revoked -> `errors.HostKeyMismatch`; nothing is
  ever added or written;
* identity files first, then the ssh-agent; no ~/.ssh/config of asyncssh's own (ours was applied);
* bounded: TCP connect, then key exchange + authentication, each within `connect_timeout`; the command
  within its `timeout`; a cancelled attempt closes its connection;
* one connection per command (the kill switch runs one command per host); jump hosts (ProxyJump) are
  connected once per run and shared, targets are reached through them;
* `SshSettings.netns`: the socket is created inside that network namespace (`rollout.netns`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, cast

import asyncssh

from rollout import errors
from rollout.model import Host
from rollout.netns import NetnsSockets
from rollout.ssh import (
    DEFAULT_SSH_CONFIG,
    SYSTEM_KNOWN_HOSTS,
    Endpoint,
    Endpoints,
    KeyId,
    KnownHosts,
    host_key_refusal,
    relabel,
)
from rollout.transport import CommandResult

# Cheapest safe choices first, everything else still allowed (asyncssh's "^" = prepend to defaults).
_KEX = "^curve25519-sha256,curve25519-sha256@libssh.org"
_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


@functools.cache
def _algorithms() -> tuple[list[str], list[str]]:
    """(kex, ciphers) as explicit lists, expanded once: asyncssh matches a "^a,b" pattern against every
    algorithm it knows each time options are built, twice per connection (ours, then its own copy).
    Same order, same defaults kept; bench/ssh_options.py measures the difference."""
    ref = asyncssh.SSHClientConnectionOptions(
        kex_algs=_KEX, encryption_algs=_CIPHERS, config=[], known_hosts=None, client_keys=(),
        agent_path=None, x509_trusted_certs=None, username="-")
    return [a.decode() for a in ref.kex_algs], [a.decode() for a in ref.encryption_algs]


class _Client(asyncssh.SSHClient):
    """Remembers the host key a server presented when it was not trusted (for the refusal message)."""

    def __init__(self) -> None:
        self.refused_key: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.refused_key = key
        return False


class AsyncSshTransport:
    """`rollout.transport.AsyncTransport`: `await run_async(host, command, timeout=...)`."""

    def __init__(self, *, ssh_config: str | None = DEFAULT_SSH_CONFIG, agent: bool = True,
                 system_known_hosts: Sequence[str] = SYSTEM_KNOWN_HOSTS,
                 max_handshakes: int | None = None) -> None:
        self._endpoints = Endpoints(ssh_config=ssh_config, system_known_hosts=system_known_hosts)
        self._agent_path = os.environ.get("SSH_AUTH_SOCK") if agent else None
        self._max_handshakes = max_handshakes
        self._handshakes: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._identities: dict[str, asyncssh.SSHKey | None] = {}
        self._trusted: dict[tuple[tuple[str, ...], str], list[asyncssh.SSHKey]] = {}
        self._jumps: dict[Endpoint, asyncio.Task[asyncssh.SSHClientConnection]] = {}
        self._netns: dict[str, NetnsSockets] = {}

    # -- AsyncTransport protocol -----------------------------------------------------------------
    async def run_async(self, host: Host, command: str, *, timeout: float,
                        stdin: str | None = None) -> CommandResult:
        endpoint = self._endpoints.endpoint(host)
        started = time.monotonic()
        try:
            conn = await self._connect(endpoint)
        except errors.TransportError as exc:
            raise relabel(exc, host) from exc
        try:
            result = await asyncio.wait_for(
                conn.run(command, input=stdin, check=False, encoding="utf-8", errors="replace"), timeout)
        except TimeoutError as exc:
            raise errors.CommandTimeout(host.fqdn, f"command did not finish within {timeout:g} s") from exc
        except (asyncssh.Error, OSError) as exc:
            raise errors.CommandTimeout(host.fqdn, f"connection lost while the command ran: {exc}") from exc
        finally:
            conn.close()
        code = result.exit_status if result.exit_status is not None else -1
        return CommandResult(host=host.fqdn, exit_code=code, stdout=_text(result.stdout),
                             stderr=_text(result.stderr), duration=time.monotonic() - started)

    async def aclose(self) -> None:
        """Close the jump-host connections of this run (targets are closed after their command)."""
        jumps, self._jumps = list(self._jumps.values()), {}
        for task in jumps:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
        self.close()

    def close(self) -> None:
        spaces, self._netns = list(self._netns.values()), {}
        for space in spaces:
            space.close()

    def endpoint(self, host: Host) -> Endpoint:
        return self._endpoints.endpoint(host)

    # -- connections -----------------------------------------------------------------------------
    async def _connect(self, endpoint: Endpoint) -> asyncssh.SSHClientConnection:
        tunnel = await self._jump(endpoint.via) if endpoint.via is not None else None
        known = self._endpoints.known_hosts(endpoint.known_hosts)
        expected = known.keys_for(endpoint.key_name)
        client = _Client()
        sock: socket.socket | None = None
        conn: asyncssh.SSHClientConnection | None = None
        try:
            # TCP connect inside the slot too: a connection waiting for its handshake counts against
            # sshd's MaxStartups and LoginGraceTime, and sshd drops such connections at random.
            async with self._handshake_slot():
                sock = await self._socket(endpoint) if tunnel is None else None
                conn, _client = await asyncio.wait_for(asyncssh.create_connection(
                    lambda: client, endpoint.hostname, endpoint.port, sock=sock, tunnel=tunnel,
                    options=self._options(endpoint, self._trusted_keys(endpoint, expected, known))),
                    endpoint.connect_timeout)
            return cast(asyncssh.SSHClientConnection, conn)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._refusal(endpoint, client, expected, known) from exc
        except asyncssh.PermissionDenied as exc:
            raise errors.HostUnreachable(endpoint.alias, f"authentication as {endpoint.user!r} failed "
                                                         f"(tried: {self._tried(endpoint)})") from exc
        except TimeoutError as exc:
            raise errors.HostUnreachable(endpoint.alias, "SSH handshake failed: no key exchange and "
                                         f"authentication within {endpoint.connect_timeout:g} s") from exc
        except (asyncssh.Error, OSError, ValueError) as exc:
            raise errors.HostUnreachable(endpoint.alias, f"SSH handshake failed: {exc}") from exc
        finally:
            if conn is None and sock is not None:  # failed or cancelled: never leak the socket
                sock.close()

    async def _jump(self, endpoint: Endpoint) -> asyncssh.SSHClientConnection:
        """One shared connection per jump host per run; a failed one is retried by the next caller."""
        task = self._jumps.get(endpoint)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._jumps[endpoint] = asyncio.ensure_future(self._connect(endpoint))
        return await asyncio.shield(task)

    async def _socket(self, endpoint: Endpoint) -> socket.socket:
        where = f"{endpoint.hostname}:{endpoint.port}"
        ns = f" in netns {endpoint.netns}" if endpoint.netns else ""
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            family, _, _, _, address = (await loop.getaddrinfo(
                endpoint.hostname, endpoint.port, type=socket.SOCK_STREAM))[0]
            sock = (self._namespace(endpoint.netns).new_socket(family) if endpoint.netns
                    else socket.socket(family, socket.SOCK_STREAM))
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, address), endpoint.connect_timeout)
            return sock
        except (TimeoutError, OSError) as exc:
            if sock is not None:
                sock.close()
            why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise errors.HostUnreachable(endpoint.alias, f"TCP connect to {where}{ns} failed: {why}") from exc

    def _namespace(self, name: str) -> NetnsSockets:
        space = self._netns.get(name)
        if space is None:
            space = self._netns[name] = NetnsSockets(name)
        return space

    @contextlib.asynccontextmanager
    async def _handshake_slot(self) -> Any:
        """Bound concurrent handshakes (CPU-bound here); one semaphore per event loop."""
        if self._max_handshakes is None:
            yield
            return
        loop = asyncio.get_running_loop()
        if self._handshakes is None or self._loop is not loop:
            self._handshakes, self._loop = asyncio.Semaphore(self._max_handshakes), loop
        async with self._handshakes:
            yield

    # -- keys ------------------------------------------------------------------------------------
    def _options(self, endpoint: Endpoint,
                 trusted: list[asyncssh.SSHKey]) -> asyncssh.SSHClientConnectionOptions:
        keys = [k for k in (self._identity(endpoint, p) for p in endpoint.identities) if k is not None]
        kex, ciphers = _algorithms()
        return asyncssh.SSHClientConnectionOptions(
            username=endpoint.user, known_hosts=(trusted, [], []), client_keys=keys or (),
            agent_path=self._agent_path, agent_identities=None, config=[], x509_trusted_certs=None,
            kex_algs=kex, encryption_algs=ciphers, compression_algs=None, ignore_encrypted=True,
            login_timeout=endpoint.connect_timeout, keepalive_interval=30)

    def _trusted_keys(self, endpoint: Endpoint, expected: set[KeyId],
                      known: KnownHosts) -> list[asyncssh.SSHKey]:
        """The known, not revoked host keys (revoked/unknown ones are refused by `_Client`)."""
        cache_key = (endpoint.known_hosts, endpoint.key_name)
        trusted = self._trusted.get(cache_key)
        if trusted is None:
            trusted = self._trusted[cache_key] = [
                key for kind, blob in sorted(expected) if blob not in known.revoked
                if (key := _public_key(kind, blob)) is not None]
        return trusted

    def _identity(self, endpoint: Endpoint, path: str) -> asyncssh.SSHKey | None:
        if path not in self._identities:
            try:
                self._identities[path] = asyncssh.read_private_key(path)
            except FileNotFoundError:
                self._identities[path] = None
            except (asyncssh.KeyImportError, OSError, ValueError) as exc:
                raise errors.HostUnreachable(
                    endpoint.alias, f"cannot load identity file {path} (encrypted? use ssh-agent): "
                                    f"{type(exc).__name__}") from exc
        return self._identities[path]

    def _tried(self, endpoint: Endpoint) -> str:
        tried = list(endpoint.identities)
        if self._agent_path:
            tried.append("the ssh-agent")
        return ", ".join(tried) or "default keys"

    @staticmethod
    def _refusal(endpoint: Endpoint, client: _Client, expected: set[KeyId],
                 known: KnownHosts) -> errors.HostKeyMismatch:
        key = client.refused_key
        if key is None:
            return errors.HostKeyMismatch(endpoint.alias,
                                          f"host {endpoint.key_name}: host key not verifiable")
        presented: KeyId = (key.get_algorithm(), key.public_data)
        return host_key_refusal(endpoint, presented, key.get_fingerprint(), expected, known)


def _public_key(kind: str, blob: bytes) -> asyncssh.SSHKey | None:
    try:
        return asyncssh.import_public_key(f"{kind} {base64.b64encode(blob).decode()}")
    except (asyncssh.KeyImportError, ValueError):
        return None


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")

