"""UrbanPG forecasting on Los-loop: full training, few-shot transfer, continual learning.

    python -m experiments.urbanpg --data los-loop [--paradigm full|fewshot|continual]
        [--seeds K] [--epochs N] [--data-root DIR] [--out DIR]

Prints progress and a table of UrbanPG and the baselines (MAE / RMSE / MAPE at
horizons 3, 6, 12 and over all 12 horizons pooled, mean ± std over seeds;
the pooled RMSE is the root of the mean squared error over every horizon);
writes metrics.json (config included), predictions.png and resumable
checkpoints into --out.
"""

from __future__ import annotations

import argparse
import sys

from experiments.common import (
  build_config,
  checked_output_folder,
  default_output_folder,
  exit_status,
  no_empty_folder_left,
)
from jaxurban.atomic import path_argument
from jaxurban.checkpoint import CheckpointMismatch
from jaxurban.data.errors import DataError
from jaxurban.urbanpg.train import PARADIGMS, UrbanPGConfig, train_and_evaluate

# Recorded in each output folder (experiments.common.COMMAND_FILE).
COMMAND = "experiments.urbanpg"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.urbanpg",
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  parser.add_argument(
    "--data", default="los-loop", choices=["los-loop"], help="traffic data set under the root"
  )
  parser.add_argument(
    "--paradigm",
    default="full",
    choices=PARADIGMS,
    help="full: all detectors; fewshot: pre-train west, prompts east (eq. 8); continual: "
    "growing network by stages (eqs. 9-10)",
  )
  parser.add_argument("--seeds", type=int, default=1, help="number of seeds, run in turn")
  parser.add_argument(
    "--first-seed", type=int, default=0, help="seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1"
  )
  parser.add_argument(
    "--epochs", type=int, default=UrbanPGConfig.epochs, help="max epochs per stage"
  )
  parser.add_argument(
    "--patience",
    type=int,
    default=UrbanPGConfig.patience,
    help="epochs without a better validation MAE before a stage stops",
  )
  parser.add_argument(
    "--features", type=int, default=UrbanPGConfig.features, help="backbone width d"
  )
  parser.add_argument(
    "--layers", type=int, default=UrbanPGConfig.layers, help="backbone attention layers"
  )
  parser.add_argument(
    "--last-value-skip",
    action="store_true",
    help="add each node's last input to its forecasts (not in the paper)",
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  parser.add_argument(
    "--out",
    type=path_argument,
    default=None,
    help="output folder (default: runs/urbanpg/<paradigm>, then each result-changing flag not "
    "at its default, seeds aside, e.g. runs/urbanpg/full-features128-layers2-last-value-skip)",
  )
  parser.add_argument("--no-plot", action="store_true", help="do not write predictions.png")
  args = parser.parse_args(argv)
  config = build_config(
    parser,
    UrbanPGConfig,
    {"plot": "--no-plot"},
    data=args.data,
    data_root=args.data_root,
    paradigm=args.paradigm,
    seeds=args.seeds,
    first_seed=args.first_seed,
    epochs=args.epochs,
    patience=args.patience,
    features=args.features,
    layers=args.layers,
    last_value_skip=args.last_value_skip,
    plot=not args.no_plot,
  )
  out = args.out or default_output_folder(
    "runs/urbanpg",
    parser,
    args,
    leading=(args.paradigm,),
    # Checkpoints are per seed, so runs over other seeds share the folder.
    ignore=("data", "paradigm", "data_root", "out", "no_plot", "seeds", "first_seed"),
  )
  out = checked_output_folder(parser, out, COMMAND)
  try:
    with no_empty_folder_left(out, COMMAND):
      return train_and_evaluate(config, out)
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    sys.exit(2)
  except (CheckpointMismatch, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  sys.exit(exit_status(main, resumable=True))
