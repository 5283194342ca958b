"""The checkpointer every training loop uses: config inside, resume, leftovers."""

import numpy as np
import pytest

from jaxurban.checkpoint import Checkpointer, CheckpointMismatch


def test_restores_the_latest_state_with_its_config_and_log(tmp_path):
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.asarray(0, np.int32)}
  saver = Checkpointer(tmp_path, subdir="run")
  for step in (1, 2, 3):
    saver.save(step, {**state, "step": np.asarray(step, np.int32)}, {"lr": 0.1}, log=[step])
  saver.close()
  reader = Checkpointer(tmp_path, subdir="run")
  step, restored = reader.restore(state, {"lr": 0.1})
  assert step == 3 and int(restored["step"]) == 3 and reader.restore_log() == [3]
  np.testing.assert_array_equal(restored["w"], state["w"])
  with pytest.raises(CheckpointMismatch, match="lr: saved 0.1 vs now 0.2"):
    reader.restore(state, {"lr": 0.2})
  assert reader.restore(state, {"lr": 0.2}, ignore=("lr",))[0] == 3


def test_a_save_killed_part_way_is_ignored_then_removed(tmp_path):
  # Orbax writes a step under a temporary name and renames it when complete;
  # a killed save leaves that folder behind. Restore must not pick it, and
  # the next run of the same folder removes it.
  state = {"w": np.zeros(3, np.float32)}
  saver = Checkpointer(tmp_path)
  saver.save(1, state, {"lr": 0.1})
  saver.close()
  leftover = saver.directory / "2.orbax-checkpoint-tmp-1234567"
  (leftover / "state").mkdir(parents=True)
  again = Checkpointer(tmp_path)
  assert again.latest_step() == 1 and not leftover.exists()
  assert again.restore(state, {"lr": 0.1})[0] == 1
