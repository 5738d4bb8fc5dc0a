"""Shared test setup: offline hubs, two threads, seeded RNGs, fixture loading."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"

torch.set_num_threads(2)


def load_fixture(name: str) -> dict:
    """Load a reference fixture (``F1_unet_crossattn_s0`` etc.) with weights_only=True."""
    return torch.load(REFERENCE / f"{name}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """Offline CLIP text tower directory (real BPE vocab, random hidden-32 2-layer model)."""
    from ldm.modules.encoders.tiny import build_tiny_clip_text_encoder

    return build_tiny_clip_text_encoder(tmp_path_factory.mktemp("tiny_clip"))


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    import random

    import numpy as np

    np.random.seed(0)
    random.seed(0)
    yield
