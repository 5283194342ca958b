"""ToPT's SREL: biased attention, centrality, switches, losses, training."""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.checkpoint import CheckpointMismatch
from jaxurban.data.hafusion import CityViews, load_city_views
from jaxurban.topt import srel, srel_losses, srel_train
from jaxurban.topt.srel import (
  Linear,
  _softmax_of_large_logits,
  centroids_to_km,
  dense_biased_attention,
  edge_pool,
  gaussian_adjacency,
  spatial_attention,
  strength_centrality,
)
from jaxurban.topt.srel_train import (
  HAFUSION_TRAINING,
  SRELConfig,
  build_model,
  parse_cli,
  prepare_data,
  train_srel_with_log,
)

# A model small enough to compile in a few seconds.
TINY = dict(
  embedding_dim=8,
  n_heads=2,
  n_layers=1,
  intra_layers=1,
  inter_layers=1,
  d_prime=4,
  memory=6,
  edge_channels=3,
  ff_dim=16,
)


def _np_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _np_distance(a, b):
  return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))


def _np_biased_attention(q, k, v, cq, ck, w, centres, widths, row=None, col=None, valid=None):
  logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1])
  d = _np_distance(cq, ck)
  for r in range(len(centres)):
    logits = logits + w[:, r, None, None] * np.exp(-(((d - centres[r]) / widths[r]) ** 2))
  if row is not None:
    logits = logits + row[:, :, None] + col[:, None, :]
  if valid is not None:
    logits = np.where(valid[None, None], logits, -np.inf)
  return np.einsum("hij,hjd->hid", _np_softmax(logits), v)


def test_spatial_attention_matches_float64_reference(rng):
  h, n, d, sigma, lam = 3, 11, 4, 2.5, 0.7
  q, k, v = (rng.normal(size=(h, n, d)) for _ in range(3))
  coords = rng.uniform(0, 10, size=(n, 2))
  params = {
    "rbf_weight": jnp.full((h, 1), lam, jnp.float32),
    "rbf_centres": jnp.zeros((1,), jnp.float32),
    "rbf_width": jnp.full((1,), sigma, jnp.float32),
  }
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = spatial_attention(f32(q), f32(k), f32(v), f32(coords), params)
  # eq. (1) with B_ij = lambda exp(-(d_ij / sigma)^2).
  logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(d)
  logits = logits + lam * np.exp(-((_np_distance(coords, coords) / sigma) ** 2))
  want = np.einsum("hij,hjd->hid", _np_softmax(logits), v)
  chex.assert_trees_all_close(np.asarray(got, np.float64), want, atol=2e-5, rtol=2e-5)
  # No bias / no coordinates is plain attention, and differs from the biased one.
  plain = np.einsum("hij,hjd->hid", _np_softmax(np.einsum("hid,hjd->hij", q, k) / np.sqrt(d)), v)
  for off in (
    spatial_attention(f32(q), f32(k), f32(v), None, params),
    spatial_attention(f32(q), f32(k), f32(v), f32(coords), None),
  ):
    chex.assert_trees_all_close(np.asarray(off, np.float64), plain, atol=2e-5, rtol=2e-5)
  assert np.abs(plain - want).max() > 1e-3


_ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize(
  "implementation, tolerance",
  [
    # The Pallas kernel in interpret mode, on any backend.
    ("kernel-interpret", 5e-5),
    # "kernel" is the compiled kernel on a GPU (off one it is the dense
    # reference itself: see the dispatch test below). Its float32 dots run at
    # the default precision, TF32 on Hopper, hence the tolerance.
    pytest.param(
      "kernel",
      1e-2,
      marks=pytest.mark.skipif(not _ON_GPU, reason="the compiled Pallas kernel needs a GPU"),
    ),
  ],
)
def test_spatial_attention_through_the_fused_kernel(rng, implementation, tolerance):
  """The Pallas kernel gives the dense path's values and gradients."""
  h, n, d = 2, 21, 8
  q, k, v = (jnp.asarray(rng.normal(size=(h, n, d)), jnp.float32) for _ in range(3))
  coords = jnp.asarray(rng.uniform(0, 10, size=(n, 2)), jnp.float32)
  centres, width = jnp.zeros((1,), jnp.float32), jnp.full((1,), 3.0, jnp.float32)

  def attend(q, k, v, lam, implementation):
    params = {
      "rbf_weight": jnp.broadcast_to(lam, (h, 1)),
      "rbf_centres": centres,
      "rbf_width": width,
    }
    return spatial_attention(q, k, v, coords, params, implementation=implementation)

  cotangent = jnp.asarray(rng.normal(size=(h, n, d)), jnp.float32)
  loss = lambda impl: lambda *a: jnp.sum(attend(*a, impl) * cotangent)
  args = (q, k, v, jnp.float32(0.4))
  dense = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2, 3))(*args)
  fused = jax.value_and_grad(loss(implementation), argnums=(0, 1, 2, 3))(*args)
  chex.assert_trees_all_close(fused, dense, atol=tolerance, rtol=tolerance)
  with pytest.raises(ValueError, match="implementation"):
    attend(*args, "cuda")


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_spatial_attention_dispatch(rng, monkeypatch, backend):
  """Which path of `kernels.biased_attention` each implementation runs.

  The two paths are replaced by recorders (the compiled kernel cannot run
  without a GPU) and the backend is faked, so both dispatches are checked on
  any machine.
  """
  from kernels import biased_attention as kernel_module

  calls = []

  def reference(q, *args, **kwargs):
    calls.append("reference")
    return jnp.zeros_like(q)

  def pallas(q, *args, interpret, **kwargs):
    calls.append("pallas-interpret" if interpret else "pallas-compiled")
    return jnp.zeros_like(q)

  monkeypatch.setattr(kernel_module, "biased_attention_reference", reference)
  monkeypatch.setattr(kernel_module, "_pallas_attention", pallas)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  h, n, d = 2, 5, 4
  q, k, v = (jnp.asarray(rng.normal(size=(h, n, d)), jnp.float32) for _ in range(3))
  coords = jnp.asarray(rng.uniform(0, 10, size=(n, 2)), jnp.float32)
  params = {
    "rbf_weight": jnp.full((h, 1), 0.4, jnp.float32),
    "rbf_centres": jnp.zeros((1,), jnp.float32),
    "rbf_width": jnp.full((1,), 3.0, jnp.float32),
  }
  expected = {
    "reference": "reference",
    # The fused kernel on a GPU, its dense reference elsewhere.
    "kernel": "pallas-compiled" if backend == "gpu" else "reference",
    "kernel-interpret": "pallas-interpret",
  }
  assert set(expected) == set(srel.ATTENTION_IMPLEMENTATIONS)
  for impl, path in expected.items():
    calls.clear()
    spatial_attention(q, k, v, coords, params, implementation=impl)
    assert calls == [path], impl


def test_dense_biased_attention_full_contract(rng):
  h, nq, nk, d, r = 2, 6, 9, 5, 3
  q = rng.normal(size=(h, nq, d))
  k, v = rng.normal(size=(h, nk, d)), rng.normal(size=(h, nk, d))
  cq, ck = rng.normal(size=(nq, 2)), rng.normal(size=(nk, 2))
  w, centres, widths = rng.normal(size=(h, r)), rng.uniform(0, 2, r), rng.uniform(0.5, 2, r)
  row, col = rng.normal(size=(h, nq)), rng.normal(size=(h, nk))
  # A fixed pattern: some keys masked, and every query keeps valid keys.
  valid = np.array([True, False, True, True, False, True, False, False, True])
  assert len(valid) == nk and 0 < valid.sum() < nk
  with jax.enable_x64(True):
    got = dense_biased_attention(
      *map(jnp.asarray, (q, k, v, cq, ck, w)),
      rbf_centres=jnp.asarray(centres),
      rbf_width=jnp.asarray(widths),
      row_bias=jnp.asarray(row),
      col_bias=jnp.asarray(col),
      key_valid=jnp.asarray(valid),
    )
    got = np.asarray(got)
  want = _np_biased_attention(q, k, v, cq, ck, w, centres, widths, row, col, valid)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_centrality_value(rng):
  latlon = np.stack([rng.uniform(41.7, 42.0, 9), rng.uniform(-87.9, -87.55, 9)], axis=-1)
  coords = centroids_to_km(latlon)
  # Planar km distances agree with great-circle (haversine) distances.
  lat, lon = np.radians(latlon[:, 0]), np.radians(latlon[:, 1])
  a = (
    np.sin((lat[:, None] - lat) / 2) ** 2
    + np.cos(lat[:, None]) * np.cos(lat) * np.sin((lon[:, None] - lon) / 2) ** 2
  )
  haversine = 2 * 6371.0088 * np.arcsin(np.sqrt(a))
  np.testing.assert_allclose(_np_distance(coords, coords), haversine, rtol=5e-3, atol=1e-6)
  sigma = 3.0
  strength = np.exp(-((_np_distance(coords, coords) / sigma) ** 2)).sum(axis=1)
  with jax.enable_x64(True):
    got = np.asarray(strength_centrality(gaussian_adjacency(jnp.asarray(coords), sigma)))
  np.testing.assert_allclose(got, strength / strength.max(), rtol=1e-12)
  np.testing.assert_allclose(got.max(), 1.0, rtol=1e-12)  # max-normalised


