"""Prompt4RE: task-aware prompting of region embeddings (ToPT, Sec. 2.2.3).

Given region embeddings E [N, d] (from SREL) and frozen MLLM prompt vectors
P [M, D] (any width D: 4096 for LLaMA-3.2-11B-Vision, 3584 for Qwen2.5-VL-7B):

    att_i = softmax(E W_Q^(i) (P W_K^(i))^T / sqrt(d_i)) P W_V^(i)       (eq. 2)
    MHA(E, P) = Concat(att_1, ..., att_L)                                (eq. 3)
    P' = LayerNorm(MHA(E, P) + E W_res)                                  (eq. 4)
    S = P' W_S,   F = [E || S],   y_hat = F w + b

trained with the mean squared error. Sizes follow the authors' code
(``T_RAlign.py``): L = 4 heads, queries/keys of width d split into d / L per
head, values of width D / L per head (so MHA and P' have width D), dropout
0.1 on the attention weights, d_S = 144. As in the authors' code the output
layer starts from the ridge solution on the training folds for its E part
(``head_init="ridge"``), so training starts from the "w/o Prompt4RE" model.

Ablations (Table 1 of the ToPT paper):

* w/o task-relevant prompt: the same model on the prompt vectors made without
  a task template (data, not code: pass the ``none`` vectors);
* w/o P-R alignment (``alignment=False``): no cross-attention, each region's
  own prompt vector projected, S = P W_S, and F = [E || S];
* w/o Prompt4RE: ridge regression on E alone
  (:func:`jaxurban.eval.kfold.ridge_cv_predictions`).

Row-space basis. Every parameter that reads P (W_K, W_V, and W_S without
alignment) is a D x (.) matrix applied to rows of P, and P has rank r <= N,
so with the thin SVD P = U Sigma V^T, P W = (U Sigma)(V^T W): the same
functions are obtained from the r coordinates C = U Sigma and r x (.)
parameters. :func:`prompt_rowspace` computes C; ``value_basis="rowspace"``
trains on C (about 50 times fewer operations for D = 4096, N = 77). With a
basis of all N rows the model class is exactly the same and plain gradient
descent takes exactly the same steps; Adam's per-coordinate scaling makes its
steps differ. With each model's own training rows (below) this holds on
those rows only. Initial weights
use the scale of the original width D in both bases (C C^T = P P^T), so the
initial function has the same mean and covariance (not the same
distribution: P W sums D random terms per entry, C W' at most r).

Under ``context="split"`` each (fold) model's basis comes from its own
training rows only (:func:`prompt_rowspace_per_model`): V from the SVD of
P_train, every row's coordinates P V. A basis of all N rows would let a test
fold's prompt vectors decide the coordinates, hence Adam's steps, of the
model that is then tested on them. Held-out rows are projected onto the
training rows' span, and the part outside it is left out. In the full
parametrisation that part meets the initial weights plus what Adam moved
outside the span: the loss gradient lies in the span, but Adam's
per-coordinate scaling does not keep the steps there. So on held-out rows
the two parametrisations give different functions, most of all without
the alignment, where the prompt vectors reach the prediction linearly.
``value_basis="full"`` is the authors' parametrisation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import time
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxurban import interrupt
from jaxurban.atomic import atomic_write
from jaxurban.eval.kfold import masked_ridge_fit, fold_masks
from jaxurban.training import CHUNK_COMPILER_OPTIONS

__all__ = [
  "Prompt4RE",
  "Prompt4REConfig",
  "Trajectory",
  "cross_validated_trajectory",
  "init_params",
  "mse_loss",
  "prompt_rowspace",
  "prompt_rowspace_per_model",
]

CONTEXTS = ("split", "all")
BASES = ("rowspace", "full")
HEAD_INITS = ("ridge", "xavier")


@dataclasses.dataclass(frozen=True)
class Prompt4REConfig:
  """Prompt-learning stage of ToPT.

  Attributes:
    epochs: full-batch Adam steps per fold (paper: 3000).
    learning_rate: Adam step size (paper: 1e-4 crime and service call,
      3e-4 check-in; see :data:`PAPER_LEARNING_RATES`).
    soft_prompt_dim: width of the soft prompts S (paper: 144).
    n_heads: attention heads L (authors' code: 4).
    attention_dropout: dropout on the attention weights while training
      (authors' code: 0.1); none at evaluation.
    alignment: False is the "w/o P-R alignment" ablation (S = P W_S).
    context: which prompt vectors the regions attend to. "split" (authors'
      code): training regions attend to the training regions' prompts and a
      test fold attends to its own regions' prompts; "all": every region
      attends to all regions' prompts (label-free inputs, so no leakage).
    value_basis: "rowspace" (default, see the module docstring) or "full".
    head_init: "ridge" (authors) or "xavier" for the E part of the output layer.
    ridge_alpha: penalty of that initial ridge fit (authors: 1.0).
    eval_every: epochs between recorded test-fold predictions (authors: 20).
  """

  epochs: int = 3000
  learning_rate: float = 1e-4
  soft_prompt_dim: int = 144
  n_heads: int = 4
  attention_dropout: float = 0.1
  alignment: bool = True
  context: str = "split"
  value_basis: str = "rowspace"
  head_init: str = "ridge"
  ridge_alpha: float = 1.0
  eval_every: int = 20

  def __post_init__(self):
    for name, allowed in (
      ("context", CONTEXTS),
      ("value_basis", BASES),
      ("head_init", HEAD_INITS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"Prompt4REConfig.{name} must be one of {allowed}")
    if self.epochs < 1 or self.eval_every < 1 or self.epochs % self.eval_every:
      raise ValueError(
        f"Prompt4REConfig: epochs ({self.epochs}) must be a positive multiple of "
        f"eval_every ({self.eval_every})"
      )
    if not self.ridge_alpha > 0:  # alpha = 0 would leave d > N designs singular
      raise ValueError(f"Prompt4REConfig.ridge_alpha must be > 0, got {self.ridge_alpha}")


# Prompt-stage learning rates of the paper (Sec. 3.1, "Model Parameters").
PAPER_LEARNING_RATES = {"crime": 1e-4, "checkIn": 3e-4, "serviceCall": 1e-4}


def _symmetric_uniform(limit: float):
  """U(-limit, limit), PyTorch's nn.Linear default with limit = 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    kernel_init=_symmetric_uniform(1.0 / math.sqrt(fan_in)),
    bias_init=_symmetric_uniform(1.0 / math.sqrt(fan_in)),
    name=name,
  )


class Prompt4RE(nn.Module):
  """Cross-attention alignment of prompts to regions and the prediction head.

  Attributes:
    prompt_width: D, the width of the MLLM prompt vectors (sets the value
      width and the initial scale of the layers reading P, also when P is
      given in its row-space coordinates).
    soft_prompt_dim, n_heads, attention_dropout, alignment: see
      :class:`Prompt4REConfig`.
  """

  prompt_width: int
  soft_prompt_dim: int = 144
  n_heads: int = 4
  attention_dropout: float = 0.1
  alignment: bool = True

  @nn.compact
  def __call__(self, e, p, key_mask=None, *, deterministic: bool = True):
    """Predictions [N] for embeddings e [N, d] and prompts p [M, D or r].

    key_mask: optional boolean [M]; prompts outside it are not attended to.
    """
    n, d = e.shape
    width = self.prompt_width
    if self.alignment:
      h = self.n_heads
      if d % h or width % h:
        raise ValueError(
          f"Prompt4RE: embedding width {d} and prompt width {width} must both be "
          f"divisible by n_heads={h}"
        )
      head_dim = d // h
      # Eq. 2: one projection per head, stored as column blocks of one matrix.
      q = _torch_linear(d, d, "query")(e).reshape(n, h, head_dim)
      k = _torch_linear(d, width, "key")(p).reshape(p.shape[0], h, head_dim)
      v = _torch_linear(width, width, "value")(p).reshape(p.shape[0], h, width // h)
      scores = jnp.einsum("nhc,mhc->hnm", q, k) / math.sqrt(head_dim)
      if key_mask is not None:
        scores = jnp.where(key_mask[None, None, :], scores, -jnp.inf)
      weights = jax.nn.softmax(scores, axis=-1)
      weights = nn.Dropout(self.attention_dropout)(weights, deterministic=deterministic)
      # Eq. 3: heads concatenated back to width D.
      mha = jnp.einsum("hnm,mhc->nhc", weights, v).reshape(n, width)
      # Eq. 4: residual projection of E and layer norm (PyTorch's epsilon).
      aligned = nn.LayerNorm(epsilon=1e-5, name="norm")(
        mha + _torch_linear(width, d, "residual")(e)
      )
      s = _torch_linear(self.soft_prompt_dim, width, "soft_prompt")(aligned)
    else:
      # w/o P-R alignment: plain concatenation [E || P W_S].
      s = _torch_linear(self.soft_prompt_dim, width, "soft_prompt")(p)
    f = jnp.concatenate([e, s], axis=-1)  # F = [E || S]
    return _torch_linear(1, d + self.soft_prompt_dim, "head")(f)[:, 0]


def mse_loss(pred, target, mask=None):
  """Mean squared error over the regions where ``mask`` (all when None)."""
  sq = (pred - target) ** 2
  if mask is None:
    return jnp.mean(sq)
  w = mask.astype(sq.dtype)
  return jnp.sum(sq * w) / jnp.sum(w)


def prompt_rowspace(p: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
  """Coordinates C = U Sigma [N, r] of the rows of p in their own row space.

  Computed in float64; directions with singular value below ``rtol`` times the
  largest are dropped (they carry no signal). C C^T = P P^T, and for any W,
  P W = C (V^T W).
  """
  p64 = np.asarray(p, np.float64)
  u, sigma, _ = np.linalg.svd(p64, full_matrices=False)
  rank = int(np.sum(sigma > rtol * sigma[0]))
  return (u[:, :rank] * sigma[:rank]).astype(np.float32)


def prompt_rowspace_per_model(
  p: np.ndarray, train_masks: np.ndarray, rtol: float = 1e-10
) -> np.ndarray:
  """Row-space coordinates for each model from its own training rows, [F, N, r].

  For model f, P_f = P[train_masks[f]] = U Sigma V^T (float64, directions
  with singular value below ``rtol`` times the largest dropped) and every
  row's coordinates are P V: C C^T = P P^T on the training rows, and a
  held-out row is projected onto their span. Models whose rank is below the
  largest are padded with zero columns, which add nothing to any product
  and receive no gradient.
  """
  p64 = np.asarray(p, np.float64)
  bases = []
  for rows in np.asarray(train_masks, bool):
    _, sigma, vt = np.linalg.svd(p64[rows], full_matrices=False)
    rank = int(np.sum(sigma > rtol * sigma[0]))
    bases.append(vt[:rank].T)
  width = max(b.shape[1] for b in bases)
  out = np.zeros((len(bases), p64.shape[0], width), np.float32)
  for f, basis in enumerate(bases):
    out[f, :, : basis.shape[1]] = p64 @ basis
  return out


def init_params(model: Prompt4RE, key, e, p, ridge_weights=None, ridge_intercept=None):
  """Initial parameters; the output layer's E part from ridge when given.

  As in the authors' code the S part of the output layer is Xavier-normal and,
  with ridge weights, the E part and the bias are the ridge solution, so the
  initial prediction is the ridge prediction plus the soft-prompt term.
  """
  init_key, head_key = jax.random.split(key)
  params = model.init(init_key, e, p)["params"]
  d = e.shape[-1]
  fan_in = d + model.soft_prompt_dim
  std = math.sqrt(2.0 / (fan_in + 1))
  kernel = std * jax.random.normal(head_key, (fan_in, 1), e.dtype)
  bias = params["head"]["bias"]
  if ridge_weights is not None:
    kernel = kernel.at[:d, 0].set(ridge_weights.astype(e.dtype))
    bias = jnp.reshape(ridge_intercept, (1,)).astype(e.dtype)
  head = {"kernel": kernel, "bias": bias}
  return {**params, "head": head}


def _model(width: int, config: Prompt4REConfig) -> Prompt4RE:
  return Prompt4RE(
    prompt_width=width,
    soft_prompt_dim=config.soft_prompt_dim,
    n_heads=config.n_heads,
    attention_dropout=config.attention_dropout,
    alignment=config.alignment,
  )


def _over_seeds_and_folds(fn):
  """vmap over seeds (keys/state and embeddings) and folds (keys/state,
  prompt coordinates and masks)."""
  inner = jax.vmap(fn, in_axes=(0, None, 0, None, 0))
  return jax.vmap(inner, in_axes=(0, 0, None, None, None))


# Row masks of one fold's model, stacked as [3, N] per fold.
_TRAIN, _TEST, _VALIDATION = 0, 1, 2


@functools.partial(jax.jit, static_argnames=("width", "config"))
def _init_states(keys, e, p, y, masks, *, width, config):
  model = _model(width, config)
  optimizer = optax.adam(config.learning_rate)

  def one(key, e_s, p, y, m):
    # init_params splits its key into the layers' and the head's; the dropout
    # keys of training come from a separate branch so that no key is used twice.
    init_key, train_key = jax.random.split(key)
    if config.head_init == "ridge":
      ridge = masked_ridge_fit(e_s, y, m[_TRAIN], config.ridge_alpha)
      params = init_params(model, init_key, e_s, p, ridge.weights, ridge.intercept)
    else:
      params = init_params(model, init_key, e_s, p)
    return params, optimizer.init(params), train_key

  return _over_seeds_and_folds(one)(keys, e, p, y, masks)


@functools.partial(
  jax.jit,
  static_argnames=("width", "config", "validated"),
  donate_argnums=0,
  compiler_options=CHUNK_COMPILER_OPTIONS,
)
def _train_chunk(state, e, p, y, masks, *, width, config, validated):
  """``eval_every`` Adam steps for every (seed, fold), then the held-out predictions.

  Returns the new state, predictions made as for the test fold, those made as
  for the validation fold (None unless ``validated``), and the last loss.
  """
  model = _model(width, config)
  optimizer = optax.adam(config.learning_rate)

  def one(carry, e_s, p, y, m):
    train = m[_TRAIN]
    ones = jnp.ones_like(train)
    train_keys = train if config.context == "split" else ones

    def step(c, _):
      params, opt_state, key = c
      key, dropout_key = jax.random.split(key)

      def loss_fn(prm):
        pred = model.apply(
          {"params": prm}, e_s, p, train_keys, deterministic=False, rngs={"dropout": dropout_key}
        )
        return mse_loss(pred, y, train)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, key), loss

    carry, losses = jax.lax.scan(step, carry, None, length=config.eval_every)

    # With context "split" a held-out fold attends to its own regions' prompts,
    # so validation rows are predicted exactly as test rows would be.
    def held_out(rows):
      keys_rows = rows if config.context == "split" else ones
      return model.apply({"params": carry[0]}, e_s, p, keys_rows, deterministic=True)

    val_pred = held_out(m[_VALIDATION]) if validated else None
    return carry, held_out(m[_TEST]), val_pred, losses[-1]

  return _over_seeds_and_folds(one)(state, e, p, y, masks)


class Trajectory(NamedTuple):
  """Held-out predictions of every (seed, fold) model along training.

  predictions: [T, S, F, N] float32; for fold f only the rows of test fold f
    are out-of-fold.
  epochs: [T] epoch of each evaluation.
  validation: [T, S, F, N] predictions made as for fold f's validation rows
    (None when no validation folds were given).
  seconds_including_earlier_runs: the training's wall time, with that of the
    earlier runs a resumed (or reread) trajectory continues; None where
    those runs predate the record.
  """

  predictions: np.ndarray
  epochs: np.ndarray
  validation: np.ndarray | None
  seconds_including_earlier_runs: float | None = None


def cross_validated_trajectory(
  config: Prompt4REConfig,
  embeddings: np.ndarray,
  prompts: np.ndarray,
  labels: np.ndarray,
  fold_of: np.ndarray,
  n_folds: int,
  seeds: Sequence[int],
  progress: bool = True,
  log=print,
  validation_masks: np.ndarray | None = None,
  workdir=None,
  checkpoint_name: str = "prompt4re",
  started_at: float | None = None,
) -> Trajectory:
  """Trains one Prompt4RE per (seed, fold), all in one vectorised program.

  Args:
    config: the stage's settings.
    embeddings: [S, N, d] region embeddings, one set per seed.
    prompts: [N, D] prompt vectors of the same N regions.
    labels: [N] targets (raw counts, as in the authors' code).
    fold_of: [N] fold index of each region.
    n_folds: F.
    seeds: S integers; seed s initialises and drops out the models of seed s.
    validation_masks: optional [F, N] rows held out of fold f's training (and
      of its initial ridge fit) to choose its epoch
      (`jaxurban.eval.kfold.validation_masks`); they must not overlap fold f.
    workdir: when given, the models and the trajectory so far are saved under
      ``workdir/checkpoints/<checkpoint_name>_<digest>`` at every progress
      line, the digest covering the settings and the inputs, and a rerun with
      the same ones resumes from there (bit-equal to an uninterrupted run:
      the dropout keys travel in the state); other settings or inputs train
      afresh under their own name.
    started_at: the `time.perf_counter()` from which the caller times this
      training (default: the start of the epochs), so that the seconds
      returned, which include earlier runs of a resumed training, are never
      below the caller's own figure.

  Returns:
    A `Trajectory` after epochs ``eval_every``, ``2 eval_every``, ...
  """
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 3 or embeddings.shape[0] != len(seeds):
    raise ValueError(f"embeddings must be [len(seeds)={len(seeds)}, N, d], got {embeddings.shape}")
  n = embeddings.shape[1]
  prompts = np.asarray(prompts, np.float32)
  labels = np.asarray(labels, np.float32)
  if prompts.shape[0] != n or labels.shape != (n,):
    raise ValueError(
      f"prompts {prompts.shape} and labels {labels.shape} must have N={n} rows like the embeddings"
    )
  width = prompts.shape[1]
  e, y = jnp.asarray(embeddings), jnp.asarray(labels)
  tests = fold_masks(fold_of, n_folds)  # [F, N]
  validated = validation_masks is not None
  vals = np.asarray(validation_masks, bool) if validated else np.zeros_like(tests)
  if vals.shape != tests.shape:
    raise ValueError(f"validation_masks must be [F={n_folds}, N={n}], got {vals.shape}")
  if np.any(vals & tests):
    raise ValueError("validation_masks overlap the test fold of the same model")
  train_rows = ~(tests | vals)
  masks = jnp.asarray(np.stack([train_rows, tests, vals], axis=1))  # [F, 3, N]
  # [F, N, r or D]: the prompts as each fold's model reads them.
  if config.value_basis == "full":
    p = jnp.broadcast_to(jnp.asarray(prompts), (n_folds, *prompts.shape))
  elif config.context == "split":
    p = jnp.asarray(prompt_rowspace_per_model(prompts, train_rows))
  else:  # "all": every model attends to every region's prompts anyway
    c = prompt_rowspace(prompts)
    p = jnp.broadcast_to(jnp.asarray(c), (n_folds, *c.shape))
  keys = jnp.stack(
    [
      jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s)), f) for f in range(n_folds)])
      for s in seeds
    ]
  )  # [S, F, 2]
  state = _init_states(keys, e, p, y, masks, width=width, config=config)
  n_chunks = config.epochs // config.eval_every
  every = max(1, n_chunks // 10)
  # [T, S, F, N] trajectories, filled chunk by chunk (NaN until written), so
  # that a checkpoint holds the predictions made before it.
  shape = (n_chunks, len(seeds), n_folds, n)
  trajectory = np.full(shape, np.nan, np.float32)
  val_trajectory = np.full(shape, np.nan, np.float32) if validated else None
  start, checkpointer = 0, None
  if workdir is not None:
    from jaxurban.checkpoint import Checkpointer, CheckpointUnreadable, check_same_config
    from jaxurban.digest import arrays_sha256

    run_config = {
      **dataclasses.asdict(config),
      "seeds": [int(s) for s in seeds],
      "n_folds": int(n_folds),
      "width": int(width),
      # With empty validation folds the masks match an unvalidated run's, but
      # the saved trajectory would lack the validation predictions.
      "validated": validated,
      # Whose rows span each model's prompt basis (all rows, before).
      "rowspace_rows": None
      if config.value_basis == "full"
      else ("training" if config.context == "split" else "all"),
      # The inputs themselves: a rerun on other embeddings, prompts, labels
      # or folds must not resume these models.
      "inputs_sha256": arrays_sha256(embeddings, prompts, labels, np.asarray(masks)),
    }
    # Named after the settings and inputs: a run with other ones (an ablation
    # into the same folder) trains afresh beside it instead of resuming it.
    name = f"{checkpoint_name}_{arrays_sha256(np.frombuffer(json.dumps(run_config).encode(), np.uint8))[:12]}"
    # A finished run keeps only its trajectory (the models' states of 5 seeds
    # x 10 folds take hundreds of MB); a rerun reads it back.
    finished = pathlib.Path(workdir) / "checkpoints" / f"{name}_trajectory.npz"
    if finished.exists():
      try:
        with np.load(finished, allow_pickle=False) as saved:
          saved_config = json.loads(str(saved["config"]))
          arrays = (saved["predictions"], saved["epochs"])
          validation = saved["validation"] if validated else None
          # NaN where the run predates the record.
          seconds = float(saved["seconds"]) if "seconds" in saved.files else float("nan")
      except Exception as error:  # truncated, edited, a field missing
        raise CheckpointUnreadable(
          f"{finished}: cannot be read ({type(error).__name__}: {error}); delete it to "
          "train these models afresh, or use another output folder"
        ) from error
      check_same_config(saved_config, run_config, str(finished))
      log(f"  prompt4re: finished before, trajectory read from {finished}")
      # A run killed between writing the trajectory and removing the models'
      # checkpoints left part of them; the trajectory is all that is kept.
      shutil.rmtree(pathlib.Path(workdir) / "checkpoints" / name, ignore_errors=True)
      return Trajectory(*arrays, validation, None if np.isnan(seconds) else seconds)
    checkpointer = Checkpointer(workdir, subdir=name, max_to_keep=1)
    if started_at is not None:
      checkpointer.time_from(started_at)
    template = {"chunk": np.zeros((), np.int32), "state": state, "pred": trajectory}
    if validated:
      template["val"] = val_trajectory
    restored = checkpointer.restore(template, run_config)
    if restored is not None:
      record = restored[1]
      start, state = int(record["chunk"]), record["state"]
      trajectory = np.array(record["pred"])
      val_trajectory = np.array(record["val"]) if validated else None
      log(f"  prompt4re: resuming at epoch {start * config.eval_every}/{config.epochs}")
  started = time.perf_counter() if started_at is None else started_at
  for i in range(start, n_chunks):
    state, pred, val_pred, loss = _train_chunk(
      state, e, p, y, masks, width=width, config=config, validated=validated
    )
    loss = np.asarray(loss)
    if not np.isfinite(loss).all():
      # Stop before a checkpoint keeps non-finite parameters.
      raise FloatingPointError(
        f"Prompt4RE: the training loss is not finite for {int((~np.isfinite(loss)).sum())} of "
        f"{loss.size} (seed, fold) models in epochs {i * config.eval_every + 1}-"
        f"{(i + 1) * config.eval_every}; no checkpoint written for them; try a lower learning rate"
      )
    trajectory[i] = np.asarray(pred)
    if validated:
      val_trajectory[i] = np.asarray(val_pred)
    if (i + 1) % every == 0 or i + 1 == n_chunks or interrupt.stop_requested():
      if progress:
        log(
          f"  prompt4re epoch {(i + 1) * config.eval_every}/{config.epochs}: "
          f"train mse {float(np.mean(loss)):.4g} (mean over seeds and folds)"
        )
      if checkpointer is not None:
        record = {"chunk": np.asarray(i + 1, np.int32), "state": state, "pred": trajectory}
        if validated:
          record["val"] = val_trajectory
        checkpointer.save(i + 1, record, run_config)
  epochs = np.arange(1, n_chunks + 1) * config.eval_every
  seconds = time.perf_counter() - started
  if checkpointer is not None:
    seconds = checkpointer.seconds_so_far()
    checkpointer.close()
    arrays = {
      "predictions": trajectory,
      "epochs": epochs,
      "config": json.dumps(run_config),
      "seconds": np.float64(np.nan if seconds is None else seconds),
    }
    if validated:
      arrays["validation"] = val_trajectory
    atomic_write(finished, lambda f: np.savez(f, **arrays))
    # Written first, so that a run killed here has one of the two.
    shutil.rmtree(checkpointer.directory)
  return Trajectory(trajectory, epochs, val_trajectory, seconds)
