import numpy as np
import pytest
import torch
from torch import nn

from qshift.data import world
from qshift.models.protocol import RetrievalModel
from qshift.models.world_model import WorldDualEncoder, WorldRetrievalModel, shipped_weights_path


@pytest.mark.slow  # evaluates the shipped model on the clean test split
def test_shipped_weights_are_small_and_carry_a_card(shipped_model):
    path = shipped_weights_path()
    assert path.stat().st_size <= 10 * 2**20
    card = shipped_model.card
    assert card["test_set"]["n_images"] == 2000 and card["test_set"]["n_captions"] == 10_000
    assert card["test_set"]["sha256"] == world.load_split("test").fingerprint(), "model card hash ≠ current test set"
    assert card.get("chain_total_seconds", card["total_seconds"]) <= 3600  # a fine-tune counts its parent's time
    assert path.with_suffix(".md").is_file()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_adaptable_parameters_are_exactly_query_tower_layernorm_affines(tiny_model, modality):
    rm = WorldRetrievalModel(tiny_model, query_modality=modality)
    assert isinstance(rm, RetrievalModel)
    params = rm.adaptable_parameters()
    tower = tiny_model.visual if modality == "image" else tiny_model.text
    expected = {id(p) for m in tower.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias)}
    assert {id(p) for _, p in params} == expected
    names = [n for n, _ in params]
    assert all(n.startswith("visual." if modality == "image" else "text.") for n in names)
    if modality == "image":
        assert {"visual.ln_pre.weight", "visual.ln_post.bias", "visual.blocks.0.ln_1.weight"} <= set(names)
    else:
        assert {"text.ln_final.weight", "text.blocks.0.ln_2.bias"} <= set(names)


