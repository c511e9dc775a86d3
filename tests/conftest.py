import pytest
import torch

from qshift.models.world_model import WorldDualEncoder, WorldModelConfig, load_world_model


@pytest.fixture(scope="session")
def shipped_model():
    return load_world_model()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    cfg = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                           stem_channels=(8, 16))
    return WorldDualEncoder(cfg).eval()
