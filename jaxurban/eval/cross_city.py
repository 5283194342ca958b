"""Cross-city socioeconomic prediction, the evaluation protocol of CoRE.

Protocol (CoRE, Sec. 4.2.3 and Table 1): a ridge regression
(``alpha = 1``, with an unpenalised intercept) is fitted on the source city's
region embeddings Z^X and one label, then applied to the target city's
embeddings Z^Y, which must live in the same (aligned) space. Predictions are
clipped at 0 and scored with MAE, RMSE and MAPE (a ratio, over target regions
with a non-zero label), see :mod:`jaxurban.eval.metrics`. Labels: GDP,
population and CO2 emission summed per region; both directions are reported.

Numerics. The published evaluator rounds the labels to float32 when loading
them; this module does the same, so the inputs are identical. The ridge solve
and the metrics then run in float64 (``precision="float64"``, the default),
inside a scoped ``jax.enable_x64(True)`` so the rest of the program keeps its
32-bit configuration. The reason is given in :mod:`jaxurban.eval.ridge`: the
solve's float32 error scales with the condition number of the embeddings'
Gram matrix, which training does not control. ``precision="float32"`` is
available for quick checks during training.

Every label is fitted at once as one multi-target ridge (one factorisation),
and embeddings with a leading seed axis [K, N, d] are scored with ``jax.vmap``
in one compiled call.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxurban.eval.metrics import METRIC_NAMES, regression_metrics
from jaxurban.eval.ridge import ridge_fit, ridge_predict

__all__ = [
  "ARROW",
  "LABEL_NAMES",
  "PUBLISHED_CORE",
  "cross_city_scores",
  "direction_key",
  "evaluate_pair",
  "format_table",
]

LABEL_NAMES = ("gdp", "population", "co2")
ARROW = "→"

_LABEL_TITLES = {"gdp": "GDP", "population": "Population", "co2": "CO2"}
_METRIC_TITLES = {"mae": "MAE", "rmse": "RMSE", "mape": "MAPE"}
_PRECISIONS = ("float64", "float32")


def direction_key(source: str, target: str) -> str:
  """``"CD→XA"``: the key of the direction trained on ``source``."""
  return f"{source.upper()}{ARROW}{target.upper()}"


# Scores of the CoRE authors' published cd-xa embeddings
# (save_emb/cd-xa/{cd,xa}_region_emb.npy) under the protocol above, as given
# in the data folder's PROVENANCE.md (section core/<city>). They are the
# reference this evaluator must reproduce to 2 decimals; they are not the
# paper's Table 1, which averages five training runs.
PUBLISHED_CORE: dict[tuple[str, str], dict[str, dict[str, dict[str, float]]]] = {
  ("cd", "xa"): {
    direction_key("cd", "xa"): {
      "gdp": {"mae": 170.13, "mape": 4.56},
      "population": {"mae": 591.92, "mape": 4.32},
      "co2": {"mae": 136.24, "mape": 1.59},
    },
    direction_key("xa", "cd"): {
      "gdp": {"mae": 179.60, "mape": 11.25},
      "population": {"mae": 609.84, "mape": 3.32},
      "co2": {"mae": 130.40, "mape": 9.27},
    },
  },
}


def _scores_one(src_emb, src_y, tgt_emb, tgt_y, alpha):
  """Metrics for every label column: src_y [N, T], tgt_y [M, T] -> {m: [T]}."""
  params = ridge_fit(src_emb, src_y, alpha)
  pred = ridge_predict(params, tgt_emb)  # [M, T]
  return jax.vmap(regression_metrics, in_axes=(1, 1))(tgt_y, pred)


@functools.partial(jax.jit, static_argnames=("src_batched", "tgt_batched"))
def _scores(src_emb, src_y, tgt_emb, tgt_y, alpha, *, src_batched, tgt_batched):
  if not (src_batched or tgt_batched):
    return _scores_one(src_emb, src_y, tgt_emb, tgt_y, alpha)
  in_axes = (0 if src_batched else None, None, 0 if tgt_batched else None, None, None)
  return jax.vmap(_scores_one, in_axes=in_axes)(src_emb, src_y, tgt_emb, tgt_y, alpha)


def _label_matrix(
  labels: Mapping[str, np.ndarray], names: Sequence[str], n: int, which: str
) -> np.ndarray:
  cols = []
  for name in names:
    if name not in labels:
      raise KeyError(f"{which} labels have no {name!r} (have {sorted(labels)})")
    # Rounded to float32 like the published evaluator's
    # np.load(...).astype('float32'), then widened for the solve.
    col = np.asarray(labels[name]).astype(np.float32).reshape(-1)
    if col.shape[0] != n:
      raise ValueError(f"{which} label {name!r} has {col.shape[0]} values for {n} regions")
    cols.append(col)
  return np.stack(cols, axis=1)


def cross_city_scores(
  source_emb,
  source_labels: Mapping[str, np.ndarray],
  target_emb,
  target_labels: Mapping[str, np.ndarray],
  *,
  alpha: float = 1.0,
  precision: str = "float64",
) -> dict[str, dict[str, float | np.ndarray]]:
  """Scores one direction of the cross-city protocol for every label.

  Args:
    source_emb: [N_s, d] source-city embeddings, or [K, N_s, d] for K seeds.
    source_labels: label name -> [N_s] values; every name is evaluated, in
      this mapping's order.
    target_emb: [N_t, d] target-city embeddings in the source's space, or
      [K, N_t, d] (a 2-D array is shared by all K source seeds and vice
      versa).
    target_labels: label name -> [N_t] values; must hold every source name.
    alpha: ridge penalty (the protocol uses 1).
    precision: ``"float64"`` (solve and metrics in float64 under a scoped
      ``jax.enable_x64``) or ``"float32"``.

  Returns:
    ``{label: {"mae", "rmse", "mape"}}`` with Python floats, or NumPy arrays
    of K values when either embedding has a seed axis. Host values: this is
    not meant to be called inside ``jit``.
  """
  if precision not in _PRECISIONS:
    raise ValueError(f"precision {precision!r}: expected one of {_PRECISIONS}")
  src = np.asarray(source_emb)
  tgt = np.asarray(target_emb)
  for arr, which in ((src, "source"), (tgt, "target")):
    if arr.ndim not in (2, 3):
      raise ValueError(f"{which} embeddings must be [N, d] or [K, N, d], got shape {arr.shape}")
  if src.shape[-1] != tgt.shape[-1]:
    raise ValueError(f"embedding widths differ: source {src.shape[-1]}, target {tgt.shape[-1]}")
  if src.ndim == 3 and tgt.ndim == 3 and src.shape[0] != tgt.shape[0]:
    raise ValueError(f"seed axes differ: source {src.shape[0]}, target {tgt.shape[0]}")
  names = tuple(source_labels)
  src_y = _label_matrix(source_labels, names, src.shape[-2], "source")
  tgt_y = _label_matrix(target_labels, names, tgt.shape[-2], "target")

  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f"cross_city_scores: alpha must be > 0, got {alpha}")
  wide = precision == "float64"
  with jax.enable_x64(wide):
    dtype = jnp.float64 if wide else jnp.float32
    out = _scores(
      jnp.asarray(src, dtype),
      jnp.asarray(src_y, dtype),
      jnp.asarray(tgt, dtype),
      jnp.asarray(tgt_y, dtype),
      jnp.asarray(alpha, dtype),
      src_batched=src.ndim == 3,
      tgt_batched=tgt.ndim == 3,
    )
    out = jax.device_get(out)  # NumPy, still float64

  batched = src.ndim == 3 or tgt.ndim == 3
  result = {}
  for t, name in enumerate(names):
    row = {}
    for metric in METRIC_NAMES:
      vals = np.asarray(out[metric], np.float64)
      row[metric] = vals[:, t].copy() if batched else float(vals[t])
    result[name] = row
  return result


def evaluate_pair(
  emb_x,
  emb_y,
  labels_x: Mapping[str, np.ndarray],
  labels_y: Mapping[str, np.ndarray],
  name_x: str,
  name_y: str,
  *,
  emb_y_in_x=None,
  emb_x_in_y=None,
  alpha: float = 1.0,
  precision: str = "float64",
) -> dict[str, dict[str, dict[str, float | np.ndarray]]]:
  """Both directions of the protocol for a pair of cities.

  For X→Y the ridge is trained on ``emb_x`` and applied to Y's embeddings in
  X's space: ``emb_y`` itself for jointly aligned embeddings (CoRE), or
  ``emb_y_in_x`` when given (a translation baseline's T(Z^Y)); Y→X likewise
  with ``emb_x_in_y``. Embeddings may carry a leading seed axis.

  Returns:
    ``{"X→Y": scores, "Y→X": scores}`` with upper-case city codes, each as
    returned by :func:`cross_city_scores`.
  """
  kw = dict(alpha=alpha, precision=precision)
  tgt_y = emb_y if emb_y_in_x is None else emb_y_in_x
  tgt_x = emb_x if emb_x_in_y is None else emb_x_in_y
  return {
    direction_key(name_x, name_y): cross_city_scores(emb_x, labels_x, tgt_y, labels_y, **kw),
    direction_key(name_y, name_x): cross_city_scores(emb_y, labels_y, tgt_x, labels_x, **kw),
  }


def _cell(value, digits: int) -> tuple[str, int | None]:
  """Formats one figure; arrays of seeds become ``mean ± std`` (ddof=0).

  One seed has no spread: its value is shown alone (the row's title counts
  the seeds).
  """
  if value is None:
    return "-", None
  arr = np.asarray(value, np.float64)
  if arr.ndim == 0:
    return f"{float(arr):.{digits}f}", None
  if arr.shape[0] == 1:
    return f"{arr[0]:.{digits}f}", 1
  return (f"{arr.mean():.{digits}f} ± {arr.std(ddof=0):.{digits}f}", int(arr.shape[0]))


def format_table(
  results: Mapping[str, Mapping[str, Mapping[str, object]]],
  reference: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
  *,
  metrics: Sequence[str] = ("mae", "mape"),
  labels: Sequence[str] = LABEL_NAMES,
  name: str = "this evaluation",
  reference_name: str = "reference",
  digits: int = 2,
) -> str:
  """Plain-text table, one block per direction.

  Args:
    results: ``{direction: {label: {metric: value}}}`` as returned by
      :func:`evaluate_pair`; a value that is an array of seeds is shown as
      ``mean ± std``. A single direction's ``{label: {...}}`` is accepted too.
    reference: same structure (e.g. ``PUBLISHED_CORE[("cd", "xa")]``); its
      row is printed under the results of the same direction.
    metrics, labels: columns, label-major (GDP MAE, GDP MAPE, ...).
    name, reference_name: row titles.
    digits: decimals.
  """
  if results and set(results) <= set(labels) | set(LABEL_NAMES):
    results = {"": results}
  header = [""] + [
    f"{_LABEL_TITLES.get(l, l)} {_METRIC_TITLES.get(m, m)}" for l in labels for m in metrics
  ]
  blocks = []
  n_seeds_seen = set()
  for direction, scores in results.items():
    cells, seeds = [], set()
    for label in labels:
      for metric in metrics:
        text, k = _cell(scores.get(label, {}).get(metric), digits)
        cells.append(text)
        if k is not None:
          seeds.add(k)
    n_seeds_seen |= seeds
    count = min(seeds) if len(seeds) == 1 else None
    title = name + ("" if count is None else f", {count} seed{'s' * (count > 1)}")
    rows = [[title] + cells]
    ref = None if reference is None else reference.get(direction)
    if ref is not None:
      rows.append(
        [reference_name]
        + [_cell(ref.get(l, {}).get(m), digits)[0] for l in labels for m in metrics]
      )
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(row, widths=widths):
      return "  ".join(
        (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths))
      ).rstrip()

    lines = []
    if direction:
      src, _, tgt = direction.partition(ARROW)
      lines.append(f"{direction}  (ridge trained on {src}, evaluated on {tgt})")
    lines.append(fmt(header))
    lines.append("-" * len(fmt(header)))
    lines.extend(fmt(r) for r in rows)
    blocks.append("\n".join(lines))
  notes = [
    "MAPE is a ratio over target regions with a non-zero label; "
    "negative predictions are clipped to 0."
  ]
  if any(n > 1 for n in n_seeds_seen):
    notes.insert(0, "mean ± std over seeds; std is the population standard deviation (ddof=0).")
  return "\n\n".join(blocks) + "\n\n" + "\n".join(notes) + "\n"
