"""Adaptive random walks on weighted graphs (UrbanMMCL, Sec. 3.4.3).

From every node of every view one walk of ``length`` steps is drawn with the
transition probabilities of eq. (22),

    P(v_{t+1} | v_t) = w(v_t, v_{t+1}) / sum_{k in N(v_t)} w(v_t, k),

where only edges of positive weight are neighbours. A walk whose current node
has no neighbour terminates (eq. 22 is undefined there); its remaining slots
repeat the last node and are marked invalid, so every output has the fixed
shape [V, N, length + 1]. All views and all start nodes advance together:
one ``lax.scan`` over the steps of a batched ``jax.random.categorical``,
with no Python loop over nodes or steps.

The reconstructed adjacency softplus(z_i . z_j) of eq. (19) is positive
everywhere, which would make every region a neighbour of every other; the
walk graph keeps the ``k`` strongest edges of each row (`top_k_graph`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["first_visits", "random_walks", "subgraph_adjacency", "top_k_graph"]


def top_k_graph(weights: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest off-diagonal positive entries of each row, zeros the rest.

  Args:
    weights: [..., N, N] non-negative weights.
    k: neighbours kept per node (clamped to N - 1).
  """
  n = weights.shape[-1]
  k = max(1, min(int(k), n - 1))
  off = jnp.where(jnp.eye(n, dtype=bool), 0.0, jnp.maximum(weights, 0.0))
  kth = jax.lax.top_k(off, k)[0][..., -1:]
  return jnp.where((off >= kth) & (off > 0), off, 0.0)


@functools.partial(jax.jit, static_argnames=("length",))
def random_walks(key: jax.Array, weights: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """One walk of ``length`` steps from every node of every view, eq. (22).

  Args:
    key: PRNG key.
    weights: [V, N, N] non-negative edge weights (row = current node).
    length: number of steps L; a walk visits L + 1 nodes.

  Returns:
    nodes: [V, N, L + 1] int32 visited nodes, nodes[v, i, 0] = i.
    valid: [V, N, L + 1] bool, False after a walk terminated at a node
      without neighbours.
  """
  if length < 0:
    raise ValueError(f"walk length must be >= 0, got {length}")
  weights = jnp.maximum(weights, 0.0)
  n_views, n, _ = weights.shape
  start = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n_views, n))
  alive0 = jnp.ones((n_views, n), dtype=bool)

  def step(carry, step_key):
    current, alive = carry
    rows = jax.vmap(lambda w, c: w[c])(weights, current)  # [V, N, N]
    has_neighbour = jnp.any(rows > 0, axis=-1)
    logits = jnp.where(rows > 0, jnp.log(jnp.where(rows > 0, rows, 1.0)), -jnp.inf)
    logits = jnp.where(has_neighbour[..., None], logits, 0.0)
    proposal = jax.random.categorical(step_key, logits, axis=-1).astype(jnp.int32)
    alive = alive & has_neighbour
    current = jnp.where(alive, proposal, current)
    return (current, alive), (current, alive)

  keys = jax.random.split(key, length)
  _, (path, path_alive) = jax.lax.scan(step, (start, alive0), keys)
  nodes = jnp.concatenate([start[None], path], axis=0)  # [L + 1, V, N]
  valid = jnp.concatenate([alive0[None], path_alive], axis=0)
  return jnp.moveaxis(nodes, 0, -1), jnp.moveaxis(valid, 0, -1)


def first_visits(nodes: jax.Array, valid: jax.Array) -> jax.Array:
  """[..., S] True at the first valid occurrence of each node in a walk.

  The subgraph of a walk is its set of distinct visited nodes (Sec. 3.4.3);
  marking first occurrences keeps the shape fixed.
  """
  same = nodes[..., :, None] == nodes[..., None, :]  # [..., S, S]
  s = nodes.shape[-1]
  earlier = jnp.tril(jnp.ones((s, s), dtype=bool), k=-1)
  seen_before = jnp.any(same & earlier & valid[..., None, :], axis=-1)
  return valid & ~seen_before


def subgraph_adjacency(weights: jax.Array, nodes: jax.Array, members: jax.Array) -> jax.Array:
  """[N, S, S] weights among the members of each walk's subgraph (no self loops).

  Args:
    weights: [N, N] edge weights of one view (gradients flow through them).
    nodes: [N, S] walk nodes; members: [N, S] first-visit mask.
  """
  sub = weights[nodes[:, :, None], nodes[:, None, :]]
  mask = members[:, :, None] & members[:, None, :]
  mask = mask & ~jnp.eye(nodes.shape[-1], dtype=bool)
  return jnp.where(mask, sub, 0.0)
