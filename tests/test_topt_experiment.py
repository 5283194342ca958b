"""End to end on the real Chicago data: SREL, Prompt4RE, metrics.json and the map."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from experiments import topt
from jaxurban.eval.kfold import (
  fold_assignment,
  fold_masks,
  pool_folds,
  protocol_label,
  select_folds,
  validation_masks,
)
from jaxurban.digest import file_sha256
from jaxurban.topt import pipeline
from jaxurban.topt.pipeline import (
  SREL_ONLY_FIELDS,
  SREL_SCHEDULES,
  TASKS,
  ToptConfig,
  collapsed_seeds,
)


def test_tiny_chicago_run_writes_metrics_and_map(data_root, tmp_path, capsys):
  out = tmp_path / "run"
  argv = [
    "--city", "Chi", "--task", "checkIn", "--seeds", "1", "--epochs-srel", "2",
    "--epochs-prompt", "80", "--prompt-lr", "3e-2", "--folds", "3", "--protocol", "paper",
    "--data-root", str(data_root), "--out", str(out),
  ]  # fmt: skip
  assert topt.main(argv) == 0
  printed = capsys.readouterr().out
  assert "optimistic (test-fold epoch selection)" in printed
  assert "paper Table 1: ToPT" in printed
  # The published figures are labelled with how their epochs were chosen.
  assert "picks each fold's epoch on its test fold (optimistic)" in printed

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
  assert "optimistic" in metrics["paper_table1_note"]
  assert metrics["software"]["jax"] == jax.__version__
  assert metrics["data_root"] == str(data_root)
  assert metrics["timings"]["total_s"] > 0
  # Which vectors the task used travels with its figures.
  used = task["prompt_vectors"]
  shipped = json.loads(pathlib.Path(used["manifest"]).read_text())
  assert used["sha256"] == shipped["sha256"] and used["task"] == "checkIn"
  assert used["source"]["repository"] == "townSeven/Prompt4RE"
  assert used["model"]["name"] == "meta-llama/Llama-3.2-11B-Vision-Instruct"

  emb = np.load(out / "embeddings.npy")
  assert emb.shape == (1, labels.shape[0], metrics["config"]["embedding_dim"])
  pred = np.load(out / "predictions_checkIn.npy")
  assert pred.shape == (1, task["n_regions"])
  # The plain file holds the fixed-budget predictions, the labelled one the
  # test-fold-selected ones; each scores its own row.
  y = labels[np.load(out / "regions_checkIn.npy")]

  def r2(p):
    return 1 - np.sum((np.maximum(p[0], 0) - y) ** 2) / np.sum((y - y.mean()) ** 2)

  honest = next(k for k in task["models"] if protocol_label("honest") in k)
  optimistic = np.load(out / "predictions_checkIn_optimistic.npy")
  np.testing.assert_allclose(r2(pred), task["models"][honest]["r2"]["per_seed"][0], rtol=1e-4)
  np.testing.assert_allclose(
    r2(optimistic), task["models"][task["reported_model"]]["r2"]["per_seed"][0], rtol=1e-4
  )
  png = (out / "errors_checkIn.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # Each file holds its protocol's choice from the saved trajectory: the
  # plain one the last evaluation, the labelled one each fold's best on its
  # test fold (rows that agreed with their own files could still both come
  # from the test-fold choice).
  masks = fold_masks(fold_assignment(len(y), 3, metrics["config"]["fold_seed"]), 3)
  (saved,) = (out / "checkpoints").glob("prompt4re_checkIn_*_trajectory.npz")
  trajectory = np.load(saved)["predictions"]
  y32 = y.astype(np.float32)
  for protocol, predictions in (("honest", pred), ("paper", optimistic)):
    chosen = pool_folds(select_folds(trajectory, y32, masks, protocol), masks)
    np.testing.assert_array_equal(predictions, np.asarray(chosen))
  assert not np.array_equal(pred, optimistic)


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
  bad_settings = {
    "--epochs-srel": "--epochs-srel must be >= 1, got 0",
    "--srel-lr": "--srel-lr must be a finite number > 0, got 0.0",
  }
  for flag, words in bad_settings.items():
    with pytest.raises(SystemExit):  # argparse's usage error, naming the flag
      topt.parse_config(["--city", "NY", flag, "0"])
    assert words in capsys.readouterr().err


def test_loaded_embeddings_reject_srel_settings(capsys):
  """With --embeddings SREL is not trained: its settings would only relabel the run."""
  changed = {
    "spatial_bias": False,
    "centrality": False,
    "srel_epochs": 10,
    "srel_learning_rate": 1e-3,
    "srel_layers": 5,
    "spatial_lambda": 0.4,
    "embedding_dim": 64,
  }
  assert set(changed) == set(SREL_ONLY_FIELDS)
  for field, value in changed.items():
    ToptConfig(**{field: value})  # fine when SREL is trained
    with pytest.raises(ValueError, match=f"{field}.*no effect with --embeddings"):
      ToptConfig(embeddings_path="emb.npy", **{field: value})
  assert topt.parse_config(["--embeddings", "emb.npy"])[0].model_name() == "ToPT"
  flags = {
    "--no-spatial-bias": "--no-spatial-bias has",
    "--no-centrality": "--no-centrality has",
    "--epochs-srel 10": "--epochs-srel=10 has",
    "--srel-lr 1e-3": "--srel-lr=0.001 has",
  }
  for flag, words in flags.items():
    with pytest.raises(SystemExit):  # argparse's usage error, naming the flag
      topt.parse_config(["--embeddings", "emb.npy", *flag.split()])
    err = capsys.readouterr().err
    assert f"error: {words} no effect with --embeddings: SREL is not trained" in err


def test_bad_fold_and_prompt_settings_are_usage_errors(capsys):
  """Caught when the config is made, not after SREL has trained."""
  bad = {
    "--folds 1": "--folds must be >= 2, got 1",
    "--folds 2 --protocol validated": "--folds must be >= 3 for the 'validated' protocol",
    "--fold-seed -1": "--fold-seed must be in [0, 2**32), got -1",
    "--epochs-prompt 0": "--epochs-prompt must be a positive multiple",
    "--epochs-prompt 30": "--epochs-prompt must be a positive multiple",  # of eval_every (20)
    "--prompt-lr 0": "--prompt-lr must be a finite number > 0, got 0.0",
    "--prompt-lr inf": "--prompt-lr must be a finite number > 0, got inf",
    "--out /dev/null": "/dev/null: exists and is not a folder",
  }
  for flags, field in bad.items():
    with pytest.raises(SystemExit):
      topt.parse_config(flags.split())
    assert field in capsys.readouterr().err, flags
  # The validation fold is carved out only when Prompt4RE runs.
  fine = (
    "--folds 2",
    "--folds 3 --protocol validated",
    "--folds 2 --no-prompt4re",
    "--epochs-prompt 40",
  )
  for flags in fine:
    topt.parse_config(flags.split())
  fields = {
    "eval_every": 0,
    "ridge_alpha": 0.0,
    "context": "none",
    "value_basis": "svd",
    "head_init": "zeros",
    "embedding_dim": 146,  # Prompt4RE's 4 heads split it
  }
  for field, value in fields.items():
    with pytest.raises(ValueError, match=field):
      ToptConfig(**{field: value})
  ToptConfig(embedding_dim=146, prompt4re=False)
  # The evaluation interval is Prompt4RE's: without it a changed one is
  # refused for what it is, not as a prompt-epoch budget it does not divide.
  with pytest.raises(ValueError, match="eval_every=7 has no effect without Prompt4RE"):
    ToptConfig(prompt4re=False, eval_every=7)
  with pytest.raises(ValueError, match="eval_every=10 has no effect without Prompt4RE"):
    ToptConfig(city="NY", eval_every=10)
  ToptConfig(embedding_dim=146, alignment=False)
  # SREL's own settings are checked when the config is made, not after the
  # data and prompt vectors are read.
  for field, value, words in (
    ("srel_layers", -1, "n_layers must be >= 0"),
    ("embedding_dim", 0, "embedding_dim must be >= 1"),
    ("spatial_lambda", float("nan"), "spatial_lambda must be a finite number"),
  ):
    with pytest.raises(ValueError, match=f"SRELConfig: {words}"):
      ToptConfig(**{field: value}, prompt4re=False)
  # Prompt4RE's settings without Prompt4RE, and the spatial switches on New
  # York, would label a run that computes the plain ridge row.
  for flags, setting in (
    ("--no-prompt4re --protocol validated", "--protocol='validated'"),
    ("--no-prompt4re --protocol paper", "--protocol='paper'"),
    ("--no-prompt4re --mllm qwen", "--mllm='qwen'"),
    ("--no-prompt4re --no-alignment", "--no-alignment"),
    ("--no-prompt4re --no-task-prompt", "--no-task-prompt"),
    ("--no-prompt4re --context all", "--context='all'"),
    ("--no-prompt4re --value-basis full", "--value-basis='full'"),
    ("--no-prompt4re --epochs-prompt 40", "--epochs-prompt=40"),
    ("--city NY --no-alignment", "--no-alignment"),
    ("--city NY --no-spatial-bias", "--no-spatial-bias"),
    ("--city NY --no-centrality", "--no-centrality"),
  ):
    with pytest.raises(SystemExit):
      topt.parse_config(flags.split())
    assert f"error: {setting} has no effect" in capsys.readouterr().err, flags
  # --mllm picks among the published vectors; --prompts brings its own.
  with pytest.raises(SystemExit):
    topt.parse_config(["--prompts", "/some/vectors", "--mllm", "qwen"])
  assert "ToptConfig.mllm chooses among the published" in capsys.readouterr().err
  assert ToptConfig(mllm="qwen").model_name() == "ToPT (qwen prompt vectors)"
  assert ToptConfig(mllm="qwen", alignment=False).model_name() == (
    "w/o P-R Alignment (qwen prompt vectors)"
  )


def test_srel_trains_with_the_citys_architecture_and_the_runs_settings():
  # The SREL run behind a ToPT config: HAFusion's architecture of its city,
  # the city's schedule unless set, and every SREL setting of the config.
  new_york = pipeline._srel_config(ToptConfig(city="NY", seeds=(2, 5)))
  assert (new_york.epochs, new_york.learning_rate) == SREL_SCHEDULES["NY"]
  assert (new_york.n_heads, new_york.intra_layers, new_york.memory) == (4, 3, 72)
  assert not new_york.spatial_bias and not new_york.centrality
  assert new_york.seeds == (2, 5)
  chicago = pipeline._srel_config(
    ToptConfig(
      srel_epochs=10, srel_learning_rate=2e-4, srel_layers=5, spatial_lambda=0.4,
      embedding_dim=64, centrality=False, seeds=(1,),
    )
  )  # fmt: skip
  assert (chicago.epochs, chicago.learning_rate, chicago.n_layers) == (10, 2e-4, 5)
  assert (chicago.spatial_lambda, chicago.embedding_dim, chicago.seeds) == (0.4, 64, (1,))
  assert chicago.spatial_bias and not chicago.centrality
  assert (chicago.n_heads, chicago.memory) == (1, 36)


def test_ablation_flags_change_what_prompt4re_is_given(data_root, tmp_path, rng, monkeypatch):
  """--no-alignment and --no-task-prompt change the model and its inputs, not only the label.

  The pipeline is stopped where Prompt4RE would start training: what it would
  train is recorded, with the prompt vectors the pipeline loaded.
  """
  from jaxurban import prompts as prompt_files
  from jaxurban.topt import prompt4re

  for task in TASKS:
    assert ToptConfig().prompt_config(task).alignment is True
    assert ToptConfig(alignment=False).prompt_config(task).alignment is False
  labels = np.load(data_root / "hafusion" / "Chi" / "check_counts.npy")
  keep = labels > 0  # checkIn's scored regions
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, labels.shape[0], 16)).astype(np.float32))
  read = prompt_files.load_chicago_prompts
  loaded = []

  def spy_load(root, mllm, task):
    loaded.append((mllm, task))
    return read(root, mllm, task)

  class Stop(Exception):
    pass

  given = {}

  def stop_before_training(config, embeddings, prompts, *args, **kwargs):
    given.update(config=config, embeddings=embeddings, prompts=prompts)
    raise Stop

  monkeypatch.setattr(prompt_files, "load_chicago_prompts", spy_load)
  monkeypatch.setattr(pipeline, "cross_validated_trajectory", stop_before_training)
  argv = [
    "--city", "Chi", "--task", "checkIn", "--seeds", "1", "--embeddings", str(emb),
    "--epochs-prompt", "20", "--folds", "3", "--data-root", str(data_root),
  ]  # fmt: skip
  vectors = {task: read(data_root, "llama", task)[keep] for task in ("checkIn", "none")}
  assert not np.allclose(vectors["checkIn"], vectors["none"])
  for flags, prompt_task, alignment in (
    ([], "checkIn", True),
    (["--no-task-prompt"], "none", True),
    (["--no-alignment"], "checkIn", False),
  ):
    loaded.clear()
    given.clear()
    config, _ = topt.parse_config(argv + flags)
    assert config.prompt_config("checkIn").alignment is alignment
    with pytest.raises(Stop):
      # One folder per setting: a stopped run's folder refuses other settings.
      folder = tmp_path / ("run" + "".join(flags))
      pipeline.train_and_evaluate(config, folder, log=lambda s: None)
    assert loaded == [("llama", prompt_task)], flags
    np.testing.assert_array_equal(given["prompts"], vectors[prompt_task])
    pcfg = given["config"]
    assert pcfg.alignment is alignment and pcfg.context == "split", flags
    # The models this config builds (their parameters' shapes): without
    # alignment no cross-attention.
    model = prompt4re._model(given["prompts"].shape[1], pcfg)
    params = jax.eval_shape(
      lambda e, p: prompt4re.init_params(model, jax.random.PRNGKey(0), e, p),
      given["embeddings"][0],
      given["prompts"],
    )
    if alignment:
      assert {"query", "key", "value", "residual", "norm"} <= set(params), flags
    else:
      assert set(params) == {"soft_prompt", "head"}, flags


def test_too_many_folds_fail_before_srel(data_root, tmp_path, monkeypatch):
  labels = np.load(data_root / "hafusion" / "Chi" / "check_counts.npy")
  scored = int((labels > 0).sum())

  def no_srel(*args, **kwargs):
    raise AssertionError("SREL started")

  monkeypatch.setattr(pipeline, "_srel_embeddings", no_srel)
  config = ToptConfig(tasks=("checkIn",), n_folds=scored + 1, data_root=str(data_root))
  with pytest.raises(ValueError, match=f"n_folds={scored + 1} exceeds the {scored} regions") as e:
    pipeline.train_and_evaluate(config, tmp_path, log=lambda s: None)
  assert e.value.file == str(data_root / "hafusion" / "Chi" / "check_counts.npy")
  # One scored region per fold (leave-one-out) is a split that can run, in
  # the same folder: the refused run left nothing there to refuse it.
  config = ToptConfig(tasks=("checkIn",), n_folds=scored, data_root=str(data_root))
  with pytest.raises(AssertionError, match="SREL started"):
    pipeline.train_and_evaluate(config, tmp_path, log=lambda s: None)


def test_validated_protocol_reports_one_honest_row(data_root, tmp_path, monkeypatch):
  labels = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy")
  emb = tmp_path / "emb.npy"
  # A fixed draw: with four evaluations and four folds, the validation and
  # test folds pick the same evaluations for about 1 random draw in 70, and
  # then the last check below could not tell the protocols apart. For this
  # draw they differ in every fold.
  fixed_rng = np.random.default_rng(14)
  np.save(emb, fixed_rng.normal(size=(1, labels.shape[0], 16)).astype(np.float32))
  out = tmp_path / "run"
  argv = [
    "--city", "Chi", "--task", "crime", "--seeds", "1", "--embeddings", str(emb),
    "--epochs-prompt", "80", "--prompt-lr", "3e-2", "--folds", "4", "--protocol", "validated",
    "--data-root", str(data_root), "--out", str(out),
  ]  # fmt: skip
  assert topt.main(argv) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  task = metrics["tasks"]["crime"]
  assert metrics["protocol_label"] == protocol_label("validated")
  assert task["reported_model"] == f"ToPT [{protocol_label('validated')}]"
  assert sorted(task["models"]) == sorted(
    ["w/o Prompt4RE (ridge on SREL embeddings)", pipeline.RIDGE_TUNED_NAME, task["reported_model"]]
  )
  # The tuned ridge row records the penalty chosen per seed and fold.
  chosen = np.asarray(task["models"][pipeline.RIDGE_TUNED_NAME]["alpha_chosen"])
  assert chosen.shape == (1, 4) and set(chosen.ravel()) <= set(metrics["config"]["ridge_alphas"])
  assert np.isfinite(task["models"][task["reported_model"]]["r2"]["mean"])
  # The reported predictions are each fold's best evaluation on its
  # validation fold, not on its test fold.
  masks = fold_masks(fold_assignment(len(labels), 4, metrics["config"]["fold_seed"]), 4)
  (saved,) = (out / "checkpoints").glob("prompt4re_crime_*_trajectory.npz")
  with np.load(saved) as arrays:
    trajectory, validation = arrays["predictions"], arrays["validation"]
  y32 = labels.astype(np.float32)
  chosen = select_folds(
    trajectory, y32, masks, "validated", validation=(validation, validation_masks(masks))
  )
  reported = np.load(out / "predictions_crime.npy")
  np.testing.assert_array_equal(reported, np.asarray(pool_folds(chosen, masks)))
  on_test = pool_folds(select_folds(trajectory, y32, masks, "paper"), masks)
  assert not np.array_equal(reported, np.asarray(on_test)), (
    "the validation folds chose the same evaluations as the test folds would, so this "
    "draw cannot show that the reported row is the validated one; pick another draw"
  )
  # The same file named relatively is the same run: the rerun is not refused.
  assert metrics["config"]["embeddings_path"] == str(emb)
  # (The data root may itself be relative, as in CI: it is given absolute here.)
  renamed = {str(emb): "emb.npy", str(data_root): str(data_root.resolve())}
  monkeypatch.chdir(tmp_path)
  relative = [renamed.get(arg, arg) for arg in argv]
  assert topt.main(relative) == 0


def _extracted_prompts(folder, n, task, rng, width=24):
  """An output folder as experiments.extract_prompts writes it (ids 0..n-1)."""
  from experiments.prompt_extraction import templates
  from experiments.prompt_extraction.output import write_output

  folder.mkdir(parents=True)
  write_output(
    folder,
    rng.normal(size=(n, width)).astype(np.float32),
    region_ids=[str(i) for i in range(n)],
    task=task,
    template={
      "version": templates.TEMPLATE_VERSION,
      "sha256": templates.template_sha256(task),
      "text": templates.TEMPLATES[task],
    },
    pooling="mean",
    model={"name": "tiny-mllm", "path": "/m", "revision": None},
  )


def test_extracted_prompt_vectors_replace_the_published_ones(data_root, tmp_path, rng, capsys):
  n = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").shape[0]
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, n, 16)).astype(np.float32))
  prompts = tmp_path / "prompts"
  _extracted_prompts(prompts / "crime", n, "crime", rng)  # one subfolder per task
  argv = [
    "--city", "Chi", "--task", "crime", "--seeds", "1", "--embeddings", str(emb),
    "--epochs-prompt", "20", "--folds", "3", "--data-root", str(data_root),
  ]  # fmt: skip
  out = tmp_path / "run"
  assert topt.main(argv + ["--prompts", str(prompts), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"tiny-mllm ({prompts / 'crime'}) prompts (crime, width 24)" in printed
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["config"]["prompts_dir"] == str(prompts)
  task = metrics["tasks"]["crime"]
  assert np.isfinite(task["models"][task["reported_model"]]["r2"]["mean"])
  from experiments.prompt_extraction import templates

  used = task["prompt_vectors"]
  assert used["manifest"] == str(prompts / "crime" / "manifest.json")
  assert used["sha256"] == file_sha256(prompts / "crime" / "vectors.npy")
  assert used["template"] == {
    "version": templates.TEMPLATE_VERSION,
    "sha256": templates.template_sha256("crime"),
  }
  assert used["model"]["name"] == "tiny-mllm" and used["shape"] == [n, 24]
  # One task's output folder itself works too.
  single = ["--prompts", str(prompts / "crime"), "--out", str(tmp_path / "single")]
  assert topt.main(argv + single) == 0
  # A folder made for another task is refused, naming the manifest's field.
  other = tmp_path / "other"
  _extracted_prompts(other, n, "checkIn", rng)
  assert topt.main(argv + ["--prompts", str(other), "--out", str(tmp_path / "run2")]) == 2
  assert (
    "manifest.json: column 'task': task is 'checkIn', expected 'crime'" in capsys.readouterr().err
  )
  # A width the 4 attention heads cannot split is refused before anything trains.
  odd = tmp_path / "odd"
  _extracted_prompts(odd, n, "crime", rng, width=30)
  assert topt.main(argv + ["--prompts", str(odd), "--out", str(tmp_path / "run3")]) == 2
  error = capsys.readouterr().err
  assert "column 'prompts_dir': prompt width 30 is not divisible by Prompt4RE's 4" in error
  assert "Traceback" not in error and not (tmp_path / "run3" / "embeddings.npy").exists()
  # A folder that is not there is named as such.
  missing = ["--prompts", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run4")]
  assert topt.main(argv + missing) == 2
  assert "nowhere: column 'prompts_dir': no such folder" in capsys.readouterr().err


def test_default_output_folders_follow_the_settings_that_change_results():
  from experiments import core_align

  folder = lambda argv: topt.parse_config(argv)[1]
  assert folder([]) == folder(["--data-root", "/elsewhere"]) == pathlib.Path("runs/topt/Chi")
  assert folder(["--task", "crime", "--protocol", "paper"]) == pathlib.Path(
    "runs/topt/Chi-taskcrime-protocolpaper"
  )
  assert folder(["--no-spatial-bias"]) == pathlib.Path("runs/topt/Chi-no-spatial-bias")
  # A path becomes a short digest, the same for the same path.
  with_emb = folder(["--embeddings", "/runs/a/emb.npy"])
  assert (
    with_emb.name.startswith("Chi-embeddings") and len(with_emb.name) == len("Chi-embeddings") + 8
  )
  core = lambda argv: core_align.parse_config(argv)[1]
  assert core(["--pair", "XA-CD", "--log-every", "10"]) == pathlib.Path(
    "runs/core_align/xa-cd-core"
  )
  assert core(["--pair", "xa-cd", "--seeds", "5", "--no-lma"]) == pathlib.Path(
    "runs/core_align/xa-cd-no-lma-seeds5"
  )
  assert core(["--pair", "XA-CD", "--loss-form", "paper", "--out", "x"]) == pathlib.Path("x")
  # Neither the GAT's recomputation nor the picture changes a result.
  assert core(["--remat-gat"]) == pathlib.Path("runs/core_align/xa-cd-core")

  from experiments import urbanmmcl

  mmcl = lambda argv: urbanmmcl.parse_config(argv)[1]
  # Pre-training checkpoints are per seed, and fine-tuning may change on
  # resumption: those runs share the folder of their pre-training settings.
  assert (
    mmcl([])
    == mmcl(["--seeds", "2", "--finetune-seeds", "1", "--projection", "pca"])
    == pathlib.Path("runs/urbanmmcl/Chi")
  )
  assert mmcl(["--city", "NY", "--no-vgae", "--epochs", "50"]) == pathlib.Path(
    "runs/urbanmmcl/NY-epochs50-no-vgae"
  )


def _write_nan(path, n):
  emb = np.ones((2, n, 16), np.float32)
  emb[1, 5, 3] = np.nan
  np.save(path, emb)


@pytest.mark.parametrize(
  "write, problem",
  [
    (_write_nan, "1 non-finite (NaN/inf) values in the first 2 seeds (first at seed 1, region 5)"),
    (lambda path, n: np.savez(path, emb=np.ones((2, n, 16))), "is an .npz archive"),
    (lambda path, n: np.save(path, np.array([{"a": 1}])), "holds Python objects (pickled)"),
    (lambda path, n: path.write_text("# notes\n"), "not a .npy file (no .npy header)"),
    (lambda path, n: np.save(path, np.ones((1, n, 16))), "holds 1 seeds' embeddings, fewer"),
    (
      lambda path, n: np.save(path, np.ones((2, n + 1, 16))),
      "expected [seeds, 77 regions, d >= 1]",
    ),
    (lambda path, n: np.save(path, np.ones((2, n, 0))), "shape (2, 77, 0), expected"),
    (lambda path, n: np.save(path, np.full((2, n, 16), "x")), "expected real numbers"),
  ],
)
def test_bad_embeddings_file_is_a_data_error(data_root, tmp_path, capsys, write, problem):
  n = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").shape[0]
  path = tmp_path / "emb.npy"
  write(path, n)
  if not path.exists():  # np.savez appends .npz
    path.with_suffix(".npy.npz").rename(path)
  argv = [
    "--city", "Chi", "--task", "crime", "--seeds", "2", "--embeddings", str(path),
    "--no-prompt4re", "--data-root", str(data_root), "--out", str(tmp_path / "run"),
  ]  # fmt: skip
  assert topt.main(argv) == 2
  error = capsys.readouterr().err
  assert f"{path}: column 'embeddings_path': " in error and problem in error


def test_loaded_embeddings_the_attention_heads_cannot_split_are_a_data_error(
  data_root, tmp_path, rng, capsys
):
  # Prompt4RE's 4 heads split the embedding width: a file of width 18 is
  # named as the problem before any model is built.
  n = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").shape[0]
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, n, 18)).astype(np.float32))
  argv = [
    "--city", "Chi", "--task", "crime", "--seeds", "1", "--embeddings", str(emb),
    "--epochs-prompt", "20", "--folds", "3", "--data-root", str(data_root),
    "--out", str(tmp_path / "run"),
  ]  # fmt: skip
  assert topt.main(argv) == 2
  error = capsys.readouterr().err
  assert f"{emb}: column 'embeddings_path': width 18 is not divisible by Prompt4RE's 4" in error


def test_a_ridge_run_on_loaded_embeddings_records_no_srel_schedule(data_root, tmp_path, rng):
  # No SREL ran: the metrics say where the embeddings came from, claim no
  # training schedule, and note that Prompt4RE was switched off.
  n = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").shape[0]
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, n, 8)).astype(np.float32))
  config = ToptConfig(
    tasks=("crime",), seeds=(0,), prompt4re=False, n_folds=3, embeddings_path=str(emb),
    data_root=str(data_root),
  )  # fmt: skip
  metrics = pipeline.train_and_evaluate(config, tmp_path / "run", log=lambda s: None)
  assert metrics["srel_schedule"] is None
  assert metrics["srel_embeddings"] == f"loaded from {emb}"
  assert any(note.startswith("Prompt4RE disabled") for note in metrics["notes"])


def test_metrics_of_a_run_stopped_between_tasks_say_it_is_unfinished(
  data_root, tmp_path, rng, monkeypatch
):
  n = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").shape[0]
  emb = tmp_path / "emb.npy"
  np.save(emb, rng.normal(size=(1, n, 8)).astype(np.float32))
  config = ToptConfig(
    seeds=(0,), prompt4re=False, n_folds=3, embeddings_path=str(emb), data_root=str(data_root),
  )  # fmt: skip
  assert config.tasks == ("crime", "checkIn", "serviceCall")
  written = []
  original = pipeline.write_json_atomic

  def killed_after_the_first_task(path, value):
    original(path, value)
    if path.name == "metrics.json":
      written.append(path)
      raise KeyboardInterrupt("killed after the first task")

  monkeypatch.setattr(pipeline, "write_json_atomic", killed_after_the_first_task)
  with pytest.raises(KeyboardInterrupt):
    pipeline.train_and_evaluate(config, tmp_path / "run", log=lambda s: None)
  stopped = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert list(stopped["tasks"]) == ["crime"]
  assert stopped["finished"] is False and stopped["tasks_to_do"] == ["checkIn", "serviceCall"]

  monkeypatch.setattr(pipeline, "write_json_atomic", original)
  pipeline.train_and_evaluate(config, tmp_path / "run", log=lambda s: None)
  done = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert sorted(done["tasks"]) == sorted(config.tasks)
  assert done["finished"] is True and done["tasks_to_do"] == []
  assert "total_s" in done["timings"]


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


def test_a_run_of_another_configuration_is_refused_before_any_work(tmp_path, capsys):
  # Results of crime in the folder: a check-in run there would replace
  # metrics.json while crime's predictions and map stayed beside it.
  out = tmp_path / "run"
  out.mkdir()
  crime, _ = topt.parse_config(["--city", "Chi", "--task", "crime", "--out", str(out)])
  (out / "metrics.json").write_text(json.dumps({"config": dataclasses.asdict(crime)}))
  assert topt.main(["--city", "Chi", "--task", "checkIn", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert "metrics.json was written with a different config (tasks: saved ['crime']" in err
  assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_a_killed_run_of_another_configuration_is_refused_too(
  data_root, tmp_path, monkeypatch, capsys
):
  # Killed in SREL, before any metrics.json: its embeddings and checkpoints
  # would otherwise sit beside the results of whatever ran there next.
  out = tmp_path / "run"
  common = ["--city", "Chi", "--seeds", "1", "--data-root", str(data_root), "--out", str(out)]

  from jaxurban.topt import srel_train

  def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed in SREL")

  monkeypatch.setattr(srel_train, "train_srel", killed)
  with pytest.raises(KeyboardInterrupt):
    topt.main(["--task", "crime", *common])
  monkeypatch.undo()
  kept = sorted([pipeline.RUN_CONFIG_FILE, "command.json"])
  assert sorted(p.name for p in out.iterdir()) == kept
  assert topt.main(["--task", "checkIn", *common]) == 2
  err = capsys.readouterr().err
  assert "run_config.json was written with a different config (tasks: saved ['crime']" in err
  assert sorted(p.name for p in out.iterdir()) == kept


def test_a_run_refused_for_its_embeddings_file_leaves_nothing_to_refuse_the_next(
  data_root, tmp_path, capsys
):
  out = tmp_path / "run"
  bad = tmp_path / "bad.npy"
  np.save(bad, np.zeros((1, 5, 3), np.float32))
  common = ["--city", "Chi", "--task", "crime", "--seeds", "1", "--no-prompt4re"]
  common += ["--data-root", str(data_root), "--out", str(out)]
  assert topt.main([*common, "--embeddings", str(bad)]) == 2
  assert "shape (1, 5, 3), expected [seeds, 77 regions, d >= 1]" in capsys.readouterr().err
  assert not (out / pipeline.RUN_CONFIG_FILE).exists()
  good = tmp_path / "good.npy"
  np.save(good, np.random.default_rng(0).normal(size=(1, 77, 8)).astype(np.float32))
  assert topt.main([*common, "--embeddings", str(good)]) == 0


def test_mean_and_spread_share_their_decimals():
  from jaxurban.topt.pipeline import mean_std_text

  cases = {
    (1844.2, 410.3): "1844 ± 410",
    (172.14, 1.23): "172.1 ± 1.2",
    (0.5591, 0.0763): "0.559 ± 0.076",
    (0.81, 0.0): "0.810 ± 0.000",
    (1844.0, 0.0): "1844 ± 0",
  }
  assert {args: mean_std_text(*args) for args in cases} == cases
  # At most six decimals, however small the spread; a diverged run's NaN shown as such.
  assert mean_std_text(1.0, 1e-9) == "1.000000 ± 0.000000"
  assert mean_std_text(float("nan"), 0.1) == "nan ± 0.1"
  # One seed: no spread to show, however the std was stored.
  assert mean_std_text(0.5591, 0.0, seeds=1) == "0.559 (1 seed)"
  assert mean_std_text(1844.0, 0.0, seeds=1) == "1844 (1 seed)"
  assert mean_std_text(0.5591, 0.0763, seeds=3) == "0.559 ± 0.076"


def test_config_refuses_settings_no_run_could_use(tmp_path):
  """Each of these would fail, or silently do nothing, only after SREL had trained."""
  for fields, words in (
    ({"tasks": ()}, "tasks must be a non-empty subset"),
    ({"tasks": ("crime", "traffic")}, "tasks must be a non-empty subset"),
    ({"seeds": ()}, "seeds is empty"),
    ({"task_prompt": False, "mllm": "qwen"}, "without a task template exist only for llama"),
    ({"prompts_dir": str(tmp_path), "prompt4re": False}, "prompts_dir has no effect"),
    ({"prompts_dir": str(tmp_path), "city": "NY"}, "prompts_dir has no effect"),
    ({"fold_seed": 2**32}, "fold_seed must be in"),
    ({"ridge_alphas": ()}, "ridge_alphas must be values > 0"),
    ({"ridge_alphas": (1.0, 0.0)}, "ridge_alphas must be values > 0"),
  ):
    with pytest.raises(ValueError, match=words):
      ToptConfig(**fields)
  # The largest seed numpy's split accepts, and a folder of own prompts
  # without the task template, are fine.
  assert ToptConfig(fold_seed=2**32 - 1).fold_seed == 2**32 - 1
  ToptConfig(task_prompt=False, prompts_dir=str(tmp_path))


def test_model_name_lists_every_ablation():
  assert ToptConfig().model_name() == "ToPT"
  assert ToptConfig(spatial_bias=False).model_name() == "w/o spatial bias"
  assert ToptConfig(centrality=False).model_name() == "w/o centrality"
  assert ToptConfig(task_prompt=False, alignment=False, centrality=False).model_name() == (
    "w/o Task-relevant Prompt, w/o P-R Alignment, w/o centrality"
  )
  assert ToptConfig(prompt4re=False, spatial_bias=False).model_name() == (
    "w/o Prompt4RE, w/o spatial bias"
  )


def test_prompt_config_carries_every_prompt_setting():
  from jaxurban.topt.prompt4re import PAPER_LEARNING_RATES, Prompt4REConfig

  # The paper's rate per task unless one is given.
  assert {task: ToptConfig().prompt_config(task).learning_rate for task in TASKS} == (
    PAPER_LEARNING_RATES
  )
  assert PAPER_LEARNING_RATES == {"crime": 1e-4, "checkIn": 3e-4, "serviceCall": 1e-4}
  config = ToptConfig(
    prompt_epochs=60, prompt_learning_rate=2e-3, eval_every=15, alignment=False, context="all",
    value_basis="full", head_init="xavier", ridge_alpha=4.0,
  )  # fmt: skip
  assert config.prompt_config("checkIn") == Prompt4REConfig(
    epochs=60, learning_rate=2e-3, eval_every=15, alignment=False, context="all",
    value_basis="full", head_init="xavier", ridge_alpha=4.0,
  )  # fmt: skip


def test_command_line_flags_reach_the_config():
  config, _ = topt.parse_config(
    ["--seeds", "3", "--fold-seed", "7", "--context", "all", "--epochs-srel", "12",
     "--no-centrality", "--task", "serviceCall", "--value-basis", "full"]
  )  # fmt: skip
  assert config.seeds == (0, 1, 2)
  assert config.fold_seed == 7
  assert config.prompt_config("serviceCall").context == "all"
  assert config.prompt_config("serviceCall").value_basis == "full"
  assert config.srel_schedule() == (12, SREL_SCHEDULES["Chi"][1])
  assert not config.centrality and config.spatial_bias
  assert config.tasks == ("serviceCall",)
  assert topt.parse_config([])[0] == ToptConfig()


def test_ridge_rows_use_the_configured_folds_and_penalties(data_root, tmp_path):
  """Without Prompt4RE the reported model is the fixed-penalty ridge probe,
  on the folds of fold_seed, with the penalties of the config; the tuned row
  picks among ridge_alphas. A loaded file gives its first seeds' embeddings."""
  from jaxurban.eval import kfold

  y = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy").astype(np.float64)
  n = len(y)
  stored = np.random.default_rng(3).normal(size=(3, n, 16)).astype(np.float32)
  stored[1] = 0.25  # the second seed's embedding is one vector for every region
  path = tmp_path / "emb.npy"
  np.save(path, stored)
  config = ToptConfig(
    tasks=("crime",), seeds=(3, 5), prompt4re=False, embeddings_path=str(path), n_folds=5,
    fold_seed=7, ridge_alpha=30.0, ridge_alphas=(0.5, 50.0), data_root=str(data_root),
  )  # fmt: skip
  out = tmp_path / "run"
  printed = []
  results = pipeline.train_and_evaluate(config, out, log=printed.append)
  np.testing.assert_array_equal(np.load(out / "embeddings.npy"), stored[:2])
  fold_of = fold_assignment(n, 5, 7)
  want = kfold.ridge_cv_predictions(stored[:2], y, fold_of, 5, 30.0)
  np.testing.assert_allclose(np.load(out / "predictions_crime.npy"), want, rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(np.load(out / "regions_crime.npy"), np.arange(n))
  task = json.loads((out / "metrics.json").read_text())["tasks"]["crime"]
  assert task == json.loads(json.dumps(results["tasks"]["crime"]))
  fixed = "w/o Prompt4RE (ridge on SREL embeddings)"
  assert list(task["models"]) == [fixed, pipeline.RIDGE_TUNED_NAME]
  assert task["reported_model"] == fixed
  scores = kfold.score_pooled(want, y)
  np.testing.assert_allclose(task["models"][fixed]["r2"]["per_seed"], scores["r2"], rtol=1e-6)
  # Chosen among the config's penalties, per seed and fold.
  chosen = np.asarray(task["models"][pipeline.RIDGE_TUNED_NAME]["alpha_chosen"])
  assert chosen.shape == (2, 5) and set(chosen.ravel()) <= {0.5, 50.0}
  # The constant seed is named by its seed number, not its position.
  assert any(note.startswith("SREL seeds [5] collapsed") for note in results["notes"])
  assert results["model"] == "w/o Prompt4RE" and results["srel_schedule"] is None


def test_results_table_puts_each_tasks_paper_rows_after_its_models():
  from jaxurban.eval.kfold import summarise

  def summary(r2):
    return summarise({"mae": [10.0, 12.0], "rmse": [20.0, 22.0], "r2": [r2, r2 + 0.02]})

  tasks = {
    "crime": {"models": {"ridge": summary(0.5), "ToPT [honest]": summary(0.6)}},
    "checkIn": {"models": {"ridge": summary(0.7)}},
  }
  rows = lambda lines: [line.split()[:2] for line in lines[2:]]
  chicago = pipeline.format_table(
    {"config": {"city": "Chi"}, "tasks": tasks}, "honest"
  ).splitlines()
  assert chicago[0].endswith("protocol of the reported model: honest")
  paper = [["paper", "Table"]] * len(pipeline.PAPER_TABLE1)
  assert rows(chicago[:-1]) == [
    ["ridge", "crime"],
    ["ToPT", "[honest]"],
    *paper,
    ["ridge", "checkIn"],
    *paper,
  ]
  assert "0.510 ± 0.014" in chicago[2] and "0.610 ± 0.014" in chicago[3]
  # The published figures of the row's own task, in Table 1's order.
  names = [
    line.split(":")[1].split("  ")[0].strip()
    for line in chicago
    if line.startswith("paper Table 1: ")
  ]
  assert names == list(pipeline.PAPER_TABLE1) * 2
  flexireg = [line for line in chicago if "paper Table 1: FlexiReg" in line]
  assert "crime" in flexireg[0] and "61.7" in flexireg[0] and "0.766" in flexireg[0]
  assert "checkIn" in flexireg[1] and "922" in flexireg[1] and "0.891" in flexireg[1]
  assert chicago[-1] == f"({pipeline.PAPER_TABLE1_NOTE})"
  # Table 1 is Chicago's: New York's table has only its own rows.
  new_york = pipeline.format_table({"config": {"city": "NY"}, "tasks": tasks}, "honest")
  assert "paper" not in new_york and "optimistic" not in new_york
  assert rows(new_york.splitlines()) == [
    ["ridge", "crime"],
    ["ToPT", "[honest]"],
    ["ridge", "checkIn"],
  ]


def test_seeds_are_checked_with_loaded_embeddings_too():
  # SREL's config is not built then, but the seeds still seed Prompt4RE.
  for seeds, words in (
    ((0, 0), r"seeds repeat \[0\]"),
    ((-1,), r"seeds must lie in \[0, 2\*\*32\)"),
  ):
    for embeddings_path in (None, "emb.npy"):
      with pytest.raises(ValueError, match=f"ToptConfig.{words}"):
        ToptConfig(seeds=seeds, embeddings_path=embeddings_path)
