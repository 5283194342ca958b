"""Ctrl-C in a resumable run stops it right after a checkpoint.

A KeyboardInterrupt raised while XLA computes lands wherever the interpreter
happens to be: inside jax's garbage-collection callback it is printed as
"Exception ignored" and lost (the run goes on), and a process that exits
with a computation still in flight can end in a segmentation fault. So,
inside `stop_at_checkpoints` and while a training loop holds an open
`jaxurban.checkpoint.Checkpointer`, the first Ctrl-C only asks the loop to
stop: the loop saves a checkpoint at the end of its current chunk
(`stop_requested`), and the save then raises `StopAtCheckpoint`, a
KeyboardInterrupt. A second Ctrl-C interrupts at once, as Python does by
default; so does the first one outside a training loop, and any in a run
of several processes.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import threading


class StopAtCheckpoint(KeyboardInterrupt):
  """The run stopped on Ctrl-C right after saving a checkpoint; the message
  names the checkpoint."""


class _State:
  """What the handler and the training loops share (one process, main thread)."""

  def __init__(self) -> None:
    self.enabled = False  # inside `stop_at_checkpoints`
    self.open_loops = 0  # Checkpointers open, so a checkpoint will come
    self.requested = False
    self.folders: list[pathlib.Path] = []  # every Checkpointer's folder, in order


_state = _State()


def _on_sigint(signum, frame) -> None:
  if _state.requested or _state.open_loops == 0:
    raise KeyboardInterrupt
  _state.requested = True
  # os.write, not print: the handler may run while the main thread is inside
  # a write to sys.stderr, and a buffered stream refuses a reentrant write.
  os.write(
    2,
    b"\nCtrl-C: stopping after the checkpoint at the end of this chunk; "
    b"press Ctrl-C again to stop at once\n",
  )


@contextlib.contextmanager
def stop_at_checkpoints():
  """Within the block, Ctrl-C during a training loop stops the run after its
  next checkpoint (see the module's docstring). Does nothing outside the main
  thread, or where SIGINT is not Python's default handler (ignored in a
  background job, or another handler installed)."""
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
  ):
    yield
    return
  previous = signal.signal(signal.SIGINT, _on_sigint)
  _state.__init__()
  _state.enabled = True
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    # The folders stay, for the message of an interrupt caught outside.
    _state.enabled, _state.open_loops, _state.requested = False, 0, False


def loop_opened(folder: pathlib.Path) -> None:
  """A Checkpointer opened `folder`: until `loop_closed`, a first Ctrl-C waits
  for its next save."""
  # Here, not at the top: experiments.common, which the PyTorch extraction
  # stage imports too, imports this module and should not need jax.
  import jax

  if _state.enabled:
    _state.folders.append(pathlib.Path(folder))
    # Several processes (--distributed) would each see the request after a
    # chunk of their own and enter a collective save apart: they stop at once.
    if jax.process_count() == 1:
      _state.open_loops += 1


def loop_closed() -> None:
  if _state.enabled and _state.open_loops > 0:
    _state.open_loops -= 1


def stop_requested() -> bool:
  """True once Ctrl-C asked the run to stop: the loop saves a checkpoint at
  the end of its current chunk whatever its schedule."""
  return _state.requested


def stop_if_requested(what: str) -> None:
  """Raises StopAtCheckpoint, saying that `what` (a saved checkpoint) is where
  the run stopped, when Ctrl-C asked for it."""
  if _state.requested:
    raise StopAtCheckpoint(
      f"stopped after saving {what}: run the same command again to resume from it"
    )


def interrupted_message(error: KeyboardInterrupt) -> str:
  """What a resumable command says when Ctrl-C stopped it: where it stopped,
  and whether a rerun resumes or starts its training afresh."""
  if isinstance(error, StopAtCheckpoint):
    return f"interrupted; {error}"
  if checkpoints_kept() is False:
    return (
      "interrupted before the first checkpoint of this training: run the same command again to "
      "start it (outputs already finished are kept)"
    )
  return (
    "interrupted; checkpoints already written are kept: run the same command again to resume "
    "from the last one"
  )


def checkpoints_kept() -> bool | None:
  """Whether a Checkpointer opened in the last `stop_at_checkpoints` block has
  a checkpoint on disk (the message for an immediate Ctrl-C depends on it);
  None when none was opened there."""
  if not _state.folders:
    return None
  return any(
    child.is_dir() and child.name.isdigit()
    for folder in _state.folders
    if folder.is_dir()
    for child in folder.iterdir()
  )
