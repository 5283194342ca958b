"""Loader for the CoRE city files: regions, taxi mobility edges and labels.

One city folder holds::

    regionmap_<city>.geo        CSV, one row per region; row order = region index
    regionmap_<city>.mob        CSV, sparse mobility edges origin -> destination
    gdp_<city>_sum.npy          (N,) labels in .geo row order
    population_<city>_sum.npy
    co2_<city>_sum.npy
    region_od_flow_<city>_11.npy   optional (N, N) full origin-destination counts

The two CSV files may also sit in a ``regionmap_<city>/`` sub-folder, which is
how the authors' repository lays them out.

Two dialects of the CSVs exist and both are read:

* Xi'an / Chengdu: ``.geo`` has ``geo_id, type, <attributes>, geometry, m_lon,
  m_lat``; ``.mob`` has ``rel_id, type, origin_id, destination_id,
  mobility_weight`` with weights already normalised per origin.
* Beijing: ``.geo`` has ``geo_id, WKT, <attributes incl. text columns>`` and no
  centroid columns; ``.mob`` starts with an unnamed index column, has no
  ``type`` and its weights do not sum to 1 per origin.

Row numbers in error messages count data rows from 0 (header excluded), which
is also what ``rel_id`` counts in the published files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import pathlib
import re
import sys
from collections.abc import Sequence

import numpy as np

from jaxurban.data import wkt as wkt_lib
from jaxurban.data.errors import (
  NOT_FINITE,
  DataError,
  not_finite_in_float32,
  read_npy,
  require_file,
)
from jaxurban.data.root import resolve_data_root, subdir

__all__ = [
  "LABEL_NAMES",
  "CityData",
  "city_dir",
  "list_cities",
  "load_city",
  "polygon_centroids",
  "city_files",
]

LABEL_NAMES = ("gdp", "population", "co2")

POLYGON_COLUMNS = ("geometry", "WKT")

# Tolerance for deciding that a file's weights were already per-origin
# normalised; the published files are exact to ~1e-15, this only absorbs
# rounding in hand-edited or re-exported files.
NORMALISED_TOL = 1e-4

# Columns of the .geo file that are identifiers, geometry or centroids rather
# than region attributes.
_GEO_NON_ATTRIBUTES = {"geo_id", "type", "m_lon", "m_lat", *POLYGON_COLUMNS}


@dataclasses.dataclass(frozen=True, eq=False)
class CityData:
  """One city's regions, mobility graph and labels (all arrays read-only).

  ``eq=False`` keeps identity comparison and hashing: field-wise ``==`` on
  numpy arrays has no single truth value.
  """

  name: str
  """Lower-case city code, e.g. ``"xa"``."""
  geo_ids: np.ndarray
  """(N,) int64 region ids; the position in this array is the region index."""
  centroids: np.ndarray
  """(N, 2) float64 (lon, lat): ``m_lon``/``m_lat`` if present, else computed from the polygons."""
  attributes: dict[str, np.ndarray]
  """Numeric .geo attribute columns as (N,) float64, empty cells as NaN; columns
  with a non-numeric cell are skipped."""
  edge_origin: np.ndarray
  """(E,) int32 origin region index of each (origin, destination) pair of the .mob."""
  edge_destination: np.ndarray
  """(E,) int32 destination region index of each pair (self loops kept)."""
  edge_weight_raw: np.ndarray
  """(E,) float64 ``mobility_weight`` as in the file (summed over rows that repeat a pair)."""
  edge_weight: np.ndarray
  """(E,) float64 weights normalised per origin (CoRE eq. 1): raw / sum of that origin's raw weights."""
  weights_were_normalised: bool
  """True when every origin's raw weights already summed to 1 (within 1e-4)."""
  od_flow: np.ndarray | None
  """(N, N) float64 full origin-destination counts, or None when the file is absent."""
  labels: dict[str, np.ndarray]
  """``LABEL_NAMES`` -> (N,) float64, in region order."""
  source_dir: pathlib.Path
  """The city folder the files were read from."""
  zero_weight_pairs: int = 0
  """(origin, destination) pairs of the .mob whose weight is 0: not edges."""

  @property
  def n_regions(self) -> int:
    return int(self.geo_ids.shape[0])

  @property
  def n_edges(self) -> int:
    return int(self.edge_origin.shape[0])


