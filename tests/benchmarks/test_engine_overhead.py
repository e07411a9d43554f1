"""The engine-overhead benchmark times both loops in interleaved rounds on one model."""

from __future__ import annotations

from benchmarks.bench_engine_overhead import measure


def test_both_loops_train_in_interleaved_rounds_and_the_ratio_is_reported():
    result = measure(batch=1, size=(32, 32, 16), structures=1, steps=4, rounds=2, warmup=2,
                     base_channels=2)
    assert result["rounds"] == 2
    # Warm-up and both rounds of the suite took their optimizer steps; it logged every 10.
    assert result["optimizer_steps"]["suite"] == 2 + 2 * 4
    assert result["suite_steps_logged"] == 1
    low, high = result["suite_over_bare_range"]
    assert 0 < low <= result["suite_over_bare_median"] <= high
