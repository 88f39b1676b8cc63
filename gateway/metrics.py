"""Prometheus metrics, one registry per gateway instance (so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, Self, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase

# Upstream latency buckets: a proxy's added latency lives in the 1-50 ms range; the
# upper buckets catch slow upstreams up to the default 60 s timeout.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_Child = TypeVar("_Child")


class PoolUse(Protocol):
    @property
    def pool_in_use(self) -> int: ...
    @property
    def pool_waiting(self) -> int: ...
    @property
    def pool_max(self) -> int: ...


def _child(
    metric: object,
    make: Callable[..., _Child],
    labelvalues: tuple[Any, ...],
    labelkwargs: dict[str, Any],
) -> _Child:
    """``metric.labels(...)``, remembering the child for each tuple of label values.

    prometheus_client checks and converts the values and takes a lock on every
    call; the gateway asks for the same few children on every request.
    """
    if labelkwargs:
        return make(*labelvalues, **labelkwargs)
    children: dict[tuple[Any, ...], _Child] | None = getattr(metric, "_children_by_values", None)
    if children is None:
        children = {}
        setattr(metric, "_children_by_values", children)  # noqa: B010
    child = children.get(labelvalues)
    if child is None:
        child = children[labelvalues] = make(*labelvalues)
    return child


def _forget_children(metric: object) -> None:
    children: dict[tuple[Any, ...], Any] | None = getattr(metric, "_children_by_values", None)
    if children is not None:
        children.clear()


class _RememberedChildren(MetricWrapperBase):
    """``labels()`` through :func:`_child`; ``remove()`` and ``clear()`` forget them."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        return _child(self, super().labels, labelvalues, labelkwargs)

    def remove(self, *labelvalues: Any) -> None:
        _forget_children(self)
        super().remove(*labelvalues)

    def clear(self) -> None:
        _forget_children(self)
        super().clear()


class Counter(_RememberedChildren, prometheus_client.Counter):
    pass


class Histogram(_RememberedChildren, prometheus_client.Histogram):
    pass


class Tally:
    """A counter kept as plain ints, one per label value, exposed when scraped.

    For counts taken on every request where a few microseconds matter: a
    prometheus_client child takes a lock and several calls per increment.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        values: tuple[str, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self.counts = dict.fromkeys(values, 0)
        registry.register(self)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=[self._label])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for value, count in self.counts.items():
            family.add_metric([value], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stepup_requests_total",
            "Requests by rule and decision.",
            ["rule", "decision"],
            registry=self.registry,
        )
        self.challenges = Counter(
            "stepup_challenges_total",
            "Step-up round trips by outcome (issued, completed, failed).",
            ["outcome", "level"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "stepup_upstream_latency_seconds",
            "Time to the upstream's response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "stepup_upstream_errors_total",
            "Upstream failures (connect, timeout).",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "stepup_provider_errors_total",
            "OpenID Provider failures by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "stepup_rejected_requests_total",
            "Requests refused before matching (bad path, method, framing).",
            ["reason"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "stepup_config_reloads_total",
            "Configuration reloads by result.",
            ["result"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "stepup_connections_closed_total",
            "Keep-alive ended by the gateway (max_requests, max_age, draining, room).",
            ["reason"],
            registry=self.registry,
        )
        self.client_timeouts = Counter(
            "stepup_client_timeouts_total",
            "Client connections closed for sending too slowly (head, body).",
            ["phase"],
            registry=self.registry,
        )
        self.decision_memo = Tally(
            "stepup_decision_memo",
            "Remembered decisions looked up (server.decision_memo), by result (hit, miss).",
            "result",
            ("hit", "miss"),
            self.registry,
        )
        self.answered_early = Tally(
            "stepup_answered_early",
            "Requests found by their exact bytes before they were parsed (gateway.early): "
            "a remembered /auth answer (auth), a remembered forward whose answer was "
            "written (relayed) or left to the usual handling (handed_over).",
            "how",
            ("auth", "relayed", "handed_over"),
            self.registry,
        )
        self.store_busy = Counter(
            "stepup_store_busy_total",
            "Requests answered 503 because every Redis connection stayed busy too long.",
            registry=self.registry,
        )
        self.connections = Gauge(
            "stepup_connections",
            "Client connections open in this process.",
            registry=self.registry,
        )
        self.accepting = Gauge(
            "stepup_accepting",
            "1 while under server.max_connections; 0 while new connections wait.",
            registry=self.registry,
        )
        self.store_pool = Gauge(
            "stepup_store_pool_connections",
            "Redis commands in flight (in_use), waiting for a connection, and the pool size.",
            ["state"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "stepup_ready",
            "1 when provider metadata, keys and the store are ready.",
            registry=self.registry,
        )

    def watch_connections(self, open_now: Callable[[], int], accepting: Callable[[], int]) -> None:
        """Read the connection gauges from the server when scraped."""
        self.connections.set_function(open_now)
        self.accepting.set_function(accepting)

    def watch_store_pool(self, pool: Callable[[], PoolUse | None]) -> None:
        """Read the Redis pool gauges from the current store when scraped."""
        for state in ("in_use", "waiting", "max"):

            def read(state: str = state) -> float:
                use = pool()
                return 0.0 if use is None else float(getattr(use, f"pool_{state}"))

            self.store_pool.labels(state).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
