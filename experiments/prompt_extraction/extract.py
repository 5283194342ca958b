"""Prompt vectors from a frozen (multimodal) LLM: the PyTorch side.

For each region the model sees one user message: the region's images
(satellite view first, then street views, as the region file lists them)
followed by the task template filled with the region's geo-text (section
2.2.3 of the ToPT paper). The message goes through the model's own chat
template and processor; the last-layer hidden states are pooled over the
non-padding tokens:

* ``mean`` (default, how the published Prompt4RE vectors were made): the
  average over all tokens of the message, image tokens included;
* ``last``: the hidden state of the last non-padding token.

Batches are right-padded: with causal attention and an attention mask, the
hidden states of the real tokens then do not depend on the padding, so a
region's vector does not depend on which batch it was in (up to float
rounding).

The model is frozen (``eval()``, no gradients, ``torch.inference_mode``);
nothing is sampled, so two runs with the same settings give the same vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
import transformers

from experiments.prompt_extraction import templates
from experiments.prompt_extraction.output import (
  WORK_NAME,
  ExtractionError,
  WorkFolder,
  write_output,
)
from experiments.prompt_extraction.regions import (
  Region,
  batches_by_image_count,
  check_images,
  images_sha256,
  load_regions,
)
from jaxurban.prompts import MANIFEST_NAME, POOLINGS, file_sha256, show_ids

__all__ = [
  "DTYPES",
  "MODEL_CLASSES",
  "ExtractConfig",
  "LoadedModel",
  "embed_batch",
  "extract_prompts",
  "load_model",
  "pool",
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUT_DTYPES = ("float32", "float16")
MODEL_CLASSES = ("auto", "base", "image-text-to-text", "causal-lm")
MISSING_IMAGES = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """Settings of one extraction run.

  Attributes:
    model: local folder of a Hugging Face model (config.json, weights,
      tokenizer and, for a vision-language model, its processor files).
    task: template name, one of ``templates.TASKS``.
    pooling: ``"mean"`` over non-padding tokens or ``"last"`` token.
    dtype: compute dtype of the model; ``None`` picks bfloat16 on a GPU and
      float32 on the CPU.
    out_dtype: dtype of the written array (pooling is done in float32).
    batch_size: regions per forward pass.
    device: torch device; ``None`` picks ``cuda`` when present, else CPU.
    max_images: use at most this many images per region (the first ones);
      ``None`` uses all.
    text_only: ignore images and feed only the text (required for a text
      model when the region file lists images; recorded in the manifest).
    missing_images: ``"fail"`` stops before any model time is spent when an
      image is missing or unreadable; ``"skip"`` leaves such regions out of
      the output and lists them in the manifest.
    model_class: how to load the model: ``"auto"`` tries the bare backbone
      (AutoModel), then AutoModelForImageTextToText, then
      AutoModelForCausalLM.
    add_generation_prompt: end the chat-formatted message with the
      assistant-turn header (as when asking the model to answer).
    model_name: name written to the manifest (default: derived from the
      folder).
    revision: revision written to the manifest (default: the snapshot
      commit when the folder is a Hugging Face cache snapshot).
    image_prefix_map: ``(old, new)`` pairs rewriting image path prefixes.
  """

  model: str
  task: str
  pooling: str = "mean"
  dtype: str | None = None
  out_dtype: str = "float32"
  batch_size: int = 4
  device: str | None = None
  max_images: int | None = None
  text_only: bool = False
  missing_images: str = "fail"
  model_class: str = "auto"
  add_generation_prompt: bool = True
  model_name: str | None = None
  revision: str | None = None
  image_prefix_map: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    def one_of(field, allowed):
      if getattr(self, field) not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(str, allowed))}")

    one_of("task", templates.TASKS)
    one_of("pooling", POOLINGS)
    one_of("out_dtype", OUT_DTYPES)
    one_of("model_class", MODEL_CLASSES)
    one_of("missing_images", MISSING_IMAGES)
    if self.dtype is not None:
      one_of("dtype", tuple(DTYPES))
    if self.batch_size < 1:
      raise ValueError("batch_size must be at least 1")
    if self.max_images is not None and self.max_images < 0:
      raise ValueError("max_images must be non-negative")


@dataclasses.dataclass
class LoadedModel:
  """A frozen model with what turns regions into its inputs."""

  model: torch.nn.Module
  processor: object | None  # None for a text model
  tokenizer: object
  device: torch.device
  dtype: torch.dtype
  has_last_hidden_state: bool
  model_class: str


def _device(config: ExtractConfig) -> torch.device:
  """The run's torch device; one torch cannot use is refused before any work."""
  if config.device is None:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  try:
    device = torch.device(config.device)
  except RuntimeError as error:
    raise ExtractionError(
      f"--device {config.device!r} is not a torch device ({error}); give cpu, cuda or cuda:N"
    ) from None
  if device.type == "cuda":
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
      raise ExtractionError(
        f"--device {config.device}: this torch sees no CUDA device; give --device cpu, or "
        "leave --device out to use a GPU when there is one"
      )
    if device.index is not None and device.index >= count:
      raise ExtractionError(
        f"--device {config.device}: this torch sees {count} CUDA device(s), cuda:0 to "
        f"cuda:{count - 1}"
      )
  elif device.type == "mps" and not torch.backends.mps.is_available():
    raise ExtractionError(f"--device {config.device}: this torch has no MPS device")
  return device


