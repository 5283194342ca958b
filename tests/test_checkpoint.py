"""The checkpointer every training loop uses: config inside, resume, leftovers."""

import json
import shutil

import numpy as np
import pytest

from jaxurban.checkpoint import (
  Checkpointer,
  CheckpointMismatch,
  CheckpointUnreadable,
  as_written_json,
  check_same_config,
)


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


def test_a_nan_setting_resumes_and_a_config_edited_into_a_list_is_named(tmp_path):
  # NaN != NaN: compared plainly, a run with a NaN setting could never resume.
  state = {"w": np.zeros(3, np.float32)}
  config = {"noise": float("nan"), "sizes": (1, 2), "lr": 1}
  saver = Checkpointer(tmp_path)
  saver.save(1, state, config)
  saver.close()
  reader = Checkpointer(tmp_path)
  assert reader.restore(state, {**config, "lr": 1.0})[0] == 1
  with pytest.raises(CheckpointMismatch, match="noise"):
    reader.restore(state, {**config, "noise": 0.5})
  (reader.directory / "1" / "config" / "metadata").write_text("[1, 2]")
  with pytest.raises(CheckpointUnreadable, match="holds a config that is a list, not a mapping"):
    Checkpointer(tmp_path).restore(state, config)


@pytest.mark.parametrize(
  "changed, name",
  [
    ({"seeds": (0, 1, 2)}, "seeds"),  # one more seed: same prefix, longer list
    ({"seeds": (0,)}, "seeds"),
    ({"model": {"dim": 8, "heads": 2, "layers": 3}}, "model"),  # a setting added inside
    ({"model": {"dim": 8}}, "model"),
  ],
)
def test_nested_settings_differ_in_length_and_keys_as_well_as_values(tmp_path, changed, name):
  # A resumed run with one more seed, or a model setting the saved run did
  # not have, is another run even where every value they share is equal.
  config = {"seeds": (0, 1), "model": {"dim": 8, "heads": 2}, "out": tmp_path / "run"}
  check_same_config(as_written_json(config), config, "saved")
  with pytest.raises(CheckpointMismatch, match=name):
    check_same_config(as_written_json(config), {**config, **changed}, "saved")
  # A path is written as its text, and reads back equal to it.
  assert as_written_json(config)["out"] == str(tmp_path / "run")


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


def _truncate_every_file(folder):
  for file in folder.rglob("*"):
    if file.is_file() and file.stat().st_size > 100:
      file.write_bytes(file.read_bytes()[:50])


@pytest.mark.parametrize(
  "damage, part",
  [
    (lambda step: shutil.rmtree(step / "config"), "config"),
    (lambda step: (step / "config" / "metadata").write_text("{not json"), "config"),
    (lambda step: shutil.rmtree(step / "state"), "state"),
    (lambda step: _truncate_every_file(step / "state"), "state"),
    (lambda step: (step / "log" / "metadata").write_text("{not json"), "log"),
  ],
)
def test_a_checkpoint_damaged_by_hand_is_named_in_one_line(tmp_path, damage, part):
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  saver = Checkpointer(tmp_path)
  saver.save(4, state, {"lr": 0.1}, log=[1.0])
  saver.close()
  damage(saver.directory / "4")
  reader = Checkpointer(tmp_path)
  with pytest.raises(CheckpointUnreadable) as caught:
    reader.restore(state, {"lr": 0.1})
    reader.restore_log()
  message = str(caught.value)
  assert f"the {part} of the checkpoint at step 4 cannot be read" in message
  assert str(saver.directory) in message and "\n" not in message
  # Every command already reports a mismatch in one line; this is one.
  assert isinstance(caught.value, CheckpointMismatch)


def test_results_of_another_configuration_are_not_replaced(tmp_path):
  from jaxurban.checkpoint import check_previous_results

  path = tmp_path / "metrics.json"
  config = {"task": "crime", "seeds": 5, "data_root": "/a"}
  check_previous_results(path, config)  # nothing there yet
  path.write_text(json.dumps({"config": config, "scores": [1.0]}))
  check_previous_results(path, config)  # the same run again: resumes
  check_previous_results(path, {**config, "data_root": "/b"}, may_differ=("data_root",))
  with pytest.raises(CheckpointMismatch, match=r"task: saved 'crime' vs now 'checkIn'") as caught:
    check_previous_results(path, {**config, "task": "checkIn"})
  # The remedy names the whole folder: deleting the results file alone would
  # leave the earlier run's other outputs beside the next run's.
  assert str(caught.value).endswith(f"use another output folder or delete {tmp_path}")
  path.write_text("{not json")
  with pytest.raises(CheckpointMismatch, match="holds no readable 'config'"):
    check_previous_results(path, config)


def test_results_guard_reads_configs_as_the_results_file_wrote_them(tmp_path):
  from jaxurban.checkpoint import check_previous_results, write_json_atomic

  path = tmp_path / "metrics.json"
  # Infinities are written as null: the same config is still the same.
  config = {"grad_clip": float("inf"), "sizes": (1, 2)}
  write_json_atomic(path, {"config": config})
  check_previous_results(path, config)
  path.write_text(json.dumps({"config": None}))
  with pytest.raises(CheckpointMismatch, match="holds no readable 'config'"):
    check_previous_results(path, config)


