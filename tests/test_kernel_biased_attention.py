"""The spatially biased flash attention kernel against float64 references.

The Pallas kernels run in interpret mode (``INTERPRET = True``), which executes
the same kernel bodies on the CPU (`TestBiasedAttentionPallasCompiled` reruns
the tests compiled, on a GPU only); the oracle is the materialised-bias
reference evaluated in float64, or NumPy float64 written from eq. (1) of the
ToPT paper.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.biased_attention import (
  BlockSizes,
  biased_attention,
  biased_attention_reference,
  resolve_implementation,
  spatial_bias_reference,
)

GRAD_NAMES = ("q", "k", "v", "rbf_weight", "row_bias", "col_bias")


def make_inputs(rng, h, nq, nk, d, r, *, n_coords=2, masked=False):
  """Random float32 inputs; coordinates spread over a few RBF widths so that
  every basis function is active somewhere."""
  f32 = np.float32
  inputs = dict(
    q=rng.normal(size=(h, nq, d)).astype(f32),
    k=rng.normal(size=(h, nk, d)).astype(f32),
    v=rng.normal(size=(h, nk, d)).astype(f32),
    coords_q=rng.uniform(0.0, 3.0, (nq, n_coords)).astype(f32),
    coords_k=rng.uniform(0.0, 3.0, (nk, n_coords)).astype(f32),
    rbf_weight=rng.normal(size=(h, r)).astype(f32),
    rbf_centres=rng.uniform(0.0, 3.0, r).astype(f32),
    rbf_width=rng.uniform(0.5, 2.0, r).astype(f32),
    row_bias=rng.normal(size=(h, nq)).astype(f32),
    col_bias=rng.normal(size=(h, nk)).astype(f32),
  )
  if masked:
    valid = rng.random(nk) < 0.6
    valid[rng.integers(nk)] = True  # at least one valid key
    inputs["key_valid"] = valid
  return inputs


def run_with_grads(inputs, cotangent, use_row, use_col, **kwargs):
  """Output and the gradients of <out, cotangent> w.r.t. GRAD_NAMES (None for
  an absent bias)."""
  names = [n for n in GRAD_NAMES if (n != "row_bias" or use_row) and (n != "col_bias" or use_col)]

  def f(*args):
    a = dict(inputs, **dict(zip(names, args)))
    if not use_row:
      del a["row_bias"]
    if not use_col:
      del a["col_bias"]
    return biased_attention(**a, **kwargs)

  @jax.jit  # one compilation of forward and backward (eager float64 is slow)
  def forward_backward(args, cotangent):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent.astype(out.dtype))

  out, grads = forward_backward([inputs[n] for n in names], cotangent)
  grads = dict(zip(names, grads))
  return np.asarray(out), {n: np.asarray(grads[n]) if n in grads else None for n in GRAD_NAMES}


def to_float64(x):
  if isinstance(x, np.ndarray) and x.dtype != bool:
    return x.astype(np.float64)
  return x


def float64_reference(inputs, cotangent, use_row, use_col):
  with jax.enable_x64(True):
    as64 = {n: to_float64(x) for n, x in inputs.items()}
    out, grads = run_with_grads(
      as64, np.asarray(cotangent, np.float64), use_row, use_col, implementation="reference"
    )
  return out, grads


def assert_matches_float64(out, grads, ref_out, ref_grads, names=GRAD_NAMES):
  """Output within 2e-5 of the float64 reference; each gradient within 1e-4
  (relative) of it after dividing both by the reference's scale (at least 1)."""
  chex.assert_trees_all_close(out, ref_out.astype(np.float32), rtol=2e-5, atol=2e-5)
  for name in names:
    scale = max(1.0, float(np.max(np.abs(ref_grads[name]))))
    chex.assert_trees_all_close(
      grads[name] / scale,
      (ref_grads[name] / scale).astype(np.float32),
      rtol=1e-4,
      atol=1e-5,
      custom_message=f"gradient of {name}",
    )


