"""Throughput and latency of one gateway process against nginx, on this machine.

Rows (each measured with wrk after a warm-up, all on loopback):

    upstream           nginx answering ``200 ok`` by itself
    nginx-proxy        nginx as a plain keep-alive reverse proxy in front of it
    aiohttp-alone      the floor: aiohttp's server answering ``200 ok`` by itself
    aiohttp-proxy      the floor: aiohttp's server forwarding over the gateway's pool
    gateway            the gateway in front of it, a valid session, 10 rules
    gateway-1k-rules   the same with 1,000 rules before the one that matches
    gateway-10k-rules  the same with 10,000 rules
    gateway-2w-redis   2 worker processes sharing the Redis session store (same core)
    gateway-jwt        the gateway row with a valid JWT access token instead of a cookie,
                       from the access-token tests' authorization server (node)
    gateway-traced     the gateway row with tracing on: every request sampled, its spans
                       batched to an OTLP endpoint (the upstream nginx, which refuses them
                       after they are encoded and sent: the gateway does all its work)
    apache-openidc     the peer: Apache httpd + mod_auth_openidc doing the gateway's job
    nginx-forward-auth nginx in front of the upstream asking the gateway's /_gateway/auth
                       (the shipped docs/forward-auth/nginx.conf: over the gateway's unix
                       socket), a valid session

The load generator runs on CPU 0 and every server on CPU 1, so one gateway process
gets one core, as nginx does with ``worker_processes 1``.

Usage: ``python bench/run.py [--duration 10] [--warmup 3] [--json PATH]``
(see bench/README.md). Everything started is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from yarl import URL

REPO = Path(__file__).resolve().parent.parent
LOAD_CPU = 0  # wrk
SERVER_CPU = 1  # nginx (both), the gateway, Apache and the test provider
HIT_PATH = "/app/bench"  # matched by the last rule, "/app/**"
START_TIMEOUT_S = 120.0  # 10,000 rules are parsed and compiled before the gateway listens
STOP_TIMEOUT_S = 10.0
SIGN_IN_TIMEOUT_S = 30.0
WRK_GRACE_S = 30.0  # beyond -d, before wrk is considered hung
# The product's bar for one gateway process (see the issue this benchmark answers).
BAR_RATIO = 0.15
BAR_P99_MS = 15.0
BAR_RULES_COST_PCT = 10.0
# ... and against the peer users would pick instead: Apache httpd + mod_auth_openidc.
BAR_PEER_RATIO = 1.5
BAR_PEER_P99_MS = 10.0
# ... and nginx asking the gateway's /auth for every request, against nginx alone.
BAR_FORWARD_AUTH_RATIO = 0.35
BAR_FORWARD_AUTH_P99_MS = 10.0

GATEWAY_ROWS = {
    "gateway": 10,
    "gateway-1k-rules": 1_000,
    "gateway-10k-rules": 10_000,
    "gateway-2w-redis": 10,
    "gateway-jwt": 10,
    "gateway-traced": 10,
}
TRACED_ROW = "gateway-traced"
# The access-token row: an RFC 9068 token from tests/oidc-provider (npm ci there first),
# verified once and then remembered by digest, as a session cookie's opening is.
JWT_ROW = "gateway-jwt"
JWT_AUDIENCE = "https://bank.example.com/api"  # the one tests/oidc-provider issues for
# The scale-out row: two worker processes sharing the Redis session store (the one on
# 127.0.0.1:6379, database 14, a key prefix of this run's). Pinned to the same single
# server core as the other rows, so it shows what Redis and a second process cost,
# not what a second core buys.
SCALE_OUT = {"gateway-2w-redis": (2, "redis")}
REDIS_BENCH_URL = "redis://127.0.0.1:6379/14"
# What the gateway is built on, doing none of the gateway's work (bench/floor.py).
FLOOR_ROWS = {"aiohttp-alone": "alone", "aiohttp-proxy": "proxy"}
PEER_ROW = "apache-openidc"
FORWARD_AUTH_ROW = "nginx-forward-auth"
ALL_ROWS = ("upstream", "nginx-proxy", *FLOOR_ROWS, *GATEWAY_ROWS, PEER_ROW, FORWARD_AUTH_ROW)
# The forward-auth row runs the server block operators copy, its ports substituted.
SHIPPED_NGINX = REPO / "docs" / "forward-auth" / "nginx.conf"
NGINX_FORWARD_AUTH_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/fa.pid;
error_log {tmp}/fa-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/fa-body;
    proxy_temp_path {tmp}/fa-proxy;
    fastcgi_temp_path {tmp}/fa-fastcgi;
    uwsgi_temp_path {tmp}/fa-uwsgi;
    scgi_temp_path {tmp}/fa-scgi;
    keepalive_requests {keepalive_requests};
    include {tmp}/fa-site.conf;
}}
"""

# Every connection stays open for the whole run in every row: nginx's default of
# 1,000 requests per connection would make the nginx rows pay reconnects that the
# gateway's client pool (no per-connection limit) does not.
KEEPALIVE_REQUESTS = 1_000_000