def _synthetic_views(rng, n=12, centroids=True) -> CityViews:
  trips = rng.integers(0, 30, size=(n, n)).astype(np.float64) + np.eye(n) * 50
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  poi = rng.integers(0, 20, size=(n, 26)).astype(np.float64) + 1
  landuse = rng.integers(0, 20, size=(n, 5)).astype(np.float64) + 1
  return CityViews(
    mobility=trips,
    poi=poi,
    poi_similarity=unit(poi) @ unit(poi).T,
    landuse=landuse,
    landuse_similarity=unit(landuse) @ unit(landuse).T,
    labels={k: rng.random(n) for k in ("crime", "checkIn", "serviceCall")},
    centroids=np.stack([41.8 + rng.random(n) * 0.2, -87.7 + rng.random(n) * 0.2], -1)
    if centroids
    else None,
    city="Chi",
    mobility_dist=trips.T.copy(),
  )


def _apply(model, params, data):
  out = model.apply({"params": params}, data.poi, data.landuse, data.mobility_features, data.coords)
  return np.asarray(out["embedding"])


def test_switches_change_the_output(rng):
  data = prepare_data(_synthetic_views(rng))
  config = SRELConfig(**TINY, spatial_lambda=3.0)
  full = build_model(config)
  params = full.init(
    jax.random.PRNGKey(0), data.poi, data.landuse, data.mobility_features, data.coords
  )["params"]
  out = _apply(full, params, data)
  chex.assert_tree_all_finite(out)

  # Spatial bias off == lambda = 0 with the bias on, and differs from lambda != 0.
  no_bias = build_model(dataclasses.replace(config, spatial_bias=False))
  without_lambda = {k: v for k, v in params.items() if k != "spatial_lambda"}
  out_no_bias = _apply(no_bias, without_lambda, data)
  out_zero = _apply(full, {**params, "spatial_lambda": jnp.zeros(())}, data)
  np.testing.assert_allclose(out_no_bias, out_zero, rtol=1e-5, atol=1e-6)
  assert np.abs(out - out_no_bias).max() > 1e-5

  # Centrality off == a zero centrality projection, and differs from the real one.
  no_cent = build_model(dataclasses.replace(config, centrality=False))
  without_proj = {k: v for k, v in params.items() if k != "centrality_proj"}
  zero_proj = jax.tree.map(jnp.zeros_like, params["centrality_proj"])
  np.testing.assert_allclose(
    _apply(no_cent, without_proj, data),
    _apply(full, {**params, "centrality_proj": zero_proj}, data),
    rtol=1e-5,
    atol=1e-6,
  )
  assert np.abs(out - _apply(no_cent, without_proj, data)).max() > 1e-5

  # A fixed lambda is no parameter and acts as the learnable one at the
  # same value; another fixed value changes the output.
  fixed = build_model(dataclasses.replace(config, lambda_learnable=False))
  np.testing.assert_allclose(_apply(fixed, without_lambda, data), out, rtol=1e-5, atol=1e-6)
  fixed_other = build_model(dataclasses.replace(config, lambda_learnable=False, spatial_lambda=0.5))
  assert np.abs(_apply(fixed_other, without_lambda, data) - out).max() > 1e-5

  # Without coordinates (New York) neither exists.
  no_coords = full.init(jax.random.PRNGKey(0), data.poi, data.landuse, data.mobility_features)
  assert "spatial_lambda" not in no_coords["params"]
  assert "centrality_proj" not in no_coords["params"]


def test_attention_out_projection_bias_starts_at_zero(rng):
  """As nn.MultiheadAttention's out_proj: zero bias, nn.Linear's kernel; every
  plain nn.Linear keeps its uniform +-1/sqrt(fan_in) bias."""
  data = prepare_data(_synthetic_views(rng))
  model = build_model(SRELConfig(**TINY))
  params = model.init(
    jax.random.PRNGKey(0), data.poi, data.landuse, data.mobility_features, data.coords
  )["params"]
  d = data.mobility_features.shape[0]
  out_proj = {f"{view}_intra_0/Linear_0" for view in ("poi", "landuse", "mobility")}
  out_proj.add("graphormer_0/Linear_0")
  linears = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in path]
    if names[-1] == "bias" and "LayerNorm" not in names[-2] and not names[-2].startswith("_QKV"):
      linears["/".join(names[:-1])] = leaf
  assert out_proj <= set(linears) and len(linears) > len(out_proj)
  for name, bias in linears.items():
    if name in out_proj:
      np.testing.assert_array_equal(np.asarray(bias), 0.0, err_msg=name)
      kernel = np.asarray(_subtree(params, name)["kernel"])
      assert 0 < np.abs(kernel).max() <= 1.0 / np.sqrt(d), name
    else:
      assert np.all(np.asarray(bias) != 0.0), name


