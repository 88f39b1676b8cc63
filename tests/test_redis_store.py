"""gateway.session.redis_store against a real Redis.

The shared server on 127.0.0.1:6379 (scripts/test starts one) serves most tests,
in database 13 under a key prefix of their own that is removed afterwards. The
outage tests start and kill a private redis-server; the shared one is never
touched. Without Redis these tests fail: a store that was never exercised must
not pass as green.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import errors, model
from gateway.config import load_config_text
from gateway.session import Proof, RedisStore, Session, Transaction, make_store
from gateway.session.redis_url import SENTINEL_PORT, SentinelUrl, parse_sentinel_url
from tests.conftest import free_port

SHARED_URL = "redis://127.0.0.1:6379/13"  # a database of its own on the shared server
SECRET = bytes(range(32))
NEW_SECRET = bytes(range(100, 132))
NOW = 1_700_000_000.0
IDLE_S = 30 * 60
LIFETIME_S = 12 * 60 * 60
TX_TTL_S = 600
OUTAGE_BOUND_S = 1.0  # the brief: an outage shows within about a second
SLOW_BOUND_S = 1.5  # two attempts of SOCKET_TIMEOUT_S each, plus scheduling


def make_session(
    *,
    sub: str = "user-1",
    provider_sid: str | None = "op-sid-1",
    session_id: str = "sess-1",
    now: float = NOW,
) -> Session:
    return Session.start(
        Proof(acr="urn:example:loa:1", amr=("pwd",), auth_time=now - 5),
        sub=sub,
        email=f"{sub}@example.com",
        name="Ada Lovelace",
        provider_sid=provider_sid,
        id_token="header.payload.signature",
        now=now,
        session_id=session_id,
    )


def step_up(session: Session, now: float) -> Session:
    return session.with_proof(
        Proof("phr", ("hwk", "pin"), now - 1),
        sub=session.sub,
        email=session.email,
        name=session.name,
        provider_sid=session.provider_sid,
        id_token="newer.id.token",
        now=now,
    )


def make_tx(state: str = "state-1") -> Transaction:
    return Transaction(
        state=state,
        nonce="nonce-1",
        code_verifier="verifier-1",
        return_to="/transfers/new?x=1",
        rule="transfers",
        level="phishing-resistant",
        max_age_s=300,
        created_at=NOW,
    )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    raw = Redis.from_url(SHARED_URL, decode_responses=True)
    try:
        await raw.ping()
    except (RedisError, OSError) as exc:
        await raw.aclose()
        pytest.fail(
            f"Redis does not answer on 127.0.0.1:6379 ({exc}). These tests need it; "
            "scripts/test starts one."
        )
    yield raw
    await raw.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(6)}:"


@pytest.fixture
async def store(client: Redis, prefix: str) -> AsyncIterator[RedisStore]:
    store = open_store(SHARED_URL, prefix)
    yield store
    await store.close()
    await drop_keys(client, prefix)


def open_store(url: str, prefix: str, secrets_: tuple[bytes, ...] = (SECRET,)) -> RedisStore:
    return RedisStore.from_url(
        url, secrets_, idle_timeout_s=IDLE_S, lifetime_s=LIFETIME_S, prefix=prefix
    )


async def keys_of(client: Redis, prefix: str) -> set[str]:
    return {key async for key in client.scan_iter(match=f"{prefix}*", count=1000)}


async def drop_keys(client: Redis, prefix: str) -> None:
    keys = await keys_of(client, prefix)
    if keys:
        await client.delete(*keys)


async def session_keys(client: Redis, prefix: str) -> set[str]:
    return {k for k in await keys_of(client, prefix) if k.startswith(f"{prefix}s:")}


async def assert_indexes_consistent(client: Redis, prefix: str) -> None:
    """Every index member names a live session, and every session is in its indexes."""
    keys = await keys_of(client, prefix)
    sessions = {k for k in keys if k.startswith(f"{prefix}s:")}
    indexes = {k for k in keys if k.startswith((f"{prefix}sub:", f"{prefix}sid:"))}
    for index in indexes:
        for member in await client.smembers(index):
            assert f"{prefix}s:{member}" in sessions, f"orphan {member} in {index}"
    for key in sessions:
        member = key.removeprefix(f"{prefix}s:")
        sub_index, sid_index = await client.hmget(key, ["u", "p"])
        assert sub_index is not None and member in await client.smembers(sub_index)
        if sid_index is not None:
            assert member in await client.smembers(sid_index)


# --------------------------------------------------------------------------- sessions


async def test_round_trip(store: RedisStore) -> None:
    session = make_session()
    handle = await store.save(session, NOW)
    assert await store.load(handle, NOW + 1) == session


async def test_cookie_value_is_an_opaque_256_bit_handle_and_never_a_key(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    handle = await store.save(make_session(), NOW)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", handle)
    assert len(base64.urlsafe_b64decode(handle + "=")) == 32
    digest = hashlib.sha256(handle.encode()).hexdigest()
    assert await keys_of(client, prefix) >= {f"{prefix}s:{digest}"}
    assert store.session_key_of(handle) == f"{prefix}s:{digest}"
    for key in await keys_of(client, prefix):
        assert handle not in key


async def test_redis_holds_nothing_readable(store: RedisStore, client: Redis, prefix: str) -> None:
    session = make_session(sub="alice-sub", provider_sid="alice-op-sid")
    handle = await store.save(session, NOW)
    await store.put_tx(make_tx("alice-state"), TX_TTL_S)
    dump: list[str] = []
    for key in await keys_of(client, prefix):
        dump.append(key)
        kind = await client.type(key)
        if kind == "hash":
            dump.extend((await client.hgetall(key)).values())
        elif kind == "set":
            dump.extend(await client.smembers(key))
        else:
            dump.append(await client.get(key) or "")
    text = "\n".join(dump)
    for secret in (
        handle,
        session.id,
        "alice-sub",
        "alice-op-sid",
        "alice-sub@example.com",
        "Ada Lovelace",
        "header.payload.signature",
        "urn:example:loa:1",
        "alice-state",
        "verifier-1",
    ):
        assert secret not in text, secret


async def test_ttl_is_the_idle_timeout_and_each_save_renews_it(
    store: RedisStore, client: Redis
) -> None:
    session = make_session()
    handle = await store.save(session, NOW)
    key = store.session_key_of(handle)
    assert IDLE_S - 2 <= await client.ttl(key) <= IDLE_S
    await client.expire(key, 5)  # as if most of the idle time had passed
    later = NOW + 120
    assert await store.save(session.touched(later), later, previous=handle) == handle
    assert IDLE_S - 2 <= await client.ttl(key) <= IDLE_S


async def test_ttl_never_outlasts_the_absolute_lifetime(store: RedisStore, client: Redis) -> None:
    session = make_session(now=NOW - (LIFETIME_S - 100))
    handle = await store.save(session.touched(NOW), NOW)
    assert 98 <= await client.ttl(store.session_key_of(handle)) <= 100


@pytest.mark.parametrize(("load_at", "found"), [(NOW + IDLE_S - 1, True), (NOW + IDLE_S, False)])
async def test_idle_timeout_is_enforced_on_load(
    store: RedisStore, client: Redis, prefix: str, load_at: float, found: bool
) -> None:
    handle = await store.save(make_session(), NOW)
    assert (await store.load(handle, load_at) is not None) is found
    assert bool(await session_keys(client, prefix)) is found  # an expired one is removed
    await assert_indexes_consistent(client, prefix)


async def test_absolute_lifetime_is_enforced_however_active_the_session(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    session = make_session()
    handle = await store.save(session, NOW)
    for step in range(1, LIFETIME_S // 600):  # seen every 10 minutes
        when = NOW + step * 600
        session = session.touched(when)
        assert await store.save(session, when, previous=handle) == handle
    assert await store.load(handle, NOW + LIFETIME_S - 1) == session
    assert await store.load(handle, NOW + LIFETIME_S) is None
    assert await keys_of(client, prefix) == set()  # session and index sets gone


async def test_touch_keeps_the_handle(store: RedisStore, client: Redis, prefix: str) -> None:
    session = make_session()
    handle = await store.save(session, NOW)
    touched = session.touched(NOW + 120)
    assert await store.save(touched, NOW + 120, previous=handle) == handle
    assert await store.load(handle, NOW + 120) == touched
    assert len(await session_keys(client, prefix)) == 1


async def test_step_up_rotates_the_handle_and_the_old_one_is_dead(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    before = make_session()
    old = await store.save(before, NOW)
    after = step_up(before, NOW + 60)
    new = await store.save(after, NOW + 60, previous=old)  # no rotate flag: assurance changed
    assert new != old
    assert await store.load(old, NOW + 60) is None  # a fixated or stolen cookie gains nothing
    assert await store.load(new, NOW + 60) == after
    assert len(await session_keys(client, prefix)) == 1
    await assert_indexes_consistent(client, prefix)


async def test_rotate_flag_always_issues_a_new_handle(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    session = make_session()
    old = await store.save(session, NOW)
    new = await store.save(session, NOW, rotate=True, previous=old)
    assert new != old
    assert await store.load(old, NOW) is None
    assert await store.load(new, NOW) == session
    assert len(await session_keys(client, prefix)) == 1


async def test_another_session_replaces_the_one_behind_previous(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    old = await store.save(make_session(session_id="first"), NOW)
    replacement = make_session(session_id="second", sub="user-2")
    new = await store.save(replacement, NOW, previous=old)
    assert new != old
    assert await store.load(old, NOW) is None
    assert await store.load(new, NOW) == replacement
    assert len(await session_keys(client, prefix)) == 1
    await assert_indexes_consistent(client, prefix)


async def test_a_refresh_never_revives_a_deleted_session(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    session = make_session()
    handle = await store.save(session, NOW)
    await store.delete(handle)  # a logout lands between the request's load and its save
    assert await store.save(session.touched(NOW + 60), NOW + 60, previous=handle) == handle
    assert await store.load(handle, NOW + 60) is None
    assert await keys_of(client, prefix) == set()


async def test_a_client_chosen_handle_is_never_adopted(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    chosen = "A" * 43
    assert await store.save(make_session(), NOW, previous=chosen) == chosen
    assert await store.load(chosen, NOW) is None  # nothing was stored under it
    assert await keys_of(client, prefix) == set()
    login = await store.save(make_session(), NOW, rotate=True, previous=chosen)
    assert login != chosen
    assert await store.load(chosen, NOW) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "=",
        "A" * 42 + "+",
        "é" * 43,
        "\ud800" * 43,
        "*" * 43,
        "stepup:s:*",
    ],
)
async def test_malformed_cookie_values_load_as_none(store: RedisStore, value: str) -> None:
    await store.save(make_session(), NOW)
    assert await store.load(value, NOW) is None
    await store.delete(value)  # no error either


async def test_unknown_and_tampered_handles_load_as_none(store: RedisStore) -> None:
    handle = await store.save(make_session(), NOW)
    assert await store.load(secrets.token_urlsafe(32), NOW) is None
    for position in (0, 21, 42):
        flipped = "B" if handle[position] != "B" else "C"
        assert await store.load(handle[:position] + flipped + handle[position + 1 :], NOW) is None
    assert await store.load(handle, NOW) is not None


async def test_sealed_data_is_bound_to_its_key(store: RedisStore, client: Redis) -> None:
    victim = await store.save(make_session(sub="admin"), NOW)
    attacker = await store.save(make_session(sub="mallory"), NOW)
    # Opened once first, so the store has the admin's sealed data in its memo.
    assert (await store.load(victim, NOW) or make_session()).sub == "admin"
    # Somebody with write access to Redis copies the admin's data onto their own key.
    data = await client.hget(store.session_key_of(victim), "d")
    assert data is not None
    await client.hset(store.session_key_of(attacker), "d", data)
    assert await store.load(attacker, NOW) is None
    assert (await store.load(victim, NOW) or make_session()).sub == "admin"


async def test_a_session_changed_in_redis_is_not_served_from_memory(store: RedisStore) -> None:
    handle = await store.save(make_session(), NOW)
    first = await store.load(handle, NOW)
    assert first is not None and first.last_seen == NOW
    # A refresh (here or on another replica) writes new sealed data under the same key.
    assert await store.save(first.touched(NOW + 100), NOW + 100, previous=handle) == handle
    refreshed = await store.load(handle, NOW + 100)
    assert refreshed is not None and refreshed.last_seen == NOW + 100
    await store.delete(handle)
    assert await store.load(handle, NOW + 100) is None  # gone from Redis: gone here


async def test_data_sealed_with_an_unknown_secret_loads_as_none(
    store: RedisStore, prefix: str
) -> None:
    handle = await store.save(make_session(), NOW)
    stranger = open_store(SHARED_URL, prefix, secrets_=(NEW_SECRET,))
    try:
        assert await stranger.load(handle, NOW) is None
    finally:
        await stranger.close()


async def test_secret_rotation_keeps_sessions_and_their_indexes(
    store: RedisStore, prefix: str
) -> None:
    handle = await store.save(make_session(), NOW)
    rotated = open_store(SHARED_URL, prefix, secrets_=(NEW_SECRET, SECRET))
    try:
        assert await rotated.load(handle, NOW) == make_session()
        assert await rotated.delete_by(sub="user-1", provider_sid=None) == 1
    finally:
        await rotated.close()


async def test_prefixes_keep_stores_apart(store: RedisStore, client: Redis) -> None:
    other_prefix = f"test-{secrets.token_hex(6)}:"
    other = open_store(SHARED_URL, other_prefix)
    try:
        handle = await store.save(make_session(), NOW)
        assert await other.load(handle, NOW) is None
        assert await other.delete_by(sub="user-1", provider_sid=None) == 0
        assert await store.load(handle, NOW) is not None
    finally:
        await other.close()
        await drop_keys(client, other_prefix)


async def test_delete_removes_the_session_and_its_index_entries(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    handle = await store.save(make_session(), NOW)
    await store.delete(handle)
    await store.delete(handle)  # already gone: no error
    assert await store.load(handle, NOW) is None
    assert await session_keys(client, prefix) == set()
    await assert_indexes_consistent(client, prefix)


async def test_ping(store: RedisStore) -> None:
    assert await store.ping() is True


# --------------------------------------------------------------------------- back-channel logout

SESSIONS = {  # name -> (sub, provider sid)
    "ada-laptop": ("ada", "op-1"),
    "ada-phone": ("ada", "op-1"),
    "ada-tablet": ("ada", "op-2"),
    "bob": ("bob", "op-3"),
    "bob-same-sid": ("bob", "op-1"),  # a provider that reuses sids across users
    "carol-no-sid": ("carol", None),
}


@pytest.mark.parametrize(
    ("sub", "sid", "gone"),
    [
        ("ada", None, {"ada-laptop", "ada-phone", "ada-tablet"}),
        (None, "op-1", {"ada-laptop", "ada-phone", "bob-same-sid"}),
        ("ada", "op-1", {"ada-laptop", "ada-phone"}),  # both: that sid, of that subject
        ("ada", "op-3", set()),
        ("carol", None, {"carol-no-sid"}),
        ("nobody", None, set()),
        (None, "op-unknown", set()),
    ],
)
async def test_delete_by(
    store: RedisStore,
    client: Redis,
    prefix: str,
    sub: str | None,
    sid: str | None,
    gone: set[str],
) -> None:
    handles = {
        name: await store.save(make_session(sub=s, provider_sid=p, session_id=name), NOW)
        for name, (s, p) in SESSIONS.items()
    }
    assert await store.delete_by(sub=sub, provider_sid=sid) == len(gone)
    for name, handle in handles.items():
        assert (await store.load(handle, NOW) is None) is (name in gone), name
    await assert_indexes_consistent(client, prefix)


async def test_delete_by_needs_a_subject_or_a_sid(store: RedisStore) -> None:
    with pytest.raises(ValueError):
        await store.delete_by(sub=None, provider_sid=None)


async def test_delete_by_follows_rotation_and_a_new_sid(store: RedisStore) -> None:
    before = make_session(provider_sid="op-1")
    old = await store.save(before, NOW)
    after = replace(step_up(before, NOW + 60), provider_sid="op-2")
    new = await store.save(after, NOW + 60, rotate=True, previous=old)
    assert await store.delete_by(sub=None, provider_sid="op-1") == 0
    assert await store.delete_by(sub=None, provider_sid="op-2") == 1
    assert await store.load(new, NOW + 60) is None


async def test_index_members_of_expired_sessions_are_cleared(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    first = await store.save(make_session(session_id="first"), NOW)
    await client.delete(store.session_key_of(first))  # as if its idle TTL had run out
    second = await store.save(make_session(session_id="second"), NOW)
    await assert_indexes_consistent(client, prefix)  # the new save pruned the stale member
    assert await store.delete_by(sub="user-1", provider_sid=None) == 1
    assert await store.load(second, NOW) is None


async def test_concurrent_rotations_and_refreshes_stay_consistent(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    for _ in range(5):
        session = make_session()
        previous = await store.save(session, NOW)
        upgraded = step_up(session, NOW + 30)
        results = await asyncio.gather(
            *(store.save(upgraded, NOW + 30, rotate=True, previous=previous) for _ in range(20)),
            *(
                store.save(session.touched(NOW + 30), NOW + 30, previous=previous)
                for _ in range(20)
            ),
            *(store.load(previous, NOW + 30) for _ in range(10)),
        )
        rotated = results[:20]
        assert len(set(rotated)) == 20 and previous not in rotated
        assert await store.load(previous, NOW + 30) is None  # rotation always wins in the end
        for handle in rotated:
            assert await store.load(handle, NOW + 30) == upgraded
        await assert_indexes_consistent(client, prefix)
    assert await store.delete_by(sub="user-1", provider_sid=None) == 5 * 20
    assert await keys_of(client, prefix) == set()


async def test_delete_by_racing_saves_leaves_no_orphans(
    store: RedisStore, client: Redis, prefix: str
) -> None:
    handles = [await store.save(make_session(session_id=f"s{n}"), NOW) for n in range(30)]
    await asyncio.gather(
        *(
            store.save(make_session(session_id=f"s{n}").touched(NOW + 60), NOW + 60, previous=h)
            for n, h in enumerate(handles)
        ),
        store.delete_by(sub="user-1", provider_sid=None),
        *(store.save(make_session(session_id=f"new{n}"), NOW + 60) for n in range(10)),
    )
    await assert_indexes_consistent(client, prefix)
    await store.delete_by(sub="user-1", provider_sid=None)
    assert await keys_of(client, prefix) == set()


async def test_claim_once(store: RedisStore, client: Redis, prefix: str) -> None:
    assert await store.claim_once("jti:abc", 120) is True
    assert await store.claim_once("jti:abc", 120) is False
    assert await store.claim_once("jti:other", 120) is True
    key = f"{prefix}once:{hashlib.sha256(b'jti:abc').hexdigest()}"
    assert 118 <= await client.ttl(key) <= 120
    # the name is never stored in clear (the random test prefix may spell "abc" itself)
    assert "abc" not in "".join(k.removeprefix(prefix) for k in await keys_of(client, prefix))


# --------------------------------------------------------------------------- transactions


async def test_transaction_is_single_use(store: RedisStore, client: Redis) -> None:
    tx = make_tx()
    await store.put_tx(tx, TX_TTL_S)
    assert TX_TTL_S - 2 <= await client.ttl(store.tx_key(tx.state)) <= TX_TTL_S
    assert await store.take_tx(tx.state) == tx
    assert await store.take_tx(tx.state) is None  # a replayed callback finds nothing


async def test_concurrent_callbacks_take_a_transaction_once(store: RedisStore) -> None:
    await store.put_tx(make_tx(), TX_TTL_S)
    taken = await asyncio.gather(*(store.take_tx("state-1") for _ in range(10)))
    assert sum(tx is not None for tx in taken) == 1


@pytest.mark.parametrize("state", ["", "state-2", "STATE-1", "state-1 ", "\ud800", "x" * 5000])
async def test_unknown_states_take_nothing(store: RedisStore, state: str) -> None:
    await store.put_tx(make_tx(), TX_TTL_S)
    assert await store.take_tx(state) is None
    assert await store.take_tx("state-1") == make_tx()


async def test_transactions_are_per_state(store: RedisStore) -> None:
    for n in range(3):
        await store.put_tx(make_tx(f"state-{n}"), TX_TTL_S)
    assert [await store.take_tx(f"state-{n}") for n in (2, 0, 1)] == [
        make_tx("state-2"),
        make_tx("state-0"),
        make_tx("state-1"),
    ]


async def test_a_session_blob_is_not_a_transaction(store: RedisStore, client: Redis) -> None:
    handle = await store.save(make_session(), NOW)
    data = await client.hget(store.session_key_of(handle), "d")
    assert data is not None
    await client.set(store.tx_key("state-1"), data, ex=60)
    assert await store.take_tx("state-1") is None


# --------------------------------------------------------------------------- construction


async def test_make_store_builds_a_redis_store_from_config(client: Redis) -> None:
    prefix = f"test-{secrets.token_hex(6)}:"
    config = load_config_text(
        config_with(f'  redis_url: {SHARED_URL}\n  redis_prefix: "{prefix}"\n'), "test.yaml"
    )
    assert config.session.redis_prefix == prefix
    store = make_store(config.session)
    assert isinstance(store, RedisStore)
    try:
        handle = await store.save(make_session(), NOW)
        assert await client.exists(f"{prefix}s:{hashlib.sha256(handle.encode()).hexdigest()}")
    finally:
        await store.close()
        await drop_keys(client, prefix)


def config_with(session_extra: str) -> str:
    return f"""\
