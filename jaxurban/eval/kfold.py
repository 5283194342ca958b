"""K-fold cross-validation over regions, the single-city protocol of ToPT.

Protocol (ToPT, Sec. 3.1; the authors' ``PromptLearning.py``): the regions of
one city are split into k folds (default 10, shuffled by a seed); each fold is
predicted by a model trained on the other k-1 folds; the k test-fold
predictions are pooled into one prediction per region and scored once with

    MAE  = 1/M sum_i |e_i|
    RMSE = sqrt(1/M sum_i e_i^2)
    R2   = 1 - sum_i e_i^2 / sum_i (y_i - y_bar)^2,   e_i = max(y_hat_i, 0) - y_i

(negative predictions clipped to 0 first, as every label is a count; the same
convention as :mod:`jaxurban.eval.metrics`). For check-in the regions with a
zero label are dropped before the folds are drawn, as the authors do.

Three protocols choose which training epoch's predictions are scored:

* ``"honest"`` (default): a fixed epoch budget; the predictions after the last
  epoch are scored. Nothing about a test fold influences what is reported.
* ``"validated"``: for each test fold, the epoch with the best R2 on the next
  fold, which is then left out of that fold's training; the test fold is
  never looked at.
* ``"paper"``: for each fold, the evaluation epoch with the best R2 *on that
  test fold* is kept, which is what the authors' code does. This selects on
  the test data and is labelled "optimistic (test-fold epoch selection)" in
  every output.

All array functions are pure ``jnp`` with fixed shapes (folds are boolean
masks over all regions, never gathers of varying size), so they ``jax.vmap``
over seed and fold axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxurban.eval.ridge import RidgeParams

__all__ = [
  "DEFAULT_FOLDS",
  "PROTOCOLS",
  "PROTOCOL_LABELS",
  "fold_assignment",
  "keep_mask",
  "masked_ridge_fit",
  "masked_scores",
  "pool_folds",
  "protocol_label",
  "RIDGE_ALPHAS",
  "ridge_cv_predictions",
  "ridge_cv_predictions_tuned",
  "score_pooled",
  "select_folds",
  "summarise",
  "fold_masks",
  "validation_masks",
]

DEFAULT_FOLDS = 10
PROTOCOLS = ("honest", "validated", "paper")
PROTOCOL_LABELS = {
  "honest": "honest (fixed epoch budget, final epoch scored; no test-fold selection)",
  "validated": "honest (epoch chosen on an inner validation fold; no test-fold selection)",
  "paper": "optimistic (test-fold epoch selection)",
}
METRICS = ("mae", "rmse", "r2")


def protocol_label(protocol: str) -> str:
  """The label printed beside every number produced under ``protocol``."""
  if protocol not in PROTOCOL_LABELS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
  return PROTOCOL_LABELS[protocol]


def fold_assignment(n: int, n_folds: int = DEFAULT_FOLDS, seed: int = 2024) -> np.ndarray:
  """Fold index [n] of each region, identical to ``KFold(n_folds, shuffle=True,
  random_state=seed)``.

  scikit-learn shuffles ``arange(n)`` with ``RandomState(seed)`` and cuts it
  into consecutive folds, the first ``n % n_folds`` one region larger; doing
  the same here makes ``seed=2024`` reproduce the authors' split exactly.
  """
  if n_folds < 2 or n_folds > n:
    raise ValueError(f"n_folds must be in [2, {n}] for {n} regions, got {n_folds}")
  order = np.arange(n)
  np.random.RandomState(seed).shuffle(order)
  sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
  sizes[: n % n_folds] += 1
  fold_of = np.empty(n, dtype=np.int32)
  start = 0
  for fold, size in enumerate(sizes):
    fold_of[order[start : start + size]] = fold
    start += size
  return fold_of


def fold_masks(fold_of: np.ndarray, n_folds: int) -> np.ndarray:
  """Boolean [n_folds, n]: row f marks the regions of test fold f."""
  fold_of = np.asarray(fold_of)
  return fold_of[None, :] == np.arange(n_folds)[:, None]


def keep_mask(task: str, labels: np.ndarray) -> np.ndarray:
  """Regions that take part in ``task``: all, except zero-count check-in regions."""
  labels = np.asarray(labels)
  if task == "checkIn":
    return labels > 0
  return np.ones(labels.shape, dtype=bool)


def masked_scores(y_true, y_pred, mask=None) -> dict[str, jax.Array]:
  """MAE, RMSE and R2 of clipped predictions over the regions where ``mask``.

  Args:
    y_true, y_pred: [M] labels and raw predictions (negatives clipped to 0).
    mask: optional boolean [M]; masked-out regions do not count.
  """
  dtype = jnp.result_type(y_true, y_pred, jnp.float32)
  y_true = jnp.asarray(y_true, dtype)
  y_pred = jnp.maximum(jnp.asarray(y_pred, dtype), 0)
  w = jnp.ones_like(y_true) if mask is None else jnp.asarray(mask, dtype)
  count = jnp.sum(w)
  # Selected with `where`, not multiplied out: 0 * nan is nan, so a
  # non-finite value on a masked-out row would otherwise reach every score.
  kept = w > 0
  err = jnp.where(kept, y_pred - y_true, 0) * w
  sse = jnp.sum(err * err)
  y_bar = jnp.sum(jnp.where(kept, y_true, 0) * w) / count
  sst = jnp.sum(w * jnp.where(kept, y_true - y_bar, 0) ** 2)
  return {
    "mae": jnp.sum(jnp.abs(err)) / count,
    "rmse": jnp.sqrt(sse / count),
    "r2": 1.0 - sse / sst,
  }


def masked_ridge_fit(x, y, mask, alpha: float = 1.0) -> RidgeParams:
  """``jaxurban.eval.ridge.ridge_fit`` on the rows where ``mask``, fixed shapes.

  Rows outside the mask get weight 0 in the means and in the centred normal
  equations, which gives exactly the ridge solution of the selected rows.
  """
  dtype = jnp.result_type(x, y, jnp.float32)
  x = jnp.asarray(x, dtype)
  y = jnp.asarray(y, dtype)
  w = jnp.asarray(mask, dtype)
  count = jnp.sum(w)
  x_mean = jnp.sum(x * w[:, None], axis=0) / count
  y_mean = jnp.sum(y * w) / count
  xc = (x - x_mean) * w[:, None]
  yc = (y - y_mean) * w
  hi = jax.lax.Precision.HIGHEST
  gram = jnp.matmul(xc.T, xc, precision=hi) + alpha * jnp.eye(x.shape[-1], dtype=dtype)
  weights = jnp.linalg.solve(gram, jnp.matmul(xc.T, yc, precision=hi))
  return RidgeParams(weights=weights, intercept=y_mean - jnp.dot(x_mean, weights, precision=hi))


def _check_probe_shapes(caller: str, embeddings, labels, fold_of) -> int:
  """The number of regions n, once embeddings are [S, n, d] and labels [n]."""
  n = len(fold_of)
  if np.ndim(embeddings) != 3 or np.shape(embeddings)[1] != n or np.shape(labels) != (n,):
    raise ValueError(
      f"{caller}: expected embeddings [seeds, {n}, d] and labels [{n}] for the "
      f"{n} regions of the folds, got {np.shape(embeddings)} and {np.shape(labels)}"
    )
  return n


def ridge_cv_predictions(embeddings, labels, fold_of, n_folds: int, alpha: float = 1.0):
  """Pooled out-of-fold ``Ridge(alpha)`` predictions [S, n] for embeddings [S, n, d].

  The "w/o Prompt4RE" row: the region embeddings alone with a ridge regressor,
  each fold fitted on the other folds. Solved in float64 (scoped).
  """
  _check_probe_shapes("ridge_cv_predictions", embeddings, labels, fold_of)
  masks = fold_masks(fold_of, n_folds)
  with jax.enable_x64(True):
    x = jnp.asarray(np.asarray(embeddings, np.float64))
    y = jnp.asarray(np.asarray(labels, np.float64))
    m = jnp.asarray(masks)

    def one_fold(xs, test):
      params = masked_ridge_fit(xs, y, ~test, alpha)
      return xs @ params.weights + params.intercept

    per_fold = jax.vmap(jax.vmap(one_fold, in_axes=(None, 0)), in_axes=(0, None))(x, m)
    pooled = pool_folds(per_fold, m)
    return np.asarray(pooled)


# The penalties the tuned probe chooses among (`ridge_cv_predictions_tuned`):
# four decades around the fixed probe's alpha = 1.
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def ridge_cv_predictions_tuned(
  embeddings,
  labels,
  fold_of,
  n_folds: int,
  alphas: tuple[float, ...],
  inner_folds: int = 5,
  inner_seed: int = 0,
):
  """`ridge_cv_predictions` with the penalty chosen inside each training part.

  For each outer fold, the training regions (never the test fold) are split
  into ``inner_folds`` folds; each alpha of ``alphas`` is scored by the
  squared error of its clipped out-of-fold predictions there, and the best
  one is refitted on all the training regions to predict the test fold. A
  fixed alpha favours one feature width over another (a ridge on 386 raw
  columns of 180 regions needs far more penalty than one on 128 embedding
  dimensions); choosing it this way gives every feature set the same probe.

  Returns:
    (pooled predictions [S, n], chosen alpha [S, n_folds]).
  """
  n = _check_probe_shapes("ridge_cv_predictions_tuned", embeddings, labels, fold_of)
  masks = fold_masks(fold_of, n_folds)
  inner = np.zeros((n_folds, inner_folds, n), bool)
  for f in range(n_folds):
    train = np.flatnonzero(~masks[f])
    inner_of = fold_assignment(len(train), inner_folds, inner_seed)
    for g in range(inner_folds):
      inner[f, g, train[inner_of == g]] = True
  with jax.enable_x64(True):
    x = jnp.asarray(np.asarray(embeddings, np.float64))
    y = jnp.asarray(np.asarray(labels, np.float64))
    grid = jnp.asarray(alphas, jnp.float64)

    def predict(xs, train, alpha):
      params = masked_ridge_fit(xs, y, train, alpha)
      return jnp.maximum(xs @ params.weights + params.intercept, 0)

    def inner_error(xs, test, validation, alpha):
      pred = predict(xs, ~test & ~validation, alpha)
      return jnp.sum(jnp.where(validation, (pred - y) ** 2, 0))

    def one_fold(xs, test, validations):
      errors = jax.vmap(
        lambda alpha: jnp.sum(jax.vmap(lambda v: inner_error(xs, test, v, alpha))(validations))
      )(grid)
      alpha = grid[jnp.argmin(errors)]
      params = masked_ridge_fit(xs, y, ~test, alpha)
      return xs @ params.weights + params.intercept, alpha

    per_fold, chosen = jax.vmap(
      lambda xs: jax.vmap(lambda t, v: one_fold(xs, t, v))(jnp.asarray(masks), jnp.asarray(inner))
    )(x)
    pooled = pool_folds(per_fold, jnp.asarray(masks))
    return np.asarray(pooled), np.asarray(chosen)


def pool_folds(per_fold, masks):
  """One prediction per region from [..., F, n] fold predictions and [F, n] test masks."""
  return jnp.sum(jnp.where(masks, per_fold, 0), axis=-2)


def validation_masks(masks) -> np.ndarray:
  """[F, n] validation rows of each test fold's model: fold f + 1 (mod F).

  The validation fold is carved out of test fold f's training folds, so fold
  f's model trains on the F - 2 remaining folds and never sees fold f.
  """
  masks = np.asarray(masks, bool)
  if masks.shape[0] < 3:
    raise ValueError(f"an inner validation fold needs at least 3 folds, got {masks.shape[0]}")
  return np.roll(masks, -1, axis=0)


def _fold_sse_trajectory(trajectory, labels, masks):
  """Squared error [T, ..., F] of every evaluation of every fold's model on its ``masks`` rows.

  Within one fold the R2 is 1 - SSE / SST with SST fixed, so the evaluation
  with the least squared error is the one with the highest R2; unlike R2,
  the squared error is also defined on a fold of a single region (SST = 0,
  R2 = -inf at every evaluation), where choosing by R2 fell back to the
  first evaluation.
  """
  masks = jnp.asarray(masks)

  def sse(p, m):  # the predictions clipped at 0, as `masked_scores` scores them
    # `where`, as in `masked_scores`: a non-finite prediction outside the
    # fold's rows must not make the whole evaluation look diverged.
    err = jnp.where(m > 0, jnp.maximum(p, 0) - labels, 0) * m
    return jnp.sum(err * err)

  def fold_sse(per_fold):  # [F, n] -> [F]
    return jax.vmap(sse)(per_fold, masks.astype(per_fold.dtype))

  flat = trajectory.reshape((-1,) + trajectory.shape[-2:])
  return jax.vmap(fold_sse)(flat).reshape(trajectory.shape[:-1])


def select_folds(trajectory, labels, masks, protocol: str, validation=None):
  """Per-fold predictions [..., F, n] chosen from a trajectory [T, ..., F, n].

  ``honest``: the last evaluation (fixed budget). ``validated``: per fold,
  the evaluation with the highest R2 (the least squared error) on that
  fold's validation rows;
  ``validation`` = (validation trajectory [T, ..., F, n], validation masks
  [F, n]), the validation predictions of the same models (see
  `validation_masks`). ``paper``: per fold, the evaluation with the highest
  R2 (the least squared error) on that very test fold (optimistic). Of
  evaluations with equal error the first is kept, as the authors' code keeps
  the first best epoch.
  """
  protocol_label(protocol)
  trajectory = jnp.asarray(trajectory)
  if protocol == "honest":
    return trajectory[-1]
  if protocol == "validated":
    if validation is None:
      raise ValueError("the 'validated' protocol needs the validation trajectory and masks")
    val_trajectory, val_masks = validation
    val_trajectory = jnp.asarray(val_trajectory)
    if val_trajectory.shape != trajectory.shape:
      raise ValueError(
        f"validation trajectory {val_trajectory.shape} must match the trajectory {trajectory.shape}"
      )
    if np.any(np.asarray(val_masks) & np.asarray(masks)):
      raise ValueError("a validation fold overlaps its own test fold")
    errors = _fold_sse_trajectory(val_trajectory, labels, val_masks)
  else:
    errors = _fold_sse_trajectory(trajectory, labels, masks)
  # A diverged evaluation (NaN error) is never the best one; argmin alone would pick it.
  best = jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors), axis=0)  # [..., F]
  return jnp.take_along_axis(trajectory, best[None, ..., None], axis=0)[0]


def score_pooled(pooled, labels) -> dict[str, np.ndarray]:
  """Metrics of pooled predictions [S, n] per seed: {name: [S]} float64."""
  with jax.enable_x64(True):
    y = jnp.asarray(np.asarray(labels, np.float64))
    scores = jax.vmap(lambda p: masked_scores(y, p))(jnp.asarray(np.asarray(pooled, np.float64)))
    return {k: np.asarray(v) for k, v in scores.items()}


def summarise(per_seed: dict[str, np.ndarray]) -> dict[str, dict]:
  """Mean and sample standard deviation (ddof=1; 0 for one seed) over seeds."""
  out = {}
  for name, values in per_seed.items():
    values = np.asarray(values, np.float64)
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    out[name] = {"mean": float(np.mean(values)), "std": std, "per_seed": values.tolist()}
  return out


def summary_text(summary: dict, decimals: int = 4) -> str:
  """A `summarise` entry as ``mean ± std``, or ``mean (1 seed)``: one seed
  has no spread to show (its stored std of 0 is not a measured one)."""
  if len(summary["per_seed"]) == 1:
    return f"{summary['mean']:.{decimals}f} (1 seed)"
  return f"{summary['mean']:.{decimals}f} ± {summary['std']:.{decimals}f}"
