"""jaxurban never needs torch: every submodule imports, and the published
prompt vectors load, in a fresh interpreter where importing torch or
transformers fails.

The check runs in a subprocess with a meta-path finder installed before
anything else is imported, so that a torch already imported by other tests
(or installed in the environment) cannot hide a stray import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


BLOCKER = textwrap.dedent(
  """
  import importlib.abc
  import sys

  BLOCKED = ("torch", "transformers", "torchvision")

  class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in BLOCKED:
        raise ModuleNotFoundError(f"import of {name} blocked: jaxurban must not need torch")
      return None

  sys.meta_path.insert(0, Block())
  """
)


def _run(body: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run(
    [sys.executable, "-c", BLOCKER + textwrap.dedent(body)],
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )


def test_blocker_really_blocks():
  result = _run("import torch\n")
  assert result.returncode != 0 and "blocked" in result.stderr


def test_jaxurban_imports_without_torch():
  result = _run(
    """
    import importlib
    import pkgutil

    import jaxurban

    names = ["jaxurban"]
    for info in pkgutil.walk_packages(jaxurban.__path__, "jaxurban."):
      names.append(info.name)
    for name in names:
      importlib.import_module(name)
    # The torch-free parts of the extraction step import too, and its
    # command says what to install instead of failing with a traceback.
    for name in ("templates", "regions", "output", "published", "cli"):
      importlib.import_module("experiments.prompt_extraction." + name)
    from experiments.prompt_extraction.cli import main
    code = main(["--regions", "r.json", "--model", "m", "--task", "crime", "--out", "o"])
    assert code == 2, code
    assert "jaxurban.prompts" in names and "torch" not in sys.modules and "transformers" not in sys.modules
    print("imported", len(names))
    """
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "imported" in result.stdout
  assert "pip install -e '.[extract]'" in result.stderr


def test_published_vectors_load_without_torch(data_root):
  result = _run(
    """
    import numpy as np
    from jaxurban.prompts import load_chicago_prompts

    vectors = load_chicago_prompts(None, "qwen", "crime")
    assert vectors.shape == (77, 3584) and vectors.dtype == np.float32
    assert "torch" not in sys.modules
    print("loaded", vectors.shape)
    """,
    {"JAXURBAN_DATA": str(data_root)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded (77, 3584)" in result.stdout


def test_transformers_hidden_by_kernels_folder_gets_its_own_advice():
  from experiments.prompt_extraction.cli import missing_stack_message

  # The error transformers 5.25 raises when this project's kernels/ comes
  # first on sys.path.
  collision = ImportError(
    "cannot import name 'CUDAProperties' from 'kernels' (/repo/kernels/__init__.py)"
  )
  message = missing_stack_message(collision)
  assert "transformers<5.25" in message and "kernels/ folder" in message
  assert "transformers<5.25" in missing_stack_message(ImportError("x", name="kernels"))
  plain = missing_stack_message(ImportError("No module named 'torch'", name="torch"))
  assert "needs torch and transformers" in plain and "kernels" not in plain
