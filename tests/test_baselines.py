"""Rank-anchoring translation baselines (RP / RA)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxurban.core.baselines import (
  affine_align,
  affine_fit,
  align_into,
  mobility_volume,
  procrustes_align,
  procrustes_fit,
  rank_anchors,
  translate_both_ways,
)


def _random_rotation(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix


@pytest.mark.parametrize("center", [True, False])
def test_procrustes_recovers_rotation(rng, center):
  n, d = 300, 16
  z_x = rng.normal(size=(n, d)).astype(np.float32)
  rot = _random_rotation(rng, d)
  offset = rng.normal(size=d) * 3
  z_y = (z_x @ rot + offset + rng.normal(scale=1e-6, size=(n, d))).astype(np.float32)
  stat = rng.permutation(n).astype(np.float32)  # identical rankings
  moved = np.asarray(procrustes_align(z_x, z_y, stat, stat, center=center))
  m = procrustes_fit(z_y, z_x, center=center)
  if center:
    np.testing.assert_allclose(moved, z_x, atol=2e-4)
    # The fitted map itself: Y = X R + t, so Y -> X is R^T.
    np.testing.assert_allclose(np.asarray(m.matrix), rot.T, atol=2e-5)
  else:
    # Rotation about the origin, no bias: R = U V^T for U S V^T = Y^T X,
    # here in float64 on the same (float32) inputs.
    y64, x64 = z_y.astype(np.float64), z_x.astype(np.float64)
    u, _, vt = np.linalg.svd(y64.T @ x64)
    reference = u @ vt
    np.testing.assert_allclose(np.asarray(m.matrix), reference, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(m.bias), np.zeros(d))
    np.testing.assert_allclose(moved, y64 @ reference, atol=1e-3)
    # A rotation cannot remove the offset, so this is not the centred result.
    centred = np.asarray(procrustes_align(z_x, z_y, stat, stat, center=True))
    np.testing.assert_allclose(centred, z_x, atol=2e-4)
    assert np.linalg.norm(moved - centred, axis=1).mean() > 1.0
  np.testing.assert_allclose(np.asarray(m.matrix.T @ m.matrix), np.eye(d), atol=2e-5)


def test_affine_recovers_affine_map(rng):
  n, d = 200, 6
  z_x = rng.normal(size=(n, d)).astype(np.float32)
  # Singular values in [1, 3]: a nearly singular draw would make float32's
  # least squares, not the fit, miss the tolerance.
  rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
  a = rotation * rng.uniform(1.0, 3.0, size=d)
  z_y = (z_x @ a + rng.normal(size=d)).astype(np.float32)
  stat = rng.normal(size=n).astype(np.float32)
  moved = np.asarray(affine_align(z_x, z_y, stat, stat))
  np.testing.assert_allclose(moved, z_x, atol=2e-4)
  m = affine_fit(z_y, z_x)
  np.testing.assert_allclose(np.asarray(m.matrix), np.linalg.inv(a), atol=1e-4)


def test_rank_anchors_quantile_pairing(rng):
  stat_x = rng.normal(size=90)
  stat_y = rng.normal(size=40)
  idx_x, idx_y = map(np.asarray, rank_anchors(stat_x, stat_y))
  assert idx_x.shape == idx_y.shape == (40,)
  order_x, order_y = np.argsort(-stat_x), np.argsort(-stat_y)
  # The smaller city uses every region once, in rank order.
  np.testing.assert_array_equal(idx_y, order_y)
  # The larger one at the matching quantile, floor((k + 1/2) * 90 / 40).
  ranks = np.floor((np.arange(40) + 0.5) * 90 / 40).astype(int)
  np.testing.assert_array_equal(idx_x, order_x[ranks])
  ix, iy = rank_anchors(stat_x, stat_y, n_anchor=10)
  assert ix.shape == iy.shape == (10,)
  with pytest.raises(ValueError):
    rank_anchors(stat_x, stat_y, n_anchor=41)


def test_translate_both_ways_and_jit(rng):
  n_x, n_y, d = 50, 35, 4
  z_x = rng.normal(size=(n_x, d)).astype(np.float32)
  s_x = rng.permutation(n_x).astype(np.float32)  # distinct, no ties
  # City Y is the X regions that rank anchoring pairs with Y's ranks (the
  # quantile positions floor((k + 1/2) N_X / N_Y) of X's order), listed in a
  # shuffled order, with the same statistics, rotated and shifted. Every
  # anchor pair is then one region seen in both cities, so both maps are exact.
  ranks = np.floor((np.arange(n_y) + 0.5) * n_x / n_y).astype(int)
  source = np.argsort(-s_x)[ranks][rng.permutation(n_y)]  # X region of each Y region
  rot = _random_rotation(rng, d)
  offset = rng.normal(size=d) * 2
  z_y = (z_x[source] @ rot + offset).astype(np.float32)
  s_y = s_x[source]
  y_in_x, x_in_y = translate_both_ways(z_x, z_y, s_x, s_y)
  assert y_in_x.shape == (n_y, d) and x_in_y.shape == (n_x, d)
  np.testing.assert_allclose(np.asarray(y_in_x), z_x[source], atol=2e-4)
  # The other map is fitted on the same anchors and applied to all of X.
  np.testing.assert_allclose(np.asarray(x_in_y), z_x @ rot + offset, atol=2e-4)
  y_in_x, x_in_y = translate_both_ways(z_x, z_y, s_x, s_y, method="affine")
  np.testing.assert_allclose(np.asarray(y_in_x), z_x[source], atol=2e-4)
  np.testing.assert_allclose(np.asarray(x_in_y), z_x @ rot + offset, atol=2e-4)
  jitted = jax.jit(lambda a, b, c, e: align_into(a, b, c, e, method="affine", n_anchor=20))
  assert jitted(z_x, z_y, s_x, s_y).shape == (n_y, d)


def test_mobility_volume_against_loop(rng):
  n, e = 25, 200
  origin = rng.integers(0, n, size=e)
  destination = rng.integers(0, n, size=e)
  destination[:5] = origin[:5]  # self-loops count twice
  weight = rng.uniform(size=e)
  expected = np.zeros(n)
  for o, d, w in zip(origin, destination, weight):
    expected[o] += w
    expected[d] += w
  got = np.asarray(mobility_volume(origin, destination, weight, n))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got.shape == (n,)


def test_unranked_regions_are_never_anchors(rng):
  n_x, n_y, d = 60, 40, 4
  s_x, s_y = rng.uniform(1, 2, n_x), rng.uniform(1, 2, n_y)
  s_x[:20], s_y[:15] = 0, 0  # regions without mobility: all tied at 0
  masks = dict(ranked_x=s_x > 0, ranked_y=s_y > 0)
  ix, iy = map(np.asarray, rank_anchors(s_x, s_y, **masks))
  assert ix.shape == iy.shape == (25,) and (s_x[ix] > 0).all() and (s_y[iy] > 0).all()
  with pytest.raises(ValueError, match=r"\[1, 25\], the smaller number of ranked regions"):
    rank_anchors(s_x, s_y, n_anchor=26, **masks)
  # The maps do not depend on the order in which the unranked regions are
  # listed; ranked by index among themselves, they would.
  z_x = rng.normal(size=(n_x, d)).astype(np.float32)
  z_y = rng.normal(size=(n_y, d)).astype(np.float32)
  reordered = z_y.copy()
  reordered[:15] = z_y[:15][rng.permutation(15)]
  _, x_in_y = translate_both_ways(z_x, z_y, s_x, s_y, **masks)
  _, x_in_y_reordered = translate_both_ways(z_x, reordered, s_x, s_y, **masks)
  np.testing.assert_allclose(np.asarray(x_in_y), np.asarray(x_in_y_reordered), atol=1e-5)
  _, by_index = translate_both_ways(z_x, z_y, s_x, s_y)
  _, by_index_reordered = translate_both_ways(z_x, reordered, s_x, s_y)
  assert np.abs(np.asarray(by_index) - np.asarray(by_index_reordered)).max() > 1e-2


def test_masks_leave_out_regions_whatever_their_statistic(rng):
  # Unranked regions with the largest statistics are still never anchors;
  # the rest pair by their ranks among the ranked regions only.
  s_x, s_y = rng.uniform(1, 2, 30), rng.uniform(1, 2, 20)
  ranked_x, ranked_y = np.ones(30, bool), np.ones(20, bool)
  ranked_x[[3, 7]], ranked_y[[0, 5, 9]] = False, False
  s_x[[3, 7]], s_y[[0, 5, 9]] = 100.0, 100.0
  ix, iy = map(np.asarray, rank_anchors(s_x, s_y, ranked_x=ranked_x, ranked_y=ranked_y))
  kept_x, kept_y = np.flatnonzero(ranked_x), np.flatnonzero(ranked_y)
  order_x = kept_x[np.argsort(-s_x[kept_x], kind="stable")]
  order_y = kept_y[np.argsort(-s_y[kept_y], kind="stable")]
  np.testing.assert_array_equal(iy, order_y)
  np.testing.assert_array_equal(ix, order_x[(2 * np.arange(17) + 1) * 28 // 34])


def test_unknown_method_is_refused(rng):
  z = rng.normal(size=(10, 3)).astype(np.float32)
  stat = rng.normal(size=10)
  with pytest.raises(ValueError, match=r"method 'rp': expected one of \('procrustes', 'affine'\)"):
    align_into(z, z, stat, stat, method="rp")
  with pytest.raises(ValueError, match="method 'ra'"):
    translate_both_ways(z, z, stat, stat, method="ra")
