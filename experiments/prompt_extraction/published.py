"""Manifests for the published Prompt4RE Chicago vectors.

The Prompt4RE code (townSeven/Prompt4RE @
7d764a6289eae5694713af7515d4d7efeb9a3b97, ``data/``) publishes
``prompt_embs_<mllm>_<task>.npy`` without any description. This writes one
manifest per file so that they load through the same checked loader as the
project's own extractions::

  python -m experiments.prompt_extraction.published --data-root DATA \\
      --out jaxurban/data/manifests/prompt4re_chicago

The facts recorded come from the files themselves (sha256, shape, dtype) and
from the authors' paper (model, mean pooling over tokens of the last-layer
hidden states). The authors' task prompts are in their inference scripts
at that commit (``task_prompt`` in ``inference_llama.py`` and
``inference_qwen.py``); they are not copied into this project, so the
template is recorded by name only (no text, no hash), and a caller asking
for a specific template hash is refused.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from experiments.common import exit_status
from experiments.prompt_extraction.output import build_manifest
from jaxurban.atomic import write_text_atomic
from jaxurban.data.root import resolve_data_root, subdir
from jaxurban.prompts import CHICAGO_REGIONS, file_sha256

REPOSITORY = "townSeven/Prompt4RE"
COMMIT = "7d764a6289eae5694713af7515d4d7efeb9a3b97"
MODELS = {
  "llama": "meta-llama/Llama-3.2-11B-Vision-Instruct",
  "qwen": "Qwen/Qwen2.5-VL-7B-Instruct",
}
FILES = (
  ("llama", "crime"),
  ("llama", "checkIn"),
  ("llama", "serviceCall"),
  ("llama", "none"),
  ("qwen", "crime"),
  ("qwen", "checkIn"),
  ("qwen", "serviceCall"),
)


def published_manifest(folder: pathlib.Path, mllm: str, task: str) -> dict:
  name = f"prompt_embs_{mllm}_{task}.npy"
  array = np.load(folder / name, mmap_mode="r", allow_pickle=False)
  manifest = build_manifest(
    array=array,
    sha256=file_sha256(folder / name),
    region_ids=[str(i) for i in range(CHICAGO_REGIONS)],
    task=task,
    template={
      "version": "prompt4re-authors" if task != "none" else "prompt4re-authors-no-task",
      "sha256": None,
      "text": None,
    },
    pooling="mean",
    model={"name": MODELS[mllm], "path": None, "revision": None},
    source={"repository": REPOSITORY, "commit": COMMIT, "path": f"data/{name}"},
  )
  # The authors' creation time is unknown; the time of writing this
  # manifest would be misleading.
  manifest["created"] = None
  manifest["array"] = name
  return manifest


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  p.add_argument("--out", required=True, help="folder for the manifests, one per vector file")
  args = p.parse_args(argv)
  folder = subdir(resolve_data_root(args.data_root), "prompt4re", "chicago")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for mllm, task in FILES:
    manifest = published_manifest(folder, mllm, task)
    target = out / f"prompt_embs_{mllm}_{task}.json"
    write_text_atomic(target, json.dumps(manifest, indent=1) + "\n")
    print(f"{target}: {manifest['shape']} {manifest['dtype']} {manifest['sha256'][:12]}")


if __name__ == "__main__":
  raise SystemExit(exit_status(main))
