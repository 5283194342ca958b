"""The SREL parity tool: its name table covers HAFusion's parameters both
ways, and it tells equal results from different ones. (The comparison with
the authors' model itself needs their checkout and torch: BUILD_NOTES.md.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import srel_parity
from jaxurban.data.errors import DataError
from jaxurban.topt import srel_train
from jaxurban.topt.srel_losses import srel_loss

TORCH_LAYERS = {"Chi": (1, 2, 3, 1), "NY": (3, 3, 3, 4)}


def _saved_run(city: str, n: int, tmp_path, change=None) -> str:
  """An .npz laid out as the torch half writes it, made from our own model
  (through `to_torch`), so that a correct tool finds no difference."""
  rng = np.random.default_rng(0)
  inputs = {
    "poi": rng.random((n, 26)),
    "landuse": rng.random((n, 5)),
    "mobility_features": rng.integers(0, 50, (n, n)).astype(np.float64),
    "mobility_target": rng.random((n, n)),
    "poi_similarity": rng.random((n, n)),
    "landuse_similarity": rng.random((n, n)),
  }
  config = srel_train.SRELConfig.for_city(city, **srel_train.HAFUSION_TRAINING)
  model = srel_train.build_model(config)
  with jax.enable_x64(True):
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    features = (x["poi"], x["landuse"], x["mobility_features"], None)
    params = model.init(jax.random.PRNGKey(1), *features)["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    def loss(p):
      out = model.apply({"params": p}, *features)
      targets = (x["mobility_target"], x["poi_similarity"], x["landuse_similarity"])
      return srel_loss(out, *targets)[0], out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  names = list(
    srel_parity.parameter_names(config.intra_layers, config.inter_layers, config.n_layers)
  )
  arrays = {"param/" + k: v for k, v in srel_parity.to_torch(params, names).items()}
  arrays |= {"grad/" + k: v for k, v in srel_parity.to_torch(grads, names).items()}
  arrays |= {"input/" + k: v for k, v in inputs.items()}
  arrays |= {
    "output/" + k: np.asarray(out[k])
    for k in ("source", "destination", "poi", "landuse", "embedding")
  }
  arrays["loss"] = np.asarray(float(value))
  keys = ("NO_IntraAFL", "NO_InterAFL", "NO_RegionFusion", "NO_head")
  arrays |= {"setting/" + k: np.asarray(v) for k, v in zip(keys, TORCH_LAYERS[city])}
  arrays["setting/city"] = np.asarray(city)
  arrays["setting/torch_version"] = np.asarray("none")
  if change:
    change(arrays)
  path = str(tmp_path / f"{city}.npz")
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("city", ["Chi", "NY"])
def test_every_parameter_has_one_torch_name_and_survives_the_round_trip(city):
  config = srel_train.SRELConfig.for_city(city, **srel_train.HAFUSION_TRAINING)
  n = 12
  model = srel_train.build_model(config)
  shapes = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jnp.zeros((n, 26)), jnp.zeros((n, 5)), jnp.zeros((n, n))
  )["params"]
  params = jax.tree.map(lambda s: np.random.default_rng(0).random(s.shape), shapes)
  names = list(
    srel_parity.parameter_names(config.intra_layers, config.inter_layers, config.n_layers)
  )
  torch_names = [name for _, name, _ in names]
  assert len(set(torch_names)) == len(torch_names) == len(jax.tree.leaves(params))
  back = srel_parity.to_flax(srel_parity.to_torch(params, names), names)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # nn.Linear stores [out, in]: the POI input layer's weight is [N, 26].
  assert srel_parity.to_torch(params, names)["densePOI2.weight"].shape == (n, 26)


@pytest.mark.parametrize("city", ["Chi", "NY"])
def test_equal_runs_pass_and_a_changed_parameter_fails(city, tmp_path, capsys):
  assert srel_parity.compare(_saved_run(city, 8, tmp_path))
  assert "parity holds" in capsys.readouterr().out

  def scale_one(arrays):
    name = "param/decoder_s.weight"
    arrays[name] = arrays[name] * 1.001

  (tmp_path / "changed").mkdir()
  assert not srel_parity.compare(_saved_run(city, 8, tmp_path / "changed", scale_one))
  assert "PARITY FAILS" in capsys.readouterr().out


def test_a_file_of_another_setting_is_refused(tmp_path):
  def drop_a_block(arrays):
    arrays["setting/NO_RegionFusion"] = np.asarray(2)

  path = _saved_run("Chi", 8, tmp_path, drop_a_block)
  with pytest.raises(DataError, match=r"\(1, 2, 2\) blocks"):
    srel_parity.compare(path)


def test_a_city_without_hafusion_settings_is_refused(tmp_path):
  def rename_city(arrays):
    arrays["setting/city"] = np.asarray("SF")

  with pytest.raises(DataError, match="city 'SF'"):
    srel_parity.compare(_saved_run("Chi", 8, tmp_path, rename_city))


def test_a_file_of_another_tool_is_refused(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, loss=np.asarray(1.0))
  with pytest.raises(DataError, match="not a file of srel_torch_harness.py --parity"):
    srel_parity.compare(str(path))
