"""Prompt vectors from a frozen multimodal LLM, read for the JAX side.

The prompt vectors P of ToPT's prompting module (section 2.2.3 of the ToPT
paper; the keys and values of its cross-attention, eq. 2) are produced by a
separate PyTorch step, ``python -m experiments.extract_prompts``, and handed
over as files: one ``.npy`` array of shape [regions, hidden size] and a JSON
manifest describing it. This module only reads such files; it never imports
torch.

A manifest (format ``jaxurban.prompt_vectors``, version 1) looks like::

    {
      "format": "jaxurban.prompt_vectors", "format_version": 1,
      "array": "vectors.npy", "sha256": "<sha256 of the .npy file>",
      "shape": [77, 4096], "dtype": "float16",
      "region_ids": ["0", "1", ...],
      "task": "crime", "pooling": "mean",
      "template": {"version": "...", "sha256": "<sha256 of text>", "text": "..."},
      "model": {"name": "...", "path": "...", "revision": "..."},
      "created": "2025-01-01T00:00:00Z", ...
    }

``load_prompt_vectors`` checks the manifest against the array file (checksum,
shape, dtype, finite values) and against the regions the caller expects, and
refuses any mismatch with a ``DataError`` naming the file, the field and the
problem. A mismatch is never repaired silently, except that rows are put into
the caller's region order when the two sets of ids are equal.

The vectors published with the Prompt4RE code (townSeven/Prompt4RE @
7d764a6289eae5694713af7515d4d7efeb9a3b97, ``data/``) come without manifests;
their manifests ship with this package (``jaxurban/data/manifests/
prompt4re_chicago/``) and ``load_chicago_prompts`` reads those files through
the same loader.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from jaxurban.data.errors import DataError, read_npy, require_file
from jaxurban.data.root import resolve_data_root, subdir
from jaxurban.digest import file_sha256

__all__ = [
  "CHICAGO_MLLMS",
  "CHICAGO_REGIONS",
  "CHICAGO_TASKS",
  "FORMAT",
  "FORMAT_VERSION",
  "MANIFEST_NAME",
  "POOLINGS",
  "show_ids",
  "chicago_manifest_path",
  "file_sha256",
  "load_chicago_prompts",
  "load_prompt_vectors",
  "read_manifest",
  "text_sha256",
]

FORMAT = "jaxurban.prompt_vectors"
FORMAT_VERSION = 1
# The manifest's file name inside an extraction output folder.
MANIFEST_NAME = "manifest.json"
POOLINGS = ("mean", "last")
# Array dtypes a manifest may declare; everything is returned as float32.
# (bfloat16 has no .npy encoding, so the extraction step stores float16 or
# float32.)
_DTYPES = ("float16", "float32", "float64")

CHICAGO_MLLMS = ("llama", "qwen")
CHICAGO_REGIONS = 77
CHICAGO_TASKS = ("crime", "checkIn", "serviceCall", "none")
# The published "none" file (no task template, the paper's ablation) exists
# only for LLaMA.
_CHICAGO_FILES = {
  ("llama", "crime"),
  ("llama", "checkIn"),
  ("llama", "serviceCall"),
  ("llama", "none"),
  ("qwen", "crime"),
  ("qwen", "checkIn"),
  ("qwen", "serviceCall"),
}
_CHICAGO_MANIFESTS = ("manifests", "prompt4re_chicago")

# How many ids an error message lists before abbreviating.
_SHOW = 5


def text_sha256(text: str) -> str:
  """Hex sha256 of a text's UTF-8 bytes (how template texts are hashed)."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def show_ids(ids: Sequence[str]) -> str:
  """The first few ids, quoted, and how many more: for messages."""
  listed = ", ".join(repr(i) for i in list(ids)[:_SHOW])
  more = len(ids) - _SHOW
  return f"{listed} and {more} more" if more > 0 else listed


