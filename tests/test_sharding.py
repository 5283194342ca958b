"""Seeds or regions split over 8 (simulated CPU) devices give the single-device result.

The devices must be configured before jax starts, so the check runs in a
child process with XLA_FLAGS set.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from jaxurban.sharding import seed_mesh, shard_seeds

# Two small synthetic cities (150 and 170 regions, neither a multiple of 8),
# built the same way in every child process.
GRAPHS = textwrap.dedent(
  """
  import jax, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from experiments.bench_scale import synthetic_city_graph

  graphs = [synthetic_city_graph(n, seed) for seed, n in ((0, 150), (1, 170))]
  """
)

CHILD = GRAPHS + textwrap.dedent(
  """
  import tempfile
  from jaxurban import sharding
  from jaxurban.core import train

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

  # Seeds are independent: the compiled training chunk moves nothing between
  # devices (the seed-batched row gathers of jaxurban.graph keep it so).
  import re
  import jax.numpy as jnp
  import optax
  config = train.CoreConfig(seeds=8, n_anchors=32, features=16, heads=2, plot=False)
  model = train.build_model(config, *graphs)
  optimizer = optax.adam(1e-3)
  chunk = train.make_chunk(train.make_embed_loss(model, config.loss_settings()), optimizer, 2)
  params, keys = train.init_params(model, jnp.arange(8), *graphs)
  state = sharding.shard_seeds((params, jax.vmap(optimizer.init)(params), keys), mesh)
  hlo = chunk.lower(state, *sharding.replicate(tuple(graphs), mesh)).compile().as_text()
  pattern = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)[-a-z]*\\("
  collectives = re.findall(pattern, hlo)
  assert not collectives, sorted(set(collectives))
  # The pattern does find a collective where there is one: a sum across seeds.
  across = jax.jit(jnp.sum).lower(sharding.shard_seeds(jnp.ones((8, 3)), mesh))
  assert re.findall(pattern, across.compile().as_text())
  print("SHARDED-OK")
  """
)


def test_seeds_sharded_over_eight_devices_match_one_device():
  done = _run_on_eight_devices(CHILD)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "SHARDED-OK" in done.stdout


REGIONS_CHILD = GRAPHS + textwrap.dedent(
  """
  import dataclasses, tempfile
  import jax.numpy as jnp
  from jaxurban import sharding
  from jaxurban.core import train
  from jaxurban.graph import pad_target_rows

  assert len(graphs[0].origin_rows) % 8 or len(graphs[1].origin_rows) % 8  # padding exercised

  def assert_trees_close(actual, expected, rtol, scale_atol):
    # Float32 sums in another order: differences relative to each array's scale.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=scale_atol * np.abs(b).max()),
      actual,
      expected,
    )

  mesh = sharding.region_mesh()
  padded = [pad_target_rows(g, 8) for g in graphs]
  # The loss form (alignment terms) and the logits budget (mobility term) act on
  # separate terms, so one pass each covers both. A small budget forces the
  # row-blocked normaliser (lax.map).
  for form, budget in (("authors", 1 << 24), ("paper", 8000)):
    config = train.CoreConfig(features=16, heads=2, n_anchors=64, loss_form=form)
    settings = dataclasses.replace(config.loss_settings(), logits_budget=budget)
    model = train.build_model(config, *graphs)
    params, keys = train.init_params(model, jnp.arange(1), *graphs)
    params, key = jax.tree.map(lambda a: a[0], params), keys[0]
    grad = lambda s: jax.jit(jax.value_and_grad(train.make_embed_loss(model, s), has_aux=True))
    (loss, terms), grads = grad(settings)(params, key, *graphs)
    (loss_pad, _), grads_pad = grad(settings)(params, key, *padded)
    # Padding is exact: padded rows carry no target and no normaliser.
    np.testing.assert_allclose(loss_pad, loss, rtol=1e-6)
    assert_trees_close(grads_pad, grads, rtol=1e-5, scale_atol=1e-6)
    split_graphs = [train.place_city_graph(g, mesh) for g in padded]
    assert len(split_graphs[0].origin_rows.sharding.device_set) == 8
    mesh_settings = dataclasses.replace(settings, mesh=mesh)
    (loss_split, terms_split), grads_split = grad(mesh_settings)(
      sharding.replicate(params, mesh), sharding.replicate(key, mesh), *split_graphs
    )
    np.testing.assert_allclose(loss_split, loss, rtol=1e-5)
    for name in terms:
      np.testing.assert_allclose(terms_split[name], terms[name], rtol=1e-5, atol=1e-6)
    assert_trees_close(grads_split, grads, rtol=1e-4, scale_atol=1e-5)
    if budget < 1 << 24:
      # Each row block is split too: every [rows, N] logits product of the
      # compiled step holds an eighth of a block. Equal numbers alone cannot
      # show it (without the split every device computes whole blocks).
      import re
      hlo = grad(mesh_settings).lower(
        sharding.replicate(params, mesh), sharding.replicate(key, mesh), *split_graphs
      ).compile().as_text()
      shapes = set(re.findall(r"= f32\\[(\\d+),(150|170)\\]\\{[^}]*\\} dot\\(", hlo))
      expected = {
        (str(mesh_settings.row_chunk(len(g.origin_rows), n) // 8), str(n))
        for g, n in zip(padded, (150, 170))
      }
      assert shapes == expected, (shapes, expected)

  # The fused row-normaliser kernel (interpret mode), one shard per device.
  kernel_settings = dataclasses.replace(settings, lse_implementation="pallas-interpret")
  (loss_kernel, _), grads_kernel = grad(dataclasses.replace(kernel_settings, mesh=mesh))(
    sharding.replicate(params, mesh), sharding.replicate(key, mesh), *split_graphs
  )
  np.testing.assert_allclose(loss_kernel, loss, rtol=1e-5)
  assert_trees_close(grads_kernel, grads, rtol=1e-4, scale_atol=1e-5)

  # What the training loop hands its jitted chunk: equal numbers cannot show
  # that the graphs were split, the state replicated and the losses told
  # about the mesh (without them every device computes everything).
  from jax.sharding import NamedSharding, PartitionSpec

  seen = {"meshes": [], "calls": []}
  make_chunk, make_embed_loss = train.make_chunk, train.make_embed_loss

  def recording_embed_loss(model, settings):
    seen["meshes"].append(settings.mesh)
    return make_embed_loss(model, settings)

  def recording_chunk(*args, **kwargs):
    chunk = make_chunk(*args, **kwargs)

    def run(state, *data):
      seen["calls"].append((state, data))
      return chunk(state, *data)

    return run

  train.make_chunk, train.make_embed_loss = recording_chunk, recording_embed_loss
  results = {}
  for shard in (False, True):
    config = train.CoreConfig(seeds=2, epochs=3, log_every=3, n_anchors=32, features=16,
                              heads=2, plot=False, shard_regions=shard)
    seen["meshes"].clear()
    seen["calls"].clear()
    with tempfile.TemporaryDirectory() as workdir:
      results[shard] = train.train_embeddings(config, workdir, *graphs)[:2]
  train.make_chunk, train.make_embed_loss = make_chunk, make_embed_loss
  assert seen["meshes"] and all(m is not None and m.devices.size == 8 for m in seen["meshes"])
  state, data = seen["calls"][0]
  placed = lambda x, spec: (
    isinstance(x.sharding, NamedSharding) and x.sharding.spec == spec
    and len(x.sharding.device_set) == 8
  )
  assert all(placed(x, PartitionSpec()) for x in jax.tree.leaves(state))
  rows = ("origin_rows", "row_weight", "target_origin", "target_destination", "target")
  for graph in data:
    split = {id(getattr(graph, name)) for name in rows}
    leaves = [x for x in jax.tree.leaves(graph) if isinstance(x, jax.Array)]
    assert len(leaves) > len(rows)
    for x in leaves:
      assert placed(x, PartitionSpec(sharding.REGIONS) if id(x) in split else PartitionSpec())
    assert all(placed(getattr(graph, name), PartitionSpec(sharding.REGIONS)) for name in rows)
  for single, split in zip(results[False], results[True]):
    np.testing.assert_allclose(split, single, rtol=2e-5, atol=1e-5)
  print("REGIONS-OK")
  """
)


def _run_on_eight_devices(code: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=600
  )


def test_regions_split_over_eight_devices_match_one_device():
  done = _run_on_eight_devices(REGIONS_CHILD)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "REGIONS-OK" in done.stdout


# The mobility loss's pair term in edge blocks under a region mesh: each
# block's [edges, d] gathers are split over the devices, so a device holds a
# share of one block instead of a share of all edges, and the value and
# gradient are the single-device ones.
EDGE_BLOCKS_CHILD = textwrap.dedent(
  """
  import dataclasses
  import jax, jax.numpy as jnp, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from jax.sharding import NamedSharding, PartitionSpec
  from jaxurban import sharding
  from jaxurban.core import losses
  from jaxurban.core.model import LossSettings

  rng = np.random.default_rng(0)
  n, d, n_edges, block = 300, 64, 65536, 8192
  z = jnp.asarray(rng.normal(size=(n, d)) / 4, jnp.float32)
  origin = rng.integers(0, n, n_edges).astype(np.int32)
  destination = rng.integers(0, n, n_edges).astype(np.int32)
  target = rng.random(n_edges).astype(np.float32)
  target /= target.sum()
  weight = np.zeros(n, np.float32)
  np.add.at(weight, origin, target)
  rows = np.unique(origin).astype(np.int32)
  row_weight = weight[rows]
  extra = -len(rows) % 8  # rows padded with weight 0, as pad_target_rows does
  rows = np.concatenate([rows, np.zeros(extra, np.int32)])
  row_weight = np.concatenate([row_weight, np.zeros(extra, np.float32)])
  args = (rows, row_weight, origin, destination, target)

  mesh = sharding.region_mesh()
  split = [jax.device_put(a, NamedSharding(mesh, PartitionSpec(sharding.REGIONS))) for a in args]
  single = [jnp.asarray(a) for a in args]

  def run(mesh, edge_chunk, placed):
    loss = lambda v, *a: losses.mobility_loss(v, *a, mesh=mesh, edge_chunk=edge_chunk)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(z, *placed).compile()
    return compiled(z, *placed), compiled.memory_analysis().temp_size_in_bytes

  reference, _ = run(None, None, single)
  temp = {}
  for name, on, chunk, placed in [
    ("one device, blocks", None, block, single),
    ("mesh, no blocks", mesh, None, split),
    ("mesh, blocks", mesh, block, split),
    ("mesh, last block padded", mesh, 24, split),
  ]:
    (value, grad), temp[name] = run(on, chunk, placed)
    np.testing.assert_allclose(value, reference[0], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(grad, reference[1], rtol=1e-4, atol=1e-7, err_msg=name)
  assert 2 * temp["mesh, blocks"] < temp["mesh, no blocks"], temp
  assert 2 * temp["mesh, blocks"] < temp["one device, blocks"], temp

  try:
    run(mesh, 12, split)
  except ValueError as error:
    assert "not a multiple of the mesh's 8 devices" in str(error), error
  else:
    raise AssertionError("an edge block of 12 over 8 devices was accepted")
  # The training step's block is a multiple of the mesh size.
  settings = LossSettings(logits_budget=1000, mesh=mesh)
  assert settings.edge_chunk(n_edges, 10) == 96
  assert dataclasses.replace(settings, mesh=None).edge_chunk(n_edges, 10) == 100
  print("EDGE-BLOCKS-OK")
  """
)


def test_edge_blocks_split_over_eight_devices_match_one_device():
  done = _run_on_eight_devices(EDGE_BLOCKS_CHILD)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "EDGE-BLOCKS-OK" in done.stdout


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


def test_placements_use_their_own_mesh_axis():
  # Each one-axis mesh is named for what it splits and each placement names
  # that axis; a spec naming another mesh's axis only fails with several
  # devices, so the specs are checked here on any device count.
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec

  from jaxurban import sharding

  meshes = {
    sharding.SEEDS: sharding.seed_mesh(),
    sharding.REGIONS: sharding.region_mesh(),
    sharding.BATCH: sharding.batch_mesh(),
  }
  for axis, mesh in meshes.items():
    assert mesh.axis_names == (axis,)
  x = np.zeros((2 * jax.device_count(), 3))
  for place, axis in (
    (sharding.shard_seeds, sharding.SEEDS),
    (sharding.split_rows, sharding.REGIONS),
    (sharding.shard_batch, sharding.BATCH),
  ):
    assert place(x, meshes[axis]).sharding.spec == PartitionSpec(axis)
  assert sharding.replicate(x, meshes[sharding.REGIONS]).sharding.spec == PartitionSpec()
  # constrain_rows splits the requested dimension (the row blocks of the
  # mobility normaliser use dimension 1), and is the identity without a mesh.
  z = jnp.ones((4, 6, 3))
  for dim in (0, 1):
    constrain = lambda v: sharding.constrain_rows(v, meshes[sharding.REGIONS], axis=dim)
    eqns = jax.make_jaxpr(constrain)(z).eqns
    assert [e.primitive.name for e in eqns] == ["sharding_constraint"]
    spec = [None, None, None]
    spec[dim] = sharding.REGIONS
    assert eqns[0].params["sharding"].spec == PartitionSpec(*spec)
  assert sharding.constrain_rows(z, None, axis=1) is z
