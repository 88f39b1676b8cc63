"""Sessions and sign-in transactions in Redis, shared by every worker and replica.

The cookie carries only an opaque 256-bit handle. Redis holds, per session, a
hash under ``{prefix}s:{sha256(handle)}``; the handle itself is never stored,
so a copy of the keyspace cannot be replayed as cookies. Everything readable
about the user is sealed with AES-256-GCM (:class:`Sealer`, its own purpose),
and the index keys name subjects by keyed hash, so a dump of Redis leaks
neither sessions nor who has one.

Key layout (``{prefix}`` is ``session.redis_prefix``, ``stepup:`` by default)::

    {prefix}s:{H(handle)}     hash  d = sealed {"k": H(handle), "s": session}
                                    f = fingerprint of (session id, assurance)
                                    u = the sub index key, p = the sid index key
                              TTL   the idle timeout (never past the absolute lifetime)
    {prefix}sub:{M(sub)}      set   of H(handle), every session of that subject
    {prefix}sid:{M(sid)}      set   of H(handle), every session of that provider session
                              TTL   the absolute lifetime, reset on each add
    {prefix}tx:{H(state)}     str   sealed Transaction; TTL session.transaction_ttl
    {prefix}once:{H(name)}    str   "1"; claim_once() markers (one-time proofs, logout jti)
    {prefix}rec:{H(name)}     str   a time; put_record() (revoked cookie-store sessions)
    {prefix}blob:{H(name)}    str   sealed kept request; TTL session.transaction_ttl

Eviction: a ``once`` or ``rec`` key that Redis evicts is a used proof that works
again or a signed-out session that is back. Every key here has a TTL, so the
``volatile-*`` policies may evict any of them just as ``allkeys-*`` may; only
``noeviction`` (Redis then refuses writes when full, and the gateway answers 503)
keeps them. :func:`gateway.session.redis_connect.eviction_problem` says whether a
server's settings are safe.

    H = SHA-256, hex.  M = HMAC-SHA256 with a key derived from the session secret.

Each write that reads before it writes (rotation, reuse of the previous handle,
index upkeep, deletion by subject) is one Lua script, so it is atomic and a
failover or a concurrent request never leaves half of it done.

Errors: every Redis or socket error, including a timeout, raises
:class:`errors.StoreUnavailable` (503 ``store_down``). Nothing here ever answers
"no session" because Redis did not answer.

Load: at most ``pool_size`` commands are in flight per process; the others wait in
line (first come, first served) for up to ``pool_timeout_s``, then raise
:class:`errors.StoreBusy` (503 ``store_busy`` with Retry-After): a busy gateway is
back-pressure, not an outage. redis-py's own pool would instead fail at once with
"Too many connections", which is indistinguishable from a Redis that is down.
A request makes one round trip in the common case (HGET of its session; a save
when its idle timer is refreshed, a SET NX for a one-time proof), so there is
nothing to pipeline.

Which URLs work (and why Cluster does not) is in :mod:`gateway.session.redis_url`.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import math
import secrets
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import errors
from gateway.memo import Memo
from gateway.session.crypto import Sealer, derive_key
from gateway.session.model import Session, expired
from gateway.session.redis_connect import Slots, connect, is_refusal
from gateway.session.stores import HANDLE_BYTES, is_handle
from gateway.session.transaction import Transaction, same_state

REDIS_SESSION_PURPOSE = "stepup-gateway redis session v1"
REDIS_TX_PURPOSE = "stepup-gateway redis tx v1"
REDIS_BLOB_PURPOSE = "stepup-gateway redis kept request v1"
REDIS_INDEX_PURPOSE = "stepup-gateway redis index v1"
DEFAULT_PREFIX = "stepup:"
# Pool connections kept beyond ``pool_size`` for readiness probes, which must not
# wait behind requests: a probe failing because the pool is busy would take a
# loaded process out of its Service and move its load onto the others.
PROBE_CONNECTIONS = 4
# The default when none is given (the config derives it from server.max_connections).
DEFAULT_POOL_SIZE = 256
DEFAULT_POOL_TIMEOUT_S = 5.0
# Retry-After of a store_busy answer: a moment, not a guess at an outage's length.
BUSY_RETRY_AFTER_S = 1
# Sessions opened from the sealed bytes Redis returned: one decryption per change.
OPENED_MEMO_ENTRIES = 4096
OPENED_MEMO_BYTES = 8 * 1024 * 1024

_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)
_DOWN = (RedisError, OSError)  # OSError covers ConnectionError and TimeoutError
_UNAVAILABLE = "The session store is not answering; try again shortly."
_BUSY = "The gateway is busy; try again in a moment."

T = TypeVar("T")

log = structlog.get_logger(__name__)

# Shared by the scripts: forget one session and its index entries.
_LUA_DROP = """
local function drop(key, member)
  local held = redis.call('HMGET', key, 'u', 'p')
  if held[1] then redis.call('SREM', held[1], member) end
  if held[2] then redis.call('SREM', held[2], member) end
  return redis.call('DEL', key)