# --------------------------------------------------------------------------
# Locating files


def _core_dir(data_root) -> pathlib.Path:
  return subdir(resolve_data_root(data_root), "core")


def is_city_dir(path: pathlib.Path) -> bool:
  """Whether `path` holds a city's `.geo` file (in either layout)."""
  code = path.name.lower()
  name = f"regionmap_{code}.geo"
  return (path / name).is_file() or (path / f"regionmap_{code}" / name).is_file()


def list_cities(data_root: str | os.PathLike | None = None) -> list[str]:
  """Lower-case codes of the city folders under ``<root>/core/`` that hold a ``.geo`` file."""
  core = _core_dir(data_root)
  return sorted(p.name.lower() for p in core.iterdir() if p.is_dir() and is_city_dir(p))


def city_dir(name: str, data_root: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder ``<root>/core/<name>`` (name matched case-insensitively).

  Raises:
    DataError: no data root, no ``core`` folder, or no such city (the
      message lists the cities that do exist).
  """
  core = _core_dir(data_root)
  wanted = str(name).lower()
  matches = [p for p in core.iterdir() if p.is_dir() and p.name.lower() == wanted]
  if not matches:
    known = list_cities(data_root)
    raise DataError(
      core / str(name),
      f"unknown city {name!r}; cities present: {', '.join(known) if known else 'none'}",
    )
  if len(matches) > 1:
    raise DataError(core, f"several folders match city {name!r}: {sorted(p.name for p in matches)}")
  return matches[0]


def city_files(folder: str | os.PathLike, code: str) -> dict[str, pathlib.Path | None]:
  """Paths of one city's files in ``folder`` (either layout).

  Keys: ``geo``, ``mob``, ``od_flow`` and each of ``LABEL_NAMES``. Required
  files that are missing raise; a missing ``od_flow`` maps to ``None``.
  """
  folder = pathlib.Path(folder)
  code = code.lower()
  sub = folder / f"regionmap_{code}"

  def find(filename: str, required: bool) -> pathlib.Path | None:
    for cand in (folder / filename, sub / filename):
      if cand.is_file():
        return cand
      if cand.exists():
        # Something else of that name: "missing" would contradict the
        # listing below, and an optional file would be passed over
        # without a word.
        require_file(cand)
    if not required:
      return None
    try:
      present = sorted(p.name for p in folder.iterdir())
    except OSError:
      present = []
    cities = _sibling_cities(folder)
    raise DataError(
      folder / filename,
      f"required file missing (looked in {folder} and {sub}); "
      f"the folder has: {', '.join(present) if present else 'nothing'}"
      + (
        f"; city folders under {folder.parent}: {', '.join(cities)}" if cities is not None else ""
      ),
    )

  files: dict[str, pathlib.Path | None] = {
    "geo": find(f"regionmap_{code}.geo", True),
    "mob": find(f"regionmap_{code}.mob", True),
  }
  for label in LABEL_NAMES:
    files[label] = find(f"{label}_{code}_sum.npy", True)
  files["od_flow"] = find(f"region_od_flow_{code}_11.npy", False)
  return files


def _sibling_cities(folder: pathlib.Path) -> list[str] | None:
  try:
    return (
      sorted(p.name.lower() for p in folder.parent.iterdir() if p.is_dir() and is_city_dir(p))
      or None
    )
  except OSError:
    return None


# --------------------------------------------------------------------------
# CSV helpers


@contextlib.contextmanager
def _large_csv_fields():
  # Region outlines are single CSV fields that can exceed csv's default
  # 128 KiB cap; raise it only while reading and restore it afterwards.
  old = csv.field_size_limit()
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  try:
    yield
  finally:
    csv.field_size_limit(old)


# What an id cell may hold before it is parsed: ASCII digits, an optional
# sign, a fraction or exponent (checked further on), surrounding blanks.
_PLAIN_NUMBER = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")
# An id written through a float column: digits, a point, zeros ("12.0").
_WHOLE_WITH_ZERO_FRACTION = re.compile(r"\s*([+-]?[0-9]+)\.0*\s*")


class _Table:
  """A CSV file held as columns of strings, addressed by header name."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.file = path.name
    try:
      with _large_csv_fields(), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
          header = next(reader)
        except StopIteration:
          raise DataError(self.file, "file is empty (no header row)") from None
        if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
          separator = "semicolons" if ";" in header[0] else "tabs"
          raise DataError(
            self.file, f"line 1 is one field holding {separator}: the file must be comma-separated"
          )
        rows = []
        for row in reader:
          if not row:
            continue  # tolerate blank lines, e.g. a trailing one
          if len(row) != len(header):
            raise DataError(
              self.file,
              f"row {len(rows)} has {len(row)} fields but the header has {len(header)}",
            )
          rows.append(row)
    except csv.Error as e:
      raise DataError(self.file, f"not readable as CSV: {e}") from None
    except UnicodeDecodeError as e:
      raise DataError(self.file, f"not UTF-8 text: {e}") from None
    except OSError as e:
      raise DataError(path, f"cannot be read ({e.strerror})") from None
    header = [h.strip() for h in header]
    # A pandas-written index shows up as a leading column with no name
    # (or "Unnamed: 0"); it carries no information, so drop it.
    self.index_dropped = bool(header) and (header[0] == "" or header[0].startswith("Unnamed: 0"))
    start = 1 if self.index_dropped else 0
    self.header = header[start:]
    seen = set()
    for h in self.header:
      if h in seen:
        raise DataError(self.file, "column name appears more than once in the header", column=h)
      seen.add(h)
    self.n_rows = len(rows)
    self._cols = {h: [r[i + start] for r in rows] for i, h in enumerate(self.header)}

  def has(self, column: str) -> bool:
    return column in self._cols

  def strings(self, column: str) -> list[str]:
    if column not in self._cols:
      raise DataError(
        self.file,
        f"required column missing (columns present: {', '.join(self.header)})",
        column=column,
      )
    return self._cols[column]

  def floats(self, column: str) -> np.ndarray:
    values = self.strings(column)
    try:
      return np.array(values, dtype=np.float64)
    except ValueError:
      pass
    for i, v in enumerate(values):
      try:
        float(v)
      except ValueError:
        raise DataError(self.file, f"unparseable number {v!r} at row {i}", column=column) from None
    raise AssertionError("unreachable")  # pragma: no cover

  def ints(self, column: str) -> np.ndarray:
    values = self.strings(column)
    # Python and NumPy read "12_3" as 123 and full-width digits as digits: a
    # grid id "12_3" would silently become region 123 (as would "1_23").
    # Without either, what NumPy reads as integers is plain integers: one
    # pass over the joined text then spares a pattern match per id.
    joined = "".join(values)
    if joined.isascii() and "_" not in joined:
      try:
        return np.array(values, dtype=np.int64)
      except (ValueError, OverflowError):
        pass
    # Ids written through a float column ("12.0") are still exact ids.
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
      if not _PLAIN_NUMBER.fullmatch(v):
        raise DataError(self.file, f"unparseable integer id {v!r} at row {i}", column=column)
      inexact = False
      try:
        number = int(v)
      except ValueError:
        whole = _WHOLE_WITH_ZERO_FRACTION.fullmatch(v)
        if whole:  # "12.0": read from its digits, exact at any size
          number = int(whole.group(1))
        else:
          f = float(v)  # parses: `_PLAIN_NUMBER` matched above
          if not (np.isfinite(f) and f.is_integer()):
            raise DataError(self.file, f"unparseable integer id {v!r} at row {i}", column=column)
          number = int(f)
          # Beyond 2**53 a float does not hold every integer: "1.2e17" may
          # stand for a neighbouring id, and would silently become another region.
          inexact = abs(f) > 2**53
      if not -(2**63) <= number < 2**63:
        raise DataError(
          self.file, f"integer id {v!r} at row {i} does not fit in 64 bits", column=column
        )
      if inexact:
        raise DataError(
          self.file,
          f"integer id {v!r} at row {i} is written as a float beyond 2**53, where "
          "floats skip integers; write the ids as integers",
          column=column,
        )
      out[i] = number
    return out

  def try_floats(self, column: str) -> np.ndarray | None:
    """The column as float64 with empty cells as NaN, or None if any other
    cell is not a number or no cell holds one."""
    cells = [cell if cell.strip() else "nan" for cell in self._cols[column]]
    try:
      values = np.array(cells, dtype=np.float64)
    except ValueError:
      return None
    return None if np.isnan(values).all() else values


def _check_finite(values: np.ndarray, file: str, column: str, what: str) -> None:
  bad = not_finite_in_float32(values)
  if bad.any():
    rows = np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))
    raise DataError(
      file,
      f"{int(bad.sum())} {NOT_FINITE} {what} (first at row {int(rows[0])})",
      column=column,
    )


