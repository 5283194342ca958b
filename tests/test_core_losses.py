"""CoRE's losses against float64 NumPy references written from the equations."""

import dataclasses

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.core import losses


# ---------------------------------------------------------------- references


def log_softmax_rows(m):
  m = m - m.max(axis=1, keepdims=True)
  return m - np.log(np.exp(m).sum(axis=1, keepdims=True))


def mobility_reference(z, target):
  """Eqs. (3)-(4): -sum_ij T_ij log(exp(z_i.z_j) / sum_k exp(z_i.z_k))."""
  return -np.sum(target * log_softmax_rows(z @ z.T))


def unit_rows(m):
  return m / np.linalg.norm(m, axis=1, keepdims=True)


def lma_reference(z_x, z_y, anchors, form):
  rel_x, rel_y = unit_rows(anchors @ z_x.T), unit_rows(anchors @ z_y.T)  # eq. (7)
  hat_x, hat_y = rel_x @ rel_x.T, rel_y @ rel_y.T  # eq. (8)
  n_a = anchors.shape[0]
  if form == "paper":
    return np.sum((unit_rows(hat_x) - unit_rows(hat_y)) ** 2) / n_a**2  # eq. (9)
  # The authors' code: cosine distances 1 - hat, mean over anchors of the
  # squared row distance.
  return np.mean(np.sum(((1 - hat_x) - (1 - hat_y)) ** 2, axis=1))


def lia_reference(z_x, z_y, w_q, b_q, w_k, b_k, form):
  d = w_q.shape[1]
  q_x, k_x, q_y, k_y = z_x @ w_q + b_q, z_x @ w_k + b_k, z_y @ w_q + b_q, z_y @ w_k + b_k
  attn_xy, attn_yx = q_x @ k_y.T / np.sqrt(d), q_y @ k_x.T / np.sqrt(d)  # eq. (11)
  if form == "paper":
    cor_x, cor_y = z_x @ z_x.T, z_y @ z_y.T  # eq. (10)
    return (
      np.sum((cor_x - attn_xy @ attn_yx) ** 2) / len(z_x) ** 2  # eq. (12)
      + np.sum((cor_y - attn_yx @ attn_xy) ** 2) / len(z_y) ** 2
    )
  cor_x, cor_y = q_x @ k_x.T / np.sqrt(d), q_y @ k_y.T / np.sqrt(d)
  return np.mean(np.sum((attn_xy @ attn_yx - cor_x) ** 2, axis=1)) + np.mean(
    np.sum((attn_yx @ attn_xy - cor_y) ** 2, axis=1)
  )


def random_query_key(rng, d):
  """W^q, b^q, W^k, b^k of eq. (11)."""
  return [
    rng.normal(size=(d, d)) / np.sqrt(d),
    rng.normal(size=d) * 0.1,
    rng.normal(size=(d, d)) / np.sqrt(d),
    rng.normal(size=d) * 0.1,
  ]


def random_target(rng, n, n_origins):
  target = np.zeros((n, n))
  origins = rng.choice(n, n_origins, replace=False)
  for i in origins:
    dest = rng.choice(n, rng.integers(1, min(n, 12)), replace=False)
    target[i, dest] = rng.random(len(dest))
  return target / target.sum()


def directional_derivative(f, x, direction, eps=1e-6):
  return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


SHAPES = [(7, 9, 4, 5), (40, 31, 16, 50), (120, 96, 32, 200)]


# ---------------------------------------------------------------- values


def sparse_target(target):
  """The arguments of `losses.mobility_loss` for a dense target matrix."""
  rows = np.flatnonzero(target.sum(1) > 0)
  origin, destination = np.nonzero(target)
  return rows, target.sum(1)[rows], origin, destination, target[origin, destination]


