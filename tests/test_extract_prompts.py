"""The PyTorch prompt-vector stage, on tiny randomly initialised models.

Nothing is downloaded: a tiny LLaMA text model and a tiny Mllama
(LLaMA-3.2-Vision architecture) vision-language model are built from configs,
with word-level tokenizers trained on a few strings and a PIL image
processor, saved to a temporary folder and loaded back through the same code
path as a real checkpoint. Torch tests skip (with the reason) only when
torch or transformers is not installed; the region-file and template tests
need neither.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from experiments.prompt_extraction import templates
from experiments.prompt_extraction.output import ExtractionError, WorkFolder, build_manifest
from experiments.prompt_extraction.regions import check_images, load_regions
from jaxurban.data.errors import DataError
from jaxurban.prompts import MANIFEST_NAME, load_prompt_vectors

TORCH_REASON = "the extract extra (torch, transformers) is not installed"

WORDS = (
  "region street crime parking food the a of in and with is are its on to how many "
  "Chicago coordinates address POIs shops bars park school transit visits"
)


def _words_tokenizer(specials, bos=None, eos=None, chat_template=None):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  corpus = [WORDS] + list(templates.TEMPLATES.values())
  tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=list(specials)))
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token=bos, eos_token=eos
  )
  if chat_template is not None:
    fast.chat_template = chat_template
  return fast


def _region_text(i: int) -> str:
  # Different lengths, so batches really are padded.
  return f"Centroid Coordinates: (41.{i}, -87.{i})\nIncluded POIs: " + " ".join(
    ["shops", "bars", "park", "school", "transit"][: 1 + i % 5] * (1 + i % 3)
  )


@pytest.fixture(scope="module")
def torch_mods():
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
  torch.set_num_threads(2)
  return torch, transformers


@pytest.fixture(scope="module")
def text_model(torch_mods, tmp_path_factory) -> pathlib.Path:
  """A 2-layer LLaMA with a 32-wide hidden state and a word-level tokenizer."""
  torch, transformers = torch_mods
  path = tmp_path_factory.mktemp("text_model")
  tok = _words_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], bos="<s>", eos="</s>")
  config = transformers.LlamaConfig(
    vocab_size=len(tok),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  tok.save_pretrained(path)
  return path


VLM_CHAT = (
  "{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
  "{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
  "{% endfor %}{% endfor %}{% if add_generation_prompt %} <|eot_id|>{% endif %}"
)


@pytest.fixture(scope="module")
def vlm(torch_mods, tmp_path_factory) -> pathlib.Path:
  """A tiny Mllama (the LLaMA-3.2-Vision architecture) with its processor."""
  torch, transformers = torch_mods
  from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

  path = tmp_path_factory.mktemp("vlm")
  specials = ["<pad>", "<unk>", "<|begin_of_text|>", "<|image|>", "<|python_tag|>", "<|eot_id|>"]
  tok = _words_tokenizer(specials, bos="<|begin_of_text|>", eos="<|eot_id|>")
  ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
  config = transformers.MllamaConfig(
    text_config=dict(
      vocab_size=len(tok),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      cross_attention_layers=[1],
      bos_token_id=ids["<|begin_of_text|>"],
      eos_token_id=ids["<|eot_id|>"],
      pad_token_id=ids["<pad>"],
    ),
    vision_config=dict(
      hidden_size=16,
      num_hidden_layers=2,
      num_global_layers=1,
      attention_heads=2,
      intermediate_size=32,
      vision_output_dim=48,
      image_size=16,
      patch_size=8,
      max_num_tiles=4,
      intermediate_layers_indices=[0, 1],
    ),
    image_token_index=ids["<|image|>"],
  )
  torch.manual_seed(0)
  model = transformers.MllamaForConditionalGeneration(config)
  # A new Mllama starts with its gates at 0: the cross-attention and the
  # vision encoder's gated layers then pass nothing of the pixels on, and an
  # extraction that dropped the images would pass every test. Opened gates
  # make the vectors depend on the pixels, as in the trained model.
  gates = ("attn_gate", "mlp_gate", "gate_attn", "gate_ffn", ".gate")
  with torch.no_grad():
    opened = [p.fill_(1.0) for name, p in model.named_parameters() if name.endswith(gates)]
  assert opened
  model.save_pretrained(path)
  processor = transformers.MllamaProcessor(
    image_processor=MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4),
    tokenizer=tok,
    chat_template=VLM_CHAT,
  )
  processor.save_pretrained(path)
  return path


def _write_images(folder: pathlib.Path, n: int, seed: int = 0) -> list[str]:
  from PIL import Image

  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for k in range(n):
    size = (20 + 4 * (k % 3), 24 + 4 * (k % 2))
    pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    p = folder / f"img_{k}.png"
    Image.fromarray(pixels).save(p)
    paths.append(p.name)
  return paths


@pytest.fixture
def text_regions(tmp_path) -> pathlib.Path:
  records = [{"id": f"r{i}", "text": _region_text(i)} for i in range(7)]
  path = tmp_path / "regions.json"
  path.write_text(json.dumps(records))
  return path


@pytest.fixture
def image_regions(tmp_path) -> pathlib.Path:
  """Five regions with 1-2 images each, in the chat-message layout."""
  names = _write_images(tmp_path / "images", 8)
  entries = []
  for i in range(5):
    content = [{"type": "image", "image": f"images/{n}"} for n in names[i : i + 1 + i % 2]]
    content.append({"type": "text", "text": _region_text(i)})
    entries.append({"role": "user", "content": content})
  path = tmp_path / "prompt_data.json"
  path.write_text(json.dumps(entries))
  return path


def _config(model, **kw):
  from experiments.prompt_extraction.extract import ExtractConfig

  kw.setdefault("task", "crime")
  return ExtractConfig(model=str(model), **kw)


def _run(config, regions, out, **kw):
  from experiments.prompt_extraction.extract import extract_prompts

  return extract_prompts(config, regions, out, progress=False, **kw)


# --- region files and templates (no torch) ---------------------------------


def test_region_file_layouts(tmp_path):
  plain = tmp_path / "plain.json"
  plain.write_text(
    json.dumps([{"id": "a", "text": "t", "images": ["x.png", "/abs/y.png"], "centroid": [1, 2]}])
  )
  (region,) = load_regions(plain, prefix_map=[("/abs", "/new")])
  assert region.id == "a" and region.centroid == (1.0, 2.0)
  assert region.images == (str(tmp_path / "x.png"), "/new/y.png")

  chat = tmp_path / "chat.json"
  text = "The area.\nCentroid Coordinates: (42.01, -87.67)\nAddress: x"
  chat.write_text(
    json.dumps(
      [
        {
          "role": "user",
          "content": [{"type": "image", "image": "s.png"}, {"type": "text", "text": text}],
        },
        # Several text items are joined, one per line, blank ones left out.
        {
          "role": "user",
          "content": [
            {"type": "text", "text": " no "},
            {"type": "text", "text": "  "},
            {"type": "text", "text": "centroid"},
          ],
        },
      ]
    )
  )
  first, second = load_regions(chat)
  assert first.text == text and second.text == "no\ncentroid"
  assert (first.id, second.id) == ("0", "1")
  assert first.centroid == (42.01, -87.67) and second.centroid is None
  assert first.images == (str(tmp_path / "s.png"),)


def test_region_file_errors(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps([{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]))
  with pytest.raises(DataError, match=r"bad\.json.*'id'.*repeats entry 0"):
    load_regions(path)
  path.write_text(json.dumps([{"id": "a", "text": ""}]))
  with pytest.raises(DataError, match=r"entry 0.*non-empty text"):
    load_regions(path)
  path.write_text(json.dumps([{"role": "user", "content": [{"type": "image", "image": "x"}]}]))
  with pytest.raises(DataError, match="no text item"):
    load_regions(path)


@pytest.mark.parametrize(
  "records, column, problem",
  [
    ({"id": "a", "text": "t"}, None, "region file must be a non-empty JSON list"),
    ([], None, "region file must be a non-empty JSON list"),
    (["a"], None, "entry 0: must be an object, found str"),
    ([{"id": "a", "text": "t", "image": []}], None, r"entry 0: unknown fields \['image'\]"),
    ([{"id": True, "text": "t"}], "id", "entry 0: needs a non-empty string id, found True"),
    ([{"id": "", "text": "t"}], "id", "entry 0: needs a non-empty string id"),
    ([{"id": 1.5, "text": "t"}], "id", "entry 0: needs a non-empty string id, found 1.5"),
    # NumPy string arrays drop a trailing NUL: "a\0" would come back as "a".
    ([{"id": "a\u0000", "text": "t"}], "id", r"entry 0: id 'a\\x00' holds a control character"),
    ([{"id": "a\tb", "text": "t"}], "id", "holds a control character"),
    ([{"id": "a", "text": "  "}], "text", "entry 0: needs a non-empty text"),
    ([{"id": "a", "text": "t", "images": "x.png"}], "images", "images must be a list of paths"),
    ([{"id": "a", "text": "t", "images": [""]}], "images", "images must be a list of paths"),
    ([{"id": "a", "text": "t", "centroid": [1]}], "centroid", r"centroid must be \[lat, lon\]"),
    ([{"id": "a", "text": "t", "centroid": [1, True]}], "centroid", "centroid must be"),
    ([{"id": "a", "text": "t", "centroid": ["1", 2]}], "centroid", "centroid must be"),
    ([{"id": "a", "text": "t", "centroid": [1, float("nan")]}], "centroid", "centroid must be"),
    ([{"role": "user", "content": "text"}], "content", "'content' must be a list of items"),
    (
      [{"role": "user", "content": [{"type": "text", "text": "t"}, {"type": "video"}]}],
      None,
      "entry 0: content item 1 is neither a text nor an image item",
    ),
    (
      [{"role": "user", "content": [{"type": "image", "image": ""}]}],
      None,
      "content item 0 is neither a text nor an image item",
    ),
  ],
)
def test_region_file_refusals(tmp_path, records, column, problem):
  path = tmp_path / "regions.json"
  path.write_text(json.dumps(records))
  with pytest.raises(DataError) as err:
    load_regions(path)
  assert err.value.column == column
  assert re.search(problem, str(err.value)) and str(err.value).startswith("regions.json: ")


def test_region_file_forms(tmp_path):
  path = tmp_path / "regions.json"
  with pytest.raises(DataError, match="region file does not exist"):
    load_regions(path)
  path.write_text('[{"id": "a",')
  with pytest.raises(DataError, match="region file is not readable JSON"):
    load_regions(path)
  # A byte-order mark is not JSON; integer ids are read as strings.
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": 7, "text": "t"}]).encode())
  (region,) = load_regions(path)
  assert region.id == "7" and region.images == () and region.centroid is None
  # The first matching prefix is rewritten, and only once.
  path.write_text(json.dumps([{"id": "a", "text": "t", "images": ["/a/b/x.png"]}]))
  (region,) = load_regions(path, prefix_map=[("/a/b", "/c"), ("/a", "/d"), ("/c", "/e")])
  assert region.images == ("/c/x.png",)


def test_published_prompt_data_reads(data_root):
  regions = load_regions(data_root / "prompt4re" / "chicago" / "prompt_data.json")
  assert [r.id for r in regions] == [str(i) for i in range(77)]
  assert all(r.centroid is not None and 41 < r.centroid[0] < 43 for r in regions)
  # The images are not published: every region is reported, none is dropped.
  problems = check_images(regions[:3], max_images=2)
  assert [p.id for p in problems] == ["0", "1", "2"]
  assert all(line.endswith(": missing") for p in problems for line in p.problems)


def test_templates_are_hashed_and_task_free_for_none():
  assert set(templates.TASKS) == {"crime", "checkIn", "serviceCall", "none"}
  hashes = {templates.template_sha256(t) for t in templates.TASKS}
  assert len(hashes) == 4
  rendered = templates.render("crime", " {braces} kept \n")
  # The geo-text sits on a line of its own, its outer white space trimmed.
  assert "\n{braces} kept\n" in rendered and "{region_text}" not in rendered
  assert "Task:" not in templates.render("none", "x")
  with pytest.raises(ValueError, match="unknown task"):
    templates.render("traffic", "x")


def test_work_folder_never_overwrites_a_batch_and_names_unreadable_ones(tmp_path):
  work = WorkFolder(tmp_path, {"model": "m"})
  for k in range(3):
    work.save_batch([f"r{k}"], np.full((1, 2), k, np.float32))
  # A batch file gone from the middle (removed by hand, say): the next batch
  # takes a free name rather than the count's, which is taken.
  (work.path / "batch-00000.npz").unlink()
  work.save_batch(["r3"], np.full((1, 2), 3, np.float32))
  done = work.done()
  assert sorted(done) == ["r1", "r2", "r3"]
  np.testing.assert_array_equal(done["r2"], [2, 2])
  # A batch file without its vectors is named, with what to do.
  np.savez(work.path / "batch-00009.npz", ids=np.array(["r9"]))
  with pytest.raises(ExtractionError, match=r"batch-00009\.npz: unreadable batch file.*--restart"):
    work.done()


def test_other_settings_are_named_briefly(tmp_path):
  long_text = "x" * 400
  work = WorkFolder(tmp_path, {"template": {"text": long_text}, "pooling": "mean"})
  work.save_batch(["r0"], np.zeros((1, 2), np.float32))
  with pytest.raises(ExtractionError) as refused:
    WorkFolder(tmp_path, {"template": {"text": long_text + "y"}, "pooling": "mean"})
  message = str(refused.value)
  # The key path from its root without a leading dot, the long values cut.
  assert "(template.text: saved 'xxx" in message and "..." in message
  assert len(message) < 400
  assert WorkFolder(tmp_path, {"template": {"text": long_text}, "pooling": "mean"}).done()


def test_manifest_keeps_the_optional_records_given():
  array = np.zeros((2, 3), np.float16)
  common = dict(
    array=array,
    sha256="0" * 64,
    region_ids=[1, 2],
    task="crime",
    template={"version": "v"},
    pooling="mean",
    model={"name": "m"},
    created="2026-01-01T00:00:00+00:00",
  )
  bare = build_manifest(**common)
  assert not {"inputs", "software", "source"} & set(bare)
  assert bare["region_ids"] == ["1", "2"] and bare["dtype"] == "float16"
  full = build_manifest(
    **common, inputs={"regions": "a"}, software={"torch": "2"}, source={"repository": "r"}
  )
  assert full["inputs"] == {"regions": "a"}
  assert full["software"] == {"torch": "2"}
  assert full["source"] == {"repository": "r"}


# --- extraction -------------------------------------------------------------


def test_text_model_output_loads_and_is_deterministic(text_model, text_regions, tmp_path):
  first = _run(_config(text_model, batch_size=3), text_regions, tmp_path / "a")
  assert first["shape"] == [7, 32] and first["dtype"] == "float32"
  assert first["region_ids"] == [f"r{i}" for i in range(7)]
  assert first["template"]["sha256"] == templates.template_sha256("crime")
  assert first["model"]["model_type"] == "llama" and first["pooling"] == "mean"
  assert not (tmp_path / "a" / ".work").exists()
  ids = [f"r{i}" for i in reversed(range(7))]
  a, manifest = load_prompt_vectors(
    tmp_path / "a", ids, task="crime", template_sha256=templates.template_sha256("crime")
  )
  assert manifest == first
  # Same settings: bit-identical. Another batch size: same up to rounding,
  # since right padding leaves the real tokens' states unchanged.
  _run(_config(text_model, batch_size=3), text_regions, tmp_path / "b")
  _run(_config(text_model, batch_size=1), text_regions, tmp_path / "c")
  b, _ = load_prompt_vectors(tmp_path / "b", ids)
  c, _ = load_prompt_vectors(tmp_path / "c", ids)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
  assert np.abs(a[0] - a[1]).max() > 1e-3  # regions differ
  # Output is refused rather than overwritten by accident.
  with pytest.raises(ExtractionError, match="--overwrite"):
    _run(_config(text_model), text_regions, tmp_path / "a")


def test_pooling_matches_manual_float64(vlm, image_regions, torch_mods):
  torch, transformers = torch_mods
  from experiments.prompt_extraction.extract import embed_batch, load_model

  regions = load_regions(image_regions)
  processor = transformers.AutoProcessor.from_pretrained(vlm)
  model = transformers.AutoModel.from_pretrained(vlm, dtype=torch.float32).eval()
  texts, images = [], []
  from PIL import Image

  for r in regions:
    content = [{"type": "image"} for _ in r.images]
    content.append({"type": "text", "text": templates.render("checkIn", r.text)})
    messages = [{"role": "user", "content": content}]
    texts.append(
      processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    images.append([Image.open(p).convert("RGB") for p in r.images])
  processor.tokenizer.padding_side = "right"
  inputs = processor(
    text=texts, images=images, padding=True, return_tensors="pt", add_special_tokens=False
  )
  with torch.inference_mode():
    hidden = model(**inputs).last_hidden_state.double().numpy()
  mask = inputs["attention_mask"].numpy().astype(np.float64)
  assert mask.min() == 0  # the batch is padded
  expected_mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  lengths = mask.sum(1).astype(int)
  expected_last = hidden[np.arange(len(regions)), lengths - 1]

  for pooling, expected in (("mean", expected_mean), ("last", expected_last)):
    config = _config(vlm, task="checkIn", pooling=pooling, batch_size=len(regions))
    loaded = load_model(config, need_images=True)
    got = embed_batch(loaded, config, regions)
    assert got.dtype == np.float32 and got.shape == (len(regions), 32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert np.abs(expected_mean - expected_last).max() > 1e-3


def test_pool_left_padding(torch_mods):
  torch, _ = torch_mods
  from experiments.prompt_extraction.extract import pool

  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 5, 3))
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
  h, m = torch.tensor(hidden), torch.tensor(mask)
  np.testing.assert_allclose(pool(h, m, "last").numpy(), hidden[[0, 1], [4, 3]], rtol=1e-6)
  expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(pool(h, m, "mean").numpy(), expected, rtol=1e-6)


def test_images_change_the_vectors(vlm, image_regions, tmp_path):
  with_images = _run(_config(vlm, batch_size=5), image_regions, tmp_path / "img")
  # Regions of one and two images in one file: the vectors do not depend on
  # the batch size (a batch mixing the counts moved them by up to 1e-3).
  _run(_config(vlm, batch_size=1), image_regions, tmp_path / "one")
  np.testing.assert_allclose(
    load_prompt_vectors(tmp_path / "img")[0],
    load_prompt_vectors(tmp_path / "one")[0],
    rtol=1e-5,
    atol=1e-5,
  )
  assert with_images["inputs"]["images_used"] is True
  text = _run(_config(vlm, batch_size=5, text_only=True), image_regions, tmp_path / "txt")
  assert text["inputs"]["images_used"] is False
  a, _ = load_prompt_vectors(tmp_path / "img")
  b, _ = load_prompt_vectors(tmp_path / "txt")
  assert a.shape == b.shape == (5, 32)
  assert np.abs(a - b).max() > 1e-3
  # The pixels themselves count, not only the image tokens in the prompt:
  # the same files with other pixels give other vectors, and another record.
  _write_images(image_regions.parent / "images", 8, seed=1)
  other = _run(_config(vlm, batch_size=5), image_regions, tmp_path / "other")
  c, _ = load_prompt_vectors(tmp_path / "other")
  assert (np.abs(a - c).max(axis=1) > 1e-4).all()  # every region's vector moved
  assert other["inputs"]["images_sha256"] != with_images["inputs"]["images_sha256"]
  assert other["inputs"]["regions_sha256"] == with_images["inputs"]["regions_sha256"]


def test_resume_after_interruption(text_model, text_regions, tmp_path):
  class Stop(Exception):
    pass

  def stop_after(k):
    def hook(done):
      if done == k:
        raise Stop

    return hook

  config = _config(text_model, batch_size=2, task="serviceCall")
  with pytest.raises(Stop):
    _run(config, text_regions, tmp_path / "run", after_batch=stop_after(2))
  work = tmp_path / "run" / ".work"
  assert len(list(work.glob("batch-*.npz"))) == 2
  assert not (tmp_path / "run" / MANIFEST_NAME).exists()
  assert not list(work.glob("*.tmp"))

  # Other settings are refused, not mixed in.
  with pytest.raises(ExtractionError, match="pooling.*--restart"):
    _run(
      _config(text_model, batch_size=2, task="serviceCall", pooling="last"),
      text_regions,
      tmp_path / "run",
    )

  batches = []
  _run(config, text_regions, tmp_path / "run", after_batch=batches.append)
  assert batches == [1, 2]  # 7 regions, 4 done: two batches of 2 and 1 left
  resumed, manifest = load_prompt_vectors(tmp_path / "run")
  _run(config, text_regions, tmp_path / "whole")
  whole, _ = load_prompt_vectors(tmp_path / "whole")
  assert manifest["region_ids"] == [f"r{i}" for i in range(7)]
  np.testing.assert_allclose(resumed, whole, rtol=1e-6, atol=1e-6)
  assert not work.exists()


def test_missing_images_fail_or_skip(vlm, image_regions, tmp_path):
  entries = json.loads(image_regions.read_text())
  entries[3]["content"][0]["image"] = "images/absent.png"
  (image_regions.parent / "images" / "broken.png").write_bytes(b"not a png")
  entries[1]["content"][0]["image"] = "images/broken.png"
  image_regions.write_text(json.dumps(entries))

  with pytest.raises(ExtractionError) as err:
    _run(_config(vlm), image_regions, tmp_path / "fail")
  message = str(err.value)
  assert (
    "2 of 5 regions" in message and "region '3'" in message and "absent.png: missing" in message
  )
  assert "broken.png: unreadable" in message and "--missing-images skip" in message
  assert not (tmp_path / "fail").exists()  # refused before --out is made

  manifest = _run(_config(vlm, missing_images="skip"), image_regions, tmp_path / "skip")
  assert manifest["region_ids"] == ["0", "2", "4"]
  assert [s["id"] for s in manifest["skipped"]] == ["1", "3"]
  vectors, _ = load_prompt_vectors(tmp_path / "skip", ["0", "2", "4"])
  assert vectors.shape == (3, 32) and np.isfinite(vectors).all()
  with pytest.raises(DataError, match=r"region_ids.*'1', '3'.*skipped"):
    load_prompt_vectors(tmp_path / "skip", [str(i) for i in range(5)])


def test_text_model_needs_text_only_for_images(text_model, image_regions, tmp_path):
  with pytest.raises(ExtractionError, match="no image processor.*--text-only"):
    _run(_config(text_model), image_regions, tmp_path / "x")
  # The refused run left no work folder, so the retry the message asks for
  # is not refused as "an unfinished run with other settings".
  assert not (tmp_path / "x" / ".work").exists()
  manifest = _run(
    _config(text_model, text_only=True, pooling="last"), image_regions, tmp_path / "x"
  )
  assert manifest["shape"] == [5, 32] and manifest["pooling"] == "last"


def test_float16_overflow_names_regions_and_keeps_the_batches(
  text_model, text_regions, tmp_path, torch_mods
):
  torch, transformers = torch_mods
  import shutil

  # Final-norm weights scaled up: hidden states beyond float16's 65504.
  large = tmp_path / "large"
  shutil.copytree(text_model, large)
  model = transformers.AutoModelForCausalLM.from_pretrained(large)
  with torch.no_grad():
    model.model.norm.weight.mul_(1e5)
  model.save_pretrained(large)
  with pytest.raises(ExtractionError) as err:
    _run(_config(large, out_dtype="float16", batch_size=4), text_regions, tmp_path / "out")
  message = str(err.value)
  assert "beyond float16's range" in message and "--out-dtype float32" in message
  assert "--dtype" not in message
  # The finished batches (float32) are reused: no model call on the rerun.
  batches = []
  manifest = _run(
    _config(large, out_dtype="float32", batch_size=4),
    text_regions,
    tmp_path / "out",
    after_batch=batches.append,
  )
  assert batches == [] and manifest["dtype"] == "float32"
  vectors, _ = load_prompt_vectors(tmp_path / "out")
  # The message named exactly the regions that do not fit.
  over = [f"r{i}" for i in np.flatnonzero(np.abs(vectors).max(axis=1) > np.finfo(np.float16).max)]
  assert 0 < len(over) < 7 and f"{len(over)} regions ({', '.join(map(repr, over))})" in message


def test_non_finite_states_are_refused_per_batch(text_model, text_regions, tmp_path, torch_mods):
  torch, transformers = torch_mods
  import shutil

  broken = tmp_path / "broken"
  shutil.copytree(text_model, broken)
  model = transformers.AutoModelForCausalLM.from_pretrained(broken)
  with torch.no_grad():
    model.model.norm.weight.fill_(float("nan"))
  model.save_pretrained(broken)
  with pytest.raises(ExtractionError, match=r"NaN or infinite hidden states for 3 regions "):
    _run(_config(broken, batch_size=3), text_regions, tmp_path / "out")
  # Nothing was saved for them, and float32 gets no advice to use float32.
  assert not list((tmp_path / "out").glob(".work/batch-*.npz"))
  with pytest.raises(ExtractionError, match=r"\('r0', 'r1', 'r2'\)$"):
    _run(_config(broken, batch_size=3, dtype="float32"), text_regions, tmp_path / "out")


def test_command_line(text_model, text_regions, tmp_path, capsys, torch_mods):
  from experiments.prompt_extraction.cli import main

  out = tmp_path / "cli"
  args = ["--regions", str(text_regions), "--model", str(text_model), "--task", "none"]
  assert main(args + ["--out", str(out), "--out-dtype", "float16", "--no-progress"]) == 0
  assert "7x32 float16" in capsys.readouterr().out
  vectors, manifest = load_prompt_vectors(out, task="none")
  assert manifest["dtype"] == "float16" and vectors.dtype == np.float32
  assert main(args + ["--out", str(tmp_path / "bad"), "--model", str(tmp_path)]) == 2
  assert "no config.json" in capsys.readouterr().err
  # An --out that cannot be a folder, or a device torch cannot use, is one
  # line before any model time, and leaves nothing behind.
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for where in (a_file, a_file / "below"):
    assert main(args + ["--out", str(where), "--no-progress"]) == 2
    assert f"--out {where}" in capsys.readouterr().err
  for device, problem in [
    ("gpu0", "is not a torch device"),
    ("cuda:64", "CUDA device"),
  ]:
    out_here = tmp_path / f"device-{device}"
    assert main(args + ["--out", str(out_here), "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err.replace("'", "") and problem in err, err
    assert not out_here.exists()


def test_truncated_jpeg_is_found_before_any_model_time(tmp_path):
  # PIL's verify() passes a JPEG cut short; decoding it fails. The check must
  # decode, so such a file is reported up front (and skippable), not in a batch.
  from PIL import Image

  rng = np.random.default_rng(0)
  whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, quality=90)
  data = whole.read_bytes()
  cut.write_bytes(data[: len(data) // 2])
  path = tmp_path / "regions.json"
  path.write_text(
    json.dumps(
      [
        {"id": "ok", "text": "t", "images": ["whole.jpg"]},
        {"id": "bad", "text": "t", "images": ["cut.jpg"]},
      ]
    )
  )
  problems = check_images(load_regions(path))
  assert [p.id for p in problems] == ["bad"] and "unreadable" in problems[0].problems[0]


def test_batches_never_mix_image_counts(tmp_path):
  from experiments.prompt_extraction.regions import batches_by_image_count

  path = tmp_path / "regions.json"
  # The first region has one image, the second two: groups come in order of
  # image count, not in the order their first region appears.
  records = [{"id": f"r{i}", "text": "t", "images": ["x.png"] * ((i + 1) % 3)} for i in range(11)]
  path.write_text(json.dumps(records))
  regions = load_regions(path)
  count = lambda r: len(r.images)  # noqa: E731
  batches = batches_by_image_count(regions, 3, count)
  assert all(len(b) <= 3 and len({count(r) for r in b}) == 1 for b in batches)
  assert sorted(r.id for b in batches for r in b) == sorted(r.id for r in regions)
  assert [r.id for r in batches[0]] == ["r2", "r5", "r8"]  # image-free first, in order
  assert [count(b[0]) for b in batches] == [0, 1, 1, 2, 2]
  assert len(batches_by_image_count(regions, 3, lambda r: 0)) == 4  # text only: one group


def test_mixed_image_and_image_free_regions_extract(vlm, image_regions, tmp_path):
  # Processors differ in whether they take a batch where some prompts have
  # images and some none (transformers' Mllama processor has refused one);
  # such regions are batched apart, and a mixed file extracts whole.
  entries = json.loads(image_regions.read_text())
  for i in (1, 3):
    entries[i]["content"] = [c for c in entries[i]["content"] if c["type"] == "text"]
  image_regions.write_text(json.dumps(entries))
  manifest = _run(_config(vlm, batch_size=3), image_regions, tmp_path / "mixed")
  assert manifest["shape"] == [5, 32]


def test_failed_overwrite_keeps_the_previous_output(text_model, text_regions, tmp_path):
  out = tmp_path / "run"
  _run(_config(text_model), text_regions, out)
  before, manifest = load_prompt_vectors(out)
  # Before any model time (a missing regions file) ...
  with pytest.raises(DataError, match="absent.json"):
    _run(_config(text_model), tmp_path / "absent.json", out, overwrite=True)
  np.testing.assert_array_equal(load_prompt_vectors(out)[0], before)

  # ... and part-way through the new extraction, after its first batch.
  class Stopped(Exception):
    pass

  def stop(batches_done):
    raise Stopped(batches_done)

  with pytest.raises(Stopped):
    _run(_config(text_model, batch_size=1), text_regions, out, overwrite=True, after_batch=stop)
  after, manifest_after = load_prompt_vectors(out)
  np.testing.assert_array_equal(after, before)
  assert manifest_after == manifest


def test_weights_missing_from_the_checkpoint_are_refused(text_model, text_regions, tmp_path):
  # A checkpoint whose tensors do not cover the model class would leave those
  # weights random (the loading warning is silenced for the backbone).
  import shutil

  from safetensors.numpy import load_file, save_file

  broken = tmp_path / "broken"
  shutil.copytree(text_model, broken)
  weights = load_file(broken / "model.safetensors")
  dropped = sorted(k for k in weights if "layers.1.mlp" in k)
  save_file({k: v for k, v in weights.items() if k not in dropped}, broken / "model.safetensors")
  with pytest.raises(ExtractionError, match="not in the checkpoint.*would stay random"):
    _run(_config(broken, model_class="base"), text_regions, tmp_path / "out")


def test_batches_are_right_padded_whatever_the_processor_default(vlm, image_regions):
  from experiments.prompt_extraction.extract import embed_batch, load_model

  regions = load_regions(image_regions)[::2]  # one image each, two sizes
  config = _config(vlm, batch_size=5)
  loaded = load_model(config, need_images=True)
  alone = np.concatenate([embed_batch(loaded, config, [r]) for r in regions])
  # A processor or tokenizer whose own default is left padding (several
  # transformers processors carry one) is overruled by the call.
  loaded.processor.tokenizer.padding_side = "left"
  np.testing.assert_allclose(embed_batch(loaded, config, regions), alone, rtol=1e-5, atol=1e-5)

  class PadsLeft:  # a processor that ignores what it is asked for
    def __init__(self, processor):
      self._processor = processor

    def __getattr__(self, name):
      return getattr(self._processor, name)

    def __call__(self, **kwargs):
      return self._processor(**{**kwargs, "padding_side": "left"})

  loaded.processor = PadsLeft(loaded.processor)
  with pytest.raises(ExtractionError, match="padded the batch on the left.*--batch-size 1"):
    embed_batch(loaded, config, regions)


def test_image_checks_and_record_cover_only_the_images_used(tmp_path):
  pytest.importorskip("PIL", reason=TORCH_REASON)
  from experiments.prompt_extraction.regions import Region, images_sha256

  good, other = (str(tmp_path / name) for name in _write_images(tmp_path, 2))
  missing = str(tmp_path / "missing.png")
  regions = [Region("a", "t", (good, missing), None)]
  # With one image per region the missing second file is never opened.
  assert check_images(regions, max_images=1) == []
  (problem,) = check_images(regions)
  assert problem.id == "a" and problem.problems == (f"{missing}: missing",)
  # The record covers the images used: a second image counts only when used.
  one = [Region("a", "t", (good,), None)]
  two = [Region("a", "t", (good, other), None)]
  assert images_sha256(two, max_images=1) == images_sha256(one)
  assert images_sha256(two) != images_sha256(one)
  # An image moved to another region changes the record.
  first = [Region("a", "t", (good,), None), Region("b", "t", (), None)]
  second = [Region("a", "t", (), None), Region("b", "t", (good,), None)]
  assert images_sha256(first) != images_sha256(second)
  # So does the same picture under another region's id.
  assert images_sha256(one) != images_sha256([Region("b", "t", (good,), None)])


def test_resume_on_other_weights_or_processor_is_refused(text_model, vlm, image_regions, tmp_path):
  # config.json does not tell two fine-tunes of one architecture apart, nor a
  # changed image processor: a resume on them would mix two models' vectors.
  import shutil

  from safetensors.numpy import load_file, save_file

  class Stop(Exception):
    pass

  def stop(done):
    raise Stop

  model = tmp_path / "model"
  shutil.copytree(text_model, model)
  regions = tmp_path / "regions.json"
  regions.write_text(json.dumps([{"id": f"r{i}", "text": _region_text(i)} for i in range(3)]))
  config = _config(model, batch_size=1)
  with pytest.raises(Stop):
    _run(config, regions, tmp_path / "run", after_batch=stop)
  weights = load_file(model / "model.safetensors")
  weights = {k: v + np.float32(0.01) if "layers.0" in k else v for k, v in weights.items()}
  save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ExtractionError, match=r"other settings \(model\.files_sha256.*--restart"):
    _run(config, regions, tmp_path / "run")

  processor_model = tmp_path / "vlm"
  shutil.copytree(vlm, processor_model)
  with pytest.raises(Stop):
    _run(
      _config(processor_model, batch_size=1), image_regions, tmp_path / "vlm_run", after_batch=stop
    )
  settings = processor_model / "processor_config.json"
  processing = json.loads(settings.read_text())
  processing["image_processor"]["image_mean"] = [0.2, 0.3, 0.4]
  settings.write_text(json.dumps(processing))
  with pytest.raises(ExtractionError, match=r"other settings \(model\.files_sha256.*--restart"):
    _run(_config(processor_model, batch_size=1), image_regions, tmp_path / "vlm_run")


def test_model_files_digest_reads_cache_blobs_by_name(tmp_path):
  from experiments.prompt_extraction.extract import model_files_sha256

  def snapshot(name, blob_bytes):
    folder = tmp_path / name
    (folder / "blobs").mkdir(parents=True)
    (folder / "snap").mkdir()
    blob = folder / "blobs" / ("ab" * 32)
    blob.write_bytes(blob_bytes)
    (folder / "snap" / "model.safetensors").symlink_to(blob)
    (folder / "snap" / "config.json").write_text("{}")
    return folder / "snap"

  # A cache blob is named by its SHA-256, so its name stands for its bytes.
  assert model_files_sha256(snapshot("a", b"x" * 10)) == model_files_sha256(snapshot("b", b"y"))
  # Any other file is read.
  other = snapshot("c", b"x")
  (other / "config.json").write_text('{"a": 1}')
  assert model_files_sha256(other) != model_files_sha256(tmp_path / "a" / "snap")


def test_text_only_class_of_a_vision_model_is_refused_for_images(vlm, image_regions, tmp_path):
  # Mllama's language model loads under causal-lm and takes the pixels in
  # **kwargs without using them.
  with pytest.raises(ExtractionError, match="takes no pixel_values.*images would be dropped"):
    _run(_config(vlm, model_class="causal-lm"), image_regions, tmp_path / "out")
  manifest = _run(
    _config(vlm, model_class="causal-lm", text_only=True), image_regions, tmp_path / "t"
  )
  assert manifest["inputs"]["images_used"] is False
