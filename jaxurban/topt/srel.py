"""ToPT's spatial-aware region embedding learning (SREL), Sec. 2.2.2 of the ToPT paper.

The first two stages are HAFusion's (ICDE 2024) and follow the authors'
model code:

1. view encoders (intraAFL): POI and land-use counts are projected to the
   model width by a linear layer + ReLU + dropout, the mobility view enters
   as raw trip counts; each view goes through transformer blocks whose
   attention output is augmented with an "edge" term computed from the
   (head-averaged) attention map, then a DeepFc MLP.
2. inter-view fusion (interAFL + ViewFusion): external-attention blocks
   across the three views, mixed with the intra-view embeddings by two
   learned positive weights, then learned softmax view weights combine the
   three views into one [N, d_model] matrix H~.

The third stage is ToPT's spatially informed inter-region fusion (replacing
HAFusion's RegionFusion transformer):

3. strength centrality c_i = sum_j A_ij of the distance adjacency A,
   max-normalised, linearly projected to d_model and added to H~ (H' of the
   paper); L Graphormer layers whose attention logits get the spatial bias
   B_ij = lambda * A_ij (eq. 1, lambda learnable); each layer has the
   post-norm residual feed-forward of HAFusion's blocks; then the MLPs.

ToPT's public code contains only the prompt stage, so A is
A_ij = exp(-(d_ij / sigma)^2) with d_ij the distance in km between region
centroids, i.e. the R = 1, centre 0, width sigma case of the Gaussian
radial-basis bias of `kernels.biased_attention`.

As in HAFusion the model width d_model equals the number of regions N (the
authors set ``input_dim = region_num``; the view-weight layer mixes the
region axis), and the embedding size d = 144 is reached by the last MLP.
Layers use PyTorch's default initialisation (uniform +-1/sqrt(fan_in) for
linear layers, Xavier-uniform attention input projections, zero biases of
the attention input and output projections, N(0, 0.001^2) for the
external-attention memories) and LayerNorm epsilon 1e-5, so the model
starts where the authors' does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kernels.biased_attention import (
  biased_attention,
  biased_attention_reference,
  spatial_bias_reference,
)

__all__ = [
  "EARTH_RADIUS_KM",
  "SREL",
  "SRELArchitecture",
  "centroids_to_km",
  "dense_biased_attention",
  "edge_pool",
  "edge_pool_reference",
  "gaussian_adjacency",
  "pairwise_distance",
  "spatial_attention",
  "strength_centrality",
]

EARTH_RADIUS_KM = 6371.0088
_LN_EPS = 1e-5  # PyTorch's LayerNorm default
_LEAKY_SLOPE = 0.3  # HAFusion's LeakyReLU slope


# --------------------------------------------------------------------------
# Geometry.


def centroids_to_km(latlon: np.ndarray) -> np.ndarray:
  """(lat, lon) degrees -> planar (x, y) km, equirectangular about the mean latitude.

  Within a city (Chicago spans 40 km) Euclidean distances of these
  coordinates differ from great-circle distances by less than 0.5 % (the
  east-west scale is taken at the mean latitude), and planar coordinates
  are what the biased-attention kernel takes.
  """
  latlon = np.asarray(latlon, dtype=np.float64)
  lat = np.radians(latlon[:, 0])
  lon = np.radians(latlon[:, 1])
  x = EARTH_RADIUS_KM * np.cos(lat.mean()) * (lon - lon.mean())
  y = EARTH_RADIUS_KM * (lat - lat.mean())
  return np.stack([x, y], axis=-1)


def pairwise_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """[Na, Nb] Euclidean distances (the zero diagonal stays exact)."""
  squared = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def gaussian_adjacency(coords: jax.Array, sigma: float) -> jax.Array:
  """A_ij = exp(-(d_ij / sigma)^2), the distance-based adjacency of SREL."""
  return jnp.exp(-((pairwise_distance(coords, coords) / sigma) ** 2))


def strength_centrality(adjacency: jax.Array) -> jax.Array:
  """c_i = sum_j A_ij, max-normalised (Sec. 2.2.2 of the ToPT paper)."""
  strength = jnp.sum(adjacency, axis=-1)
  return strength / jnp.max(strength)


# --------------------------------------------------------------------------
# Spatially biased attention.


# The dense form of eq. (1) is the kernel module's reference (it materialises
# the [H, N, N] bias); `spatial_attention` picks it or the fused kernel.
dense_biased_attention = biased_attention_reference


def plain_attention(q, k, v, scale=None):
  """softmax(scale q k^T) v per head; q, k, v [H, N, D]."""
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  weights = jax.nn.softmax(jnp.einsum("hid,hjd->hij", q, k) * scale, axis=-1)
  return jnp.einsum("hij,hjd->hid", weights, v)


ATTENTION_IMPLEMENTATIONS = ("reference", "kernel", "kernel-interpret")


def spatial_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  coords: jax.Array | None,
  bias_params: dict[str, jax.Array] | None,
  *,
  scale: float | None = None,
  implementation: str = "reference",
) -> jax.Array:
  """Self-attention with the spatial bias of eq. (1) of the ToPT paper.

  Args:
    q, k, v: [H, N, D].
    coords: [N, C] planar coordinates (km), or None for no spatial prior.
    bias_params: None (no bias), or {"rbf_weight": [H, R], "rbf_centres":
      [R], "rbf_width": [R]}; SREL uses R = 1, centre 0, width sigma and
      weight lambda, i.e. B_ij = lambda * exp(-(d_ij / sigma)^2).
    scale: logit scale, default 1 / sqrt(D).
    implementation: "reference" (dense, any device), "kernel" (the fused
      `kernels.biased_attention.biased_attention`, which never materialises
      the [H, N, N] bias on a GPU and uses its own dense reference
      elsewhere) or "kernel-interpret" (the Pallas kernel in interpret mode
      on any backend; slow, for checks).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
    )
  if coords is None or bias_params is None:
    return plain_attention(q, k, v, scale)
  kernel_implementation = {"reference": "reference", "kernel": None}
  return biased_attention(
    q,
    k,
    v,
    coords,
    coords,
    bias_params["rbf_weight"],
    rbf_centres=bias_params["rbf_centres"],
    rbf_width=bias_params["rbf_width"],
    scale=scale,
    implementation=kernel_implementation.get(implementation, "pallas"),
    interpret=implementation == "kernel-interpret",
  )


