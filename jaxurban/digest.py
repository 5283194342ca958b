"""SHA-256 digests of files and arrays: what downloads, manifests and
checkpoints record of their inputs."""

from __future__ import annotations

import hashlib
import os

import numpy as np

_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_BLOCK), b""):
      digest.update(block)
  return digest.hexdigest()


def arrays_sha256(*arrays) -> str:
  """Hex SHA-256 over the shapes, dtypes and bytes of ``arrays`` (None entries
  are skipped): a checkpoint's record of the inputs it was trained on."""
  digest = hashlib.sha256()
  for a in arrays:
    if a is None:
      continue
    a = np.ascontiguousarray(a)
    digest.update(f"{a.shape}{a.dtype}".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()
