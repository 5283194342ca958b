"""ToPT single-city experiment: SREL embeddings, then Prompt4RE per task.

  python -m experiments.topt --city Chi --task all --seeds 5
  python -m experiments.topt --city Chi --task crime --protocol paper
  python -m experiments.topt --city Chi --task all --no-alignment        # ablation
  python -m experiments.topt --city Chi --task all --embeddings emb.npy  # reuse SREL
  python -m experiments.topt --city NY --task all   # SREL only, no spatial prior

Evaluation: 10-fold cross-validation over regions, MAE / RMSE / R2 of pooled
out-of-fold predictions with negatives clipped to 0. The default protocol is
honest (fixed epoch budget, final epoch scored); ``--protocol validated``
picks each fold's epoch on an inner validation fold (the next fold, left out
of that model's training); ``--protocol paper`` picks
each fold's best epoch on its test fold, as the authors' code does, and every
number it produces is labelled optimistic. Writes embeddings.npy,
predictions, metrics.json and per-task error maps into --out.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from experiments.common import (
  absolute_path,
  build_config,
  checked_output_folder,
  default_output_folder,
  exit_status,
  no_empty_folder_left,
)
from jaxurban.atomic import path_argument
from jaxurban.checkpoint import CheckpointMismatch
from jaxurban.data.errors import DataError
from jaxurban.eval.kfold import PROTOCOLS
from jaxurban.topt.pipeline import TASKS, ToptConfig, train_and_evaluate

# Recorded in each output folder (experiments.common.COMMAND_FILE).
COMMAND = "experiments.topt"


def parse_config(argv: list[str] | None = None) -> tuple[ToptConfig, pathlib.Path]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.topt",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--city", choices=("Chi", "NY"), default="Chi", help="Chicago or New York (hafusion data)"
  )
  parser.add_argument(
    "--task", choices=TASKS + ("all",), default="all", help="downstream task, or all of them"
  )
  parser.add_argument(
    "--mllm", choices=("llama", "qwen"), default="llama", help="which published prompt vectors"
  )
  parser.add_argument(
    "--prompts",
    default=None,
    type=absolute_path,
    metavar="DIR",
    help="prompt vectors from experiments.extract_prompts instead of the published ones: "
    "one task's --out folder, or DIR/<task>/ per task (region ids 0..76)",
  )
  parser.add_argument("--seeds", type=int, default=5, help="seeds 0..K-1, vmapped")
  parser.add_argument(
    "--epochs-srel",
    type=int,
    default=None,
    help="SREL epochs (default: Chi 4000, the paper's; NY 2000, HAFusion's)",
  )
  parser.add_argument(
    "--srel-lr",
    type=float,
    default=None,
    help="SREL learning rate (default: Chi 7e-4, the paper's; NY 5e-4, HAFusion's)",
  )
  parser.add_argument(
    "--epochs-prompt",
    type=int,
    default=3000,
    help=f"Prompt4RE epochs, a multiple of {ToptConfig.eval_every} (the evaluation interval)",
  )
  parser.add_argument(
    "--prompt-lr", type=float, default=None, help="Prompt4RE learning rate (default: paper's)"
  )
  parser.add_argument(
    "--folds", type=int, default=10, help="k of the k-fold split (>= 2; >= 3 when validated)"
  )
  parser.add_argument(
    "--fold-seed", type=int, default=2024, help="seed of the k-fold split over regions"
  )
  parser.add_argument(
    "--protocol",
    choices=PROTOCOLS,
    default="honest",
    help="epoch scored: honest (the last, default), validated (chosen on an inner fold) or "
    "paper (chosen on the test fold, as the authors' code; labelled optimistic)",
  )
  parser.add_argument("--no-prompt4re", action="store_true", help="ablation: ridge on E only")
  parser.add_argument(
    "--no-task-prompt", action="store_true", help="ablation: prompts without task template"
  )
  parser.add_argument(
    "--no-alignment", action="store_true", help="ablation: concatenation, no cross-attention"
  )
  parser.add_argument("--no-spatial-bias", action="store_true", help="SREL without B_ij")
  parser.add_argument("--no-centrality", action="store_true", help="SREL without centrality")
  parser.add_argument(
    "--context",
    choices=("split", "all"),
    default="split",
    help="prompts attended to: the same split's (authors) or all regions'",
  )
  parser.add_argument(
    "--value-basis",
    choices=("rowspace", "full"),
    default="rowspace",
    help="layers reading the prompt vectors train on their training rows' row-space "
    "coordinates, or on the full vectors (the authors' parametrisation; slower)",
  )
  parser.add_argument(
    "--embeddings",
    default=None,
    type=absolute_path,
    help="SREL embeddings [S, N, d] .npy to use instead of training (no SREL flags with it)",
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  parser.add_argument(
    "--out",
    type=path_argument,
    default=None,
    help="output folder (default: runs/topt/<city>, then each result-changing flag not at "
    "its default, e.g. runs/topt/Chi-taskcrime-protocolpaper)",
  )
  args = parser.parse_args(argv)
  config = build_config(
    parser,
    ToptConfig,
    {
      "n_folds": "--folds",
      "srel_epochs": "--epochs-srel",
      "srel_learning_rate": "--srel-lr",
      "embeddings_path": "--embeddings",
      "prompts_dir": "--prompts",
      "prompt_epochs": "--epochs-prompt",
      "prompt_learning_rate": "--prompt-lr",
      "prompt4re": "--no-prompt4re",
      "task_prompt": "--no-task-prompt",
      "alignment": "--no-alignment",
      "spatial_bias": "--no-spatial-bias",
      "centrality": "--no-centrality",
      "tasks": "--task",
    },
    city=args.city,
    tasks=TASKS if args.task == "all" else (args.task,),
    mllm=args.mllm,
    seeds=tuple(range(args.seeds)),
    protocol=args.protocol,
    n_folds=args.folds,
    fold_seed=args.fold_seed,
    prompt4re=not args.no_prompt4re,
    task_prompt=not args.no_task_prompt,
    alignment=not args.no_alignment,
    spatial_bias=not args.no_spatial_bias,
    centrality=not args.no_centrality,
    srel_epochs=args.epochs_srel,
    srel_learning_rate=args.srel_lr,
    embeddings_path=args.embeddings,
    prompts_dir=args.prompts,
    prompt_epochs=args.epochs_prompt,
    prompt_learning_rate=args.prompt_lr,
    context=args.context,
    value_basis=args.value_basis,
    data_root=args.data_root,
  )
  out = args.out or default_output_folder(
    "runs/topt", parser, args, leading=(args.city,), ignore=("city", "data_root", "out")
  )
  return config, checked_output_folder(parser, out, COMMAND)


def main(argv: list[str] | None = None) -> int:
  config, out = parse_config(argv)
  if config.city == "NY":
    print(
      "NY: no region coordinates and no prompt vectors -> SREL without the spatial prior, "
      "no Prompt4RE; reporting the ridge ('w/o Prompt4RE') row only.",
      flush=True,
    )
  print(f"{config.model_name()} on {config.city}, tasks {config.tasks}, out {out}", flush=True)
  try:
    with no_empty_folder_left(out, COMMAND):
      train_and_evaluate(config, out, log=lambda s: print(s, flush=True))
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    return 2
  except (CheckpointMismatch, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main, resumable=True))
