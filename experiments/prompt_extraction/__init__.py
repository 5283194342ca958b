"""The MLLM prompt-vector stage of ToPT (section 2.2.3 of the ToPT paper).

A separate PyTorch + transformers step, run once per task before training:
for each region it feeds a frozen (multimodal) LLM the region's images, its
geo-text and a task template, pools the last-layer hidden states over the
tokens and writes one ``.npy`` array plus a JSON manifest that
``jaxurban.prompts.load_prompt_vectors`` reads on the JAX side.

Modules:
  templates  the task templates and their version (no torch)
  regions    region files and image checks (no torch)
  output     manifests, atomic writes, the resumable work folder (no torch)
  published  manifests for the published Prompt4RE Chicago vectors (no torch)
  extract    model loading, batching and pooling (torch, transformers)
  cli        ``python -m experiments.extract_prompts``

Importing this package does not import torch; only ``extract`` and ``cli``
need the ``extract`` extra (``pip install -e '.[extract]'``).
"""
