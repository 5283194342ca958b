"""UrbanPG: personalized context prompts around a general backbone.

Shapes: B samples, N nodes, T_in input steps, T_out output steps, d hidden
features, h heads of width d / h.

* `ContextPrompts` holds every parameter whose shape depends on the scenario
  (the node count N and the sampling frequency f): the time embeddings
  E_tod [f, d] and E_dow [7, d] of eq. 3 (E_tod written as a shared row E_t
  [d] plus per-slot offsets), the spatial embedding E_s [N, d] and the shared
  embedding E_d [d] of the random perturbation (eq. 4).
* `Backbone` holds everything else; its parameters do not depend on N or f,
  which is what lets few-shot and continual learning freeze it (eqs. 8-10).

The spatio-temporal context attention (eq. 6) is linear in N: the d x d
key-value summaries phi(K)^T V, phi(P_t)^T V and phi(P_s)^T V are built first
and then read by phi(Q), so no N x N array exists. ``attention="softmax"``
swaps in the exact softmax form of eq. 6's first line (N x N scores) for the
scale benchmark; it is the same backbone otherwise.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
  "ATTENTIONS",
  "Backbone",
  "ContextPrompts",
  "UrbanPG",
  "linear_context_attention",
  "prompt_gate",
  "softmax_context_attention",
]

ATTENTIONS = ("linear", "softmax")


def linear_context_attention(q, k, v, p_t, p_s):
  """Eq. 6 of the UrbanPG paper in O(N d^2), the prompts as extra keys.

  Inputs are [B, N, h, e] (the prompts may be [B, 1, h, e]: one per sample,
  shared by its nodes). phi is the softmax feature map over the e features
  of each query, key and prompt row, so phi(q) . phi(k) > 0 is a kernel
  standing in for exp(q . k). The keys are the N rows of K, of P_t and of
  P_s, all carrying the values V, and the output is the kernel-weighted mean

      phi(Q) (A_h + A_t + A_s) / phi(Q) (z_h + z_t + z_s),
      A_x = phi(X)^T V  (e x e),  z_x = phi(X)^T 1  (e),

  i.e. the bracket of eq. 6 divided by the row sums that the softmax of its
  first line implies. The division keeps the output a convex combination of
  V's rows, so its scale does not grow with N and a backbone trained on one
  node count can be used on another. No N x N array is formed.
  """
  keys = [jax.nn.softmax(jnp.broadcast_to(t, v.shape[:2] + t.shape[2:]), -1) for t in (k, p_t, p_s)]
  phi_k = keys[0] + keys[1] + keys[2]
  # One summary for the three key sets: sum_x phi(X)^T V = (sum_x phi(X))^T V.
  a = jnp.einsum("bnhk,bnhv->bhkv", phi_k, v)
  z = jnp.sum(phi_k, axis=1)  # [B, h, e]
  phi_q = jax.nn.softmax(q, axis=-1)
  numerator = jnp.einsum("bnhk,bhkv->bnhv", phi_q, a)
  denominator = jnp.einsum("bnhk,bhk->bnh", phi_q, z)[..., None]
  return numerator / denominator


def softmax_context_attention(q, k, v, p_t, p_s):
  """Eq. 6 first line: Softmax(Q K^T + Q P_t^T + Q P_s^T) V, with N x N scores.

  The three key sets enter as one sum of logits, scaled by 1/sqrt(e) as in
  ordinary attention. O(N^2 d) time and O(N^2) memory per head and sample.
  """
  scale = q.shape[-1] ** -0.5
  keys = k + p_t + p_s  # the prompts broadcast when shared by all nodes
  logits = jnp.einsum("bnhk,bmhk->bhnm", q * scale, keys)
  return jnp.einsum("bhnm,bmhv->bnhv", jax.nn.softmax(logits, axis=-1), v)


def prompt_gate(h, p_t, p_s):
  """Prompt adjustment, eq. 7: H^p = (H (1 + P_t) + P_s) P_t, elementwise."""
  return (h * (1.0 + p_t) + p_s) * p_t


class ContextPrompts(nn.Module):
  """Personalized context prompts P_t [B, 1 or N, d] and P_s [B, N, d] (eqs. 3, 4).

  Attributes:
    n_nodes: N, rows of the spatial embedding E_s.
    features: d.
    steps_per_day: f, rows of E_tod.
    days_per_week: w, rows of E_dow.
    p, q: replacement ratios of eq. 4 (p = 0 disables the perturbation).
    noise_std: standard deviation of the fresh noise M_d.
  """

  n_nodes: int
  features: int
  steps_per_day: int = 288
  days_per_week: int = 7
  p: float = 0.1
  q: float = 0.5
  noise_std: float = 0.1

  @nn.compact
  def __call__(self, time_of_day, day_of_week, batch: int, train: bool):
    init = nn.initializers.xavier_uniform()
    # Eq. 3's time-of-day table is held as E_t + E_tod[slot]: one shared row
    # E_t, drawn at the scale Xavier gives an [f, d] table, plus per-slot
    # offsets that start at zero. Any table can be written this way, so the
    # model is eq. 3's; what changes is the start. A slot no training window
    # shows (a few-shot target trained on part of one day) keeps offset zero
    # and reads E_t, which every window trains, where a randomly drawn row
    # would stay an untrained vector multiplying the gate of eq. 7. E_t is
    # drawn, not zero, so that the model starts where a Xavier-drawn table
    # would: at P_t = 0 the gate of eq. 7 would pass no gradient to the
    # attention and MLP branches it multiplies until P_t had moved (P_t
    # itself would still train, its gradient there being H + P_s).
    bound = (6.0 / (self.steps_per_day + self.features)) ** 0.5
    e_t = self.param(
      "E_t",
      lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound),
      (self.features,),
    )
    e_tod = self.param("E_tod", nn.initializers.zeros, (self.steps_per_day, self.features))
    # E_dow starts at zero for the same reason: a series shorter than two
    # weeks, split in time, evaluates on weekdays no training window shows
    # (Los-loop covers one week), and their rows never move from the start.
    # From zero such a day adds nothing to P_t.
    e_dow = self.param("E_dow", nn.initializers.zeros, (self.days_per_week, self.features))
    e_s = self.param("E_s", init, (self.n_nodes, self.features))
    e_d = self.param("E_d", nn.initializers.normal(0.1), (self.features,))
    shape = (batch, self.n_nodes)
    # Eq. 3: the time slot of the last input step indexes both tables. A
    # per-sample index [B] gives one prompt per sample, [B, 1, d], shared by
    # its nodes (no [B, N, d] gather, whose gradient would be a large
    # scatter); a per-node index [B, N] gives [B, N, d].
    tod = time_of_day.reshape(batch, -1)
    dow = day_of_week.reshape(batch, -1)
    p_t = e_t + e_tod[tod] + e_dow[dow]
    p_s = jnp.broadcast_to(e_s, shape + (self.features,))
    if train and self.p > 0:
      # Eq. 4: node n of each sample keeps E_s^(n) with probability 1 - p,
      # takes the shared E_d with probability p q, fresh noise otherwise.
      key = self.make_rng("perturb")
      u_key, m_key = jax.random.split(key)
      u = jax.random.uniform(u_key, shape)[..., None]
      noise = self.noise_std * jax.random.normal(m_key, shape + (self.features,))
      p_s = jnp.where(u < self.p * self.q, e_d, jnp.where(u < self.p, noise, p_s))
    return p_t, p_s


def last_observed(x: jax.Array, x_mask: jax.Array) -> jax.Array:
  """Each (sample, node)'s last observed input, [B, N]; 0 (the scaled mean) if none.

  The same reading as the last-value baseline (`baselines.last_value`).
  """
  t_in = x.shape[1]
  observed = x_mask.astype(bool)
  last = t_in - 1 - jnp.argmax(observed[:, ::-1, :], axis=1)  # [B, N]
  value = jnp.take_along_axis(x, last[:, None, :], axis=1)[:, 0, :]
  return jnp.where(observed.any(axis=1), value, 0.0)


class Backbone(nn.Module):
  """The general backbone: its parameter shapes depend only on T_in, T_out, d.

  Per layer: Q, K, V = Linear(H) (eq. 5); context attention (eq. 6); output
  projection; prompt gate (eq. 7); residual and layer norm; MLP whose output
  is gated by the prompts again (eq. 7 applied to the feed-forward output,
  as the paper's text says); residual and layer norm. A final linear layer
  maps each node's d features to T_out steps.

  With ``last_value_skip`` (not in the paper) the node's last observed input
  is added to all T_out outputs, so the layers learn the change from it
  rather than the level: at 5-minute steps the last value is already a
  strong forecast (see the build notes for both forms' figures).
  """

  t_out: int
  features: int = 64
  heads: int = 4
  layers: int = 1
  mlp_ratio: int = 2
  attention: str = "linear"
  last_value_skip: bool = False

  @nn.compact
  def __call__(self, x, x_mask, p_t, p_s):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention {self.attention!r} not in {ATTENTIONS}")
    if self.features % self.heads:
      raise ValueError(f"features {self.features} not divisible by heads {self.heads}")
    batch, _, n = x.shape
    # Input projection: each node's history and its observation mask.
    series = jnp.concatenate([x, x_mask.astype(x.dtype)], axis=1).transpose(0, 2, 1)
    h = nn.Dense(self.features, name="input")(series)
    heads = (batch, -1, self.heads, self.features // self.heads)
    attend = linear_context_attention if self.attention == "linear" else softmax_context_attention
    for i in range(self.layers):
      qkv = nn.Dense(3 * self.features, name=f"qkv_{i}")(h)
      q, k, v = (t.reshape(heads) for t in jnp.split(qkv, 3, axis=-1))
      h_st = attend(q, k, v, p_t.reshape(heads), p_s.reshape(heads)).reshape(h.shape)
      h_st = nn.Dense(self.features, name=f"attn_out_{i}")(h_st)
      h = nn.LayerNorm(name=f"norm_attn_{i}")(h + prompt_gate(h_st, p_t, p_s))
      m = nn.Dense(self.mlp_ratio * self.features, name=f"mlp_in_{i}")(h)
      m = nn.Dense(self.features, name=f"mlp_out_{i}")(nn.gelu(m))
      h = nn.LayerNorm(name=f"norm_mlp_{i}")(h + prompt_gate(m, p_t, p_s))
    out = nn.Dense(self.t_out, name="output")(h).transpose(0, 2, 1)
    if self.last_value_skip:
      out = out + last_observed(x, x_mask)[:, None, :]
    return out


class UrbanPG(nn.Module):
  """Prompts + backbone: ``(x, x_mask, tod, dow) -> [B, T_out, N]`` scaled forecasts.

  Parameters live in two subtrees, ``prompts`` and ``backbone``, so that a
  paradigm can freeze one by name. ``train=True`` needs a "perturb" rng.
  """

  n_nodes: int
  t_out: int = 12
  features: int = 64
  heads: int = 4
  layers: int = 1
  mlp_ratio: int = 2
  steps_per_day: int = 288
  p: float = 0.1
  q: float = 0.5
  noise_std: float = 0.1
  attention: str = "linear"
  last_value_skip: bool = False

  def setup(self):
    self.prompts = ContextPrompts(
      self.n_nodes, self.features, self.steps_per_day, p=self.p, q=self.q, noise_std=self.noise_std
    )
    self.backbone = Backbone(
      self.t_out,
      self.features,
      self.heads,
      self.layers,
      self.mlp_ratio,
      self.attention,
      self.last_value_skip,
    )

  def __call__(self, x, x_mask, time_of_day, day_of_week, train: bool = False):
    if x.shape[-1] != self.n_nodes:
      raise ValueError(f"input has {x.shape[-1]} nodes, the model {self.n_nodes}")
    p_t, p_s = self.prompts(time_of_day, day_of_week, x.shape[0], train)
    return self.backbone(x, x_mask, p_t, p_s)
