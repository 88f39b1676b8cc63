"""Serving: listeners, signals, config reload, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import logs
from gateway.app import Gateway, ReloadRefused, make_server
from gateway.assertion import AssertionKeyError
from gateway.cel import old_syntax_rewrites
from gateway.config import load_config
from gateway.connections import Listener
from gateway.errors import ConfigError
from gateway.model import Config
from gateway.sockets import (
    LISTEN_BACKLOG,
    bind_unix_socket,
    listening_sockets,
    remove_unix_socket,
)

log = structlog.get_logger("gateway.server")

# How often the config file is looked at. A Kubernetes ConfigMap update reaches the
# pod as a symlink swap within about a minute; two seconds more does not matter,
# and a stat() every two seconds costs nothing.
CONFIG_POLL_S = 2.0
# The collector's first-generation threshold while serving (CPython's default: 700).
# A forwarded request allocates many tracked objects, nearly all freed by reference
# counting when it ends; at 700 the collections cost about 5% of a forwarded
# request's CPU. Reference cycles (exceptions with tracebacks) now wait for up to
# this many net allocations: a few MB at most, and a collection stays short.
GC_GEN0_THRESHOLD = 20_000
# A client connection, and the upstream connection it may hold; plus the process's own
# files (Redis pool, logs, the metrics listener, the provider client).
FDS_PER_CONNECTION = 2
FDS_RESERVED = 512


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    """What changes when the file does: through symlinks (ConfigMaps swap a link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def reload_from(gateway: Gateway, path: str, trigger: str) -> bool:
    """Validate ``path`` and apply it; on any problem keep the running config."""
    try:
        new = load_config(path)
        await gateway.reload(new)
    except ConfigError as exc:
        gateway.metrics.config_reloads.labels("invalid").inc()
        log.error("config_reload_failed", trigger=trigger, problems=[str(p) for p in exc.problems])
        return False
    except ReloadRefused as exc:
        gateway.metrics.config_reloads.labels("refused").inc()
        log.error("config_reload_failed", trigger=trigger, reason=str(exc))
        return False
    gateway.metrics.config_reloads.labels("ok").inc()
    return True


async def watch_config(
    gateway: Gateway,
    path: str,
    reload_now: asyncio.Event,
    seen: tuple[int, int, int, int] | None,
) -> None:
    """Reload on SIGHUP (``reload_now``) or when the file changes from ``seen``."""
    while True:
        try:
            await asyncio.wait_for(reload_now.wait(), timeout=CONFIG_POLL_S)
            trigger = "signal"
        except TimeoutError:
            trigger = "file_change"
        reload_now.clear()
        current = _file_identity(path)
        if trigger == "file_change" and (current == seen or current is None):
            continue
        seen = current
        await reload_from(gateway, path, trigger)


async def run_gateway(
    config: Config,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[Gateway], Awaitable[None] | None] | None = None,
    config_path: str | None = None,
    reload_now: asyncio.Event | None = None,
    clock: Callable[[], float] | None = None,
    assertion_key: ec.EllipticCurvePrivateKey | None = None,
    unix_socket: socket.socket | None = None,
) -> None:
    """Serve ``config`` until ``stop`` is set, then drain in-flight requests.

    ``unix_socket``: ``server.unix_socket``, already listening (the supervisor's, shared
    by its workers; it removes the file); without it this process makes the socket.

    With ``config_path``, the file is watched and reloaded (also whenever
    ``reload_now`` is set, e.g. by SIGHUP).
    """
    # Taken before anything awaits, so a change made while starting is not missed.
    config_identity = _file_identity(config_path) if config_path is not None else None
    if clock is None:
        gateway = Gateway(config, assertion_key=assertion_key)
    else:
        gateway = Gateway(config, clock=clock, assertion_key=assertion_key)
    await gateway.start()
    server = config.server
    web_server = make_server(gateway)
    listener: Listener | None = None
    unix_file: tuple[str, int] | None = None  # the socket file made here: (path, inode)
    metrics_runner: web.AppRunner | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        sockets = listening_sockets(
            server.listen_host,
            server.listen_port,
            reuse_port=server.workers > 1,
            backlog=LISTEN_BACKLOG,
        )
        if unix_socket is not None:
            sockets.append(unix_socket)
        elif server.unix_socket is not None:
            try:
                unix_socket, unix_file = bind_unix_socket(server)
            except OSError:
                for sock in sockets:
                    sock.close()
                raise
            sockets.append(unix_socket)
        listener = Listener(web_server, sockets)
        listener.start()
        check_file_limit(server.max_connections)
        metrics_runner = await _start_metrics(gateway, config)
        if config_path is not None:
            watcher = asyncio.create_task(
                watch_config(gateway, config_path, reload_now or asyncio.Event(), config_identity)
            )
        log.info(
            "listening",
            listen=f"{server.listen_host}:{server.listen_port}",
            unix_socket=server.unix_socket,
            public_url=server.public_url,
            rules=len(config.rules),
            store=config.session.store,
        )
        # Objects created at start-up live for the whole process: move them out of the
        # collector's sight so full collections stay short (fewer latency spikes).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        if on_ready is not None:
            result = on_ready(gateway)
            if result is not None:
                await result
        await stop.wait()
    finally:
        shutdown_timeout_s = gateway.config.server.shutdown_timeout_s
        log.info("draining", shutdown_timeout_s=shutdown_timeout_s)
        if watcher is not None:
            watcher.cancel()
        # Ready no more, take no new connection (but those the kernel already
        # completed), answer what was received with Connection: close, close idle
        # connections between requests; force only what outlives shutdown_timeout.
        web_server.draining = True
        if listener is not None:
            await listener.close()
        if unix_file is not None:
            remove_unix_socket(*unix_file)
        forced = await web_server.drain(shutdown_timeout_s)
        if forced:
            log.warning("drain_timeout", connections_closed=forced)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await gateway.close()
        log.info("stopped")


