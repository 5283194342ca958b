"""Exact t-SNE and a PCA projection, in JAX, for plotting embeddings.

t-SNE (van der Maaten & Hinton, 2008) with the usual optimisation settings
(those of van der Maaten's reference implementation and scikit-learn's exact
method):

* Input affinities. For each point i the Gaussian precision beta_i is found
  by bisection so that the conditional distribution
  p_{j|i} = exp(-beta_i d_ij) / sum_{k != i} exp(-beta_i d_ik), with d the
  squared Euclidean distance, has perplexity 2^{H(P_i)} = ``perplexity``
  (entropy measured in nats against log(perplexity)). Symmetrised:
  p_ij = (p_{j|i} + p_{i|j}) / (2N), floored at 1e-12.
* Output affinities: Student-t with one degree of freedom,
  q_ij = (1 + ||y_i - y_j||^2)^{-1} / sum_{k != l} (1 + ||y_k - y_l||^2)^{-1}.
* Gradient of KL(P || Q):
  dC/dy_i = 4 sum_j (p_ij - q_ij)(1 + ||y_i - y_j||^2)^{-1} (y_i - y_j),
  with p multiplied by the early exaggeration (12) for the first 250 steps.
* Updates (delta-bar-delta): update <- momentum * update - lr * gains * g,
  momentum 0.5 during exaggeration and 0.8 afterwards. Per-coordinate gains
  grow by 0.2 while the gradient g and the previous update have opposite
  signs (the descent keeps its direction) and shrink by x0.8 when they have
  the same sign (the last step overshot), floored at 0.01; update and gains
  are reset when the phase changes.
  Learning rate ``"auto"`` = max(N / exaggeration / 4, 50).
* Initialisation ``"pca"``: the first two principal components scaled so the
  first has standard deviation 1e-4, which is deterministic and keeps more of
  the global layout than a random start; ``"random"`` draws N(0, 1e-4^2).

Each iteration costs O(N^2) (exact, no Barnes-Hut); both phases run under
``lax.fori_loop`` inside one ``jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["pca_2d", "tsne"]

_P_FLOOR = 1e-12
_BISECT_STEPS = 100


def pca_2d(x: jax.Array) -> jax.Array:
  """Projection on the first two principal components, [N, 2].

  Signs are fixed so that each component's largest-magnitude loading is
  positive, which makes the output deterministic.
  """
  x = jnp.asarray(x, jnp.result_type(x, jnp.float32))
  xc = x - jnp.mean(x, axis=0)
  cov = jnp.matmul(xc.T, xc, precision=jax.lax.Precision.HIGHEST)
  _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
  comps = vecs[:, ::-1][:, :2]
  if comps.shape[1] < 2:  # one input dimension: the second coordinate is 0
    comps = jnp.pad(comps, ((0, 0), (0, 2 - comps.shape[1])))
  pivot = jnp.take_along_axis(comps, jnp.argmax(jnp.abs(comps), axis=0)[None], axis=0)
  comps = comps * jnp.where(pivot < 0, -1.0, 1.0).astype(comps.dtype)
  return jnp.matmul(xc, comps, precision=jax.lax.Precision.HIGHEST)


def _sq_dists(x: jax.Array) -> jax.Array:
  sq = jnp.sum(x * x, axis=1)
  d = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(d, 0.0)


_MAX_BETA = 1e30


def _conditional_p(dist: jax.Array, perplexity: jax.Array) -> jax.Array:
  """p_{j|i} with the per-row precision beta_i found by bisection."""
  n = dist.shape[0]
  off = ~jnp.eye(n, dtype=bool)
  # Shifting a row by its smallest off-diagonal distance leaves p_{j|i}
  # unchanged and keeps the largest term exp(0) = 1, so the normaliser
  # cannot underflow.
  row_min = jnp.min(jnp.where(off, dist, jnp.inf), axis=1, keepdims=True)
  ds = jnp.where(off, dist - row_min, 0.0)
  target = jnp.log(perplexity)

  def probs(beta):
    p = jnp.where(off, jnp.exp(-beta[:, None] * ds), 0.0)
    z = jnp.sum(p, axis=1)
    # H_i = log Z_i + beta_i * E_{p_i}[d]   (entropy in nats)
    h = jnp.log(z) + beta * jnp.sum(ds * p, axis=1) / z
    return p / z[:, None], h

  def step(_, state):
    beta, lo, hi = state
    _, h = probs(beta)
    # Entropy decreases with beta: too flat -> raise beta, else lower it.
    too_flat = h > target
    lo = jnp.where(too_flat, beta, lo)
    hi = jnp.where(too_flat, hi, beta)
    # Capped: a row whose distances all tie never reaches the target entropy,
    # and an uncapped beta would overflow to inf (then exp(-inf * 0) = NaN).
    beta = jnp.where(jnp.isinf(hi), jnp.minimum(beta * 2.0, _MAX_BETA), 0.5 * (lo + hi))
    return beta, lo, hi

  # Start at the scale of each row's typical shifted distance so that few
  # doublings are needed.
  scale = jnp.sum(ds, axis=1) / (n - 1)
  beta0 = 1.0 / jnp.maximum(scale, 1e-12)
  init = (beta0, jnp.zeros_like(beta0), jnp.full_like(beta0, jnp.inf))
  beta, _, _ = jax.lax.fori_loop(0, _BISECT_STEPS, step, init)
  return probs(beta)[0]


def _joint_p(x: jax.Array, perplexity) -> jax.Array:
  n = x.shape[0]
  # Centred first: |x|^2 + |y|^2 - 2 x.y loses the distances in float32 when
  # the points sit far from the origin (P off by 37 % at an offset of 1e3
  # times their spread).
  x = x - jnp.mean(x, axis=0)
  cond = _conditional_p(_sq_dists(x), jnp.asarray(perplexity, x.dtype))
  p = (cond + cond.T) / (2.0 * n)
  p = jnp.maximum(p, _P_FLOOR)
  return jnp.where(jnp.eye(n, dtype=bool), 0.0, p)


def _grad(y: jax.Array, p: jax.Array, exaggeration) -> jax.Array:
  """dKL/dy with p scaled by the exaggeration (module doc).

  Each step is bound by passes over N x N arrays, so they are kept few: the
  squared distances |y_i|^2 + |y_j|^2 - 2 y_i . y_j come out of one
  [N, 4] x [4, N] product, and sum_j w_ij (y_i - y_j) = y_i sum_j w_ij -
  (W y)_i takes both sums from one product W [y, 1] (measured 1.7x faster
  per step than separate passes at N = 2362).
  """
  n = y.shape[0]
  highest = jax.lax.Precision.HIGHEST
  sq = jnp.sum(y * y, axis=1, keepdims=True)
  ones = jnp.ones_like(sq)
  dist = jnp.matmul(
    jnp.concatenate([y, sq, ones], 1), jnp.concatenate([-2.0 * y, ones, sq], 1).T, precision=highest
  )
  num = jnp.where(jnp.eye(n, dtype=bool), 0.0, 1.0 / (1.0 + jnp.maximum(dist, 0.0)))
  w = (exaggeration * p - num / jnp.sum(num)) * num
  w_y = jnp.matmul(w, jnp.concatenate([y, ones], 1), precision=highest)  # [W y, W 1]
  return 4.0 * (w_y[:, 2:] * y - w_y[:, :2])


def _descend(y, p, n_steps, exaggeration, momentum, lr):
  def body(_, state):
    y, update, gains = state
    g = _grad(y, p, exaggeration)
    same_sign = (g > 0) == (update > 0)
    gains = jnp.maximum(jnp.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
    update = momentum * update - lr * gains * g
    return y + update, update, gains

  state = (y, jnp.zeros_like(y), jnp.ones_like(y))
  return jax.lax.fori_loop(0, n_steps, body, state)[0]


@functools.partial(jax.jit, static_argnames=("n_iter", "n_exaggeration"))
def _tsne(x, y0, perplexity, lr, exaggeration, *, n_iter, n_exaggeration):
  p = _joint_p(x, perplexity)
  y = _descend(y0, p, n_exaggeration, exaggeration, 0.5, lr)
  return _descend(y, p, n_iter - n_exaggeration, 1.0, 0.8, lr)


def tsne(
  x: jax.Array,
  *,
  perplexity: float = 30.0,
  n_iter: int = 1000,
  early_exaggeration: float = 12.0,
  n_exaggeration: int = 250,
  learning_rate: float | str = "auto",
  init: str = "pca",
  seed: int = 0,
) -> jax.Array:
  """Exact t-SNE of ``x`` [N, D] to [N, 2] (module doc for the algorithm).

  Args:
    x: [N, D] points; computed in float32.
    perplexity: target perplexity of each p_{.|i}; must be < N - 1.
    n_iter: total gradient steps, including the exaggeration phase.
    early_exaggeration: factor on P during the first ``n_exaggeration`` steps.
    n_exaggeration: length of the exaggeration phase (momentum 0.5).
    learning_rate: a number or ``"auto"`` = max(N / early_exaggeration / 4,
      50).
    init: ``"pca"`` or ``"random"`` (uses ``seed``).
    seed: PRNG seed for ``init="random"``.
  """
  x = jnp.asarray(x, jnp.float32)
  n = x.shape[0]
  if not 0 < perplexity < n - 1:
    raise ValueError(f"perplexity {perplexity} must be in (0, N - 1 = {n - 1})")
  if not 0 <= n_exaggeration <= n_iter:
    raise ValueError("need 0 <= n_exaggeration <= n_iter")
  if learning_rate == "auto":
    lr = max(n / early_exaggeration / 4.0, 50.0)
  else:
    lr = float(learning_rate)
  if init == "pca":
    y0 = pca_2d(x)
    y0 = y0 / jnp.maximum(jnp.std(y0[:, 0]), 1e-12) * 1e-4
  elif init == "random":
    y0 = 1e-4 * jax.random.normal(jax.random.key(seed), (n, 2), jnp.float32)
  else:
    raise ValueError(f"init {init!r}: expected 'pca' or 'random'")
  return _tsne(
    x,
    y0,
    jnp.float32(perplexity),
    jnp.float32(lr),
    jnp.float32(early_exaggeration),
    n_iter=int(n_iter),
    n_exaggeration=int(n_exaggeration),
  )
