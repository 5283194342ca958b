"""The fused row log-sum-exp kernel against float64 NumPy references.

LSE_i = log sum_{k valid} exp(q_i . k_k); with p_ik = exp(q_i . k_k - LSE_i)
and a cotangent g, dq_i = g_i sum_k p_ik k_k and dk_k = sum_i g_i p_ik q_i.
The Pallas path runs in interpret mode (``INTERPRET = True``) on any backend;
`TestRowLsePallasCompiled` reruns the same tests compiled, on a GPU only.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import row_lse

# (M, N, d): M and N not multiples of the test blocks, multiples, and d not a
# power of two / below the minimum tile.
SHAPES = [(37, 53, 8), (64, 128, 16), (100, 300, 32)]
MASKS = ["none", "random"]
BLOCK_Q, BLOCK_K = 16, 32


# ---------------------------------------------------------------- references


def lse_reference(q, k, valid=None):
  """float64 LSE [M] and softmax p [M, N] (masked keys: p = 0)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  logits = q @ k.T
  if valid is not None:
    logits = np.where(np.asarray(valid)[None, :], logits, -np.inf)
  peak = logits.max(axis=1, keepdims=True)
  lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
  return lse, np.exp(logits - lse[:, None])


def lse_vjp_reference(q, k, g, valid=None):
  """(LSE, dq, dk) in float64 from the closed-form gradients."""
  lse, p = lse_reference(q, k, valid)
  weight = np.asarray(g, np.float64)[:, None] * p
  return lse, weight @ np.asarray(k, np.float64), weight.T @ np.asarray(q, np.float64)


def random_inputs(rng, m, n, d, mask, dtype=np.float32):
  # Logits of a few units (max over N around 10-20) exercise the running max.
  q = rng.normal(size=(m, d)).astype(dtype)
  k = (rng.normal(size=(n, d)) * 0.7).astype(dtype)
  g = rng.uniform(0.1, 1.0, size=m).astype(np.float32)
  valid = None
  if mask == "random":
    valid = rng.random(n) < 0.6
    valid[rng.integers(n)] = True  # at least one valid key per row
  return q, k, g, valid


def assert_close(actual, expected, rtol):
  """Elementwise |a - e| <= rtol (|e| + max|e|): relative to the array's scale."""
  expected = np.asarray(expected, np.float64)
  scale = float(np.max(np.abs(expected))) if expected.size else 1.0
  chex.assert_trees_all_close(
    np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * max(scale, 1.0)
  )


# ------------------------------------------------------------------ Pallas


