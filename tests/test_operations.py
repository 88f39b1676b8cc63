"""Running the gateway as an operator does: a real `stepup-gateway run` process,
signals, config reload, worker processes, back-channel logout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import CLIENT_SECRET, SESSION_SECRET, free_port, query_of
from tests.test_gateway import COOKIE, sign_in

REPO = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """`python -m gateway run` as a child process, its JSON log lines collected."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    async def wait_for(self, name: str, count: int = 1, timeout_s: float = 15) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {count}x {name!r} in:\n" + "\n".join(self.lines[-30:]))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def write_config(
    path: Path,
    *,
    port: int,
    issuer: str,
    upstream: str,
    rules: str,
    extra: str = "",
    session_extra: str = "",
) -> None:
    path.write_text(
        textwrap.dedent(f"""\
        server:
          listen: 127.0.0.1:{port}
          public_url: http://127.0.0.1:{port}
          shutdown_timeout: 10s
        """)
        + textwrap.indent(extra, "  ")
        + textwrap.dedent(f"""\
        upstreams:
          app: {upstream}
        oidc:
          issuer: {issuer}
          client_id: gateway
          client_secret: {CLIENT_SECRET}
        session:
          secret: {SESSION_SECRET}
          cookie_secure: false
        """)
        + textwrap.indent(session_extra, "  ")
        + textwrap.dedent("""\
        assurance:
          levels:
            - name: password
              acr: [urn:example:loa:1]
        """)
        + rules
    )


