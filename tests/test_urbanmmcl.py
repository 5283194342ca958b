"""UrbanMMCL: losses against float64 references, walks, graphs, encoders, tiny runs, the command."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import shutil
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.data.hafusion import CityViews
from jaxurban.urbanmmcl import graphs, model, walks
from jaxurban.urbanmmcl.model import ModelConfig, UrbanMMCL


def _np_info_nce(a, b, tau):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = a @ b.T / tau
  logits = logits - logits.max(axis=1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_prob))


def test_info_nce_matches_float64_reference(rng):
  a = rng.normal(size=(11, 7))
  b = rng.normal(size=(11, 7))
  for tau in (0.5, 0.1):
    got = model.info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), tau)
    np.testing.assert_allclose(float(got), _np_info_nce(a, b, tau), rtol=1e-5)
    sym = model.symmetric_info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), tau)
    want = _np_info_nce(a, b, tau) + _np_info_nce(b, a, tau)
    np.testing.assert_allclose(float(sym), want, rtol=1e-5)
  # Perfectly aligned, well separated pairs: the loss approaches its minimum.
  eye = np.eye(6) * 10
  assert float(model.info_nce(jnp.asarray(eye), jnp.asarray(eye), 0.05)) < 1e-6


def test_vgae_losses_match_float64_reference(rng):
  target = rng.uniform(size=(9, 9))
  recon = rng.uniform(size=(9, 9))
  off = ~np.eye(9, dtype=bool)  # the view graphs have no self loops: the diagonal is not scored
  np.testing.assert_allclose(
    float(model.vgae_recon_loss(jnp.asarray(target), jnp.asarray(recon))),
    np.mean(((target - recon) ** 2)[off]),
    rtol=1e-6,
  )
  mu = rng.normal(size=(9, 4))
  log_sigma = 0.3 * rng.normal(size=(9, 4))
  sigma2 = np.exp(2 * log_sigma)
  want = -0.5 * np.mean(np.sum(1 + np.log(sigma2) - mu**2 - sigma2, axis=1)) / 9
  got = model.vgae_kl_loss(jnp.asarray(mu, jnp.float32), jnp.asarray(log_sigma, jnp.float32))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The KL is zero exactly at the prior.
  assert float(model.vgae_kl_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)))) == 0.0


def _sparse_weights(rng, v, n, density=0.3):
  w = rng.uniform(0.1, 2.0, size=(v, n, n)) * (rng.uniform(size=(v, n, n)) < density)
  w[:, 0, :] = 0.0  # node 0 has no out-edge: its walks terminate at once
  return w.astype(np.float32)


def test_random_walks_follow_positive_edges_and_respect_length(rng):
  length = 20
  w = _sparse_weights(rng, 3, 15)
  nodes, valid = walks.random_walks(
    jax.random.PRNGKey(int(rng.integers(1 << 30))), jnp.asarray(w), length
  )
  nodes, valid = np.asarray(nodes), np.asarray(valid)
  chex.assert_shape(nodes, (3, 15, length + 1))
  chex.assert_shape(valid, (3, 15, length + 1))
  np.testing.assert_array_equal(nodes[:, :, 0], np.broadcast_to(np.arange(15), (3, 15)))
  assert valid[:, :, 0].all()
  # Every valid step moves along an edge of positive weight.
  for v, i, t in itertools.product(range(3), range(15), range(length)):
    if valid[v, i, t + 1]:
      assert w[v, nodes[v, i, t], nodes[v, i, t + 1]] > 0
  # Validity never comes back after a termination, and terminations happen
  # exactly at nodes without out-edges.
  assert not np.any(~valid[..., :-1] & valid[..., 1:])
  stopped = valid[..., :-1] & ~valid[..., 1:]
  for v, i, t in zip(*np.nonzero(stopped)):
    assert w[v, nodes[v, i, t]].sum() == 0
  assert not valid[:, 0, 1:].any()


def test_random_walk_transition_frequencies_follow_eq22():
  # Node 0 -> {1: weight 1, 2: weight 3}; from 1 and 2 back to 0.
  w = np.zeros((1, 3, 3), np.float32)
  w[0, 0, 1], w[0, 0, 2], w[0, 1, 0], w[0, 2, 0] = 1.0, 3.0, 1.0, 1.0
  w = np.repeat(w, 4000, axis=0)  # 4000 independent views of the same graph
  nodes, _ = walks.random_walks(jax.random.PRNGKey(3), jnp.asarray(w), 1)
  share = float(np.mean(np.asarray(nodes)[:, 0, 1] == 2))
  assert abs(share - 0.75) < 0.03  # P = 3 / (1 + 3); 4 sigma ~ 0.027


def test_top_k_graph_and_first_visits():
  w = jnp.asarray([[5.0, 1.0, 3.0, 2.0], [1.0, 0.0, 0.0, 4.0], [0, 0, 0, 0], [1, 1, 1, 1.0]])
  top = np.asarray(walks.top_k_graph(w, 2))
  np.testing.assert_array_equal(top[0], [0, 0, 3, 2])  # diagonal dropped
  np.testing.assert_array_equal(top[1], [1, 0, 0, 4])
  np.testing.assert_array_equal(top[2], [0, 0, 0, 0])
  nodes = jnp.asarray([[0, 1, 0, 2, 2]])
  valid = jnp.asarray([[True, True, True, True, False]])
  np.testing.assert_array_equal(
    np.asarray(walks.first_visits(nodes, valid)), [[True, True, False, True, False]]
  )


def test_gcn_normalisation_matches_reference(rng):
  a = rng.uniform(size=(6, 6))
  np.fill_diagonal(a, 0.0)
  sym = 0.5 * (a + a.T) + np.eye(6)
  d = sym.sum(axis=1)
  want = sym / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
  np.testing.assert_allclose(graphs.gcn_normalise(a), want, rtol=1e-12)
  got = graphs.gcn_normalise(jnp.asarray(np.stack([a, a]), jnp.float32))
  np.testing.assert_allclose(np.asarray(got[1]), want, rtol=1e-5)
  # A symmetric normalised matrix has spectrum in (-1, 1].
  assert np.max(np.abs(np.linalg.eigvalsh(want))) <= 1 + 1e-9


@pytest.mark.parametrize("root", [False, True])
def test_gcn_adds_its_bias_after_the_propagation(rng, root):
  # H' = P X W + b (+ X W_root): Kipf and Welling's GCN. Inside the product,
  # P (X W + b), each node's bias would be scaled by its row sum of P.
  adj = rng.uniform(size=(6, 6))
  np.fill_diagonal(adj, 0.0)
  # One heavy edge keeps the row sums apart whatever the draw (a uniform
  # draw alone left them within 0.04 of each other at times).
  adj[0, 1] = adj[1, 0] = 10.0
  prop = graphs.gcn_normalise(adj)
  assert np.ptp(prop.sum(axis=1)) > 0.1  # row sums differ: the two forms differ
  x = rng.normal(size=(6, 5))
  gcn = model.GCN((3,), root=root)
  params = gcn.init(
    jax.random.PRNGKey(0), jnp.asarray(prop, jnp.float32), jnp.asarray(x, jnp.float32)
  )
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  got = gcn.apply(params, jnp.asarray(prop, jnp.float32), jnp.asarray(x, jnp.float32))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  want = prop @ (x @ p["Dense_0"]["kernel"]) + p["bias_0"]
  if root:
    want = want + x @ p["Dense_1"]["kernel"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_views_are_stacked_in_the_papers_order(rng):
  # Eq. (26) pairs (P, M), (P, D), (M, D), each InfoNCE anchored on its first
  # view: the model pairs the stacked views with itertools.combinations.
  assert list(itertools.combinations(graphs.VIEW_NAMES, 2)) == [
    ("poi", "mobility"),
    ("poi", "distance"),
    ("mobility", "distance"),
  ]
  n = 5
  views = CityViews(
    mobility=rng.integers(0, 50, size=(n, n)).astype(float),
    poi=rng.integers(1, 9, size=(n, 4)).astype(float),
    poi_similarity=np.eye(n),
    landuse=np.ones((n, 3)),
    landuse_similarity=np.eye(n),
    labels={},
    centroids=np.stack([41.8 + 0.01 * np.arange(n), -87.7 + 0.02 * np.arange(n)], 1),
    city="Chi",
  )
  built = graphs.build_view_graphs(views)
  assert built.names == ("poi", "mobility", "distance")
  for stacked, want in zip(
    built.adjacency,
    (
      graphs.poi_graph(views.poi),
      graphs.mobility_graph(views.mobility),
      graphs.distance_graph(views.centroids),
    ),
  ):
    np.testing.assert_allclose(stacked, want, rtol=1e-6)
  assert graphs.build_view_graphs(views, ("distance",)).names == ("poi", "mobility")
  # Eq. (17) propagates over A itself; only the reconstruction target is
  # divided by the view's maximum.
  np.testing.assert_allclose(built.propagation, graphs.gcn_normalise(built.adjacency), rtol=1e-6)
  np.testing.assert_allclose(built.target_scale, built.adjacency.max(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(built.target.max(axis=(1, 2)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
    built.target * built.target_scale[:, None, None], built.adjacency, rtol=1e-6
  )


@pytest.mark.parametrize("use_vgae", [False, True])
def test_subgraphs_carry_the_views_own_weights(rng, monkeypatch, use_vgae):
  # The GCN normalisation adds a unit self loop, so it sees the scale of the
  # graph: the walks' subgraphs must carry A (w/o VGAE) or the decoder's
  # estimate of A, s * softplus(.), not A / s.
  inputs = _synthetic_inputs(rng, images=False)
  cfg = dataclasses.replace(_TINY, use_images=False, use_vgae=use_vgae)
  m = UrbanMMCL(cfg)
  key = jax.random.PRNGKey(0)
  params = m.init(key, inputs, key, train=False)
  embed = jax.jit(lambda inp: m.apply(params, inp, key, train=False)[0])

  def rescaled(target_factor, scale_factor):
    return dict(
      inputs,
      target=inputs["target"] * target_factor,
      target_scale=inputs["target_scale"] * scale_factor,
    )

  base = np.asarray(embed(inputs))
  if not use_vgae:  # the same A written as (2 A) / 2: the same embedding
    np.testing.assert_allclose(np.asarray(embed(rescaled(2.0, 0.5))), base, rtol=1e-5, atol=1e-6)
  # Another A (or another estimate of it) changes the subgraph propagation.
  assert np.abs(np.asarray(embed(rescaled(1.0, 8.0))) - base).max() > 1e-4

  # The weights the subgraphs receive are exactly s times the decoder's
  # output (eq. 19), or s times the target A / s, for s = 8.
  seen = []
  original = model.subgraph_adjacency

  def spy(weights, *args):
    seen.append(np.asarray(weights))
    return original(weights, *args)

  monkeypatch.setattr(model, "subgraph_adjacency", spy)
  scaled = rescaled(1.0, 8.0)
  _, state = m.apply(
    params, scaled, key, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  assert len(seen) == scaled["target"].shape[0]
  for v, weights in enumerate(seen):
    if use_vgae:
      decoded = np.asarray(state["intermediates"][f"vgae_{v}"]["__call__"][0][0])
      np.testing.assert_allclose(weights, 8.0 * decoded, rtol=1e-6)
    else:
      np.testing.assert_allclose(weights, 8.0 * scaled["target"][v], rtol=1e-6)


def test_view_graphs_follow_section_3_4_1(rng):
  trips = rng.integers(0, 50, size=(5, 5)).astype(float)
  m = graphs.mobility_graph(trips)
  logged = np.log1p(trips)
  # a_ij = log(1 + m_ij) / sum_{k=1..N} log(1 + m_ik): the sum includes the
  # region's own trips; the graph itself has no self loop.
  want = logged / logged.sum(axis=1, keepdims=True)
  np.fill_diagonal(want, 0)
  np.testing.assert_allclose(m, want)
  poi = rng.integers(0, 9, size=(5, 4)).astype(float)
  poi[2] = 0  # a region without POIs is similar to none (not NaN)
  norm = np.linalg.norm(poi, axis=1, keepdims=True)
  unit = np.divide(poi, norm, out=np.zeros_like(poi), where=norm > 0)
  want = unit @ unit.T
  np.fill_diagonal(want, 0)
  np.testing.assert_allclose(graphs.poi_graph(poi), want, atol=1e-12)
  # 0.01 degree of latitude is 1.112 km.
  d = graphs.distance_graph(np.array([[41.0, -87.0], [41.01, -87.0]]))
  np.testing.assert_allclose(1.0 / d[0, 1], 1.112, rtol=1e-3)
  assert d[0, 0] == 0.0


def test_location_encoder_shapes_and_determinism():
  coords = jnp.asarray([[41.9, -87.6], [40.7, -74.0], [0.0, 0.0]])
  enc = model.LocationEncoder(scales=(1.0, 16.0), n_features=8, hidden=16, out=12, seed=4)
  params = enc.init(jax.random.PRNGKey(0), coords)
  out = enc.apply(params, coords)
  chex.assert_shape(out, (3, 12))
  chex.assert_tree_all_finite(out)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(enc.apply(params, coords)))
  again = enc.init(jax.random.PRNGKey(0), coords)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(enc.apply(again, coords)))
  other = model.LocationEncoder(scales=(1.0, 16.0), n_features=8, hidden=16, out=12, seed=5)
  assert not np.allclose(np.asarray(out), np.asarray(other.apply(params, coords)))
  # Equal Earth maps (0, 0) to the origin and is odd in longitude.
  xy = np.asarray(model.equal_earth(jnp.asarray([0.0, 30.0]), jnp.asarray([0.0, 45.0])))
  np.testing.assert_allclose(xy[0], [0.0, 0.0], atol=1e-7)
  mirrored = np.asarray(model.equal_earth(jnp.asarray(30.0), jnp.asarray(-45.0)))
  np.testing.assert_allclose(mirrored, [-xy[1, 0], xy[1, 1]], rtol=1e-6)


def test_vit_and_text_encoder_on_synthetic_inputs(rng):
  images = jnp.asarray(rng.uniform(size=(5, 16, 16, 3)), jnp.float32)
  vit = model.ViT(dim=16, depth=1, heads=2, patch=4, out=8)
  params = jax.jit(vit.init)(jax.random.PRNGKey(0), images)
  out = jax.jit(vit.apply)(params, images)
  chex.assert_shape(out, (5, 8))
  chex.assert_tree_all_finite(out)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(vit.apply(p, images) ** 2)))(params)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="patch size"):
    vit.apply(params, images[:, :15])

  tokens = model.encode_texts(["abc", "ünïcode text", ""], max_bytes=10, bytes_per_token=4)
  chex.assert_shape(tokens, (3, 12))
  assert tokens[0, 3] == model.BYTE_PAD and tokens[0, 0] == ord("a")
  text = model.TextEncoder(dim=16, depth=1, heads=2, bytes_per_token=4, out=8)
  tp = jax.jit(text.init)(jax.random.PRNGKey(1), jnp.asarray(tokens))
  text_apply = jax.jit(text.apply)
  t = text_apply(tp, jnp.asarray(tokens))
  chex.assert_shape(t, (3, 8))
  chex.assert_tree_all_finite(t)
  # Padding positions are masked out: changing the embedding of PAD changes nothing.
  tp2 = jax.tree_util.tree_map_with_path(
    lambda path, x: x.at[model.BYTE_PAD].add(1.0) if "embedding" in str(path[-1]) else x, tp
  )
  np.testing.assert_allclose(
    np.asarray(text_apply(tp2, jnp.asarray(tokens))), np.asarray(t), atol=1e-5
  )
  # ... and positions made only of padding are not attended to: "abc" fills
  # position 0 of 3, so new position vectors at 1 and 2 leave its text vector
  # as it is, while the longer text, which fills them, changes.
  # (A random change: a constant added to a whole vector is what layer norm removes.)
  change = jnp.asarray(rng.normal(size=(1, 2, 16)), jnp.float32)
  tp3 = jax.tree_util.tree_map_with_path(
    lambda path, x: x.at[:, 1:3].add(change) if str(path[-1]) == "['pos']" else x, tp
  )
  t3 = np.asarray(text_apply(tp3, jnp.asarray(tokens)))
  np.testing.assert_allclose(t3[0], np.asarray(t)[0], atol=1e-6)
  assert np.abs(t3[1] - np.asarray(t)[1]).max() > 1e-3


def _synthetic_inputs(rng, n=12, views=2, images=True):
  adj = rng.uniform(size=(views, n, n)) * (rng.uniform(size=(views, n, n)) < 0.5)
  for a in adj:
    np.fill_diagonal(a, 0)
  inputs = {
    "features": rng.normal(size=(n, 7)).astype(np.float32),
    "propagation": graphs.gcn_normalise(adj).astype(np.float32),
    "target": adj.astype(np.float32),
    "target_scale": np.ones(views, np.float32),
    "tokens": model.encode_texts([f"region {i} text" for i in range(n)], 24, 8),
    "coords": np.stack([41.8 + 0.01 * np.arange(n), -87.7 + 0.01 * np.arange(n)], 1).astype(
      np.float32
    ),
  }
  if images:
    inputs["images"] = rng.uniform(size=(n, 16, 16, 3)).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in inputs.items()}


_TINY = ModelConfig(
  dim=8,
  gcn_hidden=8,
  walk_length=5,
  walk_top_k=3,
  text_dim=8,
  text_depth=1,
  text_heads=2,
  vit_dim=8,
  vit_depth=1,
  vit_heads=2,
  patch_size=8,
  loc_features=4,
  use_images=True,
  n_views=2,
)


def test_vgae_starts_at_the_prior_so_its_first_gradients_spare_the_modality_encoders(rng):
  # Started elsewhere, the first reconstruction losses (~400 on Chicago)
  # sent gradients thousands of times the multi-modal InfoNCE's into the
  # shared modality encoders, whose Adam second moment then kept L_mmcl
  # from training. At the prior (mu = 0, sigma = 1) the VGAE terms send
  # none through mu and log sigma.
  inputs = _synthetic_inputs(rng)
  m = UrbanMMCL(_TINY)
  key = jax.random.PRNGKey(0)
  params = m.init(key, inputs, key)
  for v in range(_TINY.n_views):
    vgae = model.VGAE(_TINY.dim)
    x = jnp.asarray(rng.normal(size=(12, _TINY.dim)), jnp.float32)
    head = {"params": params["params"][f"vgae_{v}"]}
    _, mu, log_sigma = vgae.apply(head, inputs["propagation"][v], x, key, True)
    np.testing.assert_array_equal(np.asarray(mu), 0.0)
    np.testing.assert_array_equal(np.asarray(log_sigma), 0.0)
  _, losses = m.apply(params, inputs, key)
  assert float(losses["kl"]) == 0.0 and float(losses["recon"]) > 0
  vgae_terms = jax.grad(lambda p: (lambda l: l["recon"] + l["kl"])(m.apply(p, inputs, key)[1]))
  grads = vgae_terms(params)["params"]
  for encoder in ("vit", "text", "location", "input"):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[encoder])), encoder
  # ... while the heads themselves do learn from them (the latents are sampled).
  assert float(jnp.abs(grads["vgae_0"]["gcn_mu"]["Dense_0"]["kernel"]).max()) > 0


@pytest.mark.parametrize(
  "switches",
  [
    {},
    {"use_vgae": False, "use_walks": False, "use_graph_contrast": False},
    {"use_graph": False},
    {"use_walks": False},
  ],
)
def test_model_losses_and_ablation_switches(rng, switches):
  inputs = _synthetic_inputs(rng)
  cfg = dataclasses.replace(_TINY, **switches)
  m = UrbanMMCL(cfg)
  key = jax.random.PRNGKey(0)
  params = m.init(key, inputs, key)

  def loss_fn(p):
    emb, losses = m.apply(p, inputs, key)
    return model.total_loss(losses, 0.3, 0.7), (emb, losses)

  (total, (emb, losses)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  chex.assert_shape(emb, (12, 8 * 2 if cfg.use_graph else 8))  # views concatenated
  chex.assert_tree_all_finite((emb, losses, grads))
  assert float(losses["mmcl"]) > 0  # image-text + image-location
  assert (float(losses["graph_contrast"]) > 0) == (cfg.use_graph and cfg.use_graph_contrast)
  assert (float(losses["recon"]) > 0) == (cfg.use_graph and cfg.use_vgae)
  # Eq. (27) with alpha = 0.3 on the multi-modal and beta = 0.7 on the graph part.
  want = 0.3 * losses["mmcl"] + 0.7 * (losses["recon"] + losses["kl"] + losses["graph_contrast"])
  np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
  run = jax.jit(lambda p, k, train: m.apply(p, inputs, k, train=train)[0], static_argnums=2)
  keys = (key, jax.random.PRNGKey(1))
  evaluated = [np.asarray(run(params, k, False)) for k in keys]
  trained = [np.asarray(run(params, k, True)) for k in keys]
  # Evaluation mode uses the VGAE means: only the walks draw from the key, so
  # two keys give two embeddings with walks and the same one without.
  np.testing.assert_array_equal(np.asarray(run(params, key, False)), evaluated[0])
  walked = cfg.use_graph and cfg.use_walks
  assert (np.abs(evaluated[0] - evaluated[1]).max() > 1e-6) == walked
  if cfg.use_graph:  # the switch changes the computation, on the same parameters
    other = UrbanMMCL(dataclasses.replace(cfg, use_walks=not cfg.use_walks))
    switched = np.asarray(jax.jit(lambda p: other.apply(p, inputs, key, train=False)[0])(params))
    assert np.abs(switched - evaluated[0]).max() > 1e-4
  # Training mode samples the VGAE latents and the walks from the key.
  sampled = cfg.use_graph and (cfg.use_vgae or cfg.use_walks)
  assert (np.abs(trained[0] - trained[1]).max() > 1e-6) == sampled
  if cfg.use_graph and cfg.use_vgae:  # sampled latents are not the means
    assert np.abs(trained[0] - evaluated[0]).max() > 1e-6


def test_view_fusion_mean_averages_the_readouts_that_concat_lines_up(rng):
  inputs = _synthetic_inputs(rng, images=False)
  cfg = dataclasses.replace(_TINY, use_images=False)
  key = jax.random.PRNGKey(0)
  concat = UrbanMMCL(cfg)
  params = concat.init(key, inputs, key, train=False)
  lined_up = np.asarray(concat.apply(params, inputs, key, train=False)[0])
  mean = UrbanMMCL(dataclasses.replace(cfg, view_fusion="mean"))
  averaged = np.asarray(mean.apply(params, inputs, key, train=False)[0])
  views = np.split(lined_up, inputs["target"].shape[0], axis=1)
  np.testing.assert_allclose(averaged, np.mean(views, axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "modalities, pairs",
  [
    # Eq. (14): with images, image-text and image-location (no text-location).
    (dict(use_images=True), [("vit", "text"), ("vit", "location")]),
    (dict(use_images=True, use_location=False), [("vit", "text")]),
    # Without images, the remaining pair.
    (dict(use_images=False), [("text", "location")]),
  ],
)
def test_multimodal_loss_is_the_sum_over_the_pairs_of_eq_14(rng, modalities, pairs):
  inputs = _synthetic_inputs(rng, images=modalities["use_images"])
  cfg = dataclasses.replace(_TINY, use_graph=False, **modalities)
  m = UrbanMMCL(cfg)
  key = jax.random.PRNGKey(0)
  params = m.init(key, inputs, key)
  (_, losses), state = m.apply(
    params, inputs, key, capture_intermediates=True, mutable=["intermediates"]
  )
  vectors = {
    name: state["intermediates"][name]["__call__"][0]
    for name in ("vit", "text", "location")
    if name in state["intermediates"]
  }
  want = sum(model.symmetric_info_nce(vectors[a], vectors[b], cfg.mm_temperature) for a, b in pairs)
  np.testing.assert_allclose(float(losses["mmcl"]), float(want), rtol=1e-6)


def test_tiny_end_to_end_runs(tmp_path, data_root, rng):
  from jaxurban.data.errors import DataError
  from jaxurban.urbanmmcl.train import (
    UrbanMMCLConfig,
    load_geo_texts,
    load_images,
    train_and_evaluate,
  )

  texts = load_geo_texts(data_root)
  assert len(texts) == 77 and "Centroid" not in texts[0] and "Address" in texts[0]
  # The image loader (the ViT itself runs in the model test above).
  image_dir = tmp_path / "images"
  image_dir.mkdir()
  for i in range(3):
    np.save(image_dir / f"{i}.npy", rng.integers(0, 256, size=(20, 24, 3)).astype(np.uint8))
  images = load_images(image_dir, 3, 16)
  chex.assert_shape(images, (3, 16, 16, 3))
  assert 0 <= images.min() and images.max() <= 1
  # The scale follows the dtype, not one image's values: a dark uint8 image
  # is divided by 255 like the others, and floats are taken as they are.
  np.save(image_dir / "0.npy", np.ones((4, 4, 3), np.uint8))
  np.save(image_dir / "1.npy", np.full((4, 4, 3), 0.5, np.float32))
  np.save(image_dir / "2.npy", np.full((4, 4, 4), 255, np.uint8))  # RGBA: alpha dropped
  np.testing.assert_allclose(
    load_images(image_dir, 3, 4)[:, 0, 0], [[1 / 255] * 3, [0.5] * 3, [1] * 3]
  )
  for bad, words in (
    (np.full((4, 4, 3), 2.0, np.float32), r"values span \[2, 2\], expected \[0, 1\]"),
    (np.zeros((3, 8, 8), np.float32), r"shape \(3, 8, 8\).*channels first\?"),
    (np.zeros((4, 4, 3), np.int64), "dtype int64, expected uint8"),
  ):
    np.save(image_dir / "2.npy", bad)
    with pytest.raises(DataError, match=rf"2\.npy.*{words}"):
      load_images(image_dir, 3, 4)
  np.save(image_dir / "2.npy", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DataError, match="no image for region 3"):
    load_images(image_dir, 4, 16)
  with pytest.raises(DataError, match="nowhere: column 'images': no such folder"):
    load_images(tmp_path / "nowhere", 4, 16)
  with pytest.raises(DataError, match=r"0\.npy: column 'images': a file, not a folder of images"):
    load_images(image_dir / "0.npy", 4, 16)
  # Two images for one region: which one was meant is not for the loader to guess.
  np.save(image_dir / "3.npy", np.zeros((4, 4, 2), np.float32))
  (image_dir / "3.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match=r"region 3 has two images, 3\.png and 3\.npy; keep one"):
    load_images(image_dir, 4, 16)
  (image_dir / "3.png").unlink()
  with pytest.raises(DataError, match=r"3\.npy.*expected H x W x 3"):
    load_images(image_dir, 4, 16)
  np.save(image_dir / "3.npy", np.zeros((0, 0, 3), np.float32))
  with pytest.raises(DataError, match=r"3\.npy.*shape \(0, 0, 3\), expected H x W x 3"):
    load_images(image_dir, 4, 16)
  np.save(image_dir / "3.npy", np.full((4, 4, 3), "a"))
  with pytest.raises(DataError, match=r"3\.npy.*dtype <U1, expected uint8"):
    load_images(image_dir, 4, 16)
  np.savez(image_dir / "3.npz", image=np.zeros((4, 4, 3)))
  (image_dir / "3.npz").rename(image_dir / "3.npy")
  with pytest.raises(DataError, match=r"3\.npy.*is an \.npz archive"):
    load_images(image_dir, 4, 16)
  (image_dir / "3.npy").unlink()
  (image_dir / "3.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match=r"3\.png.*not a readable image"):
    load_images(image_dir, 4, 16)
  # Files numbered past the regions, or with leading zeros, mean the folder
  # is not numbered as the regions are (another city's, or 1-based); other
  # files are left alone.
  np.save(image_dir / "3.npy", np.zeros((4, 4, 3), np.uint8))
  (image_dir / "3.png").unlink()
  (image_dir / "notes.txt").write_text("not an image")
  (image_dir / "cover.png").write_bytes(b"not a region")
  assert load_images(image_dir, 4, 4).shape == (4, 4, 4, 3)
  for stray in ("4.npy", "10.png", "03.npy"):
    np.save(image_dir / "x.npy", np.zeros((4, 4, 3), np.uint8))
    (image_dir / "x.npy").rename(image_dir / stray)
  with pytest.raises(
    DataError,
    match=r"images: column 'images': 3 image file\(s\) named for no region \(4\.npy, 03\.npy, 10\.png\); "
    r"the 4 regions are numbered 0\.\.3, written without leading zeros",
  ):
    load_images(image_dir, 4, 4)
  with pytest.raises(DataError, match="77 geo-texts for 76 regions"):
    load_geo_texts(data_root, n_regions=76)
  with pytest.raises(ValueError, match="view_fusion must be"):
    model.ModelConfig(view_fusion="concatenate")

  tiny = dataclasses.replace(_TINY, use_images=False)
  base = dict(data_root=str(data_root), seeds=1, epochs=2, log_every=1, eval_walks=1, model=tiny)
  config = UrbanMMCLConfig(city="Chi", finetune_seeds=0, ridge_folds=3, **base)
  # The command's table and pictures of an earlier run are removed before
  # the new results are written, so that they never sit beside results that
  # are not theirs.
  (tmp_path / "chi").mkdir()
  (tmp_path / "chi" / "results.md").write_text("an earlier run's table")
  out = train_and_evaluate(config, tmp_path / "chi", log=lambda *_: None)
  assert not (tmp_path / "chi" / "results.md").exists()
  assert out["modalities"] == ["text", "location"]
  assert out["views"] == ["poi", "mobility", "distance"]
  chex.assert_shape(out["embeddings"], (1, 77, 8 * 3))
  for task in ("crime", "checkIn", "serviceCall"):
    assert np.isfinite(out["ridge"]["embedding"][task]["r2"]["mean"])
  saved = json.loads((tmp_path / "chi" / "results.json").read_text())
  assert saved["ridge"]["raw_features"]["crime"]["r2"]["per_seed"]
  # Each row is the probe on its own features: the saved embeddings, and
  # the model's input features (a row scored on the other would tie them).
  from jaxurban.urbanmmcl.train import prepare, ridge_probe

  prepared_inputs, _, prepared_meta = prepare(config)
  features = np.asarray(prepared_inputs["features"])[None]
  embeddings = np.load(tmp_path / "chi" / "embeddings.npy")
  for probe, tuned in (("ridge", False), ("ridge_tuned", True)):
    for which, x in (("embedding", embeddings), ("raw_features", features)):
      expected = json.loads(
        json.dumps(ridge_probe(x, prepared_meta["labels"], config, tuned=tuned))
      )
      assert saved[probe][which] == expected, (probe, which)
  # A rerun stopped before its results (here in the probe) leaves the
  # earlier run's embeddings and results as they were, side by side.
  before = {f: (tmp_path / "chi" / f).stat() for f in ("embeddings.npy", "results.json")}

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt

  with mock.patch("jaxurban.urbanmmcl.train.ridge_probe", stopped):
    with pytest.raises(KeyboardInterrupt):
      train_and_evaluate(config, tmp_path / "chi", log=lambda *_: None)
  for name, stat in before.items():
    after = (tmp_path / "chi" / name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
  # The model as trained, not the config's defaults: the location frame is
  # set from the city's centroids.
  assert saved["config"]["model"]["loc_scale"] == 1.0
  assert saved["model_config_used"]["loc_scale"] != 1.0
  assert saved["software"]["jax"] == jax.__version__
  assert saved["data_root"] == str(data_root)
  from jaxurban.urbanmmcl.train import MODEL_REVISION

  assert saved["model_revision"] == MODEL_REVISION

  config = UrbanMMCLConfig(
    city="NY",
    finetune_seeds=1,
    finetune_folds=3,
    finetune_epochs=3,
    patience=1,
    finetune_tasks=("crime", "landuse"),
    **base,
  )
  out = train_and_evaluate(config, tmp_path / "ny", log=lambda *_: None)
  assert out["modalities"] == [] and out["views"] == ["poi", "mobility"]
  crime, landuse = out["finetune"]["crime"][0], out["finetune"]["landuse"][0]
  assert (
    np.isfinite(crime["r2"]) and 0 <= landuse["f1_macro"] <= 1 and 0 <= landuse["recall_macro"] <= 1
  )
  assert all(0 <= e < 3 for e in crime["best_epochs"])


def test_pretraining_resumes_on_the_uninterrupted_trajectory(tmp_path, data_root):
  from jaxurban.checkpoint import CheckpointMismatch
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, train_and_evaluate

  config = UrbanMMCLConfig(
    city="NY",
    data_root=str(data_root),
    seeds=1,
    epochs=3,
    log_every=1,
    eval_walks=1,
    finetune_seeds=0,
    ridge_folds=3,
    model=dataclasses.replace(_TINY, use_images=False),
  )
  whole = train_and_evaluate(config, tmp_path / "whole", log=lambda *_: None)

  def killed_after_two_chunks(message):
    if "epoch 2/3" in message:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, tmp_path / "resumed", log=killed_after_two_chunks)
  assert not (tmp_path / "resumed" / "results.json").exists()
  messages = []
  resumed = train_and_evaluate(config, tmp_path / "resumed", log=messages.append)
  assert any("resuming pre-training at epoch 2/3" in m for m in messages)
  # An uninterrupted seed's time is its own run's; a resumed seed's adds the
  # killed run's up to its checkpoint.
  # Both count from the seed's start (the model's set-up and compilation
  # included), so an uninterrupted seed's two figures agree.
  [whole_all_runs] = whole["pretrain_seconds_per_seed_including_earlier_runs"]
  [whole_own] = whole["pretrain_seconds_per_seed"]
  assert 0.95 * whole_own <= whole_all_runs <= whole_own
  [resumed_all_runs] = resumed["pretrain_seconds_per_seed_including_earlier_runs"]
  assert resumed_all_runs > resumed["pretrain_seconds_per_seed"][0] > 0
  np.testing.assert_array_equal(resumed["embeddings"], whole["embeddings"])
  assert resumed["history"] == whole["history"] and len(whole["history"][0]) == 3
  # New York has no modality: no multi-modal term is logged or plotted as a flat zero.
  assert set(whole["history"][0][0]) == {"epoch", "total", "recon", "kl", "graph_contrast"}
  assert not any("mmcl" in m for m in messages) and any(" gcl " in m for m in messages)
  M = model.ModelConfig
  assert M().active_losses() == ("total", "mmcl", "recon", "kl", "graph_contrast")
  assert M(use_graph=False).active_losses() == ("total", "mmcl")
  assert M(use_vgae=False, use_location=False).active_losses() == ("total", "graph_contrast")
  assert M(use_images=True, use_text=False).active_losses()[:2] == ("total", "mmcl")
  # Results and evaluation settings may change; what shapes training may not.
  train_and_evaluate(
    dataclasses.replace(config, ridge_folds=4), tmp_path / "resumed", log=lambda *_: None
  )
  with pytest.raises(CheckpointMismatch, match="learning_rate"):
    train_and_evaluate(
      dataclasses.replace(config, learning_rate=2e-3), tmp_path / "resumed", log=lambda *_: None
    )
  # Other data of the same shapes (another root, an edited file) trains afresh.
  other = tmp_path / "other_root"
  shutil.copytree(pathlib.Path(data_root) / "hafusion" / "NY", other / "hafusion" / "NY")
  poi = np.load(other / "hafusion" / "NY" / "poi_dist.npy")
  poi[0, 0] += 1
  np.save(other / "hafusion" / "NY" / "poi_dist.npy", poi)
  with pytest.raises(CheckpointMismatch, match="data_sha256"):
    train_and_evaluate(
      dataclasses.replace(config, data_root=str(other)), tmp_path / "resumed", log=lambda *_: None
    )


def test_an_image_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
  from jaxurban.data.errors import DataError
  from jaxurban.urbanmmcl.train import load_images

  def refused(self):
    raise PermissionError(13, "Permission denied", str(self))

  monkeypatch.setattr(pathlib.Path, "iterdir", refused)
  with pytest.raises(DataError, match=r"column 'images': cannot be read \(Permission denied\)"):
    load_images(tmp_path, 2, 4)


def test_a_moved_image_folder_resumes_and_other_images_train_afresh(tmp_path, data_root, rng):
  # Checkpoints compare what was read (data_sha256), not where it was read from.
  from jaxurban.checkpoint import CheckpointMismatch
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, train_and_evaluate

  first = tmp_path / "images"
  first.mkdir()
  for i in range(77):
    np.save(first / f"{i}.npy", rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8))
  config = UrbanMMCLConfig(
    city="Chi",
    data_root=str(data_root),
    images=str(first),
    image_size=8,
    text_max_bytes=600,  # shorter than some geo-texts: the run says so
    seeds=1,
    epochs=1,
    eval_walks=1,
    finetune_seeds=0,
    ridge_folds=2,
    model=_TINY,
  )
  train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
  moved = first.rename(tmp_path / "moved")
  messages = []
  resumed = train_and_evaluate(
    dataclasses.replace(config, images=str(moved)), tmp_path / "run", log=messages.append
  )
  assert any("seed 0: resuming pre-training at epoch 1/1" in m for m in messages), messages
  text_bytes = resumed["text_bytes"]
  told = f"{text_bytes['texts_cut']} of 77 geo-texts are longer than the {text_bytes['kept']} bytes"
  assert text_bytes["texts_cut"] > 0 and sum(told in m for m in messages) == 1, messages
  np.save(moved / "5.npy", np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(CheckpointMismatch, match="data_sha256"):
    train_and_evaluate(
      dataclasses.replace(config, images=str(moved)), tmp_path / "run", log=lambda *_: None
    )


def test_ablations_of_what_the_city_lacks_are_refused(tmp_path, data_root, capsys):
  from experiments import urbanmmcl as command
  from jaxurban.data.hafusion import load_city_views
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, prepare

  ny = load_city_views("NY", data_root)
  with pytest.raises(ValueError, match="NY has no distance view .*mobility, poi"):
    graphs.build_view_graphs(ny, ("distance",))
  assert graphs.build_view_graphs(ny, ("poi",)).names == ("mobility",)
  # One view left: no pair to contrast, so the run would silently lose graph contrast.
  with pytest.raises(ValueError, match="leaves one view .mobility.*--no-graph-contrast"):
    prepare(UrbanMMCLConfig(city="NY", data_root=str(data_root), drop_views=("poi",)))
  for name, value in (("eval_walks", 0), ("log_every", 0), ("finetune_folds", 2), ("patience", -1)):
    with pytest.raises(ValueError, match=f"{name} must be >= .*, got {value}"):
      UrbanMMCLConfig(**{name: value})
  with pytest.raises(ValueError, match="NY has no text, location or images"):
    prepare(UrbanMMCLConfig(city="NY", data_root=str(data_root), no_multimodal=True))
  # Images alone would have nothing to be contrasted with (eq. 14).
  with pytest.raises(ValueError, match="NY: images need text or location"):
    prepare(UrbanMMCLConfig(city="NY", data_root=str(data_root), images=str(tmp_path)))
  # Nor are images alone a multi-modal part to remove: that run would be the full model.
  with pytest.raises(ValueError, match="NY has no text or location for its images .* full model"):
    prepare(
      UrbanMMCLConfig(city="NY", data_root=str(data_root), images=str(tmp_path), no_multimodal=True)
    )
  # The location frame needs a location modality.
  for city, extra, why in (
    ("NY", {}, "NY has no centroids"),
    ("Chi", {"no_multimodal": True}, "--no-multimodal removes it"),
  ):
    with pytest.raises(
      graphs.AblationError, match=f"location_frame='geoclip' changes nothing.*{why}"
    ):
      prepare(
        UrbanMMCLConfig(city=city, data_root=str(data_root), location_frame="geoclip", **extra)
      )
  with pytest.raises(ValueError, match="location_frame must be one of"):
    UrbanMMCLConfig(location_frame="world")
  # Settings that would train on NaN (a loss weight, a temperature).
  for name, value in (("alpha", float("nan")), ("weight_decay", -1.0)):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value}"):
      UrbanMMCLConfig(**{name: value})
  with pytest.raises(ValueError, match="mm_temperature must be a finite number > 0, got 0.0"):
    model.ModelConfig(mm_temperature=0.0)
  # GeoCLIP's frame: its bands on world coordinates * SF / 180.
  _, city_model, _ = prepare(UrbanMMCLConfig(city="Chi", data_root=str(data_root)))
  _, geoclip_model, _ = prepare(
    UrbanMMCLConfig(city="Chi", data_root=str(data_root), location_frame="geoclip")
  )
  assert city_model.loc_scales == model.ModelConfig().loc_scales
  assert geoclip_model.loc_scales == (1.0, 16.0, 256.0) and geoclip_model.loc_center == (0.0, 0.0)
  assert geoclip_model.loc_scale == pytest.approx(180.0 / 66.50336)
  # Graph ablations under --no-graph would change nothing.
  for field, value, flag in (
    ("no_vgae", True, "--no-vgae"),
    ("no_walks", True, "--no-walks"),
    ("no_graph_contrast", True, "--no-graph-contrast"),
    ("drop_views", ("poi",), "--drop-view"),
  ):
    with pytest.raises(graphs.AblationError, match=f"--no-graph removes .* so {flag} would"):
      prepare(
        UrbanMMCLConfig(city="Chi", data_root=str(data_root), no_graph=True, **{field: value})
      )

  # Without VGAE and graph contrast (eq. 26 empty) the graph encoders get
  # no gradient: the embeddings would be random projections.
  for city, extra, why in (
    ("Chi", {"no_graph_contrast": True}, "--no-graph-contrast"),
    ("NY", {"no_graph_contrast": True}, "--no-graph-contrast"),
    ("NY", {"drop_views": ("poi",)}, r"one view left \(mobility\)"),
    ("NY", {"drop_views": ("poi",), "no_graph_contrast": True}, "--no-graph-contrast"),
  ):
    with pytest.raises(
      graphs.AblationError, match=f"--no-vgae with {why}.* without a loss.*--no-graph"
    ):
      prepare(UrbanMMCLConfig(city=city, data_root=str(data_root), no_vgae=True, **extra))
  # One view without graph contrast still trains its VGAE.
  _, one_view, _ = prepare(
    UrbanMMCLConfig(
      city="NY", data_root=str(data_root), drop_views=("poi",), no_graph_contrast=True
    )
  )
  assert one_view.active_losses() == ("total", "recon", "kl")
  # Images under --no-multimodal would be ignored, even from a folder that does not exist.
  with pytest.raises(graphs.AblationError, match="--images .*nowhere and --no-multimodal"):
    prepare(
      UrbanMMCLConfig(
        city="Chi", data_root=str(data_root), images=str(tmp_path / "nowhere"), no_multimodal=True
      )
    )

  # The command says so in one line, before any training.
  tiny_run = ["--seeds", "1", "--epochs", "1", "--finetune-seeds", "0"]
  for flags, message in (
    (["--drop-view", "distance"], "NY has no distance view"),
    (["--no-multimodal"], "NY has no text, location or images"),
    (["--no-vgae", "--no-graph-contrast"], "leaves the graph part without a loss"),
  ):
    argv = ["--city", "NY", "--data-root", str(data_root), "--out", str(tmp_path), *tiny_run]
    assert command.main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
  assert not (tmp_path / "checkpoints").exists()


def test_finetuning_settings_without_finetuning_are_refused(capsys):
  from experiments import urbanmmcl as command
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig

  for name, value in (
    ("finetune_epochs", 30),
    ("finetune_lr", 1e-2),
    ("patience", 5),
    ("finetune_folds", 4),
    ("finetune_tasks", ("crime",)),
  ):
    with pytest.raises(ValueError, match=f"{name}=.* has no effect with finetune_seeds=0"):
      UrbanMMCLConfig(finetune_seeds=0, **{name: value})
    UrbanMMCLConfig(finetune_seeds=1, **{name: value})  # with fine-tuning, a setting
  with pytest.raises(SystemExit):
    command.parse_config(["--finetune-seeds", "0", "--finetune-epochs", "30", "--out", "x"])
  err = capsys.readouterr().err
  assert "--finetune-epochs=30 has no effect with --finetune-seeds=0" in err, err


def test_more_finetuned_than_pretrained_seeds_is_a_usage_error(capsys):
  from experiments import urbanmmcl as command

  with pytest.raises(SystemExit):
    command.parse_config(["--seeds", "2", "--finetune-seeds", "5"])
  assert "--finetune-seeds must be in [0, seeds=2]" in capsys.readouterr().err


def test_command_reports_a_diverged_run_in_one_line(tmp_path, monkeypatch, capsys):
  from experiments import urbanmmcl as command

  def diverge(*_, **__):
    raise FloatingPointError("UrbanMMCL pre-training of NY: the outputs of seed(s) [0] are ...")

  monkeypatch.setattr(command, "train_and_evaluate", diverge)
  assert command.main(["--city", "NY", "--out", str(tmp_path / "run")]) == 2
  assert capsys.readouterr().err == (
    "error: UrbanMMCL pre-training of NY: the outputs of seed(s) [0] are ...\n"
  )


def test_command_writes_the_results_table_atomically(tmp_path, monkeypatch):
  import os
  import stat

  from experiments import urbanmmcl as command

  monkeypatch.setattr(command, "train_and_evaluate", lambda *_, **__: {})
  monkeypatch.setattr(command, "results_table", lambda _: "| table |")
  monkeypatch.setattr(command, "plot", lambda *_: None)
  monkeypatch.setattr(command, "plot_losses", lambda *_: None)
  renamed, real_replace = [], os.replace

  def replace(src, dst):
    renamed.append(os.fspath(dst))
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  assert command.main(["--city", "NY", "--out", str(tmp_path)]) == 0
  results = tmp_path / "results.md"
  assert [name for name in renamed if name.endswith(".md")] == [str(results)]
  assert results.read_text() == "| table |\n"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(results.stat().st_mode) == 0o666 & ~umask  # as a plain open() gives

  # A write that fails leaves the previous table and no temporary file.
  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  monkeypatch.setattr(command, "results_table", lambda _: "| new table |")
  with pytest.raises(OSError, match="disk full"):
    command.main(["--city", "NY", "--out", str(tmp_path)])
  assert results.read_text() == "| table |\n"
  assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_embedding_picture_lists_the_classes_present(tmp_path, monkeypatch, rng):
  from experiments import urbanmmcl as command
  from jaxurban.viz import embedding_plot

  saved = {}
  monkeypatch.setattr(
    embedding_plot, "save_figure_atomic", lambda fig, *a, **k: saved.update(fig=fig)
  )
  # Columns 0, 3 and 4 dominate regions; 1, 2 and 5 none.
  results = {
    "embeddings": rng.normal(size=(1, 12, 4)),
    "landuse_classes": [0, 3, 4],
    "landuse": [0, 0, 1, 1, 1, 2] * 2,
  }
  command.plot(results, tmp_path / "embeddings.png", "NY", "pca")
  legend = saved["fig"].axes[0].get_legend()
  assert [t.get_text() for t in legend.get_texts()] == [
    "column 0 (4)",
    "column 3 (6)",
    "column 4 (2)",
  ]


def _new_york_finetuning(data_root, **settings):
  """A tiny New York fine-tuning setup without images: the config, the
  prepared inputs, the model config, the task data and a fresh encoder."""
  from jaxurban.urbanmmcl import train as mmcl

  config = mmcl.UrbanMMCLConfig(
    city="NY", data_root=str(data_root), seeds=1, epochs=1,
    model=dataclasses.replace(_TINY, use_images=False), **settings,
  )  # fmt: skip
  inputs, model_config, meta = mmcl.prepare(config)
  pre = UrbanMMCL(model_config).init(
    jax.random.PRNGKey(0), inputs, jax.random.PRNGKey(1), train=True
  )
  return config, inputs, model_config, meta, pre


def _record_pooled_folds(monkeypatch):
  """The per-fold outputs `kfold.pool_folds` is handed, one entry a call."""
  from jaxurban.eval import kfold

  seen, pool = [], kfold.pool_folds
  monkeypatch.setattr(
    kfold, "pool_folds", lambda per_fold, masks: seen.append(per_fold) or pool(per_fold, masks)
  )
  return seen


def test_finetuning_never_sees_a_folds_test_labels(data_root, monkeypatch):
  # Model f trains on its training folds and stops on fold f + 1: the labels
  # of its test fold f must change neither its predictions there nor its
  # chosen epoch (training on them, or stopping on them, would).
  from jaxurban.eval import kfold
  from jaxurban.urbanmmcl import train as mmcl

  config, inputs, model_config, meta, pre = _new_york_finetuning(
    data_root, finetune_folds=3, finetune_epochs=8, patience=8
  )
  n = meta["n_regions"]
  test0 = kfold.fold_assignment(n, 3, config.fold_seed) == 0
  seen = _record_pooled_folds(monkeypatch)

  def fold0(labels):
    meta_now = dict(meta, labels=dict(meta["labels"], crime=labels))
    result = mmcl._finetune_task(config, model_config, pre, inputs, "crime", meta_now, 0, print)
    return np.asarray(seen[-1])[0][test0], result["best_epochs"][0]

  crime = np.asarray(meta["labels"]["crime"], np.float64)
  before, epoch_before = fold0(crime)
  after, epoch_after = fold0(np.where(test0, crime * 50.0 + 1e4, crime))
  np.testing.assert_array_equal(after, before)
  assert epoch_after == epoch_before


def test_raw_features_and_land_use_classes(data_root):
  from jaxurban.data.hafusion import load_city_views
  from jaxurban.urbanmmcl.graphs import dominant_landuse, raw_features

  views = load_city_views("Chi", data_root)
  x = raw_features(views)
  # POI counts, outgoing and incoming trips, the centroid: every column used.
  n = views.n_regions
  assert x.shape == (n, views.poi.shape[1] + 2 * n + 2)
  outgoing = np.log1p(views.mobility)
  incoming = np.log1p(views.mobility.T)
  for block, start in ((outgoing, views.poi.shape[1]), (incoming, views.poi.shape[1] + n)):
    got = x[:, start : start + n]
    expected = (block - block.mean(0)) / np.where(block.std(0) > 0, block.std(0), 1)
    np.testing.assert_allclose(got, np.where(block.std(0) > 0, expected, 0), atol=1e-5)
  labels, classes = dominant_landuse(views)
  np.testing.assert_array_equal(labels, views.landuse.argmax(axis=1))
  assert (views.landuse[np.arange(n), labels] == views.landuse.max(axis=1)).all()
  assert set(classes) == set(labels)
  # A region without land-use counts has no dominant category (argmax would say column 0).
  from jaxurban.data.errors import DataError

  landuse = views.landuse.copy()
  landuse[[4, 9]] = 0
  with pytest.raises(
    DataError,
    match=r"Chi/landUse_dist\.npy: column 'landuse': 2 region\(s\) with no land-use counts "
    r"\(rows 4, 9\)",
  ):
    dominant_landuse(dataclasses.replace(views, landuse=landuse))


def test_ridge_probe_does_not_depend_on_the_scale_of_a_column(data_root, rng):
  # The probe z-scores the embeddings, so a fixed penalty treats every
  # column alike; without it a column scaled by 1000 would escape the penalty.
  from jaxurban.data.hafusion import load_city_views
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, ridge_probe

  labels = load_city_views("NY", data_root).labels
  config = UrbanMMCLConfig(city="NY", ridge_folds=5)
  emb = rng.normal(size=(1, len(labels["crime"]), 6))
  scaled = emb * np.array([1000.0, 1, 1, 0.001, 1, 1])
  for tuned in (False, True):
    a, b = (ridge_probe(e, labels, config, tuned=tuned) for e in (emb, scaled))
    for task in a:
      np.testing.assert_allclose(a[task]["r2"]["mean"], b[task]["r2"]["mean"], rtol=1e-6)


def test_walk_steps_draw_fresh_randomness():
  # On a complete graph of equal weights every step is uniform over the
  # other N - 1 nodes, independently of the steps before: a walk comes back
  # to where it was two steps earlier with probability 1 / (N - 1). With one
  # random draw reused for every step it would shuttle between two nodes.
  n = 30
  w = np.ones((4, n, n), np.float32) - np.eye(n, dtype=np.float32)
  nodes, valid = walks.random_walks(jax.random.PRNGKey(5), jnp.asarray(w), 20)
  nodes = np.asarray(nodes)
  assert np.asarray(valid).all()
  back = np.mean(nodes[..., 2:] == nodes[..., :-2])  # 4 * 30 * 19 pairs
  assert abs(back - 1 / (n - 1)) < 0.02, back  # sd ~ 0.004
  # ... and each step is uniform over the other nodes.
  counts = np.bincount(nodes[..., 1:].ravel(), minlength=n)
  assert counts.min() > 0.6 * counts.mean()


def test_the_model_walks_the_configured_length(rng, monkeypatch):
  # Sec. 3.4.3: walks of L = 20 steps (L + 1 visited nodes) by default; the
  # model asks for exactly its configured length.
  assert ModelConfig().walk_length == 20
  seen = []

  def recording(key, weights, length):
    nodes, valid = walks.random_walks(key, weights, length)
    seen.append((length, nodes.shape))
    return nodes, valid

  monkeypatch.setattr(model, "random_walks", recording)
  inputs = _synthetic_inputs(rng, images=False)
  cfg = dataclasses.replace(_TINY, use_images=False)
  m = UrbanMMCL(cfg)
  key = jax.random.PRNGKey(0)
  params = jax.eval_shape(m.init, key, inputs, key)  # shapes only: nothing is computed
  seen.clear()
  jax.eval_shape(m.apply, params, inputs, key)
  assert seen == [(cfg.walk_length, (cfg.n_views, 12, cfg.walk_length + 1))]


def test_vgae_samples_latents_with_sigma_not_its_square(rng):
  # Eq. (18): Z = mu + sigma * eps, eps ~ N(0, I), then eq. (19):
  # A_hat = softplus(Z Z^T / sqrt(d)); evaluation uses Z = mu.
  n, latent = 10, 6
  adjacency = rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) < 0.5)
  propagation = jnp.asarray(graphs.gcn_normalise(adjacency), jnp.float32)
  x = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  vgae = model.VGAE(latent)
  key = jax.random.PRNGKey(2)
  params = vgae.init(key, propagation, x, key, True)
  # Away from the prior (mu = 0, log sigma = 0) where sigma = sigma^2.
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype), params)
  sample_key = jax.random.PRNGKey(7)
  a_hat, mu, log_sigma = vgae.apply(params, propagation, x, sample_key, True)
  mu, log_sigma = np.asarray(mu, np.float64), np.asarray(log_sigma, np.float64)
  assert np.abs(log_sigma).max() > 0.3
  eps = np.asarray(jax.random.normal(sample_key, mu.shape), np.float64)
  softplus = lambda s: np.logaddexp(0.0, s)
  for z, got in (
    (mu + np.exp(log_sigma) * eps, a_hat),
    (mu, vgae.apply(params, propagation, x, sample_key, False)[0]),
  ):
    np.testing.assert_allclose(got, softplus(z @ z.T / np.sqrt(latent)), rtol=1e-5, atol=1e-6)


def test_location_bands_are_random_fourier_features_in_cycles(rng):
  # Eq. (11) as GeoCLIP writes it: [cos(2 pi B_s p), sin(2 pi B_s p)] with
  # B_s ~ N(0, sigma_s^2). Near the centre the angles 2 pi B_s p are small
  # enough to read back, and the B_s fitted from them have spread 2 pi sigma_s.
  scales, n_features, hidden = (1.0, 4.0), 256, 16
  lat0, lon0 = 41.85, -87.65
  centre = tuple(np.asarray(model.equal_earth(jnp.float32(lat0), jnp.float32(lon0))).tolist())
  coords = np.stack([lat0 + rng.uniform(-0.5, 0.5, 40), lon0 + rng.uniform(-0.5, 0.5, 40)], 1)
  coords = jnp.asarray(coords, jnp.float32)
  enc = model.LocationEncoder(scales, n_features, hidden, out=12, center=centre, scale=1.0)
  params = enc.init(jax.random.PRNGKey(0), coords)
  band_inputs = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.module.features == hidden:
      band_inputs.append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    enc.apply(params, coords)
  assert len(band_inputs) == len(scales)
  p = np.asarray(model.equal_earth(coords[:, 0], coords[:, 1]), np.float64) - np.asarray(centre)
  fitted = []
  for sigma, features in zip(scales, band_inputs):
    cos, sin = features[:, :n_features], features[:, n_features:]
    np.testing.assert_allclose(cos**2 + sin**2, 1.0, rtol=1e-5)
    angles = np.arctan2(sin, cos)
    assert np.abs(angles).max() < 2.5  # no wrapping around +-pi
    b = np.linalg.lstsq(p, angles, rcond=None)[0]  # [2, n_features]
    np.testing.assert_allclose(p @ b, angles, atol=1e-3)
    assert abs(b.std() / (2 * np.pi * sigma) - 1) < 0.15, (sigma, b.std())
    fitted.append(b / sigma)
  assert np.abs(np.corrcoef(fitted[0].ravel(), fitted[1].ravel())[0, 1]) < 0.2  # own draws


def test_pretraining_steps_weigh_the_parts_by_alpha_and_beta(rng):
  # Eq. (27), L = alpha L_mmcl + beta L_mvgcl, with the weights of the run's
  # config, not each other's.
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, _Compiled

  inputs = _synthetic_inputs(rng, images=False)
  cfg = dataclasses.replace(_TINY, use_images=False)
  compiled = _Compiled(UrbanMMCLConfig(alpha=0.2, beta=3.0, model=cfg), cfg)
  key = jax.random.PRNGKey(0)
  params = compiled.model.init(key, inputs, key)
  _, _, losses = compiled.chunk(params, compiled.tx.init(params), inputs, key, 1)
  losses = {k: float(v) for k, v in losses.items()}
  assert losses["mmcl"] > 0 and losses["recon"] > 0
  graph_part = losses["recon"] + losses["kl"] + losses["graph_contrast"]
  np.testing.assert_allclose(losses["total"], 0.2 * losses["mmcl"] + 3.0 * graph_part, rtol=1e-5)


def test_distance_view_shrinks_east_west_degrees_by_the_cosine_of_latitude():
  # At latitude 60 a degree of longitude is half a degree of latitude: 0.02
  # degree east and 0.01 degree north are both 1.112 km away.
  d = graphs.distance_graph(np.array([[60.0, 10.0], [60.0, 10.02], [60.01, 10.0]]))
  np.testing.assert_allclose(1.0 / d[0, 1], 1.112, rtol=2e-3)
  np.testing.assert_allclose(1.0 / d[0, 2], 1.112, rtol=2e-3)
  np.testing.assert_allclose(d, d.T)
  # Two regions at one place are the nearest pair of all, not unconnected (1/0).
  with pytest.raises(ValueError, match=r"regions 0 and 2 have the same centroid \(60\.0, 10\.0\)"):
    graphs.distance_graph(np.array([[60.0, 10.0], [60.0, 10.02], [60.0, 10.0]]))


def test_command_flags_reach_their_own_ablation_switches(tmp_path, monkeypatch):
  from experiments import urbanmmcl as command
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig

  monkeypatch.chdir(tmp_path)  # the default output folders are relative

  switches = ("no_multimodal", "no_graph", "no_vgae", "no_walks", "no_graph_contrast")
  out = ["--out", str(tmp_path / "run")]
  for field in switches:
    config, _, _ = command.parse_config(["--" + field.replace("_", "-"), *out])
    assert [getattr(config, s) for s in switches] == [s == field for s in switches], field
  config, _, projection = command.parse_config(
    ["--drop-view", "distance", "--drop-view", "poi", "--projection", "pca", *out]
  )
  assert config.drop_views == ("poi", "distance") and projection == "pca"
  # The same views dropped are the same run, however the flags were given:
  # one config (hence one checkpoint) and one default folder.
  runs = [
    command.parse_config(flags)
    for flags in (
      ["--drop-view", "poi", "--drop-view", "distance"],
      ["--drop-view", "distance", "--drop-view", "poi"],
      ["--drop-view", "distance", "--drop-view", "poi", "--drop-view", "poi"],
    )
  ]
  assert {run[0] for run in runs} == {runs[0][0]}
  assert {run[1] for run in runs} == {runs[0][1]}
  assert runs[0][1].name == "Chi-drop-viewpoi+distance"
  with pytest.raises(ValueError, match=r"drop_views: unknown view\(s\) \['land'\]"):
    UrbanMMCLConfig(drop_views=("land",))
  # An empty --images (an unset shell variable) would be the current folder.
  with pytest.raises(SystemExit):
    command.parse_config(["--images", "", *out])


def test_ablation_switches_reach_the_model(data_root):
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, prepare

  uses = ("use_vgae", "use_walks", "use_graph_contrast")
  for field, use in zip(("no_vgae", "no_walks", "no_graph_contrast"), uses):
    config = UrbanMMCLConfig(city="NY", data_root=str(data_root), **{field: True})
    _, model_config, meta = prepare(config)
    assert [getattr(model_config, u) for u in uses] == [u != use for u in uses], field
    assert model_config.use_graph and meta["views"] == ("poi", "mobility")
  _, model_config, meta = prepare(
    UrbanMMCLConfig(city="Chi", data_root=str(data_root), no_multimodal=True)
  )
  assert not (model_config.use_text or model_config.use_location) and meta["modalities"] == []
  _, model_config, meta = prepare(
    UrbanMMCLConfig(city="Chi", data_root=str(data_root), drop_views=("mobility",))
  )
  assert meta["views"] == ("poi", "distance") and model_config.n_views == 2
  # Without the graph part no view is used, and the results say none.
  _, model_config, meta = prepare(
    UrbanMMCLConfig(city="Chi", data_root=str(data_root), no_graph=True)
  )
  assert not model_config.use_graph and meta["views"] == ()
  assert meta["modalities"] == ["text", "location"]


def test_geo_texts_cut_to_the_encoders_length_are_counted_and_told(data_root):
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, load_geo_texts, prepare, text_cut_note

  _, _, meta = prepare(UrbanMMCLConfig(city="Chi", data_root=str(data_root)))
  # The default length reads every Chicago text whole: no note.
  assert meta["text_bytes"] == {"kept": 768, "longest": 739, "texts_cut": 0}
  assert text_cut_note(meta["text_bytes"], 77) is None
  inputs, model_config, meta = prepare(
    UrbanMMCLConfig(city="Chi", data_root=str(data_root), text_max_bytes=600)
  )
  kept = -(-600 // model_config.bytes_per_token) * model_config.bytes_per_token
  assert inputs["tokens"].shape == (77, kept)
  lengths = [len(text.encode("utf-8")) for text in load_geo_texts(data_root)]
  texts_cut = sum(length > kept for length in lengths)
  assert 0 < texts_cut < 77 and meta["text_bytes"] == {
    "kept": kept,
    "longest": 739,
    "texts_cut": texts_cut,
  }
  assert text_cut_note(meta["text_bytes"], 77) == (
    f"  note: {texts_cut} of 77 geo-texts are longer than the {kept} bytes the text encoder "
    "reads (text_max_bytes); the rest of each is not read (longest: 739 bytes)"
  )
  _, _, meta = prepare(UrbanMMCLConfig(city="NY", data_root=str(data_root)))
  assert meta["text_bytes"] is None and text_cut_note(None, 180) is None


def test_results_table_puts_embedding_before_raw_feature_scores():
  def scores(r2, mae, rmse, per_seed=(0.49, 0.51)):
    r2 = {"mean": r2, "std": 0.01, "per_seed": list(per_seed)}
    return {"r2": r2, "mae": {"mean": mae}, "rmse": {"mean": rmse}}

  from experiments import urbanmmcl as command
  from jaxurban.urbanmmcl.train import TASKS

  results = {
    "views": ["poi"],
    "modalities": [],
    "config": {"ridge_alpha": 1.0, "ridge_alphas": [1.0]},
    "ridge": {
      "embedding": {t: scores(0.5, 11.0, 21.0) for t in TASKS},
      "raw_features": {t: scores(0.25, 33.0, 44.0) for t in TASKS},
    },
    "finetune": {
      "crime": [
        {"r2": 0.1, "mae": 4.0, "best_epochs": [1]},
        {"r2": 0.3, "mae": 6.0, "best_epochs": [2]},
      ]
    },
  }
  table = command.results_table(results)
  assert "| crime (alpha 1.0) | 0.5000 ± 0.0100 | 0.2500 | 11.00 / 33.00 | 21.00 / 44.00 |" in table
  assert "| crime | r2 0.2000, mae 5.0000 |" in table
  # One seed has no spread to show, rather than "± 0.0000".
  results["ridge"]["embedding"]["crime"] = scores(0.5, 11.0, 21.0, per_seed=[0.5])
  table = command.results_table(results)
  assert "| crime (alpha 1.0) | 0.5000 (1 seed) | 0.2500 |" in table
  assert table.startswith("views ['poi'], modalities none\n")
  # Without the graph part (no views), the table says so in words.
  results.update(views=[], modalities=["text", "location"])
  assert command.results_table(results).startswith("views none, modalities ['text', 'location']\n")


def test_finetuning_splits_each_fold_into_train_validation_and_test(data_root, monkeypatch):
  # Fold f's model trains on the regions outside folds f and f + 1, stops on
  # fold f + 1 and is scored on fold f; regions a task leaves out (no
  # check-ins) are in none of them. It starts from the pre-trained encoder.
  from jaxurban.eval import kfold
  from jaxurban.urbanmmcl import train as mmcl

  config, inputs, model_config, meta, pre = _new_york_finetuning(data_root, finetune_folds=4)
  calls = []

  def runner(config, model_config, outputs, classification):
    def run(params, inputs, y, train, val, keys):
      calls.append({"params": params, "train": np.asarray(train), "val": np.asarray(val)})
      shape = (train.shape[0], y.shape[0]) + ((outputs,) if classification else ())
      return jnp.zeros(shape), jnp.zeros(train.shape[0], jnp.int32)

    return run

  monkeypatch.setattr(mmcl, "_finetune_runner", runner)
  n = meta["n_regions"]
  check_ins = np.asarray(meta["labels"]["checkIn"])
  assert 0 < np.sum(check_ins == 0) < n
  for task, keep in (("checkIn", check_ins > 0), ("landuse", np.ones(n, bool))):
    mmcl._finetune_task(config, model_config, pre, inputs, task, meta, 0, lambda *_: None)
    fold_of = np.full(n, -1)
    fold_of[keep] = kfold.fold_assignment(int(keep.sum()), 4, config.fold_seed)
    for f in range(4):
      val = fold_of == (f + 1) % 4
      np.testing.assert_array_equal(calls[-1]["val"][f], val)
      np.testing.assert_array_equal(calls[-1]["train"][f], keep & (fold_of != f) & ~val)
    chex.assert_trees_all_equal(calls[-1]["params"]["params"]["encoder"], pre["params"])


def test_finetuned_predictions_follow_an_affine_change_of_the_labels(data_root, monkeypatch):
  # Regression heads learn standardised labels and predictions are mapped
  # back: labels a y + b give predictions a p + b, on the labels' own scale.
  from jaxurban.urbanmmcl import train as mmcl

  config, inputs, model_config, meta, pre = _new_york_finetuning(
    data_root, finetune_folds=3, finetune_epochs=3, patience=3
  )
  seen = _record_pooled_folds(monkeypatch)

  def predictions(labels):
    meta_now = dict(meta, labels=dict(meta["labels"], crime=labels))
    mmcl._finetune_task(config, model_config, pre, inputs, "crime", meta_now, 0, lambda *_: None)
    return np.asarray(seen[-1], np.float64)

  crime = np.asarray(meta["labels"]["crime"], np.float64)
  before = predictions(crime)
  after = predictions(4.0 * crime + 500.0)
  np.testing.assert_allclose(after, 4.0 * before + 500.0, rtol=1e-3, atol=1e-3 * np.ptp(crime))


def test_ridge_probe_leaves_out_regions_without_check_ins(data_root, rng):
  # Check-in scores are over the regions with check-ins only: the embeddings
  # of the others change nothing there, but do change the other tasks.
  from jaxurban.data.hafusion import load_city_views
  from jaxurban.urbanmmcl.train import UrbanMMCLConfig, ridge_probe

  labels = load_city_views("NY", data_root).labels
  zero = np.asarray(labels["checkIn"]) == 0
  config = UrbanMMCLConfig(city="NY", ridge_folds=5)
  emb = rng.normal(size=(1, zero.size, 6))
  moved = emb.copy()
  moved[:, zero] += 10.0 * rng.normal(size=(int(zero.sum()), 6))
  a, b = ridge_probe(emb, labels, config), ridge_probe(moved, labels, config)
  assert a["checkIn"] == b["checkIn"]
  assert a["crime"]["r2"]["mean"] != b["crime"]["r2"]["mean"]


def test_finetuning_keeps_no_epoch_after_patience_runs_out(data_root):
  # The kept epoch is the last validation record before the first run of more
  # than `patience` epochs without one: patience 0 keeps the first epoch, and
  # a shorter patience never keeps a later epoch than a longer one.
  from jaxurban.urbanmmcl import train as mmcl

  base, inputs, model_config, meta, pre = _new_york_finetuning(
    data_root, finetune_folds=3, finetune_epochs=8
  )

  def best_epochs(patience):
    config = dataclasses.replace(base, patience=patience)
    result = mmcl._finetune_task(
      config, model_config, pre, inputs, "crime", meta, 0, lambda *_: None
    )
    return np.asarray(result["best_epochs"])

  unlimited, short, none = best_epochs(8), best_epochs(1), best_epochs(0)
  assert unlimited.max() > 0  # validation improves after the first epoch somewhere
  np.testing.assert_array_equal(none, 0)
  assert np.all(short <= unlimited)
