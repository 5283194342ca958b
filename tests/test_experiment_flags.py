"""The benchmarks' flags and data errors: usage errors before any timing."""

import argparse
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import bench_core, bench_scale, bench_srel, bench_urbanmmcl, bench_urbanpg
from experiments.common import (
  check_torch_flags,
  checked_output_file,
  exit_status,
  non_negative_int,
  positive_int,
  positive_int_list,
  positive_number,
)
from jaxurban.data.errors import DataError


def test_positive_counts():
  assert positive_int("3") == 3 and positive_int_list("716,2352") == [716, 2352]
  for text, words in (("0", "at least 1, got 0"), ("-2", "got -2"), ("abc", "whole number")):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
      positive_int(text)
  with pytest.raises(argparse.ArgumentTypeError, match="got 0"):
    positive_int_list("5,0")


def test_non_negative_counts():
  assert non_negative_int("0") == 0 and non_negative_int("7") == 7
  for text, words in (("-1", "at least 0, got -1"), ("1.5", "whole number")):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
      non_negative_int(text)


@pytest.mark.parametrize(
  "argv, words",
  [
    # Each command's config refuses the value; the error names the flag.
    (["core_align", "--pair", "XA-CD", "--anchors", "0"], "error: --anchors must be >= 1, got 0"),
    (
      ["core_align", "--pair", "XA-CD", "--epochs", "0", "--log-every", "0"],
      "error: --epochs must be >= 1, got 0; --log-every must be >= 1, got 0",
    ),
    (
      ["core_align", "--pair", "XA-CD", "--gat", "segment", "--remat-gat"],
      "error: --remat-gat needs --gat 'tables'",
    ),
    # "seeds" there is the seeds' values, which --first-seed sets: left as it is.
    (["core_align", "--pair", "XA-CD", "--first-seed", "-1"], "error: CoreConfig: seeds must lie"),
    (["topt", "--epochs-srel", "0"], "error: --epochs-srel must be >= 1, got 0"),
    (["topt", "--seeds", "0"], "error: --seeds is empty"),
    (["urbanpg", "--features", "0"], "error: --features must be >= 1, got 0"),
    (["urbanmmcl", "--finetune-seeds", "9"], "error: --finetune-seeds must be in [0, seeds=5]"),
    # An empty --out (an unset shell variable) would write into the default
    # folder or the current one.
    *(
      (argv + ["--out", ""], "error: argument --out: given as an empty path")
      for argv in (
        ["core_align", "--pair", "XA-CD"],
        ["topt"],
        ["urbanpg"],
        ["urbanmmcl"],
        ["extract_prompts", "--regions", "r.json", "--model", "m", "--task", "crime"],
      )
    ),
  ],
)
def test_refused_settings_name_their_flags(argv, words, capsys):
  import importlib

  command = importlib.import_module(f"experiments.{argv[0]}")
  try:
    status = command.main(argv[1:])
  except SystemExit as stopped:
    status = stopped.code
  assert status == 2
  assert words in capsys.readouterr().err


def test_flag_names_in_a_message():
  from experiments.common import with_flag_names

  parser = argparse.ArgumentParser()
  for flag in ("--data", "--seeds", "--heads"):
    parser.add_argument(flag)
  fields = {"data": "x", "seeds": 1, "n_heads": 3, "unflagged_field": 0}
  message = (
    "Config: at least 2 seeds and the data root; n_heads 3 is odd; data 'x' is unknown; "
    "unflagged_field must be > 0"
  )
  assert with_flag_names(message, parser, fields, {"n_heads": "--heads"}) == (
    "Config: at least 2 seeds and the data root; --heads 3 is odd; --data 'x' is unknown; "
    "unflagged_field must be > 0"
  )
  # A switch's field=False is the switch; "--flag (field)" says it once.
  parser.add_argument("--no-spatial-bias", action="store_true")
  parser.add_argument("--embeddings")
  fields = {"spatial_bias": False, "embeddings_path": "e.npy"}
  renamed = {"spatial_bias": "--no-spatial-bias", "embeddings_path": "--embeddings"}
  message = "Config.spatial_bias=False has no effect with --embeddings (embeddings_path)"
  assert with_flag_names(message, parser, fields, renamed) == (
    "--no-spatial-bias has no effect with --embeddings"
  )


