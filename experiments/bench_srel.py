"""Time per SREL training epoch: this project (JAX) vs the HAFusion authors' PyTorch.

    python -m experiments.bench_srel --data-root ../shared/data [--city Chi|NY] \\
      [--torch-python /path/to/python --torch-repo /path/to/HAFusion] [--out bench.json]

JAX: one jitted chunk of `--epochs-per-call` full training steps (forward,
loss, gradients, Adam) under lax.scan, timed after a warm-up (compilation)
call; the epoch time is the median over `--repeats` calls divided by the
chunk length. Measured for 1 seed and for `--seeds` seeds vmapped together,
for two variants on `--city` (Chicago by default):
  * "topt": ToPT's SREL (crime setting: L = 2 Graphormer layers, spatial
    bias and centrality on; on New York, which has no centroids, without
    them, as `experiments.topt --city NY` trains it);
  * "hafusion": the same code with HAFusion's region fusion (3 layers, no
    spatial prior), the architecture the PyTorch reference trains.
PyTorch (when --torch-python and --torch-repo are given): the authors'
HAFusion model, loss and Adam step, driven by experiments/srel_torch_harness.py
in a subprocess on the same machine, with and without flushing denormals,
for each of `--torch-threads`. For single-threaded JAX pin the whole process
to one core, `taskset -c 0 python -m experiments.bench_srel ...` (XLA's CPU
flags such as --xla_cpu_multi_thread_eigen=false leave it on every core).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from experiments.common import check_torch_flags, checked_output_file, exit_status, positive_int
from jaxurban.checkpoint import write_json_atomic
from jaxurban.data.hafusion import load_city_views
from jaxurban.topt.srel_train import (
  HAFUSION_FUSION,
  SRELConfig,
  build_model,
  effective_config,
  init_state,
  make_loss,
  make_optimizer,
  make_train_chunk,
  prepare_data,
)

VARIANTS = {
  "topt": dict(),
  "hafusion": HAFUSION_FUSION,
}


def time_jax(config: SRELConfig, views, n_seeds: int, epochs_per_call: int, repeats: int) -> dict:
  data = prepare_data(views)
  model = build_model(config)
  optimizer = make_optimizer(config)
  state = init_state(model, optimizer, tuple(range(n_seeds)), data)
  chunk = make_train_chunk(make_loss(model), optimizer, epochs_per_call)
  args = data.as_tuple()
  started = time.perf_counter()
  state, terms = chunk(state, *args)
  jax.block_until_ready(terms)
  compile_seconds = time.perf_counter() - started
  seconds = []
  for _ in range(repeats):
    started = time.perf_counter()
    state, terms = chunk(state, *args)
    jax.block_until_ready(terms)
    seconds.append((time.perf_counter() - started) / epochs_per_call)
  return {
    "framework": "jax",
    "seeds": n_seeds,
    "epochs_per_call": epochs_per_call,
    "repeats": repeats,
    "first_call_seconds_including_compile": compile_seconds,
    "epoch_seconds_median": statistics.median(seconds),
    "epoch_seconds_per_seed": statistics.median(seconds) / n_seeds,
    "epoch_seconds_all": seconds,
    "last_total_loss": np.asarray(terms["total"]).tolist(),
  }


def time_torch(
  python: str,
  repo: str,
  epochs_per_call: int,
  repeats: int,
  flush: bool,
  threads: int,
  city: str = "Chi",
) -> dict:
  harness = pathlib.Path(__file__).with_name("srel_torch_harness.py")
  command = [
    python,
    str(harness),
    "--repo",
    repo,
    "--city",
    city,
    "--epochs",
    str(epochs_per_call),
    "--repeats",
    str(repeats),
    "--threads",
    str(threads),
  ]
  if flush:
    command.append("--flush-denormal")
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["command"] = " ".join(command)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.bench_srel", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  parser.add_argument(
    "--city", choices=("Chi", "NY"), default="Chi", help="Chicago or New York (hafusion data)"
  )
  parser.add_argument(
    "--seeds", type=positive_int, default=5, help="seeds vmapped together, beside 1 seed"
  )
  parser.add_argument(
    "--epochs-per-call", type=positive_int, default=20, help="training steps per timed call"
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=5, help="timed calls after the warm-up; median"
  )
  parser.add_argument(
    "--torch-epochs-per-call",
    type=positive_int,
    default=5,
    help="the authors' training steps per timed call",
  )
  parser.add_argument(
    "--torch-python", default=None, help="Python of a torch environment, to time theirs too"
  )
  parser.add_argument("--torch-repo", default=None, help="checkout of the authors' HAFusion")
  parser.add_argument(
    "--torch-threads",
    type=positive_int,
    nargs="+",
    default=[1, 2],
    help="PyTorch intra-op thread counts to time (OpenMP threads suffer on a busy machine)",
  )
  parser.add_argument(
    "--variants",
    nargs="+",
    default=list(VARIANTS),
    choices=list(VARIANTS),
    help="topt: ToPT's SREL; hafusion: HAFusion's fusion (see above)",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  check_torch_flags(parser, args, "HAFusion_train.py")
  checked_output_file(parser, args.out)

  views = load_city_views(args.city, args.data_root)
  results = {
    "machine": {
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "load_average_at_start": os.getloadavg(),
      "jax_version": jax.__version__,
      "devices": [str(d) for d in jax.devices()],
    },
    "city": args.city,
    "command": " ".join(
      [sys.executable, "-m", "experiments.bench_srel", *(sys.argv[1:] if argv is None else argv)]
    ),
    "jax": {},
    "torch": {},
  }
  for variant in args.variants:
    # HAFusion's per-city shape (heads, blocks), then the variant's fusion.
    config = dataclasses.replace(SRELConfig.for_city(args.city), **VARIANTS[variant])
    config = effective_config(config, views)
    for n_seeds in sorted({1, args.seeds}):
      row = time_jax(config, views, n_seeds, args.epochs_per_call, args.repeats)
      results["jax"][f"{variant}_{n_seeds}seed"] = row
      print(
        f"jax {variant:9s} {n_seeds} seed(s): {row['epoch_seconds_median'] * 1e3:8.2f} ms/epoch "
        f"({row['epoch_seconds_per_seed'] * 1e3:.2f} ms per seed-epoch; first call "
        f"{row['first_call_seconds_including_compile']:.1f} s)",
        flush=True,
      )
  if args.torch_python and args.torch_repo:
    for threads in args.torch_threads:
      for flush in (False, True):
        row = time_torch(
          args.torch_python,
          args.torch_repo,
          args.torch_epochs_per_call,
          args.repeats,
          flush,
          threads,
          args.city,
        )
        name = f"hafusion_{threads}thread" + ("_flush_denormal" if flush else "")
        results["torch"][name] = row
        print(
          f"torch {name}: {row['epoch_seconds_median'] * 1e3:8.2f} ms/epoch "
          f"(torch {row['torch_version']})",
          flush=True,
        )
    ratios = {}
    for torch_name, torch_row in results["torch"].items():
      for jax_name, jax_row in results["jax"].items():
        ratios[f"{torch_name} / jax {jax_name} (per seed-epoch)"] = (
          torch_row["epoch_seconds_median"] / jax_row["epoch_seconds_per_seed"]
        )
    results["speedup"] = ratios
    for name, ratio in ratios.items():
      print(f"speed-up {name}: {ratio:.1f}x")
  results["machine"]["load_average_at_end"] = os.getloadavg()
  if args.out:
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(exit_status(main))
