"""Shared fixtures: where the real data lives.

Tests that need the real data take the ``data_root`` fixture. Locally they are
skipped when ``JAXURBAN_DATA`` is unset; CI sets ``JAXURBAN_REQUIRE_DATA=1`` so
that a missing data folder fails the run instead of silently skipping half of
it.
"""

from __future__ import annotations

import os
import pathlib
import secrets

import numpy as np
import pytest

from jaxurban.data.core_city import CityData, load_city
from jaxurban.data.errors import DataError
from jaxurban.data.root import DATA_ENV, resolve_data_root

REQUIRE_DATA_ENV = "JAXURBAN_REQUIRE_DATA"


def _data_required() -> bool:
  return os.environ.get(REQUIRE_DATA_ENV, "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
  """The data root from ``$JAXURBAN_DATA`` (skip if unset, fail if required)."""
  if not os.environ.get(DATA_ENV):
    message = f"{DATA_ENV} is not set; point it at the data folder to run this test"
    if _data_required():
      pytest.fail(f"{message} ({REQUIRE_DATA_ENV}=1)")
    pytest.skip(message)
  try:
    return resolve_data_root()
  except DataError as e:
    # A set-but-wrong path is a configuration mistake, never a reason to skip.
    pytest.fail(str(e))


@pytest.fixture(scope="session")
def core_city(data_root):
  """Factory ``core_city("xa") -> CityData``, each city parsed once per test session."""
  loaded: dict[str, CityData] = {}

  def get(name: str) -> CityData:
    key = name.lower()
    if key not in loaded:
      loaded[key] = load_city(key, data_root)
    return loaded[key]

  return get


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A fresh random generator per test; its seed is reported on failure."""
  seed = secrets.randbits(32)
  request.node.user_properties.append(("rng_seed", seed))
  print(f"rng seed for {request.node.name}: {seed}")
  return np.random.default_rng(seed)