def _dtype(config: ExtractConfig, device: torch.device) -> torch.dtype:
  if config.dtype is not None:
    return DTYPES[config.dtype]
  return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(config: ExtractConfig, need_images: bool) -> LoadedModel:
  """Loads the model (frozen, eval mode) and its processor or tokenizer.

  Raises:
    ExtractionError: the folder is not a model folder, the model cannot be
      loaded, or it cannot take images when ``need_images``.
  """
  path = pathlib.Path(config.model)
  if not (path / "config.json").is_file():
    raise ExtractionError(
      f"{path}: not a local model folder (no config.json); --model takes a folder "
      "holding a saved Hugging Face model"
    )
  device = _device(config)
  dtype = _dtype(config, device)
  # The processor first: a text model given images is refused before its
  # weights are loaded, with the message that says what to do.
  processor, processor_error = None, None
  try:
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - reported below when images are needed
    processor_error = e
  tokenizer = getattr(processor, "tokenizer", None)
  if getattr(processor, "image_processor", None) is None:
    # A text model: AutoProcessor hands back the tokenizer itself (or fails).
    if tokenizer is None and processor is not None and callable(processor):
      tokenizer = processor
    processor = None
  if tokenizer is None:
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
      raise ExtractionError(f"{path}: no tokenizer could be loaded ({e})") from e
  if need_images and processor is None:
    why = f" (AutoProcessor failed: {processor_error})" if processor_error else ""
    raise ExtractionError(
      f"{path}: this model has no image processor{why}, but the regions list images; pass "
      "--text-only to feed the geo-text alone (recorded in the manifest)"
    )
  kwargs = {"dtype": dtype, "local_files_only": True}
  classes = {
    "base": [("base", transformers.AutoModel)],
    "image-text-to-text": [("image-text-to-text", transformers.AutoModelForImageTextToText)],
    "causal-lm": [("causal-lm", transformers.AutoModelForCausalLM)],
  }
  tries = (
    classes["base"] + classes["image-text-to-text"] + classes["causal-lm"]
    if config.model_class == "auto"
    else classes[config.model_class]
  )
  errors, model, used = [], None, None
  for name, cls in tries:
    verbosity = transformers.logging.get_verbosity()
    if name == "base":
      # The backbone is loaded without the LM head on purpose; transformers
      # would report the head's weights as unexpected keys.
      transformers.logging.set_verbosity_error()
    try:
      candidate, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (ValueError, KeyError, OSError) as e:
      errors.append(f"{cls.__name__}: {e}")
      continue
    finally:
      transformers.logging.set_verbosity(verbosity)
    # Weights the class has and the checkpoint lacks would be left at their
    # random initialisation (with the warning silenced above): the vectors
    # would come from a partly random network. Unexpected keys (the LM head
    # a backbone does not use) are fine.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
      errors.append(
        f"{cls.__name__}: {len(missing)} of its weights are not in the checkpoint "
        f"(e.g. {missing[:3]}) and would stay random"
      )
      continue
    if need_images and "pixel_values" not in inspect.signature(candidate.forward).parameters:
      # A text-only class of a vision-language checkpoint (the language
      # model of Mllama under causal-lm) loads, leaves the vision tower among
      # the unexpected keys and takes the pixels in **kwargs without using
      # them: the vectors would not see the images the manifest lists.
      errors.append(
        f"{cls.__name__}: takes no pixel_values, so the regions' images would be dropped "
        "(--text-only feeds the geo-text alone and says so in the manifest)"
      )
      continue
    model, used = candidate, name
    break
  if model is None:
    raise ExtractionError(f"{path}: the model could not be loaded ({'; '.join(errors)})")
  model.requires_grad_(False)
  model.eval()
  model.to(device)
  # Right padding keeps the real tokens' positions and hidden states
  # independent of the batch (see the module docstring).
  tokenizer.padding_side = "right"
  if tokenizer.pad_token is None:
    if tokenizer.eos_token is None:
      raise ExtractionError(f"{path}: the tokenizer has neither a pad nor an eos token")
    # Padding positions are masked out of both attention and pooling, so
    # which token fills them does not matter.
    tokenizer.pad_token = tokenizer.eos_token
  has_last = used != "causal-lm" and used != "image-text-to-text"
  return LoadedModel(model, processor, tokenizer, device, dtype, has_last, used)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
  """Pools hidden states [B, L, D] over the tokens where ``mask`` [B, L] is 1.

  Returns float32 [B, D]: the masked mean, or the state at the last position
  whose mask is 1 (right or left padding alike).
  """
  h = hidden.float()
  m = mask.to(h.device)
  if pooling == "mean":
    w = m.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
  if pooling == "last":
    length = m.shape[1]
    last = length - 1 - torch.flip(m.long(), dims=[1]).argmax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]
  raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def _prompt_text(loaded: LoadedModel, config: ExtractConfig, region: Region, n_images: int):
  """The model's input string for one region, and whether a chat template made it."""
  text = templates.render(config.task, region.text)
  owner = loaded.processor if loaded.processor is not None else loaded.tokenizer
  if getattr(owner, "chat_template", None) is None:
    if n_images:
      raise ExtractionError(
        f"{config.model}: the processor has no chat template, so the images cannot be "
        "placed in the prompt"
      )
    return text, False
  if loaded.processor is not None:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
  else:
    content = text
  messages = [{"role": "user", "content": content}]
  rendered = owner.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=config.add_generation_prompt
  )
  return rendered, True


