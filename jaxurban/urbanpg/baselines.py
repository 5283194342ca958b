"""Forecasting baselines on the same windows as UrbanPG (NumPy, closed form).

* historical average: per node and time-of-day slot, the mean observed
  training speed (falling back to the node's training mean for a slot never
  seen in training, which happens with few-shot's 10% of the data);
* last value: the last observed input reading of each node, repeated;
* per-node linear: one ridge regression per node from its T_in scaled
  inputs (and a bias) to its T_out scaled targets.

Every function returns raw-unit forecasts [S, T_out, N].
"""

from __future__ import annotations

import numpy as np

from jaxurban.data.traffic import Scaler, Windows

__all__ = ["HistoricalAverage", "PerNodeLinear", "last_value"]


class HistoricalAverage:
  """Mean training speed per (time-of-day slot, node)."""

  def __init__(self, speed, mask, time_of_day, steps_per_day: int):
    speed = np.asarray(speed, np.float64)
    mask = np.asarray(mask, bool)
    n = speed.shape[1]
    sums = np.zeros((steps_per_day, n))
    counts = np.zeros((steps_per_day, n))
    np.add.at(sums, time_of_day, np.where(mask, speed, 0.0))
    np.add.at(counts, time_of_day, mask)
    node_mean = (np.where(mask, speed, 0.0).sum(0)) / np.maximum(mask.sum(0), 1)
    self.steps_per_day = steps_per_day
    self.table = np.where(counts > 0, sums / np.maximum(counts, 1), node_mean)

  def predict(self, windows: Windows, t_out: int) -> np.ndarray:
    # The target step k (0-based) is k + 1 slots after the last input step.
    slots = (windows.time_of_day[:, None] + 1 + np.arange(t_out)) % self.steps_per_day
    return self.table[slots].astype(np.float32)


def last_value(windows: Windows, scaler: Scaler, t_out: int) -> np.ndarray:
  """Repeats each node's last observed input; the training mean when none was observed."""
  observed = windows.x_mask
  t_in = observed.shape[1]
  # Index of the last observed step per (sample, node); -1 when none.
  last = np.where(observed.any(1), t_in - 1 - np.argmax(observed[:, ::-1], axis=1), -1)
  values = np.take_along_axis(windows.x, np.maximum(last, 0)[:, None], axis=1)[:, 0]
  raw = np.where(last >= 0, scaler.inverse(values), scaler.mean)
  return np.repeat(raw[:, None], t_out, axis=1).astype(np.float32)


class PerNodeLinear:
  """Ridge regression per node, scaled inputs -> scaled targets, fitted in float64.

  A training sample enters node n's fit only when all of its targets at n
  are observed.
  """

  def __init__(self, windows: Windows, scaler: Scaler, ridge: float = 1.0):
    x = self._design(windows)  # [S, N, T_in + 1]
    y = scaler.transform(windows.y, windows.y_mask).transpose(0, 2, 1).astype(np.float64)
    keep = windows.y_mask.all(axis=1).astype(np.float64)[..., None]  # [S, N, 1]
    xw = x * keep
    gram = np.einsum("snk,snl->nkl", xw, x) + ridge * np.eye(x.shape[-1])
    rhs = np.einsum("snk,snt->nkt", xw, y)
    self.weights = np.linalg.solve(gram, rhs)  # [N, T_in + 1, T_out]
    self.scaler = scaler

  @staticmethod
  def _design(windows: Windows) -> np.ndarray:
    x = windows.x.transpose(0, 2, 1).astype(np.float64)
    return np.concatenate([x, np.ones(x.shape[:2] + (1,))], axis=-1)

  def predict(self, windows: Windows) -> np.ndarray:
    scaled = np.einsum("snk,nkt->stn", self._design(windows), self.weights)
    return self.scaler.inverse(scaled).astype(np.float32)
