"""Los-loop traffic speed: loading, windows, chronological splits, scaling.

Layout under the data root (see PROVENANCE.md)::

    traffic/los_loop/los_speed.csv          T x N speeds (mph), header = detector ids,
                                            5-minute steps from 2012-03-01 00:00
    traffic/los_loop/los_adj.csv            N x N non-negative weights, no header
    traffic/los_loop/sensor_locations.csv   index, sensor_id, latitude, longitude

A speed of 0 (or an empty / non-finite cell) is a missing reading: it is kept
out of the scaler, the loss and every metric through the observation masks,
and it is fed to the model as the scaled value 0 (the training mean) with its
mask bit cleared. Every problem with a file raises `DataError` naming the
file, the field and what is wrong.

Windows follow the usual forecasting setup: a sample starting at step s has
inputs ``[s, s + t_in)`` and targets ``[s + t_in, s + t_in + t_out)``. The
chronological 6:2:2 split cuts the *time axis* first and then builds windows
entirely inside each part, so no target step of one part is an input or
target of another.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import pathlib

import numpy as np

from jaxurban.data.errors import NOT_FINITE, DataError, not_finite_in_float32, require_file
from jaxurban.data.root import resolve_data_root, subdir

__all__ = [
  "START",
  "STEPS_PER_DAY",
  "Scaler",
  "TrafficData",
  "Windows",
  "chronological_bounds",
  "load_los_loop",
  "make_windows",
  "read_los_loop_folder",
]

START = datetime.datetime(2012, 3, 1)  # first step of los_speed.csv (PROVENANCE.md)
STEP_MINUTES = 5
STEPS_PER_DAY = 24 * 60 // STEP_MINUTES
DAYS_PER_WEEK = 7
# Speeds above this are refused: no road detector reads them in mph (Los-loop's
# largest is 70), and a value far above, such as a detector id in a repeated
# header line, would move the scaler and every metric without a word.
MAX_SPEED = 300.0


@dataclasses.dataclass(frozen=True)
class TrafficData:
  """A traffic series with its detectors, all NumPy arrays.

  Attributes:
    name: data set name.
    speed: [T, N] float32 readings; missing readings are 0.
    mask: [T, N] bool, True where a reading was observed.
    time_of_day: [T] int32 slot in ``[0, steps_per_day)``.
    day_of_week: [T] int32, Monday = 0.
    sensor_ids: [N] detector ids (strings), the column order.
    coords: [N, 2] float64 (latitude, longitude) in degrees.
    adjacency: [N, N] float32 weights (kept for reference; UrbanPG uses none).
    steps_per_day: sampling frequency f of eq. 3.
  """

  name: str
  speed: np.ndarray
  mask: np.ndarray
  time_of_day: np.ndarray
  day_of_week: np.ndarray
  sensor_ids: np.ndarray
  coords: np.ndarray
  adjacency: np.ndarray
  steps_per_day: int = STEPS_PER_DAY

  @property
  def n_steps(self) -> int:
    return self.speed.shape[0]

  @property
  def n_nodes(self) -> int:
    return self.speed.shape[1]

  def select(self, nodes=None, steps=None) -> TrafficData:
    """The same data restricted to detector indices `nodes` and time slice/indices `steps`."""
    nodes = np.arange(self.n_nodes) if nodes is None else np.asarray(nodes)
    steps = slice(None) if steps is None else steps
    return dataclasses.replace(
      self,
      speed=self.speed[steps][:, nodes],
      mask=self.mask[steps][:, nodes],
      time_of_day=self.time_of_day[steps],
      day_of_week=self.day_of_week[steps],
      sensor_ids=self.sensor_ids[nodes],
      coords=self.coords[nodes],
      adjacency=self.adjacency[np.ix_(nodes, nodes)],
    )


def _read_lines(path: pathlib.Path) -> list[str]:
  """The file's lines, trailing blank lines dropped.

  A blank line anywhere else is an error: in a time series it would shift
  every later reading's calendar by one step, so it is not skipped. With
  no blank line left, list index k is file line k + 1, the number that
  error messages give.
  """
  try:
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not data
  except OSError as e:
    raise DataError(path, f"cannot be read ({e.strerror})") from e
  except UnicodeDecodeError as e:
    raise DataError(path, f"not UTF-8 text: byte {e.start} is 0x{e.object[e.start]:02x}") from None
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise DataError(path.name, "is empty")
  blank = [k + 1 for k, line in enumerate(lines) if not line.strip()]
  if blank:
    raise DataError(
      path.name, f"{len(blank)} blank lines inside the file (first at line {blank[0]})"
    )
  return lines


def _cells(line: str) -> list[str]:
  """One CSV line's fields, read as CSV (quoted fields, commas inside
  quotes), each stripped of surrounding spaces."""
  return [cell.strip() for cell in next(csv.reader([line]))]


_INDEX_HEADERS = ("", "Unnamed: 0")


# Cells read as a missing value: empty (pandas' `to_csv`) and R's NA.
_MISSING_CELLS = ("", "NA")


def _cell_position(header: list[str], i: int, j: int) -> str:
  """Where cell [i, j] of `_read_numeric_csv`'s array stands in its file, for messages."""
  if header:
    return f"row {i + 2}, column {header[j]!r}"
  return f"row {i + 1}, column {j + 1}"