server: {{listen: 127.0.0.1:8080, public_url: http://127.0.0.1:8080}}
upstreams: {{app: http://127.0.0.1:9000}}
oidc: {{issuer: http://127.0.0.1:9001, client_id: gateway, client_secret: s}}
session:
  secret: {"x" * 32}
  store: redis
  cookie_secure: false
{session_extra}assurance:
  levels: [{{name: password, acr: [loa1]}}]
rules:
  - {{name: all, match: {{path: /**}}, require: {{level: password}}}}
"""


@pytest.mark.parametrize(
    "url",
    [
        "redis://r:6379/0",
        "rediss://:pw@r:6380/1",
        "unix:///run/redis.sock?db=2",
        "redis+sentinel://s1:26379,s2:26379/mymaster/0",
        "rediss+sentinel://:pw@s1/mymaster",
    ],
)
def test_config_accepts_supported_redis_urls(url: str) -> None:
    config = load_config_text(config_with(f"  redis_url: {url}\n"), "test.yaml")
    assert config.session.redis_url == url
    assert config.session.redis_prefix == "stepup:"


@pytest.mark.parametrize(
    ("extra", "key_path", "message"),
    [
        ("  redis_url: redis+cluster://r:7000\n", "session.redis_url", "Cluster is not supported"),
        ("  redis_url: redis+sentinel://s1:26379\n", "session.redis_url", "name the monitored"),
        ("  redis_url: redis://r\n  redis_prefix: 'a b'\n", "session.redis_prefix", "no spaces"),
        (f"  redis_url: redis://r\n  redis_prefix: {'p' * 65}\n", "session.redis_prefix", "64"),
    ],
)
def test_config_refuses(extra: str, key_path: str, message: str) -> None:
    with pytest.raises(errors.ConfigError) as raised:
        load_config_text(config_with(extra), "test.yaml")
    (problem,) = raised.value.problems
    assert problem.key_path == key_path
    assert message in problem.message


def test_default_prefix() -> None:
    assert model.SessionConfig(secrets=(SECRET,)).redis_prefix == "stepup:"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1.example:26380,s2.example,[::1]:26381/mymaster",
            SentinelUrl(
                sentinels=(("s1.example", 26380), ("s2.example", SENTINEL_PORT), ("::1", 26381)),
                service_name="mymaster",
                db=0,
                username=None,
                password=None,
                ssl=False,
            ),
        ),
        (
            "rediss+sentinel://app:p%40ss@s1:5000/cache/3",
            SentinelUrl((("s1", 5000),), "cache", 3, "app", "p@ss", ssl=True),
        ),
        (
            "redis+sentinel://:secret@s1/main",
            SentinelUrl((("s1", SENTINEL_PORT),), "main", 0, None, "secret", ssl=False),
        ),
    ],
)
def test_parse_sentinel_url(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://s1:26379/main",
        "redis+sentinel://s1:26379",
        "redis+sentinel://s1:26379/",
        "redis+sentinel://s1:26379/main/zero",
        "redis+sentinel://s1:26379/main/1/2",
        "redis+sentinel://s1:port/main",
        "redis+sentinel://s1:70000/main",
        "redis+sentinel://s1,,s2/main",
        "redis+sentinel://s1/main?db=2",
    ],
)
def test_parse_sentinel_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_sentinel_url(url)


# --------------------------------------------------------------------------- outages


class PrivateRedis:
    """A redis-server of the test's own, on a free port, that the test may kill."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed (scripts/test installs it)")
        self.process = subprocess.Popen(
            [
                server,
                *extra,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_pong(self.port)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def wait_for_pong(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"the private redis-server on port {port} did not start")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.resume()  # in case the test paused it
    server.kill()


async def expect_unavailable(call: Awaitable[object], bound_s: float) -> None:
    started = time.monotonic()
    with pytest.raises(errors.StoreUnavailable) as raised:
        await call
    elapsed = time.monotonic() - started
    assert raised.value.status == 503
    assert elapsed < bound_s, f"took {elapsed:.2f}s"


async def test_outage_fails_closed_and_the_store_recovers_by_itself(
    private_redis: PrivateRedis,
) -> None:
    store = open_store(private_redis.url, "outage:")
    try:
        handle = await store.save(make_session(), NOW)
        assert await store.load(handle, NOW) is not None

        private_redis.kill()
        await expect_unavailable(store.load(handle, NOW), OUTAGE_BOUND_S)  # never "no session"
        await expect_unavailable(store.save(make_session(), NOW), OUTAGE_BOUND_S)
        await expect_unavailable(store.ping(), OUTAGE_BOUND_S)
        await expect_unavailable(store.delete(handle), OUTAGE_BOUND_S)
        await expect_unavailable(store.delete_by(sub="user-1", provider_sid=None), OUTAGE_BOUND_S)
        await expect_unavailable(store.put_tx(make_tx(), TX_TTL_S), OUTAGE_BOUND_S)
        await expect_unavailable(store.take_tx("state-1"), OUTAGE_BOUND_S)
        await expect_unavailable(store.claim_once("jti:x", 60), OUTAGE_BOUND_S)

        private_redis.start()  # same port, empty: nothing was persisted
        assert await store.ping() is True
        assert await store.load(handle, NOW) is None
        again = await store.save(make_session(), NOW)
        assert await store.load(again, NOW) == make_session()
        await store.put_tx(make_tx(), TX_TTL_S)
        assert await store.take_tx("state-1") == make_tx()
    finally:
        await store.close()


async def test_a_restart_between_requests_costs_no_error(private_redis: PrivateRedis) -> None:
    store = open_store(private_redis.url, "restart:")
    try:
        assert await store.ping() is True  # a pooled connection now exists
        private_redis.kill()
        private_redis.start()
        # The pooled connection is dead; the one retry replaces it unseen.
        handle = await store.save(make_session(), NOW)
        assert await store.load(handle, NOW) == make_session()
    finally:
        await store.close()


async def test_a_stalled_redis_times_out_and_recovers(private_redis: PrivateRedis) -> None:
    store = open_store(private_redis.url, "stall:")
    try:
        handle = await store.save(make_session(), NOW)
        private_redis.pause()  # accepts connections, answers nothing: a hung or slow server
        await expect_unavailable(store.load(handle, NOW), SLOW_BOUND_S)
        await expect_unavailable(store.ping(), SLOW_BOUND_S)
        private_redis.resume()
        assert await store.ping() is True
        assert await store.load(handle, NOW) == make_session()
    finally:
        await store.close()


async def test_redis_down_from_the_start_fails_closed() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", "none:")
    try:
        await expect_unavailable(store.ping(), OUTAGE_BOUND_S)
        await expect_unavailable(store.load(secrets.token_urlsafe(32), NOW), OUTAGE_BOUND_S)
    finally:
        await store.close()


async def test_sentinel_url_reaches_the_master(tmp_path: Path) -> None:
    master = PrivateRedis(tmp_path / "master")
    master.directory.mkdir()
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    sentinel = PrivateRedis(sentinel_dir)
    conf = sentinel_dir / "sentinel.conf"
    conf.write_text(
        f"sentinel monitor gw 127.0.0.1 {master.port} 1\nsentinel down-after-milliseconds gw 5000\n"
    )
    master.start()
    try:
        sentinel.start(str(conf), "--sentinel")
        store = open_store(f"redis+sentinel://127.0.0.1:{sentinel.port}/gw/2", "sentinel:")
        try:
            handle = await store.save(make_session(), NOW)
            assert await store.load(handle, NOW) == make_session()
            direct = Redis.from_url(f"redis://127.0.0.1:{master.port}/2")
            try:
                assert await direct.exists(store.session_key_of(handle)) == 1
            finally:
                await direct.aclose()
            master.kill()
            await expect_unavailable(store.load(handle, NOW), OUTAGE_BOUND_S)
        finally:
            await store.close()
    finally:
        sentinel.kill()
        master.kill()
