"""Result files are written whole, readable by others, and as strict JSON."""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from jaxurban import atomic
from jaxurban.atomic import atomic_write, save_npy_atomic, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
  previous = os.umask(0o022)
  yield
  os.umask(previous)


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_a_plain_open_would_give(tmp_path, umask_022):
  save_npy_atomic(tmp_path / "a.npy", np.arange(3))
  write_json_atomic(tmp_path / "m.json", {"x": 1})
  write_text_atomic(tmp_path / "t.md", "| a |\n")
  plain = tmp_path / "plain"
  plain.write_text("")
  for name in ("a.npy", "m.json", "t.md"):
    assert _mode(tmp_path / name) == _mode(plain) == 0o644
  np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(3))
  assert (tmp_path / "t.md").read_text() == "| a |\n"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_mode_follows_the_umask_without_setting_it(monkeypatch, umask):
  previous = os.umask(umask)
  try:
    # Reading the umask must not set it (even for a moment: other threads'
    # files would get that mode).
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("umask set"))
    assert atomic.shared_file_mode() == 0o666 & ~umask
  finally:
    monkeypatch.undo()
    os.umask(previous)


def test_json_is_strict_with_nan_as_null(tmp_path):
  path = tmp_path / "metrics.json"
  write_json_atomic(
    path,
    {"mape": np.float32("nan"), "rows": [1.5, float("inf")], "n": np.int64(2), "ok": np.bool_(1)},
  )

  def refuse(token):
    raise ValueError(f"non-standard JSON literal {token}")

  assert json.loads(path.read_text(), parse_constant=refuse) == {
    "mape": None,
    "n": 2,
    "ok": True,
    "rows": [1.5, None],
  }


@pytest.mark.parametrize("payload", [{"bad": object()}, {"ok": 1, "bad": {1, 2}}])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, payload):
  path = tmp_path / "metrics.json"
  write_json_atomic(path, {"old": True})
  with pytest.raises(TypeError):
    write_json_atomic(path, payload)
  assert json.loads(path.read_text()) == {"old": True}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_interrupted_writer_leaves_nothing_behind(tmp_path):
  def write_then_die(f):
    f.write(b"half")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    atomic_write(tmp_path / "x.bin", write_then_die)
  assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
  assert atomic.writable_folder_problem(tmp_path) is None
  assert atomic.writable_folder_problem(tmp_path / "new" / "run") is None
  (tmp_path / "file").write_text("x")
  assert (
    atomic.writable_folder_problem(tmp_path / "file")
    == f"{tmp_path / 'file'}: exists and is not a folder"
  )
  problem = atomic.writable_folder_problem(tmp_path / "file" / "run")
  assert (
    problem == f"{tmp_path / 'file' / 'run'}: cannot be made, since {tmp_path / 'file'} is a file"
  )


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
  # Metrics files of two runs compare line by line with diff.
  path = tmp_path / "m.json"
  write_json_atomic(path, {"b": [2], "a": 1})
  assert path.read_text() == '{\n  "a": 1,\n  "b": [\n    2\n  ]\n}\n'


def test_missing_folders_on_the_way_are_made(tmp_path):
  write_json_atomic(tmp_path / "new" / "run" / "m.json", {"x": 1})
  assert json.loads((tmp_path / "new" / "run" / "m.json").read_text()) == {"x": 1}


def test_the_file_is_written_beside_the_target_and_appears_whole(tmp_path):
  # The temporary file must lie in the target's folder: a rename within one
  # file system replaces the target at once, and the target appears only
  # after the writer has finished.
  seen = []

  def write(f):
    seen.extend(sorted(p.name for p in tmp_path.iterdir()))
    f.write(b"whole")

  atomic_write(tmp_path / "x.bin", write)
  assert len(seen) == 1 and seen[0].startswith(".x.bin.") and seen[0].endswith(".tmp")
  assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
  assert (tmp_path / "x.bin").read_bytes() == b"whole"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_new_file_is_named():
  # /proc takes no new file, whoever runs the test (root included); the
  # check must try the nearest existing folder itself, not any other.
  problem = atomic.writable_folder_problem("/proc/no-such-folder/run")
  assert problem.startswith("/proc/no-such-folder/run: cannot write in /proc (")


def test_earlier_outputs_are_removed_by_pattern_and_nothing_else(tmp_path):
  for name in ("embeddings.png", "losses.png", "losses_align.png", "metrics.json"):
    (tmp_path / name).write_text(name)
  (tmp_path / "losses_dir.png").mkdir()  # a folder is never an earlier output
  removed = atomic.remove_earlier_outputs(tmp_path, ("embeddings.png", "losses*.png", "none.*"))
  assert removed == ["embeddings.png", "losses.png", "losses_align.png"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["losses_dir.png", "metrics.json"]
  assert atomic.remove_earlier_outputs(tmp_path / "not-yet-made", ("*.png",)) == []


def test_a_writer_killed_mid_write_leaves_a_temporary_the_next_write_removes(tmp_path):
  target = tmp_path / "embed[1].npy"  # glob characters in the name are taken literally
  # A real SIGKILL between the temporary file's creation and its rename.
  killed = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import os, signal, sys\n"
      "from jaxurban.atomic import atomic_write\n"
      "def die(f):\n"
      "  f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
      "atomic_write(sys.argv[1], die)\n",
      str(target),
    ]
  )
  assert killed.wait(timeout=120) == -signal.SIGKILL
  (left,) = tmp_path.iterdir()
  assert left.name.startswith(".embed[1].npy.") and left.name.endswith(".tmp")
  # What the next write must leave alone: a live writer's file (this
  # process), another machine's, another naming's, another target's.
  live = tmp_path / f".embed[1].npy.{atomic._host_tag()}-{os.getpid()}.abc.tmp"
  other_host = tmp_path / f".embed[1].npy.{'0' * 8}-{killed.pid}.abc.tmp"
  if atomic._host_tag() == "0" * 8:
    other_host = tmp_path / f".embed[1].npy.{'1' * 8}-{killed.pid}.abc.tmp"
  foreign = tmp_path / ".embed[1].npy.mine.tmp"
  other_target = tmp_path / f".embed1.npy.{atomic._host_tag()}-{killed.pid}.abc.tmp"
  for path in (live, other_host, foreign, other_target):
    path.write_bytes(b"x")
  save_npy_atomic(target, np.arange(2))
  np.testing.assert_array_equal(np.load(target), np.arange(2))
  assert not left.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
    p.name for p in (target, live, other_host, foreign, other_target)
  )
