"""Time and memory of one UrbanPG batch as the node count grows, linear vs softmax attention.

    python -m experiments.bench_urbanpg --nodes 716,2352,3834,8600 [--repeats 3]
        [--softmax-max-gb 6] [--out results.json]

The paper's LargeST graphs (716 / 2352 / 3834 / 8600 nodes) are not available,
so each N gets synthetic 5-minute speeds for one week with their structure:
daily and weekly periodicity with per-node amplitude and phase, spatially
correlated fluctuations (a Gaussian distance kernel from every node to 32
latent sources, each an AR(1) series), white noise and 5% missing readings.

Every (N, attention) pair runs in its own child process, so its peak resident
memory (ru_maxrss) is its own. The child compiles the train step and the
inference step for a batch of 64 windows (12 steps in, 12 out), reads XLA's
compiled memory estimate (arguments + outputs + temporaries - aliased), then
runs each step once to warm up and `repeats` times, reporting the median.
A softmax run whose compiled estimate exceeds --softmax-max-gb is not
executed (its estimate is still printed): its N x N scores would not fit in
this machine's memory next to other work.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from experiments.common import (
  checked_output_file,
  exit_status,
  positive_int,
  positive_int_list,
  positive_number,
)
from jaxurban.atomic import write_json_atomic
from jaxurban.data.traffic import STEPS_PER_DAY

BATCH = 64
T_IN = T_OUT = 12
ATTENTION_FORMS = ("linear", "softmax")


def _attention_list(text: str) -> list[str]:
  """argparse type: comma-separated attention forms out of ATTENTION_FORMS."""
  forms = text.split(",")
  unknown = [form for form in forms if form not in ATTENTION_FORMS]
  if unknown:
    raise argparse.ArgumentTypeError(
      f"unknown attention form(s) {', '.join(unknown)}; choose from {', '.join(ATTENTION_FORMS)}"
    )
  return forms


def synthetic_traffic(n_nodes: int, n_steps: int = 7 * STEPS_PER_DAY, seed: int = 0):
  """Speeds [T, N] (0 = missing), mask, time-of-day and day-of-week, float32."""
  rng = np.random.default_rng(seed)
  coords = rng.uniform(0.0, 50.0, (n_nodes, 2))  # km
  sources = rng.uniform(0.0, 50.0, (32, 2))
  distance = np.linalg.norm(coords[:, None] - sources[None], axis=-1)
  kernel = np.exp(-0.5 * (distance / 8.0) ** 2)
  kernel /= kernel.sum(1, keepdims=True) + 1e-9
  latent = np.zeros((n_steps, len(sources)))
  shocks = rng.normal(0.0, 1.0, latent.shape)
  for t in range(1, n_steps):
    latent[t] = 0.95 * latent[t - 1] + shocks[t]
  t = np.arange(n_steps)[:, None]
  day = 2 * np.pi * t / STEPS_PER_DAY
  week = 2 * np.pi * t / (7 * STEPS_PER_DAY)
  base = rng.uniform(45.0, 65.0, n_nodes)
  daily = rng.uniform(3.0, 15.0, n_nodes) * np.cos(day - rng.uniform(0, 2 * np.pi, n_nodes))
  weekly = rng.uniform(1.0, 5.0, n_nodes) * np.cos(week - rng.uniform(0, 2 * np.pi, n_nodes))
  speed = base + daily + weekly + 2.0 * latent @ kernel.T + rng.normal(0, 1.5, (n_steps, n_nodes))
  speed = np.clip(speed, 1.0, 80.0)
  mask = rng.uniform(size=speed.shape) >= 0.05
  tod = (t[:, 0] % STEPS_PER_DAY).astype(np.int32)
  dow = ((t[:, 0] // STEPS_PER_DAY) % 7).astype(np.int32)
  return np.where(mask, speed, 0.0).astype(np.float32), mask, tod, dow


def _median_seconds(fn, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _compiled_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )


def child(n_nodes: int, attention: str, repeats: int, max_gb: float) -> dict:
  """Measures one (N, attention) pair in this process."""
  import jax

  from jaxurban.data.traffic import Scaler
  from jaxurban.urbanpg import train

  config = train.UrbanPGConfig(attention=attention, shard_batch=False, batch_size=BATCH)
  speed, mask, tod, dow = synthetic_traffic(n_nodes)
  scaler = Scaler.fit(speed, mask)
  scaled = scaler.transform(speed, mask)
  starts = np.random.default_rng(1).choice(len(speed) - T_IN - T_OUT + 1, BATCH, replace=False)
  inputs = starts[:, None] + np.arange(T_IN)
  targets = inputs + T_IN
  batch = {
    "x": scaled[inputs],
    "x_mask": mask[inputs],
    "y": speed[targets],
    "y_mask": mask[targets].astype(np.float32),
    "time_of_day": tod[starts + T_IN - 1],
    "day_of_week": dow[starts + T_IN - 1],
    "weight": np.ones(BATCH, np.float32),
  }
  batch = jax.device_put(batch)
  model = train.build_model(config, n_nodes)
  params = train.init_params(model, config, jax.random.PRNGKey(0))
  optimizer = train.make_optimizer(params, train.everything, config.learning_rate, config)
  step = train.make_train_step(model, scaler, optimizer)
  predict = train.make_predict(model)
  state = (params, optimizer.init(params), jax.random.PRNGKey(1))
  train_bytes = _compiled_bytes(step.lower(state, batch).compile())
  infer_bytes = _compiled_bytes(predict.lower(params, batch).compile())
  result = {
    "nodes": n_nodes,
    "attention": attention,
    "params": int(sum(x.size for x in jax.tree.leaves(params))),
    "train_compiled_gb": None if train_bytes is None else train_bytes / 2**30,
    "infer_compiled_gb": None if infer_bytes is None else infer_bytes / 2**30,
  }
  if train_bytes is not None and train_bytes / 2**30 > max_gb:
    result["skipped"] = f"compiled estimate above {max_gb} GiB"
    return result
  holder = {"state": state}

  def train_once():
    holder["state"], loss = step(holder["state"], batch)
    return loss

  result["train_s"] = _median_seconds(train_once, repeats)
  result["infer_s"] = _median_seconds(lambda: predict(holder["state"][0], batch), repeats)
  result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return result


def _fmt(value, digits=3):
  return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.bench_urbanpg", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--nodes",
    type=positive_int_list,
    default="716,2352,3834,8600",
    help="comma-separated node counts (716,2352,3834,8600)",
  )
  parser.add_argument(
    "--attention",
    type=_attention_list,
    default="linear,softmax",
    help="comma-separated attention forms: linear, softmax or both (linear,softmax)",
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=3, help="timed steps after the warm-up; median"
  )
  parser.add_argument(
    "--softmax-max-gb",
    type=positive_number,
    default=6.0,
    help="do not run a softmax step whose compiled estimate exceeds this",
  )
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  checked_output_file(parser, args.out)
  if args.child:
    n, attention = args.child.split(":")
    limit = args.softmax_max_gb if attention == "softmax" else float("inf")
    print("RESULT " + json.dumps(child(int(n), attention, args.repeats, limit)), flush=True)
    return 0
  rows = []
  print(f"batch {BATCH}, {T_IN} steps in / {T_OUT} out; median of {args.repeats} after warm-up")
  # Size by size, both forms one after the other: their ratio is taken on
  # the machine as it was within minutes, not across the whole run.
  for n in args.nodes:
    by_form = {}
    for attention in args.attention:
      command = [sys.executable, "-m", "experiments.bench_urbanpg", "--child", f"{n}:{attention}"]
      command += ["--repeats", str(args.repeats), "--softmax-max-gb", str(args.softmax_max_gb)]
      done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
      line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
      if done.returncode or not line:
        row = {"nodes": n, "attention": attention, "error": done.stderr.strip()[-400:]}
      else:
        row = json.loads(line[0][len("RESULT ") :])
      rows.append(row)
      by_form[attention] = row
      print(
        f"{attention:>8} N={n:>5}  train {_fmt(row.get('train_s'))} s  "
        f"infer {_fmt(row.get('infer_s'))} s  peak RSS {_fmt(row.get('peak_rss_gb'), 2)} GiB  "
        f"compiled train {_fmt(row.get('train_compiled_gb'), 2)} GiB / "
        f"infer {_fmt(row.get('infer_compiled_gb'), 2)} GiB"
        + (f"  ({row['skipped']})" if "skipped" in row else "")
        + (f"  ERROR {row['error']}" if "error" in row else ""),
        flush=True,
      )
    linear, softmax = by_form.get("linear", {}), by_form.get("softmax", {})
    if linear.get("train_s") and softmax.get("train_s"):
      print(
        f"   N={n:>5}  softmax / linear: train {softmax['train_s'] / linear['train_s']:.2f}x, "
        f"infer {softmax['infer_s'] / linear['infer_s']:.2f}x",
        flush=True,
      )
  if args.out:
    write_json_atomic(
      args.out,
      {
        "settings": vars(args) | {"child": None},
        "machine": {
          "platform": platform.platform(),
          "cpu_count": os.cpu_count(),
          "load_average_at_end": os.getloadavg(),
          # The parent never imports jax: the children measure their own memory.
          "jax_version": importlib.metadata.version("jax"),
        },
        "rows": rows,
      },
    )
  failed = [f"{r['attention']} N={r['nodes']}" for r in rows if "error" in r]
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main))
