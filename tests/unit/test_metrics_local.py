"""The worker's local histogram publishes what prometheus-client's own `observe` records
(it writes prometheus-client's per-bucket values directly: this guards that private use)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from commandbus.metrics import _LocalHistogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_published_observations_equal_observed_ones() -> None:
    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 7.0, 11.0, 1e6]
    direct, local = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("h", "h", ["t"], registry=direct).labels("x")
    h_local = Histogram("h", "h", ["t"], registry=local).labels("x")
    acc = _LocalHistogram(h_local)
    for v in values:
        h_direct.observe(v)
        acc.observe(v)
    acc.publish()
    assert _samples(local) == _samples(direct)
    assert _samples(local)[("h_count", "")] == len(values)
    acc.publish()  # nothing new: nothing added
    assert _samples(local) == _samples(direct)
    acc.observe(0.02)
    h_direct.observe(0.02)
    acc.publish()
    assert _samples(local) == _samples(direct)