def check_file_limit(max_connections: int) -> None:
    """Raise the open-file limit to its hard limit (as nginx's worker_rlimit_nofile
    or Go's runtime do) and warn when ``max_connections`` still does not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = max_connections * FDS_PER_CONNECTION + FDS_RESERVED
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "file_limit_low",
            open_files_limit=soft,
            needed=needed,
            hint="raise ulimit -n or lower server.max_connections",
        )


async def _start_metrics(gateway: Gateway, config: Config) -> web.AppRunner | None:
    """The separate /metrics listener, when ``server.metrics_listen`` is set."""
    server = config.server
    if server.metrics_listen is None:
        return None
    metrics_app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return gateway.metrics_response()

    metrics_app.router.add_get("/metrics", metrics)
    metrics_runner = web.AppRunner(metrics_app, access_log=None)
    await metrics_runner.setup()
    host, port = server.metrics_listen
    await web.TCPSite(metrics_runner, host, port, reuse_port=server.workers > 1).start()
    return metrics_runner


async def _main(
    config: Config,
    config_path: str | None,
    assertion_key: ec.EllipticCurvePrivateKey | None = None,
    unix_socket: socket.socket | None = None,
) -> int:
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    try:
        await run_gateway(
            config,
            stop,
            config_path=config_path,
            reload_now=reload_now,
            assertion_key=assertion_key,
            unix_socket=unix_socket,
        )
    except AssertionKeyError as exc:
        log.error("assertion_key_error", error=str(exc))
        return 1
    except ConfigError as exc:  # found at start-up, e.g. a Redis that may evict
        log.error("startup_refused", problems=[str(p) for p in exc.problems])
        return 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    return 0


def run_one(
    config: Config,
    config_path: str | None,
    assertion_key: ec.EllipticCurvePrivateKey | None = None,
    unix_socket: socket.socket | None = None,
) -> int:
    """One serving process (the whole gateway, or one worker of several, then with the
    supervisor's ``unix_socket``)."""
    logs.configure(config.server.log_level)
    for path, rewrite in old_syntax_rewrites(config.rules):
        log.warning("when_old_syntax", path=path, cel=rewrite)
    try:
        import uvloop

        return uvloop.run(_main(config, config_path, assertion_key, unix_socket))
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(_main(config, config_path, assertion_key, unix_socket))
    finally:
        logs.write_pending()  # access lines of the loop's last turn
