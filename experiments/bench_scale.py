"""How CoRE's training step scales with the number of regions.

  python -m experiments.bench_scale                       # N = 1k ... 20k
  python -m experiments.bench_scale --sizes 1000 5000 --max-run-gb 8

For each N, two synthetic cities of N regions each (a jittered grid, about 10
destinations per origin drawn with distance-decaying probability) train one
seed with the linear-memory step (neighbour-table GAT, O(N d^2) alignment
losses, mobility loss in row blocks) and with the direct formulation (the
N x N forms of every loss). Every (N, formulation) runs in its own process so
that its peak resident memory can be read. Printed per row: XLA's compiled
memory estimate (arguments + temporaries + outputs, the donated state counted
once), the measured peak RSS of the
process and the median step time over --repeats steps after a warm-up step.
A formulation whose compiled estimate exceeds --max-run-gb is not run and is
reported as out of memory at that budget. On a GPU the memory column is the
device's peak bytes in use, the mobility normaliser goes through the fused
Pallas kernel, and afterwards each kernel's own benchmark prints its time
against its XLA reference and its achieved TFLOP/s against the device's peak
(`--no-kernels` skips that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from experiments.common import positive_int, positive_number


def synthetic_city(n_regions: int, seed: int, destinations: int = 10):
  """Edges (origin, destination, count) of a city on a jittered square grid."""
  rng = np.random.default_rng(seed)
  side = int(np.ceil(np.sqrt(n_regions)))
  rows = -(-n_regions // side)  # the last one may be partly filled
  cell = np.arange(n_regions)
  row, col = cell // side, cell % side
  origin, destination = [], []
  for _ in range(destinations):
    # Distance-decaying trip lengths: exponential in grid steps, random heading.
    length = rng.exponential(3.0, n_regions)
    angle = rng.uniform(0, 2 * np.pi, n_regions)
    r = np.clip(np.rint(row + length * np.sin(angle)), 0, rows - 1).astype(int)
    c = np.clip(np.rint(col + length * np.cos(angle)), 0, side - 1).astype(int)
    target = r * side + c
    # A trip ending past the partly filled last row ends one row up, a region
    # next to where it was headed. (Folding those trips onto the last region
    # made it a hub with hundreds of incoming edges.)
    target = np.where(target < n_regions, target, target - side)
    origin.append(cell)
    destination.append(target)
  origin, destination = np.concatenate(origin), np.concatenate(destination)
  pairs, counts = np.unique(origin * n_regions + destination, return_counts=True)
  origin, destination = np.divmod(pairs, n_regions)
  return origin, destination, counts.astype(np.float64)


def synthetic_city_graph(n_regions: int, seed: int):
  """`synthetic_city` as CoRE's `CityGraph` (weights normalised per origin)."""
  from jaxurban.graph import city_graph

  origin, destination, counts = synthetic_city(n_regions, seed)
  per_origin = counts / np.bincount(origin, counts, n_regions)[origin]
  return city_graph(origin, destination, per_origin, counts, n_regions)


