"""Joint 2-D picture of two cities' region embeddings (CoRE, Fig. 2 style).

Both cities are projected together, so that their relative position in the
picture reflects their relative position in embedding space: aligned spaces
interleave, unaligned ones form separate islands. City X is drawn with
triangles and city Y with dots; the colour is the region's GDP level within
its own city (low / medium / high by that city's tertiles: yellow, green,
red), so that alignment of semantically similar regions shows as colours
meeting across markers.
"""

from __future__ import annotations

import pathlib
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jaxurban.atomic import atomic_write
from jaxurban.viz.tsne import pca_2d, tsne

__all__ = [
  "GDP_LEVEL_COLORS",
  "GDP_LEVEL_NAMES",
  "gdp_levels",
  "plot_city_embeddings",
  "wrap_title",
]

GDP_LEVEL_NAMES = ("low", "medium", "high")
# A darker yellow than pure #ffff00 so that low-GDP points stay visible on
# white.
GDP_LEVEL_COLORS = ("#e8b800", "#2ca02c", "#d62728")
_METHODS = ("tsne", "pca")


def gdp_levels(gdp) -> np.ndarray:
  """0 / 1 / 2 = up to the first tertile / up to the second / above it.

  Tertiles are the 1/3 and 2/3 quantiles of this city's own values (linear
  interpolation, NumPy's default), so each level holds about a third of the
  city's regions. A value equal to a cut takes the lower level: where many
  regions tie (a third of them with zero GDP, say), the tied values stay
  together in the lowest level their value reaches instead of being lifted
  into "medium" or "high".
  """
  gdp = np.asarray(gdp, np.float64).reshape(-1)
  if not np.isfinite(gdp).all():
    # np.quantile would return NaN cuts and put every region in "low".
    raise ValueError(f"gdp_levels: {int((~np.isfinite(gdp)).sum())} GDP values are not finite")
  cuts = np.quantile(gdp, [1.0 / 3.0, 2.0 / 3.0])
  return np.searchsorted(cuts, gdp, side="left")


def _project(z: np.ndarray, method: str, seed: int, **kwargs) -> np.ndarray:
  if method == "tsne":
    # t-SNE's usual perplexity of 30 needs more than 31 points; a pair of
    # small cities (CoRE takes two regions per city) gets a third of its
    # points' count instead.
    kwargs.setdefault("perplexity", min(30.0, (z.shape[0] - 1) / 3))
    return np.asarray(tsne(z, seed=seed, **kwargs))
  return np.asarray(pca_2d(z))


def wrap_title(title: str, width: int) -> str:
  """Each line of `title` wrapped at `width` characters (a long one is cut
  off at the figure's edge otherwise)."""
  return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def save_figure_atomic(fig: Figure, path, dpi: int) -> pathlib.Path:
  """Writes a PNG next to the target, then renames: readers never see a partial picture."""
  return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def plot_city_embeddings(
  z_x,
  z_y,
  gdp_x,
  gdp_y,
  name_x: str,
  name_y: str,
  path,
  method: str = "tsne",
  seed: int = 0,
  title: str | None = None,
  *,
  dpi: int = 150,
  **projection_kwargs,
) -> pathlib.Path:
  """Projects Z^X and Z^Y jointly to 2-D and saves a scatter plot as PNG.

  Args:
    z_x, z_y: [N_X, d] and [N_Y, d] region embeddings (same d).
    gdp_x, gdp_y: [N_X] and [N_Y] GDP per region, coloured by within-city
      tertile (:func:`gdp_levels`).
    name_x, name_y: city codes for the legend (shown upper-case).
    path: output file; its folder must exist.
    method: ``"tsne"`` (exact t-SNE, :func:`jaxurban.viz.tsne.tsne`) or
      ``"pca"`` (first two principal components, fast).
    seed: t-SNE seed (used with ``init="random"``).
    title: figure title; a default naming the cities and method otherwise.
    dpi: resolution of the PNG.
    **projection_kwargs: forwarded to ``tsne`` (e.g. ``n_iter``); the
      perplexity is 30, or a third of the points' count below 91 points.

  Returns:
    The written path.
  """
  if method not in _METHODS:
    raise ValueError(f"method {method!r}: expected one of {_METHODS}")
  z_x = np.asarray(z_x, np.float32)
  z_y = np.asarray(z_y, np.float32)
  if z_x.shape[1] != z_y.shape[1]:
    raise ValueError(f"embedding widths differ: {z_x.shape[1]} vs {z_y.shape[1]}")
  for name, z in ((name_x, z_x), (name_y, z_y)):
    bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
    if bad.size:
      # One such row leaves no finite point in the projection: a blank picture.
      raise ValueError(f"{name}: {bad.size} embedding rows are not finite (first: row {bad[0]})")
  lv_x, lv_y = gdp_levels(gdp_x), gdp_levels(gdp_y)
  if lv_x.shape[0] != z_x.shape[0] or lv_y.shape[0] != z_y.shape[0]:
    raise ValueError("one GDP value per region is needed for each city")
  xy = _project(np.concatenate([z_x, z_y]), method, seed, **projection_kwargs)
  p_x, p_y = xy[: len(z_x)], xy[len(z_x) :]

  fig = Figure(figsize=(9.0, 6.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  # Level by level, so high-GDP regions are drawn last (on top) and the two
  # cities interleave instead of one covering the other.
  for level, color in enumerate(GDP_LEVEL_COLORS):
    mx, my = lv_x == level, lv_y == level
    ax.scatter(p_x[mx, 0], p_x[mx, 1], marker="^", s=16, c=color, alpha=0.75, linewidths=0)
    ax.scatter(p_y[my, 0], p_y[my, 1], marker="o", s=12, c=color, alpha=0.75, linewidths=0)
  handles = [
    Line2D(
      [], [], ls="", marker="^", ms=7, color="0.35", label=f"{name_x.upper()} ({len(z_x)} regions)"
    ),
    Line2D(
      [], [], ls="", marker="o", ms=6, color="0.35", label=f"{name_y.upper()} ({len(z_y)} regions)"
    ),
  ] + [
    Line2D([], [], ls="", marker="s", ms=8, color=c, label=f"{n} GDP")
    for n, c in zip(GDP_LEVEL_NAMES, GDP_LEVEL_COLORS)
  ]
  # Outside the axes, so that no region is hidden behind it.
  ax.legend(
    handles=handles,
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
    borderaxespad=0.0,
    frameon=False,
    fontsize=9,
    title="city / GDP tertile\n(within each city)",
    title_fontsize=9,
  )
  ax.set_xticks([])
  ax.set_yticks([])
  if title is None:
    how = "t-SNE" if method == "tsne" else "PCA"
    title = f"{name_x.upper()} and {name_y.upper()} region embeddings, joint {how}"
  ax.set_title(wrap_title(title, 90), fontsize=11)
  fig.tight_layout()
  path = pathlib.Path(path)
  save_figure_atomic(fig, path, dpi)
  return path
