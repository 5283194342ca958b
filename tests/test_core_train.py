"""End-to-end CoRE training on the real XA-CD pair, a few epochs at a time."""

import dataclasses
import json
import pathlib
import shutil

import chex
import jax
import numpy as np
import optax
import pytest

from experiments import core_align
from jaxurban.checkpoint import CheckpointMismatch, Checkpointer
from jaxurban.core import gat, train
from jaxurban.core.train import CoreConfig


def tiny(data_root, **overrides):
  settings = dict(
    city_x="xa",
    city_y="cd",
    data_root=str(data_root),
    seeds=2,
    epochs=4,
    log_every=2,
    checkpoint_every=2,
    n_anchors=64,
    plot=False,
  )
  settings.update(overrides)
  if settings.get("variant") in train.WITHOUT_LMA:
    del settings["n_anchors"]  # no anchor is drawn: the count would be refused
  return CoreConfig(**settings)


@pytest.fixture(scope="module")
def graphs(data_root):
  _, graph_x = train.load_city_graph("xa", data_root)
  _, graph_y = train.load_city_graph("cd", data_root)
  return graph_x, graph_y


def test_killed_run_resumes_to_the_same_result(data_root, graphs, tmp_path, monkeypatch):
  # One uninterrupted run is the reference for every check below (each run
  # of the tiny config costs tens of seconds on 2 cores).
  config = tiny(data_root)
  expected = train.train_embeddings(config, tmp_path / "straight", *graphs)
  chex.assert_shape(expected[0], (2, 1056, 128))
  chex.assert_shape(expected[1], (2, 1306, 128))
  chex.assert_tree_all_finite(expected[:2])
  # Different seeds differ.
  assert not np.allclose(expected[0][0], expected[0][1])

  original_save = Checkpointer.save

  def save_then_die(self, step, state, cfg, **kwargs):
    original_save(self, step, state, cfg, **kwargs)
    raise KeyboardInterrupt("killed after the first checkpoint")

  monkeypatch.setattr(Checkpointer, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_embeddings(config, tmp_path / "killed", *graphs)
  monkeypatch.setattr(Checkpointer, "save", original_save)
  # Resumed with chunks of 4 epochs (log_every may change on resumption):
  # the run still stops at epoch 4 and checkpoints it, rather than running a
  # chunk over epochs 3-6.
  resumed = train.train_embeddings(tiny(data_root, log_every=4), tmp_path / "killed", *graphs)
  assert resumed[2]["embed"]["resumed_from"] == 2
  # Its time includes the killed run's up to the checkpoint it resumed from.
  resumed_stage = resumed[2]["embed"]
  assert resumed_stage["seconds_including_earlier_runs"] > resumed_stage["seconds"]
  # An uninterrupted stage's two figures span the same time.
  straight = expected[2]["embed"]
  assert abs(straight["seconds_including_earlier_runs"] - straight["seconds"]) < 0.05
  assert Checkpointer(tmp_path / "killed", subdir="embed").latest_step() == 4
  # The loss history of the killed part came back from the checkpoint.
  assert resumed[2]["embed"]["history"] == expected[2]["embed"]["history"]
  # Bit-identical: a fresh run with the same seeds, killed and resumed, is
  # the uninterrupted run (so runs are deterministic too).
  np.testing.assert_array_equal(resumed[0], expected[0])
  np.testing.assert_array_equal(resumed[1], expected[1])

  # A checkpoint written with another setting is refused, naming the field.
  with pytest.raises(CheckpointMismatch, match="learning_rate"):
    train.train_embeddings(tiny(data_root, learning_rate=0.01), tmp_path / "straight", *graphs)


def test_a_seeds_parameters_do_not_depend_on_the_seeds_beside_it(data_root, graphs):
  # Seed k's parameters are model.init under seed k's key, whatever other
  # seeds run beside it.
  model = train.build_model(tiny(data_root), *graphs)
  seeds = jax.numpy.arange(3, 6)
  params, keys = train.init_params(model, seeds, *graphs)
  init_one = jax.jit(lambda k: model.init(k, *graphs)["params"])
  for i, seed in enumerate(seeds):
    init_key = jax.random.split(jax.random.PRNGKey(seed))[0]
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], params), init_one(init_key))
  alone, alone_keys = train.init_params(model, jax.numpy.arange(4, 5), *graphs)
  chex.assert_trees_all_equal(alone, jax.tree.map(lambda x: x[1:2], params))
  np.testing.assert_array_equal(alone_keys, keys[1:2])


