"""UrbanMMCL model: multi-modal encoders and the multi-view graph part.

Multi-modal part (Sec. 3.3): a small ViT for images (eqs. 2-7, [CLS]
output), a transformer text encoder over byte tokens (eqs. 8-10, [EOS]
output), a GeoCLIP location encoder of random Fourier features (eq. 11),
symmetric InfoNCE between every present pair that the paper aligns (eqs.
12-13: image-text and image-location; text-location when there are no
images), and fusion of the modality vectors by element-wise addition.

Graph part (Sec. 3.4): per view a VGAE (eqs. 17-21), adaptive random walks
of fixed length on the reconstructed graph (eq. 22), a two-layer GCN on each
walk's subgraph (with a root weight) and a readout that averages the start
node's row with the subgraph mean (eqs. 23-24), InfoNCE between every pair
of views (eq. 25), summed as in eq. (26). The region embedding Z* is the
concatenation of the views' readouts (``view_fusion``); without the graph
part it is the fused modality vector.

Losses are plain functions of arrays; the modules hold no state besides
parameters.
"""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxurban.training import rate_problems
from jaxurban.urbanmmcl.graphs import gcn_normalise
from jaxurban.urbanmmcl.walks import first_visits, random_walks, subgraph_adjacency, top_k_graph

__all__ = [
  "BYTE_PAD",
  "GCN",
  "LocationEncoder",
  "ModelConfig",
  "TextEncoder",
  "UrbanMMCL",
  "VGAE",
  "ViT",
  "encode_texts",
  "equal_earth",
  "info_nce",
  "symmetric_info_nce",
  "total_loss",
  "vgae_kl_loss",
  "vgae_recon_loss",
]

BYTE_PAD = 256  # byte tokens are 0..255; 256 pads


# ----------------------------------------------------------------- losses


def _cosine_logits(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return a @ b.T / temperature


def info_nce(a: jax.Array, b: jax.Array, temperature: float = 0.5) -> jax.Array:
  """Eq. (25): -1/N sum_i log softmax_j(sim(a_i, b_j) / tau)[i], cosine sim."""
  logits = _cosine_logits(a, b, temperature)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))


