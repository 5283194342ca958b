"""The k-fold protocol: folds, leakage, metrics vs scikit-learn, clipping, labels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import KFold

from jaxurban.eval import kfold
from jaxurban.eval.ridge import ridge_fit


@pytest.mark.parametrize("n,k,seed", [(77, 10, 2024), (74, 10, 3), (20, 3, 0)])
def test_folds_partition_and_match_sklearn(n, k, seed):
  fold_of = kfold.fold_assignment(n, k, seed)
  masks = kfold.fold_masks(fold_of, k)
  np.testing.assert_array_equal(masks.sum(0), np.ones(n))  # every region in exactly one fold
  for f, (_, test) in enumerate(KFold(k, shuffle=True, random_state=seed).split(np.arange(n))):
    np.testing.assert_array_equal(np.flatnonzero(masks[f]), np.sort(test))


def test_fold_count_is_checked():
  with pytest.raises(ValueError, match="n_folds"):
    kfold.fold_assignment(5, 6)


def test_masked_ridge_is_ridge_on_the_training_rows(rng):
  x, y = rng.normal(size=(30, 5)), rng.normal(size=30)
  train = rng.random(30) < 0.7
  with jax.enable_x64(True):
    masked = kfold.masked_ridge_fit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(train), 1.0)
    direct = ridge_fit(jnp.asarray(x[train]), jnp.asarray(y[train]), 1.0)
    # Changing held-out labels changes nothing.
    y2 = y + 50.0 * ~train
    again = kfold.masked_ridge_fit(jnp.asarray(x), jnp.asarray(y2), jnp.asarray(train), 1.0)
  np.testing.assert_allclose(masked.weights, direct.weights, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(masked.intercept, direct.intercept, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(again.weights, masked.weights, rtol=1e-12, atol=1e-12)


def test_ridge_cv_matches_sklearn(rng):
  n, d, k = 40, 6, 5
  emb = rng.normal(size=(2, n, d))
  y = np.abs(emb[0] @ rng.normal(size=d)) * 10
  fold_of = kfold.fold_assignment(n, k, 7)
  pooled = kfold.ridge_cv_predictions(emb, y, fold_of, k, alpha=1.0)
  assert pooled.shape == (2, n)
  for s in range(2):
    expected = np.zeros(n)
    for train, test in KFold(k, shuffle=True, random_state=7).split(np.arange(n)):
      expected[test] = Ridge(alpha=1.0).fit(emb[s, train], y[train]).predict(emb[s, test])
    np.testing.assert_allclose(pooled[s], expected, rtol=1e-9, atol=1e-9)
  # One seed's [n, d] without the seed axis is refused, not broadcast.
  with pytest.raises(ValueError, match=r"expected embeddings \[seeds, 40, d\]"):
    kfold.ridge_cv_predictions(emb[0], y, fold_of, k)


def test_metrics_match_sklearn_with_clipping(rng):
  y = rng.uniform(0, 100, size=50)
  pred = y + rng.normal(0, 30, size=50)
  pred[:5] = -rng.uniform(1, 10, size=5)  # negative predictions are clipped to 0
  clipped = np.maximum(pred, 0)
  scores = kfold.score_pooled(pred[None], y)
  np.testing.assert_allclose(scores["mae"][0], mean_absolute_error(y, clipped), rtol=1e-12)
  np.testing.assert_allclose(scores["rmse"][0], np.sqrt(mean_squared_error(y, clipped)), rtol=1e-12)
  # R² can fall near 0, where rounding of 1e-16 is a large relative error.
  np.testing.assert_allclose(scores["r2"][0], r2_score(y, clipped), rtol=1e-12, atol=1e-13)
  assert scores["mae"][0] < mean_absolute_error(y, pred)
  # The masked form equals sklearn on the selected subset.
  mask = rng.random(50) < 0.5
  with jax.enable_x64(True):
    sub = kfold.masked_scores(jnp.asarray(y), jnp.asarray(pred), jnp.asarray(mask))
  np.testing.assert_allclose(sub["r2"], r2_score(y[mask], clipped[mask]), rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(sub["mae"], mean_absolute_error(y[mask], clipped[mask]), rtol=1e-10)


def test_check_in_drops_zero_count_regions(data_root):
  labels = np.load(data_root / "hafusion" / "Chi" / "check_counts.npy")
  keep = kfold.keep_mask("checkIn", labels)
  assert keep.sum() == (labels > 0).sum() and (~keep).sum() > 0
  assert np.all(labels[keep] > 0)
  crime = np.load(data_root / "hafusion" / "Chi" / "crime_counts.npy")
  assert kfold.keep_mask("crime", crime).all()


def _noise_levels(best: int, epochs: int = 4) -> np.ndarray:
  """Noise per evaluation, lowest (so best R2 on any rows) at epoch `best`."""
  levels = np.arange(1.0, epochs + 1.0, dtype=np.float32)
  levels[best] = 0.1
  return levels


def test_protocols_select_and_are_labelled(rng):
  n, k = 12, 3
  y = rng.uniform(1, 10, size=n).astype(np.float32)
  fold_of = kfold.fold_assignment(n, k, 0)
  masks = kfold.fold_masks(fold_of, k)
  z = rng.normal(size=(k, n)).astype(np.float32)  # each fold's model errs its own way
  # Each fold's model is best at another epoch (errors scale with the noise).
  best = [1, 3, 0]
  traj = np.stack([[y + _noise_levels(best[f])[t] * z[f] for f in range(k)] for t in range(4)])
  traj = traj.astype(np.float32)[:, None]  # [T, S=1, F, N]
  honest = kfold.select_folds(traj, y, masks, "honest")
  paper = np.asarray(kfold.select_folds(traj, y, masks, "paper"))
  np.testing.assert_array_equal(honest, traj[-1])
  for f in range(k):
    np.testing.assert_array_equal(paper[0, f], traj[best[f], 0, f])
  assert kfold.protocol_label("paper") == "optimistic (test-fold epoch selection)"
  assert "honest" in kfold.protocol_label("honest")
  with pytest.raises(ValueError, match="protocol"):
    kfold.protocol_label("best")
  # Each region's pooled prediction comes from the model of its own test fold.
  pooled = np.asarray(kfold.pool_folds(paper, masks))
  for f in range(k):
    np.testing.assert_array_equal(pooled[0][masks[f]], traj[best[f], 0, f][masks[f]])
  # A diverged evaluation (NaN predictions, NaN R2) is never chosen.
  diverged = traj.copy()
  diverged[best[0], :, 0] = np.nan
  chosen = np.asarray(kfold.select_folds(diverged, y, masks, "paper"))
  assert np.all(np.isfinite(chosen))
  np.testing.assert_array_equal(chosen[0, 1:], paper[0, 1:])


@pytest.mark.parametrize("n", [4, 7])
def test_folds_of_one_region_choose_their_best_evaluation(rng, n):
  # Leave-one-out: each fold (test and validation) holds one region, whose R2
  # is -inf at every evaluation; the choice must still follow the error.
  y = rng.uniform(1, 10, size=n).astype(np.float32)
  masks = kfold.fold_masks(kfold.fold_assignment(n, n, 0), n)
  val = kfold.validation_masks(masks)
  best = rng.integers(0, 5, size=n)
  z = rng.choice([-1.0, 1.0], size=(n, n)).astype(np.float32)
  traj = np.stack([[y + _noise_levels(best[f], 5)[t] * z[f] for f in range(n)] for t in range(5)])
  traj = traj.astype(np.float32)[:, None]
  paper = np.asarray(kfold.select_folds(traj, y, masks, "paper"))
  # Fold f's model errs by the same amount on every row, so on its
  # validation region (fold f + 1's) too.
  validated = np.asarray(kfold.select_folds(traj, y, masks, "validated", validation=(traj, val)))
  for f in range(n):
    np.testing.assert_array_equal(paper[0, f], traj[best[f], 0, f])
    np.testing.assert_array_equal(validated[0, f], traj[best[f], 0, f])


def test_summarise_mean_and_sample_std():
  out = kfold.summarise({"r2": np.array([0.5, 0.7, 0.9])})
  np.testing.assert_allclose(out["r2"]["mean"], 0.7)
  np.testing.assert_allclose(out["r2"]["std"], 0.2)
  assert kfold.summarise({"r2": np.array([0.5])})["r2"]["std"] == 0.0


def test_validated_protocol_chooses_on_the_validation_fold(rng):
  n, k = 15, 3
  y = rng.uniform(1, 10, size=n).astype(np.float32)
  fold_of = kfold.fold_assignment(n, k, 0)
  masks = kfold.fold_masks(fold_of, k)
  val = kfold.validation_masks(masks)
  np.testing.assert_array_equal(val, masks[[1, 2, 0]])
  assert not np.any(val & masks)
  z = rng.normal(size=n).astype(np.float32)
  # Per fold, three different best epochs: of the test predictions, of the
  # validation predictions on the validation rows, and of the validation
  # predictions on every other row. The choice must follow the second only.
  best_test, best_val, best_elsewhere = [3, 2, 1], [1, 3, 0], [2, 0, 3]
  traj = np.stack([[y + _noise_levels(best_test[f])[t] * z for f in range(k)] for t in range(4)])
  val_traj = np.stack(
    [
      [
        y + np.where(val[f], _noise_levels(best_val[f])[t], _noise_levels(best_elsewhere[f])[t]) * z
        for f in range(k)
      ]
      for t in range(4)
    ]
  )
  traj, val_traj = traj.astype(np.float32)[:, None], val_traj.astype(np.float32)[:, None]
  chosen = np.asarray(kfold.select_folds(traj, y, masks, "validated", validation=(val_traj, val)))
  for f in range(k):
    np.testing.assert_array_equal(chosen[0, f], traj[best_val[f], 0, f])
  assert "validation" in kfold.protocol_label("validated")
  with pytest.raises(ValueError, match="validation trajectory"):
    kfold.select_folds(traj, y, masks, "validated")
  with pytest.raises(ValueError, match="overlaps"):
    kfold.select_folds(traj, y, masks, "validated", validation=(val_traj, masks))
  with pytest.raises(ValueError, match="at least 3 folds"):
    kfold.validation_masks(kfold.fold_masks(kfold.fold_assignment(n, 2, 0), 2))


def _ridge_numpy(x, y, alpha):
  from tests.test_eval import _numpy_ridge

  w, intercept = _numpy_ridge(x, y, alpha)
  return lambda z: z @ w + intercept


def _tuned_ridge_reference(x, y, fold_of, folds, alphas, inner_folds, clip=True):
  """Chosen alpha [S, folds] and pooled predictions [S, n] by a float64 loop."""
  from jaxurban.eval.kfold import fold_assignment

  chosen = np.zeros((x.shape[0], folds))
  pooled = np.zeros((x.shape[0], len(y)))
  for s in range(x.shape[0]):
    for f in range(folds):
      train = np.flatnonzero(fold_of != f)
      inner_of = fold_assignment(len(train), inner_folds, 0)
      errors = []
      for alpha in alphas:
        error = 0.0
        for g in range(inner_folds):
          fit, val = train[inner_of != g], train[inner_of == g]
          pred = _ridge_numpy(x[s, fit], y[fit], alpha)(x[s, val])
          if clip:
            pred = np.maximum(pred, 0)
          error += np.sum((pred - y[val]) ** 2)
        errors.append(error)
      chosen[s, f] = alphas[int(np.argmin(errors))]
      test = fold_of == f
      pooled[s, test] = _ridge_numpy(x[s, train], y[train], chosen[s, f])(x[s, test])
  return chosen, pooled


def test_tuned_ridge_chooses_alpha_inside_the_training_folds(rng):
  from jaxurban.eval.kfold import fold_assignment, ridge_cv_predictions_tuned

  n, d, folds, alphas = 40, 30, 4, (0.01, 1.0, 100.0)
  x = rng.normal(size=(2, n, d))
  y = np.abs(x[0, :, 0] * 3 + rng.normal(size=n)) + 1
  fold_of = fold_assignment(n, folds, seed=7)
  pooled, chosen = ridge_cv_predictions_tuned(x, y, fold_of, folds, alphas, inner_folds=3)
  want_chosen, want_pooled = _tuned_ridge_reference(x, y, fold_of, folds, alphas, 3)
  np.testing.assert_array_equal(chosen, want_chosen)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-8, atol=1e-8)
  # The test fold's labels play no part in its own prediction or alpha.
  changed = y.copy()
  changed[fold_of == 1] *= 50
  pooled2, chosen2 = ridge_cv_predictions_tuned(x, changed, fold_of, folds, alphas, inner_folds=3)
  np.testing.assert_array_equal(chosen2[:, 1], chosen[:, 1])
  np.testing.assert_allclose(pooled2[:, fold_of == 1], pooled[:, fold_of == 1], rtol=1e-10)


def test_tuned_ridge_scores_clipped_inner_predictions():
  # Count labels, zero over half the feature space and on a few far-out
  # rows where a linear fit goes strongly negative. Scoring the inner
  # predictions after clipping them at 0 (as every reported metric does)
  # and before it picks different penalties here (checked below), so the
  # choice must follow the clipped errors.
  rng = np.random.default_rng(0)
  n, d, folds, alphas = 60, 3, 5, (1e-3, 1.0, 30.0, 1e3)
  x = rng.normal(size=(1, n, d))
  y = np.maximum(x[0] @ rng.normal(size=d) * 3 + rng.normal(size=n) * 0.3, 0)
  far = rng.integers(2, 6)
  x[0, :far] *= 4
  y[:far] = 0
  fold_of = kfold.fold_assignment(n, folds, 0)
  pooled, chosen = kfold.ridge_cv_predictions_tuned(x, y, fold_of, folds, alphas, inner_folds=5)
  want_chosen, want_pooled = _tuned_ridge_reference(x, y, fold_of, folds, alphas, 5)
  unclipped, _ = _tuned_ridge_reference(x, y, fold_of, folds, alphas, 5, clip=False)
  assert not np.array_equal(want_chosen, unclipped)
  np.testing.assert_array_equal(chosen, want_chosen)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.05, 40.0])
def test_ridge_cv_uses_the_given_penalty(rng, alpha):
  # The "w/o Prompt4RE" probe at a penalty other than the default 1: every
  # fold's fit must use it (d close to the training size, so alpha matters).
  n, d, k = 24, 15, 4
  emb = rng.normal(size=(1, n, d))
  y = emb[0] @ rng.normal(size=d) + 5.0
  fold_of = kfold.fold_assignment(n, k, 3)
  pooled = kfold.ridge_cv_predictions(emb, y, fold_of, k, alpha=alpha)
  expected = np.zeros(n)
  for train, test in KFold(k, shuffle=True, random_state=3).split(np.arange(n)):
    expected[test] = Ridge(alpha=alpha).fit(emb[0, train], y[train]).predict(emb[0, test])
  np.testing.assert_allclose(pooled[0], expected, rtol=1e-9, atol=1e-9)
  at_one = kfold.ridge_cv_predictions(emb, y, fold_of, k, alpha=1.0)
  assert np.abs(at_one - pooled).max() > 1e-3


def test_tuned_ridge_inner_fits_never_see_the_test_fold(rng):
  # Outer fold 0's penalty is chosen on inner folds of its training regions
  # alone. Its own labels are made wild (+-1000 around the signal): inner fits
  # that also read them would favour the largest penalty, while the training
  # regions alone, a near-exact linear signal, favour the smallest.
  n, d, folds, alphas = 40, 5, 4, (0.01, 1e4)
  x = rng.normal(size=(1, n, d))
  y = 10.0 + x[0] @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
  fold_of = kfold.fold_assignment(n, folds, 7)
  test = fold_of == 0
  y[test] += 1000.0 * np.where(np.arange(test.sum()) % 2, 1.0, -1.0)
  pooled, chosen = kfold.ridge_cv_predictions_tuned(x, y, fold_of, folds, alphas, inner_folds=3)
  assert chosen[0, 0] == 0.01
  want = _ridge_numpy(x[0, ~test], y[~test], 0.01)(x[0, test])
  np.testing.assert_allclose(pooled[0, test], want, rtol=1e-8, atol=1e-8)


def test_leave_one_out_is_the_largest_fold_count(rng):
  # As many folds as regions is leave-one-out: allowed, one region per fold.
  fold_of = kfold.fold_assignment(6, 6, 0)
  np.testing.assert_array_equal(np.sort(fold_of), np.arange(6))
  # Labels that do not match the embeddings' regions are refused, not broadcast.
  emb = rng.normal(size=(1, 6, 2))
  with pytest.raises(ValueError, match=r"labels \[6\]"):
    kfold.ridge_cv_predictions(emb, np.ones(5), fold_of, 6)


def test_non_finite_values_outside_the_mask_do_not_reach_the_scores_or_the_choice():
  labels = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  preds = np.array([1.5, 2.5, np.nan, np.inf], np.float32)
  kept = np.array([True, True, False, False])
  masked = kfold.masked_scores(labels, preds, kept)
  alone = kfold.masked_scores(labels[:2], preds[:2])
  for name in ("mae", "rmse", "r2"):
    np.testing.assert_allclose(float(masked[name]), float(alone[name]), rtol=1e-6)
  # A NaN label outside the mask does not reach the R2's mean or total either.
  nan_label = np.array([1.0, 2.0, np.nan, 4.0], np.float32)
  assert np.isfinite(float(kfold.masked_scores(nan_label, preds, kept)["r2"]))
  # Evaluation 1 is exact on fold 0's rows and NaN only on fold 1's: fold 0 takes it.
  masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
  worse = np.tile([[3.0, 4.0, 3.0, 4.0]], (2, 1))
  exact_off_fold_nan = np.tile([[1.0, 2.0, np.nan, 4.0]], (2, 1))
  trajectory = np.stack([worse, exact_off_fold_nan])[:, None]
  chosen = np.asarray(kfold.select_folds(trajectory, labels, masks, "paper"))
  np.testing.assert_array_equal(chosen[0, 0, :2], [1.0, 2.0])
  np.testing.assert_array_equal(chosen[0, 1, 2:], [3.0, 4.0])