def test_positive_budgets():
  assert positive_number("0.5") == 0.5 and positive_number("16") == 16.0
  for text, words in (("0", "above 0"), ("-1", "above 0"), ("inf", "finite"), ("x", "a number")):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
      positive_number(text)


@pytest.mark.parametrize(
  "main, argv, words",
  [
    (bench_core.main, ["--seeds", "0"], "--seeds: must be at least 1, got 0"),
    (bench_core.main, ["--chunk", "0"], "--chunk: must be at least 1"),
    (bench_core.main, ["--torch-threads", "0"], "--torch-threads: must be at least 1"),
    (bench_core.main, ["--torch-repo", "."], "--torch-repo needs --torch-python too"),
    (bench_scale.main, ["--sizes", "100", "-5"], "--sizes: must be at least 1, got -5"),
    (bench_scale.main, ["--repeats", "0"], "--repeats: must be at least 1"),
    (bench_srel.main, ["--seeds", "0"], "--seeds: must be at least 1"),
    (bench_urbanmmcl.main, ["--repeats", "0"], "--repeats: must be at least 1"),
    (bench_urbanpg.main, ["--attention", "linear,flash"], "unknown attention form(s) flash"),
    (bench_urbanpg.main, ["--nodes", "716,abc"], "expected a whole number, got 'abc'"),
  ],
)
def test_benchmark_flags_are_usage_errors(main, argv, words, capsys):
  with pytest.raises(SystemExit) as stop:
    main(argv)
  assert stop.value.code == 2
  assert words in capsys.readouterr().err


def test_output_files_and_torch_flags(tmp_path, capsys, monkeypatch):
  parser = argparse.ArgumentParser(prog="bench")
  assert checked_output_file(parser, None) is None
  assert checked_output_file(parser, tmp_path / "rows.json") == tmp_path / "rows.json"
  with pytest.raises(SystemExit):
    checked_output_file(parser, tmp_path)
  assert "is a folder; give the name of a file" in capsys.readouterr().err
  # Missing folders on the way are made; a file on the way cannot be.
  assert checked_output_file(parser, tmp_path / "new" / "rows.json") is not None
  (tmp_path / "taken").write_text("x")
  with pytest.raises(SystemExit):
    checked_output_file(parser, tmp_path / "taken" / "rows.json")
  assert "taken: exists and is not a folder" in capsys.readouterr().err

  def torch(python, repo):
    check_torch_flags(
      parser, argparse.Namespace(torch_python=python, torch_repo=repo), "Model/CoRE.py"
    )

  torch(None, None)  # neither: nothing to check
  for python, repo, words in (
    (str(tmp_path / "python"), str(tmp_path), "not an executable file"),
    (str(tmp_path), str(tmp_path), "not an executable file"),  # a folder
    # Another checkout (or an empty folder) fails now, not after the timings.
    (sys.executable, str(tmp_path), "no Model/CoRE.py there"),
  ):
    with pytest.raises(SystemExit):
      torch(python, repo)
    assert words in capsys.readouterr().err

  # Relative paths, checked from here, are passed on absolute: the torch child
  # may run from another folder.
  (tmp_path / "CoRE" / "Model").mkdir(parents=True)
  (tmp_path / "CoRE" / "Model" / "CoRE.py").write_text("")
  monkeypatch.chdir(tmp_path)
  relative_python = os.path.relpath(sys.executable, tmp_path)
  args = argparse.Namespace(torch_python=relative_python, torch_repo="CoRE")
  check_torch_flags(parser, args, "Model/CoRE.py")
  assert args.torch_repo == str(tmp_path / "CoRE")
  assert os.path.isabs(args.torch_python) and os.path.samefile(args.torch_python, sys.executable)


