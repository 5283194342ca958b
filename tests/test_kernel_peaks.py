"""Peak throughput used by the kernel benchmarks' "% of peak" columns."""

import jax.numpy as jnp
import pytest
from jax import lax

from kernels import peaks


@pytest.mark.parametrize(
  "device_kind, board",
  [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", None),
    ("cpu", None),
  ],
)
def test_each_board_gets_its_own_peak(device_kind, board):
  assert peaks.board(device_kind) == board
  found = peaks.device_peak(device_kind, jnp.bfloat16)
  if board is None:
    assert found is None
  else:
    assert found == (f"{board} dense bf16", peaks.PEAK_TFLOPS[board]["bf16"])


def test_float32_is_compared_with_tf32_unless_full_precision():
  kind = "NVIDIA H100 80GB HBM3"
  assert peaks.device_peak(kind, jnp.float32)[1] == 494.7
  assert peaks.device_peak(kind, jnp.float32, lax.Precision.HIGHEST)[1] == 67.0
  assert peaks.device_peak(kind, jnp.float16)[1] == 989.4
  # The PCIe board is the slowest of the three H100s.
  assert (
    peaks.device_peak("NVIDIA H100 PCIe", jnp.bfloat16)[1]
    < peaks.device_peak("NVIDIA H100 NVL", jnp.bfloat16)[1]
    < peaks.device_peak(kind, jnp.bfloat16)[1]
  )
