"""Which session store a configuration asks for: :func:`make_store`.

Apart from :mod:`gateway.session.stores` because it builds every kind of store,
and the Redis store builds on the stores module: here both are imported one way.
"""

from __future__ import annotations

from gateway import errors, model
from gateway.session.redis_store import RedisStore
from gateway.session.stores import CookieStore, MemoryStore, SessionStore


def make_store(cfg: model.SessionConfig) -> SessionStore:
    """The store the config asks for, built from ``cfg.store_settings`` alone."""
    if cfg.store == "cookie":
        return CookieStore(
            cfg.secrets, idle_timeout_s=cfg.idle_timeout_s, lifetime_s=cfg.lifetime_s
        )
    if cfg.store == "memory":
        return MemoryStore(idle_timeout_s=cfg.idle_timeout_s, lifetime_s=cfg.lifetime_s)
    if cfg.store == "redis" and cfg.redis_url is not None:
        return RedisStore.from_url(
            cfg.redis_url,
            cfg.secrets,
            idle_timeout_s=cfg.idle_timeout_s,
            lifetime_s=cfg.lifetime_s,
            prefix=cfg.redis_prefix,
        )
    raise errors.ConfigError(
        [errors.ConfigProblem("session.store", f"store {cfg.store!r} is not available")]
    )
