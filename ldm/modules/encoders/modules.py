"""Conditioning encoders (CompVis class paths): class embedder and text encoders."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.encoders.clip_text import FrozenCLIPEmbedder
from ldm.modules.encoders.open_clip_text import FrozenOpenCLIPEmbedder

__all__ = ["ClassEmbedder", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"]


class ClassEmbedder(nn.Module):
    """Embed an integer class label into a one-token context ``(B, 1, embed_dim)``.

    PathLDM's class-conditional baseline uses 5 classes: 0-3 for the tumor/TIL combinations
    and 4 as the unconditional class for classifier-free guidance.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class",
                 unconditional_class: int | None = None) -> None:
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.unconditional_class = (n_classes - 1 if unconditional_class is None
                                    else unconditional_class)
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, torch.Tensor] | torch.Tensor,
                key: str | None = None) -> torch.Tensor:
        """Look up ``batch[key]`` (or a tensor of labels) as a ``(B, 1, D)`` context."""
        labels = batch if torch.is_tensor(batch) else batch[key or self.key]
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        return self.embedding(labels[:, None])

    def unconditional_input(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Raw conditioning input for the unconditional (CFG) branch."""
        labels = torch.full((batch_size,), self.unconditional_class, dtype=torch.long,
                            device=self.embedding.weight.device)
        return {self.key: labels}
