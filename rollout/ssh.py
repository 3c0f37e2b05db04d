"""SSH transport: the ONLY module that imports paramiko.

`SshTransport` implements `rollout.transport.Transport`:

* strict host keys: `SshSettings.known_hosts` (expanded) plus the system files are read once per
  transport; an unknown or changed key raises `errors.HostKeyMismatch` (RejectPolicy semantics,
  nothing is ever added or written); `@revoked` keys are refused;
* `~/.ssh/config` (when `use_ssh_config`): HostName, Port, User, IdentityFile, ProxyJump (chains, through
  a direct-tcpip channel of the jump host's own cached connection), HostKeyAlias. Inventory values that
  differ from the `SshSettings` defaults win over ssh_config, as command-line flags do for OpenSSH;
* identity file(s) first, then the ssh-agent; keys are never logged or printed;
* bounded: TCP connect, banner, key exchange and authentication each get `connect_timeout`; every
  command its own `timeout` (`errors.CommandTimeout`, and that channel is closed);
* one cached connection per endpoint, thread-safe, reused by every command;
* `SshSettings.netns`: the TCP socket is created inside that network namespace (`rollout.netns`), the
  process never moves.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import logging
import os
import shlex
import socket
import threading
import time
from base64 import b64decode
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import paramiko

from rollout import errors
from rollout.model import Host, SshSettings
from rollout.netns import NetnsSockets
from rollout.transport import CommandResult

log = logging.getLogger(__name__)

SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts",)
DEFAULT_SSH_CONFIG = "~/.ssh/config"
_DEFAULTS = SshSettings()
# Cheapest safe choices first (client CPU per host matters at fleet fan-out): x25519 key exchange,
# Ed25519 host keys, AES-GCM (AEAD: no separate MAC pass). Everything else stays available.
_FAST_KEX = ("curve25519-sha256@libssh.org", "curve25519-sha256")
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_FAST_KEYS = ("ssh-ed25519",)
# How often a waiting reader wakes to drain stderr (only a stderr larger than the 2 MiB channel window
# could stall meanwhile); each wake costs CPU times hundreds of hosts in flight.
_STDERR_DRAIN_PERIOD = 5.0


def sh_join(argv: Iterable[str]) -> str:
    """The command string for an argv: every word quoted for a POSIX shell."""
    return shlex.join(list(argv))


# ------------------------------------------------------------------------------------------------
# known_hosts
# ------------------------------------------------------------------------------------------------
KeyId = tuple[str, bytes]  # (key type, public key blob)


@dataclass(frozen=True, kw_only=True)
class KnownHosts:
    """Parsed known_hosts files: exact names, wildcard patterns, hashed names, revoked keys."""

    files: tuple[str, ...]
    exact: dict[str, frozenset[KeyId]] = field(default_factory=dict)
    patterns: tuple[tuple[str, KeyId], ...] = ()
    hashed: tuple[tuple[bytes, bytes, KeyId], ...] = ()  # (salt, digest, key)
    revoked: frozenset[bytes] = frozenset()

    def keys_for(self, name: str) -> set[KeyId]:
        keys = set(self.exact.get(name, ()))
        keys.update(k for pattern, k in self.patterns if fnmatch.fnmatchcase(name, pattern))
        raw = name.encode()
        keys.update(k for salt, digest, k in self.hashed
                    if hmac.compare_digest(hmac.new(salt, raw, hashlib.sha1).digest(), digest))
        return keys


def load_known_hosts(files: Sequence[str]) -> KnownHosts:
    """Parse the files that exist (missing ones are skipped: an empty result rejects every host)."""
    exact: dict[str, set[KeyId]] = {}
    patterns: list[tuple[str, KeyId]] = []
    hashed: list[tuple[bytes, bytes, KeyId]] = []
    revoked: set[bytes] = set()
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            _parse_known_hosts_line(line, exact, patterns, hashed, revoked)
    return KnownHosts(files=tuple(files), exact={k: frozenset(v) for k, v in exact.items()},
                      patterns=tuple(patterns), hashed=tuple(hashed), revoked=frozenset(revoked))


def _parse_known_hosts_line(line: str, exact: dict[str, set[KeyId]], patterns: list[tuple[str, KeyId]],
                            hashed: list[tuple[bytes, bytes, KeyId]], revoked: set[bytes]) -> None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if len(fields) < 3:
        return
    names, keytype, blob64 = fields[:3]
    try:
        key: KeyId = (keytype, b64decode(blob64, validate=True))
    except ValueError:
        return
    if marker == "@revoked":
        revoked.add(key[1])
        return
    if marker is not None:  # @cert-authority: certificates are not supported; ignore the line
        return
    for name in names.split(","):
        _index_name(name, key, exact, patterns, hashed)


def _index_name(name: str, key: KeyId, exact: dict[str, set[KeyId]], patterns: list[tuple[str, KeyId]],
                hashed: list[tuple[bytes, bytes, KeyId]]) -> None:
    if name.startswith("|1|"):
        try:
            _, _, salt64, digest64 = name.split("|")
            hashed.append((b64decode(salt64), b64decode(digest64), key))
        except ValueError:
            pass
    elif name.startswith("!"):
        return  # negations only ever remove matches; we never auto-add, so ignoring them is strict
    elif any(c in name for c in "*?"):
        patterns.append((name, key))
    else:
        exact.setdefault(name, set()).add(key)


# ------------------------------------------------------------------------------------------------
# Where and how to connect
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One SSH hop, fully resolved (inventory + ssh_config). Hashable: the connection cache key."""

    alias: str  # the name the operator knows (inventory / ProxyJump spec), for messages
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...]
    known_hosts: tuple[str, ...]
    host_key_alias: str | None
    netns: str | None
    via: Endpoint | None
    connect_timeout: float

    @property
    def key_name(self) -> str:
        """The known_hosts lookup name, as OpenSSH forms it."""
        name = self.host_key_alias or self.hostname
        return name if self.port == 22 else f"[{name}]:{self.port}"


