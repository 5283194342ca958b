"""Mobility graphs as fixed-shape arrays for jitted message passing.

A city's mobility graph is built once in NumPy (outside any jitted step) and
stored in two equivalent forms:

* a ``jraph.GraphsTuple`` (senders = origins, receivers = destinations), used
  by the segment-sum GAT path and by anything that wants a standard graph;
* receiver-major neighbour tables (an "ELL" layout) bucketed by in-degree:
  for every region the padded list of its in-neighbours. With them the GAT
  aggregates by gathers and small batched matmuls, without [E, H, d] message
  tensors (see `jaxurban.core.gat`).

A gather-only backward for the tables (an out-neighbour table replacing the
scatter-add) was measured and dropped: on this XLA CPU runtime the scatter-add
of a [R, K, d] cotangent was 3-4x faster than the equivalent gather + sum.
"""

from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np
from jax import custom_batching
from jax.sharding import Mesh

from jaxurban.sharding import constrain_rows


@chex.dataclass(frozen=True)
class NeighbourTable:
  """Padded in-neighbour lists of a set of receivers (all fields are arrays).

  Attributes:
    receivers: [R] int32, the regions whose in-neighbours are listed.
    in_index: [R, K] int32, sender of the k-th incoming edge of each receiver
      (padding slots point at region 0 and are masked out).
    in_weight: [R, K] float32, edge weight w_ij of that edge (0 on padding).
    in_mask: [R, K] bool, True on real edges.
  """

  receivers: jax.Array
  in_index: jax.Array
  in_weight: jax.Array
  in_mask: jax.Array


@chex.dataclass(frozen=True)
class NeighbourGraph:
  """Receiver-major adjacency of one city, receivers bucketed by in-degree.

  In-degrees of mobility graphs are skewed (XA: median 10, maximum 30), so a
  single table padded to the maximum degree would be mostly padding. Each
  bucket holds the receivers whose in-degree fits its width (widths double);
  a width with fewer than `min_bucket` regions joins the next wider bucket,
  and the widest width stays apart. Padding is 1.35-1.4x on XA and CD.

  Attributes:
    buckets: tables whose receivers partition the regions.
    order: [N] int32, the buckets' receivers concatenated.
    inverse_order: [N] int32, position of each region in `order`.
  """

  buckets: tuple[NeighbourTable, ...]
  order: jax.Array
  inverse_order: jax.Array


def add_mean_self_loops(
  origin: np.ndarray, destination: np.ndarray, weight: np.ndarray, n_regions: int
):
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
  loop_weight = np.where(incoming_count > 0, incoming_sum / np.maximum(incoming_count, 1), 0.0)
  loops = np.arange(n_regions)
  return (
    np.concatenate([origin, loops]).astype(np.int32),
    np.concatenate([destination, loops]).astype(np.int32),
    np.concatenate([weight, loop_weight]).astype(np.float64),
  )


def _table(senders, receivers, weight, rows, n_regions) -> NeighbourTable:
  """One padded table for the receivers `rows` (edges receiver-sorted)."""
  position = np.full(n_regions, -1)
  position[rows] = np.arange(len(rows))
  keep = position[receivers] >= 0
  senders, receivers, weight = senders[keep], receivers[keep], weight[keep]
  local = position[receivers]
  by_row = np.argsort(local, kind="stable")
  senders, weight, local = senders[by_row], weight[by_row], local[by_row]
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

  return NeighbourTable(
    receivers=jnp.asarray(rows, jnp.int32),
    in_index=jnp.asarray(in_index),
    in_weight=jnp.asarray(in_weight),
    in_mask=jnp.asarray(in_mask),
  )


