"""Training loops shared by the models: K seeds advanced by one jitted chunk.

Parameters and optimiser states carry a leading seed axis; one jitted,
vmapped function advances every seed by a chunk of epochs under
``lax.scan``, with the state donated. Drivers print progress and write
checkpoints between chunks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# XLA options for every training chunk. Region analysis in copy insertion
# lets the CPU compiler update the loop-carried parameters and Adam moments
# of the epoch loop in place instead of copying them each epoch: 10 % off a
# 5-seed Chicago SREL epoch (79.3 -> 71.1 ms, one process, alternating
# rounds), no change for CoRE, identical losses. Other backends ignore
# `xla_cpu_*` options.
CHUNK_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def seed_problems(seeds: Sequence[int], limit: int = 2**32) -> list[str]:
  """Seeds must fit the words the random keys are made from: [0, limit).

  `limit` is 2**31 where the seeds pass through a default (int32) jax array.
  """
  bad = [int(s) for s in seeds if not 0 <= int(s) < limit]
  exponent = limit.bit_length() - 1
  return [f"seeds must lie in [0, 2**{exponent}), got {bad}"] if bad else []


def seed_range_problems(first_seed: int, count: int, limit: int = 2**32) -> list[str]:
  """`seed_problems` for the seeds first_seed .. first_seed + count - 1; a
  count below 1 is reported by the caller's own count check, not here."""
  last_seed = first_seed + count - 1
  if count < 1 or (0 <= first_seed and last_seed < limit):
    return []
  # The whole range, as the flags gave it: its ends alone, listed as seeds
  # ("got [-1, -1]" for one seed), would read like two seeds.
  shown = str(first_seed) if count == 1 else f"{first_seed}..{last_seed}"
  return [f"seeds must lie in [0, 2**{limit.bit_length() - 1}), got {shown}"]


def rate_problems(**rates: float | None) -> list[str]:
  """Each named learning rate (None: a default chosen elsewhere) must be finite and > 0.

  A negative rate would climb the loss, and an infinite or NaN one makes
  every parameter NaN at the first step.
  """
  return _finite_problems(rates, "> 0", lambda v: v > 0)


def weight_problems(**weights: float | None) -> list[str]:
  """Each named loss or decay weight (None: unset) must be finite and >= 0."""
  return _finite_problems(weights, ">= 0", lambda v: v >= 0)


def changed_settings(config, names: Sequence[str]) -> list[tuple[str, object, object]]:
  """(name, value, default) of each of the config dataclass's fields `names`
  whose value is not the field's default, in the order of `names`.

  A config refuses such settings where they would have no effect: the run
  would compute the same thing under another label (and output folder).
  """
  defaults = {field.name: field.default for field in dataclasses.fields(config)}
  return [
    (name, getattr(config, name), defaults[name])
    for name in names
    if getattr(config, name) != defaults[name]
  ]


def _finite_problems(values: dict, bound: str, within: Callable[[float], bool]) -> list[str]:
  return [
    f"{name} must be a finite number {bound}, got {value}"
    for name, value in values.items()
    if value is not None and not (math.isfinite(value) and within(value))
  ]


def non_finite_seeds(seeds: Sequence[int], totals, params_finite=None) -> list[int]:
  """The seeds whose total loss (``totals`` [S, ...]) is not finite everywhere,
  or, given ``params_finite`` [S] (from `finite_per_seed`), whose parameters
  are not."""
  bad = ~np.isfinite(np.asarray(totals).reshape(len(seeds), -1)).all(axis=1)
  if params_finite is not None:
    bad |= ~np.asarray(params_finite, bool).reshape(len(seeds))
  return [int(seeds[i]) for i in np.flatnonzero(bad)]