# --------------------------------------------------------------------------
# The edge term of HAFusion's intra-view attention.


def edge_pool_reference(attention_map: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """[c, N]: sum_j softmax_j(e_cij) e_cij with e_cij = w_c a_ij + b_c (the direct form)."""
  edges = attention_map[None] * w[:, None, None] + b[:, None, None]
  return jnp.sum(jax.nn.softmax(edges, axis=-1) * edges, axis=-1)


def _edge_softmax(attention_map, w):
  """s_cij = softmax_j(w_c a_ij) (b_c cancels) and the mean abar_ci = sum_j s_cij a_ij."""
  # The row maximum of w_c a_ij is w_c max_j a_ij when w_c >= 0 and
  # w_c min_j a_ij otherwise: shifting by it needs no [c, N, N] reduction.
  shift = jnp.where(
    w[:, None] >= 0,
    w[:, None] * jnp.max(attention_map, axis=-1)[None],
    w[:, None] * jnp.min(attention_map, axis=-1)[None],
  )
  unnormalised = jnp.exp(w[:, None, None] * attention_map[None] - shift[:, :, None])
  s = unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)
  return s, jnp.einsum("cij,ij->ci", s, attention_map)


@jax.custom_vjp
def edge_pool(attention_map: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """`edge_pool_reference` as w_c abar_ci + b_c, with a closed-form backward.

  With s = softmax_j(w_c a_ij) and abar_ci = sum_j s_cij a_ij the pooled value
  is w_c abar_ci + b_c, and
    d/da_ij = w_c s_cij (1 + w_c (a_ij - abar_ci)),
    d/dw_c = abar_ci + w_c Var_s(a_i.),   d/db_c = 1.
  Autodiff of the direct form keeps several [c, N, N] intermediates and
  reduces them over c in separate passes; this backward forms s once and
  contracts over c with two products (the edge term took about a third of
  a Chicago SREL epoch before).
  """
  _, abar = _edge_softmax(attention_map, w)
  return w[:, None] * abar + b[:, None]


def _edge_pool_forward(attention_map, w, b):
  return edge_pool(attention_map, w, b), (attention_map, w)


def _edge_pool_backward(saved, g):
  attention_map, w = saved
  s, abar = _edge_softmax(attention_map, w)
  gw = g * w[:, None]  # [c, N]
  # sum_c gw_ci s_cij (1 + w_c (a_ij - abar_ci))
  #   = sum_c s_cij (gw_ci (1 - w_c abar_ci)) + a_ij sum_c s_cij (gw_ci w_c)
  first = jnp.einsum("cij,ci->ij", s, gw * (1.0 - w[:, None] * abar))
  second = jnp.einsum("cij,ci->ij", s, gw * w[:, None])
  grad_map = first + attention_map * second
  second_moment = jnp.einsum("cij,ij->ci", s, attention_map * attention_map)
  variance = jnp.maximum(second_moment - abar * abar, 0.0)
  grad_w = jnp.sum(g * (abar + w[:, None] * variance), axis=-1)
  grad_b = jnp.sum(g, axis=-1)
  return grad_map, grad_w, grad_b


edge_pool.defvjp(_edge_pool_forward, _edge_pool_backward)


# --------------------------------------------------------------------------
# Layers with PyTorch's initialisation.


def _torch_uniform(fan_in: int) -> Callable:
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Linear(nn.Module):
  """y = x W + b with PyTorch's nn.Linear initialisation (unless overridden).

  ``out_by_in`` stores W as [out, in] (PyTorch's layout) and computes
  x W^T: the same function and initial distribution. Worth it when `in` is
  the wide side, as in the feed-forward's second layer (2048 -> N): the
  weight gradient x^T g then comes out [N, 2048] with the long axis
  contiguous, which XLA's CPU dot computes 1.5x faster than [2048, N]
  (0.92 against 1.40 ms for five seeds on Chicago).
  """

  features: int
  use_bias: bool = True
  kernel_init: Callable | None = None
  bias_init: Callable | None = None
  out_by_in: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    init = self.kernel_init or _torch_uniform(fan_in)
    if self.out_by_in:
      kernel = self.param("kernel", init, (self.features, fan_in))
      y = x @ kernel.T
    else:
      kernel = self.param("kernel", init, (fan_in, self.features))
      y = x @ kernel
    if self.use_bias:
      y = y + self.param("bias", self.bias_init or _torch_uniform(fan_in), (self.features,))
    return y


class DeepFc(nn.Module):
  """HAFusion's MLP: Linear(2d), Linear(2d), LeakyReLU, Linear(out), LeakyReLU."""

  features: int

  @nn.compact
  def __call__(self, x):
    width = 2 * x.shape[-1]
    x = Linear(width)(x)
    x = nn.leaky_relu(Linear(width)(x), _LEAKY_SLOPE)
    return nn.leaky_relu(Linear(self.features)(x), _LEAKY_SLOPE)


class _QKV(nn.Module):
  """Joint q/k/v projection of nn.MultiheadAttention: [N, d] -> 3 x [H, N, d/H]."""

  n_heads: int

  @nn.compact
  def __call__(self, x):
    n, d = x.shape
    if d % self.n_heads:
      raise ValueError(f"model width {d} is not divisible by n_heads={self.n_heads}")
    # PyTorch: in_proj_weight [3d, d] Xavier-uniform, in_proj_bias zeros.
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
    bias = self.param("bias", nn.initializers.zeros, (3 * d,))
    qkv = (x @ kernel + bias).reshape(n, 3, self.n_heads, d // self.n_heads)
    q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))
    return q, k, v


