"""The load suite, short: a gateway with two workers and Redis sessions in front of a
fast upstream, driven on loopback by keep-alive clients that account for every
request (tests/support/loadsuite.py). It asserts on counts, never on speed: the
machine may be shared. ``STEPUP_LOAD_SCALE=5`` runs every phase five times longer;
``bench/load.py`` runs the long version and prints the figures quoted in README."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.loadsuite import (
    GatewayUnderLoad,
    kill_a_worker,
    saturate,
    terminate_under_load,
)

SCALE = float(os.environ.get("STEPUP_LOAD_SCALE", "1"))
# Per worker process, after thousands of requests over 1,024 connections: the
# interpreter, the gateway and its caches (~60 MB), connection buffers and the Redis
# pool. A leak of a few kilobytes per request or connection would pass this within
# minutes.
MAX_RSS_MB = 250


@pytest.fixture
async def start(tmp_path: Path, op: Any) -> AsyncIterator[Any]:
    started: list[GatewayUnderLoad] = []

    async def factory(**kwargs: Any) -> GatewayUnderLoad:
        gateway = GatewayUnderLoad(tmp_path, op.issuer, **kwargs)
        op.clients["gateway"].redirect_uris.append(gateway.redirect_uri)
        started.append(gateway)
        await gateway.start()
        return gateway

    yield factory
    for gateway in started:
        await gateway.stop()


async def test_saturation_at_256_and_1024_connections_answers_everything(start):
    gateway = await start(workers=2)
    for connections, seconds in ((256, 3 * SCALE), (1024, 4 * SCALE)):
        tally = await saturate(gateway, connections, seconds)
        summary = tally.summary()
        assert summary["ok"] > connections, summary  # every client got answers
        assert summary == {**summary, "status_503": 0, "other_status": 0, "lost": 0}, (
            connections,
            summary,
            gateway.log_tail(),
        )
    sizes = gateway.rss_mb()
    assert len(sizes) == 2 and max(sizes.values()) < MAX_RSS_MB, sizes
    assert not gateway.events("store_busy") and not gateway.events("session_store_unavailable")


async def test_a_killed_worker_costs_under_1_percent_and_load_spreads_back(start):
    # A shorter keep-alive lifetime than the default 10 s keeps the test short;
    # bench/load.py measures the default.
    gateway = await start(workers=2, server_extra="keepalive_max_age: 3s\n")
    result = await kill_a_worker(gateway, 256, before_s=2 * SCALE, after_s=10, spread_s=5)
    assert result.restarted_at is not None, gateway.log_tail()
    # What kill -9 cannot help losing: the request each of its connections had out,
    # and the connections in its listen backlog. A client can be caught twice (its
    # request out on the killed worker, then its new connection queued in that worker's
    # backlog in the same instant), so at most two per client; seen: 130-258 of 256.
    window = result.tally.summary(result.killed_at, result.killed_at + 10)
    assert window["status_503"] == 0 and window["other_status"] == 0, window
    assert window["lost"] <= 2 * 256, window
    # From a second after the kill (the restart takes about that), all but 1% succeed.
    after = result.tally.summary(result.killed_at + 1, result.killed_at + 10)
    answered = after["ok"] + after["status_503"] + after["other_status"] + after["lost"]
    assert after["ok"] >= 0.99 * answered, after
    # Keep-alive connections are recycled (server.keepalive_max_age): the restarted
    # worker holds a share of them again instead of none.
    assert result.share_of_new_worker >= 0.15, result.share_of_new_worker


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_loses_no_request(start, workers):
    gateway = await start(workers=workers)
    result = await terminate_under_load(gateway, 64, before_s=2 * SCALE)
    summary = result.tally.summary()
    assert result.exit_code == 0, gateway.log_tail()
    assert summary["lost"] == 0, summary
    assert summary["ok"] > 64 and summary["status_503"] == 0, summary
    assert gateway.events("draining") and gateway.events("stopped")
