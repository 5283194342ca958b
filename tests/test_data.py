"""Tests for the data layer: WKT centroids, the CoRE city loader, data root and fetch."""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import os
import pathlib
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import chex
import numpy as np
import pytest

from jaxurban.data import fetch
from jaxurban.data.core_city import (
  LABEL_NAMES,
  city_dir,
  list_cities,
  load_city,
  polygon_centroids,
)
from jaxurban.data.errors import DataError
from jaxurban.data.root import DATA_ENV, resolve_data_root, subdir
from jaxurban.data.wkt import parse_wkt, polygon_area, polygon_centroid

CORE_MIRROR = pathlib.Path("/work/.mirror/AIMUrban+CoRE/repo")


# ---------------------------------------------------------------------------
# WKT


def test_wkt_square():
  assert polygon_centroid("POLYGON ((0 0, 2 0, 2 2, 0 2, 0 0))") == (1.0, 1.0)
  assert polygon_area("POLYGON ((0 0, 2 0, 2 2, 0 2, 0 0))") == 4.0


def test_wkt_orientation_does_not_matter():
  ccw = polygon_centroid("POLYGON ((0 0, 3 0, 3 1, 0 1, 0 0))")
  cw = polygon_centroid("POLYGON ((0 0, 0 1, 3 1, 3 0, 0 0))")
  assert ccw == cw == (1.5, 0.5)


def test_wkt_polygon_with_hole():
  # 4x4 square (area 16, centroid (2, 2)) minus the 2x2 corner (area 4,
  # centroid (1, 1)): ((16*2 - 4*1) / 12) = 7/3 on both axes.
  text = "POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0), (0 0, 0 2, 2 2, 2 0, 0 0))"
  lon, lat = polygon_centroid(text)
  assert lon == pytest.approx(7 / 3, abs=1e-12)
  assert lat == pytest.approx(7 / 3, abs=1e-12)
  assert polygon_area(text) == pytest.approx(12.0)


def test_wkt_multipolygon_weights_parts_by_area():
  # Unit square at (0.5, 0.5) and a 2x2 square at (3, 1): ((0.5 + 4*3)/5, (0.5 + 4*1)/5).
  text = "MULTIPOLYGON (((0 0, 1 0, 1 1, 0 1, 0 0)), ((2 0, 4 0, 4 2, 2 2, 2 0)))"
  lon, lat = polygon_centroid(text)
  assert lon == pytest.approx(2.5, abs=1e-12)
  assert lat == pytest.approx(0.9, abs=1e-12)


def test_wkt_multipolygon_with_hole_and_real_coordinates():
  # Far from the origin and tiny, as real region outlines are.
  x0, y0, s = 116.3, 39.9, 1e-3
  outer = f"({x0} {y0}, {x0 + 2 * s} {y0}, {x0 + 2 * s} {y0 + 2 * s}, {x0} {y0 + 2 * s}, {x0} {y0})"
  hole = f"({x0} {y0}, {x0} {y0 + s}, {x0 + s} {y0 + s}, {x0 + s} {y0}, {x0} {y0})"
  lon, lat = polygon_centroid(f"MULTIPOLYGON (({outer}, {hole}))")
  assert lon == pytest.approx(x0 + s * 7 / 6, abs=1e-12)
  assert lat == pytest.approx(y0 + s * 7 / 6, abs=1e-12)


def test_wkt_parse_structure_and_z():
  polys = parse_wkt("polygon z ((0 0 5, 1 0 5, 1 1 5, 0 0 5))")
  assert len(polys) == 1 and len(polys[0]) == 1
  chex.assert_shape(polys[0][0], (4, 2))


def test_wkt_z_and_m_ordinates_are_dropped_not_read_as_y():
  # WKT puts x (lon) and y (lat) first; a third and fourth number are Z and M.
  # The 4x2 rectangle's centroid is (2, 1) whatever those extra numbers hold.
  xy = [(0, 0), (4, 0), (4, 2), (0, 2), (0, 0)]
  z = [9, 1, 3, 5, 9]
  with_z = ", ".join(f"{x} {y} {h}" for (x, y), h in zip(xy, z))
  with_zm = ", ".join(f"{x} {y} {h} {10 * h}" for (x, y), h in zip(xy, z))
  for text in (f"POLYGON Z (({with_z}))", f"POLYGON ZM (({with_zm}))"):
    assert polygon_centroid(text) == pytest.approx((2.0, 1.0), abs=1e-12)
    assert polygon_area(text) == pytest.approx(8.0, abs=1e-12)
    np.testing.assert_array_equal(parse_wkt(text)[0][0], np.array(xy, dtype=float))


@pytest.mark.parametrize(
  "text, problem",
  [
    ("LINESTRING (0 0, 1 1)", "expected POLYGON or MULTIPOLYGON"),
    ("POLYGON EMPTY", "no coordinates"),
    ("POLYGON ((0 0, 1 0, 1 1, 0 0)", "unbalanced"),
    ("POLYGON ((0 0, 1 0, 1 1, 0 0))) ", "trailing text"),
    ("POLYGON ((0 0, 1 x, 1 1, 0 0))", "non-numeric value 'x'"),
    ("POLYGON ((0 0, 1 0, 1 1 1, 0 0))", "vertex 2 has 3 numbers"),
    ("POLYGON ((0 0, 1 0, 0 0))", "at least 4 vertices"),
    ("POLYGON ((0 0, 1 0, 1 1, 0 1))", "not closed"),
    ("POLYGON (0 0, 1 0, 1 1, 0 0)", "list of coordinate rings"),
    ("MULTIPOLYGON ((0 0, 1 0, 1 1, 0 0))", "list of coordinate rings"),
    ("POLYGON ((0 0, 1 0, 2 0, 0 0))", "zero area"),
    ("POLYGON ((0 0, 1 0, nan 1, 0 0))", "non-finite"),
    # Two disjoint parts written as one polygon: the second is not a hole.
    ("POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0), (5 5, 6 5, 6 6, 5 6, 5 5))", "ring 1 is not inside"),
    ("POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0), (0 0, 1 0, 1 1, 0 1, 0 0))", "ring 1 is not inside"),
    # Smaller than the exterior but reaching past its bounding box.
    ("POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0), (3 3, 5 3, 5 3.5, 3 3.5, 3 3))", "ring 1 is not inside"),
    (
      "POLYGON FOO ((0 0, 1 0, 1 1, 0 0))",
      "unexpected words before the coordinates: 'POLYGON FOO'",
    ),
    ("POLYGON Z M ((0 0, 1 0, 1 1, 0 0))", "unexpected words"),
    (
      "MULTIPOLYGON (((0 0, 4 0, 4 4, 0 4, 0 0)), ((0 0, 1 0, 1 1, 0 0), (2 2, 3 2, 3 3, 2 2)))",
      "polygon 1 ring 1 is not inside",
    ),
  ],
)
def test_wkt_malformed_raises_value_error(text, problem):
  with pytest.raises(ValueError, match=re.escape(problem)):
    polygon_centroid(text)