PUBLIC_RULES = """\
rules:
  - name: public
    match: {path: /public/**}
    require: none
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""
LOCKED_RULES = PUBLIC_RULES.replace("require: none", "require: {level: password}")


@pytest.fixture
async def slow_upstream(aiohttp_server: Any) -> Any:
    async def handler(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0"))
        await asyncio.sleep(delay)
        return web.json_response({"path": request.path, "slept": delay})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


@pytest.fixture
async def gateway_process(tmp_path: Path, op: Any, slow_upstream: Any):
    started: list[GatewayProcess] = []

    async def start(
        rules: str = PUBLIC_RULES, extra: str = "", session_extra: str = ""
    ) -> tuple[GatewayProcess, str, Path]:
        port = free_port()
        path = tmp_path / f"gateway-{port}.yaml"
        upstream = str(slow_upstream.make_url("")).rstrip("/")
        write_config(
            path,
            port=port,
            issuer=op.issuer,
            upstream=upstream,
            rules=rules,
            extra=extra,
            session_extra=session_extra,
        )
        op.clients["gateway"].redirect_uris.append(f"http://127.0.0.1:{port}/_gateway/callback")
        process = GatewayProcess(path)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        await process.wait_for("listening", count=_workers(extra))
        return process, url, path

    yield start
    for process in started:
        process.stop()


def _workers(extra: str) -> int:
    for line in extra.splitlines():
        if line.strip().startswith("workers:"):
            return int(line.split(":")[1])
    return 1


async def test_sigterm_drains_in_flight_requests_and_exits_0(gateway_process, api):
    process, url, _ = await gateway_process()
    in_flight = asyncio.create_task(api.get(f"{url}/public/slow?delay=1.5"))
    await asyncio.sleep(0.4)
    process.signal(signal.SIGTERM)
    resp = await in_flight
    assert resp.status == 200 and (await resp.json())["slept"] == 1.5
    resp.release()
    await asyncio.to_thread(process.proc.wait, 15)
    assert process.proc.returncode == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with api.get(f"{url}/public/x"):
            pass
    assert process.events("draining") and process.events("stopped")


async def test_sighup_reloads_and_an_invalid_file_keeps_the_old_config(gateway_process, api):
    process, url, path = await gateway_process()
    async with api.get(f"{url}/public/x") as resp:
        assert resp.status == 200
    path.write_text(path.read_text().replace(PUBLIC_RULES, LOCKED_RULES))
    process.signal(signal.SIGHUP)
    await process.wait_for("config_reloaded")
    async with api.get(f"{url}/public/x") as resp:
        assert resp.status == 401
    good = path.read_text()
    path.write_text(good.replace("level: password}", "level: pasword}"))
    process.signal(signal.SIGHUP)
    failures = await process.wait_for("config_reload_failed")
    assert "unknown level 'pasword'" in json.dumps(failures[0])
    async with api.get(f"{url}/public/x") as resp:
        assert resp.status == 401  # the last good config is still in force
    async with api.get(f"{url}/_gateway/metrics") as resp:
        text = await resp.text()
    assert 'stepup_config_reloads_total{result="ok"} 1.0' in text
    assert 'stepup_config_reloads_total{result="invalid"} 1.0' in text


async def test_a_symlink_swap_is_picked_up_without_a_signal(gateway_process, api, tmp_path):
    process, url, path = await gateway_process()
    # Point the running gateway's config path at a link, as a ConfigMap mount does.
    v1 = tmp_path / "v1.yaml"
    v2 = tmp_path / "v2.yaml"
    v1.write_text(path.read_text())
    v2.write_text(path.read_text().replace(PUBLIC_RULES, LOCKED_RULES))
    link_tmp = tmp_path / "link.tmp"
    link_tmp.symlink_to(v2)
    os.replace(link_tmp, path)  # atomic swap of the file at the watched path
    await process.wait_for("config_reloaded", timeout_s=10)
    async with api.get(f"{url}/public/x") as resp:
        assert resp.status == 401


async def test_reload_that_needs_a_restart_is_refused(gateway_process, api):
    process, url, path = await gateway_process()
    path.write_text(
        path.read_text()
        .replace("store: cookie", "")
        .replace("cookie_secure: false", "cookie_secure: false\n  store: memory")
    )
    process.signal(signal.SIGHUP)
    failures = await process.wait_for("config_reload_failed")
    assert "session.store" in failures[0]["reason"]
    async with api.get(f"{url}/public/x") as resp:
        assert resp.status == 200


async def test_two_workers_share_the_port_and_a_dead_worker_is_replaced(gateway_process):
    process, url, _ = await gateway_process(extra="workers: 2\n")
    pids = {e["pid"] for e in process.events("listening")}
    assert len(pids) == 2
    # New connections spread over both workers (SO_REUSEPORT).
    seen: set[int] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(60):
            async with http.get(f"{url}/public/x") as resp:
                assert resp.status == 200
        seen = {e["pid"] for e in process.events("request")}
    assert seen == pids
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    died = await process.wait_for("worker_died")
    assert died[0]["worker_pid"] == victim
    await process.wait_for("listening", count=3)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/public/x") as resp:
        assert resp.status == 200
    process.signal(signal.SIGTERM)
    await asyncio.to_thread(process.proc.wait, 20)
    assert process.proc.returncode == 0


async def test_sign_in_whose_callback_lands_on_the_other_worker(gateway_process, op):
    import secrets

    import redis.asyncio as aioredis

    from tests.conftest import Browser

    prefix = f"test-{secrets.token_hex(4)}:"
    process, url, _ = await gateway_process(
        extra="workers: 2\n",
        session_extra=f"store: redis\nredis_url: redis://127.0.0.1:6379/13\n"
        f"redis_prefix: '{prefix}'\n",
    )
    crossed = False
    try:
        for _ in range(20):  # new connections land on either worker
            connector = aiohttp.TCPConnector(force_close=True)
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
                browser = Browser(http)
                final = await browser.follow(f"{url}/app/x")
                assert final.status == 200, final.body
            started = process.events("step_up_challenge")[-1]["pid"]
            finished = process.events("step_up_success")[-1]["pid"]
            if started != finished:
                crossed = True
                break
        assert crossed, "every callback landed on the worker that started the sign-in"
        # Every worker publishes the same assertion key.
        jwks = set()
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(20):
                async with http.get(f"{url}/_gateway/jwks.json") as resp:
                    jwks.add(json.dumps(await resp.json(), sort_keys=True))
        assert len(jwks) == 1
    finally:
        client = aioredis.from_url("redis://127.0.0.1:6379/13")
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# -- back-channel logout (in process) ----------------------------------------------


def logout_token(op: Any, **overrides: Any) -> str:
    now = int(op.now())
    claims: dict[str, Any] = {
        "iss": op.issuer,
        "aud": "gateway",
        "iat": now,
        "jti": os.urandom(8).hex(),
        "sub": "user-1",
        "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
    }
    claims.update(overrides)
    return op.sign({k: v for k, v in claims.items() if v is not None})


async def post_logout_token(api: aiohttp.ClientSession, url: str, token: str) -> int:
    async with api.post(f"{url}/_gateway/backchannel-logout", data={"logout_token": token}) as r:
        assert r.headers["Cache-Control"] == "no-store"
        return r.status


async def test_backchannel_logout_ends_every_session_of_the_subject(make_stack, api):
    stack = await make_stack(store="memory")
    browsers = []
    for _ in range(2):
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        from tests.conftest import Browser

        b = Browser(http)
        await sign_in(stack, b)
        browsers.append(b)
    try:
        token = logout_token(stack.op)
        assert await post_logout_token(api, stack.url, token) == 200
        for b in browsers:
            assert (await b.get(f"{stack.url}/app/x")).status == 302
        assert await post_logout_token(api, stack.url, token) == 400  # jti replayed
    finally:
        for b in browsers:
            await b.http.close()


@pytest.mark.parametrize(
    "overrides",
    [
        {"nonce": "n"},  # an ID token must never pass as a logout token
        {"events": {"other": {}}},
        {"events": None},
        {"sub": None},
        {"iss": "https://evil.example"},
        {"aud": "someone-else"},
        {"iat": 1},
        {"jti": None},
    ],
)
async def test_backchannel_logout_refuses_bad_tokens(make_stack, browser, api, overrides):
    stack = await make_stack(store="memory")
    await sign_in(stack, browser)
    assert await post_logout_token(api, stack.url, logout_token(stack.op, **overrides)) == 400
    assert (await browser.get(f"{stack.url}/app/x")).status == 200


async def test_backchannel_logout_with_cookie_store_and_workers_needs_redis(make_stack, api):
    # Revocations of cookie sessions would live in one worker's memory only.
    stack = await make_stack(server_extra="workers: 2\n")
    assert await post_logout_token(api, stack.url, logout_token(stack.op)) == 501
    async with api.get(f"{stack.url}/_gateway/backchannel-logout") as resp:
        assert resp.status == 405


async def test_reload_in_process_reevaluates_levels(make_stack, browser):
    stack = await make_stack()
    await sign_in(stack, browser)
    from gateway.config import load_config_text

    # The same proof (acr loa:1) now counts as nothing: the level's acr changed.
    text = stack.config_text.replace("acr: [urn:example:loa:1]", "acr: [urn:example:loa:9]")
    await stack.gateway.reload(load_config_text(text, "reloaded.yaml"))
    hop = await browser.get(f"{stack.url}/app/x")
    assert hop.status == 302
    assert query_of(hop.headers["Location"])["acr_values"] == "urn:example:loa:9"
    assert browser.cookie(COOKIE)


async def test_a_memory_store_keeps_its_sessions_across_a_reload_of_other_session_keys(
    make_stack, browser
):
    from gateway.app import ReloadRefused
    from gateway.config import load_config_text

    stack = await make_stack(store="memory", session_extra="transaction_ttl: 10m\n")
    await sign_in(stack, browser)
    # A sign-in setting may change: the store object and its sessions stay.
    text = stack.config_text.replace("transaction_ttl: 10m", "transaction_ttl: 5m")
    await stack.gateway.reload(load_config_text(text, "reloaded.yaml"))
    assert (await browser.get(f"{stack.url}/app/x")).status == 200
    # What the store is built from may not: its sessions would be lost.
    shorter_idle = text.replace("transaction_ttl: 5m", "transaction_ttl: 5m\n  idle_timeout: 5m")
    with pytest.raises(ReloadRefused, match="session store settings"):
        await stack.gateway.reload(load_config_text(shorter_idle, "reloaded.yaml"))
    assert (await browser.get(f"{stack.url}/app/x")).status == 200


def test_check_refuses_several_workers_with_the_memory_store(tmp_path):
    path = tmp_path / "c.yaml"
    write_config(
        path,
        port=8080,
        issuer="http://127.0.0.1:9",
        upstream="http://127.0.0.1:9",
        rules=PUBLIC_RULES,
        extra="workers: 2\n",
    )
    path.write_text(
        path.read_text().replace("cookie_secure: false", "cookie_secure: false\n  store: memory")
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{path}:5 server.workers: is 2 but session.store is memory" in result.stdout


def test_workers_auto_means_one_per_core(tmp_path):
    from gateway.config import load_config

    path = tmp_path / "c.yaml"
    write_config(
        path,
        port=8080,
        issuer="http://127.0.0.1:9",
        upstream="http://127.0.0.1:9",
        rules=PUBLIC_RULES,
        extra="workers: auto\n",
    )
    assert load_config(str(path)).server.workers == (os.cpu_count() or 1)


async def test_one_time_proof_is_used_once_across_two_workers(gateway_process, browser):
    import secrets

    import redis.asyncio as aioredis

    client = aioredis.from_url("redis://127.0.0.1:6379/13")
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis must run on 127.0.0.1:6379 for this test ({exc})")
    prefix = f"test-{secrets.token_hex(4)}:"
    rules = """\
