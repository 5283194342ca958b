"""Ridge-probe scores of saved SREL/HAFusion embedding snapshots, per task.

    python -m experiments.score_srel_snapshots --snapshots DIR [--city Chi] [--folds 10]
      [--data-root ROOT]

DIR holds what ``experiments/srel_torch_harness.py --train-epochs ... --out DIR``
writes: ``snapshots_seed<S>.npy`` [T, N, d] and ``snapshot_epochs.npy`` [T].
For every task and seed it prints the pooled k-fold ``Ridge(1)`` R² of the
last snapshot (a fixed epoch budget, honest) and of the snapshot with the
best R² on those same test folds: the authors' HAFusion keeps that one, so
it is labelled optimistic. The folds are ``KFold(k, shuffle=True,
random_state=2024)``: k = 10 is ToPT's evaluator (the default), k = 25
HAFusion's (its ``tasks_Chi``); both clip negative predictions at 0 and
drop check-in's zero-count regions. Writes ``DIR/snapshot_scores.json``
(``snapshot_scores_<k>folds.json`` for k other than 10).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import numpy as np

from jaxurban.checkpoint import write_json_atomic
from jaxurban.data.hafusion import load_city_views
from jaxurban.data.errors import DataError, require_file
from jaxurban.eval import kfold
from jaxurban.topt.pipeline import TASKS


def load_snapshots(
  folder: pathlib.Path, n_regions: int
) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """{seed: [T, N, d]} and the epochs [T] of the snapshots in `folder`."""
  epochs_path = folder / "snapshot_epochs.npy"
  require_file(epochs_path)
  epochs = np.load(epochs_path)
  runs = {}
  for path in sorted(folder.glob("snapshots_seed*.npy")):
    seed = int(re.fullmatch(r"snapshots_seed(\d+)\.npy", path.name).group(1))
    snaps = np.load(path)
    if snaps.ndim != 3 or snaps.shape[:2] != (len(epochs), n_regions):
      raise DataError(path, f"shape {snaps.shape}, expected [{len(epochs)}, {n_regions}, d]")
    first = next(iter(runs.values()), snaps)
    if snaps.shape != first.shape:
      raise DataError(path, f"shape {snaps.shape} differs from the other seeds' {first.shape}")
    if not np.all(np.isfinite(snaps)):
      raise DataError(path, "non-finite values")
    runs[seed] = snaps
  if not runs:
    raise DataError(folder, "no snapshots_seed<S>.npy files")
  return runs, epochs


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.score_srel_snapshots", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--snapshots", required=True, help="folder written by the torch harness")
  parser.add_argument(
    "--city", default="Chi", choices=("Chi", "NY"), help="city whose labels score the snapshots"
  )
  parser.add_argument(
    "--folds", type=int, default=kfold.DEFAULT_FOLDS, help="10: ToPT's evaluator; 25: HAFusion's"
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  args = parser.parse_args(argv)
  if args.folds < 2:
    parser.error(f"--folds must be >= 2, got {args.folds}")
  folder = pathlib.Path(args.snapshots)
  views = load_city_views(args.city, args.data_root)
  labels = {task: np.asarray(views.labels[task], np.float64) for task in TASKS}
  keeps = {task: kfold.keep_mask(task, labels[task]) for task in TASKS}
  scored = min(int(keep.sum()) for keep in keeps.values())
  if args.folds > scored:
    parser.error(f"--folds {args.folds} exceeds the {scored} regions scored for some task")
  runs, epochs = load_snapshots(folder, views.n_regions)
  print(f"{len(runs)} seed(s), {len(epochs)} snapshots, epochs {epochs[0]}..{epochs[-1]}")
  results = {
    "snapshots": str(folder),
    "city": args.city,
    "folds": args.folds,
    "seeds": sorted(runs),
    "tasks": {},
  }
  stacked = np.stack([runs[seed] for seed in sorted(runs)])  # [S, T, N, d]
  for task in TASKS:
    keep = keeps[task]
    fold_of = kfold.fold_assignment(int(keep.sum()), args.folds)
    # Every seed's every snapshot in one vmapped ridge call.
    kept = stacked[:, :, keep].reshape((-1, int(keep.sum()), stacked.shape[-1]))
    pooled = kfold.ridge_cv_predictions(kept, labels[task][keep], fold_of, args.folds)
    r2 = kfold.score_pooled(pooled, labels[task][keep])["r2"].reshape(stacked.shape[:2])  # [S, T]
    best_epoch = epochs[np.argmax(r2, axis=1)].tolist()
    summary = {
      "last_epoch_r2": kfold.summarise({"r2": r2[:, -1]})["r2"],
      "best_snapshot_r2_optimistic": kfold.summarise({"r2": r2.max(axis=1)})["r2"],
      "best_snapshot_epochs": best_epoch,
    }
    results["tasks"][task] = summary
    print(
      f"{task:<12} last epoch R2 {summary['last_epoch_r2']['mean']:.3f} ± "
      f"{summary['last_epoch_r2']['std']:.3f} | best snapshot on the test folds "
      f"(optimistic) {summary['best_snapshot_r2_optimistic']['mean']:.3f} ± "
      f"{summary['best_snapshot_r2_optimistic']['std']:.3f} (epochs {best_epoch})"
    )
  suffix = "" if args.folds == kfold.DEFAULT_FOLDS else f"_{args.folds}folds"
  write_json_atomic(folder / f"snapshot_scores{suffix}.json", results)


if __name__ == "__main__":
  from experiments.common import exit_status

  sys.exit(exit_status(main))
