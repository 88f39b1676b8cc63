"""Real upstream servers for the differential tests: Jetty 9.4 (a servlet container,
from Debian's libjetty9-java) and Express 4 (from npm, tests/differential).

Each answers every request with what its handler saw (which handler, the path as
the server mapped it, the headers, the client address it believes), so a test can
send crafted bytes through the gateway and compare what the gateway judged with
what the upstream acted on. The servers bind 127.0.0.1 on a port they pick and
print it; a missing JDK, Jetty or node_modules is a test failure, not a skip
(scripts/test installs them).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DIFFERENTIAL_DIR = Path(__file__).resolve().parent.parent / "differential"
JAVA_DIR = Path("/usr/share/java")  # where Debian's libjetty9-java puts its jars
JETTY_JARS = (
    "jetty9-server.jar",
    "jetty9-servlet.jar",
    "jetty9-security.jar",
    "jetty9-http.jar",
    "jetty9-io.jar",
    "jetty9-util.jar",
    "servlet-api.jar",
)
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RunningServer:
    name: str
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]


def _need(path: Path, hint: str) -> None:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: {hint}")


def jetty_classpath() -> str:
    jars = [JAVA_DIR / jar for jar in JETTY_JARS]
    for jar in jars:
        _need(jar, "install the Debian package libjetty9-java (scripts/test does)")
    return os.pathsep.join(str(jar) for jar in jars)


def compile_servlet(build_dir: Path) -> str:
    """Compile SeenServer.java into ``build_dir``; the classpath to run it with."""
    javac = shutil.which("javac")
    if javac is None:
        raise RuntimeError("javac is missing: install a JDK (scripts/test installs one)")
    classpath = jetty_classpath()
    source = DIFFERENTIAL_DIR / "jetty" / "SeenServer.java"
    subprocess.run(
        [javac, "-nowarn", "-cp", classpath, "-d", str(build_dir), str(source)],
        check=True,
        capture_output=True,
    )
    return os.pathsep.join((str(build_dir), classpath))


def _wait_for_port(process: subprocess.Popen[bytes], name: str) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    buffered = b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening")
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(process.stdout.fileno(), 4096)
        buffered += chunk
        for line in buffered.splitlines():
            if line.startswith(b"PORT "):
                return int(line.split()[1])
    raise RuntimeError(f"{name} did not report its port within {START_TIMEOUT_S}s")


@contextmanager
def _running(name: str, command: list[str], cwd: Path) -> Iterator[RunningServer]:
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        port = _wait_for_port(process, name)
        yield RunningServer(name, f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def jetty(build_dir: Path) -> Iterator[RunningServer]:
    """Embedded Jetty 9.4 with servlets at /api/transfers/* and /*."""
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java is missing: install a JDK (scripts/test installs one)")
    classpath = compile_servlet(build_dir)
    # A small heap and no JIT tiers beyond C1: starts in about a second, plenty for tests.
    command = [
        java,
        "-Xmx64m",
        "-XX:TieredStopAtLevel=1",
        "-Xshare:auto",
        "-cp",
        classpath,
        "SeenServer",
    ]
    with _running("jetty", command, build_dir) as server:
        yield server


@contextmanager
def express() -> Iterator[RunningServer]:
    """Express 4 (tests/differential/express-app.js) with a transfers handler and a catch-all."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is missing: install nodejs (scripts/test installs it)")
    _need(
        DIFFERENTIAL_DIR / "node_modules" / "express" / "package.json",
        "run `npm ci --prefix tests/differential` (scripts/test does)",
    )
    with _running("express", [node, "express-app.js"], DIFFERENTIAL_DIR) as server:
        yield server
