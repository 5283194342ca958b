"""Device meshes and the names of their axes, in one place.

Two ways of spreading CoRE over devices, each a one-dimensional mesh:

* ``SEEDS``: training K seeds is embarrassingly parallel; the seed axis of
  the state is split and the city graphs are replicated.
* ``REGIONS``: one large city pair is split by regions. The cost of a step
  is the mobility loss's row normaliser, O(N_o N d) for the N_o regions with
  outgoing mobility, and the alignment losses' anchors; those rows (and the
  target's edges, and the anchors) are split over the devices while the
  [N, d] embeddings, O(N d), are all-gathered. The jitted step is the same;
  the loss functions only add sharding constraints when given a mesh.

On one device every placement here is the identity.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SEEDS = "seeds"  # mesh axis over which independent seeds are split
REGIONS = "regions"  # mesh axis over which the rows of one city pair are split
BATCH = "batch"  # mesh axis over which the samples of a forecasting batch are split


def _mesh(axis: str, devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis,))


def _split_leading(tree, mesh: Mesh, axis: str, what: str, remedy: str):
  """Places every array of `tree` split along its leading axis over `axis`.

  Raises ValueError when a leading size is not a multiple of the number of
  devices, which jax cannot split evenly.
  """
  n_devices = mesh.devices.size
  for leaf in jax.tree.leaves(tree):
    if leaf.shape[0] % n_devices:
      raise ValueError(
        f"{leaf.shape[0]} {what} cannot be split over {n_devices} devices; "
        f"{remedy} a multiple of {n_devices}"
      )
  return _put(tree, NamedSharding(mesh, PartitionSpec(axis)))


def _put(tree, target: NamedSharding):
  """``jax.device_put(tree, target)``, also when `target` spans several processes.

  Every process holds the same values. jax assembles a multi-process array
  from host data, so with several processes the leaves go through NumPy
  first (arrays restored from a checkpoint are committed to this process's
  devices, which jax refuses to move to a mesh spanning other hosts).
  """
  if jax.process_count() > 1:
    tree = to_host(tree)
  return jax.device_put(tree, target)


def seed_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: all) named `SEEDS`."""
  return _mesh(SEEDS, devices)


def region_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: all) named `REGIONS`."""
  return _mesh(REGIONS, devices)


def batch_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: all) named `BATCH`."""
  return _mesh(BATCH, devices)


def shard_seeds(tree, mesh: Mesh):
  """Places every array of `tree` split along its leading (seed) axis."""
  return _split_leading(tree, mesh, SEEDS, "seeds", "use")


def split_rows(tree, mesh: Mesh):
  """Places every array of `tree` split along its leading (row) axis over `REGIONS`."""
  return _split_leading(tree, mesh, REGIONS, "rows", "pad them to")


def shard_batch(tree, mesh: Mesh):
  """Places every array of `tree` split along its leading (sample) axis over `BATCH`."""
  return _split_leading(tree, mesh, BATCH, "samples", "use a batch size that is")


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` whole on every device of `mesh`."""
  return _put(tree, NamedSharding(mesh, PartitionSpec()))


def to_host(tree):
  """Every array of `tree` as a NumPy array of its whole (global) value.

  With several processes (``--distributed``) an array split over devices of
  other hosts, such as the seed axis under ``--shard-seeds``, cannot be read
  by ``jax.device_get``; it is gathered from every process first, so each
  process gets the whole value. Single-process arrays are read directly.
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def constrain_rows(x: jax.Array, mesh: Mesh | None, axis: int = 0) -> jax.Array:
  """Asks XLA to split dimension `axis` of `x` over the `REGIONS` devices.

  The identity without a mesh, so the ordinary single-device step is
  unchanged. Inside ``jax.vmap`` the mapped (seed) dimension is left
  replicated.
  """
  if mesh is None:
    return x
  spec = [None] * x.ndim
  spec[axis] = REGIONS
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
