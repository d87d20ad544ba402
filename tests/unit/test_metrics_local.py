"""What the engine counts per bucket is added to prometheus-client's histograms as its own
`observe` would record it (`_add_histogram` writes prometheus-client's per-bucket values
directly: this guards that private use). The engine's bucket rule (a value on a bound falls in
that bound's bucket, `le`) is tested in Rust (`outcome_metrics.rs`); here the buckets are
counted by the same rule."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Histogram

from commandbus.metrics import _add_histogram


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _counted(bounds: list[float], values: list[float]) -> tuple[list[int], float]:
    buckets = [0] * len(bounds)
    for v in values:
        buckets[bisect_left(bounds, v)] += 1
    return buckets, sum(values)


def test_added_observations_equal_observed_ones() -> None:
    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 7.0, 11.0, 1e6]
    direct, added = CollectorRegistry(), CollectorRegistry()
    h_direct = Histogram("h", "h", ["t"], registry=direct).labels("x")
    h_added = Histogram("h", "h", ["t"], registry=added).labels("x")
    for v in values:
        h_direct.observe(v)
    _add_histogram(h_added, *_counted(list(h_added._upper_bounds), values))
    assert _samples(added) == _samples(direct)
    assert _samples(added)[("h_count", "")] == len(values)
    _add_histogram(h_added, [0] * len(h_added._upper_bounds), 0.0)  # nothing new
    assert _samples(added) == _samples(direct)
    h_direct.observe(0.02)
    _add_histogram(h_added, *_counted(list(h_added._upper_bounds), [0.02]))
    assert _samples(added) == _samples(direct)
