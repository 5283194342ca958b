"""The shared chunked training loop's chunk length."""

import pytest

from jaxurban.training import chunk_length


@pytest.mark.parametrize(
  "epochs, log_every, start, expected",
  [
    (600, 50, 0, 50),
    (600, 40, 0, 40),
    (600, 7, 0, 6),
    (4000, 100, 0, 100),
    (10, 50, 0, 10),
    # Resumed from epoch 100 with chunks of at most 40: 25 divides both.
    (600, 40, 100, 25),
    (600, 50, 550, 50),
    (600, 50, 599, 1),
  ],
)
def test_chunks_end_at_the_last_epoch(epochs, log_every, start, expected):
  length = chunk_length(epochs, log_every, start)
  assert length == expected
  assert length <= log_every
  # Chunk boundaries from `start` land exactly on `epochs`.
  assert start % length == 0 and epochs % length == 0
