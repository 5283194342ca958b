"""Row gathers of `jaxurban.graph`: same values and gradients as indexing,
under jit and under every way of vmapping them; the city graph and mobility
target of a small hand-built city."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.graph import city_graph, pad_target_rows, permute_rows, take_rows


def _loss(gather):
  # A fixed nonlinear read-out, so that gradients weight rows differently.
  return lambda x, index: jnp.sum(jnp.sin(gather(x, index)) * jnp.arange(1.0, 1.0 + x.shape[-1]))


@pytest.mark.parametrize(
  "n_rows, index_shape, width", [(7, (5,), 3), (13, (4, 6), 8), (3, (9, 2), 1)]
)
def test_take_rows_matches_indexing(rng, n_rows, index_shape, width):
  x = jnp.asarray(rng.normal(size=(n_rows, width)), jnp.float32)
  # Repeated rows on purpose: their gradients must add up.
  index = jnp.asarray(rng.integers(0, n_rows, index_shape), jnp.int32)
  np.testing.assert_array_equal(take_rows(x, index), x[index])
  expected = jax.grad(_loss(lambda a, i: a[i]))(x, index)
  np.testing.assert_allclose(jax.grad(_loss(take_rows))(x, index), expected, rtol=1e-6)


@pytest.mark.parametrize("seeds", [1, 4])
@pytest.mark.parametrize("batched", ["x", "index", "both"])
def test_take_rows_under_vmap(rng, batched, seeds):
  n_rows, width = 11, 5
  x = jnp.asarray(rng.normal(size=(seeds, n_rows, width)), jnp.float32)
  index = jnp.asarray(rng.integers(0, n_rows, (seeds, 6, 3)), jnp.int32)
  in_axes = {"x": (0, None), "index": (None, 0), "both": (0, 0)}[batched]
  x_arg = x if in_axes[0] == 0 else x[0]
  index_arg = index if in_axes[1] == 0 else index[0]
  ours = jax.jit(jax.vmap(jax.value_and_grad(_loss(take_rows)), in_axes=in_axes))
  reference = jax.vmap(jax.value_and_grad(_loss(lambda a, i: a[i])), in_axes=in_axes)
  (value, grad), (value_ref, grad_ref) = ours(x_arg, index_arg), reference(x_arg, index_arg)
  # The values are sums of 18 x 5 terms of size <= 5, whose float32 rounding
  # depends on the summation order; the gradients are elementwise.
  np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)


def test_take_rows_nested_vmap(rng):
  x = jnp.asarray(rng.normal(size=(2, 3, 10, 4)), jnp.float32)
  index = jnp.asarray(rng.integers(0, 10, (7,)), jnp.int32)
  grad = jax.vmap(jax.vmap(jax.grad(_loss(take_rows)), in_axes=(0, None)), in_axes=(0, None))
  grad_ref = jax.vmap(
    jax.vmap(jax.grad(_loss(lambda a, i: a[i])), in_axes=(0, None)), in_axes=(0, None)
  )
  np.testing.assert_allclose(grad(x, index), grad_ref(x, index), rtol=1e-6, atol=1e-6)


def test_permute_rows_under_vmap(rng):
  x = jnp.asarray(rng.normal(size=(3, 9, 4)), jnp.float32)
  permutation = rng.permutation(9).astype(np.int32)
  inverse = np.argsort(permutation).astype(np.int32)
  gather = lambda a, p: permute_rows(a, p, jnp.asarray(inverse))
  grad = jax.jit(jax.vmap(jax.grad(_loss(gather)), in_axes=(0, None)))
  grad_ref = jax.vmap(jax.grad(_loss(lambda a, i: a[i])), in_axes=(0, None))
  np.testing.assert_array_equal(
    jax.vmap(gather, in_axes=(0, None))(x, jnp.asarray(permutation)), x[:, permutation]
  )
  np.testing.assert_allclose(
    grad(x, jnp.asarray(permutation)), grad_ref(x, jnp.asarray(permutation)), rtol=1e-6
  )


def _hand_built_city():
  # Edges (w_ij per origin, eq. 1): 0 -> 1 (0.25), 0 -> 2 (0.75), 1 -> 2 (1),
  # 2 -> 0 (0.4), 2 -> 2 (0.6); region 3 has no edges at all.
  origin = np.array([0, 0, 1, 2, 2])
  destination = np.array([1, 2, 2, 0, 2])
  weight = np.array([0.25, 0.75, 1.0, 0.4, 0.6])
  return city_graph(origin, destination, weight, weight, 4)


def test_city_graph_on_a_hand_built_city():
  n = 4
  city = _hand_built_city()

  # The GAT's graph (PyG GATConv, add_self_loops with fill_value="mean"): the
  # file's 2 -> 2 loop is dropped and every region gets a loop weighted by the
  # mean of its other incoming weights: 0: 0.4, 1: 0.25, 2: (0.75 + 1) / 2,
  # 3: none, so 0. Receiver-sorted, then by sender.
  graph = city.graph
  np.testing.assert_array_equal(graph.receivers, [0, 0, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(graph.senders, [0, 2, 0, 1, 0, 1, 2, 3])
  np.testing.assert_allclose(graph.edges, [0.4, 0.4, 0.25, 0.25, 0.75, 1.0, 0.875, 0.0])
  np.testing.assert_array_equal(graph.n_node, [n])
  np.testing.assert_array_equal(graph.n_edge, [8])
  # The neighbour tables hold exactly the same weighted edges.
  listed = set()
  for table in city.neighbours.buckets:
    index, weights, mask = (np.asarray(a) for a in (table.in_index, table.in_weight, table.in_mask))
    for r, receiver in enumerate(np.asarray(table.receivers)):
      for k in np.flatnonzero(mask[r]):
        listed.add((int(index[r, k]), int(receiver), float(weights[r, k])))
  expected = zip(graph.senders.tolist(), graph.receivers.tolist(), graph.edges.tolist())
  assert listed == {(s, r, float(np.float32(w))) for s, r, w in expected}

  # The mobility target (eq. 4) keeps the file's own loop: T = W / sum(W),
  # sum(W) = 3, so each of the three origins holds a third of the mass.
  target = {
    (int(i), int(j)): float(t)
    for i, j, t in zip(city.target_origin, city.target_destination, city.target)
  }
  assert target == pytest.approx(
    {(0, 1): 0.25 / 3, (0, 2): 0.75 / 3, (1, 2): 1 / 3, (2, 0): 0.4 / 3, (2, 2): 0.6 / 3}
  )
  np.testing.assert_array_equal(city.origin_rows, [0, 1, 2])
  np.testing.assert_allclose(city.row_weight, [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)


def test_padded_target_rows_carry_no_weight():
  city = _hand_built_city()
  padded = pad_target_rows(city, 4)
  # 3 origin rows -> 4, 5 target entries -> 8; the extra ones point at region
  # 0 with weight 0, so every weighted sum over rows or entries is unchanged.
  np.testing.assert_array_equal(padded.origin_rows, [0, 1, 2, 0])
  np.testing.assert_allclose(padded.row_weight, [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(padded.target_origin[5:], [0, 0, 0])
  np.testing.assert_array_equal(padded.target_destination[5:], [0, 0, 0])
  np.testing.assert_array_equal(padded.target[5:], [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(padded.target[:5], city.target)
  assert float(np.sum(padded.target)) == pytest.approx(1.0)
  # Already a multiple: nothing changes.
  same = pad_target_rows(city, 1)
  np.testing.assert_array_equal(same.target, city.target)
  np.testing.assert_array_equal(same.origin_rows, city.origin_rows)
