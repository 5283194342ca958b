"""CoRE: two city encoders, a shared cross-city attention, and the loss of eq. (13)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxurban.core import losses
from jaxurban.sharding import constrain_rows
from jaxurban.core.gat import GATEncoder, _uniform
from jaxurban.graph import CityGraph


class QueryKey(NamedTuple):
  """W^q, W^k of eq. (11), with the biases of the authors' ``nn.Linear``."""

  w_q: jax.Array
  b_q: jax.Array
  w_k: jax.Array
  b_k: jax.Array


class CoRE(nn.Module):
  """Embeds the regions of cities X and Y; returns (Z^X, Z^Y, W^q/W^k)."""

  n_regions_x: int
  n_regions_y: int
  features: int = 128
  heads: int = 8
  layers: int = 2
  implementation: str = "tables"
  remat: bool = False

  @nn.compact
  def __call__(self, city_x: CityGraph, city_y: CityGraph):
    # One PReLU for both encoders, initialised at 0.25 like torch.nn.PReLU.
    slope = self.param("prelu_slope", nn.initializers.constant(0.25), ())
    encoder = lambda n, name: GATEncoder(
      n, self.features, self.heads, self.layers, self.implementation, self.remat, name=name
    )
    z_x = encoder(self.n_regions_x, "encoder_x")(city_x, slope)
    z_y = encoder(self.n_regions_y, "encoder_y")(city_y, slope)
    # torch.nn.Linear's default initialisation, U(+-1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(self.features)
    shape = (self.features, self.features)
    query_key = QueryKey(
      w_q=self.param("w_q", _uniform(bound), shape),
      b_q=self.param("b_q", _uniform(bound), (self.features,)),
      w_k=self.param("w_k", _uniform(bound), shape),
      b_k=self.param("b_k", _uniform(bound), (self.features,)),
    )
    return z_x, z_y, query_key


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """What enters eq. (13) and in which form.

  Attributes:
    alpha: weight of the latent manifold alignment loss (0 disables it).
    beta: weight of the latent individual alignment loss (0 disables it).
    n_anchors: N_a, fresh Gaussian anchors drawn every step.
    form: "authors" or "paper" (see `jaxurban.core.losses`).
    direct: use the N x N reference forms instead of the O(N d^2) ones.
    logits_budget: most elements of the mobility loss's [rows, N] logits
      held at once; larger cities are processed in row blocks. The same
      budget bounds the loss's [edges, d] gathers of the edges' embeddings.
    mesh: a `jaxurban.sharding.REGIONS` mesh over which the mobility loss's
      rows and edges and the anchors are split (None: one device).
    lse_implementation: the mobility loss's row normaliser: None (the fused
      Pallas kernel on a GPU, row-blocked XLA elsewhere), "xla", "pallas" or
      "pallas-interpret" (see `jaxurban.core.losses.row_logsumexp`).
  """

  alpha: float = 1.0
  beta: float = 1.0
  n_anchors: int = 1000
  form: str = "authors"
  direct: bool = False
  logits_budget: int = 1 << 24
  mesh: Mesh | None = None
  lse_implementation: str | None = None

  def edge_chunk(self, n_edges: int, features: int) -> int | None:
    """Edge block of the mobility loss's pair term, None when all edges fit.

    With a mesh the block is a multiple of its size, as in `row_chunk`.
    """
    if n_edges * features <= self.logits_budget:
      return None
    devices = 1 if self.mesh is None else self.mesh.devices.size
    return max(1, self.logits_budget // (features * devices)) * devices

  def row_chunk(self, n_rows: int, n_regions: int) -> int | None:
    """Row block of the mobility loss, None when all rows fit the budget.

    With a mesh the block is a multiple of its size, so that every device
    takes an equal share of each block.
    """
    if n_rows * n_regions <= self.logits_budget:
      return None
    devices = 1 if self.mesh is None else self.mesh.devices.size
    return max(1, self.logits_budget // (n_regions * devices)) * devices


def alignment_losses(
  z_x, z_y, query_key: QueryKey, key: jax.Array, settings: LossSettings
) -> dict[str, jax.Array]:
  """LMA (eq. 9) and LIA (eq. 12) for a pair of embeddings."""
  out = {}
  if settings.direct:
    if settings.alpha:
      out["lma"] = losses.lma_direct(z_x, z_y, _anchors(key, z_x, settings), settings.form)
    if settings.beta:
      out["lia"] = losses.lia_direct(z_x, z_y, *query_key, form=settings.form)
    return out
  # Both losses see a city only through Z^T Z and Z^T 1 (computed once here).
  moments_x, moments_y = losses.city_moments(z_x), losses.city_moments(z_y)
  if settings.alpha:
    out["lma"] = losses.lma_from_moments(
      moments_x, moments_y, _anchors(key, z_x, settings), settings.form
    )
  if settings.beta:
    out["lia"] = losses.lia_from_moments(moments_x, moments_y, *query_key, form=settings.form)
  return out


def _anchors(key: jax.Array, z: jax.Array, settings: LossSettings) -> jax.Array:
  """N_a fresh standard Gaussian anchors in the latent space (Sec. 3.2.1)."""
  anchors = jax.random.normal(key, (settings.n_anchors, z.shape[-1]), z.dtype)
  return constrain_rows(anchors, settings.mesh)


def mobility_losses(
  z_x, z_y, city_x: CityGraph, city_y: CityGraph, settings: LossSettings
) -> dict[str, jax.Array]:
  """L^RE of eq. (4) for both cities."""

  def one(z, city):
    if settings.direct:
      target = jnp.zeros((city.n_regions, city.n_regions), z.dtype)
      target = target.at[city.target_origin, city.target_destination].add(city.target)
      return losses.mobility_loss_direct(z, target)
    return losses.mobility_loss(
      z,
      city.origin_rows,
      city.row_weight,
      city.target_origin,
      city.target_destination,
      city.target,
      settings.row_chunk(len(city.origin_rows), city.n_regions),
      settings.mesh,
      settings.lse_implementation,
      settings.edge_chunk(len(city.target), z.shape[-1]),
    )

  return {"re_x": one(z_x, city_x), "re_y": one(z_y, city_y)}


def total_loss(terms: dict[str, jax.Array], settings: LossSettings) -> jax.Array:
  """Eq. (13): (L^RE_X + L^RE_Y) + alpha L^LMA + beta L^LIA."""
  total = terms.get("re_x", 0.0) + terms.get("re_y", 0.0)
  total = total + settings.alpha * terms.get("lma", 0.0)
  return total + settings.beta * terms.get("lia", 0.0)
