"""Run the authors' PyTorch CoRE next to jaxurban, to time it and to score it.

This is a harness around the original PyTorch implementation of CoRE
(AIMUrban/CoRE on GitHub).  The authors' code is NOT vendored here: the
harness imports their ``Model.CoRE.CoRE`` class, unchanged, from a checkout
given with ``--repo``, and re-does only the data loading and the training loop
of their ``data/get_dataset.py`` and ``train.py``.  It does not run in the
jaxurban environment: it needs its own torch virtual environment, and of
jaxurban it imports only the numpy-only atomic writers (``jaxurban.atomic``),
run as ``python -m experiments.torch_reference`` from the repository root.

Setup (CPU only)::

    python3 -m venv /path/to/venv
    /path/to/venv/bin/pip install torch==2.13.0 torch_geometric pandas numpy scikit-learn
    # torch must be the CPU build (2.13.0+cpu wheel), not a CUDA build;
    # torch_geometric is pure Python here: GATConv needs no torch_scatter /
    # torch_sparse.
    git clone https://github.com/AIMUrban/CoRE /path/to/CoRE
    # (their region_od_flow_*_11.npy files are not needed and may be absent)

Usage (from the repository root)::

    /path/to/venv/bin/python -m experiments.torch_reference \\
        --repo /path/to/CoRE --data-root ../shared/data --pair XA-CD \\
        --epochs 600 --seed 0 --threads 2 --out runs/torch_ref/xa-cd-seed0

    # timing only (no embeddings written):
    /path/to/venv/bin/python -m experiments.torch_reference \\
        --repo /path/to/CoRE --data-root ../shared/data --pair XA-CD \\
        --epochs 40 --threads 2 --timing-only

``--data-root`` is our layout: ``<data-root>/core/<city>/regionmap_<city>.geo``,
``regionmap_<city>.mob`` (``<data-root>/<city>/...`` is accepted too, and in
either, the files may sit one level down in ``regionmap_<city>/``, the layout
of the authors' ``raw_data``). ``--city-dirs SOURCE_DIR TARGET_DIR`` names the
two city folders instead (``bench_core`` passes the folders jaxurban read,
which may be in the download cache).
``--pair S-T`` is the source-target order of their ``s_dataset``/``t_dataset``.

Differences from the authors' scripts, all in this harness:

* OD substitute.  Their ``load_data`` reads ``region_od_flow_<city>_11.npy``
  (an OD flow matrix that is not published).  In its place we use the dense
  matrix ``M`` of the ``.mob`` weights, ``M[origin, dest] = mobility_weight``
  with rows/columns in ``.geo`` order (the same matrix their ``load_data``
  builds for the graph, without the identity), and ``mob = M / M.sum()``
  (float64, as a normalised ``.npy`` flow matrix would be).  The graph
  (``edge_index``, ``edge_weight`` from ``M + I`` as a sparse COO tensor) is
  built exactly as in their ``load_data``.
* Their ``Model/__init__.py`` imports a module ``.UARE`` that is not in their
  repository, so ``import Model.CoRE`` fails as published.  When that happens
  the harness registers ``Model`` as a bare package pointing at their
  ``Model/`` folder, so that ``Model/CoRE.py`` itself is imported unchanged.
* Seeding: ``random``, ``numpy`` and ``torch`` are seeded with ``--seed``
  (their ``train.py`` does not seed).
* Training is their loop (Adam, lr 1e-3, loss = s_intra + t_intra + crossRec
  + crossAlign, 1000 anchors, hidden 128, 2 GAT layers, 8 heads) without the
  evaluation every 50 epochs.  Each epoch (forward + backward + optimizer
  step) is timed with ``time.perf_counter``; the median, mean, p10 and p90
  over the epochs after a 5-epoch warm-up are reported.

Outputs in ``--out``: ``<s>_emb.npy`` and ``<t>_emb.npy`` (float32, from
``model.get_region_emb()`` after the last epoch; not with ``--timing-only``)
and ``timing.json`` (median/mean/p10/p90 ms per epoch, epoch counts,
threads, torch version, and every epoch's time in ``epoch_ms``).  Per-epoch
times on a shared CPU have long contention spikes: quote the median.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time
import types

import numpy as np

# numpy-only: importable beside torch without jax.
from experiments.common import non_negative_int, positive_int
from jaxurban.atomic import save_npy_atomic, write_json_atomic

WARMUP_EPOCHS = 5
HIDDEN_DIM = 128
GAT_LAYERS = 2
NUM_HEADS = 8
SAMPLE_NUM = 1000
LR = 1e-3


def import_core_class(repo: str):
  """Return the authors' ``Model.CoRE.CoRE`` class from the checkout ``repo``."""
  repo = os.path.abspath(repo)
  model_dir = os.path.join(repo, "Model")
  if not os.path.isfile(os.path.join(model_dir, "CoRE.py")):
    raise SystemExit(f"no Model/CoRE.py under --repo {repo}")
  if repo not in sys.path:
    sys.path.insert(0, repo)
  try:
    module = importlib.import_module("Model.CoRE")
  except ImportError:
    # Model/__init__.py does `from .UARE import *`, a module the repository
    # does not ship.  Bypass the package __init__ only.
    for name in [n for n in sys.modules if n == "Model" or n.startswith("Model.")]:
      del sys.modules[name]
    package = types.ModuleType("Model")
    package.__path__ = [model_dir]
    package.__file__ = os.path.join(model_dir, "__init__.py")
    sys.modules["Model"] = package
    module = importlib.import_module("Model.CoRE")
  return module.CoRE