def _read_numeric_csv(path: pathlib.Path, skip_header: bool | None) -> tuple[list[str], np.ndarray]:
  """Parses a numeric CSV; empty and ``NA`` cells become NaN. Returns (header, [rows, cols]).

  Row k of the result is file line k + 2 with a header, k + 1 without. A
  first column whose header cell is empty or ``Unnamed: 0`` is a row index
  (as pandas' ``to_csv`` and R's ``write.csv`` write one) and is left out.
  `skip_header` None: a header exactly when the first line starts with such
  a cell over a column that is a row index (a matrix written without names
  starts with a number, or with an empty cell when that value is missing).
  """
  lines = _read_lines(path)
  table = [_cells(line) for line in lines]  # each line parsed once
  if skip_header is None:
    first_cell = table[0][0]
    skip_header = first_cell in _INDEX_HEADERS and (
      # An empty first cell over a column that is no row index is a
      # headerless matrix whose first value is missing.
      first_cell != "" or _looks_like_row_index([cells[0] for cells in table[1:]])
    )
  header = table[0] if skip_header else []
  body = list(zip(lines, table))[1 if skip_header else 0 :]
  if not body:
    raise DataError(path.name, "has a header but no data rows")
  index_column = bool(header) and header[0] in _INDEX_HEADERS
  if index_column:
    header = header[1:]
  empty = [j for j, h in enumerate(header) if h == ""]
  if empty:
    raise DataError(path.name, f"header cell {empty[0] + 1 + index_column} is empty", "header")
  first = table[0]
  if len(first) == 1 and (";" in first[0] or "\t" in first[0]):
    separator = "semicolons" if ";" in first[0] else "tabs"
    raise DataError(
      path.name, f"line 1 is one field holding {separator}: the file must be comma-separated"
    )
  width = len(header) if skip_header else len(body[0][1])
  rows = np.empty((len(body), width), np.float64)
  index_cells = []
  for i, (line, cells) in enumerate(body):
    if index_column:
      index_cells.append(cells[0])
      cells = cells[1:]
    row_number = i + (2 if skip_header else 1)
    if len(cells) != width:
      # A quote left open swallows the commas after it into one field.
      quote = " (a quote left open there joins the fields after it)" if '"' in line else ""
      raise DataError(
        path.name, f"row {row_number} has {len(cells)} fields, expected {width}{quote}"
      )
    for j, cell in enumerate(cells):
      cell = cell.strip()
      if cell in _MISSING_CELLS:
        rows[i, j] = np.nan
        continue
      try:
        rows[i, j] = float(cell)
      except ValueError:
        shown = cell if len(cell) <= 40 else cell[:40] + "..."
        raise DataError(
          path.name, f"{_cell_position(header, i, j)}: {shown!r} is not a number"
        ) from None
  if index_column and not _looks_like_row_index(index_cells):
    # An empty first header cell over a column of readings: a column whose
    # name is missing, not the row index pandas or R writes (0, 1, 2, ... or
    # 1, 2, 3, ..., or labels such as timestamps).
    raise DataError(path.name, "header cell 1 is empty, and its column is not a row index")
  return header, rows


def _looks_like_row_index(cells: list[str]) -> bool:
  if not cells:
    return True  # nothing to tell from; the shape checks speak
  if not all(_is_number(c) for c in cells):
    return True  # labels (timestamps, names)
  if not all(_is_number(c, integer=True) for c in cells):
    return False
  values = [int(float(c)) for c in cells]
  return values[0] in (0, 1) and all(b - a == 1 for a, b in zip(values, values[1:]))


def _is_number(cell: str, integer: bool = False) -> bool:
  try:
    value = float(cell)
  except ValueError:
    return False
  return not integer or (np.isfinite(value) and value == int(value))


