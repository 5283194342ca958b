"""The shared chunked training loop's chunk length."""

import jax
import numpy as np
import pytest

from jaxurban import training
from jaxurban.training import chunk_length


@pytest.mark.parametrize(
  "epochs, log_every, start, expected",
  [
    (600, 50, 0, 50),
    (600, 40, 0, 40),
    (600, 7, 0, 6),
    (4000, 100, 0, 100),
    (10, 50, 0, 10),
    # Resumed from epoch 100 with chunks of at most 40: 25 divides both.
    (600, 40, 100, 25),
    (600, 50, 550, 50),
    (600, 50, 599, 1),
  ],
)
def test_chunks_end_at_the_last_epoch(epochs, log_every, start, expected):
  length = chunk_length(epochs, log_every, start)
  assert length == expected
  assert length <= log_every
  # Chunk boundaries from `start` land exactly on `epochs`.
  assert start % length == 0 and epochs % length == 0


@pytest.mark.parametrize(
  "epochs, log_every, start, noted",
  [
    (600, 50, 0, False),
    (600, 7, 0, False),  # chunks of 6: near enough
    (600, 40, 100, False),  # 25
    (600, 50, 599, False),  # one epoch left: one chunk of it
    (10, 50, 0, False),
    (601, 50, 0, True),  # prime: 601 chunks of one epoch
    (600, 50, 7, True),
  ],
)
def test_chunks_far_shorter_than_asked_are_announced(epochs, log_every, start, noted):
  length = chunk_length(epochs, log_every, start)
  note = training.short_chunk_note(epochs, log_every, start, length)
  assert (note is not None) == noted
  if noted:
    assert note.startswith(f"chunks of {length} epoch(s), not {log_every}")


def test_seed_and_rate_problems_name_what_is_wrong():
  assert training.seed_problems([0, 5, 2**32 - 1]) == []
  assert training.seed_problems([-1, 3, 2**32]) == [
    "seeds must lie in [0, 2**32), got [-1, 4294967296]"
  ]
  assert training.seed_problems([2**31], 2**31) == [
    "seeds must lie in [0, 2**31), got [2147483648]"
  ]
  # A range is shown whole; no range at all is the count check's to report.
  assert training.seed_range_problems(2**31 - 2, 3, 2**31) == [
    "seeds must lie in [0, 2**31), got 2147483646..2147483648"
  ]
  assert training.seed_range_problems(-1, 1, 2**31) == ["seeds must lie in [0, 2**31), got -1"]
  assert training.seed_range_problems(0, 2**31 + 1, 2**31) == [
    "seeds must lie in [0, 2**31), got 0..2147483648"
  ]
  assert training.seed_range_problems(0, 2**31, 2**31) == []
  assert training.seed_range_problems(5, 0, 2**31) == []
  assert training.rate_problems(lr=1e-3, other=None) == []
  problems = training.rate_problems(a=0.0, b=-1e-3, c=float("nan"), d=float("inf"))
  assert [p.split()[0] for p in problems] == ["a", "b", "c", "d"]
  assert all("must be a finite number > 0" in p for p in problems)


def test_non_finite_seeds_and_weight_problems():
  nan, inf = float("nan"), float("inf")
  # [S, epochs] and [S] totals: a seed is named once, by its own number.
  assert training.non_finite_seeds([3, 4, 5], [[1.0, 2.0], [nan, 1.0], [1.0, inf]]) == [4, 5]
  assert training.non_finite_seeds((0, 1), [1.0, 2.0]) == []
  assert training.weight_problems(alpha=0.0, beta=None) == []
  assert training.weight_problems(alpha=-1.0, beta=nan) == [
    "alpha must be a finite number >= 0, got -1.0",
    "beta must be a finite number >= 0, got nan",
  ]


def test_non_finite_parameters_and_outputs_name_their_seeds():
  import jax.numpy as jnp
  import numpy as np

  params = {
    "w": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [1.0, jnp.inf]]),
    "count": jnp.array([1, 2, 3]),  # integer leaves cannot be non-finite
  }
  finite = training.finite_per_seed(params)
  assert np.asarray(finite).tolist() == [True, False, False]
  assert training.non_finite_seeds([5, 6, 7], np.zeros(3), finite) == [6, 7]
  assert training.non_finite_seeds([5, 6, 7], np.array([0.0, 0.0, np.nan])) == [7]
  training.check_finite_outputs("run", [5, 6], np.ones((2, 3)), np.ones((2, 4)))
  bad = np.ones((2, 4))
  bad[1, 3] = np.inf
  with pytest.raises(FloatingPointError, match=r"^run: the outputs of seed\(s\) \[6\] are not"):
    training.check_finite_outputs("run", [5, 6], np.ones((2, 3)), bad)