def rbf_weight_gradient_scale(inputs, cotangent):
  """[H, R] Σ_ij |dS_ij| φ_r(d_ij) in float64 NumPy: the size of the terms
  whose sum is ∂L/∂rbf_weight[h, r]. Every row of dS = P∘(dP − δ) sums to
  zero, so that sum cancels; its rounding error scales with the terms, not
  with the (possibly much smaller) sum."""
  f64 = {n: np.asarray(x, np.float64) for n, x in inputs.items() if n != "key_valid"}
  q, k, v = f64["q"], f64["k"], f64["v"]
  dist = np.linalg.norm(f64["coords_q"][:, None] - f64["coords_k"][None], axis=-1)
  phi = np.exp(
    -(((dist[None] - f64["rbf_centres"][:, None, None]) / f64["rbf_width"][:, None, None]) ** 2)
  )
  logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1])
  logits += np.einsum("hr,rij->hij", f64["rbf_weight"], phi)
  logits += f64["row_bias"][:, :, None] + f64["col_bias"][:, None, :]
  logits = np.where(inputs["key_valid"][None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  do = np.asarray(cotangent, np.float64)
  delta = np.sum(do * np.einsum("hij,hjd->hid", p, v), axis=-1)
  ds = p * (np.einsum("hid,hjd->hij", do, v) - delta[:, :, None])
  return np.einsum("hij,rij->hr", np.abs(ds), phi)


class TestBiasedAttentionPallas:
  INTERPRET = True
  BLOCKS = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)

  @pytest.fixture(autouse=True)
  def _needs_gpu_unless_interpreted(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled Pallas kernel needs a GPU")

  def pallas(self, **kwargs):
    return dict(
      implementation="pallas",
      interpret=self.INTERPRET,
      block_sizes=self.BLOCKS,
      # Compiled float32 dots would otherwise be TF32 on the GPU.
      precision=None if self.INTERPRET else jax.lax.Precision.HIGHEST,
      **kwargs,
    )

  @pytest.mark.parametrize(
    "h, nq, nk, d, r, c, use_row, use_col, masked, scale",
    [
      (1, 37, 37, 16, 1, 2, False, False, False, None),  # N not a block multiple
      (3, 37, 37, 8, 4, 2, True, True, True, None),  # everything, D padded to 16
      (3, 20, 45, 16, 4, 2, False, True, True, None),  # cross-attention shape
      (1, 20, 45, 8, 1, 3, True, False, False, 0.3),  # 3-D coordinates, explicit scale
    ],
  )
  def test_forward_and_gradients_match_float64(
    self, rng, h, nq, nk, d, r, c, use_row, use_col, masked, scale
  ):
    inputs = make_inputs(rng, h, nq, nk, d, r, n_coords=c, masked=masked)
    if scale is not None:
      inputs["scale"] = scale
    cotangent = rng.normal(size=(h, nq, d)).astype(np.float32)
    out, grads = run_with_grads(inputs, cotangent, use_row, use_col, **self.pallas())
    ref_out, ref_grads = float64_reference(inputs, cotangent, use_row, use_col)

    assert np.all(np.isfinite(out))
    present = [name for name in GRAD_NAMES if ref_grads[name] is not None]
    for name in set(GRAD_NAMES) - set(present):
      assert grads[name] is None
    assert_matches_float64(out, grads, ref_out, ref_grads, present)
    if masked:
      dead = ~inputs["key_valid"]
      # Masked keys receive no attention, hence no key/value gradient.
      np.testing.assert_array_equal(grads["k"][:, dead], 0.0)
      np.testing.assert_array_equal(grads["v"][:, dead], 0.0)
      if use_col:
        np.testing.assert_array_equal(grads["col_bias"][:, dead], 0.0)

  @pytest.mark.parametrize(
    "h, nq, nk, d",
    [
      (1, 5, 3, 16),  # fewer queries and keys than the smallest block
      (2, 150, 70, 100),  # D > 64: backward query tiles half the forward's
      (1, 140, 130, 40),  # forward query blocks of 128, backward of 64
    ],
  )
  def test_default_block_sizes_match_float64(self, rng, h, nq, nk, d):
    # The default tiles (BlockSizes.for_head_dim), where the forward and the
    # backward tile the queries differently, and shapes below one tile.
    inputs = make_inputs(rng, h, nq, nk, d, 2, masked=True)
    cotangent = rng.normal(size=(h, nq, d)).astype(np.float32)
    kwargs = self.pallas()
    kwargs["block_sizes"] = None
    out, grads = run_with_grads(inputs, cotangent, True, True, **kwargs)
    ref_out, ref_grads = float64_reference(inputs, cotangent, True, True)
    assert_matches_float64(out, grads, ref_out, ref_grads)

  def test_rows_with_zero_cotangent_get_zero_gradient(self, rng):
    # The way a caller pads query nodes: their output rows are ignored (zero
    # cotangent), so their q and row-bias gradients must be exactly zero and
    # they must not disturb the other rows' gradients. Sizes are exact block
    # multiples here, so no wrapper padding is involved.
    h, nq, nk, d, r = 2, 32, 48, 16, 3
    inputs = make_inputs(rng, h, nq, nk, d, r, masked=True)
    padded = rng.random(nq) < 0.3
    padded[-1] = True
    cotangent = rng.normal(size=(h, nq, d)).astype(np.float32)
    cotangent[:, padded] = 0.0
    out, grads = run_with_grads(inputs, cotangent, True, True, **self.pallas())
    _, ref_grads = float64_reference(inputs, cotangent, True, True)

    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(grads["q"][:, padded], 0.0)
    np.testing.assert_array_equal(grads["row_bias"][:, padded], 0.0)
    for name in ("k", "v", "rbf_weight", "col_bias"):
      chex.assert_trees_all_close(
        grads[name], ref_grads[name].astype(np.float32), rtol=1e-4, atol=2e-5
      )

  def test_no_valid_key_gives_zeros_not_nan(self, rng):
    inputs = make_inputs(rng, 2, 20, 18, 16, 2)
    inputs["key_valid"] = np.zeros(18, bool)
    cotangent = rng.normal(size=(2, 20, 16)).astype(np.float32)
    out, grads = run_with_grads(inputs, cotangent, True, True, **self.pallas())
    ref_out, _ = float64_reference(inputs, cotangent, True, True)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(ref_out, 0.0)
    for name in GRAD_NAMES:
      np.testing.assert_array_equal(grads[name], 0.0)

  def test_large_common_offset_keeps_the_gradients(self, rng):
    # Every key carries the same -1e9 column bias (the usual additive mask,
    # put on all keys): the softmax is unchanged, uniform here since q = 0 and
    # the RBF weights are 0. The backward must not recompute P from a float32
    # LSE = m + log2 l, which rounds to m at this size and makes P 1 instead
    # of 1/n, every gradient n times too large.
    h, n, d, r = 2, 37, 16, 2
    inputs = make_inputs(rng, h, n, n, d, r, masked=True)
    inputs["q"] = np.zeros_like(inputs["q"])
    inputs["rbf_weight"] = np.zeros_like(inputs["rbf_weight"])
    inputs["col_bias"] = np.full_like(inputs["col_bias"], -1e9)
    cotangent = rng.normal(size=(h, n, d)).astype(np.float32)
    out, grads = run_with_grads(inputs, cotangent, False, True, **self.pallas())
    ref_out, ref_grads = float64_reference(inputs, cotangent, False, True)
    assert_matches_float64(
      out, grads, ref_out, ref_grads, ("q", "k", "v", "rbf_weight", "col_bias")
    )

  def test_float32_min_as_additive_mask(self, rng):
    # finfo(float32).min, JAX's usual additive mask, on some keys of head 0
    # and on every key of head 1. Scaled to base 2 inside the kernels it
    # would overflow; a head whose keys all carry it came out as zeros where
    # the reference gives the softmax of what remains (uniform here, the
    # logits' differences being absorbed by the mask's size).
    h, nq, nk, d, r = 2, 20, 37, 16, 2
    inputs = make_inputs(rng, h, nq, nk, d, r)
    col_bias = inputs["col_bias"]
    col_bias[0, 5:] = np.finfo(np.float32).min
    col_bias[1, :] = np.finfo(np.float32).min
    cotangent = rng.normal(size=(h, nq, d)).astype(np.float32)
    out, grads = run_with_grads(inputs, cotangent, False, True, **self.pallas())
    ref_out, ref_grads = float64_reference(inputs, cotangent, False, True)
    np.testing.assert_allclose(out[1], np.broadcast_to(inputs["v"][1].mean(0), (nq, d)), atol=1e-5)
    assert_matches_float64(
      out, grads, ref_out, ref_grads, ("q", "k", "v", "rbf_weight", "col_bias")
    )

  def test_gaussian_adjacency_special_case(self, rng):
    # R = 1, centre 0, width σ, weight λ: B = λ·exp(-(d/σ)²), the distance
    # adjacency of the ToPT paper, checked against NumPy float64 attention.
    h, n, d = 2, 37, 16
    inputs = make_inputs(rng, h, n, n, d, 1)
    lam = rng.uniform(0.1, 2.0, (h, 1))
    sigma = rng.uniform(0.5, 2.0)
    inputs.update(
      rbf_weight=lam.astype(np.float32),
      rbf_centres=np.zeros(1, np.float32),
      rbf_width=np.full(1, sigma, np.float32),
      coords_k=inputs["coords_q"],
    )
    del inputs["row_bias"], inputs["col_bias"]
    out = biased_attention(**inputs, **self.pallas())

    x = inputs["coords_q"].astype(np.float64)
    dist = np.sqrt(np.sum((x[:, None] - x[None]) ** 2, axis=-1))
    adjacency = np.exp(-((dist / np.float64(inputs["rbf_width"][0])) ** 2))
    bias = lam.astype(np.float32).astype(np.float64)[:, :, None] * adjacency[None]
    np.testing.assert_allclose(
      spatial_bias_reference(x, x, lam, np.zeros(1), np.full(1, sigma), None, None),
      lam[:, :, None] * np.exp(-((dist / sigma) ** 2))[None],
      rtol=1e-5,
      atol=1e-6,
    )
    q, k, v = (inputs[n].astype(np.float64) for n in "qkv")
    logits = np.einsum("hqd,hkd->hqk", q, k) / np.sqrt(d) + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("hqk,hkd->hqd", p, v)
    chex.assert_trees_all_close(np.asarray(out), expected.astype(np.float32), rtol=2e-5, atol=2e-5)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_inputs(self, rng, dtype):
    # The GPU dtypes: tile products in 16 bits with float32 accumulation.
    # Relative error of bf16 operands is expected between 1e-3 and 1e-2
    # (float16's, with three more mantissa bits, below that).
    h, nq, nk, d, r = 2, 37, 45, 16, 2
    inputs = make_inputs(rng, h, nq, nk, d, r, masked=True)
    cotangent = rng.normal(size=(h, nq, d)).astype(np.float32)
    ref_out, ref_grads = float64_reference(inputs, cotangent, True, True)
    for name in "qkv":
      inputs[name] = inputs[name].astype(dtype)
    out, grads = run_with_grads(inputs, cotangent, True, True, **self.pallas())
    assert out.dtype == dtype and grads["q"].dtype == dtype

    def rel(a, b):
      return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)

    assert rel(out, ref_out) < 1e-2
    for name in ("q", "k", "v", "col_bias"):
      assert rel(grads[name], ref_grads[name]) < 2e-2, name
    # ∂L/∂rbf_weight is a cancelling sum (see rbf_weight_gradient_scale): over
    # 200 random draws its error reached 6e-2 of the sum itself but stayed
    # below 6e-4 of its terms. Its value is checked tightly in float32 above.
    scale = rbf_weight_gradient_scale(inputs, cotangent)
    error = np.asarray(grads["rbf_weight"], np.float64) - ref_grads["rbf_weight"]
    assert np.linalg.norm(error) / np.linalg.norm(scale) < 2e-3

  def test_no_quadratic_array_outside_the_kernels(self, rng):
    # O(N) memory: tracing forward and backward, no array of N² elements
    # appears anywhere but inside the Pallas kernels (whose tiles are 16×16).
    n, d = 256, 16
    inputs = make_inputs(rng, 1, n, n, d, 2, masked=True)

    def loss(q, k, v, w, row, col):
      a = dict(inputs, q=q, k=k, v=v, rbf_weight=w, row_bias=row, col_bias=col)
      return jnp.sum(biased_attention(**a, **self.pallas()))

    names = ("q", "k", "v", "rbf_weight", "row_bias", "col_bias")
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*[inputs[k] for k in names])

    sizes, kernels = [], []

    def walk(jpr):
      for eqn in jpr.eqns:
        sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
        if eqn.primitive.name == "pallas_call":
          kernels.append(eqn)
          continue
        for param in eqn.params.values():
          inner = getattr(param, "jaxpr", None)
          if inner is not None and hasattr(inner, "eqns"):
            walk(inner)

    walk(jaxpr.jaxpr)
    assert len(kernels) == 3  # forward, dQ, dK/dV
    assert max(sizes) < n * n


