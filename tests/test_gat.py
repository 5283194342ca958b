"""The GAT encoder and the neighbour tables against dense references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.core import gat
from jaxurban.core.gat import GATEncoder, GATLayer
from jaxurban.graph import add_mean_self_loops, city_graph, neighbour_graph, permute_rows


def random_mobility(rng, n, edges_per_origin=4):
  origin, destination = [], []
  for i in rng.choice(n, max(1, 2 * n // 3), replace=False):
    dest = rng.choice(n, rng.integers(1, edges_per_origin + 1), replace=False)
    origin += [i] * len(dest)
    destination += list(dest)
  origin, destination = np.array(origin), np.array(destination)
  weight = rng.random(len(origin)) + 0.05
  weight /= np.bincount(origin, weight, n)[origin]  # per-origin normalised (eq. 1)
  return origin, destination, weight


def dense_gat_reference(x, params, senders, receivers, weight, slope=0.2):
  """Eq. (2) of the CoRE paper with PyG's GATConv parameterisation, float64,
  as an explicit double loop over receivers and their incoming edges."""
  kernel, att_src, att_dst = (
    np.asarray(params[k], np.float64) for k in ("kernel", "att_src", "att_dst")
  )
  edge_scale = np.sum(
    np.asarray(params["edge_kernel"], np.float64) * np.asarray(params["att_edge"], np.float64),
    axis=-1,
  )
  heads, _, features = kernel.shape
  n = x.shape[0]
  projected = np.einsum("ni,hio->hno", x, kernel)  # W^h x, per head
  out = np.zeros((n, features))
  for i in range(n):
    incoming = np.flatnonzero(receivers == i)
    for h in range(heads):
      scores = np.array(
        [
          projected[h, senders[e]] @ att_src[h]
          + projected[h, i] @ att_dst[h]
          + weight[e] * edge_scale[h]
          for e in incoming
        ]
      )
      scores = np.where(scores > 0, scores, slope * scores)
      alpha = np.exp(scores - scores.max())
      alpha /= alpha.sum()
      out[i] += sum(a * projected[h, senders[e]] for a, e in zip(alpha, incoming)) / heads
  return out + np.asarray(params["bias"], np.float64)


@pytest.mark.parametrize("implementation", ["tables", "segment"])
@pytest.mark.parametrize(
  "n,d_in,features,heads,edges_per_origin",
  [
    (5, 3, 4, 2, 4),
    (40, 16, 8, 8, 4),
    (90, 32, 16, 4, 4),
    # Sparse: a bucket of >= 64 regions whose only in-edge is the self loop.
    (300, 8, 8, 2, 1),
  ],
)
def test_gat_layer_matches_dense_reference(
  rng, implementation, n, d_in, features, heads, edges_per_origin
):
  origin, destination, weight = random_mobility(rng, n, edges_per_origin)
  graph = city_graph(origin, destination, weight, weight, n)
  senders, receivers, loop_weight = add_mean_self_loops(origin, destination, weight, n)
  x = rng.normal(size=(n, d_in))
  layer = GATLayer(features, heads, implementation=implementation)
  params = layer.init(
    jax.random.PRNGKey(int(rng.integers(1 << 30))), jnp.asarray(x, jnp.float32), graph
  )
  # Random (not initial) attention parameters so every term matters.
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3, p.dtype), params)
  got = layer.apply(params, jnp.asarray(x, jnp.float32), graph)
  if n == 300:
    assert any(b.in_index.shape[1] == 1 for b in graph.neighbours.buckets)
  expected = dense_gat_reference(x, params["params"], senders, receivers, loop_weight)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,edges_per_origin", [(60, 4), (200, 1)])
def test_gat_implementations_have_equal_gradients(rng, n, edges_per_origin):
  origin, destination, weight = random_mobility(rng, n, edges_per_origin)
  graph = city_graph(origin, destination, weight, weight, n)
  x = jnp.asarray(rng.normal(size=(n, 16)), jnp.float32)
  grads = {}
  for implementation in ("tables", "segment"):
    layer = GATLayer(8, 4, implementation=implementation)
    params = layer.init(jax.random.PRNGKey(0), x, graph)
    loss = lambda p, v: jnp.sum(jnp.sin(layer.apply(p, v, graph)))
    grads[implementation] = jax.grad(loss, argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(grads["tables"], grads["segment"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_elements", [3000, 20000])
def test_rematerialised_encoder_gives_equal_gradients_in_less_memory(
  rng, monkeypatch, block_elements
):
  # A small block budget splits buckets into several blocks, the last padded.
  monkeypatch.setattr(gat, "REMAT_BLOCK_ELEMENTS", block_elements)
  n = 400
  origin, destination, weight = random_mobility(rng, n, 8)
  graph = city_graph(origin, destination, weight, weight, n)
  slope = jnp.float32(0.25)
  losses, grads, temp_bytes = {}, {}, {}
  for remat in (False, True):
    encoder = GATEncoder(n, 32, 4, 2, "tables", remat=remat)
    params = encoder.init(jax.random.PRNGKey(0), graph, slope)
    loss = lambda p: jnp.sum(jnp.sin(encoder.apply(p, graph, slope)))
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    losses[remat], grads[remat] = value_and_grad(params)
    temp_bytes[remat] = value_and_grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
  chex.assert_trees_all_close(grads[True], grads[False], rtol=1e-4, atol=1e-5)
  # The layers' gathered neighbours and per-head aggregates are not stored.
  assert temp_bytes[True] < 0.8 * temp_bytes[False], temp_bytes


def test_gat_rejects_unknown_implementation(rng):
  origin, destination, weight = random_mobility(rng, 6)
  graph = city_graph(origin, destination, weight, weight, 6)
  with pytest.raises(ValueError, match="implementation"):
    GATLayer(4, 2, implementation="dense").init(jax.random.PRNGKey(0), jnp.ones((6, 3)), graph)


def test_self_loops_follow_mean_fill():
  origin = np.array([0, 1, 2, 2])
  destination = np.array([1, 1, 1, 2])  # 1 has a self loop; 2 -> 2 too
  weight = np.array([0.2, 0.5, 0.4, 0.6])
  senders, receivers, w = add_mean_self_loops(origin, destination, weight, 4)
  loops = {int(s): float(v) for s, r, v in zip(senders, receivers, w) if s == r}
  # Existing loops are replaced; region 1's loop is the mean of its other
  # incoming weights (0.2, 0.4); regions without incoming edges get 0.
  assert loops == pytest.approx({0: 0.0, 1: 0.3, 2: 0.0, 3: 0.0})
  assert len(senders) == 2 + 4


@pytest.mark.parametrize("bucketed", [True, False])
@pytest.mark.parametrize("n,width", [(7, 3), (50, 16), (300, 40)])
def test_neighbour_tables_hold_every_edge_once(rng, n, width, bucketed):
  origin, destination, weight = random_mobility(rng, n, width)
  graph = neighbour_graph(origin, destination, weight, n, bucketed=bucketed, min_bucket=8)
  listed = set()
  for table in graph.buckets:
    for r, receiver in enumerate(np.asarray(table.receivers)):
      for k in np.flatnonzero(np.asarray(table.in_mask[r])):
        listed.add((int(table.in_index[r, k]), int(receiver), float(table.in_weight[r, k])))
  expected = {
    (int(o), int(d), float(np.float32(w))) for o, d, w in zip(origin, destination, weight)
  }
  assert listed == expected
  # Every region in exactly one bucket, and the two orders are inverse.
  order = np.asarray(graph.order)
  np.testing.assert_array_equal(np.sort(order), np.arange(n))
  np.testing.assert_array_equal(order[np.asarray(graph.inverse_order)], np.arange(n))
  if bucketed and n > 50:
    assert len(graph.buckets) > 1


def test_a_lone_hub_keeps_its_width_to_itself():
  # 100 regions of in-degree 1, 10 of in-degree 4 (too few for a bucket of
  # their own) and one hub of in-degree 1,000: the 10 must not be padded to
  # the hub's width.
  n = 1111
  receivers = np.concatenate(
    [np.arange(100), np.repeat(np.arange(100, 110), 4), np.full(1000, 110)]
  )
  senders = np.arange(len(receivers)) % n
  graph = neighbour_graph(senders, receivers, np.ones(len(receivers)), n, min_bucket=64)
  widths = {
    int(np.asarray(table.receivers).shape[0]): int(np.asarray(table.in_mask).shape[1])
    for table in graph.buckets
  }
  # Regions without in-edges (degree 0) share the width-1 bucket.
  assert widths == {1100: 1, 10: 4, 1: 1000}  # each table as wide as its widest row


def test_permute_rows_backward_is_the_inverse_gather(rng):
  n = 40
  permutation = rng.permutation(n)
  inverse = np.argsort(permutation)
  x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  ours = jax.vjp(lambda v: permute_rows(v, permutation, inverse), x)[1](cotangent)[0]
  plain = jax.vjp(lambda v: v[permutation], x)[1](cotangent)[0]
  np.testing.assert_array_equal(ours, plain)


def test_city_graph_target_is_the_normalised_mobility_matrix(rng):
  n = 30
  origin, destination, weight = random_mobility(rng, n)
  # A repeated pair counts twice, as in a matrix filled from the edge list.
  origin, destination = np.append(origin, origin[0]), np.append(destination, destination[0])
  counts = rng.integers(1, 50, len(origin)).astype(float)
  graph = city_graph(origin, destination, np.ones(len(origin)), counts, n)
  dense = np.zeros((n, n))
  np.add.at(dense, (origin, destination), counts)
  dense /= dense.sum()
  got = np.zeros((n, n))
  got[np.asarray(graph.target_origin), np.asarray(graph.target_destination)] = graph.target
  np.testing.assert_allclose(got, dense, rtol=1e-6)
  np.testing.assert_allclose(
    graph.row_weight, dense.sum(1)[np.asarray(graph.origin_rows)], rtol=1e-6
  )
  # A full OD matrix, when given, replaces the edge weights.
  flow = rng.integers(0, 3, (n, n)).astype(float)
  graph = city_graph(origin, destination, np.ones(len(origin)), counts, n, od_flow=flow)
  assert float(jnp.sum(graph.target)) == pytest.approx(1.0)
  assert len(graph.target) == np.count_nonzero(flow)
  got = np.zeros((n, n))
  # add.at, so a pair listed twice would show up as a doubled entry.
  np.add.at(
    got, (np.asarray(graph.target_origin), np.asarray(graph.target_destination)), graph.target
  )
  np.testing.assert_allclose(got, flow / flow.sum(), rtol=1e-6)
  np.testing.assert_allclose(
    graph.row_weight, (flow / flow.sum()).sum(1)[np.asarray(graph.origin_rows)], rtol=1e-6
  )


@pytest.mark.parametrize("layers", [2, 3])
def test_encoder_applies_the_shared_prelu_between_layers_only(rng, layers):
  # The authors' encoder: GAT, PReLU, GAT (, PReLU, GAT); the last layer's
  # output, which the losses and the probes read, keeps its negative values.
  n = 30
  origin, destination, weight = random_mobility(rng, n)
  graph = city_graph(origin, destination, weight, weight, n)
  slope = jnp.float32(0.25)
  encoder = GATEncoder(n, 8, 2, layers)
  params = encoder.init(jax.random.PRNGKey(1), graph, slope)["params"]
  got = np.asarray(encoder.apply({"params": params}, graph, slope))
  z = params["inputs"]
  for layer in range(layers):
    z = GATLayer(8, 2).apply({"params": params[f"gat_{layer}"]}, z, graph)
    if layer < layers - 1:
      z = np.where(z >= 0, z, 0.25 * np.asarray(z))
  np.testing.assert_allclose(got, z, rtol=1e-5, atol=1e-6)
  assert (got < 0).mean() > 0.2