def test_every_epoch_and_every_seed_draws_its_own_key():
  # CoRE's anchors are drawn from the step key: a key that stood still would
  # reuse the same anchors all run long; one shared by the seeds would
  # understate their spread.
  import jax
  import jax.numpy as jnp
  import optax

  from jaxurban.training import make_chunk

  def loss_fn(params, key, *data):
    draw = jax.random.uniform(key)
    return jnp.sum(params["w"]) * 0.0, {"draw": draw}

  optimizer = optax.sgd(0.1)

  def fresh_state():  # the chunk donates its state
    params = {"w": jnp.zeros((3, 2))}
    return params, jax.vmap(optimizer.init)(params), jax.random.split(jax.random.PRNGKey(0), 3)

  _, history = make_chunk(loss_fn, optimizer, 4, terms="mean")(fresh_state())
  draws = np.asarray(history["draw"])  # [seeds], each the mean over 4 epochs
  assert len(set(draws.round(7).tolist())) == 3
  state = fresh_state()
  per_epoch = []
  for _ in range(3):
    state, last = make_chunk(loss_fn, optimizer, 1, terms="last")(state)
    per_epoch.append(np.asarray(last["draw"]))
  assert len({tuple(d.round(7)) for d in per_epoch}) == 3  # a new draw every epoch


def test_core_seeds_get_distinct_training_keys():
  import jax.numpy as jnp

  from experiments.bench_scale import synthetic_city_graph
  from jaxurban.core import train
  from jaxurban.core.train import CoreConfig

  graphs = [synthetic_city_graph(n, seed) for seed, n in ((0, 20), (1, 25))]
  model = train.build_model(CoreConfig(features=8, heads=2), *graphs)
  _, keys = train.init_params(model, jnp.arange(4), *graphs)
  assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 4


def test_core_progress_lines_are_means_over_seeds(tmp_path):
  # What a CoRE stage logs, saves and plots for K seeds trained together is
  # the mean over the seeds (and over the chunk's epochs) of each term.
  import jax.numpy as jnp

  from jaxurban.core import train
  from jaxurban.core.train import CoreConfig

  def loss_fn(params, key, scale):
    squares = scale * params["w"] ** 2
    return squares, {"total": squares, "cubes": params["w"] ** 3}

  start = {"w": jnp.asarray([1.0, 3.0, -2.0])}  # one value per seed
  config = CoreConfig(seeds=3, epochs=2, log_every=1, learning_rate=1e-6)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  _, log = train._run_stage("toy", tmp_path, config, loss_fn, start, keys, (jnp.float32(2.0),), 2)
  assert [row["epoch"] for row in log["history"]] == [1, 2]
  for row in log["history"]:  # the parameters barely move at this rate
    assert row["total"] == pytest.approx(2.0 * (1 + 9 + 4) / 3, rel=1e-4)
    assert row["cubes"] == pytest.approx((1 + 27 - 8) / 3, rel=1e-4)


def test_a_seed_is_not_finite_when_any_of_its_parameters_is_not():
  import jax.numpy as jnp

  # Seed 1 is finite in its first leaf and NaN only in its second.
  params = {"a": jnp.ones((3, 2)), "b": jnp.array([[1.0], [jnp.nan], [2.0]])}
  assert np.asarray(training.finite_per_seed(params)).tolist() == [True, False, True]


def test_changed_settings_lists_the_fields_away_from_their_defaults():
  import dataclasses

  from jaxurban.training import changed_settings

  @dataclasses.dataclass(frozen=True)
  class Settings:
    epochs: int = 10
    rate: float = 1e-3
    tasks: tuple[str, ...] = ("a", "b")

  assert changed_settings(Settings(), ("epochs", "rate", "tasks")) == []
  changed = Settings(epochs=5, tasks=("a",))
  # In the order asked for, and only among the names asked about.
  assert changed_settings(changed, ("tasks", "rate", "epochs")) == [
    ("tasks", ("a",), ("a", "b")),
    ("epochs", 5, 10),
  ]
  assert changed_settings(changed, ("rate",)) == []