def test_precision_setting_reaches_the_kernels(rng):
  # Interpret mode on the CPU computes float32 dots exactly either way; this
  # checks that the setting is accepted and passed through every kernel.
  inputs = make_inputs(rng, 2, 37, 37, 16, 2, masked=True)
  cotangent = rng.normal(size=(2, 37, 16)).astype(np.float32)
  blocks = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
  runs = [
    run_with_grads(
      inputs,
      cotangent,
      True,
      True,
      implementation="pallas",
      interpret=True,
      block_sizes=blocks,
      precision=precision,
    )
    for precision in (None, jax.lax.Precision.HIGHEST)
  ]
  np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-6)
  for name in GRAD_NAMES:
    np.testing.assert_allclose(runs[1][1][name], runs[0][1][name], rtol=1e-5, atol=1e-6)

  def lowered_text(precision):
    def loss(q):
      out = biased_attention(
        **dict(inputs, q=q),
        implementation="pallas",
        interpret=True,
        block_sizes=blocks,
        precision=precision,
      )
      return out.sum()

    return jax.jit(jax.grad(loss)).lower(inputs["q"]).as_text()

  # Every tile product of the forward and both backward kernels carries it.
  highest, default = lowered_text(jax.lax.Precision.HIGHEST), lowered_text(None)
  assert highest.count("HIGHEST") >= 9 and "DEFAULT" not in highest
  assert "HIGHEST" not in default


