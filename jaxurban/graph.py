"""Mobility graphs as fixed-shape arrays for jitted message passing.

A city's mobility graph is built once in NumPy (outside any jitted step) and
stored in two equivalent forms:

* a ``jraph.GraphsTuple`` (senders = origins, receivers = destinations), used
  by the segment-sum GAT path and by anything that wants a standard graph;
* receiver-major neighbour tables (an "ELL" layout): for every region the
  padded list of its in-neighbours, plus, for the backward pass, the padded
  list of the table slots in which each region appears as a sender.

The tables exist because XLA's scatter on the CPU is slow: with them the GAT
forward pass needs only gathers and the custom backward of the gather
(`gather_rows`) is itself a gather, never a scatter-add.
"""
from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np


@chex.dataclass(frozen=True)
class NeighbourTable:
  """Padded in-neighbour lists of a set of receivers (all fields are arrays).

  Attributes:
    receivers: [R] int32, the regions whose in-neighbours are listed.
    in_index: [R, K] int32, sender of the k-th incoming edge of each receiver
      (padding slots point at region 0 and are masked out).
    in_weight: [R, K] float32, edge weight w_ij of that edge (0 on padding).
    in_mask: [R, K] bool, True on real edges.
    out_slot: [N, K_out] int32, for every region of the city the flat
      positions ``r * K + k`` of the slots in which it is the sender; padding
      points at R * K, one past the end, where the backward keeps a zero row.
  """
  receivers: jax.Array
  in_index: jax.Array
  in_weight: jax.Array
  in_mask: jax.Array
  out_slot: jax.Array


@chex.dataclass(frozen=True)
class NeighbourGraph:
  """Receiver-major adjacency of one city, receivers bucketed by in-degree.

  In-degrees of mobility graphs are skewed (XA: median 10, maximum 30), so a
  single table padded to the maximum degree would be mostly padding. Each
  bucket holds the receivers whose in-degree fits its width (widths double),
  which bounds the padding at 2x.

  Attributes:
    buckets: tables whose receivers partition the regions.
    inverse_order: [N] int32, position of each region in the concatenation
      of the buckets' receivers.
  """
  buckets: tuple[NeighbourTable, ...]
  inverse_order: jax.Array


def add_mean_self_loops(origin: np.ndarray, destination: np.ndarray,
                        weight: np.ndarray, n_regions: int):
  """Drops existing self loops and adds one per region weighted by the mean
  weight of its incoming edges (0 where it has none).

  This is what the authors' encoder (PyTorch Geometric's GATConv with its
  default ``add_self_loops=True, fill_value='mean'``) does to its input graph,
  so their explicit identity matrix never reaches the attention.
  """
  keep = origin != destination
  origin, destination, weight = origin[keep], destination[keep], weight[keep]
  incoming_sum = np.bincount(destination, weights=weight, minlength=n_regions)
  incoming_count = np.bincount(destination, minlength=n_regions)
  loop_weight = np.where(incoming_count > 0,
                         incoming_sum / np.maximum(incoming_count, 1), 0.0)
  loops = np.arange(n_regions)
  return (np.concatenate([origin, loops]).astype(np.int32),
          np.concatenate([destination, loops]).astype(np.int32),
          np.concatenate([weight, loop_weight]).astype(np.float64))


def _table(senders, receivers, weight, rows, n_regions) -> NeighbourTable:
  """One padded table for the receivers `rows` (edges receiver-sorted)."""
  position = np.full(n_regions, -1)
  position[rows] = np.arange(len(rows))
  keep = position[receivers] >= 0
  senders, receivers, weight = senders[keep], receivers[keep], weight[keep]
  local = position[receivers]
  degree = np.bincount(local, minlength=len(rows))
  width = max(int(degree.max(initial=0)), 1)
  first = np.concatenate([[0], np.cumsum(degree)[:-1]])
  slot = np.arange(len(local)) - first[local]

  in_index = np.zeros((len(rows), width), np.int32)
  in_weight = np.zeros((len(rows), width), np.float32)
  in_mask = np.zeros((len(rows), width), bool)
  in_index[local, slot] = senders
  in_weight[local, slot] = weight
  in_mask[local, slot] = True

  flat = local * width + slot
  out_order = np.argsort(senders, kind="stable")
  out_degree = np.bincount(senders, minlength=n_regions)
  out_width = max(int(out_degree.max(initial=0)), 1)
  out_first = np.concatenate([[0], np.cumsum(out_degree)[:-1]])
  sorted_senders = senders[out_order]
  out_k = np.arange(len(sorted_senders)) - out_first[sorted_senders]
  out_slot = np.full((n_regions, out_width), len(rows) * width, np.int32)
  out_slot[sorted_senders, out_k] = flat[out_order]
  return NeighbourTable(receivers=jnp.asarray(rows, jnp.int32),
                        in_index=jnp.asarray(in_index),
                        in_weight=jnp.asarray(in_weight),
                        in_mask=jnp.asarray(in_mask),
                        out_slot=jnp.asarray(out_slot))