def neighbour_graph(
  senders: np.ndarray,
  receivers: np.ndarray,
  weight: np.ndarray,
  n_regions: int,
  bucketed: bool = True,
  min_bucket: int = 64,
) -> NeighbourGraph:
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
    # Width of each region's bucket: the next power of two >= its degree;
    # buckets of fewer than `min_bucket` regions join the next wider one, as
    # each bucket costs a few extra small operations per layer. The widest
    # bucket stays on its own even when small: merging it down would double
    # the padding of a large bucket (and measured on CD, 2 regions of degree
    # 36 on their own beat joining them to the 105 of width 32 by 3 ms a
    # 5-seed epoch).
    width = 2 ** np.ceil(np.log2(np.maximum(degree, 1))).astype(int)
    groups, pending = [], np.zeros(0, np.int64)
    for w in np.unique(width):
      pending = np.concatenate([pending, np.flatnonzero(width == w)])
      if len(pending) >= min_bucket:
        groups.append(pending)
        pending = np.zeros(0, np.int64)
    if len(pending):
      # The leftover regions (too few for a bucket of their own) hold the
      # widest width: keep that width apart rather than pad the narrower
      # leftovers to it (a lone hub of in-degree 1,000 would pad them 250x).
      widest = width[pending] == width[pending].max()
      groups.extend(part for part in (pending[~widest], pending[widest]) if len(part))
  else:
    groups = [np.arange(n_regions)]
  buckets = tuple(_table(senders, receivers, weight, rows, n_regions) for rows in groups)
  order = np.concatenate(groups).astype(np.int32)
  inverse_order = np.empty(n_regions, np.int32)
  inverse_order[order] = np.arange(n_regions)
  return NeighbourGraph(
    buckets=buckets, order=jnp.asarray(order), inverse_order=jnp.asarray(inverse_order)
  )


def graphs_tuple(
  senders: np.ndarray, receivers: np.ndarray, weight: np.ndarray, n_regions: int
) -> jraph.GraphsTuple:
  """The same graph as a single-graph ``jraph.GraphsTuple``, receiver-sorted."""
  order = np.lexsort((senders, receivers))
  return jraph.GraphsTuple(
    nodes=None,
    edges=jnp.asarray(np.asarray(weight, np.float32)[order]),
    senders=jnp.asarray(np.asarray(senders, np.int32)[order]),
    receivers=jnp.asarray(np.asarray(receivers, np.int32)[order]),
    n_node=jnp.asarray([n_regions]),
    n_edge=jnp.asarray([len(senders)]),
    globals=None,
  )


# --------------------------------------------------------------------------
# Row gathers that stay fast when the seeds are vmapped.
#
# Under `jax.vmap` over seeds, ``x[index]`` with x [S, N, d] and a shared
# index becomes a gather whose slices are [S, 1, d]; XLA's CPU backend then
# lays the result out as [rows, S, d] and transposes it to [S, rows, d], and
# the scatter-add of the backward pass transposes back. For the GAT's
# neighbour tables those copies cost more than the gathers themselves. The
# batching rules below instead make the seed a batch dimension of the gather
# and of the scatter-add (``operand_batching_dims``), so the gathered rows
# come out seed-major with no transpose: 5 % of a 5-seed XA-CD training
# epoch (9 ms of 180). An earlier form that read the S seeds as one table of
# S N rows was as fast on one device, but when the seeds are split over
# devices (`--shard-seeds`) its reshape across the seed axis made XLA insert
# 115 collectives into a 4-seed, 2-device training chunk; with the seed as a
# batch dimension there are none (tested). With a single seed the plain
# batching is as fast and is kept.
# --------------------------------------------------------------------------


def _window_dims(index: jax.Array, row_rank: int) -> tuple[int, ...]:
  first = 1 + index.ndim
  return tuple(range(first, first + row_rank))


def _seed_batched_indices(n_seeds: int, index: jax.Array) -> jax.Array:
  return jnp.broadcast_to(index, (n_seeds,) + index.shape)[..., None]


@custom_batching.custom_vmap
def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  return x[index]


@_gather_rows.def_vmap
def _gather_rows_vmap(axis_size, in_batched, x, index):
  x_batched, index_batched = in_batched
  if not (x_batched or index_batched):
    return x[index], False
  if index_batched or not x_batched or axis_size == 1:
    gather = jax.vmap(
      lambda a, i: a[i], in_axes=(0 if x_batched else None, 0 if index_batched else None)
    )
    return gather(x, index), True
  row = x.shape[2:]
  dims = jax.lax.GatherDimensionNumbers(
    offset_dims=_window_dims(index, len(row)),
    collapsed_slice_dims=(1,),
    start_index_map=(1,),
    operand_batching_dims=(0,),
    start_indices_batching_dims=(0,),
  )
  gathered = jax.lax.gather(
    x,
    _seed_batched_indices(axis_size, index),
    dims,
    (1, 1) + row,
    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )
  return gathered, True


