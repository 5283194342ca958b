"""UrbanPG: personalized context prompts and a general linear-attention backbone.

Model in `jaxurban.urbanpg.model`, training and the full / few-shot /
continual paradigms in `jaxurban.urbanpg.train`, baselines in
`jaxurban.urbanpg.baselines`.
"""

from jaxurban.urbanpg.model import UrbanPG, linear_context_attention, softmax_context_attention

__all__ = ["UrbanPG", "linear_context_attention", "softmax_context_attention"]
