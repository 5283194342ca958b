"""What a results file records about the software that made it."""

from __future__ import annotations

from importlib import metadata

# The packages whose versions can change a figure: the library itself, the
# numerical stack under it, and the checkpoint format.
PACKAGES = (
  "jaxurban",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "jraph",
  "chex",
  "numpy",
)


def software_versions() -> dict[str, str | None]:
  """Installed version of each of :data:`PACKAGES` (None where one is absent)."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions
