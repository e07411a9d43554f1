"""Figures saved as PNG (matplotlib's Agg backend: no display needed)."""

import matplotlib

matplotlib.use("Agg")
