"""Cross-city aligned region embeddings with CoRE.

  python -m experiments.core_align --pair XA-CD
  python -m experiments.core_align --pair XA-CD --seeds 5 --out runs/xa-cd
  python -m experiments.core_align --pair XA-CD --no-lia        # ablation
  python -m experiments.core_align --pair XA-CD --variant rp    # baseline

Trains all seeds in one vectorised program, prints progress and a
mean ± std table per direction beside the published-embedding row, and
writes embeddings, metrics.json, resumable checkpoints and embeddings.png
into --out. Re-running the same command on the same --out resumes.
"""

from __future__ import annotations

import argparse
import pathlib
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
from jaxurban.core.train import VARIANTS, CoreConfig, train_and_evaluate
from jaxurban.core.losses import FORMS
from jaxurban.data.errors import DataError

# Recorded in each output folder (experiments.common.COMMAND_FILE).
COMMAND = "experiments.core_align"


# Flags that leave the results unchanged, or that the folder name already spells out.
_NOT_IN_FOLDER_NAME = (
  "pair",
  "variant",
  "no_lma",
  "no_lia",
  "two_stage",
  "data_root",
  "out",
  "log_every",
  "checkpoint_every",
  "no_plot",
  "remat_gat",
  "shard_seeds",
  "shard_regions",
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
)


def parse_config(argv: list[str] | None = None) -> tuple[CoreConfig, pathlib.Path]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.core_align",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--pair", default="XA-CD", help="two city codes under <data-root>/core, X-Y (case-insensitive)"
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  parser.add_argument(
    "--out",
    type=path_argument,
    default=None,
    help="output folder (default: runs/core_align/<x>-<y>-<variant>, then each result-changing "
    "flag not at its default, e.g. xa-cd-core-seeds5)",
  )
  parser.add_argument(
    "--variant",
    choices=VARIANTS,
    default="core",
    help="core: eq. 13 (default); no-lma, no-lia: ablations; two-stage: align frozen "
    "embeddings; individual: mobility loss only; rp: individual embeddings aligned by rank "
    "anchoring and Procrustes",
  )
  parser.add_argument("--no-lma", action="store_true", help="ablation: without LMA")
  parser.add_argument("--no-lia", action="store_true", help="ablation: without LIA")
  parser.add_argument(
    "--two-stage",
    action="store_true",
    help="ablation: embed first, then align the frozen embeddings",
  )
  parser.add_argument("--seeds", type=int, default=1, help="seeds trained together (vmap)")
  parser.add_argument(
    "--first-seed", type=int, default=0, help="seeds are FIRST_SEED .. FIRST_SEED + SEEDS - 1"
  )
  parser.add_argument(
    "--epochs", type=int, default=600, help="full-batch epochs (per stage for two-stage)"
  )
  parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
  parser.add_argument("--anchors", type=int, default=1000, help="N_a of the LMA loss")
  parser.add_argument("--alpha", type=float, default=1.0, help="weight of LMA")
  parser.add_argument("--beta", type=float, default=1.0, help="weight of LIA")
  parser.add_argument(
    "--loss-form",
    choices=FORMS,
    default="authors",
    help="LMA/LIA as in the authors' code or as printed in the paper",
  )
  parser.add_argument(
    "--direct", action="store_true", help="use the N x N reference forms of the losses (slow)"
  )
  parser.add_argument(
    "--gat",
    choices=("tables", "segment"),
    default="tables",
    help="GAT layer: in-degree tables (fast, default) or jraph segment sums (reference)",
  )
  parser.add_argument(
    "--remat-gat",
    action="store_true",
    help="recompute the GAT layers' activations in the backward pass (same results, less "
    "memory, slower step; for cities of 10^5 regions and more)",
  )
  parser.add_argument(
    "--log-every", type=int, default=50, help="epochs per compiled chunk and progress line"
  )
  parser.add_argument(
    "--checkpoint-every",
    type=int,
    default=100,
    help="epochs between checkpoints (rounded to --log-every)",
  )
  parser.add_argument(
    "--no-plot", action="store_true", help="write neither embeddings.png nor losses.png"
  )
  parser.add_argument(
    "--shard-seeds",
    action="store_true",
    help="split the seeds over all devices (a multiple of the device count)",
  )
  parser.add_argument(
    "--shard-regions",
    action="store_true",
    help="split one large city pair over all devices: the mobility loss's rows and the anchors",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="multi-host: call jax.distributed.initialize() first, so that the device mesh spans "
    "every host (settings detected on SLURM, Open MPI, Kubernetes, Cloud TPU, or given below)",
  )
  parser.add_argument("--coordinator-address", help="with --distributed: host:port of process 0")
  parser.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
  parser.add_argument("--process-id", type=int, help="with --distributed: this process's id")
  args = parser.parse_args(argv)

  host_flags = [
    flag
    for flag, value in (
      ("--coordinator-address", args.coordinator_address),
      ("--num-processes", args.num_processes),
      ("--process-id", args.process_id),
    )
    if value is not None
  ]
  if host_flags and not args.distributed:
    # Without --distributed they would be ignored and each host would train alone.
    verb = "takes" if len(host_flags) == 1 else "take"
    parser.error(f"{', '.join(host_flags)} only {verb} effect with --distributed")
  if args.num_processes is not None and args.num_processes < 1:
    parser.error(f"--num-processes {args.num_processes}: must be at least 1")
  if args.process_id is not None and args.process_id < 0:
    parser.error(f"--process-id {args.process_id}: must be at least 0")
  if args.num_processes and args.process_id is not None and args.process_id >= args.num_processes:
    parser.error(f"--process-id {args.process_id}: must lie in [0, --num-processes)")
  if args.distributed and not (args.shard_seeds or args.shard_regions):
    # Each process would otherwise hold its own copy of the state, which it
    # cannot checkpoint together with the others, and train all of it alone.
    parser.error("--distributed needs --shard-seeds or --shard-regions")
  cities = args.pair.split("-")
  if len(cities) != 2 or not all(cities):
    parser.error(f"--pair {args.pair!r}: expected two city codes like XA-CD")
  variant = args.variant
  chosen = [
    flag
    for flag, name in (
      (args.no_lma, "no-lma"),
      (args.no_lia, "no-lia"),
      (args.two_stage, "two-stage"),
    )
    if flag
  ]
  if len(chosen) > 1 or (chosen and variant != "core"):
    parser.error("choose one of --variant, --no-lma, --no-lia, --two-stage")
  if chosen:
    variant = "no-lma" if args.no_lma else "no-lia" if args.no_lia else "two-stage"
  config = build_config(
    parser,
    CoreConfig,
    {
      "learning_rate": "--lr",
      "n_anchors": "--anchors",
      "gat_implementation": "--gat",
      "plot": "--no-plot",
    },
    city_x=cities[0].lower(),
    city_y=cities[1].lower(),
    data_root=args.data_root,
    variant=variant,
    seeds=args.seeds,
    first_seed=args.first_seed,
    epochs=args.epochs,
    learning_rate=args.lr,
    n_anchors=args.anchors,
    alpha=args.alpha,
    beta=args.beta,
    loss_form=args.loss_form,
    direct=args.direct,
    gat_implementation=args.gat,
    remat_gat=args.remat_gat,
    log_every=args.log_every,
    checkpoint_every=args.checkpoint_every,
    plot=not args.no_plot,
    shard_seeds=args.shard_seeds,
    shard_regions=args.shard_regions,
  )
  out = args.out or default_output_folder(
    "runs/core_align",
    parser,
    args,
    leading=(config.city_x, config.city_y, variant),
    ignore=_NOT_IN_FOLDER_NAME,
  )
  return config, checked_output_folder(parser, out, COMMAND)


