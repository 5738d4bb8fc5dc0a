"""The crop rule shared by training and evaluation.

The recipe's tiles (448 px at 10x, as the authors' store) are larger than the model's 256-px
patches: training takes a random patch-size crop of each tile, evaluation (FID reference
statistics, CAS, reconstruction metrics) the centred one. Tiles no larger than the patch are used
whole.
"""
from __future__ import annotations

PATCH_SIZE = 256  # the model's input side: the paper's 256x256 patches at 10x


def crop_origin(width: int, height: int, size: int, u_x: float | None = None,
                u_y: float | None = None) -> tuple[int, int]:
    """Top-left ``(x, y)`` of a ``size`` crop of a ``width`` x ``height`` tile.

    With ``u_x``/``u_y`` in [0, 1) the crop is uniform over every position (random crop, each
    offset from 0 to ``width - size`` inclusive); without them it is centred (``(w - size) // 2``).
    """
    if width < size or height < size:
        raise ValueError(f"a {width}x{height} tile is smaller than the {size}-px crop")
    if u_x is None or u_y is None:
        return (width - size) // 2, (height - size) // 2
    return int(u_x * (width - size + 1)), int(u_y * (height - size + 1))
