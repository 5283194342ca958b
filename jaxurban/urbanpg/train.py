"""Training, evaluation and the three learning paradigms of UrbanPG on Los-loop.

* ``full``: one model on all detectors, chronological 6:2:2 split.
* ``fewshot`` (eq. 8): detectors are split by longitude; the backbone is
  pre-trained on the western half, then only the prompts are fine-tuned,
  backbone frozen, on the first `fewshot_fraction` of the eastern half's
  training period. The same model trained from scratch on the same data is
  the comparison.
* ``continual`` (eqs. 9-10): the week is cut into `len(continual_stages)`
  consecutive periods, each split 6:2:2; the node set grows outwards from the
  network's centroid (stage tau keeps the nearest ``continual_stages[tau]``
  share of detectors). Stage 1 trains everything; later stages freeze the
  backbone and the time prompts, append fresh rows to the spatial embedding
  for the new detectors and train only the spatial prompt (E_s, E_d).

One jitted train step (state donated) advances one batch; the batch is split
over all devices on the `sharding.BATCH` axis with the state replicated, so
the result equals the single-device one. Early stopping keeps the parameters
with the best validation MAE. Orbax checkpoints under
``workdir/checkpoints/<stage>_seed<k>`` (with the per-epoch history) let a
killed run resume to the result of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxurban import interrupt, sharding
from jaxurban.checkpoint import (
  Checkpointer,
  check_previous_results,
  remove_earlier_outputs,
  write_json_atomic,
)
from jaxurban.data.root import resolve_data_root
from jaxurban.provenance import software_versions
from jaxurban.digest import arrays_sha256
from jaxurban.data.errors import DataError
from jaxurban.data.traffic import (
  Scaler,
  TrafficData,
  Windows,
  chronological_bounds,
  ratios_are_a_split,
  load_los_loop,
  make_windows,
)
from jaxurban.training import (
  finite_per_seed,
  rate_problems,
  seed_range_problems,
  weight_problems,
)
from jaxurban.urbanpg.baselines import HistoricalAverage, PerNodeLinear, last_value
from jaxurban.urbanpg.model import ATTENTIONS, UrbanPG

PARADIGMS = ("full", "fewshot", "continual")
REPORT_HORIZONS = (3, 6, 12)


@dataclasses.dataclass(frozen=True)
class UrbanPGConfig:
  """One UrbanPG experiment.

  Attributes:
    data: data set name (only "los-loop").
    data_root: data folder; None reads $JAXURBAN_DATA.
    paradigm: "full", "fewshot" or "continual" (module docstring).
    seeds, first_seed: seeds first_seed .. first_seed + seeds - 1, run in turn.
    epochs: maximum epochs of every training stage.
    patience: epochs without a better validation MAE before stopping.
    batch_size: samples per step (any size: with shard_batch it is split
      over as many devices as divide it).
    learning_rate, weight_decay, grad_clip: AdamW and global-norm clipping.
    finetune_learning_rate: AdamW's rate when only prompts are trained.
    t_in, t_out: input and forecast steps.
    features, heads, layers, mlp_ratio: backbone width d, attention heads,
      blocks, MLP expansion.
    p, q, noise_std: random perturbation of eq. 4.
    attention: "linear" (eq. 6 in O(N d^2)) or "softmax" (N x N).
    last_value_skip: add each node's last input to its forecasts (not in the
      paper; `jaxurban.urbanpg.model.Backbone`).
    split: chronological train / validation / test ratios.
    fewshot_fraction: share of the target's training period used in few-shot.
    continual_stages: growing node shares, one per period (last must be 1).
    checkpoint_every: epochs between checkpoints (and always at the end).
    shard_batch: split every batch over the devices (as many as divide
      ``batch_size`` evenly: `batch_devices`).
    plot: write predictions.png.
  """

  data: str = "los-loop"
  data_root: str | None = None
  paradigm: str = "full"
  seeds: int = 1
  first_seed: int = 0
  epochs: int = 100
  patience: int = 10
  batch_size: int = 64
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  grad_clip: float = 5.0
  finetune_learning_rate: float = 5e-3
  t_in: int = 12
  t_out: int = 12
  features: int = 64
  heads: int = 4
  layers: int = 1
  mlp_ratio: int = 2
  p: float = 0.1
  q: float = 0.5
  noise_std: float = 0.1
  attention: str = "linear"
  last_value_skip: bool = False
  split: tuple[float, float, float] = (0.6, 0.2, 0.2)
  fewshot_fraction: float = 0.1
  continual_stages: tuple[float, ...] = (0.7, 0.85, 1.0)
  checkpoint_every: int = 5
  shard_batch: bool = True
  plot: bool = True

  def __post_init__(self):
    problems = []
    if self.data != "los-loop":
      problems.append(f"data {self.data!r} is not 'los-loop'")
    if self.paradigm not in PARADIGMS:
      problems.append(f"paradigm {self.paradigm!r} not in {PARADIGMS}")
    if self.attention not in ATTENTIONS:
      problems.append(f"attention {self.attention!r} not in {ATTENTIONS}")
    counts = (
      "seeds",
      "epochs",
      "patience",
      "batch_size",
      "t_in",
      "t_out",
      "features",
      "heads",
      "layers",
      "mlp_ratio",
      "checkpoint_every",
    )
    for name in counts:
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.t_out < max(REPORT_HORIZONS):
      problems.append(
        f"t_out must be >= {max(REPORT_HORIZONS)} (the reported horizons are"
        f" {REPORT_HORIZONS}), got {self.t_out}"
      )
    if self.heads >= 1 and self.features % self.heads:
      problems.append(f"features {self.features} must be divisible by heads {self.heads}")
    if not 0 < self.fewshot_fraction <= 1:
      problems.append(f"fewshot_fraction must be in (0, 1], got {self.fewshot_fraction}")
    split = tuple(self.split)
    if len(split) != 3 or not ratios_are_a_split(split):
      problems.append(
        f"split must be three positive ratios (train, validation, test) summing to 1, got {split}"
      )
    stages = self.continual_stages
    if (
      not stages
      or not stages[0] > 0
      or stages[-1] != 1.0
      or any(b <= a for a, b in zip(stages, stages[1:]))
    ):
      problems.append(f"continual_stages must increase from above 0 to 1.0, got {stages}")
    if not (0 <= self.p < 1 and 0 <= self.q < 1):
      problems.append(f"p and q must lie in [0, 1), got p={self.p}, q={self.q}")
    problems.extend(
      rate_problems(
        learning_rate=self.learning_rate, finetune_learning_rate=self.finetune_learning_rate
      )
    )
    problems.extend(rate_problems(grad_clip=self.grad_clip))
    problems.extend(weight_problems(weight_decay=self.weight_decay, noise_std=self.noise_std))
    problems.extend(seed_range_problems(self.first_seed, self.seeds, 2**31))
    if problems:
      raise ValueError("UrbanPGConfig: " + "; ".join(problems))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Raised when a change of the model's initialisation or computation makes an
# older checkpoint another model; such checkpoints are refused, not resumed.
# 2: E_dow starts at zero.
# 3: E_tod held as a shared row E_t plus per-slot offsets that start at zero;
#    keys folded from the seed per use.
MODEL_REVISION = 3

# Config keys that may change between a run and its resumption. Checkpoints
# are per seed and a seed's training depends only on its own number, so which
# seeds a run covers (first_seed, seeds) does not matter to any one of them.
_RESUMABLE_KEYS = ("data_root", "checkpoint_every", "shard_batch", "plot", "seeds", "first_seed")


@dataclasses.dataclass(frozen=True)
class Task:
  """One forecasting problem: a node set, its scaler and its three window sets."""

  name: str
  data: TrafficData
  scaler: Scaler
  train: Windows
  val: Windows
  test: Windows
  train_steps: tuple[int, int]


def _log(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------- tasks


def make_task(
  name: str,
  data: TrafficData,
  config: UrbanPGConfig,
  train_fraction: float = 1.0,
  first_step: int = 0,
) -> Task:
  """Splits `data` 6:2:2 in time; keeps the first `train_fraction` of the training period.

  The scaler is fitted on the (kept) training readings only. `first_step`:
  where `data` starts in the series `los_speed.csv` holds (a continual
  stage's period), so that the messages name the file's steps.
  """

  def steps(lo: int, hi: int) -> str:
    return f"[{lo + first_step}, {hi + first_step})"

  window = config.t_in + config.t_out
  (a, b), (c, d), (e, f) = chronological_bounds(data.n_steps, config.split)
  for part, (lo, hi) in (("training", (a, b)), ("validation", (c, d)), ("test", (e, f))):
    if hi - lo < window:
      need = _shortest_series(config.split, window)
      raise DataError(
        "los_speed.csv",
        f"{name}: the {part} part holds steps {steps(lo, hi)}, {hi - lo} steps, fewer than one "
        f"{config.t_in} + {config.t_out}-step window; the {data.n_steps} steps {name} splits "
        f"would need to be at least {need} for the {config.split} split",
      )
  b = a + max(int(round((b - a) * train_fraction)), window)
  if not data.mask[a:b].any():
    raise DataError(
      "los_speed.csv", f"{name}: no observed reading in training steps {steps(a, b)} to scale by"
    )
  for part, (lo, hi) in (("validation", (c, d)), ("test", (e, f))):
    # Early stopping and the scores would otherwise compare NaN with NaN.
    if not data.mask[lo + config.t_in : hi].any():
      raise DataError(
        "los_speed.csv", f"{name}: no observed target in the {part} steps {steps(lo, hi)}"
      )
  scaler = Scaler.fit(data.speed[a:b], data.mask[a:b])
  windows = [
    make_windows(data, scaler, lo, hi, config.t_in, config.t_out)
    for lo, hi in ((a, b), (c, d), (e, f))
  ]
  return Task(name, data, scaler, *windows, train_steps=(a, b))


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _trained_values(task: Task, trained_on: Sequence[Task] | None, field: str) -> np.ndarray:
  """The distinct ``field`` values (``day_of_week`` or ``time_of_day``) of the
  training windows of ``trained_on`` (default: `task` alone)."""
  trained_on = (task,) if trained_on is None else trained_on
  return np.unique(np.concatenate([getattr(t.train, field) for t in trained_on]))


def unseen_days(task: Task, trained_on: Sequence[Task] | None = None) -> dict[str, list[str]]:
  """{"val" / "test": day names} of `task`'s evaluation windows whose day of
  the week (eq. 3's E_dow index) no window that trained the time tables has.

  ``trained_on``: the tasks whose training windows updated E_dow (default:
  `task` alone; a continual stage after the first inherits stage 1's frozen
  tables, a prompts-only few-shot target the source's tables and its own
  windows). Los-loop covers one week, so a chronological split always
  evaluates on days that training never saw.
  """
  seen = set(_trained_values(task, trained_on, "day_of_week").tolist())
  unseen = {}
  for part in ("val", "test"):
    days = sorted(set(np.unique(getattr(task, part).day_of_week).tolist()) - seen)
    if days:
      unseen[part] = [_DAY_NAMES[d] for d in days]
  return unseen


def unseen_slots(task: Task, trained_on: Sequence[Task] | None = None) -> dict[str, float]:
  """{"val" / "test": share of `task`'s evaluation windows} whose time-of-day
  slot (eq. 3's E_tod index) no window that trained the time tables has
  (``trained_on`` as in `unseen_days`).

  A few-shot target trained from scratch on the first hours of its period
  is scored on slots of the day it never saw.
  """
  seen = _trained_values(task, trained_on, "time_of_day")
  unseen = {}
  for part in ("val", "test"):
    share = float(np.mean(~np.isin(getattr(task, part).time_of_day, seen)))
    if share > 0:
      unseen[part] = share
  return unseen


def report_unseen(task: Task, arms: dict[str, Sequence[Task]]) -> dict[str, dict]:
  """Logs, per arm, the weekdays and time slots of `task`'s evaluation windows
  that the arm's time tables never trained on, and returns them:
  ``{"days": {arm: unseen_days}, "time_of_day": {arm: unseen_slots}}``.

  ``arms`` maps each arm's name to the tasks whose training windows updated
  its E_dow and E_tod.
  """
  report = {"days": {}, "time_of_day": {}}
  for arm, trained_on in arms.items():
    days = report["days"][arm] = unseen_days(task, trained_on)
    slots = report["time_of_day"][arm] = unseen_slots(task, trained_on)
    day_parts = [f"{part} windows on {'/'.join(d)}" for part, d in days.items()]
    slot_parts = [f"{share:.0%} of the {part} windows" for part, share in slots.items()]
    unseen_by = "that no window training its time tables shows"
    for parts, template in (
      (day_parts, "the {} fall on days of the week {}; their E_dow rows keep their zero "
       "start and add nothing to P_t"),
      (slot_parts, "{} end at times of day {}; their E_tod offsets keep their zero start, "
       "so P_t reads the shared E_t there"),
    ):  # fmt: skip
      if parts:
        _log(f"{task.name}, {arm}: " + template.format(" and ".join(parts), unseen_by))
  return report


def _shortest_series(split: tuple[float, ...], window: int) -> int:
  """The fewest steps whose chronological `split` gives every part one window."""
  n_steps = window
  while min(hi - lo for lo, hi in chronological_bounds(n_steps, split)) < window:
    n_steps += 1
  return n_steps


def fewshot_nodes(data: TrafficData) -> tuple[np.ndarray, np.ndarray]:
  """Source (western half by longitude) and target (eastern half) detector indices."""
  if data.n_nodes < 2:
    # Said here, not as a scaler failure on an empty western half further on.
    raise DataError(
      "los_speed.csv",
      f"{data.n_nodes} detector; the fewshot paradigm splits the detectors into a western "
      "and an eastern half and needs at least 2",
      column="header",
    )
  order = np.argsort(data.coords[:, 1], kind="stable")
  half = data.n_nodes // 2
  return np.sort(order[:half]), np.sort(order[half:])


def continual_tasks(data: TrafficData, config: UrbanPGConfig) -> list[Task]:
  """One task per period; stage tau's nodes are a prefix of the centroid-distance order.

  The prefix order puts every earlier stage's nodes first, so the spatial
  embedding of stage tau is that of stage tau - 1 with rows appended (eq. 9).
  """
  # In raw degrees (longitude not scaled by cos(latitude)): the order every
  # reported continual figure was made with.
  distance = np.linalg.norm(data.coords - data.coords.mean(0), axis=1)
  order = np.argsort(distance, kind="stable")
  edges = np.linspace(0, data.n_steps, len(config.continual_stages) + 1).round().astype(int)
  tasks = []
  for tau, share in enumerate(config.continual_stages):
    nodes = order[: int(round(share * data.n_nodes))]
    if nodes.size == 0:
      # Said here, not as a scaler failure on the data file further on.
      raise ValueError(
        f"UrbanPGConfig: continual_stages[{tau}] = {share} keeps none of the "
        f"{data.n_nodes} detectors"
      )
    period = data.select(nodes, slice(edges[tau], edges[tau + 1]))
    tasks.append(make_task(f"stage{tau + 1}", period, config, first_step=int(edges[tau])))
  return tasks


# ----------------------------------------------------------------------------- metrics


def masked_metrics(pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> dict:
  """MAE, RMSE and MAPE (%) per horizon and averaged, over observed targets only.

  Arrays are [S, T_out, N]. Zero targets count as missing for every metric
  (the loader reads a zero speed as a missing reading). The average pools
  every observed (sample, horizon, node) entry: for MAE and MAPE this is the
  mean of the per-horizon values when every horizon has the same observed
  count; the average RMSE is the root of the pooled mean squared error
  (with equal counts, at least the mean of the per-horizon RMSEs). A horizon with no observed
  target gets NaN. Computed in float64.
  """
  pred = np.asarray(pred, np.float64)
  true = np.asarray(true, np.float64)
  mask = np.asarray(mask, bool) & (true != 0)
  err = np.where(mask, pred - true, 0.0)
  ape = np.where(mask, np.abs(err) / np.where(mask, np.abs(true), 1.0), 0.0)

  def reduce(axis):
    count = mask.sum(axis)
    safe = np.maximum(count, 1)
    empty = count == 0
    return {
      "mae": np.where(empty, np.nan, np.abs(err).sum(axis) / safe),
      "rmse": np.where(empty, np.nan, np.sqrt((err**2).sum(axis) / safe)),
      "mape": np.where(empty, np.nan, 100.0 * ape.sum(axis) / safe),
    }

  horizon = {k: v.tolist() for k, v in reduce((0, 2)).items()}
  average = {k: float(v) for k, v in reduce(None).items()}
  return {"horizon": horizon, "avg": average}


def summarise(per_seed: list[dict]) -> dict:
  """Mean and std over seeds of every metric at the report horizons and on average."""
  out = {}
  for metric in ("mae", "rmse", "mape"):
    for h in REPORT_HORIZONS:
      values = [m["horizon"][metric][h - 1] for m in per_seed]
      out[f"{metric}@{h}"] = (float(np.mean(values)), float(np.std(values)))
    values = [m["avg"][metric] for m in per_seed]
    out[f"{metric}@avg"] = (float(np.mean(values)), float(np.std(values)))
  return out


# ----------------------------------------------------------------------------- steps


def build_model(config: UrbanPGConfig, n_nodes: int, steps_per_day: int = 288) -> UrbanPG:
  return UrbanPG(
    n_nodes=n_nodes,
    t_out=config.t_out,
    features=config.features,
    heads=config.heads,
    layers=config.layers,
    mlp_ratio=config.mlp_ratio,
    steps_per_day=steps_per_day,
    p=config.p,
    q=config.q,
    noise_std=config.noise_std,
    attention=config.attention,
    last_value_skip=config.last_value_skip,
  )


def init_params(model: UrbanPG, config: UrbanPGConfig, key: jax.Array) -> Any:
  n = model.n_nodes
  x = jnp.zeros((1, config.t_in, n))
  zeros = jnp.zeros((1,), jnp.int32)
  return jax.jit(model.init)(key, x, x > 0, zeros, zeros)["params"]


def trainable_labels(params: Any, trainable: Callable[[tuple[str, ...]], bool]) -> Any:
  """ "train" / "frozen" per leaf, from a predicate on its path of names."""

  def label(path, _):
    names = tuple(getattr(p, "key", str(p)) for p in path)
    return "train" if trainable(names) else "frozen"

  return jax.tree_util.tree_map_with_path(label, params)


def everything(_names) -> bool:
  return True


def prompts_only(names) -> bool:
  """Eq. 8: the backbone is frozen, every prompt parameter is trained."""
  return names[0] == "prompts"


def spatial_prompts_only(names) -> bool:
  """Eq. 10: only the spatial context prompt (E_s and E_d) is trained."""
  return names[0] == "prompts" and names[-1] in ("E_s", "E_d")


def make_optimizer(params, trainable, learning_rate, config) -> optax.GradientTransformation:
  adamw = optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    optax.adamw(learning_rate, weight_decay=config.weight_decay),
  )
  return optax.multi_transform(
    {"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels(params, trainable)
  )


def batch_loss(model: UrbanPG, scaler: Scaler, params, batch: dict, key) -> jax.Array:
  """Masked MAE in raw units over observed targets of the real (weight 1) samples."""
  pred = model.apply(
    {"params": params},
    batch["x"],
    batch["x_mask"],
    batch["time_of_day"],
    batch["day_of_week"],
    train=True,
    rngs={"perturb": key},
  )
  pred = pred * scaler.std + scaler.mean
  weight = batch["y_mask"] * batch["weight"][:, None, None]
  return jnp.sum(jnp.abs(pred - batch["y"]) * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_train_step(
  model: UrbanPG, scaler: Scaler, optimizer, max_traces: int | None = None
) -> Callable:
  """``step((params, opt_state, key), batch) -> (state, loss)``, jitted, state donated.

  With `max_traces`, chex raises if the step is traced more often than that
  (fixed shapes must never recompile).
  """

  def step(state, batch):
    params, opt_state, key = state
    key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(lambda p: batch_loss(model, scaler, p, batch, sub))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), loss

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_predict(model: UrbanPG) -> Callable:
  """Jitted eval-mode forward; cached per model so evaluation reuses its compilation."""

  def predict(params, batch):
    return model.apply(
      {"params": params},
      batch["x"],
      batch["x_mask"],
      batch["time_of_day"],
      batch["day_of_week"],
      train=False,
    )

  return jax.jit(predict)


def _batch(windows: Windows, index: np.ndarray, weight: np.ndarray) -> dict:
  w = windows.take(index)
  return {
    "x": w.x,
    "x_mask": w.x_mask,
    "y": w.y,
    "y_mask": w.y_mask.astype(np.float32),
    "time_of_day": w.time_of_day,
    "day_of_week": w.day_of_week,
    "weight": weight.astype(np.float32),
  }


def padded_batches(n: int, batch_size: int, order: np.ndarray | None = None):
  """Yields (index, weight) of fixed size; the tail is padded with weight-0 repeats."""
  order = np.arange(n) if order is None else order
  total = -(-n // batch_size) * batch_size
  index = np.concatenate([order, order[: total - n]]) if total > n else order
  while index.size < total:  # fewer samples than one batch
    index = np.concatenate([index, order])[:total]
  weight = (np.arange(total) < n).astype(np.float32)
  for i in range(0, total, batch_size):
    yield index[i : i + batch_size], weight[i : i + batch_size]


def batch_devices(batch_size: int) -> list:
  """The devices a batch is split over: as many of the local devices as
  divide ``batch_size`` evenly (all of them when they do), so that any device
  count runs. The split does not change what is computed, only where."""
  devices = jax.local_devices()
  count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
  return devices[:count]


class Placement:
  """Puts batches split over the `BATCH` mesh and states replicated (or leaves them)."""

  def __init__(self, enabled: bool, batch_size: int):
    if enabled and jax.process_count() > 1:
      # The step reads its predictions and parameters on the host, which
      # arrays split over other processes' devices do not allow.
      raise ValueError(
        f"UrbanPG's batch split covers one process's devices; this run has "
        f"{jax.process_count()} processes (set shard_batch=False)"
      )
    self.mesh = sharding.batch_mesh(batch_devices(batch_size)) if enabled else None

  def batch(self, tree):
    return tree if self.mesh is None else sharding.shard_batch(tree, self.mesh)

  def state(self, tree):
    return tree if self.mesh is None else sharding.replicate(tree, self.mesh)


def predict_windows(predict, params, windows: Windows, scaler: Scaler, config, place) -> np.ndarray:
  """Raw-unit forecasts [S, T_out, N] with fixed-size padded batches."""
  out = []
  for index, weight in padded_batches(len(windows), config.batch_size):
    batch = place.batch(_batch(windows, index, weight))
    out.append(np.asarray(predict(params, batch))[weight > 0])
  return scaler.inverse(np.concatenate(out)).astype(np.float32)


# ----------------------------------------------------------------------------- fitting


# What a seed's random draws are for. Each use folds its own tag (and stage)
# into PRNGKey(seed), so that no key of one seed is a key of another seed or
# of another use, whatever the seed numbers.
_INIT, _TARGET_INIT, _STAGE_INIT, _TRAINING = range(4)


def _seed_key(seed: int, purpose: int, index: int = 0) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), purpose), index)


def fit(
  task: Task,
  model: UrbanPG,
  params: Any,
  trainable: Callable,
  learning_rate: float,
  config: UrbanPGConfig,
  workdir: pathlib.Path,
  stage: str,
  seed: int,
) -> tuple[Any, dict]:
  """Trains with early stopping; returns the best-validation parameters and a log."""
  place = Placement(config.shard_batch, config.batch_size)
  optimizer = make_optimizer(params, trainable, learning_rate, config)
  step = make_train_step(model, task.scaler, optimizer)
  predict = make_predict(model)
  host = jax.device_get
  record = {
    "params": params,
    "opt_state": optimizer.init(params),
    # The same in every stage and arm of a seed: common random numbers
    # (perturbations, batch order) between the compared arms.
    "key": _seed_key(seed, _TRAINING),
    "best_params": host(params),
    "epoch": np.asarray(0, np.int32),
    "best_epoch": np.asarray(0, np.int32),
    "bad_epochs": np.asarray(0, np.int32),
    # float64, the type of the validation MAE, so that a resumed run compares
    # against the same best value as an uninterrupted one.
    "best_val": np.asarray(np.inf, np.float64),
    "done": np.asarray(0, np.int32),
  }
  checkpointer = Checkpointer(workdir, subdir=f"{stage}_seed{seed}")
  # The readings this stage trains on: a rerun on other data must not resume.
  run_config = {
    **config.to_dict(),
    "data_sha256": arrays_sha256(task.data.speed, task.data.mask, task.data.adjacency),
    "model_revision": MODEL_REVISION,
  }
  restored = checkpointer.restore(record, run_config, ignore=_RESUMABLE_KEYS)
  if restored is not None:
    record = restored[1]
    # The per-epoch history up to the checkpoint travels beside it
    # (checkpoints written before it did restore with an empty history).
    history = checkpointer.restore_log() or []
    _log(f"[{stage} seed {seed}] resuming at epoch {int(record['epoch'])}")
  else:
    history = []
  state = place.state((record["params"], record["opt_state"], record["key"]))
  epoch, bad = int(record["epoch"]), int(record["bad_epochs"])
  best_val, best_epoch = float(record["best_val"]), int(record["best_epoch"])
  best_params, done = record["best_params"], bool(record["done"])
  started = time.perf_counter()
  # The time with earlier runs spans what "seconds" does, plus theirs.
  checkpointer.time_from(started)
  while not done:
    order = np.random.default_rng([seed, epoch]).permutation(len(task.train))
    losses, real = [], []
    for index, weight in padded_batches(len(task.train), config.batch_size, order):
      state, loss = step(state, place.batch(_batch(task.train, index, weight)))
      losses.append(loss)
      real.append(weight.sum())
    epoch += 1
    pred = predict_windows(predict, state[0], task.val, task.scaler, config, place)
    val = masked_metrics(pred, task.val.y, task.val.y_mask)["avg"]["mae"]
    # Batches weighted by their real samples: the padded last one counts less.
    train_loss = float(np.average(host(losses), weights=real))
    # Each batch's loss precedes its update, so the parameters and Adam's
    # moments after the epoch's last update are checked on their own
    # (`finite_per_seed`). A diverged run would otherwise never beat the
    # initial best value and report its untrained parameters as the model.
    state_ok = bool(finite_per_seed(jax.tree.map(lambda leaf: leaf[None], state[:2]))[0])
    if not (state_ok and np.isfinite(train_loss) and np.isfinite(val)):
      what = (
        "the parameters or optimiser state are"
        if not state_ok
        else f"the training MAE ({train_loss}) or validation MAE ({val}) is"
      )
      raise FloatingPointError(
        f"UrbanPG [{stage} seed {seed}]: {what} not finite after epoch {epoch}; no checkpoint "
        f"written for it; try a lower learning rate"
      )
    history.append({"epoch": epoch, "train_mae": train_loss, "val_mae": val})
    if val < best_val:
      best_val, best_epoch, bad, best_params = val, epoch, 0, host(state[0])
    else:
      bad += 1
    done = bad >= config.patience or epoch >= config.epochs
    if epoch % 5 == 0 or done or epoch == 1:
      _log(
        f"[{stage} seed {seed}] epoch {epoch:>3}  train MAE {train_loss:.3f}  "
        f"val MAE {val:.3f}  best {best_val:.3f} @ {best_epoch}  "
        f"({time.perf_counter() - started:.1f} s)"
      )
    if done or epoch % config.checkpoint_every == 0 or interrupt.stop_requested():
      params_now, opt_now, key_now = host(state)
      record = {
        "params": params_now,
        "opt_state": opt_now,
        "key": key_now,
        "best_params": best_params,
        "epoch": np.asarray(epoch, np.int32),
        "best_epoch": np.asarray(best_epoch, np.int32),
        "bad_epochs": np.asarray(bad, np.int32),
        "best_val": np.asarray(best_val, np.float64),
        "done": np.asarray(done, np.int32),
      }
      checkpointer.save(epoch, record, run_config, log=history)
  # With a resumed stage's earlier attempts (None where not recorded).
  seconds_including_earlier_runs = checkpointer.seconds_so_far()
  checkpointer.close()
  return best_params, {
    "epochs": epoch,
    "best_epoch": best_epoch,
    "best_val_mae": best_val,
    "seconds": time.perf_counter() - started,
    "seconds_including_earlier_runs": seconds_including_earlier_runs,
    "history": history,
  }


def evaluate(model, params, task: Task, config: UrbanPGConfig) -> tuple[dict, np.ndarray]:
  place = Placement(config.shard_batch, config.batch_size)
  pred = predict_windows(
    make_predict(model), place.state(params), task.test, task.scaler, config, place
  )
  return masked_metrics(pred, task.test.y, task.test.y_mask), pred


def baseline_metrics(task: Task, config: UrbanPGConfig) -> dict:
  """Historical average, last value and per-node linear on `task`'s test windows."""
  a, b = task.train_steps
  ha = HistoricalAverage(
    task.data.speed[a:b], task.data.mask[a:b], task.data.time_of_day[a:b], task.data.steps_per_day
  )
  test = task.test
  preds = {
    "historical average": ha.predict(test, config.t_out),
    "last value": last_value(test, task.scaler, config.t_out),
    "per-node linear": PerNodeLinear(task.train, task.scaler).predict(test),
  }
  return {name: masked_metrics(p, test.y, test.y_mask) for name, p in preds.items()}


# ----------------------------------------------------------------------------- paradigms


def run_full(config, workdir, data, seeds) -> dict:
  task = make_task("los-loop", data, config)
  _log(
    f"full: {data.n_nodes} detectors; windows train {len(task.train)}, "
    f"val {len(task.val)}, test {len(task.test)}"
  )
  unseen = {task.name: report_unseen(task, {"UrbanPG": (task,)})}
  model = build_model(config, data.n_nodes, data.steps_per_day)
  results, logs, example = [], {}, None
  for seed in seeds:
    params = init_params(model, config, _seed_key(seed, _INIT))
    params, logs[f"seed{seed}"] = fit(
      task, model, params, everything, config.learning_rate, config, workdir, "full", seed
    )
    metrics, pred = evaluate(model, params, task, config)
    results.append(metrics)
    example = pred if example is None else example
  models = {"UrbanPG": results}
  models.update({k: [v] for k, v in baseline_metrics(task, config).items()})
  return {
    "models": models,
    "logs": logs,
    "plot": (task, example, f"UrbanPG, seed {seeds[0]}"),
    "unseen": unseen,
  }


def run_fewshot(config, workdir, data, seeds) -> dict:
  source_nodes, target_nodes = fewshot_nodes(data)
  source = make_task("source", data.select(source_nodes), config)
  target = make_task("target", data.select(target_nodes), config, config.fewshot_fraction)
  _log(
    f"fewshot: pre-train on {len(source_nodes)} western detectors ({len(source.train)} windows); "
    f"target {len(target_nodes)} eastern detectors, {len(target.train)} training windows "
    f"({config.fewshot_fraction:.0%} of its training period)"
  )
  # The prompts-only arm fine-tunes the source's time tables on the target;
  # the from-scratch arm trains them on the target's windows alone.
  arms = {"UrbanPG prompts-only (pre-trained)": (source, target), "UrbanPG from scratch": (target,)}
  unseen = {target.name: report_unseen(target, arms)}
  src_model = build_model(config, len(source_nodes), data.steps_per_day)
  tgt_model = build_model(config, len(target_nodes), data.steps_per_day)
  prompt_runs, scratch_runs, logs, example = [], [], {}, None
  for seed in seeds:
    pre = init_params(src_model, config, _seed_key(seed, _INIT))
    pre, logs[f"pretrain_seed{seed}"] = fit(
      source, src_model, pre, everything, config.learning_rate, config, workdir, "pretrain", seed
    )
    # Eq. 8: fresh spatial prompt for the new detectors; the frozen backbone
    # and the time tables (same sampling period) come from pre-training.
    fresh = init_params(tgt_model, config, _seed_key(seed, _TARGET_INIT))
    tuned = {
      "backbone": pre["backbone"],
      "prompts": {
        **fresh["prompts"],
        "E_t": pre["prompts"]["E_t"],
        "E_tod": pre["prompts"]["E_tod"],
        "E_dow": pre["prompts"]["E_dow"],
      },
    }
    tuned, logs[f"prompt_seed{seed}"] = fit(
      target,
      tgt_model,
      tuned,
      prompts_only,
      config.finetune_learning_rate,
      config,
      workdir,
      "prompt",
      seed,
    )
    metrics, pred = evaluate(tgt_model, tuned, target, config)
    prompt_runs.append(metrics)
    example = pred if example is None else example
    scratch = init_params(tgt_model, config, _seed_key(seed, _TARGET_INIT))
    scratch, logs[f"scratch_seed{seed}"] = fit(
      target, tgt_model, scratch, everything, config.learning_rate, config, workdir, "scratch", seed
    )
    scratch_runs.append(evaluate(tgt_model, scratch, target, config)[0])
  models = {"UrbanPG prompts-only (pre-trained)": prompt_runs, "UrbanPG from scratch": scratch_runs}
  models.update({k: [v] for k, v in baseline_metrics(target, config).items()})
  splits = {
    "source_nodes": data.sensor_ids[source_nodes],
    "target_nodes": data.sensor_ids[target_nodes],
  }
  return {
    "models": models,
    "logs": logs,
    "plot": (target, example, f"UrbanPG prompts-only (pre-trained), seed {seeds[0]}"),
    "splits": splits,
    "unseen": unseen,
  }


def _grow_params(previous: dict, fresh: dict) -> dict:
  """Eq. 9: P_s^(tau) = P_s^(tau-1) || Delta P_s^(tau); everything else carried over."""
  old = previous["prompts"]["E_s"]
  e_s = jnp.concatenate([old, fresh["prompts"]["E_s"][old.shape[0] :]], axis=0)
  return {"backbone": previous["backbone"], "prompts": {**previous["prompts"], "E_s": e_s}}


def run_continual(config, workdir, data, seeds) -> dict:
  tasks = continual_tasks(data, config)
  for task in tasks:
    _log(
      f"continual {task.name}: {task.data.n_nodes} detectors, steps of period "
      f"{len(task.data.time_of_day)}, windows train {len(task.train)} / test {len(task.test)}"
    )
  # Stages after the first train the spatial prompt only (eq. 10): the
  # continual arm's time tables are stage 1's; the retrained arm trains its own.
  unseen = {
    t.name: report_unseen(
      t, {"UrbanPG continual": (tasks[0],), "UrbanPG retrained per stage": (t,)}
    )
    for t in tasks
  }
  per_stage = {t.name: {"UrbanPG continual": [], "UrbanPG retrained per stage": []} for t in tasks}
  logs, example = {}, None
  for seed in seeds:
    params = None
    for tau, task in enumerate(tasks):
      model = build_model(config, task.data.n_nodes, data.steps_per_day)
      fresh = init_params(model, config, _seed_key(seed, _STAGE_INIT, tau))
      if params is None:
        params, rule, rate = fresh, everything, config.learning_rate
      else:
        params, rule, rate = (
          _grow_params(params, fresh),
          spatial_prompts_only,
          config.finetune_learning_rate,
        )
      params, logs[f"{task.name}_seed{seed}"] = fit(
        task, model, params, rule, rate, config, workdir, f"continual_{task.name}", seed
      )
      metrics, pred = evaluate(model, params, task, config)
      per_stage[task.name]["UrbanPG continual"].append(metrics)
      if tau == len(tasks) - 1 and example is None:
        example = pred
      if tau == 0:
        # Stage 1 trains everything in both arms.
        per_stage[task.name]["UrbanPG retrained per stage"].append(metrics)
        continue
      scratch, logs[f"{task.name}_scratch_seed{seed}"] = fit(
        task,
        model,
        fresh,
        everything,
        config.learning_rate,
        config,
        workdir,
        f"retrain_{task.name}",
        seed,
      )
      per_stage[task.name]["UrbanPG retrained per stage"].append(
        evaluate(model, scratch, task, config)[0]
      )
  for task in tasks:
    per_stage[task.name].update({k: [v] for k, v in baseline_metrics(task, config).items()})
  # Averages over stages, per seed (the paper reports the mean over periods).
  models = {}
  for name in per_stage[tasks[0].name]:
    runs = [per_stage[t.name][name] for t in tasks]
    models[name] = [_mean_metrics([r[i] for r in runs]) for i in range(len(runs[0]))]
  return {
    "models": models,
    "stages": per_stage,
    "logs": logs,
    "plot": (tasks[-1], example, f"UrbanPG continual, seed {seeds[0]}"),
    "unseen": unseen,
  }


def _mean_metrics(items: list[dict]) -> dict:
  horizon = {
    k: np.mean([m["horizon"][k] for m in items], axis=0).tolist() for k in ("mae", "rmse", "mape")
  }
  average = {k: float(np.mean([m["avg"][k] for m in items])) for k in ("mae", "rmse", "mape")}
  return {"horizon": horizon, "avg": average}


# ----------------------------------------------------------------------------- outputs


def format_table(models: dict) -> str:
  """Rows: models; columns: MAE / RMSE / MAPE at horizons 3, 6, 12 and averaged
  (mean ± population std over seeds)."""
  columns = [f"{h}" for h in REPORT_HORIZONS] + ["avg"]
  head = f"{'model':<36}" + "".join(
    f"{'h' + c + ' MAE':>14}{'RMSE':>14}{'MAPE%':>14}" for c in columns
  )
  lines = [head, "-" * len(head)]
  for name, runs in models.items():
    s = summarise(runs)
    cells = []
    for c in columns:
      for metric in ("mae", "rmse", "mape"):
        mean, std = s[f"{metric}@{c}"]
        cells.append(f"{mean:8.3f}±{std:<5.3f}" if len(runs) > 1 else f"{mean:14.3f}")
    lines.append(f"{name:<36}" + "".join(f"{c:>14}" for c in cells))
  if any(len(runs) > 1 for runs in models.values()):
    lines.append("mean ± std over seeds; std is the population standard deviation (ddof=0).")
  return "\n".join(lines)


def plot_predictions(
  path: pathlib.Path,
  task: Task,
  pred: np.ndarray,
  horizon: int = 3,
  n: int = 3,
  model: str = "UrbanPG",
):
  """Forecast `horizon` steps ahead vs the truth over the test period, for `n`
  detectors; `model` names the arm and seed the forecast comes from."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from jaxurban.viz.embedding_plot import save_figure_atomic

  spread = np.argsort(task.test.y.std(axis=(0, 1)))[::-1]
  nodes = spread[np.linspace(0, len(spread) - 1, n).astype(int)]
  steps = task.test.start + task.test.x.shape[1] + horizon - 1
  fig = Figure(figsize=(10, 2.6 * n))
  FigureCanvasAgg(fig)
  for i, node in enumerate(nodes):
    ax = fig.add_subplot(n, 1, i + 1)
    ax.plot(steps, task.test.y[:, horizon - 1, node], label="true", lw=1.0)
    ax.plot(steps, pred[:, horizon - 1, node], label=f"{model}, {horizon} steps ahead", lw=1.0)
    ax.set_ylabel("speed (mph)")
    ax.set_title(f"{task.name}: detector {task.data.sensor_ids[node]}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
  ax.set_xlabel("5-minute step")
  fig.tight_layout()
  save_figure_atomic(fig, path, dpi=110)


# Settings in which a run may differ from the one whose metrics.json is in
# its folder: another paradigm or model setting would replace those results,
# while other seeds share the folder (checkpoints are per seed), as the
# default folder name has it.
# The settings a resumed run may change (_RESUMABLE_KEYS) are among them.
RESULTS_MAY_DIFFER = _RESUMABLE_KEYS


def train_and_evaluate(config: UrbanPGConfig, workdir: str | pathlib.Path) -> dict:
  """Runs the configured paradigm; writes metrics.json (with the config) and predictions.png."""
  workdir = pathlib.Path(workdir)
  check_previous_results(workdir / "metrics.json", config.to_dict(), RESULTS_MAY_DIFFER)
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  data = load_los_loop(config.data_root)
  seeds = list(range(config.first_seed, config.first_seed + config.seeds))
  _log(
    f"UrbanPG {config.paradigm} on {data.name}: {data.n_nodes} detectors x {data.n_steps} steps, "
    f"{int((~data.mask).sum())} missing readings; seeds {seeds}; {jax.device_count()} device(s)"
  )
  used = len(batch_devices(config.batch_size))
  if config.shard_batch and used < jax.local_device_count():
    _log(
      f"batches of {config.batch_size} split over {used} of the {jax.local_device_count()} "
      "devices (the most that divide the batch evenly)"
    )
  runner = {"full": run_full, "fewshot": run_fewshot, "continual": run_continual}[config.paradigm]
  result = runner(config, workdir, data, seeds)
  task, example, shown = result.pop("plot")
  # {task: {arm: ...}} for every task that is scored.
  unseen = result.pop("unseen")
  result["unseen_days"] = {name: report["days"] for name, report in unseen.items()}
  result["unseen_time_of_day"] = {name: report["time_of_day"] for name, report in unseen.items()}
  table = format_table(result["models"])
  if "stages" in result:
    # The main table averages the stages (the paper reports the mean over
    # periods); each stage's own table follows it.
    table = "\n\n".join(
      [f"mean over the {len(result['stages'])} stages:\n{table}"]
      + [f"stage {stage}:\n{format_table(models)}" for stage, models in result["stages"].items()]
    )
  _log("\n" + table)
  result.update(
    {
      "config": config.to_dict(),
      "data_root": str(resolve_data_root(config.data_root)),
      "software": software_versions(),
      # Which model the figures come from (checkpoints carry it too).
      "model_revision": MODEL_REVISION,
      "summary": {k: summarise(v) for k, v in result["models"].items()},
      "table": table,
      "seconds": time.perf_counter() - started,
      "devices": jax.device_count(),
    }
  )
  if "stages" in result:
    result["stage_summary"] = {
      stage: {k: summarise(v) for k, v in models.items()}
      for stage, models in result["stages"].items()
    }
  # A picture of an earlier run (other seeds; or this run under --no-plot)
  # must not stay beside these results.
  remove_earlier_outputs(workdir, ("predictions.png",))
  write_json_atomic(workdir / "metrics.json", result)
  if config.plot and example is not None:
    plot_predictions(workdir / "predictions.png", task, example, model=shown)
  return result
