"""Cross-city evaluation: ridge, metrics, the protocol and its reference table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Ridge

from jaxurban.eval.cross_city import (
  LABEL_NAMES,
  PUBLISHED_CORE,
  cross_city_scores,
  direction_key,
  evaluate_pair,
  format_table,
)
from jaxurban.eval.metrics import classification_metrics, regression_metrics
from jaxurban.eval.ridge import RidgeParams, ridge_fit, ridge_predict

# (N, d, T); T = None is a 1-D target. (30, 40) has d > N: X^T X is singular
# and only alpha makes eq. (1) solvable.
SHAPES = [(50, 5, None), (200, 16, 3), (30, 40, None), (120, 8, 1)]


def _numpy_ridge(x, y, alpha):
  """Eqs. (1)-(2) of jaxurban.eval.ridge, written out in float64 NumPy."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x_bar, y_bar = x.mean(0), y.mean(0)
  xc, yc = x - x_bar, y - y_bar
  w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
  return w, y_bar - x_bar @ w


def _problem(rng, n, d, t):
  x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
  y = rng.normal(size=(n,) if t is None else (n, t)) * 50 + 100
  return x, y


@pytest.mark.parametrize("n,d,t", SHAPES)
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_ridge_float64_matches_closed_form_and_sklearn(rng, n, d, t, alpha):
  x, y = _problem(rng, n, d, t)
  x_new = rng.normal(size=(17, d))
  w_ref, b_ref = _numpy_ridge(x, y, alpha)
  sk = Ridge(alpha=alpha).fit(x, y)
  with jax.enable_x64(True):
    params = jax.jit(ridge_fit)(jnp.asarray(x), jnp.asarray(y), alpha)
    pred = np.asarray(ridge_predict(params, jnp.asarray(x_new)))
    assert params.weights.dtype == jnp.float64
  w, b = np.asarray(params.weights), np.asarray(params.intercept)
  assert w.shape == ((d,) if t is None else (d, t))
  assert b.shape == (() if t is None else (t,))
  # With d > n and alpha 0.1 the system is ill-conditioned: a weight near 0
  # beside weights of ~10 carries absolute rounding of ~1e-12.
  scale = np.abs(w_ref).max()
  np.testing.assert_allclose(w, w_ref, rtol=1e-9, atol=1e-11 * scale)
  np.testing.assert_allclose(b, b_ref, rtol=1e-9, atol=1e-12)
  # sklearn drops a length-1 target axis from coef_; compare values only.
  np.testing.assert_allclose(w, sk.coef_.T.reshape(w.shape), rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(b, np.reshape(sk.intercept_, b.shape), rtol=1e-7, atol=1e-10)
  np.testing.assert_allclose(pred, np.reshape(sk.predict(x_new), pred.shape), rtol=1e-7)


@pytest.mark.parametrize("n,d,t", SHAPES[:2])
def test_ridge_float32_close_to_sklearn(rng, n, d, t):
  x, y = _problem(rng, n, d, t)
  params = ridge_fit(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  assert params.weights.dtype == jnp.float32
  pred = np.asarray(ridge_predict(params, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(pred, Ridge(alpha=1.0).fit(x, y).predict(x), rtol=1e-4)


@pytest.mark.parametrize("t", [None, 2])
def test_ridge_vmap_over_seeds(rng, t):
  k, n, d = 4, 60, 6
  xs = rng.normal(size=(k, n, d))
  y = _problem(rng, n, d, t)[1]
  x_new = rng.normal(size=(k, 9, d))
  with jax.enable_x64(True):
    params = jax.jit(jax.vmap(ridge_fit, in_axes=(0, None)))(jnp.asarray(xs), jnp.asarray(y))
    preds = np.asarray(jax.vmap(ridge_predict)(params, jnp.asarray(x_new)))
  assert isinstance(params, RidgeParams)
  for i in range(k):
    sk = Ridge(alpha=1.0).fit(xs[i], y)
    np.testing.assert_allclose(np.asarray(params.weights[i]), sk.coef_.T, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(preds[i], sk.predict(x_new[i]), rtol=1e-7)


def _numpy_metrics(y_true, y_pred):
  y_pred = np.where(y_pred < 0, 0.0, y_pred)
  err = y_pred - y_true
  rel = [abs(e) / abs(t) for e, t in zip(err, y_true) if t != 0]
  return {"mae": np.mean(np.abs(err)), "rmse": np.sqrt(np.mean(err**2)), "mape": np.mean(rel)}


def test_metrics_against_numpy(rng):
  y_true = rng.uniform(0, 100, size=300)
  y_true[rng.choice(300, 40, replace=False)] = 0.0
  y_pred = y_true + rng.normal(scale=30, size=300)  # many negatives
  assert (y_pred < 0).sum() > 10
  got = regression_metrics(jnp.asarray(y_true, jnp.float32), jnp.asarray(y_pred, jnp.float32))
  ref = _numpy_metrics(y_true, y_pred)
  for m in ref:
    np.testing.assert_allclose(float(got[m]), ref[m], rtol=2e-5)


def test_metrics_clipping_and_zero_labels():
  y_true = jnp.array([0.0, 10.0, 4.0, 0.0])
  y_pred = jnp.array([-3.0, -1.0, 6.0, 2.0])
  got = regression_metrics(y_true, y_pred)
  # clipped predictions [0, 0, 6, 2]: errors [0, 10, 2, 2]
  np.testing.assert_allclose(float(got["mae"]), 14 / 4)
  np.testing.assert_allclose(float(got["rmse"]), np.sqrt(108 / 4))
  # MAPE over the two non-zero labels only: (10/10 + 2/4) / 2
  np.testing.assert_allclose(float(got["mape"]), 0.75)


def test_metrics_vmap(rng):
  y_true = rng.uniform(1, 10, size=(3, 50))
  y_pred = y_true + rng.normal(size=(3, 50))
  got = jax.vmap(regression_metrics)(jnp.asarray(y_true), jnp.asarray(y_pred))
  for i in range(3):
    np.testing.assert_allclose(
      float(got["mape"][i]), _numpy_metrics(y_true[i], y_pred[i])["mape"], rtol=1e-5
    )


@pytest.mark.parametrize("n_classes, n", [(2, 9), (5, 40), (7, 13)])
def test_classification_metrics_match_sklearn(rng, n_classes, n):
  from sklearn.metrics import accuracy_score, f1_score, recall_score

  y_true = rng.integers(0, n_classes, size=n)
  # Some predicted classes never occur in the labels and the reverse.
  y_pred = rng.integers(1, n_classes + 1, size=n)
  got = classification_metrics(y_true, y_pred)
  assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
  assert got["recall_macro"] == pytest.approx(
    recall_score(y_true, y_pred, average="macro", zero_division=0)
  )
  for average in ("macro", "weighted"):
    assert got[f"f1_{average}"] == pytest.approx(
      f1_score(y_true, y_pred, average=average, zero_division=0)
    )
  perfect = classification_metrics(y_true, y_true)
  assert perfect == {"accuracy": 1.0, "f1_macro": 1.0, "recall_macro": 1.0, "f1_weighted": 1.0}
  with pytest.raises(ValueError, match="equal, non-empty"):
    classification_metrics(y_true, y_pred[:-1])


def _synthetic_pair(rng, k=None):
  d = 8
  shape = lambda n: (n, d) if k is None else (k, n, d)
  z_x, z_y = rng.normal(size=shape(70)), rng.normal(size=shape(50))
  labels = lambda n: {name: rng.uniform(0, 100, size=n) for name in LABEL_NAMES}
  return z_x, z_y, labels(70), labels(50)


def test_cross_city_scores_single_and_seeds(rng):
  z_x, _, lab_x, lab_y = _synthetic_pair(rng)
  zs_x, zs_y, _, _ = _synthetic_pair(rng, k=3)
  single = cross_city_scores(zs_x[1], lab_x, zs_y[1], lab_y)
  batched = cross_city_scores(zs_x, lab_x, zs_y, lab_y)
  assert list(batched) == list(LABEL_NAMES)
  for name in LABEL_NAMES:
    for m in ("mae", "rmse", "mape"):
      assert isinstance(single[name][m], float)
      assert batched[name][m].shape == (3,)
      np.testing.assert_allclose(batched[name][m][1], single[name][m], rtol=1e-12)
  # The protocol by hand with sklearn for one label: labels rounded to
  # float32 as the published evaluator does.
  y_src = lab_x["gdp"].astype(np.float32).astype(np.float64)
  y_tgt = lab_y["gdp"].astype(np.float32).astype(np.float64)
  pred = Ridge(alpha=1.0).fit(zs_x[1], y_src).predict(zs_y[1])
  ref = _numpy_metrics(y_tgt, pred)
  for m in ref:
    np.testing.assert_allclose(single["gdp"][m], ref[m], rtol=1e-9)
  # A shared 2-D target with a batched source.
  mixed = cross_city_scores(zs_x, lab_x, zs_y[1], lab_y)
  np.testing.assert_allclose(mixed["co2"]["mae"][1], single["co2"]["mae"], rtol=1e-12)
  f32 = cross_city_scores(zs_x[1], lab_x, zs_y[1], lab_y, precision="float32")
  np.testing.assert_allclose(f32["gdp"]["mae"], single["gdp"]["mae"], rtol=1e-4)


def test_evaluate_pair_keys_and_translated_targets(rng):
  z_x, z_y, lab_x, lab_y = _synthetic_pair(rng)
  out = evaluate_pair(z_x, z_y, lab_x, lab_y, "xa", "cd")
  assert list(out) == ["XA→CD", "CD→XA"] == [direction_key("xa", "cd"), direction_key("cd", "xa")]
  moved = evaluate_pair(z_x, z_y, lab_x, lab_y, "xa", "cd", emb_y_in_x=z_y + 1.0, emb_x_in_y=z_x)
  assert moved["CD→XA"] == out["CD→XA"]
  # XA→CD is scored on the translated target embeddings. (Not the MAE for
  # "!=": it is flat while the shift keeps as many residuals on each side,
  # so it came out equal for some seeds.)
  assert moved["XA→CD"] == cross_city_scores(z_x, lab_x, z_y + 1.0, lab_y)
  assert moved["XA→CD"]["gdp"]["rmse"] != out["XA→CD"]["gdp"]["rmse"]
  with pytest.raises(KeyError):
    cross_city_scores(z_x, lab_x, z_y, {"gdp": lab_y["gdp"]})


def _published(data_root):
  core = data_root / "core"
  emb_dir = core / "published_embeddings" / "cd-xa"
  emb = {c: np.load(emb_dir / f"{c}_region_emb.npy") for c in ("cd", "xa")}
  labels = {
    c: {name: np.load(core / c / f"{name}_{c}_sum.npy") for name in LABEL_NAMES}
    for c in ("cd", "xa")
  }
  return emb, labels


def test_published_embeddings_reproduce_reference_table(data_root):
  emb, labels = _published(data_root)
  results = evaluate_pair(emb["cd"], emb["xa"], labels["cd"], labels["xa"], "cd", "xa")
  reference = PUBLISHED_CORE[("cd", "xa")]
  assert set(results) == set(reference)
  for direction, rows in reference.items():
    for name, metrics in rows.items():
      for m, value in metrics.items():
        got = results[direction][name][m]
        assert round(got, 2) == pytest.approx(value, abs=1e-9), (
          f"{direction} {name} {m}: {got:.4f} vs published {value}"
        )
  # And the same numbers as sklearn's Ridge on the same inputs.
  for src, tgt in (("cd", "xa"), ("xa", "cd")):
    for name in LABEL_NAMES:
      y_src = labels[src][name].astype(np.float32).astype(np.float64)
      y_tgt = labels[tgt][name].astype(np.float32).astype(np.float64)
      pred = (
        Ridge(alpha=1.0)
        .fit(emb[src].astype(np.float64), y_src)
        .predict(emb[tgt].astype(np.float64))
      )
      ref = _numpy_metrics(y_tgt, pred)
      for m in ref:
        np.testing.assert_allclose(results[direction_key(src, tgt)][name][m], ref[m], rtol=1e-8)
  table = format_table(results, reference)
  for rows in reference.values():
    for metrics in rows.values():
      for value in metrics.values():
        assert f"{value:.2f}" in table


def test_format_table_contents():
  results = {
    "CD→XA": {
      "gdp": {"mae": np.array([170.0, 172.0]), "mape": np.array([4.5, 4.7])},
      "population": {"mae": 591.915, "mape": 4.317},
      "co2": {"mae": 136.2, "mape": 1.59},
    },
  }
  text = format_table(results, PUBLISHED_CORE[("cd", "xa")])
  assert "CD→XA" in text
  assert "171.00 ± 1.00" in text  # std with ddof=0
  assert "4.60 ± 0.10" in text
  assert "591.92" in text and "136.20" in text
  assert "170.13" in text  # the reference row
  assert "ddof=0" in text
  for col in ("GDP MAE", "GDP MAPE", "Population MAE", "Population MAPE", "CO2 MAE", "CO2 MAPE"):
    assert col in text
  # A single direction without its key is accepted.
  assert "171.00 ± 1.00" in format_table(results["CD→XA"])
  # The row title says how many seeds each cell averages.
  assert format_table(results, name="core").splitlines()[3].startswith("core, 2 seeds ")


def test_format_table_of_one_seed_shows_no_spread():
  one = {label: {"mae": np.array([170.0]), "mape": np.array([4.5])} for label in LABEL_NAMES}
  text = format_table({"CD→XA": one}, name="CoRE")
  assert "CoRE, 1 seed" in text and "170.00" in text and "4.50" in text
  assert "±" not in text and "ddof" not in text


def test_evaluate_pair_trains_each_direction_on_its_source(rng):
  # X→Y fits the ridge on Z^X with X's labels and scores T(Z^Y) against Y's
  # labels; Y→X the reverse, each with its own translated target.
  z_x, z_y, lab_x, lab_y = _synthetic_pair(rng)
  y_in_x, x_in_y = z_y + rng.normal(size=z_y.shape), z_x * 2.0 - 1.0
  out = evaluate_pair(z_x, z_y, lab_x, lab_y, "xa", "cd", emb_y_in_x=y_in_x, emb_x_in_y=x_in_y)
  assert out["XA→CD"] == cross_city_scores(z_x, lab_x, y_in_x, lab_y)
  assert out["CD→XA"] == cross_city_scores(z_y, lab_y, x_in_y, lab_x)
  untranslated = evaluate_pair(z_x, z_y, lab_x, lab_y, "xa", "cd")
  assert out["CD→XA"]["gdp"]["mae"] != untranslated["CD→XA"]["gdp"]["mae"]


def test_cross_city_scores_use_the_given_penalty(rng):
  z_x, z_y, lab_x, lab_y = _synthetic_pair(rng)
  # Few source regions and strong penalties: the choice of alpha shows.
  z_x, lab_x = z_x[:12], {name: v[:12] for name, v in lab_x.items()}
  y_src = lab_x["co2"].astype(np.float32).astype(np.float64)
  y_tgt = lab_y["co2"].astype(np.float32).astype(np.float64)
  for alpha in (1.0, 25.0):
    got = cross_city_scores(z_x, lab_x, z_y, lab_y, alpha=alpha)["co2"]
    ref = _numpy_metrics(y_tgt, Ridge(alpha=alpha).fit(z_x, y_src).predict(z_y))
    for m in ref:
      np.testing.assert_allclose(got[m], ref[m], rtol=1e-9)


def test_format_table_names_the_source_and_target_of_each_direction():
  row = {"gdp": {"mae": 1.0, "mape": 0.1}}
  text = format_table({"CD→XA": row, "XA→CD": row})
  assert "CD→XA  (ridge trained on CD, evaluated on XA)" in text
  assert "XA→CD  (ridge trained on XA, evaluated on CD)" in text
