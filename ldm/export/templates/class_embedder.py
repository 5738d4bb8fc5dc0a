"""PathLDM's class embedder (cin256-style): a label becomes a one-token cross-attention context.

Ships inside an exported class-conditional model folder as a diffusers custom component.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class PathLDMClassEmbedder(ModelMixin, ConfigMixin):
    """``labels (B,) -> (B, 1, embed_dim)``; ``unconditional_class`` drives guidance."""

    @register_to_config
    def __init__(self, num_classes: int = 5, embed_dim: int = 512,
                 unconditional_class: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed integer labels as a one-token context."""
        return self.embedding(labels.long()[:, None])
