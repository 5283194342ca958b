"""Same parameters, same inputs: does jaxurban's SREL in HAFusion's setting
equal the authors' HAFusion?

Two halves, run one after the other (the first with a Python that has torch,
beside a checkout of the authors' repository):

  python experiments/srel_torch_harness.py --repo /path/to/HAFusion --city Chi --parity parity.npz
  python -m experiments.srel_parity parity.npz

The torch half saves their model at its initialisation in float64 with
dropout off (every parameter, the inputs it read, its outputs, loss and
gradients). This half loads those parameters into `jaxurban.topt.srel.SREL`
built with HAFusion's settings for the city (`SRELConfig.for_city`), runs it
in float64 on the same inputs, and prints the largest differences of the
embeddings, the decoder outputs, the loss and the gradient of every
parameter. It exits with status 1 when a difference exceeds the tolerances
below. Dropout is off on both sides: the two frameworks draw different
masks, so only the deterministic function can be compared.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np

from experiments.common import exit_status
from jaxurban.data.errors import DataError

# Largest relative difference accepted (float64 on both sides). The mobility
# view's attention logits reach ~1e9, where float64 rounds at ~1e-7: its
# gradients agree to ~1e-8 relative, everything else to ~1e-12.
OUTPUT_TOLERANCE = 1e-9
GRADIENT_TOLERANCE = 1e-6

# Their settings of the block counts (intra-view, inter-view, region fusion).
_TORCH_LAYER_SETTINGS = ("NO_IntraAFL", "NO_InterAFL", "NO_RegionFusion")
_INPUTS = (
  "poi",
  "landuse",
  "mobility_features",
  "mobility_target",
  "poi_similarity",
  "landuse_similarity",
)

# How a torch tensor's layout becomes the Flax parameter's, and back.
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
  "same": (lambda a: a, lambda a: a),
  "transpose": (lambda a: a.T, lambda a: a.T),  # nn.Linear [out, in] -> kernel [in, out]
  "conv_kernel": (lambda a: a[:, :, 0].T, lambda a: a.T[:, :, None]),  # Conv1d [out, in, 1]
  "conv_row": (lambda a: a[0, :, 0], lambda a: a[None, :, None]),  # Conv1d [1, in, 1]
  "one": (lambda a: a.reshape(()), lambda a: a.reshape(1)),  # a [1] bias as a scalar
  "channels": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1, 1, 1)),  # Conv2d(1, c, 1)
}


def _linear(ours: tuple, theirs: str, out_by_in: bool = False) -> Iterator:
  yield ours + ("kernel",), theirs + ".weight", "same" if out_by_in else "transpose"
  yield ours + ("bias",), theirs + ".bias", "same"


def _deep_fc(ours: str, theirs: str) -> Iterator:
  # nn.Sequential(Linear, Linear, LeakyReLU, Linear, LeakyReLU): Linears at 0, 1, 3.
  for i, j in enumerate((0, 1, 3)):
    yield from _linear((ours, f"Linear_{i}"), f"{theirs}.model.{j}")


def _attention_block(ours: str, theirs: str) -> Iterator:
  yield (ours, "_QKV_0", "kernel"), f"{theirs}.self_attn.in_proj_weight", "transpose"
  yield (ours, "_QKV_0", "bias"), f"{theirs}.self_attn.in_proj_bias", "same"
  yield from _linear((ours, "Linear_0"), f"{theirs}.self_attn.out_proj")
  tail = (ours, "_FeedForward_0")
  for i in (0, 1):
    yield tail + (f"LayerNorm_{i}", "scale"), f"{theirs}.norm{i + 1}.weight", "same"
    yield tail + (f"LayerNorm_{i}", "bias"), f"{theirs}.norm{i + 1}.bias", "same"
  yield from _linear(tail + ("Linear_0",), f"{theirs}.linear1")
  yield from _linear(tail + ("Linear_1",), f"{theirs}.linear2", out_by_in=True)


def parameter_names(intra_layers: int, inter_layers: int, region_layers: int) -> Iterator:
  """(Flax path, torch name, layout) of every parameter of HAFusion."""
  yield from _linear(("poi_in",), "densePOI2")
  yield from _linear(("landuse_in",), "denseLandUse3")
  for ours, theirs in (("poi", "POI"), ("landuse", "LandUse"), ("mobility", "Mob")):
    for i in range(intra_layers):
      block, name = f"{ours}_intra_{i}", f"encoder{theirs}.blocks.{i}"
      yield from _attention_block(block, name)
      yield from _linear((block, "Linear_1"), f"{name}.proj")
      yield (block, "edge_weight"), f"{name}.expand.weight", "channels"
      yield (block, "edge_bias"), f"{name}.expand.bias", "same"
    yield from _deep_fc(f"{ours}_intra_fc", f"encoder{theirs}.fc")
  for i in range(inter_layers):
    yield (
      (f"inter_{i}", "Linear_0", "kernel"),
      f"interViewEncoder.blocks.{i}.mk.weight",
      "transpose",
    )
    yield (
      (f"inter_{i}", "Linear_1", "kernel"),
      f"interViewEncoder.blocks.{i}.mv.weight",
      "transpose",
    )
  yield from _deep_fc("inter_fc", "interViewEncoder.fc")
  yield ("mix_intra",), "para1", "same"
  yield ("mix_inter",), "para2", "same"
  yield ("view_fusion", "W"), "viewFusionLayer.W.weight", "conv_kernel"
  for f in ("f1", "f2"):
    yield ("view_fusion", f"{f}_weight"), f"viewFusionLayer.{f}.weight", "conv_row"
    yield ("view_fusion", f"{f}_bias"), f"viewFusionLayer.{f}.bias", "one"
  for i in range(region_layers):
    yield from _attention_block(f"graphormer_{i}", f"regionFusionLayer.blocks.{i}")
  yield from _deep_fc("region_fc", "regionFusionLayer.fc")
  yield from _deep_fc("out_fc", "fc")
  for ours, theirs in (("source", "s"), ("destination", "t"), ("poi", "p"), ("landuse", "l")):
    yield from _linear((f"decoder_{ours}",), f"decoder_{theirs}")


def to_flax(tensors: dict[str, np.ndarray], names: list) -> dict:
  """Nested Flax parameters from torch-named arrays (every name must be there)."""
  params: dict = {}
  for path, name, layout in names:
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _LAYOUTS[layout][0](np.asarray(tensors[name]))
  return params


def to_torch(params: dict, names: list) -> dict[str, np.ndarray]:
  """The inverse of `to_flax`: torch-named arrays from Flax parameters."""
  tensors = {}
  for path, name, layout in names:
    node = params
    for key in path:
      node = node[key]
    tensors[name] = _LAYOUTS[layout][1](np.asarray(node))
  return tensors


def _relative(ours, theirs, floor: float = 0.0) -> float:
  """max |ours - theirs| over max |theirs|, or over `floor` where that is
  no larger than 1e-12 * `floor` (an array of rounding noise)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  own = float(np.max(np.abs(theirs)))
  denominator = own if own > 1e-12 * floor else floor
  return float(np.max(np.abs(ours - theirs))) / max(denominator, 1e-300)


