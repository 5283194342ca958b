"""End to end on the real Chicago data: SREL, Prompt4RE, metrics.json and the map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import topt
from jaxurban.eval.kfold import protocol_label
from jaxurban.topt.pipeline import SREL_SCHEDULES, collapsed_seeds


def test_tiny_chicago_run_writes_metrics_and_map(data_root, tmp_path, capsys):
  out = tmp_path / "run"
  argv = [
    "--city", "Chi", "--task", "checkIn", "--seeds", "1", "--epochs-srel", "2",
    "--epochs-prompt", "20", "--folds", "3", "--protocol", "paper",
    "--data-root", str(data_root), "--out", str(out),
  ]  # fmt: skip
  assert topt.main(argv) == 0
  printed = capsys.readouterr().out
  assert "optimistic (test-fold epoch selection)" in printed
  assert "paper Table 1: ToPT" in printed

  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["protocol"] == "paper"
  assert metrics["config"]["srel_epochs"] == 2 and metrics["config"]["n_folds"] == 3
  assert metrics["srel_schedule"] == {"epochs": 2, "learning_rate": 7e-4}
  assert metrics["protocol_label"] == protocol_label("paper")
  task = metrics["tasks"]["checkIn"]
  labels = np.load(data_root / "hafusion" / "Chi" / "check_counts.npy")
  assert task["n_regions"] == int((labels > 0).sum())  # zero-count regions dropped
  assert task["dropped_regions"] == np.flatnonzero(labels == 0).tolist()
  assert protocol_label("paper") in task["reported_model"]
  for summary in task["models"].values():
    for metric in ("mae", "rmse", "r2"):
      assert np.isfinite(summary[metric]["mean"]) and len(summary[metric]["per_seed"]) == 1
  assert metrics["paper_table1"]["ToPT"]["crime"]["r2"] == 0.874
  assert metrics["timings"]["total_s"] > 0

  emb = np.load(out / "embeddings.npy")
  assert emb.shape == (1, labels.shape[0], metrics["config"]["embedding_dim"])
  pred = np.load(out / "predictions_checkIn.npy")
  assert pred.shape == (1, task["n_regions"])
  png = (out / "errors_checkIn.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_york_runs_without_prompts(data_root, capsys):
  config, _ = topt.parse_config(["--city", "NY", "--data-root", str(data_root)])
  assert not config.uses_prompts
  assert config.model_name().startswith("w/o Prompt4RE")
  # No ToPT setting exists for New York: HAFusion's schedule, unless set.
  assert config.srel_schedule() == SREL_SCHEDULES["NY"] == (2000, 5e-4)
  chicago, _ = topt.parse_config(["--city", "Chi"])
  assert chicago.srel_schedule() == SREL_SCHEDULES["Chi"] == (4000, 7e-4)
  argv = ["--city", "NY", "--epochs-srel", "300", "--srel-lr", "1e-4"]
  assert topt.parse_config(argv)[0].srel_schedule() == (300, 1e-4)
  bad_settings = {"--epochs-srel": "srel_epochs", "--srel-lr": "srel_learning_rate"}
  for flag, field in bad_settings.items():
    with pytest.raises(SystemExit):  # argparse's usage error, naming the field
      topt.parse_config(["--city", "NY", flag, "0"])
    assert field in capsys.readouterr().err


def test_validated_protocol_reports_one_honest_row(data_root, tmp_path, rng):
  labels = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy")
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, labels.shape[0], 16)).astype(np.float32))
  out = tmp_path / "run"
  argv = [
    "--city", "Chi", "--task", "crime", "--seeds", "1", "--embeddings", str(emb),
    "--epochs-prompt", "20", "--folds", "4", "--protocol", "validated",
    "--data-root", str(data_root), "--out", str(out),
  ]  # fmt: skip
  assert topt.main(argv) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  task = metrics["tasks"]["crime"]
  assert metrics["protocol_label"] == protocol_label("validated")
  assert task["reported_model"] == f"ToPT [{protocol_label('validated')}]"
  assert sorted(task["models"]) == sorted(
    ["w/o Prompt4RE (ridge on SREL embeddings)", task["reported_model"]]
  )
  assert np.isfinite(task["models"][task["reported_model"]]["r2"]["mean"])


def test_collapsed_seeds_flags_only_constant_embeddings(rng):
  emb = rng.normal(size=(4, 30, 8)).astype(np.float32)
  # Seed 1: one vector for every region, up to float32 noise; seed 3: all zeros.
  emb[1] = rng.normal(size=8) + 1e-8 * rng.normal(size=(30, 8))
  emb[3] = 0.0
  # Seed 2: one region differs from the rest in one dimension: not collapsed.
  emb[2] = 0.5
  emb[2, 7, 4] = 0.6
  assert collapsed_seeds(emb) == [1, 3]
  assert collapsed_seeds(emb[[0, 2]]) == []
