"""Training of ToPT's SREL stage, all seeds at once.

Parameters and optimiser states carry a leading seed axis; one jitted,
vmapped function (state donated) advances every seed by a chunk of epochs
under ``lax.scan``. Between chunks progress is printed and, given a work
directory, an orbax checkpoint (with the config beside it) is written from
which a killed run resumes.

Deviations from the authors' training loop (HAFusion_train.py), on purpose:
* the returned embeddings are those of the last epoch, computed without
  dropout; the authors keep the dropout-mode embedding of the epoch with the
  best downstream R^2 (evaluated every 30 epochs on the test labels), which
  uses the labels to pick the embedding;
* no per-epoch downstream evaluation.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxurban import interrupt
from jaxurban.atomic import writable_folder_problem
from jaxurban.checkpoint import Checkpointer, save_npy_atomic, write_json_atomic
from jaxurban.digest import arrays_sha256
from jaxurban.data.hafusion import CityViews
from jaxurban.topt.srel import SREL, SRELArchitecture, centroids_to_km
from jaxurban.topt.srel_losses import normalise_mobility, srel_loss
from jaxurban.training import chunk_length as _chunk_length
from jaxurban.training import (
  check_finite_outputs,
  finite_per_seed,
  make_chunk,
  non_finite_seeds,
  rate_problems,
  seed_problems,
  short_chunk_note,
  weight_problems,
)

__all__ = [
  "HAFUSION_CITY_SETTINGS",
  "HAFUSION_FUSION",
  "HAFUSION_TRAINING",
  "TOPT_TASK_SETTINGS",
  "SRELConfig",
  "SRELData",
  "abstract_state",
  "build_model",
  "init_state",
  "make_loss",
  "make_train_chunk",
  "prepare_data",
  "train_srel",
  "train_srel_with_log",
]

# HAFusion's per-city architecture (the authors' parse_args.py).
HAFUSION_CITY_SETTINGS = {
  "Chi": dict(n_heads=1, intra_layers=1, inter_layers=2, d_prime=32, memory=36, edge_channels=32),
  "NY": dict(n_heads=4, intra_layers=3, inter_layers=3, d_prime=64, memory=72, edge_channels=32),
}
# HAFusion's own region fusion (three plain self-attention layers that drop
# their attention weights, no spatial prior) and its training defaults (lr
# 5e-4, 2000 epochs; parse_args.py): the setting in which this code is
# compared with the authors' PyTorch HAFusion.
HAFUSION_FUSION = dict(n_layers=3, spatial_bias=False, centrality=False, attention_dropout=True)
HAFUSION_TRAINING = dict(**HAFUSION_FUSION, learning_rate=5e-4, epochs=2000)
# ToPT's SREL settings per downstream task (Sec. 3.1 of the ToPT paper).
TOPT_TASK_SETTINGS = {
  "crime": dict(learning_rate=7e-4, n_layers=2, spatial_lambda=0.1),
  "checkIn": dict(learning_rate=2e-4, n_layers=5, spatial_lambda=0.4),
  "serviceCall": dict(learning_rate=8e-4, n_layers=2, spatial_lambda=0.3),
}

# Config keys that may differ between a run and its resumption.
_RESUMABLE_KEYS = ("log_every", "checkpoint_every")


@dataclasses.dataclass(frozen=True)
class SRELConfig(SRELArchitecture):
  """One SREL training run: the model's `SRELArchitecture` fields (their
  defaults are ToPT's crime setting on Chicago) plus the training settings.

  Attributes:
    epochs: full-batch Adam steps (4000 in the ToPT paper).
    learning_rate: Adam learning rate (ToPT: 7e-4 crime, 2e-4 check-in,
      8e-4 service calls).
    weight_decay: L2 penalty added to the gradient before Adam, as PyTorch's
      ``Adam(weight_decay=5e-4)`` of the authors.
    seeds: seeds used when `train_srel` is given none; each seed's key
      initialises its parameters and drives its dropout.
    log_every: epochs per jitted chunk and per progress line (rounded down
      to a divisor of epochs).
    checkpoint_every: epochs between checkpoints (rounded to chunks).
  """

  epochs: int = 4000
  learning_rate: float = 7e-4
  weight_decay: float = 5e-4
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  log_every: int = 100
  checkpoint_every: int = 500

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

  def problems(self) -> list[str]:
    problems = super().problems()
    for name in ("epochs", "log_every", "checkpoint_every"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    problems.extend(rate_problems(learning_rate=self.learning_rate))
    problems.extend(weight_problems(weight_decay=self.weight_decay))
    problems.extend(_seed_problems(self.seeds))
    return problems

  @classmethod
  def for_city(cls, city: str, **overrides) -> "SRELConfig":
    """HAFusion's architecture for `city` ("Chi" or "NY"), then `overrides`."""
    if city not in HAFUSION_CITY_SETTINGS:
      raise ValueError(f"no HAFusion settings for city {city!r}")
    return cls(**{**HAFUSION_CITY_SETTINGS[city], **overrides})

  @classmethod
  def for_task(cls, task: str, city: str = "Chi", **overrides) -> "SRELConfig":
    """ToPT's SREL setting for a downstream task on `city`, then `overrides`."""
    if task not in TOPT_TASK_SETTINGS:
      raise ValueError(f"task {task!r} not in {tuple(TOPT_TASK_SETTINGS)}")
    return cls.for_city(city, **{**TOPT_TASK_SETTINGS[task], **overrides})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SRELData:
  """Model inputs and loss targets as float32 device arrays."""

  poi: jax.Array
  landuse: jax.Array
  mobility_features: jax.Array
  coords: jax.Array | None  # [N, 2] km, None without centroids
  mobility_target: jax.Array  # trips / mean(trips)
  poi_similarity: jax.Array
  landuse_similarity: jax.Array

  def as_tuple(self) -> tuple:
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def prepare_data(views: CityViews) -> SRELData:
  """Converts `CityViews` to the arrays the model and the losses take."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  coords = None if views.centroids is None else f32(centroids_to_km(views.centroids))
  return SRELData(
    poi=f32(views.poi),
    landuse=f32(views.landuse),
    mobility_features=f32(views.mobility_features),
    coords=coords,
    mobility_target=normalise_mobility(f32(views.mobility)),
    poi_similarity=f32(views.poi_similarity),
    landuse_similarity=f32(views.landuse_similarity),
  )


def build_model(config: SRELArchitecture) -> SREL:
  """The SREL module of a run's config (its architecture fields)."""
  return SREL(config.architecture())


