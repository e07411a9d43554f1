"""The engine-overhead benchmark times both loops in interleaved rounds on one model."""

from __future__ import annotations

from benchmarks.bench_engine_overhead import measure


def test_both_loops_train_in_interleaved_rounds_and_the_ratio_is_reported():
    result = measure(batch=1, size=(32, 32, 16), structures=1, steps=4, rounds=3, warmup=2,
                     base_channels=2)
    assert result["rounds"] == 3
    # Warm-up and the three rounds of the suite took their optimizer steps; it logged every 10.
    assert result["optimizer_steps"]["suite"] == 2 + 3 * 4
    assert result["suite_steps_logged"] == 1
    for clock in ("wall", "cpu"):
        low, high = result[clock]["suite_over_bare_range"]
        assert 0 < low <= result[clock]["suite_over_bare_median"] <= high