def check_finite_outputs(what: str, seeds: Sequence[int], *outputs) -> None:
  """Raises FloatingPointError naming the seeds whose outputs ([S, ...]
  arrays, e.g. embeddings) hold a NaN or infinity.

  Finite parameters can still give non-finite outputs (a learning rate so
  large that the forward pass overflows); such outputs must not be saved or
  scored as if the model had trained.
  """
  finite = np.ones(len(seeds), bool)
  for output in outputs:
    finite &= np.isfinite(np.asarray(output).reshape(len(seeds), -1)).all(axis=1)
  if not finite.all():
    bad = [int(seeds[i]) for i in np.flatnonzero(~finite)]
    raise FloatingPointError(
      f"{what}: the outputs of seed(s) {bad} are not finite; try a lower learning rate"
    )


@jax.jit
def finite_per_seed(params) -> jax.Array:
  """[S] bool: whether every floating-point leaf of each seed's parameters
  (leading seed axis) is finite.

  A chunk's losses are computed before each epoch's update, so they cannot
  see a divergence in the chunk's last update: without this check its
  parameters would be checkpointed, and after the last chunk embedded.
  Given the optimiser state too, it catches what the parameters hide: a
  gradient whose square overflows makes Adam's second moment infinite and
  its updates zero, so the parameters stay finite but frozen for good.
  """
  flags = [
    jnp.isfinite(leaf).reshape(leaf.shape[0], -1).all(axis=1)
    for leaf in jax.tree.leaves(params)
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.stack(flags).all(axis=0)


def chunk_length(epochs: int, log_every: int, start: int = 0) -> int:
  """Epochs per compiled chunk for a run from epoch `start` to `epochs`.

  The largest divisor of both `epochs` and `start` not above `log_every`, so
  that the chunks end exactly at `epochs` and every chunk boundary is a
  multiple of the length. A run resumed with another `log_every` than the
  one that wrote its checkpoint still stops at `epochs` and keeps saving.
  """
  span = math.gcd(epochs, start)
  return max(d for d in range(1, min(span, log_every) + 1) if span % d == 0)


def short_chunk_note(epochs: int, log_every: int, start: int, length: int) -> str | None:
  """A line for the log when `chunk_length` fell well below `log_every`
  (601 epochs run as 601 chunks of one), else None: each chunk costs a
  progress line and a wait for the device, so such a run is slower."""
  if 2 * length >= min(log_every, epochs - start):
    return None
  return (
    f"chunks of {length} epoch(s), not {log_every}: chunks must end at epoch {epochs} and "
    f"start at {start}, and no larger length divides both; a number of epochs divisible "
    "by --log-every runs faster"
  )


def make_chunk(
  loss_fn: Callable,
  optimizer: optax.GradientTransformation,
  length: int,
  per_seed_data: bool = False,
  terms: str = "mean",
) -> Callable:
  """A jitted function advancing all seeds by `length` epochs.

  ``loss_fn(params, key, *data) -> (loss, terms)``. The state is the tuple
  (params, opt_state, key) with a leading seed axis, and it is donated. The
  data arguments are shared by all seeds unless `per_seed_data`, when they
  too carry the seed axis. Returns the new state and, per seed, every loss
  term averaged over the chunk (`terms="mean"`) or of its last epoch
  (`terms="last"`).
  """
  if terms not in ("mean", "last"):
    raise ValueError(f"terms must be 'mean' or 'last', got {terms!r}")
  reduce = (lambda t: t.mean(axis=0)) if terms == "mean" else (lambda t: t[-1])

  def one_seed(state, *data):
    def epoch(carry, _):
      params, opt_state, key = carry
      key, step_key = jax.random.split(key)
      (_, step_terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, step_key, *data)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, key), step_terms

    state, history = jax.lax.scan(epoch, state, None, length=length)
    return state, jax.tree.map(reduce, history)

  def chunk(state, *data):
    data_axis = 0 if per_seed_data else None
    return jax.vmap(one_seed, in_axes=(0,) + (data_axis,) * len(data))(state, *data)

  return jax.jit(chunk, donate_argnums=0, compiler_options=CHUNK_COMPILER_OPTIONS)
