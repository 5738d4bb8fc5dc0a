"""Vector quantizer of the VQ first stages (behaviour of taming's ``VectorQuantizer2``)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class VectorQuantizer2(nn.Module):
    """Nearest-codebook quantization with a straight-through gradient.

    ``legacy=True`` (what VQModel always uses) keeps the original weighting of the commitment
    loss: the value is ``(1 + beta) * mse``, but ``beta`` multiplies the codebook term and the
    encoder term gets weight 1. ``remap`` (a ``.npy`` of used code indices) maps indices to a
    reduced vocabulary; codes outside it become ``unknown_index`` (``"random"``, ``"extra"`` or
    an int). Indices come back flattened ``(B*h*w,)`` (``(B*h*w, 1)`` with ``remap``) unless
    ``sane_index_shape``, which gives ``(B, h, w)``.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: str | None = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False,
                 legacy: bool = True) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            self.register_buffer("used", _load_used_indices(remap))
            self.re_embed = int(self.used.shape[0])
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, "
                                 f"got {unknown_index!r}")
            self.unknown_index = unknown_index
            logger.info("Remapping %d indices to %d indices; unknown codes -> %s",
                        n_e, self.re_embed, unknown_index)
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: Tensor) -> Tensor:
        """Codebook indices ``(B, ...)`` -> positions in ``used`` (unknown codes replaced)."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, :]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape,
                                         device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(shape)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Positions in ``used`` ``(B, ...)`` -> codebook indices; the extra token maps to 0."""
        shape = inds.shape
        inds = inds.reshape(shape[0], -1).clone()  # never modify the caller's tensor
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:
            inds[inds >= used.shape[0]] = 0
        return used[inds].reshape(shape)

    def forward(self, z: Tensor, temp: float | None = None, rescale_logits: bool = False,
                return_logits: bool = False) -> tuple[Tensor, Tensor, tuple]:
        """Quantize ``z`` ``(B, C, H, W)``: ``(z_q, loss, (None, None, indices))``."""
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp/rescale_logits/return_logits exist only for interface "
                             "compatibility with the Gumbel quantizer")
        z = z.permute(0, 2, 3, 1).contiguous()
        z_flat = z.view(-1, self.e_dim)
        weight = self.embedding.weight
        # ||z - e||^2 expanded as z^2 + e^2 - 2 z.e, as in the reference (argmin ties -> first)
        d = (torch.sum(z_flat ** 2, dim=1, keepdim=True) + torch.sum(weight ** 2, dim=1)
             - 2 * torch.matmul(z_flat, weight.t()))
        indices = torch.argmin(d, dim=1)
        z_q = self.embedding(indices).view(z.shape)

        if self.legacy:
            loss = (torch.mean((z_q.detach() - z) ** 2)
                    + self.beta * torch.mean((z_q - z.detach()) ** 2))
        else:
            loss = (self.beta * torch.mean((z_q.detach() - z) ** 2)
                    + torch.mean((z_q - z.detach()) ** 2))

        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: Tensor,
                           shape: tuple[int, int, int, int] | None) -> Tensor:
        """Codebook vectors of ``indices``; ``shape=(B, h, w, C)`` gives ``(B, C, h, w)``."""
        if self.remap is not None:
            if shape is None:
                raise ValueError("get_codebook_entry needs shape=(B, h, w, C) when remap is set")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


VectorQuantizer = VectorQuantizer2


def _load_used_indices(path: str | Path) -> Tensor:
    """The ``remap`` file: a 1-D integer ``.npy`` of used codebook indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"remap file not found: {path} (expected a .npy of used code "
                                "indices)")
    used = np.load(path)
    if used.ndim != 1 or not np.issubdtype(used.dtype, np.integer):
        raise ValueError(f"remap file {path}: expected a 1-D integer array, got "
                         f"shape {used.shape} dtype {used.dtype}")
    return torch.tensor(used)
