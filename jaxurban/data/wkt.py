"""A small WKT reader for region outlines: POLYGON and MULTIPOLYGON only.

Region files carry one polygon per row as WKT text; all the library needs from
it is a centroid, so a focused numpy parser avoids a GEOS/shapely dependency.

Centroids are planar (computed directly in the lon/lat plane). For city-scale
regions of a few hundred metres the difference from a projected centroid is far
below a metre, and it matches how the region files' own ``m_lon``/``m_lat``
columns behave.
"""

from __future__ import annotations

import numpy as np

__all__ = ["parse_wkt", "polygon_area", "polygon_centroid"]


def parse_wkt(wkt: str) -> list[list[np.ndarray]]:
  """Parses WKT ``POLYGON`` or ``MULTIPOLYGON`` text.

  Always returns the multipolygon form: a list of polygons, each a list of
  rings (exterior first, then holes), each ring a closed ``(K, 2)`` float64
  array. Z/M ordinates, if present, are dropped.

  Raises:
    ValueError: the text is not a well-formed, non-empty polygon or
      multipolygon, or a hole does not lie within its polygon's exterior
      ring (a region of several parts written as one POLYGON would
      otherwise have its second part subtracted as a hole).
  """
  if not isinstance(wkt, str):
    raise ValueError(f"expected WKT text, got {type(wkt).__name__}")
  text = wkt.strip()
  head, paren, _ = text.partition("(")
  if not paren:
    raise ValueError(f"no coordinates in WKT {_preview(text)}")
  words = head.upper().split()
  if not words or words[0] not in ("POLYGON", "MULTIPOLYGON"):
    raise ValueError(f"expected POLYGON or MULTIPOLYGON, got {_preview(text)}")
  if len(words) > 2 or (len(words) == 2 and words[1] not in ("Z", "M", "ZM")):
    raise ValueError(f"unexpected words before the coordinates: {head.strip()!r}")
  kind = words[0]

  body_start = len(head)
  tree, end = _parse_group(text, body_start)
  if text[end:].strip():
    raise ValueError(f"trailing text after the coordinates: {_preview(text[end:])}")

  if kind == "POLYGON":
    polygons = [tree]
  else:
    polygons = tree
  out = []
  for p, poly in enumerate(polygons):
    if not isinstance(poly, list) or not poly or not all(isinstance(r, str) for r in poly):
      raise ValueError(f"{kind} polygon {p} must be a list of coordinate rings")
    rings = [_parse_ring(r, p, i) for i, r in enumerate(poly)]
    for i, hole in enumerate(rings[1:], start=1):
      _check_hole_within(rings[0], hole, p, i)
    out.append(rings)
  return out


def _check_hole_within(exterior: np.ndarray, hole: np.ndarray, poly_index: int, ring_index: int):
  """Refuses a hole that cannot lie inside the exterior ring: one whose
  bounding box leaves the exterior's, or whose area is not smaller.

  These are necessary conditions only (a full containment test needs
  segment intersections), but they catch the common mistake: two disjoint
  parts of a region written as ``POLYGON((part 1), (part 2))``.
  """
  lo, hi = exterior.min(axis=0), exterior.max(axis=0)
  slack = 1e-9 * max(1.0, float(np.abs(exterior).max()))
  outside = (hole.min(axis=0) < lo - slack).any() or (hole.max(axis=0) > hi + slack).any()
  if outside or abs(_ring_area(hole)) >= abs(_ring_area(exterior)):
    raise ValueError(
      f"polygon {poly_index} ring {ring_index} is not inside ring 0: a POLYGON's later rings "
      "are holes in its first; write a region of several parts as a MULTIPOLYGON"
    )


def _ring_area(ring: np.ndarray) -> float:
  xy = ring - ring[0]
  return float((xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]).sum() / 2.0)


def polygon_area(wkt: str) -> float:
  """Planar area of a (multi)polygon, holes subtracted, in squared input units."""
  area, _ = _area_and_moment(parse_wkt(wkt))
  return float(area)


