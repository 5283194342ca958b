"""Row gathers of `jaxurban.graph`: same values and gradients as indexing,
under jit and under every way of vmapping them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.graph import permute_rows, take_rows


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
