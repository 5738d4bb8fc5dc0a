"""LPIPS perceptual distance with a VGG16 backbone (key layout of taming-transformers' LPIPS).

Two weight files are needed for the real metric, and neither is ever downloaded:

* the torchvision ImageNet VGG16 (``vgg16-397923af.pth``), looked up in torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``) or given explicitly;
* the LPIPS v0.1 linear heads (``vgg.pth``, keys ``lin{0..4}.model.1.weight``), given
  explicitly or looked up in ``$TORCH_HOME/hub/checkpoints/lpips/vgg.pth`` or in an installed
  ``lpips`` pip package.

``pretrained=False`` builds the same modules with random weights (tests, or when a checkpoint
that already carries ``loss.perceptual_loss.*`` will be loaded over them).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_FILENAME = "vgg.pth"
LPIPS_URLS = (
    "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1 (taming-transformers)",
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
)
VGG16_ENV = "PATHLDM_VGG16_WEIGHTS"
LPIPS_ENV = "PATHLDM_LPIPS_WEIGHTS"

# torchvision vgg16.features: conv/relu pairs with max-pools at 4, 9, 16, 23 and 30
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file needed by LPIPS is not on disk."""


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing(what: str, filename: str, candidates: list[Path], env: str, urls: tuple[str, ...],
             arg: str) -> MissingWeightsError:
    looked = "\n".join(f"  - {p}" for p in candidates) or "  (no candidate paths)"
    where = "\n".join(f"  {u}" for u in urls)
    return MissingWeightsError(
        f"LPIPS needs the {what} weights file '{filename}', which was not found. Looked in:\n"
        f"{looked}\nDownload it on a machine with internet access from:\n{where}\n"
        f"and either put it at {candidates[-1] if candidates else filename}, set ${env} to its "
        f"path, or pass its path as '{arg}' (lossconfig.params.{arg}). To train without "
        "pretrained LPIPS (not recommended) set lossconfig.params.lpips_pretrained: false.")


def resolve_vgg16_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of the torchvision VGG16 ImageNet weights; raises an actionable error if absent."""
    candidates = [Path(path)] if path else []
    if os.environ.get(VGG16_ENV):
        candidates.append(Path(os.environ[VGG16_ENV]))
    candidates.append(_hub_checkpoint_dir() / VGG16_FILENAME)
    for c in candidates:
        if c.is_file():
            return c
    raise _missing("VGG16 ImageNet backbone", VGG16_FILENAME, candidates, VGG16_ENV,
                   (VGG16_URL,), "vgg_weights")


def resolve_lpips_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of the LPIPS v0.1 VGG linear-head weights; raises an actionable error if absent."""
    candidates = [Path(path)] if path else []
    if os.environ.get(LPIPS_ENV):
        candidates.append(Path(os.environ[LPIPS_ENV]))
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "weights" / "v0.1" / LPIPS_FILENAME)
    candidates.append(_hub_checkpoint_dir() / "lpips" / LPIPS_FILENAME)
    for c in candidates:
        if c.is_file():
            return c
    raise _missing("LPIPS linear-layer", LPIPS_FILENAME, candidates, LPIPS_ENV, LPIPS_URLS,
                   "lpips_weights")