@custom_batching.custom_vmap
def _scatter_add_rows(values: jax.Array, index: jax.Array, row_marker: jax.Array) -> jax.Array:
  # `row_marker` is a [N] array that carries the output's row count N.
  out = jnp.zeros((row_marker.shape[0],) + values.shape[index.ndim :], values.dtype)
  return out.at[index].add(values)


@_scatter_add_rows.def_vmap
def _scatter_add_rows_vmap(axis_size, in_batched, values, index, row_marker):
  values_batched, index_batched, _ = in_batched
  n_rows = row_marker.shape[-1]
  if not (values_batched or index_batched):
    out = jnp.zeros((n_rows,) + values.shape[index.ndim :], values.dtype)
    return out.at[index].add(values), False
  if not values_batched:
    values = jnp.broadcast_to(values, (axis_size,) + values.shape)
  if index_batched or axis_size == 1:
    scatter = jax.vmap(
      lambda v, i: jnp.zeros((n_rows,) + v.shape[i.ndim :], v.dtype).at[i].add(v),
      in_axes=(0, 0 if index_batched else None),
    )
    return scatter(values, index), True
  row = values.shape[1 + index.ndim :]
  dims = jax.lax.ScatterDimensionNumbers(
    update_window_dims=_window_dims(index, len(row)),
    inserted_window_dims=(1,),
    scatter_dims_to_operand_dims=(1,),
    operand_batching_dims=(0,),
    scatter_indices_batching_dims=(0,),
  )
  out = jnp.zeros((axis_size, n_rows) + row, values.dtype)
  summed = jax.lax.scatter_add(
    out,
    _seed_batched_indices(axis_size, index),
    values,
    dims,
    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )
  return summed, True