end
"""

# KEYS: new key, previous key (the new key again in mode "new"), sub index[, sid index]
# ARGV: mode (new | rotate | keep), fingerprint, data for the new key, data for the
#       previous key, TTL, index TTL, session key prefix, new member, previous member
# Returns 1: the previous handle was kept; 2: the new handle was written;
#         0: mode keep and the previous session is gone, nothing was written.
_LUA_SAVE = (
    _LUA_DROP
    + """
local new_key, prev_key, sub_index, sid_index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, fp = ARGV[1], ARGV[2]
local ttl, index_ttl, session_prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]

local function write(key, member, data)
  if sid_index then
    redis.call('HSET', key, 'd', data, 'f', fp, 'u', sub_index, 'p', sid_index)
  else
    redis.call('HSET', key, 'd', data, 'f', fp, 'u', sub_index)
  end
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', sub_index, member)
  redis.call('EXPIRE', sub_index, index_ttl)
  if sid_index then
    redis.call('SADD', sid_index, member)
    redis.call('EXPIRE', sid_index, index_ttl)
  end
end

-- Members whose session expired on its own (idle TTL) stay in the index sets
-- until those expire; a new session clears them out of its own sets.
local function prune(index)
  for _, member in ipairs(redis.call('SMEMBERS', index)) do
    if redis.call('EXISTS', session_prefix .. member) == 0 then
      redis.call('SREM', index, member)
    end
  end
end

-- The new handle is fresh and random: if its key exists, this is a retry of a
-- call whose answer was lost, and the write is already done.
if redis.call('EXISTS', new_key) == 1 then return 2 end
if mode ~= 'new' then
  local held = redis.call('HGET', prev_key, 'f')
  if not held then
    if mode == 'keep' then return 0 end
  elseif mode == 'keep' and held == fp then
    drop(prev_key, ARGV[9])
    write(prev_key, ARGV[9], ARGV[4])
    return 1
  else
    drop(prev_key, ARGV[9])
  end
end
write(new_key, ARGV[8], ARGV[3])
prune(sub_index)
if sid_index then prune(sid_index) end
return 2
"""
)

# KEYS: session key. ARGV: its member.
_LUA_DELETE = _LUA_DROP + "return drop(KEYS[1], ARGV[1])\n"

# KEYS: index sets to empty. ARGV: session key prefix, then the sub index keys a
# session must belong to (none: no such condition). Returns how many sessions went.
_LUA_DELETE_BY = (
    _LUA_DROP
    + """
local session_prefix = ARGV[1]
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local filtered = #ARGV > 1
local count = 0
for _, index in ipairs(KEYS) do
  for _, member in ipairs(redis.call('SMEMBERS', index)) do
    local key = session_prefix .. member
    local sub_index = redis.call('HGET', key, 'u')
    if not sub_index then
      redis.call('SREM', index, member)
    elseif not filtered or wanted[sub_index] then
      count = count + drop(key, member)
    end
  end
