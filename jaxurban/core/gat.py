"""Edge-weighted graph attention encoder of CoRE (eq. 2 of the CoRE paper).

One layer computes, for every region i with in-neighbours N_i (self loop
included) and H heads,

    s_ij^h = LeakyReLU(a_src^h . (W^h x_j) + a_dst^h . (W^h x_i) + w_ij (a_e^h . W_e^h))
    alpha_ij^h = softmax_j s_ij^h
    z_i = 1/H sum_h sum_j alpha_ij^h W^h x_j + b

with the parameterisation of PyTorch Geometric's ``GATConv(heads=8,
concat=False, edge_dim=1)`` that the authors use (separate source and
destination attention vectors, output bias, Glorot initialisation).

Two implementations share one set of parameters:

* ``"tables"`` (default): the attention vectors are folded into W, giving
  per-node scalar logits (x (W^h a^h) instead of (x W^h) . a^h); the
  neighbours' x are aggregated before the per-head transform, which is valid
  because the message is linear in x_j; and neighbours are read from
  receiver-major tables bucketed by in-degree (`jaxurban.graph`). The
  messages are then [R, K, d_in] per bucket instead of [E, H, d_out].
* ``"segment"``: the textbook jraph form, gathers over edges, segment softmax
  and ``segment_sum`` by receiver. Kept as the readable reference.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from jaxurban.graph import CityGraph, map_row_blocks, permute_rows, take_rows

Initializer = Callable[..., jax.Array]


def _uniform(bound: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _glorot(fan_in: int, fan_out: int) -> Initializer:
  # PyG's `glorot`: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) computed
  # on the torch weight's last two dimensions.
  return _uniform(math.sqrt(6.0 / (fan_in + fan_out)))


class GATLayer(nn.Module):
  """One edge-weighted multi-head graph attention layer, heads averaged."""

  features: int = 128
  heads: int = 8
  negative_slope: float = 0.2
  implementation: str = "tables"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, city: CityGraph) -> jax.Array:
    h, f, d_in = self.heads, self.features, x.shape[-1]
    kernel = self.param("kernel", _glorot(d_in, h * f), (h, d_in, f))
    att_src = self.param("att_src", _glorot(h, f), (h, f))
    att_dst = self.param("att_dst", _glorot(h, f), (h, f))
    edge_kernel = self.param("edge_kernel", _glorot(1, h * f), (h, f))
    att_edge = self.param("att_edge", _glorot(h, f), (h, f))
    bias = self.param("bias", nn.initializers.zeros, (f,))

    # a^h . (W^h x) = x . (W^h a^h): per-node scalar logits from a [d_in, H]
    # matrix, and the edge term w_ij (W_e^h . a_e^h) is a scalar per head.
    src_vectors = jnp.einsum("hio,ho->ih", kernel, att_src)
    dst_vectors = jnp.einsum("hio,ho->ih", kernel, att_dst)
    edge_scale = jnp.sum(edge_kernel * att_edge, axis=-1)
    src_logit, dst_logit = x @ src_vectors, x @ dst_vectors  # [N, H]

    if self.implementation == "tables":
      # Each bucket is transformed on its own ([R, H d_in] @ [H d_in, d]) and
      # only the [N, d] result is put back in region order (a permutation,
      # whose backward is a gather too); concatenating the [R, H, d_in]
      # aggregates first was measured slower.
      flat_kernel = kernel.reshape(h * d_in, f)
      parts = []
      for bucket in city.neighbours.buckets:
        if bucket.in_index.shape[1] == 1:
          # Regions whose only in-edge is their self loop (a third of XA/CD):
          # every head's softmax is 1, so the layer is x_i sum_h W^h.
          parts.append(take_rows(x, bucket.in_index[:, 0]) @ kernel.sum(axis=0))
        elif self.remat:
          parts.append(
            _transform_bucket_in_blocks(
              bucket, x, src_logit, dst_logit, edge_scale, self.negative_slope, flat_kernel
            )
          )
        else:
          parts.append(
            _aggregate_bucket(
              bucket, x, src_logit, dst_logit, edge_scale, self.negative_slope
            ).reshape(-1, h * d_in)
            @ flat_kernel
          )
      return (
        permute_rows(jnp.concatenate(parts), city.neighbours.inverse_order, city.neighbours.order)
        / h
        + bias
      )
    elif self.implementation == "segment":
      if self.remat:
        raise ValueError("GATLayer.remat needs implementation='tables'")
      graph = city.graph
      n = x.shape[0]
      logits = (
        src_logit[graph.senders] + dst_logit[graph.receivers] + graph.edges[:, None] * edge_scale
      )  # [E, H]
      logits = nn.leaky_relu(logits, self.negative_slope)
      alpha = jraph.segment_softmax(logits, graph.receivers, n, indices_are_sorted=True)
      messages = alpha[:, :, None] * x[graph.senders][:, None, :]  # [E, H, d_in]
      aggregated = jraph.segment_sum(messages, graph.receivers, n, indices_are_sorted=True)
    else:
      raise ValueError(
        f"GATLayer.implementation: unknown {self.implementation!r} (expected 'tables' or 'segment')"
      )
    return jnp.einsum("nhi,hio->no", aggregated, kernel) / h + bias


def _aggregate_bucket(table, x, src_logit, dst_logit, edge_scale, slope):
  """sum_j alpha_ij^h x_j for the receivers of one neighbour table: [R, H, d_in]."""
  logits = (
    take_rows(src_logit, table.in_index)
    + take_rows(dst_logit, table.receivers)[:, None, :]
    + table.in_weight[..., None] * edge_scale
  )  # [R, K, H]
  logits = nn.leaky_relu(logits, slope)
  logits = jnp.where(table.in_mask[..., None], logits, -jnp.inf)
  alpha = jax.nn.softmax(logits, axis=1)
  alpha = jnp.where(table.in_mask[..., None], alpha, 0.0)
  neighbours = take_rows(x, table.in_index)  # [R, K, d_in]
  return jnp.einsum("rkh,rki->rhi", alpha, neighbours)


# Most elements of a block's gathered neighbours [rows, K, d_in] when the
# layer is rematerialised (64 MB in float32).
REMAT_BLOCK_ELEMENTS = 1 << 24


def _transform_bucket_in_blocks(table, x, src_logit, dst_logit, edge_scale, slope, flat_kernel):
  """The bucket's [R, d] outputs computed in row blocks, each recomputed in
  the backward pass (`jax.checkpoint`).

  What the backward keeps is then the layer's input and outputs, O(N d),
  instead of every bucket's gathered neighbours [R, K, d_in] and per-head
  aggregates [R, H, d_in]: for a city of 10^6 regions and ~10 destinations
  per origin those are about 10 GB per layer. The cost is a second forward
  pass of the layer. Rows padding the last block repeat the bucket's last
  row (`map_row_blocks`), so no padded softmax is all masked.
  """
  rows, width = table.in_index.shape
  block = max(1, min(rows, REMAT_BLOCK_ELEMENTS // (width * x.shape[-1])))

  def one_block(part):
    aggregated = _aggregate_bucket(part, x, src_logit, dst_logit, edge_scale, slope)
    return aggregated.reshape(part.receivers.shape[0], -1) @ flat_kernel

  return map_row_blocks(one_block, table, block)


class GATEncoder(nn.Module):
  """Learnable region inputs E followed by a stack of GAT layers.

  Between layers a PReLU whose slope is shared with the other city's encoder
  (passed in, as in the authors' code where one ``nn.PReLU`` serves both).
  """

  n_regions: int
  features: int = 128
  heads: int = 8
  layers: int = 2
  implementation: str = "tables"
  remat: bool = False

  @nn.compact
  def __call__(self, city: CityGraph, prelu_slope: jax.Array) -> jax.Array:
    # nn.Embedding's default N(0, 1) initialisation.
    z = self.param("inputs", nn.initializers.normal(1.0), (self.n_regions, self.features))
    for layer in range(self.layers):
      z = GATLayer(
        self.features,
        self.heads,
        implementation=self.implementation,
        remat=self.remat,
        name=f"gat_{layer}",
      )(z, city)
      if layer < self.layers - 1:
        z = jnp.where(z >= 0, z, prelu_slope * z)
    return z
