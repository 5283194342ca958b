"""Files written whole or not at all.

Every result file (metrics, embeddings, pictures, downloads) goes through
`atomic_write`: a temporary file in the target folder, flushed to disk, then
renamed over the target, so a killed run never leaves a partial file.
A run killed mid-write (SIGKILL) does leave its temporary file behind; the
next write of the same target on the same machine removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import pathlib
import re
import socket
import tempfile
from typing import IO, Any, Callable

import numpy as np


def writable_folder_problem(folder: str | os.PathLike) -> str | None:
  """Why a run could not write its outputs under `folder`, or None if it can.

  Checked before any work: `folder` must be a folder or not exist yet, and
  the nearest existing folder on its path must take a new file (tried with a
  temporary file, which also catches read-only and immutable folders that
  permission bits do not show).
  """
  path = pathlib.Path(folder)
  if path.exists() and not path.is_dir():
    return f"{path}: exists and is not a folder"
  existing = path.absolute()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    return f"{path}: cannot be made, since {existing} is a file"
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    return f"{path}: cannot write in {existing} ({error.strerror or error})"
  return None


def path_argument(text: str, what: str = "a folder") -> str:
  """An argparse type for a path flag (`what` it names): the text as given,
  unless it is empty, which (an unset shell variable) would mean the
  current folder."""
  if not text.strip():
    raise argparse.ArgumentTypeError(
      f"given as an empty path (an unset shell variable?); name {what}"
    )
  return text


def shared_file_mode() -> int:
  """The mode ``open()`` would give a new file (0o666 less the umask).

  ``tempfile`` creates its files private (0o600); results are meant to be
  read by others, as a plain ``open()`` would allow.
  """
  return 0o666 & ~_umask()


def _umask() -> int:
  """The process's umask, read where Linux shows it: setting it to read it
  back would, for that moment, give files other threads create mode 0o666."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  umask = os.umask(0)
  os.umask(umask)
  return umask


def atomic_write(
  path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True
) -> pathlib.Path:
  """Writes ``path`` through ``write(file)``: into a temporary file in the
  same folder, flushed to disk, then renamed over ``path``.

  Readers see the old file or the whole new one, never a partial one; a
  failure removes the temporary file and leaves ``path`` as it was.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(
    dir=path.parent, prefix=f"{_temporary_stem(path)}{_host_tag()}-{os.getpid()}.", suffix=".tmp"
  )
  try:
    with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(temporary, shared_file_mode())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise
  remove_stale_temporaries(path)
  return path


@functools.cache
def _host_tag() -> str:
  # A short hash: host names may hold dots and other characters a file name
  # should not carry.
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# Temporary files are named .<target>.<host tag>-<pid>.<random>.tmp, so that a
# later write can tell a dead writer's file (same host, process gone) from a
# live one's (another process writing the same target now).
_TEMPORARY = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[^.]+\.tmp")


def _temporary_stem(path: pathlib.Path) -> str:
  return f".{path.name}."


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
  """Deletes the temporary files that writers of ``path`` killed on this
  machine left behind; their names.

  A file is removed only when its name says it was made here by a process
  that no longer runs; files of live processes, of other machines (a shared
  folder) and of any other naming are left alone.
  """
  path = pathlib.Path(path)
  host = _host_tag()
  stem = _temporary_stem(path)
  removed = []
  for candidate in glob.glob(glob.escape(str(path.parent / stem)) + "*.tmp"):
    name = os.path.basename(candidate)
    match = _TEMPORARY.fullmatch(name[len(stem) :])
    if match is None or match["host"] != host or _process_runs(int(match["pid"])):
      continue
    with contextlib.suppress(FileNotFoundError):  # another writer removed it first
      os.unlink(candidate)
      removed.append(name)
  return removed


def _process_runs(pid: int) -> bool:
  """Whether a process ``pid`` exists on this machine."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, under another user
    return True
  except OverflowError:  # no such pid can exist
    return False
  return True


def as_written_json(payload: Any) -> Any:
  """``payload`` as `write_json_atomic` writes it and JSON reads it back:
  plain JSON types, non-finite floats as None."""
  return _finite_or_null(as_json_types(payload))


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
  """Writes ``payload`` as strict JSON (non-finite floats become null)."""
  text = json.dumps(as_written_json(payload), indent=2, sort_keys=True, allow_nan=False)
  atomic_write(path, lambda f: f.write(text + "\n"), binary=False)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda f: f.write(text), binary=False)


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
  array = np.asarray(array)
  atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def remove_earlier_outputs(folder: str | os.PathLike, patterns: tuple[str, ...]) -> list[str]:
  """Deletes the files of ``folder`` matching the glob ``patterns``; their names.

  For the files a run derives from its results (pictures, tables) and may
  not write this time (under ``--no-plot``, say): removed before the new
  results are written, so that an earlier run's never sits beside them.
  """
  removed = []
  for pattern in patterns:
    for path in sorted(pathlib.Path(folder).glob(pattern)):
      if path.is_file() or path.is_symlink():
        path.unlink()
        removed.append(path.name)
  return removed


def _finite_or_null(value: Any) -> Any:
  """NaN and infinities as None: JSON has no literal for them, and strict
  readers reject Python's ``NaN``."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, list):
    return [_finite_or_null(v) for v in value]
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  return value


def as_json_types(value: Any) -> Any:
  """``value`` as the plain JSON types it reads back as (tuples become lists)."""
  return json.loads(json.dumps(value, default=_json_default))


def _json_default(value):
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, pathlib.Path):
    return str(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def same_json_value(a: Any, b: Any) -> bool:
  """JSON values equal as Python compares them (1 == 1.0), except that NaN
  equals NaN: a setting saved as NaN must not make its own run unresumable."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(same_json_value(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(same_json_value(x, y) for x, y in zip(a, b))
  return a == b


def json_differences(key: str, saved: Any, current: Any) -> list[str]:
  """ "key: saved X vs now Y" for each differing leaf, nested dicts walked, so
  that a changed file hash names that file rather than printing both tables."""
  if isinstance(saved, dict) and isinstance(current, dict):
    keys = sorted(set(saved) | set(current))
    return [
      part
      for k in keys
      if not same_json_value(saved.get(k), current.get(k))
      for part in json_differences(f"{key}.{k}", saved.get(k), current.get(k))
    ]
  return [f"{key}: saved {saved!r} vs now {current!r}"]
