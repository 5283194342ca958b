"""Los-loop loader: checks, masks, windows, chronological split, scaling."""

import shutil

import numpy as np
import pytest

from jaxurban.data.errors import DataError
from jaxurban.data.traffic import (
  STEPS_PER_DAY,
  Scaler,
  TrafficData,
  chronological_bounds,
  load_los_loop,
  make_windows,
  read_los_loop_folder,
)


@pytest.fixture(scope="module")
def los(data_root):
  return load_los_loop(data_root)


def test_real_los_loop_shapes_and_calendar(los):
  assert los.speed.shape == (2016, 207) and los.mask.shape == (2016, 207)
  assert los.coords.shape == (207, 2) and los.adjacency.shape == (207, 207)
  assert los.speed.dtype == np.float32
  # 2012-03-01 was a Thursday (Monday = 0); 288 five-minute slots per day.
  assert los.day_of_week[0] == 3 and los.day_of_week[-1] == 2
  np.testing.assert_array_equal(los.time_of_day[:3], [0, 1, 2])
  assert los.time_of_day[STEPS_PER_DAY] == 0 and los.day_of_week[STEPS_PER_DAY] == 4
  assert np.all(los.speed[los.mask] > 0) and np.all(los.speed[~los.mask] == 0)
  assert 33 < los.coords[:, 0].min() and los.coords[:, 1].max() < -117


def _copy(data_root, tmp_path):
  folder = tmp_path / "los_loop"
  shutil.copytree(data_root / "traffic" / "los_loop", folder)
  return folder


def _edit_cell(path, row, col, value):
  lines = path.read_text().splitlines()
  cells = lines[row].split(",")
  cells[col] = value
  lines[row] = ",".join(cells)
  path.write_text("\n".join(lines) + "\n")


def _insert_line(path, index, text):
  lines = path.read_text().splitlines()
  lines.insert(index, text)
  path.write_text("\n".join(lines) + "\n")


def test_trailing_blank_lines_and_a_byte_order_mark_are_ignored(data_root, tmp_path):
  folder = _copy(data_root, tmp_path)
  for name in ("los_speed.csv", "los_adj.csv", "sensor_locations.csv"):
    path = folder / name
    path.write_text("\ufeff" + path.read_text() + "\n\n  \n", encoding="utf-8")
  data = read_los_loop_folder(folder)
  reference = read_los_loop_folder(data_root / "traffic" / "los_loop")
  np.testing.assert_array_equal(data.speed, reference.speed)
  np.testing.assert_array_equal(data.adjacency, reference.adjacency)


def _rewrite(path, line_fn):
  lines = path.read_text().splitlines()
  path.write_text("\n".join(line_fn(k, line) for k, line in enumerate(lines)) + "\n")


def test_csv_quoting_and_a_row_index_column_are_read_as_csv(data_root, tmp_path):
  # What R's write.csv and pandas' to_csv write: quoted header cells, a row
  # index column with an empty (or "Unnamed: 0") header, quoted fields that
  # hold commas.
  folder = _copy(data_root, tmp_path)
  quote_all = lambda line: ",".join(f'"{c}"' for c in line.split(","))
  _rewrite(
    folder / "los_speed.csv",
    lambda k, line: quote_all("," + line if k == 0 else f"{k - 1},{line}"),
  )
  _rewrite(
    folder / "los_adj.csv",
    lambda k, line: line if k else ",".join(f'"{c}"' for c in line.split(",")),
  )
  _rewrite(
    folder / "sensor_locations.csv",
    lambda k, line: line + (',"note"' if k == 0 else ',"on ramp, eastbound"'),
  )
  data = read_los_loop_folder(folder)
  reference = read_los_loop_folder(data_root / "traffic" / "los_loop")
  np.testing.assert_array_equal(data.speed, reference.speed)
  np.testing.assert_array_equal(data.mask, reference.mask)
  np.testing.assert_array_equal(data.adjacency, reference.adjacency)
  np.testing.assert_array_equal(data.coords, reference.coords)
  # The same with pandas' name for the index column.
  _rewrite(
    folder / "los_speed.csv",
    lambda k, line: line.replace('""', '"Unnamed: 0"', 1) if k == 0 else line,
  )
  np.testing.assert_array_equal(read_los_loop_folder(folder).speed, reference.speed)
  # The adjacency with row and column names, as pandas' DataFrame(a).to_csv()
  # writes it (the published file has neither).
  _name_adjacency(folder)
  np.testing.assert_array_equal(read_los_loop_folder(folder).adjacency, reference.adjacency)