@pytest.mark.parametrize("row_chunk,edge_chunk", [(None, None), (1, 5), (7, None), (64, 1)])
@pytest.mark.parametrize("n,_,d,__", SHAPES)
def test_mobility_loss_matches_reference(rng, n, _, d, __, row_chunk, edge_chunk):
  z = rng.normal(size=(n, d))
  target = random_target(rng, n, max(1, n // 2))
  expected = mobility_reference(z, target)
  args = [jnp.asarray(a) for a in sparse_target(target)]
  args = args[:1] + [a.astype(jnp.float32) if a.dtype.kind == "f" else a for a in args[1:]]
  loss = lambda v: losses.mobility_loss(v, *args, row_chunk=row_chunk, edge_chunk=edge_chunk)
  got = loss(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=2e-5)
  direct = losses.mobility_loss_direct(
    jnp.asarray(z, jnp.float32), jnp.asarray(target, jnp.float32)
  )
  np.testing.assert_allclose(direct, expected, rtol=2e-5)
  # Row and edge blocks change nothing in the gradient either.
  unchunked = jax.grad(lambda v: losses.mobility_loss(v, *args))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(
    jax.grad(loss)(jnp.asarray(z, jnp.float32)), unchunked, rtol=1e-4, atol=1e-6
  )


def test_edge_blocks_under_seed_vmap(rng):
  """Seeds vmapped over the edge-blocked pair term (the training step's batching)."""
  n, d = 60, 8
  z = jnp.asarray(rng.normal(size=(3, n, d)), jnp.float32)
  target = random_target(rng, n, n // 2)
  args = [jnp.asarray(a) for a in sparse_target(target)]
  args = args[:1] + [a.astype(jnp.float32) if a.dtype.kind == "f" else a for a in args[1:]]
  assert len(args[-1]) > 7
  value_and_grad = lambda chunk: jax.vmap(
    jax.value_and_grad(lambda v: losses.mobility_loss(v, *args, edge_chunk=chunk))
  )(z)
  chex.assert_trees_all_close(value_and_grad(7), value_and_grad(None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "implementation, value_rtol, grad_rtol, grad_atol",
  [
    # The Pallas row normaliser in interpret mode, on any backend.
    ("pallas-interpret", 2e-5, 1e-4, 1e-6),
    # Compiled (Triton): its dots run at the default precision (TF32 on
    # Hopper), hence the looser tolerances.
    pytest.param(
      "pallas",
      2e-3,
      1e-2,
      1e-4,
      marks=pytest.mark.skipif(
        jax.default_backend() != "gpu", reason="the compiled Pallas row normaliser needs a GPU"
      ),
    ),
  ],
)
@pytest.mark.parametrize("n,d", [(45, 8), (70, 16)])
def test_mobility_loss_through_the_fused_kernel(
  rng, n, d, implementation, value_rtol, grad_rtol, grad_atol
):
  """The Pallas row normaliser inside the loss, against float64."""
  z = rng.normal(size=(n, d))
  target = random_target(rng, n, max(1, n // 2))
  args = [jnp.asarray(a) for a in sparse_target(target)]
  args = args[:1] + [a.astype(jnp.float32) if a.dtype.kind == "f" else a for a in args[1:]]
  loss = lambda v, impl: losses.mobility_loss(v, *args, lse_implementation=impl)
  z32 = jnp.asarray(z, jnp.float32)
  np.testing.assert_allclose(
    loss(z32, implementation), mobility_reference(z, target), rtol=value_rtol
  )
  np.testing.assert_allclose(
    jax.grad(loss)(z32, implementation),
    jax.grad(loss)(z32, "xla"),
    rtol=grad_rtol,
    atol=grad_atol,
  )
  with pytest.raises(ValueError, match="implementation"):
    loss(z32, "cuda")


@pytest.mark.parametrize(
  "backend, x64, width, expected",
  [
    ("cpu", False, 4, "xla"),
    ("gpu", False, 4, "pallas"),
    ("gpu", True, 4, "xla"),
    # Wider than the kernel's tiles are sized for: the kernel module's own
    # automatic choice keeps such rows on its reference, and so does this.
    ("gpu", False, 257, "xla"),
  ],
)
def test_default_row_normaliser_fits_the_backend_and_dtype(
  rng, monkeypatch, backend, x64, width, expected
):
  """None picks the kernel on a GPU, but float64 (which it does not take)
  and widths beyond `row_lse.AUTO_MAX_DIM` go to XLA there instead."""
  from kernels import row_lse

  calls = []
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(
    row_lse, "row_logsumexp", lambda q, k, **kw: calls.append(kw) or jnp.zeros(q.shape[0], q.dtype)
  )
  with jax.enable_x64(x64):
    z = jnp.asarray(rng.normal(size=(12, width)) / np.sqrt(width))
    got = losses.row_logsumexp(z, z)
    if expected == "xla":
      np.testing.assert_allclose(got, jax.nn.logsumexp(z @ z.T, axis=-1), rtol=1e-6)
  assert calls == (
    [{"implementation": "pallas", "interpret": False}] if expected == "pallas" else []
  )


@pytest.mark.parametrize("form", losses.FORMS)
@pytest.mark.parametrize("n_x,n_y,d,n_a", SHAPES)
def test_lma_matches_reference(rng, form, n_x, n_y, d, n_a):
  z_x, z_y = rng.normal(size=(n_x, d)), rng.normal(size=(n_y, d)) + 0.3
  anchors = rng.normal(size=(n_a, d))
  expected = lma_reference(z_x, z_y, anchors, form)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  np.testing.assert_allclose(
    losses.lma_direct(f32(z_x), f32(z_y), f32(anchors), form), expected, rtol=1e-4
  )
  np.testing.assert_allclose(
    losses.lma_lowrank(f32(z_x), f32(z_y), f32(anchors), form), expected, rtol=1e-3, atol=1e-5
  )
  with jax.enable_x64(True):
    np.testing.assert_allclose(
      losses.lma_lowrank(jnp.asarray(z_x), jnp.asarray(z_y), jnp.asarray(anchors), form),
      expected,
      rtol=1e-10,
      atol=1e-12,
    )


@pytest.mark.parametrize("form", losses.FORMS)
@pytest.mark.parametrize("n_x,n_y,d,_", SHAPES)
def test_lia_matches_reference(rng, form, n_x, n_y, d, _):
  z_x, z_y = rng.normal(size=(n_x, d)), rng.normal(size=(n_y, d))
  weights = random_query_key(rng, d)
  expected = lia_reference(z_x, z_y, *weights, form)
  f32 = [jnp.asarray(a, jnp.float32) for a in (z_x, z_y, *weights)]
  np.testing.assert_allclose(losses.lia_direct(*f32, form=form), expected, rtol=1e-4)
  np.testing.assert_allclose(losses.lia_lowrank(*f32, form=form), expected, rtol=2e-3)
  with jax.enable_x64(True):
    np.testing.assert_allclose(
      losses.lia_lowrank(*map(jnp.asarray, (z_x, z_y, *weights)), form=form), expected, rtol=1e-10
    )


def test_forms_are_validated():
  z = jnp.ones((3, 2))
  with pytest.raises(ValueError, match="loss form"):
    losses.lma_lowrank(z, z, z, form="neither")


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("form", losses.FORMS)
def test_alignment_gradients_match_float64_finite_differences(rng, form):
  n_x, n_y, d, n_a = 30, 24, 8, 40
  z_x, z_y = rng.normal(size=(n_x, d)), rng.normal(size=(n_y, d))
  anchors = rng.normal(size=(n_a, d))
  weights = random_query_key(rng, d)
  with jax.enable_x64(True):
    lma_grad = jax.grad(losses.lma_lowrank, argnums=(0, 1))(
      jnp.asarray(z_x), jnp.asarray(z_y), jnp.asarray(anchors), form
    )
    lia_grad = jax.grad(losses.lia_lowrank, argnums=(0, 1))(
      *map(jnp.asarray, (z_x, z_y, *weights)), form=form
    )
    # To NumPy inside the scope: a float64 jax array used after it would be
    # truncated to float32 in the products below.
    lma_grad, lia_grad = jax.tree.map(np.asarray, (lma_grad, lia_grad))
  for _ in range(3):
    direction_x = rng.normal(size=z_x.shape)
    numeric = directional_derivative(
      lambda z: lma_reference(z, z_y, anchors, form), z_x, direction_x
    )
    np.testing.assert_allclose(np.sum(lma_grad[0] * direction_x), numeric, rtol=1e-5, atol=1e-8)
    direction_y = rng.normal(size=z_y.shape)
    numeric = directional_derivative(
      lambda z: lia_reference(z_x, z, *weights, form), z_y, direction_y
    )
    np.testing.assert_allclose(np.sum(lia_grad[1] * direction_y), numeric, rtol=1e-5, atol=1e-8)


def test_mobility_gradient_matches_float64_finite_differences(rng):
  n, d = 25, 6
  z = rng.normal(size=(n, d))
  target = random_target(rng, n, 10)
  with jax.enable_x64(True):
    grad = jax.grad(losses.mobility_loss)(
      jnp.asarray(z), *[jnp.asarray(a) for a in sparse_target(target)], row_chunk=4
    )
    grad = np.asarray(grad)  # float64 NumPy, as above
  direction = rng.normal(size=z.shape)
  numeric = directional_derivative(lambda v: mobility_reference(v, target), z, direction)
  np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6)


@pytest.mark.parametrize("form", losses.FORMS)
def test_lowrank_float32_gradients_match_direct_float64(rng, form):
  """The trace expansion must not lose the gradient to cancellation in float32."""
  n_x, n_y, d, n_a = 300, 260, 32, 1000
  z_x, z_y = rng.normal(size=(n_x, d)), rng.normal(size=(n_y, d))
  anchors = rng.normal(size=(n_a, d))
  weights = random_query_key(rng, d)
  with jax.enable_x64(True):
    ref_lma = jax.grad(losses.lma_direct, argnums=(0, 1))(
      jnp.asarray(z_x), jnp.asarray(z_y), jnp.asarray(anchors), form
    )
    ref_lia = jax.grad(losses.lia_direct, argnums=(0, 1))(
      *map(jnp.asarray, (z_x, z_y, *weights)), form=form
    )
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got_lma = jax.grad(losses.lma_lowrank, argnums=(0, 1))(f32(z_x), f32(z_y), f32(anchors), form)
  got_lia = jax.grad(losses.lia_lowrank, argnums=(0, 1))(*map(f32, (z_x, z_y, *weights)), form=form)
  for got, ref in zip(got_lma + got_lia, ref_lma + ref_lia):
    scale = np.abs(np.asarray(ref)).max()
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(ref) / scale, atol=2e-3)


@pytest.mark.parametrize("form", losses.FORMS)
def test_lowrank_products_ask_for_full_float32_forward_and_backward(rng, form):
  # The low-rank losses are small differences of large trace terms: on a GPU
  # whose float32 dots default to TF32 they must ask for full precision. The
  # CPU computes every float32 dot in full, so the request is what is checked.
  n, d, n_a = 40, 8, 30
  z_x, z_y = (jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for _ in range(2))
  anchors = jnp.asarray(rng.normal(size=(n_a, d)), jnp.float32)
  weights = tuple(jnp.asarray(w, jnp.float32) for w in random_query_key(rng, d))

  def total(z_x, z_y):
    return losses.lma_lowrank(z_x, z_y, anchors, form) + losses.lia_lowrank(
      z_x, z_y, *weights, form=form
    )

  jaxpr = jax.make_jaxpr(jax.value_and_grad(total, argnums=(0, 1)))(z_x, z_y)

  def dots(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from dots(sub)

  found = list(dots(jaxpr.jaxpr))
  assert len(found) > 20
  for eqn in found:
    precision = eqn.params["precision"]
    assert precision is not None and all(p == jax.lax.Precision.HIGHEST for p in precision), eqn


def test_lowrank_losses_jit_and_vmap(rng):
  z = jnp.asarray(rng.normal(size=(3, 20, 8)), jnp.float32)
  anchors = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  batched = jax.jit(jax.vmap(lambda a, b: losses.lma_lowrank(a, b, anchors)))(z, z[::-1])
  chex.assert_shape(batched, (3,))
  single = [losses.lma_lowrank(z[i], z[2 - i], anchors) for i in range(3)]
  np.testing.assert_allclose(batched, single, rtol=1e-5)


def test_the_model_wires_each_city_to_its_own_terms(rng):
  # The loss functions are tested one by one above; this checks what the
  # step calls: each city's embeddings with its own target (eq. 4), the
  # pair crossed as eqs. 9 and 12 cross it, fresh anchors from the step key,
  # and the N x N reference path equal to the linear one.
  from experiments.bench_scale import synthetic_city_graph
  from jaxurban.core.model import LossSettings, _anchors, alignment_losses, mobility_losses

  graphs, dense = [], []
  for seed, n in ((0, 30), (1, 45)):
    graph = synthetic_city_graph(n, seed)
    target = np.zeros((n, n))
    np.add.at(target, (np.asarray(graph.target_origin), np.asarray(graph.target_destination)),
              np.asarray(graph.target))  # fmt: skip
    graphs.append(graph)
    dense.append(jnp.asarray(target, jnp.float32))
  z_x = jnp.asarray(rng.normal(size=(30, 8)) * 0.3, jnp.float32)
  z_y = jnp.asarray(rng.normal(size=(45, 8)) * 0.3, jnp.float32)
  settings = LossSettings(n_anchors=16)
  for direct in (False, True):
    terms = mobility_losses(z_x, z_y, *graphs, dataclasses.replace(settings, direct=direct))
    np.testing.assert_allclose(terms["re_x"], losses.mobility_loss_direct(z_x, dense[0]), rtol=1e-5)
    np.testing.assert_allclose(terms["re_y"], losses.mobility_loss_direct(z_y, dense[1]), rtol=1e-5)
  weights = tuple(jnp.asarray(w, jnp.float32) for w in random_query_key(rng, 8))
  key = jax.random.PRNGKey(7)
  anchors = jax.random.normal(key, (16, 8))
  np.testing.assert_array_equal(_anchors(key, z_x, settings), anchors)
  for direct in (False, True):
    terms = alignment_losses(z_x, z_y, weights, key, dataclasses.replace(settings, direct=direct))
    np.testing.assert_allclose(terms["lma"], losses.lma_direct(z_x, z_y, anchors), rtol=2e-4)
    np.testing.assert_allclose(terms["lia"], losses.lia_direct(z_x, z_y, *weights), rtol=2e-4)
  other = alignment_losses(z_x, z_y, weights, jax.random.PRNGKey(8), settings)["lma"]
  assert abs(float(other) - float(terms["lma"])) > 1e-6  # the anchors follow the key
