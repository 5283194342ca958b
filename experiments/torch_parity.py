"""Same parameters, same anchors: does jaxurban's CoRE equal the authors' code?

Two halves, run one after the other (the first in the torch environment of
experiments/torch_reference.py, the second in jaxurban's):

  /path/to/torch-venv/bin/python -m experiments.torch_parity torch \\
      --repo /path/to/CoRE --data-root DATA --out parity.npz
  python -m experiments.torch_parity jax --data-root DATA --out parity.npz

The torch half builds the authors' model at its initialisation (seed 0),
evaluates the embeddings, the losses and the gradient of the total loss of
their train.py with a fixed set of anchors, and saves it all. The jax half
loads the same parameters into jaxurban's CoRE (layouts converted) and prints
the largest differences of embeddings, loss and gradients.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# numpy-only: importable beside torch without jax.
from experiments.common import exit_status
from jaxurban.data.errors import DataError
from jaxurban.atomic import atomic_write

HEADS, FEATURES = 8, 128


def torch_half(args) -> None:
  import torch

  from experiments.torch_reference import build_model, import_core_class, seed_everything

  seed_everything(0)
  model, _, _ = build_model(import_core_class(args.repo), args.data_root, "xa", "cd")
  out = {"param/" + k: v.detach().numpy() for k, v in model.state_dict().items()}
  with torch.no_grad():
    z_x, z_y = model.get_region_emb()
  torch.manual_seed(123)
  out["anchors"] = torch.randn(1000, FEATURES).numpy()
  torch.manual_seed(123)  # their cross_align draws the same anchors again
  losses = model.forward(sample_num=1000)
  total = sum(losses)
  total.backward()
  out.update(
    {"grad/" + k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
  )
  arrays = dict(z_x=z_x.numpy(), z_y=z_y.numpy(), total=total.item(), **out)
  atomic_write(args.out, lambda f: np.savez(f, **arrays))
  print(f"wrote {args.out}: total loss {total.item():.6f}")


def _to_jax_params(saved) -> dict:
  def layer(prefix):
    kernel = saved[prefix + ".lin.weight"]  # [H C, d_in]
    return {
      "kernel": kernel.reshape(HEADS, FEATURES, -1).transpose(0, 2, 1),
      "att_src": saved[prefix + ".att_src"][0],
      "att_dst": saved[prefix + ".att_dst"][0],
      "att_edge": saved[prefix + ".att_edge"][0],
      "edge_kernel": saved[prefix + ".lin_edge.weight"].reshape(HEADS, FEATURES),
      "bias": saved[prefix + ".bias"],
    }

  def encoder(city, prefix):
    return {
      "inputs": saved[f"{city}_region_emb.weight"],
      "gat_0": layer(prefix + ".0"),
      "gat_1": layer(prefix + ".1"),
    }

  return {
    "prelu_slope": saved["activation.weight"][0],
    "encoder_x": encoder("s", "gat_s"),
    "encoder_y": encoder("t", "gat_t"),
    "w_q": saved["wq.weight"].T,
    "b_q": saved["wq.bias"],
    "w_k": saved["wk.weight"].T,
    "b_k": saved["wk.bias"],
  }


def jax_half(args) -> None:
  import jax
  import jax.numpy as jnp

  from jaxurban.core import losses
  from jaxurban.core.model import LossSettings, mobility_losses
  from jaxurban.core.train import CoreConfig, build_model, load_city_graph

  if not os.path.isfile(args.out):
    raise DataError(args.out, "no such file: run the torch side first, which writes it")
  file = np.load(args.out)
  saved = lambda prefix: {k[len(prefix) :]: file[k] for k in file.files if k.startswith(prefix)}
  params = jax.tree.map(jnp.asarray, _to_jax_params(saved("param/")))
  _, graph_x = load_city_graph("xa", args.data_root)
  _, graph_y = load_city_graph("cd", args.data_root)
  model = build_model(CoreConfig(), graph_x, graph_y)
  anchors = jnp.asarray(file["anchors"])

  def total(p):
    z_x, z_y, query_key = model.apply({"params": p}, graph_x, graph_y)
    terms = mobility_losses(z_x, z_y, graph_x, graph_y, LossSettings())
    return (
      terms["re_x"]
      + terms["re_y"]
      + losses.lma_lowrank(z_x, z_y, anchors)
      + losses.lia_lowrank(z_x, z_y, *query_key)
    ), (z_x, z_y)

  (value, (z_x, z_y)), grads = jax.value_and_grad(total, has_aux=True)(params)
  scale = float(np.abs(file["z_x"]).max())
  print(
    f"embeddings: max |ours - theirs| {float(np.abs(z_x - file['z_x']).max()):.2e} (X), "
    f"{float(np.abs(z_y - file['z_y']).max()):.2e} (Y); largest |z| {scale:.3f}"
  )
  print(f"total loss: ours {float(value):.6f}, theirs {float(file['total']):.6f}")
  theirs = jax.tree.map(
    np.asarray,
    _to_jax_params(saved("grad/")) | {"prelu_slope": saved("grad/")["activation.weight"][0]},
  )
  flat_ours = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  for path, ours in flat_ours:
    reference = np.asarray(flat_theirs[path]).reshape(np.shape(ours))
    error = np.linalg.norm(np.asarray(ours) - reference) / max(np.linalg.norm(reference), 1e-30)
    print(f"  gradient {jax.tree_util.keystr(path):40s} relative error {error:.1e}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "side", choices=("torch", "jax"), help="torch: save their values; jax: compare ours to them"
  )
  parser.add_argument("--repo", help="checkout of the authors' repository (torch side)")
  parser.add_argument("--data-root", required=True, help="folder holding core/<city>/")
  parser.add_argument(
    "--out", default="parity.npz", help="file the torch half writes and the jax half reads"
  )
  args = parser.parse_args(argv)
  if args.side == "torch" and not args.repo:
    parser.error("the torch side needs --repo, a checkout of the authors' repository")
  (torch_half if args.side == "torch" else jax_half)(args)
  return 0


if __name__ == "__main__":
  sys.exit(exit_status(main))