def _name_adjacency(folder, row=None, col=None, value=None):
  """Rewrites the adjacency with row and column names, as pandas' DataFrame(a).to_csv()
  writes it (the published file has neither); cell [row, col] set to value if given."""
  rows = (folder / "los_adj.csv").read_text().splitlines()
  if row is not None:
    cells = rows[row].split(",")
    cells[col] = value
    rows[row] = ",".join(cells)
  header = "," + ",".join(str(j) for j in range(len(rows)))
  named = [header] + [f"{i},{line}" for i, line in enumerate(rows)]
  (folder / "los_adj.csv").write_text("\n".join(named) + "\n")


def test_zero_and_empty_readings_are_masked_and_kept_out_of_the_scaler(data_root, tmp_path):
  folder = _copy(data_root, tmp_path)
  _edit_cell(folder / "los_speed.csv", 1, 0, "0")  # step 0, detector 0
  _edit_cell(folder / "los_speed.csv", 5, 3, "")  # step 4, detector 3
  _edit_cell(folder / "los_speed.csv", 9, 1, "NA")  # step 8, detector 1: R's missing value
  data = read_los_loop_folder(folder)
  assert not data.mask[0, 0] and not data.mask[4, 3] and not data.mask[8, 1]
  assert data.mask.sum() == data.mask.size - 3
  assert data.speed[4, 3] == 0 and data.speed[8, 1] == 0
  scaler = Scaler.fit(data.speed, data.mask)
  observed = data.speed[data.mask].astype(np.float64)
  np.testing.assert_allclose(
    [scaler.mean, scaler.std], [observed.mean(), observed.std()], rtol=1e-5
  )
  scaled = scaler.transform(data.speed, data.mask)
  assert scaled[0, 0] == 0.0 and scaled[4, 3] == 0.0


@pytest.mark.parametrize(
  "edit, file, words",
  [
    (lambda f: (f / "los_adj.csv").unlink(), "los_adj.csv", "file missing"),
    (
      lambda f: ((f / "los_adj.csv").unlink(), (f / "los_adj.csv").mkdir()),
      "los_adj.csv",
      "is not a file (a folder or other entry has its name)",
    ),
    (
      # Headerless, with the first weight missing: not a header row.
      lambda f: _edit_cell(f / "los_adj.csv", 0, 0, ""),
      "los_adj.csv",
      "1 empty or non-finite (NaN/inf, or beyond float32's range) weights "
      "(first at row 1, column 1)",
    ),
    (
      lambda f: _rewrite(f / "los_speed.csv", lambda k, line: line.replace("773869", "767541")),
      "los_speed.csv",
      "detector id '767541' appears twice in the header (cells 1 and 2)",
    ),
    (
      lambda f: (f / "los_speed.csv").write_text(
        "\n".join((f / "los_speed.csv").read_text().splitlines()[1:]) + "\n"
      ),
      "los_speed.csv",
      "line 1 holds readings, not detector ids: the header line naming the detectors is missing",
    ),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 0, 0, ""),
      "los_speed.csv",
      "header cell 1 is empty, and its column is not a row index",
    ),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 3, 2, "fast"),
      "los_speed.csv",
      "'fast' is not a number",
    ),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 7, 5, "-3"),
      "los_speed.csv",
      "negative speeds (first at row 8)",
    ),
    (
      lambda f: _insert_line(f / "los_speed.csv", 10, ""),
      "los_speed.csv",
      "1 blank lines inside the file (first at line 11)",
    ),
    (
      lambda f: _edit_cell(f / "los_adj.csv", 3, 4, "nan"),
      "los_adj.csv",
      "1 empty or non-finite (NaN/inf, or beyond float32's range) weights "
      "(first at row 4, column 5)",
    ),
    (
      lambda f: _edit_cell(f / "los_adj.csv", 3, 4, "1e39"),
      "los_adj.csv",
      "1 empty or non-finite (NaN/inf, or beyond float32's range) weights "
      "(first at row 4, column 5)",
    ),
    (
      lambda f: _edit_cell(f / "los_adj.csv", 3, 4, "-0.5"),
      "los_adj.csv",
      "1 negative weights (first -0.5 at row 4, column 5)",
    ),
    (
      lambda f: _name_adjacency(f, 2, 4, "-2"),
      "los_adj.csv",
      "1 negative weights (first -2.0 at row 4, column '4')",
    ),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 7, 5, "1e300"),
      "los_speed.csv",
      "1 speeds above 300 mph, which no road detector reads (first 1e+300 at row 8)",
    ),
    (
      # Finite in float32, but no speed: it would move the scaler and every metric.
      lambda f: _edit_cell(f / "los_speed.csv", 5, 3, "65000"),
      "los_speed.csv",
      "column '717447': 1 speeds above 300 mph, which no road detector reads "
      "(first 65000.0 at row 6)",
    ),
    (
      # A header line repeated inside the file (two files joined, say).
      lambda f: _insert_line(
        f / "los_speed.csv", 500, (f / "los_speed.csv").read_text().splitlines()[0]
      ),
      "los_speed.csv",
      "row 501 repeats the header line (detector ids, not speeds)",
    ),
    (
      lambda f: _edit_cell(f / "los_adj.csv", 0, 0, "x"),
      "los_adj.csv",
      "row 1, column 1: 'x' is not a number",
    ),
    (
      lambda f: _name_adjacency(f, 0, 1, "x"),
      "los_adj.csv",
      "row 2, column '1': 'x' is not a number",
    ),
    (
      lambda f: _name_adjacency(f, 2, 4, ""),
      "los_adj.csv",
      "1 empty or non-finite (NaN/inf, or beyond float32's range) weights "
      "(first at row 4, column '4')",
    ),
    (
      lambda f: _edit_cell(f / "sensor_locations.csv", 4, 1, "1"),
      "sensor_locations.csv",
      "differs",
    ),
    (
      lambda f: _rewrite(
        f / "sensor_locations.csv",
        lambda k, line, lines=(f / "sensor_locations.csv").read_text().splitlines(): (
          lines[2] if k == 1 else lines[1] if k == 2 else line
        ),
      ),
      "sensor_locations.csv",
      "row 2: detector '767541' differs from detector 1 of los_speed.csv's header ('773869')",
    ),
    (
      lambda f: _edit_cell(f / "sensor_locations.csv", 2, 2, "123"),
      "sensor_locations.csv",
      "outside",
    ),
    (lambda f: _edit_cell(f / "los_speed.csv", 9, 0, "1,2"), "los_speed.csv", "fields"),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 5, 3, '"61.5'),
      "los_speed.csv",
      "row 6 has 4 fields, expected 207 (a quote left open there joins the fields after it)",
    ),
    (
      lambda f: _edit_cell(f / "los_speed.csv", 0, 4, ""),
      "los_speed.csv",
      "header cell 5 is empty",
    ),
    (
      lambda f: (f / "los_speed.csv").write_bytes(b"\xff" + (f / "los_speed.csv").read_bytes()),
      "los_speed.csv",
      "not UTF-8 text: byte 0 is 0xff",
    ),
    (
      lambda f: _rewrite(f / "los_speed.csv", lambda k, line: line.replace(",", ";")),
      "los_speed.csv",
      "line 1 is one field holding semicolons: the file must be comma-separated",
    ),
    (
      lambda f: _rewrite(f / "los_adj.csv", lambda k, line: line.replace(",", "\t")),
      "los_adj.csv",
      "line 1 is one field holding tabs",
    ),
  ],
)
def test_bad_files_raise_data_errors_naming_file_and_problem(
  data_root, tmp_path, edit, file, words
):
  folder = _copy(data_root, tmp_path)
  edit(folder)
  with pytest.raises(DataError) as caught:
    read_los_loop_folder(folder)
  assert file in str(caught.value) and words in str(caught.value)