class TestRowLsePallas:
  """The Pallas kernels (forward and custom-VJP backward)."""

  INTERPRET = True

  @pytest.fixture(autouse=True)
  def _needs_gpu_unless_interpreted(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled Pallas kernel needs a GPU")

  def lse_fn(self, valid=None, block_q=BLOCK_Q, block_k=BLOCK_K, **kwargs):
    return functools.partial(
      row_lse.row_logsumexp,
      key_valid=None if valid is None else jnp.asarray(valid),
      implementation="pallas",
      interpret=self.INTERPRET,
      block_q=block_q,
      block_k=block_k,
      # Compiled float32 dots would otherwise be TF32 on the GPU.
      precision=None if self.INTERPRET else jax.lax.Precision.HIGHEST,
      **kwargs,
    )

  @pytest.mark.parametrize("mask", MASKS)
  @pytest.mark.parametrize("shape", SHAPES)
  def test_forward_and_gradients(self, rng, shape, mask):
    q, k, g, valid = random_inputs(rng, *shape, mask)
    lse, vjp = jax.vjp(self.lse_fn(valid), jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(g))
    lse_64, dq_64, dk_64 = lse_vjp_reference(q, k, g, valid)
    chex.assert_shape(lse, (shape[0],))
    chex.assert_type(lse, jnp.float32)
    chex.assert_shape((dq, dk), (q.shape, k.shape))
    assert_close(lse, lse_64, 1e-5)
    assert_close(dq, dq_64, 2e-5)
    assert_close(dk, dk_64, 2e-5)
    if valid is not None:
      # Masked keys take no part in any sum: exactly zero gradient.
      np.testing.assert_array_equal(np.asarray(dk)[~valid], 0.0)

  def test_block_sizes_do_not_change_the_result(self, rng):
    q, k, g, valid = random_inputs(rng, 50, 70, 24, "random")
    results = []
    for block_q, block_k in ((16, 16), (32, 64)):
      lse, vjp = jax.vjp(self.lse_fn(valid, block_q, block_k), jnp.asarray(q), jnp.asarray(k))
      results.append((lse, *vjp(jnp.asarray(g))))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-5)

  @pytest.mark.parametrize(
    "m, n, block, bound",
    [
      (40, 90, None, 2e-2),
      # Many blocks on both axes: a dq or dk accumulated in 16 bits over 128
      # tiles drifts to about 5e-2 of its scale; float32 accumulation stays
      # near 2e-3.
      (512, 2048, 16, 8e-3),
    ],
  )
  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
  def test_half_precision_accumulates_in_float32(self, rng, dtype, m, n, block, bound):
    q, k, g, _ = random_inputs(rng, m, n, 16, "none")
    q16, k16 = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
    blocks = {} if block is None else dict(block_q=block, block_k=block)
    lse, vjp = jax.vjp(self.lse_fn(**blocks), q16, k16)
    dq, dk = vjp(jnp.asarray(g))
    chex.assert_type((lse, dq, dk), (jnp.float32, dtype, dtype))
    # Reference on the rounded inputs: the forward only rounds the inputs;
    # the backward also rounds p g to 16 bits for the tile product.
    lse_64, dq_64, dk_64 = lse_vjp_reference(
      np.asarray(q16, np.float32), np.asarray(k16, np.float32), g
    )
    assert_close(lse, lse_64, 1e-5)
    assert_close(np.asarray(dq, np.float32), dq_64, bound)
    assert_close(np.asarray(dk, np.float32), dk_64, bound)

  @pytest.mark.parametrize("mask", MASKS)
  def test_float16_backward_under_loss_scaling(self, rng, mask):
    # CoRE's case, queries = keys = Z: each row's own key dominates its
    # softmax (p_ii near 1), so under a loss scale of 2^17 the products
    # g_i p_ik pass float16's 65504 while dq and dk stay below it.
    # Masked, some of 40 further small keys are left out (the rows' own keys
    # stay in, and with them the dominant p_ii).
    m, d = 48, 64
    z = rng.choice([-0.5, 0.5], size=(m, d)) * rng.uniform(0.8, 1.0, size=(m, d))
    keys, valid = z, None
    if mask == "random":
      keys = np.concatenate([z, rng.normal(size=(40, d)) * 0.05])
      valid = np.concatenate([np.ones(m, bool), rng.random(40) < 0.6])
    q16, k16 = jnp.asarray(z, jnp.float16), jnp.asarray(keys, jnp.float16)
    g = rng.uniform(0.5, 0.95, size=m) * 2.0**17
    lse, vjp = jax.vjp(self.lse_fn(valid), q16, k16)
    dq, dk = vjp(jnp.asarray(g, jnp.float32))
    q32, k32 = np.asarray(q16, np.float32), np.asarray(k16, np.float32)
    _, p = lse_reference(q32, k32, valid)
    assert np.max(p * g[:, None]) > 65504  # the case this test is about
    lse_64, dq_64, dk_64 = lse_vjp_reference(q32, k32, g, valid)
    assert max(np.abs(dq_64).max(), np.abs(dk_64).max()) < 65504
    assert_close(lse, lse_64, 1e-5)
    assert_close(np.asarray(dq, np.float32), dq_64, 2e-3)
    assert_close(np.asarray(dk, np.float32), dk_64, 2e-3)

  def test_padded_rows_are_finite_and_get_zero_gradient(self, rng):
    # 21 rows and 40 keys in blocks of 16 and 32: 11 padded query rows and 24
    # padded keys inside the kernel. Appending explicit zero rows with zero
    # cotangent (as a fixed-shape caller pads) changes neither dk nor the
    # real rows, and the appended rows get dq = 0 and a finite LSE.
    q, k, g, valid = random_inputs(rng, 21, 40, 8, "random")
    fn = self.lse_fn(valid)
    lse, vjp = jax.vjp(fn, jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(g))
    q_pad = np.concatenate([q, np.zeros((7, q.shape[1]), q.dtype)])
    g_pad = np.concatenate([g, np.zeros(7, g.dtype)])
    lse_p, vjp_p = jax.vjp(fn, jnp.asarray(q_pad), jnp.asarray(k))
    dq_p, dk_p = vjp_p(jnp.asarray(g_pad))
    assert np.all(np.isfinite(np.asarray(lse_p)))
    assert_close(lse_p[21:], np.full(7, np.log(valid.sum())), 1e-6)  # zero query: log(#valid)
    np.testing.assert_array_equal(np.asarray(dq_p)[21:], 0.0)
    chex.assert_trees_all_close((lse_p[:21], dq_p[:21], dk_p), (lse, dq, dk), rtol=1e-6, atol=1e-6)

  def test_row_without_valid_keys(self, rng):
    q, k, g, _ = random_inputs(rng, 20, 35, 8, "none")
    valid = np.zeros(35, bool)
    lse, vjp = jax.vjp(self.lse_fn(valid), jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(lse), -np.inf)  # log of an empty sum
    np.testing.assert_array_equal(np.asarray(dq), 0.0)
    np.testing.assert_array_equal(np.asarray(dk), 0.0)
    # The reference agrees: jax.nn.logsumexp gives such a row a zero gradient too.
    lse_ref, vjp_ref = jax.vjp(
      lambda q, k: row_lse.row_logsumexp_reference(q, k, jnp.asarray(valid)),
      jnp.asarray(q),
      jnp.asarray(k),
    )
    np.testing.assert_array_equal(np.asarray(lse_ref), -np.inf)
    for grad in vjp_ref(jnp.asarray(g)):
      np.testing.assert_array_equal(np.asarray(grad), 0.0)

  @pytest.mark.parametrize("mask", MASKS)
  def test_large_tied_logits_keep_the_gradients(self, rng, mask):
    # Every logit is exactly 1e9 (representable in float32): LSE = 1e9 +
    # log(#valid keys), p uniform. In float32 m + log l rounds to m, so a
    # backward that recomputed p from the saved LSE would make every p 1.
    n, d = 37, 16
    q = np.ones((5, d), np.float32)
    k = np.full((n, d), 1e9 / d, np.float32)
    g = rng.uniform(0.1, 1.0, size=5).astype(np.float32)
    valid = None if mask == "none" else random_inputs(rng, 5, n, d, mask)[3]
    lse, vjp = jax.vjp(self.lse_fn(valid), jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(g))
    lse_64, dq_64, dk_64 = lse_vjp_reference(q, k, g, valid)
    assert_close(lse, lse_64, 1e-6)
    assert_close(dq, dq_64, 1e-5)
    assert_close(dk, dk_64, 1e-5)

  def test_under_jit_and_grad_of_a_scalar_loss(self, rng):
    # The mobility-loss shape of use: queries are rows of the keys.
    z, _, g, valid = random_inputs(rng, 45, 45, 16, "random")
    rows = rng.choice(45, 30, replace=False)
    fn = self.lse_fn(valid)

    @jax.jit
    def loss(z):
      return jnp.dot(jnp.asarray(g[:30]), fn(z[rows], z))

    z64 = z.astype(np.float64)
    _, dq_64, dk_64 = lse_vjp_reference(z64[rows], z64, g[:30], valid)
    expected = dk_64.copy()
    np.add.at(expected, rows, dq_64)
    assert_close(jax.grad(loss)(jnp.asarray(z)), expected, 2e-5)

  def test_vmap_over_seeds(self, rng):
    # The training step vectorises seeds with jax.vmap: a batched pallas_call.
    z = rng.normal(size=(3, 33, 8)).astype(np.float32)
    _, _, g, valid = random_inputs(rng, 20, 33, 8, "random")
    fn = self.lse_fn(valid)

    def loss(z):
      return jnp.dot(jnp.asarray(g), fn(z[:20], z))

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss)))(jnp.asarray(z))
    for seed in range(3):
      z64 = z[seed].astype(np.float64)
      lse_64, dq_64, dk_64 = lse_vjp_reference(z64[:20], z64, g, valid)
      dk_64[:20] += dq_64
      assert_close(values[seed], g @ lse_64, 1e-5)
      assert_close(grads[seed], dk_64, 2e-5)