def compare(path: str) -> bool:
  """Prints the differences; True when all are within the tolerances."""
  import jax

  with jax.enable_x64(True):
    return _compare(path)


def _compare(path: str) -> bool:
  import jax
  import jax.numpy as jnp

  from jaxurban.topt import srel_train
  from jaxurban.topt.srel_losses import srel_loss

  if not os.path.isfile(path):
    raise DataError(path, "no such file: run the torch side first, which writes it")
  with np.load(path) as file:
    saved = {k: file[k] for k in file.files}
  required = [
    "loss",
    *(f"setting/{k}" for k in ("city", "torch_version", *_TORCH_LAYER_SETTINGS, "NO_head")),
    *(f"input/{k}" for k in _INPUTS),
    *(f"output/{k}" for k in ("embedding", "source", "destination", "poi", "landuse")),
  ]
  missing = [k for k in required if k not in saved]
  if missing:
    raise DataError(path, f"not a file of srel_torch_harness.py --parity: no {missing}")
  group = lambda prefix: {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
  setting = group("setting/")
  city = str(setting["city"])
  try:
    config = srel_train.SRELConfig.for_city(city, **srel_train.HAFUSION_TRAINING)
  except ValueError as error:
    raise DataError(path, f"city {city!r}: {error}") from None
  theirs_layers = tuple(int(setting[k]) for k in _TORCH_LAYER_SETTINGS)
  ours_layers = (config.intra_layers, config.inter_layers, config.n_layers)
  if theirs_layers != ours_layers or int(setting["NO_head"]) != config.n_heads:
    raise DataError(
      path,
      f"their {city} setting has {theirs_layers} blocks and {int(setting['NO_head'])} heads, "
      f"ours {ours_layers} and {config.n_heads}",
    )
  names = list(parameter_names(*ours_layers))
  expected = {name for _, name, _ in names}
  for kind in ("param/", "grad/"):
    found = set(group(kind))
    if found != expected:
      raise DataError(
        path,
        f"{kind[:-1]} names differ from HAFusion's: without a Flax counterpart "
        f"{sorted(found - expected)}, missing {sorted(expected - found)}",
      )
  params = jax.tree.map(jnp.asarray, to_flax(group("param/"), names))
  inputs = {k: jnp.asarray(v, jnp.float64) for k, v in group("input/").items()}
  model = srel_train.build_model(config)
  template = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    inputs["poi"],
    inputs["landuse"],
    inputs["mobility_features"],
    None,
  )["params"]
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if shapes(template) != shapes(params):
    raise DataError(path, "the parameters' shapes do not fit SREL built for these inputs")

  def loss(p):
    out = model.apply(
      {"params": p}, inputs["poi"], inputs["landuse"], inputs["mobility_features"], None
    )
    targets = (inputs[k] for k in ("mobility_target", "poi_similarity", "landuse_similarity"))
    return srel_loss(out, *targets)[0], out

  (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  ok = True
  print(f"{city}, torch {setting['torch_version']}, float64, dropout off")
  for name, theirs in group("output/").items():
    error = _relative(out[name], np.reshape(theirs, out[name].shape))
    ok &= error <= OUTPUT_TOLERANCE
    print(f"  {name:12s} max |ours - theirs| / max |theirs| {error:.1e}")
  error = abs(float(value) - float(saved["loss"])) / abs(float(saved["loss"]))
  ok &= error <= OUTPUT_TOLERANCE
  print(f"  loss: ours {float(value):.10g}, theirs {float(saved['loss']):.10g} ({error:.1e})")
  # A leaf whose gradient is rounding noise (HAFusion's view-scorer f1 gets
  # exactly 0: it shifts every view's score alike) is compared against the
  # largest gradient of all instead of its own.
  flat_theirs = to_flax(group("grad/"), names)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(flat_theirs))
  worst = []
  for (path_keys, ours), theirs in zip(
    jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(flat_theirs)
  ):
    worst.append((_relative(ours, theirs, scale), jax.tree_util.keystr(path_keys)))
  worst.sort(reverse=True)
  ok &= worst[0][0] <= GRADIENT_TOLERANCE
  print(f"  gradients of {len(worst)} parameters; the largest relative differences:")
  for error, name in worst[:5]:
    print(f"    {name:55s} {error:.1e}")
  print("parity holds" if ok else "PARITY FAILS: a difference exceeds its tolerance")
  return ok


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("parity", help="the .npz that srel_torch_harness.py --parity wrote")
  args = parser.parse_args(argv)
  return 0 if compare(args.parity) else 1


if __name__ == "__main__":
  sys.exit(exit_status(main))
