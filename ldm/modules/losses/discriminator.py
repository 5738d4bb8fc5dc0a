"""PatchGAN discriminator of the autoencoder losses (key layout ``main.{i}`` as in taming)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch."""

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True,
                 allow_reverse_init: bool = False) -> None:
        super().__init__()
        if not affine:
            raise ValueError("ActNorm only supports affine=True")
        self.logdet = logdet
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.allow_reverse_init = allow_reverse_init
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set loc/scale so that ``x`` gets zero mean and unit std per channel."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.mean(1)[None, :, None, None]
        std = flat.std(1)[None, :, None, None]
        self.loc.data.copy_(-mean)
        self.scale.data.copy_(1 / (std + 1e-6))

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, :, None, None]
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        h = self.scale * (x + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(x.shape[0], device=x.device)
        return h

    def reverse(self, output: Tensor) -> Tensor:
        """Inverse of ``forward``."""
        if self.training and self.initialized.item() == 0:
            if not self.allow_reverse_init:
                raise RuntimeError("ActNorm is uninitialised; run a forward pass in training "
                                   "mode first (or set allow_reverse_init=True)")
            self.initialize(output)
            self.initialized.fill_(1)
        squeeze = output.ndim == 2
        if squeeze:
            output = output[:, :, None, None]
        h = output / self.scale - self.loc
        return h.squeeze(-1).squeeze(-1) if squeeze else h


def weights_init(m: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): 4x4 convs, ``n_layers`` stride-2 stages, one logit per patch."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3,
                 use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own affine shift
        kw, padw = 4, 1
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw),
                                nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=use_bias),
                    norm_layer(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=use_bias),
                norm_layer(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss."""
    loss_real = torch.mean(torch.relu(1.0 - logits_real))
    loss_fake = torch.mean(torch.relu(1.0 + logits_fake))
    return 0.5 * (loss_real + loss_fake)


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating (softplus) discriminator loss."""
    return 0.5 * (torch.mean(nn.functional.softplus(-logits_real))
                  + torch.mean(nn.functional.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