class TestRowLsePallasCompiled(TestRowLsePallas):
  """The same tests with the kernels compiled (Triton); skipped without a GPU."""

  INTERPRET = False


# --------------------------------------------------------------- reference


@pytest.mark.parametrize("row_chunk", [None, 7, 1000])
@pytest.mark.parametrize("mask", MASKS)
def test_reference_with_row_chunk(rng, row_chunk, mask):
  q, k, g, valid = random_inputs(rng, 30, 50, 12, mask)
  fn = functools.partial(
    row_lse.row_logsumexp_reference,
    key_valid=None if valid is None else jnp.asarray(valid),
    row_chunk=row_chunk,
  )
  lse, vjp = jax.vjp(fn, jnp.asarray(q), jnp.asarray(k))
  dq, dk = vjp(jnp.asarray(g))
  lse_64, dq_64, dk_64 = lse_vjp_reference(q, k, g, valid)
  assert_close(lse, lse_64, 1e-5)
  assert_close(dq, dq_64, 2e-5)
  assert_close(dk, dk_64, 2e-5)


def test_reference_matches_float64_under_x64(rng):
  q, k, _, valid = random_inputs(rng, 17, 23, 5, "random", dtype=np.float64)
  with jax.enable_x64(True):
    lse = row_lse.row_logsumexp_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid), 4)
    chex.assert_type(lse, jnp.float64)
    np.testing.assert_allclose(np.asarray(lse), lse_reference(q, k, valid)[0], rtol=1e-12)