def _read_locations(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  lines = _read_lines(path)
  header = _cells(lines[0])
  for column in ("sensor_id", "latitude", "longitude"):
    if column not in header:
      raise DataError(path.name, f"missing from the header {header}", column=column)
  ids, coords = [], []
  for k, line in enumerate(lines[1:], start=2):
    cells = _cells(line)
    if len(cells) != len(header):
      raise DataError(path.name, f"row {k} has {len(cells)} fields, expected {len(header)}")
    record = dict(zip(header, cells))
    ids.append(record["sensor_id"])
    pair = []
    for column, bound in (("latitude", 90.0), ("longitude", 180.0)):
      try:
        value = float(record[column])
      except ValueError:
        raise DataError(path.name, f"row {k}: {record[column]!r} is not a number", column) from None
      if not np.isfinite(value) or abs(value) > bound:
        raise DataError(path.name, f"row {k}: {value} is outside [-{bound}, {bound}]", column)
      pair.append(value)
    coords.append(pair)
  return np.asarray(ids), np.asarray(coords, np.float64)


def read_los_loop_folder(folder: str | os.PathLike) -> TrafficData:
  """Reads and checks the three Los-loop files in `folder`."""
  folder = pathlib.Path(folder)
  paths = {name: folder / name for name in ("los_speed.csv", "los_adj.csv", "sensor_locations.csv")}
  for path in paths.values():
    require_file(path)
  header, speed = _read_numeric_csv(paths["los_speed.csv"], skip_header=True)
  name = "los_speed.csv"
  if speed.shape[0] < 2:
    raise DataError(name, f"has {speed.shape[0]} time steps; at least 2 are needed")
  ids_are_integers = all(_is_number(h, integer=True) for h in header)
  if all(_is_number(h) for h in header) and not ids_are_integers:
    raise DataError(
      name,
      "line 1 holds readings, not detector ids: the header line naming the detectors is missing",
      column="header",
    )
  first_cell = {}
  for k, detector in enumerate(header):
    if detector in first_cell:
      raise DataError(
        name,
        f"detector id {detector!r} appears twice in the header (cells {first_cell[detector] + 1} "
        f"and {k + 1})",
        column="header",
      )
    first_cell[detector] = k
  finite = np.isfinite(speed)
  if ids_are_integers:
    repeated = np.flatnonzero((speed == np.asarray(header, np.float64)).all(axis=1))
    if repeated.size:
      raise DataError(
        name,
        f"row {int(repeated[0]) + 2} repeats the header line (detector ids, not speeds)"
        + (f"; {repeated.size} rows do" if repeated.size > 1 else ""),
      )
  # An inf cell is a missing reading; a finite one above any road speed is
  # an error (and one that float32 cannot hold would become inf).
  huge = finite & (speed > MAX_SPEED)
  if huge.any():
    t, n = np.argwhere(huge)[0]
    raise DataError(
      name,
      f"{int(huge.sum())} speeds above {MAX_SPEED:g} mph, which no road detector reads "
      f"(first {float(speed[t, n])!r} at row {t + 2})",
      column=header[n],
    )
  negative = finite & (speed < 0)
  if negative.any():
    t, n = np.argwhere(negative)[0]
    raise DataError(
      name, f"{int(negative.sum())} negative speeds (first at row {t + 2})", column=header[n]
    )
  mask = finite & (speed > 0)
  if not mask.any(axis=0).all():
    n = int(np.flatnonzero(~mask.any(axis=0))[0])
    raise DataError(name, "no observed (positive) speed in the whole series", column=header[n])

  # Headerless in the published data; with row and column names when
  # written by pandas or R.
  adjacency_header, adjacency = _read_numeric_csv(paths["los_adj.csv"], skip_header=None)
  n_nodes = len(header)
  if adjacency.shape != (n_nodes, n_nodes):
    raise DataError(
      "los_adj.csv",
      f"shape {adjacency.shape}, expected ({n_nodes}, {n_nodes}) for {n_nodes} detectors",
    )
  # Weights of a road graph, as the CoRE loader's mobility weights: a
  # negative one is a corrupt file, whatever reads the matrix later.
  for bad, what, show_value in (
    (not_finite_in_float32(adjacency), f"empty or {NOT_FINITE} weights", False),
    (adjacency < 0, "negative weights", True),
  ):
    if bad.any():
      i, j = (int(k) for k in np.argwhere(bad)[0])
      value = f" {float(adjacency[i, j])!r}" if show_value else ""
      raise DataError(
        "los_adj.csv",
        f"{int(bad.sum())} {what} (first{value} at {_cell_position(adjacency_header, i, j)})",
      )

  ids, coords = _read_locations(paths["sensor_locations.csv"])
  if len(ids) != n_nodes:
    raise DataError(
      "sensor_locations.csv", f"{len(ids)} detectors, but los_speed.csv has {n_nodes}"
    )
  mismatch = np.flatnonzero(ids != np.asarray(header))
  if mismatch.size:
    k = int(mismatch[0])
    raise DataError(
      "sensor_locations.csv",
      f"row {k + 2}: detector {str(ids[k])!r} differs from detector {k + 1} of "
      f"los_speed.csv's header ({header[k]!r}); the two files must list detectors in the "
      "same order",
      column="sensor_id",
    )

  steps = np.arange(speed.shape[0])
  minutes = steps * STEP_MINUTES
  time_of_day = (minutes // STEP_MINUTES) % STEPS_PER_DAY
  day_of_week = (START.weekday() + minutes // (24 * 60)) % DAYS_PER_WEEK
  return TrafficData(
    name="los-loop",
    speed=np.where(mask, speed, 0.0).astype(np.float32),
    mask=mask,
    time_of_day=time_of_day.astype(np.int32),
    day_of_week=day_of_week.astype(np.int32),
    sensor_ids=np.asarray(header),
    coords=coords,
    adjacency=adjacency.astype(np.float32),
  )


def load_los_loop(data_root: str | os.PathLike | None = None) -> TrafficData:
  """Los-loop from ``<data_root>/traffic/los_loop`` (data_root None: $JAXURBAN_DATA)."""
  return read_los_loop_folder(subdir(resolve_data_root(data_root), "traffic", "los_loop"))


def ratios_are_a_split(ratios: tuple[float, ...]) -> bool:
  """Whether `ratios` are positive and sum to 1, as `chronological_bounds` needs."""
  return all(r > 0 for r in ratios) and abs(sum(ratios) - 1.0) <= 1e-9


def chronological_bounds(
  n_steps: int, ratios: tuple[float, ...] = (0.6, 0.2, 0.2)
) -> list[tuple[int, int]]:
  """Cuts ``[0, n_steps)`` into consecutive ``[start, end)`` parts in the given ratios."""
  if not ratios_are_a_split(ratios):
    raise ValueError(f"split ratios must be positive and sum to 1, got {ratios}")
  edges = np.round(np.cumsum((0.0,) + tuple(ratios)) * n_steps).astype(int)
  edges[-1] = n_steps
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@dataclasses.dataclass(frozen=True)
class Scaler:
  """z-score scaling fitted on observed training readings only."""

  mean: float
  std: float

  @classmethod
  def fit(cls, values: np.ndarray, mask: np.ndarray) -> Scaler:
    observed = values[mask]
    if observed.size == 0:
      raise ValueError("cannot fit a scaler: the training readings hold no observed value")
    return cls(float(observed.mean()), float(max(observed.std(), 1e-6)))

  def transform(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Missing readings become 0, the training mean in scaled units.
    return np.where(mask, (values - self.mean) / self.std, 0.0).astype(np.float32)

  def inverse(self, scaled):
    return scaled * self.std + self.mean


@dataclasses.dataclass(frozen=True)
class Windows:
  """Forecasting samples, all NumPy arrays with a leading sample axis S.

  Attributes:
    x: [S, t_in, N] scaled inputs (missing -> 0).
    x_mask: [S, t_in, N] bool observation mask of the inputs.
    y: [S, t_out, N] raw targets (missing -> 0).
    y_mask: [S, t_out, N] bool; metrics and the loss use only True entries.
    time_of_day: [S] slot of the last input step (eq. 3's index).
    day_of_week: [S] day of the last input step.
    start: [S] first input step of each sample in the source series.
  """

  x: np.ndarray
  x_mask: np.ndarray
  y: np.ndarray
  y_mask: np.ndarray
  time_of_day: np.ndarray
  day_of_week: np.ndarray
  start: np.ndarray

  def __len__(self) -> int:
    return self.x.shape[0]

  def take(self, index) -> Windows:
    return Windows(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def make_windows(
  data: TrafficData, scaler: Scaler, start: int, end: int, t_in: int = 12, t_out: int = 12
) -> Windows:
  """All windows lying entirely in steps ``[start, end)``.

  Raises ValueError when the range is shorter than one window.
  """
  length = t_in + t_out
  n = end - start - length + 1
  if n < 1:
    raise ValueError(
      f"steps [{start}, {end}) hold {end - start} steps, fewer than one window of {length}"
    )
  starts = np.arange(start, start + n)
  inputs = starts[:, None] + np.arange(t_in)
  targets = starts[:, None] + t_in + np.arange(t_out)
  scaled = scaler.transform(data.speed, data.mask)
  last = starts + t_in - 1
  return Windows(
    x=scaled[inputs],
    x_mask=data.mask[inputs],
    y=data.speed[targets],
    y_mask=data.mask[targets],
    time_of_day=data.time_of_day[last],
    day_of_week=data.day_of_week[last],
    start=starts,
  )
