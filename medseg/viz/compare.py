"""Learning curves of several runs side by side (the incense notebook `compare_runs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd


def plot_run_comparison(curves: Sequence[str], series: Mapping[str, Mapping[str, pd.Series]]):
    """One panel per metric in ``curves``, one line per run: ``series[run label][metric]``
    (indexed by epoch). The legend goes below the panels, where it hides no run's line."""
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.2), squeeze=False,
                                layout="constrained")
    for axis, name in zip(axes[0], curves):
        for label, metrics in series.items():
            if name in metrics:
                metrics[name].plot(ax=axis, marker=".", label=label)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", fontsize="small",
                  ncol=min(len(labels), 3) or 1)
    return figure