NGINX_UPSTREAM_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/upstream.pid;
error_log {tmp}/upstream-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/upstream-body;
    proxy_temp_path {tmp}/upstream-proxy;
    fastcgi_temp_path {tmp}/upstream-fastcgi;
    uwsgi_temp_path {tmp}/upstream-uwsgi;
    scgi_temp_path {tmp}/upstream-scgi;
    keepalive_requests {keepalive_requests};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "ok";
        }}
    }}
}}
"""

NGINX_PROXY_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/proxy.pid;
error_log {tmp}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/proxy-body;
    proxy_temp_path {tmp}/proxy-proxy;
    fastcgi_temp_path {tmp}/proxy-fastcgi;
    uwsgi_temp_path {tmp}/proxy-uwsgi;
    scgi_temp_path {tmp}/proxy-scgi;
    keepalive_requests {keepalive_requests};
    upstream app {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests {keepalive_requests};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

LEVELS_YAML = """\
assurance:
  levels:
    - name: password
      acr: [urn:example:loa:1]
    - name: mfa
      acr: [urn:example:loa:2]
      amr_any: [otp, hwk, swk]
    - name: phishing-resistant
      acr: [phr, phrh]
      amr_any: [hwk]
"""


class BenchError(Exception):
    """Something the benchmark needs did not work; the message says what."""


@dataclass
class Row:
    row: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int
    socket_errors: int
    # CPU time of every server process (all on SERVER_CPU) per request: less sensitive
    # to other load on the machine than req/s.
    server_cpu_us_per_request: float | None = None
    # Share of the two CPUs used by processes this benchmark did not start while the
    # row was measured; above OTHER_LOAD_WARN_PCT the row is flagged.
    other_load_pct: float | None = None
    ratio_to_nginx_proxy: float | None = None


# -- processes ----------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts; :meth:`stop_all` ends each one by its pid."""

    def __init__(self, tmp: Path, socket_dir: Path) -> None:
        self.tmp = tmp
        self.socket_dir = socket_dir
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int,
        env: dict[str, str] | None = None,
        stdout_to_null: bool = False,
    ) -> subprocess.Popen[bytes]:
        stderr = open(self.tmp / f"{name}.stderr", "wb")  # noqa: SIM115 - closed in stop_all
        self._logs.append(stderr)
        stdout: IO[bytes] | int = subprocess.DEVNULL
        if not stdout_to_null:
            stdout = open(self.tmp / f"{name}.stdout", "wb")  # noqa: SIM115
            self._logs.append(stdout)
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=REPO,
            start_new_session=True,  # Ctrl-C in the terminal reaches only this script
        )
        self._running.append((name, proc))
        return proc

    def session_ids(self) -> set[int]:
        """Each started process leads its own session; nginx's workers join it."""
        return {proc.pid for _, proc in self._running}

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self._running = [(n, p) for n, p in self._running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self._running)):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.stop(proc)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def stderr_tail(self, name: str, lines: int = 20) -> str:
        path = self.tmp / f"{name}.stderr"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_http(
    url: str, proc: subprocess.Popen[bytes], name: str, processes: Processes, timeout_s: float
) -> None:
    """Poll ``url`` until it answers at all (any status), or fail."""
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    request = f"GET {parts.path or '/'} HTTP/1.0\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with {proc.returncode}:\n{processes.stderr_tail(name)}"
            )
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=1.0) as sock:
                sock.sendall(request)
                if sock.recv(16).startswith(b"HTTP/"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{name} did not answer at {url} within {timeout_s:.0f} s")


# -- tools --------------------------------------------------------------------------


# Apache and its modules where Debian puts them. apache2-bin holds the server and every
# module mod_auth_openidc needs; the "apache2" package would add a system service that
# starts listening on port 80 as soon as it is installed.
APACHE = Path("/usr/sbin/apache2")
APACHE_MODULES = Path("/usr/lib/apache2/modules")


def ensure_tools(*, apache: bool) -> None:
    """Install wrk and nginx (and Apache with mod_auth_openidc) from Debian if missing."""
    wanted = {"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"}
    if apache:
        wanted[str(APACHE)] = "apache2-bin"
        wanted[str(APACHE_MODULES / "mod_auth_openidc.so")] = "libapache2-mod-auth-openidc"

    def present(tool: str) -> bool:
        return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None

    missing = [tool for tool in wanted if not present(tool)]
    if not missing:
        return
    packages = sorted({wanted[tool] for tool in missing})
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {', '.join(packages)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-q", *packages], check=True, env=env, timeout=600
    )
    still = [tool for tool in missing if not present(tool)]
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


def check_cpus() -> None:
    allowed = os.sched_getaffinity(0)
    if not {LOAD_CPU, SERVER_CPU} <= allowed:
        raise BenchError(
            f"needs CPUs {LOAD_CPU} and {SERVER_CPU} (this process may use {sorted(allowed)})"
        )


# -- CPU accounting -----------------------------------------------------------------

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_WARN_PCT = 5.0


def cpu_busy_s(cpus: Sequence[int]) -> float:
    """Seconds ``cpus`` have spent busy since boot (everything but idle and iowait)."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(f) for f in fields[:8]]
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS_S


def sessions_cpu_s(session_ids: set[int]) -> float:
    """CPU seconds used so far by the live processes in ``session_ids``."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        # After "(comm)": state ppid pgrp session ... utime(12) stime(13), 0-based.
        if int(fields[3]) in session_ids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS_S


# -- wrk ----------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str, row: str) -> Row:
    """The numbers from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rps is None or p50 is None or p99 is None or total is None:
        raise BenchError(f"cannot read wrk output for {row}:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return Row(
        row=row,
        requests_per_s=float(rps.group(1)),
        p50_ms=_latency_ms(p50.group(1)),
        p99_ms=_latency_ms(p99.group(1)),
        requests=int(total.group(1)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def run_wrk(
    url: str,
    *,
    row: str,
    args: argparse.Namespace,
    processes: Processes,
    headers: Sequence[str] = (),
) -> Row:
    base = ["taskset", "-c", str(LOAD_CPU), "wrk", f"-c{args.connections}", f"-t{args.threads}"]
    for header in headers:
        base += ["-H", header]
    for seconds, measured in ((args.warmup, False), (args.duration, True)):
        servers = processes.session_ids()
        busy_before_s = cpu_busy_s((LOAD_CPU, SERVER_CPU))
        servers_before_s = sessions_cpu_s(servers)
        children_before_s = _children_cpu_s()
        started = time.monotonic()
        wrk = subprocess.Popen(
            [*base, f"-d{seconds}s", "--latency", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = wrk.communicate(timeout=seconds + WRK_GRACE_S)
        except subprocess.TimeoutExpired as exc:
            wrk.kill()
            wrk.communicate(timeout=STOP_TIMEOUT_S)
            raise BenchError(f"wrk did not finish for {row}") from exc
        if wrk.returncode != 0:
            raise BenchError(f"wrk failed for {row}: {stderr or stdout}")
        if not measured:
            continue
        elapsed_s = time.monotonic() - started
        busy_s = cpu_busy_s((LOAD_CPU, SERVER_CPU)) - busy_before_s
        servers_s = sessions_cpu_s(servers) - servers_before_s
        # wrk is reaped by now, so its CPU time is in this process's children's.
        wrk_s = _children_cpu_s() - children_before_s
        result = parse_wrk(stdout, row)
        if result.non_2xx_3xx or result.socket_errors:
            kinds = re.search(r"Socket errors:.*", stdout)
            raise BenchError(
                f"{row}: {result.non_2xx_3xx} non-2xx/3xx answers and "
                f"{result.socket_errors} socket errors{f' ({kinds.group(0)})' if kinds else ''}; "
                "the numbers would mean nothing"
            )
        result.server_cpu_us_per_request = servers_s / max(result.requests, 1) * 1e6
        other_s = busy_s - servers_s - wrk_s
        result.other_load_pct = max(0.0, other_s / (2 * elapsed_s) * 100)
        return result
    raise AssertionError("unreachable")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- nginx --------------------------------------------------------------------------


def start_nginx(
    processes: Processes, name: str, template: str, port: int, **fields: Any
) -> subprocess.Popen[bytes]:
    tmp = processes.tmp
    conf = tmp / f"{name}.conf"
    conf.write_text(
        template.format(tmp=tmp, port=port, keepalive_requests=KEEPALIVE_REQUESTS, **fields)
    )
    # -e: the error log from the very start (before the config is read), so nothing
    # outside the temp dir is touched.
    proc = processes.start(
        name,
        ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")],
        cpu=SERVER_CPU,
    )
    wait_for_http(f"http://127.0.0.1:{port}/", proc, name, processes, 15.0)
    return proc


# -- the gateway --------------------------------------------------------------------


def rules_yaml(count: int) -> str:
    """``count`` rules: ``count - 1`` literal-prefix rules, then ``/app/**``.

    The fillers vary like a real config (methods, a host, wildcards after the
    literal part) and all come before the rule the benchmark hits, so a linear
    matcher would have to reject every one of them.
    """
    lines = ["rules:"]
    for i in range(count - 1):
        lines.append(f"  - name: svc{i}")
        if i % 10 == 3:
            lines.append(f"    match: {{path: /svc{i}/api/*/items, methods: [GET, POST]}}")
        elif i % 10 == 7:
            lines.append(f"    match: {{path: /svc{i}/**, host: svc{i}.example.com}}")
        else:
            lines.append(f"    match: {{path: /svc{i}/**}}")
        lines.append("    require: {level: password}")
    lines += [
        "  - name: app",
        "    match: {path: /app/**}",
        "    require: {level: password}",
    ]
    return "\n".join(lines) + "\n"