rules:
  - name: one-shot
    match: {path: /one-shot, methods: [POST]}
    require: {level: password, once: true}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
"""
    redis_process, url, _ = await gateway_process(
        rules=rules,
        extra="workers: 2\n",
        session_extra=f"store: redis\nredis_url: redis://127.0.0.1:6379/13\n"
        f"redis_prefix: '{prefix}'\n",
    )
    try:
        final = await browser.follow(f"{url}/app/x")
        assert final.status == 200, final.body
        cookies = {m.key: m.value for m in browser.http.cookie_jar}
        connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
        async with aiohttp.ClientSession(connector=connector, cookies=cookies) as http:

            async def one() -> int:
                async with http.post(f"{url}/one-shot") as resp:
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(50)))
        assert statuses.count(200) == 1 and statuses.count(401) == 49
        served = {e["pid"] for e in redis_process.events("request") if e.get("rule") == "one-shot"}
        assert len(served) == 2  # both workers answered some of them
    finally:
        redis_process.stop()
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_a_sign_in_in_flight_survives_a_reload(make_stack, browser):
    from gateway.config import load_config_text

    stack = await make_stack()
    hop = await browser.get(f"{stack.url}/app/x")
    at_op = await browser.get(hop.headers["Location"])
    text = stack.config_text.replace("path: /public/**", "path: /open/**")
    await stack.gateway.reload(load_config_text(text, "reloaded.yaml"))
    back = await browser.get(at_op.headers["Location"])
    assert back.status == 303 and back.headers["Location"] == "/app/x"
