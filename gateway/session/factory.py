"""Which stores a configuration asks for: :func:`make_store`, :func:`make_aux`.

Apart from :mod:`gateway.session.stores` because it builds every kind of store,
and the Redis store builds on the stores module: here both are imported one way.
:func:`check_redis_eviction` refuses, at start-up, a Redis that may evict.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from gateway import errors, model
from gateway.session.aux import AuxStore, LocalAux
from gateway.session.redis_connect import eviction_problem
from gateway.session.redis_store import RedisStore
from gateway.session.stores import CookieStore, MemoryStore, SessionStore

log = structlog.get_logger("gateway")


def make_store(cfg: model.SessionConfig) -> SessionStore:
    """The store the config asks for, built from ``cfg.store_settings`` alone."""
    if cfg.store == "cookie":
        return CookieStore(
            cfg.secrets, idle_timeout_s=cfg.idle_timeout_s, lifetime_s=cfg.lifetime_s
        )
    if cfg.store == "memory":
        return MemoryStore(idle_timeout_s=cfg.idle_timeout_s, lifetime_s=cfg.lifetime_s)
    if cfg.store == "redis" and cfg.redis_url is not None:
        return _redis_store(cfg, cfg.redis_url)
    raise errors.ConfigError(
        [errors.ConfigProblem("session.store", f"store {cfg.store!r} is not available")]
    )


def make_aux(
    cfg: model.SessionConfig, store: SessionStore, clock: Callable[[], float]
) -> tuple[AuxStore, RedisStore | None]:
    """Where one-time claims and kept requests live: the Redis store when there is
    one (shared by workers and replicas), else this process. The second value is a
    Redis connection made for it alone (the caller closes it), if any."""
    if isinstance(store, RedisStore):
        return store, None
    if cfg.redis_url is not None:
        redis = _redis_store(cfg, cfg.redis_url)
        return redis, redis
    return LocalAux(clock=clock), None


def _redis_store(cfg: model.SessionConfig, url: str) -> RedisStore:
    return RedisStore.from_url(
        url,
        cfg.secrets,
        idle_timeout_s=cfg.idle_timeout_s,
        lifetime_s=cfg.lifetime_s,
        prefix=cfg.redis_prefix,
        pool_size=cfg.redis_pool_size,
        pool_timeout_s=cfg.redis_pool_timeout_s,
    )


async def check_redis_eviction(redis: RedisStore | None, source: str) -> None:
    """Refuse to start on a Redis that may evict one-time records (see
    :func:`gateway.session.redis_connect.eviction_problem`)."""
    if redis is None:
        return
    try:
        settings = await redis.eviction_settings()
    except errors.StoreUnavailable:
        log.warning("redis_eviction_unchecked", reason="store_down")
        return
    if settings is None:
        # Managed services (ElastiCache, Memorystore, Azure Cache) forbid CONFIG:
        # the gateway cannot know; it runs, and says what the operator must check.
        log.warning(
            "redis_eviction_unchecked",
            reason="config_refused",
            hint="make sure maxmemory-policy is noeviction",
        )
        return
    policy, maxmemory = settings
    problem = eviction_problem(policy, maxmemory)
    if problem is not None:
        log.error("redis_eviction_unsafe", policy=policy, maxmemory=maxmemory)
        raise errors.ConfigError([errors.ConfigProblem("session.redis_url", problem, source)])
    log.info("redis_eviction_checked", policy=policy, maxmemory=maxmemory)


def warn_if_revocation_per_process(config: model.Config) -> None:
    """Say at start-up when a sign-out is refused only by the worker that handled it."""
    session = config.session
    if session.store == "cookie" and session.redis_url is None and config.server.workers > 1:
        log.warning(
            "session_revocation_per_process",
            hint="with the cookie store and several workers, a signed-out session is "
            "refused only by the worker that signed it out; set session.redis_url",
        )
