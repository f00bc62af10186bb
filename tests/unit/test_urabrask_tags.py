"""Stage 3: percentile tags on a synthetic population, fixed thresholds below its size."""

from __future__ import annotations

import pytest

from pipelines.urabrask.tags import MIN_POPULATION, generate_tags, percentile_rank


def population(n: int) -> list[dict[str, float]]:
    # latency 1..n ms, memory 10..10n MB: ranks are easy to read off.
    return [{"latency_ms_mean": float(i), "memory_mb_peak": 10.0 * i} for i in range(1, n + 1)]


@pytest.mark.parametrize(("latency", "speed"), [(1.0, "high_speed"), (20.0, "high_speed"),
                                                (21.0, "medium_speed"), (70.0, "medium_speed"),
                                                (71.0, "low_speed"), (500.0, "low_speed")])
def test_speed_follows_the_20th_and_70th_percentiles(latency, speed):
    tags = generate_tags({"latency_ms_mean": latency + 0.5, "memory_mb_peak": 500.0},
                         population(100), device_kind="cpu", dtype="float32")
    assert speed in tags and sum(t.endswith("_speed") for t in tags) == 1


@pytest.mark.parametrize(("memory", "tag"), [(5.0, "low_memory"), (250.0, "low_memory"),
                                             (500.0, None), (760.0, "high_memory")])
def test_memory_follows_the_quartiles(memory, tag):
    tags = generate_tags({"latency_ms_mean": 50.0, "memory_mb_peak": memory}, population(100),
                         device_kind="cpu", dtype="float32")
    memory_tags = [t for t in tags if t.endswith("_memory")]
    assert memory_tags == ([tag] if tag else [])


def test_small_population_uses_fixed_thresholds_and_switches_at_the_minimum():
    kernel = {"latency_ms_mean": 0.1, "memory_mb_peak": 0.5}
    # Against 19 slower peers a percentile would also say high_speed; against 19 faster ones it
    # would say low_speed. Below the minimum, the fixed CPU thresholds decide either way.
    fast_peers = [{"latency_ms_mean": 0.01, "memory_mb_peak": 0.1}] * (MIN_POPULATION - 1)
    assert generate_tags(kernel, fast_peers, device_kind="cpu", dtype="float32") == [
        "high_speed", "low_memory"]
    with_one_more = fast_peers + [{"latency_ms_mean": 0.01, "memory_mb_peak": 0.1}]
    assert generate_tags(kernel, with_one_more, device_kind="cpu", dtype="float32") == [
        "high_memory", "low_speed"]


def test_tags_are_recomputed_as_the_population_grows():
    kernel = {"latency_ms_mean": 30.0, "memory_mb_peak": 300.0}
    assert "medium_speed" in generate_tags(kernel, population(100), device_kind="cuda",
                                           dtype="float32")
    grown = population(100) + [{"latency_ms_mean": 40.0, "memory_mb_peak": 1.0}] * 100
    assert "high_speed" in generate_tags(kernel, grown, device_kind="cuda", dtype="float32")


@pytest.mark.parametrize(("dtype", "drift", "stable"), [("float32", 1e-6, True),
                                                        ("float32", 1e-3, False),
                                                        ("bfloat16", 1e-2, True)])
def test_numerically_stable_by_the_dtype_drift_limit(dtype, drift, stable):
    tags = generate_tags({"latency_ms_mean": 1.0, "memory_mb_peak": 1.0,
                          "precision_drift_vs_fp64": drift}, [], device_kind="cpu", dtype=dtype)
    assert ("numerically_stable" in tags) is stable


def test_percentile_rank_counts_ties_as_half():
    assert percentile_rank(2.0, [1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.375)
    assert percentile_rank(0.0, [1.0]) == 0.0 and percentile_rank(9.0, [1.0]) == 1.0
