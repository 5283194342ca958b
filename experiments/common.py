"""What the experiment commands share: the output folder, its default and its check."""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
from collections.abc import Iterable

from jaxurban.atomic import writable_folder_problem


def checked_output_folder(parser: argparse.ArgumentParser, out) -> pathlib.Path:
  """`out` as a path, or a usage error (exit 2) when a run could not write there."""
  problem = writable_folder_problem(out)
  if problem:
    parser.error(problem)
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
