"""Speed of a CoRE training epoch on a city pair, side by side.

  python -m experiments.bench_core --pair XA-CD
  python -m experiments.bench_core --pair XA-CD --seeds 1 5 --variants default direct segment
  python -m experiments.bench_core --pair XA-CD \\
      --torch-python /path/to/torch-venv/bin/python --torch-repo /path/to/CoRE
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      python -m experiments.bench_core --pair XA-CD --seeds 6 --shard-seeds

Every figure is the median over --repeats timed calls of a jitted chunk of
--chunk epochs (after one warm-up call that compiles), divided by the chunk
length: milliseconds per epoch for all seeds together, and per seed.
Variants: "default" (GAT neighbour tables, O(N d^2) alignment losses),
"direct" (the N x N reference forms of the losses), "segment" (jraph
segment-sum GAT). With --torch-python/--torch-repo the authors' PyTorch code
runs in a subprocess on the same data in the same invocation (see
experiments/torch_reference.py), and the ratio is printed. With
--shard-seeds the seeds are split over all devices (their count must divide
the seed count), as `experiments.core_align --shard-seeds` trains them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from experiments.common import check_torch_flags, exit_status, positive_int
from jaxurban import sharding
from jaxurban.core.train import (
  CoreConfig,
  build_model,
  init_params,
  load_city_graph,
  make_chunk,
  make_embed_loss,
)

VARIANTS = {
  "default": {},
  "direct": {"direct": True},
  "segment": {"gat_implementation": "segment"},
}


def time_variant(
  config: CoreConfig, graph_x, graph_y, chunk_length: int, repeats: int
) -> tuple[float, float]:
  """(compile seconds, median ms per epoch for all seeds together)."""
  model = build_model(config, graph_x, graph_y)
  seeds = jnp.arange(config.seeds)
  params, keys = init_params(model, seeds, graph_x, graph_y)
  optimizer = optax.adam(config.learning_rate)
  state = (params, jax.vmap(optimizer.init)(params), keys)
  if config.shard_seeds:
    mesh = sharding.seed_mesh()
    state = sharding.shard_seeds(state, mesh)
    graph_x, graph_y = sharding.replicate((graph_x, graph_y), mesh)
  chunk = make_chunk(make_embed_loss(model, config.loss_settings()), optimizer, chunk_length)
  started = time.perf_counter()
  state, terms = chunk(state, graph_x, graph_y)
  jax.block_until_ready(terms)
  compile_seconds = time.perf_counter() - started
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    state, terms = chunk(state, graph_x, graph_y)
    jax.block_until_ready(terms)
    times.append((time.perf_counter() - started) / chunk_length * 1e3)
  return compile_seconds, statistics.median(times)


def time_torch(args, city_dirs: tuple[pathlib.Path, pathlib.Path]) -> float | None:
  """Median ms/epoch of the authors' code, from its own timing.json.

  ``city_dirs`` are the folders jaxurban read (the data root's, or the
  download cache's), so that both sides train on the same files.
  """
  with tempfile.TemporaryDirectory() as out:
    command = [
      args.torch_python,
      "-m",
      "experiments.torch_reference",
      "--repo",
      args.torch_repo,
      # Absolute, since the child runs from the repository's root.
      "--city-dirs",
      *(str(pathlib.Path(folder).resolve()) for folder in city_dirs),
      "--pair",
      args.pair,
      "--epochs",
      str(args.torch_epochs),
      "--threads",
      str(args.torch_threads),
      "--timing-only",
      "--out",
      out,
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=pathlib.Path(__file__).parents[1])
    return json.loads((pathlib.Path(out) / "timing.json").read_text())["median_ms"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.bench_core",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--pair", default="XA-CD", help="SOURCE-TARGET city codes")
  parser.add_argument(
    "--data-root",
    default=os.environ.get("JAXURBAN_DATA"),
    help="data folder (default: $JAXURBAN_DATA)",
  )
  parser.add_argument(
    "--seeds", type=positive_int, nargs="+", default=[1, 5], help="seed counts to time"
  )
  parser.add_argument(
    "--variants",
    nargs="+",
    choices=sorted(VARIANTS),
    default=["default", "direct"],
    help="what to time (see above)",
  )
  parser.add_argument("--chunk", type=positive_int, default=10, help="epochs per timed call")
  parser.add_argument(
    "--repeats", type=positive_int, default=5, help="timed calls after the warm-up; median"
  )
  parser.add_argument("--shard-seeds", action="store_true", help="split the seeds over all devices")
  parser.add_argument(
    "--torch-python", default=None, help="Python of a torch environment, to time theirs too"
  )
  parser.add_argument("--torch-repo", default=None, help="checkout of the authors' CoRE")
  parser.add_argument(
    "--torch-epochs",
    type=positive_int,
    default=30,
    help="epochs of theirs to run; the first 5 are warm-up",
  )
  parser.add_argument(
    "--torch-threads",
    type=positive_int,
    # The cores this process may run on (taskset), not every core of the host.
    default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    help="threads of the authors' code (default: the cores this process may use)",
  )
  args = parser.parse_args(argv)
  check_torch_flags(parser, args, "Model/CoRE.py")
  if args.torch_python and args.torch_epochs <= 5:
    parser.error(
      f"--torch-epochs {args.torch_epochs}: the authors' code times the epochs after 5 warm-up ones"
    )
  uneven = [s for s in args.seeds if s % jax.device_count()]
  if args.shard_seeds and uneven:
    parser.error(
      f"--shard-seeds: seed counts {uneven} cannot be split over {jax.device_count()} devices"
    )
  cities = args.pair.split("-")
  if len(cities) != 2:
    parser.error(f"--pair takes two city codes joined by '-', e.g. XA-CD; got {args.pair!r}")
  city_x, city_y = (c.lower() for c in cities)
  loaded = [load_city_graph(city, args.data_root) for city in (city_x, city_y)]
  (data_x, graph_x), (data_y, graph_y) = loaded
  with_od = [city.name for city in (data_x, data_y) if city.od_flow is not None]
  if args.torch_python and with_od:
    # Ours would train on the full OD counts, the authors' harness on the
    # `.mob` stand-in: not the same work.
    parser.error(
      f"{', '.join(with_od)}: an OD count file is present, which jaxurban trains on and the "
      "authors' harness (on the .mob weights) does not; time the two on a copy without it"
    )
  print(
    f"jax {jax.__version__} on {jax.devices()}, {os.cpu_count()} CPU cores"
    f"{', seeds split over the devices' if args.shard_seeds else ''}; "
    f"{args.pair}: N = {graph_x.n_regions} / {graph_y.n_regions}",
    flush=True,
  )

  rows = []
  for variant in args.variants:
    for seeds in args.seeds:
      config = dataclasses.replace(
        CoreConfig(city_x=city_x, city_y=city_y, seeds=seeds, shard_seeds=args.shard_seeds),
        **VARIANTS[variant],
      )
      compile_s, ms = time_variant(config, graph_x, graph_y, args.chunk, args.repeats)
      rows.append((variant, seeds, compile_s, ms))
      print(
        f"{variant:>8}  seeds {seeds}:  {ms:8.1f} ms/epoch  "
        f"({ms / seeds:7.1f} ms per seed-epoch; first call {compile_s:.1f} s)",
        flush=True,
      )
  if args.torch_python and args.torch_repo:
    torch_ms = time_torch(args, (data_x.source_dir, data_y.source_dir))
    print(
      f"authors' PyTorch code: {torch_ms:.1f} ms/epoch (one seed, {args.torch_threads} threads)"
    )
    for variant, seeds, _, ms in rows:
      print(
        f"  speed-up of {variant}, {seeds} seed(s): {torch_ms / (ms / seeds):.1f}x per seed-epoch"
      )
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main))
