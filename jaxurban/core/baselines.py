"""Two-stage translation baselines: rank-based anchoring + a linear map.

These are the RP and RA baselines of the CoRE paper (appendix A.2), after
Yabe et al. (2020, "Unsupervised translation via hierarchical anchoring").
Each city's embeddings Z^X [N_X, d] and Z^Y [N_Y, d] are trained without
the alignment losses (the Individual variant: the two encoders share only
the model's one PReLU slope, as CoRE's do); a map T is then fitted on
anchor pairs so that T(Z^Y) lives in X's space, and the task predictor
trained on Z^X is applied to T(Z^Y).

What is done here, exactly:

1. Ranking statistic. Regions are ranked within each city by a scalar
   statistic, largest first. Yabe et al. rank by check-in counts, which these
   data do not have; we pass the total mobility volume of each region
   (:func:`mobility_volume`: the sum of the weights of its outgoing and
   incoming edges).
2. Rank anchoring (:func:`rank_anchors`). With n = n_anchor pairs
   (default min(N_X, N_Y)), pair k (k = 0..n-1) takes in each city the region
   at rank floor((k + 1/2) / n * N_c) of that city's order, i.e. regions at
   equal rank quantiles. When n = min(N_X, N_Y) every region of the smaller
   city is used once and the larger city is sampled evenly along its ranking,
   so cities of different sizes are paired by relative rank. Ties are broken
   by region index (stable sort). Regions a mask marks as unranked are left
   out first (``ranked_x``/``ranked_y``): the RP baseline leaves out the
   regions with no mobility at all, a third of XA's and CD's, whose volumes
   all tie at 0; ranked among themselves by index, they made a third of the
   anchor pairs depend on the order of the files, and the scores with them.
3. The map, fitted on the anchor matrices A_X, A_Y [n, d]:

   * Procrustes (RP, :func:`procrustes_fit`): the orthogonal R minimising
     ||A_Y R - A_X||_F is R = U V^T for the SVD U S V^T = A_Y^T A_X
     (Schoenemann, 1966). By default both anchor sets are centred first
     (``center=True``), so T(z) = (z - mean(A_Y)) R + mean(A_X): two
     independently trained spaces differ by an offset as well as a rotation,
     and a rotation about the origin cannot remove an offset, while the
     source predictor's intercept only absorbs the source city's own mean.
     ``center=False`` gives the pure rotation T(z) = z R.
   * Affine (RA, :func:`affine_fit`): least squares
     min_{W, b} ||A_Y W + 1 b^T - A_X||_F (minimum-norm solution when
     n < d + 1).

Differences from Yabe et al. (2020): only their rank-based anchoring is
implemented (no hierarchical stochastic or batch anchoring, hence no HSP,
HSA, HBP, HBA); the ranking is by mobility volume, not check-ins; the
quantile pairing for unequal city sizes and the centring in Procrustes are
choices of this implementation, stated above.

The maps are pure jnp and jit-compatible (``center`` and ``method`` are
static); the anchor choice is too, unless a mask of ranked regions is given,
which must then be concrete (its count sets the shapes).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "LinearMap",
  "METHODS",
  "affine_align",
  "affine_fit",
  "align_into",
  "apply_map",
  "mobility_volume",
  "procrustes_align",
  "procrustes_fit",
  "rank_anchors",
  "translate_both_ways",
]

METHODS = ("procrustes", "affine")
_HIGHEST = jax.lax.Precision.HIGHEST


class LinearMap(NamedTuple):
  """T(z) = z @ matrix + bias, mapping [.., d_in] to [.., d_out]."""

  matrix: jax.Array
  bias: jax.Array


def apply_map(m: LinearMap, z: jax.Array) -> jax.Array:
  return jnp.matmul(z, m.matrix, precision=_HIGHEST) + m.bias


def mobility_volume(
  origin: jax.Array, destination: jax.Array, weight: jax.Array, n_regions: int
) -> jax.Array:
  """Total mobility volume per region: out-weight + in-weight.

  v_r = sum_{e: origin_e = r} w_e + sum_{e: destination_e = r} w_e, so a
  self-loop (r, r) counts twice, once leaving and once arriving.

  Args:
    origin, destination: [E] integer region indices in [0, n_regions).
    weight: [E] edge weights (trip counts or, for the CoRE ``.mob`` files,
      row-normalised transition frequencies; with those every origin's
      out-weight is 1, so the volume is 1 + its summed in-shares).
    n_regions: number of regions (static).

  Returns:
    [n_regions] volumes; regions without edges get 0.
  """
  weight = jnp.asarray(weight)
  out_w = jax.ops.segment_sum(weight, jnp.asarray(origin), num_segments=n_regions)
  in_w = jax.ops.segment_sum(weight, jnp.asarray(destination), num_segments=n_regions)
  return out_w + in_w


def _quantile_positions(n_anchor: int, n: int) -> jax.Array:
  """Rank positions floor((k + 1/2) n / n_anchor), k < n_anchor, in integers.

  Exact integer arithmetic: (2k + 1) n // (2 n_anchor).
  """
  k = jnp.arange(n_anchor)
  return ((2 * k + 1) * n) // (2 * n_anchor)


def rank_anchors(
  stat_x: jax.Array,
  stat_y: jax.Array,
  n_anchor: int | None = None,
  ranked_x=None,
  ranked_y=None,
) -> tuple[jax.Array, jax.Array]:
  """Indices of quantile-matched anchor pairs (step 2 of the module doc).

  Args:
    stat_x: [N_X] ranking statistic of city X (larger = higher rank).
    stat_y: [N_Y] same for city Y.
    n_anchor: number of pairs, at most the smaller number of ranked regions;
      default that number.
    ranked_x, ranked_y: optional boolean [N] masks (concrete, not traced) of
      the regions the statistic ranks; the others are never anchors. Default:
      every region.

  Returns:
    (idx_x, idx_y), each [n_anchor]: region idx_x[k] of X is paired with
    region idx_y[k] of Y; pairs are in decreasing rank order.
  """
  n_x = stat_x.shape[0] if ranked_x is None else int(np.count_nonzero(ranked_x))
  n_y = stat_y.shape[0] if ranked_y is None else int(np.count_nonzero(ranked_y))
  n = min(n_x, n_y) if n_anchor is None else n_anchor
  if not 1 <= n <= min(n_x, n_y):
    raise ValueError(
      f"n_anchor={n} must be in [1, {min(n_x, n_y)}], the smaller number of ranked regions "
      f"(X {n_x}, Y {n_y})"
    )
  # Unranked regions sort last, after every ranked one.
  if ranked_x is not None:
    stat_x = jnp.where(jnp.asarray(ranked_x), stat_x, -jnp.inf)
  if ranked_y is not None:
    stat_y = jnp.where(jnp.asarray(ranked_y), stat_y, -jnp.inf)
  return _rank_anchors(jnp.asarray(stat_x), jnp.asarray(stat_y), n, n_x, n_y)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _rank_anchors(stat_x, stat_y, n_anchor: int, n_ranked_x: int, n_ranked_y: int):
  order_x = jnp.argsort(stat_x, stable=True, descending=True)
  order_y = jnp.argsort(stat_y, stable=True, descending=True)
  return (
    order_x[_quantile_positions(n_anchor, n_ranked_x)],
    order_y[_quantile_positions(n_anchor, n_ranked_y)],
  )


@functools.partial(jax.jit, static_argnames=("center",))
def procrustes_fit(a_mov: jax.Array, a_ref: jax.Array, center: bool = True) -> LinearMap:
  """Orthogonal Procrustes map sending anchors ``a_mov`` onto ``a_ref``.

  R = argmin_{R^T R = I} ||A_mov R - A_ref||_F = U V^T with
  U S V^T = A_mov^T A_ref; with ``center`` the anchors are centred first and
  the map is T(z) = (z - mean(A_mov)) R + mean(A_ref).

  Args:
    a_mov, a_ref: [n, d] paired anchors (row k of each is one pair).
    center: centre both anchor sets before solving (see module doc).
  """
  if center:
    mu_mov = jnp.mean(a_mov, axis=0)
    mu_ref = jnp.mean(a_ref, axis=0)
  else:
    mu_mov = jnp.zeros(a_mov.shape[-1], a_mov.dtype)
    mu_ref = jnp.zeros(a_ref.shape[-1], a_ref.dtype)
  cross = jnp.matmul((a_mov - mu_mov).T, a_ref - mu_ref, precision=_HIGHEST)
  u, _, vt = jnp.linalg.svd(cross, full_matrices=False)
  rot = jnp.matmul(u, vt, precision=_HIGHEST)
  return LinearMap(matrix=rot, bias=mu_ref - jnp.matmul(mu_mov, rot, precision=_HIGHEST))


@jax.jit
def affine_fit(a_mov: jax.Array, a_ref: jax.Array) -> LinearMap:
  """Least-squares affine map: min_{W, b} ||A_mov W + 1 b^T - A_ref||_F.

  Solved as min ||[A_mov - mean(A_mov)] W - [A_ref - mean(A_ref)]||_F by
  ``lstsq`` (SVD, minimum-norm W when the anchors do not span the space),
  then b = mean(A_ref) - mean(A_mov) W; centring removes the constant
  column, which is what makes the intercept unpenalised and the system
  better conditioned.
  """
  mu_mov = jnp.mean(a_mov, axis=0)
  mu_ref = jnp.mean(a_ref, axis=0)
  w, *_ = jnp.linalg.lstsq(a_mov - mu_mov, a_ref - mu_ref)
  return LinearMap(matrix=w, bias=mu_ref - jnp.matmul(mu_mov, w, precision=_HIGHEST))


def align_into(
  z_ref: jax.Array,
  z_mov: jax.Array,
  stat_ref: jax.Array,
  stat_mov: jax.Array,
  *,
  method: str = "procrustes",
  n_anchor: int | None = None,
  center: bool = True,
  ranked_ref=None,
  ranked_mov=None,
) -> jax.Array:
  """Maps ``z_mov`` into the space of ``z_ref`` by rank anchoring + ``method``.

  Args:
    z_ref: [N_ref, d] embeddings of the city whose space is kept.
    z_mov: [N_mov, d] embeddings of the city to translate.
    stat_ref, stat_mov: per-region ranking statistics of the two cities.
    method: ``"procrustes"`` (RP) or ``"affine"`` (RA).
    n_anchor: number of anchor pairs (default: the smaller number of ranked
      regions).
    center: Procrustes only, see :func:`procrustes_fit`.
    ranked_ref, ranked_mov: optional masks of the ranked regions, see
      :func:`rank_anchors`.

  Returns:
    [N_mov, d]: T(z_mov) in z_ref's space.
  """
  if method not in METHODS:
    raise ValueError(f"method {method!r}: expected one of {METHODS}")
  idx_ref, idx_mov = rank_anchors(stat_ref, stat_mov, n_anchor, ranked_ref, ranked_mov)
  return _fit_and_apply(z_ref, z_mov, idx_ref, idx_mov, method=method, center=center)


@functools.partial(jax.jit, static_argnames=("method", "center"))
def _fit_and_apply(z_ref, z_mov, idx_ref, idx_mov, *, method: str, center: bool) -> jax.Array:
  a_ref, a_mov = z_ref[idx_ref], z_mov[idx_mov]
  if method == "procrustes":
    m = procrustes_fit(a_mov, a_ref, center=center)
  else:
    m = affine_fit(a_mov, a_ref)
  return apply_map(m, z_mov)


def procrustes_align(
  z_x: jax.Array,
  z_y: jax.Array,
  stat_x: jax.Array,
  stat_y: jax.Array,
  *,
  n_anchor: int | None = None,
  center: bool = True,
) -> jax.Array:
  """RP: Z^Y mapped into X's space, T(Z^Y) [N_Y, d].

  For the other direction swap the cities:
  ``procrustes_align(z_y, z_x, stat_y, stat_x)`` is Z^X in Y's space.
  """
  return align_into(z_x, z_y, stat_x, stat_y, method="procrustes", n_anchor=n_anchor, center=center)


def affine_align(
  z_x: jax.Array,
  z_y: jax.Array,
  stat_x: jax.Array,
  stat_y: jax.Array,
  *,
  n_anchor: int | None = None,
) -> jax.Array:
  """RA: Z^Y mapped into X's space by a least-squares affine map, [N_Y, d]."""
  return align_into(z_x, z_y, stat_x, stat_y, method="affine", n_anchor=n_anchor)


def translate_both_ways(
  z_x: jax.Array,
  z_y: jax.Array,
  stat_x: jax.Array,
  stat_y: jax.Array,
  *,
  method: str = "procrustes",
  n_anchor: int | None = None,
  center: bool = True,
  ranked_x=None,
  ranked_y=None,
) -> tuple[jax.Array, jax.Array]:
  """Inputs for both directions of the cross-city protocol.

  Direction X→Y trains the predictor on Z^X and applies it to T_{Y→X}(Z^Y);
  direction Y→X trains on Z^Y and applies it to T_{X→Y}(Z^X). Each map is
  fitted separately, in the space of the direction's source city.

  Returns:
    (z_y_in_x, z_x_in_y), ready for
    ``evaluate_pair(z_x, z_y, ..., emb_y_in_x=z_y_in_x, emb_x_in_y=z_x_in_y)``.
  """
  kw = dict(method=method, n_anchor=n_anchor, center=center)
  return (
    align_into(z_x, z_y, stat_x, stat_y, ranked_ref=ranked_x, ranked_mov=ranked_y, **kw),
    align_into(z_y, z_x, stat_y, stat_x, ranked_ref=ranked_y, ranked_mov=ranked_x, **kw),
  )