def gateway_yaml(
    *,
    port: int,
    upstream_port: int,
    issuer: str,
    key_file: Path,
    rules: int,
    workers: int = 1,
    store: str = "cookie",
    api: bool = False,
    public_url: str | None = None,
    server_extra: str = "",
) -> str:
    redis = (
        f"  redis_url: {REDIS_BENCH_URL}\n  redis_prefix: 'bench-{port}:'\n"
        if store == "redis"
        else ""
    )
    return (
        f"""\
server:
  listen: 127.0.0.1:{port}
  public_url: {public_url or f"http://127.0.0.1:{port}"}
  workers: {workers}
{server_extra}
  access_log: true
  log_level: info
  # As in both nginx configs: no reconnects that another row does not pay.
  keepalive_requests: {KEEPALIVE_REQUESTS}
  keepalive_max_age: 1h
upstreams:
  app: http://127.0.0.1:{upstream_port}
oidc:
  issuer: {issuer}
  client_id: gateway
  client_secret: ${{OIDC_CLIENT_SECRET}}
session:
  secret: ${{GATEWAY_SESSION_SECRET}}
  store: {store}
{redis}  cookie_secure: false
  idle_timeout: 1h
  lifetime: 12h
assertion:
  key_file: {key_file}
"""
        + LEVELS_YAML
        + rules_yaml(rules)
        + (f"api:\n  audience: {JWT_AUDIENCE}\n  dpop: off\n" if api else "")
    )