@jax.custom_vjp
def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[index]`` for an integer array `index` of row numbers of x.

  Its value and gradient are those of ``x[index]`` (the backward pass adds
  the cotangent rows back with a scatter-add); only its layout under a vmap
  over seeds differs (see above). Reverse-mode differentiable in x. The
  rows must lie in [0, N): under the seed-batched rule a negative or too
  large row is not wrapped or clamped (the gather promises in-bounds
  indices). Every caller's indices come from `neighbour_graph` or
  `city_graph`, which build them in range.
  """
  return _gather_rows(x, index)


def _take_rows_fwd(x, index):
  return _gather_rows(x, index), (index, jnp.zeros(x.shape[0], jnp.int8))


def _take_rows_bwd(residuals, cotangent):
  index, row_marker = residuals
  return _scatter_add_rows(cotangent, index, row_marker), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def map_row_blocks(fn, rows, block: int, mesh: Mesh | None = None):
  """``fn`` over blocks of ``block`` rows, each recomputed in the backward pass.

  ``rows`` is a pytree of arrays sharing their leading length R; ``fn``
  maps one block of it to per-row outputs ([block, ...]), which come back
  as [R, ...]. Under ``jax.checkpoint`` the backward pass keeps only each
  block's inputs, so what ``fn`` gathers or expands per row (a row's
  neighbours, an edge's two embeddings) never exists for all R rows at
  once. The last block is padded by repeating each array's last row, so
  ``fn`` sees only real values; the padding's outputs are dropped (and with
  them their cotangents).
  """
  n_rows = jax.tree.leaves(rows)[0].shape[0]
  n_blocks = -(-n_rows // block)
  padding = n_blocks * block - n_rows

  def blocked(a):
    if padding:
      a = jnp.concatenate([a, jnp.repeat(a[-1:], padding, axis=0)])
    return constrain_rows(a.reshape((n_blocks, block) + a.shape[1:]), mesh, axis=1)

  out = jax.lax.map(jax.checkpoint(fn), jax.tree.map(blocked, rows))
  return jax.tree.map(lambda o: o.reshape((n_blocks * block,) + o.shape[2:])[:n_rows], out)


@jax.custom_vjp
def permute_rows(x: jax.Array, permutation: jax.Array, inverse: jax.Array) -> jax.Array:
  """``x[permutation]`` whose backward is the gather ``g[inverse]``.

  Autodiff of a gather gives a scatter-add, which XLA cannot know is a
  permutation; here the caller passes the inverse permutation.
  """
  del inverse
  return _gather_rows(x, permutation)


def _permute_rows_fwd(x, permutation, inverse):
  return _gather_rows(x, permutation), inverse


def _permute_rows_bwd(inverse, cotangent):
  return _gather_rows(cotangent, inverse), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@flax.struct.dataclass
class CityGraph:
  """Everything the CoRE step needs from one city, as device arrays.

  Attributes:
    n_regions: number of regions N.
    neighbours: the GAT's input graph as neighbour tables.
    graph: the same graph as a `jraph.GraphsTuple`.
    origin_rows: [N_o] int32, regions with outgoing mobility.
    row_weight: [N_o] float32, their share sum_j T_ij of the target.
    target_origin, target_destination: [E_T] int32, the non-zeros of the
      target distribution T of eq. (4).
    target: [E_T] float32, T_ij there (summing to 1).
  """

  n_regions: int = flax.struct.field(pytree_node=False)
  neighbours: NeighbourGraph
  graph: jraph.GraphsTuple
  origin_rows: jax.Array
  row_weight: jax.Array
  target_origin: jax.Array
  target_destination: jax.Array
  target: jax.Array


def city_graph(
  origin: np.ndarray,
  destination: np.ndarray,
  edge_weight: np.ndarray,
  target_weight: np.ndarray | None,
  n_regions: int,
  od_flow: np.ndarray | None = None,
) -> CityGraph:
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
    np.asarray(origin), np.asarray(destination), np.asarray(edge_weight), n_regions
  )
  if od_flow is not None:
    flow = np.asarray(od_flow, np.float64)
    t_origin, t_destination = np.nonzero(flow)
    t_value = flow[t_origin, t_destination]
  else:
    # Repeated pairs add up, as in a matrix built from the edge list.
    keys = np.asarray(origin, np.int64) * n_regions + np.asarray(destination, np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    t_value = np.bincount(inverse, weights=np.asarray(target_weight, np.float64))
    t_origin, t_destination = np.divmod(unique, n_regions)
  if not t_value.sum() > 0:
    raise ValueError("city_graph: the mobility target has no positive weight, nothing to learn")
  t_value = t_value / t_value.sum()
  row_sum = np.bincount(t_origin, weights=t_value, minlength=n_regions)
  rows = np.flatnonzero(row_sum > 0).astype(np.int32)
  return CityGraph(
    n_regions=n_regions,
    neighbours=neighbour_graph(senders, receivers, weights, n_regions),
    graph=graphs_tuple(senders, receivers, weights, n_regions),
    origin_rows=jnp.asarray(rows),
    row_weight=jnp.asarray(row_sum[rows], jnp.float32),
    target_origin=jnp.asarray(t_origin, jnp.int32),
    target_destination=jnp.asarray(t_destination, jnp.int32),
    target=jnp.asarray(t_value, jnp.float32),
  )


def pad_target_rows(city: CityGraph, multiple: int) -> CityGraph:
  """Pads the mobility target's rows and edges to multiples of `multiple`.

  The padding repeats region 0 with weight 0, so every loss is unchanged;
  it lets the rows be split evenly over `multiple` devices.
  """

  def pad(values: jax.Array, fill) -> jax.Array:
    extra = -len(values) % multiple
    return jnp.concatenate([values, jnp.full((extra,), fill, values.dtype)]) if extra else values

  return city.replace(
    origin_rows=pad(city.origin_rows, 0),
    row_weight=pad(city.row_weight, 0.0),
    target_origin=pad(city.target_origin, 0),
    target_destination=pad(city.target_destination, 0),
    target=pad(city.target, 0.0),
  )
