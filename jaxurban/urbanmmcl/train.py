"""Pre-training, fine-tuning and evaluation of UrbanMMCL on one city.

Pipeline of `train_and_evaluate`:

1. inputs: the view graphs and raw features (`graphs`), the Chicago geo-text
   (byte tokens) and centroids, images when a folder is given;
2. pre-training, one seed after another, full batch, eq. (27)
   L = alpha L_mmcl + beta L_mvgcl, Adam(W); one jitted function runs a chunk
   of epochs under ``lax.scan`` with the state donated; a checkpoint after
   every chunk, from which a killed run resumes on the same trajectory;
3. region embeddings: the model in evaluation mode (VGAE means, no sampling
   noise), averaged over ``eval_walks`` walk draws with a fixed key;
4. ridge probe: `jaxurban.eval.kfold` out-of-fold Ridge(alpha) on the
   z-scored embeddings, against the same probe on the z-scored raw input
   features; MAE / RMSE / R2 of pooled predictions (zero check-in regions
   dropped);
5. fine-tuning (Sec. 3.5.2): an MLP head on the embedding with all encoder
   parameters updated, per test fold of a k-fold split: the next fold is the
   validation fold, the rest trains; the predictions kept are those of the
   epoch with the lowest validation loss, with early stopping after
   ``patience`` epochs without improvement. The test fold is never looked
   at. All folds train together under ``jax.vmap``. Regression uses MSE on
   labels standardised with the training folds' statistics; land-use
   classification (dominant ``landUse_dist`` category) uses cross-entropy
   and reports accuracy, macro F1 and macro recall.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxurban.checkpoint import (
  Checkpointer,
  remove_earlier_outputs,
  save_npy_atomic,
  write_json_atomic,
)
from jaxurban.data.errors import DataError, read_npy
from jaxurban.data.hafusion import load_city_views, load_region_texts
from jaxurban.data.root import resolve_data_root
from jaxurban.provenance import software_versions
from jaxurban.digest import arrays_sha256
from jaxurban.eval import kfold
from jaxurban.eval.metrics import classification_metrics
from jaxurban.training import (
  changed_settings,
  check_finite_outputs,
  finite_per_seed,
  rate_problems,
  weight_problems,
)
from jaxurban.urbanmmcl.graphs import (
  VIEW_NAMES,
  AblationError,
  build_view_graphs,
  dominant_landuse,
  raw_features,
)
from jaxurban.urbanmmcl.model import ModelConfig, UrbanMMCL, encode_texts, equal_earth, total_loss

__all__ = [
  "TASKS",
  "UrbanMMCLConfig",
  "load_geo_texts",
  "load_images",
  "make_train_step",
  "prepare",
  "train_and_evaluate",
]

TASKS = ("crime", "checkIn", "serviceCall")
LOCATION_FRAMES = ("city", "geoclip")
# GeoCLIP's location encoder: Equal Earth (x, y) * SF / 180 and random
# Fourier bands of sigma 2^0, 2^4, 2^8.
GEOCLIP_SCALE_FACTOR = 66.50336
GEOCLIP_BANDS = (1.0, 16.0, 256.0)
_RESULT_VERSION = 2
# Raised when a change of the model, its losses or its keys makes an older
# pre-training checkpoint another model; such checkpoints are refused.
# 2: the mobility row sum includes self-trips, reconstruction off the
# diagonal, multi-modal tau 0.5, one key per purpose.
# 3: GCN bias added after the propagation; views stacked as P, M, D.
# 4: the VGAE propagates over A, the walks' subgraphs carry the estimate of A
# (not A divided by the view's maximum).
# 5: the VGAE's mu and log sigma heads start at the prior (zero weights).
MODEL_REVISION = 5


# The settings of fine-tuning alone (Sec. 3.5.2).
_FINETUNE_SETTINGS = (
  "finetune_folds",
  "finetune_epochs",
  "finetune_lr",
  "patience",
  "finetune_tasks",
)


@dataclasses.dataclass(frozen=True)
class UrbanMMCLConfig:
  """One UrbanMMCL run on one city.

  Attributes:
    city: "Chi" or "NY".
    data_root: data folder; None reads ``$JAXURBAN_DATA``.
    images: folder of per-region images ``<i>.png`` or ``<i>.npy`` (region
      i in the HAFusion order; a ``.npy`` is H x W x 3, uint8 or floats in
      [0, 1]); None = no image modality. Images need text or location to
      be contrasted with (eq. 14).
    seeds, first_seed: pre-training seeds first_seed .. first_seed+seeds-1.
    epochs: full-batch pre-training epochs.
    learning_rate: AdamW learning rate of pre-training.
    weight_decay: AdamW weight decay of pre-training and of fine-tuning.
    alpha, beta: weights of eq. (27) (paper: 0.5 / 0.5).
    text_max_bytes: geo-text length kept (bytes; 768 keeps all of Chicago's, the
      longest being 739).
    image_size: images are resized (nearest neighbour) to this square size.
    location_frame: coordinates and bands of the location encoder. "city":
      Equal Earth (x, y) standardised within the city, bands
      ``model.loc_scales``; "geoclip": GeoCLIP's own configuration, world
      Equal Earth coordinates times SF / 180 (SF = 66.50336) and bands 2^0,
      2^4, 2^8, which vary smoothly across a city.
    model: architecture; the ``use_*`` switches and the location
      normalisation are filled in by `prepare` from the data and the
      ablation switches below.
    no_multimodal: ablation "w/o multi-modal part" (graph part only).
    no_graph: ablation "w/o graph part" (multi-modal part only).
    no_vgae, no_walks, no_graph_contrast: ablations "w/o VGAE", "w/o RW",
      "w/o GCL" (Sec. 4.3.4).
    drop_views: views removed ("poi", "mobility", "distance"); kept once
      each, in that order, so that the same ablation is one configuration
      (one checkpoint, one output folder) however its flags were given.
    ridge_folds, ridge_alpha, fold_seed: the ridge probe's k-fold protocol.
    ridge_alphas: the penalties the tuned probe chooses among, inside each
      training part (`kfold.ridge_cv_predictions_tuned`), for the embeddings
      and the raw features alike.
    eval_walks: walk draws averaged into the evaluation embedding.
    finetune_seeds: how many of the pre-trained seeds are fine-tuned (0 =
      no fine-tuning).
    finetune_folds, finetune_epochs, finetune_lr, patience: fine-tuning.
    finetune_tasks: tasks fine-tuned ("landuse" = classification).
    log_every: epochs per jitted chunk and per progress line.
  """

  city: str = "Chi"
  data_root: str | None = None
  images: str | None = None
  seeds: int = 5
  first_seed: int = 0
  epochs: int = 300
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  alpha: float = 0.5
  beta: float = 0.5
  text_max_bytes: int = 768
  image_size: int = 32
  location_frame: str = "city"
  model: ModelConfig = ModelConfig()
  no_multimodal: bool = False
  no_graph: bool = False
  no_vgae: bool = False
  no_walks: bool = False
  no_graph_contrast: bool = False
  drop_views: tuple[str, ...] = ()
  ridge_folds: int = 10
  ridge_alpha: float = 1.0
  ridge_alphas: tuple[float, ...] = kfold.RIDGE_ALPHAS
  fold_seed: int = 2024
  eval_walks: int = 4
  finetune_seeds: int = 1
  finetune_folds: int = 5
  finetune_epochs: int = 60
  finetune_lr: float = 1e-3
  patience: int = 20
  finetune_tasks: tuple[str, ...] = TASKS + ("landuse",)
  log_every: int = 50

  def __post_init__(self):
    if self.city not in ("Chi", "NY"):
      raise ValueError(f"city must be 'Chi' or 'NY', got {self.city!r}")
    unknown = sorted(set(self.drop_views) - set(VIEW_NAMES))
    if unknown:
      raise ValueError(f"drop_views: unknown view(s) {unknown}, expected names from {VIEW_NAMES}")
    canonical = tuple(v for v in VIEW_NAMES if v in self.drop_views)
    object.__setattr__(self, "drop_views", canonical)  # frozen: set once, here
    if self.location_frame not in LOCATION_FRAMES:
      raise ValueError(
        f"location_frame must be one of {LOCATION_FRAMES}, got {self.location_frame!r}"
      )
    counts = ("seeds", "epochs", "log_every", "eval_walks", "finetune_epochs")
    for name in counts:
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    # Fine-tuning holds out a test fold and a validation fold: a third trains.
    if self.finetune_folds < 3:
      raise ValueError(f"finetune_folds must be >= 3, got {self.finetune_folds}")
    if self.ridge_folds < 2:
      raise ValueError(f"ridge_folds must be >= 2, got {self.ridge_folds}")
    if not self.ridge_alpha > 0:  # alpha = 0 would leave d > N designs singular
      raise ValueError(f"ridge_alpha must be > 0, got {self.ridge_alpha}")
    if not self.ridge_alphas or not all(a > 0 for a in self.ridge_alphas):
      raise ValueError(f"ridge_alphas must be values > 0, got {self.ridge_alphas}")
    for problem in rate_problems(learning_rate=self.learning_rate, finetune_lr=self.finetune_lr):
      raise ValueError(problem)
    for problem in weight_problems(
      weight_decay=self.weight_decay, alpha=self.alpha, beta=self.beta
    ):
      raise ValueError(problem)
    if self.patience < 0:
      raise ValueError(f"patience must be >= 0, got {self.patience}")
    if not 0 <= self.finetune_seeds <= self.seeds:
      raise ValueError(f"finetune_seeds must be in [0, seeds={self.seeds}]")
    bad = set(self.finetune_tasks) - set(TASKS + ("landuse",))
    if bad:
      raise ValueError(f"unknown fine-tuning task(s) {sorted(bad)}")
    if self.finetune_seeds == 0:
      # Without fine-tuning its settings would change nothing but the
      # config recorded with the results.
      for name, value, default in changed_settings(self, _FINETUNE_SETTINGS):
        raise ValueError(
          f"{name}={value!r} has no effect with finetune_seeds=0 (no fine-tuning); leave it "
          f"at its default {default!r}"
        )


# ------------------------------------------------------------------ inputs

_BOILERPLATE = "The following is the geographical information description within the area."


def load_geo_texts(data_root=None, n_regions: int | None = None) -> list[str]:
  """Chicago geo-texts (address and POI composition), region i = entry i.

  The boilerplate first sentence and the centroid line are removed: the
  centroid is the location modality, and leaving its digits in the text
  would let text-location alignment be solved by reading numbers.
  ``n_regions``, when given, is the count the texts must match.
  """
  path, region_texts = load_region_texts(data_root)
  texts = []
  for text in region_texts:
    stripped = (line.strip() for line in text.splitlines())
    lines = [
      line
      for line in stripped
      if line and line != _BOILERPLATE and not line.startswith("Centroid Coordinates")
    ]
    texts.append("\n".join(lines))
  if n_regions is not None and len(texts) != n_regions:
    raise DataError(path, f"{len(texts)} geo-texts for {n_regions} regions", column="content")
  return texts


def load_images(folder, n: int, size: int) -> np.ndarray:
  """[n, size, size, 3] float32 in [0, 1] from ``<folder>/<i>.png`` or ``<i>.npy``.

  A ``.npy`` is H x W (grey) or H x W x C with C = 3 (RGB) or 4 (RGBA, the
  alpha dropped); uint8 values are divided by 255, and floats must already
  lie in [0, 1]. The scale follows the dtype, never one image's values, so
  that every region's image is read on the same scale.

  Raises:
    DataError: a region without its image, or with both a ``.png`` and a
      ``.npy``; an image named for no region (``<n>.png`` and above, or a
      number written with leading zeros: the folder is then not numbered as
      the regions are); an unreadable or out-of-range image.
  """
  import matplotlib.image as mpimg

  folder = pathlib.Path(folder)
  if not folder.is_dir():
    what = "a file, not a folder of images" if folder.exists() else "no such folder"
    raise DataError(folder, what, column="images")
  _check_image_names(folder, n)
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    png, npy = folder / f"{i}.png", folder / f"{i}.npy"
    if png.is_file() and npy.is_file():
      raise DataError(
        folder, f"region {i} has two images, {png.name} and {npy.name}; keep one", column="images"
      )
    source = npy if npy.is_file() else png
    if not source.is_file():
      raise DataError(
        folder, f"no image for region {i} ({png.name} or {npy.name})", column="images"
      )
    if source is npy:  # a DataError for archives, pickles and unreadable files
      image = read_npy(npy, column="images", shown=npy)
      if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise DataError(
          npy, f"dtype {image.dtype}, expected uint8 (0-255) or floats in [0, 1]", column="images"
        )
      scale = 255.0 if image.dtype == np.uint8 else 1.0
      image = image.astype(np.float32) / scale
    else:
      try:
        image = np.asarray(mpimg.imread(png), np.float32)
      except (OSError, ValueError, SyntaxError) as e:
        raise DataError(png, f"not a readable image ({e})", column="images")
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.size == 0:
      hint = (
        " (channels first? put them last)" if image.ndim == 3 and image.shape[0] in (3, 4) else ""
      )
      raise DataError(
        source, f"shape {image.shape}, expected H x W x 3 (or x 4){hint}", column="images"
      )
    if not np.all(np.isfinite(image)):
      raise DataError(source, "contains NaN or infinite values", column="images")
    if image.min() < 0.0 or image.max() > 1.0:
      raise DataError(
        source,
        f"values span [{image.min():g}, {image.max():g}], expected [0, 1] "
        "(floats) or 0-255 (uint8)",
        column="images",
      )
    image = image[..., :3]
    rows = np.arange(size) * image.shape[0] // size
    cols = np.arange(size) * image.shape[1] // size
    out[i] = image[rows][:, cols]
  return out


def _check_image_names(folder: pathlib.Path, n: int) -> None:
  """Refuses ``<number>.png`` / ``<number>.npy`` files that name no region 0..n-1."""

  def names_no_region(path: pathlib.Path) -> bool:
    stem = path.name[: -len(path.suffix)]
    if path.suffix not in (".png", ".npy") or not re.fullmatch(r"[0-9]+", stem):
      return False  # not an image of this folder's naming: left alone
    return int(stem) >= n or stem != str(int(stem))

  try:
    entries = list(folder.iterdir())
  except OSError as e:  # a folder that cannot be listed (permissions)
    raise DataError(folder, f"cannot be read ({e.strerror})", column="images") from None
  stray = sorted(
    (path.name for path in entries if names_no_region(path)),
    key=lambda name: (len(name), name),
  )
  if stray:
    shown = ", ".join(stray[:5]) + (", ..." if len(stray) > 5 else "")
    raise DataError(
      folder,
      f"{len(stray)} image file(s) named for no region ({shown}); the {n} regions are "
      f"numbered 0..{n - 1}, written without leading zeros",
      column="images",
    )


_KEY_PURPOSES = ("init", "train", "embed", "finetune")


def _purpose_key(seed: int, purpose: str) -> jax.Array:
  """The key of one use of a seed's randomness, apart from every other use.

  ``split(k, n)[i]`` equals ``fold_in(k, i)`` under JAX's partitionable
  threefry, so keys split from one parent for different uses can coincide;
  each use folds its own tag into the seed's key instead.
  """
  return jax.random.fold_in(jax.random.PRNGKey(seed), 1 + _KEY_PURPOSES.index(purpose))


def prepare(config: UrbanMMCLConfig):
  """(inputs dict of arrays, ModelConfig, metadata) for `config`.

  Raises AblationError when an ablation removes a view or modality the city
  does not have (the run would be the full model) or leaves no input.
  """
  graph_ablations = [
    flag
    for flag, on in (
      ("--no-vgae", config.no_vgae),
      ("--no-walks", config.no_walks),
      ("--no-graph-contrast", config.no_graph_contrast),
      ("--drop-view", bool(config.drop_views)),
    )
    if on
  ]
  if config.no_graph and graph_ablations:
    # Without the graph part these switches change nothing, and the run
    # would be 'w/o graph part' under another name.
    raise AblationError(
      f"--no-graph removes the whole graph part, so {', '.join(graph_ablations)} "
      "would change nothing; run 'w/o graph part' alone"
    )
  views = load_city_views(config.city, config.data_root)
  graphs = build_view_graphs(views, config.drop_views)
  one_view = len(graphs.names) < 2
  if not config.no_graph and config.no_vgae and (config.no_graph_contrast or one_view):
    # Eq. (26) without both of its parts: the graph encoders get no gradient
    # and would turn the raw features into embeddings through random weights.
    why = (
      "--no-graph-contrast"
      if config.no_graph_contrast
      else f"one view left ({graphs.names[0]}), which has no other to be contrasted with,"
    )
    raise AblationError(
      f"--no-vgae with {why} leaves the graph part without a loss, so its encoders would "
      "stay untrained; run 'w/o graph part' with --no-graph"
    )
  if one_view and not config.no_graph and not config.no_graph_contrast:
    raise AblationError(
      f"{config.city}: dropping {', '.join(config.drop_views)} leaves one view "
      f"({graphs.names[0]}), and graph contrast needs two, so the run would also be "
      "'w/o graph contrastive'; add --no-graph-contrast to run that on purpose"
    )
  inputs = {
    "features": raw_features(views),
    **graphs.model_inputs(),
  }
  has_text, has_location = config.city == "Chi", views.centroids is not None
  has_images = config.images is not None
  # Images alone make no multi-modal part (eq. 14 contrasts them with text or
  # location; refused below), so they do not count here.
  if config.no_multimodal and not (has_text or has_location):
    what = (
      "no text or location for its images to be contrasted with (eq. 14)"
      if has_images
      else "no text, location or images"
    )
    raise AblationError(
      f"{config.city} has {what}, so 'w/o multi-modal part' (no_multimodal) would run "
      "the full model"
    )
  if config.no_multimodal and has_images:
    raise AblationError(
      f"--images {config.images} and --no-multimodal: the images are a modality, which "
      "--no-multimodal removes, so they would not be read; give one or the other"
    )
  mm = not config.no_multimodal
  use_text = mm and has_text
  use_location = mm and has_location
  use_images = mm and has_images
  if config.location_frame != "city" and not use_location:
    why = "--no-multimodal removes it" if has_location else f"{config.city} has no centroids"
    raise AblationError(
      f"location_frame={config.location_frame!r} changes nothing: there is no location "
      f"modality ({why})"
    )
  model = dataclasses.replace(
    config.model,
    use_text=use_text,
    use_location=use_location,
    use_images=use_images,
    use_graph=not config.no_graph,
    use_vgae=not config.no_vgae,
    use_walks=not config.no_walks,
    use_graph_contrast=not config.no_graph_contrast,
    n_views=len(graphs.names),
  )
  text_bytes = None
  if use_text:
    texts = load_geo_texts(config.data_root, views.n_regions)
    inputs["tokens"] = encode_texts(texts, config.text_max_bytes, model.bytes_per_token)
    lengths = [len(text.encode("utf-8")) for text in texts]
    kept = int(inputs["tokens"].shape[1])
    text_bytes = {
      "kept": kept,
      "longest": max(lengths),
      "texts_cut": sum(length > kept for length in lengths),
    }
  if use_location:
    coords = views.centroids.astype(np.float32)
    if config.location_frame == "geoclip":
      model = dataclasses.replace(
        model,
        loc_scales=GEOCLIP_BANDS,
        loc_center=(0.0, 0.0),
        loc_scale=180.0 / GEOCLIP_SCALE_FACTOR,
      )
    else:
      xy = np.asarray(equal_earth(coords[:, 0], coords[:, 1]))
      model = dataclasses.replace(
        model,
        loc_center=tuple(float(v) for v in xy.mean(axis=0)),
        loc_scale=float(xy.std(axis=0).max()),
      )
    inputs["coords"] = coords
  if use_images and not (use_text or use_location):
    # Eq. (14) contrasts images with text and with location; alone, the
    # images would enter the graph part untrained by any contrastive loss.
    raise AblationError(
      f"{config.city}: images need text or location to be contrasted with (eq. 14), "
      "and this city has neither"
    )
  if use_images:
    inputs["images"] = load_images(config.images, views.n_regions, config.image_size)
  if not (use_text or use_location or use_images) and config.no_graph:
    raise AblationError(
      f"{config.city}: no modality available, so 'w/o graph part' has no input left"
    )
  landuse, classes = dominant_landuse(views)
  meta = {
    # The graph part's views; none without the graph part.
    "views": () if config.no_graph else graphs.names,
    # Geo-text bytes kept per region, and how many texts are longer (cut).
    "text_bytes": text_bytes,
    "modalities": [
      m for m, on in (("image", use_images), ("text", use_text), ("location", use_location)) if on
    ],
    "labels": views.labels,
    "landuse": np.searchsorted(classes, landuse).astype(np.int32),
    "n_classes": int(classes.size),
    "landuse_classes": classes,
    "n_regions": views.n_regions,
  }
  return {k: jnp.asarray(v) for k, v in inputs.items()}, model, meta


def text_cut_note(text_bytes: dict | None, n_regions: int) -> str | None:
  """The progress line saying how many geo-texts the encoder reads only in
  part (``meta["text_bytes"]`` of `prepare`); None when it reads them all."""
  if not text_bytes or not text_bytes["texts_cut"]:
    return None
  return (
    f"  note: {text_bytes['texts_cut']} of {n_regions} geo-texts are longer than the "
    f"{text_bytes['kept']} bytes the text encoder reads (text_max_bytes); the rest of each "
    f"is not read (longest: {text_bytes['longest']} bytes)"
  )


# ------------------------------------------------------------- pre-training


def make_train_step(model: UrbanMMCL, tx, alpha: float, beta: float):
  """Pure train step (params, opt_state, inputs, key) -> (params, opt_state, losses)."""

  def loss_fn(params, inputs, key):
    _, losses = model.apply(params, inputs, key, train=True)
    return total_loss(losses, alpha, beta), losses

  def step(params, opt_state, inputs, key):
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(losses, total=loss)

  return step


def _optimizer(lr: float, weight_decay: float):
  return optax.adamw(lr, weight_decay=weight_decay)


class _Compiled:
  """The jitted pre-training and embedding functions of one model, shared by all seeds."""

  def __init__(self, config: UrbanMMCLConfig, model_config: ModelConfig):
    self.model = UrbanMMCL(model_config)
    self.tx = _optimizer(config.learning_rate, config.weight_decay)
    step = make_train_step(self.model, self.tx, config.alpha, config.beta)
    model = self.model

    @functools.partial(jax.jit, static_argnums=(4,), donate_argnums=(0, 1))
    def chunk(params, opt_state, inputs, key, n):
      def body(carry, k):
        p, o, losses = step(*carry, inputs, k)
        return (p, o), losses

      keys = jax.random.split(key, n)
      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), keys)
      return params, opt_state, jax.tree.map(lambda v: v[-1], losses)

    @functools.partial(jax.jit, static_argnums=(3,))
    def embed(params, inputs, key, n_walks):
      keys = jax.random.split(key, n_walks)
      run = jax.vmap(lambda k: model.apply(params, inputs, k, train=False)[0])
      return jnp.mean(run(keys), axis=0)

    self.chunk, self.embed = chunk, embed


# Config fields that do not change a seed's pre-training: a checkpoint written
# with other values of these is still the same run.
_PRETRAIN_IRRELEVANT = (
  # Where the inputs were read from: what was read is compared instead
  # (the checkpoint's data_sha256 covers every input array, images included).
  "data_root",
  "images",
  "seeds",
  "first_seed",
  "ridge_folds",
  "ridge_alpha",
  "ridge_alphas",
  "fold_seed",
  "eval_walks",
  "finetune_seeds",
  "finetune_folds",
  "finetune_epochs",
  "finetune_lr",
  "patience",
  "finetune_tasks",
)


# Progress-line names of the loss terms.
_SHORT = {"graph_contrast": "gcl"}


def _pretrain(
  config, compiled: _Compiled, inputs, data_sha256: str, seed: int, log, workdir, started_at
):
  """Pre-trains one seed, checkpointing after every chunk of ``log_every`` epochs.

  A run killed part-way resumes from the last chunk it finished, and the
  resumed trajectory is the uninterrupted one: each chunk's random key is
  derived from the seed and the epoch it starts at, never from how the run
  got there. The loss history travels inside the checkpoint as a fixed-shape
  array (one row per chunk, NaN until written).
  """
  init_key, train_key = _purpose_key(seed, "init"), _purpose_key(seed, "train")
  params = compiled.model.init(init_key, inputs, jax.random.fold_in(init_key, 1), train=True)
  opt_state = compiled.tx.init(params)
  loss_names = sorted(jax.eval_shape(compiled.chunk, params, opt_state, inputs, train_key, 1)[2])
  active = compiled.model.config.active_losses()
  n_chunks = -(-config.epochs // config.log_every)
  record = {
    "params": params,
    "opt_state": opt_state,
    "epoch": np.asarray(0, np.int32),
    "history": np.full((n_chunks, 1 + len(loss_names)), np.nan, np.float64),
  }
  checkpointer = Checkpointer(workdir, subdir=f"pretrain_seed{seed}")
  # Timed from the caller's start, as the seed's own time is.
  checkpointer.time_from(started_at)
  checkpoint_config = {
    **_config_json(config),
    "model_revision": MODEL_REVISION,
    # What it was trained on: a run on another data root (or edited files)
    # with the same shapes must train afresh, not resume these weights.
    "data_sha256": data_sha256,
  }
  restored = checkpointer.restore(record, checkpoint_config, ignore=_PRETRAIN_IRRELEVANT)
  if restored is not None:
    record = restored[1]
    log(f"  seed {seed}: resuming pre-training at epoch {int(record['epoch'])}/{config.epochs}")
  params, opt_state = record["params"], record["opt_state"]
  done, table = int(record["epoch"]), np.array(record["history"])
  while done < config.epochs:
    n = min(config.log_every, config.epochs - done)
    chunk_key = jax.random.fold_in(train_key, done)
    params, opt_state, last = compiled.chunk(params, opt_state, inputs, chunk_key, n)
    last = {k: float(v) for k, v in last.items()}
    # The losses precede each epoch's update: the parameters after the
    # chunk's last update are checked on their own.
    # With Adam's moments, which can overflow while the parameters stay
    # finite (`finite_per_seed`).
    params_ok = bool(finite_per_seed(jax.tree.map(lambda leaf: leaf[None], (params, opt_state)))[0])
    if not (params_ok and all(np.isfinite(v) for v in last.values())):
      what = f"non-finite loss {last}" if params_ok else "non-finite parameters or optimiser state"
      raise FloatingPointError(
        f"UrbanMMCL pre-training of {config.city}, seed {seed}: {what} in epochs "
        f"{done + 1}-{done + n}; no checkpoint written for them"
      )
    table[done // config.log_every] = [done + n] + [last[k] for k in loss_names]
    done += n
    checkpointer.save(
      done,
      {
        "params": params,
        "opt_state": opt_state,
        "epoch": np.asarray(done, np.int32),
        "history": table,
      },
      checkpoint_config,
    )
    terms = "  ".join(f"{_SHORT.get(k, k)} {last[k]:.4f}" for k in active)
    log(f"  seed {seed} epoch {done}/{config.epochs}: {terms}")
  # With a resumed run's earlier attempts (None where not recorded).
  seconds_including_earlier_runs = checkpointer.seconds_so_far()
  checkpointer.close()
  # Terms this model does not compute are constant zeros: a flat zero line
  # would read as a loss that converged.
  history = [
    {"epoch": int(row[0]), **{k: float(v) for k, v in zip(loss_names, row[1:]) if k in active}}
    for row in table
    if np.isfinite(row[0])
  ]
  return params, history, seconds_including_earlier_runs


# ------------------------------------------------------------- evaluation


def _zscore(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  std = x.std(axis=-2, keepdims=True)
  return np.divide(x - x.mean(axis=-2, keepdims=True), std, out=np.zeros_like(x), where=std > 0)


def ridge_probe(
  embeddings: np.ndarray, labels: dict, config: UrbanMMCLConfig, tuned: bool = False
) -> dict:
  """Out-of-fold ridge scores per task of embeddings [S, N, d] (z-scored):
  with the fixed ``ridge_alpha``, or (``tuned``) with the penalty chosen
  among ``ridge_alphas`` inside each training part, whose choices are
  reported per seed and fold."""
  out = {}
  for task in TASKS:
    y = np.asarray(labels[task], np.float64)
    keep = kfold.keep_mask(task, y)
    fold_of = kfold.fold_assignment(int(keep.sum()), config.ridge_folds, config.fold_seed)
    x = _zscore(embeddings[:, keep])
    if tuned:
      pooled, chosen = kfold.ridge_cv_predictions_tuned(
        x, y[keep], fold_of, config.ridge_folds, config.ridge_alphas
      )
    else:
      pooled = kfold.ridge_cv_predictions(
        x, y[keep], fold_of, config.ridge_folds, config.ridge_alpha
      )
    out[task] = kfold.summarise(kfold.score_pooled(pooled, y[keep]))
    if tuned:
      out[task]["alpha_chosen"] = chosen.tolist()
  return out


class FineTuneModel(nn.Module):
  """The pre-trained encoder and a small MLP head (Sec. 3.5.2)."""

  config: ModelConfig
  outputs: int

  @nn.compact
  def __call__(self, inputs, key, train: bool):
    emb, _ = UrbanMMCL(self.config, name="encoder")(inputs, key, train)
    h = nn.relu(nn.Dense(self.config.dim, name="head_hidden")(emb))
    return nn.Dense(self.outputs, name="head_out")(h)


@functools.lru_cache(maxsize=8)
def _finetune_runner(config, model_config, outputs: int, classification: bool):
  """Jitted fine-tuning of all folds at once; cached so tasks share compilations.

  Returns run(params, inputs, y, train [F, N], val [F, N], keys [F]) ->
  (outputs of the best-validation epoch [F, N(, C)], that epoch [F]).
  """
  model = FineTuneModel(model_config, outputs)
  tx = _optimizer(config.finetune_lr, config.weight_decay)

  def loss_of(out, y, mask, mean, std):
    w = mask.astype(jnp.float32)
    if classification:
      per = optax.softmax_cross_entropy_with_integer_labels(out, y)
    else:
      per = (out[:, 0] - (y - mean) / std) ** 2
    return jnp.sum(per * w) / jnp.sum(w)

  def one_fold(params, inputs, y, train_m, val_m, fold_key):
    w = train_m.astype(jnp.float32)
    if classification:
      mean, std = 0.0, 1.0
    else:  # training folds' statistics only
      mean = jnp.sum(y * w) / jnp.sum(w)
      std = jnp.sqrt(jnp.sum(w * (y - mean) ** 2) / jnp.sum(w)) + 1e-6
    # Each purpose its own key: the evaluation walks must not be the walks
    # of any training epoch.
    eval_key = jax.random.fold_in(fold_key, 1)
    epoch_keys = jax.random.split(jax.random.fold_in(fold_key, 0), config.finetune_epochs)

    def train_loss(p, ep_key):
      return loss_of(model.apply(p, inputs, ep_key, True), y, train_m, mean, std)

    def epoch(carry, ep_key):
      p, o, best_val, best_out, best_ep, ep = carry
      updates, o = tx.update(jax.grad(train_loss)(p, ep_key), o, p)
      p = optax.apply_updates(p, updates)
      out = model.apply(p, inputs, eval_key, False)
      v = loss_of(out, y, val_m, mean, std)
      # Early stopping on the validation fold: after `patience` epochs
      # without improvement the kept outputs no longer change.
      better = (v < best_val) & (ep - best_ep <= config.patience)
      best_val = jnp.where(better, v, best_val)
      best_out = jnp.where(better, out, best_out)
      best_ep = jnp.where(better, ep, best_ep)
      return (p, o, best_val, best_out, best_ep, ep + 1), v

    out0 = model.apply(params, inputs, eval_key, False)
    init = (params, tx.init(params), jnp.inf, out0, jnp.int32(0), jnp.int32(0))
    carry, _ = jax.lax.scan(epoch, init, epoch_keys)
    best_out = carry[3]
    if not classification:
      best_out = best_out[:, 0] * std + mean
    return best_out, carry[4]

  return jax.jit(jax.vmap(one_fold, in_axes=(None, None, None, 0, 0, 0)))


def _finetune_task(config, model_config, pre_params, inputs, task, meta, seed, log) -> dict:
  n = meta["n_regions"]
  classification = task == "landuse"
  if classification:
    y = meta["landuse"]
    keep = np.ones(n, bool)
    outputs = meta["n_classes"]
  else:
    y = np.asarray(meta["labels"][task], np.float64)
    keep = kfold.keep_mask(task, y)
    outputs = 1
  k = config.finetune_folds
  fold_of = np.full(n, -1, np.int32)
  fold_of[keep] = kfold.fold_assignment(int(keep.sum()), k, config.fold_seed)
  test = fold_of[None, :] == np.arange(k)[:, None]  # [F, N]
  val = fold_of[None, :] == ((np.arange(k) + 1) % k)[:, None]
  train = keep[None, :] & ~test & ~val

  model = FineTuneModel(model_config, outputs)
  key = _purpose_key(seed, "finetune")
  params = model.init(jax.random.fold_in(key, 0), inputs, jax.random.fold_in(key, 1), train=False)
  params = {"params": dict(params["params"], encoder=pre_params["params"])}
  run = _finetune_runner(config, model_config, outputs, classification)
  y_j = jnp.asarray(y, jnp.int32 if classification else jnp.float32)
  folds = (jnp.asarray(train), jnp.asarray(val), jax.random.split(jax.random.fold_in(key, 2), k))
  per_fold, best_epochs = run(params, inputs, y_j, *folds)
  if classification:
    pred = np.asarray(
      jnp.argmax(kfold.pool_folds(jnp.moveaxis(per_fold, -1, 0), jnp.asarray(test)), 0)
    )
    result = classification_metrics(y, pred)
  else:
    pooled = np.asarray(kfold.pool_folds(per_fold, jnp.asarray(test)))
    scores = kfold.score_pooled(pooled[None, keep], y[keep])
    result = {m: float(v[0]) for m, v in scores.items()}
  result["best_epochs"] = np.asarray(best_epochs).tolist()
  log(
    f"  fine-tune seed {seed} {task}: "
    + ", ".join(f"{m} {v:.4f}" for m, v in result.items() if m != "best_epochs")
  )
  return result


# ------------------------------------------------------------------ driver


def _config_json(config) -> dict:
  """A config dataclass (the run's or the model's) as JSON types."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def train_and_evaluate(config: UrbanMMCLConfig, workdir, log=print) -> dict:
  """Pre-trains every seed, probes and fine-tunes; writes results to ``workdir``.

  Writes ``embeddings.npy`` [S, N, d], ``results.json`` and, per seed, the
  pre-training checkpoints under ``checkpoints/pretrain_seed<seed>`` (with the
  config); run again in the same ``workdir``, finished seeds are restored and
  an interrupted one resumes where it stopped. Returns the results
  dict (with the embeddings under "embeddings" and the land-use classes
  under "landuse", for plotting).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  inputs, model_config, meta = prepare(config)
  log(
    f"{config.city}: {meta['n_regions']} regions, views {meta['views'] or 'none'}, "
    f"modalities {meta['modalities'] or 'none'}, features {inputs['features'].shape[1]}"
  )
  note = text_cut_note(meta["text_bytes"], meta["n_regions"])
  if note:
    log(note)
  compiled = _Compiled(config, model_config)
  data_sha256 = arrays_sha256(*(inputs[k] for k in sorted(inputs)))
  embeddings, histories, params_list, times, times_all_runs = [], [], [], [], []
  for s in range(config.seeds):
    seed = config.first_seed + s
    start = time.perf_counter()
    params, history, seconds_all_runs = _pretrain(
      config, compiled, inputs, data_sha256, seed, log, workdir, started_at=start
    )
    times.append(time.perf_counter() - start)
    times_all_runs.append(seconds_all_runs)
    # Evaluation embeddings: VGAE means, averaged over eval_walks walk draws.
    embeddings.append(
      np.asarray(compiled.embed(params, inputs, _purpose_key(seed, "embed"), config.eval_walks))
    )
    check_finite_outputs(f"UrbanMMCL pre-training of {config.city}", [seed], embeddings[-1][None])
    histories.append(history)
    if s < config.finetune_seeds:
      params_list.append(params)
  embeddings = np.stack(embeddings)

  raw = np.asarray(inputs["features"])[None]
  results = {
    "version": _RESULT_VERSION,
    "config": _config_json(config),
    # The model as trained: the modalities the data allows, the location
    # frame and the ablations applied to the config's model settings.
    "model_config_used": _config_json(model_config),
    "data_root": str(resolve_data_root(config.data_root)),
    "software": software_versions(),
    # Which model the figures come from (checkpoints carry it too).
    "model_revision": MODEL_REVISION,
    "views": list(meta["views"]),
    "modalities": meta["modalities"],
    "text_bytes": meta["text_bytes"],
    "pretrain_seconds_per_seed": times,
    # A seed resumed from a checkpoint: also the earlier runs' time up to it
    # (None for a checkpoint that predates that record).
    "pretrain_seconds_per_seed_including_earlier_runs": times_all_runs,
    "history": histories,
    "ridge": {
      "embedding": ridge_probe(embeddings, meta["labels"], config),
      "raw_features": ridge_probe(raw, meta["labels"], config),
    },
    # The same probe with its penalty chosen per feature set inside each
    # training part: a fixed penalty suits one feature width better than
    # another (386 raw columns of New York's 180 regions need far more).
    "ridge_tuned": {
      "embedding": ridge_probe(embeddings, meta["labels"], config, tuned=True),
      "raw_features": ridge_probe(raw, meta["labels"], config, tuned=True),
    },
    "finetune": {},
  }
  for task in TASKS:
    for probe in ("ridge", "ridge_tuned"):
      e, r = (results[probe][which][task]["r2"] for which in ("embedding", "raw_features"))
      log(
        f"  {probe} {task}: embedding R2 {kfold.summary_text(e)} | raw features R2 {r['mean']:.4f}"
      )
  for s, params in enumerate(params_list):
    seed = config.first_seed + s
    for task in config.finetune_tasks:
      results["finetune"].setdefault(task, []).append(
        _finetune_task(config, model_config, params, inputs, task, meta, seed, log)
      )
  # The embeddings and results are written together, at the end: a run
  # stopped before (in the probes or fine-tuning, say) leaves an earlier
  # run's embeddings beside that run's results, not beside others. Files
  # derived from an earlier run's results (the command's table and pictures)
  # go first, so that they never sit beside results that are not theirs.
  remove_earlier_outputs(workdir, ("results.md", "embeddings.png", "losses.png"))
  save_npy_atomic(workdir / "embeddings.npy", embeddings)
  write_json_atomic(workdir / "results.json", results)
  # "landuse": class index per region; landuse_classes[index] = landUse_dist column.
  return dict(
    results, embeddings=embeddings, landuse=meta["landuse"], landuse_classes=meta["landuse_classes"]
  )
