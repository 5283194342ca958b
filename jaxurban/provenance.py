"""What a results file records about the software that made it."""

from __future__ import annotations

import functools
import pathlib
import subprocess
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
  """Installed version of each of :data:`PACKAGES` (None where one is absent),
  and ``jaxurban_git``: the commit of the code actually imported (see
  :func:`source_revision`), since the package version stays the same from one
  commit to the next."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  versions["jaxurban_git"] = source_revision()
  return versions


@functools.lru_cache(maxsize=1)
def source_revision() -> str | None:
  """``<commit>`` of the git checkout holding this package, ``<commit>+dirty``
  when tracked files differ from it, None outside a checkout (an installed
  wheel) or without git."""
  folder = pathlib.Path(__file__).resolve().parent

  def git(*args: str) -> str:
    done = subprocess.run(
      ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30
    )
    if done.returncode:
      raise OSError(done.stderr.strip())
    return done.stdout.strip()

  try:
    commit = git("rev-parse", "HEAD")
    # No optional locks: every process of a run asks, and a user's own git
    # command must not meet an index.lock left by it.
    dirty = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")
