"""t-SNE, PCA projection and the two-city embedding plot."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxurban.viz import pca_2d, plot_city_embeddings, tsne
from jaxurban.viz.embedding_plot import gdp_levels
from jaxurban.viz.loss_curves import loss_table, merge_seed_histories, plot_loss_history
from jaxurban.viz.tsne import _conditional_p, _grad, _sq_dists


def _blobs(rng, per=30, dim=10, sep=12.0):
  # Three orthogonal directions: every pair of centres is ``sep`` apart, in a
  # random orientation.
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  centers = q[:3] * sep / np.sqrt(2.0)
  x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centers])
  return x.astype(np.float32), np.repeat(np.arange(3), per)


def _knn_purity(y, labels, k=5):
  d = ((y[:, None] - y[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  nn = np.argsort(d, axis=1)[:, :k]
  return float(np.mean(labels[nn] == labels[:, None]))


def _kl_objective(x, y, perplexity):
  """KL(P || Q) of layout y, from the joint P of the module doc, in float64."""
  n = len(x)
  cond = np.asarray(_conditional_p(_sq_dists(jnp.asarray(x)), jnp.float32(perplexity)), np.float64)
  p = np.maximum((cond + cond.T) / (2.0 * n), 1e-12)
  y = np.asarray(y, np.float64)
  num = 1.0 / (1.0 + ((y[:, None] - y[None]) ** 2).sum(-1))
  np.fill_diagonal(num, 0.0)
  q = num / num.sum()
  off = ~np.eye(n, dtype=bool)
  return float(np.sum(p[off] * np.log(p[off] / q[off])))


def test_tsne_keeps_blobs_apart(rng):
  # A random start carries no cluster structure (unlike the PCA default,
  # which already separates the blobs), so only the optimisation can.
  x, labels = _blobs(rng)
  run = lambda n_iter, n_exaggeration: np.asarray(
    tsne(x, perplexity=10.0, n_iter=n_iter, n_exaggeration=n_exaggeration, init="random", seed=3)
  )
  y0, y = run(0, 0), run(300, 100)  # the start (no steps) and the result
  assert y.shape == (90, 2) and np.isfinite(y).all()
  assert _knn_purity(y0, labels) < 0.6
  assert _knn_purity(y, labels) > 0.95
  # The descent lowers the objective well below that of its start.
  assert _kl_objective(x, y, 10.0) < 0.5 * _kl_objective(x, y0, 10.0)


def test_perplexity_calibration(rng):
  x = rng.normal(size=(60, 5)).astype(np.float32)
  p = np.asarray(_conditional_p(_sq_dists(jnp.asarray(x)), jnp.float32(12.0)))
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
  assert np.all(np.diag(p) == 0)
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
  np.testing.assert_allclose(ent, np.log(12.0), atol=1e-3)


@pytest.mark.parametrize("n, exaggeration", [(7, 1.0), (50, 12.0)])
def test_tsne_gradient_matches_float64_reference(rng, n, exaggeration):
  y = rng.normal(size=(n, 2))
  p = rng.uniform(size=(n, n))
  p = p + p.T
  np.fill_diagonal(p, 0.0)
  p /= p.sum()
  # dC/dy_i = 4 sum_j (e p_ij - q_ij)(1 + |y_i - y_j|^2)^-1 (y_i - y_j), written out.
  diff = y[:, None, :] - y[None, :, :]
  num = 1.0 / (1.0 + (diff**2).sum(-1))
  np.fill_diagonal(num, 0.0)
  q = num / num.sum()
  expected = 4.0 * (((exaggeration * p - q) * num)[..., None] * diff).sum(1)
  got = np.asarray(_grad(jnp.asarray(y, jnp.float32), jnp.asarray(p, jnp.float32), exaggeration))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("points", ["identical", "equidistant", "one-dimensional"])
def test_tsne_of_degenerate_points_is_finite(rng, points):
  # Tied distances never reach the target entropy; the precision search
  # must stop at a finite value rather than overflow into NaN.
  x = {
    "identical": np.ones((40, 8)),
    "equidistant": np.eye(40),
    "one-dimensional": rng.normal(size=(30, 1)),
  }[points]
  y = np.asarray(tsne(jnp.asarray(x, jnp.float32), perplexity=5.0, n_iter=300))
  assert y.shape == (len(x), 2) and np.isfinite(y).all()
  if points == "one-dimensional":  # PCA's second coordinate of 1-D data is 0
    np.testing.assert_array_equal(np.asarray(pca_2d(jnp.asarray(x)))[:, 1], 0.0)


def test_pca_2d_matches_svd(rng):
  x = rng.normal(size=(80, 6)) * np.array([5, 3, 1, 1, 0.5, 0.1])
  got = np.asarray(pca_2d(jnp.asarray(x, jnp.float32)))
  xc = x - x.mean(0)
  u, s, _ = np.linalg.svd(xc, full_matrices=False)
  ref = u[:, :2] * s[:2]
  np.testing.assert_allclose(np.abs(got), np.abs(ref), rtol=1e-3, atol=1e-3)


def test_gdp_levels_tertiles():
  lv = gdp_levels(np.arange(9.0))
  np.testing.assert_array_equal(lv, [0, 0, 0, 1, 1, 1, 2, 2, 2])


@pytest.mark.parametrize(
  "gdp, expected",
  [
    # Half the regions at zero: the zeros stay together in the lowest level.
    ([0.0] * 6 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0] * 6 + [1] * 2 + [2] * 4),
    # Seven in ten at zero: both cuts are zero; the zeros are "low", the rest "high".
    ([0.0] * 7 + [1.0, 2.0, 3.0], [0] * 7 + [2] * 3),
  ],
)
def test_gdp_levels_keep_tied_values_in_the_lowest_level(gdp, expected):
  np.testing.assert_array_equal(gdp_levels(np.array(gdp)), expected)


def test_plot_writes_png(rng, tmp_path):
  z_x, z_y = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 1
  g_x, g_y = rng.uniform(size=40), rng.uniform(size=30)
  for method, kw in (("tsne", dict(perplexity=5.0, n_iter=60, n_exaggeration=20)), ("pca", {})):
    path = tmp_path / f"cities_{method}.png"
    out = plot_city_embeddings(z_x, z_y, g_x, g_y, "cd", "xa", path, method=method, **kw)
    assert out == path
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
  # Nothing but the two pictures: the temporary files were renamed.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cities_pca.png", "cities_tsne.png"]


@pytest.mark.parametrize("n_x, n_y", [(2, 2), (3, 5), (16, 15)])
def test_plot_of_small_cities_lowers_the_perplexity(rng, tmp_path, n_x, n_y, monkeypatch):
  # CoRE trains pairs of cities of two regions and up; t-SNE's usual
  # perplexity of 30 needs more than 31 points together.
  from jaxurban.viz import embedding_plot

  asked = []
  real_tsne = embedding_plot.tsne
  monkeypatch.setattr(
    embedding_plot, "tsne", lambda z, **kw: asked.append(kw["perplexity"]) or real_tsne(z, **kw)
  )
  z_x, z_y = rng.normal(size=(n_x, 8)), rng.normal(size=(n_y, 8))
  path = tmp_path / "small.png"
  plot_city_embeddings(
    z_x,
    z_y,
    rng.uniform(size=n_x),
    rng.uniform(size=n_y),
    "a",
    "b",
    path,
    n_iter=40,
    n_exaggeration=10,
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert asked == [pytest.approx((n_x + n_y - 1) / 3)]


def test_loss_table_per_seed_and_averaged():
  history = [
    {"epoch": 10, "mobility": [3.0, 4.0], "total": [5.0, 6.0]},
    {"epoch": 20, "mobility": [2.0, float("nan")], "total": [4.0, 5.0]},
  ]
  epochs, table = loss_table(history)
  np.testing.assert_array_equal(epochs, [10, 20])
  assert list(table) == ["total", "mobility"]  # the total first
  np.testing.assert_array_equal(table["total"], [[5.0, 6.0], [4.0, 5.0]])
  assert np.isnan(table["mobility"][1, 1])
  # Seed-averaged rows (CoRE's) become one column.
  _, averaged = loss_table([{"epoch": 1, "lma": 2.5}, {"epoch": 2, "lma": 1.5}])
  np.testing.assert_array_equal(averaged["lma"], [[2.5], [1.5]])


def test_merge_seed_histories():
  seed0 = [{"epoch": 5, "total": 1.0, "kl": 0.1}, {"epoch": 10, "total": 0.5, "kl": 0.2}]
  seed1 = [{"epoch": 5, "total": 2.0, "kl": 0.3}, {"epoch": 10, "total": 1.5, "kl": 0.4}]
  merged = merge_seed_histories([seed0, seed1])
  assert merged == [
    {"epoch": 5, "total": [1.0, 2.0], "kl": [0.1, 0.3]},
    {"epoch": 10, "total": [0.5, 1.5], "kl": [0.2, 0.4]},
  ]
  with pytest.raises(ValueError, match="seed history 1 logged epochs \\[5\\], seed 0 \\[5, 10\\]"):
    merge_seed_histories([seed0, seed0[:1]])


@pytest.mark.parametrize(
  "bad, message",
  [
    ([], "empty"),
    ([{"total": 1.0}], "row 0 has no 'epoch'"),
    ([{"epoch": 1, "total": 1.0}, {"epoch": 2, "kl": 1.0}], "row 1 \\(epoch 2\\) has terms"),
    ([{"epoch": 1, "total": [1.0, 2.0]}, {"epoch": 2, "total": [1.0]}], "'total' has per-seed"),
  ],
)
def test_loss_history_errors(bad, message):
  with pytest.raises(ValueError, match=message):
    loss_table(bad)


def test_plot_loss_history_writes_png(tmp_path):
  # A term spanning four decades (log axis), one seed with a gap.
  history = [
    {"epoch": e, "total": [10.0**-e, 2 * 10.0**-e], "poi": [1.0, np.nan if e == 2 else 0.5]}
    for e in range(1, 5)
  ]
  path = tmp_path / "losses.png"
  assert plot_loss_history(path, history, title="t", seed_labels=[3, 4]) == path
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["losses.png"]


def test_tsne_affinities_do_not_depend_on_where_the_points_sit(rng):
  # |x|^2 + |y|^2 - 2 x.y in float32 loses the distances of points far from
  # the origin; the affinities are computed on centred points.
  from jaxurban.viz.tsne import _joint_p

  x = rng.normal(size=(40, 6)).astype(np.float32)
  near = np.asarray(_joint_p(jnp.asarray(x), 10.0))
  far = np.asarray(_joint_p(jnp.asarray(x + 1e3), 10.0))
  np.testing.assert_allclose(far, near, rtol=2e-3, atol=1e-7)


def test_pictures_refuse_what_they_would_draw_wrongly(rng, tmp_path):
  z, gdp = rng.normal(size=(20, 4)), rng.uniform(size=20)
  with pytest.raises(ValueError, match="1 GDP values are not finite"):
    gdp_levels(np.where(np.arange(20) == 3, np.nan, gdp))
  bad = z.copy()
  bad[7, 2] = np.nan
  with pytest.raises(ValueError, match="xa: 1 embedding rows are not finite .first: row 7."):
    plot_city_embeddings(bad, z, gdp, gdp, "xa", "cd", tmp_path / "e.png", method="pca")
  assert not (tmp_path / "e.png").exists()


def test_loss_legend_sits_on_a_panel_with_one_line_per_seed(tmp_path, monkeypatch):
  from matplotlib.axes import Axes

  legends = []
  original = Axes.legend

  def record(self, *args, **kwargs):
    legends.append(self.get_title())
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Axes, "legend", record)
  history = [{"epoch": e, "total": 10.0 / e, "kl": [1.0 / e, 2.0 / e]} for e in (1, 2, 3)]
  plot_loss_history(tmp_path / "l.png", history, title="x" * 300)
  assert legends == ["kl"]  # the total is one averaged line


def test_region_map_puts_longitude_on_x_and_rings_the_regions_without_a_value(
  tmp_path, monkeypatch
):
  from jaxurban.viz import region_map

  # (lat, lon): latitudes near 34, longitudes near 108, so swapped axes show.
  centroids = np.array([[34.1, 108.9], [34.3, 108.7], [34.2, 109.1], [34.4, 108.8]])
  values = np.array([3.0, np.nan, 1.0, 7.0])
  saved = {}
  real_save = region_map.save_figure_atomic

  def keep(fig, path, dpi):
    saved["fig"] = fig
    return real_save(fig, path, dpi)

  monkeypatch.setattr(region_map, "save_figure_atomic", keep)
  path = tmp_path / "map.png"
  assert region_map.plot_region_values(centroids, values, path, title="t") == path
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["map.png"]
  ax = saved["fig"].axes[0]
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("longitude", "latitude")
  rings, points = ax.collections
  # The region without a value is a ring at its own (lon, lat).
  np.testing.assert_allclose(rings.get_offsets(), [[108.7, 34.3]])
  # The others carry their values as colours, region by region.
  np.testing.assert_allclose(points.get_offsets(), [[108.9, 34.1], [109.1, 34.2], [108.8, 34.4]])
  np.testing.assert_allclose(points.get_array(), [3.0, 1.0, 7.0])


def test_city_plot_draws_each_city_at_its_own_joint_projection_and_level(
  rng, monkeypatch, tmp_path
):
  from matplotlib.colors import to_rgba

  from jaxurban.viz import embedding_plot

  saved = {}
  monkeypatch.setattr(embedding_plot, "save_figure_atomic", lambda fig, *_: saved.update(fig=fig))
  # Cities of different sizes; Y sits apart from X, so a projection of each
  # city alone would differ from the joint one.
  z_x, z_y = rng.normal(size=(18, 5)), rng.normal(size=(11, 5)) + 3.0
  g_x, g_y = rng.uniform(size=18), rng.uniform(size=11) * 100
  embedding_plot.plot_city_embeddings(
    z_x, z_y, g_x, g_y, "cd", "xa", tmp_path / "p.png", method="pca"
  )
  xy = np.asarray(pca_2d(np.concatenate([z_x, z_y]).astype(np.float32)))
  p_x, p_y = xy[:18], xy[18:]
  lv_x, lv_y = gdp_levels(g_x), gdp_levels(g_y)
  collections = saved["fig"].axes[0].collections
  assert len(collections) == 6  # per level: city X (triangles), then city Y (dots)
  for level, color in enumerate(embedding_plot.GDP_LEVEL_COLORS):
    for points, p, lv in (
      (collections[2 * level], p_x, lv_x),
      (collections[2 * level + 1], p_y, lv_y),
    ):
      np.testing.assert_allclose(points.get_offsets(), p[lv == level], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(points.get_facecolor()[:, :3], [to_rgba(color)[:3]])
  assert embedding_plot.GDP_LEVEL_NAMES == ("low", "medium", "high")


def test_pca_2d_fixes_each_components_sign_by_its_largest_loading(rng):
  x = rng.normal(size=(60, 4)) * np.array([4.0, 2.0, 1.0, 0.3])
  xc = x - x.mean(0)
  _, vecs = np.linalg.eigh(xc.T @ xc)
  comps = vecs[:, ::-1][:, :2]
  comps = comps * np.where(comps[np.argmax(np.abs(comps), axis=0), [0, 1]] < 0, -1.0, 1.0)
  got = np.asarray(pca_2d(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, xc @ comps, rtol=1e-3, atol=1e-3)


def test_tsne_automatic_learning_rate(rng):
  # "auto" = max(N / early_exaggeration / 4, 50): 50 for these 30 points.
  x = rng.normal(size=(30, 4)).astype(np.float32)
  run = lambda lr: np.asarray(
    tsne(x, perplexity=5.0, n_iter=20, n_exaggeration=10, learning_rate=lr)
  )
  auto = run("auto")
  np.testing.assert_array_equal(auto, run(50.0))
  assert np.abs(auto - run(30 / 12 / 4)).max() > 1e-6


def test_loss_plot_draws_every_seed_and_a_log_axis_for_wide_ranges(tmp_path, monkeypatch):
  from jaxurban.viz import loss_curves

  saved = {}
  monkeypatch.setattr(loss_curves, "save_figure_atomic", lambda fig, *_: saved.update(fig=fig))
  history = [
    {
      "epoch": e,
      "total": [10.0**-e, 3 * 10.0**-e, 5 * 10.0**-e],
      "kl": [1.0 + e, 2.0, 3.0 - e / 10],
    }
    for e in (1, 2, 3, 4)
  ]
  loss_curves.plot_loss_history(tmp_path / "l.png", history, seed_labels=[7, 8, 9])
  total, kl = saved["fig"].axes[:2]
  assert (total.get_title(), kl.get_title()) == ("total", "kl")
  for ax, term in ((total, "total"), (kl, "kl")):
    lines = ax.get_lines()
    assert len(lines) == 3
    for s, line in enumerate(lines):
      np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3, 4])
      np.testing.assert_allclose(line.get_ydata(), [row[term][s] for row in history])
  assert [t.get_text() for t in total.get_legend().get_texts()] == ["seed 7", "seed 8", "seed 9"]
  # Three decades on the total, less than a factor 3 on kl.
  assert (total.get_yscale(), kl.get_yscale()) == ("log", "linear")


def test_tsne_starts_from_scaled_principal_components(rng):
  # No steps: the result is the start, the first two principal components
  # scaled so that the first has standard deviation 1e-4.
  x = rng.normal(size=(30, 5)).astype(np.float32) * np.float32([5, 3, 1, 1, 1])
  y0 = np.asarray(tsne(x, perplexity=5.0, n_iter=0, n_exaggeration=0), np.float64)
  pca = np.asarray(pca_2d(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(y0, pca / pca[:, 0].std() * 1e-4, rtol=1e-5, atol=1e-12)
  assert y0[:, 0].std() == pytest.approx(1e-4, rel=1e-5)
  with pytest.raises(ValueError, match="need 0 <= n_exaggeration <= n_iter"):
    tsne(x, perplexity=5.0, n_iter=10, n_exaggeration=11)
  with pytest.raises(ValueError, match=r"perplexity 29.0 must be in \(0, N - 1 = 29\)"):
    tsne(x, perplexity=29.0)


def test_tsne_affinities_are_floored(rng):
  # Two groups far apart: the affinities between them underflow to 0 and are
  # floored at 1e-12 (so that KL's log stays finite); the diagonal stays 0.
  from jaxurban.viz.tsne import _joint_p

  x = np.concatenate([rng.normal(size=(10, 3)), rng.normal(size=(10, 3)) + 1e3]).astype(np.float32)
  p = np.asarray(_joint_p(jnp.asarray(x), 3.0))
  assert np.all(p[:10, 10:] == np.float32(1e-12)) and np.all(np.diag(p) == 0)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
