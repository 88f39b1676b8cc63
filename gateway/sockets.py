"""Listening sockets: ``server.listen`` (TCP, every address it resolves to) and
``server.unix_socket`` (made with its mode, a stale one replaced, removed at exit)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from gateway.model import ServerConfig

# Connections the kernel completes while the process is at server.max_connections wait
# here (Linux caps it at net.core.somaxconn, 4096 by default since 5.4).
LISTEN_BACKLOG = 1024
# Asking whether something still listens on an existing socket file at start-up.
UNIX_PROBE_TIMEOUT_S = 1.0


def listening_sockets(
    host: str, port: int, *, reuse_port: bool, backlog: int
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (every address it
    resolves to, as asyncio's ``create_server`` does)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
            (i[0], i[1], i[2], i[3], i[4]) for i in infos
        ):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def unix_listening_socket(path: str, mode: int, *, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking unix socket at ``path`` with permissions ``mode``.

    A socket file already there is replaced when nothing listens on it (left by a
    gateway that did not stop cleanly); one something answers on, or a file of
    another kind, is an error (OSError), never removed.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(UNIX_PROBE_TIMEOUT_S)  # a listener with a full backlog
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        except TimeoutError:
            raise OSError(errno.EADDRINUSE, "another process listens on it", path) from None
        else:
            raise OSError(errno.EADDRINUSE, "another process listens on it", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Created as 0600 and then given ``mode``: never, even briefly, more open.
        umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix_socket(
    server: ServerConfig, *, backlog: int = LISTEN_BACKLOG
) -> tuple[socket.socket, tuple[str, int]]:
    """``server.unix_socket``, listening, and (its path, its inode) to remove it by."""
    assert server.unix_socket is not None
    sock = unix_listening_socket(server.unix_socket, server.unix_socket_mode, backlog=backlog)
    return sock, (server.unix_socket, os.lstat(server.unix_socket).st_ino)


def remove_unix_socket(path: str, inode: int) -> None:
    """Remove the socket file this process made (``inode``), unless another took its place."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
