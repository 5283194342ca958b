"""Training curves: every logged loss term against the epoch, one panel per term.

The training loops log one row per chunk of epochs, ``{"epoch": e, term:
value, ...}``, where a value is a number (already averaged over seeds, as
CoRE logs it) or a list with one number per seed (SREL, UrbanMMCL). Per-seed
values are drawn as one line per seed, so that a seed that diverges or
collapses (a jump in its curve) stands out from the others.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxurban.viz.embedding_plot import save_figure_atomic, wrap_title

__all__ = ["loss_table", "merge_seed_histories", "plot_loss_history"]

# Above this ratio between a term's largest and smallest positive value the
# panel's y axis is logarithmic (a term falling from 1e4 to 1 is otherwise a
# flat line after the first points).
_LOG_SCALE_RATIO = 100.0


def loss_table(history: Sequence[Mapping]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(epochs [R], {term: [R, seeds]}) from logged rows.

  Raises ValueError naming the row and the term when rows disagree on the
  terms or on the number of seeds, or when a row has no epoch.
  """
  if not history:
    raise ValueError("loss history is empty: nothing to plot")
  # The total first, then the terms in logged order.
  terms = sorted((k for k in history[0] if k != "epoch"), key=lambda k: k != "total")
  epochs, columns = [], {k: [] for k in terms}
  for i, row in enumerate(history):
    if "epoch" not in row:
      raise ValueError(f"loss history row {i} has no 'epoch'")
    if sorted(k for k in row if k != "epoch") != sorted(terms):
      raise ValueError(
        f"loss history row {i} (epoch {row['epoch']}) has terms "
        f"{sorted(k for k in row if k != 'epoch')}, the first row {sorted(terms)}"
      )
    epochs.append(float(row["epoch"]))
    for k in terms:
      columns[k].append(np.atleast_1d(np.asarray(row[k], np.float64)))
  table = {}
  for k, values in columns.items():
    widths = {v.shape for v in values}
    if len(widths) != 1:
      raise ValueError(f"loss history term {k!r} has per-seed shapes {sorted(widths)} across rows")
    table[k] = np.stack(values)
  return np.asarray(epochs), table


def merge_seed_histories(histories: Sequence[Sequence[Mapping]]) -> list[dict]:
  """One history per seed (numbers per row) -> one history of per-seed lists.

  For loops that train the seeds one after another (UrbanMMCL). The seeds
  must have logged the same epochs; raises ValueError naming the seed that
  did not.
  """
  if not histories:
    raise ValueError("no seed histories to merge")
  epochs = [row["epoch"] for row in histories[0]]
  for s, history in enumerate(histories):
    if [row["epoch"] for row in history] != epochs:
      raise ValueError(
        f"seed history {s} logged epochs {[r['epoch'] for r in history]}, seed 0 {epochs}"
      )
  merged = []
  for i, epoch in enumerate(epochs):
    terms = [k for k in histories[0][i] if k != "epoch"]
    merged.append({"epoch": epoch, **{k: [float(h[i][k]) for h in histories] for k in terms}})
  return merged


def plot_loss_history(
  path,
  history: Sequence[Mapping],
  title: str = "",
  seed_labels: Sequence | None = None,
  dpi: int = 110,
):
  """Writes a PNG of every loss term against the epoch (atomically).

  Args:
    path: the PNG to write.
    history: logged rows ``{"epoch": e, term: number or per-seed list}``.
    title: the figure's title.
    seed_labels: names of the per-seed lines (default: 0, 1, ...).
    dpi: resolution.

  Non-finite values are left as gaps in the curves.
  """
  epochs, table = loss_table(history)
  n_panels = len(table)
  n_cols = min(3, n_panels)
  n_rows = math.ceil(n_panels / n_cols)
  fig = Figure(figsize=(4.2 * n_cols, 3.0 * n_rows + 0.4), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
  for ax, (term, values) in zip(axes, table.items()):
    n_seeds = values.shape[1]
    labels = list(seed_labels) if seed_labels is not None else list(range(n_seeds))
    for s in range(n_seeds):
      label = f"seed {labels[s]}" if n_seeds > 1 and s < len(labels) else None
      ax.plot(epochs, values[:, s], marker="." if len(epochs) < 30 else None, lw=1.2, label=label)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and np.all(values[np.isfinite(values)] > 0):
      if positive.max() / positive.min() > _LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_title(term)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  # On the first panel that draws one line per seed (the total may be one
  # number already averaged over the seeds).
  per_seed = [ax for ax, values in zip(axes, table.values()) if values.shape[1] > 1]
  if per_seed:
    per_seed[0].legend(fontsize="small")
  if title:
    fig.suptitle(wrap_title(title, 100))
  return save_figure_atomic(fig, path, dpi)
