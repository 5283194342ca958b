"""Wall-clock timing for the kernel benchmarks.

Device work is asynchronous, so every measurement ends by waiting for the
result. A single call of a small kernel (tenths of a millisecond) would also
time the host's dispatch and synchronisation, tens of microseconds: calls are
therefore timed in batches long enough to make that overhead small, and the
median over repeats of the per-call time is reported.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(
  fn: Callable[[], Any], repeats: int, warmup: int, min_batch_seconds: float = 0.02
) -> float:
  """Median seconds per call of ``fn()`` over `repeats` timed batches.

  `warmup` untimed calls come first (compilation included). A batch holds
  as many calls as one call takes to fill `min_batch_seconds` (at least one);
  the calls of a batch are queued back to back and only the last is waited
  for, since a device runs them in order.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  jax.block_until_ready(fn())
  once = time.perf_counter() - start
  calls = max(1, math.ceil(min_batch_seconds / max(once, 1e-9)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def count_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: a whole number of at least `minimum` (a repeat count
  of 0 would otherwise end in a median of nothing)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value

  return parse


def power_of_two_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: a power of two of at least `minimum` (a Triton tile
  size), refused at the command line rather than at the first kernel call."""

  def parse(text: str) -> int:
    value = count_at_least(minimum)(text)
    if value & (value - 1):
      raise argparse.ArgumentTypeError(f"must be a power of two, got {value}")
    return value

  return parse


def positive_triple(text: str) -> tuple[int, int, int]:
  """An argparse type: ``M,N,d``, three whole numbers of at least 1."""
  parts = text.split(",")
  try:
    values = tuple(int(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 3 or min(values) < 1:
    raise argparse.ArgumentTypeError(f"expected M,N,d as three whole numbers >= 1, got {text!r}")
  return values
