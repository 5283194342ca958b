"""Fused row log-sum-exp of Q K^T: LSE_i = log sum_k exp(q_i . k_k).

CoRE's mobility loss (eqs. 3-4 of the CoRE paper, see
`jaxurban.core.losses.mobility_loss`) needs, for every origin region i, the
softmax normaliser over all N regions, LSE_i = log sum_k exp(z_i . z_k). At
N = 1e5..1e6 the [M, N] logit matrix must never exist. Two implementations:

* `row_logsumexp_reference`: plain jax.numpy; with ``row_chunk`` the rows are
  processed in blocks under ``lax.map`` with rematerialisation, so forward
  and backward hold one [row_chunk, N] block of logits at a time.
* a Pallas kernel (`pl.pallas_call`, Triton lowering on the GPU, interpret
  mode anywhere): the forward is FlashAttention's online max/sum over key
  blocks, keeping only a running max m_i and sum l_i per row, so memory is
  O((M + N) d). The backward is a `jax.custom_vjp` that recomputes the logits
  block by block from the saved LSE (FlashAttention-2, section 3.1.2), kept
  as its two parts m_i and log l_i so that large logits lose no precision:
  with p_ik = exp((q_i . k_k - m_i) - log l_i) and g the cotangent of LSE,
      dq_i = g_i sum_k p_ik k_k       (one kernel, grid over query blocks)
      dk_k = sum_i g_i p_ik q_i       (one kernel, grid over key blocks).

`row_logsumexp` dispatches between them. Inputs whose sizes are not multiples
of the block sizes are zero-padded inside the wrapper: padded keys are masked
to a logit of -inf (they add exp(-inf) = 0 to every sum and get no gradient),
padded query rows see finite logits (their LSE is log(#valid keys), never NaN)
and are sliced off, so their gradient is dropped. The feature dimension is
zero-padded to a power of two >= 16 (Triton tiles must be powers of two and
its dot needs tiles >= 16); zero features do not change any dot product.

A row with no valid key at all has LSE = -inf and a zero gradient, in the
Pallas backward and in the reference (jax.nn.logsumexp's).

The backward's tile products take their [bq, bk] weights in the inputs'
dtype. With float16 inputs g_i p_ik can exceed float16's 65504 (a cotangent
above about 6.5e4, as loss scaling by 2^16 or more gives) while dq and dk
themselves fit, so neither product sees it: dq's tiles take p_ik alone and
g_i scales each row once in float32; dk's tiles take g_i p_ik divided by
the query block's largest |g_i|, which scales the block's product in
float32. dq or dk past 65504 is inf, as any float16 result would be.

Run ``python -m kernels.row_lse`` for the benchmark against the chunked XLA
reference (see `main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import peaks
from kernels.timing import count_at_least, median_seconds, positive_triple, power_of_two_at_least

IMPLEMENTATIONS = (None, "pallas", "reference")
PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The widest feature dimension the automatic choice hands to the kernel: its
# tiles are fixed, and at 512 float32 features two pipeline stages of key
# tiles would need about 256 KB of shared memory, over a Hopper block's
# 227 KB (an estimate; no GPU run has tried it). An explicit "pallas" still
# gets it. CoRE's is 128.
AUTO_MAX_DIM = 256
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
_MIN_TILE = 16  # Triton's dot needs every tile dimension >= 16.
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------


def _check_inputs(queries, keys, key_valid) -> None:
  """Raise a clear error naming the argument and the problem."""
  for name, x in (("queries", queries), ("keys", keys)):
    if jnp.ndim(x) != 2:
      raise ValueError(f"row_logsumexp: {name} must be a 2-D [rows, d] array, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"row_logsumexp: {name} must be a floating array, got dtype {x.dtype}")
  if queries.shape[1] != keys.shape[1]:
    raise ValueError(
      "row_logsumexp: queries and keys must share the feature dimension d, got "
      f"queries {queries.shape} and keys {keys.shape}"
    )
  if queries.shape[0] == 0 or keys.shape[0] == 0 or keys.shape[1] == 0:
    raise ValueError(f"row_logsumexp: empty input, queries {queries.shape} and keys {keys.shape}")
  if queries.dtype != keys.dtype:
    raise TypeError(
      f"row_logsumexp: queries ({queries.dtype}) and keys ({keys.dtype}) must have one dtype"
    )
  if key_valid is not None:
    if jnp.shape(key_valid) != (keys.shape[0],):
      raise ValueError(
        f"row_logsumexp: key_valid must have shape ({keys.shape[0]},) (one flag per key), "
        f"got {jnp.shape(key_valid)}"
      )
    if jnp.result_type(key_valid) != jnp.bool_:
      raise TypeError(
        f"row_logsumexp: key_valid must be a bool array, got dtype {jnp.result_type(key_valid)}"
      )


def _check_block(name: str, block: int) -> None:
  if not isinstance(block, int) or block < _MIN_TILE or block & (block - 1):
    raise ValueError(
      f"row_logsumexp: {name} must be a power of two >= {_MIN_TILE} (Triton tile), got {block!r}"
    )


# --------------------------------------------------------------------------
# Reference: plain jax.numpy, optionally chunked over rows.
# --------------------------------------------------------------------------


def row_logsumexp_reference(
  queries: jax.Array,
  keys: jax.Array,
  key_valid: jax.Array | None = None,
  row_chunk: int | None = None,
) -> jax.Array:
  """log sum_{k valid} exp(q_i . k_k) for every query row, [M].

  The result is float32 (float64 for float64 inputs); the logits are
  accumulated in that type whatever the input dtype. With `row_chunk` the
  rows go through ``lax.map`` in blocks of that many under
  ``jax.checkpoint``, so neither pass holds more than [row_chunk, N] logits.
  """
  _check_inputs(queries, keys, key_valid)
  if row_chunk is not None and (not isinstance(row_chunk, int) or row_chunk < 1):
    raise ValueError(f"row_logsumexp: row_chunk must be a positive int, got {row_chunk!r}")
  out_dtype = jnp.promote_types(queries.dtype, jnp.float32)

  def block_lse(block):
    logits = lax.dot_general(
      block, keys, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype
    )
    if key_valid is not None:
      logits = jnp.where(key_valid[None, :], logits, _NEG_INF)
    return jax.nn.logsumexp(logits, axis=-1)

  n_rows = queries.shape[0]
  if row_chunk is None or row_chunk >= n_rows:
    return block_lse(queries)
  n_blocks = -(-n_rows // row_chunk)
  padded = jnp.pad(queries, ((0, n_blocks * row_chunk - n_rows), (0, 0)))
  lse = lax.map(jax.checkpoint(block_lse), padded.reshape(n_blocks, row_chunk, -1))
  return lse.reshape(-1)[:n_rows]


# --------------------------------------------------------------------------
# Pallas kernels. All operands arrive padded: queries [Mp, D], keys [Np, D],
# Mp % block_q == Np % block_k == 0, D a power of two >= 16; `valid` is an
# int32 [Np] key mask, present only when some key is masked.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
  """Static settings of one padded problem (hashable: a custom_vjp nondiff arg)."""

  block_q: int
  block_k: int
  masked: bool
  interpret: bool
  precision: lax.Precision | None
  num_warps: int
  num_stages: int

  def compiler_params(self):
    # Triton's parameters are what select the Triton lowering: a pallas_call
    # given none lowers through Mosaic GPU, which this kernel is not written for.
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _dot(a, b, contract_a: int, contract_b: int, precision):
  """2-D tile product with float32 accumulation (Triton: tensor-core mma)."""
  return lax.dot_general(
    a,
    b,
    (((contract_a,), (contract_b,)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def _masked_logits(q, k, valid, precision):
  """s = q k^T [bq, bk] in float32, -inf on masked keys."""
  s = _dot(q, k, 1, 1, precision)
  if valid is not None:
    s = jnp.where(valid[None, :] != 0, s, _NEG_INF)
  return s


def _probabilities(s, m, log_l):
  """p_ik = exp((s_ik - m_i) - log l_i), LSE_i = m_i + log l_i.

  The saved LSE would do in exact arithmetic, but when a row's logits are
  large (near-tied logits around 1e9, say) float32 rounds m + log l to m and
  exp(s - LSE) comes out l times too large; s - m is exact there. A row whose
  keys are all masked has m = log l = -inf and s = -inf everywhere; shifting
  by 0 instead makes its p exactly 0 rather than exp(nan).
  """
  empty = m == _NEG_INF
  m = jnp.where(empty, 0.0, m)
  log_l = jnp.where(empty, 0.0, log_l)
  return jnp.exp((s - m[:, None]) - log_l[:, None])


def _forward_kernel(q_ref, k_ref, *refs, cfg: _KernelConfig):
  """One query block: online max/sum over all key blocks (FlashAttention alg. 1)."""
  if cfg.masked:
    valid_ref, m_ref, log_l_ref = refs
  else:
    valid_ref, (m_ref, log_l_ref) = None, refs
  q = q_ref[...]
  n_key_blocks = k_ref.shape[0] // cfg.block_k

  def body(j, carry):
    m_prev, l_prev = carry
    keys = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
    valid = None if valid_ref is None else valid_ref[keys]
    s = _masked_logits(q, k_ref[keys, :], valid, cfg.precision)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # Running max still -inf (every key so far masked): shift by 0 so that
    # exp(-inf - shift) = 0 instead of exp(nan).
    shift = jnp.where(m_next == _NEG_INF, 0.0, m_next)
    # l_i <- l_i exp(m_old - m_new) + sum_k exp(s_ik - m_new)
    l_next = l_prev * jnp.exp(m_prev - shift) + jnp.sum(jnp.exp(s - shift[:, None]), axis=1)
    return m_next, l_next

  init = (jnp.full((q.shape[0],), _NEG_INF, jnp.float32), jnp.zeros((q.shape[0],), jnp.float32))
  m, l = lax.fori_loop(0, n_key_blocks, body, init)
  # LSE = m + log l, kept as its two parts for the backward (see
  # _probabilities); an all-masked row gives m = -inf, log 0 = -inf.
  m_ref[...] = m
  log_l_ref[...] = jnp.log(l)


def _dq_kernel(q_ref, k_ref, *refs, cfg: _KernelConfig):
  """One query block: dq_i = sum_k g_i p_ik k_k over all key blocks."""
  if cfg.masked:
    valid_ref, m_ref, log_l_ref, g_ref, dq_ref = refs
  else:
    valid_ref, (m_ref, log_l_ref, g_ref, dq_ref) = None, refs
  q, m, log_l, g = q_ref[...], m_ref[...], log_l_ref[...], g_ref[...]
  n_key_blocks = k_ref.shape[0] // cfg.block_k

  def body(j, acc):
    keys = pl.ds(pl.multiple_of(j * cfg.block_k, cfg.block_k), cfg.block_k)
    k = k_ref[keys, :]
    valid = None if valid_ref is None else valid_ref[keys]
    s = _masked_logits(q, k, valid, cfg.precision)
    # p_ik in [0, 1] is what the tile product rounds to k's dtype; g_i
    # multiplies the row once at the end, in float32, so a float16 product
    # never sees g_i p_ik (which exceeds 65504 under loss scaling).
    return acc + _dot(_probabilities(s, m, log_l).astype(k.dtype), k, 1, 0, cfg.precision)

  acc = lax.fori_loop(0, n_key_blocks, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc * g[:, None]).astype(dq_ref.dtype)


def _dk_kernel(q_ref, k_ref, *refs, cfg: _KernelConfig):
  """One key block: dk_k = sum_i g_i p_ik q_i over all query blocks."""
  if cfg.masked:
    valid_ref, m_ref, log_l_ref, g_ref, dk_ref = refs
    valid = valid_ref[...]
  else:
    (m_ref, log_l_ref, g_ref, dk_ref), valid = refs, None
  k = k_ref[...]
  n_query_blocks = q_ref.shape[0] // cfg.block_q

  def body(i, acc):
    rows = pl.ds(pl.multiple_of(i * cfg.block_q, cfg.block_q), cfg.block_q)
    q = q_ref[rows, :]
    s = _masked_logits(q, k, valid, cfg.precision)
    g = g_ref[rows]
    if q.dtype != jnp.float16:
      weight = _probabilities(s, m_ref[rows], log_l_ref[rows]) * g[:, None]
      # [bq, bk]^T [bq, D] -> [bk, D]
      return acc + _dot(weight.astype(q.dtype), q, 0, 0, cfg.precision)
    # g_i p_ik can exceed float16's 65504 where dk_k does not (a loss scale
    # of 2^17 on a peaked row): the tile product takes it divided by the
    # block's largest |g_i|, and that scale multiplies in float32.
    scale = jnp.max(jnp.abs(g))
    scale = jnp.where(scale > 0, scale, 1.0)
    weight = _probabilities(s, m_ref[rows], log_l_ref[rows]) * (g / scale)[:, None]
    return acc + scale * _dot(weight.astype(q.dtype), q, 0, 0, cfg.precision)

  acc = lax.fori_loop(0, n_query_blocks, body, jnp.zeros(k.shape, jnp.float32))
  dk_ref[...] = acc.astype(dk_ref.dtype)


def _cost(cfg, q, k, n_matmuls: int, n_exp: int, extra_bytes: int):
  m, d = q.shape
  n = k.shape[0]
  return pl.CostEstimate(
    flops=2 * m * n * d * n_matmuls,
    transcendentals=m * n * n_exp,
    bytes_accessed=(m + n) * d * q.dtype.itemsize + extra_bytes,
  )


def _whole(shape):
  """BlockSpec: the whole array for every grid step."""
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _forward_call(cfg: _KernelConfig, q, k, valid):
  m, d = q.shape
  n = k.shape[0]
  in_specs = [pl.BlockSpec((cfg.block_q, d), lambda i: (i, 0)), _whole((n, d))]
  args = [q, k]
  if cfg.masked:
    in_specs.append(_whole((n,)))
    args.append(valid)
  row_block = pl.BlockSpec((cfg.block_q,), lambda i: (i,))
  # Two [M] outputs: the row maximum m and log l (LSE = m + log l).
  return pl.pallas_call(
    functools.partial(_forward_kernel, cfg=cfg),
    out_shape=[jax.ShapeDtypeStruct((m,), jnp.float32)] * 2,
    grid=(m // cfg.block_q,),
    in_specs=in_specs,
    out_specs=[row_block, row_block],
    compiler_params=cfg.compiler_params(),
    cost_estimate=_cost(cfg, q, k, 1, 1, 8 * m),
    interpret=cfg.interpret,
    name="row_lse_forward",
  )(*args)


def _dq_call(cfg: _KernelConfig, q, k, valid, row_max, log_l, g):
  m, d = q.shape
  n = k.shape[0]
  row_block = pl.BlockSpec((cfg.block_q,), lambda i: (i,))
  in_specs = [pl.BlockSpec((cfg.block_q, d), lambda i: (i, 0)), _whole((n, d))]
  args = [q, k]
  if cfg.masked:
    in_specs.append(_whole((n,)))
    args.append(valid)
  return pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    grid=(m // cfg.block_q,),
    in_specs=in_specs + [row_block, row_block, row_block],
    out_specs=pl.BlockSpec((cfg.block_q, d), lambda i: (i, 0)),
    compiler_params=cfg.compiler_params(),
    cost_estimate=_cost(cfg, q, k, 2, 1, 12 * m + m * d * q.dtype.itemsize),
    interpret=cfg.interpret,
    name="row_lse_backward_dq",
  )(*args, row_max, log_l, g)


def _dk_call(cfg: _KernelConfig, q, k, valid, row_max, log_l, g):
  m, d = q.shape
  n = k.shape[0]
  in_specs = [_whole((m, d)), pl.BlockSpec((cfg.block_k, d), lambda j: (j, 0))]
  args = [q, k]
  if cfg.masked:
    in_specs.append(pl.BlockSpec((cfg.block_k,), lambda j: (j,)))
    args.append(valid)
  return pl.pallas_call(
    functools.partial(_dk_kernel, cfg=cfg),
    out_shape=jax.ShapeDtypeStruct(k.shape, k.dtype),
    grid=(n // cfg.block_k,),
    in_specs=in_specs + [_whole((m,))] * 3,
    out_specs=pl.BlockSpec((cfg.block_k, d), lambda j: (j, 0)),
    compiler_params=cfg.compiler_params(),
    cost_estimate=_cost(cfg, q, k, 2, 1, 12 * m + n * d * k.dtype.itemsize),
    interpret=cfg.interpret,
    name="row_lse_backward_dk",
  )(*args, row_max, log_l, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _padded_lse(cfg: _KernelConfig, q, k, valid):
  row_max, log_l = _forward_call(cfg, q, k, valid)
  return row_max + log_l


def _padded_lse_fwd(cfg, q, k, valid):
  row_max, log_l = _forward_call(cfg, q, k, valid)
  # Residuals are O((M + N) d): the inputs and the LSE's two [M] parts, never
  # the logits.
  return row_max + log_l, (q, k, valid, row_max, log_l)


def _padded_lse_bwd(cfg, residuals, g):
  q, k, valid, row_max, log_l = residuals
  g = g.astype(jnp.float32)
  dq = _dq_call(cfg, q, k, valid, row_max, log_l, g)
  dk = _dk_call(cfg, q, k, valid, row_max, log_l, g)
  return dq, dk, None


_padded_lse.defvjp(_padded_lse_fwd, _padded_lse_bwd)


def _fit_block(block: int, size: int) -> int:
  """The block, shrunk to the smallest power of two >= size for small inputs."""
  return min(block, max(_MIN_TILE, pl.next_power_of_2(size)))


@functools.partial(
  jax.jit,
  static_argnames=("block_q", "block_k", "interpret", "precision", "num_warps", "num_stages"),
)
def _row_logsumexp_pallas(
  queries,
  keys,
  key_valid,
  *,
  block_q: int,
  block_k: int,
  interpret: bool,
  precision,
  num_warps: int,
  num_stages: int,
):
  m, d = queries.shape
  n = keys.shape[0]
  block_q, block_k = _fit_block(block_q, m), _fit_block(block_k, n)
  m_pad, n_pad = -(-m // block_q) * block_q, -(-n // block_k) * block_k
  d_pad = max(_MIN_TILE, pl.next_power_of_2(d))
  masked = key_valid is not None or n_pad != n
  valid = None
  if masked:
    valid = jnp.ones((n,), jnp.int32) if key_valid is None else key_valid.astype(jnp.int32)
    valid = jnp.pad(valid, (0, n_pad - n))  # padded keys: 0, logit -inf
  cfg = _KernelConfig(block_q, block_k, masked, interpret, precision, num_warps, num_stages)
  q = jnp.pad(queries, ((0, m_pad - m), (0, d_pad - d)))
  k = jnp.pad(keys, ((0, n_pad - n), (0, d_pad - d)))
  # Slicing off the padded rows makes their cotangent zero in the backward
  # and drops their dq (the transpose of a slice is a zero pad).
  return _padded_lse(cfg, q, k, valid)[:m]


# --------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------


def row_logsumexp(
  queries: jax.Array,
  keys: jax.Array,
  *,
  key_valid: jax.Array | None = None,
  implementation: str | None = None,
  interpret: bool = False,
  block_q: int = DEFAULT_BLOCK_Q,
  block_k: int = DEFAULT_BLOCK_K,
  row_chunk: int | None = None,
  precision: lax.Precision | None = None,
  num_warps: int = 4,
  num_stages: int = 2,
) -> jax.Array:
  """LSE_i = log sum_{k : key_valid[k]} exp(queries[i] . keys[k]), float32 [M].

  Args:
    queries: [M, d] float array (float32, bfloat16 or float16 for "pallas").
    keys: [N, d] array of the same dtype.
    key_valid: optional bool [N]; False keys are left out of every sum.
    implementation: None ("pallas" when ``jax.default_backend() == "gpu"``,
      "reference" otherwise), "pallas" or "reference".
    interpret: run the Pallas kernels in interpret mode (any backend; slow).
    block_q, block_k: Pallas tile sizes (powers of two >= 16; shrunk for
      inputs smaller than one block).
    row_chunk: rows of logits held at once by the reference (None: all).
    precision: dot precision inside the Pallas kernels (None: the backend's
      default, TF32 tensor cores for float32 on Hopper;
      ``lax.Precision.HIGHEST`` for IEEE float32).
    num_warps, num_stages: Triton launch settings (ignored in interpret mode).

  Differentiable in queries and keys; the Pallas backward is O((M + N) d)
  memory. Accumulation is float32 for every input dtype; with float16 inputs
  a cotangent beyond float16's range is fine as long as dq and dk are in it
  (module doc).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"row_logsumexp: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
    )
  _check_inputs(queries, keys, key_valid)
  if implementation is None:
    # float64 (the tests' oracle) has no kernel: the reference takes it.
    on_gpu = jax.default_backend() == "gpu"
    fits = queries.shape[-1] <= AUTO_MAX_DIM
    implementation = "pallas" if on_gpu and fits and queries.dtype in PALLAS_DTYPES else "reference"
  if implementation == "reference":
    return row_logsumexp_reference(queries, keys, key_valid, row_chunk)
  if queries.dtype not in PALLAS_DTYPES:
    raise TypeError(
      f"row_logsumexp: the Pallas kernel takes {[jnp.dtype(t).name for t in PALLAS_DTYPES]}, "
      f"got queries of dtype {queries.dtype}; use implementation='reference'"
    )
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  if not interpret and jax.default_backend() != "gpu":
    raise ValueError(
      "row_logsumexp: the Pallas kernel is lowered through Triton and needs a GPU, "
      f"the default backend is {jax.default_backend()!r}; pass interpret=True "
      "or implementation='reference'"
    )
  return _row_logsumexp_pallas(
    queries,
    keys,
    key_valid,
    block_q=block_q,
    block_k=block_k,
    interpret=interpret,
    precision=precision,
    num_warps=num_warps,
    num_stages=num_stages,
  )


