"""Prompt4RE (ToPT eqs. 2-4) against a float64 NumPy reference, ablations, training."""

from __future__ import annotations

import dataclasses
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.checkpoint import CheckpointUnreadable
from jaxurban.eval.kfold import fold_assignment, fold_masks, validation_masks
from jaxurban.topt import prompt4re
from jaxurban.topt.prompt4re import (
  Prompt4RE,
  Prompt4REConfig,
  cross_validated_trajectory,
  init_params,
  mse_loss,
  prompt_rowspace,
  prompt_rowspace_per_model,
)


def _reference(params, e, p, n_heads, key_mask=None):
  """Eqs. 2-4 and F = [E || S] -> linear head, written out in float64 NumPy."""
  e = np.asarray(e, np.float64)
  p = np.asarray(p, np.float64)
  prm = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

  def lin(name, x):
    return x @ prm[name]["kernel"] + prm[name]["bias"]

  n, d = e.shape
  width = prm["value"]["kernel"].shape[1]
  q, k, v = lin("query", e), lin("key", p), lin("value", p)
  dh, dv = d // n_heads, width // n_heads
  heads = []
  for i in range(n_heads):
    s = q[:, i * dh : (i + 1) * dh] @ k[:, i * dh : (i + 1) * dh].T / np.sqrt(dh)  # eq. 2
    if key_mask is not None:
      s = np.where(key_mask[None, :], s, -np.inf)
    a = np.exp(s - s.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    heads.append(a @ v[:, i * dv : (i + 1) * dv])
  x = np.concatenate(heads, axis=1) + lin("residual", e)  # eq. 3 + residual of eq. 4
  mu = x.mean(axis=1, keepdims=True)
  var = x.var(axis=1, keepdims=True)
  aligned = (x - mu) / np.sqrt(var + 1e-5) * prm["norm"]["scale"] + prm["norm"]["bias"]
  s = lin("soft_prompt", aligned)
  return lin("head", np.concatenate([e, s], axis=1))[:, 0]


@pytest.mark.parametrize("width", [3584, 4096])
def test_cross_attention_matches_float64_reference(width, rng):
  n, d, heads = 9, 16, 4
  e = rng.normal(size=(n, d))
  p = rng.normal(size=(n, width))
  key_mask = np.arange(n) % 3 != 1  # a fixed pattern: regions 1, 4 and 7 are not attended to
  model = Prompt4RE(prompt_width=width, soft_prompt_dim=12, n_heads=heads)
  with jax.enable_x64(True):
    params = init_params(
      model, jax.random.PRNGKey(0), jnp.asarray(e), jnp.asarray(p), jnp.ones(d), jnp.asarray(3.0)
    )
    out = model.apply({"params": params}, jnp.asarray(e), jnp.asarray(p), jnp.asarray(key_mask))
    chex.assert_shape(out, (n,))
    chex.assert_type(out, jnp.float64)
    # The mask matters: attending to the masked prompts too gives other outputs.
    unmasked = _reference(params, e, p, heads)
    assert np.abs(_reference(params, e, p, heads, key_mask) - unmasked).max() > 1e-3
    np.testing.assert_allclose(
      np.asarray(out), _reference(params, e, p, heads, key_mask), rtol=1e-10, atol=1e-8
    )
    # The head's E part and bias are the given ridge solution (authors' init).
    np.testing.assert_array_equal(np.asarray(params["head"]["kernel"][:d, 0]), np.ones(d))
    np.testing.assert_array_equal(np.asarray(params["head"]["bias"]), [3.0])
  # float32 run of the same model agrees with the float64 reference.
  params32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  out32 = model.apply(
    {"params": params32}, jnp.asarray(e, jnp.float32), jnp.asarray(p, jnp.float32)
  )
  np.testing.assert_allclose(
    np.asarray(out32), _reference(params, e, p, heads), rtol=2e-4, atol=2e-4
  )


def test_per_model_rowspace_reads_only_the_training_rows(rng):
  n, width = 9, 40
  p = rng.normal(size=(n, width))
  train = np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1]], bool)
  c = prompt_rowspace_per_model(p, train)
  assert c.shape == (2, n, 6)  # ranks 5 and 6, the first padded with a zero column
  np.testing.assert_array_equal(c[0, :, 5], 0.0)
  for f, rows in enumerate(train):
    # The training rows keep their Gram matrix; every row is projected onto
    # their span: P V with V from the training rows alone.
    np.testing.assert_allclose(c[f][rows] @ c[f][rows].T, p[rows] @ p[rows].T, atol=1e-4)
    _, _, vt = np.linalg.svd(p[rows], full_matrices=False)
    np.testing.assert_allclose(np.abs(c[f][:, : rows.sum()]), np.abs(p @ vt.T), atol=1e-5)
  # Other prompt vectors on the held-out rows change only those rows' coordinates.
  other = p.copy()
  other[~train[0]] = rng.normal(size=(int((~train[0]).sum()), width))
  c_other = prompt_rowspace_per_model(other, train[:1])
  np.testing.assert_array_equal(c_other[0][train[0]], c[0][train[0], :5])
  assert not np.allclose(c_other[0][~train[0]], c[0][~train[0], :5])