def _open_images(paths: Sequence[str]):
  from PIL import Image

  images = []
  for p in paths:
    with Image.open(p) as im:
      images.append(im.convert("RGB"))
  return images


def embed_batch(loaded: LoadedModel, config: ExtractConfig, batch: Sequence[Region]) -> np.ndarray:
  """Pooled last-layer hidden states, float32 [len(batch), D]."""
  use_images = loaded.processor is not None and not config.text_only
  paths = [list(r.images[: config.max_images]) if use_images else [] for r in batch]
  prompts = [_prompt_text(loaded, config, r, len(p)) for r, p in zip(batch, paths)]
  texts = [t for t, _ in prompts]
  # A chat template already writes the special tokens (BOS and the like);
  # adding them again would change the sequence.
  special = not any(chat for _, chat in prompts)
  # padding_side is passed with every call: some processors carry their own
  # default (left) that overrides the tokenizer's attribute.
  common = {
    "padding": True,
    "padding_side": "right",
    "return_tensors": "pt",
    "add_special_tokens": special,
  }
  if any(paths):
    inputs = loaded.processor(text=texts, images=[_open_images(p) for p in paths], **common)
  elif loaded.processor is not None:
    inputs = loaded.processor(text=texts, **common)
  else:
    inputs = loaded.tokenizer(texts, **common)
  feed = {}
  for key, value in inputs.items():
    if isinstance(value, torch.Tensor):
      value = value.to(loaded.device)
      if value.is_floating_point():
        value = value.to(loaded.dtype)
    feed[key] = value
  mask = feed["attention_mask"]
  if bool((mask[:, 1:] > mask[:, :-1]).any()):
    # A real token after a padded one: the batch was not right-padded, and
    # the manifest would record a padding side that was not used.
    raise ExtractionError(
      f"{config.model}: the processor padded the batch on the left although right padding "
      "was asked for; rerun with --batch-size 1"
    )
  with torch.inference_mode():
    if loaded.has_last_hidden_state:
      out = loaded.model(**feed, use_cache=False, return_dict=True)
      hidden = out.last_hidden_state
    else:
      out = loaded.model(**feed, use_cache=False, output_hidden_states=True, return_dict=True)
      hidden = out.hidden_states[-1]
    pooled = pool(hidden, feed["attention_mask"], config.pooling)
  return pooled.cpu().numpy().astype(np.float32)


