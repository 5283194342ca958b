"""Regression metrics of the cross-city protocol (CoRE, Sec. 4.2.3).

Predictions are clipped at 0 first, since every label (GDP, population, CO2,
counts) is non-negative, then, over M target regions with errors
e_i = max(y_hat_i, 0) - y_i::

    MAE  = 1/M sum_i |e_i|
    RMSE = sqrt(1/M sum_i e_i^2)
    MAPE = 1/|S| sum_{i in S} |e_i| / |y_i|,   S = {i : y_i != 0}

MAPE is a ratio (not multiplied by 100) and skips regions whose label is zero,
where the relative error is undefined; if every label is zero it is NaN.

Classification (land use): accuracy, and F1 and recall per class averaged
with equal weights (macro) or by the class's count in the labels (weighted),
over every class that occurs in the labels or the predictions; a ratio whose
denominator is zero counts as 0 (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["METRIC_NAMES", "classification_metrics", "regression_metrics"]

METRIC_NAMES = ("mae", "rmse", "mape")


def regression_metrics(y_true: jax.Array, y_pred: jax.Array) -> dict[str, jax.Array]:
  """MAE, RMSE and MAPE of clipped predictions over a vector of regions.

  Args:
    y_true: [M] labels.
    y_pred: [M] raw predictions (negative values are clipped to 0 here).

  Returns:
    ``{"mae": [], "rmse": [], "mape": []}`` scalars in the floating dtype of
    the inputs. Pure jnp: use ``jax.vmap`` for seed or target axes.
  """
  dtype = jnp.result_type(y_true, y_pred)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  y_true = jnp.asarray(y_true, dtype)
  y_pred = jnp.maximum(jnp.asarray(y_pred, dtype), 0)
  err = y_pred - y_true
  abs_err = jnp.abs(err)
  nonzero = y_true != 0
  # Masked mean; the denominator is replaced by 1 where masked out so that no
  # inf/NaN is produced (the term is multiplied by 0 anyway).
  rel = jnp.where(nonzero, abs_err / jnp.where(nonzero, jnp.abs(y_true), 1), 0)
  mape = jnp.sum(rel) / jnp.sum(nonzero).astype(dtype)
  return {
    "mae": jnp.mean(abs_err),
    "rmse": jnp.sqrt(jnp.mean(err * err)),
    "mape": mape,
  }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def classification_metrics(y_true, y_pred) -> dict[str, float]:
  """Accuracy, macro F1, macro recall and support-weighted F1 of class labels.

  Args:
    y_true, y_pred: [M] integer class labels.

  Returns:
    ``{"accuracy", "f1_macro", "recall_macro", "f1_weighted"}`` as floats.
  """
  y_true = np.asarray(y_true).ravel()
  y_pred = np.asarray(y_pred).ravel()
  if y_true.shape != y_pred.shape or y_true.size == 0:
    raise ValueError(
      f"need two equal, non-empty label vectors, got {y_true.shape} and {y_pred.shape}"
    )
  classes = np.union1d(y_true, y_pred)
  is_true = y_true[None, :] == classes[:, None]  # [C, M]
  is_pred = y_pred[None, :] == classes[:, None]
  true_pos = np.sum(is_true & is_pred, axis=1).astype(np.float64)
  support = np.sum(is_true, axis=1).astype(np.float64)
  predicted = np.sum(is_pred, axis=1).astype(np.float64)
  recall = _ratio(true_pos, support)
  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted).
  f1 = _ratio(2.0 * true_pos, support + predicted)
  return {
    "accuracy": float(np.mean(y_true == y_pred)),
    "f1_macro": float(np.mean(f1)),
    "recall_macro": float(np.mean(recall)),
    "f1_weighted": float(np.sum(f1 * support) / np.sum(support)),
  }