async def sign_in(server_url: str, cookie_name: str) -> str:
    """Walk a real sign-in: server -> provider -> callback; return the session cookie.

    ``server_url`` is the gateway or Apache; each redirects a browser to the provider,
    takes the answer on its own callback and sends the browser back to ``HIT_PATH``.
    """
    jar = aiohttp.CookieJar(unsafe=True)  # loopback IPs
    timeout = aiohttp.ClientTimeout(total=SIGN_IN_TIMEOUT_S)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        url = server_url + HIT_PATH
        hops: list[str] = []
        for _ in range(10):
            async with http.get(
                url, headers={"Accept": "text/html"}, allow_redirects=False
            ) as resp:
                hops.append(f"{resp.status} {url}")
                if resp.status not in (301, 302, 303, 307, 308):
                    body = await resp.text()
                    break
                url = str(resp.url.join(URL(resp.headers["Location"])))
        else:
            raise BenchError("sign-in did not finish in 10 hops:\n" + "\n".join(hops))
        if resp.status != 200 or body != "ok":
            raise BenchError(
                f"sign-in ended with {resp.status} {body[:200]!r}:\n" + "\n".join(hops)
            )
        value = next((m.value for m in jar if m.key == cookie_name), None)
        if not value:
            raise BenchError("sign-in set no session cookie:\n" + "\n".join(hops))
        # What wrk will send: the cookie alone, no Accept (an API-style request).
        async with (
            aiohttp.ClientSession(timeout=timeout) as plain,
            plain.get(server_url + HIT_PATH, headers={"Cookie": f"{cookie_name}={value}"}) as resp,
        ):
            if resp.status != 200 or await resp.text() != "ok":
                raise BenchError(f"the session cookie does not pass {server_url}: {resp.status}")
        return value


def measure_gateway(
    processes: Processes,
    args: argparse.Namespace,
    *,
    row: str,
    rules: int,
    port: int,
    upstream_port: int,
    issuer: str,
    env: dict[str, str],
    access_token: str | None = None,
) -> Row:
    tmp = processes.tmp
    config = tmp / f"{row}.yaml"
    config.write_text(
        gateway_yaml(
            port=port,
            upstream_port=upstream_port,
            issuer=issuer,
            key_file=tmp / "assertion-key.pem",
            rules=rules,
            workers=SCALE_OUT.get(row, (1, "cookie"))[0],
            store=SCALE_OUT.get(row, (1, "cookie"))[1],
            api=access_token is not None,
        )
        + (
            f"telemetry:\n  otlp_endpoint: http://127.0.0.1:{upstream_port}\n"
            if row == TRACED_ROW
            else ""
        )
    )
    proc = processes.start(
        row,
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        cpu=SERVER_CPU,
        env=env,
        stdout_to_null=True,  # the access log: written as in production, then dropped
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/_gateway/healthz", proc, row, processes, START_TIMEOUT_S)
        if access_token is None:
            cookie = asyncio.run(sign_in(url, "stepup_session"))
            credential = f"Cookie: stepup_session={cookie}"
        else:
            credential = f"Authorization: Bearer {access_token}"
            asyncio.run(check_token(url, credential))
        result = run_wrk(
            url + HIT_PATH, row=row, args=args, processes=processes, headers=[credential]
        )
    finally:
        processes.stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM):
        raise BenchError(f"{row} exited with {proc.returncode}:\n{processes.stderr_tail(row)}")
    return result


async def check_token(server_url: str, credential: str) -> None:
    """Fail unless the access token passes: a refused token would measure 401s."""
    name, _, value = credential.partition(": ")
    timeout = aiohttp.ClientTimeout(total=SIGN_IN_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(server_url + HIT_PATH, headers={name: value}) as resp,
    ):
        if resp.status != 200 or await resp.text() != "ok":
            raise BenchError(f"the access token does not pass {server_url}: {resp.status}")


def start_token_server(processes: Processes, env: dict[str, str]) -> tuple[str, str]:
    """tests/oidc-provider on the server core; (its issuer, a password-level token)."""
    server_dir = REPO / "tests" / "oidc-provider"
    if not (server_dir / "node_modules" / "oidc-provider").is_dir():
        raise BenchError(f"{JWT_ROW} needs `npm ci --prefix tests/oidc-provider` first")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    argv = ["node", str(server_dir / "server.js"), str(port)]
    proc = processes.start("token-server", argv, cpu=SERVER_CPU, env=env)
    wait_for_http(
        issuer + "/.well-known/openid-configuration", proc, "token-server", processes, 30.0
    )
    sys.path.insert(0, str(REPO))
    from tests.support.authz import authorize  # the tests' client: PKCE, no browser

    return issuer, asyncio.run(authorize(issuer)).access_token


# How the shipped nginx.conf reaches the gateway: its unix socket (server.unix_socket).
SHIPPED_GATEWAY = "server unix:/run/stepup-gateway/gateway.sock;"