def test_query_is_differentiable_and_gallery_is_not(tiny_model):
    split = world.generate_world(seed=5, n_images=4)
    rm = WorldRetrievalModel(tiny_model, query_modality="image")
    zq = rm.encode_query(split.images())
    zg = rm.encode_gallery(split.captions)
    assert zq.shape == (4, 16) and zg.shape == (20, 16)
    assert zq.requires_grad and not zg.requires_grad
    torch.testing.assert_close(zq.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(zg.norm(dim=-1), torch.ones(20))
    (zq @ zg.T).sum().backward()
    assert all(p.grad is not None for _, p in rm.adaptable_parameters())


def test_text_encoding_ignores_padding(tiny_model):
    a = tiny_model.encode_text(["a red circle"])
    b = tiny_model.encode_text(["a red circle", "there is a small blue square in the top left corner"])[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise(tiny_model):
    with pytest.raises(ValueError, match="uint8"):
        tiny_model.encode_image(np.zeros((2, 96, 96, 3), dtype=np.float64))
    with pytest.raises(ValueError, match=r"\[B, 3, 96, 96\]"):
        tiny_model.encode_image(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="whole multiple"):
        tiny_model.encode_image(np.zeros((2, 100, 100, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="query_modality"):
        WorldRetrievalModel(tiny_model, query_modality="audio")
    with pytest.raises(FileNotFoundError):
        WorldDualEncoder.load("/nonexistent/weights.pt")


def test_save_load_roundtrip(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    tiny_model.save(path, card={"note": "x"}, half=False)
    back = WorldDualEncoder.load(path)
    split = world.generate_world(seed=1, n_images=3)
    torch.testing.assert_close(back.encode_image(split.images()), tiny_model.encode_image(split.images()))
    assert back.card == {"note": "x"}
    assert not list(tmp_path.glob("*.tmp"))


def test_shipped_model_ranks_true_captions_first(shipped_model):
    split = world.generate_world(seed=777, n_images=64)  # fresh scenes, never seen in training
    zi = shipped_model.encode_image(split.images())
    zt = shipped_model.encode_text(split.captions)
    top = (zi @ zt.T).argmax(1)
    acc = (torch.as_tensor(split.caption_image)[top] == torch.arange(64)).float().mean().item()
    assert acc >= 0.5, acc


def test_preprocessing_area_downsamples_renders_larger_than_the_input(tiny_model):
    big = np.random.default_rng(0).integers(0, 256, (2, 2 * tiny_model.cfg.image_size, 2 * tiny_model.cfg.image_size, 3),
                                            dtype=np.uint8)
    x = tiny_model.preprocess_images(big)
    assert x.shape == (2, 3, tiny_model.cfg.image_size, tiny_model.cfg.image_size)
    manual = big.reshape(2, tiny_model.cfg.image_size, 2, tiny_model.cfg.image_size, 2, 3).astype(np.float64).mean((2, 4))
    ref = tiny_model.preprocess_images(np.rint(manual).astype(np.uint8))
    assert (x - ref).abs().max() < 0.02  # the same picture, up to the uint8 rounding of the reference
    assert not torch.allclose(x, tiny_model.preprocess_images(big[:, ::2, ::2]))  # not nearest-neighbour


def test_stem_norm_adds_adaptable_channel_layernorms_and_keeps_old_checkpoints_loadable(tiny_model, tmp_path):
    from dataclasses import replace

    normed = WorldDualEncoder(replace(tiny_model.cfg, stem_norm=True)).eval()
    names = [n for n, _ in WorldRetrievalModel(normed, query_modality="image").adaptable_parameters()]
    assert {"visual.stem.1.weight", "visual.stem.1.bias", "visual.stem.4.weight", "visual.stem.4.bias"} <= set(names)
    assert len(names) == len(WorldRetrievalModel(tiny_model, query_modality="image").adaptable_parameters()) + 4
    # the stem LayerNorm normalises each pixel over channels: its output has zero channel mean there
    x = torch.randn(2, 3, 96, 96)
    h = normed.visual.stem[:2](x)
    torch.testing.assert_close(h.mean(dim=1), torch.zeros(2, 48, 48), atol=1e-5, rtol=0)
    # its affine acts per channel: scaling a channel's weight scales that channel only
    with torch.no_grad():
        normed.visual.stem[1].weight[0] *= 3.0
    h3 = normed.visual.stem[:2](x)
    torch.testing.assert_close(h3[:, 0], 3 * h[:, 0])
    torch.testing.assert_close(h3[:, 1:], h[:, 1:])
    # a model without stem_norm keeps the v1-v3 layer indices (stem.0, stem.2, stem.4 are the convolutions)
    assert [type(m).__name__ for m in tiny_model.visual.stem] == ["Conv2d", "GELU", "Conv2d", "GELU", "Conv2d"]
    path = tmp_path / "n.pt"
    normed.save(path, card={}, half=False)
    back = WorldDualEncoder.load(path)
    assert back.cfg.stem_norm
    split = world.generate_world(seed=1, n_images=2)
    torch.testing.assert_close(back.encode_image(split.images()), normed.encode_image(split.images()))


def test_mlp_norm_adds_adaptable_layernorms_and_old_checkpoints_load_without_them(tiny_model, tmp_path):
    from dataclasses import replace

    normed = WorldDualEncoder(replace(tiny_model.cfg, image_mlp_norm=True)).eval()
    names = {n for n, _ in WorldRetrievalModel(normed, query_modality="image").adaptable_parameters()}
    old = {n for n, _ in WorldRetrievalModel(tiny_model, query_modality="image").adaptable_parameters()}
    assert names - old == {"visual.blocks.0.ln_mlp.weight", "visual.blocks.0.ln_mlp.bias"}
    assert normed.visual.blocks[0].ln_mlp.normalized_shape == (tiny_model.cfg.mlp_ratio * 32,)
    assert all(blk.ln_mlp is None for blk in normed.text.blocks)  # image tower only
    # parameter names of the other weights are unchanged, so a v6.1-style state dict loads into it
    missing, unexpected = normed.load_state_dict(tiny_model.state_dict(), strict=False)
    assert set(missing) == {"visual.blocks.0.ln_mlp.weight", "visual.blocks.0.ln_mlp.bias"} and not unexpected
    # the norm is on the forward path: changing its bias changes the embedding
    x = torch.randn(2, 3, 96, 96)
    before = normed.encode_image(x)
    with torch.no_grad():
        normed.visual.blocks[0].ln_mlp.bias += 0.5
    assert not torch.allclose(before, normed.encode_image(x))
    path = tmp_path / "m.pt"
    normed.save(path, card={}, half=False)
    back = WorldDualEncoder.load(path)
    assert back.cfg.image_mlp_norm
    torch.testing.assert_close(back.encode_image(x), normed.encode_image(x))
    tiny_model.save(tmp_path / "old.pt", card={}, half=False)
    assert not WorldDualEncoder.load(tmp_path / "old.pt").cfg.image_mlp_norm


def test_inserted_mlp_norms_are_fitted_to_keep_the_trained_function(tiny_model):
    import copy
    from dataclasses import replace

    from qshift.models.world_model import insert_image_mlp_norms

    torch.manual_seed(1)
    images = torch.randn(64, 3, 96, 96)
    held_out = torch.randn(16, 3, 96, 96)
    ref = tiny_model.encode_image(held_out)
    fitted = copy.deepcopy(tiny_model)
    insert_image_mlp_norms(fitted, images)
    assert fitted.cfg.image_mlp_norm and fitted.visual.blocks[0].ln_mlp is not None
    # a default-initialised norm (γ = 1, β = 0) for comparison
    plain = WorldDualEncoder(replace(tiny_model.cfg, image_mlp_norm=True)).eval()
    plain.load_state_dict(tiny_model.state_dict(), strict=False)
    err_fitted = (fitted.encode_image(held_out) - ref).norm(dim=-1).mean()
    err_plain = (plain.encode_image(held_out) - ref).norm(dim=-1).mean()
    assert err_fitted < 0.5 * err_plain
    with pytest.raises(ValueError, match="already has"):
        insert_image_mlp_norms(fitted, images)