# --------------------------------------------------------------------------
# Benchmark: python -m kernels.row_lse
# --------------------------------------------------------------------------

GPU_SIZES = ((16384, 16384, 128), (65536, 65536, 128), (16384, 262144, 128), (16384, 1048576, 128))
CPU_SIZES = ((1024, 16384, 128),)
INTERPRET_SIZE = (64, 256, 32)
# The backward is counted as the work it needs: the logits recomputed once
# plus the dq and dk products, 3 x the forward's one product of 2 M N d
# (FlashAttention's 2.5 is attention's five backward products over its two
# forward ones). The two kernels execute 4 x, recomputing the logits in each.
BACKWARD_FLOP_FACTOR = 3.0


def _device_peak(dtype, precision) -> tuple[str, float] | None:
  """(label, dense peak TFLOP/s) of the default device, or None if unknown."""
  return peaks.device_peak(jax.devices()[0].device_kind, dtype, precision)


def _reference_chunk(n_rows: int, n_keys: int, budget_bytes: int = 1 << 30) -> int:
  """Rows per chunk so that one [chunk, N] float32 logit block fits the budget,
  and fewer than M: an unchunked reference would save its [M, N] logits for
  the backward, which then skips the recomputation that the FLOP count
  (and the kernel) includes."""
  fits = max(1, 2 ** int(math.log2(max(1, budget_bytes // (4 * n_keys)))))
  return max(1, min(fits, pl.next_power_of_2(n_rows) // 2))


def _time_forward_backward(lse_fn, q, k, g, repeats, warmup):
  """(forward s, backward s): the backward timed alone through a jitted vjp."""
  forward = jax.jit(lse_fn)
  _, vjp_fn = jax.vjp(lse_fn, q, k)
  backward = jax.jit(lambda vjp_fn, g: vjp_fn(g))
  return (
    median_seconds(lambda: forward(q, k), repeats, warmup),
    median_seconds(lambda: backward(vjp_fn, g), repeats, warmup),
  )


def _random_problem(m, n, d, dtype, seed=0):
  kq, kk, kg = jax.random.split(jax.random.key(seed), 3)
  # Unit-scale logits, as for normalised embeddings.
  q = (jax.random.normal(kq, (m, d), jnp.float32) / math.sqrt(d)).astype(dtype)
  k = jax.random.normal(kk, (n, d), jnp.float32).astype(dtype)
  g = jax.random.uniform(kg, (m,), jnp.float32)
  return q, k, g


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m kernels.row_lse", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--sizes", type=positive_triple, nargs="*", help="M,N,d triples (default: per backend)"
  )
  parser.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="input dtype"
  )
  parser.add_argument(
    "--repeats", type=count_at_least(1), default=10, help="timed calls; their median is shown"
  )
  parser.add_argument(
    "--warmup", type=count_at_least(0), default=2, help="untimed calls after compiling"
  )
  parser.add_argument(
    "--block-q",
    type=power_of_two_at_least(_MIN_TILE),
    default=DEFAULT_BLOCK_Q,
    help=f"query rows per tile (a power of two, at least {_MIN_TILE})",
  )
  parser.add_argument(
    "--block-k",
    type=power_of_two_at_least(_MIN_TILE),
    default=DEFAULT_BLOCK_K,
    help=f"keys per tile (a power of two, at least {_MIN_TILE})",
  )
  parser.add_argument(
    "--highest",
    action="store_true",
    help="IEEE float32 dots (no TF32) in the kernel and the reference",
  )
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  precision = lax.Precision.HIGHEST if args.highest else None
  on_gpu = jax.default_backend() == "gpu"
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype.name}")
  print(
    f"FLOPs: forward 2*M*N*d; backward {BACKWARD_FLOP_FACTOR} x forward "
    "(logits once, dq, dk; the kernels execute 4 x, recomputing the logits in each)"
  )
  if args.sizes:
    sizes = args.sizes
  else:
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
  peak = _device_peak(dtype, precision) if on_gpu else None
  if on_gpu:
    print("peak: " + (f"{peak[0]} = {peak[1]} TFLOP/s" if peak else "unknown device, none used"))
  else:
    print(
      "the Pallas kernel targets the GPU (Triton); on this backend only the chunked "
      "XLA reference is timed, and interpret mode is checked on a tiny size"
    )

  header = f"{'M':>8} {'N':>8} {'d':>4} {'pass':>4} {'chunk':>6} {'ref ms':>9} {'TFLOP/s':>8}"
  if on_gpu:
    header += f" {'pallas ms':>10} {'speedup':>8} {'TFLOP/s':>8} {'% peak':>7}"
  print(header)
  for m, n, d in sizes:
    q, k, g = _random_problem(m, n, d, dtype)
    chunk = _reference_chunk(m, n)
    ref_fn = functools.partial(row_logsumexp, implementation="reference", row_chunk=chunk)
    # With --highest the reference's products run in full float32 too, so the
    # speedup compares like with like (TF32 is the default on Hopper).
    with jax.default_matmul_precision("highest" if args.highest else None):
      ref_times = _time_forward_backward(ref_fn, q, k, g, args.repeats, args.warmup)
    ker_times = (None, None)
    if on_gpu:
      ker_fn = functools.partial(
        row_logsumexp,
        implementation="pallas",
        block_q=args.block_q,
        block_k=args.block_k,
        precision=precision,
      )
      ker_times = _time_forward_backward(ker_fn, q, k, g, args.repeats, args.warmup)
    for label, factor, ref_s, ker_s in (
      ("fwd", 1.0, ref_times[0], ker_times[0]),
      ("bwd", BACKWARD_FLOP_FACTOR, ref_times[1], ker_times[1]),
    ):
      flops = factor * 2 * m * n * d
      line = f"{m:>8} {n:>8} {d:>4} {label:>4} {chunk:>6} {ref_s * 1e3:>9.2f} {flops / ref_s / 1e12:>8.3f}"
      if ker_s is not None:
        tflops = flops / ker_s / 1e12
        share = f"{100 * tflops / peak[1]:>6.1f}%" if peak else f"{'-':>7}"
        line += f" {ker_s * 1e3:>10.2f} {ref_s / ker_s:>7.2f}x {tflops:>8.1f} {share}"
      print(line)

  if not on_gpu:
    m, n, d = INTERPRET_SIZE
    q, k, _ = _random_problem(m, n, d, jnp.float32)
    interp = jax.jit(functools.partial(row_logsumexp, implementation="pallas", interpret=True))
    seconds = median_seconds(lambda: interp(q, k), 3, 1)
    gap = float(jnp.max(jnp.abs(interp(q, k) - row_logsumexp_reference(q, k))))
    print(
      f"interpret mode {m}x{n}x{d}: {seconds * 1e3:.1f} ms, max |pallas - reference| = {gap:.2e}"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