def files_in(folder: str, city: str) -> str | None:
  """The folder holding ``regionmap_<city>.geo``: ``folder`` or its ``regionmap_<city>/``.

  The second is the layout of the authors' ``raw_data`` (and of jaxurban's
  loader, which reads both).
  """
  for candidate in (folder, os.path.join(folder, f"regionmap_{city}")):
    if os.path.isfile(os.path.join(candidate, f"regionmap_{city}.geo")):
      return candidate
  return None


def city_dir(data_root: str | None, city: str, folder: str | None = None) -> str:
  """Where a city's ``.geo`` and ``.mob`` lie: in ``folder`` when given, else under the data root."""
  if folder is not None:
    found = files_in(folder, city)
    if found is None:
      raise SystemExit(
        f"regionmap_{city}.geo not found in --city-dirs folder {folder} "
        f"(nor in {os.path.join(folder, f'regionmap_{city}')})"
      )
    return found
  for candidate in (os.path.join(data_root, "core", city), os.path.join(data_root, city)):
    found = files_in(candidate, city)
    if found is not None:
      return found
  raise SystemExit(
    f"regionmap_{city}.geo not found under {data_root}/core/{city} or {data_root}/{city}"
  )


def load_data(data_root: str | None, city: str, folder: str | None = None):
  """The inputs the authors' model takes, built from our files: (N, graph_info).

  What their loader hands the model, from a city folder of this project's
  layout: the `.mob` weights in a dense [N, N] matrix in `.geo` row order
  (pairs naming a region the `.geo` lacks are skipped); the GAT's edges are
  the non-zero entries of that matrix plus the identity; and the mobility
  target, for want of the unpublished OD count file, is the same matrix
  normalised to sum 1.
  """
  import pandas as pd
  import torch

  folder = city_dir(data_root, city, folder)
  geo_ids = pd.read_csv(os.path.join(folder, f"regionmap_{city}.geo"))["geo_id"].to_numpy()
  pairs = pd.read_csv(os.path.join(folder, f"regionmap_{city}.mob"))
  n = len(geo_ids)
  row_of = {geo_id: row for row, geo_id in enumerate(geo_ids)}
  known = pairs["origin_id"].isin(row_of) & pairs["destination_id"].isin(row_of)
  pairs = pairs[known]
  weights = np.zeros((n, n), np.float32)
  weights[
    pairs["origin_id"].map(row_of).to_numpy(), pairs["destination_id"].map(row_of).to_numpy()
  ] = pairs["mobility_weight"].to_numpy(np.float32)
  target = weights.astype(np.float64) / weights.astype(np.float64).sum()
  with_loops = torch.from_numpy(weights + np.eye(n, dtype=np.float32)).to_sparse_coo()
  return n, {"edge_index": with_loops.indices(), "edge_weight": with_loops.values(), "mob": target}


def build_model(
  core_class,
  data_root: str | None,
  s_city: str,
  t_city: str,
  city_dirs: tuple[str, str] | None = None,
):
  """The authors' model for a city pair with their settings: (model, N_s, N_t)."""
  s_dir, t_dir = city_dirs if city_dirs else (None, None)
  s_region_num, s_graph_info = load_data(data_root, s_city, s_dir)
  t_region_num, t_graph_info = load_data(data_root, t_city, t_dir)
  model = core_class(
    s_region_num=s_region_num,
    t_region_num=t_region_num,
    s_graph_info=s_graph_info,
    t_graph_info=t_graph_info,
    hidden_dim=HIDDEN_DIM,
    gat_layers=GAT_LAYERS,
    num_heads=NUM_HEADS,
  )
  return model, s_region_num, t_region_num


