"""The runnable examples under examples/ keep working, and keep the contract docs/backbones.md states."""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qshift.errors import UserError
from qshift.models.load import load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.setattr(sys, "path", [str(EXAMPLES), *sys.path])  # restored after the test
    yield importlib.import_module("custom_model")
    sys.modules.pop("custom_model", None)


def test_the_custom_model_example_runs(examples_on_path, capsys):
    assert examples_on_path.main() == 0
    out = capsys.readouterr().out
    assert out.count("top-2 caption ids") == 3 and "adapted 256 LayerNorm parameters" in out


def test_the_custom_model_example_keeps_the_contract(examples_on_path, tmp_path):
    ex = examples_on_path
    for direction, modality, tower in (("i2t", "image", "visual"), ("t2i", "text", "text")):
        model = load_model("custom:custom_model:build", direction, "random", embed_dim=32)
        assert model.query_modality == modality and model.gallery_modality != modality
        # the factory owns requires_grad: exactly the rule's parameters (the query tower's LayerNorms) take gradients
        tower_module = getattr(model.encoder, tower)
        lns = {id(m.weight) for m in tower_module.modules() if isinstance(m, torch.nn.LayerNorm)}
        trainable = {id(p) for p in model.encoder.parameters() if p.requires_grad}
        assert trainable == {id(p) for _, p in model.adaptable_parameters()} and lns <= trainable
    images = np.random.default_rng(0).integers(0, 255, (3, 50, 40, 3), dtype=np.uint8)
    i2t = load_model("custom:custom_model:build", "i2t", "random")
    z = i2t.encode_query(images)
    assert z.shape == (3, 64) and z.requires_grad and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    g = i2t.encode_gallery(["a dog", "a red cat on the mat"])
    assert g.shape == (2, 64) and not g.requires_grad
    # saved weights load back through the spec, identical embeddings
    path = ex.save_weights(i2t, tmp_path / "w.pt")
    again = load_model("custom:custom_model:build", "i2t", path)
    assert torch.allclose(again.encode_query(images), z.detach())
    with pytest.raises(UserError, match="custom_model needs --weights"):
        load_model("custom:custom_model:build", "i2t")
    with pytest.raises(UserError, match="does not match width=32, embed_dim=16"):
        load_model("custom:custom_model:build", "i2t", path, embed_dim=16)
    with pytest.raises(UserError, match=r"build\(\) cannot be called with .*depth"):
        load_model("custom:custom_model:build", "i2t", "random", depth=3)
