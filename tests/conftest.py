"""Shared fixtures: where the real data lives.

Tests that need the real data take the ``data_root`` fixture. Locally they are
skipped when ``JAXURBAN_DATA`` is unset; CI sets ``JAXURBAN_REQUIRE_DATA=1`` so
that a missing data folder fails the run instead of silently skipping half of
it.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import secrets
import shutil
import tempfile

# Many tests compile the same programs (the same tiny models through fresh jit
# objects, in this process, in the other pytest worker and in the 8-device
# child processes). One compilation cache for the whole run compiles each of
# them once (the CoRE training tests: 119 s instead of 187 s). The cache is
# keyed on the program, the flags and the jax version, so a hit is the same
# executable. jax reads these variables when it is imported, which happens
# after this point (no pytest plugin imports it), in this process, in the
# pytest-xdist workers and in child processes alike; a cache the user already
# configured is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="jaxurban-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxurban.data.core_city import CityData, load_city  # noqa: E402
from jaxurban.data.errors import DataError  # noqa: E402
from jaxurban.data.root import DATA_ENV, resolve_data_root  # noqa: E402

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


TEST_SEED_ENV = "JAXURBAN_TEST_SEED"


def _fixed_test_seed() -> int | None:
  text = os.environ.get(TEST_SEED_ENV, "").strip()
  if not text:
    return None
  try:
    seed = int(text, 0)
  except ValueError:
    seed = -1
  if not 0 <= seed < 2**32:
    raise pytest.UsageError(
      f"{TEST_SEED_ENV}={text!r} is not a seed: give an integer in [0, 2**32)"
    )
  return seed


def pytest_configure(config):
  _fixed_test_seed()  # a malformed seed stops the run once, before any test


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A fresh random generator per test; its seed is reported on failure.

  ``JAXURBAN_TEST_SEED=<seed>`` replays a reported seed in every test that
  draws from this fixture.
  """
  fixed = _fixed_test_seed()
  seed = secrets.randbits(32) if fixed is None else fixed
  request.node.user_properties.append(("rng_seed", seed))
  print(f"rng seed for {request.node.name}: {seed} (replay with {TEST_SEED_ENV}={seed})")
  return np.random.default_rng(seed)
