"""Connecting to Redis: the client for a URL (Sentinel included), a line for its pool,
and whether the server's eviction settings can lose one-time records.

:mod:`gateway.session.redis_store` keeps sessions and one-time records through these;
which URLs work (and why Cluster does not) is in :mod:`gateway.session.redis_url`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.session.redis_url import is_sentinel_url, parse_sentinel_url

# Redis answers in well under a millisecond on a LAN. Half a second is hundreds of
# times that, and short enough that a request caught by an outage gets its 503
# (and /readyz its answer, within the default 1 s kubelet probe timeout) quickly
# instead of holding a connection and a worker while Redis is away.
SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.5
# One immediate retry, no backoff: it replaces a pooled connection that Redis
# closed (a restart, a failover, an idle timeout) without the user seeing an
# error, and bounds a failing call at about 2 x 0.5 s. redis-py's default (three
# retries with exponential backoff up to 10 s) would hold requests for seconds.
RETRIES = 1


class Slots:
    """At most ``size`` holders at once; the others wait in line, each with a deadline."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(size)

    async def acquire(self, timeout_s: float) -> bool:
        """True once a slot is held; False when none came free within ``timeout_s``."""
        if self._semaphore.locked():
            self.waiting += 1
            try:
                async with asyncio.timeout(timeout_s):
                    await self._semaphore.acquire()
            except TimeoutError:
                return False
            finally:
                self.waiting -= 1
        else:
            await self._semaphore.acquire()  # free: returns without suspending
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self._semaphore.release()


def eviction_problem(policy: str, maxmemory_bytes: int) -> str | None:
    """Why these eviction settings can lose one-time records; None when they cannot.

    With ``maxmemory`` 0 (no limit, the default of a self-run Redis) nothing is ever
    evicted, whatever the policy. Otherwise only ``noeviction`` is safe: every key the
    gateway writes has a TTL, so ``volatile-lru``/``-lfu``/``-random``/``-ttl`` choose
    among exactly the gateway's keys (and ``volatile-ttl`` first among the one-time
    records that expire soonest), and ``allkeys-*`` among all keys.
    """
    if maxmemory_bytes == 0 or policy == "noeviction":
        return None
    return (
        f"maxmemory-policy is {policy} with maxmemory {maxmemory_bytes}: Redis may evict "
        "one-time records (a used proof would work again, a signed-out session come back); "
        "set maxmemory-policy noeviction, or maxmemory 0"
    )


def is_refusal(exc: BaseException) -> bool:
    """CONFIG renamed away or forbidden by an ACL: the server answered, but will not say."""
    text = str(exc).lower()
    return isinstance(exc, RedisError) and (
        "unknown command" in text or "noperm" in text or "no permission" in text
    )


def connect(url: str, *, max_connections: int) -> tuple[Redis, tuple[Redis, ...]]:
    """A client for ``url`` and the other clients it needs closed (the sentinels').

    Nothing connects until the first command; at most ``max_connections`` are opened.
    """
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "retry": Retry(NoBackoff(), RETRIES),
    }
    if not is_sentinel_url(url):
        return Redis.from_url(url, **options), ()
    target = parse_sentinel_url(url)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "ssl": target.ssl,
    }
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs=sentinel_options,
        username=target.username,
        password=target.password,
        db=target.db,
        ssl=target.ssl,
        **options,
    )
    client: Redis = sentinel.master_for(target.service_name)
    return client, tuple(sentinel.sentinels)