def make_optimizer(config: SRELConfig) -> optax.GradientTransformation:
  # PyTorch's Adam(weight_decay=wd) adds wd * p to the gradient before the
  # moment estimates (coupled L2, not AdamW).
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay), optax.adam(config.learning_rate)
  )


def make_loss(model: SREL) -> Callable:
  """``loss(params, key, *data) -> (total, terms)`` for one seed, dropout on."""

  def loss(params, key, poi, landuse, mob, coords, mob_target, poi_sim, land_sim):
    outputs = model.apply(
      {"params": params}, poi, landuse, mob, coords, deterministic=False, rngs={"dropout": key}
    )
    total, terms = srel_loss(outputs, mob_target, poi_sim, land_sim)
    return total, terms

  return loss


def _seed_problems(seeds: Sequence[int]) -> list[str]:
  """Seeds in range, and each once: a repeated seed would train the same model twice."""
  repeated = sorted(int(s) for s, count in collections.Counter(seeds).items() if count > 1)
  return seed_problems(seeds) + ([f"seeds repeat {repeated}"] if repeated else [])


def _seed_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Per-seed (init keys, train keys), each [S, 2]."""
  keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(
    jnp.asarray(seeds, dtype=jnp.uint32)
  )
  return keys[:, 0], keys[:, 1]


def _init_fn(model: SREL, optimizer: optax.GradientTransformation, data: SRELData) -> Callable:
  inputs = (data.poi, data.landuse, data.mobility_features, data.coords)

  def init(init_keys):
    params = jax.vmap(lambda k: model.init(k, *inputs)["params"])(init_keys)
    return params, jax.vmap(optimizer.init)(params)

  return init


def init_state(
  model: SREL, optimizer: optax.GradientTransformation, seeds: Sequence[int], data: SRELData
) -> tuple[Any, Any, jax.Array]:
  """(params, opt_state, train keys), each with a leading seed axis."""
  init_keys, train_keys = _seed_keys(seeds)
  init = jax.jit(_init_fn(model, optimizer, data)).lower(init_keys)
  # The initialiser runs once, and XLA's CPU optimisation passes take 3-4x
  # longer on its unrolled random-number code than running it unoptimised.
  try:
    init = init.compile(compiler_options={"xla_backend_optimization_level": 0})
  except Exception:  # a backend without that option
    init = init.compile()
  params, opt_state = init(init_keys)
  return params, opt_state, train_keys


def abstract_state(
  model: SREL, optimizer: optax.GradientTransformation, seeds: Sequence[int], data: SRELData
) -> tuple[Any, Any, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of `init_state` without computing it (a restore template)."""
  init_keys, train_keys = _seed_keys(seeds)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, opt_state = jax.eval_shape(_init_fn(model, optimizer, data), init_keys)
  with_sharding = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  return jax.tree.map(with_sharding, (params, opt_state, train_keys))