def _check_degrees(values: np.ndarray, bound: float, file: str, column: str) -> None:
  """Longitudes within ±180 and latitudes within ±90 degrees (WGS84)."""
  bad = np.flatnonzero(np.abs(values) > bound)
  if len(bad):
    raise DataError(
      file,
      f"{len(bad)} values outside [-{bound:g}, {bound:g}] degrees (first {float(values[bad[0]])!r} "
      f"at row {int(bad[0])}); coordinates must be WGS84 longitude/latitude",
      column=column,
    )


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


# --------------------------------------------------------------------------
# Loading


def _polygon_column(table: _Table) -> str | None:
  for c in POLYGON_COLUMNS:
    if table.has(c):
      return c
  return None


def _centroids_from_polygons(table: _Table, column: str) -> np.ndarray:
  texts = table.strings(column)
  out = np.empty((len(texts), 2), dtype=np.float64)
  for i, text in enumerate(texts):
    try:
      out[i] = wkt_lib.polygon_centroid(text)
    except ValueError as e:
      raise DataError(table.file, f"bad polygon at row {i}: {e}", column=column) from None
  _check_degrees(out[:, 0], 180.0, table.file, column)
  _check_degrees(out[:, 1], 90.0, table.file, column)
  return out


def polygon_centroids(name: str, data_root: str | os.PathLike | None = None) -> np.ndarray:
  """(N, 2) centroids computed from the ``.geo`` polygons, ignoring any m_lon/m_lat columns."""
  folder = city_dir(name, data_root)
  table = _Table(city_files(folder, folder.name)["geo"])
  column = _polygon_column(table)
  if column is None:
    raise DataError(table.file, "no polygon column", column=" or ".join(POLYGON_COLUMNS))
  return _centroids_from_polygons(table, column)


