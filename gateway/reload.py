"""What a live config reload can and cannot apply (pure)."""

from __future__ import annotations

from gateway import model


def restart_needed(old: model.Config, new: model.Config) -> list[str]:
    """The keys whose change a live reload cannot apply (empty: reload is possible).

    Listeners the worker count and tracing belong to the process; a server-side session
    store holds sessions that a new store object would lose, so what it is built
    from (``SessionConfig.store_settings``) stays; the rest of ``session`` (cookie
    and sign-in settings) may change.
    """
    blockers = [
        name
        for name, before, after in (
            (
                "server.listen",
                (old.server.listen_host, old.server.listen_port),
                (new.server.listen_host, new.server.listen_port),
            ),
            ("server.metrics_listen", old.server.metrics_listen, new.server.metrics_listen),
            ("server.workers", old.server.workers, new.server.workers),
            ("session.store", old.session.store, new.session.store),
            # One-time claims and kept requests may live there, also with cookies.
            ("session.redis_url", old.session.redis_url, new.session.redis_url),
            # The tracer and its exporter are made once, with the process's handler.
            ("telemetry", old.telemetry, new.telemetry),
        )
        if before != after
    ]
    changed_store = old.session.store_settings != new.session.store_settings
    if old.session.store != "cookie" and changed_store and not blockers:
        blockers.append("session store settings (with a server-side store)")
    return blockers


def upstream_pools_changed(old: model.Config, new: model.Config) -> bool:
    """Whether the upstream pools must be built anew for ``new`` (their settings changed)."""

    def settings(config: model.Config) -> tuple[object, ...]:
        server = config.server
        return (
            config.upstreams,
            server.upstream_timeout_s,
            server.upstream_connect_timeout_s,
            config.session.cookie_name,
        )

    return settings(old) != settings(new)
