"""UrbanMMCL: multi-modal and multi-view graph contrastive pre-training, then fine-tuning.

Modules: `graphs` (view graphs of Sec. 3.4.1, raw features), `walks`
(jitted adaptive random walks, eq. 22), `model` (encoders, VGAE, subgraph
GCN, InfoNCE losses), `train` (config, pre-training, ridge probe,
fine-tuning, `train_and_evaluate`).
"""

from jaxurban.urbanmmcl.model import ModelConfig, UrbanMMCL
from jaxurban.urbanmmcl.train import UrbanMMCLConfig, train_and_evaluate

__all__ = ["ModelConfig", "UrbanMMCL", "UrbanMMCLConfig", "train_and_evaluate"]