def test_data_errors_are_one_line_with_status_2(capsys):
  def main(argv):
    raise DataError("regionmap_zz.geo", "file missing")

  assert exit_status(main) == 2
  assert capsys.readouterr().err == "error: regionmap_zz.geo: file missing\n"
  assert exit_status(lambda argv: None) == 0 and exit_status(lambda argv: 3) == 3

  def unreadable(argv):
    raise PermissionError(13, "Permission denied", "/data/core/xa/regionmap_xa.geo")

  assert exit_status(unreadable) == 2
  assert capsys.readouterr().err == "error: /data/core/xa/regionmap_xa.geo: Permission denied\n"


def test_folders_another_process_removed_first_are_no_error(tmp_path, monkeypatch):
  # Under --distributed every process of a refused run tidies the same new
  # folders; the slower one finds some already gone.
  import pathlib

  from experiments.common import no_empty_folder_left

  out = tmp_path / "runs" / "model"
  real_rmdir = pathlib.Path.rmdir

  def removed_by_the_other_process(self):
    real_rmdir(self)
    raise FileNotFoundError(2, "No such file or directory", str(self))

  with pytest.raises(DataError):
    with no_empty_folder_left(out):
      out.mkdir(parents=True)
      monkeypatch.setattr(pathlib.Path, "rmdir", removed_by_the_other_process)
      raise DataError("x.npy", "file missing")
  monkeypatch.undo()
  assert list(tmp_path.iterdir()) == []


def test_urbanpg_batch_split_refuses_several_processes(monkeypatch):
  import jax

  from jaxurban.urbanpg import train as urbanpg_train

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="2 processes .set shard_batch=False."):
    urbanpg_train.Placement(True, 64)
  assert urbanpg_train.Placement(False, 64).mesh is None


def test_a_refused_run_leaves_no_empty_folders(tmp_path):
  from experiments.common import no_empty_folder_left

  out = tmp_path / "runs" / "model" / "setting"
  with pytest.raises(DataError):
    with no_empty_folder_left(out):
      (out / "checkpoints").mkdir(parents=True)
      raise DataError("x.npy", "file missing")
  assert list(tmp_path.iterdir()) == []  # runs/ was made by the run, and went with it
  # A folder that held files, or existed before, stays.
  with no_empty_folder_left(out):
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
  assert (out / "metrics.json").is_file()
  # A link the run made is kept too, even one whose target has gone.
  linked = tmp_path / "linked" / "setting"
  with no_empty_folder_left(linked):
    linked.mkdir(parents=True)
    (linked / "latest").symlink_to(tmp_path / "gone")
  assert (linked / "latest").is_symlink()
  existing = tmp_path / "existing"
  existing.mkdir()
  with no_empty_folder_left(existing):
    pass
  assert existing.is_dir()


def test_a_folder_records_its_command_and_refuses_other_commands(tmp_path, capsys):
  import json

  from experiments.common import COMMAND_FILE, checked_output_folder, no_empty_folder_left

  out = tmp_path / "runs" / "shared"
  # A refused run leaves neither its record nor the folders it made.
  with pytest.raises(DataError):
    with no_empty_folder_left(out, "experiments.core_align"):
      assert json.loads((out / COMMAND_FILE).read_text()) == {"command": "experiments.core_align"}
      raise DataError("x.npy", "file missing")
  assert list(tmp_path.iterdir()) == []
  # A run that wrote something keeps the record.
  with no_empty_folder_left(out, "experiments.core_align"):
    (out / "embeddings.png").write_bytes(b"png")
  assert (out / COMMAND_FILE).is_file()
  # One refused in a folder of earlier files (made before records were
  # kept) leaves it as it found it.
  earlier = tmp_path / "earlier"
  earlier.mkdir()
  (earlier / "metrics.json").write_text("{}")
  with pytest.raises(DataError):
    with no_empty_folder_left(earlier, "experiments.topt"):
      raise DataError("x.npy", "file missing")
  assert [p.name for p in earlier.iterdir()] == ["metrics.json"]
  parser = argparse.ArgumentParser(prog="cmd")
  assert checked_output_folder(parser, out, "experiments.core_align") == out
  with pytest.raises(SystemExit):
    checked_output_folder(parser, out, "experiments.urbanmmcl")
  err = capsys.readouterr().err
  assert f"{out} holds the outputs of python -m experiments.core_align (command.json)" in err
  # A folder without a record (made before records were kept) is the
  # commands' own checks' to judge, as before.
  assert checked_output_folder(parser, tmp_path, "experiments.urbanmmcl") == tmp_path
  (out / COMMAND_FILE).write_text("{")
  with pytest.raises(SystemExit):
    checked_output_folder(parser, out, "experiments.core_align")
  assert "cannot tell which command wrote this folder" in capsys.readouterr().err