def _pick(inventory: object, default: object, config: object) -> object:
    """Inventory beats ssh_config unless the inventory value is just the built-in default."""
    if inventory != default or config is None:
        return inventory
    return config


def resolve_endpoint(alias: str, settings: SshSettings, config: paramiko.SSHConfig | None,
                     *, depth: int = 0) -> Endpoint:
    """Turn a name + settings into an Endpoint, honouring ssh_config when given."""
    if depth > 5:
        raise errors.InputError(f"{alias}: ProxyJump chain too long (loop?)")
    cfg = config.lookup(alias) if config is not None else {}
    identities = (settings.identity,) if settings.identity else tuple(cfg.get("identityfile", ()))
    port = _pick(settings.port, _DEFAULTS.port, cfg.get("port"))
    known = (os.path.expanduser(settings.known_hosts), *SYSTEM_KNOWN_HOSTS)
    jump = settings.proxy_jump or cfg.get("proxyjump")
    via = None if not jump or jump == "none" else _jump_chain(jump, settings, config, depth)
    return Endpoint(
        alias=alias, hostname=str(cfg.get("hostname", alias)), port=int(str(port)),
        user=str(_pick(settings.user, _DEFAULTS.user, cfg.get("user"))),
        identities=tuple(os.path.expanduser(i) for i in identities), known_hosts=known,
        host_key_alias=cfg.get("hostkeyalias"), netns=None if via else settings.netns, via=via,
        connect_timeout=float(settings.connect_timeout),
    )


