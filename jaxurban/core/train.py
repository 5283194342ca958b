"""Training and evaluation of CoRE and its ablations/baselines on a city pair.

K seeds train together: parameters and optimiser states carry a leading seed
axis and one jitted, vmapped function advances all of them by a chunk of
epochs under ``lax.scan``. Between chunks the driver prints progress and
writes an orbax checkpoint from which a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxurban import interrupt, sharding
from jaxurban.checkpoint import (
  Checkpointer,
  check_previous_results,
  remove_earlier_outputs,
  save_npy_atomic,
  write_json_atomic,
)
from jaxurban.provenance import software_versions
from jaxurban.core import losses as core_losses
from jaxurban.core.model import CoRE, LossSettings, alignment_losses, mobility_losses, total_loss
from jaxurban.graph import CityGraph, city_graph, pad_target_rows
from jaxurban.training import chunk_length as _chunk_length
from jaxurban.training import (
  changed_settings,
  check_finite_outputs,
  finite_per_seed,
  make_chunk,
  non_finite_seeds,
  rate_problems,
  seed_range_problems,
  short_chunk_note,
  weight_problems,
)

VARIANTS = ("core", "no-lma", "no-lia", "two-stage", "individual", "rp")
# The variants that train without LMA (alpha = 0) or without LIA (beta = 0).
WITHOUT_LMA = ("no-lma", "individual", "rp")
WITHOUT_LIA = ("no-lia", "individual", "rp")


@dataclasses.dataclass(frozen=True)
class CoreConfig:
  """One CoRE run on a city pair.

  Attributes:
    city_x, city_y: city codes under ``<data_root>/core`` (case-insensitive);
      X is listed first in outputs.
    data_root: data folder; None reads the JAXURBAN_DATA variable.
    variant: "core" (eq. 13), "no-lma" / "no-lia" (ablations of the paper's
      Sec. 4.5), "two-stage" (embeddings first, alignment of frozen
      embeddings second), "individual" (mobility loss only: no alignment),
      "rp" (individual embeddings aligned by rank anchoring + orthogonal
      Procrustes, Yabe et al. 2020).
    seeds: number of seeds trained together; seeds are first_seed, ...,
      first_seed + seeds - 1.
    first_seed: the first seed.
    epochs: full-batch training epochs (per stage for "two-stage").
    learning_rate: Adam's learning rate.
    features, heads, layers: GAT width d, attention heads H, layers.
    n_anchors: N_a, Gaussian anchors drawn afresh every epoch.
    alpha, beta: weights of LMA and LIA in eq. (13).
    loss_form: "authors" or "paper" variant of LMA/LIA.
    direct: use the N x N reference loss forms (slow; for checks).
    gat_implementation: "tables" or "segment".
    remat_gat: recompute each GAT layer's activations in the backward pass
      instead of storing them: the same values and gradients, one more
      encoder forward per step, and stored activations O(N d) per layer
      instead of O(E d) (for cities of 10^5 regions and more).
    log_every: epochs per jitted chunk and progress line.
    checkpoint_every: epochs between checkpoints (rounded to chunks).
    plot: write the 2-D picture of both cities' embeddings.
    shard_seeds: split the seeds over all devices (seeds must be a multiple
      of the device count); the result equals the single-device run.
    shard_regions: split one city pair over all devices: the mobility
      loss's rows and edges and the anchors (n_anchors must be a multiple of
      the device count); the result equals the single-device run.
  """

  city_x: str = "xa"
  city_y: str = "cd"
  data_root: str | None = None
  variant: str = "core"
  seeds: int = 1
  first_seed: int = 0
  epochs: int = 600
  learning_rate: float = 1e-3
  features: int = 128
  heads: int = 8
  layers: int = 2
  n_anchors: int = 1000
  alpha: float = 1.0
  beta: float = 1.0
  loss_form: str = "authors"
  direct: bool = False
  gat_implementation: str = "tables"
  remat_gat: bool = False
  log_every: int = 50
  checkpoint_every: int = 100
  plot: bool = True
  shard_seeds: bool = False
  shard_regions: bool = False

  def __post_init__(self):
    problems = []
    if self.variant not in VARIANTS:
      problems.append(f"variant {self.variant!r} not in {VARIANTS}")
    if self.loss_form not in core_losses.FORMS:
      problems.append(f"loss_form {self.loss_form!r} not in {core_losses.FORMS}")
    for name in (
      "seeds",
      "epochs",
      "features",
      "heads",
      "layers",
      "n_anchors",
      "log_every",
      "checkpoint_every",
    ):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.gat_implementation not in ("tables", "segment"):
      problems.append(
        f"gat_implementation {self.gat_implementation!r} not in ('tables', 'segment')"
      )
    elif self.remat_gat and self.gat_implementation != "tables":
      problems.append("remat_gat needs gat_implementation 'tables'")
    if self.shard_seeds and self.shard_regions:
      problems.append("shard_seeds and shard_regions cannot be combined; pick one")
    if self.city_x.lower() == self.city_y.lower():
      problems.append(f"the two cities must differ, got {self.city_x!r} twice")
    problems.extend(rate_problems(learning_rate=self.learning_rate))
    problems.extend(weight_problems(alpha=self.alpha, beta=self.beta))
    problems.extend(self._settings_without_effect())
    # The seeds become a default (int32) jax array.
    problems.extend(seed_range_problems(self.first_seed, self.seeds, 2**31))
    if problems:
      raise ValueError("CoreConfig: " + "; ".join(problems))

  def _settings_without_effect(self) -> list[str]:
    """Loss settings changed from their defaults where the loss they set is
    off: the run would compute the same thing under another label (and
    another default output folder)."""
    # A loss is off by the variant, or by a weight of 0 (which leaves the
    # weight itself meaningful: it is what turns the loss off).
    lma_by_variant = self.variant in WITHOUT_LMA
    lia_by_variant = self.variant in WITHOUT_LIA
    lma_off = lma_by_variant or self.alpha == 0
    lia_off = lia_by_variant or self.beta == 0
    why = {
      "LMA": f"variant {self.variant!r}" if lma_by_variant else "alpha=0",
      "LIA": f"variant {self.variant!r}" if lia_by_variant else "beta=0",
    }
    unused = (
      [("alpha", "LMA")] * lma_by_variant
      + [("n_anchors", "LMA")] * lma_off
      + [("beta", "LIA")] * lia_by_variant
      + [("loss_form", "LMA and LIA")] * (lma_off and lia_off)
    )
    loss_of = dict(unused)  # each setting sets one loss (or both)
    return [
      f"{name}={value!r} has no effect with "
      + " and ".join(dict.fromkeys(why[part] for part in loss_of[name].split(" and ")))
      + f" ({loss_of[name]} off); leave it at its default {default!r}"
      for name, value, default in changed_settings(self, list(loss_of))
    ]

  def loss_settings(self) -> LossSettings:
    alpha = 0.0 if self.variant in WITHOUT_LMA else self.alpha
    beta = 0.0 if self.variant in WITHOUT_LIA else self.beta
    return LossSettings(
      alpha=alpha, beta=beta, n_anchors=self.n_anchors, form=self.loss_form, direct=self.direct
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Config keys that may change between a run and its resumption.
_RESUMABLE_KEYS = (
  "data_root",
  "remat_gat",
  "log_every",
  "checkpoint_every",
  "plot",
  "shard_seeds",
  "shard_regions",
)


# Outputs written only by some runs (`train_and_evaluate`), as glob patterns.
_DERIVED_OUTPUTS = ("embeddings.png", "losses*.png", "*_in_*_region_emb.npy")


# A city of one region has no relations between regions to align: its
# anchor similarities are a sign each, the alignment loss is constant, and
# what gradient the low-rank form leaves is rounding noise that Adam scales
# up to full steps.
MIN_REGIONS = 2
_TOO_FEW_REGIONS = f"CoRE needs at least {MIN_REGIONS} regions per city"


def _outside_data_root(folder: pathlib.Path, data_root) -> str:
  """A note when a city came from the download cache although a data root
  was given (or set): a root nested one level too deep looks like that."""
  from jaxurban.data.root import DATA_ENV, resolve_data_root

  if data_root is None and not os.environ.get(DATA_ENV):
    return ""
  root = resolve_data_root(data_root)
  # A city folder under the root may be a link to a folder elsewhere: it
  # was still found in the root.
  folder = pathlib.Path(folder).absolute()
  if folder.is_relative_to(root) or folder.resolve().is_relative_to(root.resolve()):
    return ""
  return f" (the download cache: the data root {root} holds no such city)"


def load_city_graph(name: str, data_root=None):
  """Loads a city and builds its encoder graph and mobility target.

  A city missing from the data root is taken from the download cache, or
  downloaded there (checksum-verified) when a network is available.
  """
  from jaxurban.data.core_city import load_city
  from jaxurban.data.errors import DataError
  from jaxurban.data.fetch import ensure_city

  folder = ensure_city(name, data_root)
  city = load_city(name, folder.parent.parent)
  if city.n_regions < MIN_REGIONS:
    raise DataError(
      city.source_dir, f"the .geo lists {city.n_regions} region(s): {_TOO_FEW_REGIONS}"
    )
  graph = city_graph(
    city.edge_origin,
    city.edge_destination,
    city.edge_weight,
    city.edge_weight_raw,
    city.n_regions,
    od_flow=city.od_flow,
  )
  return city, graph


def data_description(city) -> dict:
  """What a run read from one city: its folder, counts, and each file's SHA-256.

  ``training`` holds the files that shape the training (``.geo``, ``.mob``
  and the OD matrix when present); it goes into every checkpoint's config,
  so that a run never resumes weights trained on other data. ``labels``
  only shape the evaluation, which a resumed run repeats.
  """
  from jaxurban.data.core_city import LABEL_NAMES, city_files
  from jaxurban.digest import file_sha256

  files = city_files(city.source_dir, city.name)
  digest = lambda keys: {files[k].name: file_sha256(files[k]) for k in keys if files[k]}
  return {
    "source_dir": str(city.source_dir),
    "regions": city.n_regions,
    "mobility_edges": city.n_edges,
    "training": digest(("geo", "mob", "od_flow")),
    "labels": digest(LABEL_NAMES),
  }


def _training_data(description: dict | None) -> dict | None:
  """The part of `data_description`s that a checkpoint must match."""
  if description is None:
    return None
  return {
    name: {k: city[k] for k in ("regions", "mobility_edges", "training")}
    for name, city in description.items()
  }


def _log(message: str) -> None:
  print(message, flush=True)


def _run_stage(
  name: str,
  workdir: pathlib.Path,
  config: CoreConfig,
  loss_fn: Callable,
  init_params: Any,
  keys: jax.Array,
  data: tuple,
  epochs: int,
  per_seed_data: bool = False,
  data_description: dict | None = None,
  revision: int | None = None,
) -> tuple[Any, dict]:
  """Trains one stage with checkpoints under ``workdir/checkpoints/<name>``.

  Each checkpoint's config is the run's config plus the training files'
  description (`data_description`) and, for a stage whose parameters or
  computation changed since checkpoints were first written, its `revision`;
  resuming requires all of them to match.
  """
  run_config = {**config.to_dict(), "data": _training_data(data_description)}
  if revision is not None:
    run_config["stage_revision"] = revision
  optimizer = optax.adam(config.learning_rate)
  state = (init_params, jax.vmap(optimizer.init)(init_params), keys)
  checkpointer = Checkpointer(workdir, subdir=name)
  start, history = 0, []
  restored = checkpointer.restore(state, run_config, ignore=_RESUMABLE_KEYS)
  if restored is not None:
    start, state = restored
    # The loss history up to the checkpoint travels inside it.
    history = checkpointer.restore_log() or []
    _log(f"[{name}] resuming from the checkpoint at epoch {start}")
  if config.shard_seeds:
    mesh = sharding.seed_mesh()
    state = sharding.shard_seeds(state, mesh)
    data = sharding.shard_seeds(data, mesh) if per_seed_data else sharding.replicate(data, mesh)
  elif config.shard_regions:
    mesh = sharding.region_mesh()
    state = sharding.replicate(state, mesh)
    data = tuple(
      place_city_graph(d, mesh) if isinstance(d, CityGraph) else sharding.replicate(d, mesh)
      for d in data
    )
  length = _chunk_length(epochs, config.log_every, start)
  note = short_chunk_note(epochs, config.log_every, start, length)
  if note:
    _log(f"[{name}] {note}")
  save_every = max(length, (config.checkpoint_every // length) * length)
  chunk = make_chunk(loss_fn, optimizer, length, per_seed_data)
  started = time.perf_counter()
  # The time with earlier runs spans what "seconds" does, plus theirs.
  checkpointer.time_from(started)
  for epoch in range(start, epochs, length):
    state, terms = chunk(state, *data)
    terms = sharding.to_host(terms)  # split over hosts under --distributed --shard-seeds
    done = epoch + length
    diverged = non_finite_seeds(
      range(config.first_seed, config.first_seed + config.seeds),
      terms["total"],
      sharding.to_host(finite_per_seed(state[:2])),  # parameters and Adam's moments
    )
    if diverged:
      # Stop before a checkpoint keeps non-finite parameters; the previous
      # checkpoint (if any) stays the latest.
      raise FloatingPointError(
        f"[{name}] the loss, parameters or optimiser state of seed(s) {diverged} are not finite in "
        f"epochs {epoch + 1}-{done}; no checkpoint written for them; try a lower learning rate"
      )
    # Means over the chunk's epochs and over seeds.
    row = {"epoch": done, **{k: float(np.mean(v)) for k, v in terms.items()}}
    history.append(row)
    parts = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
    _log(f"[{name}] epoch {done:>5}/{epochs}  {parts}  ({time.perf_counter() - started:.1f} s)")
    if done % save_every == 0 or done == epochs or interrupt.stop_requested():
      checkpointer.save(done, state, run_config, log=history)
  seconds_including_earlier_runs = checkpointer.seconds_so_far()
  checkpointer.close()
  return state[0], {
    "history": history,
    "seconds": time.perf_counter() - started,
    "resumed_from": start,
    # A resumed stage: also the earlier runs' time up to the checkpoint it
    # resumed from (None for a checkpoint that predates that record).
    "seconds_including_earlier_runs": seconds_including_earlier_runs,
  }


def place_city_graph(graph: CityGraph, mesh) -> CityGraph:
  """The mobility target's rows and edges split over `mesh`, the rest replicated.

  The graph must have been padded with `pad_target_rows` to the mesh size.
  """
  rows = ("origin_rows", "row_weight", "target_origin", "target_destination", "target")
  split = sharding.split_rows({name: getattr(graph, name) for name in rows}, mesh)
  rest = sharding.replicate(graph.replace(**{name: jnp.zeros(0) for name in rows}), mesh)
  return rest.replace(**split)


def build_model(config: CoreConfig, graph_x: CityGraph, graph_y: CityGraph) -> CoRE:
  return CoRE(
    graph_x.n_regions,
    graph_y.n_regions,
    config.features,
    config.heads,
    config.layers,
    config.gat_implementation,
    config.remat_gat,
  )


def init_params(
  model: CoRE, seeds: jax.Array, graph_x: CityGraph, graph_y: CityGraph
) -> tuple[Any, jax.Array]:
  """Per-seed parameters and training keys, both with a leading seed axis."""
  init_keys, train_keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)), out_axes=1)(
    seeds
  )
  params = jax.jit(jax.vmap(lambda k: model.init(k, graph_x, graph_y)["params"]))(init_keys)
  return params, train_keys


def make_embed_loss(model: CoRE, settings: LossSettings) -> Callable:
  """``loss(params, key, graph_x, graph_y) -> (eq. 13, terms)`` for one seed."""

  def embed_loss(params, key, graph_x, graph_y):
    z_x, z_y, query_key = model.apply({"params": params}, graph_x, graph_y)
    terms = mobility_losses(z_x, z_y, graph_x, graph_y, settings)
    terms.update(alignment_losses(z_x, z_y, query_key, key, settings))
    total = total_loss(terms, settings)
    return total, {"total": total, **terms}

  return embed_loss


def train_embeddings(
  config: CoreConfig,
  workdir: str | pathlib.Path,
  graph_x: CityGraph,
  graph_y: CityGraph,
  data_description: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
  """Trains the configured variant; returns Z^X, Z^Y as [K, N, d] and a log.

  `data_description` (city name -> `data_description(city)`) is saved with
  the checkpoints, and a checkpoint trained on other files is refused.
  """
  workdir = pathlib.Path(workdir)
  for name, graph in (("X", graph_x), ("Y", graph_y)):
    if graph.n_regions < MIN_REGIONS:
      raise ValueError(f"city {name} has {graph.n_regions} region(s): {_TOO_FEW_REGIONS}")
  settings = config.loss_settings()
  if config.shard_regions:
    mesh = sharding.region_mesh()
    n_devices = mesh.devices.size
    if settings.alpha > 0 and settings.n_anchors % n_devices:
      raise ValueError(
        f"shard_regions: {settings.n_anchors} anchors cannot be split over {n_devices} "
        f"devices; use a multiple of {n_devices}"
      )
    graph_x, graph_y = (pad_target_rows(g, n_devices) for g in (graph_x, graph_y))
    settings = dataclasses.replace(settings, mesh=mesh)
  model = build_model(config, graph_x, graph_y)
  seeds = jnp.arange(config.first_seed, config.first_seed + config.seeds)
  params, train_keys = init_params(model, seeds, graph_x, graph_y)

  joint = config.variant not in ("two-stage", "individual", "rp")
  stage_settings = settings if joint else dataclasses.replace(settings, alpha=0.0, beta=0.0)
  embed_loss = make_embed_loss(model, stage_settings)
  # Derived before the first stage, which donates (consumes) its keys.
  align_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(train_keys)
  params, log = _run_stage(
    "embed",
    workdir,
    config,
    embed_loss,
    params,
    train_keys,
    (graph_x, graph_y),
    config.epochs,
    data_description=data_description,
  )
  embed = jax.jit(jax.vmap(lambda p: model.apply({"params": p}, graph_x, graph_y)))
  z_x, z_y, query_key = embed(params)
  logs = {"embed": log}

  if config.variant == "two-stage":
    z_x, z_y, log = _align_frozen(
      config, workdir, settings, z_x, z_y, query_key, align_keys, data_description
    )
    logs["align"] = log
  z_x, z_y = sharding.to_host(z_x), sharding.to_host(z_y)
  seeds = range(config.first_seed, config.first_seed + config.seeds)
  check_finite_outputs("CoRE embeddings", seeds, z_x, z_y)
  return z_x, z_y, logs


# 2: one affine layer per city (the paper's "w/o one-stage"), where revision 1
#    had a bias-free linear map on Z^Y only.
_ALIGN_STAGE_REVISION = 2


def _affine(layer: dict, z: jax.Array) -> jax.Array:
  return z @ layer["matrix"] + layer["bias"]


def _align_frozen(config, workdir, settings, z_x, z_y, query_key, keys, data_description=None):
  """Second stage of "two-stage": LMA + LIA on frozen embeddings.

  The CoRE paper's "w/o one-stage" ablation (§5.4): the embeddings of the
  first stage are "projected into two vector spaces via affine layers" and
  aligned with L^LMA and L^LIA, the encoders no longer moving. One affine
  layer per city (identity weight, zero bias at the start) and the
  cross-attention W^q, W^k are trained.
  """
  n_seeds, d = z_x.shape[0], z_x.shape[-1]

  def identity():  # fresh buffers per city: the training step donates its state
    return {"matrix": jnp.tile(jnp.eye(d), (n_seeds, 1, 1)), "bias": jnp.zeros((n_seeds, d))}

  params = {"affine_x": identity(), "affine_y": identity(), "query_key": query_key}

  def align_loss(p, key, zx, zy):
    projected = _affine(p["affine_x"], zx), _affine(p["affine_y"], zy)
    terms = alignment_losses(*projected, p["query_key"], key, settings)
    total = total_loss(terms, settings)
    return total, {"total": total, **terms}

  params, log = _run_stage(
    "align",
    workdir,
    config,
    align_loss,
    params,
    keys,
    (z_x, z_y),
    config.epochs,
    per_seed_data=True,
    data_description=data_description,
    revision=_ALIGN_STAGE_REVISION,
  )
  project = jax.vmap(_affine)
  return project(params["affine_x"], z_x), project(params["affine_y"], z_y), log


def evaluate_embeddings(z_x, z_y, city_x, city_y, **translated) -> dict:
  """Cross-city scores in both directions, every metric a [K] array.

  ``translated`` optionally holds ``emb_y_in_x`` / ``emb_x_in_y`` for
  translation baselines (see `jaxurban.eval.cross_city.evaluate_pair`).
  """
  from jaxurban.eval.cross_city import evaluate_pair

  return evaluate_pair(
    z_x, z_y, city_x.labels, city_y.labels, city_x.name, city_y.name, **translated
  )


def train_and_evaluate(config: CoreConfig, workdir: str | pathlib.Path) -> dict:
  """Trains, evaluates and writes every output of a run into `workdir`.

  Outputs: ``<x>_region_emb.npy`` and ``<y>_region_emb.npy`` ([K, N, d]),
  ``metrics.json`` (config, per-seed scores, mean and std, reference row,
  timings), ``checkpoints/`` (orbax, resumable), ``embeddings.png`` and the
  training curves ``losses.png``.
  """
  from jaxurban.eval.cross_city import PUBLISHED_CORE, format_table

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # A finished run of other settings in this folder is not written over:
  # its checkpoints may be gone, and its other outputs would stay beside
  # this run's results.
  check_previous_results(workdir / "metrics.json", config.to_dict(), _RESUMABLE_KEYS)
  wall_start = time.perf_counter()
  city_x, graph_x = load_city_graph(config.city_x, config.data_root)
  city_y, graph_y = load_city_graph(config.city_y, config.data_root)
  data = {city.name: data_description(city) for city in (city_x, city_y)}
  for city in (city_x, city_y):
    _log(
      f"{city.name.upper()}: {city.n_regions} regions, {city.n_edges} mobility edges, "
      f"read from {city.source_dir}{_outside_data_root(city.source_dir, config.data_root)}"
    )
  _log(
    f"variant {config.variant}, {config.seeds} seed(s), {config.epochs} epochs, "
    f"devices {jax.devices()}"
  )
  z_x, z_y, logs = train_embeddings(config, workdir, graph_x, graph_y, data)
  translated = {}
  if config.variant == "rp":
    translated = rank_procrustes(z_x, z_y, city_x, city_y)
  train_seconds = time.perf_counter() - wall_start

  results = evaluate_embeddings(z_x, z_y, city_x, city_y, **translated)
  reference = PUBLISHED_CORE.get((city_x.name, city_y.name)) or PUBLISHED_CORE.get(
    (city_y.name, city_x.name)
  )
  _log(
    format_table(
      results,
      reference=reference,
      # The loss form changes the results as much as the variant does.
      name=config.variant
      + (f", {config.loss_form} loss form" if config.loss_form != "authors" else ""),
      reference_name="published CoRE embeddings",
    )
  )

  summary = {
    "config": config.to_dict(),
    "data": data,
    "seeds": list(range(config.first_seed, config.first_seed + config.seeds)),
    "scores": _to_lists(results),
    "summary": _mean_std(results),
    "published_embeddings_reference": reference,
    "train_seconds_including_compilation": train_seconds,
    "training_log": logs,
    "jax_version": jax.__version__,
    "software": software_versions(),
    "devices": [str(d) for d in jax.devices()],
  }
  # Under --distributed every process holds the whole result; one writes it
  # (the checkpoints above are written by all of them together).
  if jax.process_index() != 0:
    _log(f"process {jax.process_index()}: outputs written by process 0 into {workdir}")
    return summary
  # Outputs this run may not write (pictures under --no-plot) go first, so
  # that none of an earlier run's sits beside this run's results.
  remove_earlier_outputs(workdir, _DERIVED_OUTPUTS)
  save_npy_atomic(workdir / f"{city_x.name}_region_emb.npy", z_x.astype(np.float32))
  save_npy_atomic(workdir / f"{city_y.name}_region_emb.npy", z_y.astype(np.float32))
  if translated:
    save_npy_atomic(
      workdir / f"{city_y.name}_in_{city_x.name}_region_emb.npy", translated["emb_y_in_x"]
    )
    save_npy_atomic(
      workdir / f"{city_x.name}_in_{city_y.name}_region_emb.npy", translated["emb_x_in_y"]
    )
  write_json_atomic(workdir / "metrics.json", summary)
  if config.plot:
    from jaxurban.viz.embedding_plot import plot_city_embeddings

    # The picture shows the spaces the table scores: under RP that is Z^X
    # beside Z^Y mapped into X's space, not the two untranslated clouds.
    plotted_y, name_y = z_y[0], city_y.name.upper()
    if translated:
      plotted_y = translated["emb_y_in_x"][0]
      name_y = f"{city_y.name.upper()} mapped into {city_x.name.upper()}"
    plot_city_embeddings(
      z_x[0],
      plotted_y,
      city_x.labels["gdp"],
      city_y.labels["gdp"],
      city_x.name.upper(),
      name_y,
      workdir / "embeddings.png",
      title=f"{config.variant}, seed {config.first_seed}",
    )
    plot_training_curves(
      workdir, logs, f"{config.city_x.upper()}-{config.city_y.upper()}, {config.variant}"
    )
  _log(
    f"wrote {workdir}/metrics.json, embeddings and checkpoints "
    f"({time.perf_counter() - wall_start:.1f} s in all)"
  )
  return summary


def plot_training_curves(workdir: pathlib.Path, logs: dict, title: str) -> None:
  """``losses.png`` (and ``losses_<stage>.png`` for a second stage): each loss
  term against the epoch, averaged over seeds as it is logged."""
  from jaxurban.viz.loss_curves import plot_loss_history

  for stage, log in logs.items():
    if log.get("history"):
      name = "losses.png" if stage == "embed" else f"losses_{stage}.png"
      plot_loss_history(workdir / name, log["history"], title=f"{title}: {stage} stage")


def rank_procrustes(z_x, z_y, city_x, city_y) -> dict[str, np.ndarray]:
  """RP baseline on [K, N, d] embeddings: each city mapped into the other's
  space by rank anchoring on mobility volume + orthogonal Procrustes."""
  from jaxurban.core.baselines import mobility_volume, translate_both_ways

  volume = lambda c: mobility_volume(
    c.edge_origin, c.edge_destination, c.edge_weight_raw, c.n_regions
  )
  stat_x, stat_y = volume(city_x), volume(city_y)
  # Regions without any mobility are not ranked: their volumes all tie at 0.
  ranked_x, ranked_y = np.asarray(stat_x) > 0, np.asarray(stat_y) > 0
  y_in_x, x_in_y = jax.vmap(
    lambda a, b: translate_both_ways(a, b, stat_x, stat_y, ranked_x=ranked_x, ranked_y=ranked_y)
  )(jnp.asarray(z_x), jnp.asarray(z_y))
  return {"emb_y_in_x": np.asarray(y_in_x), "emb_x_in_y": np.asarray(x_in_y)}


def _to_lists(tree):
  return jax.tree.map(lambda v: np.asarray(v).tolist(), tree)


def _mean_std(results: dict) -> dict:
  return jax.tree.map(lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v))}, results)