@pytest.mark.parametrize(
  "argv",
  [
    ["topt", "--task", "crime"],
    ["urbanpg"],
    ["urbanmmcl"],
  ],
)
def test_commands_refuse_a_core_align_folder(argv, tmp_path, capsys):
  import importlib
  import json

  from experiments.common import COMMAND_FILE

  (tmp_path / COMMAND_FILE).write_text(json.dumps({"command": "experiments.core_align"}))
  (tmp_path / "embeddings.png").write_bytes(b"png")
  command = importlib.import_module(f"experiments.{argv[0]}")
  try:
    status = command.main(argv[1:] + ["--out", str(tmp_path)])
  except SystemExit as stopped:
    status = stopped.code
  assert status == 2
  assert "holds the outputs of python -m experiments.core_align" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == [COMMAND_FILE, "embeddings.png"]


@pytest.mark.parametrize(
  "command, flag, field",
  [
    ("topt", "--embeddings", "embeddings_path"),
    ("topt", "--prompts", "prompts_dir"),
    ("urbanmmcl", "--images", "images"),
  ],
)
def test_input_paths_are_saved_absolute(command, flag, field, tmp_path, monkeypatch):
  """The config saved beside results names an input the same way however it
  was given, so a rerun or resume from another folder is not refused."""
  import importlib

  parse_config = importlib.import_module(f"experiments.{command}").parse_config
  monkeypatch.chdir(tmp_path)
  out = ["--out", str(tmp_path / "out")]
  given = [getattr(parse_config([flag, name, *out])[0], field) for name in ("x", "./x", "../t/x")]
  assert given == [str(tmp_path / "x")] * 2 + [str(tmp_path.parent / "t" / "x")]


def test_an_interrupted_command_says_how_to_resume(capsys):
  def interrupted(argv):
    raise KeyboardInterrupt

  assert exit_status(interrupted, resumable=True) == 130
  assert (
    capsys.readouterr()
    .err.strip()
    .endswith("run the same command again to resume from the last one")
  )
  with pytest.raises(KeyboardInterrupt):  # a benchmark has nothing to resume
    exit_status(interrupted)
  # Every command's entry point goes through it.
  import pathlib

  for name in ("core_align", "topt", "urbanpg", "urbanmmcl"):
    source = (pathlib.Path(__file__).parents[1] / "experiments" / f"{name}.py").read_text()
    assert "sys.exit(exit_status(main, resumable=True))" in source, name


def test_default_output_folder_names_every_changed_result_setting(tmp_path):
  from experiments.common import default_output_folder

  parser = argparse.ArgumentParser()
  parser.add_argument("--epochs", type=int, default=600)
  parser.add_argument("--no-lma", action="store_true")
  parser.add_argument("--sizes", type=positive_int_list, default=[716])
  parser.add_argument("--embeddings", default=None)
  parser.add_argument("--log-every", type=int, default=10)

  def folder(*argv):
    args = parser.parse_args(list(argv))
    return default_output_folder(tmp_path, parser, args, ["XA", "CD"], ignore=["log_every"]).name

  # The plain command keeps the short name; a setting that changes no result
  # (how often to log) adds nothing.
  assert folder() == folder("--log-every", "5") == "XA-CD"
  assert folder("--epochs", "20", "--no-lma", "--sizes", "1,2") == "XA-CD-epochs20-no-lma-sizes1+2"
  # A path is not spelled out: a short digest of it, one per path.
  one, other = folder("--embeddings", "/runs/a/emb.npy"), folder("--embeddings", "/runs/b/emb.npy")
  assert one.startswith("XA-CD-embeddings") and len(one) == len("XA-CD-embeddings") + 8
  assert one != other and "/" not in one


