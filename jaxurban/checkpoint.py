"""Checkpoints and result files that carry their config.

Every checkpoint holds the training state and, beside it, the JSON config of
the run that wrote it; resuming refuses a checkpoint whose config differs in
anything that changes the result. Orbax writes each step to a temporary folder
and renames it when complete, so a killed run leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import orbax.checkpoint as ocp

from jaxurban import interrupt

# The atomic writers live in `jaxurban.atomic` (no orbax import there, for the
# data layer); they are re-exported here, beside the checkpoints.
from jaxurban.atomic import (  # noqa: F401
  as_json_types as _as_json,
  as_written_json,
  json_differences as _differences,
  same_json_value as _same_value,
  atomic_write,
  remove_earlier_outputs,
  save_npy_atomic,
  write_json_atomic,
  write_text_atomic,
)


class CheckpointMismatch(ValueError):
  """The checkpoint in a work directory was written by a different config."""


class CheckpointUnreadable(CheckpointMismatch):
  """The checkpoint's files cannot be read back (edited, truncated, or a part
  removed by hand). A subclass of CheckpointMismatch, so that every command
  that reports a mismatch in one line reports this the same way."""


def check_same_config(
  saved: dict,
  config: dict,
  what: str,
  ignore: tuple[str, ...] = (),
  remedy: str = "use another output folder or delete it",
) -> None:
  """Raises CheckpointMismatch naming every key (outside ``ignore``) in which
  the ``saved`` config differs from ``config``; ``what`` names the saved thing
  and ``remedy`` ends the message."""
  if not isinstance(saved, dict):
    raise CheckpointUnreadable(
      f"{what} holds a config that is a {type(saved).__name__}, not a mapping (edited by "
      f"hand?); {remedy}"
    )
  current = _as_json(config)
  differing = sorted(
    k
    for k in set(saved) | set(current)
    if k not in ignore and not _same_value(saved.get(k), current.get(k))
  )
  if differing:
    details = ", ".join(
      part for k in differing for part in _differences(k, saved.get(k), current.get(k))
    )
    raise CheckpointMismatch(f"{what} was written with a different config ({details}); {remedy}")


def check_previous_results(
  path, config: dict, may_differ: tuple[str, ...] = (), key: str = "config"
) -> None:
  """Refuses to write over ``path``, a results file of an earlier run, when
  that run's config differs from ``config`` outside ``may_differ``.

  Without this a rerun with other settings into the same folder replaced
  the results file while files of the earlier run (a task's predictions and
  plots, say) stayed beside it, described by nothing. A results file that
  cannot be read, or holds no config, is refused too: it was not written by
  a finished run of this code.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return
  # The whole folder: deleting the results file alone would leave the
  # earlier run's other outputs for the next run to sit beside.
  remedy = f"use another output folder or delete {path.parent}"
  try:
    saved = json.loads(path.read_text())[key]
    if not isinstance(saved, dict):
      raise TypeError(f"{key!r} is a {type(saved).__name__}, not a mapping")
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise CheckpointMismatch(
      f"{path}: holds no readable {key!r} ({type(error).__name__}); {remedy}"
    ) from error
  # As the results file wrote it: non-finite floats became null.
  check_same_config(saved, as_written_json(config), str(path), ignore=may_differ, remedy=remedy)


