"""The gateway with `session.store: redis`, end to end, against a real Redis.

The shared Redis on 127.0.0.1:6379 is used with DB 13 and a key prefix of each test's
own; the outage test starts a private redis-server and never touches the shared one.
Without Redis these tests fail (never skip).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from gateway.config.defaults import DEFAULT_DECISION_MEMO_S
from gateway.session.redis_store import RedisStore
from tests.conftest import SESSION_SECRET, free_port
from tests.test_gateway import COOKIE, PHR_USER, sign_in

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis must run on 127.0.0.1:6379 for these tests ({exc})")
    value = f"test-{secrets.token_hex(4)}:"
    yield value
    keys = [key async for key in client.scan_iter(match=f"{value}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def redis_session(prefix: str, url: str = REDIS_URL) -> str:
    return f"redis_url: {url}\nredis_prefix: '{prefix}'\n"


async def test_sign_in_and_step_up_with_redis(make_stack, browser, api, prefix):
    stack = await make_stack(store="redis", session_extra=redis_session(prefix))
    await sign_in(stack, browser)
    before = browser.cookie(COOKIE)
    assert before is not None and len(before) == 43  # an opaque 256-bit handle
    stack.op.behaviour.user = PHR_USER
    final = await browser.follow(f"{stack.url}/transfers/new")
    assert final.status == 200
    after = browser.cookie(COOKIE)
    assert after != before  # rotated on the assurance change
    async with api.get(
        f"{stack.url}/app/x", headers={"Cookie": f"{COOKIE}={before}"}, allow_redirects=False
    ) as resp:
        assert resp.status == 401  # the pre-step-up cookie is dead
    keys = await aioredis.from_url(REDIS_URL).keys(f"{prefix}*")
    assert keys and all(before.encode() not in key and after.encode() not in key for key in keys)


async def test_a_callback_cannot_be_replayed(make_stack, browser, prefix):
    stack = await make_stack(store="redis", session_extra=redis_session(prefix))
    hop = await browser.get(f"{stack.url}/app/x")
    at_op = await browser.get(hop.headers["Location"])
    callback = at_op.headers["Location"]
    tx_cookies = {m.key: m.value for m in browser.http.cookie_jar if "_tx_" in m.key}
    assert (await browser.get(callback)).status == 303
    # Put the transaction cookie back and replay the same callback: refused.
    browser.http.cookie_jar.update_cookies(tx_cookies)
    assert (await browser.get(callback)).status == 400


@pytest.fixture
def private_redis() -> Iterator[dict[str, object]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server must be installed (Debian package redis-server)")
    port = free_port()
    state: dict[str, object] = {"port": port}

    def start() -> None:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        state["proc"] = proc
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def kill() -> None:
        proc = state["proc"]
        assert isinstance(proc, subprocess.Popen)
        proc.kill()
        proc.wait(5)

    state["start"] = start
    state["kill"] = kill
    start()
    yield state
    proc = state["proc"]
    assert isinstance(proc, subprocess.Popen)
    if proc.poll() is None:
        kill()


async def test_redis_outage_fails_closed_and_recovers(make_stack, browser, api, private_redis):
    url = f"redis://127.0.0.1:{private_redis['port']}/0"
    stack = await make_stack(store="redis", session_extra=redis_session("outage:", url))
    await sign_in(stack, browser)
    private_redis["kill"]()  # type: ignore[operator]
    started = time.monotonic()
    hop = await browser.get(f"{stack.url}/app/x")
    assert hop.status == 503  # not a redirect to the provider: that would loop everyone
    assert "session store" in hop.body.lower()
    assert time.monotonic() - started < 3
    async with api.get(f"{stack.url}/_gateway/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["store"] is False
    async with api.get(f"{stack.url}/public/x") as resp:
        assert resp.status == 200  # routes without sign-in do not need the store
    hop = await browser.get(f"{stack.url}/public/x")
    assert hop.status == 200  # ... not even for a browser that holds a session cookie
    private_redis["start"]()  # type: ignore[operator]
    # Recovers by itself: the same gateway object, no restart.
    for _ in range(50):
        async with api.get(f"{stack.url}/_gateway/readyz") as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.1)
    assert resp.status == 200
    # The private Redis kept nothing on disk, so the session is gone: a new sign-in works.
    final = await browser.follow(f"{stack.url}/app/x")
    assert final.status == 200


# -- the pool under load ------------------------------------------------------------


async def test_requests_wait_in_line_for_a_small_pool_instead_of_failing(
    make_stack, browser, prefix
):
    pool = "redis_pool_size: 2\nredis_pool_timeout: 5s\n"
    stack = await make_stack(store="redis", session_extra=redis_session(prefix) + pool)
    await sign_in(stack, browser)
    cookie = {"Cookie": f"{COOKIE}={browser.cookie(COOKIE)}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> int:
            async with http.get(f"{stack.url}/app/x", headers=cookie) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses.count(200) == 200


async def test_a_busy_pool_is_back_pressure_not_an_outage(make_stack, browser, api, prefix):
    pool = "redis_pool_size: 2\nredis_pool_timeout: 0.3\n"
    stack = await make_stack(store="redis", session_extra=redis_session(prefix) + pool)
    await sign_in(stack, browser)
    cookie = {"Cookie": f"{COOKIE}={browser.cookie(COOKIE)}"}
    store = stack.gateway.store
    assert isinstance(store, RedisStore)
    release = asyncio.Event()
    # Two commands that take their time hold both connections.
    holders = [asyncio.create_task(store._run("hold", release.wait())) for _ in range(2)]
    await asyncio.sleep(0)
    with capture_logs() as logs:
        async with api.get(f"{stack.url}/app/x", headers=cookie) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"] == "store_busy"
    assert [e for e in logs if e["event"] == "store_busy"]
    assert not [e for e in logs if e["event"] == "session_store_unavailable"]
    async with api.get(f"{stack.url}/public/x") as resp:
        assert resp.status == 200  # a route that needs no session is not held up
    async with api.get(f"{stack.url}/_gateway/readyz") as resp:
        assert resp.status == 200  # busy is not down: the probe has its own connections
    async with api.get(f"{stack.url}/_gateway/metrics") as resp:
        text = await resp.text()
    assert 'stepup_store_pool_connections{state="in_use"} 2.0' in text
    assert 'stepup_store_pool_connections{state="max"} 2.0' in text
    assert "stepup_store_busy_total 1.0" in text
    release.set()
    await asyncio.gather(*holders)
    async with api.get(f"{stack.url}/app/x", headers=cookie) as resp:
        assert resp.status == 200


async def test_pool_waiters_show_in_metrics(prefix):
    store = RedisStore.from_url(
        REDIS_URL,
        (SESSION_SECRET.encode(),),
        idle_timeout_s=60,
        lifetime_s=600,
        prefix=prefix,
        pool_size=1,
        pool_timeout_s=5,
    )
    release = asyncio.Event()
    holder = asyncio.create_task(store._run("hold", release.wait()))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(store._run("ping", store._redis.ping()))
    await asyncio.sleep(0.05)
    assert (store.pool_in_use, store.pool_waiting, store.pool_max) == (1, 1, 1)
    release.set()
    assert await waiter
    await holder
    assert (store.pool_in_use, store.pool_waiting) == (0, 0)
    await store.close()


async def test_a_signed_in_request_costs_one_redis_round_trip(make_stack, browser, api, prefix):
    """What the pool is sized for: a request holds one pooled connection for one
    command (HGET of its session); nothing is left to pipeline."""
    stack = await make_stack(store="redis", session_extra=redis_session(prefix))
    await sign_in(stack, browser)
    cookie = {"Cookie": f"{COOKIE}={browser.cookie(COOKIE)}"}
    store = stack.gateway.store
    assert isinstance(store, RedisStore)
    sent: list[str] = []
    real = store._redis.execute_command

    async def counted(*args, **options):  # the real command, counted on the way
        sent.append(str(args[0]))
        return await real(*args, **options)

    store._redis.execute_command = counted  # type: ignore[method-assign]
    for second in range(3):
        for _ in range(10):
            async with api.get(f"{stack.url}/app/x", headers=cookie) as resp:
                assert resp.status == 200
        # One decided per server.decision_memo (1 s); the rest are remembered.
        assert sent == ["HGET"] * (second + 1)
        stack.clock.advance(DEFAULT_DECISION_MEMO_S)


async def test_forward_auth_fails_closed_on_a_store_outage_only_where_a_session_counts(
    make_stack, browser, api, private_redis
):
    url = f"redis://127.0.0.1:{private_redis['port']}/0"
    stack = await make_stack(
        store="redis",
        session_extra=redis_session("fa-outage:", url),
        server_extra="mode: both\ntrusted_proxies: [127.0.0.1/32]\n",
    )
    await sign_in(stack, browser)
    cookie = browser.cookie(COOKIE)
    private_redis["kill"]()  # type: ignore[operator]

    async def ask(path: str) -> int:
        headers = {
            "X-Original-Method": "GET",
            "X-Original-URL": f"{stack.url}{path}",
            "Cookie": f"{COOKIE}={cookie}",
        }
        async with api.get(f"{stack.url}/_gateway/auth", headers=headers) as resp:
            return resp.status

    assert await ask("/app/x") == 503  # never a 401 that would send everyone to sign in
    assert await ask("/public/x") == 200
