"""Closed-form ridge regression with an intercept, as pure JAX functions.

The model is the one of scikit-learn's ``Ridge(alpha, fit_intercept=True)``
with uniform sample weights: the intercept is not penalised, which is the same
as centring the inputs and the targets, solving the penalised least squares
problem on the centred data and putting the means back::

    x_bar = mean_i x_i,            y_bar = mean_i y_i
    Xc = X - x_bar,                yc = y - y_bar
    (Xc^T Xc + alpha I) w = Xc^T yc                                   (1)
    b = y_bar - x_bar . w                                             (2)
    y_hat(x) = x . w + b                                              (3)

(1) is solved by a Cholesky factorisation: for alpha > 0 the matrix is
symmetric positive definite, whatever the rank of X, so the factorisation
exists also when d > N.

Precision. Both functions compute in the floating dtype of their inputs; they
never change JAX's global configuration. To solve in float64, call them on
float64 arrays inside ``with jax.enable_x64(True):`` (a scoped context
manager in this JAX version, also allowed inside ``jit``).
:func:`jaxurban.eval.cross_city.cross_city_scores` does exactly that, because
the error of (1) grows with the condition number of Xc^T Xc + alpha I, which
for trained embeddings is not bounded: in float32 the relative error is about
``cond * 6e-8``. On the published CoRE embeddings ``cond`` is about 15 and
float32 agrees with float64 to 5e-7 relative, but an evaluator should not rely
on that.

Both functions are jit- and vmap-compatible (e.g. ``jax.vmap(ridge_fit)`` over
a leading seed axis of ``x``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

__all__ = ["RidgeParams", "ridge_fit", "ridge_predict"]


class RidgeParams(NamedTuple):
  """Fitted ridge model ``y_hat = x @ weights + intercept``.

  Attributes:
    weights: [d] for a single target, [d, T] for T targets.
    intercept: [] for a single target, [T] for T targets.
  """

  weights: jax.Array
  intercept: jax.Array


def _float_dtype(*arrays) -> jnp.dtype:
  dtype = jnp.result_type(*arrays)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  return dtype


def ridge_fit(x: jax.Array, y: jax.Array, alpha: float = 1.0) -> RidgeParams:
  """Fits ridge regression with an unpenalised intercept, eqs. (1)-(2).

  Args:
    x: [N, d] inputs.
    y: [N] or [N, T] targets; several targets share one factorisation.
    alpha: L2 penalty on the weights (not on the intercept); must be > 0 for
      the Cholesky solve to be defined when Xc^T Xc is singular.

  Returns:
    RidgeParams with weights [d] / [d, T] and intercept [] / [T], in the
    floating dtype of ``x`` and ``y`` combined.
  """
  dtype = _float_dtype(x, y)
  x = jnp.asarray(x, dtype)
  y = jnp.asarray(y, dtype)
  x_mean = jnp.mean(x, axis=0)
  y_mean = jnp.mean(y, axis=0)
  xc = x - x_mean
  yc = y - y_mean
  # Gram matrix of eq. (1); HIGHEST keeps accelerators from using reduced
  # precision matmuls (it is a no-op on CPU).
  gram = jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST)
  gram = gram + jnp.asarray(alpha, dtype) * jnp.eye(x.shape[-1], dtype=dtype)
  rhs = jnp.matmul(xc.T, yc, precision=jax.lax.Precision.HIGHEST)
  weights = cho_solve(cho_factor(gram, lower=True), rhs)
  intercept = y_mean - jnp.matmul(x_mean, weights, precision=jax.lax.Precision.HIGHEST)
  return RidgeParams(weights=weights, intercept=intercept)


def ridge_predict(params: RidgeParams, x: jax.Array) -> jax.Array:
  """Predictions of eq. (3): [M] for a single target, [M, T] for T targets."""
  dtype = _float_dtype(x, params.weights)
  x = jnp.asarray(x, dtype)
  return jnp.matmul(
    x, params.weights.astype(dtype), precision=jax.lax.Precision.HIGHEST
  ) + params.intercept.astype(dtype)