def test_rowspace_basis_gives_the_same_function(rng):
  n, d, width = 7, 8, 64
  e, p = rng.normal(size=(n, d)), rng.normal(size=(n, width))
  c = prompt_rowspace(p)
  assert c.shape == (n, n)
  model = Prompt4RE(prompt_width=width, soft_prompt_dim=6)
  with jax.enable_x64(True):
    full = model.init(jax.random.PRNGKey(1), jnp.asarray(e), jnp.asarray(p))["params"]
    # P W = (U Sigma)(V^T W): the row-space parameters are V^T W.
    _, _, vt = np.linalg.svd(p, full_matrices=False)
    rs = dict(full)
    for name in ("key", "value"):
      rs[name] = {**full[name], "kernel": jnp.asarray(vt @ np.asarray(full[name]["kernel"]))}
    out_full = model.apply({"params": full}, jnp.asarray(e), jnp.asarray(p))
    out_rs = model.apply({"params": rs}, jnp.asarray(e), jnp.asarray(c, np.float64))
  np.testing.assert_allclose(np.asarray(out_rs), np.asarray(out_full), rtol=1e-5, atol=1e-5)


def test_ablation_switches_change_the_computation(rng):
  n, d, width = 8, 8, 32
  e, p = jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.normal(size=(n, width)))
  key = jax.random.PRNGKey(2)
  aligned = Prompt4RE(prompt_width=width, soft_prompt_dim=4)
  concat = Prompt4RE(prompt_width=width, soft_prompt_dim=4, alignment=False)
  pa, pc = init_params(aligned, key, e, p), init_params(concat, key, e, p)
  assert {"query", "key", "value", "residual", "norm"} <= set(pa)
  assert set(pc) == {"soft_prompt", "head"}
  # w/o P-R alignment is exactly [E || P W_S] -> head.
  s = p @ pc["soft_prompt"]["kernel"] + pc["soft_prompt"]["bias"]
  expected = jnp.concatenate([e, s], 1) @ pc["head"]["kernel"][:, 0] + pc["head"]["bias"][0]
  np.testing.assert_allclose(concat.apply({"params": pc}, e, p), expected, rtol=1e-5, atol=1e-5)
  # Other prompt vectors (e.g. the no-task-template ones) change the output.
  other = jnp.asarray(rng.normal(size=(n, width)))
  assert not np.allclose(
    aligned.apply({"params": pa}, e, p), aligned.apply({"params": pa}, e, other)
  )
  # Dropout acts only when training.
  train = [
    aligned.apply(
      {"params": pa}, e, p, deterministic=False, rngs={"dropout": jax.random.PRNGKey(i)}
    )
    for i in range(2)
  ]
  assert not np.allclose(train[0], train[1])
  # Scoring, even with a dropout key supplied, is the dropout-free model.
  undropped = Prompt4RE(prompt_width=width, soft_prompt_dim=4, attention_dropout=0.0)
  reference = undropped.apply({"params": pa}, e, p)
  assert not np.allclose(train[0], reference)
  np.testing.assert_allclose(aligned.apply({"params": pa}, e, p), reference, rtol=1e-6, atol=1e-6)
  for i in range(2):
    scored = aligned.apply(
      {"params": pa}, e, p, deterministic=True, rngs={"dropout": jax.random.PRNGKey(i)}
    )
    np.testing.assert_allclose(scored, reference, rtol=1e-6, atol=1e-6)