end
return count
"""
)


class RedisStore:
    """Sessions in Redis behind an opaque 256-bit handle; see the module docstring.

    Speaks :class:`gateway.session.stores.SessionStore`, plus :meth:`delete_by`
    (back-channel logout), :meth:`put_tx`/:meth:`take_tx` (sign-in
    transactions), :meth:`claim_once` and :meth:`close`.
    """

    def __init__(
        self,
        client: Redis,
        secrets: Sequence[bytes],
        *,
        idle_timeout_s: float,
        lifetime_s: float,
        prefix: str = DEFAULT_PREFIX,
        also_close: Sequence[Redis] = (),
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ) -> None:
        self._redis = client
        self._slots = Slots(pool_size)
        self._pool_timeout_s = pool_timeout_s
        self._also_close = tuple(also_close)
        self._sealer = Sealer(secrets, REDIS_SESSION_PURPOSE)
        self._tx_sealer = Sealer(secrets, REDIS_TX_PURPOSE)
        self._blob_sealer = Sealer(secrets, REDIS_BLOB_PURPOSE)
        # (sealed bytes, key member) -> the session they opened to: see _open.
        self._opened: Memo[tuple[bytes | str, str], Session] = Memo(
            max_entries=OPENED_MEMO_ENTRIES, max_bytes=OPENED_MEMO_BYTES
        )
        # The first key names index sets for new writes; all of them are searched
        # by delete_by, so sessions written before a secret rotation are still found.
        info = REDIS_INDEX_PURPOSE.encode()
        self._index_keys = tuple(derive_key(secret, info) for secret in secrets)
        self._idle_timeout_s = idle_timeout_s
        self._lifetime_s = lifetime_s
        self.prefix = prefix
        self._save_script = client.register_script(_LUA_SAVE)
        self._delete_script = client.register_script(_LUA_DELETE)
        self._delete_by_script = client.register_script(_LUA_DELETE_BY)

    @classmethod
    def from_url(
        cls,
        url: str,
        secrets: Sequence[bytes],
        *,
        idle_timeout_s: float,
        lifetime_s: float,
        prefix: str = DEFAULT_PREFIX,
        pool_size: int = DEFAULT_POOL_SIZE,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    ) -> RedisStore:
        """A store for ``url`` (see :mod:`gateway.session.redis_url`). Connects lazily."""
        client, also_close = connect(url, max_connections=pool_size + PROBE_CONNECTIONS)
        return cls(
            client,
            secrets,
            idle_timeout_s=idle_timeout_s,
            lifetime_s=lifetime_s,
            prefix=prefix,
            also_close=also_close,
            pool_size=pool_size,
            pool_timeout_s=pool_timeout_s,
        )

    # -- pool use, for /metrics ----------------------------------------------------

    @property
    def pool_in_use(self) -> int:
        return self._slots.in_use

    @property
    def pool_waiting(self) -> int:
        return self._slots.waiting

    @property
    def pool_max(self) -> int:
        return self._slots.size

    # -- SessionStore ------------------------------------------------------------

    async def load(self, cookie_value: str, now: float) -> Session | None:
        if not is_handle(cookie_value):
            return None  # garbage never reaches Redis
        member = _digest(cookie_value)
        key = self.session_key(member)
        raw = await self._run("load", self._redis.hget(key, "d"))
        if raw is None:
            return None
        session = self._open(raw, member)
        if session is None:
            log.warning("redis_session_unreadable")  # another secret, or not written by us
            return None
        if expired(session, now, self._idle_timeout_s, self._lifetime_s):
            await self._run("delete", self._delete_script(keys=[key], args=[member]))
            return None
        return session

    async def save(
        self, session: Session, now: float, *, rotate: bool = False, previous: str | None = None
    ) -> str:
        """Store ``session``; return the cookie value to set.

        As :class:`MemoryStore`: the ``previous`` handle is kept only when
        ``rotate`` is False and it still holds this session id at the same
        assurance; otherwise a new handle is issued and ``previous`` is deleted,
        in the same script. Unlike it, when ``previous`` is given, ``rotate`` is
        False and the previous session is gone (signed out, rotated or expired
        since it was loaded), nothing is written and ``previous`` is returned:
        a refresh racing a logout must not bring the session back.
        """
        handle = secrets.token_urlsafe(HANDLE_BYTES)
        member = _digest(handle)
        prev_member = _digest(previous) if previous is not None and is_handle(previous) else None
        fingerprint = self._fingerprint(session)
        session_data = session.to_dict()
        keys = [self.session_key(member), self.session_key(prev_member or member)]
        keys.append(self._index_key("sub", session.sub, self._index_keys[0]))
        if session.provider_sid is not None:
            keys.append(self._index_key("sid", session.provider_sid, self._index_keys[0]))
        if prev_member is None:
            mode, prev_data = "new", ""
        elif rotate:
            mode, prev_data = "rotate", ""
        else:
            mode = "keep"
            prev_data = self._sealer.seal({"k": prev_member, "s": session_data})
        args: list[str | int] = [
            mode,
            fingerprint,
            self._sealer.seal({"k": member, "s": session_data}),
            prev_data,
            self._ttl_s(session, now),
            max(math.ceil(self._lifetime_s), 1),
            self.session_key(""),
            member,
            prev_member or "",
        ]
        outcome = await self._run("save", self._save_script(keys=keys, args=args))
        if outcome in (0, 1) and previous is not None:  # kept, or gone and not revived
            return previous
        return handle

    async def delete(self, cookie_value: str) -> None:
        if not is_handle(cookie_value):
            return
        member = _digest(cookie_value)
        await self._run(
            "delete", self._delete_script(keys=[self.session_key(member)], args=[member])
        )

    async def ping(self) -> bool:
        """True when Redis answers; raises :class:`errors.StoreUnavailable` when it does not.

        Not in line behind requests (see PROBE_CONNECTIONS): a busy pool is not down.
        """
        return bool(await self._call("ping", self._redis.ping()))

    # -- back-channel logout -----------------------------------------------------

    async def delete_by(self, sub: str | None, provider_sid: str | None) -> int:
        """Delete the sessions a logout token names; return how many there were.

        OpenID Connect Back-Channel Logout 1.0, 2.4: with ``sid``, the sessions
        of that provider session (and, when ``sub`` is also given, of that
        subject only); with ``sub`` alone, every session of the subject.
        One script, so it is atomic; and a refresh racing it cannot bring a
        deleted session back (see :meth:`save`).
        """
        wanted: list[str] = []
        if provider_sid is not None:
            indexes = self._index_keys_for("sid", provider_sid)
            if sub is not None:
                wanted = self._index_keys_for("sub", sub)
        elif sub is not None:
            indexes = self._index_keys_for("sub", sub)
        else:
            raise ValueError("delete_by needs sub or provider_sid")
        args = [self.session_key(""), *wanted]
        deleted = await self._run("delete_by", self._delete_by_script(keys=indexes, args=args))
        return int(deleted)

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        """True the first time ``name`` is claimed within ``ttl_s``, on any replica."""
        key = f"{self.prefix}once:{_digest(name)}"
        claimed = await self._run(
            "claim_once", self._redis.set(key, "1", nx=True, ex=max(math.ceil(ttl_s), 1))
        )
        return bool(claimed)

    async def put_record(self, name: str, value: float, ttl_s: float) -> None:
        """Hold ``value`` under ``name`` for ``ttl_s``, on every replica."""
        key = f"{self.prefix}rec:{_digest(name)}"
        await self._run(
            "put_record", self._redis.set(key, repr(float(value)), ex=max(math.ceil(ttl_s), 1))
        )

    async def get_records(self, names: Iterable[str]) -> list[float | None]:
        """The values under ``names`` (None where there is none), in one round trip."""
        keys = [f"{self.prefix}rec:{_digest(name)}" for name in names]
        if not keys:
            return []
        raw = await self._run("get_records", self._redis.mget(keys))
        out: list[float | None] = []
        for value in raw:
            try:
                out.append(None if value is None else float(_text(value)))
            except ValueError:
                out.append(0.0)  # unreadable: counts as revoked from the start (fail closed)
        return out

    async def eviction_settings(self) -> tuple[str, int] | None:
        """(maxmemory-policy, maxmemory) of the server, or None when CONFIG is refused
        (managed services rename or forbid it). Raises StoreUnavailable when Redis is down."""
        try:
            policy = await self._redis.config_get("maxmemory-policy")
            limit = await self._redis.config_get("maxmemory")
        except (RedisError, OSError) as exc:
            if is_refusal(exc):
                return None
            log.warning("session_store_unavailable", operation="config_get", error=str(exc))
            raise errors.StoreUnavailable(_UNAVAILABLE, reason="store_down") from exc
        try:
            return str(policy["maxmemory-policy"]), int(str(limit["maxmemory"]))
        except (KeyError, ValueError, TypeError):
            return None

    async def put_blob(self, name: str, payload: Mapping[str, Any], ttl_s: float) -> None:
        """Keep ``payload`` sealed under ``name`` for at most ``ttl_s`` (a kept request)."""
        key = f"{self.prefix}blob:{_digest(name)}"
        sealed = self._blob_sealer.seal(payload)
        await self._run("put_blob", self._redis.set(key, sealed, ex=max(math.ceil(ttl_s), 1)))

    async def take_blob(self, name: str) -> dict[str, Any] | None:
        """The payload under ``name``, removed in the same step (GETDEL): single use."""
        key = f"{self.prefix}blob:{_digest(name)}"
        raw = await self._run("take_blob", self._redis.getdel(key))
        if raw is None:
            return None
        return self._blob_sealer.open(_text(raw))

    # -- sign-in transactions ----------------------------------------------------

    async def put_tx(self, tx: Transaction, ttl_s: float) -> None:
        """Keep ``tx`` until its callback (at most ``ttl_s``), for any worker to take."""
        sealed = self._tx_sealer.seal(tx.to_dict())
        await self._run(
            "put_tx", self._redis.set(self.tx_key(tx.state), sealed, ex=max(math.ceil(ttl_s), 1))
        )

    async def take_tx(self, state: str) -> Transaction | None:
        """The transaction for ``state``, removed in the same step (GETDEL): single use.

        None when unknown, already taken, expired or unreadable.
        """
        if not isinstance(state, str) or not state:
            return None
        raw = await self._run("take_tx", self._redis.getdel(self.tx_key(state)))
        if raw is None:
            return None
        tx = Transaction.from_dict(self._tx_sealer.open(_text(raw)))
        if tx is None or not same_state(tx.state, state):
            return None
        return tx

    # -- lifecycle and keys ------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool(s)."""
        for client in (self._redis, *self._also_close):
            await client.aclose()

    def session_key(self, member: str) -> str:
        """The key of the session whose handle hashes to ``member``."""
        return f"{self.prefix}s:{member}"

    def session_key_of(self, cookie_value: str) -> str:
        """The key of the session behind ``cookie_value`` (for tests and operators)."""
        return self.session_key(_digest(cookie_value))

    def tx_key(self, state: str) -> str:
        return f"{self.prefix}tx:{_digest(state)}"

    def _index_keys_for(self, kind: str, value: str) -> list[str]:
        return [self._index_key(kind, value, key) for key in self._index_keys]

    def _index_key(self, kind: str, value: str, key: bytes) -> str:
        mac = hmac.new(key, _utf8(value), hashlib.sha256).hexdigest()
        return f"{self.prefix}{kind}:{mac}"

    def _fingerprint(self, session: Session) -> str:
        # What MemoryStore compares to decide whether the previous handle may be
        # kept: the session id and everything that decides its level. Keyed, so
        # it says nothing about the session to somebody reading Redis.
        data = session.to_dict()
        held = [data["i"], data["s"], data.get("a"), data["m"], data["at"], data["pr"]]
        text = _JSON.encode(held).encode("utf-8")
        return hmac.new(self._index_keys[0], text, hashlib.sha256).hexdigest()

    def _ttl_s(self, session: Session, now: float) -> int:
        idle_left = self._idle_timeout_s - max(now - session.last_seen, 0.0)
        lifetime_left = self._lifetime_s - (now - session.created_at)
        # At least a second: an already expired session is written briefly and
        # refused by load's own check, so rotation still forgets ``previous``.
        return max(math.ceil(min(idle_left, lifetime_left)), 1)

    def _open(self, raw: bytes | str, member: str) -> Session | None:
        """The session sealed in ``raw`` for ``member``; remembered, as the same sealed
        bytes under the same key always open to the same (immutable) session."""
        opened = self._opened.get((raw, member))
        if opened is not None:
            return opened
        session = self._open_sealed(raw, member)
        if session is not None:
            self._opened.put((raw, member), session, 2 * len(raw) + len(member))
        return session

    def _open_sealed(self, raw: bytes | str, member: str) -> Session | None:
        payload = self._sealer.open(_text(raw))
        # "k" binds the sealed data to its key: a blob copied onto another
        # session's key (by somebody with write access to Redis) does not open.
        if payload is None or not hmac.compare_digest(str(payload.get("k")), member):
            return None
        return Session.from_dict(payload.get("s"))

    async def _run(self, operation: str, call: Awaitable[T]) -> T:
        """``call`` once one of the pool's slots is free (see the module docstring)."""
        slots = self._slots
        if not await slots.acquire(self._pool_timeout_s):
            if inspect.iscoroutine(call):
                call.close()  # never sent
            log.warning(
                "store_busy", operation=operation, waiting=slots.waiting, pool_size=slots.size
            )
            raise errors.StoreBusy(_BUSY, reason="store_busy", retry_after_s=BUSY_RETRY_AFTER_S)
        try:
            return await self._call(operation, call)
        finally:
            slots.release()

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except _DOWN as exc:
            log.warning("session_store_unavailable", operation=operation, error=str(exc))
            raise errors.StoreUnavailable(_UNAVAILABLE, reason="store_down") from exc


def _digest(value: str) -> str:
    return hashlib.sha256(_utf8(value)).hexdigest()


def _utf8(value: str) -> bytes:
    # A callback's state comes from the query string and may hold lone surrogates.
    return value.encode("utf-8", "surrogatepass")


def _text(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("ascii", "replace")
