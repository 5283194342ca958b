"""Times one training epoch of the authors' PyTorch HAFusion (run by bench_srel).

Run with a Python that has torch, numpy and scikit-learn::

    python experiments/srel_torch_harness.py --repo DIR [--city Chi] [--epochs 20] [--repeats 5]
      [--flush-denormal]

DIR is a checkout of the HAFusion authors' repository; their model, data
loader and loss are imported from it at run time (nothing of theirs lives
in this project). Their modules parse the command line when imported, so
this script hands them a command line of their own. One timed call runs
`--epochs` full training steps (forward, loss, backward, Adam step) exactly
as their ``train_model`` does, without its every-30-epochs evaluation.
Prints one JSON line. Their mobility view enters as raw trip counts, which
drives part of the computation into denormal floats; PyTorch then runs far
slower than with ``--flush-denormal`` (XLA flushes denormals on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repo", required=True)
  parser.add_argument("--city", default="Chi")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
  parser.add_argument(
    "--flush-denormal",
    action="store_true",
    help="flush denormal floats to zero (XLA does on CPU; PyTorch does not by default)",
  )
  args = parser.parse_args()

  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.set_flush_denormal(args.flush_denormal)
  repo = os.path.abspath(args.repo)
  os.chdir(repo)  # their data paths are relative ("./data_Chi")
  sys.path.insert(0, repo)
  sys.argv = [sys.argv[0], "--city", args.city]
  import HAFusion_train as theirs  # loads the data, defines HAFusion and ModelLoss

  torch.manual_seed(0)
  model = theirs.HAFusion(
    theirs.POI_dim,
    theirs.landUse_dim,
    theirs.region_num,
    theirs.embedding_size,
    theirs.d_prime,
    theirs.d_m,
    theirs.c,
  )
  loss_fn = theirs.ModelLoss()
  hp = theirs.args
  optimizer = torch.optim.Adam(
    model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay
  )
  features, mob_adj, poi_sim, land_sim = (
    theirs.features,
    theirs.mob_adj,
    theirs.poi_sim,
    theirs.land_sim,
  )

  def run(epochs: int) -> float:
    loss = None
    for _ in range(epochs):
      model.train()
      out_s, out_t, out_p, out_l = model(features)
      loss = loss_fn(out_s, out_t, mob_adj, out_p, poi_sim, out_l, land_sim)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
    return float(loss.item())

  first_loss = run(1)  # warm-up
  run(args.epochs)
  seconds = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    last_loss = run(args.epochs)
    seconds.append((time.perf_counter() - start) / args.epochs)
  n_params = sum(p.numel() for p in model.parameters())
  print(
    json.dumps(
      {
        "framework": "torch",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "flush_denormal": args.flush_denormal,
        "city": args.city,
        "n_params": n_params,
        "epochs_per_call": args.epochs,
        "repeats": args.repeats,
        "epoch_seconds_median": statistics.median(seconds),
        "epoch_seconds_all": seconds,
        "first_loss": first_loss,
        "last_loss": last_loss,
      }
    )
  )


if __name__ == "__main__":
  main()
