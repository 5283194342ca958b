"""Where the data lives.

Every loader reads from one data root laid out like this::

    <root>/core/<city>/regionmap_<city>.geo, .mob, <label>_<city>_sum.npy
    <root>/hafusion/<City>/...
    <root>/prompt4re/chicago/...
    <root>/traffic/los_loop/...

The root is given explicitly (a ``--data-root`` flag in scripts) or through
the ``JAXURBAN_DATA`` environment variable. There is deliberately no silent
default folder: a wrong guess would make results depend on whatever happens to
be on the machine.
"""

from __future__ import annotations

import os
import pathlib

from jaxurban.data.errors import DataError

__all__ = ["DATA_ENV", "FETCH_HINT", "list_subfolders", "resolve_data_root", "subdir"]

DATA_ENV = "JAXURBAN_DATA"

FETCH_HINT = (
  "a data root holds core/, hafusion/, prompt4re/ and traffic/ folders as the README's "
  "Data section lays out; CoRE's cities alone can be downloaded with "
  "`python -m jaxurban.data.fetch core xa cd --dest DIR`, after which DIR serves the CoRE "
  "commands"
)


def resolve_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the data root folder, as an absolute path.

  Args:
    data_root: explicit folder; when ``None`` the ``JAXURBAN_DATA``
      environment variable is used.

  Raises:
    DataError: neither is set, `data_root` is empty, or the folder does not
      exist.
  """
  if data_root is not None and os.fspath(data_root) == "":
    # `--data-root "$DATA"` with DATA unset: not a request for $JAXURBAN_DATA.
    raise DataError("data root", "given as an empty path (an unset shell variable?)")
  if data_root is not None:
    root = pathlib.Path(data_root).expanduser()
    origin = "the data_root argument"
  else:
    env = os.environ.get(DATA_ENV, "")
    if not env:
      raise DataError(
        "data root",
        f"no data folder given: pass --data-root DIR (data_root=DIR in Python) "
        f"or set the environment variable {DATA_ENV}=DIR; {FETCH_HINT}",
      )
    root = pathlib.Path(env).expanduser()
    origin = f"${DATA_ENV}"
  if not root.is_dir():
    what = "is not a folder" if root.exists() else "does not exist"
    raise DataError(root, f"data root from {origin} {what}; {FETCH_HINT}")
  # Absolute, so that what results record names the folder wherever they are
  # read, and a child process started elsewhere reads the same one.
  return root.absolute()


def subdir(root: str | os.PathLike, *parts: str) -> pathlib.Path:
  """Returns ``root/parts...``, which must be an existing folder.

  Raises:
    DataError: naming the first missing level and what that level's parent
      does contain, since a misspelt or wrongly nested folder is the usual
      cause.
  """
  path = pathlib.Path(root)
  for part in parts:
    child = path / part
    if not child.is_dir():
      present = list_subfolders(path)
      listing = ", ".join(present) if present else "no sub-folders"
      raise DataError(child, f"folder missing under {path} (it has: {listing})")
    path = child
  return path


def list_subfolders(path: pathlib.Path) -> list[str]:
  """Names of the folders directly inside `path` (none when it cannot be listed)."""
  try:
    return sorted(p.name for p in path.iterdir() if p.is_dir())
  except OSError:
    return []