def read_manifest(path: str | os.PathLike) -> dict:
  """Reads a manifest file and checks its fields' presence and types.

  Only the manifest itself is checked here; ``load_prompt_vectors`` also
  checks it against the array and the expected regions.

  Raises:
    DataError: the file is missing, not JSON, of another format or version,
      or a field is missing or of the wrong type.
  """
  path = pathlib.Path(path)
  require_file(path, "manifest file does not exist")
  try:
    manifest = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not JSON
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(path, f"manifest is not readable JSON ({e})") from e
  # Errors name the whole path: every extraction writes the same two file names.
  if not isinstance(manifest, dict):
    raise DataError(path, f"manifest must be a JSON object, found {type(manifest).__name__}")
  if manifest.get("format") != FORMAT:
    raise DataError(
      path, f"format is {manifest.get('format')!r}, expected {FORMAT!r}", column="format"
    )
  version = manifest.get("format_version")
  # `True == 1` in Python: a JSON boolean is not a version number.
  if isinstance(version, bool) or version != FORMAT_VERSION:
    raise DataError(
      path,
      f"format_version {version!r} is not supported (this reader understands {FORMAT_VERSION})",
      column="format_version",
    )

  def need(field: str, kind: type | tuple[type, ...], what: str):
    if field not in manifest:
      raise DataError(path, "field missing", column=field)
    value = manifest[field]
    if not isinstance(value, kind) or isinstance(value, bool):
      raise DataError(path, f"must be {what}, found {value!r:.80}", column=field)
    return value

  need("array", str, "a file name")
  if os.path.basename(manifest["array"]) != manifest["array"]:
    raise DataError(path, "must be a bare file name beside the manifest", column="array")
  sha = need("sha256", str, "a hex sha256 string")
  if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
    raise DataError(path, f"{sha!r} is not a lower-case hex sha256", column="sha256")
  shape = need("shape", list, "a list [regions, dimension]")
  if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
    raise DataError(
      path, f"must be two integers [regions, dimension], found {shape}", column="shape"
    )
  if shape[0] < 1 or shape[1] < 1:
    raise DataError(path, f"must be positive, found {shape}", column="shape")
  dtype = need("dtype", str, "a dtype name")
  if dtype not in _DTYPES:
    raise DataError(path, f"{dtype!r} is not one of {', '.join(_DTYPES)}", column="dtype")
  ids = need("region_ids", list, "a list of region id strings")
  if not all(isinstance(i, str) for i in ids):
    raise DataError(path, "every region id must be a string", column="region_ids")
  if len(set(ids)) != len(ids):
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    raise DataError(path, f"duplicate region ids: {show_ids(dup)}", column="region_ids")
  if len(ids) != shape[0]:
    raise DataError(
      path, f"{len(ids)} region ids for an array of {shape[0]} rows", column="region_ids"
    )
  need("task", str, "a task name")
  pooling = need("pooling", str, "a pooling name")
  if pooling not in POOLINGS:
    raise DataError(path, f"{pooling!r} is not one of {', '.join(POOLINGS)}", column="pooling")
  template = need("template", dict, "an object {version, sha256, text}")
  for key in ("version", "sha256"):
    if key not in template:
      raise DataError(path, f"template has no {key!r}", column="template")
  text = template.get("text")
  if text is not None:
    # The recorded hash must describe the recorded text: an edited template
    # record would otherwise pass as the original.
    if not isinstance(text, str) or text_sha256(text) != template["sha256"]:
      raise DataError(
        path, "template sha256 does not match the sha256 of the template text", column="template"
      )
  model = need("model", dict, "an object describing the model")
  if not isinstance(model.get("name"), str):
    raise DataError(path, "model has no 'name'", column="model")
  skipped = manifest.get("skipped", [])
  if not isinstance(skipped, list) or not all(
    isinstance(s, Mapping) and isinstance(s.get("id"), str) for s in skipped
  ):
    raise DataError(path, "must be a list of {id, problems} objects", column="skipped")
  # A region left out cannot also have a row: the record would be self-contradictory.
  both = [s["id"] for s in skipped if s["id"] in set(ids)]
  if both:
    raise DataError(
      path, f"{len(both)} regions both skipped and given a row: {show_ids(both)}", column="skipped"
    )
  return manifest


