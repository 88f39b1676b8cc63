"""The load suite's parts, shared by tests/test_load.py (short, asserted) and
bench/load.py (long, reported): a gateway process with Redis sessions in front of a
fast upstream process, a signed-in cookie, and a keep-alive load generator that
records what became of every request it sent.

Every request ends as one of:

    a status   a complete response arrived
    LOST       it was written on a connection, and no complete response came back
               (a reset, an empty reply on a kept connection, a cut answer, a timeout)
    REFUSED    the connection could not be opened: the request was never sent

A drain or a keep-alive limit may refuse, never lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import CLIENT_SECRET, Browser, free_port
from tests.support.rawhttp import read_response, request_bytes
from tests.support.serving import wait_for_port

REPO = Path(__file__).resolve().parent.parent.parent
LOST = 0
REFUSED = -1
REQUEST_TIMEOUT_S = 30.0
REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class Tally:
    """(completion time, outcome) for every request, outcome a status, LOST or REFUSED."""

    outcomes: list[tuple[float, int]] = field(default_factory=list)

    def counts(self, since: float = 0.0, until: float = float("inf")) -> Counter[int]:
        return Counter(code for at, code in self.outcomes if since <= at < until)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        counts = self.counts(since, until)
        return {
            "ok": sum(n for code, n in counts.items() if 200 <= code < 400),
            "status_503": counts.get(503, 0),
            "other_status": sum(n for code, n in counts.items() if code >= 400 and code != 503),
            "lost": counts.get(LOST, 0),
            "refused": counts.get(REFUSED, 0),
        }


class Load:
    """``connections`` keep-alive clients, each sending its next request as soon as
    it has the previous answer (what wrk does), until :meth:`stop`."""

    def __init__(self, port: int, request: bytes, connections: int) -> None:
        self.port = port
        self.request = request
        self.connections = connections
        self.tally = Tally()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.connections)]

    async def stop(self) -> Tally:
        """Let every client finish the request it has out, then end."""
        self._stopping = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), REQUEST_TIMEOUT_S + 10)
        return self.tally

    async def _client(self) -> None:
        record = self.tally.outcomes.append
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while not self._stopping:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    record((time.monotonic(), REFUSED))
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            writer.write(self.request)
            try:
                answer = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
            except (asyncio.IncompleteReadError, OSError, TimeoutError, ValueError):
                record((time.monotonic(), LOST))
                writer.close()
                writer = None
                continue
            record((time.monotonic(), answer.status))
            if answer.closes:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()


class GatewayUnderLoad:
    """``stepup-gateway run`` (``workers`` processes, Redis sessions, a signed-in
    cookie) in front of ``bench/floor.py alone`` (200 ok from memory)."""

    def __init__(self, tmp: Path, issuer: str, *, workers: int = 2, server_extra: str = "") -> None:
        self.tmp = tmp
        self.issuer = issuer
        self.workers = workers
        self.server_extra = server_extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = f"load-{self.port}:"
        self.cookie = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.upstream: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"gateway-{self.port}.log"

    @property
    def redirect_uri(self) -> str:
        return f"{self.url}/_gateway/callback"

    async def start(self) -> None:
        upstream_port = free_port()
        self.upstream = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "floor.py"),
                "alone",
                "--port",
                str(upstream_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        config = self.tmp / f"gateway-{self.port}.yaml"
        config.write_text(
            textwrap.dedent(f"""\
            server:
              listen: 127.0.0.1:{self.port}
              public_url: {self.url}
              workers: {self.workers}
              access_log: false
              shutdown_timeout: 10s
            """)
            + textwrap.indent(self.server_extra, "  ")
            + textwrap.dedent(f"""\
            upstreams:
              app: http://127.0.0.1:{upstream_port}
            oidc:
              issuer: {self.issuer}
              client_id: gateway
              client_secret: {CLIENT_SECRET}
            session:
              secret: load-suite-session-secret-0123456789abcdef
              store: redis
              redis_url: {REDIS_URL}
              redis_prefix: '{self.prefix}'
              cookie_secure: false
              idle_timeout: 1h
            assurance:
              levels:
                - name: password
                  acr: [urn:example:loa:1]
            rules:
              - name: signed-in
                match: {{path: /**}}
                require: {{level: password}}
            """)
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(config)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        await wait_for_port(upstream_port, self.upstream)
        await self.wait_until_serving()
        self.cookie = await self.sign_in()

    async def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log_tail()}")
            if len(self.worker_pids()) >= self.workers and self.events("listening"):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the gateway did not start:\n{self.log_tail()}")

    async def sign_in(self) -> str:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            final = await Browser(http).follow(f"{self.url}/app/load")
            assert final.status == 200, final.body
            cookie = Browser(http).cookie("stepup_session")
        assert cookie
        return cookie

    def request(self, path: str = "/app/load") -> bytes:
        return request_bytes(
            "GET", path, f"127.0.0.1:{self.port}", {"Cookie": f"stepup_session={self.cookie}"}
        )

    # -- the processes ----------------------------------------------------------------

    def events(self, name: str) -> list[dict[str, object]]:
        import json

        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def worker_pids(self) -> list[int]:
        """The serving processes now alive (the supervisor's workers, or itself)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        pids = []
        for event in self.events("worker_started"):
            pid = int(str(event["worker_pid"]))
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat[stat.rindex(")") + 2] not in "ZX":
                    pids.append(pid)
        return pids

    def rss_mb(self) -> dict[int, float]:
        sizes = {}
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes[pid] = int(line.split()[1]) / 1024
        return sizes

    def connections_by_pid(self) -> dict[int, int]:
        """Established client connections held by each serving process."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for row in Path(table).read_text().splitlines()[1:]:
                    cols = row.split()
                    local_port = int(cols[1].rsplit(":", 1)[1], 16)
                    if local_port == self.port and cols[3] == "01":
                        inodes.add(cols[9])
        held = {}
        for pid in self.worker_pids():
            count = 0
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:[") and link[8:-1] in inodes:
                            count += 1
            held[pid] = count
        return held

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout_s)

    async def stop(self) -> None:
        for proc in (self.proc, self.upstream):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait, 5)
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(match=f"{self.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# -- scenarios ----------------------------------------------------------------------------


async def saturate(gateway: GatewayUnderLoad, connections: int, seconds: float) -> Tally:
    load = Load(gateway.port, gateway.request(), connections)
    load.start()
    await asyncio.sleep(seconds)
    return await load.stop()


@dataclass
class KillResult:
    tally: Tally
    killed_at: float
    restarted_at: float | None  # when the new worker listened
    share_of_new_worker: float  # of the client connections, at the end


async def kill_a_worker(
    gateway: GatewayUnderLoad,
    connections: int,
    before_s: float,
    after_s: float,
    spread_s: float = 13.0,
) -> KillResult:
    load = Load(gateway.port, gateway.request(), connections)
    load.start()
    await asyncio.sleep(before_s)
    old = set(gateway.worker_pids())
    victim = min(old)
    listening_before = len(gateway.events("listening"))
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    restarted_at = None
    # Load goes on for ``after_s``, and until the restarted worker has been serving
    # for a keep-alive lifetime (every connection had the chance to move).
    end = killed_at + after_s
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        if restarted_at is None and len(gateway.events("listening")) > listening_before:
            restarted_at = time.monotonic()
            end = max(end, min(restarted_at + spread_s, killed_at + 60))
    held = gateway.connections_by_pid()
    tally = await load.stop()
    new = [pid for pid in held if pid not in old]
    share = held[new[0]] / max(sum(held.values()), 1) if new else 0.0
    return KillResult(tally, killed_at, restarted_at, share)


@dataclass
class StopResult:
    tally: Tally
    exit_code: int
    stop_s: float  # from SIGTERM to exit


async def terminate_under_load(
    gateway: GatewayUnderLoad, connections: int, before_s: float
) -> StopResult:
    load = Load(gateway.port, gateway.request(), connections)
    load.start()
    await asyncio.sleep(before_s)
    started = time.monotonic()
    gateway.signal(signal.SIGTERM)
    code = await gateway.wait_exit(30)
    stop_s = time.monotonic() - started
    tally = await load.stop()
    return StopResult(tally, code, stop_s)