def test_train_chunk_compiles_once(data_root, graphs):
  config = tiny(data_root, alpha=0.3, beta=2.0)  # unequal, so that eq. 13 shows in the total
  model = train.build_model(config, *graphs)
  params, keys = train.init_params(model, jax.numpy.arange(2), *graphs)
  loss = chex.assert_max_traces(train.make_embed_loss(model, config.loss_settings()), n=1)
  optimizer = optax.adam(1e-3)
  chunk = train.make_chunk(loss, optimizer, 2)
  state = (params, jax.vmap(optimizer.init)(params), keys)
  for _ in range(3):
    state, terms = chunk(state, *graphs)
  assert set(terms) == {"total", "re_x", "re_y", "lma", "lia"}
  np.testing.assert_allclose(
    terms["total"],
    terms["re_x"] + terms["re_y"] + 0.3 * terms["lma"] + 2.0 * terms["lia"],
    rtol=1e-5,
  )
  chex.assert_shape(terms["lma"], (2,))


def test_rematerialised_and_blocked_loss_equals_the_plain_one(data_root, graphs, monkeypatch):
  """The large-city path (GAT layers recomputed in blocks, the mobility loss's
  edges in blocks) on the real pair, seeds vmapped: same losses and gradients."""
  monkeypatch.setattr(gat, "REMAT_BLOCK_ELEMENTS", 1 << 16)
  results = {}
  for remat in (False, True):
    config = tiny(data_root, remat_gat=remat)
    settings = config.loss_settings()
    if remat:
      settings = dataclasses.replace(settings, logits_budget=1 << 18)  # 2048-edge blocks
      assert settings.edge_chunk(len(graphs[0].target), config.features) == 2048
    model = train.build_model(config, *graphs)
    params, keys = train.init_params(model, jax.numpy.arange(2), *graphs)
    loss = train.make_embed_loss(model, settings)
    value_and_grad = jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(0, 0, None, None))
    results[remat] = jax.jit(value_and_grad)(params, keys, *graphs)
  # The blocked path sums over regions and edges in another order, and the
  # rounding of a sum grows with its terms: a bias gradient of 0.017 among
  # entries of 24 differed by 4.6e-6. The absolute tolerance follows each
  # leaf's scale.
  chex.assert_trees_all_equal_structs(results[True], results[False])
  for got, want in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    scale = max(1.0, float(np.abs(np.asarray(want)).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)
  with pytest.raises(ValueError, match="remat_gat needs gat_implementation 'tables'"):
    tiny(data_root, remat_gat=True, gat_implementation="segment")


@pytest.mark.parametrize("variant", ["no-lma", "no-lia", "two-stage", "individual", "rp"])
def test_variants_train_and_evaluate(data_root, tmp_path, monkeypatch, variant):
  from jaxurban.viz import embedding_plot

  plotted = {}

  def record_picture(z_x, z_y, gdp_x, gdp_y, name_x, name_y, path, **kwargs):
    plotted.update(z_x=np.asarray(z_x), z_y=np.asarray(z_y), name_y=name_y)

  monkeypatch.setattr(embedding_plot, "plot_city_embeddings", record_picture)
  config = tiny(data_root, variant=variant, seeds=1, epochs=2, plot=True)
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["software"]["jax"] == jax.__version__
  terms = set(summary["training_log"]["embed"]["history"][-1]) - {"epoch", "total"}
  expected = {"no-lma": {"re_x", "re_y", "lia"}, "no-lia": {"re_x", "re_y", "lma"}}
  assert terms == expected.get(variant, {"re_x", "re_y"})
  if variant == "two-stage":
    assert set(summary["training_log"]["align"]["history"][-1]) == {"epoch", "total", "lma", "lia"}
  for direction in ("XA→CD", "CD→XA"):
    for label in ("gdp", "population", "co2"):
      assert np.isfinite(summary["summary"][direction][label]["mae"]["mean"])
  # The picture shows the two spaces the table scores: under RP, Z^X beside
  # Z^Y mapped into X's space.
  emb_x = np.load(tmp_path / "xa_region_emb.npy")[0]
  np.testing.assert_array_equal(plotted["z_x"], emb_x)
  if variant == "rp":
    emb_y_in_x = np.load(tmp_path / "cd_in_xa_region_emb.npy")[0]
    np.testing.assert_array_equal(plotted["z_y"], emb_y_in_x)
    assert plotted["name_y"] == "CD mapped into XA"
  else:
    np.testing.assert_array_equal(plotted["z_y"], np.load(tmp_path / "cd_region_emb.npy")[0])
    assert plotted["name_y"] == "CD"
  assert (tmp_path / "losses.png").exists()


def test_a_folder_keeps_the_outputs_of_one_run_only(data_root, tmp_path, monkeypatch):
  from jaxurban.viz import embedding_plot

  def draw(*args, **kwargs):
    pathlib.Path(args[6]).write_bytes(b"png")

  monkeypatch.setattr(embedding_plot, "plot_city_embeddings", draw)
  rp = tiny(data_root, variant="rp", seeds=1, epochs=2, plot=True)
  train.train_and_evaluate(rp, tmp_path)
  written = {"embeddings.png", "losses.png", "cd_in_xa_region_emb.npy", "xa_in_cd_region_emb.npy"}
  assert written <= {p.name for p in tmp_path.iterdir()}
  # Other settings are refused before training, even once the checkpoints
  # that would refuse them are gone: the RP files would stay beside them.
  shutil.rmtree(tmp_path / "checkpoints")
  with pytest.raises(CheckpointMismatch) as caught:
    train.train_and_evaluate(dataclasses.replace(rp, variant="core"), tmp_path)
  message = str(caught.value)
  assert message.startswith(f"{tmp_path / 'metrics.json'} was written with a different config")
  assert "variant: saved 'rp' vs now 'core'" in message
  assert message.endswith(f"delete {tmp_path}")
  # The same settings without pictures: the earlier run's pictures go.
  train.train_and_evaluate(dataclasses.replace(rp, plot=False), tmp_path)
  names = {p.name for p in tmp_path.iterdir()}
  assert not {"embeddings.png", "losses.png"} & names
  assert {"cd_in_xa_region_emb.npy", "xa_in_cd_region_emb.npy", "metrics.json"} <= names


def test_two_stage_moves_both_cities_through_their_own_affine_layer(
  data_root, tmp_path, monkeypatch
):
  # The paper's "w/o one-stage": both cities' frozen embeddings are projected
  # by affine layers, and only the projections (and W^q, W^k) train.
  seen = {}
  align = train._align_frozen

  def recording(config, workdir, settings, z_x, z_y, *rest, **kwargs):
    seen["frozen"] = np.array(z_x), np.array(z_y)  # copies
    seen["aligned"] = align(config, workdir, settings, z_x, z_y, *rest, **kwargs)[:2]
    seen["after"] = np.asarray(z_x), np.asarray(z_y)
    return seen["aligned"] + ({},)

  monkeypatch.setattr(train, "_align_frozen", recording)
  train.train_and_evaluate(tiny(data_root, variant="two-stage", seeds=1, epochs=2), tmp_path)
  # Stage 2 reads the stage-1 embeddings as data: neither donated nor changed.
  for frozen, after in zip(seen["frozen"], seen["after"]):
    np.testing.assert_array_equal(after, frozen)
  fits = []
  for frozen, aligned in zip(seen["frozen"], seen["aligned"]):
    moved = np.abs(np.asarray(aligned) - frozen)
    assert aligned.shape == frozen.shape and 0 < moved.max() < 0.1
    # An affine map: differences between regions are mapped linearly.
    d = frozen.shape[-1]
    fit = np.linalg.lstsq(
      np.concatenate([frozen[0], np.ones((frozen.shape[1], 1))], 1), aligned[0], rcond=None
    )[0]
    np.testing.assert_allclose(frozen[0] @ fit[:d] + fit[d], aligned[0], atol=1e-4)
    fits.append(fit)
  # Each city through its own layer: the two trained maps differ (Adam's
  # first steps move every entry by about the learning rate, in the sign of
  # that city's gradient).
  assert np.abs(fits[0] - fits[1]).max() > 1e-3


def test_command_writes_every_output(data_root, tmp_path, capsys):
  out = tmp_path / "run"
  code = core_align.main(
    [
      "--pair",
      "xa-CD",
      "--data-root",
      str(data_root),
      "--epochs",
      "2",
      "--log-every",
      "1",
      "--seeds",
      "2",
      "--anchors",
      "32",
      "--out",
      str(out),
    ]
  )
  assert code == 0
  printed = capsys.readouterr().out
  assert "epoch     2/2" in printed and "XA→CD" in printed and "170.13" in printed
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["city_x"] == "xa" and metrics["config"]["seeds"] == 2
  assert metrics["seeds"] == [0, 1]
  assert len(metrics["scores"]["XA→CD"]["gdp"]["mae"]) == 2
  assert np.load(out / "xa_region_emb.npy").shape == (2, 1056, 128)
  assert np.load(out / "cd_region_emb.npy").shape == (2, 1306, 128)
  assert (out / "embeddings.png").stat().st_size > 10_000
  assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any((out / "checkpoints" / "embed").iterdir())
  # What was read is recorded: the folder and each file's SHA-256.
  xa = metrics["data"]["xa"]
  assert xa["source_dir"] == str(data_root / "core" / "xa") and xa["regions"] == 1056
  assert set(xa["training"]) == {"regionmap_xa.geo", "regionmap_xa.mob"}
  assert set(xa["labels"]) == {f"{k}_xa_sum.npy" for k in ("gdp", "population", "co2")}
  assert all(len(h) == 64 for h in xa["training"].values())

  # Rerunning into the same folder with other settings or other data is
  # refused with the difference named, before any training.
  def rerun(*flags, root=data_root):
    args = ["--pair", "xa-cd", "--data-root", str(root), "--epochs", "2", "--log-every", "1"]
    return core_align.main(args + ["--anchors", "32", "--out", str(out), *flags])

  capsys.readouterr()
  assert rerun("--seeds", "3") == 2
  assert "seeds: saved 2 vs now 3" in capsys.readouterr().err
  other = tmp_path / "other"
  for city in ("xa", "cd"):
    (other / "core" / city).mkdir(parents=True)
    for source in (data_root / "core" / city).iterdir():
      (other / "core" / city / source.name).symlink_to(source.resolve())
  mob = other / "core" / "cd" / "regionmap_cd.mob"
  lines = mob.read_text().splitlines()
  mob.unlink()
  lines[1] = lines[1][: lines[1].rindex(",")] + ",0.5"
  mob.write_text("\n".join(lines) + "\n")
  assert rerun("--seeds", "2", root=other) == 2
  error = capsys.readouterr().err
  assert "a different config (data.cd.training.regionmap_cd.mob: saved" in error


def test_command_rejects_bad_flags(data_root, capsys):
  with pytest.raises(SystemExit) as exit_info:
    core_align.main(["--pair", "XA", "--data-root", str(data_root)])
  assert exit_info.value.code == 2
  assert "--pair 'XA': expected two city codes like XA-CD" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    core_align.main(["--pair", "XA-XA"])
  assert exit_info.value.code == 2
  assert "the two cities must differ, got 'xa' twice" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    core_align.main(["--no-lma", "--no-lia"])
  assert exit_info.value.code == 2
  assert "choose one of --variant, --no-lma, --no-lia, --two-stage" in capsys.readouterr().err


def test_command_names_an_unknown_city(data_root, tmp_path, capsys):
  code = core_align.main(["--pair", "XA-ZZ", "--data-root", str(data_root), "--out", str(tmp_path)])
  assert code == 2
  assert "zz" in capsys.readouterr().err.lower()


def test_command_checks_sharding_against_the_device_count(data_root, monkeypatch, capsys):
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  monkeypatch.setattr(core_align, "train_and_evaluate", lambda *_: pytest.fail("trained"))
  base = ["--pair", "xa-cd", "--data-root", str(data_root)]
  assert core_align.main(base + ["--shard-seeds", "--seeds", "3"]) == 2
  assert "--shard-seeds: 3 seeds cannot be split over 2 devices" in capsys.readouterr().err
  assert core_align.main(base + ["--shard-regions", "--anchors", "999"]) == 2
  assert "--shard-regions: 999 anchors cannot be split over 2 devices" in capsys.readouterr().err
  # Without the manifold alignment no anchor is drawn, so their count need
  # not split over the devices.
  monkeypatch.setattr(jax, "device_count", lambda: 3)
  config, _ = core_align.parse_config(base + ["--shard-regions", "--no-lma"])
  assert config.n_anchors == 1000 and core_align._device_count_problem(config) is None


@pytest.mark.parametrize(
  "flags, words",
  [
    ("--no-lma --alpha 2", "alpha=2.0 has no effect with variant 'no-lma' (LMA off)"),
    ("--no-lma --anchors 50", "--anchors=50 has no effect with variant 'no-lma'"),
    ("--no-lia --beta 0.5", "beta=0.5 has no effect with variant 'no-lia' (LIA off)"),
    ("--variant individual --alpha 3", "alpha=3.0 has no effect with variant 'individual'"),
    ("--variant rp --loss-form paper", "--loss-form='paper' has no effect with variant 'rp'"),
    # A weight of 0 turns its loss off as the variant does.
    ("--alpha 0 --anchors 7", "--anchors=7 has no effect with alpha=0 (LMA off)"),
    (
      "--alpha 0 --beta 0 --loss-form paper",
      "--loss-form='paper' has no effect with alpha=0 and beta=0 (LMA and LIA off)",
    ),
    (
      "--no-lma --beta 0 --loss-form paper",
      "has no effect with variant 'no-lma' and beta=0 (LMA and LIA off)",
    ),
  ],
)
def test_settings_of_a_loss_that_is_off_are_refused(flags, words, capsys):
  with pytest.raises(SystemExit):
    core_align.parse_config(["--pair", "xa-cd", *flags.split()])
  assert words in capsys.readouterr().err
  # What each still changes is accepted.
  for accepted in (
    "--no-lma --beta 0.5 --loss-form paper",
    "--variant rp --direct",
    "--alpha 0",
    "--alpha 0 --loss-form paper",
    "--beta 0 --anchors 7",
  ):
    core_align.parse_config(["--pair", "xa-cd", *accepted.split()])


def _nan_loss(params, key, scale):  # seed 4's scale makes its loss NaN
  total = (params["w"] ** 2).sum() * scale
  return total, {"total": total}


def _nan_update(params, key, target):
  # Every loss is finite, but seed 4's gradient at w = 1 is NaN: its
  # parameters are NaN after the first update, which no loss of the chunk
  # sees (each precedes its update).
  total = jax.numpy.sqrt(abs(params["w"] - target)).sum()
  return total, {"total": total}


def _overflowing_gradient(params, key, scale):
  # Seed 4's gradient, 1e20, squares past float32's range: Adam's second
  # moment is infinite and its update zero, so the loss and the parameters
  # stay finite while the seed is frozen for good.
  total = (params["w"] * scale).sum()
  return total, {"total": total}


@pytest.mark.parametrize(
  "loss_fn, data, epochs, log_every, stopped",
  [
    (_nan_loss, [1.0, float("nan")], 4, 2, "1-2"),
    (_nan_update, [0.0, 1.0], 2, 1, "1-1"),
    (_overflowing_gradient, [1.0, 1e20], 2, 1, "1-1"),
  ],
)
def test_a_diverged_seed_stops_the_stage_before_its_checkpoint(
  data_root, tmp_path, loss_fn, data, epochs, log_every, stopped
):
  import jax.numpy as jnp

  config = tiny(
    data_root, first_seed=3, epochs=epochs, log_every=log_every, checkpoint_every=log_every
  )
  params = {"w": jnp.ones((2, 3))}
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
  with pytest.raises(
    FloatingPointError,
    match=(
      rf"\[embed\] the loss, parameters or optimiser state of seed\(s\) \[4\].*"
      rf"epochs {stopped}"
    ),
  ):
    train._run_stage(
      "embed", tmp_path, config, loss_fn, params, keys, (jnp.array(data),), epochs,
      per_seed_data=True,
    )  # fmt: skip
  assert Checkpointer(tmp_path, subdir="embed").latest_step() is None


@pytest.mark.parametrize(
  "overrides, words",
  [
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0, got nan"),
    ({"learning_rate": -1e-3}, "learning_rate must be a finite number > 0"),
    ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
    ({"first_seed": -1}, r"seeds must lie in \[0, 2\*\*31\), got -1\.\.0$"),
    ({"first_seed": 2**31 - 1}, r"got 2147483647\.\.2147483648$"),
    ({"seeds": 0}, r"CoreConfig: seeds must be >= 1, got 0$"),  # and nothing about a range
  ],
)
def test_settings_that_would_not_train_are_refused(data_root, overrides, words):
  with pytest.raises(ValueError, match=words):
    tiny(data_root, **overrides)


def test_an_output_path_that_is_a_file_is_a_usage_error(tmp_path, capsys):
  (tmp_path / "taken").write_text("x")
  with pytest.raises(SystemExit) as stop:
    core_align.parse_config(["--pair", "XA-CD", "--out", str(tmp_path / "taken")])
  assert stop.value.code == 2
  assert "taken: exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
  "flags, problem",
  [
    (["--process-id", "1"], "--process-id only takes effect with --distributed"),
    (
      ["--coordinator-address", "h:1", "--num-processes", "2"],
      "--coordinator-address, --num-processes only take effect with --distributed",
    ),
    (["--distributed", "--num-processes", "0"], "--num-processes 0: must be at least 1"),
    (
      ["--distributed", "--num-processes", "2", "--process-id", "2"],
      "--process-id 2: must lie in [0, --num-processes)",
    ),
    (["--distributed", "--process-id", "-1"], "--process-id -1: must be at least 0"),
    # Unsharded, each process would hold its own copy of the state, which
    # the processes cannot checkpoint together.
    (["--distributed"], "--distributed needs --shard-seeds or --shard-regions"),
  ],
)
def test_multi_host_flags_are_checked(flags, problem, capsys):
  # Checked before jax.distributed.initialize, which would wait for the others.
  with pytest.raises(SystemExit) as stop:
    core_align.parse_config(["--pair", "XA-CD", *flags])
  assert stop.value.code == 2
  assert problem in capsys.readouterr().err


