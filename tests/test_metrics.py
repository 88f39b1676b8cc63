"""gateway.metrics: label children are remembered, and what they count is exported."""

from __future__ import annotations

from gateway.metrics import Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


def test_a_labelled_child_is_made_once_and_counts_are_exported() -> None:
    metrics = Metrics()
    child = metrics.requests.labels("app", "allow")
    assert metrics.requests.labels("app", "allow") is child
    child.inc()
    metrics.requests.labels("app", "allow").inc()
    metrics.requests.labels(rule="app", decision="deny").inc()

    assert sample(metrics, "stepup_requests_total", rule="app", decision="allow") == 2
    assert sample(metrics, "stepup_requests_total", rule="app", decision="deny") == 1
    assert b'stepup_requests_total{decision="allow",rule="app"} 2.0' in metrics.render()


def test_a_removed_child_starts_again_from_zero() -> None:
    metrics = Metrics()
    metrics.upstream_latency.labels("app").observe(0.002)
    metrics.upstream_latency.remove("app")
    metrics.upstream_latency.labels("app").observe(0.004)

    assert sample(metrics, "stepup_upstream_latency_seconds_count", upstream="app") == 1
    assert sample(metrics, "stepup_upstream_latency_seconds_sum", upstream="app") == 0.004

    metrics.upstream_latency.clear()
    metrics.upstream_latency.labels("app").observe(0.001)
    assert sample(metrics, "stepup_upstream_latency_seconds_count", upstream="app") == 1
