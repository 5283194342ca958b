"""`kernels.timing.median_seconds` against a fake clock: no wall-clock asserts."""

import math
import types

import pytest

from kernels import timing
from kernels.timing import median_seconds

# One tick of the fake clock: a power of two, so that every sum and ratio of
# ticks below is exact in floating point.
TICK = 2.0**-10


class FakeDevice:
  """A clock that only moves when work is queued or waited for.

  Each call of `fn` advances the clock by `dispatch` ticks (the host's queueing
  cost) and returns a fresh output object; each `block_until_ready` advances
  it by the next entry of `waits` (the device finishing the queue) and is
  recorded with its argument. How often `perf_counter` is read changes nothing.
  """

  def __init__(self, dispatch, waits):
    self.now = 1000.0
    self.dispatch = dispatch
    self.waits = list(waits)
    self.outputs = []
    self.waited_on = []

  def perf_counter(self):
    return self.now

  def fn(self):
    self.now += self.dispatch * TICK
    self.outputs.append(object())
    return self.outputs[-1]

  def block_until_ready(self, x):
    self.waited_on.append(x)
    # Waits past the planned ones (a wrong number of waits) cost nothing, so
    # that the assertions below, not an IndexError, report them.
    self.now += (self.waits.pop(0) if self.waits else 0) * TICK
    return x


@pytest.fixture
def fake_device(monkeypatch):
  def install(dispatch, waits):
    device = FakeDevice(dispatch, waits)
    # kernels/timing.py reads `time.perf_counter` and `jax.block_until_ready`
    # through the modules it imported; the fake clock replaces its `time` only,
    # so that nothing else in the process (jax included) sees it.
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=device.perf_counter))
    monkeypatch.setattr(timing.jax, "block_until_ready", device.block_until_ready)
    return device

  return install


def test_batches_quick_calls_and_waits_for_each_batch(fake_device):
  # Warm-up calls, then the sizing call: 1 tick to queue + 2 to wait = 3 ticks.
  # The three batches then wait 16, 0 and 4 ticks after queueing their calls.
  warmup, repeats, batch_waits = 2, 3, [16, 0, 4]
  device = fake_device(dispatch=1, waits=[0] * warmup + [2] + batch_waits)
  min_batch_seconds = 10 * TICK
  seconds = median_seconds(
    device.fn, repeats=repeats, warmup=warmup, min_batch_seconds=min_batch_seconds
  )
  # The documented rule: as many calls as one call (3 ticks) takes to fill
  # the batch (10 ticks), i.e. ceil(10 / 3) = 4 calls a batch.
  batch = math.ceil(min_batch_seconds / (3 * TICK))
  assert batch == 4
  assert len(device.outputs) == warmup + 1 + repeats * batch
  # Every warm-up call and the sizing call is waited for; a batch's calls are
  # queued back to back and only its last output is waited for, once.
  first_batch = warmup + 1
  expected_waits = device.outputs[:first_batch] + [
    device.outputs[first_batch + (i + 1) * batch - 1] for i in range(repeats)
  ]
  assert len(device.waited_on) == len(expected_waits)
  assert all(got is want for got, want in zip(device.waited_on, expected_waits))
  # Per call: (4 calls x 1 tick + wait) / 4 = 5, 1 and 2 ticks; the median
  # (not the mean, 8/3) is reported.
  per_call = [(batch * 1 + wait) * TICK / batch for wait in batch_waits]
  assert per_call == [5 * TICK, 1 * TICK, 2 * TICK]
  assert seconds == 2 * TICK


def test_a_slow_call_is_its_own_batch(fake_device):
  # The sizing call takes 1 + 11 = 12 ticks, more than the 10-tick batch: each
  # batch is that one call, waited for. The batches take 4, 2, 8 and 6 ticks.
  device = fake_device(dispatch=1, waits=[11, 3, 1, 7, 5])
  seconds = median_seconds(device.fn, repeats=4, warmup=0, min_batch_seconds=10 * TICK)
  assert len(device.outputs) == 1 + 4
  assert len(device.waited_on) == 1 + 4
  assert all(got is want for got, want in zip(device.waited_on, device.outputs))
  assert seconds == 5 * TICK  # the median of an even count: (4 + 6) / 2


def test_a_zero_batch_time_still_calls_once_a_batch(fake_device):
  device = fake_device(dispatch=1, waits=[2, 0, 0, 0])
  median_seconds(device.fn, repeats=3, warmup=0, min_batch_seconds=0.0)
  assert len(device.outputs) == 1 + 3


def test_sizes_are_three_positive_whole_numbers():
  import argparse

  assert timing.positive_triple("16,32,8") == (16, 32, 8)
  for text in ("1,2", "0,4,4", "1,2,3,4", "a,b,c", "1.5,2,3"):
    with pytest.raises(argparse.ArgumentTypeError, match="three whole numbers >= 1"):
      timing.positive_triple(text)
