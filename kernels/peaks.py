"""Dense peak matrix throughput of the GPUs the kernel benchmarks know.

NVIDIA's data-sheet figures without sparsity, in TFLOP/s. The three Hopper
boards differ (clock and power limits), so a device is matched to its board
from `jax.Device.device_kind` ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
"NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL"); an unknown board gets
no peak rather than a wrong one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

PEAK_TFLOPS = {
  "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
  "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
  "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5},
  "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
  "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
}


def board(device_kind: str) -> str | None:
  """The `PEAK_TFLOPS` row of a device kind, or None when it is not known."""
  kind = device_kind.upper()
  for chip in ("H100", "H200"):
    if chip not in kind:
      continue
    if "NVL" in kind:
      return f"{chip} NVL"
    if "PCIE" in kind:
      return f"{chip} PCIe"
    # H100 SXM reports its memory ("80GB HBM3"); the H200 is sold as SXM or NVL.
    if chip == "H200" or "SXM" in kind or "HBM3" in kind:
      return f"{chip} SXM"
  return None


def column(dtype, precision=None) -> str:
  """The number format the tensor cores run for inputs of ``dtype``: float32
  products use TF32 unless full precision is asked for."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    return "bf16"
  if dtype == jnp.float16:
    return "fp16"
  return "fp32" if precision == lax.Precision.HIGHEST else "tf32"


def device_peak(device_kind: str, dtype, precision=None) -> tuple[str, float] | None:
  """(label, dense peak TFLOP/s) for ``dtype`` on the board, or None if unknown."""
  name = board(device_kind)
  if name is None:
    return None
  col = column(dtype, precision)
  return f"{name} dense {col}", PEAK_TFLOPS[name][col]