# ---------------------------------------------------------------- dispatch


def test_dispatch_picks_reference_off_gpu_and_pallas_on_gpu(rng, monkeypatch):
  q, k, _, _ = random_inputs(rng, 9, 11, 4, "none")
  calls = []
  monkeypatch.setattr(
    row_lse, "row_logsumexp_reference", lambda *a: calls.append("reference") or jnp.zeros(9)
  )
  monkeypatch.setattr(
    row_lse, "_row_logsumexp_pallas", lambda *a, **kw: calls.append("pallas") or jnp.zeros(9)
  )
  row_lse.row_logsumexp(q, k)
  assert calls == ["pallas" if jax.default_backend() == "gpu" else "reference"]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  row_lse.row_logsumexp(q, k)
  assert calls[-1] == "pallas"
  with jax.enable_x64(True):  # no kernel for float64: the reference takes it
    row_lse.row_logsumexp(jnp.asarray(q, jnp.float64), jnp.asarray(k, jnp.float64))
  assert calls[-1] == "reference"
  # Features wider than the fixed tiles were shaped for: the reference, by default.
  wide_q, wide_k = (jnp.zeros((9, row_lse.AUTO_MAX_DIM * 2), jnp.float32) for _ in range(2))
  row_lse.row_logsumexp(wide_q, wide_k)
  assert calls[-1] == "reference"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  row_lse.row_logsumexp(q, k)
  assert calls[-1] == "reference"
  row_lse.row_logsumexp(q, k, implementation="pallas", interpret=True)
  assert calls[-1] == "pallas"


def test_default_implementation_matches_reference(rng):
  q, k, _, valid = random_inputs(rng, 12, 19, 6, "random")
  got = row_lse.row_logsumexp(jnp.asarray(q), jnp.asarray(k), key_valid=jnp.asarray(valid))
  assert_close(got, lse_reference(q, k, valid)[0], 1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
  "q_shape, k_shape, valid_shape, kwargs, error, match",
  [
    ((8,), (5, 4), None, {}, ValueError, "queries must be a 2-D"),
    ((8, 4), (5, 3), None, {}, ValueError, "share the feature dimension"),
    ((8, 4), (5, 4), (4,), {}, ValueError, r"key_valid must have shape \(5,\)"),
    ((0, 4), (5, 4), None, {}, ValueError, "empty input"),
    ((8, 4), (5, 4), None, {"implementation": "triton"}, ValueError, "implementation must be"),
    ((8, 4), (5, 4), None, {"implementation": "pallas", "interpret": True, "block_q": 24},
     ValueError, "block_q must be a power of two"),
    ((8, 4), (5, 4), None, {"implementation": "pallas", "interpret": True, "block_k": 8},
     ValueError, "block_k must be a power of two >= 16"),
    ((8, 4), (5, 4), None, {"row_chunk": 0}, ValueError, "row_chunk must be a positive int"),
  ],
)  # fmt: skip
def test_bad_input_raises_a_clear_error(q_shape, k_shape, valid_shape, kwargs, error, match):
  valid = None if valid_shape is None else jnp.ones(valid_shape, bool)
  with pytest.raises(error, match=match):
    row_lse.row_logsumexp(
      jnp.ones(q_shape),
      jnp.ones(k_shape),
      key_valid=valid,
      **{"implementation": "reference", **kwargs},
    )


