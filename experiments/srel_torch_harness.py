"""The authors' PyTorch HAFusion, for timing (run by bench_srel) and as a reference.

Run with a Python that has torch, numpy and scikit-learn::

    python experiments/srel_torch_harness.py --repo DIR [--city Chi] [--epochs 20] [--repeats 5]
      [--flush-denormal]
    python experiments/srel_torch_harness.py --repo DIR --train-epochs 2000 --seeds 0 1 2 \
      --snapshot-every 30 --out DIR2
    python experiments/srel_torch_harness.py --repo DIR [--city Chi] --parity FILE.npz

The second form trains their model from scratch for each seed
(``torch.manual_seed(seed)``, their Adam and learning rate, their default
2000 epochs) and writes ``embeddings_last.npy`` [S, N, d] (the embeddings
of the last epoch) and ``snapshots_seed<S>.npy`` [T, N, d] with
``snapshot_epochs.npy``: the embeddings their ``train_model`` would score
every ``--snapshot-every`` epochs (from the training-mode forward pass, as
theirs). Files are written atomically; re-running the same command skips
the seeds whose snapshots exist. Score them with jaxurban's evaluator, e.g.
``python -m experiments.topt --no-prompt4re --seeds 3 --embeddings DIR2/embeddings_last.npy``.

The third form, ``--parity FILE``, saves for jaxurban's SREL parity check
(``python -m experiments.srel_parity FILE``) their model at its
initialisation (``torch.manual_seed`` of the first of ``--seeds``), in
float64 and with dropout off: every parameter, the inputs, the four decoder
outputs and the embeddings, their training loss and its gradient.

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


def _whole_number(minimum: int):
  """argparse type: a whole number of at least `minimum`. (This script runs
  beside torch as a plain file, so it does not import experiments.common.)"""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value

  return parse


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repo", required=True, help="checkout of the authors' HAFusion repository")
  parser.add_argument("--city", default="Chi", help="their city name (Chi or NY)")
  parser.add_argument(
    "--epochs", type=_whole_number(1), default=20, help="training steps per timed call"
  )
  parser.add_argument("--repeats", type=_whole_number(1), default=5, help="timed calls")
  parser.add_argument(
    "--threads", type=_whole_number(0), default=0, help="torch threads (0: torch default)"
  )
  parser.add_argument(
    "--flush-denormal",
    action="store_true",
    help="flush denormal floats to zero (XLA does on CPU; PyTorch does not by default)",
  )
  parser.add_argument(
    "--train-epochs",
    type=_whole_number(0),
    default=0,
    help="train and save embeddings instead of timing (0: time)",
  )
  parser.add_argument(
    "--seeds", type=_whole_number(0), nargs="+", default=[0], help="torch seeds to train"
  )
  parser.add_argument(
    "--snapshot-every", type=_whole_number(1), default=30, help="epochs between snapshots"
  )
  parser.add_argument("--out", default=None, help="folder for the saved embeddings")
  parser.add_argument(
    "--parity",
    default=None,
    help="save float64 parameters, outputs, loss and gradients to this .npz instead of timing",
  )
  args = parser.parse_args()
  if args.train_epochs and not args.out:
    parser.error("--train-epochs needs --out")
  if args.parity is not None and args.train_epochs:
    parser.error("--parity and --train-epochs are two different runs")
  if args.parity is not None and not args.parity:
    parser.error("--parity: an empty path names no file")
  args.parity = os.path.abspath(args.parity) if args.parity else None
  args.out = os.path.abspath(args.out) if args.out else None

  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.set_flush_denormal(args.flush_denormal)
  repo = os.path.abspath(args.repo)
  if not os.path.isfile(os.path.join(repo, "HAFusion_train.py")):
    parser.error(f"--repo {args.repo}: no HAFusion_train.py there (the authors' HAFusion checkout)")
  os.chdir(repo)  # their data paths are relative ("./data_Chi")
  sys.path.insert(0, repo)
  sys.argv = [sys.argv[0], "--city", args.city]
  import HAFusion_train as theirs  # loads the data, defines HAFusion and ModelLoss

  def build(seed: int):
    torch.manual_seed(seed)
    model = theirs.HAFusion(
      theirs.POI_dim,
      theirs.landUse_dim,
      theirs.region_num,
      theirs.embedding_size,
      theirs.d_prime,
      theirs.d_m,
      theirs.c,
    )
    optimizer = torch.optim.Adam(
      model.parameters(), lr=theirs.args.learning_rate, weight_decay=theirs.args.weight_decay
    )
    return model, optimizer

  loss_fn = theirs.ModelLoss()
  features, mob_adj, poi_sim, land_sim = (
    theirs.features,
    theirs.mob_adj,
    theirs.poi_sim,
    theirs.land_sim,
  )

  def step(model, optimizer):
    model.train()
    out_s, out_t, out_p, out_l = model(features)
    loss = loss_fn(out_s, out_t, mob_adj, out_p, poi_sim, out_l, land_sim)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  if args.train_epochs:
    _train_and_save(args, build, step)
    return
  if args.parity:
    _save_parity(args, theirs, build, loss_fn, features, (mob_adj, poi_sim, land_sim))
    return

  model, optimizer = build(0)

  def run(epochs: int) -> float:
    loss = None
    for _ in range(epochs):
      loss = step(model, optimizer)
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


def _save_atomic(path: str, save) -> None:
  """Writes through a temporary file, so a killed run leaves no torn file.

  (`jaxurban.atomic` is not used: this file runs as a script, by path, in
  the PyTorch environment, where the jaxurban package need not be importable.)
  """
  partial = path + ".partial"
  with open(partial, "wb") as handle:
    save(handle)
  os.replace(partial, path)


def _save_parity(args, theirs, build, loss_fn, features, targets) -> None:
  import numpy as np
  import torch

  torch.set_default_dtype(torch.float64)
  model, _ = build(args.seeds[0])
  model.double().eval()  # eval: dropout off, so both sides compute one function
  features = [f.double() for f in features]
  targets = [t.double() for t in targets]
  out_s, out_t, out_p, out_l = model(features)
  mob_adj, poi_sim, land_sim = targets
  loss = loss_fn(out_s, out_t, mob_adj, out_p, poi_sim, out_l, land_sim)
  loss.backward()
  arrays = {"param/" + k: v.detach().numpy() for k, v in model.state_dict().items()}
  arrays.update({"grad/" + k: p.grad.numpy() for k, p in model.named_parameters()})
  names = ("poi", "landuse", "mobility_features")
  arrays.update({"input/" + n: f[0].numpy() for n, f in zip(names, features)})
  names = ("mobility_target", "poi_similarity", "landuse_similarity")
  arrays.update({"input/" + n: t.numpy() for n, t in zip(names, targets)})
  for name, value in zip(("source", "destination", "poi", "landuse"), (out_s, out_t, out_p, out_l)):
    arrays["output/" + name] = value.detach().numpy()
  arrays["output/embedding"] = model.out_feature().detach().numpy()
  arrays["loss"] = np.asarray(loss.item())
  layers = ("NO_IntraAFL", "NO_InterAFL", "NO_RegionFusion", "NO_head")
  arrays.update({"setting/" + k: np.asarray(getattr(theirs.args, k)) for k in layers})
  arrays["setting/city"] = np.asarray(args.city)
  arrays["setting/torch_version"] = np.asarray(torch.__version__)
  _save_atomic(args.parity, lambda f: np.savez(f, **arrays))
  print(json.dumps({"parity": args.parity, "loss": loss.item()}))


def _train_and_save(args, build, step) -> None:
  import numpy as np

  os.makedirs(args.out, exist_ok=True)
  last, log = [], []
  for seed in args.seeds:
    done = os.path.join(args.out, f"snapshots_seed{seed}.npy")
    if os.path.exists(done):  # finished before an interruption: keep it
      snapshots = list(np.load(done))
      last.append(snapshots[-1])
      epochs = np.load(os.path.join(args.out, "snapshot_epochs.npy")).tolist()
      print(json.dumps({"seed": seed, "resumed": done}), flush=True)
      continue
    model, optimizer = build(seed)
    snapshots, epochs = [], []
    start = time.perf_counter()
    for epoch in range(args.train_epochs):
      loss = step(model, optimizer)
      if epoch % args.snapshot_every == 0 or epoch == args.train_epochs - 1:
        snapshots.append(model.out_feature().detach().cpu().numpy())
        epochs.append(epoch)
    seconds = time.perf_counter() - start
    last.append(snapshots[-1])
    # The epochs first: a seed's snapshots count as finished once they exist.
    _save_atomic(
      os.path.join(args.out, "snapshot_epochs.npy"), lambda f: np.save(f, np.asarray(epochs))
    )
    _save_atomic(done, lambda f: np.save(f, np.stack(snapshots)))
    log.append({"seed": seed, "seconds": seconds, "last_loss": float(loss.item())})
    print(json.dumps(log[-1]), flush=True)
  _save_atomic(os.path.join(args.out, "embeddings_last.npy"), lambda f: np.save(f, np.stack(last)))
  _save_atomic(
    os.path.join(args.out, "log.json"),
    lambda f: f.write(json.dumps({"args": vars(args), "runs": log}, indent=2).encode()),
  )


if __name__ == "__main__":
  main()