class TestBiasedAttentionPallasCompiled(TestBiasedAttentionPallas):
  """The same tests with the kernels compiled (Triton); skipped without a GPU."""

  INTERPRET = False


def test_spatial_bias_reference_matches_numpy(rng):
  h, nq, nk, r = 2, 7, 5, 3
  inputs = make_inputs(rng, h, nq, nk, 4, r)
  args = [
    inputs[n].astype(np.float64)
    for n in (
      "coords_q",
      "coords_k",
      "rbf_weight",
      "rbf_centres",
      "rbf_width",
      "row_bias",
      "col_bias",
    )
  ]
  cq, ck, w, c, s, row, col = args
  expected = np.zeros((h, nq, nk))
  for hh in range(h):
    for i in range(nq):
      for j in range(nk):
        dist = np.linalg.norm(cq[i] - ck[j])
        expected[hh, i, j] = (
          sum(w[hh, rr] * np.exp(-(((dist - c[rr]) / s[rr]) ** 2)) for rr in range(r))
          + row[hh, i]
          + col[hh, j]
        )
  with jax.enable_x64(True):
    got = np.asarray(spatial_bias_reference(*args))
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_dispatch_picks_reference_on_cpu(rng, monkeypatch):
  if jax.default_backend() == "gpu":
    pytest.skip("the dispatch under test is the non-GPU one")
  assert resolve_implementation(None) == "reference"
  assert resolve_implementation("pallas") == "pallas"
  with monkeypatch.context() as patched:
    patched.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_implementation(None, jnp.bfloat16) == "pallas"
    assert resolve_implementation(None, jnp.float64) == "reference"
    assert resolve_implementation(None, jnp.bfloat16, 128) == "pallas"
    assert resolve_implementation(None, jnp.bfloat16, 256) == "reference"
    assert resolve_implementation("pallas", jnp.bfloat16, 256) == "pallas"
  inputs = make_inputs(rng, 2, 9, 11, 8, 2, masked=True)
  auto = biased_attention(**inputs)
  ref = biased_attention_reference(**inputs)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
  with pytest.raises(ValueError, match="interpret=True"):
    biased_attention(**inputs, implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    biased_attention(**inputs, implementation="triton")
  with jax.enable_x64(True):
    wide = {
      k: jnp.asarray(v, jnp.float64) if k in ("q", "k", "v") else v for k, v in inputs.items()
    }
    with pytest.raises(TypeError, match="the Pallas kernel takes .*float64"):
      biased_attention(**wide, implementation="pallas", interpret=True)


@pytest.mark.parametrize(
  "field, bad, message",
  [
    ("q", lambda x: x[0], "'q'"),
    ("k", lambda x: x[:, :, :-1], "'k'"),
    ("v", lambda x: x[:, :-1], "'v'"),
    ("coords_k", lambda x: x[:-1], "'coords_k'"),
    ("coords_k", lambda x: np.concatenate([x, x], axis=1), "'coords_k'"),
    ("rbf_weight", lambda x: x[:1], "'rbf_weight'"),
    ("rbf_centres", lambda x: x[:-1], "'rbf_centres'"),
    ("rbf_width", lambda x: x[None], "'rbf_width'"),
    ("row_bias", lambda x: x[:, :-1], "'row_bias'"),
    ("col_bias", lambda x: x.T, "'col_bias'"),
    ("key_valid", lambda x: x[:-1], "'key_valid'"),
    ("key_valid", lambda x: x.astype(np.float32), "expected bool"),
  ],
)
def test_bad_shapes_raise_clear_errors(rng, field, bad, message):
  inputs = make_inputs(rng, 2, 6, 5, 4, 2, masked=True)
  inputs[field] = bad(inputs[field])
  with pytest.raises(ValueError, match=message):
    biased_attention(**inputs, implementation="pallas", interpret=True)


def test_gpu_lowering_builds_triton_kernels():
  """Lowers forward and backward for CUDA (no GPU needed): the kernels pass
  the Pallas Triton lowering rules at the default bf16 tile sizes."""
  pytest.importorskip("jax._src.pallas.triton.lowering")
  h, n, d, r = 2, 256, 64, 2
  bf16 = jnp.bfloat16
  q = jnp.ones((h, n, d), bf16)
  coords = jnp.ones((n, 2))

  def loss(q, k, v, w, row, col):
    out = biased_attention(
      q,
      k,
      v,
      coords,
      coords,
      w,
      rbf_centres=jnp.zeros(r),
      rbf_width=jnp.ones(r),
      row_bias=row,
      col_bias=col,
      implementation="pallas",
      interpret=False,
    )
    return jnp.sum(out.astype(jnp.float32))

  args = (q, q, q, jnp.ones((h, r)), jnp.ones((h, n)), jnp.ones((h, n)))
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
  if jax.default_backend() != "gpu":
    # The non-GPU guard in biased_attention refuses interpret=False; lower
    # with the default backend reported as GPU, as it is when targeting CUDA.
    from unittest import mock

    with mock.patch.object(jax, "default_backend", return_value="gpu"):
      text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  else:
    text = grad.trace(*args).lower().as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_benchmark_runs_without_a_gpu(capsys):
  from unittest import mock

  from kernels import biased_attention
  from kernels.biased_attention import main

  if jax.default_backend() == "gpu":
    pytest.skip("the GPU benchmark is too slow for the test suite")
  assert main(["--repeats", "1", "--warmup", "1"]) == 0
  printed = capsys.readouterr().out
  assert "targets the GPU" in printed and "ms" in printed
  # The GPU table's code path, with the kernel interpreted and the cuDNN
  # baselines falling back to XLA.
  table = ["--interpret", "--sizes", "40", "--heads", "1", "--head-dims", "16"]
  table += ["--dtypes", "float32", "--repeats", "1", "--warmup", "1"]
  assert main(table) == 0
  printed = capsys.readouterr().out
  row = [line for line in printed.splitlines() if line.split()[:3] == ["float32", "40", "16"]]
  assert len(row) == 1 and "failed" not in row[0]
  assert "(a) failed" not in printed
  # The kernel failing is an exit status of 1 for a calling script; the
  # baselines failing (a materialised bias out of memory) is not.
  with mock.patch.object(biased_attention, "median_seconds", side_effect=RuntimeError("boom")):
    assert main(table) == 1
  assert "the kernel (a) failed on 1 row(s)" in capsys.readouterr().out


def test_benchmark_names_the_tokamax_kernel_that_ran(capsys):
  # Left to choose, tokamax falls back silently to a materialised softmax;
  # its kernels are asked for one by one, and the column names the one that ran.
  from unittest import mock

  from kernels import biased_attention

  if jax.default_backend() == "gpu":
    pytest.skip("the GPU benchmark is too slow for the test suite")
  asked = []

  def dot_product_attention(q, k, v, bias=None, *, implementation):
    asked.append(implementation)
    if implementation == "mosaic":
      raise NotImplementedError("mosaic needs a Hopper GPU")
    return jax.nn.dot_product_attention(q, k, v, bias=bias)

  fake = mock.Mock(dot_product_attention=dot_product_attention)
  table = ["--interpret", "--sizes", "40", "--heads", "1", "--head-dims", "16"]
  table += ["--dtypes", "float32", "--repeats", "1", "--warmup", "1"]
  with mock.patch.object(biased_attention, "_import_tokamax", return_value=fake):
    assert biased_attention.main(table) == 0
  printed = capsys.readouterr().out
  row = [line for line in printed.splitlines() if line.split()[:3] == ["float32", "40", "16"]]
  assert len(row) == 1 and row[0].count("tokamax/triton") == 2  # columns (b) and (c)
  assert "(b) failed: tokamax/mosaic: NotImplementedError" in printed
  assert "(c) failed: tokamax/mosaic: NotImplementedError" in printed
  assert set(asked) == {"mosaic", "triton"}