def load_prompt_vectors(
  directory: str | os.PathLike,
  region_ids: Sequence[str] | None = None,
  *,
  manifest: str | os.PathLike | None = None,
  task: str | None = None,
  template_sha256: str | None = None,
) -> tuple[np.ndarray, dict]:
  """Loads prompt vectors and their manifest, checking one against the other.

  Args:
    directory: folder holding the array file the manifest names (and, unless
      ``manifest`` is given, the manifest as ``manifest.json``).
    region_ids: the regions the caller expects, in the caller's order. The
      manifest must list exactly these ids (any order); rows are returned in
      this order. ``None`` accepts the manifest's own order.
    manifest: path of a manifest kept elsewhere (used for the published
      vectors, whose manifests ship with the package).
    task: if given, the manifest's task must equal it.
    template_sha256: if given, the manifest's template hash must equal it.

  Returns:
    ``(vectors, manifest)``: float32 array [regions, dimension] and the
    manifest as a dict.

  Raises:
    DataError: naming the file, the field and the problem, on any mismatch.
  """
  directory = pathlib.Path(directory)
  manifest_path = pathlib.Path(manifest) if manifest is not None else directory / MANIFEST_NAME
  info = read_manifest(manifest_path)
  if task is not None and info["task"] != task:
    raise DataError(manifest_path, f"task is {info['task']!r}, expected {task!r}", column="task")
  if template_sha256 is not None and info["template"]["sha256"] != template_sha256:
    raise DataError(
      manifest_path,
      f"template sha256 {info['template']['sha256']!r} (version "
      f"{info['template']['version']!r}) differs from the expected {template_sha256!r}: "
      "the vectors were made with another template text",
      column="template",
    )

  array_path = directory / info["array"]
  require_file(array_path, f"array file named by {manifest_path} does not exist")
  try:
    digest = file_sha256(array_path)
  except OSError as e:
    raise DataError(array_path, f"cannot be read ({e.strerror})") from None
  if digest != info["sha256"]:
    raise DataError(
      array_path,
      f"sha256 of the file is {digest}, the manifest {manifest_path} records "
      f"{info['sha256']}: the file was changed or belongs to another manifest",
      column="sha256",
    )
  array = read_npy(array_path, shown=array_path)
  if list(array.shape) != info["shape"]:
    raise DataError(
      array_path,
      f"array shape {list(array.shape)} differs from the manifest's {info['shape']}",
      column="shape",
    )
  stored = array.dtype.name
  if stored != info["dtype"]:
    raise DataError(
      array_path,
      f"array dtype {stored} differs from the manifest's {info['dtype']}",
      column="dtype",
    )
  vectors = np.asarray(array, dtype=np.float32)
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    rows = [info["region_ids"][i] for i in np.flatnonzero(bad)]
    raise DataError(
      array_path, f"{len(rows)} rows hold NaN or infinite values (regions {show_ids(rows)})"
    )
  # A model's pooled hidden state is never exactly zero; an all-zero row is
  # a placeholder written for a region whose inference failed.
  zero = ~vectors.any(axis=1)
  if zero.any():
    rows = [info["region_ids"][i] for i in np.flatnonzero(zero)]
    raise DataError(
      array_path,
      f"{len(rows)} rows are all zeros (regions {show_ids(rows)}): placeholders, not vectors",
    )

  if isinstance(region_ids, (str, bytes)):
    raise TypeError(f"region_ids must be a sequence of id strings, not one string {region_ids!r}")
  if region_ids is not None:
    wanted = [str(i) for i in region_ids]
    have = info["region_ids"]
    if wanted != have:
      missing = [i for i in wanted if i not in set(have)]
      extra = [i for i in have if i not in set(wanted)]
      if missing or extra or len(set(wanted)) != len(wanted):
        parts = []
        if missing:
          skipped = {str(s.get("id")) for s in info.get("skipped", []) if isinstance(s, Mapping)}
          left_out = [i for i in missing if i in skipped]
          note = ""
          if left_out:
            which = (
              "left out"
              if len(left_out) == len(missing)
              else (f"{len(left_out)} of them ({show_ids(left_out)}) left out")
            )
            note = f" ({which} at extraction: see the manifest's 'skipped')"
          parts.append(f"{len(missing)} expected regions absent: {show_ids(missing)}{note}")
        if extra:
          parts.append(f"{len(extra)} regions not expected: {show_ids(extra)}")
        if not parts:
          parts.append("the expected region ids contain duplicates")
        raise DataError(manifest_path, "; ".join(parts), column="region_ids")
      row = {rid: k for k, rid in enumerate(have)}
      vectors = vectors[[row[i] for i in wanted]]
  return vectors, info


def chicago_manifest_path(mllm: str, task: str) -> pathlib.Path:
  """Path of the shipped manifest for one published Chicago vector file."""
  if mllm not in CHICAGO_MLLMS:
    raise ValueError(f"mllm must be one of {CHICAGO_MLLMS}, got {mllm!r}")
  if task not in CHICAGO_TASKS:
    raise ValueError(f"task must be one of {CHICAGO_TASKS}, got {task!r}")
  if (mllm, task) not in _CHICAGO_FILES:
    raise ValueError(
      f"no published {mllm!r} vectors for task {task!r} (the no-task file exists only for llama)"
    )
  base = importlib.resources.files("jaxurban.data").joinpath(*_CHICAGO_MANIFESTS)
  return pathlib.Path(str(base.joinpath(f"prompt_embs_{mllm}_{task}.json")))


def load_chicago_prompts(data_root: str | os.PathLike | None, mllm: str, task: str) -> np.ndarray:
  """The published Prompt4RE vectors for Chicago's 77 regions.

  Args:
    data_root: the data root (``None``: ``$JAXURBAN_DATA``); the files are
      read from ``<root>/prompt4re/chicago/``.
    mllm: ``"llama"`` (LLaMA-3.2-11B-Vision, 4096 wide) or ``"qwen"``
      (Qwen2.5-VL-7B, 3584 wide).
    task: ``"crime"``, ``"checkIn"``, ``"serviceCall"`` or ``"none"`` (no
      task template; LLaMA only).

  Returns:
    float32 [77, D]; row i is region i of the HAFusion Chicago arrays.

  Raises:
    ValueError: unknown mllm/task pair.
    DataError: the folder or file is missing or does not match its shipped
      manifest (checksum, shape, dtype, region ids).
  """
  manifest_path = chicago_manifest_path(mllm, task)
  folder = subdir(resolve_data_root(data_root), "prompt4re", "chicago")
  # Region i is entry i of prompt_data.json and row i of the HAFusion arrays.
  expected = [str(i) for i in range(CHICAGO_REGIONS)]
  vectors, _ = load_prompt_vectors(folder, expected, manifest=manifest_path, task=task)
  return vectors