def _jump_chain(spec: str, settings: SshSettings, config: paramiko.SSHConfig | None,
                depth: int) -> Endpoint:
    """`[user@]host[:port][,...]`: the last hop is the one that connects to the target."""
    previous: Endpoint | None = None
    for i, hop in enumerate(spec.split(",")):
        user, _, hostport = hop.rpartition("@")
        host, _, port = hostport.partition(":")
        hop_settings = SshSettings(
            user=user or _DEFAULTS.user, port=int(port) if port else _DEFAULTS.port,
            known_hosts=settings.known_hosts, netns=settings.netns, connect_timeout=settings.connect_timeout,
            use_ssh_config=settings.use_ssh_config, identity=settings.identity,
            proxy_jump=None)
        endpoint = resolve_endpoint(host, hop_settings, config, depth=depth + 1)
        if i > 0:  # later hops go through the previous one, whatever their own config says
            endpoint = Endpoint(**{**endpoint.__dict__, "via": previous, "netns": None})
        previous = endpoint
    assert previous is not None
    return previous


class Endpoints:
    """Host -> Endpoint (inventory + ssh_config) and parsed known_hosts, both cached and thread-safe.
    Shared by both SSH clients so they connect to the same place and trust the same keys."""

    def __init__(self, *, ssh_config: str | None = DEFAULT_SSH_CONFIG,
                 system_known_hosts: Sequence[str] = SYSTEM_KNOWN_HOSTS) -> None:
        self._config_path = os.path.expanduser(ssh_config) if ssh_config else None
        self._config: paramiko.SSHConfig | None = None
        self._system_known_hosts = tuple(system_known_hosts)
        self._known: dict[tuple[str, ...], KnownHosts] = {}
        self._lock = threading.Lock()

    def endpoint(self, host: Host) -> Endpoint:
        settings = host.ssh
        config = self._ssh_config() if settings.use_ssh_config else None
        endpoint = resolve_endpoint(host.connect_address, settings, config)
        if self._system_known_hosts != SYSTEM_KNOWN_HOSTS:
            endpoint = Endpoint(**{**endpoint.__dict__, "known_hosts": (
                endpoint.known_hosts[0], *self._system_known_hosts)})
        return endpoint

    def known_hosts(self, files: tuple[str, ...]) -> KnownHosts:
        with self._lock:
            known = self._known.get(files)
            if known is None:
                known = self._known[files] = load_known_hosts(files)
            return known

    def _ssh_config(self) -> paramiko.SSHConfig | None:
        with self._lock:
            if self._config is None and self._config_path and os.path.exists(self._config_path):
                self._config = paramiko.SSHConfig.from_path(self._config_path)
            return self._config


