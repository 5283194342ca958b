"""The HAFusion city loader: real Chicago / New York files and bad inputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxurban.data.errors import DataError
from jaxurban.data.hafusion import load_city_views, parse_centroid

LABELS = ("crime", "checkIn", "serviceCall")


@pytest.mark.parametrize("city, n, n_landuse", [("Chi", 77, 12), ("NY", 180, 11)])
def test_real_city_shapes_and_values(data_root, city, n, n_landuse):
  views = load_city_views(city, data_root)
  assert views.city == city and views.n_regions == n
  assert views.mobility.shape == views.mobility_dist.shape == (n, n)
  assert views.poi.shape == (n, 26) and views.landuse.shape == (n, n_landuse)
  assert views.poi_similarity.shape == views.landuse_similarity.shape == (n, n)
  assert set(views.labels) == set(LABELS)
  for key in LABELS:
    assert views.labels[key].shape == (n,) and (views.labels[key] >= 0).all()
  for array in (views.mobility, views.poi, views.landuse):
    assert np.isfinite(array).all() and (array >= 0).all()
  # Similarities are cosine similarities of non-negative counts.
  assert views.poi_similarity.min() >= 0 and views.poi_similarity.max() <= 1 + 1e-9
  with pytest.raises(dataclasses.FrozenInstanceError):
    views.city = "other"


def test_real_chicago_centroids(data_root):
  chi = load_city_views("Chi", data_root)
  assert chi.centroids.shape == (77, 2)
  lat, lon = chi.centroids[:, 0], chi.centroids[:, 1]
  # Chicago's extent, and region 0 is Rogers Park at the northern edge.
  assert (41.6 < lat).all() and (lat < 42.1).all() and (-88.0 < lon).all() and (lon < -87.5).all()
  assert lat[0] > np.median(lat)
  assert load_city_views("NY", data_root).centroids is None


# --------------------------------------------------------------------------
# Synthetic data roots.

N = 5


def _write_root(tmp_path, rng, n=N):
  folder = tmp_path / "hafusion" / "Chi"
  folder.mkdir(parents=True)
  counts = lambda *shape: rng.integers(0, 50, size=shape).astype(np.int32)
  np.save(folder / "mob-adj.npy", counts(n, n) + 1)
  np.save(folder / "mob_dist.npy", counts(n, n))
  np.save(folder / "poi_dist.npy", counts(n, 26))
  np.save(folder / "landUse_dist.npy", counts(n, 12))
  np.save(folder / "poi_simi.npy", rng.random((n, n)))
  np.save(folder / "landUse_simi.npy", rng.random((n, n)))
  for name in ("crime_counts.npy", "check_counts.npy", "serviceCall_counts.npy"):
    np.save(folder / name, counts(n))
  prompts = tmp_path / "prompt4re" / "chicago"
  prompts.mkdir(parents=True)
  _write_prompts(prompts, [f"Centroid Coordinates: ({41.8 + i / 100}, -87.6)" for i in range(n)])
  return folder


def _write_prompts(folder, texts):
  messages = [
    {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": t}]}
    for t in texts
  ]
  (folder / "prompt_data.json").write_text(json.dumps(messages))


def test_synthetic_root_loads(tmp_path, rng):
  _write_root(tmp_path, rng)
  views = load_city_views("Chi", tmp_path)
  assert views.n_regions == N and views.centroids.shape == (N, 2)
  np.testing.assert_allclose(views.centroids[:, 0], 41.8 + np.arange(N) / 100)


def _expect(tmp_path, file, field, words):
  with pytest.raises(DataError) as info:
    load_city_views("Chi", tmp_path)
  message = str(info.value)
  assert file in message and (field is None or repr(field) in message), message
  # The whole path: Chicago and New York use the same file names.
  folder = "prompt4re/chicago" if file.startswith("prompt_data") else "hafusion/Chi"
  assert str(tmp_path / folder / file) in message, message
  for word in words:
    assert word in message, message


def test_missing_file(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  (folder / "poi_simi.npy").unlink()
  _expect(tmp_path, "poi_simi.npy", "poi_similarity", ["file missing"])


def test_shape_mismatch_between_views(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  np.save(folder / "landUse_dist.npy", np.ones((N + 1, 12), np.int32))
  _expect(tmp_path, "landUse_dist.npy", "landuse", [f"({N + 1}, 12)", f"N = {N}"])


def test_similarity_shape_mismatch(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  np.save(folder / "landUse_simi.npy", np.ones((N, N - 1)))
  _expect(tmp_path, "landUse_simi.npy", "landuse_similarity", ["shape"])


@pytest.mark.parametrize("bad", [np.nan, 1e300])  # 1e300 is finite, but inf in float32
def test_nan_values(tmp_path, rng, bad):
  folder = _write_root(tmp_path, rng)
  sim = rng.random((N, N))
  sim[2, 3] = bad
  sim[4, 0] = np.inf
  np.save(folder / "poi_simi.npy", sim)
  _expect(
    tmp_path,
    "poi_simi.npy",
    "poi_similarity",
    ["2 non-finite (NaN/inf, or beyond float32's range) values", "(2, 3)"],
  )


def test_negative_counts(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  trips = np.ones((N, N), np.int32)
  trips[1, 4] = -3
  np.save(folder / "mob_dist.npy", trips)
  _expect(tmp_path, "mob_dist.npy", "mobility_dist", ["1 negative counts", "(1, 4)"])


def test_constant_label(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  np.save(folder / "crime_counts.npy", np.zeros(N))
  _expect(tmp_path, "crime_counts.npy", "crime", [f"all {N} values equal 0.0"])


def test_folder_in_place_of_a_file(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  (folder / "poi_simi.npy").unlink()
  (folder / "poi_simi.npy").mkdir()
  _expect(tmp_path, "poi_simi.npy", "poi_similarity", ["is not a file"])


def test_negative_label(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  np.save(folder / "check_counts.npy", -np.ones(N))
  _expect(tmp_path, "check_counts.npy", "checkIn", ["negative"])


def test_unparsable_centroid(tmp_path, rng):
  _write_root(tmp_path, rng)
  texts = [f"Centroid Coordinates: ({41.8 + i / 100}, -87.6)" for i in range(N)]
  texts[3] = "Centroid Coordinates: (41.9; west)"
  _write_prompts(tmp_path / "prompt4re" / "chicago", texts)
  _expect(tmp_path, "prompt_data.json entry 3", "Centroid Coordinates", ["two numbers"])


def test_a_centroid_far_from_the_city_is_named(tmp_path, rng):
  # (lon, lat) for one region: inside the valid ranges, ~12,000 km away.
  _write_root(tmp_path, rng)
  texts = [f"Centroid Coordinates: ({41.8 + i / 100}, -87.6)" for i in range(N)]
  texts[4] = "Centroid Coordinates: (-87.6, 41.84)"
  _write_prompts(tmp_path / "prompt4re" / "chicago", texts)
  _expect(
    tmp_path,
    "prompt_data.json entry 4",
    "Centroid Coordinates",
    ["(-87.6, 41.84) lies over 300 km from the median centroid (1 such entries)"],
  )


def test_two_regions_with_one_centroid_are_named(tmp_path, rng):
  # A copied line: the distance view would have no weight for the pair.
  _write_root(tmp_path, rng)
  texts = [f"Centroid Coordinates: ({41.8 + i / 100}, -87.6)" for i in range(N)]
  texts[1] = texts[3] = "Centroid Coordinates: (41.81, -87.6)"
  _write_prompts(tmp_path / "prompt4re" / "chicago", texts)
  _expect(
    tmp_path,
    "prompt_data.json entries 1, 3",
    "Centroid Coordinates",
    ["the same centroid (41.81, -87.6); each region needs its own"],
  )


def test_prompt_texts_with_a_byte_order_mark_or_without_text(tmp_path, rng):
  _write_root(tmp_path, rng)
  path = tmp_path / "prompt4re" / "chicago" / "prompt_data.json"
  path.write_text("\ufeff" + path.read_text(), encoding="utf-8")  # as Windows tools save it
  assert load_city_views("Chi", tmp_path).centroids.shape == (N, 2)
  messages = json.loads(path.read_text(encoding="utf-8-sig"))
  messages[2]["content"] = [{"type": "image", "image": "x.png"}]
  path.write_text(json.dumps(messages))
  _expect(tmp_path, "prompt_data.json entry 2", "content", ["expected one text item, found 0"])


def test_centroid_count_mismatch(tmp_path, rng):
  _write_root(tmp_path, rng)
  texts = [f"Centroid Coordinates: ({41.8 + i / 100}, -87.6)" for i in range(N - 1)]
  _write_prompts(tmp_path / "prompt4re" / "chicago", texts)
  _expect(tmp_path, "prompt_data.json", "Centroid Coordinates", [f"{N - 1} regions", f"{N}"])


def test_non_square_mobility(tmp_path, rng):
  folder = _write_root(tmp_path, rng)
  np.save(folder / "mob-adj.npy", np.ones((N, N + 2)))
  _expect(tmp_path, "mob-adj.npy", "mobility", ["square"])


def test_unknown_city(tmp_path):
  with pytest.raises(DataError, match="unknown city 'SF'"):
    load_city_views("SF", tmp_path)


@pytest.mark.parametrize(
  "text, problem",
  [
    ("no coordinates here", "found 0"),
    ("Centroid Coordinates: (abc, -87.6)", "not numbers"),
    ("Centroid Coordinates: (141.8, -87.6)", "not a valid"),
    ("Centroid Coordinates: (nan, -87.6)", "not a valid"),
    (5, "the geo-text is a int, not a string"),
  ],
)
def test_parse_centroid_errors(text, problem):
  with pytest.raises(DataError, match=problem):
    parse_centroid(text)
  assert parse_centroid("Centroid Coordinates: (41.5, -87.25)") == (41.5, -87.25)


def test_each_view_and_label_comes_from_its_own_file(tmp_path, rng):
  # Every file gets values no other file has, so a view read from the wrong
  # file (both similarities are N x N, all labels are (N,)) cannot pass.
  folder = _write_root(tmp_path, rng)
  base = np.arange(N * N, dtype=np.float64).reshape(N, N)
  square = {
    "mob-adj.npy": base + 1,
    "mob_dist.npy": 2 * base,
    "poi_simi.npy": base / 100,
    "landUse_simi.npy": base / 1000 + 0.5,
  }
  labels = {
    "crime_counts.npy": np.arange(N) + 1.0,
    "check_counts.npy": 10 * np.arange(N) + 3.0,
    "serviceCall_counts.npy": 100 * np.arange(N) + 7.0,
  }
  for name, array in {**square, **labels}.items():
    np.save(folder / name, array)
  views = load_city_views("Chi", tmp_path)
  # HAFusion: mob_dist feeds the mobility encoder, mob-adj is the loss target.
  np.testing.assert_array_equal(views.mobility, square["mob-adj.npy"])
  np.testing.assert_array_equal(views.mobility_dist, square["mob_dist.npy"])
  np.testing.assert_array_equal(views.mobility_features, square["mob_dist.npy"])
  np.testing.assert_array_equal(views.poi_similarity, square["poi_simi.npy"])
  np.testing.assert_array_equal(views.landuse_similarity, square["landUse_simi.npy"])
  np.testing.assert_array_equal(views.labels["crime"], labels["crime_counts.npy"])
  np.testing.assert_array_equal(views.labels["checkIn"], labels["check_counts.npy"])
  np.testing.assert_array_equal(views.labels["serviceCall"], labels["serviceCall_counts.npy"])
  # Without a separate feature matrix the encoder reads the trip counts.
  no_dist = dataclasses.replace(views, mobility_dist=None)
  np.testing.assert_array_equal(no_dist.mobility_features, square["mob-adj.npy"])
