"""CoRE's three losses as plain functions of arrays.

Each alignment loss comes in two forms with the same value:

* ``*_lowrank``: the form used in training. Every N x N or N_a x N matrix in
  the paper's equations is a product of N x d factors, so squared Frobenius
  norms of their differences reduce to traces of d x d Gram matrices,
  ``||A B^T - C D^T||^2 = <A^T A, B^T B> - 2 <A^T C, B^T D> + <C^T C, D^T D>``,
  at O(N d^2) time and O(N d + d^2) memory. Those Gram matrices all derive
  from each city's moments Z^T Z and Z^T 1 (`city_moments`), so training
  computes the moments once and calls ``*_from_moments``.
* ``*_direct``: the equations written out with the full matrices. It is the
  reference the tests compare against, and what the benchmark times.

and two variants (``form``):

* ``"paper"``: eqs. (5)-(12) of the CoRE paper as printed;
* ``"authors"``: the authors' released code, which differs: the LMA compares
  the anchors' cosine-distance matrices without the second unit-norm rescaling
  and averages over anchors (1/N_a rather than 1/N_a^2); the LIA's target is
  the in-city attention score Q K^T / sqrt(d) instead of Z Z^T and is averaged
  over rows (1/N rather than 1/N^2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxurban.graph import map_row_blocks, take_rows
from jaxurban.sharding import REGIONS, constrain_rows

FORMS = ("paper", "authors")
_EPS = 1e-12


def _check_form(form: str) -> None:
  if form not in FORMS:
    raise ValueError(f"loss form {form!r}: expected one of {FORMS}")


def _inner(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(a * b)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b in full float32 on every backend.

  The low-rank forms get a loss of order 1 as a difference of trace terms
  several hundred times larger (tr(G_x G_x) - 2 tr(G_x G_y) + tr(G_y G_y)),
  so a product rounded to TF32's 10-bit mantissa, the default for float32
  dots on recent NVIDIA GPUs, would cost percents of the loss and its
  gradient. Their products are d x d or N x d by d x d, cheap at any
  precision. On a CPU this is the ordinary product.
  """
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------
# Intra-city mobility loss, eqs. (3)-(4).
# --------------------------------------------------------------------------


LSE_IMPLEMENTATIONS = (None, "xla", "pallas", "pallas-interpret")