def measure_forward_auth(
    processes: Processes,
    args: argparse.Namespace,
    *,
    port: int,
    gateway_port: int,
    upstream_port: int,
    issuer: str,
    env: dict[str, str],
) -> Row:
    """nginx (the shipped server block) asking the gateway, both on the server core."""
    tmp = processes.tmp
    url = f"http://127.0.0.1:{port}"
    # The shipped config asks over the gateway's unix socket; nginx's workers run as
    # another user: the socket is open to all, in a directory they may enter.
    socket_path = processes.socket_dir / "gateway.sock"
    config = tmp / "forward-auth.yaml"
    config.write_text(
        gateway_yaml(
            port=gateway_port,
            upstream_port=upstream_port,
            issuer=issuer,
            key_file=tmp / "assertion-key.pem",
            rules=GATEWAY_ROWS["gateway"],
            public_url=url,
            server_extra=(
                "  mode: forward_auth\n  trusted_proxies: [unix]\n"
                f"  unix_socket: {socket_path}\n  unix_socket_mode: '0666'\n"
            ),
        )
    )
    gateway = processes.start(
        "forward-auth-gateway",
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        cpu=SERVER_CPU,
        env=env,
        stdout_to_null=True,
    )
    site = (
        SHIPPED_NGINX.read_text()
        .replace(SHIPPED_GATEWAY, f"server unix:{socket_path};")
        .replace("server 127.0.0.1:9000;", f"server 127.0.0.1:{upstream_port};")
        .replace("listen 8080;", f"listen 127.0.0.1:{port};")
    )
    (tmp / "fa-site.conf").write_text(site)
    try:
        wait_for_http(
            f"http://127.0.0.1:{gateway_port}/_gateway/healthz",
            gateway,
            "forward-auth-gateway",
            processes,
            START_TIMEOUT_S,
        )
        nginx = start_nginx(processes, FORWARD_AUTH_ROW, NGINX_FORWARD_AUTH_CONF, port)
        try:
            cookie = asyncio.run(sign_in(url, "stepup_session"))
            return run_wrk(
                url + HIT_PATH,
                row=FORWARD_AUTH_ROW,
                args=args,
                processes=processes,
                headers=[f"Cookie: stepup_session={cookie}"],
            )
        finally:
            processes.stop(nginx)
    finally:
        processes.stop(gateway)


def measure_floor(
    processes: Processes, args: argparse.Namespace, row: str, mode: str, upstream_port: int
) -> Row:
    port = free_port()
    proc = processes.start(
        row,
        [
            sys.executable,
            str(REPO / "bench" / "floor.py"),
            mode,
            "--port",
            str(port),
            "--upstream-port",
            str(upstream_port),
        ],
        cpu=SERVER_CPU,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, row, processes, START_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}{HIT_PATH}"
        return run_wrk(url, row=row, args=args, processes=processes)
    finally:
        processes.stop(proc)


# -- the peer: Apache httpd + mod_auth_openidc ----------------------------------------

APACHE_CALLBACK_PATH = "/_oidc/callback"  # mod_auth_openidc's OIDCRedirectURI
APACHE_COOKIE = "mod_auth_openidc_session"  # its default session cookie name
# A location that needs an acr the test provider does not assert (it says loa:1): the
# session must be refused there, or the claim check on HIT_PATH proves nothing.
APACHE_STRONGER_PATH = "/mfa/bench"

# One Apache process doing the gateway row's job: a keep-alive reverse proxy in front of
# the same upstream, letting a request through only with a valid OpenID Connect session
# whose ID token says acr urn:example:loa:1 (the gateway's "password" level, LEVELS_YAML).
#
# Workers: the event MPM with one child (ServerLimit 1) of twice as many threads as wrk
# has connections. mod_auth_openidc and mod_proxy_http hold a thread for the whole of a
# request, so at least one thread per connection is needed not to queue requests behind
# a thread limit, which nginx's single event loop does not do. Exactly one per
# connection is not enough: when a request arrives on a kept-alive connection and no
# thread is idle at that instant (the one that answered the last request is still
# finishing it), the event MPM closes the connection so that the client may reconnect
# to another process (event.c, "If we don't get a worker immediately ... we close the
# connection"), and when all threads were busy it closes every idle kept-alive one;
# with one process that only costs reconnects, and wrk counts each as a read error.
# Idle threads cost nothing but memory. Every thread shares CPU 1 (taskset), so this is
# one core, as nginx's worker_processes 1 and the gateway get.
# MaxKeepAliveRequests 0 keeps every connection open, as KEEPALIVE_REQUESTS does in nginx.
#
# Sessions: OIDCSessionType server-cache (mod_auth_openidc's default, and what a single
# server runs) in OIDCCacheType shm (its default cache: shared memory in this process
# tree); the cookie is an opaque session id. Timeouts as in gateway_yaml: idle 1 h,
# lifetime 12 h. Claims reach the upstream as OIDC_CLAIM_* headers (its default,
# OIDCPassClaimsAs both), as the gateway sends X-Auth-*.
#
# The upstream: ProxyPass workers keep their connections to the backend open and reuse
# them (mod_proxy's default; one pooled connection per thread at most).
#
# Secrets come from the environment (Apache's own ${NAME} syntax), not the file.
APACHE_CONF = """\
ServerRoot {root}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {root}/httpd.pid
DefaultRuntimeDir {root}
ErrorLog {root}/error.log
LogLevel warn
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authn_core_module {modules}/mod_authn_core.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule authz_user_module {modules}/mod_authz_user.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_http_module {modules}/mod_proxy_http.so
LoadModule auth_openidc_module {modules}/mod_auth_openidc.so

StartServers 1
ServerLimit 1
ThreadLimit {threads}
ThreadsPerChild {threads}
MaxRequestWorkers {threads}
MinSpareThreads 1
MaxSpareThreads {threads}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0

# An access log line per request, written and dropped, as the gateway row does.
LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{{User-Agent}}i\\"" common
CustomLog /dev/null common

OIDCProviderMetadataURL {issuer}/.well-known/openid-configuration
OIDCClientID gateway
OIDCClientSecret ${{OIDC_CLIENT_SECRET}}
OIDCCryptoPassphrase ${{APACHE_OIDC_PASSPHRASE}}
OIDCRedirectURI http://127.0.0.1:{port}{callback}
OIDCProviderTokenEndpointAuth client_secret_basic
OIDCPKCEMethod S256
OIDCScope "openid email profile"
OIDCSessionType server-cache
OIDCCacheType shm
OIDCSessionInactivityTimeout 3600
OIDCSessionMaxDuration 43200

<Location {callback}>
    AuthType openid-connect
    Require valid-user
</Location>
# RequireAll: a bare list of Require lines means "any of them", and valid-user alone
# would then let every signed-in user through.
<Location /app/>
    AuthType openid-connect
    <RequireAll>
        Require valid-user
        Require claim acr:urn:example:loa:1
    </RequireAll>
</Location>
<Location /mfa/>
    AuthType openid-connect
    <RequireAll>
        Require valid-user
        Require claim acr:urn:example:loa:2
    </RequireAll>
</Location>
ProxyPass /app/ http://127.0.0.1:{upstream_port}/app/
ProxyPass /mfa/ http://127.0.0.1:{upstream_port}/mfa/
"""


