"""Ctrl-C in a resumable command: the first stops after a checkpoint, the
second at once. Each case runs in a fresh interpreter that sends itself a
real SIGINT, with Python's default handler in place (a test runner's worker
may have SIGINT ignored, which the commands leave alone)."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).parents[1]

# A training loop of the commands' shape: chunks, a checkpoint every 5 steps
# or when a stop was asked for. `SIGNALS` maps a step to the number of
# SIGINTs sent to the process during it.
LOOP = """
import os, pathlib, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
from experiments.common import exit_status
from jaxurban import interrupt
from jaxurban.checkpoint import Checkpointer

OUT = pathlib.Path(sys.argv[1])

def main(argv):
  for _ in range(SIGNALS.get(0, 0)):  # before the loop: nothing to wait for
    os.kill(os.getpid(), signal.SIGINT)
  checkpointer = Checkpointer(OUT)
  for step in range(1, 9):
    for _ in range(SIGNALS.get(step, 0)):
      os.kill(os.getpid(), signal.SIGINT)
    print(f"chunk {step} done", flush=True)
    if step % 5 == 0 or interrupt.stop_requested():
      checkpointer.save(step, {"w": np.full(3, step)}, {"run": 1})
  checkpointer.close()
  print("finished", flush=True)

sys.exit(exit_status(main, resumable=True))
"""


def run_script(source: str, *args, timeout=300):
  environment = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run(
    [sys.executable, "-c", source, *map(str, args)],
    cwd=ROOT,
    env=environment,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def saved_steps(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_first_ctrl_c_stops_right_after_a_checkpoint(tmp_path):
  done = run_script(f"SIGNALS = {{3: 1}}\n{LOOP}", tmp_path)
  assert done.returncode == 130, done.stderr
  # The chunk under way finished, was saved off schedule, and the run stopped.
  assert done.stdout.split("\n")[:3] == ["chunk 1 done", "chunk 2 done", "chunk 3 done"]
  assert "chunk 4 done" not in done.stdout
  assert saved_steps(tmp_path / "checkpoints" / "train") == [3]
  assert "press Ctrl-C again to stop at once" in done.stderr
  assert "interrupted; stopped after saving the checkpoint at step 3" in done.stderr
  assert "Traceback" not in done.stderr


def test_second_ctrl_c_stops_at_once(tmp_path):
  done = run_script(f"SIGNALS = {{2: 2}}\n{LOOP}", tmp_path)
  assert done.returncode == 130, done.stderr
  assert done.stdout.split() == ["chunk", "1", "done"]
  # No checkpoint yet, and the message says so instead of promising a resume.
  assert saved_steps(tmp_path / "checkpoints" / "train") == []
  assert "interrupted before the first checkpoint of this training" in done.stderr
  assert "Traceback" not in done.stderr


def test_ctrl_c_outside_a_training_loop_stops_at_once(tmp_path):
  done = run_script(f"SIGNALS = {{0: 1}}\n{LOOP}", tmp_path)
  assert done.returncode == 130, done.stderr
  assert "chunk 1 done" not in done.stdout
  assert not (tmp_path / "checkpoints").exists()
  assert "checkpoints already written are kept" in done.stderr


def test_without_ctrl_c_the_loop_keeps_its_schedule(tmp_path):
  done = run_script(f"SIGNALS = {{}}\n{LOOP}", tmp_path)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip().endswith("finished")
  assert saved_steps(tmp_path / "checkpoints" / "train") == [5]


def test_core_align_stops_after_a_checkpoint_and_resumes_from_it(tmp_path, data_root):
  # The real command: a SIGINT while the second chunk (epochs 3-4) is sent
  # to XLA. The schedule alone would save at epoch 6 only.
  script = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from experiments import core_align
    from experiments.common import exit_status
    from jaxurban.core import train

    if sys.argv[2] == "interrupt":
      make_chunk, calls = train.make_chunk, []

      def make_interrupted_chunk(*args, **kwargs):
        chunk = make_chunk(*args, **kwargs)

        def interrupted_chunk(*chunk_args):
          calls.append(1)
          if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
          return chunk(*chunk_args)

        return interrupted_chunk

      train.make_chunk = make_interrupted_chunk
    flags = "--pair XA-CD --seeds 1 --epochs 6 --log-every 2 --checkpoint-every 6"
    flags += " --anchors 64 --no-plot --out " + sys.argv[1]
    sys.exit(exit_status(core_align.main, flags.split(), resumable=True))
    """
  )
  out = tmp_path / "run"
  stopped = run_script(script, out, "interrupt", timeout=600)
  assert stopped.returncode == 130, stopped.stderr
  assert "epoch     4/6" in stopped.stdout and "epoch     6/6" not in stopped.stdout
  assert "stopped after saving the checkpoint at step 4" in stopped.stderr
  assert saved_steps(out / "checkpoints" / "embed") == [4]
  assert not (out / "metrics.json").exists()

  resumed = run_script(script, out, "resume", timeout=600)
  assert resumed.returncode == 0, resumed.stderr
  assert "resuming from the checkpoint at epoch 4" in resumed.stdout
  assert (out / "metrics.json").is_file()