def test_a_one_line_adjacency_with_an_empty_first_cell_is_a_data_error(data_root, tmp_path):
  folder = _copy(data_root, tmp_path)
  (folder / "los_adj.csv").write_text(",0,1\n")
  with pytest.raises(DataError, match="los_adj.csv: has a header but no data rows"):
    read_los_loop_folder(folder)


def test_adjacency_of_wrong_shape_is_rejected(data_root, tmp_path):
  folder = _copy(data_root, tmp_path)
  lines = (folder / "los_adj.csv").read_text().splitlines()
  (folder / "los_adj.csv").write_text("\n".join(lines[:-1]) + "\n")
  with pytest.raises(DataError, match=r"los_adj.csv: shape \(206, 207\)"):
    read_los_loop_folder(folder)


def test_chronological_split_is_ordered_disjoint_and_6_2_2():
  bounds = chronological_bounds(2016)
  assert bounds == [(0, 1210), (1210, 1613), (1613, 2016)]
  with pytest.raises(ValueError):
    chronological_bounds(100, (0.5, 0.6, -0.1))


def test_windows_align_inputs_targets_and_time_index(los):
  (a, b), (c, d), _ = chronological_bounds(los.n_steps)
  scaler = Scaler.fit(los.speed[a:b], los.mask[a:b])
  train = make_windows(los, scaler, a, b)
  val = make_windows(los, scaler, c, d)
  assert len(train) == b - a - 23 and train.x.shape == (len(train), 12, 207)
  assert train.start.max() + 24 <= b and val.start.min() == c  # nothing crosses a boundary
  s = 100
  raw_inputs = los.speed[train.start[s] : train.start[s] + 12]
  np.testing.assert_allclose(scaler.inverse(train.x[s]), raw_inputs, rtol=1e-5)
  np.testing.assert_array_equal(train.y[s], los.speed[train.start[s] + 12 : train.start[s] + 24])
  assert train.time_of_day[s] == los.time_of_day[train.start[s] + 11]
  assert train.y_mask.dtype == bool and train.y_mask.all()
  with pytest.raises(ValueError, match="fewer than one window"):
    make_windows(los, scaler, 0, 20)


