"""The HAFusion city views (Chicago, New York) and the Chicago centroids.

Layout under the data root (see PROVENANCE.md)::

    hafusion/<City>/mob-adj.npy          N x N origin-destination trip counts
    hafusion/<City>/mob_dist.npy         N x N trip counts used as the mobility view's features
    hafusion/<City>/poi_dist.npy         N x 26 POI category counts
    hafusion/<City>/poi_simi.npy         N x N POI cosine similarity
    hafusion/<City>/landUse_dist.npy     N x L land-use counts (L = 12 Chicago, 11 New York)
    hafusion/<City>/landUse_simi.npy     N x N land-use similarity
    hafusion/<City>/{crime,check,serviceCall}_counts.npy   (N,) task labels
    prompt4re/chicago/prompt_data.json   Chicago geo-text, region i = entry i

HAFusion feeds ``mob_dist`` to the mobility encoder and reconstructs
``mob-adj`` (divided by its mean) in the mobility loss; both are kept.
Every problem with a file raises `DataError` naming the file, the field and
what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import numpy as np

from jaxurban.data.errors import (
  NOT_FINITE,
  DataError,
  not_finite_in_float32,
  read_npy,
  require_file,
)
from jaxurban.data.root import resolve_data_root, subdir

__all__ = [
  "CITIES",
  "CityViews",
  "load_chicago_centroids",
  "load_city_views",
  "load_region_texts",
  "parse_centroid",
]

CITIES = ("Chi", "NY")

# label key -> file name; the keys are the task names used everywhere else.
LABEL_FILES = {
  "crime": "crime_counts.npy",
  "checkIn": "check_counts.npy",
  "serviceCall": "serviceCall_counts.npy",
}
_POI_CATEGORIES = 26

_CENTROID = re.compile(r"Centroid Coordinates:\s*\(([^)]*)\)")


@dataclasses.dataclass(frozen=True)
class CityViews:
  """The multi-view inputs and labels of one city, all NumPy arrays.

  Attributes:
    mobility: [N, N] origin-destination trip counts (``mob-adj.npy``), the
      target of the mobility loss.
    poi: [N, 26] POI category counts.
    poi_similarity: [N, N] POI similarity, target of the POI loss.
    landuse: [N, L] land-use counts.
    landuse_similarity: [N, N] land-use similarity, target of the land-use loss.
    labels: "crime", "checkIn", "serviceCall" -> [N] float64 counts.
    centroids: [N, 2] (lat, lon) in degrees, or None where the data has none
      (New York).
    city: "Chi" or "NY".
    mobility_dist: [N, N] trip counts fed to the mobility view encoder
      (``mob_dist.npy``); None means "use `mobility`".
    folder: the folder the views were read from (errors about their values
      name its files); None for views built in memory.
  """

  mobility: np.ndarray
  poi: np.ndarray
  poi_similarity: np.ndarray
  landuse: np.ndarray
  landuse_similarity: np.ndarray
  labels: dict[str, np.ndarray]
  centroids: np.ndarray | None
  city: str
  mobility_dist: np.ndarray | None = None
  folder: pathlib.Path | None = None

  @property
  def n_regions(self) -> int:
    return int(self.mobility.shape[0])

  @property
  def mobility_features(self) -> np.ndarray:
    return self.mobility if self.mobility_dist is None else self.mobility_dist


def _load_npy(folder: pathlib.Path, name: str, field: str) -> np.ndarray:
  path = folder / name
  require_file(path, column=field)
  array = read_npy(path, column=field, shown=path)
  if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
    raise DataError(path, f"dtype {array.dtype} is not a real number type", column=field)
  array = array.astype(np.float64)
  bad = not_finite_in_float32(array)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise DataError(
      path, f"{int(bad.sum())} {NOT_FINITE} values (first at index {first})", column=field
    )
  return array


def _check_shape(
  name: str | os.PathLike, field: str, array: np.ndarray, expected: tuple, why: str
) -> None:
  if array.shape != expected:
    raise DataError(name, f"shape {array.shape}, expected {expected} ({why})", column=field)


def _check_non_negative(name: str | os.PathLike, field: str, array: np.ndarray) -> None:
  negative = array < 0
  if negative.any():
    first = tuple(int(i) for i in np.argwhere(negative)[0])
    raise DataError(
      name, f"{int(negative.sum())} negative counts (first at index {first})", column=field
    )


def load_city_views(city: str, data_root: str | os.PathLike | None = None) -> CityViews:
  """Loads one city's HAFusion views, labels and (Chicago) centroids.

  Args:
    city: "Chi" or "NY".
    data_root: data folder; None reads ``$JAXURBAN_DATA``.

  Raises:
    DataError: unknown city, missing file, wrong or inconsistent shape,
      NaN/inf, negative counts, unparsable centroid.
  """
  if city not in CITIES:
    raise DataError("hafusion", f"unknown city {city!r}, expected one of {CITIES}", column="city")
  root = resolve_data_root(data_root)
  folder = subdir(root, "hafusion", city)

  mobility = _load_npy(folder, "mob-adj.npy", "mobility")
  if mobility.ndim != 2 or mobility.shape[0] != mobility.shape[1] or mobility.shape[0] == 0:
    raise DataError(
      folder / "mob-adj.npy",
      f"shape {mobility.shape}, expected a square N x N matrix",
      column="mobility",
    )
  n = mobility.shape[0]
  why = f"N = {n} regions from mob-adj.npy"
  _check_non_negative(folder / "mob-adj.npy", "mobility", mobility)
  if mobility.sum() <= 0:
    raise DataError(folder / "mob-adj.npy", "all trip counts are zero", column="mobility")

  mobility_dist = _load_npy(folder, "mob_dist.npy", "mobility_dist")
  _check_shape(folder / "mob_dist.npy", "mobility_dist", mobility_dist, (n, n), why)
  _check_non_negative(folder / "mob_dist.npy", "mobility_dist", mobility_dist)

  poi = _load_npy(folder, "poi_dist.npy", "poi")
  _check_shape(folder / "poi_dist.npy", "poi", poi, (n, _POI_CATEGORIES), why)
  _check_non_negative(folder / "poi_dist.npy", "poi", poi)

  landuse = _load_npy(folder, "landUse_dist.npy", "landuse")
  if landuse.ndim != 2 or landuse.shape[0] != n or landuse.shape[1] == 0:
    raise DataError(
      folder / "landUse_dist.npy",
      f"shape {landuse.shape}, expected ({n}, L) ({why})",
      column="landuse",
    )
  _check_non_negative(folder / "landUse_dist.npy", "landuse", landuse)

  similarities = {}
  for name, field in (
    ("poi_simi.npy", "poi_similarity"),
    ("landUse_simi.npy", "landuse_similarity"),
  ):
    sim = _load_npy(folder, name, field)
    _check_shape(folder / name, field, sim, (n, n), why)
    similarities[field] = sim

  labels = {}
  for key, name in LABEL_FILES.items():
    label = _load_npy(folder, name, key)
    _check_shape(folder / name, key, label, (n,), why)
    _check_non_negative(folder / name, key, label)
    if n > 1 and np.all(label == label[0]):
      # R² has no meaning for a constant target (0 / 0).
      raise DataError(folder / name, f"all {n} values equal {float(label[0])!r}", column=key)
    labels[key] = label

  centroids = None
  if city == "Chi":
    centroids = load_chicago_centroids(root)
    if centroids.shape[0] != n:
      raise DataError(
        subdir(root, "prompt4re", "chicago") / "prompt_data.json",
        f"{centroids.shape[0]} regions, but the Chicago views in {folder} have {n}",
        column="Centroid Coordinates",
      )

  return CityViews(
    mobility=mobility,
    poi=poi,
    poi_similarity=similarities["poi_similarity"],
    landuse=landuse,
    landuse_similarity=similarities["landuse_similarity"],
    labels=labels,
    centroids=centroids,
    city=city,
    mobility_dist=mobility_dist,
    folder=folder,
  )


def parse_centroid(text: str, where: str = "prompt_data.json") -> tuple[float, float]:
  """Parses the "Centroid Coordinates: (lat, lon)" line of one geo-text.

  Raises:
    DataError: no such line, not two numbers, non-finite or out of range.
  """
  field = "Centroid Coordinates"
  if not isinstance(text, str):
    raise DataError(where, f"the geo-text is a {type(text).__name__}, not a string", column=field)
  found = _CENTROID.findall(text)
  if len(found) != 1:
    raise DataError(where, f"expected one '(lat, lon)' line, found {len(found)}", column=field)
  parts = [p.strip() for p in found[0].split(",")]
  if len(parts) != 2:
    raise DataError(where, f"expected two numbers in ({found[0]}), got {len(parts)}", column=field)
  try:
    lat, lon = (float(p) for p in parts)
  except ValueError:
    raise DataError(where, f"not numbers: ({found[0]})", column=field) from None
  if not (np.isfinite(lat) and np.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
    raise DataError(where, f"not a valid (lat, lon): ({found[0]})", column=field)
  return lat, lon


def load_region_texts(
  data_root: str | os.PathLike | None = None, field: str = "content"
) -> tuple[pathlib.Path, list[str]]:
  """(path, [text of region i]) from ``prompt4re/chicago/prompt_data.json``.

  Each entry is a chat message whose content holds exactly one text item;
  ``field`` is the field errors name (what the caller reads from the text).
  """
  path = subdir(resolve_data_root(data_root), "prompt4re", "chicago") / "prompt_data.json"
  require_file(path, column=field)
  try:
    messages = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not JSON
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(path, f"not readable JSON ({e})") from None
  if not isinstance(messages, list) or not messages:
    raise DataError(path, "expected a non-empty list of chat messages")
  texts = []
  for i, message in enumerate(messages):
    content = message.get("content") if isinstance(message, dict) else None
    items = [
      item.get("text")
      for item in (content if isinstance(content, list) else [])
      if isinstance(item, dict) and item.get("type") == "text"
    ]
    if len(items) != 1 or not isinstance(items[0], str):
      raise DataError(
        f"{path} entry {i}", f"expected one text item, found {len(items)}", column="content"
      )
    texts.append(items[0])
  return path, texts


def load_chicago_centroids(data_root: str | os.PathLike | None = None) -> np.ndarray:
  """[77, 2] (lat, lon) of the Chicago regions from ``prompt4re/chicago/prompt_data.json``."""
  path, texts = load_region_texts(data_root, field="Centroid Coordinates")
  coords = np.asarray(
    [parse_centroid(text, f"{path} entry {i}") for i, text in enumerate(texts)], np.float64
  )
  # One city: a centroid far from the others is a slip such as (lon, lat),
  # which stays inside the valid ranges but would distort the distance view.
  far = centroids_far_from_the_rest(coords)
  if far.size:
    i = int(far[0])
    raise DataError(
      f"{path} entry {i}",
      f"({coords[i, 0]}, {coords[i, 1]}) lies over {_CITY_RADIUS_KM:g} km from the median "
      f"centroid ({len(far)} such entries); expected (lat, lon) within one city",
      column="Centroid Coordinates",
    )
  # Two regions cannot share a centroid: a copied line would put them at
  # distance 0, where the inverse-distance view has no weight to give.
  _, first, counts = np.unique(coords, axis=0, return_index=True, return_counts=True)
  if (counts > 1).any():
    i = int(first[counts > 1].min())
    same = np.flatnonzero((coords == coords[i]).all(axis=1))
    raise DataError(
      f"{path} entries {', '.join(str(int(j)) for j in same)}",
      f"the same centroid ({coords[i, 0]}, {coords[i, 1]}); each region needs its own",
      column="Centroid Coordinates",
    )
  return coords


# How far a region's centroid may lie from the city's median centroid.
_CITY_RADIUS_KM = 300.0


def centroids_far_from_the_rest(coords: np.ndarray) -> np.ndarray:
  """Indices of the (lat, lon) rows over `_CITY_RADIUS_KM` from the median
  centroid (great-circle distance)."""
  lat, lon = np.radians(coords[:, 0]), np.radians(coords[:, 1])
  lat0, lon0 = np.radians(np.median(coords, axis=0))
  # Haversine.
  h = np.sin((lat - lat0) / 2) ** 2 + np.cos(lat) * np.cos(lat0) * np.sin((lon - lon0) / 2) ** 2
  km = 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
  return np.flatnonzero(km > _CITY_RADIUS_KM)
