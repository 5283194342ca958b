"""Spatially biased flash attention: softmax(Q Kᵀ/√D + B) V with B built in-kernel.

Eq. (1) of the ToPT paper adds a spatial bias ``B_ij`` to the attention
logits of its Graphormer-style fusion layer. Materialising ``B`` costs
``H·N²`` memory, which is what limits the number of regions a layer can
attend over. Here the bias is recomputed tile by tile from per-node inputs,
so neither the forward nor the backward pass stores anything of size N²::

    d_ij   = ||coords_q[i] - coords_k[j]||_2
    B^h_ij = Σ_r rbf_weight[h, r] · φ_r(d_ij) + row_bias[h, i] + col_bias[h, j]
    φ_r(d) = exp(-((d - rbf_centres[r]) / rbf_width[r])²)

The Gaussian distance adjacency of the paper, ``λ·exp(-(d/σ)²)``, is the case
``R = 1``, centre 0, width σ, weight λ; the row/column terms carry a per-node
centrality prior.

Three things live here:

* :func:`spatial_bias_reference` and :func:`biased_attention_reference`:
  the definition in plain ``jax.numpy`` (materialises the bias; the CPU path
  and the test oracle).
* A Pallas implementation (``pl.pallas_call``, lowered through Triton on the
  GPU) following FlashAttention-2: the forward keeps a running max and sum per
  query row while it walks over key blocks and saves the row log-sum-exp as
  its two parts, the row maximum and the log of the row sum; the backward
  recomputes P from them, once over query blocks for dQ and the
  row-bias gradient and once over key blocks for dK, dV, the column-bias
  gradient and the RBF-weight gradient.
* :func:`biased_attention`, the public entry point, and :func:`main`, a
  benchmark (``python -m kernels.biased_attention``).

Gradients flow to ``q, k, v, rbf_weight, row_bias, col_bias``. Coordinates,
RBF centres and RBF widths are treated as constants: their cotangent is zero
in both implementations.

With float16 inputs the backward casts dS = P∘(dP − δ) to float16 before its
tile products with K and Q, as FlashAttention does; where |dS| exceeds
float16's 65504 (very large value or cotangent entries) dQ or dK becomes inf
while the reference, which differentiates in float32 throughout, stays
finite. bfloat16, with float32's exponent range, does not have this limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import peaks
from kernels.timing import count_at_least, median_seconds

__all__ = [
  "BlockSizes",
  "biased_attention",
  "biased_attention_reference",
  "main",
  "resolve_implementation",
  "spatial_bias_reference",
]

IMPLEMENTATIONS = ("pallas", "reference")

# Finite stand-in for -inf on masked logits: keeps `m_new - m_old` free of
# `inf - inf` in the online softmax. Masked probabilities are additionally
# zeroed with a `where`, so this value never leaks into a result.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Finite row/column biases are raised to at least this before the kernels
# scale them by log2(e): JAX's usual additive mask, `finfo(float32).min`,
# would otherwise overflow to -inf there or fall below `_MASK_VALUE`, and a
# row whose keys all carry it would come out as zeros, where the reference
# gives the softmax of the remaining (equal) logits. Any bias this low already
# contributes exp(-1e37) = 0 against any key without it; -inf stays -inf.
_BIAS_FLOOR = -1e37

# Triton tile dots need every dimension ≥ 16.
_MIN_BLOCK = 16

# The kernels carry logits in base 2: every logit term is pre-multiplied by
# log2(e), so each exponential is one exp2 (the hardware instruction) rather
# than exp's extra multiply, as in FlashAttention-2's Triton kernels.
# exp(-t²) = exp2(-(t·√log2 e)²), so the RBF widths take a √log2 e factor.
_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------
# Reference (the definition)
# --------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
  # At least float32; float64 stays float64 (the tests' oracle).
  return jnp.promote_types(dtype, jnp.float32)


def spatial_bias_reference(
  coords_q,
  coords_k,
  rbf_weight,
  rbf_centres,
  rbf_width,
  row_bias=None,
  col_bias=None,
) -> jax.Array:
  """The spatial bias ``B`` of eq. (1) of the ToPT paper, materialised.

  Args:
    coords_q: [Nq, C] query-node coordinates.
    coords_k: [Nk, C] key-node coordinates.
    rbf_weight: [H, R] per-head weight of each radial basis function.
    rbf_centres: [R] RBF centres (distance units).
    rbf_width: [R] RBF widths, positive.
    row_bias: optional [H, Nq] per-query-node term.
    col_bias: optional [H, Nk] per-key-node term.

  Returns:
    [H, Nq, Nk] bias in at least float32. Coordinates, centres and widths are
    constants (``stop_gradient``), as in the Pallas implementation.
  """
  dtype = _compute_dtype(jnp.result_type(rbf_weight, coords_q))
  coords_q = lax.stop_gradient(jnp.asarray(coords_q, dtype))
  coords_k = lax.stop_gradient(jnp.asarray(coords_k, dtype))
  centres = lax.stop_gradient(jnp.asarray(rbf_centres, dtype))
  width = lax.stop_gradient(jnp.asarray(rbf_width, dtype))
  diff = coords_q[:, None, :] - coords_k[None, :, :]
  dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # [Nq, Nk]
  phi = jnp.exp(-jnp.square((dist[None] - centres[:, None, None]) / width[:, None, None]))
  bias = jnp.einsum("hr,rij->hij", jnp.asarray(rbf_weight, dtype), phi)
  if row_bias is not None:
    bias = bias + jnp.asarray(row_bias, dtype)[:, :, None]
  if col_bias is not None:
    bias = bias + jnp.asarray(col_bias, dtype)[:, None, :]
  return bias


def biased_attention_reference(
  q,
  k,
  v,
  coords_q,
  coords_k,
  rbf_weight,
  *,
  rbf_centres,
  rbf_width,
  row_bias=None,
  col_bias=None,
  key_valid=None,
  scale=None,
) -> jax.Array:
  """softmax(Q Kᵀ·scale + B) V per head with the bias materialised (O(N²) memory).

  Same arguments as :func:`biased_attention`. Keys with ``key_valid`` False get
  zero probability; a query row with no valid key at all returns zeros (and
  passes zero gradient) rather than NaN.
  """
  dtype = _compute_dtype(q.dtype)
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("hqd,hkd->hqk", q.astype(dtype), k.astype(dtype)) * scale
  logits = logits + spatial_bias_reference(
    coords_q, coords_k, rbf_weight, rbf_centres, rbf_width, row_bias, col_bias
  ).astype(dtype)
  if key_valid is None:
    valid = jnp.ones(k.shape[1], bool)
  else:
    valid = jnp.asarray(key_valid, bool)
  logits = jnp.where(valid[None, None, :], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnorm = jnp.where(valid[None, None, :], jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(unnorm, axis=-1, keepdims=True)
  probs = unnorm / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("hqk,hkd->hqd", probs, v.astype(dtype))
  return out.astype(q.dtype)


# --------------------------------------------------------------------------
# Pallas kernels
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernels (powers of two, ≥ 16).

  Attributes:
    block_q: query rows per program in the forward pass.
    block_k: key rows per inner-loop step in the forward pass.
    block_q_bwd: query rows per tile in both backward kernels.
    block_k_bwd: key rows per tile in both backward kernels.
  """

  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64

  @classmethod
  def for_head_dim(cls, head_dim: int) -> BlockSizes:
    """Defaults: smaller backward tiles at D = 128 to bound register pressure,
    since the bias tile and its R basis tiles live next to the score tile."""
    if head_dim <= 64:
      return cls(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
    return cls(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) settings of one kernel launch."""

  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  n_coords: int
  n_rbf: int
  interpret: bool
  num_warps: int
  num_stages: int
  precision: lax.Precision | None = None


def _dot(a, b, contract_a: int, contract_b: int, precision=None):
  """2-D tile product with float32 accumulation, contracting the given axes
  (a transposed operand is expressed here rather than materialised)."""
  return lax.dot_general(
    a,
    b,
    (((contract_a,), (contract_b,)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def _load_scalars(ref, count: int):
  return [ref[r] for r in range(count)]


def _load_bias_parameters(w_ref, centre_ref, invw_ref, cfg: _Config):
  """One head's RBF weights, centres and inverse widths, as lists of scalars."""
  return tuple(_load_scalars(ref, cfg.n_rbf) for ref in (w_ref, centre_ref, invw_ref))


def _tile_phis(q_coords, k_coords, centres, inv_width):
  """φ_r(d_ij) on one [bq, bk] tile from the coordinate columns of its nodes."""
  dist2 = None
  for cq, ck in zip(q_coords, k_coords):
    diff = cq[:, None] - ck[None, :]
    dist2 = diff * diff if dist2 is None else dist2 + diff * diff
  dist = jnp.sqrt(dist2)
  phis = []
  for centre, inv in zip(centres, inv_width):
    t = (dist - centre) * inv
    phis.append(jnp.exp2(-(t * t)))
  return phis


def _tile_logits(q, k, phis, weights, row_term, col_term, valid, scale, precision=None):
  """Masked base-2 logits of eq. (1) on one tile: (Q Kᵀ·scale + B)·log2 e, float32
  (the bias terms arrive pre-multiplied by log2 e)."""
  logits = _dot(q, k, 1, 1, precision) * scale
  for w, phi in zip(weights, phis):
    logits = logits + w * phi
  logits = logits + row_term[:, None] + col_term[None, :]
  return jnp.where(valid[None, :], logits, _MASK_VALUE)


def _biased_logits(q, k, q_coords, k_coords, bias, row_term, col_term, valid, cfg: _Config):
  """One tile's base-2 logits, and the φ_r(d_ij) they were built from."""
  weights, centres, inv_width = bias
  phis = _tile_phis(q_coords, k_coords, centres, inv_width)
  logits = _tile_logits(
    q, k, phis, weights, row_term, col_term, valid, cfg.scale * _LOG2E, cfg.precision
  )
  return logits, phis


def _recomputed_p_and_ds(s, m, log2_l, valid, do, v, delta, precision=None):
  """P recomputed from the saved row maximum and base-2 log of the row sum,
  and dS = P∘(dP − δ) (FlashAttention-2, Alg. 2), on one tile.

  The two are kept apart rather than as one LSE = m + log2 l: when every
  logit of a row carries a large offset (a -1e9 mask on every key, say),
  float32 rounds m + log2 l to m, the recomputed P becomes 1 instead of
  1/n, and every gradient comes out n times too large. s − m is exact
  there (the two are close), so exp2((s − m) − log2 l) is not."""
  p = jnp.where(valid[None, :], jnp.exp2((s - m[:, None]) - log2_l[:, None]), 0.0)
  return p, p * (_dot(do, v, 1, 1, precision) - delta[:, None])


def _forward_kernel(
  q_ref,
  k_ref,
  v_ref,
  cq_ref,
  ck_ref,
  w_ref,
  centre_ref,
  invw_ref,
  row_ref,
  col_ref,
  kmask_ref,
  o_ref,
  m_ref,
  log2_l_ref,
  *,
  cfg: _Config,
  n_key_blocks: int,
):
  bq, bk = cfg.block_q, cfg.block_k
  q = q_ref[...]
  q_coords = [cq_ref[c, :] for c in range(cfg.n_coords)]
  row_term = row_ref[...]
  bias = _load_bias_parameters(w_ref, centre_ref, invw_ref, cfg)

  def body(kb, carry):
    acc, m_prev, l_prev = carry
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    k_coords = [ck_ref[c, ks] for c in range(cfg.n_coords)]
    valid = kmask_ref[ks] > 0.5
    s, _ = _biased_logits(q, k, q_coords, k_coords, bias, row_term, col_ref[ks], valid, cfg)
    # Online softmax (FlashAttention-2, Alg. 1): rescale the running sum and
    # accumulator by exp(m_prev - m_new) instead of renormalising per block.
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp2(m_prev - m_new)
    p = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
    l_new = l_prev * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, 1, 0, cfg.precision)
    return acc, m_new, l_new

  acc = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  m = jnp.full((bq,), _MASK_VALUE, jnp.float32)
  lsum = jnp.zeros((bq,), jnp.float32)
  acc, m, lsum = lax.fori_loop(0, n_key_blocks, body, (acc, m, lsum))
  # A row without any valid key has lsum = 0: output 0 instead of 0/0 (the
  # backward's recomputed P is 0 there through the key mask).
  safe = jnp.where(lsum > 0, lsum, 1.0)
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  # The base-2 log-sum-exp is m + log2 l; the two parts are saved apart (see
  # _recomputed_p_and_ds).
  m_ref[...] = m
  log2_l_ref[...] = jnp.log2(safe)


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  m_ref,
  log2_l_ref,
  delta_ref,
  cq_ref,
  ck_ref,
  w_ref,
  centre_ref,
  invw_ref,
  row_ref,
  col_ref,
  kmask_ref,
  dq_ref,
  drow_ref,
  *,
  cfg: _Config,
  n_key_blocks: int,
):
  bk = cfg.block_k_bwd
  q = q_ref[...]
  do = do_ref[...]
  m = m_ref[...]
  log2_l = log2_l_ref[...]
  delta = delta_ref[...]
  q_coords = [cq_ref[c, :] for c in range(cfg.n_coords)]
  row_term = row_ref[...]
  bias = _load_bias_parameters(w_ref, centre_ref, invw_ref, cfg)

  def body(kb, carry):
    dq, drow = carry
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    k_coords = [ck_ref[c, ks] for c in range(cfg.n_coords)]
    valid = kmask_ref[ks] > 0.5
    s, _ = _biased_logits(q, k, q_coords, k_coords, bias, row_term, col_ref[ks], valid, cfg)
    _, ds = _recomputed_p_and_ds(s, m, log2_l, valid, do, v, delta, cfg.precision)
    dq = dq + _dot(ds.astype(k.dtype), k, 1, 0, cfg.precision)
    drow = drow + jnp.sum(ds, axis=1)  # ∂L/∂row_bias[h,i] = Σ_j dS_ij
    return dq, drow

  dq = jnp.zeros(q.shape, jnp.float32)
  drow = jnp.zeros(m.shape, jnp.float32)
  dq, drow = lax.fori_loop(0, n_key_blocks, body, (dq, drow))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  drow_ref[...] = drow


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  m_ref,
  log2_l_ref,
  delta_ref,
  cq_ref,
  ck_ref,
  w_ref,
  centre_ref,
  invw_ref,
  row_ref,
  col_ref,
  kmask_ref,
  dk_ref,
  dv_ref,
  dcol_ref,
  dw_ref,
  *,
  cfg: _Config,
  n_query_blocks: int,
):
  bq = cfg.block_q_bwd
  k = k_ref[...]
  v = v_ref[...]
  k_coords = [ck_ref[c, :] for c in range(cfg.n_coords)]
  col_term = col_ref[...]
  valid = kmask_ref[...] > 0.5
  bias = _load_bias_parameters(w_ref, centre_ref, invw_ref, cfg)

  def body(qb, carry):
    dk, dv, dcol, dws = carry
    qs = pl.ds(pl.multiple_of(qb * bq, bq), bq)
    q = q_ref[qs, :]
    do = do_ref[qs, :]
    q_coords = [cq_ref[c, qs] for c in range(cfg.n_coords)]
    s, phis = _biased_logits(q, k, q_coords, k_coords, bias, row_ref[qs], col_term, valid, cfg)
    p, ds = _recomputed_p_and_ds(
      s, m_ref[qs], log2_l_ref[qs], valid, do, v, delta_ref[qs], cfg.precision
    )
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0, cfg.precision)  # Pᵀ dO
    dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, cfg.precision)  # dSᵀ Q
    dcol = dcol + jnp.sum(ds, axis=0)  # ∂L/∂col_bias[h,j] = Σ_i dS_ij
    # ∂L/∂rbf_weight[h,r] = Σ_ij dS_ij φ_r(d_ij); kept per key here and summed
    # over keys outside the kernel.
    dws = tuple(dw + jnp.sum(ds * phi, axis=0) for dw, phi in zip(dws, phis))
    return dk, dv, dcol, dws

  bk = k.shape[0]
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  dcol = jnp.zeros((bk,), jnp.float32)
  dws = tuple(jnp.zeros((bk,), jnp.float32) for _ in range(cfg.n_rbf))
  dk, dv, dcol, dws = lax.fori_loop(0, n_query_blocks, body, (dk, dv, dcol, dws))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dcol_ref[...] = dcol
  for r, dw in enumerate(dws):
    dw_ref[r, :] = dw