def _start_distributed(argv: list[str] | None) -> str | None:
  """jax.distributed.initialize() when --distributed is given; before any computation.

  Returns what went wrong, for a one-line error, or None.
  """
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--distributed", action="store_true")
  parser.add_argument("--coordinator-address")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  args, _ = parser.parse_known_args(argv)
  if args.distributed:
    import jax

    # Unset values are detected from the cluster environment.
    try:
      jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as error:
      # Most often no cluster environment to detect the settings from.
      return (
        f"--distributed: jax.distributed.initialize() failed: {error} (outside SLURM, Open MPI, "
        "Kubernetes and Cloud TPU, pass --coordinator-address, --num-processes and --process-id)"
      )
  return None


def _device_count_problem(config: CoreConfig) -> str | None:
  """What the sharding flags cannot do with the devices present, before any loading."""
  import jax

  devices = jax.device_count()
  if config.shard_seeds and config.seeds % devices:
    return f"--shard-seeds: {config.seeds} seeds cannot be split over {devices} devices"
  # Anchors are drawn only where the manifold alignment is on.
  uses_anchors = config.loss_settings().alpha > 0
  if config.shard_regions and uses_anchors and config.n_anchors % devices:
    return f"--shard-regions: {config.n_anchors} anchors cannot be split over {devices} devices"
  return None


def main(argv: list[str] | None = None) -> int:
  config, out = parse_config(argv)
  problem = _start_distributed(argv)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  problem = _device_count_problem(config)
  if problem:
    print(f"error: {problem}; use a multiple of the device count", file=sys.stderr)
    return 2
  try:
    with no_empty_folder_left(out, COMMAND):
      train_and_evaluate(config, out)
  except (DataError, CheckpointMismatch, FloatingPointError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main, resumable=True))
