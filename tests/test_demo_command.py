"""``stepup-gateway demo`` as a person runs it: a process that prints a URL and stops
cleanly on Ctrl-C (SIGINT) or SIGTERM. Plus the package data it needs."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
WELCOME = re.compile(r"Demo Bank, behind stepup-gateway:\s+(?P<url>http://localhost:\d+)/")
IDP = re.compile(r"identity provider: (?P<url>http://localhost:\d+)")
START_TIMEOUT_S = 15  # imports and start-up; typically well under a second
STOP_TIMEOUT_S = 5


async def demo_process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "demo",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_welcome(process: asyncio.subprocess.Process) -> str:
    """stdout up to "Press Ctrl-C to stop."; fails with stderr if the process ends first."""
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []
    while not lines or "Press Ctrl-C to stop." not in lines[-1]:
        line = (await process.stdout.readline()).decode()
        if not line:
            stderr = (await process.stderr.read()).decode()
            raise AssertionError(f"demo ended before it was ready:\n{''.join(lines)}\n{stderr}")
        lines.append(line)
    return "".join(lines)


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for process in started:  # a failed test must not leave a demo running
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "term"])
async def test_demo_prints_the_url_serves_and_stops_cleanly(
    processes: list[asyncio.subprocess.Process], stop_signal: signal.Signals
) -> None:
    process = await demo_process("--port", "0")
    processes.append(process)
    welcome = await asyncio.wait_for(read_welcome(process), START_TIMEOUT_S)
    url_match, idp_match = WELCOME.search(welcome), IDP.search(welcome)
    assert url_match and idp_match, welcome
    assert "alice  password: alice-demo-password" in welcome
    assert "TOTP secret: BGHWJLB5ECG4WMRWV6KFKPBBHGBTMOB3" in welcome
    assert "bob  password: bob-demo-password" in welcome
    assert '"event"' not in welcome  # the JSON log lines go to stderr

    url, idp = url_match["url"], idp_match["url"]
    async with aiohttp.ClientSession() as http:
        # A browser opening the printed URL is sent to the provider to sign in ...
        async with http.get(
            f"{url}/", headers={"Accept": "text/html"}, allow_redirects=False
        ) as reply:
            assert reply.status == 302
            assert reply.headers["Location"].startswith(f"{idp}/authorize?")
        async with http.get(f"{url}/", headers={"Accept": "text/html"}) as reply:
            assert reply.status == 200
            assert str(reply.url).startswith(f"{idp}/login/")
            assert "<h1>Sign in</h1>" in await reply.text()
        # ... and the process stops at once even with this keep-alive connection open.
        process.send_signal(stop_signal)
        _, stderr = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT_S)
    assert process.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert '"event": "stopped"' in stderr.decode()


async def test_demo_keeps_passkeys_in_the_file_it_is_given(
    processes: list[asyncio.subprocess.Process], tmp_path: Path
) -> None:
    passkeys = tmp_path / "passkeys.json"
    passkeys.write_text("not json")  # proves the flag reaches the provider's store
    process = await demo_process("--port", "0", "--passkeys", str(passkeys))
    processes.append(process)
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_S)
    assert process.returncode == 1
    assert f"cannot start the demo: cannot read passkeys from {passkeys}" in stderr.decode()
    assert "Traceback" not in stderr.decode()


async def test_a_taken_port_is_one_clear_line(
    processes: list[asyncio.subprocess.Process],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await demo_process("--port", str(port))
        processes.append(process)
        _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_S)
    assert process.returncode == 1
    errors = stderr.decode()
    assert "cannot start the demo: " in errors
    assert f"is another demo running on port {port}? --port 0 picks a free one" in errors
    assert "Traceback" not in errors and "Unclosed" not in errors


def test_the_demo_files_ship_in_the_wheel() -> None:
    """Every non-Python file under stepup_demo matches a package-data pattern."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = pyproject["tool"]["setuptools"]
    assert "stepup_demo*" in setuptools["packages"]["find"]["include"]
    patterns = setuptools["package-data"]["stepup_demo"]
    package = ROOT / "stepup_demo"
    data = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert {"demo.yaml", "users.yaml", "static/passkey.js", "static/demo.css"} <= set(data)
    assert [name for name in data if not any(fnmatch(name, p) for p in patterns)] == []