def make_train_chunk(
  loss_fn: Callable, optimizer: optax.GradientTransformation, length: int
) -> Callable:
  """``chunk(state, *data) -> (state, terms)`` advancing every seed by `length`
  epochs (`jaxurban.training.make_chunk`); `terms` are each loss term of the
  chunk's last epoch per seed."""
  return make_chunk(loss_fn, optimizer, length, terms="last")


def make_embed(model: SREL) -> Callable:
  """Jitted ``embed(params [S, ...], poi, landuse, mob, coords) -> [S, N, d]`` without dropout."""

  def embed(params, poi, landuse, mob, coords):
    return model.apply({"params": params}, poi, landuse, mob, coords)["embedding"]

  return jax.jit(jax.vmap(embed, in_axes=(0, None, None, None, None)))


def effective_config(config: SRELConfig, views: CityViews) -> SRELConfig:
  """`config` with the spatial parts switched off where there are no centroids."""
  if views.centroids is None and (config.spatial_bias or config.centrality):
    return dataclasses.replace(config, spatial_bias=False, centrality=False)
  return config


def train_srel_with_log(
  config: SRELConfig,
  views: CityViews,
  seeds: Sequence[int] | None = None,
  workdir: str | pathlib.Path | None = None,
  progress: bool = True,
) -> tuple[np.ndarray, dict]:
  """`train_srel`, also returning the per-chunk loss history and timings."""
  seeds = tuple(config.seeds if seeds is None else (int(s) for s in seeds))
  if not seeds:
    raise ValueError("train_srel: no seeds given")
  problems = _seed_problems(seeds)
  if problems:
    raise ValueError("train_srel: " + problems[0])
  if views.n_regions % config.n_heads:
    raise ValueError(
      f"train_srel: {views.city} has N = {views.n_regions} regions, the model width, "
      f"which n_heads={config.n_heads} must divide"
    )
  say = print if progress else (lambda *a, **k: None)
  used = effective_config(config, views)
  if used != config:
    say(f"[srel] {views.city}: no centroids, training without spatial bias and centrality")
  data = prepare_data(views)
  model = build_model(used)
  optimizer = make_optimizer(used)
  run_config = {
    **used.to_dict(),
    "seeds": list(seeds),
    "city": views.city,
    "n_regions": views.n_regions,
    # The inputs as read (not as computed on the device, whose rounding may
    # differ between machines): a rerun on other data must not resume.
    "inputs_sha256": arrays_sha256(
      views.mobility,
      views.mobility_dist,
      views.poi,
      views.poi_similarity,
      views.landuse,
      views.landuse_similarity,
      views.centroids,
    ),
  }

  start, state, checkpointer, history = 0, None, None, []
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    checkpointer = Checkpointer(workdir, subdir="srel")
    if checkpointer.latest_step() is not None:
      # Restoring needs only the state's structure: skip initialising it.
      template = abstract_state(model, optimizer, seeds, data)
      start, state = checkpointer.restore(template, run_config, ignore=_RESUMABLE_KEYS)
      # The loss history up to the checkpoint travels inside it.
      history = checkpointer.restore_log() or []
      say(f"[srel] resuming from the checkpoint at epoch {start}")
    write_json_atomic(workdir / "srel_config.json", run_config)
  if state is None:
    state = init_state(model, optimizer, seeds, data)

  length = _chunk_length(used.epochs, used.log_every, start)
  note = short_chunk_note(used.epochs, used.log_every, start, length)
  if note:
    say(f"[srel] {note}")
  save_every = max(length, (used.checkpoint_every // length) * length)
  chunk = make_train_chunk(make_loss(model), optimizer, length)
  embed = make_embed(model)
  args = data.as_tuple()
  started = time.perf_counter()
  if checkpointer is not None:
    # The time with earlier runs spans what `train_seconds` does, plus theirs.
    checkpointer.time_from(started)
  for epoch in range(start, used.epochs, length):
    state, terms = chunk(state, *args)
    terms = jax.device_get(terms)
    done = epoch + length
    # The parameters and Adam's moments (`finite_per_seed`).
    diverged = non_finite_seeds(seeds, terms["total"], jax.device_get(finite_per_seed(state[:2])))
    if diverged:
      # Stop before a checkpoint keeps non-finite parameters; the previous
      # checkpoint (if any) stays the latest.
      raise FloatingPointError(
        f"SREL on {views.city}: the loss, parameters or optimiser state of seed(s) {diverged} "
        f"are not finite after epoch {done}; the mobility view's raw trip counts make the "
        "intra-view attention logits very large, so try a lower learning_rate"
      )
    row = {"epoch": done, **{k: np.asarray(v).tolist() for k, v in terms.items()}}
    history.append(row)
    parts = "  ".join(f"{k} {np.mean(v):.4g}" for k, v in terms.items())
    say(
      f"[srel {views.city}] epoch {done:>5}/{used.epochs}  {parts}  "
      f"({time.perf_counter() - started:.1f} s, {len(seeds)} seed(s))",
      flush=True,
    )
    if checkpointer is not None and (
      done % save_every == 0 or done == used.epochs or interrupt.stop_requested()
    ):
      # Finite parameters can still overflow in the forward pass.
      check_finite_outputs(
        f"SREL on {views.city} after epoch {done}", seeds, embed(state[0], *args[:4])
      )
      checkpointer.save(done, state, run_config, log=history)
  seconds = time.perf_counter() - started
  # With a resumed run's earlier attempts (None where not recorded).
  seconds_including_earlier_runs = seconds
  if checkpointer is not None:
    seconds_including_earlier_runs = checkpointer.seconds_so_far()
    checkpointer.close()

  params = state[0]
  embeddings = embed(params, *args[:4])
  embeddings = np.asarray(jax.device_get(embeddings), dtype=np.float32)
  check_finite_outputs(f"SREL on {views.city}", seeds, embeddings)
  log = {
    "config": run_config,
    "history": history,
    "train_seconds": seconds,
    "resumed_from": start,
    "train_seconds_including_earlier_runs": seconds_including_earlier_runs,
    "final_terms": history[-1] if history else None,
  }
  if used.spatial_bias and used.lambda_learnable and data.coords is not None:
    log["spatial_lambda"] = np.asarray(params["spatial_lambda"]).tolist()
  if workdir is not None:
    save_npy_atomic(workdir / "srel_emb.npy", embeddings)
    write_json_atomic(workdir / "srel_log.json", log)
    if history:
      from jaxurban.viz.loss_curves import plot_loss_history

      plot_loss_history(
        workdir / "srel_losses.png",
        history,
        title=f"SREL on {views.city}",
        seed_labels=seeds,
      )
  return embeddings, log


def train_srel(
  config: SRELConfig,
  views: CityViews,
  seeds: Sequence[int] | None = None,
  workdir: str | pathlib.Path | None = None,
  progress: bool = True,
) -> np.ndarray:
  """Trains SREL for every seed at once; returns float32 embeddings [S, N, d].

  Args:
    config: the run's settings (`SRELConfig`).
    views: the city (`jaxurban.data.hafusion.load_city_views`); without
      centroids (New York) the spatial bias and centrality are off.
    seeds: one model per seed, vectorised with jax.vmap; None uses
      ``config.seeds``.
    workdir: if given, orbax checkpoints with the config under
      ``workdir/checkpoints/srel`` (a rerun resumes from the latest), plus
      ``srel_config.json``, ``srel_emb.npy``, ``srel_log.json`` and the
      per-seed training curves ``srel_losses.png``.
    progress: print one line per chunk of epochs.
  """
  return train_srel_with_log(config, views, seeds, workdir, progress)[0]


def parse_cli(argv: Sequence[str] | None = None) -> tuple[SRELConfig, argparse.Namespace]:
  """The run's `SRELConfig` and the parsed flags of `main`'s command line."""
  parser = argparse.ArgumentParser(
    prog="python -m jaxurban.topt.srel_train", description=main.__doc__
  )
  parser.add_argument(
    "--city", default="Chi", choices=("Chi", "NY"), help="Chicago or New York (hafusion data)"
  )
  setting = parser.add_mutually_exclusive_group()
  setting.add_argument(
    "--task", default=None, choices=tuple(TOPT_TASK_SETTINGS), help="ToPT's setting (crime)"
  )
  setting.add_argument(
    "--hafusion",
    action="store_true",
    help="HAFusion's own fusion and training (3 plain layers, lr 5e-4, 2000 epochs)",
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  parser.add_argument(
    "--workdir",
    default=None,
    help="folder for checkpoints (resumable), emb.npy, srel_log.json and srel_losses.png; "
    "without it nothing is saved",
  )
  parser.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    default=None,
    help=f"seeds trained together (default: {' '.join(map(str, SRELConfig.seeds))})",
  )
  parser.add_argument(
    "--epochs", type=int, default=None, help="training epochs (default: the setting's own)"
  )
  parser.add_argument(
    "--no-spatial-bias", action="store_true", help="no distance bias in the Graphormer attention"
  )
  parser.add_argument(
    "--no-centrality", action="store_true", help="no centrality encoding of the regions"
  )
  parser.add_argument(
    "--attention-dropout",
    action="store_true",
    help="drop the Graphormer attention weights in training, as HAFusion does (dense attention)",
  )
  args = parser.parse_args(argv)
  if args.hafusion and (args.no_spatial_bias or args.no_centrality):
    parser.error("--hafusion has no spatial prior to switch off")
  if args.hafusion and args.attention_dropout:
    parser.error("--hafusion drops its attention weights already")
  problems = [] if args.seeds is None else _seed_problems(args.seeds)
  if problems:
    parser.error("--" + problems[0])
  epochs = {} if args.epochs is None else {"epochs": args.epochs}
  try:
    if args.hafusion:
      config = SRELConfig.for_city(args.city, **{**HAFUSION_TRAINING, **epochs})
    else:
      config = SRELConfig.for_task(
        args.task or "crime",
        args.city,
        spatial_bias=not args.no_spatial_bias,
        centrality=not args.no_centrality,
        attention_dropout=args.attention_dropout,
        **epochs,
      )
  except ValueError as error:  # a setting out of range: say which, as argparse does
    parser.error(str(error))
  problem = args.workdir is not None and writable_folder_problem(args.workdir)
  if problem:
    parser.error(problem)
  return config, args


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m jaxurban.topt.srel_train --city Chi --workdir DIR [--task crime | --hafusion] ...``"""
  from jaxurban.checkpoint import CheckpointMismatch
  from jaxurban.data.errors import DataError
  from jaxurban.data.hafusion import load_city_views

  config, args = parse_cli(argv)
  try:
    views = load_city_views(args.city, args.data_root)
    if args.workdir is None:
      print("note: no --workdir, so nothing of this run is saved", file=sys.stderr)
    # A first Ctrl-C stops after the next checkpoint (jaxurban.interrupt).
    with interrupt.stop_at_checkpoints():
      embeddings, log = train_srel_with_log(config, views, args.seeds, args.workdir)
  except (DataError, CheckpointMismatch, FloatingPointError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as error:
    if args.workdir is None:
      message = "interrupted; nothing was saved (no --workdir)"
    else:
      message = interrupt.interrupted_message(error)
    print(f"\n{message}", file=sys.stderr)
    return 130
  if args.workdir is not None:
    save_npy_atomic(pathlib.Path(args.workdir) / "emb.npy", embeddings)
  final_terms = log["final_terms"] or {}
  final = {k: float(np.mean(v)) for k, v in final_terms.items() if k != "epoch"}
  resumed = ""
  if log["resumed_from"]:
    all_runs = log["train_seconds_including_earlier_runs"]
    with_earlier = "" if all_runs is None else f", {all_runs:.1f} s with the earlier runs"
    resumed = f" (resumed at epoch {log['resumed_from']}{with_earlier})"
  print(
    f"[srel] done: {embeddings.shape} in {log['train_seconds']:.1f} s{resumed}; "
    f"final losses {final or 'not recorded'}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