def symmetric_info_nce(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
  """Eqs. (12)-(13): a-to-b plus b-to-a InfoNCE, each averaged over the N pairs."""
  return info_nce(a, b, temperature) + info_nce(b, a, temperature)


def vgae_recon_loss(target: jax.Array, reconstructed: jax.Array) -> jax.Array:
  """Eq. (20): mean squared error over the N (N - 1) entries off the diagonal.

  The view graphs have no self loops, so their diagonal is 0 by
  construction, which the softplus decoder (a_ii >= ln 2) cannot reach; over
  all N^2 entries that unreachable part was a fifth of the POI view's loss
  and pulled every |z_i| down.
  """
  n = target.shape[-1]
  return jnp.sum(without_diagonal((target - reconstructed) ** 2)) / (n * (n - 1))


def without_diagonal(a: jax.Array) -> jax.Array:
  """[..., N, N] with every [i, i] entry set to 0."""
  return a * (1.0 - jnp.eye(a.shape[-1], dtype=a.dtype))


def vgae_kl_loss(mu: jax.Array, log_sigma: jax.Array) -> jax.Array:
  """Eq. (21) with the 1/N^2 scaling of Kipf & Welling's VGAE code.

  -1/2 * 1/N^2 sum_i sum_j (1 + log sigma_ij^2 - mu_ij^2 - sigma_ij^2).
  The paper's plain sum over nodes outweighs the reconstruction term of eq.
  (20) (a mean over N^2 entries) by a factor ~N^2 and collapses the
  posterior to the prior; the 1/N^2 scale puts both on the same footing.
  """
  terms = 1.0 + 2.0 * log_sigma - mu**2 - jnp.exp(2.0 * log_sigma)
  return -0.5 * jnp.mean(jnp.sum(terms, axis=-1)) / mu.shape[0]


# ------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of UrbanMMCL (defaults are small, CPU-sized).

  Attributes:
    dim: width of every modality vector, of the VGAE latent and of the
      subgraph readout (the paper: 64 for the graph part).
    gcn_hidden: hidden width of the subgraph GCN (paper: 128).
    walk_length: random walk length L (paper: 20).
    walk_top_k: neighbours per node kept in the walk graph.
    graph_temperature: tau of eq. (25) (paper: 0.5).
    mm_temperature: tau of eqs. (12)-(13) (paper, Sec. 4.2.3: 0.5).
    text_dim, text_depth, text_heads: text transformer size.
    bytes_per_token: byte tokens merged into one transformer position (a
      learned projection of the concatenated byte embeddings), to keep the
      sequence short.
    vit_dim, vit_depth, vit_heads, patch_size: ViT size.
    loc_scales: sigma of each random Fourier feature band (GeoCLIP uses
      2^0, 2^4, 2^8 on world coordinates; by default coordinates here are
      standardised within the city first, see `LocationEncoder` and the
      ``location_frame`` of the training config).
    loc_features: random Fourier features per band.
    loc_seed: seed of the fixed random Fourier matrices.
    loc_center, loc_scale: (x - center) / scale of the Equal Earth (x, y):
      the city's mean and largest standard deviation, or (0, 0) and
      180 / SF in GeoCLIP's own frame.
    use_text, use_location, use_images, use_graph: which parts exist.
    use_vgae: False = "w/o VGAE": walks and subgraphs on the input graph.
    use_walks: False = "w/o RW": the GCN runs on the full graph.
    use_graph_contrast: False = "w/o GCL": no eq. (25) terms.
    n_views: number of view graphs.
    view_fusion: how the views' readouts s^(k) form Z*: "concat" (the
      embedding is [s^(P); s^(M); s^(D)], the order of
      `graphs.VIEW_NAMES`, width dim * V) or "mean".
  """

  dim: int = 64
  gcn_hidden: int = 128
  walk_length: int = 20
  walk_top_k: int = 8
  graph_temperature: float = 0.5
  mm_temperature: float = 0.5
  text_dim: int = 32
  text_depth: int = 2
  text_heads: int = 2
  bytes_per_token: int = 8
  vit_dim: int = 64
  vit_depth: int = 2
  vit_heads: int = 4
  patch_size: int = 8
  loc_scales: tuple[float, ...] = (0.25, 1.0, 4.0)
  loc_features: int = 64
  loc_seed: int = 0
  loc_center: tuple[float, float] = (0.0, 0.0)
  loc_scale: float = 1.0
  use_text: bool = True
  use_location: bool = True
  use_images: bool = False
  use_graph: bool = True
  use_vgae: bool = True
  use_walks: bool = True
  use_graph_contrast: bool = True
  n_views: int = 3
  view_fusion: str = "concat"

  def active_losses(self) -> tuple[str, ...]:
    """The loss terms this configuration computes; the others are constant
    zeros (fixed shapes) and are neither logged nor plotted."""
    mods = {"image": self.use_images, "text": self.use_text, "location": self.use_location}
    pairs = (
      mods["image"] and (mods["text"] or mods["location"])
      if mods["image"]
      else mods["text"] and mods["location"]
    )
    graph = self.use_graph
    return tuple(
      name
      for name, on in (
        ("total", True),
        ("mmcl", pairs),
        ("recon", graph and self.use_vgae),
        ("kl", graph and self.use_vgae),
        ("graph_contrast", graph and self.use_graph_contrast and self.n_views > 1),
      )
      if on
    )

  def __post_init__(self):
    if self.view_fusion not in ("concat", "mean"):
      raise ValueError(f"view_fusion must be 'concat' or 'mean', got {self.view_fusion!r}")
    # A NaN or non-positive temperature or scale would train on NaN logits.
    for problem in rate_problems(
      graph_temperature=self.graph_temperature,
      mm_temperature=self.mm_temperature,
      loc_scale=self.loc_scale,
      **{f"loc_scales[{i}]": v for i, v in enumerate(self.loc_scales)},
    ):
      raise ValueError(f"ModelConfig: {problem}")


# ------------------------------------------------------ transformer parts


class _Block(nn.Module):
  """Pre-LN transformer layer, eqs. (3)-(4)."""

  dim: int
  heads: int

  @nn.compact
  def __call__(self, x, mask=None):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(
      y, y, mask=mask
    )
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(y)))
    return x + y


class ViT(nn.Module):
  """Vision transformer, eqs. (2)-(7): patches, [CLS], L layers, [CLS] out.

  Input [B, H, W, C] with H and W multiples of ``patch``; output [B, out].
  """

  dim: int
  depth: int
  heads: int
  patch: int
  out: int

  @nn.compact
  def __call__(self, images):
    b, h, w, _ = images.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {self.patch}")
    # eq. (2): E^vis Flatten(P_j) is a strided convolution.
    x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch))(images)
    x = x.reshape(b, -1, self.dim)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    for _ in range(self.depth):
      x = _Block(self.dim, self.heads)(x)
    return nn.Dense(self.out)(nn.LayerNorm()(x[:, 0]))  # eq. (7)


def encode_texts(texts: list[str], max_bytes: int, bytes_per_token: int) -> np.ndarray:
  """Byte-level tokens [B, T] (UTF-8 bytes, padded with BYTE_PAD).

  T = ``max_bytes`` rounded up to a multiple of ``bytes_per_token``; longer
  texts are cut at T bytes.
  """
  t = -(-max_bytes // bytes_per_token) * bytes_per_token
  out = np.full((len(texts), t), BYTE_PAD, dtype=np.int32)
  for i, text in enumerate(texts):
    raw = np.frombuffer(text.encode("utf-8")[:t], dtype=np.uint8)
    out[i, : raw.size] = raw
  return out


class TextEncoder(nn.Module):
  """Transformer text encoder, eqs. (8)-(10), over byte tokens.

  Groups of ``bytes_per_token`` byte embeddings are concatenated and
  projected to one position; a learned [EOS] vector after the last position
  attends to all non-padding positions and is the text vector (eq. 10).
  """

  dim: int
  depth: int
  heads: int
  bytes_per_token: int
  out: int

  @nn.compact
  def __call__(self, tokens):
    b, t = tokens.shape
    g = self.bytes_per_token
    if t % g:
      raise ValueError(f"token length {t} is not a multiple of bytes_per_token {g}")
    # Padding bytes contribute zeros, so a text's vector does not depend on
    # how much padding follows it (also inside a partly filled byte group).
    e = nn.Embed(BYTE_PAD + 1, self.dim)(tokens) * (tokens != BYTE_PAD)[..., None]
    e = e.reshape(b, t // g, g * self.dim)
    x = nn.Dense(self.dim)(e)  # eq. (8) embedding, one position per byte group
    present = jnp.any((tokens != BYTE_PAD).reshape(b, t // g, g), axis=-1)
    eos = self.param("eos", nn.initializers.normal(0.02), (1, 1, self.dim))
    x = jnp.concatenate([x, jnp.broadcast_to(eos, (b, 1, self.dim))], axis=1)
    present = jnp.concatenate([present, jnp.ones((b, 1), bool)], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
    mask = nn.make_attention_mask(jnp.ones_like(present), present)
    for _ in range(self.depth):
      x = _Block(self.dim, self.heads)(x, mask)
    return nn.Dense(self.out)(nn.LayerNorm()(x[:, -1]))  # eq. (10)


def equal_earth(lat_deg: jax.Array, lon_deg: jax.Array) -> jax.Array:
  """Equal Earth projection (Šavrič et al. 2018) used by GeoCLIP, [..., 2] (x, y)."""
  a1, a2, a3, a4 = 1.340264, -0.081106, 0.000893, 0.003796
  lat = jnp.radians(lat_deg)
  lon = jnp.radians(lon_deg)
  theta = jnp.arcsin(jnp.sqrt(3.0) / 2.0 * jnp.sin(lat))
  t2 = theta * theta
  t6 = t2 * t2 * t2
  x = 2.0 * jnp.sqrt(3.0) * lon * jnp.cos(theta)
  x = x / (3.0 * (9.0 * a4 * t6 * t2 + 7.0 * a3 * t6 + 3.0 * a2 * t2 + a1))
  y = theta * (a4 * t6 * t2 + a3 * t6 + a2 * t2 + a1)
  return jnp.stack([x, y], axis=-1)


class LocationEncoder(nn.Module):
  """GeoCLIP-style location encoder, eq. (11).

  (lat, lon) -> Equal Earth (x, y) -> (x - center) / scale -> per band s a
  fixed random Fourier map [cos(2 pi B_s p), sin(2 pi B_s p)] with
  B_s ~ N(0, sigma_s^2) -> a two-layer MLP per band -> sum over bands.
  The B_s are constants drawn from ``seed`` (not trained), so the encoder is
  a deterministic function of its parameters and input. GeoCLIP applies its
  bands to world coordinates, where a city spans ~1e-3 of the range and its
  code varies smoothly; standardising within the city (``center``,
  ``scale``) lets the bands resolve regions, and at σ = 4 gives neighbouring
  regions unrelated codes (both frames are offered by the training config).
  """

  scales: tuple[float, ...]
  n_features: int
  hidden: int
  out: int
  seed: int = 0
  center: tuple[float, float] = (0.0, 0.0)
  scale: float = 1.0

  @nn.compact
  def __call__(self, coords):
    p = equal_earth(coords[..., 0], coords[..., 1])
    p = (p - jnp.asarray(self.center, p.dtype)) / self.scale
    total = 0.0
    for band, sigma in enumerate(self.scales):
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed), band)
      b = sigma * jax.random.normal(key, (2, self.n_features), p.dtype)
      proj = 2.0 * jnp.pi * p @ b
      h = jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=-1)
      h = nn.Dense(self.out)(nn.relu(nn.Dense(self.hidden)(h)))
      total = total + h
    return total


# ------------------------------------------------------------ graph parts


class GCN(nn.Module):
  """Dense graph convolutions H' = act(P H W + b [+ H W_root]) on [..., n, n] normalised P.

  The bias is added after the propagation, as in Kipf and Welling's GCN (and
  PyTorch Geometric's ``GCNConv``); inside it, P (H W + b), each node's bias
  would be scaled by its row sum of P.

  ``root`` adds a separate weight for each node's own features (the root
  weight of GraphConv). Without it, the dense subgraphs of the walks (every
  pair of visited regions is linked by softplus(z_i . z_j) > 0) average
  each walk into one vector and wash out which region it started from.
  """

  features: tuple[int, ...]
  root: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, propagation, x):
    for i, width in enumerate(self.features):
      bias = self.param(f"bias_{i}", nn.initializers.zeros_init(), (width,))
      h = propagation @ nn.Dense(width, use_bias=False, kernel_init=self.kernel_init)(x) + bias
      x = h + nn.Dense(width, use_bias=False)(x) if self.root else h
      if i < len(self.features) - 1:
        x = nn.leaky_relu(x)
    return x


class VGAE(nn.Module):
  """Eqs. (17)-(19): one-layer GCNs for mu and log sigma, softplus decoder."""

  latent: int

  @nn.compact
  def __call__(self, propagation, x, key, sample: bool):
    # Both heads start at the prior, mu = 0 and sigma = 1 (KL 0), where
    # Kipf and Welling's VGAE starts in effect (one-hot inputs, Glorot
    # weights over thousands of columns). With variance-preserving weights
    # on dense features instead, |mu|^2 ~ 2d put the first reconstruction
    # loss near 400 against targets in [0, 1]; its gradient, thousands of
    # times the multi-modal InfoNCE's on the shared modality encoders,
    # filled their Adam second moment for the whole run, and L_mmcl stayed
    # at chance in the full model.
    start_at_prior = nn.initializers.zeros_init()
    mu = GCN((self.latent,), kernel_init=start_at_prior, name="gcn_mu")(propagation, x)
    log_sigma = GCN((self.latent,), kernel_init=start_at_prior, name="gcn_sigma")(propagation, x)
    log_sigma = jnp.clip(log_sigma, -8.0, 4.0)
    z = mu + jnp.exp(log_sigma) * jax.random.normal(key, mu.shape) if sample else mu  # eq. (18)
    # eq. (19), with the inner product scaled by 1/sqrt(d): from the prior
    # (z ~ N(0, I)) the logits z_i . z_j / sqrt(d) have unit variance, so the
    # decoder starts near the [0, 1] range of the targets.
    return jax.nn.softplus(z @ z.T / jnp.sqrt(self.latent)), mu, log_sigma


class UrbanMMCL(nn.Module):
  """The pre-training model; `__call__` returns (region embeddings, losses).

  Inputs (a dict): ``features`` [N, F] raw region features; ``propagation``
  [V, N, N] the GCN normalisation of each view A; ``target`` [V, N, N] the
  reconstruction targets A / s and ``target_scale`` [V] the scales s;
  optional ``tokens`` [N, T] bytes, ``coords`` [N, 2] (lat, lon), ``images``
  [N, H, W, C].
  """

  config: ModelConfig

  def _modalities(self, inputs) -> dict[str, jax.Array]:
    c = self.config
    out = {}
    if c.use_images:
      out["image"] = ViT(c.vit_dim, c.vit_depth, c.vit_heads, c.patch_size, c.dim, name="vit")(
        inputs["images"]
      )
    if c.use_text:
      out["text"] = TextEncoder(
        c.text_dim, c.text_depth, c.text_heads, c.bytes_per_token, c.dim, name="text"
      )(inputs["tokens"])
    if c.use_location:
      out["location"] = LocationEncoder(
        c.loc_scales,
        c.loc_features,
        2 * c.dim,
        c.dim,
        c.loc_seed,
        c.loc_center,
        c.loc_scale,
        name="location",
      )(inputs["coords"])
    return out

  def _mmcl_loss(self, mods: dict[str, jax.Array]) -> jax.Array:
    tau = self.config.mm_temperature
    if "image" in mods:  # eq. (14): image-text and image-location
      pairs = [("image", m) for m in ("text", "location") if m in mods]
    else:  # no images: the remaining pair
      pairs = [("text", "location")] if {"text", "location"} <= mods.keys() else []
    loss = jnp.zeros(())
    for a, b in pairs:
      loss = loss + symmetric_info_nce(mods[a], mods[b], tau)
    return loss

  @nn.compact
  def __call__(self, inputs, key, train: bool = True):
    c = self.config
    mods = self._modalities(inputs)
    fused = sum(mods.values()) if mods else None  # element-wise addition fusion
    losses = {"mmcl": self._mmcl_loss(mods)}
    zero = jnp.zeros(())
    if not c.use_graph:
      losses.update(recon=zero, kl=zero, graph_contrast=zero)
      if fused is None:
        raise ValueError("a model without the graph part needs at least one modality")
      return fused, losses

    # Node features X of eq. (17): raw features plus the fused modalities.
    x = nn.Dense(c.dim, name="input")(inputs["features"])
    if fused is not None:
      # The fused vector is layer-normalised so that its scale (free under
      # the cosine InfoNCE of eqs. 12-13) cannot swamp the raw features,
      # whose magnitudes carry each region's activity level.
      x = x + nn.LayerNorm(name="fused_norm")(fused)
    propagation, target = inputs["propagation"], inputs["target"]
    target_scale = inputs["target_scale"]
    n_views = propagation.shape[0]
    key_vgae, key_walk = jax.random.split(key)
    recon, kl, learned = zero, zero, []
    for v in range(n_views):
      if c.use_vgae:
        a_hat, mu, log_sigma = VGAE(c.dim, name=f"vgae_{v}")(
          propagation[v], x, jax.random.fold_in(key_vgae, v), train
        )
        recon = recon + vgae_recon_loss(target[v], a_hat)
        kl = kl + vgae_kl_loss(mu, log_sigma)
        # The decoder fits A / s; its estimate of A (eq. 19) is s times that.
        learned.append(a_hat * target_scale[v])
      else:  # "w/o VGAE": the fixed input topology A
        learned.append(target[v] * target_scale[v])
    learned = jnp.stack(learned)  # [V, N, N]

    readouts = []
    if c.use_walks:
      walk_graph = jax.lax.stop_gradient(top_k_graph(learned, c.walk_top_k))
      nodes, valid = random_walks(key_walk, walk_graph, c.walk_length)  # all views at once
      members = first_visits(nodes, valid)
      for v in range(n_views):
        # eq. (23): subgraph edges carry the learned weights (differentiable).
        sub = subgraph_adjacency(learned[v], nodes[v], members[v])
        prop = gcn_normalise(sub) * (members[v][:, :, None] & members[v][:, None, :])
        h = GCN((c.gcn_hidden, c.dim), root=True, name=f"subgraph_gcn_{v}")(prop, x[nodes[v]])
        w = members[v].astype(h.dtype)[..., None]
        # eq. (24): READOUT = mean of the subgraph's nodes, averaged with the
        # start node's own row so that the readout stays centred on region i.
        readouts.append(0.5 * (h[:, 0] + jnp.sum(h * w, axis=1) / jnp.sum(w, axis=1)))
    else:  # "w/o RW": the GCN on the whole learned graph, one output per node
      for v in range(n_views):
        # Without the decoder's diagonal, as the walk branch's graph: the
        # ablation then changes only how the neighbourhood is sampled.
        prop = gcn_normalise(without_diagonal(learned[v]))
        readouts.append(GCN((c.gcn_hidden, c.dim), root=True, name=f"subgraph_gcn_{v}")(prop, x))

    contrast = zero
    if c.use_graph_contrast:
      for a, b in itertools.combinations(range(n_views), 2):  # eq. (26): (P, M), (P, D), (M, D)
        contrast = contrast + info_nce(readouts[a], readouts[b], c.graph_temperature)
    losses.update(recon=recon, kl=kl, graph_contrast=contrast)
    # Z* of Sec. 3.5.1: the graph part's output. The fused modalities are
    # its node features X (eq. 16 feeds Sec. 3.4), so they reach Z* through
    # the graph encoders.
    if c.view_fusion == "concat":  # keeps what is specific to each view
      return jnp.concatenate(readouts, axis=-1), losses
    return sum(readouts) / n_views, losses


def total_loss(losses: dict[str, jax.Array], alpha: float, beta: float) -> jax.Array:
  """Eq. (27): alpha L_mmcl + beta L_mvgcl, L_mvgcl from eq. (26)."""
  mvgcl = losses["recon"] + losses["kl"] + losses["graph_contrast"]
  return alpha * losses["mmcl"] + beta * mvgcl
