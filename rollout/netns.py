"""Open TCP sockets inside a named network namespace without moving the process.

A socket belongs to the network namespace it was *created* in, for its whole life. So one dedicated
thread per namespace enters it with `setns(2)` (which only affects the calling thread) and does
nothing but create sockets on request; the caller then connects them from its own thread, so a slow
or dead host never blocks anybody else. Name resolution (`getaddrinfo`) happens in the caller's
namespace: give namespaced hosts literal addresses (the lab does).

Needs CAP_SYS_ADMIN (root) and `/run/netns/<name>` as created by `ip netns add`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import re
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from rollout import errors

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class _Request:
    family: int
    kind: int
    done: Future[socket.socket]


def _setns(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def namespace_path(name: str, netns_dir: str = NETNS_DIR) -> str:
    """`/run/netns/<name>`, refusing names that could escape the directory."""
    if not _NAME.match(name) or name in {".", ".."}:
        raise errors.InputError(f"invalid network namespace name {name!r}")
    return os.path.join(netns_dir, name)


class NetnsSockets:
    """A socket factory bound to one network namespace (thread-safe; `close()` stops its thread)."""

    def __init__(self, name: str, *, netns_dir: str = NETNS_DIR) -> None:
        self.name = name
        self.path = namespace_path(name, netns_dir)
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, name=f"netns-{name}", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout=10)
        except OSError as exc:
            raise errors.HostUnreachable(f"netns:{name}", f"cannot enter network namespace: {exc}") from exc

    def new_socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new, unconnected socket that lives in the namespace."""
        request = _Request(family=family, kind=kind, done=Future())
        self._requests.put(request)
        return request.done.result(timeout=10)

    def create_connection(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """Like `socket.create_connection`, but the socket is created inside the namespace."""
        host, port = address
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = self.new_socket(family, kind)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            del proto
        raise last or OSError(f"no address for {host}")

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        try:
            _setns(self.path)
        except OSError as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while (request := self._requests.get()) is not None:
            try:
                request.done.set_result(socket.socket(request.family, request.kind))
            except OSError as exc:
                request.done.set_exception(exc)
