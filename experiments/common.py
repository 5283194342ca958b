"""What the experiment commands share: the output folder, its default and its
check, the checks of the benchmarks' flags, and their one-line data errors."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterable

from jaxurban import interrupt
from jaxurban.atomic import path_argument, write_json_atomic, writable_folder_problem
from jaxurban.data.errors import DataError


def _whole_number_at_least(text: str, minimum: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
  return value


def positive_int(text: str) -> int:
  """argparse type: a whole number of at least 1 (counts, repeats, sizes)."""
  return _whole_number_at_least(text, 1)


def non_negative_int(text: str) -> int:
  """argparse type: a whole number of at least 0 (a seed, say)."""
  return _whole_number_at_least(text, 0)


def positive_number(text: str) -> float:
  """argparse type: a finite number above 0 (a memory budget, say)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0 < value < float("inf"):
    raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
  return value


def absolute_path(text: str) -> str:
  """argparse type for an input file or folder: the absolute path, so that the
  config saved with results and checkpoints names the same input the same way
  whether it was given as ``emb.npy``, ``./emb.npy`` or ``/runs/emb.npy``
  (a resume or rerun compares configs, and the run may start elsewhere).
  An empty text (an unset shell variable) is refused: it would name the
  current folder."""
  return os.path.abspath(os.path.expanduser(path_argument(text, "a file or folder")))


def positive_int_list(text: str) -> list[int]:
  """argparse type: comma-separated whole numbers of at least 1, e.g. ``716,2352``."""
  return [positive_int(part) for part in text.split(",")]


def checked_output_file(parser: argparse.ArgumentParser, path) -> pathlib.Path | None:
  """`path` (a file to write) as a path, None when not given, or a usage
  error (exit 2) when it is a folder or its folder cannot be written."""
  if path is None:
    return None
  path = pathlib.Path(path)
  if path.is_dir():
    parser.error(f"--out {path}: is a folder; give the name of a file to write")
  problem = writable_folder_problem(path.parent if str(path.parent) else ".")
  if problem:
    parser.error(f"--out {path}: {problem}")
  return path


def check_torch_flags(
  parser: argparse.ArgumentParser, args: argparse.Namespace, marker: str
) -> None:
  """--torch-python and --torch-repo come together, and name what exists
  (the repository holding `marker`, a file of the authors' code), before
  any timing runs."""
  given = [f for f in ("torch_python", "torch_repo") if getattr(args, f)]
  if len(given) == 1:
    missing = "--torch-repo" if given == ["torch_python"] else "--torch-python"
    parser.error(f"--{given[0].replace('_', '-')} needs {missing} too")
  if given:
    if not os.access(args.torch_python, os.X_OK) or os.path.isdir(args.torch_python):
      parser.error(f"--torch-python {args.torch_python}: not an executable file")
    if not os.path.isdir(args.torch_repo):
      parser.error(f"--torch-repo {args.torch_repo}: not a folder")
    if not os.path.isfile(os.path.join(args.torch_repo, marker)):
      parser.error(
        f"--torch-repo {args.torch_repo}: no {marker} there (a checkout of the authors' "
        "repository is expected)"
      )
    # Checked from here, so passed on as found from here: the torch child may
    # run in another folder.
    args.torch_python = os.path.abspath(args.torch_python)
    args.torch_repo = os.path.abspath(args.torch_repo)