def row_logsumexp(
  queries: jax.Array,
  keys: jax.Array,
  row_chunk: int | None = None,
  mesh: Mesh | None = None,
  implementation: str | None = None,
) -> jax.Array:
  """log sum_k exp(q_i . k_k) for every query row, [N_q].

  Implementations:

  * ``"xla"``: jax.numpy. With `row_chunk`, the rows are processed in
    blocks of that many under ``lax.map`` with rematerialisation, so neither
    the forward nor the backward pass holds more than a [row_chunk, N] block
    of logits: memory O(N) for a fixed chunk instead of O(N_q N).
  * ``"pallas"``: the fused kernel `kernels.row_lse` (GPU), which never holds
    more than a tile of logits; ``"pallas-interpret"`` runs it in Pallas
    interpret mode on any backend (slow; for checks).
  * None: ``"pallas"`` on a GPU for the kernel's dtypes (float32, bfloat16,
    float16) and widths up to `kernels.row_lse.AUTO_MAX_DIM`, the kernel
    module's own automatic choice; ``"xla"`` elsewhere.

  With a `mesh`, the query rows (a multiple of its size) are split over its
  devices (`jaxurban.sharding.REGIONS`) and the keys are all-gathered.
  """
  if implementation not in LSE_IMPLEMENTATIONS:
    raise ValueError(
      f"row_logsumexp: implementation {implementation!r} not in {LSE_IMPLEMENTATIONS}"
    )
  if implementation is None:
    from kernels.row_lse import AUTO_MAX_DIM, PALLAS_DTYPES

    # The kernel's fixed tiles are sized for widths up to AUTO_MAX_DIM; a
    # wider embedding (CoreConfig.features) stays on XLA, as the kernel
    # module's own automatic choice keeps it on its reference.
    on_gpu = jax.default_backend() == "gpu"
    fits = queries.dtype in PALLAS_DTYPES and queries.shape[-1] <= AUTO_MAX_DIM
    implementation = "pallas" if on_gpu and fits else "xla"
  if implementation != "xla":
    from kernels import row_lse

    kernel = functools.partial(
      row_lse.row_logsumexp,
      implementation="pallas",
      interpret=implementation == "pallas-interpret",
    )
    if mesh is None:
      return kernel(queries, keys)
    # The kernel sees its device's rows and every key; the keys' cotangent is
    # summed over devices by shard_map's transpose.
    return jax.shard_map(
      kernel,
      mesh=mesh,
      in_specs=(PartitionSpec(REGIONS), PartitionSpec()),
      out_specs=PartitionSpec(REGIONS),
      check_vma=False,
    )(queries, keys)
  n_rows = queries.shape[0]
  if row_chunk is None or row_chunk >= n_rows:
    return jax.nn.logsumexp(constrain_rows(queries, mesh) @ keys.T, axis=-1)
  n_blocks = -(-n_rows // row_chunk)
  padded = jnp.pad(queries, ((0, n_blocks * row_chunk - n_rows), (0, 0)))
  padded = constrain_rows(padded.reshape(n_blocks, row_chunk, -1), mesh, axis=1)
  block_lse = jax.checkpoint(lambda block: jax.nn.logsumexp(block @ keys.T, axis=-1))
  lse = jax.lax.map(block_lse, padded)
  return lse.reshape(-1)[:n_rows]


def mobility_loss(
  z: jax.Array,
  origin_rows: jax.Array,
  row_weight: jax.Array,
  edge_origin: jax.Array,
  edge_destination: jax.Array,
  edge_target: jax.Array,
  row_chunk: int | None = None,
  mesh: Mesh | None = None,
  lse_implementation: str | None = None,
  edge_chunk: int | None = None,
) -> jax.Array:
  """-sum_ij T_ij log p(j | i), p(j | i) = softmax_j(z_i . z_j) over all N.

  With T sparse (its non-zeros on the mobility edges) the loss is
  ``sum_i r_i LSE_i - sum_e t_e z_o(e) . z_d(e)``, r_i = sum_j T_ij, so only
  the row normalisers LSE_i need all N regions (see `row_logsumexp`).

  Args:
    z: [N, d] region embeddings.
    origin_rows: [N_o] regions with outgoing mobility (r_i > 0).
    row_weight: [N_o] their r_i.
    edge_origin, edge_destination: [E] the non-zeros of T.
    edge_target: [E] their values T_ij (summing to 1), so the loss is the
      trip-averaged negative log-likelihood of eq. (4).
    row_chunk: rows of logits held at once (None: all).
    mesh: split the rows and edges over this mesh's devices (their counts
      must be multiples of its size: `jaxurban.graph.pad_target_rows`).
    lse_implementation: how the row normalisers are computed (see
      `row_logsumexp`).
    edge_chunk: edges whose [edges, d] embeddings are gathered at once
      (None: all); with a mesh, a multiple of its size, each block's edges
      split over its devices.
  """
  lse = row_logsumexp(take_rows(z, origin_rows), z, row_chunk, mesh, lse_implementation)
  if edge_chunk is None or edge_chunk >= edge_target.shape[0]:
    pair_logits = jnp.sum(
      constrain_rows(take_rows(z, edge_origin), mesh)
      * constrain_rows(take_rows(z, edge_destination), mesh),
      axis=-1,
    )
    pair_term = jnp.dot(edge_target, pair_logits)
  else:
    pair_term = _pair_term_in_blocks(
      z, edge_origin, edge_destination, edge_target, edge_chunk, mesh
    )
  return jnp.dot(row_weight, lse) - pair_term


def _pair_term_in_blocks(z, edge_origin, edge_destination, edge_target, edge_chunk, mesh):
  """sum_e t_e z_o(e) . z_d(e), the edges taken in blocks.

  Each block's two [edge_chunk, d] gathers are recomputed in the backward
  pass (`jax.checkpoint`), so the pass holds O(edge_chunk d) of them instead
  of four [E, d] arrays (the gathers and their cotangents): 18 GB for a
  city of 10^6 regions and 8.6 * 10^6 edges at d = 128. With a mesh each
  block's edges are split over its devices, so a device holds
  O(edge_chunk d / devices).
  """
  if mesh is not None and edge_chunk % mesh.devices.size:
    raise ValueError(
      f"edge_chunk {edge_chunk} is not a multiple of the mesh's {mesh.devices.size} devices"
    )

  def weighted_pair_logits(part):
    origin, destination, target = part
    ends = constrain_rows(take_rows(z, origin), mesh) * constrain_rows(
      take_rows(z, destination), mesh
    )
    return target * jnp.sum(ends, axis=-1)

  edges = (edge_origin, edge_destination, edge_target)
  return jnp.sum(map_row_blocks(weighted_pair_logits, edges, edge_chunk, mesh))


def mobility_loss_direct(z: jax.Array, target: jax.Array) -> jax.Array:
  """Reference: the full [N, N] target and softmax."""
  return -jnp.sum(target * jax.nn.log_softmax(z @ z.T, axis=-1))


# --------------------------------------------------------------------------
# City moments: everything the alignment losses need from a city.
# --------------------------------------------------------------------------


class CityMoments(NamedTuple):
  """Second and first moments of a city's embeddings Z ([N, d]).

  Both alignment losses depend on a city only through these: the anchor
  Gram matrix of eq. (8) through S = Z^T Z, and every Gram matrix of
  Q = Z W^q + 1 b^q and K = Z W^k + 1 b^k in eq. (12) through S, s = Z^T 1
  and N. One [d, N] x [N, d] product per city then replaces the ten or so
  that forming Q, K and their products would take, and the backward pass
  into Z is the single product Z (dS + dS^T) + 1 ds^T.
  """

  gram: jax.Array  # S = Z^T Z, [d, d]
  total: jax.Array  # s = Z^T 1, [d]
  count: jax.Array  # N, a scalar in Z's dtype


def city_moments(z: jax.Array) -> CityMoments:
  return CityMoments(_mm(z.T, z), jnp.sum(z, axis=0), jnp.asarray(z.shape[0], z.dtype))


def _affine_cross(moments: CityMoments, a, a_bias, b, b_bias) -> jax.Array:
  """(Z A + 1 a^T)^T (Z B + 1 b^T) from the moments, [d, d].

  ``A^T S B + (A^T s) b^T + a (s^T B) + N a b^T``; None stands for the
  identity matrix (A = I) or a zero bias.
  """
  s_b = moments.gram if b is None else _mm(moments.gram, b)
  out = s_b if a is None else _mm(a.T, s_b)
  left_total = moments.total if a is None else _mm(moments.total, a)
  right_total = moments.total if b is None else _mm(moments.total, b)
  if b_bias is not None:
    out = out + jnp.outer(left_total, b_bias)
  if a_bias is not None:
    out = out + jnp.outer(a_bias, right_total)
  if a_bias is not None and b_bias is not None:
    out = out + moments.count * jnp.outer(a_bias, b_bias)
  return out


# --------------------------------------------------------------------------
# Latent manifold alignment, eqs. (5)-(9).
# --------------------------------------------------------------------------


def _anchor_factors(anchors: jax.Array, gram: jax.Array) -> jax.Array:
  """Anchors scaled so that U S U^T is the unit-row-norm Gram of eq. (8).

  A_rel = A Z^T has row norms sqrt(a_i S a_i^T) with S = Z^T Z, so rescaling
  the rows of A_rel to unit norm (eq. 7) is rescaling the rows of A.
  """
  row_norm_sq = jnp.sum(_mm(anchors, gram) * anchors, axis=-1)
  return anchors * jax.lax.rsqrt(jnp.maximum(row_norm_sq, _EPS))[:, None]


def lma_from_moments(
  moments_x: CityMoments, moments_y: CityMoments, anchors: jax.Array, form: str = "authors"
) -> jax.Array:
  """Latent manifold alignment loss from the cities' moments, O(N_a d^2).

  With U = rescaled anchors and S = Z^T Z per city, the anchor Gram matrix of
  eq. (8) is G = U S U^T (N_a x N_a), which is never formed.
  """
  _check_form(form)
  s_x, s_y = moments_x.gram, moments_y.gram
  u_x, u_y = _anchor_factors(anchors, s_x), _anchor_factors(anchors, s_y)
  c_xx, c_yy, c_xy = _mm(u_x.T, u_x), _mm(u_y.T, u_y), _mm(u_x.T, u_y)
  n_anchors = anchors.shape[0]
  if form == "authors":
    # ||G_x - G_y||^2 = tr(G_x G_x) - 2 tr(G_x G_y) + tr(G_y G_y), with
    # tr(U_x S_x U_x^T U_y S_y U_y^T) = <S_x C_xy, C_xy S_y>.
    squared = (
      _inner(_mm(s_x, c_xx), _mm(c_xx, s_x))
      - 2 * _inner(_mm(s_x, c_xy), _mm(c_xy, s_y))
      + _inner(_mm(s_y, c_yy), _mm(c_yy, s_y))
    )
    return squared / n_anchors
  # Paper: the rows of G are rescaled to unit norm again (after eq. 8), so
  # ||G^_x - G^_y||^2 = sum_i 2 - 2 <g_x,i, g_y,i> / (|g_x,i| |g_y,i|), and
  # <g_x,i, g_y,i> = u_x,i S_x C_xy S_y u_y,i^T is a row-wise quadratic form.
  norm_x = jnp.sum(_mm(u_x, _mm(_mm(s_x, c_xx), s_x)) * u_x, axis=-1)
  norm_y = jnp.sum(_mm(u_y, _mm(_mm(s_y, c_yy), s_y)) * u_y, axis=-1)
  cross = jnp.sum(_mm(u_x, _mm(_mm(s_x, c_xy), s_y)) * u_y, axis=-1)
  cosine = cross * jax.lax.rsqrt(jnp.maximum(norm_x * norm_y, _EPS))
  return jnp.sum(2.0 - 2.0 * cosine) / n_anchors**2


def lma_lowrank(
  z_x: jax.Array, z_y: jax.Array, anchors: jax.Array, form: str = "authors"
) -> jax.Array:
  """Latent manifold alignment loss in O((N + N_a) d^2) (`lma_from_moments`)."""
  return lma_from_moments(city_moments(z_x), city_moments(z_y), anchors, form)


def _unit_rows(m: jax.Array) -> jax.Array:
  return m * jax.lax.rsqrt(jnp.maximum(jnp.sum(m * m, -1, keepdims=True), _EPS))


def lma_direct(
  z_x: jax.Array, z_y: jax.Array, anchors: jax.Array, form: str = "authors"
) -> jax.Array:
  """Reference: eqs. (7)-(9) with the [N_a, N] and [N_a, N_a] matrices."""
  _check_form(form)
  rel_x, rel_y = _unit_rows(anchors @ z_x.T), _unit_rows(anchors @ z_y.T)  # eq. 7
  gram_x, gram_y = rel_x @ rel_x.T, rel_y @ rel_y.T  # eq. 8
  n_anchors = anchors.shape[0]
  if form == "authors":
    # The authors' cosine distances 1 - G differ by the same constant in both.
    return jnp.sum(((1 - gram_x) - (1 - gram_y)) ** 2) / n_anchors
  return jnp.sum((_unit_rows(gram_x) - _unit_rows(gram_y)) ** 2) / n_anchors**2  # eq. 9


# --------------------------------------------------------------------------
# Latent individual alignment, eqs. (10)-(12).
# --------------------------------------------------------------------------


def _query_key(z, w_q, b_q, w_k, b_k):
  """Q = Z W^q + b^q and K = Z W^k + b^k of eq. (11)."""
  return z @ w_q + b_q, z @ w_k + b_k


def _cycle_residual_sq(
  here: CityMoments, there: CityMoments, w_q, b_q, w_k, b_k, form: str
) -> jax.Array:
  """||T_l T_r^T - Q_here M K_here^T||^2 of eq. (12) in O(d^3).

  The cycle X -> Y -> X is Attn^{XY} Attn^{YX} = Q^X (K^{Y T} Q^Y / d) K^{X T},
  a rank-d product Q^X M K^{X T}. The target is Z Z^T (paper) or
  Q K^T / sqrt(d) (authors), so with ||A B^T - C D^T||^2 =
  <A^T A, B^T B> - 2 <A^T C, B^T D> + <C^T C, D^T D> every term is a product
  of d x d Gram matrices of Z, Q and K, each one `_affine_cross` of the
  city's moments.
  """
  d = w_q.shape[-1]
  m = _affine_cross(there, w_k, b_k, w_q, b_q) / d  # K_there^T Q_there / d
  qq = _affine_cross(here, w_q, b_q, w_q, b_q)  # Q^T Q
  kk = _affine_cross(here, w_k, b_k, w_k, b_k)  # K^T K
  cycle = _inner(_mm(_mm(m.T, qq), m), kk)  # <(QM)^T (QM), K^T K>
  if form == "paper":
    zq = _affine_cross(here, None, None, w_q, b_q)  # Z^T Q
    zk = _affine_cross(here, None, None, w_k, b_k)  # Z^T K
    return _inner(here.gram, here.gram) - 2 * _inner(_mm(zq, m), zk) + cycle
  return _inner(qq, kk) / d - 2 * _inner(_mm(qq, m), kk) / jnp.sqrt(d) + cycle


def lia_from_moments(
  moments_x: CityMoments,
  moments_y: CityMoments,
  w_q: jax.Array,
  b_q: jax.Array,
  w_k: jax.Array,
  b_k: jax.Array,
  form: str = "authors",
) -> jax.Array:
  """Latent individual alignment loss (eqs. 10-12) from the cities' moments."""
  _check_form(form)
  weights = (w_q, b_q, w_k, b_k)
  res_x = _cycle_residual_sq(moments_x, moments_y, *weights, form)
  res_y = _cycle_residual_sq(moments_y, moments_x, *weights, form)
  power = 2 if form == "paper" else 1
  return res_x / moments_x.count**power + res_y / moments_y.count**power


def lia_lowrank(
  z_x: jax.Array,
  z_y: jax.Array,
  w_q: jax.Array,
  b_q: jax.Array,
  w_k: jax.Array,
  b_k: jax.Array,
  form: str = "authors",
) -> jax.Array:
  """Latent individual alignment loss in O(N d^2) (`lia_from_moments`)."""
  return lia_from_moments(city_moments(z_x), city_moments(z_y), w_q, b_q, w_k, b_k, form)


def lia_direct(
  z_x: jax.Array,
  z_y: jax.Array,
  w_q: jax.Array,
  b_q: jax.Array,
  w_k: jax.Array,
  b_k: jax.Array,
  form: str = "authors",
) -> jax.Array:
  """Reference: eqs. (10)-(12) with the N x N matrices."""
  _check_form(form)
  d = w_q.shape[-1]
  (q_x, k_x), (q_y, k_y) = _query_key(z_x, w_q, b_q, w_k, b_k), _query_key(z_y, w_q, b_q, w_k, b_k)
  attn_xy = q_x @ k_y.T / jnp.sqrt(d)
  attn_yx = q_y @ k_x.T / jnp.sqrt(d)
  if form == "paper":
    cor_x, cor_y = z_x @ z_x.T, z_y @ z_y.T
    power = 2
  else:
    cor_x, cor_y = q_x @ k_x.T / jnp.sqrt(d), q_y @ k_y.T / jnp.sqrt(d)
    power = 1
  return (
    jnp.sum((cor_x - attn_xy @ attn_yx) ** 2) / z_x.shape[0] ** power
    + jnp.sum((cor_y - attn_yx @ attn_xy) ** 2) / z_y.shape[0] ** power
  )
