"""Nothing a stranger sends may grow the gateway's memory, its Redis or the browser's
cookies without limit, nor push out a one-time record before it expires."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.errors import ConfigError
from gateway.session.aux import LocalAux
from tests.conftest import Clock, free_port
from tests.test_gateway import COOKIE, PHR_USER, sign_in
from tests.test_operations import GatewayProcess, write_config
from tests.test_transactional import FORM, RULES, finish_round_trip, posts

MIB = 1024 * 1024


def same_origin_form(url: str, **extra: str) -> dict[str, str]:
    return {**FORM, "Origin": url, "Accept": "text/html", **extra}


# -- one-time records are never evicted -------------------------------------------------


async def test_kept_requests_cannot_push_out_a_used_proof() -> None:
    """The store itself: a flood of kept requests is refused once their part is full;
    a claimed proof stays claimed whatever else arrives."""
    from gateway.errors import Busy  # here: the module must import on older versions too

    clock = Clock(1_000_000.0)
    aux = LocalAux(clock=clock, max_blobs=50)
    assert await aux.claim_once("proof:s:1", 3600) is True
    refused = 0
    for i in range(500):
        try:
            await aux.put_blob(f"kept:{i}", {"b": "x" * 100}, 600)
        except Busy as exc:
            refused += 1
            assert exc.status == 503 and exc.retry_after_s >= 1
    assert aux.blob_count == 50 and refused == 450
    assert await aux.claim_once("proof:s:1", 3600) is False  # still used
    clock.advance(601)  # the kept requests expire; the proof's record does not
    await aux.put_blob("kept:late", {"b": ""}, 600)
    assert await aux.claim_once("proof:s:1", 3600) is False


async def test_a_flood_of_unauthenticated_forms_gets_503_and_the_used_proof_stays_used(
    make_stack, browser
):
    stack = await make_stack(
        rules=RULES,
        server_extra="trusted_proxies: [127.0.0.1/32]\n",
        extra="step_up:\n  max_body: 64KiB\n  keep_budget: 256KiB\n",
    )
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    hop = await browser.get(f"{stack.url}/_gateway/step-up?level=phishing-resistant&rd=/")
    await finish_round_trip(browser, hop)
    async with browser.http.post(f"{stack.url}/api/delete-tenant") as resp:
        assert resp.status == 200  # the proof is used

    statuses: list[int] = []
    retry_after: set[str] = set()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as stranger:

        async def post(i: int) -> None:
            headers = same_origin_form(
                stack.url, **{"X-Forwarded-For": f"10.9.{i // 250}.{i % 250}"}
            )
            async with stranger.post(
                f"{stack.url}/api/delete-tenant",
                data="confirm=" + "y" * 1024,
                headers=headers,
                allow_redirects=False,
            ) as resp:
                statuses.append(resp.status)
                if resp.status == 503:
                    retry_after.add(resp.headers["Retry-After"])

        with capture_logs() as logs:
            for start in range(0, 2000, 50):
                await asyncio.gather(*(post(i) for i in range(start, start + 50)))
    kept = statuses.count(302)
    assert 50 < kept < 200 and statuses.count(503) == 2000 - kept
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
    assert any(e["event"] == "request_not_kept" and e["reason"] == "keep_budget" for e in logs)
    assert stack.gateway.kept_ledger.total_bytes <= 256 * 1024  # the store's own count
    async with browser.http.post(f"{stack.url}/api/delete-tenant") as resp:
        assert resp.status == 401  # still used
    assert len(posts(stack, "/api/delete-tenant")) == 1


async def test_one_client_keeps_only_a_few_requests(make_stack, api):
    stack = await make_stack(rules=RULES)  # defaults: keep_per_client 8
    statuses = []
    for _ in range(12):
        async with api.post(
            f"{stack.url}/api/delete-tenant",
            data="confirm=yes",
            headers=same_origin_form(stack.url),
            allow_redirects=False,
        ) as resp:
            statuses.append(resp.status)
            if resp.status == 503:
                assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [302] * 8 + [503] * 4


async def test_without_a_session_a_form_is_kept_only_when_its_rule_asks(make_stack, browser):
    stack = await make_stack(rules=RULES)
    stack.op.behaviour.user = PHR_USER
    with capture_logs() as logs:
        hop = await browser.request(
            "POST",
            f"{stack.url}/transfers",
            data="amount=1&payee=x",
            headers={**same_origin_form(stack.url), "Referer": f"{stack.url}/transfers/new"},
        )
    assert hop.status == 302  # off to sign in ...
    assert not [e for e in logs if e["event"] == "request_kept"]
    assert [e["reason"] for e in logs if e["event"] == "request_not_kept"] == ["no_session"]
    back = await finish_round_trip(browser, hop)
    assert back.headers["Location"] == "/transfers/new"  # ... and back to the form's page
    assert posts(stack, "/transfers") == []


# -- memory: a running gateway process -----------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_megabyte_form_floods_leave_memory_bounded(op, upstream, tmp_path):
    """300 x 1 MiB unauthenticated forms to a rule that keeps them (once), from 300
    client addresses, then 300 more to a rule that does not: a process holds at most
    its keep budget (64 MiB by default), not every body it was sent."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    op.clients["gateway"].redirect_uris.append(f"{url}/_gateway/callback")
    config = tmp_path / "gateway.yaml"
    write_config(
        config,
        port=port,
        issuer=op.issuer,
        upstream=str(upstream.make_url("")).rstrip("/"),
        extra="trusted_proxies: [127.0.0.1/32]\naccess_log: false\n",
        rules="""\
rules:
  - name: one-shot
    match: {path: /once, methods: [POST]}
    require: {level: password, once: true}
  - name: signed-in
    match: {path: /**}
    require: {level: password}
""",
    )
    gateway = GatewayProcess(config)
    try:
        await gateway.wait_for("listening")
        body = b"a=" + b"x" * (MIB - 2)
        statuses: dict[str, list[int]] = {"/once": [], "/plain": []}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:

            async def post(path: str, i: int) -> None:
                headers = same_origin_form(url, **{"X-Forwarded-For": f"10.8.{i // 250}.{i % 250}"})
                async with http.post(
                    url + path, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    statuses[path].append(resp.status)

            await post("/plain", 0)  # warm up: the provider's keys are loaded
            before = rss_bytes(gateway.proc.pid)
            started = time.monotonic()
            for path in ("/once", "/plain"):
                for start in range(0, 300, 10):
                    await asyncio.gather(*(post(path, i) for i in range(start, start + 10)))
            elapsed = time.monotonic() - started
            grown = rss_bytes(gateway.proc.pid) - before
        kept = statuses["/once"].count(302)
        print(f"rss grew {grown / MIB:.0f} MiB in {elapsed:.1f} s; kept {kept} of 300")
        assert 30 <= kept <= 64 and statuses["/once"].count(503) == 300 - kept
        assert statuses["/plain"].count(302) == 301  # signs in; nothing kept
        assert grown < 160 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"
        assert gateway.events("request_not_kept")
    finally:
        assert gateway.stop() == 0


# -- Redis must not evict one-time records ---------------------------------------------------


@pytest.fixture
def redis_with() -> Iterator[Any]:
    """Start a private redis-server with the given settings; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server must be installed (Debian package redis-server)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*settings: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *settings],
            stdout=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
@pytest.mark.parametrize("store", ["redis", "cookie"])
async def test_a_redis_that_may_evict_is_refused_at_start(make_stack, redis_with, policy, store):
    url = redis_with("--maxmemory", "64mb", "--maxmemory-policy", policy)
    with pytest.raises(ConfigError) as refused, capture_logs() as logs:
        await make_stack(store=store, session_extra=f"redis_url: {url}\n")
    (problem,) = refused.value.problems
    assert problem.key_path == "session.redis_url"
    assert policy in problem.message and "noeviction" in problem.message
    assert [e["policy"] for e in logs if e["event"] == "redis_eviction_unsafe"] == [policy]


async def test_a_redis_without_a_memory_limit_or_with_noeviction_is_accepted(
    make_stack, redis_with
):
    for settings in (("--maxmemory-policy", "allkeys-lru"), ("--maxmemory", "64mb")):
        url = redis_with(*settings)
        with capture_logs() as logs:
            await make_stack(store="redis", session_extra=f"redis_url: {url}\n")
        assert [e["event"] for e in logs if e["event"].startswith("redis_eviction")] == [
            "redis_eviction_checked"
        ]


async def test_the_shared_redis_is_checked(make_stack):
    with capture_logs() as logs:
        await make_stack(
            store="redis",
            session_extra="redis_url: redis://127.0.0.1:6379/13\nredis_prefix: 'test-evict:'\n",
        )
    (checked,) = [e for e in logs if e["event"] == "redis_eviction_checked"]
    assert checked["policy"] == "noeviction" or checked["maxmemory"] == 0


async def test_a_redis_that_hides_its_config_is_used_with_a_warning(make_stack, redis_with, api):
    url = redis_with("--rename-command", "CONFIG", "")
    with capture_logs() as logs:
        stack = await make_stack(store="redis", session_extra=f"redis_url: {url}\n")
    (warning,) = [e for e in logs if e["event"] == "redis_eviction_unchecked"]
    assert warning["reason"] == "config_refused" and "noeviction" in warning["hint"]
    async with api.get(f"{stack.url}/_gateway/readyz") as resp:
        assert resp.status == 200


# -- transaction cookies -------------------------------------------------------------------


def set_cookie_lines(hop: Any) -> list[str]:
    return [v for k, v in hop.raw_headers if k.lower() == "set-cookie"]


async def test_a_long_return_url_still_makes_a_cookie_browsers_keep(make_stack, browser):
    stack = await make_stack()
    query = "q=" + "x" * 2900
    async with browser.http.get(
        f"{stack.url}/app/search?{query}", headers={"Accept": "text/html"}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        lines = resp.headers.getall("Set-Cookie")
    assert lines and all(len(line) < 4096 for line in lines)  # RFC 6265 6.1
    final = await browser.follow(f"{stack.url}/app/search?{query}")
    assert final.status == 200
    # Back at the page without the query it could not carry (the log says so).
    assert browser.hops[-2].headers["Location"] == "/app/search"


async def test_sign_ins_in_flight_never_lock_the_browser_out(make_stack, browser):
    stack = await make_stack()
    await sign_in(stack, browser)
    stack.op.behaviour.user = PHR_USER
    for i in range(6):  # six tabs, each a long URL, none finished
        hop = await browser.get(f"{stack.url}/transfers/{i}?q=" + "y" * 3000)
        assert hop.status == 302
    cookie_header = "; ".join(f"{m.key}={m.value}" for m in browser.http.cookie_jar)
    tx_bytes = sum(
        len(m.key) + len(m.value) + 3 for m in browser.http.cookie_jar if m.key != COOKIE
    )
    assert tx_bytes <= 3 * 1024 and len(cookie_header) < 8000
    async with browser.http.get(f"{stack.url}/_gateway/healthz") as resp:
        assert resp.status == 200
    final = await browser.follow(hop.headers["Location"])  # the last tab finishes
    assert final.status == 200


async def test_a_large_cookie_header_does_not_lock_out_health_and_callback(stack):
    app_cookies = "; ".join(f"app{i}={'v' * 1000}" for i in range(12))  # ~12 KB
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        headers = {"Cookie": app_cookies, "Accept": "application/json"}
        async with http.get(f"{stack.url}/_gateway/healthz", headers=headers) as resp:
            assert resp.status == 200
        async with http.get(f"{stack.url}/_gateway/callback?state=x", headers=headers) as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "unknown_transaction"
        huge = "; ".join(f"app{i}={'v' * 1000}" for i in range(20))  # ~20 KB: too much
        async with http.get(
            f"{stack.url}/_gateway/healthz", headers={"Cookie": huge, "Accept": "application/json"}
        ) as resp:
            assert resp.status == 431
            assert (await resp.json())["error"] == "header_too_large"