def load_city(name: str, data_root: str | os.PathLike | None = None) -> CityData:
  """Reads and validates one city from ``<root>/core/<name>/``.

  Args:
    name: city code, case-insensitive (``"xa"``, ``"cd"``, ``"bj"``).
    data_root: data root folder; defaults to ``$JAXURBAN_DATA``.

  Raises:
    DataError: naming the file, column and problem for any missing or
      inconsistent input.
  """
  folder = city_dir(name, data_root)
  code = folder.name.lower()
  files = city_files(folder, code)

  geo = _Table(files["geo"])
  if geo.n_rows == 0:
    raise DataError(geo.file, "no region rows")
  n = geo.n_rows

  geo_ids = geo.ints("geo_id")
  uniq, first_rows, counts = np.unique(geo_ids, return_index=True, return_counts=True)
  if (counts > 1).any():
    repeat = np.ones(n, dtype=bool)
    repeat[first_rows] = False
    repeat_rows = np.flatnonzero(repeat)
    raise DataError(
      geo.file,
      f"{int((counts > 1).sum())} geo ids appear more than once "
      f"(e.g. {_examples(geo_ids[repeat_rows])}; first repeat at row {int(repeat_rows[0])})",
      column="geo_id",
    )

  centroids = _load_centroids(geo)
  attributes = {}
  for column in geo.header:
    if column in _GEO_NON_ATTRIBUTES:
      continue
    values = geo.try_floats(column)
    if values is not None:
      attributes[column] = _readonly(values)

  origin, destination, raw = _merge_repeated_pairs(
    *_load_edges(files["mob"], geo_ids, files["geo"].name), n
  )
  # A pair of weight 0 is no trip: the authors' code builds a dense matrix
  # and keeps its non-zero entries (to_sparse_coo), so such a row is no edge
  # of their GAT either. Kept, it would take part in the attention softmax.
  trips = raw > 0
  zero_weight_pairs = int((~trips).sum())
  origin, destination, raw = origin[trips], destination[trips], raw[trips]
  if not len(raw):
    raise DataError(files["mob"].name, "every weight is 0", column="mobility_weight")
  weight, was_normalised = _normalise_per_origin(origin, raw, n)

  labels = {
    label: _readonly(_load_label(files[label], n, files["geo"].name)) for label in LABEL_NAMES
  }
  od_flow = None if files["od_flow"] is None else _readonly(_load_od_flow(files["od_flow"], n))

  return CityData(
    name=code,
    geo_ids=_readonly(geo_ids),
    centroids=_readonly(centroids),
    attributes=attributes,
    edge_origin=_readonly(origin),
    edge_destination=_readonly(destination),
    edge_weight_raw=_readonly(raw),
    edge_weight=_readonly(weight),
    weights_were_normalised=was_normalised,
    od_flow=od_flow,
    labels=labels,
    source_dir=folder,
    zero_weight_pairs=zero_weight_pairs,
  )