# ------------------------------------------------------------------------------------------------
# The transport
# ------------------------------------------------------------------------------------------------
class _Transport(paramiko.Transport):
    """paramiko's transport thread polls its socket every 0.1 s; with hundreds of connections waiting on
    slow hosts those wake-ups cost more CPU than the SSH work itself. Our own bounds do not depend on
    that poll (start_client/auth/session waits are timed from the calling thread), and `close()` wakes
    the thread at once with a socket shutdown."""

    _active_check_timeout = 5.0

    def close(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            if isinstance(self.sock, socket.socket):
                self.sock.shutdown(socket.SHUT_RDWR)
        super().close()


@dataclass(kw_only=True)
class _Slot:
    """A cache entry: its own lock so connects to different hosts run in parallel."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    transport: paramiko.Transport | None = None


class SshTransport:
    """`rollout.transport.Transport` over paramiko with strict host keys and cached connections."""

    def __init__(self, *, ssh_config: str | None = DEFAULT_SSH_CONFIG, agent: bool = True,
                 keepalive: int = 30, system_known_hosts: Sequence[str] = SYSTEM_KNOWN_HOSTS,
                 max_handshakes: int | None = None) -> None:
        self._endpoints = Endpoints(ssh_config=ssh_config, system_known_hosts=system_known_hosts)
        self._agent = agent
        self._keepalive = keepalive
        self._lock = threading.Lock()
        self._slots: dict[Endpoint, _Slot] = {}
        self._keys: dict[str, paramiko.PKey] = {}
        self._netns: dict[str, NetnsSockets] = {}
        self._closed = False
        # Key exchange + auth are CPU-bound on this side; hundreds at once only fight over the GIL.
        self._handshakes = threading.BoundedSemaphore(max_handshakes) if max_handshakes else None

    # -- Transport protocol ----------------------------------------------------------------------
    def run(self, host: Host, command: str, *, timeout: float, stdin: str | None = None) -> CommandResult:
        endpoint = self.endpoint(host)
        started = time.monotonic()
        reused = self._cached(endpoint) is not None
        try:
            transport = self._connection(endpoint)
        except errors.TransportError as exc:
            raise relabel(exc, host) from exc
        try:
            channel = transport.open_session(timeout=min(timeout, endpoint.connect_timeout))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.drop(endpoint)
            if not reused:
                raise errors.HostUnreachable(host.fqdn, f"cannot open a session: {exc}") from exc
            try:  # the cached connection had died: one fresh try
                transport = self._connection(endpoint)
            except errors.TransportError as exc2:
                raise relabel(exc2, host) from exc2
            channel = self._open_session(host, transport, endpoint)
        return self._execute(host, channel, command, stdin, timeout, started)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
            spaces, self._netns = list(self._netns.values()), {}
        for slot in slots:
            if slot.transport is not None:
                slot.transport.close()
        for space in spaces:
            space.close()

    # -- public helpers --------------------------------------------------------------------------
    def endpoint(self, host: Host) -> Endpoint:
        return self._endpoints.endpoint(host)

    def release(self, host: Host) -> None:
        """Close the cached connection to `host` now (callers that will not talk to it again, like
        the kill switch, free its thread and socket instead of keeping them until `close()`)."""
        self.drop(self.endpoint(host))

    def drop(self, endpoint: Endpoint) -> None:
        """Forget (and close) the cached connection to `endpoint`."""
        with self._lock:
            slot = self._slots.pop(endpoint, None)
        if slot is not None and slot.transport is not None:
            slot.transport.close()

    # -- connections -----------------------------------------------------------------------------
    def _cached(self, endpoint: Endpoint) -> paramiko.Transport | None:
        with self._lock:
            slot = self._slots.get(endpoint)
        return slot.transport if slot is not None and slot.transport is not None else None

    def _connection(self, endpoint: Endpoint) -> paramiko.Transport:
        with self._lock:
            if self._closed:
                raise errors.HostUnreachable(endpoint.alias, "transport is closed")
            slot = self._slots.setdefault(endpoint, _Slot())
        with slot.lock:
            if slot.transport is not None and slot.transport.is_active():
                return slot.transport
            slot.transport = self._connect(endpoint)
            return slot.transport

    def _connect(self, endpoint: Endpoint) -> paramiko.Transport:
        sock = self._socket(endpoint)
        transport = _Transport(sock)
        try:
            with self._handshakes or contextlib.nullcontext():
                self._handshake(transport, endpoint)
                self._authenticate(transport, endpoint)
        except BaseException:
            transport.close()
            raise
        if self._keepalive:
            transport.set_keepalive(self._keepalive)
        return transport

    def _socket(self, endpoint: Endpoint) -> socket.socket | paramiko.Channel:
        where = f"{endpoint.hostname}:{endpoint.port}"
        try:
            if endpoint.via is not None:
                jump = self._connection(endpoint.via)
                return jump.open_channel("direct-tcpip", (endpoint.hostname, endpoint.port),
                                         ("127.0.0.1", 0), timeout=endpoint.connect_timeout)
            if endpoint.netns:
                return self._namespace(endpoint.netns).create_connection(
                    (endpoint.hostname, endpoint.port), endpoint.connect_timeout)
            return socket.create_connection((endpoint.hostname, endpoint.port), endpoint.connect_timeout)
        except errors.TransportError:
            raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            via = f" via {endpoint.via.alias}" if endpoint.via else ""
            ns = f" in netns {endpoint.netns}" if endpoint.netns else ""
            raise errors.HostUnreachable(endpoint.alias, f"TCP connect to {where}{via}{ns} failed: {exc}") \
                from exc

    def _namespace(self, name: str) -> NetnsSockets:
        with self._lock:
            space = self._netns.get(name)
            if space is None:
                space = self._netns[name] = NetnsSockets(name)
            return space

    def _handshake(self, transport: paramiko.Transport, endpoint: Endpoint) -> None:
        known = self._endpoints.known_hosts(endpoint.known_hosts)
        expected = known.keys_for(endpoint.key_name)
        _prefer_algorithms(transport, {kind for kind, _ in expected})
        transport.banner_timeout = endpoint.connect_timeout
        transport.handshake_timeout = endpoint.connect_timeout
        transport.auth_timeout = endpoint.connect_timeout
        try:
            transport.start_client(timeout=endpoint.connect_timeout)  # returns quietly on timeout
            server_key = transport.get_remote_server_key() if transport.host_key is not None else None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise errors.HostUnreachable(endpoint.alias, f"SSH handshake failed: {exc}") from exc
        if server_key is None:
            why = f"SSH handshake failed: no key exchange within {endpoint.connect_timeout:g} s"
            raise errors.HostUnreachable(endpoint.alias, why)
        _verify_host_key(endpoint, server_key, expected, known)

    def _authenticate(self, transport: paramiko.Transport, endpoint: Endpoint) -> None:
        tried: list[str] = []
        for path in endpoint.identities:
            key = self._identity(endpoint, path)
            tried.append(path)
            if key is not None and _try_key(transport, endpoint, key):
                return
        if self._agent:
            agent = paramiko.Agent()
            try:
                agent_keys = agent.get_keys()
                tried.append(f"{len(agent_keys)} ssh-agent key(s)")
                if any(_try_key(transport, endpoint, key) for key in agent_keys):
                    return
            finally:
                agent.close()
        tried_text = ", ".join(tried) or "nothing"
        raise errors.HostUnreachable(endpoint.alias,
                                     f"authentication as {endpoint.user!r} failed (tried: {tried_text})")

    def _identity(self, endpoint: Endpoint, path: str) -> paramiko.PKey | None:
        with self._lock:
            if path in self._keys:
                return self._keys[path]
        try:
            key = paramiko.PKey.from_path(path)
        except FileNotFoundError:
            return None
        except (paramiko.SSHException, OSError, ValueError) as exc:
            raise errors.HostUnreachable(
                endpoint.alias, f"cannot load identity file {path} (encrypted? use ssh-agent): "
                                f"{type(exc).__name__}") from exc
        with self._lock:
            self._keys[path] = key
        return key

    # -- commands --------------------------------------------------------------------------------
    def _open_session(self, host: Host, transport: paramiko.Transport,
                      endpoint: Endpoint) -> paramiko.Channel:
        try:
            return transport.open_session(timeout=endpoint.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.drop(endpoint)
            raise errors.HostUnreachable(host.fqdn, f"cannot open a session: {exc}") from exc

    def _execute(self, host: Host, channel: paramiko.Channel, command: str, stdin: str | None,
                 timeout: float, started: float) -> CommandResult:
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            if stdin is not None:
                channel.sendall(stdin.encode())
            channel.shutdown_write()
            _read_until_eof(channel, out, err, deadline)
            if not channel.status_event.wait(max(deadline - time.monotonic(), 0)):
                raise TimeoutError("no exit status")
            _drain_stderr(channel, err)
            code = channel.recv_exit_status()
        except TimeoutError as exc:
            raise errors.CommandTimeout(host.fqdn, f"command did not finish within {timeout:g} s") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise errors.CommandTimeout(host.fqdn, f"connection lost while the command ran: {exc}") from exc
        finally:
            channel.close()
        return CommandResult(host=host.fqdn, exit_code=code, stdout=_text(out), stderr=_text(err),
                             duration=time.monotonic() - started)


def _read_until_eof(channel: paramiko.Channel, out: list[bytes], err: list[bytes], deadline: float) -> None:
    """Read stdout to EOF (the exit status may arrive before the last output), keeping stderr drained
    so a chatty stderr cannot stall the channel window."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("command timeout")
        channel.settimeout(min(remaining, _STDERR_DRAIN_PERIOD))
        try:
            chunk = channel.recv(65536)
        except TimeoutError:
            _drain_stderr(channel, err)
            continue
        if not chunk:
            return
        out.append(chunk)
        _drain_stderr(channel, err)


def _drain_stderr(channel: paramiko.Channel, err: list[bytes]) -> None:
    while channel.recv_stderr_ready():
        err.append(channel.recv_stderr(65536))


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", errors="replace")


def relabel(exc: errors.TransportError, host: Host) -> errors.TransportError:
    """Name the inventory host in the message (connection errors are raised per endpoint)."""
    if exc.host == host.fqdn:
        return exc
    detail = exc.message.removeprefix(f"{exc.host}: ")
    return type(exc)(host.fqdn, f"[{exc.host}] {detail}")


def _try_key(transport: paramiko.Transport, endpoint: Endpoint, key: paramiko.PKey) -> bool:
    try:
        transport.auth_publickey(endpoint.user, key)
    except paramiko.AuthenticationException:
        return False
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise errors.HostUnreachable(endpoint.alias, f"authentication did not complete: {exc}") from exc
    return transport.is_authenticated()


def _prefer_algorithms(transport: paramiko.Transport, known_types: set[str]) -> None:
    """Fast algorithms first; host key types we hold a key for before anything else (as OpenSSH does),
    so a host with several keys presents the one we can check."""
    options = transport.get_security_options()
    options.kex = _ordered(options.kex, _FAST_KEX)
    options.ciphers = _ordered(options.ciphers, _FAST_CIPHERS)
    key_types = tuple(sorted(known_types, key=lambda t: t != "ssh-ed25519"))
    options.key_types = _ordered(options.key_types, key_types + _FAST_KEYS)


def _ordered(available: Sequence[str], first: Sequence[str]) -> tuple[str, ...]:
    head = tuple(dict.fromkeys(a for a in first if a in available))
    return head + tuple(a for a in available if a not in head)


def _verify_host_key(endpoint: Endpoint, key: paramiko.PKey, expected: set[KeyId], known: KnownHosts) -> None:
    presented: KeyId = (key.get_name(), key.asbytes())
    if presented[1] not in known.revoked and presented in expected:
        return
    raise host_key_refusal(endpoint, presented, key.fingerprint, expected, known)


def host_key_refusal(endpoint: Endpoint, presented: KeyId, fingerprint: str, expected: set[KeyId],
                     known: KnownHosts) -> errors.HostKeyMismatch:
    """The error for a presented host key we do not accept (shared by both SSH clients)."""
    if presented[1] in known.revoked:
        problem = "presented a host key marked @revoked"
    elif expected:
        problem = "presented a host key that DIFFERS from the known one (changed key: possible MITM)"
    else:
        problem = "is not in known_hosts (unknown host key)"
    files = ", ".join(known.files)
    return errors.HostKeyMismatch(
        endpoint.alias,
        f"host {endpoint.key_name} {problem}; presented {presented[0]} {fingerprint}; "
        f"files checked: {files}. Nothing was run. Fix: fetch the key with `ssh-keyscan -p {endpoint.port} "
        f"{endpoint.hostname}`, verify its fingerprint out of band (console, Puppet facts), then add it "
        f"to {known.files[0]}",
    )
