"""The JAX-side loader of prompt vectors (jaxurban/prompts.py), no torch needed.

Synthetic outputs are written with the extraction step's own (torch-free)
writer, then damaged one field at a time; every damage must be refused with
a DataError naming the file and the field. The published Chicago vectors are
checked against their shipped manifests.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from experiments.prompt_extraction import templates
from experiments.prompt_extraction.output import write_output
from jaxurban.data.errors import DataError
from jaxurban.prompts import (
  CHICAGO_REGIONS,
  MANIFEST_NAME,
  chicago_manifest_path,
  load_chicago_prompts,
  load_prompt_vectors,
  read_manifest,
  text_sha256,
)

IDS = ["a", "b", "c", "d"]


@pytest.fixture
def output(tmp_path, rng):
  """A valid output folder: 4 regions x 6, float32, crime template."""
  array = rng.normal(size=(len(IDS), 6)).astype(np.float32)
  write_output(
    tmp_path,
    array,
    region_ids=IDS,
    task="crime",
    template={
      "version": templates.TEMPLATE_VERSION,
      "sha256": templates.template_sha256("crime"),
      "text": templates.TEMPLATES["crime"],
    },
    pooling="mean",
    model={"name": "tiny", "path": "/m", "revision": None},
  )
  return tmp_path, array


def _edit(folder, **changes):
  path = folder / MANIFEST_NAME
  manifest = json.loads(path.read_text())
  manifest.update(changes)
  path.write_text(json.dumps(manifest))


def test_loads_and_reorders(output):
  folder, array = output
  vectors, manifest = load_prompt_vectors(
    folder, IDS, task="crime", template_sha256=templates.template_sha256("crime")
  )
  np.testing.assert_array_equal(vectors, array)
  assert manifest["shape"] == [4, 6] and manifest["created"]
  vectors, _ = load_prompt_vectors(folder, ["c", "a", "d", "b"])
  np.testing.assert_array_equal(vectors, array[[2, 0, 3, 1]])


def test_refuses_region_mismatch(output):
  folder, _ = output
  with pytest.raises(
    DataError, match=r"manifest\.json: column 'region_ids': 1 expected regions absent: 'e'"
  ) as err:
    load_prompt_vectors(folder, ["a", "b", "c", "e"])
  # The whole path: every extraction's files have the same names.
  assert str(folder / "manifest.json") in str(err.value)
  with pytest.raises(DataError, match=r"'region_ids': 1 regions not expected: 'd'"):
    load_prompt_vectors(folder, ["a", "b", "c"])
  with pytest.raises(DataError, match="duplicates"):
    load_prompt_vectors(folder, ["a", "b", "c", "d", "a"])
  # Regions the extraction left out are pointed to.
  _edit(folder, skipped=[{"id": "e", "problems": ["e.png: missing"]}])
  with pytest.raises(
    DataError, match=r"absent: 'e' \(left out at extraction: see the manifest's 'skipped'\)"
  ):
    load_prompt_vectors(folder, ["a", "b", "c", "d", "e"])
  # ...and only those: a region absent for another reason is not blamed on them.
  with pytest.raises(
    DataError, match=r"2 expected regions absent: 'e', 'f' \(1 of them \('e'\) left"
  ):
    load_prompt_vectors(folder, ["a", "b", "c", "d", "e", "f"])
  with pytest.raises(DataError, match=r"absent: 'f'$"):
    load_prompt_vectors(folder, ["a", "b", "c", "d", "f"])


@pytest.mark.parametrize(
  "changes, field, problem",
  [
    ({"shape": [4, 7]}, "shape", r"array shape \[4, 6\] differs from the manifest's \[4, 7\]"),
    ({"shape": [5, 6]}, "region_ids", "4 region ids for an array of 5 rows"),
    ({"region_ids": ["a", "b", "c"]}, "region_ids", "3 region ids for an array of 4 rows"),
    ({"region_ids": ["a", "a", "c", "d"]}, "region_ids", "duplicate region ids: 'a'"),
    ({"dtype": "float16"}, "dtype", "array dtype float32 differs"),
    ({"dtype": "int8"}, "dtype", "not one of"),
    ({"pooling": "max"}, "pooling", "not one of"),
    ({"format_version": 2}, "format_version", "not supported"),
    ({"sha256": "0" * 64}, "sha256", "the file was changed"),
  ],
)
def test_refuses_manifest_array_mismatch(output, changes, field, problem):
  folder, _ = output
  _edit(folder, **changes)
  with pytest.raises(DataError, match=rf"column '{field}': .*{problem}") as err:
    load_prompt_vectors(folder)
  assert err.value.column == field


@pytest.mark.parametrize(
  "changes, field, problem",
  [
    ({"format": "npy"}, "format", "format is 'npy', expected 'jaxurban.prompt_vectors'"),
    ({"array": "../vectors.npy"}, "array", "must be a bare file name beside the manifest"),
    ({"array": None}, "array", "must be a file name, found None"),
    ({"sha256": "A" * 64}, "sha256", "'A{64}' is not a lower-case hex sha256"),
    ({"sha256": "g" * 64}, "sha256", "'g{64}' is not a lower-case hex sha256"),
    ({"shape": [0, 6]}, "shape", r"must be positive, found \[0, 6\]"),
    ({"shape": [4, True]}, "shape", "must be two integers"),
    ({"shape": True}, "shape", "must be a list"),
    ({"region_ids": ["a", "b", 3, "d"]}, "region_ids", "every region id must be a string"),
    ({"template": {"sha256": "0" * 64}}, "template", "template has no 'version'"),
    ({"model": {"path": "/m"}}, "model", "model has no 'name'"),
    ({"task": 7}, "task", "must be a task name, found 7"),
    # JSON true equals 1 in Python; it is still not a version number.
    ({"format_version": True}, "format_version", "format_version True is not supported"),
  ],
)
def test_refuses_malformed_manifest_fields(output, changes, field, problem):
  folder, _ = output
  _edit(folder, **changes)
  with pytest.raises(DataError, match=rf"manifest\.json: column '{field}': {problem}") as err:
    load_prompt_vectors(folder)
  assert err.value.column == field


@pytest.mark.parametrize("field", ["array", "sha256", "shape", "dtype", "region_ids", "model"])
def test_refuses_a_missing_manifest_field(output, field):
  folder, _ = output
  path = folder / MANIFEST_NAME
  manifest = json.loads(path.read_text())
  del manifest[field]
  path.write_text(json.dumps(manifest))
  with pytest.raises(DataError, match=rf"column '{field}': field missing"):
    load_prompt_vectors(folder)


def test_manifest_file_forms(output):
  folder, array = output
  path = folder / MANIFEST_NAME
  text = path.read_text()
  # A byte-order mark, as some editors save JSON, is not part of the JSON.
  path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
  np.testing.assert_array_equal(load_prompt_vectors(folder)[0], array)
  path.write_text(json.dumps([json.loads(text)]))
  with pytest.raises(DataError, match="manifest must be a JSON object, found list"):
    load_prompt_vectors(folder)
  path.write_text(text[:-5])
  with pytest.raises(DataError, match="manifest is not readable JSON"):
    load_prompt_vectors(folder)


def test_long_id_lists_are_abbreviated_in_messages(output):
  folder, _ = output
  wanted = list("abcd") + [f"r{i}" for i in range(8)]
  with pytest.raises(DataError) as err:
    load_prompt_vectors(folder, wanted)
  assert "8 expected regions absent: 'r0', 'r1', 'r2', 'r3', 'r4' and 3 more" in str(err.value)
  assert "'r5'" not in str(err.value)


def test_refuses_template_and_task_mismatch(output):
  folder, _ = output
  with pytest.raises(DataError, match=r"'template'.*made with another template text"):
    load_prompt_vectors(folder, template_sha256=templates.template_sha256("checkIn"))
  with pytest.raises(DataError, match=r"'task': task is 'crime', expected 'checkIn'"):
    load_prompt_vectors(folder, task="checkIn")
  # A template record whose text was edited no longer matches its hash.
  manifest = json.loads((folder / MANIFEST_NAME).read_text())
  template = dict(manifest["template"], text=manifest["template"]["text"] + " ")
  _edit(folder, template=template)
  with pytest.raises(DataError, match="template sha256 does not match"):
    load_prompt_vectors(folder)


def test_refuses_changed_array_and_nan(output):
  folder, array = output
  changed = array.copy()
  changed[1, 2] = np.nan
  np.save(folder / "vectors.npy", changed)
  with pytest.raises(DataError, match=r"vectors\.npy: column 'sha256'") as err:
    load_prompt_vectors(folder)
  assert str(folder / "vectors.npy") in str(err.value)
  from jaxurban.prompts import file_sha256

  _edit(folder, sha256=file_sha256(folder / "vectors.npy"))
  with pytest.raises(DataError, match=r"1 rows hold NaN.*'b'"):
    load_prompt_vectors(folder)
  (folder / "vectors.npy").unlink()
  with pytest.raises(DataError, match="array file named by"):
    load_prompt_vectors(folder)
  (folder / MANIFEST_NAME).unlink()
  with pytest.raises(DataError, match="manifest file does not exist"):
    load_prompt_vectors(folder)


def test_refuses_placeholder_rows_and_contradictory_records(output):
  folder, array = output
  from jaxurban.prompts import file_sha256

  # A zero row is what a failed inference leaves when it writes a placeholder.
  zeroed = array.copy()
  zeroed[2] = 0
  np.save(folder / "vectors.npy", zeroed)
  _edit(folder, sha256=file_sha256(folder / "vectors.npy"))
  with pytest.raises(DataError, match=r"vectors\.npy: 1 rows are all zeros \(regions 'c'\)"):
    load_prompt_vectors(folder)
  np.save(folder / "vectors.npy", array)
  _edit(folder, sha256=file_sha256(folder / "vectors.npy"))
  load_prompt_vectors(folder)
  with pytest.raises(TypeError, match="not one string"):
    load_prompt_vectors(folder, "abcd")
  _edit(folder, skipped=[{"id": "b", "problems": ["b.png: missing"]}])
  with pytest.raises(DataError, match=r"'skipped': 1 regions both skipped and given a row: 'b'"):
    load_prompt_vectors(folder)
  _edit(folder, skipped=[{"problems": []}])
  with pytest.raises(DataError, match=r"'skipped': must be a list of \{id, problems\}"):
    load_prompt_vectors(folder)


def test_shipped_manifests_describe_the_published_files():
  for mllm, task, width in [("llama", "none", 4096), ("qwen", "checkIn", 3584)]:
    manifest = read_manifest(chicago_manifest_path(mllm, task))
    assert manifest["shape"] == [CHICAGO_REGIONS, width] and manifest["dtype"] == "float16"
    assert manifest["region_ids"] == [str(i) for i in range(77)]
    assert manifest["source"]["repository"] == "townSeven/Prompt4RE"
    assert manifest["source"]["commit"] == "7d764a6289eae5694713af7515d4d7efeb9a3b97"
    assert manifest["task"] == task and manifest["pooling"] == "mean"
  with pytest.raises(ValueError, match="only for llama"):
    chicago_manifest_path("qwen", "none")
  with pytest.raises(ValueError, match="mllm must be one of"):
    chicago_manifest_path("gpt", "crime")
  assert text_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_shipped_manifests_are_what_the_published_script_writes(data_root, tmp_path, capsys):
  from experiments.prompt_extraction import published

  published.main(["--data-root", str(data_root), "--out", str(tmp_path)])
  assert len(capsys.readouterr().out.splitlines()) == len(published.FILES) == 7
  for mllm, task in published.FILES:
    shipped = chicago_manifest_path(mllm, task)
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


@pytest.mark.parametrize(
  "mllm, task",
  [
    ("llama", "crime"),
    ("llama", "checkIn"),
    ("llama", "serviceCall"),
    ("llama", "none"),
    ("qwen", "crime"),
    ("qwen", "checkIn"),
    ("qwen", "serviceCall"),
  ],
)
def test_published_chicago_vectors(data_root, mllm, task):
  vectors = load_chicago_prompts(data_root, mllm, task)
  raw = np.load(data_root / "prompt4re" / "chicago" / f"prompt_embs_{mllm}_{task}.npy")
  assert vectors.dtype == np.float32 and vectors.shape == (77, {"llama": 4096, "qwen": 3584}[mllm])
  np.testing.assert_array_equal(vectors, raw.astype(np.float64))
  assert np.isfinite(vectors).all()


def test_published_templates_differ_and_hash_is_refused(data_root):
  crime = load_chicago_prompts(data_root, "llama", "crime")
  none = load_chicago_prompts(data_root, "llama", "none")
  assert np.abs(crime - none).max() > 0.1
  folder = data_root / "prompt4re" / "chicago"
  # The authors' template text is not recorded: asking for a specific one fails.
  with pytest.raises(DataError, match="another template text"):
    load_prompt_vectors(
      folder,
      manifest=chicago_manifest_path("llama", "crime"),
      template_sha256=templates.template_sha256("crime"),
    )


def test_published_vectors_tampered_copy(data_root, tmp_path):
  name = "prompt_embs_qwen_crime.npy"
  shutil.copy(data_root / "prompt4re" / "chicago" / name, tmp_path / name)
  data = bytearray((tmp_path / name).read_bytes())
  data[-1] ^= 0x01
  (tmp_path / name).write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf"{name}: column 'sha256'.*prompt_embs_qwen_crime\.json"):
    load_prompt_vectors(tmp_path, manifest=chicago_manifest_path("qwen", "crime"))