def _subtree(params, name):
  for key in name.split("/"):
    params = params[key]
  return params


def test_dropout_only_in_training(rng):
  data = prepare_data(_synthetic_views(rng))
  model = build_model(SRELConfig(**TINY))
  args = (data.poi, data.landuse, data.mobility_features, data.coords)
  params = model.init(jax.random.PRNGKey(1), *args)["params"]
  train = lambda seed: model.apply(
    {"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
  )["embedding"]
  assert np.abs(np.asarray(train(0) - train(1))).max() > 1e-6
  # Scoring must equal the same parameters through a dropout-free model, even
  # with a dropout key supplied: any dropout leaking into scoring would differ.
  undropped = build_model(SRELConfig(**TINY, dropout=0.0))
  reference = _apply(undropped, params, data)
  scored = model.apply(
    {"params": params}, *args, deterministic=True, rngs={"dropout": jax.random.PRNGKey(0)}
  )["embedding"]
  chex.assert_trees_all_close(np.asarray(scored), reference, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(_apply(model, params, data), reference, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(train(0)) - reference).max() > 1e-6


@pytest.mark.parametrize("biased", [False, True])
def test_attention_dropout_drops_the_attention_weights(rng, biased):
  """As HAFusion's RegionFusionBlock: attention_dropout drops the Graphormer
  layer's attention weights in training (the feed-forward dropouts draw the
  same masks either way) and changes nothing when scoring, with or without
  the spatial bias (then in the dense form)."""
  n = 9
  x = jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)
  coords = jnp.asarray(rng.uniform(0, 5, size=(n, 2)), jnp.float32) if biased else None
  bias = None
  if biased:
    bias = {
      "rbf_weight": jnp.full((2, 1), 1.5, jnp.float32),
      "rbf_centres": jnp.zeros((1,), jnp.float32),
      "rbf_width": jnp.full((1,), 2.0, jnp.float32),
    }
  layers = {
    dropped: srel.GraphormerLayer(2, 16, 0.5, "reference", attention_dropout=dropped)
    for dropped in (False, True)
  }
  params = layers[False].init(jax.random.PRNGKey(0), x, coords, bias, True)
  chex.assert_trees_all_equal_structs(
    params, layers[True].init(jax.random.PRNGKey(0), x, coords, bias, True)
  )
  scored = {d: layer.apply(params, x, coords, bias, True) for d, layer in layers.items()}
  chex.assert_trees_all_close(scored[True], scored[False], rtol=1e-5, atol=1e-5)
  trained = {
    d: layer.apply(params, x, coords, bias, False, rngs={"dropout": jax.random.PRNGKey(1)})
    for d, layer in layers.items()
  }
  assert np.abs(np.asarray(trained[True] - trained[False])).max() > 1e-3

  # Where the mask acts: on the softmax weights (bias included), inverted
  # scaling, before the product with V.
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and len(context.module.scope.path) == 1:
      seen[context.module.scope.path[0]] = (args, out)
    return out

  with nn.intercept_methods(record):
    layers[True].apply(params, x, coords, bias, False, rngs={"dropout": jax.random.PRNGKey(1)})
  q, k, v = (np.asarray(a, np.float64) for a in seen["_QKV_0"][1])
  logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1])
  if biased:
    c = np.asarray(coords, np.float64)
    distance = np.linalg.norm(c[:, None] - c[None], axis=-1)
    logits = logits + 1.5 * np.exp(-((distance / 2.0) ** 2))
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  (dropout_input,), dropped = seen["Dropout_0"]
  np.testing.assert_allclose(np.asarray(dropout_input), weights, rtol=1e-4, atol=1e-6)
  dropped = np.asarray(dropped, np.float64)
  kept = dropped != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(dropped[kept], weights[kept] / 0.5, rtol=1e-4)
  (merged,), _ = seen["Linear_0"]
  expected = np.asarray(srel._merge_heads(jnp.asarray(np.einsum("hij,hjd->hid", dropped, v))))
  np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-4, atol=1e-5)


