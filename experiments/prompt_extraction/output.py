"""Writing prompt vectors: atomic files, a resumable work folder, the manifest.

An output folder holds, once a run is complete::

    vectors.npy     [regions, hidden size], float32 (or float16 on request)
    manifest.json   what ``jaxurban.prompts.load_prompt_vectors`` checks

While a run is under way it holds ``.work/``: ``state.json`` (the run's
settings) and one ``batch-NNNNN.npz`` per finished batch (region ids and
their vectors). Every file is written to a temporary name and moved into
place with ``os.replace``, so an interrupted run leaves only whole files. A
rerun with the same settings skips the regions already in the work folder;
the manifest is written last, and the work folder is removed after it.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
from collections.abc import Mapping, Sequence

import numpy as np

from jaxurban.atomic import atomic_write, json_differences
from jaxurban.prompts import FORMAT, FORMAT_VERSION, MANIFEST_NAME, file_sha256

__all__ = [
  "ARRAY_NAME",
  "ExtractionError",
  "WorkFolder",
  "atomic_write",
  "build_manifest",
  "write_output",
]

ARRAY_NAME = "vectors.npy"
WORK_NAME = ".work"


class ExtractionError(RuntimeError):
  """The extraction cannot go on; the message says why and what to do."""


def _write_json(path: pathlib.Path, value) -> None:
  atomic_write(path, lambda f: f.write(json.dumps(value, indent=1) + "\n"), binary=False)


class WorkFolder:
  """The per-batch shards of a run in progress.

  Args:
    out: the output folder.
    settings: everything that determines the vectors (model, template,
      pooling, dtype, inputs). A work folder left by a run with other
      settings is refused rather than mixed in.
  """

  def __init__(self, out: pathlib.Path, settings: Mapping):
    self.path = out / WORK_NAME
    self.settings = json.loads(json.dumps(settings))  # plain JSON types, for comparison
    self._state = self.path / "state.json"
    if self._state.is_file():
      old = json.loads(self._state.read_text(encoding="utf-8"))
      if old != self.settings:
        changed = "; ".join(_shortened(part) for part in json_differences("", old, self.settings))
        raise ExtractionError(
          f"{self.path} holds an unfinished run with other settings ({changed}); rerun with "
          "the same settings to resume it, or pass --restart to discard it"
        )
    # The state is written with the first batch: a run that stops before
    # (a model that does not load, say) leaves nothing to refuse a retry with.

  def done(self) -> dict[str, np.ndarray]:
    """Vectors of the regions finished by earlier (interrupted) runs."""
    vectors: dict[str, np.ndarray] = {}
    for shard in sorted(self.path.glob("batch-*.npz")):
      try:
        with np.load(shard, allow_pickle=False) as data:
          ids, rows = [str(i) for i in data["ids"]], data["vectors"]
      except (OSError, ValueError, KeyError) as e:
        raise ExtractionError(f"{shard}: unreadable batch file ({e}); pass --restart") from e
      vectors.update(zip(ids, rows))
    return vectors

  def save_batch(self, ids: Sequence[str], vectors: np.ndarray) -> None:
    index = len(list(self.path.glob("batch-*.npz")))
    shard = self.path / f"batch-{index:05d}.npz"
    while shard.exists():
      index += 1
      shard = self.path / f"batch-{index:05d}.npz"
    ids_array = np.asarray(list(ids), dtype=np.str_)
    if not self._state.is_file():
      self.path.mkdir(parents=True, exist_ok=True)
      _write_json(self._state, self.settings)
    atomic_write(shard, lambda f: np.savez(f, ids=ids_array, vectors=vectors))

  def remove(self) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


def _shortened(difference: str, limit: int = 160) -> str:
  # json_differences names the key from its root ("." + name); long values
  # (a template text) are cut so that the message stays readable.
  difference = difference.removeprefix(".")
  return difference if len(difference) <= limit else difference[: limit - 3] + "..."


def build_manifest(
  *,
  array: np.ndarray,
  sha256: str,
  region_ids: Sequence[str],
  task: str,
  template: Mapping,
  pooling: str,
  model: Mapping,
  skipped: Sequence[Mapping] = (),
  inputs: Mapping | None = None,
  software: Mapping | None = None,
  source: Mapping | None = None,
  created: str | None = None,
) -> dict:
  """The manifest dict for ``array`` (format ``jaxurban.prompt_vectors`` v1)."""
  if created is None:
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  manifest = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "array": ARRAY_NAME,
    "sha256": sha256,
    "shape": [int(s) for s in array.shape],
    "dtype": array.dtype.name,
    "region_ids": [str(i) for i in region_ids],
    "task": task,
    "pooling": pooling,
    "template": dict(template),
    "model": dict(model),
    "created": created,
    "skipped": [dict(s) for s in skipped],
  }
  if inputs is not None:
    manifest["inputs"] = dict(inputs)
  if software is not None:
    manifest["software"] = dict(software)
  if source is not None:
    manifest["source"] = dict(source)
  return manifest


def write_output(out: pathlib.Path, array: np.ndarray, **manifest_fields) -> dict:
  """Writes ``vectors.npy`` then ``manifest.json`` (both atomically)."""
  array_path = out / ARRAY_NAME
  atomic_write(array_path, lambda f: np.save(f, array, allow_pickle=False))
  manifest = build_manifest(array=array, sha256=file_sha256(array_path), **manifest_fields)
  _write_json(out / MANIFEST_NAME, manifest)
  return manifest