def exit_status(
  main: Callable[[list[str] | None], object],
  argv: list[str] | None = None,
  resumable: bool = False,
) -> int:
  """Runs a command's or benchmark's `main`; a data problem (a missing data
  root, an unknown city) or a file the process may not read or write is one
  line on stderr and exit status 2. For a `resumable` command, a first
  Ctrl-C in a training loop stops the run after its next checkpoint
  (`jaxurban.interrupt`), and an interrupt is one line saying how to go on
  (status 130, as a shell reports SIGINT) instead of a traceback from inside
  the run."""
  try:
    with interrupt.stop_at_checkpoints() if resumable else contextlib.nullcontext():
      result = main(argv)
      if resumable and interrupt.stop_requested() and result in (None, 0):
        print("the run finished before its next checkpoint", file=sys.stderr)
  except DataError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except PermissionError as error:
    # An input (or output) the user may not read (or write), wherever it
    # was met: the path and the reason on one line, not a traceback.
    print(f"error: {error.filename or ''}: {error.strerror}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as error:
    if not resumable:
      raise
    print(f"\n{interrupt.interrupted_message(error)}", file=sys.stderr)
    return 130
  return result if isinstance(result, int) else 0


# Names the command whose outputs a folder holds, so that another command
# given the same --out is refused instead of replacing its pictures (both
# CoRE and UrbanMMCL write embeddings.png and losses.png, say).
COMMAND_FILE = "command.json"


def folder_command(out) -> str | None:
  """The command recorded in `out`'s `COMMAND_FILE`, None when there is
  none; ValueError naming the file when it cannot be read."""
  path = pathlib.Path(out) / COMMAND_FILE
  if not path.is_file():
    return None
  try:
    command = json.loads(path.read_text(encoding="utf-8"))["command"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise ValueError(
      f"{path}: cannot tell which command wrote this folder ({type(error).__name__}: {error})"
    ) from None
  return str(command)


def _files_in(folder: pathlib.Path, leaving_out: pathlib.Path) -> set:
  """(path, size, mtime) of every file or link under `folder` but one."""
  found = set()
  for path in folder.rglob("*"):
    if path != leaving_out and (path.is_file() or path.is_symlink()):
      with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        found.add((path, info.st_size, info.st_mtime_ns))
  return found


@contextlib.contextmanager
def no_empty_folder_left(out, command: str | None = None):
  """Runs the block in `out`, recording `command` there (`COMMAND_FILE`).

  Afterwards the record goes again if the block changed no file (a run
  refused on its inputs leaves the folder as it found it), and so do the
  folders made on the way to `out` (which did not exist before) if they
  hold no file, so that a refused run leaves no trace.
  """
  made = None
  path = pathlib.Path(out).absolute()
  while not path.exists():
    made, path = path, path.parent
  folder = pathlib.Path(out)
  record = folder / COMMAND_FILE
  before = None  # the files before this run wrote its record, if it did
  if command is not None and not record.exists():
    folder.mkdir(parents=True, exist_ok=True)
    before = _files_in(folder, record)
    write_json_atomic(record, {"command": command})
  try:
    yield
  finally:
    if before is not None and _files_in(folder, record) == before:
      with contextlib.suppress(FileNotFoundError):
        record.unlink()
    if made is not None and made.is_dir():
      inside = list(made.rglob("*"))
      if not any(p.is_file() or p.is_symlink() for p in inside):
        for folder in sorted(inside, key=lambda p: -len(p.parts)) + [made]:
          # Under --distributed every process tidies the same folders.
          with contextlib.suppress(FileNotFoundError):
            folder.rmdir()


def checked_output_folder(
  parser: argparse.ArgumentParser, out, command: str | None = None
) -> pathlib.Path:
  """`out` as a path, or a usage error (exit 2) when a run could not write
  there, or when it holds the outputs of a command other than `command`."""
  problem = writable_folder_problem(out)
  if problem:
    parser.error(problem)
  try:
    owner = folder_command(out) if command is not None else None
  except ValueError as error:
    parser.error(str(error))
  if owner is not None and owner != command:
    parser.error(
      f"{out} holds the outputs of python -m {owner} ({COMMAND_FILE}); give this run another --out"
    )
  return pathlib.Path(out)


def default_output_folder(
  base: str | pathlib.Path,
  parser: argparse.ArgumentParser,
  args: argparse.Namespace,
  leading: Iterable[str],
  ignore: Iterable[str],
) -> pathlib.Path:
  """``base/<leading>-<every setting that differs from its default>``.

  Runs that differ in a setting that changes their results get folders of
  their own, so that one command neither overwrites another's outputs nor
  is refused by its checkpoints. `ignore` names the flags (argparse dests)
  that do not change a result (where outputs go, how often to log) or that
  `leading` already spells out. Flags left at their defaults add nothing, so
  the plain command keeps the short name.
  """
  ignore = set(ignore)
  parts = [str(p) for p in leading]
  for action in parser._actions:
    dest = action.dest
    if dest in ignore or dest == "help" or not hasattr(args, dest):
      continue
    value = getattr(args, dest)
    if value == action.default:
      continue
    name = dest.replace("_", "-")
    if value is True:
      parts.append(name)
      continue
    if isinstance(value, (list, tuple)):
      value = "+".join(str(v) for v in value)
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9.+-]{1,24}", text):
      # A path or a long value: a short digest keeps the name portable.
      text = hashlib.sha256(text.encode()).hexdigest()[:8]
    parts.append(f"{name}{text}")
  return pathlib.Path(base) / "-".join(parts)


def build_config(parser: argparse.ArgumentParser, config_class, renamed=None, **fields):
  """``config_class(**fields)``; a value it refuses is a usage error (exit 2)
  that names the flag behind the field (``--anchors``, not ``n_anchors``).

  Args:
    parser: the command's parser, whose options are the flags.
    config_class: a config dataclass that raises ValueError on bad settings.
    renamed: field -> flag where the flag is not the field's name with
      dashes (``{"n_anchors": "--anchors"}``).
    **fields: the config's fields, from the parsed flags.
  """
  try:
    return config_class(**fields)
  except ValueError as error:
    parser.error(with_flag_names(str(error), parser, fields, renamed or {}))


def with_flag_names(message: str, parser: argparse.ArgumentParser, fields, renamed) -> str:
  """`message` with each config field set from a flag written as that flag.

  A field with an underscore is replaced wherever it stands. A one-word
  field (``seeds``, ``data``) is replaced only where a clause starts with it
  and goes on to judge its value (``must be``, ``is``, ``not in``,
  ``repeat``, ``=``, or the value quoted): elsewhere the word is likely
  plain English, as in "seeds must lie in [0, 2**31)", which may be about
  ``--first-seed``. A leading ``SomeConfig.`` or ``SomeConfig:`` before a
  replaced field goes with it. ``spatial_bias=False`` set by
  ``--no-spatial-bias`` becomes that flag alone, and "--x (--x)" one flag.
  """
  options = {option for action in parser._actions for option in action.option_strings}
  flags = {}
  for field in fields:
    flag = renamed.get(field, "--" + field.replace("_", "-"))
    if flag in options:
      flags[field] = flag
  if not flags:
    return message

  def flag_for(field: str, setting: str | None) -> str:
    # A switch's field=True/False says no more than the switch itself.
    switch = setting in ("=True", "=False") and flags[field].startswith("--no-")
    return flags[field] + ("" if switch or setting is None else setting)

  def alternatives(names) -> str:
    return "|".join(re.escape(f) for f in sorted(names, key=len, reverse=True))

  prefix = r"(?:\b[A-Za-z]*Config(?:\.|:\s*))?"
  switch_setting = r"(=True\b|=False\b)"
  judged = r"(?=\s+(?:must be|is|not in|repeat)\b|\s+['\"]|=)"
  clause_start = re.compile(
    rf"(^|;\s*){prefix}\b({alternatives(flags)})\b(?:{switch_setting}|{judged})"
  )
  message = clause_start.sub(lambda m: m.group(1) + flag_for(m.group(2), m.group(3)), message)
  compound = [f for f in flags if "_" in f]
  if compound:
    anywhere = re.compile(rf"{prefix}(?<![\w-])({alternatives(compound)})\b{switch_setting}?")
    message = anywhere.sub(lambda m: flag_for(m.group(1), m.group(2)), message)
  return re.sub(r"(--[\w-]+) \(\1\)", r"\1", message)
