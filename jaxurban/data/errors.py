"""The single error type raised by every data loader.

A data problem is only actionable when the message says which file, which
column and what is wrong, so the constructor takes those three parts
separately and always formats them the same way::

    regionmap_xa.mob: column 'mobility_weight': 3 negative weights (first at row 17)
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

__all__ = ["DataError", "NOT_FINITE", "not_finite_in_float32", "read_npy"]


# How the loaders name what `not_finite_in_float32` finds.
NOT_FINITE = "non-finite (NaN/inf, or beyond float32's range)"


def not_finite_in_float32(values: np.ndarray) -> np.ndarray:
  """True where a value is NaN or infinite, or finite but beyond float32's
  range (|x| > 3.4e38): the models compute in float32, where such a value
  becomes inf and turns every result that depends on it to NaN."""
  values = np.asarray(values, np.float64)
  with np.errstate(invalid="ignore"):
    return ~(np.abs(values) <= np.finfo(np.float32).max)


class DataError(ValueError):
  """A data file is missing, unreadable or inconsistent.

  Subclasses ``ValueError`` so callers that already guard against bad
  values keep working.

  Args:
    file: the file or folder concerned, shown as given: the full path where
      the caller has it (some older loaders pass the bare file name for
      content problems, e.g. the CoRE city files, whose folder the message
      names otherwise).
    problem: what is wrong, in words, with counts where they help.
    column: the CSV column or array field concerned, if any.
  """

  def __init__(self, file: str | os.PathLike, problem: str, column: str | None = None):
    self.file = os.fspath(file)
    self.column = column
    self.problem = problem
    parts = [self.file]
    if column is not None:
      parts.append(f"column {column!r}")
    parts.append(problem)
    super().__init__(": ".join(parts))

  def __reduce__(self):
    # Keep the error picklable (multiprocessing, pytest-xdist) despite the
    # non-standard constructor signature.
    return (type(self), (self.file, self.problem, self.column))


def read_npy(path: str | os.PathLike, column: str | None = None, shown=None) -> np.ndarray:
  """One .npy array (never a pickle), or a DataError naming the file.

  ``shown`` is how the file is named in the error (default: the file name).
  """
  shown = os.path.basename(os.fspath(path)) if shown is None else shown
  try:
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError as e:
    raise DataError(shown, f"cannot be read ({e.strerror})", column=column) from None
  # numpy's own message for a file that is not .npy at all is advice about
  # loading pickles, which misleads; the magic bytes say what the file is.
  if head != b"\x93NUMPY" and head[:2] != b"PK":
    raise DataError(shown, "not a .npy file (no .npy header)", column=column)
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as e:  # truncated, pickled objects: say which file
    if "pickle" in str(e).lower():
      raise DataError(shown, "holds Python objects (pickled), not numbers", column=column) from None
    raise DataError(shown, f"not a readable .npy array: {e}", column=column) from None
  if not isinstance(array, np.ndarray):  # np.load gives an NpzFile for an archive
    array.close()
    raise DataError(shown, "is an .npz archive, not one .npy array", column=column)
  return array


NOT_A_FILE = "is not a file (a folder or other entry has its name)"


def require_file(path: str | os.PathLike, missing: str = "file missing", column=None) -> None:
  """A DataError unless `path` is a file: ``missing`` when nothing is there,
  and `NOT_A_FILE` when something else is (a folder reported as "missing"
  would contradict a listing of the folder that shows its name)."""
  path = pathlib.Path(path)
  if path.is_file():
    return
  raise DataError(path, NOT_A_FILE if path.exists() else missing, column=column)