def _regions(ids) -> str:
  ids = [str(i) for i in ids]
  return f"{len(ids)} regions ({show_ids(ids)})"


def _check_finite(vectors: np.ndarray, batch: Sequence[Region], model: str, dtype: str) -> None:
  """Refuses a batch with NaN or infinite pooled states before it is saved."""
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    hint = "" if dtype == "float32" else f" in {dtype}; try --dtype float32"
    raise ExtractionError(
      f"{model}: the model produced NaN or infinite hidden states for "
      f"{_regions(r.id for r, b in zip(batch, bad) if b)}{hint}"
    )


def _model_identity(config: ExtractConfig) -> dict:
  """The model's record in the resume settings and the manifest; its folder
  is read once per run (`model_files_sha256`)."""
  path = pathlib.Path(config.model).resolve()
  revision = config.revision
  name = config.model_name
  parts = path.parts
  # A Hugging Face cache snapshot: .../models--org--name/snapshots/<commit>
  if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
    revision = revision or parts[-1]
    name = name or parts[-3][len("models--") :].replace("--", "/")
  cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
  return {
    "name": name or path.name,
    "path": str(path),
    "revision": revision,
    "model_type": cfg.get("model_type"),
    "architectures": cfg.get("architectures"),
    "config_sha256": file_sha256(path / "config.json"),
    "files_sha256": model_files_sha256(path),
  }


# A Hugging Face cache names each large file's blob by its SHA-256.
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


def model_files_sha256(path: pathlib.Path) -> str:
  """One SHA-256 over every file of the model folder: names and contents.

  ``config.json`` alone does not tell two fine-tunes of one architecture
  apart, nor a changed image processor: a run resumed on another model
  would mix two models' vectors. Weights in a Hugging Face cache snapshot
  are links to blobs named by their own SHA-256, which is taken as it
  stands; every other file is read (once per run: seconds for a
  10-billion-parameter model, against the minutes its forward passes take).
  """
  digest = hashlib.sha256()
  for file in sorted(p for p in path.rglob("*") if p.is_file()):
    relative = file.relative_to(path).as_posix()
    if relative.startswith(".") or "/." in relative:
      continue  # .cache/ and lock files that downloads leave behind
    target = file.resolve()
    content = target.name if _BLOB_NAME.fullmatch(target.name) else file_sha256(target)
    digest.update(f"{relative}\0{content}\0".encode())
  return digest.hexdigest()


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _PlainProgress(total, initial)
  return tqdm(total=total, initial=initial, unit="region", desc="prompt vectors")