def test_bad_dtypes_raise_a_clear_error():
  with pytest.raises(TypeError, match="must have one dtype"):
    row_lse.row_logsumexp(jnp.ones((4, 3)), jnp.ones((5, 3), jnp.bfloat16))
  with pytest.raises(TypeError, match="keys must be a floating array"):
    row_lse.row_logsumexp(jnp.ones((4, 3)), jnp.ones((5, 3), jnp.int32))
  with pytest.raises(TypeError, match="key_valid must be a bool array"):
    row_lse.row_logsumexp(jnp.ones((4, 3)), jnp.ones((5, 3)), key_valid=jnp.ones(5))
  with jax.enable_x64(True):
    with pytest.raises(TypeError, match="the Pallas kernel takes"):
      row_lse.row_logsumexp(
        jnp.ones((4, 3), jnp.float64),
        jnp.ones((5, 3), jnp.float64),
        implementation="pallas",
        interpret=True,
      )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message off the GPU")
def test_compiled_pallas_off_gpu_says_to_interpret():
  with pytest.raises(ValueError, match="needs a GPU.*interpret=True"):
    row_lse.row_logsumexp(jnp.ones((4, 3)), jnp.ones((5, 3)), implementation="pallas")


# ------------------------------------------------------- Triton lowering


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_forward_and_backward_lower_to_triton(dtype, masked):
  """The GPU path lowers (Pallas -> Triton IR) for CUDA, checked without a GPU."""
  m, n, d = 100, (300 if masked else 256), 32
  valid = jax.ShapeDtypeStruct((n,), jnp.bool_) if masked else None

  def forward_backward(q, k, valid):
    fn = functools.partial(
      row_lse._row_logsumexp_pallas,
      key_valid=valid,
      block_q=64,
      block_k=64,
      interpret=False,
      precision=None,
      num_warps=4,
      num_stages=2,
    )
    lse, vjp = jax.vjp(fn, q, k)
    return lse, vjp(jnp.ones_like(lse))

  shapes = (jax.ShapeDtypeStruct((m, d), dtype), jax.ShapeDtypeStruct((n, d), dtype), valid)
  # Skip only for a jaxlib without the Triton bindings: a NotImplementedError
  # from the lowering itself (an unsupported primitive) is a failure.
  pytest.importorskip("jax._src.pallas.triton.lowering")
  lowered = jax.jit(forward_backward).trace(*shapes).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  for name in ("row_lse_forward", "row_lse_backward_dq", "row_lse_backward_dk"):
    assert name in text
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("m, n", [(1024, 16384), (16384, 16384), (16384, 1048576), (3, 5)])
def test_benchmark_reference_is_always_chunked(m, n):
  # Unchunked, the timed reference backward would reuse saved [M, N] logits
  # and skip the recomputation its FLOP count includes.
  chunk = row_lse._reference_chunk(m, n)
  assert 1 <= chunk < m and 4 * chunk * n <= 1 << 30


def test_benchmark_runs_without_a_gpu(capsys):
  assert row_lse.main(["--sizes", "40,96,16", "--repeats", "1", "--warmup", "1"]) == 0
  printed = capsys.readouterr().out
  assert "bwd" in printed and "interpret mode" in printed


@pytest.mark.parametrize("flag", ["--block-q", "--block-k"])
@pytest.mark.parametrize(
  "value, words", [("24", "must be a power of two, got 24"), ("8", "at least 16")]
)
def test_benchmark_tile_sizes_are_checked_at_the_command_line(flag, value, words, capsys):
  # The kernel takes powers of two from 16; a bad tile used to pass the
  # parser and fail at the first kernel call, after the reference's timings.
  with pytest.raises(SystemExit) as stop:
    row_lse.main([flag, value])
  assert stop.value.code == 2 and words in capsys.readouterr().err
