"""The snapshot scorer used to compare with the authors' PyTorch HAFusion."""

import json

import numpy as np
import pytest

from experiments import score_srel_snapshots
from jaxurban.data.errors import DataError
from jaxurban.data.hafusion import load_city_views


def write_snapshots(folder, snapshots_per_seed, epochs):
  folder.mkdir(parents=True, exist_ok=True)
  np.save(folder / "snapshot_epochs.npy", np.asarray(epochs))
  for seed, snaps in snapshots_per_seed.items():
    np.save(folder / f"snapshots_seed{seed}.npy", snaps)


def test_last_and_optimistic_best_snapshot(tmp_path, data_root, rng, capsys):
  views = load_city_views("Chi", data_root)
  n = views.n_regions
  labels = np.stack([views.labels[t] for t in ("crime", "checkIn", "serviceCall")], 1)
  informative = np.log1p(labels) + 0.3 * rng.normal(size=(n, 3))
  # Epoch 0: noise; epoch 10: the labels' logs; epoch 20 (last): noise again.
  snaps = np.stack([rng.normal(size=(n, 3)), informative, rng.normal(size=(n, 3))])
  write_snapshots(tmp_path, {0: snaps, 3: snaps[..., ::-1]}, [0, 10, 20])
  score_srel_snapshots.main(["--snapshots", str(tmp_path), "--data-root", str(data_root)])
  scores = json.loads((tmp_path / "snapshot_scores.json").read_text())
  assert scores["seeds"] == [0, 3]
  assert set(scores["tasks"]) == {"crime", "checkIn", "serviceCall"}
  for task, entry in scores["tasks"].items():
    best, last = entry["best_snapshot_r2_optimistic"], entry["last_epoch_r2"]
    assert entry["best_snapshot_epochs"] == [10, 10], task
    assert best["mean"] > 0.3 and last["mean"] < 0.2
    assert np.all(np.asarray(best["per_seed"]) >= np.asarray(last["per_seed"])), task
  assert "optimistic" in capsys.readouterr().out


def test_bad_snapshot_folders(tmp_path, data_root):
  n = load_city_views("Chi", data_root).n_regions
  with pytest.raises(DataError, match="snapshot_epochs.npy: file missing"):
    score_srel_snapshots.load_snapshots(tmp_path, n)
  write_snapshots(tmp_path, {}, [0, 1])
  with pytest.raises(DataError, match="no snapshots_seed"):
    score_srel_snapshots.load_snapshots(tmp_path, n)
  write_snapshots(tmp_path, {1: np.zeros((2, n + 1, 4))}, [0, 1])
  with pytest.raises(DataError, match=r"snapshots_seed1.npy: shape \(2, 78, 4\)"):
    score_srel_snapshots.load_snapshots(tmp_path, n)
  write_snapshots(tmp_path, {1: np.full((2, n, 4), np.nan)}, [0, 1])
  with pytest.raises(DataError, match="non-finite"):
    score_srel_snapshots.load_snapshots(tmp_path, n)


def test_hafusion_folds_match_its_evaluator(tmp_path, data_root, rng, capsys):
  """--folds 25 is HAFusion's tasks_Chi evaluator: KFold(25, shuffle=True,
  random_state=2024), Ridge(alpha=1), negative predictions clipped to 0."""
  from sklearn.linear_model import Ridge
  from sklearn.metrics import r2_score
  from sklearn.model_selection import KFold

  views = load_city_views("Chi", data_root)
  n = views.n_regions
  snaps = rng.normal(size=(1, n, 6))
  snaps[0, :, 0] = np.log1p(views.labels["crime"])
  write_snapshots(tmp_path, {0: snaps}, [0])
  score_srel_snapshots.main(
    ["--snapshots", str(tmp_path), "--data-root", str(data_root), "--folds", "25"]
  )
  scores = json.loads((tmp_path / "snapshot_scores_25folds.json").read_text())
  # Check-in scores 74 regions: more folds than that is a usage error.
  with pytest.raises(SystemExit):
    score_srel_snapshots.main(
      ["--snapshots", str(tmp_path), "--data-root", str(data_root), "--folds", "75"]
    )
  assert "--folds 75 exceeds the 74 regions" in capsys.readouterr().err
  assert scores["folds"] == 25
  assert set(scores["tasks"]) == {"crime", "checkIn", "serviceCall"}
  for task, entry in scores["tasks"].items():
    y = np.asarray(views.labels[task], np.float64)
    x = snaps[0]
    if task == "checkIn":
      x, y = x[y > 0], y[y > 0]
    pred = np.empty_like(y)
    for train, test in KFold(25, shuffle=True, random_state=2024).split(x):
      pred[test] = Ridge(alpha=1.0).fit(x[train], y[train]).predict(x[test])
    expected = r2_score(y, np.maximum(pred, 0))
    assert entry["last_epoch_r2"]["per_seed"][0] == pytest.approx(expected, abs=1e-4), task