def start_apache(
    processes: Processes,
    *,
    port: int,
    upstream_port: int,
    issuer: str,
    threads: int,
    env: dict[str, str],
) -> subprocess.Popen[bytes]:
    root = processes.tmp / PEER_ROW
    root.mkdir()
    # As root, Apache serves from an unprivileged user (it refuses to run its workers as
    # root); anyone else stays who they are and Apache ignores the line.
    user = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
    conf = root / "httpd.conf"
    conf.write_text(
        APACHE_CONF.format(
            root=root,
            port=port,
            upstream_port=upstream_port,
            issuer=issuer,
            threads=threads,
            user=user,
            modules=APACHE_MODULES,
            callback=APACHE_CALLBACK_PATH,
        )
    )
    proc = processes.start(
        PEER_ROW,
        [str(APACHE), "-d", str(root), "-f", str(conf), "-DFOREGROUND"],
        cpu=SERVER_CPU,
        env=env,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, PEER_ROW, processes, 15.0)
    except BenchError as exc:
        raise BenchError(f"{exc}\n{apache_error_log(processes)}") from exc
    return proc


def apache_error_log(processes: Processes, lines: int = 20) -> str:
    path = processes.tmp / PEER_ROW / "error.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def check_guard(server_url: str, cookie_name: str, cookie: str, issuer: str) -> None:
    """Fail unless ``server_url`` lets the session through, and only the session.

    Requests carry only the headers named here (wrk sends no Accept or User-Agent):
    the session as wrk will send it gets ``200 ok``; no session or a made-up one sends
    a browser to the provider; no session from an API client (mod_auth_openidc tells
    one by a missing Accept) gets no 2xx; the session gets no 2xx at a location that
    needs an acr the provider did not assert.
    """
    session = {"Cookie": f"{cookie_name}={cookie}"}
    forged = {"Cookie": f"{cookie_name}={secrets.token_urlsafe(20)}"}
    browser = {"Accept": "text/html"}
    checks = [
        ("the session, as wrk sends it", HIT_PATH, session, "ok"),
        ("no session, a browser", HIT_PATH, browser, "provider"),
        ("a made-up session, a browser", HIT_PATH, {**browser, **forged}, "provider"),
        ("no session, an API client", HIT_PATH, {}, "refused"),
        ("a made-up session, an API client", HIT_PATH, forged, "refused"),
        ("the session where acr loa:2 is required", APACHE_STRONGER_PATH, session, "refused"),
    ]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=SIGN_IN_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),  # each request carries only its own cookie
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
    ) as http:
        for what, path, headers, expected in checks:
            async with http.get(server_url + path, headers=headers, allow_redirects=False) as resp:
                body = await resp.text(errors="replace")
                location = resp.headers.get("Location", "")
            ok = {
                "ok": resp.status == 200 and body == "ok",
                "provider": resp.status == 302 and location.startswith(issuer + "/authorize?"),
                "refused": not 200 <= resp.status < 400,
            }[expected]
            if not ok:
                raise BenchError(
                    f"{server_url}{path}, {what}: {resp.status} {location[:60]!r} "
                    f"{body[:60]!r}, expected {expected}"
                )


def measure_apache(
    processes: Processes,
    args: argparse.Namespace,
    *,
    port: int,
    upstream_port: int,
    issuer: str,
    env: dict[str, str],
) -> Row:
    env = {**env, "APACHE_OIDC_PASSPHRASE": secrets.token_urlsafe(32)}
    proc = start_apache(
        processes,
        port=port,
        upstream_port=upstream_port,
        issuer=issuer,
        threads=2 * args.connections,  # see APACHE_CONF
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            cookie = asyncio.run(sign_in(url, APACHE_COOKIE))
            asyncio.run(check_guard(url, APACHE_COOKIE, cookie, issuer))
        except BenchError as exc:
            raise BenchError(f"{exc}\n{apache_error_log(processes)}") from exc
        result = run_wrk(
            url + HIT_PATH,
            row=PEER_ROW,
            args=args,
            processes=processes,
            headers=[f"Cookie: {APACHE_COOKIE}={cookie}"],
        )
    finally:
        processes.stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM):
        raise BenchError(
            f"{PEER_ROW} exited with {proc.returncode}:\n{apache_error_log(processes)}"
        )
    return result