def _compiler_params(cfg: _Config):
  if cfg.interpret:
    return None
  # Triton's parameters are what select the Triton lowering: a pallas_call
  # given none lowers through Mosaic GPU, which this kernel is not written for.
  return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _shared_specs(cfg: _Config, nq: int, nk: int, q_block, k_block):
  """BlockSpecs of the per-node inputs. ``q_block``/``k_block`` give, for a
  grid point (h, i), the query/key window: ``None`` means the whole axis."""
  c, r = cfg.n_coords, cfg.n_rbf

  def along(n, block, lead):
    if block is None:
      return pl.BlockSpec((*lead, n), lambda h, i: (*(h,) * len(lead), 0))
    return pl.BlockSpec((*lead, block), lambda h, i: (*(h,) * len(lead), i))

  cq = (
    pl.BlockSpec((c, nq), lambda h, i: (0, 0))
    if q_block is None
    else pl.BlockSpec((c, q_block), lambda h, i: (0, i))
  )
  ck = (
    pl.BlockSpec((c, nk), lambda h, i: (0, 0))
    if k_block is None
    else pl.BlockSpec((c, k_block), lambda h, i: (0, i))
  )
  per_rbf = pl.BlockSpec((r,), lambda h, i: (0,))
  return [
    cq,
    ck,
    pl.BlockSpec((None, r), lambda h, i: (h, 0)),  # rbf_weight[h]
    per_rbf,  # centres
    per_rbf,  # 1 / widths
    along(nq, q_block, (None,)),  # row_bias[h]
    along(nk, k_block, (None,)),  # col_bias[h]
    (
      pl.BlockSpec((nk,), lambda h, i: (0,))
      if k_block is None
      else pl.BlockSpec((k_block,), lambda h, i: (i,))
    ),  # key mask
  ]


