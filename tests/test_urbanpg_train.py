"""UrbanPG training: config, metrics, baselines, paradigms end to end, resume, 8-device sharding."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import urbanpg as urbanpg_command
from jaxurban.checkpoint import Checkpointer, CheckpointMismatch
from jaxurban.data.errors import DataError
from jaxurban.data.traffic import Scaler, Windows, chronological_bounds, load_los_loop
from jaxurban.urbanpg import train
from jaxurban.urbanpg.baselines import HistoricalAverage, PerNodeLinear, last_value

TINY = dict(epochs=2, patience=2, features=8, heads=2, batch_size=64, plot=False, shard_batch=False)


def test_masked_metrics_against_a_direct_float64_computation(rng):
  pred = rng.uniform(20, 70, (5, 12, 4))
  true = rng.uniform(20, 70, (5, 12, 4))
  mask = rng.uniform(size=true.shape) > 0.3
  true[0, 0, 0], mask[0, 0, 0] = 0.0, True  # a zero target never counts
  m = train.masked_metrics(pred, true, mask)
  keep = mask & (true != 0)
  err = (pred - true)[keep]
  np.testing.assert_allclose(m["avg"]["mae"], np.abs(err).mean(), rtol=1e-12)
  np.testing.assert_allclose(m["avg"]["rmse"], np.sqrt((err**2).mean()), rtol=1e-12)
  np.testing.assert_allclose(m["avg"]["mape"], 100 * np.mean(np.abs(err) / true[keep]), rtol=1e-12)
  h = 5
  err_h = (pred - true)[:, h][keep[:, h]]
  np.testing.assert_allclose(m["horizon"]["mae"][h], np.abs(err_h).mean(), rtol=1e-12)
  np.testing.assert_allclose(m["horizon"]["rmse"][h], np.sqrt((err_h**2).mean()), rtol=1e-12)
  # A horizon with no observed target has no score, not a perfect one.
  mask[:, 7] = False
  empty = train.masked_metrics(pred, true, mask)["horizon"]
  assert all(np.isnan(empty[k][7]) for k in ("mae", "rmse", "mape"))
  assert np.isfinite(empty["mae"][6])


def test_padded_batches_cover_every_sample_once():
  for n in (5, 64, 130):
    seen = []
    for index, weight in train.padded_batches(n, 64, np.arange(n)[::-1]):
      assert index.shape == weight.shape == (64,)
      seen.extend(index[weight > 0])
    assert sorted(seen) == list(range(n))


def _windows(x, y, tod, x_mask=None):
  s, t, n = x.shape
  return Windows(
    x=x.astype(np.float32),
    x_mask=np.ones_like(x, bool) if x_mask is None else x_mask,
    y=y.astype(np.float32),
    y_mask=np.ones_like(y, bool),
    time_of_day=tod,
    day_of_week=np.zeros(s, np.int32),
    start=np.arange(s),
  )


def test_baselines_recover_their_ground_truth(rng):
  f, n = 6, 3
  table = rng.uniform(30, 60, (f, n))
  tod = np.arange(60) % f
  ha = HistoricalAverage(table[tod], np.ones((60, n), bool), tod, f)
  np.testing.assert_allclose(ha.table, table)
  w = _windows(np.zeros((2, 4, n)), np.zeros((2, 3, n)), np.array([0, 5]))
  np.testing.assert_allclose(ha.predict(w, 3)[1], table[[0, 1, 2]], rtol=1e-6)

  scaler = Scaler(50.0, 10.0)
  x = rng.normal(size=(2, 4, n))
  x_mask = np.ones_like(x, bool)
  x_mask[0, 3, 1] = False  # the last observed reading of node 1 in sample 0 is step 2
  lv = last_value(_windows(x, np.zeros((2, 3, n)), np.zeros(2, int), x_mask), scaler, 3)
  assert lv.shape == (2, 3, n)
  np.testing.assert_allclose(lv[0, :, 1], scaler.inverse(x[0, 2, 1]), rtol=1e-6)
  np.testing.assert_allclose(lv[1, :, 0], scaler.inverse(x[1, 3, 0]), rtol=1e-6)

  weights = rng.normal(size=(n, 4, 3))
  xs = rng.normal(size=(200, 4, n))
  ys = scaler.inverse(np.einsum("stn,ntk->skn", xs, weights))
  model = PerNodeLinear(_windows(xs, ys, np.zeros(200, int)), scaler, ridge=1e-8)
  np.testing.assert_allclose(model.weights[:, :4], weights, atol=1e-5)


@pytest.mark.parametrize("paradigm", train.PARADIGMS)
def test_paradigms_end_to_end_on_los_loop(data_root, tmp_path, monkeypatch, paradigm, capsys):
  stages = (0.8, 1.0) if paradigm == "continual" else (0.7, 0.85, 1.0)
  config = train.UrbanPGConfig(
    data_root=str(data_root), paradigm=paradigm, continual_stages=stages, **{**TINY, "plot": True}
  )
  plotted = {}
  monkeypatch.setattr(train, "plot_predictions", lambda *args, **kwargs: plotted.update(kwargs))
  fits = {}  # stage -> (parameters handed in, parameters returned), on the host
  original_fit = train.fit

  def recording_fit(task, model, params, trainable, rate, cfg, workdir, stage, seed):
    handed_in = jax.device_get(params)  # copied before the steps donate them
    best, log = original_fit(task, model, params, trainable, rate, cfg, workdir, stage, seed)
    fits[stage] = handed_in, jax.device_get(best)
    return best, log

  monkeypatch.setattr(train, "fit", recording_fit)
  result = train.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["config"]["paradigm"] == paradigm and saved["config"]["features"] == 8
  assert saved["software"]["jax"] == jax.__version__ and saved["data_root"] == str(data_root)
  assert saved["model_revision"] == train.MODEL_REVISION
  expected = {
    "full": {"UrbanPG"},
    "fewshot": {"UrbanPG prompts-only (pre-trained)", "UrbanPG from scratch"},
    "continual": {"UrbanPG continual", "UrbanPG retrained per stage"},
  }[paradigm] | {"historical average", "last value", "per-node linear"}
  assert set(saved["models"]) == expected
  # The picture names the arm and the seed its forecast comes from.
  arm = {"full": "UrbanPG", "fewshot": "UrbanPG prompts-only (pre-trained)"}
  assert plotted["model"] == f"{arm.get(paradigm, 'UrbanPG continual')}, seed 0"
  baselines = {"historical average", "last value", "per-node linear"}
  for name, runs in saved["models"].items():
    # One run per seed for UrbanPG; the deterministic baselines run once.
    assert len(runs) == (1 if name in baselines else config.seeds), name
    for m in runs:
      assert all(np.isfinite(m["avg"][k]) and m["avg"][k] > 0 for k in ("mae", "rmse", "mape"))
      assert len(m["horizon"]["mae"]) == 12
  if paradigm == "fewshot":
    source, target = saved["splits"]["source_nodes"], saved["splits"]["target_nodes"]
    assert not set(source) & set(target) and len(source) + len(target) == 207
    # The target trains on its first hours: most evaluation windows end at
    # times of day it never saw, and the run says how many.
    # That holds for the from-scratch arm; the prompts-only arm's time
    # tables were pre-trained on the source's every slot.
    shares = saved["unseen_time_of_day"]["target"]
    scratch = shares["UrbanPG from scratch"]
    np.testing.assert_allclose([scratch["val"], scratch["test"]], [242 / 380, 282 / 380])
    assert shares["UrbanPG prompts-only (pre-trained)"] == {}
    assert "UrbanPG from scratch: 64% of the val windows" in capsys.readouterr().out
    # Eq. 8: the target's fit starts from the pre-trained backbone and time
    # tables and leaves them as they are; only the prompts it trains move.
    _, pretrained = fits["pretrain"]
    before, after = fits["prompt"]
    for params in (before, after):
      chex.assert_trees_all_equal(params["backbone"], pretrained["backbone"])
    for name in ("E_t", "E_tod", "E_dow"):
      np.testing.assert_array_equal(before["prompts"][name], pretrained["prompts"][name])
    assert np.abs(after["prompts"]["E_s"] - before["prompts"]["E_s"]).max() > 0
    assert np.abs(after["prompts"]["E_t"] - before["prompts"]["E_t"]).max() > 0
  if paradigm == "continual":
    assert set(saved["stages"]) == {"stage1", "stage2"}
    # The main table is the mean over the stages, and says so; each stage's follows.
    table = saved["table"]
    assert table.startswith("mean over the 2 stages:\n") and "\n\nstage stage2:\n" in table
    twice = {"UrbanPG": saved["models"]["UrbanPG continual"] * 2}  # as two seeds
    assert "population standard deviation (ddof=0)" in train.format_table(twice)
    assert "standard deviation" not in table  # one seed: no spread printed
    # Stage 2 trains only its spatial prompt: its continual arm's time
    # tables saw stage 1's training days alone, the retrained arm's its own.
    days = saved["unseen_days"]["stage2"]
    stages = train.continual_tasks(train.load_los_loop(str(data_root)), config)
    assert days["UrbanPG continual"] == train.unseen_days(stages[1], stages[:1])
    assert days["UrbanPG retrained per stage"] == train.unseen_days(stages[1])
    assert days["UrbanPG continual"] != days["UrbanPG retrained per stage"]
    # Eq. 9: stage 2 starts from stage 1's parameters with E_s grown by rows
    # for the new detectors; eq. 10: only E_s and E_d train.
    # Eq. 9 needs row k of stage 2's spatial prompt to be stage 1's detector k.
    n1 = stages[0].data.n_nodes
    assert stages[1].data.n_nodes > n1
    np.testing.assert_array_equal(stages[1].data.sensor_ids[:n1], stages[0].data.sensor_ids)
    _, stage1 = fits["continual_stage1"]
    before, after = fits["continual_stage2"]
    n_old = stage1["prompts"]["E_s"].shape[0]
    assert before["prompts"]["E_s"].shape[0] > n_old
    np.testing.assert_array_equal(before["prompts"]["E_s"][:n_old], stage1["prompts"]["E_s"])
    for params in (before, after):
      chex.assert_trees_all_equal(params["backbone"], stage1["backbone"])
      for name in ("E_t", "E_tod", "E_dow"):
        np.testing.assert_array_equal(params["prompts"][name], stage1["prompts"][name])
    assert np.abs(after["prompts"]["E_s"] - before["prompts"]["E_s"]).max() > 0
  if paradigm == "full":
    # The reported rows are the test windows' scores: UrbanPG's from the
    # returned (best) parameters, the baselines' from their own forecasts.
    task = train.make_task("los-loop", load_los_loop(data_root), config)
    model = train.build_model(config, task.data.n_nodes, task.data.steps_per_day)
    place = train.Placement(False, config.batch_size)
    pred = train.predict_windows(
      train.make_predict(model), fits["full"][1], task.test, task.scaler, config, place
    )
    scored = train.masked_metrics(pred, task.test.y, task.test.y_mask)
    assert saved["models"]["UrbanPG"][0] == json.loads(json.dumps(scored))
    last = last_value(task.test, task.scaler, config.t_out)
    scored = train.masked_metrics(last, task.test.y, task.test.y_mask)
    assert saved["models"]["last value"][0] == json.loads(json.dumps(scored))
    # One week of readings, split in time: validation and test fall on
    # weekdays no training window shows, and the run says so.
    unseen = {"val": ["Tue"], "test": ["Tue", "Wed"]}
    assert saved["unseen_days"] == {"los-loop": {"UrbanPG": unseen}}
    assert saved["unseen_time_of_day"] == {"los-loop": {"UrbanPG": {}}}
    assert "fall on days of the week that no window training" in capsys.readouterr().out
    # A second run in the same folder resumes from the final checkpoint.
    again = train.train_and_evaluate(config, tmp_path)
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert again["models"]["UrbanPG"] == result["models"]["UrbanPG"]
    # Rerun without pictures, an earlier run's picture does not stay beside
    # the new results.
    (tmp_path / "predictions.png").write_bytes(b"an earlier run's picture")
    train.train_and_evaluate(dataclasses.replace(config, plot=False), tmp_path)
    assert not (tmp_path / "predictions.png").exists()
    assert (tmp_path / "metrics.json").exists()
    changed = train.UrbanPGConfig(**{**config.to_dict(), "learning_rate": 1e-2})
    with pytest.raises(CheckpointMismatch, match="learning_rate"):
      train.train_and_evaluate(changed, tmp_path)


@pytest.mark.parametrize("field", ["heads", "layers", "mlp_ratio", "checkpoint_every"])
def test_config_rejects_counts_below_one(field):
  with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
    train.UrbanPGConfig(**{field: 0})


@pytest.mark.parametrize(
  "field, value", [("noise_std", float("nan")), ("weight_decay", -1.0), ("grad_clip", 0.0)]
)
def test_config_rejects_settings_that_would_train_on_nan(field, value):
  with pytest.raises(ValueError, match=f"{field} must be a finite number"):
    train.UrbanPGConfig(**{field: value})


def test_config_rejects_fewer_output_steps_than_the_reported_horizons():
  with pytest.raises(ValueError, match=r"t_out must be >= 12 .* got 6"):
    train.UrbanPGConfig(t_out=6)


@pytest.mark.parametrize("split", [(0.5, 0.5), (0.6, 0.2, 0.1, 0.1), (0.6, 0.4, 0.0)])
def test_config_rejects_a_split_that_is_not_three_positive_ratios(split):
  with pytest.raises(ValueError, match=r"split must be three positive ratios .* got \("):
    train.UrbanPGConfig(split=split)


@pytest.mark.parametrize("stages", [(0.0, 1.0), (0.5, 0.5, 1.0), (0.5, 0.9)])
def test_config_rejects_continual_stages_that_do_not_grow_to_all_detectors(stages):
  with pytest.raises(ValueError, match=r"continual_stages must increase from above 0 to 1.0"):
    train.UrbanPGConfig(continual_stages=stages)


def test_a_continual_stage_without_detectors_is_a_config_error(data_root):
  los = load_los_loop(data_root)
  # 0.001 of 207 detectors rounds to none; said as such, not as a data problem.
  config = train.UrbanPGConfig(paradigm="continual", continual_stages=(0.001, 1.0))
  with pytest.raises(ValueError, match=r"continual_stages\[0\] = 0.001 keeps none of the 207"):
    train.continual_tasks(los, config)


def test_fewshot_with_one_detector_says_so_not_that_a_half_has_no_readings(data_root):
  one = load_los_loop(data_root).select(np.array([0]))
  with pytest.raises(DataError, match=r"los_speed.csv: column 'header': 1 detector; the fewshot"):
    train.fewshot_nodes(one)
  source, target = train.fewshot_nodes(load_los_loop(data_root).select(np.array([0, 5])))
  assert len(source) == len(target) == 1


@pytest.mark.parametrize("steps", [100, 40])
def test_a_series_too_short_for_the_split_names_the_file_part_and_minimum(data_root, steps):
  short = load_los_loop(data_root).select(steps=slice(0, steps))
  config = train.UrbanPGConfig()
  with pytest.raises(DataError) as caught:
    train.make_task("full", short, config)
  message = str(caught.value)
  assert message.startswith("los_speed.csv: full: the ")
  # 119 steps split 6:2:2 into 71 + 24 + 24, each holding one 12 + 12 window.
  assert [hi - lo for lo, hi in chronological_bounds(119)] == [71, 24, 24]
  assert f"the {steps} steps full splits would need to be at least 119" in message


def test_a_validation_part_without_observed_targets_is_a_data_error(data_root):
  import dataclasses

  los = load_los_loop(data_root)
  mask = los.mask.copy()
  mask[1210:1613] = False  # the whole validation part missing
  with pytest.raises(
    DataError, match=r"full: no observed target in the validation steps \[1210, 1613\)"
  ):
    train.make_task("full", dataclasses.replace(los, mask=mask), train.UrbanPGConfig())


def test_a_continual_stages_data_error_names_the_files_steps(data_root):
  import dataclasses

  los = load_los_loop(data_root)
  config = train.UrbanPGConfig()
  edges = np.linspace(0, los.n_steps, len(config.continual_stages) + 1).round().astype(int)
  (_, _), (c, d), _ = chronological_bounds(int(edges[2] - edges[1]), config.split)
  lo, hi = int(edges[1] + c), int(edges[1] + d)  # stage 2's validation steps in the file
  mask = los.mask.copy()
  mask[lo:hi] = False
  with pytest.raises(
    DataError, match=rf"stage2: no observed target in the validation steps \[{lo}, {hi}\)"
  ):
    train.continual_tasks(dataclasses.replace(los, mask=mask), config)


def test_config_rejects_features_not_divisible_by_heads():
  with pytest.raises(ValueError, match="features 10 must be divisible by heads 4"):
    train.UrbanPGConfig(features=10, heads=4)


def test_command_turns_a_bad_setting_into_a_usage_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(urbanpg_command, "train_and_evaluate", lambda *_: pytest.fail("trained"))
  with pytest.raises(SystemExit) as exit_info:
    urbanpg_command.main(["--layers", "0", "--out", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "layers must be >= 1, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def fit_small(data_root):
  """``fit_small(workdir, seed=0, **settings)``: `train.fit` of the full paradigm on
  40 detectors x 700 steps from the seed's fresh parameters."""
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  prepared = {}

  def fit(workdir, seed=0, **settings):
    config = train.UrbanPGConfig(**{**TINY, **settings})
    # Task, model and initial parameters depend on none of the settings varied here.
    if seed not in prepared:
      task = train.make_task("t", data, config)
      model = train.build_model(config, data.n_nodes)
      # On the host: the train step donates device arrays, these are reused.
      params = jax.device_get(train.init_params(model, config, jax.random.PRNGKey(seed)))
      prepared[seed] = task, model, params
    task, model, params = prepared[seed]
    return train.fit(task, model, params, train.everything, 1e-2, config, workdir, "full", seed)

  return fit