def _small_series():
  """6 steps x 3 detectors; reading (t, n) is 10 t + n + 1, two of them missing."""
  speed = (10 * np.arange(6)[:, None] + np.arange(3)[None, :] + 1).astype(np.float32)
  mask = np.ones((6, 3), bool)
  mask[1, 2] = mask[4, 0] = False
  speed[~mask] = 0
  return TrafficData(
    name="small",
    speed=speed,
    mask=mask,
    # Distinct per step, so a calendar taken at the wrong step shows.
    time_of_day=np.array([100, 101, 102, 103, 104, 105], np.int32),
    day_of_week=np.array([0, 1, 2, 3, 4, 5], np.int32),
    sensor_ids=np.array(["a", "b", "c"]),
    coords=np.array([[34.0, -118.0], [34.1, -118.1], [34.2, -118.2]]),
    adjacency=np.arange(9, dtype=np.float32).reshape(3, 3),
  )


def test_scaler_is_the_population_z_score_of_observed_readings():
  # Mean and standard deviation (ddof = 0, as StandardScaler) of the masked-in
  # readings only: 100 is present but not observed, 0 is a missing reading.
  values = np.array([[1.0, 2.0, 100.0], [3.0, 4.0, 0.0]], np.float32)
  mask = np.array([[True, True, False], [True, True, False]])
  scaler = Scaler.fit(values, mask)
  assert scaler.mean == pytest.approx(2.5)
  assert scaler.std == pytest.approx(np.sqrt(1.25))
  scaled = scaler.transform(values, mask)
  np.testing.assert_allclose(
    scaled,
    [
      [-1.5 / np.sqrt(1.25), -0.5 / np.sqrt(1.25), 0],
      [0.5 / np.sqrt(1.25), 1.5 / np.sqrt(1.25), 0],
    ],
    rtol=1e-6,
  )


def test_windows_carry_the_masks_and_calendar_of_their_own_steps():
  data = _small_series()
  scaler = Scaler(mean=20.0, std=10.0)
  windows = make_windows(data, scaler, 0, 6, t_in=2, t_out=2)
  # Starts 0, 1, 2: inputs [s, s + 2), targets [s + 2, s + 4).
  np.testing.assert_array_equal(windows.start, [0, 1, 2])
  for k, s in enumerate([0, 1, 2]):
    # Observed inputs are z-scored; a missing one is fed as 0 (the mean).
    raw = data.speed[s : s + 2].astype(np.float64)
    expected_x = np.where(data.mask[s : s + 2], (raw - 20.0) / 10.0, 0.0)
    np.testing.assert_allclose(windows.x[k], expected_x, rtol=1e-6, atol=1e-7)
    # Targets stay in mph, missing ones 0.
    np.testing.assert_array_equal(windows.y[k], data.speed[s + 2 : s + 4])
    np.testing.assert_array_equal(windows.x_mask[k], data.mask[s : s + 2])
    np.testing.assert_array_equal(windows.y_mask[k], data.mask[s + 2 : s + 4])
  # Step 1 detector 2 is missing: it is an input of windows 0 and 1 only.
  assert not windows.x_mask[0, 1, 2] and not windows.x_mask[1, 0, 2] and windows.x_mask[2].all()
  # Step 4 detector 0 is missing: a target of windows 1 and 2 only.
  assert windows.y_mask[0].all() and not windows.y_mask[1, 1, 0] and not windows.y_mask[2, 0, 0]
  # The time index of a sample (eq. 3) is that of its last input step, s + 1.
  np.testing.assert_array_equal(windows.time_of_day, [101, 102, 103])
  np.testing.assert_array_equal(windows.day_of_week, [1, 2, 3])


def test_select_restricts_every_field_to_the_same_detectors_and_steps():
  data = _small_series()
  part = data.select(nodes=[2, 0], steps=slice(2, 5))
  np.testing.assert_array_equal(part.speed, [[23, 21], [33, 31], [43, 0]])
  np.testing.assert_array_equal(part.mask, [[True, True], [True, True], [True, False]])
  np.testing.assert_array_equal(part.time_of_day, [102, 103, 104])
  np.testing.assert_array_equal(part.day_of_week, [2, 3, 4])
  np.testing.assert_array_equal(part.sensor_ids, ["c", "a"])
  np.testing.assert_array_equal(part.coords, [[34.2, -118.2], [34.0, -118.0]])
  np.testing.assert_array_equal(part.adjacency, [[8, 6], [2, 0]])
  assert part.n_steps == 3 and part.n_nodes == 2