def test_attention_dropout_settings(capsys):
  hafusion = SRELConfig.for_city("Chi", **HAFUSION_TRAINING)
  assert hafusion.attention_dropout and not SRELConfig().attention_dropout
  config, _ = parse_cli(["--attention-dropout"])
  assert config == SRELConfig(attention_dropout=True)
  with pytest.raises(SystemExit):
    parse_cli(["--hafusion", "--attention-dropout"])
  assert "--hafusion drops its attention weights already" in capsys.readouterr().err


def test_losses_match_float64_references(rng):
  n, d = 7, 5
  s, t, p, u = (rng.normal(size=(n, d)) for _ in range(4))
  trips = rng.integers(0, 40, size=(n, n)).astype(np.float64)
  sim_p, sim_u = rng.random((n, n)), rng.random((n, n))
  m = trips / trips.mean()
  ref_mob = (
    -(m * np.log(_np_softmax(s @ t.T) + 1e-4)).sum()
    - (m.T * np.log(_np_softmax(t @ s.T) + 1e-4)).sum()
  )
  cos = lambda x: (
    (x / np.linalg.norm(x, axis=1, keepdims=True))
    @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
  )
  ref_p = np.mean((cos(p) - sim_p) ** 2)
  ref_u = np.mean((cos(u) - sim_u) ** 2)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  total, terms = srel_losses.srel_loss(
    {"source": f32(s), "destination": f32(t), "poi": f32(p), "landuse": f32(u)},
    srel_losses.normalise_mobility(f32(trips)),
    f32(sim_p),
    f32(sim_u),
  )
  np.testing.assert_allclose(float(terms["mobility"]), ref_mob, rtol=1e-5)
  np.testing.assert_allclose(float(terms["poi"]), ref_p, rtol=1e-5)
  np.testing.assert_allclose(float(terms["landuse"]), ref_u, rtol=1e-5)
  np.testing.assert_allclose(float(total), ref_mob + ref_p + ref_u, rtol=1e-5)


@pytest.mark.parametrize("channels,n", [(3, 5), (32, 77)])
def test_edge_pool_matches_float64_direct_form(rng, channels, n):
  """Values and all three gradients of the closed-form edge term against
  autodiff of sum_j softmax_j(e) e, e = w a + b, in float64 numpy/jax."""
  a = _np_softmax(rng.normal(size=(n, n)) * 3.0)
  w = rng.uniform(-1.0, 1.0, channels)
  b = rng.uniform(-1.0, 1.0, channels)
  g = rng.normal(size=(channels, n))
  edges = a[None] * w[:, None, None] + b[:, None, None]
  expected = np.sum(_np_softmax(edges) * edges, axis=-1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  chex.assert_trees_all_close(np.asarray(edge_pool(f32(a), f32(w), f32(b))), expected, atol=1e-6)
  with jax.enable_x64(True):
    direct = lambda a, w, b: jnp.sum(
      jnp.sum(
        jax.nn.softmax(a[None] * w[:, None, None] + b[:, None, None], -1)
        * (a[None] * w[:, None, None] + b[:, None, None]),
        -1,
      )
      * g
    )
    grads64 = jax.grad(direct, (0, 1, 2))(jnp.asarray(a), jnp.asarray(w), jnp.asarray(b))
  closed = jax.grad(lambda a, w, b: jnp.sum(edge_pool(a, w, b) * f32(g)), (0, 1, 2))(
    f32(a), f32(w), f32(b)
  )
  for got, want in zip(closed, grads64):
    scale = float(np.max(np.abs(np.asarray(want))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * max(scale, 1.0))


def test_softmax_of_large_logits(rng):
  """Same values and gradients as jax.nn.softmax, including at the row maximum,
  and finite where the logits are of the size the raw mobility view gives."""
  x = jnp.asarray(rng.normal(size=(2, 6, 9)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 6, 9)), jnp.float32)
  chex.assert_trees_all_close(_softmax_of_large_logits(x), jax.nn.softmax(x, -1), atol=1e-6)
  ours = jax.grad(lambda x: jnp.sum(_softmax_of_large_logits(x) * g))(x)
  theirs = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, -1) * g))(x)
  chex.assert_trees_all_close(ours, theirs, atol=1e-6)
  huge = x * 1e9
  value, grad = jax.value_and_grad(lambda x: jnp.sum(_softmax_of_large_logits(x) * g))(huge)
  chex.assert_tree_all_finite((value, grad))