def _raise_to_floor(bias):
  """Finite entries below `_BIAS_FLOOR` raised to it; -inf kept (a masked key).

  The shift is a constant to autodiff, so every entry keeps the gradient the
  reference gives it.
  """
  finite = jnp.isfinite(bias)
  shift = jnp.where(finite, jnp.maximum(bias, _BIAS_FLOOR) - jnp.where(finite, bias, 0.0), 0.0)
  return bias + lax.stop_gradient(shift)


def _base2(w, inv_width, row, col):
  """The logit-side parameters in the kernels' base-2 convention (O(H·N) work)."""
  return w * _LOG2E, inv_width * math.sqrt(_LOG2E), row * _LOG2E, col * _LOG2E


def _pallas_forward(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, cfg: _Config):
  w, inv_width, row, col = _base2(w, inv_width, row, col)
  h, nq, dp = q.shape
  nk = k.shape[1]
  bq = cfg.block_q
  whole_kv = pl.BlockSpec((None, nk, dp), lambda hh, i: (hh, 0, 0))
  q_tile = pl.BlockSpec((None, bq, dp), lambda hh, i: (hh, i, 0))
  row_tile = pl.BlockSpec((None, bq), lambda hh, i: (hh, i))
  kernel = functools.partial(_forward_kernel, cfg=cfg, n_key_blocks=nk // cfg.block_k)
  return pl.pallas_call(
    kernel,
    grid=(h, nq // bq),
    in_specs=[q_tile, whole_kv, whole_kv, *_shared_specs(cfg, nq, nk, bq, None)],
    out_specs=[q_tile, row_tile, row_tile],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((h, nq), jnp.float32),  # row maximum m (base 2)
      jax.ShapeDtypeStruct((h, nq), jnp.float32),  # log2 of the row sum l
    ],
    compiler_params=_compiler_params(cfg),
    interpret=cfg.interpret,
    name="biased_attention_fwd",
  )(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask)


def _pallas_backward(res, do, cfg: _Config):
  q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, out, m, log2_l = res
  h, nq, dp = q.shape
  nk = k.shape[1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  # δ_i = Σ_j P_ij dP_ij = rowsum(dO∘O) (FlashAttention-2, eq. in §3.1.2): an
  # O(N·D) elementwise pass that XLA fuses, so it is not a kernel of its own.
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  w2, inv_width2, row2, col2 = _base2(w, inv_width, row, col)
  shared = (cq, ck, w2, centres, inv_width2, row2, col2, kmask)

  whole_q = pl.BlockSpec((None, nq, dp), lambda hh, i: (hh, 0, 0))
  whole_k = pl.BlockSpec((None, nk, dp), lambda hh, i: (hh, 0, 0))
  whole_row = pl.BlockSpec((None, nq), lambda hh, i: (hh, 0))
  q_tile = pl.BlockSpec((None, bq, dp), lambda hh, i: (hh, i, 0))
  k_tile = pl.BlockSpec((None, bk, dp), lambda hh, i: (hh, i, 0))
  row_tile = pl.BlockSpec((None, bq), lambda hh, i: (hh, i))
  col_tile = pl.BlockSpec((None, bk), lambda hh, i: (hh, i))

  dq, drow = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg, n_key_blocks=nk // bk),
    grid=(h, nq // bq),
    in_specs=[
      q_tile,
      whole_k,
      whole_k,
      q_tile,
      row_tile,
      row_tile,
      row_tile,
      *_shared_specs(cfg, nq, nk, bq, None),
    ],
    out_specs=[q_tile, row_tile],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((h, nq), jnp.float32),
    ],
    compiler_params=_compiler_params(cfg),
    interpret=cfg.interpret,
    name="biased_attention_bwd_dq",
  )(q, k, v, do, m, log2_l, delta, *shared)

  dk, dv, dcol, dw_per_key = pl.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg, n_query_blocks=nq // bq),
    grid=(h, nk // bk),
    in_specs=[
      whole_q,
      k_tile,
      k_tile,
      whole_q,
      whole_row,
      whole_row,
      whole_row,
      *_shared_specs(cfg, nq, nk, None, bk),
    ],
    out_specs=[
      k_tile,
      k_tile,
      col_tile,
      pl.BlockSpec((None, cfg.n_rbf, bk), lambda hh, i: (hh, 0, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(k.shape, k.dtype),
      jax.ShapeDtypeStruct(v.shape, v.dtype),
      jax.ShapeDtypeStruct((h, nk), jnp.float32),
      jax.ShapeDtypeStruct((h, cfg.n_rbf, nk), jnp.float32),
    ],
    compiler_params=_compiler_params(cfg),
    interpret=cfg.interpret,
    name="biased_attention_bwd_dkv",
  )(q, k, v, do, m, log2_l, delta, *shared)

  dw = jnp.sum(dw_per_key, axis=-1).astype(w.dtype)
  # Coordinates, centres, widths and the key mask are constants.
  return (
    dq,
    dk,
    dv,
    jnp.zeros_like(cq),
    jnp.zeros_like(ck),
    dw,
    jnp.zeros_like(centres),
    jnp.zeros_like(inv_width),
    drow.astype(row.dtype),
    dcol.astype(col.dtype),
    jnp.zeros_like(kmask),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _flash(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, cfg):
  return _pallas_forward(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, cfg)[0]


def _flash_fwd(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, cfg):
  out, m, log2_l = _pallas_forward(q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, cfg)
  return out, (q, k, v, cq, ck, w, centres, inv_width, row, col, kmask, out, m, log2_l)


def _flash_bwd(cfg, res, do):
  return _pallas_backward(res, do, cfg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _round_block(block: int, n: int) -> int:
  """Block size actually used: a power of two ≥ 16, no larger than needed."""
  if block < _MIN_BLOCK or block & (block - 1):
    raise ValueError(f"biased_attention: block size {block} must be a power of two >= 16")
  return min(block, max(_MIN_BLOCK, pl.next_power_of_2(n)))


def _pad_axis(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("scale", "blocks", "interpret", "precision"))
def _pallas_attention(
  q,
  k,
  v,
  coords_q,
  coords_k,
  rbf_weight,
  centres,
  width,
  row,
  col,
  key_valid,
  *,
  scale,
  blocks,
  interpret,
  precision=None,
):
  """Pads to the tile grid, runs the kernels, slices the padding off.

  Padded keys are masked through the key mask; padded query rows compute a
  harmless softmax over the valid keys and are sliced away, so their cotangent
  is zero and they add nothing to any gradient.
  """
  h, nq, d = q.shape
  nk = k.shape[1]
  # Tile dots need D to be a power of two ≥ 16; zero columns change neither
  # Q Kᵀ nor the kept columns of P V.
  dp = max(_MIN_BLOCK, pl.next_power_of_2(d))
  bq = _round_block(blocks.block_q, nq)
  bk = _round_block(blocks.block_k, nk)
  bqb = _round_block(blocks.block_q_bwd, nq)
  bkb = _round_block(blocks.block_k_bwd, nk)
  nq_pad = -(-nq // max(bq, bqb)) * max(bq, bqb)
  nk_pad = -(-nk // max(bk, bkb)) * max(bk, bkb)

  def pad_qkv(x, n_pad):
    return _pad_axis(_pad_axis(x, 2, dp), 1, n_pad)

  f32 = jnp.float32
  cfg = _Config(
    scale=float(scale),
    block_q=bq,
    block_k=bk,
    block_q_bwd=bqb,
    block_k_bwd=bkb,
    n_coords=coords_q.shape[1],
    n_rbf=rbf_weight.shape[1],
    interpret=interpret,
    num_warps=4 if dp <= 64 else 8,
    num_stages=2,
    precision=precision,
  )
  out = _flash(
    pad_qkv(q, nq_pad),
    pad_qkv(k, nk_pad),
    pad_qkv(v, nk_pad),
    _pad_axis(coords_q.astype(f32).T, 1, nq_pad),
    _pad_axis(coords_k.astype(f32).T, 1, nk_pad),
    rbf_weight.astype(f32),
    centres.astype(f32),
    1.0 / width.astype(f32),
    _pad_axis(row.astype(f32), 1, nq_pad),
    _pad_axis(col.astype(f32), 1, nk_pad),
    _pad_axis(key_valid.astype(f32), 0, nk_pad),
    cfg,
  )
  return out[:, :nq, :d]


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


# What the Pallas kernel takes; float64 (the tests' oracle) goes to the reference.
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# The widest head the automatic choice hands to the kernel. Its tiles are
# fixed: with two pipeline stages the K and V tiles of a float32 head of 256
# would need about 256 KB of shared memory, over a Hopper block's 227 KB (an
# estimate; no GPU run has tried it). An explicit "pallas" still gets it.
AUTO_MAX_HEAD_DIM = 128


def resolve_implementation(
  implementation: str | None, dtype=jnp.float32, head_dim: int | None = None
) -> str:
  """``None`` → ``"pallas"`` on a GPU backend for a dtype it takes and a
  head of at most `AUTO_MAX_HEAD_DIM`, ``"reference"`` otherwise."""
  if implementation is None:
    on_gpu = jax.default_backend() == "gpu"
    fits = head_dim is None or head_dim <= AUTO_MAX_HEAD_DIM
    return "pallas" if on_gpu and fits and jnp.dtype(dtype) in PALLAS_DTYPES else "reference"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"biased_attention: implementation must be None, 'pallas' or 'reference', "
      f"got {implementation!r}"
    )
  return implementation


def _check_shape(name: str, x, expected: tuple, meaning: str) -> None:
  shape = tuple(np.shape(x))
  ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
  if not ok:
    want = ", ".join("?" if e is None else str(e) for e in expected)
    raise ValueError(
      f"biased_attention: argument {name!r}: expected shape [{want}] ({meaning}), got {shape}"
    )


def _validate(q, k, v, coords_q, coords_k, rbf_weight, centres, width, row, col, key_valid):
  _check_shape("q", q, (None, None, None), "[H, Nq, D]")
  h, nq, d = q.shape
  _check_shape("k", k, (h, None, d), "[H, Nk, D] matching q's H and D")
  nk = k.shape[1]
  _check_shape("v", v, (h, nk, d), "[H, Nk, D] matching k")
  if nq == 0 or nk == 0 or d == 0:
    raise ValueError(f"biased_attention: empty attention (Nq={nq}, Nk={nk}, D={d})")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"biased_attention: argument {name!r}: dtype {x.dtype} is not floating")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
      f"biased_attention: arguments 'q', 'k', 'v' must share a dtype, got "
      f"{q.dtype}, {k.dtype}, {v.dtype}"
    )
  _check_shape("coords_q", coords_q, (nq, None), "[Nq, C]")
  c = np.shape(coords_q)[1]
  if c == 0:
    raise ValueError("biased_attention: argument 'coords_q': zero coordinate columns")
  _check_shape("coords_k", coords_k, (nk, c), "[Nk, C] with coords_q's C")
  _check_shape("rbf_weight", rbf_weight, (h, None), "[H, R]")
  r = np.shape(rbf_weight)[1]
  if r == 0:
    raise ValueError("biased_attention: argument 'rbf_weight': R = 0 basis functions")
  _check_shape("rbf_centres", centres, (r,), "[R] matching rbf_weight")
  _check_shape("rbf_width", width, (r,), "[R] matching rbf_weight")
  if row is not None:
    _check_shape("row_bias", row, (h, nq), "[H, Nq]")
  if col is not None:
    _check_shape("col_bias", col, (h, nk), "[H, Nk]")
  if key_valid is not None:
    _check_shape("key_valid", key_valid, (nk,), "[Nk] bool")
    dtype = jnp.asarray(key_valid).dtype
    if dtype != jnp.bool_:
      raise ValueError(f"biased_attention: argument 'key_valid': expected bool, got {dtype}")


def biased_attention(
  q,
  k,
  v,
  coords_q,
  coords_k,
  rbf_weight,
  *,
  rbf_centres,
  rbf_width,
  row_bias=None,
  col_bias=None,
  key_valid=None,
  scale=None,
  implementation=None,
  interpret=False,
  block_sizes: BlockSizes | None = None,
  precision: lax.Precision | None = None,
) -> jax.Array:
  """Spatially biased attention, eq. (1) of the ToPT paper, without an N×N bias.

  Computes, per head h, ``softmax(Q Kᵀ·scale + B^h) V`` with
  ``B^h_ij = Σ_r rbf_weight[h,r]·exp(-((d_ij - rbf_centres[r])/rbf_width[r])²)
  + row_bias[h,i] + col_bias[h,j]`` and ``d_ij = ||coords_q[i] - coords_k[j]||₂``.

  Args:
    q: [H, Nq, D] queries (float; bf16/fp16 on the GPU path).
    k: [H, Nk, D] keys, same dtype.
    v: [H, Nk, D] values, same dtype.
    coords_q: [Nq, C] query-node coordinates.
    coords_k: [Nk, C] key-node coordinates.
    rbf_weight: [H, R] weights of the radial basis functions.
    rbf_centres: [R] centres (same distance units as the coordinates).
    rbf_width: [R] widths, positive (not checked: traced values cannot be).
    row_bias: optional [H, Nq] per-query-node term (e.g. centrality).
    col_bias: optional [H, Nk] per-key-node term. On the Pallas path finite
      values below -1e37 (an additive mask such as ``finfo(float32).min``)
      count as -1e37, which gives the reference's result; -inf masks a key.
    key_valid: optional [Nk] bool; False keys get zero attention. A query row
      without any valid key returns zeros.
    scale: logit scale, default 1/√D.
    implementation: None (auto: "pallas" on a GPU backend, "reference"
      elsewhere), "pallas" or "reference".
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    block_sizes: tile sizes of the Pallas path; default depends on D.
    precision: dot precision inside the Pallas kernels (None: the backend's
      default, TF32 for float32 on Hopper; ``lax.Precision.HIGHEST`` for
      IEEE float32 products).

  Returns:
    [H, Nq, D] in q's dtype.

  Differentiable in q, k, v, rbf_weight, row_bias and col_bias. Coordinates,
  centres and widths are constants: their cotangent is zero. The Pallas path
  keeps O(N) memory in both passes.

  Note that ``row_bias`` shifts a whole row of logits, to which the softmax is
  invariant: it never changes the output and its gradient
  (Σ_j dS_ij = δ_i − δ_i) is zero up to rounding. It is accepted so that a
  per-node centrality prior can be passed uniformly for both node roles.
  """
  _validate(
    q, k, v, coords_q, coords_k, rbf_weight, rbf_centres, rbf_width, row_bias, col_bias, key_valid
  )
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
  if impl == "pallas" and q.dtype not in PALLAS_DTYPES:
    raise TypeError(
      f"biased_attention: the Pallas kernel takes {[jnp.dtype(t).name for t in PALLAS_DTYPES]}, "
      f"got q of dtype {q.dtype}; use implementation='reference'"
    )
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == "reference":
    return biased_attention_reference(
      q,
      k,
      v,
      coords_q,
      coords_k,
      rbf_weight,
      rbf_centres=rbf_centres,
      rbf_width=rbf_width,
      row_bias=row_bias,
      col_bias=col_bias,
      key_valid=key_valid,
      scale=scale,
    )
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(
      f"biased_attention: implementation 'pallas' lowers through Triton and needs a GPU "
      f"backend (this one is {jax.default_backend()!r}); pass interpret=True to run the "
      "kernels in interpret mode, or implementation='reference'"
    )
  h, nq, d = q.shape
  nk = k.shape[1]
  if row_bias is None:
    row_bias = jnp.zeros((h, nq), jnp.float32)
  if col_bias is None:
    col_bias = jnp.zeros((h, nk), jnp.float32)
  if key_valid is None:
    key_valid = jnp.ones((nk,), bool)
  row_bias, col_bias = (_raise_to_floor(jnp.asarray(b)) for b in (row_bias, col_bias))
  blocks = block_sizes if block_sizes is not None else BlockSizes.for_head_dim(d)
  return _pallas_attention(
    q,
    k,
    v,
    jnp.asarray(coords_q),
    jnp.asarray(coords_k),
    jnp.asarray(rbf_weight),
    jnp.asarray(rbf_centres),
    jnp.asarray(rbf_width),
    jnp.asarray(row_bias),
    jnp.asarray(col_bias),
    jnp.asarray(key_valid),
    scale=float(scale),
    blocks=blocks,
    interpret=bool(interpret),
    precision=precision,
  )


# --------------------------------------------------------------------------
# Benchmark: python -m kernels.biased_attention
# --------------------------------------------------------------------------


def _device_peak(device_kind: str, dtype) -> float | None:
  """Dense peak FLOP/s of the board for ``dtype`` (float32 at TF32, the
  default matmul precision on Hopper), or None for an unknown board."""
  found = peaks.device_peak(device_kind, dtype)
  return None if found is None else found[1] * 1e12


def _import_tokamax():
  """tokamax, or None when it is absent or broken.

  tokamax reads its options from absl flags and, on first use, parses
  ``sys.argv`` for them, which fails on this script's own arguments; the
  flags are marked parsed first, so tokamax runs with its defaults.
  """
  try:
    from absl import flags
    import tokamax
  except Exception:
    return None
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


# tokamax's own kernels, named one at a time: left to choose, tokamax falls
# back silently to its plain XLA form, and the column would say "tokamax"
# over a materialised softmax.
TOKAMAX_KERNELS = ("mosaic", "triton")


def _tokamax_candidates(biased: bool) -> list[tuple[str, Callable]]:
  """tokamax's flash-attention kernels as ``(name, fn)``, none when it is absent."""
  tokamax = _import_tokamax()
  if tokamax is None:
    return []
  candidates = []
  for kernel in TOKAMAX_KERNELS:
    if biased:
      fn = functools.partial(
        lambda q, k, v, b, impl: tokamax.dot_product_attention(
          q, k, v, bias=b, implementation=impl
        ),
        impl=kernel,
      )
    else:
      fn = functools.partial(
        lambda q, k, v, impl: tokamax.dot_product_attention(q, k, v, implementation=impl),
        impl=kernel,
      )
    candidates.append((f"tokamax/{kernel}", fn))
  return candidates


def _unbiased_candidates() -> list[tuple[str, Callable]]:
  """Unbiased attention implementations reachable from JAX, fastest first, as
  ``(name, fn(q, k, v) -> out)`` on [B, T, heads, D] inputs. The benchmark
  uses the first that runs on the shape at hand."""
  candidates = _tokamax_candidates(biased=False)
  candidates.append(
    ("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
  )
  candidates.append(("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v)))
  return candidates


def _materialised_bias_candidates() -> list[tuple[str, Callable]]:
  """Attention implementations that take a materialised [1, H, N, N] bias, as
  ``(name, fn(q, k, v, bias) -> out)``, tokamax's kernels first (the
  comparison the fused bias is meant to win), then cuDNN's and XLA's."""
  candidates = _tokamax_candidates(biased=True)
  for name in ("cudnn", "xla"):
    candidates.append(
      (
        name,
        functools.partial(
          lambda q, k, v, b, impl: jax.nn.dot_product_attention(
            q, k, v, bias=b, implementation=impl
          ),
          impl=name,
        ),
      )
    )
  return candidates


def _bench_inputs(key, n: int, heads: int, head_dim: int, n_rbf: int, dtype):
  ks = jax.random.split(key, 8)
  q, k, v = (jax.random.normal(ks[i], (heads, n, head_dim), dtype) for i in range(3))
  coords = jax.random.uniform(ks[3], (n, 2), jnp.float32) * 10.0
  weight = jax.random.normal(ks[4], (heads, n_rbf), jnp.float32) * 0.3
  centres = jnp.linspace(0.0, 5.0, n_rbf, dtype=jnp.float32)
  width = jnp.full((n_rbf,), 2.0, jnp.float32)
  row = jax.random.normal(ks[5], (heads, n), jnp.float32) * 0.1
  col = jax.random.normal(ks[6], (heads, n), jnp.float32) * 0.1
  return q, k, v, coords, weight, centres, width, row, col


def _try_time(fn, repeats, warmup) -> tuple[float | None, str]:
  try:
    return median_seconds(fn, repeats, warmup), ""
  except Exception as e:  # e.g. out of memory at 32k with a materialised bias
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def _fmt_ms(seconds: float | None) -> str:
  return "   failed" if seconds is None else f"{seconds * 1e3:9.3f}"


def _fmt_rate(flops: float, seconds: float | None) -> str:
  return "    -" if seconds is None else f"{flops / seconds / 1e12:5.1f}"


def _bench_cpu(args) -> None:
  print(
    "No GPU backend: the Pallas kernel targets the GPU (Triton lowering). Timing the "
    "jax.numpy reference on one small float32 size only (N=512, H=2, D=64); --sizes, "
    "--heads, --head-dims and --dtypes apply on a GPU or with --interpret."
  )
  n, heads, d = 512, 2, 64
  q, k, v, coords, w, centres, width, row, col = _bench_inputs(
    jax.random.key(0), n, heads, d, args.rbf, jnp.float32
  )
  ref = jax.jit(
    lambda q, k, v, w, row, col: biased_attention_reference(
      q, k, v, coords, coords, w, rbf_centres=centres, rbf_width=width, row_bias=row, col_bias=col
    )
  )
  seconds = median_seconds(lambda: ref(q, k, v, w, row, col), args.repeats, args.warmup)
  flops = 4 * n * n * d * heads
  print(
    f"reference, N={n}, H={heads}, D={d}, float32: {seconds * 1e3:.3f} ms, "
    f"{flops / seconds / 1e9:.2f} GFLOP/s (4·N²·D·H = {flops:.3g} FLOP)"
  )


def _materialised_bias(coords, w, centres, width, row, col, dtype):
  """[1, H, N, N] bias in ``dtype``, built one head at a time so that only the
  result is resident (the float32 intermediates of one head are N² each)."""

  def one_head(args_h):
    wh, rh, ch = args_h
    b = spatial_bias_reference(coords, coords, wh[None], centres, width, rh[None], ch[None])
    return b[0].astype(dtype)

  return jax.jit(lambda w, row, col: lax.map(one_head, (w, row, col)))(w, row, col)[None]


def _bench_row(args, key, dtype, n, d, peak, candidates) -> bool:
  """Times one row of the table; False when the kernel itself (a) failed."""
  h = args.heads
  q, k, v, coords, w, centres, width, row, col = _bench_inputs(key, n, h, d, args.rbf, dtype)
  flops = 4.0 * n * n * d * h

  # (a) this kernel, bias recomputed in-kernel.
  kernel = jax.jit(
    lambda q, k, v, w, row, col: biased_attention(
      q,
      k,
      v,
      coords,
      coords,
      w,
      rbf_centres=centres,
      rbf_width=width,
      row_bias=row,
      col_bias=col,
      implementation="pallas",
      interpret=args.interpret,
    )
  )
  t_a, err_a = _try_time(lambda: kernel(q, k, v, w, row, col), args.repeats, args.warmup)

  # (b) unbiased flash attention; [H, N, D] -> [B=1, T=N, heads, D], the
  # layout of jax.nn and tokamax.
  qb, kb, vb = (jnp.transpose(x, (1, 0, 2))[None] for x in (q, k, v))
  t_b, errs_b, name_b = None, [], "-"
  for name_b, fn in candidates:
    base = jax.jit(fn)
    t_b, err = _try_time(lambda: base(qb, kb, vb), args.repeats, args.warmup)
    if t_b is not None:
      break
    errs_b.append(f"{name_b}: {err}")

  # (c) the same attention with the bias materialised (built outside the
  # timed region).
  t_c, errs_c, name_c = None, [], "-"
  try:
    bias = _materialised_bias(coords, w, centres, width, row, col, dtype)
    jax.block_until_ready(bias)
    for name_c, fn in _materialised_bias_candidates():
      dense = jax.jit(fn)
      t_c, err = _try_time(lambda: dense(qb, kb, vb, bias), args.repeats, args.warmup)
      if t_c is not None:
        break
      errs_c.append(f"{name_c}: {err}")
  except Exception as e:  # the [H, N, N] bias itself may not fit
    errs_c.append(f"bias: {type(e).__name__}: {str(e).splitlines()[0][:80]}")

  pct = "   -" if (t_a is None or peak is None) else f"{100 * flops / t_a / peak:4.0f}"
  ratio_ab = "      -" if (t_a is None or t_b is None) else f"{t_b / t_a:7.2f}"
  ratio_ca = "       -" if (t_a is None or t_c is None) else f"{t_c / t_a:8.2f}"
  print(
    f"{jnp.dtype(dtype).name:>8} {n:>6} {d:>4} | {_fmt_ms(t_a)} {_fmt_rate(flops, t_a)} {pct} | "
    f"{_fmt_ms(t_b)} {_fmt_rate(flops, t_b)} {name_b:>14} | {_fmt_ms(t_c)} {name_c:>14} | "
    f"{ratio_ab} {ratio_ca}"
  )
  for label, errs in (("(a)", [err_a] if err_a else []), ("(b)", errs_b), ("(c)", errs_c)):
    for err in errs:
      print(f"    {label} failed: {err}")
  return t_a is not None


def main(argv=None) -> int:
  """Forward-pass benchmark: (a) this kernel, (b) the best unbiased flash
  attention reachable from JAX, (c) attention with a materialised bias."""
  parser = argparse.ArgumentParser(
    prog="python -m kernels.biased_attention", description=main.__doc__.split(":")[0]
  )
  parser.add_argument(
    "--sizes",
    type=count_at_least(1),
    nargs="+",
    default=[4096, 16384, 32768],
    help="sequence lengths N (queries = keys)",
  )
  parser.add_argument("--heads", type=count_at_least(1), default=8, help="attention heads")
  parser.add_argument(
    "--head-dims", type=count_at_least(1), nargs="+", default=[64, 128], help="head widths D"
  )
  parser.add_argument(
    "--dtypes",
    nargs="+",
    default=["bfloat16", "float16"],
    choices=[jnp.dtype(d).name for d in PALLAS_DTYPES],
    help="input dtypes",
  )
  parser.add_argument(
    "--rbf", type=count_at_least(1), default=1, help="number of radial basis functions R"
  )
  parser.add_argument(
    "--repeats", type=count_at_least(1), default=20, help="timed calls; their median is shown"
  )
  parser.add_argument(
    "--warmup", type=count_at_least(0), default=3, help="untimed calls after compiling"
  )
  parser.add_argument(
    "--interpret",
    action="store_true",
    help="run the table on any backend with the kernel in interpret mode (a smoke test of "
    "this script; its timings mean nothing)",
  )
  args = parser.parse_args(argv)

  if jax.default_backend() != "gpu" and not args.interpret:
    _bench_cpu(args)
    return 0

  device_kind = jax.devices()[0].device_kind
  candidates = _unbiased_candidates()
  board = peaks.board(device_kind)
  print(
    f"device: {device_kind}; %pk against the dense peak of "
    + (
      f"{board} for each dtype ({', '.join(f'{k} {v:g}' for k, v in peaks.PEAK_TFLOPS[board].items())} TFLOP/s; float32 runs at tf32)"
      if board
      else "an unknown board: none"
    )
  )
  print(
    "TF/s = 4·N²·D·H forward FLOP (Q Kᵀ and P V at 2 FLOP per multiply-add; bias, exp "
    "and softmax arithmetic not counted) / median time"
  )
  print(
    f"(a) this kernel, R={args.rbf}, row+col bias, H={args.heads}; (b) unbiased flash "
    f"attention, first that runs of {[c[0] for c in candidates]}; (c) "
    "the same attention with the bias materialised as an [H, N, N] array, first that "
    f"runs of {[c[0] for c in _materialised_bias_candidates()]}; "
    "a/b thr = throughput of (a) over (b); c/a time = time of (c) over (a)"
  )
  header = (
    f"{'dtype':>8} {'N':>6} {'D':>4} | {'(a) ms':>9} {'TF/s':>5} {'%pk':>4} | "
    f"{'(b) ms':>9} {'TF/s':>5} {'impl':>14} | {'(c) ms':>9} {'impl':>14} | "
    f"{'a/b thr':>7} {'c/a time':>8}"
  )
  print(header)
  print("-" * len(header))
  key = jax.random.key(0)
  kernel_failures = 0
  for dtype_name in args.dtypes:
    for d in args.head_dims:
      for n in args.sizes:
        dtype = jnp.dtype(dtype_name)
        peak = _device_peak(device_kind, dtype)
        kernel_failures += not _bench_row(args, key, dtype, n, d, peak, candidates)
  # A baseline failing (out of memory with a materialised bias) is a finding,
  # not a failure; the kernel failing is one, and the exit status tells a
  # calling script so.
  if kernel_failures:
    print(f"the kernel (a) failed on {kernel_failures} row(s)")
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
