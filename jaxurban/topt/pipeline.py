"""ToPT end to end: SREL embeddings, Prompt4RE per task, k-fold evaluation.

``train_and_evaluate(config, workdir)`` writes into ``workdir``:

* ``run_config.json``: the config, before any other output, so that the
  folder of a run killed before its results refuses a run of other settings
  as a finished run's does;
* ``embeddings.npy``: SREL region embeddings [S, N, d], one set per seed;
* ``predictions_<task>.npy``: pooled out-of-fold predictions [S, n] of the
  reported model (with ``--protocol paper`` those of the same run at its
  fixed budget, and the test-fold-selected ones in
  ``predictions_<task>_optimistic.npy``), and ``regions_<task>.npy``: the n
  region indices scored;
* ``metrics.json``: the config, the protocol label, per-seed and mean ± std
  MAE / RMSE / R2 of every model row, the paper's Table 1 rows, timings;
* ``errors_<task>.png``: the regions at their centroids coloured by the
  absolute error of the seed-mean prediction (Chicago only).

Every file is written atomically. One SREL run serves all tasks (the paper
tunes SREL per task; see ``ToptConfig``).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Callable

import numpy as np

from jaxurban.checkpoint import check_previous_results, save_npy_atomic, write_json_atomic
from jaxurban.data.errors import DataError, read_npy, require_file
from jaxurban.data.root import resolve_data_root, subdir
from jaxurban.provenance import software_versions
from jaxurban.eval import kfold
from jaxurban.training import changed_settings, rate_problems, seed_problems
from jaxurban.topt.prompt4re import (
  BASES,
  CONTEXTS,
  HEAD_INITS,
  PAPER_LEARNING_RATES,
  Prompt4REConfig,
  cross_validated_trajectory,
)

__all__ = [
  "PAPER_TABLE1",
  "SREL_ONLY_FIELDS",
  "SREL_SCHEDULES",
  "TASKS",
  "ToptConfig",
  "collapsed_seeds",
  "format_table",
  "train_and_evaluate",
]

TASKS = ("crime", "checkIn", "serviceCall")

# How the paper's figures were selected, printed beside them: the authors'
# code scores each fold at the epoch that is best on that fold's test rows.
PAPER_TABLE1_NOTE = (
  "paper Table 1 rows: as published; the authors' code picks each fold's epoch on its "
  "test fold (optimistic)"
)

# Table 1 of the ToPT paper (Chicago), (MAE, RMSE, R2) per task: the full
# model, its three ablations and the strongest baseline (FlexiReg).
PAPER_TABLE1 = {
  "ToPT": {"crime": (49.3, 62.7, 0.874), "checkIn": (424.6, 634.6, 0.986),
           "serviceCall": (95.6, 127.4, 0.874)},
  "w/o Prompt4RE": {"crime": (62.5, 82.4, 0.781), "checkIn": (753.7, 1419.4, 0.931),
                    "serviceCall": (124.5, 172.6, 0.768)},
  "w/o Task-relevant Prompt": {"crime": (52.2, 66.0, 0.858), "checkIn": (520.8, 911.5, 0.972),
                               "serviceCall": (105.3, 146.5, 0.833)},
  "w/o P-R Alignment": {"crime": (56.4, 77.8, 0.805), "checkIn": (679.7, 1315.1, 0.941),
                        "serviceCall": (111.9, 155.9, 0.811)},
  "FlexiReg": {"crime": (61.7, 85.1, 0.766), "checkIn": (922.0, 1775.0, 0.891),
               "serviceCall": (121.1, 178.2, 0.753)},
}  # fmt: skip


# SREL's default (epochs, learning rate) per city. Chicago: ToPT's crime
# setting (Sec. 3.1 of the paper), used for every task. New York: the paper
# has no setting; ToPT's 4000 epochs at lr 7e-4 on New York's raw trip counts
# left three of five seeds with one embedding for every region (the view
# encoders' outputs turn into their biases, the layer norms of the Graphormer
# layers remove the rest, and training never recovers; visible without labels
# as a jump of the mobility loss to its constant-embedding level), so New York
# takes HAFusion's defaults, the schedule its own authors used there.
SREL_SCHEDULES = {"Chi": (4000, 7e-4), "NY": (2000, 5e-4)}

# ToptConfig fields read only when SREL is trained: with loaded embeddings a
# changed value would change nothing but the run's label.
SREL_ONLY_FIELDS = (
  "spatial_bias",
  "centrality",
  "srel_epochs",
  "srel_learning_rate",
  "srel_layers",
  "spatial_lambda",
  "embedding_dim",
)
# Fields that only change Prompt4RE: without it (--no-prompt4re, or New York,
# which has no prompt vectors) a non-default value would label a run that is
# the plain ridge row.
PROMPT_ONLY_FIELDS = (
  "mllm",
  "task_prompt",
  "alignment",
  "protocol",
  "prompt_epochs",
  "prompt_learning_rate",
  "eval_every",
  "context",
  "value_basis",
  "head_init",
)


@dataclasses.dataclass(frozen=True)
class ToptConfig:
  """One ToPT experiment.

  Attributes:
    city: "Chi" or "NY". New York has no prompt vectors and no coordinates:
      SREL runs without the spatial prior and Prompt4RE is skipped.
    tasks: subset of ("crime", "checkIn", "serviceCall").
    mllm: "llama" or "qwen" prompt vectors.
    seeds: one SREL run and one Prompt4RE model per fold for each seed.
    protocol: "honest" (fixed epoch budget, final epoch), "validated" (per
      fold, the epoch with the best R2 on the next fold, which is then left
      out of that fold's training; the test fold is never looked at) or
      "paper" (per-fold best epoch chosen on the test fold; labelled
      optimistic).
    n_folds, fold_seed: k-fold split over regions (KFold-identical; the
      authors use 10 folds and seed 2024).
    prompt4re: False reports only the "w/o Prompt4RE" ridge row.
    task_prompt: False uses the LLaMA prompt vectors made without a task
      template ("w/o Task-relevant Prompt").
    alignment: False replaces the cross-attention by concatenation.
    spatial_bias, centrality: SREL's spatial priors.
    srel_epochs, srel_learning_rate: SREL's schedule; None takes the city's
      default (`SREL_SCHEDULES`): on Chicago the paper's crime setting (4000
      epochs, lr 7e-4), on New York, for which the paper has no setting,
      HAFusion's (2000 epochs, lr 5e-4).
    srel_layers, spatial_lambda, embedding_dim: SREL settings (defaults: the
      paper's crime settings, used for every task).
    prompts_dir: optional folder of prompt vectors written by
      ``experiments.extract_prompts`` (``vectors.npy`` + ``manifest.json``),
      used instead of the published ones: one task's output, or one
      subfolder per task (``<dir>/<task>/``); the manifest's task must match
      (``"none"`` without the task template) and its region ids must be
      ``"0"``…``"76"``, row i of the HAFusion Chicago arrays (what the chat
      layout of ``prompt_data.json`` gives).
    embeddings_path: optional [S', N, d] .npy of SREL embeddings (S' >=
      len(seeds), the first len(seeds) are used) instead of training SREL;
      the SREL-only fields (`SREL_ONLY_FIELDS`) must then keep their defaults.
    prompt_epochs: Prompt4RE epoch budget (paper: 3000), a multiple of
      eval_every.
    prompt_learning_rate: None = the paper's per-task rate.
    eval_every: epochs between recorded test-fold predictions.
    context, value_basis, head_init: see ``Prompt4REConfig``.
    ridge_alpha: penalty of the ridge rows and of the head initialisation.
    ridge_alphas: the penalties the tuned ridge row chooses among, inside
      each training part (`kfold.ridge_cv_predictions_tuned`).
    data_root: data folder (None: $JAXURBAN_DATA).
  """

  city: str = "Chi"
  tasks: tuple[str, ...] = TASKS
  mllm: str = "llama"
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  protocol: str = "honest"
  n_folds: int = kfold.DEFAULT_FOLDS
  fold_seed: int = 2024
  prompt4re: bool = True
  task_prompt: bool = True
  alignment: bool = True
  spatial_bias: bool = True
  centrality: bool = True
  srel_epochs: int | None = None
  srel_learning_rate: float | None = None
  srel_layers: int = 2
  spatial_lambda: float = 0.1
  embedding_dim: int = 144
  embeddings_path: str | None = None
  prompts_dir: str | None = None
  prompt_epochs: int = 3000
  prompt_learning_rate: float | None = None
  eval_every: int = 20
  context: str = "split"
  value_basis: str = "rowspace"
  head_init: str = "ridge"
  ridge_alpha: float = 1.0
  ridge_alphas: tuple[float, ...] = kfold.RIDGE_ALPHAS
  data_root: str | None = None

  def __post_init__(self):
    if self.city not in ("Chi", "NY"):
      raise ValueError(f"ToptConfig.city must be 'Chi' or 'NY', got {self.city!r}")
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown or not self.tasks:
      raise ValueError(f"ToptConfig.tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
    if self.mllm not in ("llama", "qwen"):
      raise ValueError(f"ToptConfig.mllm must be 'llama' or 'qwen', got {self.mllm!r}")
    if not self.task_prompt and self.mllm != "llama" and self.prompts_dir is None:
      raise ValueError("ToptConfig: prompt vectors without a task template exist only for llama")
    if self.prompts_dir is not None and self.mllm != "llama":
      raise ValueError(
        "ToptConfig.mllm chooses among the published prompt vectors; with prompts_dir "
        "(--prompts) the vectors come from that folder, whatever model made them: drop --mllm"
      )
    if self.prompts_dir is not None and not self.uses_prompts:
      raise ValueError(
        "ToptConfig.prompts_dir has no effect without Prompt4RE (--no-prompt4re, or New York)"
      )
    if not self.uses_prompts:
      self._refuse_changed(
        PROMPT_ONLY_FIELDS,
        "without Prompt4RE (--no-prompt4re, or New York, which has no prompt vectors): "
        "the run is the ridge row on the SREL embeddings",
      )
    if self.city == "NY":
      self._refuse_changed(
        ("spatial_bias", "centrality"),
        "on New York, which has no coordinates: SREL runs there without the spatial prior anyway",
      )
    kfold.protocol_label(self.protocol)
    if not self.seeds:
      raise ValueError("ToptConfig.seeds is empty")
    # Also with loaded embeddings, where SREL's own check does not run: each
    # seed still initialises its Prompt4RE models.
    for problem in seed_problems(self.seeds):
      raise ValueError(f"ToptConfig.{problem}")
    repeated = sorted({int(s) for s in self.seeds if self.seeds.count(s) > 1})
    if repeated:
      raise ValueError(f"ToptConfig.seeds repeat {repeated}")
    if self.srel_epochs is not None and self.srel_epochs < 1:
      raise ValueError(f"ToptConfig.srel_epochs must be >= 1, got {self.srel_epochs}")
    for problem in rate_problems(srel_learning_rate=self.srel_learning_rate):
      raise ValueError(f"ToptConfig.{problem}")
    if self.embeddings_path is not None:
      self._refuse_changed(
        SREL_ONLY_FIELDS,
        "with --embeddings (embeddings_path): SREL is not trained, its embeddings are loaded",
      )
    else:
      # The SREL settings, checked now rather than after the data and the
      # prompt vectors are read.
      _srel_config(self)
    self._check_evaluation()

  def _refuse_changed(self, names, why: str) -> None:
    """ValueError naming the first of `names` not at its default: it would change nothing."""
    for name, value, _ in changed_settings(self, names):
      raise ValueError(f"ToptConfig.{name}={value!r} has no effect {why}")

  def _check_evaluation(self):
    """The k-fold and Prompt4RE settings, checked now rather than after SREL has trained."""
    if self.n_folds < 2:
      raise ValueError(f"ToptConfig.n_folds must be >= 2, got {self.n_folds}")
    if self.protocol == "validated" and self.uses_prompts and self.n_folds < 3:
      raise ValueError(
        f"ToptConfig.n_folds must be >= 3 for the 'validated' protocol (each model's "
        f"validation fold is one of its training folds), got {self.n_folds}"
      )
    if not 0 <= self.fold_seed < 2**32:  # numpy's RandomState seeds the split
      raise ValueError(f"ToptConfig.fold_seed must be in [0, 2**32), got {self.fold_seed}")
    if self.eval_every < 1:
      raise ValueError(f"ToptConfig.eval_every must be >= 1, got {self.eval_every}")
    if self.prompt_epochs < 1 or self.prompt_epochs % self.eval_every:
      raise ValueError(
        f"ToptConfig.prompt_epochs must be a positive multiple of eval_every "
        f"({self.eval_every}), got {self.prompt_epochs}"
      )
    for problem in rate_problems(prompt_learning_rate=self.prompt_learning_rate):
      raise ValueError(f"ToptConfig.{problem}")
    if not self.ridge_alpha > 0:
      raise ValueError(f"ToptConfig.ridge_alpha must be > 0, got {self.ridge_alpha}")
    if not self.ridge_alphas or not all(a > 0 for a in self.ridge_alphas):
      raise ValueError(f"ToptConfig.ridge_alphas must be values > 0, got {self.ridge_alphas}")
    for name, allowed in (("context", CONTEXTS), ("value_basis", BASES), ("head_init", HEAD_INITS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"ToptConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    heads = Prompt4REConfig.n_heads
    if self.uses_prompts and self.alignment and self.embeddings_path is None:
      if self.embedding_dim % heads:
        raise ValueError(
          f"ToptConfig.embedding_dim must be divisible by Prompt4RE's {heads} attention "
          f"heads, got {self.embedding_dim}"
        )

  def srel_schedule(self) -> tuple[int, float]:
    """(epochs, learning rate) of SREL: the set fields, else the city's default."""
    epochs, learning_rate = SREL_SCHEDULES[self.city]
    return (
      epochs if self.srel_epochs is None else self.srel_epochs,
      learning_rate if self.srel_learning_rate is None else self.srel_learning_rate,
    )

  @property
  def uses_prompts(self) -> bool:
    """Prompt4RE runs only where prompt vectors exist (Chicago)."""
    return self.prompt4re and self.city == "Chi"

  def model_name(self) -> str:
    """The Table 1 row this configuration reproduces."""
    parts = []
    if not self.uses_prompts:
      parts.append("w/o Prompt4RE")
    else:
      if not self.task_prompt:
        parts.append("w/o Task-relevant Prompt")
      if not self.alignment:
        parts.append("w/o P-R Alignment")
    if not self.spatial_bias:
      parts.append("w/o spatial bias")
    if not self.centrality:
      parts.append("w/o centrality")
    name = "ToPT" if not parts else ", ".join(parts)
    if self.uses_prompts and self.prompts_dir is None and self.mllm != "llama":
      name += f" ({self.mllm} prompt vectors)"
    return name

  def prompt_config(self, task: str) -> Prompt4REConfig:
    lr = self.prompt_learning_rate
    return Prompt4REConfig(
      epochs=self.prompt_epochs,
      learning_rate=PAPER_LEARNING_RATES[task] if lr is None else lr,
      alignment=self.alignment,
      context=self.context,
      value_basis=self.value_basis,
      head_init=self.head_init,
      ridge_alpha=self.ridge_alpha,
      eval_every=self.eval_every,
    )


def _check_head_split(width: int, file, column: str, what: str) -> None:
  """DataError unless Prompt4RE's attention heads split `width` evenly."""
  heads = Prompt4REConfig.n_heads
  if width % heads:
    raise DataError(
      file, f"{what} {width} is not divisible by Prompt4RE's {heads} attention heads", column=column
    )


def _prompt_vectors(config: ToptConfig, task: str, n_regions: int) -> tuple[np.ndarray, str, dict]:
  """[N, D] prompt vectors for `task` ("none": no task template), where they
  came from, and what their manifest says of them (`_prompt_provenance`)."""
  from jaxurban.prompts import (
    MANIFEST_NAME,
    chicago_manifest_path,
    load_chicago_prompts,
    load_prompt_vectors,
    read_manifest,
  )

  if config.prompts_dir is None:
    vectors = load_chicago_prompts(config.data_root, config.mllm, task)
    manifest_path = chicago_manifest_path(config.mllm, task)
    provenance = _prompt_provenance(read_manifest(manifest_path), manifest_path)
    return vectors, f"published {config.mllm}", provenance
  folder = pathlib.Path(config.prompts_dir)
  if not folder.is_dir():
    raise DataError(folder, "no such folder", column="prompts_dir")
  if (folder / task / MANIFEST_NAME).is_file():
    folder = folder / task
  elif not (folder / MANIFEST_NAME).is_file():
    raise DataError(
      folder / task / MANIFEST_NAME,
      f"no prompt vectors for task {task!r}: --prompts takes one task's output folder "
      f"(with {MANIFEST_NAME}) or a folder with one subfolder per task",
      column="prompts_dir",
    )
  vectors, manifest = load_prompt_vectors(folder, [str(i) for i in range(n_regions)], task=task)
  if config.alignment:
    # Checked here, before SREL trains, rather than when Prompt4RE first runs.
    _check_head_split(vectors.shape[1], folder / MANIFEST_NAME, "prompts_dir", "prompt width")
  source = f"{manifest['model'].get('name', '?')} ({folder})"
  return vectors, source, _prompt_provenance(manifest, folder / MANIFEST_NAME)


# What metrics.json keeps of a prompt-vector manifest: enough to tell two
# extractions apart (array hash, template, model record), without the
# region list or the template's full text.
_PROVENANCE_FIELDS = ("sha256", "shape", "dtype", "task", "pooling", "model", "created", "source")


def _prompt_provenance(manifest: dict, manifest_path: pathlib.Path) -> dict:
  """The manifest fields that identify the prompt vectors a task used."""
  kept = {field: manifest[field] for field in _PROVENANCE_FIELDS if field in manifest}
  template = manifest["template"]
  kept["template"] = {"version": template["version"], "sha256": template["sha256"]}
  return {"manifest": str(manifest_path), **kept}


def _srel_config(config: ToptConfig):
  """The SRELConfig this run trains with; ValueError naming a bad setting."""
  from jaxurban.topt.srel_train import SRELConfig

  spatial = config.city == "Chi"
  # HAFusion's per-city architecture (heads, layers, widths), then this run's settings.
  epochs, learning_rate = config.srel_schedule()
  return dataclasses.replace(
    SRELConfig.for_city(config.city),
    epochs=epochs,
    embedding_dim=config.embedding_dim,
    learning_rate=learning_rate,
    n_layers=config.srel_layers,
    spatial_lambda=config.spatial_lambda,
    spatial_bias=config.spatial_bias and spatial,
    centrality=config.centrality and spatial,
    seeds=tuple(config.seeds),
  )


def _srel_embeddings(
  config: ToptConfig, views, workdir, log, before_output: Callable[[], None]
) -> tuple[np.ndarray, str]:
  """The embeddings (loaded and checked, or trained) and where they came
  from; ``before_output`` runs once the inputs are checked, before SREL
  writes anything."""
  n = views.n_regions
  if config.embeddings_path is not None:
    path = pathlib.Path(config.embeddings_path)
    require_file(path, column="embeddings_path")
    emb = read_npy(path, column="embeddings_path", shown=path)
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
      raise DataError(path, f"dtype {emb.dtype}, expected real numbers", column="embeddings_path")
    if emb.ndim != 3 or emb.shape[1] != n or emb.shape[2] == 0:
      raise DataError(
        path, f"shape {emb.shape}, expected [seeds, {n} regions, d >= 1]", column="embeddings_path"
      )
    if emb.shape[0] < len(config.seeds):
      raise DataError(
        path,
        f"holds {emb.shape[0]} seeds' embeddings, fewer than the {len(config.seeds)} seeds asked "
        f"for; pass --seeds {emb.shape[0]} (or fewer)",
        column="embeddings_path",
      )
    if config.uses_prompts and config.alignment:
      _check_head_split(emb.shape[2], path, "embeddings_path", "width")
    stored_seeds = emb.shape[0]
    emb = emb[: len(config.seeds)].astype(np.float32)
    bad = ~np.isfinite(emb)
    if bad.any():
      seed, region, _ = np.argwhere(bad)[0]
      raise DataError(
        path,
        f"{int(bad.sum())} non-finite (NaN/inf) values in the first {len(config.seeds)} "
        f"seeds (first at seed {seed}, region {region})",
        column="embeddings_path",
      )
    log(f"SREL embeddings loaded from {path} (first {len(config.seeds)} of {stored_seeds})")
    before_output()
    return emb, f"loaded from {path}"
  from jaxurban.topt.srel_train import train_srel

  before_output()

  srel_config = _srel_config(config)
  log(
    f"SREL: {srel_config.epochs} epochs, lr {srel_config.learning_rate:g}, "
    f"{len(config.seeds)} seeds (vmapped)"
  )
  emb = train_srel(srel_config, views, config.seeds, workdir=str(workdir / "srel"), progress=True)
  return np.asarray(emb, np.float32), f"trained: {dataclasses.asdict(srel_config)}"


def collapsed_seeds(emb: np.ndarray, rtol: float = 1e-4) -> list[int]:
  """Seeds whose embeddings are the same for every region ([S, N, d] input).

  A seed counts as collapsed when every dimension's spread over regions is
  below `rtol` times the embeddings' mean magnitude: a ridge probe on it can
  only predict the mean. Long SREL runs on New York's raw trip counts end
  like this for some seeds (see BUILD_NOTES.md).
  """
  emb = np.asarray(emb, np.float64)
  spread = emb.std(axis=1).max(axis=-1)
  scale = np.abs(emb).mean(axis=(1, 2))
  return [int(s) for s in np.flatnonzero(spread <= rtol * np.maximum(scale, 1e-30))]


def _row(summary: dict) -> tuple[float, float, float]:
  return tuple(summary[m]["mean"] for m in kfold.METRICS)


def format_table(results: dict, protocol_text: str) -> str:
  """Mean ± std per task, beside the paper's Table 1 rows for Chicago."""
  city = results["config"]["city"]
  lines = [
    f"{city} single-city results (mean ± sample std, ddof=1, over seeds), "
    f"protocol of the reported model: {protocol_text}"
  ]
  names = [n for e in results["tasks"].values() for n in e["models"]]
  width = max([len(n) for n in names] + [len("paper Table 1: w/o Task-relevant Prompt")]) + 2
  lines.append(f"{'model':<{width}} {'task':<12} {'MAE':>18} {'RMSE':>20} {'R2':>16}")
  for task, entry in results["tasks"].items():
    for name, summary in entry["models"].items():
      cells = [_summary_text(summary[m]) for m in kfold.METRICS]
      lines.append(f"{name:<{width}} {task:<12} {cells[0]:>18} {cells[1]:>20} {cells[2]:>16}")
    # Table 1 of the paper is for Chicago only.
    for name, rows in PAPER_TABLE1.items() if city == "Chi" else ():
      mae, rmse, r2 = rows[task]
      lines.append(
        f"{'paper Table 1: ' + name:<{width}} {task:<12} {mae:>18.4g} {rmse:>20.5g} {r2:>16.3f}"
      )
  if city == "Chi":
    lines.append(f"({PAPER_TABLE1_NOTE})")
  return "\n".join(lines)


RIDGE_TUNED_NAME = "w/o Prompt4RE (ridge on SREL embeddings, alpha chosen in training folds)"


def _summary_text(summary: dict) -> str:
  """`mean_std_text` of a `kfold.summarise` entry."""
  return mean_std_text(summary["mean"], summary["std"], len(summary["per_seed"]))


def mean_std_text(mean: float, std: float, seeds: int | None = None) -> str:
  """``mean ± std`` in fixed-point with the same decimals on both sides,
  enough for two significant digits of the spread (1844 ± 410, 172.1 ± 1.2,
  0.559 ± 0.076); where the spread is 0, three significant digits of the
  mean. One seed has no spread to show: ``0.559 (1 seed)``."""
  if seeds == 1:
    decimals = 2 - math.floor(math.log10(abs(mean))) if mean and math.isfinite(mean) else 1
    return f"{mean:.{min(6, max(0, decimals))}f} (1 seed)"
  if not (math.isfinite(mean) and math.isfinite(std)):
    return f"{mean} ± {std}"
  if std > 0:
    decimals = 1 - math.floor(math.log10(std))
  else:
    decimals = 2 - math.floor(math.log10(abs(mean))) if mean else 1
  decimals = min(6, max(0, decimals))
  return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


# Written at the start of a run, before any other output.
RUN_CONFIG_FILE = "run_config.json"


def train_and_evaluate(
  config: ToptConfig, workdir: str | pathlib.Path, log: Callable[[str], None] = print
) -> dict:
  """Runs the experiment of ``config``; returns the metrics dict it wrote."""
  from jaxurban.data.hafusion import LABEL_FILES, load_city_views

  workdir = pathlib.Path(workdir)
  # Results of another configuration (a task, an ablation) are not replaced
  # while their predictions and maps would stay beside the new ones.
  check_previous_results(workdir / "metrics.json", dataclasses.asdict(config), ("data_root",))
  # A run killed before its first metrics.json (SREL and Prompt4RE take
  # minutes) leaves embeddings, SREL's folder and checkpoints that nothing
  # else describes: its config is written before them (below), so that a
  # run of other settings is refused there too.
  check_previous_results(workdir / RUN_CONFIG_FILE, dataclasses.asdict(config), ("data_root",))
  workdir.mkdir(parents=True, exist_ok=True)
  label = kfold.protocol_label(config.protocol)
  notes = []
  # The SREL schedule this run trains with (None when embeddings are loaded).
  schedule = None if config.embeddings_path else config.srel_schedule()
  if config.city == "NY":
    notes.append(
      "New York: no coordinates and no prompt vectors, so SREL is trained without the "
      "spatial prior (no distance bias, no centrality) and Prompt4RE is not run; only the "
      "'w/o Prompt4RE' ridge row is reported."
    )
    if schedule == SREL_SCHEDULES["NY"]:
      notes.append(
        "New York: the ToPT paper has no SREL setting for it; SREL runs HAFusion's schedule "
        f"({schedule[0]} epochs, lr {schedule[1]:g})."
      )
  elif not config.prompt4re:
    notes.append("Prompt4RE disabled: only the 'w/o Prompt4RE' ridge row is reported.")
  for note in notes:
    log("NOTE: " + note)
  log(f"protocol: {label}")

  t0 = time.perf_counter()
  views = load_city_views(config.city, config.data_root)
  # Each fold needs a region: checked here, not after SREL has trained.
  for task in config.tasks:
    scored = int(kfold.keep_mask(task, np.asarray(views.labels[task])).sum())
    if config.n_folds > scored:
      raise DataError(
        subdir(resolve_data_root(config.data_root), "hafusion", config.city) / LABEL_FILES[task],
        f"ToptConfig.n_folds={config.n_folds} exceeds the {scored} regions scored for {task}",
      )
  # The prompt vectors too: a wrong --prompts folder fails now, not after SREL.
  prompt_vectors = {}
  if config.uses_prompts:
    for task in config.tasks:
      prompt_task = task if config.task_prompt else "none"
      prompt_vectors[task] = _prompt_vectors(config, prompt_task, views.n_regions)
  # After the input checks (those above, and of a given embeddings file),
  # which write nothing: a run they stop leaves no config behind to refuse
  # the corrected one.
  srel_started = time.perf_counter()  # SREL's time, without the loading above
  emb, srel_source = _srel_embeddings(
    config,
    views,
    workdir,
    log,
    before_output=lambda: write_json_atomic(
      workdir / RUN_CONFIG_FILE, {"config": dataclasses.asdict(config)}
    ),
  )
  timings = {"srel_s": time.perf_counter() - srel_started}
  save_npy_atomic(workdir / "embeddings.npy", emb)
  collapsed = collapsed_seeds(emb)
  if collapsed:
    seeds = [config.seeds[i] for i in collapsed]
    notes.append(
      f"SREL seeds {seeds} collapsed: their embeddings are the same for every region, so "
      "their ridge rows predict the mean (R2 about 0); the means over seeds include them."
    )
    log("WARNING: " + notes[-1])

  results = {
    "config": dataclasses.asdict(config),
    "data_root": str(resolve_data_root(config.data_root)),
    "software": software_versions(),
    "model": config.model_name(),
    "protocol": config.protocol,
    "protocol_label": label,
    "notes": notes,
    "srel_embeddings": srel_source,
    "srel_schedule": None if schedule is None else dict(zip(("epochs", "learning_rate"), schedule)),
    "metric_definition": (
      "pooled out-of-fold predictions (one per region), negatives clipped to 0, then MAE, "
      "RMSE, R2 over the scored regions; mean and sample std (ddof=1) over seeds"
    ),
    "paper_table1": {k: {t: dict(zip(kfold.METRICS, v)) for t, v in r.items()}
                     for k, r in PAPER_TABLE1.items()},
    "paper_table1_note": PAPER_TABLE1_NOTE,
    "timings": timings,
    # metrics.json is rewritten after each task: a run stopped part-way
    # says so here, and the same command finishes it.
    "finished": False,
    "tasks_to_do": list(config.tasks),
    "tasks": {},
  }  # fmt: skip

  for task in config.tasks:
    t_task = time.perf_counter()
    labels = np.asarray(views.labels[task], np.float64)
    keep = kfold.keep_mask(task, labels)
    regions = np.flatnonzero(keep)
    y = labels[keep]
    e = emb[:, keep]
    fold_of = kfold.fold_assignment(len(y), config.n_folds, config.fold_seed)
    masks = kfold.fold_masks(fold_of, config.n_folds)
    log(f"[{task}] {len(y)} regions scored ({int((~keep).sum())} zero-label regions dropped)")

    models = {}
    ridge_pred = kfold.ridge_cv_predictions(e, y, fold_of, config.n_folds, config.ridge_alpha)
    ridge_name = "w/o Prompt4RE (ridge on SREL embeddings)"
    models[ridge_name] = kfold.summarise(kfold.score_pooled(ridge_pred, y))
    # The same probe with its penalty chosen inside each training part: 144
    # dimensions for 77 regions may want more than the fixed alpha gives.
    tuned_pred, tuned_alpha = kfold.ridge_cv_predictions_tuned(
      e, y, fold_of, config.n_folds, config.ridge_alphas
    )
    models[RIDGE_TUNED_NAME] = {
      **kfold.summarise(kfold.score_pooled(tuned_pred, y)),
      "alpha_chosen": tuned_alpha.tolist(),
    }
    reported, reported_name = ridge_pred, ridge_name
    # The predictions each file holds; only `--protocol paper` has two.
    prediction_files = {f"predictions_{task}.npy": ridge_pred}
    entry = {"n_regions": int(len(y)), "dropped_regions": np.flatnonzero(~keep).tolist()}

    if config.uses_prompts:
      prompt_task = task if config.task_prompt else "none"
      prompts, source, entry["prompt_vectors"] = prompt_vectors[task]
      prompts = prompts[keep]
      pcfg = config.prompt_config(task)
      log(
        f"[{task}] Prompt4RE: {source} prompts ({prompt_task}, width {prompts.shape[1]}), "
        f"{pcfg.epochs} epochs, lr {pcfg.learning_rate}, {len(config.seeds)} seeds x "
        f"{config.n_folds} folds vmapped"
      )
      t_p = time.perf_counter()
      # "validated" trains each fold's model without its validation fold; the
      # other protocols train on all F - 1 training folds.
      val_masks = kfold.validation_masks(masks) if config.protocol == "validated" else None
      run = cross_validated_trajectory(
        pcfg,
        e,
        prompts,
        y.astype(np.float32),
        fold_of,
        config.n_folds,
        config.seeds,
        log=log,
        validation_masks=val_masks,
        # A killed run resumes the task where it stopped; finished tasks come
        # back from their last checkpoint without training.
        workdir=workdir,
        checkpoint_name=f"prompt4re_{task}",
        # Both figures count from here: the one with the earlier runs is
        # then never below this run's own.
        started_at=t_p,
      )
      entry["prompt4re_s"] = time.perf_counter() - t_p
      # With the earlier runs of a resumed or finished task (None where
      # they predate the record).
      entry["prompt4re_s_including_earlier_runs"] = run.seconds_including_earlier_runs
      pooled = {}
      protocols = ("validated",) if config.protocol == "validated" else ("honest", config.protocol)
      for protocol in protocols:
        per_fold = kfold.select_folds(
          run.predictions,
          y.astype(np.float32),
          masks,
          protocol,
          validation=(run.validation, val_masks) if protocol == "validated" else None,
        )
        pooled[protocol] = np.asarray(kfold.pool_folds(per_fold, masks))
      name = f"{config.model_name()} [{label}]"
      models[name] = kfold.summarise(kfold.score_pooled(pooled[config.protocol], y))
      if config.protocol == "paper":
        # The same training run scored at its fixed budget, for comparison.
        honest = f"{config.model_name()} [{kfold.protocol_label('honest')}]"
        models[honest] = kfold.summarise(kfold.score_pooled(pooled["honest"], y))
      reported, reported_name = pooled[config.protocol], name
      prediction_files = {f"predictions_{task}.npy": reported}
      if config.protocol == "paper":
        # The file name carries the label; the plain name keeps the
        # fixed-budget predictions of the same run.
        prediction_files = {
          f"predictions_{task}.npy": pooled["honest"],
          f"predictions_{task}_optimistic.npy": reported,
        }
      entry["prompt_config"] = dataclasses.asdict(pcfg)

    entry["models"] = models
    entry["reported_model"] = reported_name
    for file_name, predictions in prediction_files.items():
      save_npy_atomic(workdir / file_name, predictions.astype(np.float32))
    save_npy_atomic(workdir / f"regions_{task}.npy", regions)
    if views.centroids is not None:
      from jaxurban.viz.region_map import plot_region_values

      error = np.full(labels.shape, np.nan)
      error[keep] = np.abs(np.maximum(reported.mean(axis=0), 0) - y)
      png = plot_region_values(
        views.centroids,
        error,
        workdir / f"errors_{task}.png",
        title=f"{config.city} {task}: |error| of the seed-mean prediction\n{reported_name}",
      )
      entry["map"] = png.name
    else:
      entry["map"] = None
      log(f"[{task}] no centroids for {config.city}: no map drawn")
    timings[f"{task}_s"] = time.perf_counter() - t_task
    results["tasks"][task] = entry
    results["tasks_to_do"].remove(task)
    write_json_atomic(workdir / "metrics.json", results)
    for name, summary in models.items():
      log(
        f"[{task}] {name}: " + ", ".join(f"{m} {_summary_text(summary[m])}" for m in kfold.METRICS)
      )

  timings["total_s"] = time.perf_counter() - t0
  results["finished"] = True
  write_json_atomic(workdir / "metrics.json", results)
  log(format_table(results, label))
  return results
