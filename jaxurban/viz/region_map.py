"""Map of a city's regions coloured by a per-region value (e.g. absolute error).

Regions are drawn at their centroids (longitude on x, latitude on y, so the
picture has the city's orientation); regions without a value (NaN, e.g. the
check-in regions dropped for a zero label) are drawn as grey rings.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxurban.viz.embedding_plot import save_figure_atomic, wrap_title

__all__ = ["plot_region_values"]


def plot_region_values(
  centroids,
  values,
  path,
  *,
  title: str = "",
  colorbar_label: str = "absolute error",
  dpi: int = 120,
) -> pathlib.Path:
  """Writes a PNG scatter of region centroids coloured by ``values``.

  Args:
    centroids: [N, 2] (lat, lon) in degrees.
    values: [N]; NaN marks a region without a value.
    path: output PNG, written atomically (temporary file, then rename).

  Returns:
    The path written.
  """
  centroids = np.asarray(centroids, np.float64)
  values = np.asarray(values, np.float64)
  if centroids.ndim != 2 or centroids.shape[1] != 2 or values.shape != (centroids.shape[0],):
    raise ValueError(
      f"plot_region_values: centroids must be [N, 2] and values [N], got "
      f"{centroids.shape} and {values.shape}"
    )
  fig = Figure(figsize=(5.5, 6.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  known = np.isfinite(values)
  lat, lon = centroids[:, 0], centroids[:, 1]
  if (~known).any():
    ax.scatter(
      lon[~known], lat[~known], s=60, facecolors="none", edgecolors="0.6", label="not scored"
    )
    ax.legend(loc="lower left", fontsize=8)
  points = ax.scatter(
    lon[known], lat[known], c=values[known], s=60, cmap="viridis", edgecolors="k", linewidths=0.3
  )
  if known.any():  # with no value there is no scale to show
    fig.colorbar(points, ax=ax, label=colorbar_label)
  ax.set_xlabel("longitude")
  ax.set_ylabel("latitude")
  # Equal degrees would stretch east-west at this latitude; scale by cos(lat).
  ax.set_aspect(1.0 / np.cos(np.deg2rad(np.nanmean(lat))))
  ax.set_title(wrap_title(title, 60), fontsize=9)
  fig.tight_layout()
  return save_figure_atomic(fig, path, dpi)
