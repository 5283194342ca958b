"""UrbanPG model: eq. 6 against float64 references, no N x N array, eq. 4, eq. 7, shapes, traces."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.data.traffic import Scaler
from jaxurban.urbanpg import train
from jaxurban.urbanpg.model import (
  ContextPrompts,
  UrbanPG,
  linear_context_attention,
  prompt_gate,
  softmax_context_attention,
)


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _linear_reference(q, k, v, p_t, p_s):
  """Explicit N x 3N kernel form: keys K, P_t, P_s all carry V; weights phi(q).phi(key)."""
  p_t = np.broadcast_to(p_t, k.shape)
  keys = np.concatenate([k, p_t, p_s], axis=1)  # [B, 3N, h, e]
  values = np.concatenate([v, v, v], axis=1)
  w = np.einsum("bnhk,bmhk->bhnm", _softmax(q, -1), _softmax(keys, -1))
  return np.einsum("bhnm,bmhv->bnhv", w / w.sum(-1, keepdims=True), values)


def test_linear_attention_matches_float64_reference(rng):
  b, n, h, e = 2, 23, 2, 5
  q, k, v, p_s = (rng.normal(size=(b, n, h, e)) for _ in range(4))
  for p_t in (rng.normal(size=(b, 1, h, e)), rng.normal(size=(b, n, h, e))):
    expected = _linear_reference(q, k, v, p_t, p_s)
    got = linear_context_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, p_t, p_s)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    with jax.enable_x64(True):
      exact = linear_context_attention(*(jnp.asarray(a, jnp.float64) for a in (q, k, v, p_t, p_s)))
      # An output that is a cancelling sum of O(1) values can be near zero,
      # so rtol alone is too strict there (5e-11 seen); over 500 draws the
      # absolute error stayed below 1.4e-15.
      np.testing.assert_allclose(np.asarray(exact), expected, rtol=1e-12, atol=1e-13)


def test_softmax_attention_matches_float64_reference(rng):
  b, n, h, e = 2, 11, 2, 4
  q, k, v, p_t, p_s = (rng.normal(size=(b, n, h, e)) for _ in range(5))
  logits = np.einsum("bnhk,bmhk->bhnm", q / np.sqrt(e), k + p_t + p_s)
  expected = np.einsum("bhnm,bmhv->bnhv", _softmax(logits, -1), v)
  with jax.enable_x64(True):
    got = softmax_context_attention(*(jnp.asarray(a) for a in (q, k, v, p_t, p_s)))
    # A weighted sum of values of both signs can cancel to ~1e-5, where
    # rounding of 1e-16 is a relative 1e-11; atol covers that (outputs are
    # of order 1; worst of 6,000 draws 2e-15), as in the linear form's test.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-13)


def test_prompt_gate_is_eq_7(rng):
  h, p_t, p_s = (rng.normal(size=(3, 4, 6)) for _ in range(3))
  expected = (h * (1 + p_t) + p_s) * p_t
  # In float64: float32 rounding of terms of size ~20 can cancel to ~1e-5.
  with jax.enable_x64(True):
    got = prompt_gate(*(jnp.asarray(a, jnp.float64) for a in (h, p_t, p_s)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _avals(getattr(inner, "jaxpr", inner))


def _square_arrays(attention: str, n: int) -> int:
  config = train.UrbanPGConfig(features=8, heads=2, attention=attention)
  model = train.build_model(config, n)
  x = jnp.zeros((1, 12, n))
  zeros = jnp.zeros((1,), jnp.int32)
  # Shapes only: nothing is compiled or run.
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x > 0, zeros, zeros)["params"]
  batch = _batch(np.random.default_rng(0), 3, n)
  scaler = Scaler(50.0, 10.0)

  def loss(p):
    return train.batch_loss(model, scaler, p, batch, jax.random.PRNGKey(1))

  closed = jax.make_jaxpr(jax.value_and_grad(loss))(params)
  return sum(sum(dim == n for dim in getattr(a, "shape", ())) >= 2 for a in _avals(closed.jaxpr))


def test_no_n_by_n_array_in_the_traced_train_step():
  n = 37  # distinct from every other dimension
  assert _square_arrays("linear", n) == 0
  assert _square_arrays("softmax", n) > 0  # the detector does see N x N arrays


def _batch(rng, b, n, t=12):
  return {
    "x": rng.normal(size=(b, t, n)).astype(np.float32),
    "x_mask": rng.uniform(size=(b, t, n)) > 0.1,
    "y": rng.uniform(20, 70, size=(b, t, n)).astype(np.float32),
    "y_mask": (rng.uniform(size=(b, t, n)) > 0.1).astype(np.float32),
    "time_of_day": rng.integers(0, 288, b).astype(np.int32),
    "day_of_week": rng.integers(0, 7, b).astype(np.int32),
    "weight": np.ones(b, np.float32),
  }


@pytest.mark.parametrize("p, q", [(0.6, 0.5), (0.5, 0.8)])
def test_spatial_perturbation_only_in_training(p, q):
  n, d, b = 400, 8, 4
  prompts = ContextPrompts(n, d, p=p, q=q)
  tod = jnp.arange(b)
  variables = prompts.init(jax.random.PRNGKey(0), tod, tod, b, False)
  e_s = np.asarray(variables["params"]["E_s"])
  e_d = np.asarray(variables["params"]["E_d"])
  apply = jax.jit(prompts.apply, static_argnums=(3, 4))
  _, p_s = apply(variables, tod, tod, b, False)
  np.testing.assert_array_equal(np.asarray(p_s), np.broadcast_to(e_s, (b, n, d)))
  _, p_s = apply(variables, tod, tod, b, True, rngs={"perturb": jax.random.PRNGKey(3)})
  p_s = np.asarray(p_s)
  kept = np.all(p_s == e_s, axis=-1)
  shared = np.all(p_s == e_d, axis=-1)
  noise = ~kept & ~shared
  # Eq. 4: kept with probability 1 - p, the shared E_d with p q, fresh noise
  # with p (1 - q); q = 0.8 tells p q from p (1 - q).
  for part, share in ((kept, 1 - p), (shared, p * q), (noise, p * (1 - q))):
    assert abs(part.mean() - share) < 0.05, (part.mean(), share)
  off = ContextPrompts(n, d, p=0.0).apply(variables, tod, tod, b, True)[1]
  np.testing.assert_array_equal(np.asarray(off), np.broadcast_to(e_s, (b, n, d)))


def test_time_prompt_indexes_the_last_step_and_shapes():
  n, b = 9, 5
  model = UrbanPG(n_nodes=n, t_out=7, features=8, heads=2, layers=2)
  data = _batch(np.random.default_rng(1), b, n)
  args = (data["x"], data["x_mask"], data["time_of_day"], data["day_of_week"])
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), *args)
  apply = jax.jit(model.apply)
  out = apply(variables, *args)
  chex.assert_shape(out, (b, 7, n))
  chex.assert_tree_all_finite(out)
  # Offsets and weekday rows start at zero; random tables test the sum of eq. 3.
  tables = np.random.default_rng(2)
  prompts = {
    k: tables.normal(size=v.shape).astype(np.float32)
    for k, v in variables["params"]["prompts"].items()
  }
  p_t, _ = ContextPrompts(n, 8).apply(
    {"params": prompts}, data["time_of_day"], data["day_of_week"], b, False
  )
  expected = (
    prompts["E_t"] + prompts["E_tod"][data["time_of_day"]] + prompts["E_dow"][data["day_of_week"]]
  )
  np.testing.assert_allclose(np.asarray(p_t[:, 0]), np.asarray(expected), rtol=1e-6)
  # Per-node time indices ([B, N]) are accepted too.
  tod = np.broadcast_to(data["time_of_day"][:, None], (b, n))
  dow = np.broadcast_to(data["day_of_week"][:, None], (b, n))
  same = apply(variables, data["x"], data["x_mask"], tod, dow)
  np.testing.assert_allclose(np.asarray(same), np.asarray(out), rtol=1e-5, atol=1e-5)
  assert set(variables["params"]) == {"prompts", "backbone"}
  # The backbone's parameter shapes do not depend on the node count.
  other = UrbanPG(n_nodes=2 * n, t_out=7, features=8, heads=2, layers=2)
  x2 = np.zeros((1, 12, 2 * n), np.float32)
  v2 = jax.eval_shape(
    other.init, jax.random.PRNGKey(0), x2, x2 > 0, np.zeros(1, int), np.zeros(1, int)
  )
  chex.assert_trees_all_equal_shapes(v2["params"]["backbone"], variables["params"]["backbone"])
  with pytest.raises(ValueError, match="nodes"):
    model.apply(variables, x2, x2 > 0, np.zeros(1, int), np.zeros(1, int))


def test_train_step_never_retraces_and_frozen_parameters_stay():
  n, b = 13, 8
  config = train.UrbanPGConfig(features=8, heads=2, batch_size=b)
  model = train.build_model(config, n)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  optimizer = train.make_optimizer(params, train.prompts_only, 1e-2, config)
  step = train.make_train_step(model, Scaler(50.0, 10.0), optimizer, max_traces=1)
  backbone = jax.device_get(params["backbone"])
  prompts = jax.device_get(params["prompts"])
  state = (params, optimizer.init(params), jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(4):
    state, loss = step(state, _batch(rng, b, n))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  chex.assert_trees_all_equal(jax.device_get(state[0]["backbone"]), backbone)
  moved = jax.tree.map(
    lambda a, c: np.abs(a - c).max(), jax.device_get(state[0]["prompts"]), prompts
  )
  for k in ("E_s", "E_t", "E_tod"):
    assert moved[k] > 0, (k, moved)


def test_days_and_slots_never_trained_add_nothing_to_the_time_prompt():
  # Los-loop covers one week: a chronological split evaluates on weekdays
  # that no training window shows, and a few-shot target trained on a few
  # hours on times of day it never saw. Their E_dow rows and E_tod offsets
  # must stay at the zero start, not be untrained random vectors in every key
  # and in eq. 7; such a prompt is the shared, trained E_t.
  n, b = 11, 8
  config = train.UrbanPGConfig(features=8, heads=2, batch_size=b)
  model = train.build_model(config, n)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(params["prompts"]["E_dow"]), 0.0)
  np.testing.assert_array_equal(np.asarray(params["prompts"]["E_tod"]), 0.0)
  e_t_start = np.asarray(params["prompts"]["E_t"])  # the step donates its state
  assert np.abs(e_t_start).min() > 0
  optimizer = train.make_optimizer(params, train.everything, 1e-2, config)
  step = train.make_train_step(model, Scaler(50.0, 10.0), optimizer, max_traces=1)
  state = (params, optimizer.init(params), jax.random.PRNGKey(1))
  rng = np.random.default_rng(3)
  trained_slots = np.arange(10, 20)
  for _ in range(3):
    batch = _batch(rng, b, n)
    batch["day_of_week"] = rng.integers(0, 2, b).astype(np.int32)  # Monday, Tuesday only
    batch["time_of_day"] = rng.choice(trained_slots, b).astype(np.int32)
    state, loss = step(state, batch)
    assert np.isfinite(float(loss))
  prompts = jax.device_get(state[0]["prompts"])
  assert np.abs(prompts["E_dow"][:2]).max() > 0  # the trained days moved
  np.testing.assert_array_equal(prompts["E_dow"][2:], 0.0)
  assert np.abs(prompts["E_t"] - e_t_start).max() > 0
  untrained = np.setdiff1d(np.arange(model.steps_per_day), trained_slots)
  np.testing.assert_array_equal(prompts["E_tod"][untrained], 0.0)
  assert np.abs(prompts["E_tod"][trained_slots]).max() > 0
  # An unseen day at an unseen slot reads E_t alone; at a seen slot, E_t plus its offset.
  tod = jnp.asarray([0, 5, 12, 15, 100, 200, 250, 287])
  p_t, _ = ContextPrompts(n, 8).apply({"params": prompts}, tod, jnp.full((b,), 5), b, False)
  np.testing.assert_array_equal(
    np.asarray(p_t[:, 0]), prompts["E_t"] + prompts["E_tod"][np.asarray(tod)]
  )
  np.testing.assert_array_equal(np.asarray(p_t[0, 0]), prompts["E_t"])


def test_last_value_skip_adds_the_last_observed_input():
  n, b = 6, 4
  data = _batch(np.random.default_rng(2), b, n)
  mask = np.asarray(data["x_mask"]).copy()
  mask[:, -3:, :] = True
  mask[0, -1, :2] = False  # last reading missing: the one before it is added
  mask[1, -2:, 3] = False  # two missing: the third from last
  mask[2, :, 4] = False  # nothing observed: the scaled mean, 0
  args = (data["x"], mask, data["time_of_day"], data["day_of_week"])
  plain = UrbanPG(n_nodes=n, t_out=5, features=8, heads=2)
  skip = UrbanPG(n_nodes=n, t_out=5, features=8, heads=2, last_value_skip=True)
  variables = plain.init(jax.random.PRNGKey(0), *args)
  # Same parameters: the skip adds no parameter of its own.
  chex.assert_trees_all_equal_shapes(variables, skip.init(jax.random.PRNGKey(0), *args))
  difference = np.asarray(skip.apply(variables, *args)) - np.asarray(plain.apply(variables, *args))
  x = np.asarray(data["x"])
  last = x[:, -1, :].copy()
  last[0, :2] = x[0, -2, :2]
  last[1, 3] = x[1, -3, 3]
  last[2, 4] = 0.0
  np.testing.assert_allclose(difference, np.broadcast_to(last[:, None, :], (b, 5, n)), atol=1e-5)


def _layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _urbanpg_reference(params, x, x_mask, tod, dow, heads):
  """UrbanPG's forward (eqs. 3, 5-7 and the layer stack) in float64 NumPy."""
  pr = jax.tree.map(lambda a: np.asarray(a, np.float64), params["prompts"])
  bb = jax.tree.map(lambda a: np.asarray(a, np.float64), params["backbone"])

  def dense(name, a):
    return a @ bb[name]["kernel"] + bb[name]["bias"]

  b, _, n = x.shape
  d = pr["E_s"].shape[1]
  p_t = (pr["E_t"] + pr["E_tod"][tod] + pr["E_dow"][dow])[:, None, :]  # eq. 3, [B, 1, d]
  p_s = np.broadcast_to(pr["E_s"], (b, n, d))  # no perturbation at evaluation

  def gate(a):  # eq. 7
    return (a * (1.0 + p_t) + p_s) * p_t

  def split(a):
    return a.reshape(a.shape[0], a.shape[1], heads, d // heads)

  series = np.concatenate([x, x_mask.astype(np.float64)], axis=1).transpose(0, 2, 1)
  h = dense("input", series)
  layer = 0
  while f"qkv_{layer}" in bb:
    q, k, v = np.split(dense(f"qkv_{layer}", h), 3, axis=-1)
    att = _linear_reference(split(q), split(k), split(v), split(p_t), split(p_s)).reshape(b, n, d)
    h_st = dense(f"attn_out_{layer}", att)
    norm = bb[f"norm_attn_{layer}"]
    h = _layer_norm(h + gate(h_st), norm["scale"], norm["bias"])
    m = dense(f"mlp_out_{layer}", _gelu_tanh(dense(f"mlp_in_{layer}", h)))
    norm = bb[f"norm_mlp_{layer}"]
    h = _layer_norm(h + gate(m), norm["scale"], norm["bias"])
    layer += 1
  return dense("output", h).transpose(0, 2, 1)


def test_forward_matches_float64_reference_of_the_layer_stack(rng):
  # The wiring of each layer: input projection of [x || mask], Q/K/V (eq. 5),
  # context attention (eq. 6), output projection, the prompt gate (eq. 7) on
  # the attention and on the MLP branch, each added to its residual and layer
  # normalised, then the output projection. Random prompt tables (not the
  # zero start of E_tod and E_dow) so that every term of eq. 3 is visible.
  n, b, heads, layers = 7, 3, 2, 2
  model = UrbanPG(n_nodes=n, t_out=5, features=8, heads=heads, layers=layers)
  data = _batch(rng, b, n)
  with jax.enable_x64(True):
    args = (
      jnp.asarray(data["x"], jnp.float64),
      jnp.asarray(data["x_mask"]),
      jnp.asarray(data["time_of_day"]),
      jnp.asarray(data["day_of_week"]),
    )
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    params = jax.tree.unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.5, size=s.shape)) for s in leaves]
    )
    out = np.asarray(jax.jit(model.apply)({"params": params}, *args))
  expected = _urbanpg_reference(
    params, data["x"].astype(np.float64), data["x_mask"], data["time_of_day"],
    data["day_of_week"], heads,
  )  # fmt: skip
  chex.assert_shape(out, (b, 5, n))
  np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)
