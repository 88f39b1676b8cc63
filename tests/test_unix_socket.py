"""``server.unix_socket``: the gateway also listening on a unix socket for a front proxy
on the same host. The file it makes (mode, a stale one replaced, anything else left
alone, removed at exit), and who is trusted on it: only with ``unix`` in
``trusted_proxies``, whatever name the client gave its own end of the socket."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config_text
from tests.conftest import StackFactory, free_port
from tests.support.upstream import header_values
from tests.test_config import BASE
from tests.test_forward_auth import socket_dir
from tests.test_operations import (
    PUBLIC_RULES,
    GatewayProcess,
    gateway_process,
    slow_upstream,
    write_config,
)

__all__ = ["gateway_process", "slow_upstream"]  # the fixtures, imported for pytest


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with socket_dir() as directory:
        yield directory


async def unix_get(path: str, url_path: str, **headers: str) -> tuple[int, dict[str, Any]]:
    """GET over the unix socket at ``path``: (status, the JSON body or {})."""
    connector = aiohttp.UnixConnector(path=path)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"http://127.0.0.1{url_path}", headers=headers, allow_redirects=False) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body


# -- the socket file -----------------------------------------------------------------


async def test_run_listens_on_the_socket_with_its_mode_and_removes_it(
    gateway_process, sock_dir: str
) -> None:
    path = f"{sock_dir}/gateway.sock"
    process, url, _ = await gateway_process(
        extra=f"unix_socket: {path}\nunix_socket_mode: '0640'\n"
    )
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    assert (await unix_get(path, "/_gateway/healthz"))[0] == 200
    assert process.events("listening")[0]["unix_socket"] == path
    async with aiohttp.ClientSession() as http, http.get(f"{url}/_gateway/healthz") as resp:
        assert resp.status == 200  # TCP as well
    process.signal(signal.SIGTERM)
    await asyncio.to_thread(process.proc.wait, 15)
    assert process.proc.returncode == 0
    assert not os.path.lexists(path)


async def test_every_worker_accepts_on_the_supervisors_socket(
    gateway_process, sock_dir: str
) -> None:
    """With several workers the supervisor makes the socket once and hands it to each,
    also to a worker that replaces one that died; it removes the file at exit."""
    path = f"{sock_dir}/gateway.sock"
    process, _, _ = await gateway_process(extra=f"workers: 2\nunix_socket: {path}\n")
    listening = process.events("listening")
    assert [e["unix_socket"] for e in listening] == [path, path]
    for count, victim in enumerate(sorted(e["pid"] for e in listening), start=1):
        assert (await unix_get(path, "/public/x"))[0] == 200
        os.kill(victim, signal.SIGKILL)
        await process.wait_for("worker_died", count=count)
        await process.wait_for("listening", count=2 + count)
    # Neither first worker is left: the two that replaced them answer on the socket.
    for _ in range(4):
        assert (await unix_get(path, "/public/x"))[0] == 200
    originals = {e["pid"] for e in listening}
    served = {e["pid"] for e in process.events("request")} - originals
    assert served and served <= {e["pid"] for e in process.events("listening")[2:]}
    process.signal(signal.SIGTERM)
    await asyncio.to_thread(process.proc.wait, 20)
    assert process.proc.returncode == 0
    assert not os.path.lexists(path)


async def test_a_stale_socket_is_replaced(gateway_process, sock_dir: str) -> None:
    path = f"{sock_dir}/gateway.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a gateway killed with -9
    await gateway_process(extra=f"unix_socket: {path}\n")
    assert (await unix_get(path, "/_gateway/healthz"))[0] == 200
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660  # the default


@pytest.mark.parametrize("kind", ["file", "live socket"])
async def test_what_is_not_a_stale_socket_is_left_alone(op: Any, sock_dir: str, kind: str) -> None:
    """Another file, or a socket something listens on: never removed; the gateway
    exits 1 with one line saying why, and no traceback."""
    path = f"{sock_dir}/gateway.sock"
    live: socket.socket | None = None
    if kind == "file":
        Path(path).write_text("data\n")
    else:
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(path)
        live.listen(1)
    config = Path(sock_dir) / "g.yaml"
    write_config(
        config,
        port=free_port(),
        issuer=op.issuer,
        upstream="http://127.0.0.1:9",
        rules=PUBLIC_RULES,
        extra=f"unix_socket: {path}\n",
    )
    process = GatewayProcess(config)
    try:
        await asyncio.to_thread(process.proc.wait, 15)
        assert process.proc.returncode == 1
        assert "Traceback" not in "\n".join(process.lines)
        [failed] = process.events("listen_failed")
        why = "exists and is not a socket" if kind == "file" else "another process listens on it"
        assert why in failed["error"] and path in failed["error"]
        if kind == "file":
            assert Path(path).read_text() == "data\n"
        else:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        process.stop()
        if live is not None:
            live.close()


# -- the configuration ----------------------------------------------------------------


def with_server(server: str) -> str:
    """The configuration the config tests start from, with ``server`` keys added."""
    anchor = "  public_url: https://gw.example.com\n"
    return BASE.replace(anchor, anchor + server)


def problems(server: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config_text(with_server(server), "config.yaml")
    return str(caught.value)


def test_the_keys_are_read() -> None:
    server = "  unix_socket: /run/g/gateway.sock\n  unix_socket_mode: '0600'\n"
    server += "  trusted_proxies: [10.0.0.0/8, unix]\n"
    config = load_config_text(with_server(server), "config.yaml").server
    assert config.unix_socket == "/run/g/gateway.sock"
    assert config.unix_socket_mode == 0o600
    assert config.trust_unix_socket and len(config.trusted_proxies) == 1
    plain = load_config_text(with_server(""), "config.yaml").server
    assert plain.unix_socket is None and not plain.trust_unix_socket
    assert plain.unix_socket_mode == 0o660


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("  unix_socket: run/g.sock\n", "server.unix_socket: must be an absolute path"),
        ("  unix_socket: /" + "d" * 120 + "\n", "is longer than a unix socket path may be"),
        (
            "  unix_socket: /run/g.sock\n  unix_socket_mode: '0999'\n",
            "server.unix_socket_mode: must be octal permissions like '0660'",
        ),
        (
            "  trusted_proxies: [unix]\n",
            "server.trusted_proxies: lists unix (the connections on server.unix_socket) but "
            "server.unix_socket is not set",
        ),
        ("  trusted_proxies: [unix-socket]\n", "nor unix: 'unix-socket'"),
    ],
)
def test_what_check_refuses(server: str, message: str) -> None:
    assert message in problems(server)


# -- who is trusted on the socket ---------------------------------------------------------


async def socket_stack(make_stack: StackFactory, sock_dir: str, trusted: str) -> str:
    path = f"{sock_dir}/gateway.sock"
    await make_stack(
        server_extra=f"unix_socket: {path}\nmode: both\ntrusted_proxies: {trusted}\n",
        rules="rules:\n  - name: public\n    match: {path: /**}\n    require: none\n",
    )
    return path


async def test_forwarded_for_is_believed_from_the_socket_only_when_unix_is_trusted(
    make_stack: StackFactory, sock_dir: str
) -> None:
    path = await socket_stack(make_stack, sock_dir, "[127.0.0.1/32]")
    status, record = await unix_get(path, "/public/x", X_Forwarded_For="203.0.113.7")
    assert status == 200
    assert header_values(record, "X-Forwarded-For") == ["_unix"]
    assert header_values(record, "Forwarded")[0].startswith("for=_unix;")
    status, _ = await unix_get(
        path, "/_gateway/auth", X_Original_Method="GET", X_Original_URL="http://x/public/x"
    )
    assert status == 403  # not a trusted proxy: may not describe requests


async def test_a_trusted_socket_passes_the_client_on(
    make_stack: StackFactory, sock_dir: str
) -> None:
    path = await socket_stack(make_stack, sock_dir, "[unix]")
    _, record = await unix_get(path, "/public/x", **{"X-Forwarded-For": "203.0.113.7"})
    assert header_values(record, "X-Forwarded-For") == ["203.0.113.7, _unix"]
    # A hop spelled like the socket's peer is an address the client wrote, never a proxy.
    _, record = await unix_get(path, "/public/x", **{"X-Forwarded-For": "198.51.100.1, _unix"})
    assert header_values(record, "X-Forwarded-For") == ["_unix, _unix"]


async def test_the_name_a_client_gives_its_end_is_not_its_address(
    make_stack: StackFactory, sock_dir: str
) -> None:
    """A local client binding its end of the socket as "127.0.0.1" (a trusted proxy's
    address) is still a connection on the socket, untrusted without ``unix``."""
    path = await socket_stack(make_stack, sock_dir, "[127.0.0.1/32]")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(sock_dir)
    try:
        client.bind("127.0.0.1")  # the peer name the gateway's end would report
    finally:
        os.chdir(here)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(client, path)
        request = (
            "GET /_gateway/auth HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Original-Method: GET\r\n"
            "X-Original-URL: http://127.0.0.1/public/x\r\nConnection: close\r\n\r\n"
        )
        await loop.sock_sendall(client, request.encode())
        answer = b""
        while chunk := await loop.sock_recv(client, 65536):
            answer += chunk
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:80]