def test_only_the_two_latest_checkpoints_are_kept(tmp_path):
  # A long run saves every few epochs; keeping every step would fill the disk.
  state = {"w": np.zeros(3, np.float32)}
  saver = Checkpointer(tmp_path)
  for step in (1, 2, 3, 4):
    saver.save(step, state, {"lr": 0.1})
  saver.close()
  assert sorted(p.name for p in saver.directory.iterdir()) == ["3", "4"]


def test_the_time_of_earlier_runs_travels_with_the_checkpoint(tmp_path, monkeypatch):
  # A clock under the test's control: each run's seconds are known exactly.
  import jaxurban.checkpoint as checkpoint

  now = [100.0]
  monkeypatch.setattr(checkpoint.time, "perf_counter", lambda: now[0])
  state = {"w": np.zeros(3, np.float32)}
  first = Checkpointer(tmp_path)
  assert first.earlier_seconds == 0.0
  now[0] += 7.0
  first.save(1, state, {"lr": 0.1})
  now[0] += 5.0  # work after the last checkpoint: lost with the killed run
  first.close()

  second = Checkpointer(tmp_path)
  now[0] += 1.0
  assert second.restore(state, {"lr": 0.1})[0] == 1
  assert second.earlier_seconds == 7.0
  now[0] += 2.0
  assert second.seconds_so_far() == 10.0
  second.save(2, state, {"lr": 0.1})
  second.close()
  third = Checkpointer(tmp_path)
  third.restore(state, {"lr": 0.1})
  assert third.earlier_seconds == 10.0

  # A checkpoint from before the record: the earlier time is unknown, and
  # stays so in the checkpoints that follow it.
  shutil.rmtree(tmp_path / "checkpoints" / "train" / "2" / "timing")
  fourth = Checkpointer(tmp_path)
  fourth.restore(state, {"lr": 0.1})
  assert fourth.earlier_seconds is None and fourth.seconds_so_far() is None
  fourth.save(3, state, {"lr": 0.1})
  fourth.close()
  fifth = Checkpointer(tmp_path)
  fifth.restore(state, {"lr": 0.1})
  assert fifth.earlier_seconds is None


def test_a_checkpoint_saved_without_a_log_restores_none(tmp_path):
  # Checkpoints written before logs were saved still resume, with no history.
  state = {"w": np.zeros(3, np.float32)}
  assert Checkpointer(tmp_path).restore_log() is None  # nothing saved yet
  saver = Checkpointer(tmp_path)
  saver.save(1, state, {"lr": 0.1})
  saver.close()
  reader = Checkpointer(tmp_path)
  assert reader.restore_log() is None
  assert reader.restore(state, {"lr": 0.1})[0] == 1


def test_a_refused_checkpoint_names_its_folder_step_and_every_difference(tmp_path):
  state = {"w": np.zeros(3, np.float32)}
  saved = {"lr": 0.1, "data": {"cd": {"regions": 5, "mob": "aa"}, "xa": {"regions": 4}}}
  saver = Checkpointer(tmp_path)
  saver.save(7, state, saved)
  saver.close()
  changed = {"lr": 0.2, "data": {"cd": {"regions": 5, "mob": "bb"}, "xa": {"regions": 4}}}
  with pytest.raises(CheckpointMismatch) as caught:
    Checkpointer(tmp_path).restore(state, changed)
  # Nested settings are named down to the leaf that changed, and only those.
  assert str(caught.value) == (
    f"{saver.directory}: the checkpoint at step 7 was written with a different config "
    "(data.cd.mob: saved 'aa' vs now 'bb', lr: saved 0.1 vs now 0.2); "
    "use another output folder or delete it"
  )


def test_an_unreadable_results_file_is_named(tmp_path):
  from jaxurban.checkpoint import check_previous_results

  path = tmp_path / "metrics.json"
  path.write_text(json.dumps({"scores": [1.0]}))
  with pytest.raises(CheckpointMismatch) as caught:
    check_previous_results(path, {"task": "crime"})
  assert str(caught.value).startswith(f"{path}: holds no readable 'config' (KeyError)")


def test_a_nan_setting_beside_a_changed_one_is_not_named():
  # NaN equals NaN in the comparison, so the message names only what changed.
  nan = float("nan")
  with pytest.raises(CheckpointMismatch) as caught:
    check_same_config({"m": {"a": nan, "b": 1}}, {"m": {"a": nan, "b": 2}}, "saved")
  assert "(m.b: saved 1 vs now 2)" in str(caught.value)


@pytest.mark.parametrize("blocked", ["checkpoints", "checkpoints/train", "."])
def test_a_file_where_the_checkpoints_go_is_named(tmp_path, blocked):
  # A file of that name (or the output folder itself a file) surfaced as an
  # OS error from inside orbax.
  workdir = tmp_path / "out"
  path = (workdir / blocked) if blocked != "." else workdir
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("not a folder")
  with pytest.raises(CheckpointUnreadable) as caught:
    Checkpointer(workdir)
  assert str(caught.value).startswith(f"{path.absolute()}: is not a folder")