class Checkpointer:
  """Saves and restores ``(state, config)`` pairs under ``workdir/checkpoints/subdir``."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    subdir: str = "train",
    max_to_keep: int = 2,
  ):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints" / subdir
    # Something other than a folder on the way (a file named "checkpoints")
    # would surface as an OS error from deep inside orbax.
    for folder in reversed((self.directory, *self.directory.parents)):
      if folder.exists() and not folder.is_dir():
        raise CheckpointUnreadable(
          f"{folder}: is not a folder, so the checkpoints cannot be kept under it; "
          "use another output folder or move it away"
        )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=False,
        # A save killed part-way leaves a "<step>.orbax-checkpoint-tmp-*" folder,
        # which restore ignores; the next run of the same folder removes it.
        cleanup_tmp_directories=True,
      ),
    )
    # Orbax removes those folders in the background and waits for that only
    # before its next save; waiting here makes the folder clean on return.
    # (A private hook: without it the removal still happens, only later.)
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    # From here a first Ctrl-C waits for the next `save` (jaxurban.interrupt).
    interrupt.loop_opened(self.directory)
    self._open = True
    # Seconds that earlier runs of this folder spent up to the checkpoint
    # `restore` read (0 before one is read; None where that checkpoint
    # predates the record), so that a resumed run can report the time its
    # result took, not only its own attempt's.
    self.earlier_seconds: float | None = 0.0
    self._opened_at = time.perf_counter()

  def time_from(self, started: float) -> None:
    """Counts this run's own time from ``started`` (a `time.perf_counter()`
    value), where the caller's own figure starts, so that the time with the
    earlier runs is this run's figure plus theirs."""
    self._opened_at = started

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config: dict, log: Any = None) -> None:
    """Writes ``state`` with ``config``; ``log`` (JSON, e.g. the loss history
    so far) travels beside them so that a resumed run keeps it.

    Then raises `interrupt.StopAtCheckpoint` if Ctrl-C asked the run to stop
    (a loop saves at the end of its chunk when `interrupt.stop_requested()`).
    """
    items = {
      "state": ocp.args.StandardSave(state),
      "config": ocp.args.JsonSave(_as_json(config)),
    }
    if log is not None:
      items["log"] = ocp.args.JsonSave(_as_json(log))
    # Wall time from the first run of this folder to this save, summed over
    # the runs whose work it holds (a killed run's work after its last
    # checkpoint is lost, and so is its time).
    seconds = self.seconds_so_far()
    items["timing"] = ocp.args.JsonSave({"seconds": seconds})
    self._manager.save(step, args=ocp.args.Composite(**items))
    self._manager.wait_until_finished()
    interrupt.stop_if_requested(f"the checkpoint at step {step} in {self.directory}")

  def seconds_so_far(self) -> float | None:
    """`earlier_seconds` plus this run's time since the Checkpointer opened;
    None when the earlier runs' time is not known."""
    if self.earlier_seconds is None:
      return None
    return self.earlier_seconds + time.perf_counter() - self._opened_at

  def restore_log(self) -> Any:
    """The ``log`` saved with the latest checkpoint (the one `restore` reads);
    None without a checkpoint or when that checkpoint has none (written
    before logs were saved)."""
    step = self._manager.latest_step()
    if step is None or not (self.directory / str(step) / "log").exists():
      return None
    return self._read(step, log=ocp.args.JsonRestore())["log"]

  def restore(
    self, state_template: Any, config: dict, ignore: tuple[str, ...] = ()
  ) -> tuple[int, Any] | None:
    """Restores the latest state, or returns None when there is none.

    Raises CheckpointMismatch when the saved config differs from ``config``
    in any key other than those in ``ignore``.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    # The config first: a run with other settings (more seeds, another city)
    # has other array shapes, and restoring the state into them would fail
    # inside orbax before the settings could be compared and named.
    saved = self._read(step, config=ocp.args.JsonRestore())
    check_same_config(
      saved["config"], config, f"{self.directory}: the checkpoint at step {step}", ignore
    )
    restored = self._read(step, state=ocp.args.StandardRestore(state_template))
    self.earlier_seconds = None
    if (self.directory / str(step) / "timing").exists():
      self.earlier_seconds = self._read(step, timing=ocp.args.JsonRestore())["timing"]["seconds"]
    return step, restored["state"]

  def _read(self, step: int, **items: Any) -> Any:
    """One restore, with any failure of orbax to read the files turned into
    one line that names the folder and says how to go on."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # orbax raises KeyError, JSON and tensorstore errors, ...
      reason = (str(error).strip().splitlines() or [""])[0][:200]
      raise CheckpointUnreadable(
        f"{self.directory}: the {', '.join(items)} of the checkpoint at step {step} cannot be "
        f"read ({type(error).__name__}: {reason}); delete {self.directory} to start afresh, "
        "or use another output folder"
      ) from error

  def close(self) -> None:
    if self._open:
      interrupt.loop_closed()
      self._open = False
    self._manager.close()