def _load_centroids(geo: _Table) -> np.ndarray:
  has_lon, has_lat = geo.has("m_lon"), geo.has("m_lat")
  if has_lon and has_lat:
    lon, lat = geo.floats("m_lon"), geo.floats("m_lat")
    _check_finite(lon, geo.file, "m_lon", "coordinates")
    _check_finite(lat, geo.file, "m_lat", "coordinates")
    _check_degrees(lon, 180.0, geo.file, "m_lon")
    _check_degrees(lat, 90.0, geo.file, "m_lat")
    return np.stack([lon, lat], axis=1)
  if has_lon != has_lat:
    missing = "m_lat" if has_lon else "m_lon"
    raise DataError(
      geo.file, "centroid column missing while its partner is present", column=missing
    )
  column = _polygon_column(geo)
  if column is None:
    raise DataError(
      geo.file,
      "required column missing: need a polygon column (geometry or WKT) or m_lon/m_lat "
      f"(columns present: {', '.join(geo.header)})",
      column="geometry",
    )
  return _centroids_from_polygons(geo, column)


def _load_edges(path: pathlib.Path, geo_ids: np.ndarray, geo_file: str):
  mob = _Table(path)
  for column in ("origin_id", "destination_id", "mobility_weight"):
    mob.strings(column)  # report a missing column before an empty file
  if mob.n_rows == 0:
    raise DataError(mob.file, "no mobility rows (the file has only a header)")
  origin_ids = mob.ints("origin_id")
  destination_ids = mob.ints("destination_id")
  raw = mob.floats("mobility_weight")

  _check_finite(raw, mob.file, "mobility_weight", "weights")
  neg = np.flatnonzero(raw < 0)
  if len(neg):
    raise DataError(
      mob.file,
      f"{len(neg)} negative weights (first at row {int(neg[0])})",
      column="mobility_weight",
    )

  sorter = np.argsort(geo_ids, kind="stable")
  sorted_ids = geo_ids[sorter]

  columns = {"origin_id": origin_ids, "destination_id": destination_ids}
  positions, found = {}, {}
  for column, ids in columns.items():
    positions[column] = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    found[column] = sorted_ids[positions[column]] == ids

  def absent(column: str) -> str:
    missing_rows = np.flatnonzero(~found[column])
    unknown = list(dict.fromkeys(columns[column][missing_rows].tolist()))
    return (
      f"{len(missing_rows)} rows reference geo ids absent from {geo_file} "
      f"({len(unknown)} distinct, e.g. {unknown[:5]}; first at row {int(missing_rows[0])})"
    )

  # Both columns are checked before raising, so one error reports every unknown id.
  bad = [column for column in columns if not found[column].all()]
  if len(bad) == 1:
    raise DataError(mob.file, absent(bad[0]), column=bad[0])
  if bad:
    raise DataError(mob.file, "; ".join(f"column {c!r}: {absent(c)}" for c in bad))
  return (
    sorter[positions["origin_id"]].astype(np.int32),
    sorter[positions["destination_id"]].astype(np.int32),
    raw,
  )


