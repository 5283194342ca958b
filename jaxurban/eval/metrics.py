"""Regression metrics of the cross-city protocol (CoRE, Sec. 4.2.3).

Predictions are clipped at 0 first, since every label (GDP, population, CO2,
counts) is non-negative, then, over M target regions with errors
e_i = max(y_hat_i, 0) - y_i::

    MAE  = 1/M sum_i |e_i|
    RMSE = sqrt(1/M sum_i e_i^2)
    MAPE = 1/|S| sum_{i in S} |e_i| / |y_i|,   S = {i : y_i != 0}

MAPE is a ratio (not multiplied by 100) and skips regions whose label is zero,
where the relative error is undefined; if every label is zero it is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["METRIC_NAMES", "regression_metrics"]

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