def test_heads_must_divide_widths():
  model = Prompt4RE(prompt_width=30, n_heads=4)
  with pytest.raises(ValueError, match="divisible by n_heads"):
    model.init(jax.random.PRNGKey(0), jnp.ones((3, 8)), jnp.ones((3, 30)))


def test_mse_loss_masked():
  pred, y = jnp.array([1.0, 2.0, 5.0]), jnp.array([0.0, 2.0, 1.0])
  np.testing.assert_allclose(mse_loss(pred, y), 17.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(mse_loss(pred, y, jnp.array([True, True, False])), 0.5, rtol=1e-6)


def _tiny_problem(rng, n=24, d=8, width=16, seeds=1):
  e = rng.normal(size=(seeds, n, d)).astype(np.float32)
  p = rng.normal(size=(n, width)).astype(np.float32)
  y = (3.0 + e[0] @ rng.normal(size=d) + p @ rng.normal(size=width) * 0.5).astype(np.float32)
  return e, p, y


def test_initialisation_and_dropout_keys_are_distinct(rng, monkeypatch):
  """No key is used twice: the keys of every (seed, fold) model's initialisation
  (the one handed to init_params and the two it splits into) and the dropout
  keys of its first training steps are pairwise different, within a model and
  across models."""
  e, p, y = _tiny_problem(rng, n=12, seeds=2)
  n_folds = 3
  tests = fold_masks(fold_assignment(len(y), n_folds, seed=0), n_folds)
  masks = jnp.asarray(np.stack([~tests, tests, np.zeros_like(tests)], axis=1))
  keys = jnp.stack(
    [
      jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), f) for f in range(n_folds)])
      for s in (0, 1)
    ]
  )
  init_keys = []
  original = prompt4re.init_params

  def spy(model, key, *args):
    # Under vmap the callback runs once per (seed, fold).
    jax.debug.callback(lambda k: init_keys.append(np.asarray(k)), key)
    return original(model, key, *args)

  monkeypatch.setattr(prompt4re, "init_params", spy)
  config = Prompt4REConfig(epochs=20, eval_every=10, soft_prompt_dim=8)
  # Unjitted, so that the spy is traced whatever was compiled before.
  initial_state = prompt4re._init_states.__wrapped__(
    keys,
    jnp.asarray(e),
    jnp.broadcast_to(jnp.asarray(p), (n_folds, *p.shape)),  # each fold's view of the prompts
    jnp.asarray(y),
    masks,
    width=p.shape[1],
    config=config,
  )
  carry = np.asarray(initial_state[2])  # copied: the chunk below may reuse its buffer
  chex.assert_shape(carry, keys.shape)
  assert len(init_keys) == keys.shape[0] * n_folds

  # The dropout keys the training steps hand to the model, as they are used.
  dropout_keys = []
  original_model = prompt4re._model

  class RecordingModel:
    def __init__(self, module):
      self.module = module

    def __getattr__(self, name):  # init, soft_prompt_dim, ...: the module's own
      return getattr(self.module, name)

    def apply(self, variables, *args, rngs=None, **kwargs):
      if rngs is not None:
        jax.debug.callback(lambda k: dropout_keys.append(np.asarray(k)), rngs["dropout"])
      return self.module.apply(variables, *args, rngs=rngs, **kwargs)

  monkeypatch.setattr(prompt4re, "_model", lambda *a, **k: RecordingModel(original_model(*a, **k)))
  chunk = dataclasses.replace(config, epochs=3, eval_every=3)
  state, *_ = prompt4re._train_chunk.__wrapped__(
    initial_state,
    jnp.asarray(e),
    jnp.broadcast_to(jnp.asarray(p), (n_folds, *p.shape)),
    jnp.asarray(y),
    masks,
    width=p.shape[1],
    config=chunk,
    validated=False,
  )
  n_models = keys.shape[0] * n_folds
  assert len(dropout_keys) == 3 * n_models  # one per step of each (seed, fold) model
  # Each step splits the carried key into (carry, dropout key): the keys used
  # follow that chain from the carry _init_states returned, and the carry the
  # chunk returns is where the chain ends.
  expected, ends = [], []
  for key in np.asarray(carry).reshape(-1, keys.shape[-1]):
    chain = []
    for _ in range(3):
      key, dropout_key = jax.random.split(key)
      chain.append(np.asarray(dropout_key))
    expected.append(chain)
    ends.append(np.asarray(key))
  got = sorted(tuple(k.tolist()) for k in dropout_keys)
  assert got == sorted(tuple(k.tolist()) for chain in expected for k in chain)
  np.testing.assert_array_equal(np.asarray(state[2]).reshape(-1, keys.shape[-1]), np.stack(ends))
  used = [*init_keys, *(k for init_key in init_keys for k in jax.random.split(init_key))]
  used += [*dropout_keys, *ends]
  used = [tuple(np.asarray(k).tolist()) for k in used]
  assert len(set(used)) == len(used)


