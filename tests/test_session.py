"""gateway.session: sealing, the Session model, stores, transaction cookies."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from gateway import errors, model
from gateway.session import (
    MAX_PROOFS,
    CookieStore,
    MemoryStore,
    Proof,
    Sealer,
    Session,
    SessionStore,
    SessionTooLarge,
    Transaction,
    TransactionCodec,
    cookie_name,
    delete_cookie_kwargs,
    expired,
    make_store,
    set_cookie_kwargs,
    tx_cookie_name,
    tx_cookie_names,
    tx_cookies_to_drop,
)
from gateway.session.crypto import MAX_TOKEN_CHARS, sealed_length
from gateway.session.stores import MAX_COOKIE_VALUE_BYTES, SESSION_PURPOSE
from gateway.session.transaction import CLOCK_SKEW_S, TX_PURPOSE

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
OTHER = b"\xff" * 32
NOW = 1_700_000_000.0
IDLE_S = 30 * 60
LIFETIME_S = 12 * 60 * 60
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_session(
    *,
    now: float = NOW,
    id_token: str | None = "header.payload.signature",
    name: str | None = "Ada Lovelace",
    session_id: str = "sess-1",
) -> Session:
    return Session.start(
        Proof(acr="urn:example:loa:1", amr=("pwd",), auth_time=now - 5),
        sub="user-1",
        email="ada@example.com",
        name=name,
        provider_sid="op-sid-1",
        id_token=id_token,
        now=now,
        session_id=session_id,
    )


def step_up(session: Session, proof: Proof, now: float) -> Session:
    return session.with_proof(
        proof,
        sub=session.sub,
        email=session.email,
        name=session.name,
        provider_sid=session.provider_sid,
        id_token=session.id_token,
        now=now,
    )


# --------------------------------------------------------------------------- Sealer


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"a": 1},
        {"unicode": "Grüße, 世界 🎉", "n": None, "f": 1.5, "neg": -3},
        {"nested": {"list": [1, "two", [3]], "obj": {"x": True}}},
        {"big": "x" * 5000},
    ],
)
def test_seal_open_round_trip(payload: dict[str, object]) -> None:
    sealer = Sealer([OLD], "test")
    assert sealer.open(sealer.seal(payload)) == payload


def test_seal_is_randomised_urlsafe_and_unpadded() -> None:
    sealer = Sealer([OLD], "test")
    first, second = sealer.seal({"a": 1}), sealer.seal({"a": 1})
    assert first != second  # fresh nonce each time
    assert re.fullmatch(r"[A-Za-z0-9_-]+", first)
    assert unb64(first)[0] == 1  # version prefix
    assert len(first) == sealed_length(len(b'{"a":1}'))


def test_sealed_format_is_the_documented_one() -> None:
    # version 0x01 || 96-bit nonce || AES-256-GCM ciphertext+tag,
    # key = HKDF-SHA256(secret, info=purpose), AAD = version || purpose.
    token = Sealer([OLD], "purpose-x").seal({"a": 1})
    raw = unb64(token)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"purpose-x").derive(OLD)
    plaintext = AESGCM(key).decrypt(raw[1:13], raw[13:], b"\x01purpose-x")
    assert (raw[0], plaintext) == (1, b'{"a":1}')
    for wrong_aad in (b"\x01", b"\x01purpose-y", b"purpose-x"):
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(raw[1:13], raw[13:], wrong_aad)


def test_tampering_any_character_is_detected() -> None:
    sealer = Sealer([OLD], "test")
    token = sealer.seal({"sub": "user-1", "acr": "urn:example:loa:1"})
    for position, original in enumerate(token):
        for replacement in {"A", "B", "_", "-", "z"} - {original}:
            tampered = token[:position] + replacement + token[position + 1 :]
            assert sealer.open(tampered) is None, (position, replacement)


def test_flipping_any_bit_is_detected() -> None:
    sealer = Sealer([OLD], "test")
    raw = unb64(sealer.seal({"sub": "user-1"}))
    for position in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[position] ^= 1 << bit
            assert sealer.open(b64(bytes(flipped))) is None, (position, bit)


def test_truncated_or_extended_values_are_rejected() -> None:
    sealer = Sealer([OLD], "test")
    token = sealer.seal({"sub": "user-1"})
    for length in range(len(token)):
        assert sealer.open(token[:length]) is None, length
    raw = unb64(token)
    assert sealer.open(b64(raw + b"\x00")) is None
    assert sealer.open(token + "A") is None
    assert sealer.open(token + "AAAA") is None


def test_non_canonical_base64_is_rejected() -> None:
    # 2 trailing bytes of input -> 3 characters, the last carrying 2 unused bits.
    sealer = Sealer([OLD], "test")
    token = next(t for t in (sealer.seal({"k": "v" * n}) for n in range(3)) if len(t) % 4 == 3)
    last = B64URL_ALPHABET.index(token[-1])
    sibling = token[:-1] + B64URL_ALPHABET[last ^ 1]
    assert unb64(sibling) == unb64(token)  # the lenient decoder would accept it
    assert sealer.open(token) is not None
    assert sealer.open(sibling) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "A",
        "AAAA",
        "!!!!",
        "abc=",
        "a+b/",
        " " * 40,
        "é" * 40,
        "\x00" * 40,
        "A" * (MAX_TOKEN_CHARS + 4),
        None,
        b"bytes",
        123,
    ],
)
def test_garbage_opens_to_none(value: object) -> None:
    assert Sealer([OLD], "test").open(cast(str, value)) is None


@settings(max_examples=200)
@given(st.text())
def test_open_never_raises_on_text(value: str) -> None:
    assert Sealer([OLD], "test").open(value) is None


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_open_never_raises_on_well_formed_base64(raw: bytes) -> None:
    assert Sealer([OLD], "test").open(b64(raw)) is None


@pytest.mark.parametrize("payload", [[1, 2], "text", 42, None])
def test_sealed_non_object_json_opens_to_none(payload: object) -> None:
    sealer = Sealer([OLD], "test")
    assert sealer.open(sealer.seal(cast(Mapping[str, object], payload))) is None


@pytest.mark.parametrize(
    ("sealed_for", "opened_for"),
    [
        (SESSION_PURPOSE, TX_PURPOSE),
        (TX_PURPOSE, SESSION_PURPOSE),
        ("a", "b"),
    ],
)
def test_wrong_purpose_does_not_open(sealed_for: str, opened_for: str) -> None:
    token = Sealer([OLD], sealed_for).seal({"sub": "user-1"})
    assert Sealer([OLD], opened_for).open(token) is None
    assert Sealer([OLD], sealed_for).open(token) == {"sub": "user-1"}


def test_rotation_old_values_open_after_rotation_but_not_after_retirement() -> None:
    written_before = Sealer([OLD], "test").seal({"v": "before"})
    rotated = Sealer([NEW, OLD], "test")
    assert rotated.open(written_before) == {"v": "before"}
    assert Sealer([NEW], "test").open(written_before) is None

    written_after = rotated.seal({"v": "after"})  # the first secret writes
    assert Sealer([NEW], "test").open(written_after) == {"v": "after"}
    assert Sealer([OLD], "test").open(written_after) is None


def test_unknown_key_does_not_open() -> None:
    token = Sealer([OTHER], "test").seal({"sub": "user-1"})
    assert Sealer([NEW, OLD], "test").open(token) is None


@pytest.mark.parametrize(
    ("secrets", "purpose"),
    [([], "test"), ([b"short"], "test"), ([OLD, b"x" * 31], "test"), ([OLD], "")],
)
def test_sealer_refuses_weak_setup(secrets: list[bytes], purpose: str) -> None:
    with pytest.raises(ValueError):
        Sealer(secrets, purpose)


# --------------------------------------------------------------------------- Session model

proofs = st.builds(
    Proof,
    acr=st.none() | st.text(max_size=20),
    amr=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    auth_time=st.floats(min_value=0, max_value=4e9),
)
sessions = st.builds(
    Session,
    id=st.text(min_size=1, max_size=30),
    sub=st.text(min_size=1, max_size=30),
    email=st.none() | st.text(max_size=30),
    name=st.none() | st.text(max_size=30),
    provider_sid=st.none() | st.text(max_size=30),
    id_token=st.none() | st.text(max_size=50),
    acr=st.none() | st.text(max_size=20),
    amr=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    auth_time=st.floats(min_value=0, max_value=4e9),
    proofs=st.lists(proofs, max_size=MAX_PROOFS).map(tuple),
    created_at=st.floats(min_value=0, max_value=4e9),
    last_seen=st.floats(min_value=0, max_value=4e9),
)


@given(sessions)
def test_session_round_trips_through_json(session: Session) -> None:
    encoded = json.dumps(session.to_dict())
    assert Session.from_dict(json.loads(encoded)) == session


def test_session_dict_is_compact() -> None:
    data = make_session(id_token=None, name=None).to_dict()
    assert set(data) == {"v", "i", "s", "e", "p", "a", "m", "at", "pr", "c", "l"}
    assert data["c"] == 1_700_000_000  # whole seconds written as int
    assert Session.from_dict(data) == make_session(id_token=None, name=None)


def _valid_dict() -> dict[str, Any]:
    return make_session().to_dict()


def _without(key: str) -> dict[str, Any]:
    data = _valid_dict()
    del data[key]
    return data


def _with(**changes: object) -> dict[str, Any]:
    return {**_valid_dict(), **changes}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="list"),
        pytest.param("session", id="str"),
        pytest.param({}, id="empty"),
        *(
            pytest.param(_without(key), id=f"missing-{key}")
            for key in ("v", "i", "s", "m", "at", "pr", "c", "l")
        ),
        pytest.param(_with(v=2), id="future-version"),
        pytest.param(_with(v=True), id="version-bool"),
        pytest.param(_with(v=1.0), id="version-float"),
        pytest.param(_with(i=""), id="empty-id"),
        pytest.param(_with(s=""), id="empty-sub"),
        pytest.param(_with(s=7), id="sub-int"),
        pytest.param(_with(e=["a"]), id="email-list"),
        pytest.param(_with(t=1), id="id-token-int"),
        pytest.param(_with(a=False), id="acr-bool"),
        pytest.param(_with(m="pwd"), id="amr-str"),
        pytest.param(_with(m=["pwd", 1]), id="amr-item-int"),
        pytest.param(_with(at="1700000000"), id="auth-time-str"),
        pytest.param(_with(at=True), id="auth-time-bool"),
        pytest.param(_with(at=float("nan")), id="auth-time-nan"),
        pytest.param(_with(c=float("inf")), id="created-inf"),
        pytest.param(_with(l=None), id="last-seen-none"),
        pytest.param(_with(pr={}), id="proofs-dict"),
        pytest.param(_with(pr=[["acr", ["pwd"]]]), id="proof-short"),
        pytest.param(_with(pr=[["acr", "pwd", 1]]), id="proof-amr-str"),
        pytest.param(_with(pr=[[1, ["pwd"], 1]]), id="proof-acr-int"),
        pytest.param(_with(pr=[["acr", ["pwd"], "1"]]), id="proof-time-str"),
        pytest.param(_with(pr=[["a", [], 1]] * (MAX_PROOFS + 1)), id="too-many-proofs"),
    ],
)
def test_from_dict_rejects_malformed(data: object) -> None:
    assert Session.from_dict(data) is None


@settings(max_examples=300)
@given(json_values)
def test_from_dict_never_raises_on_arbitrary_json(data: object) -> None:
    assert Session.from_dict(data) is None


@settings(max_examples=300)
@given(st.sampled_from(sorted(_valid_dict())), json_values)
def test_from_dict_never_raises_with_one_field_replaced(key: str, value: object) -> None:
    result = Session.from_dict(_with(**{key: value}))
    assert result is None or isinstance(result, Session)


def test_start_records_the_first_proof() -> None:
    session = make_session()
    assert session.acr == "urn:example:loa:1"
    assert session.amr == ("pwd",)
    assert session.proofs == (Proof("urn:example:loa:1", ("pwd",), NOW - 5),)
    assert session.created_at == session.last_seen == NOW
    fresh = Session.start(
        session.proofs[0], sub="u", email=None, name=None, provider_sid=None, id_token=None, now=NOW
    )
    assert len(fresh.id) >= 20 and fresh.id != make_session().id  # random when not given


def test_with_proof_upgrades_and_keeps_created_at() -> None:
    session = make_session()
    later = NOW + 600
    upgraded = session.with_proof(
        Proof("phr", ("hwk", "pin"), later - 2),
        sub="user-1",
        email="new@example.com",
        name="Ada L.",
        provider_sid="op-sid-2",
        id_token="new.id.token",
        now=later,
    )
    assert (upgraded.acr, upgraded.amr, upgraded.auth_time) == ("phr", ("hwk", "pin"), later - 2)
    assert (upgraded.email, upgraded.name) == ("new@example.com", "Ada L.")
    assert (upgraded.provider_sid, upgraded.id_token) == ("op-sid-2", "new.id.token")
    assert upgraded.proofs == (Proof("phr", ("hwk", "pin"), later - 2), *session.proofs)
    assert upgraded.created_at == NOW  # a step-up does not extend the absolute lifetime
    assert upgraded.last_seen == later
    assert upgraded.id == session.id
    assert upgraded.assurance() != session.assurance()


def test_with_proof_refuses_another_subject() -> None:
    with pytest.raises(ValueError):
        make_session().with_proof(
            Proof("phr", ("hwk",), NOW),
            sub="someone-else",
            email=None,
            name=None,
            provider_sid=None,
            id_token=None,
            now=NOW,
        )


def test_with_proof_keeps_newest_per_acr_and_amr_set() -> None:
    session = make_session()
    session = step_up(session, Proof("mfa", ("pwd", "otp"), NOW + 10), NOW + 10)
    session = step_up(session, Proof("mfa", ("otp", "pwd"), NOW + 20), NOW + 20)  # same set
    assert [p.auth_time for p in session.proofs if p.acr == "mfa"] == [NOW + 20]
    # An older report of the same method does not replace the newer proof ...
    session = step_up(session, Proof("mfa", ("otp", "pwd"), NOW + 15), NOW + 30)
    assert [p.auth_time for p in session.proofs if p.acr == "mfa"] == [NOW + 20]
    # ... though acr/amr/auth_time describe the authentication that just happened.
    assert session.auth_time == NOW + 15
    # A different amr under the same acr is a separate proof.
    session = step_up(session, Proof("mfa", ("hwk",), NOW + 40), NOW + 40)
    assert len([p for p in session.proofs if p.acr == "mfa"]) == 2


def test_with_proof_keeps_at_most_eight_newest_first() -> None:
    session = make_session()
    for n in range(1, 12):
        session = step_up(session, Proof(f"acr-{n}", ("pwd",), NOW + n), NOW + n)
    assert len(session.proofs) == MAX_PROOFS
    assert [p.acr for p in session.proofs] == [f"acr-{n}" for n in range(11, 3, -1)]


def test_touched_only_moves_last_seen() -> None:
    session = make_session()
    touched = session.touched(NOW + 90)
    assert touched.last_seen == NOW + 90
    assert replace(touched, last_seen=session.last_seen) == session
    assert touched.assurance() == session.assurance()


@pytest.mark.parametrize(
    ("elapsed_s", "due"), [(0, False), (59, False), (59.999, False), (60, True), (600, True)]
)
def test_touch_due(elapsed_s: float, due: bool) -> None:
    assert make_session().touch_due(NOW + elapsed_s) is due


@pytest.mark.parametrize(
    ("idle_s", "age_s", "is_expired"),
    [
        (0, 0, False),
        (IDLE_S - 1, IDLE_S - 1, False),
        (IDLE_S - 0.001, 100, False),
        (IDLE_S, IDLE_S, True),  # idle boundary: exactly idle_timeout ago is expired
        (IDLE_S + 1, IDLE_S + 1, True),
        (0, LIFETIME_S - 1, False),
        (0, LIFETIME_S, True),  # absolute boundary, although seen just now
        (0, LIFETIME_S + 3600, True),
        (-120, 10, False),  # last_seen slightly ahead (another replica's clock)
    ],
)
def test_expired_at_the_boundaries(idle_s: float, age_s: float, is_expired: bool) -> None:
    now = NOW + 100_000
    session = replace(make_session(), created_at=now - age_s, last_seen=now - idle_s)
    assert expired(session, now, IDLE_S, LIFETIME_S) is is_expired


# --------------------------------------------------------------------------- CookieStore


def cookie_store(secrets: list[bytes] | None = None, **kwargs: Any) -> CookieStore:
    return CookieStore(secrets or [OLD], idle_timeout_s=IDLE_S, lifetime_s=LIFETIME_S, **kwargs)


async def test_cookie_store_round_trip() -> None:
    store: SessionStore = cookie_store()
    session = make_session()
    value = await store.save(session, NOW)
    assert await store.load(value, NOW + 1) == session
    assert await store.ping()


async def test_cookie_store_writes_format_1_byte_for_byte() -> None:
    # The plaintext inside the cookie, pinned: a session of the default provider is
    # written exactly as gateways before several providers wrote (and read) it.
    session = Session.start(
        Proof(acr="urn:example:loa:1", amr=("pwd",), auth_time=NOW - 5),
        sub="user-1",
        email="ada@example.com",
        name="Ada Lovelace",
        provider_sid="op-sid-1",
        id_token="header.payload.signature",
        now=NOW,
        session_id="sess-1",
        ip="192.0.2.7",
        binding="digest-1",
    ).with_proof(
        Proof(acr="urn:example:loa:2", amr=("pwd", "otp"), auth_time=NOW + 100.5, id="proof-2"),
        sub="user-1",
        email="ada@example.com",
        name="Ada Lovelace",
        provider_sid="op-sid-1",
        id_token="header.payload.signature",
        now=NOW + 101,
        ip="192.0.2.8",
        binding="digest-2",
    )
    raw = unb64(await cookie_store().save(session, NOW + 101))
    purpose = SESSION_PURPOSE.encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(OLD)
    plaintext = AESGCM(key).decrypt(raw[1:13], raw[13:], b"\x01" + purpose)
    assert plaintext == (
        b'{"v":1,"i":"sess-1","s":"user-1","e":"ada@example.com","n":"Ada Lovelace",'
        b'"p":"op-sid-1","t":"header.payload.signature","a":"urn:example:loa:2",'
        b'"m":["pwd","otp"],"at":1700000100.5,'
        b'"pr":[["urn:example:loa:2",["pwd","otp"],1700000100.5,"proof-2"],'
        b'["urn:example:loa:1",["pwd"],1699999995]],"c":1700000000,"l":1700000101,'
        b'"ip":"192.0.2.8","b":[["digest-2",1700000100.5],["digest-1",1699999995]]}'
    )


async def test_cookie_store_rejects_tampered_and_foreign_values() -> None:
    store = cookie_store()
    value = await store.save(make_session(), NOW)
    flipped = value[:20] + ("A" if value[20] != "A" else "B") + value[21:]
    assert await store.load(flipped, NOW) is None
    assert await store.load("", NOW) is None
    # A transaction cookie sealed with the same secret is not a session.
    tx_value = TransactionCodec([OLD]).seal(make_tx())
    assert await store.load(tx_value, NOW) is None
    # A well-formed payload that is not a session.
    not_a_session = Sealer([OLD], SESSION_PURPOSE).seal({"v": 1, "s": "user-1"})
    assert await store.load(not_a_session, NOW) is None


@pytest.mark.parametrize(
    ("load_at", "found"),
    [(NOW + IDLE_S - 1, True), (NOW + IDLE_S, False)],
)
async def test_cookie_store_enforces_idle_timeout(load_at: float, found: bool) -> None:
    store = cookie_store()
    value = await store.save(make_session(), NOW)
    assert (await store.load(value, load_at) is not None) is found


async def test_cookie_store_enforces_lifetime_even_when_active() -> None:
    store = cookie_store()
    session = make_session().touched(NOW + LIFETIME_S - 1)
    value = await store.save(session, NOW + LIFETIME_S - 1)
    assert await store.load(value, NOW + LIFETIME_S - 1) is not None
    assert await store.load(value, NOW + LIFETIME_S) is None


async def test_cookie_store_reads_across_secret_rotation() -> None:
    value = await cookie_store([OLD]).save(make_session(), NOW)
    assert await cookie_store([NEW, OLD]).load(value, NOW) == make_session()
    assert await cookie_store([NEW]).load(value, NOW) is None


async def test_cookie_store_drops_id_token_when_too_big() -> None:
    store = cookie_store()
    session = make_session(id_token="e" * 4000)
    with capture_logs() as logs:
        value = await store.save(session, NOW)
    assert len(value) <= MAX_COOKIE_VALUE_BYTES
    loaded = await store.load(value, NOW)
    assert loaded == replace(session, id_token=None)
    assert logs == [
        {
            "event": "session_cookie_trimmed",
            "log_level": "warning",
            "session_id": "sess-1",
            "dropped": ["id_token"],
        }
    ]


async def test_cookie_store_keeps_id_token_that_fits() -> None:
    store = cookie_store()
    session = make_session(id_token="e" * 1500)
    value = await store.save(session, NOW)
    assert await store.load(value, NOW) == session


async def test_cookie_store_trims_old_proofs_then_name() -> None:
    store = cookie_store()
    session = make_session(id_token="e" * 3000, name="N" * 2800)
    for n in range(1, 8):
        session = step_up(session, Proof("a" * 40 + str(n), ("hwk",) * 5, NOW + n), NOW + n)
    value = await store.save(session, NOW + 8)
    loaded = await store.load(value, NOW + 8)
    assert loaded is not None and len(value) <= MAX_COOKIE_VALUE_BYTES
    assert loaded.id_token is None and loaded.name is None
    assert loaded.proofs == session.proofs[:1]
    assert (loaded.acr, loaded.auth_time, loaded.email) == (
        session.acr,
        session.auth_time,
        session.email,
    )


async def test_cookie_store_refuses_a_session_that_cannot_fit() -> None:
    session = replace(make_session(), email="x" * 4000 + "@example.com")
    with pytest.raises(SessionTooLarge) as raised:
        await cookie_store().save(session, NOW)
    assert isinstance(raised.value, errors.GatewayError)


# --------------------------------------------------------------------------- MemoryStore


def memory_store(**kwargs: Any) -> MemoryStore:
    return MemoryStore(idle_timeout_s=IDLE_S, lifetime_s=LIFETIME_S, **kwargs)


async def test_memory_store_uses_opaque_256_bit_handles() -> None:
    store: SessionStore = memory_store()
    session = make_session()
    handle = await store.save(session, NOW)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", handle)  # 32 random bytes
    assert session.sub not in handle and session.id not in handle
    assert await store.load(handle, NOW) == session
    assert await store.save(make_session(), NOW) != handle


@pytest.mark.parametrize("value", ["", "x", "A" * 43, "A" * 44, "../etc", "é" * 43])
async def test_memory_store_unknown_values(value: str) -> None:
    store = memory_store()
    await store.save(make_session(), NOW)
    assert await store.load(value, NOW) is None


async def test_memory_store_keeps_handle_when_assurance_unchanged() -> None:
    store = memory_store()
    handle = await store.save(make_session(), NOW)
    touched = make_session().touched(NOW + 120)
    assert await store.save(touched, NOW + 120, previous=handle) == handle
    assert await store.load(handle, NOW + 120) == touched
    assert len(store) == 1


async def test_memory_store_rotates_handle_on_step_up() -> None:
    store = memory_store()
    before = make_session()
    old_handle = await store.save(before, NOW)
    after = step_up(before, Proof("phr", ("hwk",), NOW + 60), NOW + 60)
    new_handle = await store.save(after, NOW + 60, previous=old_handle)
    assert new_handle != old_handle
    assert await store.load(old_handle, NOW + 60) is None  # a fixated handle gains nothing
    assert await store.load(new_handle, NOW + 60) == after
    assert len(store) == 1


async def test_memory_store_rotates_when_asked() -> None:
    store = memory_store()
    old_handle = await store.save(make_session(), NOW)
    new_handle = await store.save(make_session(), NOW, rotate=True, previous=old_handle)
    assert new_handle != old_handle
    assert await store.load(old_handle, NOW) is None
    assert len(store) == 1


async def test_memory_store_rotates_when_a_new_session_replaces_the_old() -> None:
    store = memory_store()
    old_handle = await store.save(make_session(session_id="first"), NOW)
    new_handle = await store.save(make_session(session_id="second"), NOW, previous=old_handle)
    assert new_handle != old_handle
    assert old_handle not in store


async def test_memory_store_never_adopts_a_client_chosen_handle() -> None:
    store = memory_store()
    chosen = "A" * 43
    handle = await store.save(make_session(), NOW, previous=chosen)
    assert handle != chosen
    assert await store.load(chosen, NOW) is None


async def test_memory_store_is_bounded_and_evicts_least_recently_saved() -> None:
    store = memory_store(max_sessions=3)
    handles = [await store.save(make_session(session_id=f"s{n}"), NOW + n) for n in range(3)]
    # Saving the first again makes the second the least recently saved.
    first = make_session(session_id="s0").touched(NOW + 3)
    assert await store.save(first, NOW + 3, previous=handles[0]) == handles[0]
    extra = [await store.save(make_session(session_id=f"x{n}"), NOW + 4) for n in range(2)]
    assert len(store) == 3
    assert store.evictions == 2
    assert handles[1] not in store and handles[2] not in store
    assert handles[0] in store and all(h in store for h in extra)


@pytest.mark.parametrize(
    ("load_at", "found"),
    [(NOW + IDLE_S - 1, True), (NOW + IDLE_S, False)],
)
async def test_memory_store_enforces_idle_timeout_and_forgets(load_at: float, found: bool) -> None:
    store = memory_store()
    handle = await store.save(make_session(), NOW)
    assert (await store.load(handle, load_at) is not None) is found
    assert (handle in store) is found


async def test_memory_store_enforces_lifetime() -> None:
    store = memory_store()
    session = make_session().touched(NOW + LIFETIME_S - 10)
    handle = await store.save(session, NOW + LIFETIME_S - 10)
    assert await store.load(handle, NOW + LIFETIME_S - 1) is not None
    assert await store.load(handle, NOW + LIFETIME_S) is None
    assert handle not in store


async def test_memory_store_sweeps_expired_sessions() -> None:
    store = memory_store()
    stale = [await store.save(make_session(session_id=f"old{n}"), NOW) for n in range(3)]
    later = NOW + IDLE_S + 1
    fresh = await store.save(make_session(session_id="new", now=later), later)
    # The save itself removed the expired sessions at the old end of the store.
    assert all(h not in store for h in stale)
    assert fresh in store
    assert store.sweep(later) == 0
    assert store.sweep(later + IDLE_S) == 1
    assert len(store) == 0


async def test_memory_store_delete() -> None:
    store = memory_store()
    handle = await store.save(make_session(), NOW)
    await store.delete(handle)
    await store.delete(handle)  # already gone: no error
    assert await store.load(handle, NOW) is None
    assert await store.ping()


@pytest.mark.parametrize(
    ("sub", "sid", "gone"),
    [
        ("ada", None, {"ada-laptop", "ada-phone", "ada-tablet"}),
        (None, "op-1", {"ada-laptop", "ada-phone", "bob-same-sid"}),
        ("ada", "op-1", {"ada-laptop", "ada-phone"}),  # both: that sid, of that subject
        ("ada", "op-3", set()),
        ("nobody", None, set()),
    ],
)
async def test_memory_store_delete_by(sub: str | None, sid: str | None, gone: set[str]) -> None:
    store = memory_store()
    owners = {
        "ada-laptop": ("ada", "op-1"),
        "ada-phone": ("ada", "op-1"),
        "ada-tablet": ("ada", "op-2"),
        "bob": ("bob", "op-3"),
        "bob-same-sid": ("bob", "op-1"),
    }
    handles = {
        name: await store.save(replace(make_session(session_id=name), sub=s, provider_sid=p), NOW)
        for name, (s, p) in owners.items()
    }
    assert await store.delete_by(sub=sub, provider_sid=sid) == len(gone)
    for name, handle in handles.items():
        assert (handle in store) is (name not in gone), name
    with pytest.raises(ValueError):
        await store.delete_by(sub=None, provider_sid=None)


@pytest.mark.parametrize(("kind", "cls"), [("cookie", CookieStore), ("memory", MemoryStore)])
def test_make_store(kind: str, cls: type) -> None:
    cfg = model.SessionConfig(secrets=(OLD,), store=kind)
    assert isinstance(make_store(cfg), cls)


def test_make_store_unknown_kind_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError) as raised:
        make_store(model.SessionConfig(secrets=(OLD,), store="redis"))
    assert raised.value.problems[0].key_path == "session.store"


# --------------------------------------------------------------------------- Transactions

TTL_S = 600


def make_tx(state: str = "state-1", created_at: float = NOW, **changes: Any) -> Transaction:
    tx = Transaction(
        state=state,
        nonce="nonce-1",
        code_verifier="v" * 43,
        return_to="/api/transfers?x=1",
        rule="transfers",
        level="phishing-resistant",
        max_age_s=300,
        created_at=created_at,
    )
    return replace(tx, **changes)


@pytest.mark.parametrize(
    "tx",
    [
        make_tx(),
        make_tx(rule=None, level=None, max_age_s=None, mode="popup"),
        make_tx(max_age_s=0, created_at=NOW + 0.25),
    ],
)
def test_transaction_round_trip(tx: Transaction) -> None:
    codec = TransactionCodec([OLD])
    assert codec.open(codec.seal(tx), tx.state, tx.created_at + 1, TTL_S) == tx


@pytest.mark.parametrize("callback_state", ["state-2", "", "state-1 ", "STATE-1", "state-\udc80"])
def test_transaction_state_mismatch(callback_state: str) -> None:
    codec = TransactionCodec([OLD])
    assert codec.open(codec.seal(make_tx("state-1")), callback_state, NOW, TTL_S) is None


@pytest.mark.parametrize(
    ("opened_at", "found"),
    [
        (NOW, True),
        (NOW + TTL_S - 1, True),
        (NOW + TTL_S, False),  # exactly ttl old: expired
        (NOW + TTL_S + 1, False),
        (NOW - CLOCK_SKEW_S, True),  # sealed a little "in the future" by another replica
        (NOW - CLOCK_SKEW_S - 1, False),
    ],
)
def test_transaction_ttl(opened_at: float, found: bool) -> None:
    codec = TransactionCodec([OLD])
    opened = codec.open(codec.seal(make_tx()), "state-1", opened_at, TTL_S)
    assert (opened is not None) is found


def test_transaction_rejects_tampered_foreign_and_rotated_out_values() -> None:
    codec = TransactionCodec([OLD])
    value = codec.seal(make_tx())
    assert codec.open(value[:-2], "state-1", NOW, TTL_S) is None
    assert TransactionCodec([NEW, OLD]).open(value, "state-1", NOW, TTL_S) == make_tx()
    assert TransactionCodec([NEW]).open(value, "state-1", NOW, TTL_S) is None
    session_value = Sealer([OLD], SESSION_PURPOSE).seal(make_tx().to_dict())
    assert codec.open(session_value, "state-1", NOW, TTL_S) is None


@settings(max_examples=300)
@given(json_values)
def test_transaction_from_dict_never_raises(data: object) -> None:
    assert Transaction.from_dict(data) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"s": ""},
        {"n": None},
        {"v": 5},
        {"r": ""},
        {"o": ""},
        {"u": 1},
        {"l": ["x"]},
        {"m": True},
        {"m": -1},
        {"m": 1.5},
        {"c": "now"},
        {"c": float("nan")},
        {"c": True},
    ],
)
def test_transaction_from_dict_rejects_malformed(changes: dict[str, object]) -> None:
    assert Transaction.from_dict({**make_tx().to_dict(), **changes}) is None


@pytest.mark.parametrize(
    ("secure", "pattern"),
    [(True, r"__Host-stepup_tx_[0-9a-f]{8}"), (False, r"stepup_tx_[0-9a-f]{8}")],
)
def test_tx_cookie_name(secure: bool, pattern: str) -> None:
    name = tx_cookie_name("stepup_tx", "state-1", secure)
    assert re.fullmatch(pattern, name)
    assert tx_cookie_name("stepup_tx", "state-1", secure) == name
    assert tx_cookie_name("stepup_tx", "state-2", secure) != name


@given(st.text())
def test_tx_cookie_name_never_raises(state: str) -> None:
    assert re.fullmatch(r"stepup_tx_[0-9a-f]{8}", tx_cookie_name("stepup_tx", state, False))


def test_tx_cookie_names_lists_only_transaction_cookies() -> None:
    ours = tx_cookie_name("stepup_tx", "s1", True)
    cookies = {
        ours: "v",
        "__Host-stepup_session": "v",
        "stepup_tx_0123abcd": "v",  # the insecure variant
        "__Host-stepup_tx_0123ABCD": "v",
        "__Host-stepup_tx_0123abcd0": "v",
        "__Host-stepup_tx_": "v",
        "other": "v",
    }
    assert tx_cookie_names(cookies, "stepup_tx", secure=True) == [ours]
    assert tx_cookie_names(cookies, "stepup_tx", secure=False) == ["stepup_tx_0123abcd"]


def tx_cookies(codec: TransactionCodec, created: list[float]) -> dict[str, str]:
    return {
        tx_cookie_name("stepup_tx", f"state-{n}", True): codec.seal(
            make_tx(f"state-{n}", created_at=when)
        )
        for n, when in enumerate(created)
    }


@pytest.mark.parametrize(
    ("created", "dropped_states"),
    [
        ([], []),
        ([NOW - 4, NOW - 3, NOW - 2], []),
        ([NOW - 4, NOW - 3, NOW - 2, NOW - 1], []),  # four live + the new one = five
        ([NOW - 5, NOW - 4, NOW - 3, NOW - 2, NOW - 1], [0]),
        ([NOW - 1, NOW - 7, NOW - 2, NOW - 3, NOW - 4, NOW - 6], [1, 5]),
        ([NOW - TTL_S, NOW - 1], [0]),  # expired
    ],
)
def test_tx_cookies_to_drop_keeps_room_for_one_more(
    created: list[float], dropped_states: list[int]
) -> None:
    codec = TransactionCodec([OLD])
    cookies = tx_cookies(codec, created)
    dropped = tx_cookies_to_drop(
        {**cookies, "__Host-stepup_session": "x"},
        codec,
        base="stepup_tx",
        secure=True,
        now=NOW,
        ttl_s=TTL_S,
    )
    expected = [tx_cookie_name("stepup_tx", f"state-{n}", True) for n in dropped_states]
    assert sorted(dropped) == sorted(expected)
    assert len(cookies) - len(dropped) <= 4


def test_tx_cookies_to_drop_drops_unreadable_values_first() -> None:
    codec = TransactionCodec([OLD])
    cookies = tx_cookies(codec, [NOW - 1])
    garbage = tx_cookie_name("stepup_tx", "garbage", True)
    cookies[garbage] = "not-sealed"
    kwargs: dict[str, Any] = {"base": "stepup_tx", "secure": True, "now": NOW, "ttl_s": TTL_S}
    assert tx_cookies_to_drop(cookies, codec, **kwargs) == [garbage]


# --------------------------------------------------------------------------- Cookies


@pytest.mark.parametrize(
    ("secure", "expected"), [(True, "__Host-stepup_session"), (False, "stepup_session")]
)
def test_cookie_name(secure: bool, expected: str) -> None:
    assert cookie_name("stepup_session", secure) == expected


@pytest.mark.parametrize("secure", [True, False])
@pytest.mark.parametrize("max_age", [None, 0, 600])
def test_set_cookie_kwargs(secure: bool, max_age: int | None) -> None:
    kwargs = set_cookie_kwargs(secure, max_age)
    expected: dict[str, object] = {
        "path": "/",
        "httponly": True,
        "samesite": "Lax",
        "secure": secure,
    }
    if max_age is not None:
        expected["max_age"] = max_age
    assert kwargs == expected
    assert "domain" not in kwargs


async def test_cookie_attributes_on_the_wire(aiohttp_client: AiohttpClient) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie(cookie_name("s", True), "v1", **set_cookie_kwargs(True, 600))
        response.set_cookie(cookie_name("t", False), "v2", **set_cookie_kwargs(False, None))
        response.del_cookie(cookie_name("old", True), **delete_cookie_kwargs(True))
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    response = await client.get("/")
    headers = {h.split("=", 1)[0]: h for h in response.headers.getall("Set-Cookie")}

    def attributes(header: str) -> set[str]:
        return {part.strip().lower() for part in header.split(";")[1:]}

    assert attributes(headers["__Host-s"]) == {
        "httponly",
        "max-age=600",
        "path=/",
        "samesite=lax",
        "secure",
    }
    assert attributes(headers["t"]) == {"httponly", "path=/", "samesite=lax"}
    deleted = attributes(headers["__Host-old"])
    assert {"max-age=0", "path=/", "secure"} <= deleted
    assert not any(a.startswith("domain") for h in headers.values() for a in attributes(h))


# ----------------------------------------------------- CookieStore: opened sessions kept


class _CountingSealer:
    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self.opened = 0

    def open(self, token: str) -> dict[str, object] | None:
        self.opened += 1
        return self.sealer.open(token)

    def seal(self, payload: Any) -> str:
        return self.sealer.seal(payload)


def counting_cookie_store() -> tuple[CookieStore, _CountingSealer]:
    store = cookie_store()
    counting = _CountingSealer(store._sealer)
    store._sealer = counting  # type: ignore[assignment]
    return store, counting


async def test_cookie_store_opens_a_value_once_and_still_checks_expiry() -> None:
    store, counting = counting_cookie_store()
    value = await store.save(make_session(), NOW)

    assert await store.load(value, NOW + 1) == make_session()
    assert await store.load(value, NOW + IDLE_S - 1) == make_session()
    assert counting.opened == 1
    assert await store.load(value, NOW + IDLE_S) is None  # the idle timeout still holds
    assert await store.load(value, NOW + 1) == make_session()  # forgotten, opened again
    assert counting.opened == 2


async def test_cookie_store_keeps_only_values_that_opened() -> None:
    store, counting = counting_cookie_store()
    value = await store.save(make_session(), NOW)
    flipped = value[:20] + ("A" if value[20] != "A" else "B") + value[21:]

    for _ in range(3):
        assert await store.load(flipped, NOW) is None
    assert counting.opened == 3
    assert store._opened == {}


async def test_cookie_store_keeps_a_bounded_number_of_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.session.stores.OPENED_CACHE_SIZE", 3)
    store, counting = counting_cookie_store()
    values = [await store.save(make_session(), NOW) for _ in range(5)]  # fresh nonce each

    for value in values:
        assert await store.load(value, NOW) is not None
    assert list(store._opened) == values[2:]  # the oldest went first
    assert await store.load(values[0], NOW) is not None
    assert counting.opened == 6
