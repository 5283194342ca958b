"""What results files record about the code that made them."""

import pathlib
import subprocess

import pytest

from jaxurban import provenance


def test_results_name_the_commit_of_the_imported_code():
  package = pathlib.Path(provenance.__file__).resolve().parent
  done = subprocess.run(
    ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True
  )
  if done.returncode:
    pytest.skip("the package is not in a git checkout")
  versions = provenance.software_versions()
  assert versions["jaxurban_git"].split("+")[0] == done.stdout.strip()
  assert versions["jaxurban_git"] in (done.stdout.strip(), done.stdout.strip() + "+dirty")
  assert versions["jax"] is not None


def test_a_checkout_with_changed_tracked_files_is_marked_dirty(tmp_path, monkeypatch):
  def git(*args):
    subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

  git("init", "-q")
  git("config", "user.email", "t@example.org")
  git("config", "user.name", "t")
  module = tmp_path / "provenance.py"
  module.write_text("x = 1\n")
  git("add", "provenance.py")
  git("commit", "-q", "-m", "one")
  head = subprocess.run(
    ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  # The revision is read from the folder of the module's file.
  monkeypatch.setattr(provenance, "__file__", str(module))
  revision = provenance.source_revision.__wrapped__
  assert revision() == head
  (tmp_path / "notes.txt").write_text("untracked files do not count\n")
  assert revision() == head
  module.write_text("x = 2\n")
  assert revision() == head + "+dirty"
  # Outside any checkout there is no revision to name.
  outside = tmp_path.parent / (tmp_path.name + "-plain")
  outside.mkdir()
  monkeypatch.setattr(provenance, "__file__", str(outside / "provenance.py"))
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
  assert revision() is None


def test_an_absent_package_is_recorded_as_none(monkeypatch):
  monkeypatch.setattr(provenance, "PACKAGES", ("numpy", "no-such-distribution-xyz"))
  versions = provenance.software_versions()
  assert versions["no-such-distribution-xyz"] is None
  assert versions["numpy"] is not None


@pytest.mark.parametrize(
  "failure",
  [subprocess.TimeoutExpired(["git"], 30), FileNotFoundError("git"), PermissionError("git")],
)
def test_a_git_that_hangs_or_is_missing_gives_no_revision(failure, monkeypatch):
  # A slow network file system or a machine without git must not stop a run
  # from writing its results.
  def run(*args, **kwargs):
    raise failure

  monkeypatch.setattr(provenance.subprocess, "run", run)
  provenance.source_revision.cache_clear()
  try:
    assert provenance.source_revision() is None
  finally:
    provenance.source_revision.cache_clear()