def test_each_model_is_built_with_the_configured_sizes_and_dropout():
  config = Prompt4REConfig(soft_prompt_dim=8, n_heads=2, attention_dropout=0.0, alignment=False)
  model = prompt4re._model(16, config)
  assert (model.prompt_width, model.soft_prompt_dim, model.n_heads) == (16, 8, 2)
  # Without dropout training sees the function that is evaluated.
  assert model.attention_dropout == 0.0 and model.alignment is False


def test_training_loss_decreases(rng, tmp_path):
  e, p, y = _tiny_problem(rng)
  fold_of = fold_assignment(len(y), 2, seed=0)
  config = Prompt4REConfig(
    epochs=200, eval_every=20, learning_rate=3e-3, attention_dropout=0.0, context="all",
    head_init="xavier", soft_prompt_dim=8,
  )  # fmt: skip
  run = cross_validated_trajectory(config, e, p, y, fold_of, 2, [0], progress=False)
  traj, epochs = run.predictions, run.epochs
  assert run.seconds_including_earlier_runs > 0  # no workdir: this run's own time
  # Timed from where the caller says its own figure starts (the pipeline
  # counts the models' set-up too), with a checkpoint folder or without.
  for workdir in (None, tmp_path):
    begun = time.perf_counter() - 100.0
    timed = cross_validated_trajectory(
      dataclasses.replace(config, epochs=20), e, p, y, fold_of, 2, [0], progress=False,
      workdir=workdir, started_at=begun,
    )  # fmt: skip
    assert 100.0 < timed.seconds_including_earlier_runs < time.perf_counter() - begun
  chex.assert_shape(traj, (10, 1, 2, len(y)))
  np.testing.assert_array_equal(epochs, np.arange(20, 201, 20))
  train = ~fold_masks(fold_of, 2)  # [F, N]
  mse = ((traj[:, 0] - y) ** 2 * train).sum(-1) / train.sum(-1)  # [T, F]
  assert np.all(mse[-1] < 0.5 * mse[0]), mse[[0, -1]]


def test_test_fold_labels_do_not_leak(rng):
  """A test fold's predictions do not depend on that fold's labels."""
  e, p, y = _tiny_problem(rng, seeds=2)
  fold_of = fold_assignment(len(y), 3, seed=1)
  config = Prompt4REConfig(epochs=20, eval_every=10, learning_rate=1e-2, soft_prompt_dim=8)
  a, *_ = cross_validated_trajectory(config, e, p, y, fold_of, 3, [0, 1], progress=False)
  y2 = y.copy()
  y2[fold_of == 0] += 100.0
  b, *_ = cross_validated_trajectory(config, e, p, y2, fold_of, 3, [0, 1], progress=False)
  test0 = fold_of == 0
  np.testing.assert_allclose(a[:, :, 0][..., test0], b[:, :, 0][..., test0], rtol=1e-5, atol=1e-4)
  # ... while the other folds, which train on those labels, do change.
  assert not np.allclose(a[:, :, 1][..., ~test0], b[:, :, 1][..., ~test0])


