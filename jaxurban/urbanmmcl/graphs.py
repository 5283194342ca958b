"""The view graphs of UrbanMMCL (Sec. 3.4.1) and the region inputs.

Three views, each an N x N non-negative adjacency:

* mobility (M): a_ij = log(1 + m_ij) / sum_k log(1 + m_ik), the log
  normalisation of the paper, on the origin-destination counts;
* POI function (P): a_ij = cos(p_i, p_j) of the POI category counts;
* distance (D): a_ij = 1 / d_ij, d_ij the Euclidean distance in km between
  region centroids (equirectangular projection around the city's mean
  latitude, exact to well under 1% at city scale).

The diagonal of every view is zero: self loops are added once, by the GCN
normalisation. New York has no centroids, so its distance view does not
exist; the two remaining views (POI, mobility) are used there, and asking to
drop the distance view there is an error (it would run the full model). Land use is
never an input: it is the target of the land-use classification task.

For the VGAE reconstruction target each view is divided by its largest entry
(the paper's eq. 20 compares A with softplus(z_i . z_j) directly; scaling to
[0, 1] makes the three views' reconstruction losses commensurable). Only the
loss sees that scale: the VGAE encoder propagates over the view itself
(eq. 17, GCN(A, X)), and the decoder's output times the view's maximum is the
learned estimate of A that the walks and subgraph GCNs use. The GCN
normalisation adds a unit self loop, so it is not scale-invariant: on the
mobility view, whose rows sum to about 1 and whose largest entry is 0.05-0.09,
the maximum-scaled graph would leave each region 5-8 % of its own features
instead of about half.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxurban.data.errors import DataError
from jaxurban.data.hafusion import CityViews

__all__ = [
  "VIEW_NAMES",
  "AblationError",
  "ViewGraphs",
  "build_view_graphs",
  "distance_graph",
  "dominant_landuse",
  "gcn_normalise",
  "mobility_graph",
  "poi_graph",
  "raw_features",
]

# The paper's order K = {P, M, D} (Sec. 3.4.3): the pairs of eq. (26),
# (P, M), (P, D), (M, D), are then the model's ``itertools.combinations``
# of the stacked views, each InfoNCE of eq. (25) anchored on its first view.
VIEW_NAMES = ("poi", "mobility", "distance")
_EARTH_RADIUS_KM = 6371.0088


class AblationError(ValueError):
  """An ablation the city's data cannot express.

  Removing a view or modality the city does not have would silently run the
  full model under the ablation's name.
  """


def mobility_graph(trips: np.ndarray) -> np.ndarray:
  """Log-normalised mobility adjacency (Sec. 3.4.1); rows without trips stay 0.

  a_ij = log(1 + m_ij) / sum_k log(1 + m_ik), the sum over every k as in the
  paper, the region's own trips included; the graph's diagonal is then 0
  (no self loop; the GCN adds its own).
  """
  trips = np.asarray(trips, np.float64)
  logged = np.log1p(np.maximum(trips, 0.0))
  total = logged.sum(axis=1, keepdims=True)
  adjacency = np.divide(logged, total, out=np.zeros_like(logged), where=total > 0)
  np.fill_diagonal(adjacency, 0.0)
  return adjacency


def poi_graph(poi: np.ndarray) -> np.ndarray:
  """Cosine similarity of POI category counts; regions without POIs get 0."""
  poi = np.asarray(poi, np.float64)
  norm = np.linalg.norm(poi, axis=1, keepdims=True)
  unit = np.divide(poi, norm, out=np.zeros_like(poi), where=norm > 0)
  sim = np.clip(unit @ unit.T, 0.0, None)
  np.fill_diagonal(sim, 0.0)
  return sim


def distance_graph(centroids: np.ndarray) -> np.ndarray:
  """Inverse centroid distance 1 / d_ij in 1/km; centroids are (lat, lon) degrees."""
  centroids = np.asarray(centroids, np.float64)
  if centroids.ndim != 2 or centroids.shape[1] != 2:
    raise ValueError(f"centroids must be [N, 2] (lat, lon), got shape {centroids.shape}")
  lat = np.radians(centroids[:, 0])
  lon = np.radians(centroids[:, 1])
  x = _EARTH_RADIUS_KM * lon * np.cos(np.mean(lat))
  y = _EARTH_RADIUS_KM * lat
  d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
  np.fill_diagonal(d, np.inf)
  if not (d > 0).all():
    # 1 / 0 has no weight to give the two closest regions of all.
    i, j = np.argwhere(d == 0)[0]
    lat, lon = (float(v) for v in centroids[i])
    raise ValueError(f"regions {i} and {j} have the same centroid ({lat}, {lon})")
  return 1.0 / d  # the diagonal, 1 / inf, is 0


def gcn_normalise(adjacency, symmetrise: bool = True):
  """D^-1/2 (A + I) D^-1/2 with weighted degrees (Kipf & Welling, eq. 2).

  Works on NumPy or JAX arrays with any leading batch axes. With
  ``symmetrise`` the directed mobility view is propagated as (A + A^T) / 2.
  """
  xp = np if isinstance(adjacency, np.ndarray) else _jnp()
  a = adjacency
  if symmetrise:
    a = 0.5 * (a + xp.swapaxes(a, -1, -2))
  a = a + xp.eye(a.shape[-1], dtype=a.dtype)
  degree = a.sum(axis=-1)
  inv_sqrt = 1.0 / xp.sqrt(degree)
  return inv_sqrt[..., :, None] * a * inv_sqrt[..., None, :]


def _jnp():
  import jax.numpy as jnp

  return jnp


@dataclasses.dataclass(frozen=True)
class ViewGraphs:
  """Stacked views of one city.

  Attributes:
    names: view names, in stacking order.
    adjacency: [V, N, N] float32 view adjacencies A (Sec. 3.4.1).
    target: [V, N, N] float32 reconstruction targets, A / target_scale.
    target_scale: [V] float32, each view's largest entry (1 for an all-zero
      view).
    propagation: [V, N, N] float32 GCN normalisation of A, the VGAEs' graph.
  """

  names: tuple[str, ...]
  adjacency: np.ndarray
  target: np.ndarray
  target_scale: np.ndarray
  propagation: np.ndarray

  def model_inputs(self) -> dict[str, np.ndarray]:
    """The graph entries of the model's input dict (`model.UrbanMMCL`)."""
    return {
      "propagation": self.propagation,
      "target": self.target,
      "target_scale": self.target_scale,
    }


