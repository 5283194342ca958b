"""Seeds split over 8 (simulated CPU) devices give the single-device result.

The devices must be configured before jax starts, so the check runs in a
child process with XLA_FLAGS set.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxurban.sharding import seed_mesh, shard_seeds

CHILD = textwrap.dedent(
  """
  import sys, tempfile
  import jax, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from experiments.bench_scale import synthetic_city
  from jaxurban import sharding
  from jaxurban.core import train
  from jaxurban.graph import city_graph

  graphs = []
  for seed, n in ((0, 150), (1, 170)):
    origin, destination, counts = synthetic_city(n, seed)
    per_origin = counts / np.bincount(origin, counts, n)[origin]
    graphs.append(city_graph(origin, destination, per_origin, counts, n))
  results = {}
  for shard in (False, True):
    for variant in ("core", "two-stage"):
      config = train.CoreConfig(seeds=8, epochs=3, log_every=3, n_anchors=32, features=16,
                                heads=2, plot=False, shard_seeds=shard, variant=variant)
      with tempfile.TemporaryDirectory() as workdir:
        results[shard, variant] = train.train_embeddings(config, workdir, *graphs)[:2]
  for variant in ("core", "two-stage"):
    for single, split in zip(results[False, variant], results[True, variant]):
      np.testing.assert_allclose(split, single, rtol=2e-5, atol=1e-6)
  mesh = sharding.seed_mesh()
  placed = sharding.shard_seeds(np.zeros((8, 3)), mesh)
  assert len({shard.device for shard in placed.addressable_shards}) == 8
  print("SHARDED-OK")
  """
)


def test_seeds_sharded_over_eight_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
    [sys.executable, "-c", CHILD], cwd=repo, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "SHARDED-OK" in done.stdout


def test_uneven_seed_split_is_refused():
  import numpy as np

  mesh = seed_mesh()
  if mesh.devices.size == 1:
    # One device splits anything; build the check against a pretend size.
    with pytest.raises(ValueError, match="multiple of 2"):
      shard_seeds(np.zeros((3, 2)), seed_mesh([mesh.devices.flat[0]] * 2))
  else:
    with pytest.raises(ValueError, match="cannot be split"):
      shard_seeds(np.zeros((mesh.devices.size + 1, 2)), mesh)