def test_wkt_hole_on_the_exterior_edge_after_rounding():
  # A hole whose edge lies on the exterior's, written with a last-digit
  # rounding difference (as polygons exported through float32 often are),
  # is still a hole: 4x4 square minus the 2x2 band along its right edge.
  edge = 4 + 4e-15
  text = f"POLYGON ((0 0, 4 0, 4 4, 0 4, 0 0), (2 0, {edge} 0, {edge} 2, 2 2, 2 0))"
  assert polygon_area(text) == pytest.approx(12.0, abs=1e-9)


# ---------------------------------------------------------------------------
# Real cities

EXPECTED = {"xa": (1056, 7300, 499), "cd": (1306, 9498, 670)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_city_counts_and_dtypes(core_city, name):
  city = core_city(name)
  n, e, self_loops = EXPECTED[name]
  assert city.name == name
  assert city.n_regions == n
  assert city.n_edges == e
  chex.assert_shape(city.geo_ids, (n,))
  chex.assert_shape(city.centroids, (n, 2))
  chex.assert_shape(
    [city.edge_origin, city.edge_destination, city.edge_weight, city.edge_weight_raw], (e,)
  )
  assert city.geo_ids.dtype == np.int64
  assert city.centroids.dtype == np.float64
  assert city.edge_origin.dtype == np.int32 and city.edge_destination.dtype == np.int32
  assert city.edge_origin.min() >= 0 and city.edge_origin.max() < n
  assert city.edge_destination.min() >= 0 and city.edge_destination.max() < n
  # Self loops are data, not noise: the loader must keep every one of them.
  assert int((city.edge_origin == city.edge_destination).sum()) == self_loops
  assert city.od_flow is None
  assert "Shape_Area" in city.attributes and "type" not in city.attributes
  assert all(v.dtype == np.float64 and v.shape == (n,) for v in city.attributes.values())
  assert not city.geo_ids.flags.writeable and not city.edge_weight.flags.writeable


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_city_weights_normalised_per_origin(core_city, name):
  city = core_city(name)
  sums = np.bincount(city.edge_origin, weights=city.edge_weight, minlength=city.n_regions)
  origins = np.unique(city.edge_origin)
  np.testing.assert_allclose(sums[origins], 1.0, atol=1e-12)
  assert city.weights_were_normalised
  np.testing.assert_allclose(city.edge_weight, city.edge_weight_raw, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_city_labels(core_city, name):
  city = core_city(name)
  assert tuple(city.labels) == LABEL_NAMES
  for values in city.labels.values():
    assert values.dtype == np.float64
    chex.assert_shape(values, (city.n_regions,))
    assert np.isfinite(values).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_polygon_centroids_match_m_lon_lat(core_city, data_root, name):
  city = core_city(name)
  computed = polygon_centroids(name, data_root)
  err = np.abs(computed - city.centroids).max()
  print(f"{name}: max |polygon centroid - (m_lon, m_lat)| = {err:.3e} deg")
  # The files' centroid columns are planar area centroids, so they agree to
  # round-off, far inside the 1e-3 degree budget.
  assert err < 1e-9


def test_city_lookup_is_case_insensitive(data_root):
  assert city_dir("XA", data_root).name == "xa"
  assert {"xa", "cd"} <= set(list_cities(data_root))
  assert "published_embeddings" not in list_cities(data_root)


# ---------------------------------------------------------------------------
# Synthetic city folders


def _square(x, y, s=1.0):
  return f"({x} {y}, {x + s} {y}, {x + s} {y + s}, {x} {y + s}, {x} {y})"


def _csv_text(header, rows):
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue()


def _xa_style_geo(n=3):
  header = ["geo_id", "type", "MIX", "geometry", "m_lon", "m_lat"]
  rows = [
    [i, "POLYGON", 0.5 * i, f"POLYGON ({_square(2 * i, 0)})", 2 * i + 0.5, 0.5] for i in range(n)
  ]
  return header, rows


def _xa_style_mob():
  header = ["rel_id", "type", "origin_id", "destination_id", "mobility_weight"]
  rows = [
    [0, "mob", 0, 0, 0.25],
    [1, "mob", 0, 1, 0.75],
    [2, "mob", 1, 2, 1.0],
    [3, "mob", 2, 0, 0.5],
    [4, "mob", 2, 2, 0.5],
  ]
  return header, rows


def make_city(
  root, code="zz", *, geo=None, mob=None, labels=None, od_flow=None, nested=False, folder_name=None
):
  """Writes a city folder ``root/core/<folder_name or code>/`` and returns ``root``."""
  folder = pathlib.Path(root) / "core" / (folder_name or code)
  csv_dir = folder / f"regionmap_{code}" if nested else folder
  csv_dir.mkdir(parents=True, exist_ok=True)
  geo = geo if geo is not None else _xa_style_geo()
  mob = mob if mob is not None else _xa_style_mob()
  (csv_dir / f"regionmap_{code}.geo").write_text(
    geo if isinstance(geo, str) else _csv_text(*geo), encoding="utf-8"
  )
  (csv_dir / f"regionmap_{code}.mob").write_text(
    mob if isinstance(mob, str) else _csv_text(*mob), encoding="utf-8"
  )
  n = 3 if isinstance(geo, str) else len(geo[1])
  labels = labels if labels is not None else {}
  for i, name in enumerate(LABEL_NAMES):
    np.save(folder / f"{name}_{code}_sum.npy", labels.get(name, np.arange(n, dtype=np.float64) + i))
  if od_flow is not None:
    np.save(folder / f"region_od_flow_{code}_11.npy", od_flow)
  return pathlib.Path(root)


def test_synthetic_xa_style_city(tmp_path):
  city = load_city("zz", make_city(tmp_path))
  assert city.n_regions == 3 and city.n_edges == 5
  np.testing.assert_array_equal(city.centroids, [[0.5, 0.5], [2.5, 0.5], [4.5, 0.5]])
  np.testing.assert_array_equal(city.edge_weight, city.edge_weight_raw)
  assert city.weights_were_normalised
  assert list(city.attributes) == ["MIX"]
  assert city.source_dir == tmp_path / "core" / "zz"


def test_an_unreadable_city_file_is_a_data_error(tmp_path, monkeypatch):
  from jaxurban.data import core_city

  root = make_city(tmp_path)

  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  monkeypatch.setattr(core_city, "open", denied, raising=False)
  with pytest.raises(DataError, match=r"regionmap_zz\.geo: cannot be read \(Permission denied\)"):
    load_city("zz", root)


def test_geo_ids_need_not_be_row_numbers(tmp_path):
  header, rows = _xa_style_geo()
  for row, gid in zip(rows, (30, 10, 20)):
    row[0] = gid
  mob = (
    ["origin_id", "destination_id", "mobility_weight"],
    [[10, 30, 1.0], [20, 10, 2.0], [20, 20, 2.0]],
  )
  city = load_city("zz", make_city(tmp_path, geo=(header, rows), mob=mob))
  np.testing.assert_array_equal(city.geo_ids, [30, 10, 20])
  np.testing.assert_array_equal(city.edge_origin, [1, 2, 2])
  np.testing.assert_array_equal(city.edge_destination, [0, 1, 2])
  np.testing.assert_array_equal(city.edge_weight, [1.0, 0.5, 0.5])


def test_beijing_style_variant(tmp_path):
  geo_header = ["geo_id", "WKT", "MIX", "CITY_NAME", "FORM_TYPE", "Shape_Area"]
  geo_rows = [
    [0, f"MULTIPOLYGON (({_square(0, 0)}))", -1.0, "北京", "C: Low-rise block", 1.0],
    # Two parts: unit square at (2.5, 0.5) and 2x2 square at (5, 1).
    [
      1,
      f"MULTIPOLYGON (({_square(2, 0)}), ({_square(4, 0, 2)}))",
      0.3,
      "北京",
      "A: Low-rise point",
      5.0,
    ],
    # 4x4 square with a 2x2 hole in its lower-left corner.
    [
      2,
      f"MULTIPOLYGON (({_square(10, 0, 4)}, {_square(10, 0, 2)}))",
      0.1,
      "北京",
      "I: High-rise block",
      "",  # a missing value
    ],
  ]
  mob_header = ["", "rel_id", "origin_id", "destination_id", "mobility_weight"]
  mob_rows = [[0, 0, 0, 1, 3.0], [1, 1, 0, 2, 1.0], [2, 2, 1, 1, 2.0], [3, 3, 2, 0, 0.5]]
  root = make_city(
    tmp_path,
    "bj",
    geo=(geo_header, geo_rows),
    mob=(mob_header, mob_rows),
    nested=True,
    folder_name="BJ",
  )
  city = load_city("bj", root)
  assert city.name == "bj" and city.n_regions == 3 and city.n_edges == 4
  np.testing.assert_allclose(
    city.centroids,
    [[0.5, 0.5], [(2.5 + 4 * 5) / 5, (0.5 + 4 * 1) / 5], [10 + 7 / 3, 7 / 3]],
    atol=1e-12,
  )
  np.testing.assert_array_equal(city.edge_weight_raw, [3.0, 1.0, 2.0, 0.5])
  np.testing.assert_allclose(city.edge_weight, [0.75, 0.25, 1.0, 1.0])
  assert not city.weights_were_normalised
  # Text columns are not attributes; numeric ones are, whatever their position,
  # with an empty cell as NaN.
  assert set(city.attributes) == {"MIX", "Shape_Area"}
  np.testing.assert_array_equal(city.attributes["Shape_Area"], [1.0, 5.0, np.nan])


def test_rows_repeating_a_pair_are_one_edge_with_summed_weight(tmp_path):
  header, rows = _xa_style_mob()
  # Origin 0's share of 0 -> 1 split over two rows, and 2 -> 2 written twice.
  rows = (
    rows[:1] + [[1, "mob", 0, 1, 0.5], [5, "mob", 0, 1, 0.25]] + rows[2:] + [[6, "mob", 2, 2, 0.5]]
  )
  city = load_city("zz", make_city(tmp_path, mob=(header, rows)))
  np.testing.assert_array_equal(city.edge_origin, [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(city.edge_destination, [0, 1, 2, 0, 2])
  np.testing.assert_allclose(city.edge_weight_raw, [0.25, 0.75, 1.0, 0.5, 1.0])
  np.testing.assert_allclose(city.edge_weight, [0.25, 0.75, 1.0, 1 / 3, 2 / 3])


def test_summed_weights_stay_with_their_pair_when_file_order_is_not_id_order(tmp_path):
  # Eq. (1) has one w_ij per (origin, destination) pair. Here the pairs' first
  # rows are not in (origin, destination) order: each merged weight must
  # still land on its own pair.
  header, _ = _xa_style_mob()
  rows = [
    [0, "mob", 2, 2, 1.0],
    [1, "mob", 0, 1, 0.5],
    [2, "mob", 1, 2, 1.0],
    [3, "mob", 0, 1, 0.25],  # 0 -> 1 again: 0.5 + 0.25
    [4, "mob", 0, 0, 0.25],
    [5, "mob", 2, 0, 0.5],
  ]
  city = load_city("zz", make_city(tmp_path, mob=(header, rows)))
  pairs = list(zip(city.edge_origin.tolist(), city.edge_destination.tolist()))
  assert len(pairs) == len(set(pairs)) == 5  # one edge per pair
  raw = dict(zip(pairs, city.edge_weight_raw.tolist()))
  assert raw == pytest.approx({(2, 2): 1.0, (0, 1): 0.75, (1, 2): 1.0, (0, 0): 0.25, (2, 0): 0.5})
  # Origin 2's raw weights sum to 1.5, so it is not a normalised file.
  normalised = dict(zip(pairs, city.edge_weight.tolist()))
  assert normalised == pytest.approx(
    {(2, 2): 2 / 3, (0, 1): 0.75, (1, 2): 1.0, (0, 0): 0.25, (2, 0): 1 / 3}
  )
  assert not city.weights_were_normalised


def test_labels_stored_as_a_column_vector_are_read_in_region_order(tmp_path):
  # np.save of an (N, 1) column is a common way to write one value per region.
  column = np.array([[7.0], [0.0], [3.5]])
  city = load_city("zz", make_city(tmp_path, labels={"gdp": column}))
  np.testing.assert_array_equal(city.labels["gdp"], [7.0, 0.0, 3.5])
  assert city.labels["gdp"].shape == (3,)


def test_od_flow_loaded_when_present(tmp_path):
  flow = np.arange(9, dtype=np.int64).reshape(3, 3)
  city = load_city("zz", make_city(tmp_path, od_flow=flow))
  assert city.od_flow.dtype == np.float64
  np.testing.assert_array_equal(city.od_flow, flow)


@pytest.mark.skipif(
  not CORE_MIRROR.is_dir() or shutil.which("git") is None, reason="CoRE mirror not available"
)
def test_real_beijing_from_mirror(tmp_path):
  folder = tmp_path / "core" / "bj"
  (folder / "regionmap_bj").mkdir(parents=True)
  sources = {
    "regionmap_bj/regionmap_bj.geo": "raw_data/bj/regionmap_bj/regionmap_bj.geo",
    "regionmap_bj/regionmap_bj.mob": "raw_data/bj/regionmap_bj/regionmap_bj.mob",
    **{f"{name}_bj_sum.npy": f"raw_data/bj/{name}_bj_sum.npy" for name in LABEL_NAMES},
  }
  for local, remote in sources.items():
    blob = subprocess.run(
      ["git", "-C", str(CORE_MIRROR), "show", f"{fetch.CORE_COMMIT}:{remote}"],
      check=True,
      capture_output=True,
    ).stdout
    (folder / local).write_bytes(blob)
    assert hashlib.sha256(blob).hexdigest() == fetch.CORE_FILES["bj"][pathlib.Path(local).name]
  city = load_city("bj", tmp_path)
  print(f"bj: N={city.n_regions} E={city.n_edges} origins={len(np.unique(city.edge_origin))}")
  assert city.n_regions == 1311 and city.n_edges == 39807
  assert not city.weights_were_normalised
  sums = np.bincount(city.edge_origin, weights=city.edge_weight, minlength=city.n_regions)
  np.testing.assert_allclose(sums[np.unique(city.edge_origin)], 1.0, atol=1e-12)
  lon, lat = city.centroids.T
  assert (116.0 < lon).all() and (lon < 117.0).all() and (39.5 < lat).all() and (lat < 40.5).all()
  assert "CITY_NAME" not in city.attributes and "FORM_TYPE" not in city.attributes


# ---------------------------------------------------------------------------
# Error reporting: every problem names the file, the column and what is wrong


def _rewrite(path: pathlib.Path, edit):
  path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")


def test_error_no_data_root(monkeypatch):
  monkeypatch.delenv(DATA_ENV, raising=False)
  with pytest.raises(DataError, match=r"--data-root.*JAXURBAN_DATA.*jaxurban\.data\.fetch"):
    resolve_data_root()
  with pytest.raises(DataError, match="JAXURBAN_DATA"):
    load_city("xa")


def test_an_empty_data_root_is_refused_not_replaced(data_root, monkeypatch):
  # `--data-root "$DATA"` with DATA unset must not quietly read $JAXURBAN_DATA.
  monkeypatch.setenv(DATA_ENV, str(data_root))
  with pytest.raises(DataError, match=r"data root: given as an empty path"):
    resolve_data_root("")
  assert resolve_data_root(None) == data_root


def test_error_data_root_missing(tmp_path, monkeypatch):
  with pytest.raises(
    DataError, match=r"nowhere.*data root from the data_root argument does not exist"
  ):
    resolve_data_root(tmp_path / "nowhere")
  monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
  with pytest.raises(DataError, match=r"gone.*\$JAXURBAN_DATA does not exist"):
    resolve_data_root()


def test_a_relative_data_root_is_returned_absolute(tmp_path, monkeypatch):
  # Results record it and child processes started elsewhere read it.
  (tmp_path / "data").mkdir()
  monkeypatch.chdir(tmp_path)
  assert resolve_data_root("data") == tmp_path / "data"
  monkeypatch.setenv(DATA_ENV, "data")
  assert resolve_data_root() == tmp_path / "data"
  assert resolve_data_root().is_absolute()


def test_data_root_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(DATA_ENV, str(tmp_path))
  assert resolve_data_root() == tmp_path
  assert resolve_data_root(tmp_path / ".") == tmp_path / "."


def test_error_subdir_missing(tmp_path):
  (tmp_path / "core").mkdir()
  (tmp_path / "hafusion").mkdir()
  assert subdir(tmp_path, "core") == tmp_path / "core"
  with pytest.raises(
    DataError, match=r"traffic: folder missing under .* \(it has: core, hafusion\)"
  ):
    subdir(tmp_path, "traffic", "los_loop")
  with pytest.raises(DataError, match=r"core.*folder missing"):
    load_city("xa", tmp_path / "core")


def test_data_root_expands_home_from_the_flag_and_the_variable(tmp_path, monkeypatch):
  # `--data-root ~/data` quoted in a script reaches Python with its tilde.
  (tmp_path / "data").mkdir()
  monkeypatch.setenv("HOME", str(tmp_path))
  assert resolve_data_root("~/data") == tmp_path / "data"
  monkeypatch.setenv(DATA_ENV, "~/data")
  assert resolve_data_root() == tmp_path / "data"


def test_a_file_is_neither_a_data_root_nor_one_of_its_folders(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(
    DataError, match=r"notes\.txt.*data root from the data_root argument is not a folder"
  ):
    resolve_data_root(tmp_path / "notes.txt")
  # A file where a folder is expected is reported as missing, and the
  # listing names folders only, since only they could be meant.
  (tmp_path / "core").write_text("x")
  (tmp_path / "traffic").mkdir()
  with pytest.raises(DataError, match=r"core: folder missing under .* \(it has: traffic\)$"):
    subdir(tmp_path, "core")


def test_error_unknown_city(tmp_path):
  root = make_city(tmp_path)
  make_city(root, "yy")
  with pytest.raises(DataError, match=r"qq: unknown city 'qq'; cities present: yy, zz"):
    load_city("qq", root)


def test_error_missing_required_file(tmp_path):
  root = make_city(tmp_path)
  make_city(root, "yy")
  (root / "core" / "zz" / "co2_zz_sum.npy").unlink()
  with pytest.raises(
    DataError, match=r"co2_zz_sum\.npy: required file missing.*city folders under .*: yy, zz"
  ):
    load_city("zz", root)


def test_error_missing_mob_file(tmp_path):
  root = make_city(tmp_path)
  (root / "core" / "zz" / "regionmap_zz.mob").unlink()
  with pytest.raises(DataError, match=r"regionmap_zz\.mob: required file missing"):
    load_city("zz", root)


@pytest.mark.parametrize(
  "file, drop, column",
  [
    ("regionmap_zz.mob", "mobility_weight", "mobility_weight"),
    ("regionmap_zz.mob", "origin_id", "origin_id"),
    ("regionmap_zz.mob", "destination_id", "destination_id"),
    ("regionmap_zz.geo", "geo_id", "geo_id"),
  ],
)
def test_error_missing_required_column(tmp_path, file, drop, column):
  root = make_city(tmp_path)
  path = root / "core" / "zz" / file
  rows = list(csv.reader(path.read_text().splitlines()))
  k = rows[0].index(drop)
  path.write_text(_csv_text(rows[0][:k] + rows[0][k + 1 :], [r[:k] + r[k + 1 :] for r in rows[1:]]))
  with pytest.raises(
    DataError, match=rf"{re.escape(file)}: column '{column}': required column missing"
  ):
    load_city("zz", root)


def test_error_no_polygon_and_no_centroid_columns(tmp_path):
  geo = (["geo_id", "MIX"], [[0, 1.0], [1, 2.0], [2, 3.0]])
  with pytest.raises(
    DataError, match=r"regionmap_zz\.geo: column 'geometry': required column missing.*WKT"
  ):
    load_city("zz", make_city(tmp_path, geo=geo))


def test_error_unparseable_number(tmp_path):
  header, rows = _xa_style_mob()
  rows[3][4] = "0.5x"
  with pytest.raises(
    DataError,
    match=r"regionmap_zz\.mob: column 'mobility_weight': unparseable number '0\.5x' at row 3",
  ):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


def test_error_unparseable_id(tmp_path):
  header, rows = _xa_style_geo()
  rows[1][0] = "one"
  with pytest.raises(
    DataError, match=r"regionmap_zz\.geo: column 'geo_id': unparseable integer id 'one' at row 1"
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


def test_ids_written_as_floats_are_exact_beyond_two_to_the_53(tmp_path):
  # Large ids (H3, OSM) written through a float column: "...995.0" is read from
  # its digits, not rounded through a float onto a neighbouring region's id.
  base = 2**53
  header, rows = _xa_style_geo()
  for i, row in enumerate(rows):
    row[0] = base + 1 + i  # ...993, ...994, ...995
  mob_header, _ = _xa_style_mob()
  mob = [[0, "mob", f"{base + 3}.0", f"{base + 2}.00", 1.0]]
  city = load_city("zz", make_city(tmp_path, geo=(header, rows), mob=(mob_header, mob)))
  assert city.geo_ids[city.edge_origin].tolist() == [base + 3]
  assert city.geo_ids[city.edge_destination].tolist() == [base + 2]
  # Exponent notation cannot be read exactly there: refused, not rounded.
  mob = [[0, "mob", "9.007199254740995e15", base + 2, 1.0]]
  with pytest.raises(
    DataError, match=r"regionmap_zz\.mob: column 'origin_id': integer id .* beyond 2\*\*53"
  ):
    load_city("zz", make_city(tmp_path / "e", geo=(header, rows), mob=(mob_header, mob)))


def test_error_unparseable_coordinate(tmp_path):
  header, rows = _xa_style_geo()
  rows[2][5] = ""
  with pytest.raises(
    DataError, match=r"regionmap_zz\.geo: column 'm_lat': unparseable number '' at row 2"
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


def test_error_ragged_row(tmp_path):
  root = make_city(tmp_path)
  _rewrite(root / "core" / "zz" / "regionmap_zz.mob", lambda t: t + "5,mob,1,1\n")
  with pytest.raises(
    DataError, match=r"regionmap_zz\.mob: row 5 has 4 fields but the header has 5"
  ):
    load_city("zz", root)


@pytest.mark.parametrize("separator, word", [(";", "semicolons"), ("\t", "tabs")])
def test_error_other_separator(tmp_path, separator, word):
  root = make_city(tmp_path)
  _rewrite(root / "core" / "zz" / "regionmap_zz.geo", lambda t: t.replace(",", separator))
  with pytest.raises(
    DataError,
    match=rf"regionmap_zz\.geo: line 1 is one field holding {word}: the file must be "
    "comma-separated",
  ):
    load_city("zz", root)


def test_error_bad_polygon(tmp_path):
  header, rows = _xa_style_geo()
  header, rows = header[:4], [r[:4] for r in rows]  # no m_lon/m_lat: polygons are parsed
  rows[1][3] = "POLYGON ((0 0, 1 0, 1 1))"
  with pytest.raises(
    DataError, match=r"regionmap_zz\.geo: column 'geometry': bad polygon at row 1: .*at least 4"
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


def test_error_duplicate_geo_id(tmp_path):
  header, rows = _xa_style_geo()
  rows[2][0] = 0
  with pytest.raises(
    DataError,
    match=r"regionmap_zz\.geo: column 'geo_id': 1 geo ids appear more than once \(e\.g\. \[0\]; first repeat at row 2\)",
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


def test_error_label_length(tmp_path):
  root = make_city(tmp_path, labels={"gdp": np.zeros(2)})
  with pytest.raises(
    DataError,
    match=r"gdp_zz_sum\.npy: label array has 2 values but regionmap_zz\.geo has 3 regions",
  ):
    load_city("zz", root)


def test_error_label_not_an_array(tmp_path):
  root = make_city(tmp_path)
  (root / "core" / "zz" / "co2_zz_sum.npy").write_bytes(b"not numpy")
  with pytest.raises(DataError, match=r"co2_zz_sum\.npy: not a \.npy file \(no \.npy header\)"):
    load_city("zz", root)
  # A .npy file cut short is named as such.
  np.save(root / "core" / "zz" / "co2_zz_sum.npy", np.arange(100.0))
  data = (root / "core" / "zz" / "co2_zz_sum.npy").read_bytes()
  (root / "core" / "zz" / "co2_zz_sum.npy").write_bytes(data[:-40])
  with pytest.raises(DataError, match=r"co2_zz_sum\.npy: not a readable \.npy array"):
    load_city("zz", root)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300, -4e38])  # the last two overflow float32
def test_error_nonfinite_labels(tmp_path, bad):
  root = make_city(tmp_path, labels={"population": np.array([1.0, bad, np.inf])})
  with pytest.raises(
    DataError,
    match=r"population_zz_sum\.npy: 2 non-finite \(NaN/inf, or beyond float32's range\) label values \(first at region 1\)",
  ):
    load_city("zz", root)


def test_error_negative_labels(tmp_path):
  root = make_city(tmp_path, labels={"gdp": np.array([1.0, -1.0, 3.0])})
  with pytest.raises(
    DataError, match=r"gdp_zz_sum\.npy: 1 negative label values \(first -1\.0 at region 1\)"
  ):
    load_city("zz", root)


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_error_constant_labels(tmp_path, value):
  # Nothing to regress; with zeros every MAPE would be undefined.
  root = make_city(tmp_path, labels={"co2": np.full(3, value)})
  with pytest.raises(DataError, match=rf"co2_zz_sum\.npy: all 3 label values equal {value}$"):
    load_city("zz", root)


@pytest.mark.parametrize("name", ["gdp_zz_sum.npy", "region_od_flow_zz_11.npy"])
def test_error_folder_in_place_of_a_file(tmp_path, name):
  # A required file's name is not "missing", and an optional one is not
  # passed over as absent.
  root = make_city(tmp_path)
  path = root / "core" / "zz" / name
  path.unlink(missing_ok=True)
  path.mkdir()
  with pytest.raises(DataError) as caught:
    load_city("zz", root)
  assert str(caught.value) == f"{path}: is not a file (a folder or other entry has its name)"


@pytest.mark.parametrize("value", ["99999999999999999999999", "1e30"])  # written as int or float
def test_error_id_too_large(tmp_path, value):
  header, rows = _xa_style_mob()
  rows[2][2] = value
  with pytest.raises(
    DataError,
    match=rf"regionmap_zz\.mob: column 'origin_id': integer id '{value}' at row 2 does not fit "
    "in 64 bits",
  ):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


@pytest.mark.parametrize("column, index, value", [("m_lon", 4, 500.0), ("m_lat", 5, -91.5)])
def test_error_coordinates_out_of_range(tmp_path, column, index, value):
  header, rows = _xa_style_geo()
  assert header[index] == column
  rows[1][index] = value
  with pytest.raises(
    DataError,
    match=rf"regionmap_zz\.geo: column '{column}': 1 values outside .* degrees "
    rf"\(first {value} at row 1\)",
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


@pytest.mark.parametrize("bad", ["nan", "1e39"])
def test_error_nonfinite_weights(tmp_path, bad):
  header, rows = _xa_style_mob()
  rows[1][4] = bad
  rows[4][4] = "inf"
  with pytest.raises(
    DataError,
    match=r"regionmap_zz\.mob: column 'mobility_weight': 2 non-finite \(NaN/inf, or beyond float32's range\) weights "
    r"\(first at row 1\)",
  ):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


def test_error_nonfinite_coordinates(tmp_path):
  header, rows = _xa_style_geo()
  rows[0][4] = "nan"
  with pytest.raises(
    DataError,
    match=r"regionmap_zz\.geo: column 'm_lon': 1 non-finite \(NaN/inf, or beyond float32's range\) coordinates "
    r"\(first at row 0\)",
  ):
    load_city("zz", make_city(tmp_path, geo=(header, rows)))


def test_error_negative_weights(tmp_path):
  header, rows = _xa_style_mob()
  rows[1][4] = -0.75
  rows[3][4] = -0.5
  with pytest.raises(
    DataError,
    match=r"regionmap_zz\.mob: column 'mobility_weight': 2 negative weights \(first at row 1\)",
  ):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


def test_error_ids_absent_from_geo(tmp_path):
  header = ["origin_id", "destination_id", "mobility_weight"]
  rows = [[0, 1, 1.0], [1, 9, 1.0], [2, 7, 1.0], [2, 9, 1.0], [2, 0, 1.0]]
  pattern = (
    r"regionmap_zz\.mob: column 'destination_id': 3 rows reference geo ids absent from "
    r"regionmap_zz\.geo \(2 distinct, e\.g\. \[9, 7\]; first at row 1\)"
  )
  with pytest.raises(DataError, match=pattern):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


def test_error_ids_absent_from_geo_in_both_columns_reported_together(tmp_path):
  header = ["origin_id", "destination_id", "mobility_weight"]
  rows = [[0, 1, 1.0], [1, 9, 1.0], [8, 7, 1.0], [2, 0, 1.0]]
  pattern = (
    r"regionmap_zz\.mob: column 'origin_id': 1 rows reference geo ids absent from "
    r"regionmap_zz\.geo \(1 distinct, e\.g\. \[8\]; first at row 2\); "
    r"column 'destination_id': 2 rows .* \(2 distinct, e\.g\. \[9, 7\]; first at row 1\)"
  )
  with pytest.raises(DataError, match=pattern):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))


def test_error_ids_absent_shows_at_most_five(tmp_path):
  rows = [[100 + i, 0, 1.0] for i in range(8)]
  with pytest.raises(
    DataError,
    match=r"column 'origin_id': 8 rows .* \(8 distinct, e\.g\. \[100, 101, 102, 103, 104\];",
  ):
    load_city(
      "zz", make_city(tmp_path, mob=(["origin_id", "destination_id", "mobility_weight"], rows))
    )


def test_pairs_of_weight_zero_are_no_edges(tmp_path):
  # As in the authors' code, which keeps the non-zero entries of a dense
  # matrix: a zero-weight row is no trip, so no edge of the GAT.
  header, rows = _xa_style_mob()
  rows[1][4] = 0.0  # 0 -> 1
  rows[2][4] = 0.0  # 1 -> 2, origin 1's only row
  city = load_city("zz", make_city(tmp_path / "a", mob=(header, rows)))
  assert city.zero_weight_pairs == 2 and city.n_edges == 3
  pairs = set(zip(city.edge_origin.tolist(), city.edge_destination.tolist()))
  assert pairs == {(0, 0), (2, 0), (2, 2)}
  np.testing.assert_allclose(city.edge_weight, [1.0, 0.5, 0.5])
  for row in rows:
    row[4] = 0.0
  with pytest.raises(
    DataError, match=r"regionmap_zz\.mob: column 'mobility_weight': every weight is 0"
  ):
    load_city("zz", make_city(tmp_path / "b", mob=(header, rows)))


@pytest.mark.parametrize(
  "flow, problem",
  [
    (np.zeros((3, 2)), r"expected shape \(3, 3\) to match the region count, got \(3, 2\)"),
    (
      np.array([[0, -1, 0], [0, 0, 0], [-2, 0, 0]], dtype=float),
      r"2 negative flow values \(first at \[0, 1\]\)",
    ),
    (
      np.array([[0, np.nan, 0], [0, 0, 0], [0, 0, 0]]),
      r"1 non-finite \(NaN/inf, or beyond float32's range\) flow values",
    ),
    (
      np.array([[0, 1e300, 0], [0, 0, 0], [0, 0, 0]]),
      r"1 non-finite \(NaN/inf, or beyond float32's range\) flow values",
    ),
    (np.zeros((3, 3)), r"every flow value is 0, so there is no mobility to learn from"),
  ],
)
def test_error_bad_od_flow(tmp_path, flow, problem):
  with pytest.raises(DataError, match=r"region_od_flow_zz_11\.npy: " + problem):
    load_city("zz", make_city(tmp_path, od_flow=flow))


def test_error_empty_mob(tmp_path):
  header, _ = _xa_style_mob()
  with pytest.raises(DataError, match=r"regionmap_zz\.mob: no mobility rows"):
    load_city("zz", make_city(tmp_path, mob=(header, [])))
  with pytest.raises(DataError, match=r"regionmap_zz\.mob: file is empty"):
    load_city("zz", make_city(tmp_path, mob=""))


def test_error_empty_geo(tmp_path):
  header, _ = _xa_style_geo()
  with pytest.raises(DataError, match=r"regionmap_zz\.geo: no region rows"):
    load_city("zz", make_city(tmp_path, geo=(header, [])))


def test_data_error_is_value_error_and_picklable():
  import pickle

  err = DataError("a.mob", "2 negative weights", column="w")
  assert isinstance(err, ValueError)
  assert str(err) == "a.mob: column 'w': 2 negative weights"
  again = pickle.loads(pickle.dumps(err))
  assert str(again) == str(err) and again.column == "w"


# ---------------------------------------------------------------------------
# Checked download (local file:// URLs only)


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def test_download_verified_writes_atomically(tmp_path):
  src = tmp_path / "src.bin"
  src.write_bytes(b"region data" * 1000)
  target = tmp_path / "out" / "file.bin"
  fetch.download_verified(src.as_uri(), target, _sha(src.read_bytes()))
  assert target.read_bytes() == src.read_bytes()
  assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_download_verified_rejects_hash_mismatch(tmp_path):
  src = tmp_path / "src.bin"
  src.write_bytes(b"tampered")
  target = tmp_path / "out" / "file.bin"
  target.parent.mkdir()
  target.write_bytes(b"previous good copy")
  with pytest.raises(
    DataError,
    match=r"file\.bin: SHA-256 mismatch for file://.*src\.bin: got [0-9a-f]{64}, expected 0+; the download was discarded",
  ):
    fetch.download_verified(src.as_uri(), target, "0" * 64)
  # The old file is untouched and no temporary file is left behind.
  assert target.read_bytes() == b"previous good copy"
  assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_download_interrupted_leaves_nothing(tmp_path):
  class Broken:
    def read(self, n):
      raise ConnectionResetError("connection dropped")

  target = tmp_path / "file.bin"
  with pytest.raises(ConnectionResetError):
    fetch.download_verified(
      "https://example.invalid/x", target, "0" * 64, opener=lambda url, timeout: Broken()
    )
  assert list(tmp_path.iterdir()) == []


def test_download_closes_its_response(tmp_path):
  class Response:
    closed = False

    def __init__(self, data):
      self.stream = io.BytesIO(data)

    def read(self, size):
      return self.stream.read(size)

    def close(self):
      Response.closed = True

  data = b"x" * 100
  target = tmp_path / "file.bin"
  fetch.download_verified(
    "https://example.invalid/x", target, _sha(data), opener=lambda url, timeout: Response(data)
  )
  assert target.read_bytes() == data and Response.closed
  # Closed on a hash mismatch too.
  Response.closed = False
  with pytest.raises(DataError, match="SHA-256 mismatch"):
    fetch.download_verified(
      "https://example.invalid/x", target, "0" * 64, opener=lambda url, timeout: Response(data)
    )
  assert Response.closed


@pytest.mark.parametrize(
  "error, reason",
  [
    # urlopen wraps a refused connection's OSError in a URLError.
    (
      urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
      "[Errno 111] Connection refused",
    ),
    (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
    (TimeoutError("The read operation timed out"), "The read operation timed out"),
    (http.client.IncompleteRead(b"abc", 10), "IncompleteRead(3 bytes read, 10 more expected)"),
  ],
)
def test_a_failed_download_is_named_by_its_cause(tmp_path, monkeypatch, error, reason):
  monkeypatch.delenv(DATA_ENV, raising=False)

  def failing(url, timeout):
    raise error

  with pytest.raises(DataError) as info:
    fetch.ensure_city("xa", cache_dir=tmp_path, opener=failing)
  assert f"download failed ({reason})." in str(info.value)


def test_core_urls_follow_the_authors_layout():
  urls = fetch.core_urls("XA")
  base = f"https://raw.githubusercontent.com/AIMUrban/CoRE/{fetch.CORE_COMMIT}/raw_data/xa/"
  assert urls["regionmap_xa.geo"] == base + "regionmap_xa/regionmap_xa.geo"
  assert urls["gdp_xa_sum.npy"] == base + "gdp_xa_sum.npy"
  assert set(fetch.CORE_FILES) == {"xa", "cd", "bj"}
  with pytest.raises(
    DataError, match=r"core/paris: unknown CoRE city 'paris'; downloadable cities: bj, cd, xa"
  ):
    fetch.core_urls("paris")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hash_table_matches_shared_data(data_root, name):
  for filename, digest in fetch.CORE_FILES[name].items():
    assert fetch.sha256_file(data_root / "core" / name / filename) == digest, filename


def _authors_tree(tmp_path, data_root, code="xa"):
  """A local copy of the authors' ``raw_data`` layout, served through file:// URLs."""
  remote = tmp_path / "remote"
  for filename, url in fetch.core_urls(code, remote.as_uri()).items():
    dest = pathlib.Path(urllib.request.url2pathname(url.removeprefix("file://")))
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_root / "core" / code / filename, dest)
  return remote


def test_fetch_city_into_our_layout(tmp_path, data_root):
  remote = _authors_tree(tmp_path, data_root)
  folder = fetch.fetch_city("xa", tmp_path / "dest", base_url=remote.as_uri())
  assert folder == tmp_path / "dest" / "core" / "xa"
  assert sorted(p.name for p in folder.iterdir()) == sorted(fetch.CORE_FILES["xa"])
  assert load_city("xa", tmp_path / "dest").n_regions == 1056


def test_ensure_city_order_and_offline_message(tmp_path, data_root, monkeypatch):
  monkeypatch.delenv(DATA_ENV, raising=False)
  monkeypatch.delenv(fetch.CACHE_ENV, raising=False)
  # 1. The data root wins when it has the city.
  assert (
    fetch.ensure_city("XA", data_root, cache_dir=tmp_path / "cache") == data_root / "core" / "xa"
  )

  # 2. Otherwise the network is tried; unreachable -> exact instructions.
  def offline(url, timeout):
    raise urllib.error.URLError("Temporary failure in name resolution")

  cache = tmp_path / "cache"
  with pytest.raises(DataError) as info:
    fetch.ensure_city("cd", cache_dir=cache, opener=offline)
  message = str(info.value)
  assert "download failed (Temporary failure in name resolution)" in message
  # No data root was named: the message says so, since that is the usual slip.
  assert "is not in the cache, and no data root was given (--data-root or $JAXURBAN_DATA)" in (
    message
  )
  assert "python -m jaxurban.data.fetch core cd --dest DIR" in message
  assert str(cache / "core" / "cd" / "regionmap_cd.geo") in message
  assert "raw_data/cd/regionmap_cd/regionmap_cd.geo" in message
  assert not list((cache / "core" / "cd").glob("*"))

  # 3. A verified cache is used without touching the network.
  remote = _authors_tree(tmp_path, data_root, "cd")
  fetch.fetch_city("cd", cache, base_url=remote.as_uri())
  monkeypatch.setenv(fetch.CACHE_ENV, str(cache))
  assert fetch.ensure_city("cd", opener=offline) == cache / "core" / "cd"

  # 4. A data root given one level too deep (…/core) holds no core/ folder:
  # the cache still serves, the run's log says where the city came from,
  # and a failed download says what the root holds.
  from jaxurban.core.train import _outside_data_root

  nested = data_root / "core"
  found = fetch.ensure_city("cd", nested, opener=offline)
  assert found == cache / "core" / "cd"
  note = _outside_data_root(found, nested)
  assert note == f" (the download cache: the data root {nested} holds no such city)"
  assert _outside_data_root(data_root / "core" / "xa", data_root) == ""
  with pytest.raises(DataError) as info:
    fetch.ensure_city("cd", nested, cache_dir=tmp_path / "empty", opener=offline)
  assert f"the data root {nested} has no 'core' folder (it has: cd, " in str(info.value)

  # 5. A data root with a core/ folder that lacks the city: the message
  # names what the root holds, not "no data root was given".
  root = tmp_path / "root"
  (root / "core").mkdir(parents=True)
  (root / "core" / "xa").symlink_to(data_root / "core" / "xa")
  with pytest.raises(DataError) as info:
    fetch.ensure_city("bj", root, cache_dir=tmp_path / "empty", opener=offline)
  message = str(info.value)
  assert f"is in neither the data root ({root / 'core'} holds xa) nor the cache" in message
  assert "no data root was given" not in message
  # A city folder in the root that links to a folder elsewhere was still
  # found in the root, not in the download cache.
  linked = fetch.ensure_city("xa", root, cache_dir=tmp_path / "empty", opener=offline)
  assert linked == root / "core" / "xa" and _outside_data_root(linked, root) == ""


def test_cut_short_download_and_unwritable_cache_are_data_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv(DATA_ENV, raising=False)

  class CutShort:
    def read(self, size):
      raise http.client.IncompleteRead(b"abc", 10)

    def close(self):
      pass

  cache = tmp_path / "cache"
  with pytest.raises(
    DataError, match=r"download failed \(IncompleteRead.*place these files by hand"
  ):
    fetch.ensure_city("xa", cache_dir=cache, opener=lambda url, timeout: CutShort())
  assert not cache.exists()  # no empty folders left behind

  # A TLS failure mid-read is a network failure, not an unwritable folder.
  class TlsCutShort(CutShort):
    def read(self, size):
      raise ssl.SSLEOFError("EOF occurred in violation of protocol")

  with pytest.raises(DataError, match=r"download failed \(EOF occurred"):
    fetch.ensure_city("xa", cache_dir=cache, opener=lambda url, timeout: TlsCutShort())

  not_a_folder = tmp_path / "a_file"
  not_a_folder.write_text("")
  with pytest.raises(DataError, match=r"a_file/core/xa: cannot be written \(Not a directory\)"):
    fetch.ensure_city("xa", cache_dir=not_a_folder, opener=lambda url, timeout: CutShort())

  # The command says what to do instead, and leaves no empty folder either.
  def offline(url, timeout):
    raise urllib.error.URLError("Name or service not known")

  monkeypatch.setattr(urllib.request, "urlopen", offline)
  dest = tmp_path / "dest"
  assert fetch.main(["core", "xa", "--dest", str(dest)]) == 2
  err = capsys.readouterr().err
  assert "download failed (Name or service not known)" in err
  assert f"-> {dest / 'core' / 'xa' / 'regionmap_xa.geo'}" in err
  assert not dest.exists()
  # A file cut short is named as failing its hash, not only listed.
  (dest / "core" / "xa").mkdir(parents=True)
  (dest / "core" / "xa" / "gdp_xa_sum.npy").write_bytes(b"\x93NUMPY")
  assert fetch.main(["core", "xa", "--dest", str(dest)]) == 2
  assert "; gdp_xa_sum.npy present but not matching the expected sha256" in capsys.readouterr().err


def test_real_connection_failures_and_bad_bytes_say_what_to_do(tmp_path, monkeypatch, capsys):
  # What a real connection does, not what the tests' stand-ins did: a
  # connection closed early ends the reads as an end of file would (the
  # response still expects bytes), a route lost mid-read is a bare OSError,
  # and a proxy's error page arrives with status 200.
  import errno

  monkeypatch.delenv(DATA_ENV, raising=False)

  class Response:
    def __init__(self, data, length=None, fail=None):
      self.data, self.length, self.fail = data, length, fail

    def read(self, size):
      if self.fail:
        raise self.fail
      chunk, self.data = self.data[:size], self.data[size:]
      return chunk

    def close(self):
      pass

  closed_early = Response(b"geo_id,", length=1000)
  lost_route = Response(b"", fail=OSError(errno.EHOSTUNREACH, "No route to host"))
  error_page = Response(b"<html>Sign in to the network</html>")
  for response, reason in (
    (closed_early, r"IncompleteRead"),
    (lost_route, r"No route to host"),
    (error_page, r"SHA-256 mismatch for https://\S+/regionmap_xa\.geo: got [0-9a-f]+"),
  ):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
      fetch.ensure_city("xa", cache_dir=cache, opener=lambda url, timeout: response)
    message = str(info.value)
    assert re.search(r"download failed \(" + reason, message), message
    assert "--dest DIR" in message and "place these files by hand" in message
    assert not cache.exists()

  # An empty --dest (an unset shell variable) would be the current folder.
  with pytest.raises(SystemExit) as stop:
    fetch.main(["core", "xa", "--dest", ""])
  assert stop.value.code == 2 and "--dest: given as an empty path" in capsys.readouterr().err

  # A data root holding the city under another spelling is not given a
  # second folder of it, which would make the city ambiguous to the loaders.
  root = tmp_path / "root"
  (root / "core" / "XA").mkdir(parents=True)
  with pytest.raises(DataError, match=r"core/XA: holds city 'xa' already, under another"):
    fetch.fetch_city("xa", root, opener=lambda url, timeout: error_page)
  assert sorted(p.name for p in (root / "core").iterdir()) == ["XA"]

  # A failed first download leaves none of the folders it made on the way.
  monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: lost_route)
  deep = tmp_path / "new" / "deeper" / "dest"
  assert fetch.main(["core", "xa", "--dest", str(deep)]) == 2
  assert not (tmp_path / "new").exists()


def test_ensure_city_without_download(tmp_path, monkeypatch):
  monkeypatch.delenv(DATA_ENV, raising=False)
  with pytest.raises(DataError, match=r"core/bj: .*downloading is switched off.*regionmap_bj\.mob"):
    fetch.ensure_city("bj", cache_dir=tmp_path, download=False)
  # Only the files still missing are listed for placing by hand.
  folder = tmp_path / "core" / "bj"
  folder.mkdir(parents=True)
  (folder / "gdp_bj_sum.npy").write_bytes(b"wrong bytes")
  with pytest.raises(DataError) as info:
    fetch.ensure_city("bj", cache_dir=tmp_path, download=False)
  assert "gdp_bj_sum.npy" in str(info.value)
  (folder / "gdp_bj_sum.npy").unlink()
  for filename in fetch.CORE_FILES["bj"]:
    if filename != "co2_bj_sum.npy":
      (folder / filename).write_bytes(b"")
  monkeypatch.setattr(
    fetch, "sha256_file", lambda path: fetch.CORE_FILES["bj"][pathlib.Path(path).name]
  )
  with pytest.raises(DataError) as info:
    fetch.ensure_city("bj", cache_dir=tmp_path, download=False)
  assert "co2_bj_sum.npy" in str(info.value) and "regionmap_bj.geo" not in str(info.value)


def test_ensure_city_names_the_file_missing_from_the_data_root(tmp_path, data_root, monkeypatch):
  monkeypatch.delenv(DATA_ENV, raising=False)
  root = tmp_path / "root"
  for code, copy_as in (("xa", "xa"), ("xa", "sz")):
    folder = root / "core" / copy_as
    folder.mkdir(parents=True)
    for source in (data_root / "core" / code).iterdir():
      (folder / source.name.replace(f"_{code}", f"_{copy_as}")).write_bytes(source.read_bytes())
  (root / "core" / "xa" / "gdp_xa_sum.npy").unlink()
  (root / "core" / "sz" / "co2_sz_sum.npy").unlink()
  # A city that cannot be downloaded: the loader's own message, naming the file.
  with pytest.raises(DataError, match="co2_sz_sum"):
    fetch.ensure_city("sz", root, cache_dir=tmp_path / "cache", download=False)
  # A downloadable one too, even with a verified copy in the cache: the
  # cache never stands in for part of a folder the user pointed at.
  cache = tmp_path / "cache"
  fetch.fetch_city("xa", cache, base_url=_authors_tree(tmp_path, data_root, "xa").as_uri())
  with pytest.raises(DataError, match="gdp_xa_sum"):
    fetch.ensure_city("xa", root, cache_dir=cache, download=False)
  # A city folder is found whatever the case of its name.
  (root / "core" / "sz").rename(root / "core" / "SZ")
  (root / "core" / "SZ" / "co2_sz_sum.npy").write_bytes(
    (data_root / "core" / "xa" / "co2_xa_sum.npy").read_bytes()
  )
  assert fetch.ensure_city("sz", root, download=False) == root / "core" / "SZ"
  assert fetch.ensure_city("Sz", root, download=False) == root / "core" / "SZ"
  # A city the data root does not hold at all is taken from the cache.
  shutil.rmtree(root / "core" / "xa")
  assert fetch.ensure_city("XA", root, cache_dir=cache, download=False) == cache / "core" / "xa"
  # An unknown city: the message lists the data root's cities and the downloadable ones.
  with pytest.raises(DataError) as info:
    fetch.ensure_city("zz", root, cache_dir=cache, download=False)
  assert "unknown city 'zz'" in str(info.value) and "holds sz" in str(info.value)
  assert "downloadable cities are bj, cd, xa" in str(info.value)


def test_fetch_cli_rejects_unknown_city(capsys):
  assert fetch.main(["core", "paris", "--dest", os.devnull]) == 2
  assert "unknown CoRE city 'paris'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["12_3", "\uff11\uff12", "0x1f", "3,0"])
def test_ids_that_python_would_stretch_to_an_integer_are_refused(tmp_path, value):
  # int() reads "12_3" as 123 and full-width digits as digits: a grid id
  # "12_3" would silently become region 123.
  header, rows = _xa_style_mob()
  rows[1][3] = value
  with pytest.raises(
    DataError,
    match=rf"regionmap_zz\.mob: column 'destination_id': unparseable integer id '{value}' at row 1",
  ):
    load_city("zz", make_city(tmp_path, mob=(header, rows)))
