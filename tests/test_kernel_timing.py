import jax.numpy as jnp

from kernels.timing import median_seconds


def test_batches_quick_calls_and_waits_for_each_batch():
  calls = []

  def fn():
    calls.append(None)
    return jnp.zeros(3)

  seconds = median_seconds(fn, repeats=3, warmup=2, min_batch_seconds=0.01)
  assert 0 < seconds < 0.01
  # 2 warm-up calls, 1 to size the batch, then 3 batches of more than one call.
  batch = (len(calls) - 3) // 3
  assert batch > 1 and len(calls) == 3 + 3 * batch


def test_a_slow_call_is_its_own_batch():
  calls = []

  def fn():
    calls.append(None)
    return jnp.zeros(3)

  median_seconds(fn, repeats=4, warmup=0, min_batch_seconds=0.0)
  assert len(calls) == 1 + 4
