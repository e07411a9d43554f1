import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from medseg.viz.compare import plot_run_comparison  # noqa: E402


def test_the_legend_of_the_comparison_hides_no_panel():
    epochs = range(1, 13)
    series = {f"run {i} (training.learning_rate={lr})": {
        "val_dice": pd.Series([min(0.95, 0.1 + e * 0.08 * (i + 1) / 3) for e in epochs], epochs),
        "val_loss": pd.Series([1.0 / (e + i) for e in epochs], epochs)}
        for i, lr in enumerate([1e-3, 3e-3, 1e-2])}
    figure = plot_run_comparison(["val_dice", "val_loss"], series)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    [legend] = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == list(series)
    box = legend.get_window_extent(renderer)
    for axis in figure.axes:
        assert not box.overlaps(axis.get_tightbbox(renderer)), axis.get_title()
        assert len(axis.get_lines()) == 3
    assert box.y1 < min(axis.get_window_extent(renderer).y0 for axis in figure.axes)