def _out_proj(features: int) -> Linear:
  """nn.MultiheadAttention's out_proj: nn.Linear's kernel, but a zero bias.

  PyTorch's `_reset_parameters` zeroes out_proj.bias after nn.Linear has drawn
  it, so the attention output starts unshifted as in the authors' model.
  """
  return Linear(features, kernel_init=_torch_uniform(features), bias_init=nn.initializers.zeros)


def _merge_heads(x):
  h, n, dh = x.shape
  return x.transpose(1, 0, 2).reshape(n, h * dh)


class _FeedForward(nn.Module):
  """The post-norm residual tail shared by HAFusion's blocks and the Graphormer layer."""

  ff_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, attended, deterministic: bool):
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=_LN_EPS)(x + drop(attended))
    hidden = drop(nn.relu(Linear(self.ff_dim)(x)))
    return nn.LayerNorm(epsilon=_LN_EPS)(x + drop(Linear(x.shape[-1], out_by_in=True)(hidden)))


def _softmax_of_large_logits(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis that stays finite when the logits are huge.

  The mobility view enters HAFusion's intra-view attention as raw trip
  counts (up to 3e5 on Chicago), so its logits reach 1e9, where float32's
  spacing is about 100. XLA may fuse the logits into the row maximum and
  into the exponential separately; if the two copies round differently,
  x - max(x) comes out positive by tens to hundreds, exp overflows and the
  step turns NaN (seen with one seed of five after six steps under another
  fusion setting). Clamping x - max(x) at 0 is exact arithmetic otherwise,
  and `jnp.where` passes the gradient of the kept branch whole (a
  `minimum` would halve it at the maximum).
  """
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalised = jnp.exp(jnp.where(shifted > 0.0, 0.0, shifted))
  return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


class IntraViewBlock(nn.Module):
  """HAFusion's intraAFL block: self-attention plus an attention-map edge term.

  The head-averaged attention map a_ij is expanded to c channels
  e^c_ij = w_c a_ij + b_c (a 1x1 convolution); each region i gets
  sum_j softmax_j(e^c_ij) e^c_ij per channel, projected back to d and added
  to the attention output.
  """

  n_heads: int
  edge_channels: int
  ff_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    n, d = x.shape
    q, k, v = _QKV(self.n_heads)(x)
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = _softmax_of_large_logits(jnp.einsum("hid,hjd->hij", q, k) * scale)
    # nn.MultiheadAttention drops attention weights and returns the dropped,
    # head-averaged map, which the edge term then uses.
    weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    attended = _out_proj(d)(_merge_heads(weights @ v))
    attention_map = weights.mean(axis=0)
    # Conv2d(1, c, 1): fan_in = 1.
    w = self.param("edge_weight", _torch_uniform(1), (self.edge_channels,))
    b = self.param("edge_bias", _torch_uniform(1), (self.edge_channels,))
    attended = attended + Linear(d)(edge_pool(attention_map, w, b).T)
    return _FeedForward(self.ff_dim, self.dropout)(x, attended, deterministic)


class InterViewBlock(nn.Module):
  """HAFusion's interAFL block: external attention over the three views.

  x [N, V, d] -> softmax over the view axis of x M_k, renormalised over the
  memory axis, times M_v. No residual, as in the authors' code.
  """

  memory: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=1e-3)
    attn = Linear(self.memory, use_bias=False, kernel_init=init)(x)
    attn = jax.nn.softmax(attn, axis=1)
    attn = attn / jnp.sum(attn, axis=2, keepdims=True)
    return Linear(x.shape[-1], use_bias=False, kernel_init=init)(attn)


class ViewFusion(nn.Module):
  """HAFusion's learned view weights; x [V, N, d] -> softmax weights [V].

  The 1x1 convolution W runs over the region axis (N channels, the feature
  axis as batch); f1 and f2 score each view, and view i gets
  mean_b mean_j LeakyReLU(f1[b, j] + f2[b, i]) before the softmax over i.
  """

  d_prime: int

  @nn.compact
  def __call__(self, x):
    _, n, _ = x.shape
    w = self.param("W", _torch_uniform(n), (n, self.d_prime))
    f1_w = self.param("f1_weight", _torch_uniform(self.d_prime), (self.d_prime,))
    f1_b = self.param("f1_bias", _torch_uniform(self.d_prime), ())
    f2_w = self.param("f2_weight", _torch_uniform(self.d_prime), (self.d_prime,))
    f2_b = self.param("f2_bias", _torch_uniform(self.d_prime), ())
    features = jnp.einsum("vnb,no->bov", x, w)  # [d, d_prime, V]
    f1 = jnp.einsum("bov,o->bv", features, f1_w) + f1_b
    f2 = jnp.einsum("bov,o->bv", features, f2_w) + f2_b
    logits = f1[:, None, :] + f2[:, :, None]  # [b, i, j]
    scores = jnp.mean(nn.leaky_relu(logits, _LEAKY_SLOPE), axis=(0, 2))
    return jax.nn.softmax(scores)


class GraphormerLayer(nn.Module):
  """Self-attention with the spatial bias of eq. (1), then the residual feed-forward."""

  n_heads: int
  ff_dim: int
  dropout: float
  attention_implementation: str = "kernel"
  attention_dropout: bool = False

  @nn.compact
  def __call__(self, x, coords, bias_params, deterministic: bool):
    d = x.shape[-1]
    q, k, v = _QKV(self.n_heads)(x)
    if self.attention_dropout:
      # HAFusion's RegionFusionBlock (nn.MultiheadAttention(dropout=...))
      # drops the attention weights. They exist only in the dense form, so
      # the bias of eq. (1), when there is one, is materialised here.
      logits = jnp.einsum("hid,hjd->hij", q, k) / math.sqrt(q.shape[-1])
      if bias_params is not None:
        logits = logits + spatial_bias_reference(
          coords,
          coords,
          bias_params["rbf_weight"],
          bias_params["rbf_centres"],
          bias_params["rbf_width"],
        )
      weights = jax.nn.softmax(logits, axis=-1)
      weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
      heads = jnp.einsum("hij,hjd->hid", weights, v)
    else:
      # No dropout on the attention weights in ToPT's layers: the fused
      # kernel never forms them.
      heads = spatial_attention(
        q, k, v, coords, bias_params, implementation=self.attention_implementation
      )
    attended = _out_proj(d)(_merge_heads(heads))
    return _FeedForward(self.ff_dim, self.dropout)(x, attended, deterministic)


@dataclasses.dataclass(frozen=True)
class SRELArchitecture:
  """The shape of an SREL model. Defaults: ToPT's crime setting on Chicago.

  `jaxurban.topt.srel_train.SRELConfig` extends it with the training
  settings, so a run's saved config names every field below.

  Attributes:
    embedding_dim: d of the output embeddings E (144 in the paper).
    n_heads: attention heads of the view encoders and the Graphormer layers
      (HAFusion: Chicago 1, New York 4); must divide the region count N.
    n_layers: L, Graphormer layers (ToPT: 2 crime / service calls, 5 check-in).
    intra_layers, inter_layers: HAFusion's intraAFL / interAFL blocks.
    d_prime: width of the view-weight scorer (HAFusion's d').
    memory: external-attention memory size (HAFusion's d_m).
    edge_channels: c of the intraAFL edge term.
    ff_dim: feed-forward width of every attention block (PyTorch's 2048).
    dropout: dropout rate during training (HAFusion: 0.1).
    spatial_bias: add B_ij = lambda A_ij to the Graphormer logits (eq. 1);
      False means no bias (lambda = 0).
    centrality: add the projected strength centrality of A to H~.
    spatial_lambda: initial lambda (ToPT: 0.1 crime, 0.4 check-in, 0.3
      service calls).
    lambda_learnable: lambda is a parameter (else the constant spatial_lambda).
    sigma_km: sigma of A_ij = exp(-(d_ij / sigma)^2). ToPT's code does not
      publish A; 3 km is about 1.4x the median nearest-centroid distance
      between Chicago's community areas (2.1 km), so first neighbours get
      A ~ 0.6 and regions 6 km apart ~ 0.02.
    attention_implementation: see `spatial_attention`.
    attention_dropout: drop the Graphormer layers' attention weights at
      ``dropout`` during training, as HAFusion's region fusion does. The
      fused kernel never forms the weights, so these layers then run the
      dense form (O(N^2) memory) whatever ``attention_implementation`` says.
  """

  embedding_dim: int = 144
  n_heads: int = 1
  n_layers: int = 2
  intra_layers: int = 1
  inter_layers: int = 2
  d_prime: int = 32
  memory: int = 36
  edge_channels: int = 32
  ff_dim: int = 2048
  dropout: float = 0.1
  spatial_bias: bool = True
  centrality: bool = True
  spatial_lambda: float = 0.1
  lambda_learnable: bool = True
  sigma_km: float = 3.0
  attention_implementation: str = "kernel"
  attention_dropout: bool = False

  def __post_init__(self):
    problems = self.problems()
    if problems:
      raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

  def problems(self) -> list[str]:
    """What is wrong with the settings (empty when they are valid)."""
    problems = []
    positive = (
      "embedding_dim",
      "n_heads",
      "intra_layers",
      "inter_layers",
      "d_prime",
      "memory",
      "edge_channels",
      "ff_dim",
    )
    for name in positive:
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.n_layers < 0:
      problems.append(f"n_layers must be >= 0, got {self.n_layers}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"dropout must be in [0, 1), got {self.dropout}")
    # NaN passes a plain comparison, and under jit XLA folds a NaN constant
    # into exp(-(d / sigma)^2) as finite garbage rather than NaN.
    if not (math.isfinite(self.sigma_km) and self.sigma_km > 0):
      problems.append(f"sigma_km must be a finite number > 0, got {self.sigma_km}")
    if not math.isfinite(self.spatial_lambda):
      problems.append(f"spatial_lambda must be a finite number, got {self.spatial_lambda}")
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      problems.append(f"attention_implementation {self.attention_implementation!r} unknown")
    return problems

  def architecture(self) -> "SRELArchitecture":
    """The architecture fields alone (drops what a subclass adds)."""
    names = [f.name for f in dataclasses.fields(SRELArchitecture)]
    return SRELArchitecture(**{name: getattr(self, name) for name in names})


class SREL(nn.Module):
  """ToPT's SREL: HAFusion view encoders and fusion + spatial Graphormer fusion.

  Attributes:
    architecture: the model's sizes and switches (`SRELArchitecture`).
  """

  architecture: SRELArchitecture = SRELArchitecture()

  @nn.compact
  def __call__(
    self,
    poi: jax.Array,
    landuse: jax.Array,
    mobility: jax.Array,
    coords: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, Any]:
    """Runs the model.

    Args:
      poi: [N, P] counts; landuse: [N, L] counts; mobility: [N, N] trip
        counts (the mobility view's features).
      coords: [N, 2] planar centroid coordinates in km, or None (no spatial
        prior and no centrality, e.g. New York).
      deterministic: disable dropout (pass a "dropout" rng when False).

    Returns:
      "embedding" E [N, embedding_dim]; the decoded "source",
      "destination", "poi", "landuse" [N, embedding_dim]; "view_weights" [3].
    """
    arch = self.architecture
    d = mobility.shape[0]  # model width = N, as in HAFusion
    drop = lambda y: nn.Dropout(arch.dropout)(y, deterministic=deterministic)

    # Stage 1: view encoders.
    inputs = (
      drop(nn.relu(Linear(d, name="poi_in")(poi))),
      drop(nn.relu(Linear(d, name="landuse_in")(landuse))),
      mobility,
    )
    encoded = []
    for name, x in zip(("poi", "landuse", "mobility"), inputs):
      for i in range(arch.intra_layers):
        x = IntraViewBlock(
          arch.n_heads, arch.edge_channels, arch.ff_dim, arch.dropout, name=f"{name}_intra_{i}"
        )(x, deterministic)
      encoded.append(DeepFc(d, name=f"{name}_intra_fc")(x))
    intra = jnp.stack(encoded)  # [3, N, d]

    # Stage 2: inter-view fusion.
    x = intra.transpose(1, 0, 2)  # [N, 3, d]
    for i in range(arch.inter_layers):
      x = InterViewBlock(arch.memory, name=f"inter_{i}")(x)
    inter = DeepFc(d, name="inter_fc")(x).transpose(1, 0, 2)
    para1 = self.param("mix_intra", nn.initializers.constant(0.1), (1,))
    para2 = self.param("mix_inter", nn.initializers.constant(0.9), (1,))
    mixed = inter * (para2 / (para1 + para2)) + intra * (para1 / (para1 + para2))
    view_weights = ViewFusion(arch.d_prime, name="view_fusion")(mixed)
    fused = jnp.einsum("v,vnd->nd", view_weights, mixed)  # H~

    # Stage 3: spatially informed inter-region fusion.
    spatial = coords is not None
    h = fused
    if spatial and arch.centrality:
      centrality = strength_centrality(gaussian_adjacency(coords, arch.sigma_km))
      h = h + Linear(d, name="centrality_proj")(centrality[:, None])  # H'
    bias_params = None
    if spatial and arch.spatial_bias:
      if arch.lambda_learnable:
        lam = self.param("spatial_lambda", nn.initializers.constant(arch.spatial_lambda), ())
      else:
        lam = jnp.asarray(arch.spatial_lambda, jnp.float32)
      # B_ij = lambda A_ij, A_ij = exp(-(d_ij / sigma)^2): one radial basis
      # centred at 0 with width sigma, shared by the heads.
      bias_params = {
        "rbf_weight": jnp.broadcast_to(lam, (arch.n_heads, 1)),
        "rbf_centres": jnp.zeros((1,), jnp.float32),
        "rbf_width": jnp.full((1,), arch.sigma_km, jnp.float32),
      }
    for i in range(arch.n_layers):
      h = GraphormerLayer(
        arch.n_heads,
        arch.ff_dim,
        arch.dropout,
        arch.attention_implementation,
        arch.attention_dropout,
        name=f"graphormer_{i}",
      )(h, coords if spatial else None, bias_params, deterministic)
    h = DeepFc(d, name="region_fc")(h)
    embedding = DeepFc(arch.embedding_dim, name="out_fc")(h)

    out = {"embedding": embedding, "view_weights": view_weights}
    for name in ("source", "destination", "poi", "landuse"):
      out[name] = Linear(arch.embedding_dim, name=f"decoder_{name}")(embedding)
    return out
