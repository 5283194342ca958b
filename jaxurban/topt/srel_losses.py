"""HAFusion's multi-task self-supervised objectives, used by ToPT's SREL.

ToPT trains SREL "using multi-task learning objectives [13]" (HAFusion): the
embedding E is decoded into four views by linear heads and

  L = L_mob(S, T; M) + L_poi(P; Sim_poi) + L_land(U; Sim_land)

* mobility: p_hat(j | i) = softmax_j(s_i . t_j); the loss is the
  cross-entropy sum_ij -M_ij log(p_hat(j|i) + 1e-4) plus the same with
  source and destination swapped (and M transposed). M is the trip-count
  matrix divided by its mean, as in the authors' data loader.
* POI / land use: mean squared error between the pairwise cosine similarity
  of the decoded embeddings and the given similarity matrix.

The 1e-4 inside the log and the per-vector norm clamp of 1e-8 are the
authors' (PyTorch's ``cosine_similarity``) constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "LOG_EPS",
  "mobility_loss",
  "normalise_mobility",
  "similarity_loss",
  "srel_loss",
]

LOG_EPS = 1e-4
COSINE_EPS = 1e-8


def normalise_mobility(trips: jax.Array) -> jax.Array:
  """Trip counts divided by their mean (the authors' scaling of the target)."""
  return trips / jnp.mean(trips)


def mobility_loss(source: jax.Array, target: jax.Array, mobility: jax.Array) -> jax.Array:
  """Source/destination distribution loss of HAFusion.

  Args:
    source, target: [N, d] decoded source and destination embeddings.
    mobility: [N, N] normalised trips, row = origin.
  """
  logits = source @ target.T
  p_dest = jax.nn.softmax(logits, axis=-1)  # p(destination j | origin i)
  p_orig = jax.nn.softmax(logits.T, axis=-1)  # p(origin i | destination j)
  loss = -jnp.sum(mobility * jnp.log(p_dest + LOG_EPS))
  return loss - jnp.sum(mobility.T * jnp.log(p_orig + LOG_EPS))


def _cosine_matrix(x: jax.Array) -> jax.Array:
  norm = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), COSINE_EPS)
  unit = x / norm
  return unit @ unit.T


def similarity_loss(embedding: jax.Array, similarity: jax.Array) -> jax.Array:
  """MSE between the [N, N] cosine similarity of `embedding` and `similarity`."""
  return jnp.mean((_cosine_matrix(embedding) - similarity) ** 2)


def srel_loss(
  outputs: dict[str, jax.Array],
  mobility: jax.Array,
  poi_similarity: jax.Array,
  landuse_similarity: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its terms from the decoder outputs of `SREL`.

  `mobility` must already be normalised (`normalise_mobility`).
  """
  terms = {
    "mobility": mobility_loss(outputs["source"], outputs["destination"], mobility),
    "poi": similarity_loss(outputs["poi"], poi_similarity),
    "landuse": similarity_loss(outputs["landuse"], landuse_similarity),
  }
  total = terms["mobility"] + terms["poi"] + terms["landuse"]
  return total, {"total": total, **terms}