class _PlainProgress:
  def __init__(self, total: int, initial: int):
    self.total, self.n = total, initial

  def update(self, k: int):
    self.n += k
    print(f"prompt vectors: {self.n}/{self.total} regions", file=sys.stderr, flush=True)

  def close(self):
    pass


def extract_prompts(
  config: ExtractConfig,
  regions_file: str | os.PathLike,
  out: str | os.PathLike,
  *,
  restart: bool = False,
  overwrite: bool = False,
  progress: bool = True,
  after_batch: Callable[[int], None] | None = None,
) -> dict:
  """Runs (or resumes) one extraction and writes ``vectors.npy`` + ``manifest.json``.

  Args:
    config: the run's settings.
    regions_file: the region file (either layout of ``regions.load_regions``).
    out: output folder (created if absent).
    restart: discard an unfinished run's work folder instead of resuming it.
    overwrite: replace a finished output in ``out``.
    progress: show a progress bar.
    after_batch: called with the number of batches finished in this call
      after each batch's vectors are safely on disk (used to test resuming).

  Returns:
    The manifest written.

  Raises:
    ExtractionError, DataError: with the file and the problem.
  """
  out = pathlib.Path(out)
  if not progress:
    transformers.utils.logging.disable_progress_bar()
  _device(config)  # an unusable --device stops the run before any work
  if out.exists() and not out.is_dir():
    raise ExtractionError(f"--out {out} is a file; --out takes a folder")
  if (out / MANIFEST_NAME).exists() and not overwrite:
    raise ExtractionError(
      f"{out} already holds finished prompt vectors ({MANIFEST_NAME}); pass --overwrite to "
      "replace them or choose another --out"
    )
  regions = load_regions(regions_file, config.image_prefix_map)
  use_images = not config.text_only and any(r.images[: config.max_images] for r in regions)

  skipped = []
  if use_images:
    problems = check_images(regions, config.max_images)
    if problems:
      lines = [f"  region {p.id!r}: {'; '.join(p.problems[:3])}" for p in problems[:10]]
      more = f"\n  ... and {len(problems) - 10} more regions" if len(problems) > 10 else ""
      summary = f"{len(problems)} of {len(regions)} regions have missing or unreadable images"
      if config.missing_images == "fail":
        raise ExtractionError(
          f"{regions_file}: {summary}:\n" + "\n".join(lines) + more + "\npass --missing-images "
          "skip to leave these regions out (they are listed in the manifest), or fix the paths "
          "(--image-prefix OLD=NEW rewrites path prefixes)"
        )
      print(f"warning: {summary}; leaving them out:\n" + "\n".join(lines) + more, file=sys.stderr)
      bad = {p.id for p in problems}
      skipped = [{"id": p.id, "problems": list(p.problems)} for p in problems]
      regions = [r for r in regions if r.id not in bad]
      if not regions:
        raise ExtractionError(f"{regions_file}: every region was left out for missing images")

  model_path = pathlib.Path(config.model)
  if not (model_path / "config.json").is_file():
    raise ExtractionError(
      f"{model_path}: not a local model folder (no config.json); --model takes a folder "
      "holding a saved Hugging Face model"
    )
  template = {
    "version": templates.TEMPLATE_VERSION,
    "sha256": templates.template_sha256(config.task),
    "text": templates.TEMPLATES[config.task],
  }
  inputs = {
    "regions_file": str(pathlib.Path(regions_file).resolve()),
    "regions_sha256": file_sha256(regions_file),
    "images_used": use_images,
    # The pixels, not only the paths: images replaced between an interrupted
    # run and its resume would otherwise mix vectors of old and new images.
    "images_sha256": images_sha256(regions, config.max_images) if use_images else None,
    "max_images": config.max_images,
    "image_prefix_map": [list(p) for p in config.image_prefix_map],
    "add_generation_prompt": config.add_generation_prompt,
    "padding_side": "right",
  }
  device = _device(config)
  compute_dtype = str(_dtype(config, device)).removeprefix("torch.")
  settings = {
    # Its files' hash covers the tokenizer and chat template too, which shape
    # the token sequence as much as the task template does.
    "model": _model_identity(config),
    "task": config.task,
    "template": template,
    "pooling": config.pooling,
    "dtype": compute_dtype,
    "model_class": config.model_class,
    "missing_images": config.missing_images,
    "inputs": inputs,
  }
  if not model_path.is_dir():
    raise ExtractionError(f"{model_path}: model folder does not exist")
  # Made only now, when the inputs have passed their checks: a run refused
  # for its regions, images or model folder leaves no empty --out behind.
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ExtractionError(f"--out {out}: cannot make the folder ({error.strerror})") from None
  if restart:
    shutil.rmtree(out / WORK_NAME, ignore_errors=True)
  work = WorkFolder(out, settings)
  done = work.done()
  todo = [r for r in regions if r.id not in done]
  batches = batches_by_image_count(
    todo, config.batch_size, lambda r: len(r.images[: config.max_images]) if use_images else 0
  )

  loaded = None
  if todo:
    loaded = load_model(config, need_images=use_images)
    if done:
      print(
        f"resuming: {len(done)} of {len(regions)} regions already done in {work.path}",
        file=sys.stderr,
      )
    bar = _progress(len(regions), len(regions) - len(todo), progress)
    try:
      for k, batch in enumerate(batches):
        vectors = embed_batch(loaded, config, batch)
        _check_finite(vectors, batch, config.model, compute_dtype)
        work.save_batch([r.id for r in batch], vectors)
        done.update(zip((r.id for r in batch), vectors))
        if bar is not None:
          bar.update(len(batch))
        if after_batch is not None:
          after_batch(k + 1)
    finally:
      if bar is not None:
        bar.close()

  widths = {v.shape[-1] for v in done.values()}
  if len(widths) != 1:
    raise ExtractionError(f"{work.path}: finished batches disagree in width {sorted(widths)}")
  ids = [r.id for r in regions]
  array = np.stack([done[i] for i in ids])
  if config.out_dtype == "float16":
    # The batches are kept in float32; only the written array is cast.
    too_large = np.abs(array).max(axis=1) > np.finfo(np.float16).max
    if too_large.any():
      raise ExtractionError(
        f"{config.model}: {_regions(np.asarray(ids)[too_large])} have values beyond float16's "
        f"range ({np.abs(array).max():.4g} > {np.finfo(np.float16).max:.0f}); rerun with "
        "--out-dtype float32 (the finished batches are kept and reused)"
      )
  array = array.astype(config.out_dtype)
  identity = dict(settings["model"])  # the folder was hashed once, for the settings
  if loaded is not None:
    identity["loaded_as"] = type(loaded.model).__name__
  # An overwrite removes the old manifest only now, when the new array is
  # ready: a run that fails or is stopped earlier leaves the old output
  # whole, and one stopped inside write_output leaves an array without a
  # manifest, which the loader refuses, never an old manifest beside a new array.
  (out / MANIFEST_NAME).unlink(missing_ok=True)
  manifest = write_output(
    out,
    array,
    region_ids=ids,
    task=config.task,
    template=template,
    pooling=config.pooling,
    model={**identity, "dtype": compute_dtype},
    skipped=skipped,
    inputs=inputs,
    software={"torch": torch.__version__, "transformers": transformers.__version__},
  )
  work.remove()
  return manifest


def parse_prefix(value: str) -> tuple[str, str]:
  """``OLD=NEW`` -> ``(OLD, NEW)`` for ``--image-prefix``."""
  match = re.fullmatch(r"([^=]+)=(.*)", value)
  if not match:
    raise ValueError(f"--image-prefix takes OLD=NEW, got {value!r}")
  return match.group(1), match.group(2)
