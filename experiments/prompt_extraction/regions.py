"""Region files: what the extraction step feeds the model for each region.

Two layouts are read, both a JSON list with one entry per region:

* the project's own::

    [{"id": "17", "text": "<geo-text>", "images": ["sat/17.png", ...],
      "centroid": [41.88, -87.63]}, ...]

  ``centroid`` is optional; ``images`` may be empty.

* the chat-message layout of Prompt4RE's ``prompt_data.json``::

    [{"role": "user", "content": [{"type": "image", "image": "<path>"}, ...,
                                  {"type": "text", "text": "<geo-text>"}]}, ...]

  Region ids are then the entry indices as strings ("0", "1", ...), and the
  centroid is read from the text's "Centroid Coordinates: (lat, lon)" line
  when present.

Relative image paths are resolved against the region file's folder;
``prefix_map`` rewrites absolute path prefixes (the published file names
folders on the authors' machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Sequence

from jaxurban.data.errors import DataError, require_file
from jaxurban.digest import file_sha256

__all__ = [
  "ImageProblem",
  "Region",
  "batches_by_image_count",
  "check_images",
  "images_sha256",
  "load_regions",
]

_CENTROID = re.compile(r"Centroid Coordinates:\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)")


@dataclasses.dataclass(frozen=True)
class Region:
  """One region's inputs.

  Attributes:
    id: region id (string; unique within the file).
    text: geo-text placed into the task template.
    images: image paths, resolved, in the order given.
    centroid: (lat, lon) or None.
  """

  id: str
  text: str
  images: tuple[str, ...]
  centroid: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class ImageProblem:
  """A region whose images cannot all be read."""

  id: str
  problems: tuple[str, ...]  # "<path>: missing" / "<path>: unreadable (...)"


def load_regions(
  path: str | os.PathLike, prefix_map: Sequence[tuple[str, str]] = ()
) -> list[Region]:
  """Reads a region file in either layout.

  Args:
    path: the JSON file.
    prefix_map: ``(old, new)`` pairs; an image path starting with ``old`` has
      that prefix replaced by ``new`` (first match wins).

  Raises:
    DataError: naming the file, the entry and the problem.
  """
  path = pathlib.Path(path)
  require_file(path, "region file does not exist")
  try:
    records = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not JSON
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(path, f"region file is not readable JSON ({e})") from e
  name = path.name
  if not isinstance(records, list) or not records:
    raise DataError(name, "region file must be a non-empty JSON list, one entry per region")
  base = path.parent
  chat = isinstance(records[0], dict) and "content" in records[0]
  regions = []
  for index, record in enumerate(records):
    where = f"entry {index}"
    if not isinstance(record, dict):
      raise DataError(name, f"{where}: must be an object, found {type(record).__name__}")
    if chat:
      region = _chat_region(name, where, index, record)
    else:
      region = _plain_region(name, where, record)
    images = tuple(_resolve(p, base, prefix_map) for p in region.images)
    regions.append(dataclasses.replace(region, images=images))
  seen: dict[str, int] = {}
  for index, region in enumerate(regions):
    if region.id in seen:
      raise DataError(
        name, f"entry {index}: region id {region.id!r} repeats entry {seen[region.id]}", "id"
      )
    seen[region.id] = index
  return regions


def _plain_region(name: str, where: str, record: dict) -> Region:
  unknown = set(record) - {"id", "text", "images", "centroid"}
  if unknown:
    raise DataError(name, f"{where}: unknown fields {sorted(unknown)}")
  rid = record.get("id")
  if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
    raise DataError(name, f"{where}: needs a non-empty string id, found {rid!r}", "id")
  if not str(rid).isprintable():
    # NumPy's string arrays, in which finished batches keep their ids, drop
    # trailing NUL characters: "a\0" would come back as "a", and a resumed
    # run would hand region "a" the other's vector.
    raise DataError(name, f"{where}: id {rid!r} holds a control character", "id")
  text = record.get("text")
  if not isinstance(text, str) or not text.strip():
    raise DataError(name, f"{where}: needs a non-empty text", "text")
  images = record.get("images", [])
  if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
    raise DataError(name, f"{where}: images must be a list of paths", "images")
  centroid = record.get("centroid")
  if centroid is not None:
    ok = (
      isinstance(centroid, list)
      and len(centroid) == 2
      and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in centroid)
      and all(math.isfinite(c) for c in centroid)
    )
    if not ok:
      raise DataError(name, f"{where}: centroid must be [lat, lon], found {centroid!r}", "centroid")
    centroid = (float(centroid[0]), float(centroid[1]))
  return Region(str(rid), text, tuple(images), centroid)


def _chat_region(name: str, where: str, index: int, record: dict) -> Region:
  content = record.get("content")
  if not isinstance(content, list):
    raise DataError(name, f"{where}: 'content' must be a list of items", "content")
  texts, images = [], []
  for k, item in enumerate(content):
    kind = item.get("type") if isinstance(item, dict) else None
    if kind == "text" and isinstance(item.get("text"), str):
      texts.append(item["text"])
    elif kind == "image" and isinstance(item.get("image"), str) and item["image"]:
      images.append(item["image"])
    else:
      raise DataError(
        name, f"{where}: content item {k} is neither a text nor an image item: {item!r:.80}"
      )
  text = "\n".join(t.strip() for t in texts if t.strip())
  if not text:
    raise DataError(name, f"{where}: has no text item", "content")
  match = _CENTROID.search(text)
  centroid = (float(match.group(1)), float(match.group(2))) if match else None
  return Region(str(index), text, tuple(images), centroid)


def _resolve(image: str, base: pathlib.Path, prefix_map: Sequence[tuple[str, str]]) -> str:
  for old, new in prefix_map:
    if image.startswith(old):
      image = new + image[len(old) :]
      break
  path = pathlib.Path(image).expanduser()
  return str(path if path.is_absolute() else base / path)


def batches_by_image_count(
  regions: Sequence[Region], batch_size: int, images_used: Callable[[Region], int]
) -> list[list[Region]]:
  """Batches of at most `batch_size` regions that all feed the model the same
  number of images.

  Processors differ in how (or whether) they take a mix: transformers'
  Mllama processor (LLaMA-3.2-Vision) has refused a batch in which some
  prompts have images and others none, and with a batch of one-image and
  two-image prompts the one-image prompts' vectors moved by up to 15 %
  (relative) against the same prompts alone (the padded image slot reaches
  their cross-attention). With equal counts the vectors do not depend on the
  batch. Groups come in order of image count (none first); the order within
  each group is kept.
  """
  groups: dict[int, list[Region]] = {}
  for region in regions:
    groups.setdefault(images_used(region), []).append(region)
  return [
    group[i : i + batch_size]
    for _, group in sorted(groups.items())
    for i in range(0, len(group), batch_size)
  ]


def check_images(regions: Sequence[Region], max_images: int | None = None) -> list[ImageProblem]:
  """Finds regions whose images are missing or cannot be decoded.

  Every image the run would use (the first ``max_images`` of each region) is
  opened and verified up front, so that a bad file is reported before any
  model time is spent rather than in the middle of a batch.
  """
  from PIL import Image, UnidentifiedImageError

  problems = []
  for region in regions:
    found = []
    for image in region.images[:max_images]:
      if not os.path.isfile(image):
        found.append(f"{image}: missing")
        continue
      try:
        with Image.open(image) as im:
          im.verify()
        # verify() checks the header and chunk structure without decoding
        # pixels: a truncated JPEG passes it. Decoding the whole image does not.
        with Image.open(image) as im:
          im.load()
      except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        found.append(f"{image}: unreadable ({e})")
    if found:
      problems.append(ImageProblem(region.id, tuple(found)))
  return problems


def images_sha256(regions: Sequence[Region], max_images: int | None = None) -> str:
  """One sha256 over the bytes of every image the run uses, region by region
  in order, so that the record changes when any picture does."""
  digest = hashlib.sha256()
  for region in regions:
    digest.update(b"region\0" + region.id.encode() + b"\0")
    for image in region.images[:max_images]:
      digest.update(bytes.fromhex(file_sha256(image)))
  return digest.hexdigest()
