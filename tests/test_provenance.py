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
