"""Serving: listeners, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway import logs
from gateway.app import Gateway, make_server
from gateway.assertion import AssertionKeyError
from gateway.model import Config

log = structlog.get_logger("gateway.server")


async def run_gateway(
    config: Config,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[Gateway], Awaitable[None] | None] | None = None,
) -> None:
    """Serve ``config`` until ``stop`` is set, then drain in-flight requests."""
    gateway = Gateway(config)
    await gateway.start()
    server = config.server
    runner = web.ServerRunner(
        make_server(gateway), shutdown_timeout=server.shutdown_timeout_s, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        server.listen_host,
        server.listen_port,
        reuse_port=server.workers > 1,
        backlog=1024,
    )
    await site.start()
    metrics_runner: web.AppRunner | None = None
    if server.metrics_listen is not None:
        metrics_app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return gateway.metrics_response()

        metrics_app.router.add_get("/metrics", metrics)
        metrics_runner = web.AppRunner(metrics_app, access_log=None)
        await metrics_runner.setup()
        host, port = server.metrics_listen
        await web.TCPSite(metrics_runner, host, port).start()
    log.info(
        "listening",
        listen=f"{server.listen_host}:{server.listen_port}",
        public_url=server.public_url,
        rules=len(config.rules),
        store=config.session.store,
    )
    # Objects created at start-up live for the whole process: move them out of the
    # collector's sight so full collections stay short (fewer latency spikes).
    gc.collect()
    gc.freeze()
    if on_ready is not None:
        result = on_ready(gateway)
        if result is not None:
            await result
    try:
        await stop.wait()
    finally:
        log.info("draining", shutdown_timeout_s=server.shutdown_timeout_s)
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await gateway.close()
        log.info("stopped")


async def _main(config: Config) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_gateway(config, stop)
    except AssertionKeyError as exc:
        log.error("assertion_key_error", error=str(exc))
        return 1
    except OSError as exc:
        log.error("listen_failed", error=str(exc))
        return 1
    return 0


def serve(config: Config) -> int:
    """``stepup-gateway run``: serve until SIGTERM/SIGINT; exit status."""
    logs.configure(config.server.log_level)
    try:
        import uvloop

        return uvloop.run(_main(config))
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(_main(config))
