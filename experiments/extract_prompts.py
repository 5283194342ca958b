"""Prompt vectors per region from a frozen (multimodal) LLM (PyTorch step).

  python -m experiments.extract_prompts --regions FILE --model PATH --task crime --out DIR

The first of ToPT's two steps: extract the prompt vectors with PyTorch
(``pip install -e '.[extract]'``), then train with JAX, which reads
``DIR/vectors.npy`` through ``jaxurban.prompts.load_prompt_vectors``. See
``experiments/prompt_extraction/`` for the details and ``--help`` for the
options.
"""

from __future__ import annotations

import sys

from experiments.prompt_extraction.cli import main

if __name__ == "__main__":
  sys.exit(main())