def test_validation_folds_are_held_out_of_training(rng):
  """With validation folds, a model's test and validation rows are both unseen."""
  e, p, y = _tiny_problem(rng, n=30)
  n_folds = 3
  fold_of = fold_assignment(len(y), n_folds, seed=1)
  val = validation_masks(fold_masks(fold_of, n_folds))  # model f validates on fold f + 1
  config = Prompt4REConfig(epochs=20, eval_every=10, learning_rate=1e-2, soft_prompt_dim=8)
  a = cross_validated_trajectory(
    config, e, p, y, fold_of, n_folds, [0], progress=False, validation_masks=val
  )
  chex.assert_shape(a.validation, a.predictions.shape)
  y2 = y.copy()
  y2[fold_of == 0] += 100.0
  b = cross_validated_trajectory(
    config, e, p, y2, fold_of, n_folds, [0], progress=False, validation_masks=val
  )
  # Fold 0 is model 0's test fold and model 2's validation fold: neither moves.
  for model in (0, 2):
    np.testing.assert_allclose(
      a.predictions[:, :, model], b.predictions[:, :, model], rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
      a.validation[:, :, model], b.validation[:, :, model], rtol=1e-5, atol=1e-4
    )
  # Model 1 trains on fold 0.
  assert not np.allclose(a.predictions[:, :, 1], b.predictions[:, :, 1])
  # Without validation folds model 2 trains on fold 0 as well.
  c = cross_validated_trajectory(config, e, p, y, fold_of, n_folds, [0], progress=False)
  assert c.validation is None
  with pytest.raises(ValueError, match="overlap"):
    cross_validated_trajectory(
      config, e, p, y, fold_of, n_folds, [0], progress=False,
      validation_masks=fold_masks(fold_of, n_folds),
    )  # fmt: skip


@pytest.mark.parametrize("context", ["split", "all"])
@pytest.mark.parametrize("value_basis", ["rowspace", "full"])
def test_split_context_hides_the_other_folds_prompts(rng, context, value_basis):
  """context="split": a model's training rows attend only to its training rows'
  prompts and a held-out fold only to its own; "all": every row attends to
  every region's prompts.

  With validation folds model f tests on fold f, validates on fold f + 1 and
  trains on the third. New prompt vectors for fold 0 are then never seen by
  model 0 on its validation fold (fold 1) nor by model 2 on its test fold
  (fold 2) under "split", while under "all" both attend to them.
  """
  e, p, y = _tiny_problem(rng, n=12)
  n_folds = 3
  fold_of = fold_assignment(len(y), n_folds, seed=1)
  tests = fold_masks(fold_of, n_folds)  # [F, N]
  val = validation_masks(tests)
  np.testing.assert_array_equal(val, tests[[1, 2, 0]])
  # In the row-space basis each model's coordinates come from its own
  # training rows (a basis of all rows would carry fold 0's prompts into
  # every model's coordinates).
  config = Prompt4REConfig(
    epochs=2, eval_every=1, learning_rate=1e-2, soft_prompt_dim=8, context=context,
    value_basis=value_basis,
  )  # fmt: skip
  other = p.copy()
  other[tests[0]] = rng.normal(size=(int(tests[0].sum()), p.shape[1]))
  a, b = (
    cross_validated_trajectory(
      config, e, q, y, fold_of, n_folds, [0], progress=False, validation_masks=val
    )
    for q in (p, other)
  )
  unseen = {
    "model 0 on its validation fold": (a.validation, b.validation, 0, tests[1]),
    "model 2 on its test fold": (a.predictions, b.predictions, 2, tests[2]),
  }
  for what, (before, after, model, rows) in unseen.items():
    before, after = before[:, 0, model][:, rows], after[:, 0, model][:, rows]
    if context == "split":
      np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6, err_msg=what)
    else:
      assert np.abs(after - before).max() > 1e-3, what
  # Model 1 trains on fold 0: in either context its predictions move.
  assert np.abs(a.predictions[:, 0, 1] - b.predictions[:, 0, 1]).max() > 1e-3
  # Model 0 tests on fold 0, which attends to its own prompts in either
  # context: its test predictions move too.
  moved = a.predictions[:, 0, 0][:, tests[0]] - b.predictions[:, 0, 0][:, tests[0]]
  assert np.abs(moved).max() > 1e-3


