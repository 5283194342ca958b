"""The digests that downloads, manifests and checkpoints record."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from jaxurban.digest import arrays_sha256, file_sha256


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, 3 << 20])
def test_file_sha256_is_hashlib_over_the_whole_file(tmp_path, size):
  # Sizes around the 1 MiB read block: a block boundary must not drop or
  # repeat bytes.
  data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
  path = tmp_path / "f.bin"
  path.write_bytes(data)
  assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_arrays_sha256_tells_apart_what_the_bytes_alone_do_not():
  x = np.arange(12, dtype=np.float32)
  digest = arrays_sha256(x)
  assert arrays_sha256(x.copy()) == digest
  # The same bytes in another shape or read as another dtype are other inputs.
  assert arrays_sha256(x.reshape(3, 4)) != digest
  assert arrays_sha256(x.view(np.int32)) != digest
  assert arrays_sha256(x + 1) != digest
  # Order matters, and an absent optional input (None) counts for nothing.
  y = np.ones(3, np.int64)
  assert arrays_sha256(x, y) != arrays_sha256(y, x)
  assert arrays_sha256(x, None, y) == arrays_sha256(x, y)
  assert arrays_sha256(None, None) == hashlib.sha256().hexdigest()


def test_arrays_sha256_reads_values_not_memory_layout():
  a = np.arange(12, dtype=np.float64).reshape(3, 4)
  assert arrays_sha256(np.asfortranarray(a)) == arrays_sha256(a)
  assert arrays_sha256(a.T) == arrays_sha256(np.ascontiguousarray(a.T))
  assert arrays_sha256(a[:, ::2]) == arrays_sha256(a[:, ::2].copy())
  assert arrays_sha256([[1.0, 2.0]]) == arrays_sha256(np.array([[1.0, 2.0]]))