def polygon_centroid(wkt: str) -> tuple[float, float]:
  """Area-weighted centroid ``(lon, lat)`` of a WKT polygon or multipolygon.

  Uses the shoelace formula per ring; holes subtract their area and first
  moment, and the parts of a multipolygon are weighted by their areas.
  Ring orientation does not matter.

  Raises:
    ValueError: malformed text, or the total area is zero (the centroid is
      then undefined).
  """
  polygons = parse_wkt(wkt)
  area, moment = _area_and_moment(polygons)
  if not area > 0.0:
    raise ValueError("polygon has zero area, so its centroid is undefined")
  origin = polygons[0][0][0]
  c = origin + moment / area
  return float(c[0]), float(c[1])


def _area_and_moment(polygons: list[list[np.ndarray]]) -> tuple[float, np.ndarray]:
  # Shift to the first vertex so the cross products stay small: absolute
  # lon*lat products (~4e3) would otherwise swamp areas of ~1e-6 deg^2.
  origin = polygons[0][0][0]
  total_area = 0.0
  total_moment = np.zeros(2)
  for poly in polygons:
    for i, ring in enumerate(poly):
      xy = ring - origin
      x0, y0 = xy[:-1, 0], xy[:-1, 1]
      x1, y1 = xy[1:, 0], xy[1:, 1]
      cross = x0 * y1 - x1 * y0
      a = cross.sum() / 2.0
      m = np.array([((x0 + x1) * cross).sum(), ((y0 + y1) * cross).sum()]) / 6.0
      # Normalise orientation: exterior rings add, holes subtract,
      # whichever way the file happens to wind them.
      sign = (1.0 if a >= 0 else -1.0) * (1.0 if i == 0 else -1.0)
      total_area += sign * a
      total_moment += sign * m
  return total_area, total_moment


def _parse_group(text: str, pos: int):
  """Parses one parenthesised group starting at ``text[pos]`` (after spaces).

  Returns ``(node, end)`` where node is the raw coordinate text of an
  innermost group, or a list of child nodes, and ``end`` is the index just
  after the closing parenthesis.
  """
  pos = _skip_space(text, pos)
  if pos >= len(text) or text[pos] != "(":
    raise ValueError(f"expected '(' at character {pos}")
  pos = _skip_space(text, pos + 1)
  if pos < len(text) and text[pos] == "(":
    children = []
    while True:
      child, pos = _parse_group(text, pos)
      children.append(child)
      pos = _skip_space(text, pos)
      if pos >= len(text):
        raise ValueError("unbalanced parentheses (text ends inside a group)")
      if text[pos] == ",":
        pos += 1
        continue
      if text[pos] == ")":
        return children, pos + 1
      raise ValueError(f"expected ',' or ')' at character {pos}, got {text[pos]!r}")
  close = text.find(")", pos)
  if close < 0:
    raise ValueError("unbalanced parentheses (missing ')')")
  inner = text[pos:close]
  if "(" in inner:
    raise ValueError(f"unexpected '(' inside coordinates near character {pos}")
  return inner, close + 1


def _parse_ring(text: str, poly_index: int, ring_index: int) -> np.ndarray:
  where = f"polygon {poly_index} ring {ring_index}"
  vertices = text.split(",")
  split = [v.split() for v in vertices]
  dims = {len(v) for v in split}
  if len(dims) != 1 or next(iter(dims)) not in (2, 3, 4):
    bad = next(i for i, v in enumerate(split) if len(v) not in (2, 3, 4) or len(v) != len(split[0]))
    raise ValueError(
      f"{where}: vertex {bad} has {len(split[bad])} numbers ({vertices[bad].strip()!r})"
    )
  try:
    xy = np.array([v[:2] for v in split], dtype=np.float64)
  except ValueError:
    for i, v in enumerate(split):
      for token in v[:2]:
        try:
          float(token)
        except ValueError:
          raise ValueError(f"{where}: vertex {i} has a non-numeric value {token!r}") from None
    raise
  if not np.isfinite(xy).all():
    raise ValueError(f"{where}: non-finite coordinate")
  if len(xy) < 4:
    raise ValueError(f"{where}: a ring needs at least 4 vertices (closed), got {len(xy)}")
  if not np.array_equal(xy[0], xy[-1]):
    raise ValueError(f"{where}: ring is not closed (first vertex != last vertex)")
  return xy


def _skip_space(text: str, pos: int) -> int:
  n = len(text)
  while pos < n and text[pos].isspace():
    pos += 1
  return pos


def _preview(text: str, n: int = 40) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")