class ScalingLayer(nn.Module):
    """Shift/scale inputs in [-1, 1] to the statistics the LPIPS VGG expects."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, inp: Tensor) -> Tensor:
        return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout + 1x1 conv without bias (``model.1.weight``) weighting one VGG feature level."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` cut into the five LPIPS slices (relu1_2 ... relu5_3)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        for i, (start, stop) in enumerate(_SLICE_BOUNDS, start=1):
            s = nn.Sequential()
            for idx in range(start, stop):
                s.add_module(str(idx), layers[idx])  # keep torchvision's indices in the keys
            setattr(self, f"slice{i}", s)
        for m in self.modules():  # torchvision's init, for the random (pretrained=False) case
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs

    def load_torchvision(self, path: str | os.PathLike) -> None:
        """Load ``features.{i}.*`` from a torchvision VGG16 state_dict file."""
        from ldm.checkpoint import load_torch_file

        sd = load_torch_file(path, trust=False)  # plain tensors: never a full pickle
        mapping = {f"features.{idx}.{p}": f"slice{i}.{idx}.{p}"
                   for i, (start, stop) in enumerate(_SLICE_BOUNDS, start=1)
                   for idx in range(start, stop) for p in ("weight", "bias")}
        own = self.state_dict()
        wanted = {src: dst for src, dst in mapping.items() if dst in own}
        missing = [src for src in wanted if src not in sd]
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 state_dict: missing {missing[:4]}")
        self.load_state_dict({dst: sd[src] for src, dst in wanted.items()}, strict=True)


def normalize_tensor(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise along channels."""
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


def spatial_average(x: Tensor, keepdim: bool = True) -> Tensor:
    """Mean over H and W."""
    return x.mean([2, 3], keepdim=keepdim)


class LPIPS(nn.Module):
    """Learned perceptual distance; returns ``(B, 1, 1, 1)`` for images in [-1, 1].

    All parameters are frozen. The dropout of the linear heads (kept for the key layout
    ``lin{i}.model.1.weight``) is never applied: the reference let a parent ``.train()`` switch
    it on, which made the perceptual loss stochastic during autoencoder training.
    """

    chns = (64, 128, 256, 512, 512)

    def __init__(self, use_dropout: bool = True, pretrained: bool = True,
                 vgg_weights: str | os.PathLike | None = None,
                 lpips_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for i, c in enumerate(self.chns):
            setattr(self, f"lin{i}", NetLinLayer(c, use_dropout=use_dropout))
        self.pretrained = pretrained
        if pretrained:
            self.load_pretrained(vgg_weights, lpips_weights)
        else:  # released heads are non-negative, so a random LPIPS is still a distance
            with torch.no_grad():
                for i in range(len(self.chns)):
                    w = getattr(self, f"lin{i}").model[-1].weight
                    w.copy_(w.abs())
        for p in self.parameters():
            p.requires_grad = False

    def load_pretrained(self, vgg_weights: str | os.PathLike | None = None,
                        lpips_weights: str | os.PathLike | None = None) -> None:
        """Load the VGG16 backbone and the LPIPS linear heads from local files."""
        vgg_path = resolve_vgg16_weights(vgg_weights)
        lin_path = resolve_lpips_weights(lpips_weights)
        self.net.load_torchvision(vgg_path)
        from ldm.checkpoint import load_torch_file

        sd = load_torch_file(lin_path, trust=False)
        lin_keys = [f"lin{i}.model.{len(getattr(self, f'lin{i}').model) - 1}.weight"
                    for i in range(len(self.chns))]
        # the file stores the heads with dropout (model.1); map onto our layout either way
        src = {f"lin{i}": sd.get(f"lin{i}.model.1.weight", sd.get(f"lin{i}.model.0.weight"))
               for i in range(len(self.chns))}
        bad = [k for k, v in src.items() if v is None]
        if bad:
            raise ValueError(f"{lin_path} is not an LPIPS VGG weights file: no weights for {bad}"
                             f" (found keys {sorted(sd)[:6]})")
        self.load_state_dict({k: src[k.split(".")[0]] for k in lin_keys}, strict=False)
        logger.info("LPIPS: loaded VGG16 from %s and linear heads from %s", vgg_path, lin_path)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 (reference name)
        outs0 = self.net(self.scaling_layer(input))
        outs1 = self.net(self.scaling_layer(target))
        val = None
        for i, (f0, f1) in enumerate(zip(outs0, outs1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            head = getattr(self, f"lin{i}").model[-1]  # the 1x1 conv, without the dropout
            res = spatial_average(head(diff), keepdim=True)
            val = res if val is None else val + res
        return val