def seed_everything(seed: int) -> None:
  import torch

  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def summarize(times_s: list[float]) -> dict:
  timed = np.asarray(times_s[WARMUP_EPOCHS:] if len(times_s) > WARMUP_EPOCHS else times_s) * 1e3
  return {
    "median_ms": float(np.median(timed)),
    "mean_ms": float(np.mean(timed)),
    "p10_ms": float(np.percentile(timed, 10)),
    "p90_ms": float(np.percentile(timed, 90)),
    "timed_epochs": int(timed.size),
  }


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--repo", required=True, help="checkout of the authors' CoRE repository")
  p.add_argument(
    "--data-root",
    default=os.environ.get("JAXURBAN_DATA"),
    help="folder holding core/<city>/ (default: $JAXURBAN_DATA)",
  )
  p.add_argument("--pair", default="XA-CD", help="SOURCE-TARGET city codes, e.g. XA-CD")
  p.add_argument(
    "--city-dirs",
    nargs=2,
    metavar=("SOURCE_DIR", "TARGET_DIR"),
    default=None,
    help="the two cities' folders, in --pair order, in place of the data root's "
    "(e.g. cities taken from the download cache)",
  )
  p.add_argument("--epochs", type=positive_int, default=600, help="training epochs (600)")
  p.add_argument("--seed", type=non_negative_int, default=0, help="torch and numpy seed")
  p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
  p.add_argument("--out", default=None, help="output folder (embeddings, timing.json)")
  p.add_argument("--timing-only", action="store_true", help="time the epochs, write no embeddings")
  args = p.parse_args(argv)
  if not args.timing_only and not args.out:
    p.error("--out is required unless --timing-only")
  if not args.data_root and not args.city_dirs:
    p.error(
      "the data root is not set: pass --data-root DIR, set JAXURBAN_DATA, or name the two "
      "city folders with --city-dirs"
    )
  parts = args.pair.lower().split("-")
  if len(parts) != 2 or not all(parts):
    p.error("--pair must look like XA-CD")
  args.s_city, args.t_city = parts
  return args


def main(argv=None) -> int:
  args = parse_args(argv)

  import torch

  torch.set_num_threads(args.threads)
  CoRE = import_core_class(args.repo)

  seed_everything(args.seed)
  model, s_region_num, t_region_num = build_model(
    CoRE, args.data_root, args.s_city, args.t_city, args.city_dirs
  )
  print(
    f"learning {args.s_city} --- {args.t_city}: {s_region_num} / {t_region_num} regions, "
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}",
    flush=True,
  )

  optim = torch.optim.Adam(model.parameters(), lr=LR)

  times: list[float] = []
  loss_value = float("nan")
  t_start = time.perf_counter()
  for epoch_id in range(args.epochs):
    model.train()
    t0 = time.perf_counter()
    s_intra, t_intra, cross_rec, cross_align = model.forward(sample_num=SAMPLE_NUM)
    all_loss = (s_intra + t_intra) + cross_rec + cross_align
    optim.zero_grad()
    all_loss.backward()
    optim.step()
    times.append(time.perf_counter() - t0)
    loss_value = all_loss.item()
    if (epoch_id + 1) % 50 == 0 or epoch_id + 1 == args.epochs:
      so_far = summarize(times)
      print(
        f"epoch {epoch_id + 1}/{args.epochs} loss={loss_value:.5f} "
        f"(s_intra={s_intra.item():.4f} t_intra={t_intra.item():.4f} "
        f"rec={cross_rec.item():.4f} align={cross_align.item():.4f}) "
        f"median {so_far['median_ms']:.1f} ms/epoch",
        flush=True,
      )
  total_s = time.perf_counter() - t_start

  stats = summarize(times)
  stats.update(
    {
      "epochs": args.epochs,
      "warmup_epochs": WARMUP_EPOCHS,
      "threads": torch.get_num_threads(),
      "torch_version": torch.__version__,
      "pair": f"{args.s_city}-{args.t_city}",
      "seed": args.seed,
      "final_loss": loss_value,
      "total_train_s": total_s,
      "epoch_ms": [round(t * 1e3, 3) for t in times],
    }
  )
  try:
    import torch_geometric

    stats["torch_geometric_version"] = torch_geometric.__version__
  except Exception:  # pragma: no cover - informational only
    pass
  print(
    f"median {stats['median_ms']:.1f} ms/epoch (mean {stats['mean_ms']:.1f}, "
    f"p10 {stats['p10_ms']:.1f}, p90 {stats['p90_ms']:.1f}) over {stats['timed_epochs']} epochs "
    f"after {WARMUP_EPOCHS} warm-up, {stats['threads']} threads, torch {stats['torch_version']}",
    flush=True,
  )

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    if not args.timing_only:
      model.eval()
      with torch.no_grad():
        s_emb, t_emb = model.get_region_emb()
      save_npy_atomic(
        os.path.join(args.out, f"{args.s_city}_emb.npy"), s_emb.numpy().astype(np.float32)
      )
      save_npy_atomic(
        os.path.join(args.out, f"{args.t_city}_emb.npy"), t_emb.numpy().astype(np.float32)
      )
    write_json_atomic(os.path.join(args.out, "timing.json"), stats)
    print(f"wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