def build_view_graphs(views: CityViews, drop: tuple[str, ...] = ()) -> ViewGraphs:
  """The available views of ``views`` minus those named in ``drop``.

  Raises:
    AblationError: ``drop`` names an unknown view or one the city does not
      have, or leaves no view.
  """
  unknown = set(drop) - set(VIEW_NAMES)
  if unknown:
    raise AblationError(f"unknown view(s) {sorted(unknown)}, expected names from {VIEW_NAMES}")
  built = {"mobility": mobility_graph(views.mobility), "poi": poi_graph(views.poi)}
  if views.centroids is not None:
    built["distance"] = distance_graph(views.centroids)
  missing = sorted(set(drop) - set(built))
  if missing:
    raise AblationError(
      f"{views.city} has no {' or '.join(missing)} view (its views: {', '.join(built)}), "
      "so dropping it would run the full model"
    )
  names = tuple(n for n in VIEW_NAMES if n in built and n not in drop)
  if not names:
    raise AblationError(f"no view left for {views.city} after dropping {list(drop)}")
  adjacency = np.stack([built[n] for n in names])
  peak = adjacency.reshape(len(names), -1).max(axis=1)
  scale = np.where(peak > 0, peak, 1.0)
  return ViewGraphs(
    names=names,
    adjacency=adjacency.astype(np.float32),
    target=(adjacency / scale[:, None, None]).astype(np.float32),
    target_scale=scale.astype(np.float32),
    propagation=gcn_normalise(adjacency).astype(np.float32),
  )


def raw_features(views: CityViews) -> np.ndarray:
  """[N, F] raw region features: the graph part's node input and the baseline.

  log1p of POI counts, of outgoing and of incoming trip counts, and (Chicago)
  the centroid (lat, lon); each column z-scored (constant columns become 0).
  Land use is excluded on purpose (it is a task target).
  """
  parts = [np.log1p(views.poi), np.log1p(views.mobility), np.log1p(views.mobility.T)]
  if views.centroids is not None:
    parts.append(views.centroids)
  x = np.concatenate(parts, axis=1).astype(np.float64)
  std = x.std(axis=0)
  x = np.divide(x - x.mean(axis=0), std, out=np.zeros_like(x), where=std > 0)
  return x.astype(np.float32)


def dominant_landuse(views: CityViews) -> tuple[np.ndarray, np.ndarray]:
  """Class label (argmax of ``landUse_dist``) [N] and the class ids present.

  Raises:
    DataError: a region has no land-use counts at all, so it has no dominant
      category (argmax would call it column 0).
  """
  empty = np.flatnonzero(views.landuse.sum(axis=1) <= 0)
  if empty.size:
    shown = ", ".join(str(int(i)) for i in empty[:5]) + (", ..." if empty.size > 5 else "")
    where = (
      views.folder / "landUse_dist.npy"
      if views.folder is not None
      else f"landUse_dist.npy of {views.city}"
    )
    raise DataError(
      where,
      f"{empty.size} region(s) with no land-use counts (rows {shown}): their dominant "
      "land-use category, the class of the land-use task, is undefined",
      column="landuse",
    )
  labels = np.argmax(views.landuse, axis=1).astype(np.int32)
  return labels, np.unique(labels)