def child(n_regions: int, direct: bool, repeats: int, max_run_gb: float, remat: bool) -> dict:
  """Compiles (and if it fits, runs) one training step; returns the figures."""
  import jax
  import jax.numpy as jnp
  import optax

  from jaxurban.core.train import CoreConfig, build_model, init_params, make_chunk, make_embed_loss

  graphs = [synthetic_city_graph(n_regions, seed) for seed in (0, 1)]
  config = dataclasses.replace(CoreConfig(seeds=1), direct=direct, remat_gat=remat)
  model = build_model(config, *graphs)
  params, keys = init_params(model, jnp.arange(1), *graphs)
  optimizer = optax.adam(config.learning_rate)
  state = (params, jax.vmap(optimizer.init)(params), keys)
  step = make_chunk(make_embed_loss(model, config.loss_settings()), optimizer, 1)
  compiled = step.lower(state, *graphs).compile()
  analysis = compiled.memory_analysis()
  # The state is donated: its outputs reuse the argument buffers (the alias
  # bytes), which would otherwise be counted twice.
  estimate = (
    analysis.argument_size_in_bytes
    + analysis.temp_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
  ) / 2**30
  result = {
    "n_regions": n_regions,
    "direct": direct,
    "compiled_gb": estimate,
    "edges_per_city": int(len(graphs[0].target)),
  }
  if estimate > max_run_gb:
    return result | {"ran": False}
  state, terms = compiled(state, *graphs)
  jax.block_until_ready(terms)
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    state, terms = compiled(state, *graphs)
    jax.block_until_ready(terms)
    times.append(time.perf_counter() - started)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    # On an accelerator the peak that matters is the device's, not the host's.
    peak_gb = stats["peak_bytes_in_use"] / 2**30
  return result | {
    "ran": True,
    "step_ms": 1e3 * statistics.median(times),
    "peak_rss_gb": peak_gb,
    "finite": bool(np.all(np.isfinite(np.asarray(terms["total"])))),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.bench_scale",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--sizes",
    type=positive_int,
    nargs="+",
    default=[1000, 2000, 5000, 10000, 20000],
    help="regions per synthetic city",
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=3, help="timed steps after the warm-up; median"
  )
  parser.add_argument(
    "--max-run-gb",
    type=positive_number,
    default=16.0,
    help="do not run a step whose compiled estimate exceeds this",
  )
  parser.add_argument(
    "--remat-from",
    type=positive_int,
    default=100_000,
    help="from this N on, the linear step recomputes the GAT layers' activations in the "
    "backward pass (CoreConfig.remat_gat: less memory, one more encoder forward)",
  )
  parser.add_argument(
    "--direct-up-to",
    type=int,
    default=None,
    help="compile the direct N x N formulation only up to this N (default: every N)",
  )
  parser.add_argument(
    "--compile-only",
    action="store_true",
    help="print only the compiled memory estimates (no step is run)",
  )
  parser.add_argument(
    "--no-kernels", action="store_true", help="on a GPU, skip the kernels' own benchmarks"
  )
  parser.add_argument("--child", nargs=3, metavar=("N", "DIRECT", "REMAT"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    n, direct, remat = int(args.child[0]), args.child[1] == "1", args.child[2] == "1"
    budget = -1.0 if args.compile_only else args.max_run_gb  # -1: every estimate is over it
    print(json.dumps(child(n, direct, args.repeats, budget, remat)))
    return 0

  print(
    f"{'N':>7} {'formulation':>13} {'edges':>7} {'compiled GiB':>12} {'peak mem GiB':>12} "
    f"{'step ms':>9}",
    flush=True,
  )
  failures = []  # the linear path failing, or any step giving a non-finite loss
  for n in args.sizes:
    for direct in (False, True):
      if direct and args.direct_up_to is not None and n > args.direct_up_to:
        continue
      remat = not direct and n >= args.remat_from
      command = [
        sys.executable,
        "-m",
        "experiments.bench_scale",
        "--repeats",
        str(args.repeats),
        "--max-run-gb",
        str(args.max_run_gb),
        *(["--compile-only"] if args.compile_only else []),
        "--child",
        str(n),
        "1" if direct else "0",
        "1" if remat else "0",
      ]
      done = subprocess.run(command, capture_output=True, text=True)
      name = "direct N x N" if direct else "linear+remat" if remat else "linear"
      if done.returncode != 0:
        tail = [_failure_reason(done.stderr)]
        if not direct:  # the direct form running out of memory is a finding, not a failure
          failures.append(f"{name} N={n}")
        if done.returncode < 0:
          # Killed by a signal: SIGKILL without a message is the kernel's
          # out-of-memory killer as a rule.
          signal_name = signal.Signals(-done.returncode).name
          tail = [
            f"killed by {signal_name}"
            + (" (out of host memory?)" if signal_name == "SIGKILL" else "")
          ]
        print(f"{n:>7} {name:>13}  failed: {tail[0][:100]}", flush=True)
        continue
      row = json.loads(done.stdout.strip().splitlines()[-1])
      if row["ran"]:
        finite = row["finite"]
        if not finite:
          failures.append(f"{name} N={n} (non-finite loss)")
        print(
          f"{n:>7} {name:>13} {row['edges_per_city']:>7} {row['compiled_gb']:>12.2f} "
          f"{row['peak_rss_gb']:>12.2f} {row['step_ms']:>9.1f}"
          + ("" if finite else "  NON-FINITE LOSS"),
          flush=True,
        )
      else:
        why = "compiled only" if args.compile_only else f"over --max-run-gb {args.max_run_gb:g}"
        print(
          f"{n:>7} {name:>13} {row['edges_per_city']:>7} {row['compiled_gb']:>12.2f} "
          f"{'not run':>12}  {why}",
          flush=True,
        )
  import jax

  if jax.default_backend() == "gpu" and not args.no_kernels:
    from kernels import biased_attention, row_lse

    print("\nfused row log-sum-exp kernel against its XLA reference:", flush=True)
    if row_lse.main([]) != 0:
      failures.append("the row log-sum-exp kernel benchmark")
    print("\nspatially biased attention kernel against flash attention:", flush=True)
    if biased_attention.main([]) != 0:
      failures.append("the biased attention kernel benchmark")
  if failures:
    print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1
  return 0


def _failure_reason(stderr: str) -> str:
  """The line of a child's stderr that names its error: the last one of the
  form `SomeError: ...` (JAX ends a traceback with a note of its own), else
  the last line."""
  lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
  errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
  return (errors or lines or ["(no message)"])[-1]


if __name__ == "__main__":
  sys.exit(main())
