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

import pytest
import redis.asyncio as aioredis

from tests.conftest import free_port
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