def _merge_repeated_pairs(origin, destination, raw, n):
  """One edge per (origin, destination) pair, the raw weights of repeated rows summed.

  Eq. (1) of the CoRE paper has one weight w_ij per pair; repeated rows
  would otherwise enter the GAT as parallel edges, each with its own term in
  the attention softmax, while the mobility target merges them. Edges keep
  the file order of each pair's first row.
  """
  pairs = origin.astype(np.int64) * n + destination
  unique, first, inverse = np.unique(pairs, return_index=True, return_inverse=True)
  if len(unique) == len(pairs):
    return origin, destination, raw
  summed = np.bincount(inverse, weights=raw, minlength=len(unique))
  order = np.argsort(first, kind="stable")
  keep = first[order]
  return origin[keep], destination[keep], summed[order]


def _normalise_per_origin(origin, raw, n):
  """Eq. (1): each origin's positive weights divided by their sum."""
  sums = np.bincount(origin, weights=raw, minlength=n)
  present = np.zeros(n, dtype=bool)
  present[origin] = True
  was_normalised = bool(np.all(np.abs(sums[present] - 1.0) <= NORMALISED_TOL))
  return raw / sums[origin], was_normalised


def _load_label(path: pathlib.Path, n: int, geo_file: str) -> np.ndarray:
  values = read_npy(path)
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if values.ndim != 1:
    raise DataError(path.name, f"expected a 1-D array of {n} values, got shape {values.shape}")
  if values.shape[0] != n:
    raise DataError(
      path.name,
      f"label array has {values.shape[0]} values but {geo_file} has {n} regions",
    )
  if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
    raise DataError(path.name, f"expected real numbers, got dtype {values.dtype}")
  values = values.astype(np.float64)
  bad = not_finite_in_float32(values)
  if bad.any():
    raise DataError(
      path.name,
      f"{int(bad.sum())} {NOT_FINITE} label values (first at region {int(np.flatnonzero(bad)[0])})",
    )
  # GDP, population and emissions are amounts; the evaluation clips
  # predictions at 0 and MAPE divides by the label.
  negative = np.flatnonzero(values < 0)
  if len(negative):
    raise DataError(
      path.name,
      f"{len(negative)} negative label values (first {float(values[negative[0]])!r} at region "
      f"{int(negative[0])}); labels must be non-negative amounts",
    )
  if n > 1 and np.all(values == values[0]):
    # Nothing to regress: the ridge would fit the constant, and with 0 every
    # MAPE is undefined (the table would read nan).
    raise DataError(path.name, f"all {n} label values equal {float(values[0])!r}")
  return values


def _load_od_flow(path: pathlib.Path, n: int) -> np.ndarray:
  flow = read_npy(path)
  if flow.shape != (n, n):
    raise DataError(
      path.name, f"expected shape ({n}, {n}) to match the region count, got {flow.shape}"
    )
  if not np.issubdtype(flow.dtype, np.number) or np.issubdtype(flow.dtype, np.complexfloating):
    raise DataError(path.name, f"expected real numbers, got dtype {flow.dtype}")
  flow = flow.astype(np.float64)
  bad = not_finite_in_float32(flow)
  if bad.any():
    raise DataError(path.name, f"{int(bad.sum())} {NOT_FINITE} flow values")
  neg = flow < 0
  if neg.any():
    i, j = np.argwhere(neg)[0]
    raise DataError(path.name, f"{int(neg.sum())} negative flow values (first at [{i}, {j}])")
  if not flow.any():
    # An all-zero matrix would leave the mobility loss with no target at all.
    raise DataError(path.name, "every flow value is 0, so there is no mobility to learn from")
  return flow


def _examples(values: Sequence | np.ndarray, k: int = 5) -> list:
  return [v.item() if hasattr(v, "item") else v for v in list(values)[:k]]