def _die_in_third_validation(monkeypatch):
  """Makes the third validation (epoch 3, after the checkpoint of epoch 2) raise."""
  original, calls = train.predict_windows, []

  def predict_windows(*args, **kwargs):
    calls.append(None)
    if len(calls) == 3:
      raise KeyboardInterrupt("killed in epoch 3")
    return original(*args, **kwargs)

  monkeypatch.setattr(train, "predict_windows", predict_windows)


def test_killed_fit_resumes_to_the_uninterrupted_run(fit_small, tmp_path, monkeypatch, capsys):
  settings = dict(epochs=4, patience=4, checkpoint_every=2)
  best, log = fit_small(tmp_path / "straight", **settings)
  assert [row["epoch"] for row in log["history"]] == [1, 2, 3, 4]

  _die_in_third_validation(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    fit_small(tmp_path / "killed", **settings)
  monkeypatch.undo()
  resumed_best, resumed = fit_small(tmp_path / "killed", **settings)
  assert "resuming at epoch 2" in capsys.readouterr().out
  # The history before the checkpoint came back with it, and the best value
  # is the same float64 the uninterrupted run compared against.
  assert resumed["history"] == log["history"]
  assert resumed["best_val_mae"] == log["best_val_mae"]
  assert resumed["best_epoch"] == log["best_epoch"]
  jax.tree.map(np.testing.assert_array_equal, resumed_best, best)
  # Resumed from its final checkpoint, a finished run returns the same result.
  finished_best, finished = fit_small(tmp_path / "straight", **settings)
  assert finished["history"] == log["history"]
  assert finished["best_val_mae"] == log["best_val_mae"]
  jax.tree.map(np.testing.assert_array_equal, finished_best, best)

  # A checkpoint from before the history was saved (no log, float32 best
  # value) still restores; the history then starts at the resume point.
  original_save = Checkpointer.save

  def save_old_format(self, step, state, config, log=None):
    state = {**state, "best_val": np.asarray(state["best_val"], np.float32)}
    original_save(self, step, state, config)

  monkeypatch.setattr(Checkpointer, "save", save_old_format)
  _die_in_third_validation(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    fit_small(tmp_path / "old", **settings)
  monkeypatch.undo()
  _, from_old = fit_small(tmp_path / "old", **settings)
  assert from_old["history"] == log["history"][2:]


def test_a_diverged_fit_stops_instead_of_reporting_its_initial_parameters(data_root, tmp_path):
  # Far too high a rate: every validation MAE is NaN, so none would ever
  # beat the initial best value, and the untrained parameters would have
  # been scored as the model.
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(**{**TINY, "checkpoint_every": 1})
  task = train.make_task("t", data, config)
  model = train.build_model(config, data.n_nodes)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  with pytest.raises(FloatingPointError) as caught:
    train.fit(task, model, params, train.everything, 1e30, config, tmp_path, "full", 0)
  assert str(caught.value).startswith("UrbanPG [full seed 0]: ")
  assert "not finite after epoch 1; no checkpoint written for it" in str(caught.value)
  assert not list((tmp_path / "checkpoints").rglob("*metadata*"))


def test_a_seed_resumes_whichever_seeds_the_run_covers(fit_small, tmp_path, capsys):
  # Seed 1 trained as part of seeds 0..2, then rerun as part of seeds 1..2.
  best, log = fit_small(tmp_path, seed=1, epochs=1, seeds=3, first_seed=0)
  again, relog = fit_small(tmp_path, seed=1, epochs=1, seeds=2, first_seed=1)
  assert "resuming at epoch 1" in capsys.readouterr().out
  assert relog["best_val_mae"] == log["best_val_mae"]
  jax.tree.map(np.testing.assert_array_equal, again, best)


def test_task_scaler_is_fitted_on_the_kept_training_readings_only(data_root):
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(**TINY)
  (a, b), _, _ = chronological_bounds(data.n_steps, config.split)
  whole = Scaler.fit(data.speed, data.mask)
  for fraction in (1.0, 0.2):
    task = train.make_task("t", data, config, fraction)
    kept = a + max(int(round((b - a) * fraction)), config.t_in + config.t_out)
    assert task.train_steps == (a, kept)
    assert task.scaler == Scaler.fit(data.speed[a:kept], data.mask[a:kept])
    assert task.scaler != whole  # validation and test readings left out


def test_fit_returns_the_parameters_of_the_best_validation_epoch(fit_small, tmp_path, monkeypatch):
  # Epochs 3 and 4 are made to validate worse than epoch 2; the returned
  # parameters must then be epoch 2's, which a 2-epoch run of the same seed
  # ends with (its validation improves at epoch 2).
  two_best, two = fit_small(tmp_path / "two", epochs=2, patience=4)
  assert two["best_epoch"] == 2
  real, calls = train.masked_metrics, []

  def worse_after_epoch_two(pred, true, mask):
    calls.append(None)
    out = real(pred, true, mask)
    if len(calls) > 2:
      out["avg"]["mae"] += 100.0
    return out

  monkeypatch.setattr(train, "masked_metrics", worse_after_epoch_two)
  best, log = fit_small(tmp_path / "four", epochs=4, patience=4)
  assert log["best_epoch"] == 2 and [row["epoch"] for row in log["history"]] == [1, 2, 3, 4]
  assert log["best_val_mae"] == two["best_val_mae"]
  jax.tree.map(np.testing.assert_array_equal, best, two_best)


def test_padded_samples_do_not_enter_the_loss(data_root):
  # The last batch of an epoch is padded with weight-0 repeats: their
  # targets must not move the loss (or they would count twice).
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(**TINY)
  task = train.make_task("t", data, config)
  model = train.build_model(config, data.n_nodes)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  index, weight = list(train.padded_batches(5, 8))[0]
  assert weight.tolist() == [1] * 5 + [0] * 3
  batch = train._batch(task.train, index, weight)
  moved = dict(batch, y=batch["y"] + 1000.0 * (1.0 - weight)[:, None, None])
  key = jax.random.PRNGKey(1)
  loss = train.batch_loss(model, task.scaler, params, batch, key)
  assert float(loss) == float(train.batch_loss(model, task.scaler, params, moved, key))
  # The real samples' targets do move it.
  real_moved = dict(batch, y=batch["y"] + 1000.0 * weight[:, None, None])
  assert float(train.batch_loss(model, task.scaler, params, real_moved, key)) > float(loss) + 100


CHILD = textwrap.dedent(
  """
  import tempfile
  import jax, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from jaxurban import sharding
  from jaxurban.data.traffic import load_los_loop
  from jaxurban.urbanpg import train

  data = load_los_loop().select(np.arange(40), slice(0, 700))
  results = {}
  for shard in (False, True):
    config = train.UrbanPGConfig(epochs=2, patience=5, features=8, heads=2, batch_size=64,
                                 plot=False, shard_batch=shard)
    task = train.make_task("t", data, config)
    model = train.build_model(config, data.n_nodes)
    params = train.init_params(model, config, jax.random.PRNGKey(0))
    with tempfile.TemporaryDirectory() as workdir:
      best, log = train.fit(task, model, params, train.everything, 1e-2, config,
                            __import__("pathlib").Path(workdir), "s", 0)
    results[shard] = (best, train.evaluate(model, best, task, config)[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               results[False][0], results[True][0])
  np.testing.assert_allclose(results[False][1], results[True][1], rtol=1e-4, atol=1e-3)
  placed = train.Placement(True, 64).batch({"x": np.zeros((64, 3))})
  assert len({s.device for s in placed["x"].addressable_shards}) == 8
  assert placed["x"].sharding.spec == jax.sharding.PartitionSpec(sharding.BATCH)
  # A batch that 8 devices cannot split evenly goes over as many as can.
  for batch_size, count in ((12, 6), (7, 7), (9, 3), (11, 1)):
    placed = train.Placement(True, batch_size).batch({"x": np.zeros((batch_size, 3))})
    assert len({s.device for s in placed["x"].addressable_shards}) == count, batch_size
  print("SHARDED-OK")
  """
)


def test_batch_sharded_over_eight_devices_matches_one_device(data_root):
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "JAXURBAN_DATA": str(data_root),
  }
  done = subprocess.run(
    [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "SHARDED-OK" in done.stdout


def test_keys_of_seeds_and_uses_never_coincide():
  uses = [(train._INIT, 0), (train._TARGET_INIT, 0), (train._TRAINING, 0)]
  uses += [(train._STAGE_INIT, tau) for tau in range(4)]

  def keys_of(seed):
    return jnp.stack([train._seed_key(seed, purpose, index) for purpose, index in uses])

  keys = np.asarray(jax.vmap(keys_of)(jnp.arange(300))).reshape(-1, 2)
  assert len(np.unique(keys, axis=0)) == len(keys) == 300 * len(uses)
  # The plain seed keys of the earlier scheme are not among them either.
  plain = np.asarray(jax.vmap(jax.random.PRNGKey)(jnp.arange(300)))
  assert not (keys[:, None, :] == plain[None, :, :]).all(-1).any()


def test_another_paradigm_into_the_same_folder_is_refused(tmp_path, capsys):
  full = train.UrbanPGConfig(paradigm="full")
  (tmp_path / "metrics.json").write_text(json.dumps({"config": full.to_dict()}))
  with pytest.raises(SystemExit) as exit_info:
    urbanpg_command.main(["--paradigm", "fewshot", "--out", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "paradigm: saved 'full' vs now 'fewshot'" in capsys.readouterr().err
  # Other seeds share the folder (checkpoints are per seed).
  train.check_previous_results(
    tmp_path / "metrics.json",
    {**full.to_dict(), "seeds": 3, "first_seed": 2},
    train.RESULTS_MAY_DIFFER,
  )


def _per_seed_metrics(offset):
  """Metrics whose value tells metric, horizon and seed apart: 100 * metric + horizon + offset."""
  names = ("mae", "rmse", "mape")
  horizon = {k: [100.0 * i + h + offset for h in range(1, 13)] for i, k in enumerate(names)}
  return {"horizon": horizon, "avg": {k: 100.0 * i + 50.0 + offset for i, k in enumerate(names)}}


def test_summary_and_table_read_the_reported_horizons_in_column_order():
  runs = [_per_seed_metrics(0.0), _per_seed_metrics(10.0)]
  summary = train.summarise(runs)
  for i, metric in enumerate(("mae", "rmse", "mape")):
    for h in train.REPORT_HORIZONS:
      # Horizon h is the h-th forecast step (index h - 1); the spread is the
      # population std over seeds (two seeds 10 apart: 5).
      assert summary[f"{metric}@{h}"] == (100.0 * i + h + 5.0, 5.0)
    assert summary[f"{metric}@avg"] == (100.0 * i + 55.0, 5.0)
  # One run per model: the row's cells follow the header, h3 / h6 / h12 / avg,
  # each MAE, RMSE, MAPE.
  table = train.format_table({"one": runs[:1]})
  head, _, row = table.splitlines()
  assert head.split()[1:5] == ["h3", "MAE", "RMSE", "MAPE%"]
  cells = [float(c) for c in row.split()[1:]]
  expected = [100.0 * i + h for h in (3, 6, 12) for i in range(3)] + [50.0, 150.0, 250.0]
  np.testing.assert_allclose(cells, expected)


def _small_task(data_root, **settings):
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(**{**TINY, **settings})
  return data, config, train.make_task("t", data, config)


def _direct_forecast(model, params, windows, scaler):
  """Eval-mode forecasts of all windows in one call, back in raw units (mph)."""
  batch = {k: getattr(windows, k) for k in ("x", "x_mask", "time_of_day", "day_of_week")}
  out = train.make_predict(model)(params, batch)
  return scaler.inverse(np.asarray(out, np.float64))


def test_validation_and_test_scores_are_raw_unit_errors_on_their_own_windows(
  fit_small, data_root, tmp_path
):
  # Early stopping compares the validation windows' MAE in mph; the reported
  # scores are the test windows' errors in mph, not in scaled units.
  best, log = fit_small(tmp_path, epochs=1)
  _, config, task = _small_task(data_root)
  model = train.build_model(config, task.data.n_nodes)
  val = train.masked_metrics(
    _direct_forecast(model, best, task.val, task.scaler), task.val.y, task.val.y_mask
  )
  np.testing.assert_allclose(log["history"][0]["val_mae"], val["avg"]["mae"], rtol=1e-5)
  assert log["best_val_mae"] == log["history"][0]["val_mae"]
  direct = _direct_forecast(model, best, task.test, task.scaler)
  scores, pred = train.evaluate(model, best, task, config)
  np.testing.assert_allclose(pred, direct, rtol=1e-5, atol=1e-4)
  expected = train.masked_metrics(direct, task.test.y, task.test.y_mask)
  for k in ("mae", "rmse", "mape"):
    np.testing.assert_allclose(scores["avg"][k], expected["avg"][k], rtol=1e-5)


def test_fit_stops_after_patience_epochs_without_a_better_validation(
  fit_small, tmp_path, monkeypatch
):
  # Validation offsets per epoch: epoch 3 improves on epoch 1 after one bad
  # epoch, which restarts the count; epochs 4 and 5 are the two bad epochs
  # that patience 2 allows, so training ends after epoch 5.
  offsets = [0.0, 100.0, -100.0, 100.0, 100.0, 100.0, 100.0, 100.0]
  real, calls = train.masked_metrics, []

  def shifted(pred, true, mask):
    out = real(pred, true, mask)
    out["avg"]["mae"] += offsets[len(calls)]
    calls.append(None)
    return out

  monkeypatch.setattr(train, "masked_metrics", shifted)
  _, log = fit_small(tmp_path, epochs=8, patience=2)
  assert [row["epoch"] for row in log["history"]] == [1, 2, 3, 4, 5]
  assert log["epochs"] == 5 and log["best_epoch"] == 3


def test_batch_loss_is_the_masked_mae_in_raw_units(rng):
  # The loss compares forecasts brought back to mph with the raw targets,
  # over observed targets of real (weight 1) samples only, divided by their count.
  b, n = 6, 7
  config = train.UrbanPGConfig(features=8, heads=2, batch_size=b)
  model = train.build_model(config, n)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  scaler = Scaler(50.0, 10.0)
  y_mask = rng.uniform(size=(b, 12, n)) > 0.3
  batch = {
    "x": rng.normal(size=(b, 12, n)).astype(np.float32),
    "x_mask": np.ones((b, 12, n), bool),
    "y": np.where(y_mask, rng.uniform(20, 70, (b, 12, n)), 0.0).astype(np.float32),
    "y_mask": y_mask.astype(np.float32),
    "time_of_day": np.arange(b, dtype=np.int32),
    "day_of_week": np.zeros(b, np.int32),
    "weight": np.array([1, 1, 1, 1, 0, 0], np.float32),
  }
  key = jax.random.PRNGKey(1)
  inputs = [batch[k] for k in ("x", "x_mask", "time_of_day", "day_of_week")]
  scaled = model.apply({"params": params}, *inputs, train=True, rngs={"perturb": key})
  pred = scaler.inverse(np.asarray(scaled, np.float64))
  keep = y_mask & (batch["weight"][:, None, None] > 0)
  expected = np.abs(pred - batch["y"])[keep].mean()
  loss = jax.jit(lambda p, b, k: train.batch_loss(model, scaler, p, b, k))(params, batch, key)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_baselines_are_fitted_on_the_training_period_and_scored_on_test(data_root):
  data, config, task = _small_task(data_root)
  a, b = task.train_steps
  scored = train.baseline_metrics(task, config)
  test = task.test
  ha = HistoricalAverage(
    data.speed[a:b], data.mask[a:b], data.time_of_day[a:b], data.steps_per_day
  ).predict(test, config.t_out)
  linear = PerNodeLinear(task.train, task.scaler).predict(test)
  for name, pred in (("historical average", ha), ("per-node linear", linear)):
    expected = train.masked_metrics(pred, test.y, test.y_mask)
    assert scored[name] == expected, name


def _no_training(task, model, params, trainable, rate, config, workdir, stage, seed):
  return jax.device_get(params), {"stage": stage}


def test_fewshot_baselines_and_example_come_from_the_target(data_root, tmp_path, monkeypatch):
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(paradigm="fewshot", **TINY)
  monkeypatch.setattr(train, "fit", _no_training)
  result = train.run_fewshot(config, tmp_path, data, [0])
  _, target_nodes = train.fewshot_nodes(data)
  target = train.make_task("target", data.select(target_nodes), config, config.fewshot_fraction)
  for name, metrics in train.baseline_metrics(target, config).items():
    assert result["models"][name] == [metrics], name
  assert result["plot"][0].name == "target"


def test_full_run_plots_the_first_seed(data_root, tmp_path, monkeypatch):
  # The picture is labelled with the first seed, so it must show that seed's forecast.
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(**TINY)
  monkeypatch.setattr(train, "fit", _no_training)
  result = train.run_full(config, tmp_path, data, [3, 4])
  task, example, label = result["plot"]
  assert label == "UrbanPG, seed 3"
  model = train.build_model(config, data.n_nodes, data.steps_per_day)
  first = train.init_params(model, config, train._seed_key(3, train._INIT))
  np.testing.assert_array_equal(example, train.evaluate(model, first, task, config)[1])


def test_continual_retrained_arm_starts_fresh_and_the_table_averages_stages(
  data_root, tmp_path, monkeypatch
):
  data = load_los_loop(data_root).select(np.arange(40), slice(0, 700))
  config = train.UrbanPGConfig(paradigm="continual", continual_stages=(0.8, 1.0), **TINY)
  handed = {}

  def recording(task, model, params, trainable, rate, cfg, workdir, stage, seed):
    handed[stage] = jax.device_get(params)
    return _no_training(task, model, params, trainable, rate, cfg, workdir, stage, seed)

  monkeypatch.setattr(train, "fit", recording)
  result = train.run_continual(config, tmp_path, data, [0])
  # The retrained arm of stage 2 starts from that stage's fresh initialisation,
  # not from the continual arm's parameters. Stage 2 holds every detector.
  model = train.build_model(config, data.n_nodes, data.steps_per_day)
  fresh = train.init_params(model, config, train._seed_key(0, train._STAGE_INIT, 1))
  chex.assert_trees_all_equal(handed["retrain_stage2"], jax.device_get(fresh))
  # The main rows are the mean over the stages of every arm and baseline.
  stages = result["stages"]
  for name, runs in result["models"].items():
    for k in ("mae", "rmse", "mape"):
      per_stage = [stages[s][name][0]["avg"][k] for s in ("stage1", "stage2")]
      np.testing.assert_allclose(runs[0]["avg"][k], np.mean(per_stage), rtol=1e-12)
      h12 = [stages[s][name][0]["horizon"][k][11] for s in ("stage1", "stage2")]
      np.testing.assert_allclose(runs[0]["horizon"][k][11], np.mean(h12), rtol=1e-12)


def test_run_covers_the_configured_seeds(data_root, tmp_path, monkeypatch):
  seen = []

  def run_full(config, workdir, data, seeds):
    seen.extend(seeds)
    runs = [_per_seed_metrics(float(s)) for s in seeds]
    return {"models": {"UrbanPG": runs}, "logs": {}, "plot": (None, None, ""), "unseen": {}}

  monkeypatch.setattr(train, "run_full", run_full)
  config = train.UrbanPGConfig(data_root=str(data_root), seeds=2, first_seed=3, plot=False)
  result = train.train_and_evaluate(config, tmp_path)
  assert seen == [3, 4]
  assert result["summary"]["UrbanPG"]["mae@3"] == (6.5, 0.5)


def test_command_hands_every_flag_to_the_config(tmp_path, monkeypatch):
  got = {}
  monkeypatch.setattr(
    urbanpg_command, "train_and_evaluate", lambda config, out: got.update(config=config, out=out)
  )
  monkeypatch.chdir(tmp_path)
  urbanpg_command.main(
    ["--paradigm", "continual", "--seeds", "2", "--first-seed", "5", "--epochs", "7"]
    + ["--patience", "3", "--features", "16", "--layers", "2", "--last-value-skip", "--no-plot"]
  )
  config = got["config"]
  assert (config.paradigm, config.seeds, config.first_seed, config.epochs) == ("continual", 2, 5, 7)
  assert (config.patience, config.features, config.layers) == (3, 16, 2)
  assert config.last_value_skip and not config.plot
  # Every result-changing flag names the default folder; the seeds share it.
  assert got["out"].name == "continual-epochs7-patience3-features16-layers2-last-value-skip"


def test_baselines_fall_back_where_training_saw_nothing(rng):
  # Historical average: a slot never seen in training gets the node's own
  # training mean (few-shot trains on a few hours of the day).
  f, n = 6, 3
  tod = np.arange(40) % 4  # slots 4 and 5 never seen
  speed = rng.uniform(30, 60, (40, n))
  speed[:, 2] += 20.0
  ha = HistoricalAverage(speed, np.ones((40, n), bool), tod, f)
  np.testing.assert_allclose(ha.table[4], speed.mean(0))
  np.testing.assert_allclose(ha.table[5], speed.mean(0))
  # Last value: a node with no observed input gets the training mean.
  scaler = Scaler(50.0, 10.0)
  x = rng.normal(size=(2, 4, n))
  x_mask = np.ones_like(x, bool)
  x_mask[1, :, 2] = False
  lv = last_value(_windows(x, np.zeros((2, 3, n)), np.zeros(2, int), x_mask), scaler, 3)
  np.testing.assert_allclose(lv[1, :, 2], 50.0)
  # Per-node linear: a sample with a missing target at a node (y = 0) stays
  # out of that node's fit, so the exact linear map is still recovered.
  weights = rng.normal(size=(n, 4, 3))
  xs = rng.normal(size=(200, 4, n))
  ys = scaler.inverse(np.einsum("stn,ntk->skn", xs, weights))
  w = _windows(xs, ys, np.zeros(200, int))
  missing = rng.uniform(size=ys.shape) < 0.05
  w = dataclasses.replace(w, y=np.where(missing, 0.0, w.y), y_mask=~missing)
  model = PerNodeLinear(w, scaler, ridge=1e-8)
  np.testing.assert_allclose(model.weights[:, :4], weights, atol=1e-4)


@pytest.mark.parametrize("stages", [(0.5, 1.0), (0.7, 0.85, 1.0)])
def test_continual_stages_take_consecutive_periods_of_growing_node_prefixes(data_root, stages):
  # Eqs. 9-10 see a stream: stage tau is its own period of the series, not
  # everything up to it, and its detectors are the nearest share of the
  # network to the centroid, a prefix of the next stage's.
  data = load_los_loop(data_root)
  config = train.UrbanPGConfig(**{**TINY, "continual_stages": stages})
  tasks = train.continual_tasks(data, config)
  assert len(tasks) == len(stages)
  distance = np.linalg.norm(data.coords - data.coords.mean(0), axis=1)
  start, previous = 0, None
  for task, share in zip(tasks, stages):
    n_nodes = int(round(share * data.n_nodes))
    ids = task.data.sensor_ids
    assert len(ids) == n_nodes
    nodes = np.array([list(data.sensor_ids).index(s) for s in ids])
    # The kept detectors are those nearest the centroid, in that order.
    assert distance[nodes].max() <= np.delete(distance, nodes).min(initial=np.inf)
    assert np.all(np.diff(distance[nodes]) >= 0)
    if previous is not None:
      np.testing.assert_array_equal(ids[: len(previous)], previous)
    steps = task.data.n_steps
    assert abs(steps - data.n_steps / len(stages)) <= 1
    np.testing.assert_array_equal(task.data.speed, data.speed[start : start + steps][:, nodes])
    np.testing.assert_array_equal(task.data.time_of_day, data.time_of_day[start : start + steps])
    start, previous = start + steps, ids
  assert start == data.n_steps


def test_fit_reshuffles_batches_each_epoch_and_logs_their_weighted_mean_loss(
  fit_small, tmp_path, monkeypatch
):
  # Each epoch draws its own order of the training windows; the logged
  # training MAE weights each batch by its real samples, so the padded last
  # batch counts for what it holds.
  orders, steps = [], []
  batches, make_step = train.padded_batches, train.make_train_step

  def recorded_batches(n, batch_size, order=None):
    if order is not None:  # training; validation passes no order
      orders.append(np.asarray(order))
    return batches(n, batch_size, order)

  def recorded_make_step(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def recorded(state, batch):
      state, loss = step(state, batch)
      steps.append((len(orders), float(loss), float(np.sum(batch["weight"]))))
      return state, loss

    return recorded

  monkeypatch.setattr(train, "padded_batches", recorded_batches)
  monkeypatch.setattr(train, "make_train_step", recorded_make_step)
  _, log = fit_small(tmp_path, epochs=2, patience=2)
  assert len(orders) == 2
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(len(order)))
  assert not np.array_equal(orders[0], orders[1])
  for epoch, row in enumerate(log["history"], start=1):
    loss, weight = np.array([(l, w) for e, l, w in steps if e == epoch]).T
    assert len(set(weight)) > 1  # a padded last batch, or the weighting is not exercised
    np.testing.assert_allclose(row["train_mae"], np.average(loss, weights=weight), rtol=1e-6)