# -- the run ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Row]:
    rows_wanted = set(args.rows or ALL_ROWS)
    ensure_tools(apache=PEER_ROW in rows_wanted)
    check_cpus()
    results: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="stepup-bench-") as tmp_name,
        tempfile.TemporaryDirectory(prefix="stepup-bench-socket-") as socket_dir,
    ):
        tmp = Path(tmp_name)
        # The gateway's unix socket, alone in a directory nginx's workers (another
        # user) may enter but not list; the rest of tmp stays the runner's own.
        os.chmod(socket_dir, 0o711)
        processes = Processes(tmp, Path(socket_dir))
        try:
            upstream_port = free_port()
            start_nginx(processes, "upstream", NGINX_UPSTREAM_CONF, upstream_port)
            if "upstream" in rows_wanted:
                results.append(
                    run_wrk(
                        f"http://127.0.0.1:{upstream_port}/",
                        row="upstream",
                        args=args,
                        processes=processes,
                    )
                )
                report(results[-1])
            if "nginx-proxy" in rows_wanted:
                proxy_port = free_port()
                proxy = start_nginx(
                    processes,
                    "nginx-proxy",
                    NGINX_PROXY_CONF,
                    proxy_port,
                    upstream_port=upstream_port,
                )
                try:
                    results.append(
                        run_wrk(
                            f"http://127.0.0.1:{proxy_port}/",
                            row="nginx-proxy",
                            args=args,
                            processes=processes,
                        )
                    )
                finally:
                    processes.stop(proxy)
                report(results[-1])

            for row, mode in FLOOR_ROWS.items():
                if row in rows_wanted:
                    results.append(measure_floor(processes, args, row, mode, upstream_port))
                    report(results[-1])

            gateway_rows = [(r, n) for r, n in GATEWAY_ROWS.items() if r in rows_wanted]
            peer = PEER_ROW in rows_wanted
            forward_auth = FORWARD_AUTH_ROW in rows_wanted
            if gateway_rows or peer or forward_auth:
                # One provider for every row that signs in; its one client ("gateway")
                # has each server's callback registered.
                client_secret = secrets.token_urlsafe(24)
                env = {
                    **os.environ,
                    "OIDC_CLIENT_SECRET": client_secret,
                    "OP_CLIENT_SECRET": client_secret,
                    "GATEWAY_SESSION_SECRET": secrets.token_urlsafe(32),
                    "PYTHONPATH": str(REPO),
                }
                ports = {row: free_port() for row, _ in gateway_rows}
                peer_port = free_port()
                fa_port, fa_gateway_port = free_port(), free_port()
                op_port = free_port()
                issuer = f"http://127.0.0.1:{op_port}"
                op_argv = [sys.executable, "-m", "tests.support.op", "--port", str(op_port)]
                for port in (*ports.values(), fa_port):
                    op_argv += ["--redirect-uri", f"http://127.0.0.1:{port}/_gateway/callback"]
                if peer:
                    op_argv += [
                        "--redirect-uri",
                        f"http://127.0.0.1:{peer_port}{APACHE_CALLBACK_PATH}",
                    ]
                op = processes.start("provider", op_argv, cpu=SERVER_CPU, env=env)
                wait_for_http(
                    issuer + "/.well-known/openid-configuration", op, "provider", processes, 30.0
                )
            if gateway_rows or forward_auth:
                key = ec.generate_private_key(ec.SECP256R1())
                (tmp / "assertion-key.pem").write_bytes(
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                for row, rules in gateway_rows:
                    token_issuer, access_token = (
                        start_token_server(processes, env) if row == JWT_ROW else (issuer, None)
                    )
                    results.append(
                        measure_gateway(
                            processes,
                            args,
                            row=row,
                            rules=rules,
                            port=ports[row],
                            upstream_port=upstream_port,
                            issuer=token_issuer,
                            env=env,
                            access_token=access_token,
                        )
                    )
                    report(results[-1])
            if forward_auth:
                results.append(
                    measure_forward_auth(
                        processes,
                        args,
                        port=fa_port,
                        gateway_port=fa_gateway_port,
                        upstream_port=upstream_port,
                        issuer=issuer,
                        env=env,
                    )
                )
                report(results[-1])
            if peer:
                results.append(
                    measure_apache(
                        processes,
                        args,
                        port=peer_port,
                        upstream_port=upstream_port,
                        issuer=issuer,
                        env=env,
                    )
                )
                report(results[-1])
        finally:
            processes.stop_all()
    baseline = next((r for r in results if r.row == "nginx-proxy"), None)
    for result in results:
        if baseline is not None and baseline.requests_per_s > 0:
            result.ratio_to_nginx_proxy = result.requests_per_s / baseline.requests_per_s
    return results


def report(row: Row) -> None:
    print(
        f"  measured {row.row}: {row.requests_per_s:,.0f} req/s, "
        f"p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms",
        file=sys.stderr,
        flush=True,
    )


def rules_cost_pct(results: Sequence[Row]) -> float | None:
    by_row = {r.row: r for r in results}
    few, many = by_row.get("gateway"), by_row.get("gateway-10k-rules")
    if few is None or many is None or few.requests_per_s <= 0:
        return None
    return (few.requests_per_s - many.requests_per_s) / few.requests_per_s * 100


def peer_ratio(results: Sequence[Row]) -> float | None:
    """The gateway's requests per second over Apache + mod_auth_openidc's."""
    by_row = {r.row: r for r in results}
    gateway, peer = by_row.get("gateway"), by_row.get(PEER_ROW)
    if gateway is None or peer is None or peer.requests_per_s <= 0:
        return None
    return gateway.requests_per_s / peer.requests_per_s


def table(results: Sequence[Row]) -> Iterator[str]:
    yield (
        f"{'row':<20}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'x nginx-proxy':>15}"
        f"{'cpu us/req':>12}{'other load':>12}"
    )
    for r in results:
        ratio = f"{r.ratio_to_nginx_proxy:.3f}" if r.ratio_to_nginx_proxy is not None else "-"
        cpu = f"{r.server_cpu_us_per_request:.0f}" if r.server_cpu_us_per_request else "-"
        other = "-"
        if r.other_load_pct is not None:
            flag = " !" if r.other_load_pct > OTHER_LOAD_WARN_PCT else ""
            other = f"{r.other_load_pct:.0f}%{flag}"
        yield (
            f"{r.row:<20}{r.requests_per_s:>10,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{ratio:>15}"
            f"{cpu:>12}{other:>12}"
        )
    cost = rules_cost_pct(results)
    if cost is not None:
        yield f"10k rules vs 10 rules: {cost:+.1f}% throughput cost"
    by_row = {r.row: r for r in results}
    one, scaled = by_row.get("gateway"), by_row.get("gateway-2w-redis")
    if one is not None and scaled is not None and one.requests_per_s > 0:
        yield (
            f"2 workers + Redis store vs 1 worker + cookie store (same core): "
            f"{scaled.requests_per_s / one.requests_per_s:.2f}x throughput, "
            f"p99 {scaled.p99_ms:.2f} ms vs {one.p99_ms:.2f} ms"
        )
    ratio = peer_ratio(results)
    if one is not None and ratio is not None:
        yield (
            f"gateway vs {PEER_ROW}: {ratio:.2f}x throughput, "
            f"p99 {one.p99_ms:.2f} ms vs {by_row[PEER_ROW].p99_ms:.2f} ms"
        )
    if any((r.other_load_pct or 0) > OTHER_LOAD_WARN_PCT for r in results):
        yield (
            f"! other processes used more than {OTHER_LOAD_WARN_PCT:g}% of CPUs "
            f"{LOAD_CPU}-{SERVER_CPU} during a row: its numbers are low; run again"
        )


def bar(results: Sequence[Row]) -> Iterator[str]:
    """The product's bar, checked on the one-process gateway rows.

    The scale-out row (two workers sharing one core and Redis) is for reading
    what Redis and a second process cost, the traced row (every request sampled) for
    what tracing costs; the bar is for one process as it ships. Against the
    peer (Apache + mod_auth_openidc) the target is for the ``gateway`` row; nginx +
    forward-auth has its own, against nginx alone.
    """
    for r in results:
        if not r.row.startswith("gateway") or r.row in SCALE_OUT or r.row == TRACED_ROW:
            continue
        if r.ratio_to_nginx_proxy is not None:
            ok = r.ratio_to_nginx_proxy >= BAR_RATIO
            ratio = r.ratio_to_nginx_proxy
            yield f"{'ok  ' if ok else 'MISS'} {r.row}: {ratio:.3f}x >= {BAR_RATIO}x nginx-proxy"
        ok = r.p99_ms < BAR_P99_MS
        yield f"{'ok  ' if ok else 'MISS'} {r.row}: p99 {r.p99_ms:.2f} ms < {BAR_P99_MS:g} ms"
    cost = rules_cost_pct(results)
    if cost is not None:
        ok = cost < BAR_RULES_COST_PCT
        yield f"{'ok  ' if ok else 'MISS'} 10k rules cost {cost:.1f}% < {BAR_RULES_COST_PCT:g}%"
    forward_auth = next((r for r in results if r.row == FORWARD_AUTH_ROW), None)
    if forward_auth is not None and forward_auth.ratio_to_nginx_proxy is not None:
        ratio = forward_auth.ratio_to_nginx_proxy
        ok = ratio >= BAR_FORWARD_AUTH_RATIO and forward_auth.p99_ms <= BAR_FORWARD_AUTH_P99_MS
        yield (
            f"{'ok  ' if ok else 'MISS'} {FORWARD_AUTH_ROW}: {ratio:.3f}x >= "
            f"{BAR_FORWARD_AUTH_RATIO}x nginx-proxy with p99 {forward_auth.p99_ms:.2f} ms "
            f"<= {BAR_FORWARD_AUTH_P99_MS:g} ms"
        )
    ratio = peer_ratio(results)
    if ratio is not None:
        gateway = next(r for r in results if r.row == "gateway")
        ok = ratio >= BAR_PEER_RATIO
        yield f"{'ok  ' if ok else 'MISS'} gateway: {ratio:.2f}x >= {BAR_PEER_RATIO:g}x {PEER_ROW}"
        ok = gateway.p99_ms <= BAR_PEER_P99_MS
        yield (
            f"{'ok  ' if ok else 'MISS'} gateway: p99 {gateway.p99_ms:.2f} ms "
            f"<= {BAR_PEER_P99_MS:g} ms (with the {PEER_ROW} target)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per row")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before each")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", choices=ALL_ROWS, help="default: all")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)

    # SIGTERM ends the run like Ctrl-C: through the finally blocks that stop everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    try:
        results = run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    command = (
        f"wrk -c{args.connections} -t{args.threads} -d{args.duration}s --latency "
        f"(after {args.warmup} s of warm-up); wrk on CPU {LOAD_CPU}, servers on CPU {SERVER_CPU}"
    )
    print(command)
    for line in table(results):
        print(line)
    for line in bar(results):
        print(line)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "machine": platform.node(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load": command,
                    "rows": [asdict(r) for r in results],
                    "rules_cost_pct": rules_cost_pct(results),
                    "gateway_vs_apache_openidc": peer_ratio(results),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