def test_out_by_in_linear_is_the_same_map(rng):
  """Storing W as [out, in] changes the layout only: same function given
  the transposed kernel, same initial distribution bound 1/sqrt(in)."""
  x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
  plain, flipped = Linear(3), Linear(3, out_by_in=True)
  p_flipped = flipped.init(jax.random.PRNGKey(0), x)
  assert p_flipped["params"]["kernel"].shape == (3, 64)
  assert float(jnp.max(jnp.abs(p_flipped["params"]["kernel"]))) <= 1.0 / 8.0
  moved = {"params": {**p_flipped["params"], "kernel": p_flipped["params"]["kernel"].T}}
  chex.assert_trees_all_close(flipped.apply(p_flipped, x), plain.apply(moved, x), atol=1e-6)


class _Killed(Exception):
  pass


def test_step_compiles_once_and_resumes(tmp_path, rng, monkeypatch):
  views = _synthetic_views(rng, centroids=False)
  config = SRELConfig(**TINY, epochs=6, log_every=2, checkpoint_every=6)
  # The loss is traced once for the whole run: the three chunks reuse one
  # compiled train step (params / optimiser state donated, shapes fixed).
  make_loss = srel_train.make_loss
  traced = lambda model: chex.assert_max_traces(make_loss(model), n=1)
  monkeypatch.setattr(srel_train, "make_loss", traced)
  first, log = train_srel_with_log(config, views, seeds=(3, 4), workdir=tmp_path, progress=False)
  chex.assert_shape(first, (2, views.n_regions, TINY["embedding_dim"]))
  chex.assert_tree_all_finite(first)
  assert len(log["history"]) == 3
  # Two seeds give two different models.
  assert np.abs(first[0] - first[1]).max() > 1e-6
  assert (tmp_path / "checkpoints" / "srel").is_dir()
  assert (tmp_path / "srel_config.json").is_file()
  assert (tmp_path / "srel_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A rerun resumes from the last checkpoint, trains nothing more and keeps
  # the loss history, which travels inside the checkpoint.
  again, log_again = train_srel_with_log(
    config, views, seeds=(3, 4), workdir=tmp_path, progress=False
  )
  assert log_again["resumed_from"] == 6
  assert log_again["history"] == log["history"]
  np.testing.assert_array_equal(first, again)
  # Other input data is refused, not resumed.
  other = dataclasses.replace(views, poi=views.poi[::-1].copy())
  with pytest.raises(CheckpointMismatch, match="inputs_sha256"):
    train_srel_with_log(config, other, seeds=(3, 4), workdir=tmp_path, progress=False)

  # A run killed right after its checkpoint at epoch 4 resumes there and ends
  # where the uninterrupted run did, with the same loss history.
  save = srel_train.Checkpointer.save

  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 4:
      raise _Killed

  monkeypatch.setattr(srel_train, "make_loss", make_loss)  # these runs trace it anew
  often = dataclasses.replace(config, checkpoint_every=2)  # not part of the result
  monkeypatch.setattr(srel_train.Checkpointer, "save", save_then_die)
  with pytest.raises(_Killed):
    train_srel_with_log(often, views, seeds=(3, 4), workdir=tmp_path / "killed", progress=False)
  monkeypatch.setattr(srel_train.Checkpointer, "save", save)
  resumed, log_resumed = train_srel_with_log(
    often, views, seeds=(3, 4), workdir=tmp_path / "killed", progress=False
  )
  assert log_resumed["resumed_from"] == 4
  # Its time includes the killed run's up to the checkpoint it resumed from.
  assert log_resumed["train_seconds_including_earlier_runs"] > log_resumed["train_seconds"]
  # ... and an uninterrupted run's two figures span the same time (the
  # set-up before the epochs counted in neither).
  gap = log["train_seconds_including_earlier_runs"] - log["train_seconds"]
  assert abs(gap) < 0.05
  assert log_resumed["history"] == log["history"]
  np.testing.assert_array_equal(resumed, first)


def test_each_seed_keys_its_model_by_its_number_not_its_position():
  # Seed 3 alone and seed 3 beside seed 1 get the same initialisation and
  # dropout keys, those of PRNGKey(3): a seed's model does not depend on
  # what runs beside it.
  init_alone, train_alone = srel_train._seed_keys((3,))
  init_beside, train_beside = srel_train._seed_keys((1, 3))
  expected = np.asarray(jax.random.split(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(np.asarray(init_alone[0]), expected[0])
  np.testing.assert_array_equal(np.asarray(train_alone[0]), expected[1])
  np.testing.assert_array_equal(np.asarray(init_beside[1]), expected[0])
  np.testing.assert_array_equal(np.asarray(train_beside[1]), expected[1])
  assert not np.array_equal(np.asarray(init_beside[0]), expected[0])


def test_a_diverged_run_is_neither_checkpointed_nor_returned(tmp_path, rng):
  # Losses precede each epoch's update, so a one-epoch run's only loss is
  # finite; the update itself overflows the forward pass.
  views = _synthetic_views(rng)
  config = SRELConfig(**TINY, epochs=1, log_every=1, checkpoint_every=1, learning_rate=1e30)
  with pytest.raises(FloatingPointError, match=r"after epoch 1: the outputs of seed\(s\) \[0\]"):
    train_srel_with_log(config, views, seeds=(0,), workdir=tmp_path, progress=False)
  assert srel_train.Checkpointer(tmp_path, subdir="srel").latest_step() is None
  assert not (tmp_path / "srel_emb.npy").exists()


def test_few_epochs_on_chicago(data_root):
  views = load_city_views("Chi", data_root)
  config = SRELConfig(epochs=16, log_every=8, n_layers=1, ff_dim=256, dropout=0.0)
  embeddings, log = train_srel_with_log(config, views, seeds=(0, 1), progress=False)
  chex.assert_shape(embeddings, (2, 77, 144))
  assert embeddings.dtype == np.float32
  chex.assert_tree_all_finite(embeddings)
  totals = np.array([row["total"] for row in log["history"]])  # [chunks, seeds]
  assert (totals[-1] < totals[0]).all(), totals
  assert len(log["spatial_lambda"]) == 2


@pytest.mark.parametrize(
  "bad",
  [
    dict(epochs=0),
    dict(dropout=1.0),
    dict(sigma_km=0.0),
    dict(sigma_km=float("nan")),
    dict(spatial_lambda=float("nan")),
    dict(spatial_lambda=float("inf")),
    dict(seeds=(0, -1)),
  ],
)
def test_config_rejects_bad_values(bad):
  with pytest.raises(ValueError, match="SRELConfig"):
    SRELConfig(**bad)
  # Through ToPT's config too, before any data is read.
  from jaxurban.topt.pipeline import ToptConfig

  field = next(iter(bad))
  if field in ("spatial_lambda",):
    with pytest.raises(ValueError, match=f"SRELConfig: {field} must be a finite number"):
      ToptConfig(**bad)


def test_settings_given_beside_a_task_replace_its_preset():
  config = SRELConfig.for_task("checkIn", learning_rate=1e-3, n_layers=1, spatial_lambda=0.2)
  assert (config.learning_rate, config.n_layers, config.spatial_lambda) == (1e-3, 1, 0.2)
  assert SRELConfig.for_city("NY", n_heads=2).n_heads == 2


def test_srel_train_writes_its_embeddings_and_exits_2_on_data_errors(
  tmp_path, rng, monkeypatch, capsys
):
  from jaxurban.data import hafusion

  # A data folder without the city's files: a one-line error, no traceback.
  assert srel_train.main(["--data-root", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
  assert capsys.readouterr().err.startswith("error: ")
  # The command hands its settings to training and saves what comes back.
  views = _synthetic_views(rng)
  embeddings = rng.normal(size=(2, views.n_regions, 8)).astype(np.float32)
  given = {}

  def train(config, city_views, seeds, workdir):
    given.update(config=config, views=city_views, seeds=seeds, workdir=workdir)
    log = {"final_terms": {"epoch": 5, "total": [1.0, 2.0]}, "train_seconds": 0.5}
    return embeddings, {**log, "resumed_from": 0}

  monkeypatch.setattr(hafusion, "load_city_views", lambda city, root: views)
  monkeypatch.setattr(srel_train, "train_srel_with_log", train)
  out = tmp_path / "run"
  argv = ["--task", "checkIn", "--seeds", "3", "4", "--epochs", "5", "--workdir", str(out)]
  assert srel_train.main(argv) == 0
  np.testing.assert_array_equal(np.load(out / "emb.npy"), embeddings)
  assert given["config"] == SRELConfig.for_task("checkIn", epochs=5)
  assert given["seeds"] == [3, 4] and given["workdir"] == str(out) and given["views"] is views
  assert "final losses {'total': 1.5}" in capsys.readouterr().out


def test_task_presets():
  crime = SRELConfig.for_task("checkIn", "NY")
  assert (crime.learning_rate, crime.n_layers, crime.spatial_lambda) == (2e-4, 5, 0.4)
  assert crime.n_heads == 4 and crime.memory == 72
  assert SRELConfig() == SRELConfig.for_task("crime", "Chi")


def test_command_line_settings(capsys):
  default, _ = parse_cli([])
  assert default == SRELConfig.for_task("crime", "Chi")
  ablated, _ = parse_cli(["--task", "serviceCall", "--no-centrality", "--epochs", "7"])
  assert ablated == SRELConfig.for_task("serviceCall", centrality=False, epochs=7)
  # HAFusion's own setting, as the authors' PyTorch code trains it.
  hafusion, _ = parse_cli(["--hafusion", "--city", "NY"])
  assert (hafusion.n_layers, hafusion.learning_rate, hafusion.epochs) == (3, 5e-4, 2000)
  assert not hafusion.spatial_bias and not hafusion.centrality and hafusion.n_heads == 4
  for clash, message in (
    (["--hafusion", "--task", "crime"], "not allowed with argument"),
    (["--hafusion", "--no-spatial-bias"], "--hafusion has no spatial prior to switch off"),
    (["--hafusion", "--no-centrality"], "--hafusion has no spatial prior to switch off"),
    (["--seeds", "0", "-1"], "--seeds must lie in [0, 2**32), got [-1]"),
    (["--seeds", "0", "1", "0"], "--seeds repeat [0]"),
    (["--workdir", "/dev/null"], "/dev/null: exists and is not a folder"),
  ):
    with pytest.raises(SystemExit):
      parse_cli(clash)
    assert message in capsys.readouterr().err, clash


def test_srel_trains_on_the_trips_and_softmaxes_its_view_weights(rng):
  # What the model is fed: the mobility loss's target is the trip matrix
  # (not the mobility view the encoder reads), and HAFusion's view weights
  # are the softmax over views i of mean_b mean_j LeakyReLU(f1[b, j] + f2[b, i]).
  from jaxurban.topt.srel import ViewFusion
  from jaxurban.topt.srel_train import prepare_data

  views = _synthetic_views(rng)
  data = prepare_data(views)
  trips = np.asarray(views.mobility, np.float64)
  np.testing.assert_allclose(data.mobility_target, trips / trips.mean(), rtol=1e-6)

  x = jnp.asarray(rng.normal(size=(3, 12, 5)), jnp.float32)
  fusion = ViewFusion(d_prime=4)
  params = fusion.init(jax.random.PRNGKey(0), x)["params"]
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  features = np.einsum("vnb,no->bov", np.asarray(x, np.float64), p["W"])
  f1 = np.einsum("bov,o->bv", features, p["f1_weight"]) + p["f1_bias"]
  f2 = np.einsum("bov,o->bv", features, p["f2_weight"]) + p["f2_bias"]
  logits = f1[:, None, :] + f2[:, :, None]  # [b, i, j]
  scores = np.where(logits > 0, logits, 0.3 * logits).mean(axis=(0, 2))  # HAFusion: slope 0.3
  expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
  np.testing.assert_allclose(fusion.apply({"params": params}, x), expected, rtol=1e-5)


def test_graphormer_layers_add_plus_lambda_times_the_gaussian_adjacency(rng, monkeypatch):
  # Eq. (1) as the model wires it: every Graphormer layer attends with
  # logits QK^T / sqrt(d) + lambda exp(-(d_ij / sigma)^2), lambda the
  # model's own parameter, so nearby regions attend more to each other.
  data = prepare_data(_synthetic_views(rng))
  config = SRELConfig(**{**TINY, "n_layers": 2}, spatial_lambda=3.0)
  model = build_model(config)
  params = model.init(
    jax.random.PRNGKey(0), data.poi, data.landuse, data.mobility_features, data.coords
  )["params"]
  calls = []

  def recording(q, k, v, coords, bias_params, **kwargs):
    out = spatial_attention(q, k, v, coords, bias_params, **kwargs)
    calls.append([np.asarray(a, np.float64) for a in (q, k, v, coords, out)])
    return out

  monkeypatch.setattr(srel, "spatial_attention", recording)
  _apply(model, params, data)
  assert len(calls) == config.n_layers
  lam = float(params["spatial_lambda"])
  assert lam == 3.0
  for q, k, v, coords, out in calls:
    np.testing.assert_allclose(coords, np.asarray(data.coords, np.float64))
    adjacency = np.exp(-((_np_distance(coords, coords) / config.sigma_km) ** 2))
    assert 0.05 < adjacency[~np.eye(len(coords), dtype=bool)].max()  # some regions are near
    logits = np.einsum("hid,hjd->hij", q, k) / np.sqrt(q.shape[-1]) + lam * adjacency
    want = np.einsum("hij,hjd->hid", _np_softmax(logits), v)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