@pytest.mark.parametrize("validated", [False, True])
def test_killed_run_resumes_to_the_uninterrupted_trajectory(rng, tmp_path, monkeypatch, validated):
  from jaxurban.checkpoint import Checkpointer

  e, p, y = _tiny_problem(rng, n=30, seeds=2)
  n_folds = 3
  fold_of = fold_assignment(len(y), n_folds, seed=1)
  val = validation_masks(fold_masks(fold_of, n_folds)) if validated else None
  config = Prompt4REConfig(epochs=30, eval_every=10, learning_rate=1e-2, soft_prompt_dim=8)

  def run(labels=y, workdir=tmp_path):
    return cross_validated_trajectory(
      config, e, p, labels, fold_of, n_folds, [0, 1], progress=False, validation_masks=val,
      workdir=workdir,
    )  # fmt: skip

  expected = run(workdir=None)
  original_save = Checkpointer.save
  saves = []

  def save_twice_then_die(self, step, state, cfg, **kwargs):
    original_save(self, step, state, cfg, **kwargs)
    saves.append(step)
    if len(saves) == 2:
      raise KeyboardInterrupt("killed after the second checkpoint")

  monkeypatch.setattr(Checkpointer, "save", save_twice_then_die)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(Checkpointer, "save", original_save)
  resumed = run()
  # Bit-equal: the dropout keys travel in the saved state.
  np.testing.assert_array_equal(resumed.predictions, expected.predictions)
  np.testing.assert_array_equal(resumed.epochs, expected.epochs)
  if validated:
    np.testing.assert_array_equal(resumed.validation, expected.validation)

  # A finished run keeps only its trajectory, not the models' states ...
  (saved,) = (tmp_path / "checkpoints").iterdir()
  assert saved.name.startswith("prompt4re_") and saved.name.endswith("_trajectory.npz")

  # ... and comes back from it without training again.
  def no_training(*args, **kwargs):
    raise AssertionError("trained although the checkpoint is complete")

  monkeypatch.setattr(prompt4re, "_train_chunk", no_training)
  reread = run()
  np.testing.assert_array_equal(reread.predictions, expected.predictions)
  # The time it took, the killed run's included, travels with the trajectory.
  assert reread.seconds_including_earlier_runs == resumed.seconds_including_earlier_runs > 0
  # A run killed after writing the trajectory, before removing the models'
  # checkpoints, left part of them: the rerun removes them.
  leftover = tmp_path / "checkpoints" / saved.name.removesuffix("_trajectory.npz") / "5" / "state"
  leftover.mkdir(parents=True)
  np.testing.assert_array_equal(run().predictions, expected.predictions)
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [saved.name]
  # Other labels (or embeddings, prompts, folds, settings) do not reuse these
  # models: that run trains afresh.
  with pytest.raises(AssertionError, match="trained although"):
    run(labels=y + 1.0)
  # A finished file cut short by hand is named, not a traceback from numpy.
  saved.write_bytes(saved.read_bytes()[:100])
  with pytest.raises(CheckpointUnreadable, match=rf"{saved.name}: cannot be read"):
    run()