def test_distributed_without_a_cluster_is_a_one_line_error(monkeypatch, capsys, tmp_path):
  def initialize(*args):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  argv = ["--pair", "XA-CD", "--distributed", "--shard-seeds", "--out", str(tmp_path / "o")]
  assert core_align.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --distributed: jax.distributed.initialize() failed: ")
  assert "coordinator_address should be defined" in err and "--coordinator-address" in err


def test_multi_host_flags_pass_with_distributed(tmp_path):
  config, _ = core_align.parse_config(
    ["--pair", "XA-CD", "--distributed", "--num-processes", "2", "--process-id", "1"]
    + ["--shard-seeds", "--out", str(tmp_path / "out")]
  )
  assert config.city_x == "xa"


def test_a_city_of_one_region_is_refused(data_root, graphs, tmp_path):
  # Nothing relates its regions: the alignment loss is constant and its
  # low-rank gradient rounding noise, which Adam would scale to full steps.
  from jaxurban.data.errors import DataError
  from jaxurban.graph import city_graph

  one = city_graph(np.array([0]), np.array([0]), np.array([1.0]), np.array([3.0]), 1)
  with pytest.raises(ValueError, match="city Y has 1 region.*at least 2 regions per city"):
    train.train_embeddings(tiny(data_root), tmp_path, graphs[0], one)
  from tests.test_data import make_city

  root = make_city(tmp_path, geo=(["geo_id", "type", "m_lon", "m_lat"], [[0, "Polygon", 1, 1]]),
                   mob=(["origin_id", "destination_id", "mobility_weight"], [[0, 0, 1.0]]))  # fmt: skip
  with pytest.raises(DataError, match=r"core/zz: the \.geo lists 1 region\(s\)"):
    train.load_city_graph("zz", root)