def neighbour_graph(senders: np.ndarray, receivers: np.ndarray,
                    weight: np.ndarray, n_regions: int,
                    bucketed: bool = True) -> NeighbourGraph:
  """Builds the padded in-neighbour and out-slot tables of a directed graph.

  With ``bucketed=False`` there is one table padded to the maximum degree.
  """
  senders = np.asarray(senders, np.int64)
  receivers = np.asarray(receivers, np.int64)
  order = np.lexsort((senders, receivers))  # receiver-sorted, stable
  senders, receivers = senders[order], receivers[order]
  weight = np.asarray(weight, np.float64)[order]
  degree = np.bincount(receivers, minlength=n_regions)
  if bucketed:
    # Width of each region's bucket: the next power of two >= its degree.
    width = 2 ** np.ceil(np.log2(np.maximum(degree, 1))).astype(int)
    groups = [np.flatnonzero(width == w) for w in np.unique(width)]
  else:
    groups = [np.arange(n_regions)]
  buckets = tuple(_table(senders, receivers, weight, rows, n_regions)
                  for rows in groups)
  inverse_order = np.empty(n_regions, np.int32)
  inverse_order[np.concatenate(groups)] = np.arange(n_regions)
  return NeighbourGraph(buckets=buckets, inverse_order=jnp.asarray(inverse_order))


def graphs_tuple(senders: np.ndarray, receivers: np.ndarray, weight: np.ndarray,
                 n_regions: int) -> jraph.GraphsTuple:
  """The same graph as a single-graph ``jraph.GraphsTuple``, receiver-sorted."""
  order = np.lexsort((senders, receivers))
  return jraph.GraphsTuple(
      nodes=None,
      edges=jnp.asarray(np.asarray(weight, np.float32)[order]),
      senders=jnp.asarray(np.asarray(senders, np.int32)[order]),
      receivers=jnp.asarray(np.asarray(receivers, np.int32)[order]),
      n_node=jnp.asarray([n_regions]),
      n_edge=jnp.asarray([len(senders)]),
      globals=None)


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, out_slot: jax.Array) -> jax.Array:
  """``x[index]`` for an [N, K] table, with a gather-only backward pass.

  The cotangent of a gather is a scatter-add; here it is computed instead by
  gathering, for every row of ``x``, the table slots listed in ``out_slot``
  (built by `neighbour_graph`) and summing them.
  """
  del out_slot
  return x[index]


def _gather_rows_fwd(x, index, out_slot):
  return x[index], (out_slot, index.shape)


def _gather_rows_bwd(residual, cotangent):
  out_slot, index_shape = residual
  # Keeps XLA from fusing the producer of the cotangent (typically a batched
  # dot) into this gather, which on the CPU turns the dot into a slow loop.
  cotangent = jax.lax.optimization_barrier(cotangent)
  flat = cotangent.reshape((index_shape[0] * index_shape[1],) + cotangent.shape[2:])
  flat = jnp.concatenate([flat, jnp.zeros((1,) + flat.shape[1:], flat.dtype)])
  return flat[out_slot].sum(axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@flax.struct.dataclass
class CityGraph:
  """Everything the CoRE step needs from one city, as device arrays.

  Attributes:
    n_regions: number of regions N.
    neighbours: the GAT's input graph as neighbour tables.
    graph: the same graph as a `jraph.GraphsTuple`.
    origin_rows: [N_o] int32, regions with outgoing mobility (rows of the
      mobility loss that carry weight).
    target_rows: [N_o, N] float32, target distribution T_ij of eq. (4),
      summing to 1 over the whole array.
  """
  n_regions: int = flax.struct.field(pytree_node=False)
  neighbours: NeighbourGraph
  graph: jraph.GraphsTuple
  origin_rows: jax.Array
  target_rows: jax.Array


def city_graph(origin: np.ndarray, destination: np.ndarray,
               edge_weight: np.ndarray, target_weight: np.ndarray | None,
               n_regions: int, od_flow: np.ndarray | None = None) -> CityGraph:
  """Builds the encoder graph and the mobility-loss target of one city.

  Args:
    origin, destination: [E] region indices of the mobility edges.
    edge_weight: [E] per-origin normalised transition frequencies (eq. 1),
      the GAT's edge attribute.
    target_weight: [E] weights whose normalised matrix is the mobility target
      (the file's weights); ignored when ``od_flow`` is given.
    n_regions: N.
    od_flow: optional [N, N] full origin–destination count matrix.

  The target is M / sum(M), where M is the full OD count matrix when present
  (as in the authors' code) and otherwise the matrix of the ``.mob`` weights:
  per-origin normalised files then weight every origin equally, and raw-count
  files weight every trip equally (eq. 4 of the CoRE paper over the listed
  pairs).
  """
  senders, receivers, weights = add_mean_self_loops(
      np.asarray(origin), np.asarray(destination), np.asarray(edge_weight),
      n_regions)
  if od_flow is not None:
    matrix = np.asarray(od_flow, np.float64)
  else:
    matrix = np.zeros((n_regions, n_regions), np.float64)
    np.add.at(matrix, (np.asarray(origin), np.asarray(destination)),
              np.asarray(target_weight, np.float64))
  matrix = matrix / matrix.sum()
  rows = np.flatnonzero(matrix.sum(axis=1) > 0).astype(np.int32)
  return CityGraph(
      n_regions=n_regions,
      neighbours=neighbour_graph(senders, receivers, weights, n_regions),
      graph=graphs_tuple(senders, receivers, weights, n_regions),
      origin_rows=jnp.asarray(rows),
      target_rows=jnp.asarray(matrix[rows], jnp.float32))
