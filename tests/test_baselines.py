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
  offset = rng.normal(size=d) * 3 if center else np.zeros(d)
  z_y = (z_x @ rot + offset + rng.normal(scale=1e-6, size=(n, d))).astype(np.float32)
  stat = rng.permutation(n).astype(np.float32)  # identical rankings
  moved = np.asarray(procrustes_align(z_x, z_y, stat, stat, center=center))
  np.testing.assert_allclose(moved, z_x, atol=2e-4)
  # The fitted map itself: Y = X R + t, so Y -> X is R^T.
  m = procrustes_fit(z_y, z_x, center=center)
  np.testing.assert_allclose(np.asarray(m.matrix), rot.T, atol=2e-5)
  np.testing.assert_allclose(np.asarray(m.matrix.T @ m.matrix), np.eye(d), atol=2e-5)


def test_affine_recovers_affine_map(rng):
  n, d = 200, 6
  z_x = rng.normal(size=(n, d)).astype(np.float32)
  a = rng.normal(size=(d, d)) + 3 * np.eye(d)
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
  z_x = rng.normal(size=(50, 4)).astype(np.float32)
  z_y = rng.normal(size=(35, 4)).astype(np.float32)
  s_x, s_y = rng.uniform(size=50), rng.uniform(size=35)
  y_in_x, x_in_y = translate_both_ways(z_x, z_y, s_x, s_y)
  assert y_in_x.shape == (35, 4) and x_in_y.shape == (50, 4)
  np.testing.assert_allclose(
    np.asarray(x_in_y), np.asarray(procrustes_align(z_y, z_x, s_y, s_x)), rtol=1e-6
  )
  jitted = jax.jit(lambda a, b, c, e: align_into(a, b, c, e, method="affine", n_anchor=20))
  assert jitted(z_x, z_y, s_x, s_y).shape == (35, 4)


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