def test_a_diverging_run_stops_before_its_checkpoint(rng, tmp_path):
  from jaxurban.checkpoint import Checkpointer

  e, p, y = _tiny_problem(rng, n=12)
  fold_of = fold_assignment(len(y), 2, seed=1)
  # Adam's first steps move every weight by about the learning rate.
  config = Prompt4REConfig(epochs=20, eval_every=10, learning_rate=1e30, soft_prompt_dim=8)
  with pytest.raises(
    FloatingPointError, match=r"not finite for \d+ of 2 \(seed, fold\).*epochs 1-10"
  ):
    cross_validated_trajectory(config, e, p, y, fold_of, 2, [0], progress=False, workdir=tmp_path)
  folders = [f.name for f in (tmp_path / "checkpoints").iterdir() if f.is_dir()]
  assert folders and all(Checkpointer(tmp_path, subdir=f).latest_step() is None for f in folders)


def test_initial_head_is_the_ridge_fit_of_each_models_training_rows(rng):
  # The authors' start: the E part and bias of the output layer are the ridge
  # solution (penalty ridge_alpha) on the model's own training rows, neither
  # its test fold nor its validation fold.
  e, p, y = _tiny_problem(rng, n=18, d=4, width=8)
  n_folds, alpha = 3, 7.0
  tests = fold_masks(fold_assignment(len(y), n_folds, seed=2), n_folds)
  vals = validation_masks(tests)
  train = ~(tests | vals)
  masks = jnp.asarray(np.stack([train, tests, vals], axis=1))
  keys = jnp.stack([jnp.stack([jax.random.PRNGKey(f) for f in range(n_folds)])])
  config = Prompt4REConfig(epochs=1, eval_every=1, soft_prompt_dim=4, ridge_alpha=alpha)
  params, _, _ = prompt4re._init_states(
    keys, jnp.asarray(e), jnp.broadcast_to(jnp.asarray(p), (n_folds, *p.shape)), jnp.asarray(y),
    masks, width=p.shape[1], config=config,
  )  # fmt: skip
  from tests.test_eval import _numpy_ridge

  head = params["head"]
  for f in range(n_folds):
    w, intercept = _numpy_ridge(e[0][train[f]], y[train[f]], alpha)
    np.testing.assert_allclose(np.asarray(head["kernel"][0, f, :4, 0]), w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(head["bias"][0, f]), [intercept], rtol=1e-4, atol=1e-4)


def test_head_without_ridge_is_xavier_normal():
  # Without ridge weights the whole output layer is Xavier-normal, as in the
  # authors' code: std sqrt(2 / (fan_in + fan_out)) with fan_out = 1.
  n, d, width, soft = 6, 8, 16, 144
  e, p = jnp.ones((n, d)), jnp.ones((n, width))
  model = Prompt4RE(prompt_width=width, soft_prompt_dim=soft, alignment=False)
  kernels = [
    np.asarray(init_params(model, jax.random.PRNGKey(i), e, p)["head"]["kernel"]) for i in range(4)
  ]
  values = np.concatenate(kernels).ravel()
  assert values.size == 4 * (d + soft)
  expected = np.sqrt(2.0 / (d + soft + 1))
  assert abs(values.std() / expected - 1.0) < 0.1, (values.std(), expected)
  assert abs(values.mean()) < 0.2 * expected


def test_models_are_seeded_by_the_seed_numbers_not_their_positions(rng):
  # Seed 7's models are the same whether it comes first or second (the
  # settings of the leakage test above, whose compiled programs this reuses).
  e, p, y = _tiny_problem(rng, seeds=2)
  fold_of = fold_assignment(len(y), 3, seed=1)
  config = Prompt4REConfig(epochs=20, eval_every=10, learning_rate=1e-2, soft_prompt_dim=8)
  first = cross_validated_trajectory(config, e[::-1], p, y, fold_of, 3, [7, 0], progress=False)
  second = cross_validated_trajectory(config, e, p, y, fold_of, 3, [0, 7], progress=False)
  np.testing.assert_allclose(
    first.predictions[:, 0], second.predictions[:, 1], rtol=1e-5, atol=1e-5
  )


def test_initial_ridge_fit_needs_a_positive_penalty():
  with pytest.raises(ValueError, match="ridge_alpha must be > 0"):
    Prompt4REConfig(ridge_alpha=0.0)
