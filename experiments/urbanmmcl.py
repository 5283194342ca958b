"""UrbanMMCL on one city: pre-training, ridge probe, fine-tuning, picture.

  python -m experiments.urbanmmcl --city Chi --seeds 5
  python -m experiments.urbanmmcl --city NY --seeds 5
  python -m experiments.urbanmmcl --city Chi --no-graph-contrast        # "w/o GCL"
  python -m experiments.urbanmmcl --city Chi --drop-view distance       # "w/o G(D)"
  python -m experiments.urbanmmcl --city Chi --images DIR               # + image modality

Chicago uses its geo-text (address, POI composition) and centroids as the
text and location modalities, New York has neither (graph part only);
images are used only when --images names a folder of <i>.png / <i>.npy.
Prints per-epoch-chunk progress and a results table; writes embeddings.npy,
results.json, embeddings.png (2-D projection coloured by the dominant
land-use category) and losses.png (pre-training curves per seed) into --out.
Pre-training checkpoints each seed under
--out/checkpoints; the same command with the same --out resumes a killed run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from experiments.common import (
  absolute_path,
  build_config,
  checked_output_folder,
  default_output_folder,
  exit_status,
  no_empty_folder_left,
)
from jaxurban.atomic import path_argument, write_text_atomic
from jaxurban.checkpoint import CheckpointMismatch
from jaxurban.data.errors import DataError
from jaxurban.eval import kfold
from jaxurban.urbanmmcl.graphs import AblationError
from jaxurban.urbanmmcl.train import TASKS, UrbanMMCLConfig, train_and_evaluate
from jaxurban.viz.loss_curves import merge_seed_histories, plot_loss_history

# Recorded in each output folder (experiments.common.COMMAND_FILE).
COMMAND = "experiments.urbanmmcl"


def parse_config(argv=None) -> tuple[UrbanMMCLConfig, pathlib.Path, str]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.urbanmmcl",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--city", choices=("Chi", "NY"), default="Chi", help="Chicago or New York (hafusion data)"
  )
  parser.add_argument("--data-root", default=None, help="default: $JAXURBAN_DATA")
  parser.add_argument(
    "--images",
    default=None,
    type=absolute_path,
    help="folder of per-region images <i>.png or <i>.npy (H x W x 3, uint8 or floats in [0, 1]); "
    "needs text or location to contrast them with, so not New York",
  )
  parser.add_argument("--seeds", type=int, default=5, help="pre-training seeds 0..SEEDS-1")
  parser.add_argument(
    "--epochs", type=int, default=UrbanMMCLConfig.epochs, help="pre-training epochs"
  )
  parser.add_argument(
    "--finetune-seeds",
    type=int,
    default=UrbanMMCLConfig.finetune_seeds,
    help="how many of the pre-trained seeds are also fine-tuned, at most --seeds (0: the ridge "
    "probe only)",
  )
  parser.add_argument(
    "--finetune-epochs",
    type=int,
    default=UrbanMMCLConfig.finetune_epochs,
    help="most fine-tuning epochs (stopped early on a validation fold)",
  )
  parser.add_argument("--no-multimodal", action="store_true", help="ablation: graph part only")
  parser.add_argument("--no-graph", action="store_true", help="ablation: multi-modal part only")
  parser.add_argument("--no-vgae", action="store_true", help="ablation: w/o VGAE")
  parser.add_argument("--no-walks", action="store_true", help="ablation: w/o random walks")
  parser.add_argument("--no-graph-contrast", action="store_true", help="ablation: w/o GCL")
  parser.add_argument(
    "--drop-view",
    action="append",
    default=[],
    choices=("poi", "mobility", "distance"),
    help="leave this region view out of the graph part (repeatable)",
  )
  parser.add_argument(
    "--location-frame",
    choices=("city", "geoclip"),
    default="city",
    help="location encoder: city-standardised coordinates and bands (default), or GeoCLIP's "
    "world coordinates and bands 2^0, 2^4, 2^8",
  )
  parser.add_argument(
    "--projection",
    choices=("tsne", "pca"),
    default="tsne",
    help="2-D projection of the embeddings picture",
  )
  parser.add_argument(
    "--out",
    type=lambda text: pathlib.Path(path_argument(text)),
    default=None,
    help="default: runs/urbanmmcl/<city>, then each result-changing flag not at its default, "
    "e.g. Chi-no-vgae",
  )
  args = parser.parse_args(argv)
  config = build_config(
    parser,
    UrbanMMCLConfig,
    {"drop_views": "--drop-view"},
    city=args.city,
    data_root=args.data_root,
    images=args.images,
    seeds=args.seeds,
    epochs=args.epochs,
    finetune_seeds=args.finetune_seeds,
    finetune_epochs=args.finetune_epochs,
    no_multimodal=args.no_multimodal,
    no_graph=args.no_graph,
    no_vgae=args.no_vgae,
    no_walks=args.no_walks,
    no_graph_contrast=args.no_graph_contrast,
    drop_views=tuple(args.drop_view),
    location_frame=args.location_frame,
  )
  # The views dropped as the config keeps them (once each, in the paper's
  # order): repeated or reordered flags name the same run folder.
  args.drop_view = list(config.drop_views)
  # Outputs go under runs/urbanmmcl/<city>, then every pre-training flag not
  # at its default (e.g. Chi-no-vgae), like the other commands. Pre-training
  # checkpoints are per seed and the fine-tuning settings may change on
  # resumption, so runs that differ only in those share one folder and its
  # pre-trained seeds (results.json records the settings of the latest run).
  out = args.out or default_output_folder(
    "runs/urbanmmcl",
    parser,
    args,
    leading=(args.city,),
    ignore=(
      "city",
      "data_root",
      "out",
      "projection",
      "seeds",
      "finetune_seeds",
      "finetune_epochs",
    ),
  )
  return config, checked_output_folder(parser, out, COMMAND), args.projection


def results_table(results: dict) -> str:
  """Ridge probe (embeddings vs raw features) and fine-tuning, as Markdown."""
  lines = [
    f"views {results['views'] or 'none'}, modalities {results['modalities'] or 'none'}",
    "",
    "| task | ridge R2 embeddings (mean ± sample sd, ddof=1, over seeds) | ridge R2 raw features | MAE emb / raw | RMSE emb / raw |",
    "| --- | --- | --- | --- | --- |",
  ]
  alphas = results["config"].get("ridge_alphas")
  for probe, title in (
    ("ridge", f"alpha {results['config'].get('ridge_alpha')}"),
    ("ridge_tuned", f"alpha chosen among {alphas} inside each training part"),
  ):
    if probe not in results:
      continue
    for task in TASKS:
      e = results[probe]["embedding"][task]
      r = results[probe]["raw_features"][task]
      lines.append(
        f"| {task} ({title}) | {kfold.summary_text(e['r2'])} | {r['r2']['mean']:.4f} | "
        f"{e['mae']['mean']:.2f} / {r['mae']['mean']:.2f} | {e['rmse']['mean']:.2f} / {r['rmse']['mean']:.2f} |"
      )
  if results["finetune"]:
    lines += ["", "| fine-tuned task | metrics (mean over fine-tuned seeds) |", "| --- | --- |"]
    for task, runs in results["finetune"].items():
      keys = [k for k in runs[0] if k != "best_epochs"]
      lines.append(
        f"| {task} | "
        + ", ".join(f"{k} {np.mean([run[k] for run in runs]):.4f}" for k in keys)
        + " |"
      )
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, city: str, projection: str) -> None:
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from jaxurban.viz.embedding_plot import save_figure_atomic
  from jaxurban.viz.tsne import pca_2d, tsne

  z = np.asarray(results["embeddings"][0], np.float32)
  xy = np.asarray(
    tsne(z, perplexity=min(30.0, (z.shape[0] - 2) / 3)) if projection == "tsne" else pca_2d(z)
  )
  # Colour = the landUse_dist column that dominates the region.
  classes = np.asarray(results["landuse_classes"])[np.asarray(results["landuse"])]
  fig = Figure(figsize=(7.5, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  # One entry per column that dominates some region (the data name no
  # categories, only columns), with its region count; the legend sits
  # outside the points.
  colours = matplotlib.colormaps["tab20"]
  for k in np.unique(classes):
    members = classes == k
    ax.scatter(
      xy[members, 0],
      xy[members, 1],
      color=colours(int(k) % 20),
      s=18,
      label=f"column {int(k)} ({int(members.sum())})",
    )
  ax.legend(
    title="dominant land-use\ncolumn (regions)",
    fontsize=7,
    title_fontsize=7,
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
  )
  ax.set_title(f"UrbanMMCL embeddings, {city} ({projection}, seed 0)")
  fig.tight_layout()
  save_figure_atomic(fig, path, dpi=130)


def plot_losses(results: dict, path: pathlib.Path, config: UrbanMMCLConfig) -> None:
  """Every pre-training loss term against the epoch, one line per seed."""
  plot_loss_history(
    path,
    merge_seed_histories(results["history"]),
    title=f"UrbanMMCL pre-training, {config.city}",
    seed_labels=list(range(config.first_seed, config.first_seed + config.seeds)),
  )


def main(argv=None) -> int:
  config, out, projection = parse_config(argv)
  try:
    with no_empty_folder_left(out, COMMAND):
      results = train_and_evaluate(config, out, log=lambda m: print(m, flush=True))
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    return 2
  except (AblationError, CheckpointMismatch, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = results_table(results)
  print(table)
  write_text_atomic(out / "results.md", table + "\n")
  plot(results, out / "embeddings.png", config.city, projection)
  plot_losses(results, out / "losses.png", config)
  print(f"wrote {out}/results.json, results.md, embeddings.npy, embeddings.png, losses.png")
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main, resumable=True))
