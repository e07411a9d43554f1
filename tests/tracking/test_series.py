from datetime import datetime, timedelta

import pytest

from medseg.tracking.series import MetricSeries

START = datetime(2026, 1, 1)


def fill(series: MetricSeries, count: int) -> None:
    for step in range(count):
        series.add(step, step * 2.0, START + timedelta(seconds=step))


def test_short_series_keeps_every_point():
    series = MetricSeries(max_points=100)
    fill(series, 100)
    assert series.steps == list(range(100))
    assert series.values == [s * 2.0 for s in range(100)]
    assert series.generation == 0


@pytest.mark.parametrize("count", [1001, 2500, 25_001, 100_000])
def test_long_series_stays_bounded_and_evenly_spread(count):
    series = MetricSeries(max_points=1000)
    fill(series, count)
    series.finish()
    assert len(series) <= 1001  # the bound, plus the final point put back
    assert len(series) >= 500
    assert series.steps[0] == 0 and series.steps[-1] == count - 1
    assert series.values[-1] == (count - 1) * 2.0
    gaps = {b - a for a, b in zip(series.steps[:-2], series.steps[1:-1])}
    assert gaps == {series.stride}, "kept points are not evenly spaced"
    assert all(v == s * 2.0 for s, v in zip(series.steps, series.values))


def test_finish_adds_the_last_point_once():
    series = MetricSeries(max_points=4)
    fill(series, 7)
    series.finish()
    series.finish()
    assert series.steps.count(6) == 1


def test_drop_after_forgets_later_points_and_marks_a_new_generation():
    series = MetricSeries(max_points=100)
    fill(series, 10)
    series.drop_after(START + timedelta(seconds=4))
    assert series.steps == [0, 1, 2, 3, 4]
    assert series.generation == 1
    series.add(5, 10.0, START + timedelta(seconds=50))
    assert series.steps == [0, 1, 2, 3, 4, 5]


def test_restore_continues_a_stored_series_within_the_bound():
    series = MetricSeries.restore(8, list(range(20)), [float(s) for s in range(20)],
                                  [START + timedelta(seconds=s) for s in range(20)])
    assert len(series) <= 8
    assert series.steps[0] == 0
