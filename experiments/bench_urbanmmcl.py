"""Times one UrbanMMCL pre-training epoch on New York, and the walk sampling.

  python -m experiments.bench_urbanmmcl [--repeats 20] [--data-root DIR]

New York has no geo-text and no centroids, so the benchmark gives every
region a synthetic text (random bytes of the Chicago texts' length) and a
synthetic centroid inside the New York bounding box; with them the epoch
runs the text, location and graph parts with all three views (the distance
view from the synthetic centroids), the largest configuration. One epoch =
one full-batch jitted train step (forward, backward, AdamW update, state
donated). Reported: the median over repeats after compilation, and the
median time of one jitted `random_walks` call for all nodes of all views.
The machine's load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import exit_status, positive_int
from jaxurban.data.hafusion import load_city_views
from jaxurban.urbanmmcl.graphs import build_view_graphs, raw_features
from jaxurban.urbanmmcl.model import ModelConfig, UrbanMMCL, encode_texts, equal_earth
from jaxurban.urbanmmcl.train import UrbanMMCLConfig, make_train_step
from jaxurban.urbanmmcl.walks import random_walks, top_k_graph

_NY_BOX = ((40.50, 40.92), (-74.26, -73.70))  # (lat range, lon range)


def synthetic_ny_inputs(data_root, config: UrbanMMCLConfig, seed: int = 0):
  views = load_city_views("NY", data_root)
  rng = np.random.default_rng(seed)
  n = views.n_regions
  lat = rng.uniform(*_NY_BOX[0], size=n)
  lon = rng.uniform(*_NY_BOX[1], size=n)
  views = dataclasses.replace(views, centroids=np.stack([lat, lon], 1))
  graphs = build_view_graphs(views)
  texts = [
    "".join(chr(c) for c in rng.integers(32, 127, size=config.text_max_bytes)) for _ in range(n)
  ]
  coords = views.centroids.astype(np.float32)
  xy = np.asarray(equal_earth(coords[:, 0], coords[:, 1]))
  model = dataclasses.replace(
    config.model,
    use_text=True,
    use_location=True,
    n_views=len(graphs.names),
    loc_center=tuple(float(v) for v in xy.mean(0)),
    loc_scale=float(xy.std(0).max()),
  )
  inputs = {
    "features": raw_features(views),
    **graphs.model_inputs(),
    "tokens": encode_texts(texts, config.text_max_bytes, model.bytes_per_token),
    "coords": coords,
  }
  return {k: jnp.asarray(v) for k, v in inputs.items()}, model


def _median_time(fn, repeats: int) -> float:
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.bench_urbanmmcl",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--repeats", type=positive_int, default=20, help="timed epochs after the warm-up; median"
  )
  parser.add_argument("--data-root", default=None, help="data folder (default: $JAXURBAN_DATA)")
  args = parser.parse_args(argv)
  config = UrbanMMCLConfig(city="NY", data_root=args.data_root)
  inputs, model_config = synthetic_ny_inputs(args.data_root, config)
  model = UrbanMMCL(model_config)
  key = jax.random.PRNGKey(0)
  params = model.init(key, inputs, key, train=True)
  tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  state = {"params": params, "opt": tx.init(params)}
  step = jax.jit(make_train_step(model, tx, config.alpha, config.beta), donate_argnums=(0, 1))

  start = time.perf_counter()
  state["params"], state["opt"], losses = step(state["params"], state["opt"], inputs, key)
  jax.block_until_ready(losses)
  compile_s = time.perf_counter() - start

  def one_epoch(i):
    state["params"], state["opt"], out = step(
      state["params"], state["opt"], inputs, jax.random.PRNGKey(i)
    )
    return out

  epoch_s = _median_time(one_epoch, args.repeats)

  weights = top_k_graph(jnp.asarray(inputs["target"]), ModelConfig.walk_top_k)
  walk = jax.jit(random_walks, static_argnames=("length",))
  jax.block_until_ready(walk(key, weights, length=model_config.walk_length))
  walk_s = _median_time(
    lambda i: walk(jax.random.PRNGKey(i), weights, length=model_config.walk_length), args.repeats
  )

  n_views, n = inputs["target"].shape[:2]
  print(
    f"New York: {n} regions, {n_views} views, text {inputs['tokens'].shape[1]} bytes, location, graph"
  )
  print(f"devices: {jax.devices()}, cpu count {os.cpu_count()}, load average {os.getloadavg()}")
  print(f"first call (compile + 1 epoch): {compile_s:.2f} s")
  print(f"pre-training epoch (median of {args.repeats}, after compilation): {epoch_s * 1e3:.1f} ms")
  print(
    f"random walks, all {n} nodes x {n_views} views, length {model_config.walk_length} "
    f"(median of {args.repeats}): {walk_s * 1e3:.2f} ms"
  )


if __name__ == "__main__":
  sys.exit(exit_status(main))
