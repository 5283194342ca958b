"""Command line of the prompt-vector stage.

  python -m experiments.extract_prompts --regions regions.json \\
      --model /models/Qwen2.5-VL-7B-Instruct --task crime --out prompts/crime

Writes ``prompts/crime/vectors.npy`` and ``prompts/crime/manifest.json``,
which ``jaxurban.prompts.load_prompt_vectors("prompts/crime", ids)`` reads.
An interrupted run is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import sys

from experiments.prompt_extraction import templates
from jaxurban.atomic import path_argument

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.extract_prompts",
    description="Prompt vectors per region from a frozen (multimodal) LLM, for the JAX side.",
  )
  p.add_argument("--regions", required=True, help="region JSON file (own or chat-message layout)")
  p.add_argument("--model", required=True, help="local folder of a Hugging Face model")
  p.add_argument("--task", required=True, choices=templates.TASKS, help="task template")
  p.add_argument(
    "--out", required=True, type=path_argument, help="output folder (vectors.npy, manifest.json)"
  )
  p.add_argument(
    "--pooling",
    choices=("mean", "last"),
    default="mean",
    help="last-layer states pooled as the mean over tokens (default) or the last token's",
  )
  p.add_argument(
    "--dtype",
    choices=("float16", "bfloat16", "float32"),
    default=None,
    help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)",
  )
  p.add_argument(
    "--out-dtype", choices=("float32", "float16"), default="float32", help="dtype written"
  )
  p.add_argument("--batch-size", type=int, default=4, help="regions per forward pass")
  p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
  p.add_argument("--max-images", type=int, default=None, help="first N images per region")
  p.add_argument("--text-only", action="store_true", help="ignore images, feed the text alone")
  p.add_argument(
    "--missing-images",
    choices=("fail", "skip"),
    default="fail",
    help="on a missing/unreadable image: stop (default) or leave the region out",
  )
  p.add_argument(
    "--image-prefix",
    action="append",
    default=[],
    metavar="OLD=NEW",
    help="rewrite image paths starting with OLD (repeatable)",
  )
  p.add_argument(
    "--model-class",
    choices=("auto", "base", "image-text-to-text", "causal-lm"),
    default="auto",
    help="transformers class to load (auto: the bare backbone, then image-text-to-text, then "
    "causal-lm)",
  )
  p.add_argument(
    "--no-generation-prompt",
    action="store_true",
    help="do not end the chat-formatted prompt with the assistant-turn header",
  )
  p.add_argument("--model-name", default=None, help="model name for the manifest")
  p.add_argument("--revision", default=None, help="model revision for the manifest")
  p.add_argument("--restart", action="store_true", help="discard an unfinished run")
  p.add_argument("--overwrite", action="store_true", help="replace finished output in --out")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def missing_stack_message(error: ImportError) -> str:
  """What to do when torch or transformers does not import.

  transformers 5.25 and later import Hugging Face's ``kernels`` package, whose
  name is that of this project's ``kernels/`` folder; when ours comes first on
  sys.path the import fails inside transformers, and "install the extra" would
  be the wrong advice.
  """
  if error.name == "kernels" or "from 'kernels'" in str(error):
    return (
      f"transformers failed to import ({error}): releases from 5.25 on import Hugging Face's "
      "'kernels' package, which this project's top-level kernels/ folder hides; install the "
      "release the extra names with: pip install -e '.[extract]' (transformers<5.25)"
    )
  return (
    f"the extraction step needs torch and transformers ({error}); install the extra "
    "with: pip install -e '.[extract]'"
  )


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    print(f"error: {missing_stack_message(e)}", file=sys.stderr)
    return EXIT_ERROR
  from experiments.prompt_extraction.extract import ExtractConfig, extract_prompts, parse_prefix
  from experiments.common import with_flag_names
  from experiments.prompt_extraction.output import ExtractionError
  from jaxurban.data.errors import DataError

  try:
    config = ExtractConfig(
      model=args.model,
      task=args.task,
      pooling=args.pooling,
      dtype=args.dtype,
      out_dtype=args.out_dtype,
      batch_size=args.batch_size,
      device=args.device,
      max_images=args.max_images,
      text_only=args.text_only,
      missing_images=args.missing_images,
      model_class=args.model_class,
      add_generation_prompt=not args.no_generation_prompt,
      model_name=args.model_name,
      revision=args.revision,
      image_prefix_map=tuple(parse_prefix(v) for v in args.image_prefix),
    )
  except ValueError as e:
    fields = {name: None for name in vars(args)} | {"image_prefix_map": None}
    message = with_flag_names(str(e), parser, fields, {"image_prefix_map": "--image-prefix"})
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR
  try:
    manifest = extract_prompts(
      config,
      args.regions,
      args.out,
      restart=args.restart,
      overwrite=args.overwrite,
      progress=not args.no_progress,
    )
  except (ExtractionError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  except KeyboardInterrupt:
    print(
      f"\ninterrupted; finished batches are kept in {args.out}/.work; run the same command "
      "again to resume",
      file=sys.stderr,
    )
    return EXIT_INTERRUPTED
  shape = "x".join(map(str, manifest["shape"]))
  skipped = f", {len(manifest['skipped'])} regions left out" if manifest["skipped"] else ""
  print(f"wrote {args.out}: {shape} {manifest['dtype']} ({manifest['task']}{skipped})")
  return 0
