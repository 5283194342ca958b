"""Device meshes and the names of their axes, in one place.

Training K seeds is embarrassingly parallel: the seed axis of the state is
split over a one-dimensional mesh and the same jitted step runs on every
device with the city graphs replicated. On one device every placement here
is the identity.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SEEDS = "seeds"  # mesh axis over which independent seeds are split


def seed_mesh(devices=None) -> Mesh:
  """A one-axis mesh over `devices` (default: all) named `SEEDS`."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (SEEDS,))


def shard_seeds(tree, mesh: Mesh):
  """Places every array of `tree` split along its leading (seed) axis.

  Raises ValueError when the number of seeds is not a multiple of the
  number of devices, which jax cannot split evenly.
  """
  n_devices = mesh.devices.size
  for leaf in jax.tree.leaves(tree):
    if leaf.shape[0] % n_devices:
      raise ValueError(
        f"{leaf.shape[0]} seeds cannot be split over {n_devices} devices; "
        f"use a multiple of {n_devices} seeds"
      )
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(SEEDS)))


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` whole on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