def _toward_target(params, key, target):
  total = ((params["w"] - target) ** 2).sum()
  return total, {"total": total}


def test_a_stage_checkpoints_on_schedule_and_resumes_where_it_stopped(
  tmp_path, monkeypatch, capsys
):
  # A toy stage, fast enough to check the schedule epoch by epoch: saves
  # every `checkpoint_every` epochs and at the last one, and a killed run
  # resumed from its last checkpoint ends as the uninterrupted one.
  import jax.numpy as jnp

  training_files = {"regions": 3, "mobility_edges": 2, "training": {"xa.mob": "aa"}}
  data = {"xa": {**training_files, "source_dir": "/a", "labels": {"gdp.npy": "11"}}}
  saved = []
  original_save = Checkpointer.save

  def recording_save(self, step, state, cfg, **kwargs):
    saved.append(step)
    original_save(self, step, state, cfg, **kwargs)

  monkeypatch.setattr(Checkpointer, "save", recording_save)

  def run(folder, revision=3, description=data, **overrides):
    settings = dict(seeds=2, epochs=5, log_every=1, checkpoint_every=2, learning_rate=0.1)
    config = CoreConfig(**{**settings, **overrides})
    params = {"w": jax.numpy.zeros((2, 3))}
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    target = (jnp.float32(1.0),)
    return train._run_stage(
      "toy", tmp_path / folder, config, _toward_target, params, keys, target, 5,
      data_description=description, revision=revision,
    )  # fmt: skip

  expected, log = run("straight")
  assert saved == [2, 4, 5]
  assert [row["epoch"] for row in log["history"]] == [1, 2, 3, 4, 5]
  printed = capsys.readouterr().out
  assert "[toy] epoch     1/5  total " in printed and "[toy] epoch     5/5  total " in printed

  def save_then_die(self, step, state, cfg, **kwargs):
    original_save(self, step, state, cfg, **kwargs)
    raise KeyboardInterrupt("killed after the first checkpoint")

  monkeypatch.setattr(Checkpointer, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    run("killed")
  monkeypatch.setattr(Checkpointer, "save", recording_save)
  saved.clear()
  # Where the outputs go, how often to log and whether to plot may change
  # on resumption; so may the data's folder and its labels, which only the
  # evaluation reads.
  moved = {"xa": {**training_files, "source_dir": "/b", "labels": {"gdp.npy": "22"}}}
  resumed, log_resumed = run("killed", description=moved, log_every=3, plot=False)
  assert "[toy] resuming from the checkpoint at epoch 2" in capsys.readouterr().out
  assert log_resumed["resumed_from"] == 2 and saved == [4, 5]
  assert log_resumed["history"] == log["history"]
  np.testing.assert_array_equal(resumed["w"], expected["w"])

  # Another stage revision or other training files: another run.
  with pytest.raises(CheckpointMismatch, match="stage_revision: saved 3 vs now 4"):
    run("straight", revision=4)
  other_files = {"xa": {**data["xa"], "training": {"xa.mob": "bb"}}}
  with pytest.raises(CheckpointMismatch, match="data.xa.training.xa.mob: saved 'aa' vs now 'bb'"):
    run("straight", description=other_files)


def test_seeds_are_counted_from_the_first_seed(tmp_path, monkeypatch):
  # The seeds that make every parameter and training key: first_seed onwards.
  from jaxurban.graph import city_graph

  class Stop(Exception):
    pass

  seen = []

  def record_seeds(model, seeds, *graphs):
    seen.append(np.asarray(seeds).tolist())
    raise Stop

  monkeypatch.setattr(train, "init_params", record_seeds)
  pair = city_graph(np.array([0, 1]), np.array([1, 0]), np.ones(2), np.ones(2), 2)
  with pytest.raises(Stop):
    train.train_embeddings(CoreConfig(seeds=3, first_seed=4), tmp_path, pair, pair)
  assert seen == [[4, 5, 6]]


def test_the_run_writes_its_embeddings_and_metrics_and_no_picture_without_plot(
  data_root, tmp_path, monkeypatch
):
  # Training replaced by fixed embeddings: what matters here is what the
  # run writes where, and what metrics.json says about the run.
  rng = np.random.default_rng(0)
  z_x, z_y = rng.normal(size=(2, 1056, 8)), rng.normal(size=(2, 1306, 8))
  logs = {"embed": {"history": [{"epoch": 4, "total": 1.0}]}}
  monkeypatch.setattr(train, "train_embeddings", lambda *args: (z_x, z_y, logs))
  config = tiny(data_root, first_seed=5)  # plot=False
  train.train_and_evaluate(config, tmp_path)
  written = sorted(p.name for p in tmp_path.iterdir())
  assert written == ["cd_region_emb.npy", "metrics.json", "xa_region_emb.npy"]
  np.testing.assert_array_equal(np.load(tmp_path / "xa_region_emb.npy"), z_x.astype(np.float32))
  np.testing.assert_array_equal(np.load(tmp_path / "cd_region_emb.npy"), z_y.astype(np.float32))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["config"] == config.to_dict()
  assert metrics["seeds"] == [5, 6]
  assert metrics["training_log"] == logs


def test_a_second_stage_gets_its_own_loss_curves(tmp_path):
  history = [{"epoch": 1, "total": 2.0, "lma": 1.0}, {"epoch": 2, "total": 1.5, "lma": 0.5}]
  logs = {"embed": {"history": history}, "align": {"history": history}, "none": {"history": []}}
  train.plot_training_curves(tmp_path, logs, "XA-CD, two-stage")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.png", "losses_align.png"]


def test_every_flag_reaches_the_config(tmp_path):
  flags = "--pair Xa-Cd --data-root /data --seeds 3 --first-seed 4 --epochs 7 --lr 0.01"
  flags += " --anchors 12 --alpha 0.5 --beta 2 --loss-form paper --direct --gat segment"
  flags += " --log-every 3 --checkpoint-every 9 --no-plot --shard-regions"
  config, out = core_align.parse_config([*flags.split(), "--out", str(tmp_path / "run")])
  assert out == tmp_path / "run"
  assert config == CoreConfig(
    city_x="xa", city_y="cd", data_root="/data", seeds=3, first_seed=4, epochs=7,
    learning_rate=0.01, n_anchors=12, alpha=0.5, beta=2.0, loss_form="paper", direct=True,
    gat_implementation="segment", log_every=3, checkpoint_every=9, plot=False,
    shard_regions=True,
  )  # fmt: skip
  config, _ = core_align.parse_config(["--remat-gat", "--shard-seeds"])
  assert config.remat_gat and config.shard_seeds and config.plot
  for flags, variant in (
    ("--no-lma", "no-lma"),
    ("--no-lia", "no-lia"),
    ("--two-stage", "two-stage"),
    ("--variant rp", "rp"),
  ):
    assert core_align.parse_config(flags.split())[0].variant == variant


def test_a_variant_and_an_ablation_flag_are_not_combined(capsys):
  # Otherwise the ablation flag would silently replace the variant asked for.
  with pytest.raises(SystemExit) as stop:
    core_align.parse_config(["--variant", "rp", "--no-lma"])
  assert stop.value.code == 2
  assert "choose one of --variant, --no-lma, --no-lia, --two-stage" in capsys.readouterr().err


def test_the_default_folder_names_what_changes_results_only():
  folder = lambda flags: core_align.parse_config(flags.split())[1]
  # Checkpoint spacing, pictures, placement and the data's location change
  # no result, and a run resumes across them: the same folder.
  same = "--checkpoint-every 7 --no-plot --shard-seeds --data-root /elsewhere"
  assert folder(same) == pathlib.Path("runs/core_align/xa-cd-core")
  assert folder("--pair XA-CD --first-seed 3 --lr 0.01") == pathlib.Path(
    "runs/core_align/xa-cd-core-first-seed3-lr0.01"
  )


def test_a_diverged_run_is_one_line_with_status_2(tmp_path, monkeypatch, capsys):
  def diverge(config, out):
    raise FloatingPointError("[embed] the loss of seed(s) [0] is not finite")

  monkeypatch.setattr(core_align, "train_and_evaluate", diverge)
  out = tmp_path / "run"
  assert core_align.main(["--pair", "xa-cd", "--out", str(out)]) == 2
  assert capsys.readouterr().err == "error: [embed] the loss of seed(s) [0] is not finite\n"
  assert not out.exists()  # the refused run leaves no empty folder behind