def test_input_paths_expand_the_home_folder(monkeypatch, tmp_path):
  from experiments.common import absolute_path

  monkeypatch.setenv("HOME", str(tmp_path))
  assert absolute_path("~/vectors") == str(tmp_path / "vectors")
  # An empty path (an unset shell variable) is not the current folder.
  for empty in ("", "  "):
    with pytest.raises(argparse.ArgumentTypeError, match="given as an empty path"):
      absolute_path(empty)


def test_a_long_setting_is_a_short_digest_in_the_folder_name(tmp_path):
  # Folder names stay short: a value of more than 24 characters is a digest.
  import hashlib

  from experiments.common import default_output_folder

  parser = argparse.ArgumentParser()
  parser.add_argument("--tag", default=None)
  folder = lambda tag: (
    default_output_folder(
      tmp_path, parser, parser.parse_args(["--tag", tag]), ["XA"], ignore=[]
    ).name
  )
  assert folder("a" * 24) == "XA-tag" + "a" * 24
  assert folder("a" * 25) == "XA-tag" + hashlib.sha256(b"a" * 25).hexdigest()[:8]


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--seed", "-1"], "--seed: must be at least 0, got -1"),
    (["--threads", "0"], "--threads: must be at least 1, got 0"),
  ],
)
def test_torch_reference_counts_are_usage_errors(flags, words, capsys):
  from experiments import torch_reference

  base = ["--repo", "theirs", "--data-root", "data", "--timing-only"]
  with pytest.raises(SystemExit) as stopped:
    torch_reference.parse_args(base + flags)
  assert stopped.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--repeats", "-3"], "--repeats: must be at least 1, got -3"),
    (["--train-epochs", "-1"], "--train-epochs: must be at least 0, got -1"),
    (["--seeds", "0", "-2"], "--seeds: must be at least 0, got -2"),
    (["--snapshot-every", "0"], "--snapshot-every: must be at least 1, got 0"),
  ],
)
def test_srel_torch_harness_counts_are_usage_errors(flags, words):
  # The harness runs as a plain script beside torch; its flags are checked
  # before torch is imported, so this runs without torch too.
  import pathlib
  import subprocess

  script = pathlib.Path(__file__).parents[1] / "experiments" / "srel_torch_harness.py"
  done = subprocess.run(
    [sys.executable, str(script), "--repo", "theirs", *flags],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 2 and words in done.stderr, done.stderr


@pytest.mark.parametrize(
  "module",
  [
    "experiments.bench_core",
    "experiments.bench_scale",
    "experiments.bench_srel",
    "experiments.bench_urbanmmcl",
    "experiments.bench_urbanpg",
    "experiments.core_align",
    "experiments.prompt_extraction.cli",
    "experiments.prompt_extraction.published",
    "experiments.score_srel_snapshots",
    "experiments.srel_parity",
    "experiments.srel_torch_harness",
    "experiments.topt",
    "experiments.torch_parity",
    "experiments.torch_reference",
    "experiments.urbanmmcl",
    "experiments.urbanpg",
    "jaxurban.data.fetch",
    "jaxurban.topt.srel_train",
    "kernels.biased_attention",
    "kernels.row_lse",
  ],
)
def test_every_flag_has_help(module, monkeypatch):
  import importlib

  class Parsed(Exception):
    pass

  parsers = []

  def capture(parser, *args, **kwargs):
    parsers.append(parser)
    raise Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
  main = importlib.import_module(module).main
  with pytest.raises(Parsed):
    main([]) if main.__code__.co_argcount else main()
  missing = []
  for parser in parsers:
    for action in parser._actions:
      if isinstance(action, argparse._SubParsersAction):
        parsers.extend(action.choices.values())
      elif not isinstance(action, argparse._HelpAction) and not action.help:
        missing.append(f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}")
  assert not missing, missing


@pytest.mark.parametrize(
  "module, flags, words",
  [
    (
      "experiments.prompt_extraction.published",
      ["--out", "out"],
      "data root: no data folder given",
    ),
    (
      "experiments.torch_parity",
      ["jax", "--data-root", ".", "--out", "missing.npz"],
      "missing.npz: no such file: run the torch side first",
    ),
    (
      "experiments.srel_parity",
      ["missing.npz"],
      "missing.npz: no such file: run the torch side first",
    ),
  ],
)
def test_tools_say_a_data_problem_in_one_line(module, flags, words, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAXURBAN_DATA"}
  env["PYTHONPATH"] = str(pathlib.Path(__file__).parents[1])
  done = subprocess.run(
    [sys.executable, "-m", module, *flags],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
    env=env,
  )
  assert done.returncode == 2, done.stderr
  assert done.stderr.startswith("error: ") and words in done.stderr, done.stderr
  assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_torch_reference_finds_city_files_in_either_layout(tmp_path, monkeypatch, capsys):
  from experiments import torch_reference

  # Ours: <root>/core/xa/regionmap_xa.geo; the authors' raw_data (and the
  # download cache a user may point at): one level further down.
  flat = tmp_path / "root" / "core" / "xa"
  nested = tmp_path / "cache" / "cd" / "regionmap_cd"
  for folder, code in ((flat, "xa"), (nested, "cd")):
    folder.mkdir(parents=True)
    (folder / f"regionmap_{code}.geo").write_text("geo_id\n")
  assert torch_reference.city_dir(str(tmp_path / "root"), "xa") == str(flat)
  assert torch_reference.city_dir(str(tmp_path / "cache"), "cd") == str(nested)
  # Named folders take the place of the data root, in either layout.
  assert torch_reference.city_dir(None, "cd", str(nested.parent)) == str(nested)
  assert torch_reference.city_dir("/nowhere", "xa", str(flat)) == str(flat)
  with pytest.raises(SystemExit) as stop:
    torch_reference.city_dir(None, "xa", str(nested.parent))
  assert "regionmap_xa.geo not found in --city-dirs folder" in str(stop.value)

  # With the folders named, no data root is needed.
  monkeypatch.delenv("JAXURBAN_DATA", raising=False)
  base = ["--repo", "theirs", "--timing-only"]
  args = torch_reference.parse_args(base + ["--city-dirs", str(flat), str(nested.parent)])
  assert args.city_dirs == [str(flat), str(nested.parent)]
  with pytest.raises(SystemExit):
    torch_reference.parse_args(base)
  assert "--city-dirs" in capsys.readouterr().err


def test_bench_core_hands_the_torch_side_the_folders_it_read(tmp_path, monkeypatch):
  # The cities may come from the download cache, which the torch harness
  # would not look in: it is given the two folders jaxurban read, absolute.
  import json

  seen = {}

  def run(command, check, cwd):
    seen["command"] = command
    out = pathlib.Path(command[command.index("--out") + 1])
    (out / "timing.json").write_text(json.dumps({"median_ms": 470.0}))

  monkeypatch.setattr(subprocess, "run", run)
  monkeypatch.chdir(tmp_path)
  args = argparse.Namespace(
    torch_python="python", torch_repo="CoRE", pair="XA-CD", torch_epochs=30, torch_threads=2
  )
  assert bench_core.time_torch(args, (pathlib.Path("cache/xa"), tmp_path / "root/cd")) == 470.0
  command = seen["command"]
  at = command.index("--city-dirs")
  here = tmp_path.resolve()
  assert command[at + 1 : at + 3] == [str(here / "cache/xa"), str(here / "root/cd")]
  assert "--data-root" not in command
