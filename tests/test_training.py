from dataclasses import replace

import numpy as np
import pytest
import torch

from qshift.data import world
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig
from qshift.train.model_card import render_card
from qshift.train.world_training import (TrainConfig, augment, illuminate, perturb_scene, smooth_field,
                                         train_world_model, trained_pieces_by_init, zero_unseen_pieces)

pytestmark = pytest.mark.slow


def test_augment_keeps_left_and_right():
    img = np.full((8, 96, 96, 3), 100, np.uint8)
    img[:, 30:66, 4:30] = 250  # a bright block on the left
    out = augment(torch.from_numpy(img), torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 96, 96)
    left, right = out[..., :48].mean((1, 2, 3)), out[..., 48:].mean((1, 2, 3))
    assert (left > right).all(), "an augmentation flipped the image"


def test_illumination_field_is_smooth_and_blends_as_fog_does():
    gen = torch.Generator().manual_seed(0)
    field = smooth_field(4, 96, 96, gen)
    assert field.shape == (4, 1, 96, 96)
    assert torch.allclose(field.amin((2, 3)), torch.zeros(4, 1)) and torch.allclose(field.amax((2, 3)), torch.ones(4, 1))
    # low frequency: neighbouring pixels differ by a small fraction of the range
    assert field.diff(dim=-1).abs().max() < 0.1
    x = torch.rand(2, 3, 96, 96)
    out = illuminate(x, torch.tensor([0.0, 1.0]), torch.Generator().manual_seed(1))
    assert torch.equal(out[0], x[0])  # a = 0 leaves the image alone
    p = smooth_field(2, 96, 96, torch.Generator().manual_seed(1))[1]
    assert torch.allclose(out[1], (x[1] + p) / 2, atol=1e-6)  # (x + a·P) / (1 + a), the same field for all channels
    assert out.min() >= 0 and out.max() <= 1


def test_illumination_augmentation_off_keeps_the_stream_and_on_changes_images():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 96, 96, 3), dtype=np.uint8))
    base = augment(img, torch.Generator().manual_seed(0))
    off = augment(img, torch.Generator().manual_seed(0), illum_p=0.0, illum_amp_max=0.75)
    assert torch.equal(base, off)  # off draws no random numbers: the shipped recipe reproduces
    on = augment(img, torch.Generator().manual_seed(0), illum_p=1.0, illum_amp_max=0.75)
    assert not torch.allclose(base, on)


def test_hard_negatives_change_what_the_captions_say():
    rng = np.random.default_rng(0)
    changed = 0
    for i in range(50):
        scene, _ = world.train_scene(i)
        bad = perturb_scene(scene, rng)
        if bad is not None:
            assert bad.layout_key != scene.layout_key
            changed += 1
    assert changed >= 40


def test_tiny_training_run_learns_and_records(tmp_path, monkeypatch):
    # a tiny model on a tiny pool: the loss must fall and the record must be complete
    small_val = world.generate_world(seed=99, n_images=32)
    monkeypatch.setattr(world, "load_split", lambda name: small_val)
    cfg = TrainConfig(steps=12, batch_size=16, pool_size=256, eval_every=12, warmup=2, lr=3e-3, workers=1)
    mc = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                          stem_channels=(8, 16))
    losses = []
    model, rec = train_world_model(cfg, mc, out=tmp_path / "m.pt", progress=False, log=losses.append)
    assert (tmp_path / "m.pt").is_file()
    assert rec["history"][-1]["step"] == 12 and np.isfinite(rec["history"][-1]["loss"])
    assert rec["augmentations"]["hflip"] is False
    back = WorldDualEncoder.load(tmp_path / "m.pt")
    assert back.card["train_config"]["steps"] == 12
    # the buckets training never used are zero, the others are not, and the count is recorded
    zero_rows = int((back.text.pieces.weight.float().abs().sum(1) == 0).sum()) - 1  # minus padding
    assert rec["unseen_pieces_zeroed"] == zero_rows > 0
    # ... and they are exactly the rows that kept their seeded initialisation (how v6 was fixed post hoc)
    fresh, _ = train_world_model(replace(cfg, zero_unseen_pieces=False), mc, progress=False, log=lambda m: None)
    assert int((~trained_pieces_by_init(fresh, seed=cfg.seed, tol=0.0)).sum()) == zero_rows
    fake = dict(rec, command="qshift train-world-model --steps 12", clean_metrics={
        "test": {"i2t": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "mAP": 1.0}}},
        test_set={"name": "test", "seed": 3, "n_images": 2000, "n_captions": 10000, "sha256": "ab"})
    text = render_card(fake, "m.pt")
    assert "qshift train-world-model --steps 12" in text and "| test | i2t | 1.0 |" in text
    assert "illumination" not in text  # off: nothing to declare
    lit = dict(fake, augmentations={**fake["augmentations"], "illum_p": 0.5, "illum_amp_max": 1.0})
    assert "illumination field blended in at amplitude up to 1.0 (on 50% of the images) has the form of " \
           "ImageNet-C's fog below its severity 1" in render_card(lit, "m.pt")
    assert "ln_mlp" not in text
    normed = dict(fake, model_config={**fake["model_config"], "image_mlp_norm": True})
    assert "a LayerNorm `ln_mlp` on each MLP's hidden activations" in render_card(normed, "m.pt")


def test_piece_dropout_never_empties_a_word():
    from qshift.train.world_training import drop_pieces
    pieces = torch.tensor([[[5, 6, 7, 0], [9, 0, 0, 0], [0, 0, 0, 0]]]).repeat(200, 1, 1)
    out = drop_pieces(pieces, 0.5, torch.Generator().manual_seed(0))
    assert ((out[:, :2] > 0).sum(-1) >= 1).all()  # every real word keeps a piece
    assert (out[:, 2] == 0).all() and ((out == 0) | (out == pieces)).all()
    rate = ((pieces[:, 0, :3] > 0) & (out[:, 0, :3] == 0)).float().mean()
    assert 0.3 < rate < 0.55
    assert torch.equal(drop_pieces(pieces, 0.0, torch.Generator()), pieces)


def test_misspell_makes_the_asked_number_of_edits():
    import numpy as np
    from qshift.train.world_training import misspell

    def dist(a: str, b: str) -> int:  # optimal string alignment distance (swap = one edit)
        d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a) + 1):
            d[i][0] = i
        for j in range(len(b) + 1):
            d[0][j] = j
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
                if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                    d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
        return d[-1][-1]

    rng = np.random.default_rng(0)
    one = [dist("triangle", misspell("triangle", rng)) for _ in range(200)]
    three = [dist("triangle", misspell("triangle", rng, edits=3)) for _ in range(200)]
    assert max(one) <= 1  # (OSA distance is not a metric, so 3 edits can measure 4 on rare swap overlaps)
    assert np.mean(np.array(three) <= 3) > 0.95 and np.mean(np.array(three) >= 2) > 0.5
    assert np.mean(three) > np.mean(one) + 0.8  # more edits really change more
    assert misspell("of", rng, edits=3) == "of"


def test_typo_table_default_is_unchanged_by_the_max_edits_option():
    from qshift.models.world_model import WorldDualEncoder
    from qshift.train.world_training import typo_table
    model = WorldDualEncoder()
    vocab = ["", "red", "triangle", "above"]
    a = typo_table(model, vocab, 4, seed=0)
    assert torch.equal(a, typo_table(model, vocab, 4, seed=0, max_edits=1))
    assert not torch.equal(a, typo_table(model, vocab, 4, seed=0, max_edits=3))
    with pytest.raises(ValueError):
        typo_table(model, vocab, 4, seed=0, max_edits=0)


def test_fine_tuning_one_tower_leaves_the_other_untouched(tmp_path, monkeypatch):
    small_val = world.generate_world(seed=99, n_images=16)
    monkeypatch.setattr(world, "load_split", lambda name: small_val)
    mc = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                          stem_channels=(8, 16))
    start = WorldDualEncoder(mc)
    start.save(tmp_path / "start.pt", half=False)
    base = WorldDualEncoder.load(tmp_path / "start.pt")
    cfg = TrainConfig(steps=4, batch_size=8, pool_size=256, eval_every=4, warmup=1, lr=1e-2, workers=1,
                      init_from=str(tmp_path / "start.pt"), train_towers="text", typo_p=0.3, typo_max_edits=3)
    model, rec = train_world_model(cfg, progress=False, log=lambda _: None)
    for (name, p), (_, q) in zip(model.visual.named_parameters(), base.visual.named_parameters()):
        assert torch.equal(p, q), f"frozen image tower changed: {name}"
    assert float(model.logit_scale.detach()) == float(base.logit_scale.detach())
    assert any(not torch.equal(p, q) for p, q in zip(model.text.parameters(), base.text.parameters()))
    assert rec["train_config"]["init_from"].endswith("start.pt")
    assert rec["parent"]["command"] is None and rec["chain_total_seconds"] == rec["total_seconds"]  # bare start
    from qshift.train.model_card import render_card
    model.save(tmp_path / "child.pt", card={**rec, "command": "child-cmd"}, half=False)
    grand_cfg = TrainConfig(steps=1, batch_size=8, pool_size=256, eval_every=1, warmup=1, workers=1,
                            init_from=str(tmp_path / "child.pt"), train_towers="text")
    _, grand = train_world_model(grand_cfg, progress=False, log=lambda _: None)
    assert grand["parent"]["command"] == "child-cmd"
    assert grand["chain_total_seconds"] == pytest.approx(grand["total_seconds"] + rec["chain_total_seconds"], abs=0.2)
    card = {**grand, "command": "grand-cmd", "clean_metrics": {}, "test_set": {"name": "t", "seed": 0, "n_images": 1,
                                                                             "n_captions": 1, "sha256": "x"}}
    text = render_card(card, "w.pt")
    assert "Fine-tuned from a checkpoint made by `child-cmd`" in text and "whole chain" in text
    with pytest.raises(ValueError, match="init_from"):
        train_world_model(TrainConfig(train_towers="text"), progress=False, log=lambda _: None)


def test_standardisation_override_is_applied_saved_and_changes_the_forward(tmp_path, monkeypatch):
    small_val = world.generate_world(seed=99, n_images=16)
    monkeypatch.setattr(world, "load_split", lambda name: small_val)
    mc = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                          stem_channels=(8, 16), standardise_input=True)
    WorldDualEncoder(mc).save(tmp_path / "start.pt", half=False)
    cfg = TrainConfig(steps=2, batch_size=8, pool_size=256, eval_every=2, warmup=1, lr=0.0, workers=1,
                      init_from=str(tmp_path / "start.pt"), train_towers="image", standardise_input=False,
                      noise_p=0.0)
    model, rec = train_world_model(cfg, out=tmp_path / "off.pt", progress=False, log=lambda _: None)
    assert model.cfg.standardise_input is False and model.visual.standardise_input is False
    assert rec["model_config"]["standardise_input"] is False and rec["augmentations"]["noise_p"] == 0.0
    reloaded = WorldDualEncoder.load(tmp_path / "off.pt")
    assert reloaded.visual.standardise_input is False
    # lr 0: same weights as the start, so any difference in the forward is the standardisation switch
    start = WorldDualEncoder.load(tmp_path / "start.pt")
    x = torch.rand(2, 3, mc.image_size, mc.image_size) * 0.3
    assert not torch.allclose(start.visual(x), model.visual(x), atol=1e-4)


def test_default_recipe_is_the_shipped_models(shipped_model):
    """`qshift train-world-model --seed 0` with no other option reproduces the shipped model's recipe."""
    from dataclasses import asdict

    recorded = shipped_model.card["train_config"]
    defaults = asdict(TrainConfig())
    assert {k: v for k, v in recorded.items() if defaults.get(k) != v} == {}
    assert shipped_model.cfg.stem_norm == defaults["stem_norm"]


def test_zeroing_unseen_pieces_keeps_known_words_and_silences_unseen_ngrams():
    torch.manual_seed(0)
    model = WorldDualEncoder(WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2,
                                              embed_dim=16, stem_channels=(8, 16))).eval()
    tok = model.tokenizer
    known = "a small red circle"
    seen = torch.zeros(model.text.pieces.num_embeddings, dtype=torch.bool)
    seen[tok(known).unique()] = True
    before_clean = model.encode_text([known])
    typo_words = tok.split_words("a small red cirxle")
    new_pieces = set(tok.word_pieces(typo_words[-1])) - set(tok.word_pieces("circle"))
    assert new_pieces and not seen[list(new_pieces)].any()
    before_typo = model.encode_text(["a small red cirxle"])
    n = zero_unseen_pieces(model, seen)
    assert n == int((~seen[1:]).sum())
    assert torch.equal(model.encode_text([known]), before_clean)  # clean captions encode exactly as before
    assert not torch.allclose(model.encode_text(["a small red cirxle"]), before_typo)
    assert (model.text.pieces.weight[list(new_pieces)] == 0).all()
    with pytest.raises(ValueError, match="bool tensor"):
        zero_unseen_pieces(model, seen[:10])


def test_mlp_norm_fine_tune_inserts_trains_and_saves_the_norms(tmp_path, monkeypatch):
    small_val = world.generate_world(seed=99, n_images=16)
    monkeypatch.setattr(world, "load_split", lambda name: small_val)
    mc = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                          stem_channels=(8, 16))
    WorldDualEncoder(mc).save(tmp_path / "start.pt", half=False)
    cfg = TrainConfig(steps=2, batch_size=8, pool_size=256, eval_every=2, warmup=1, lr=1e-2, workers=1,
                      init_from=str(tmp_path / "start.pt"), train_towers="image", mlp_norm=True)
    logs = []
    model, rec = train_world_model(cfg, out=tmp_path / "mn.pt", progress=False, log=logs.append)
    assert any("inserted mid-MLP LayerNorms" in line for line in logs)
    assert rec["model_config"]["image_mlp_norm"] is True
    ln = model.visual.blocks[0].ln_mlp
    assert ln is not None and ln.weight.requires_grad
    back = WorldDualEncoder.load(tmp_path / "mn.pt")
    assert back.cfg.image_mlp_norm
    torch.testing.assert_close(back.visual.blocks[0].ln_mlp.weight, ln.weight.detach(), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="image tower trained"):
        train_world_model(TrainConfig(steps=1, batch_size=8, pool_size=256, eval_every=1, warmup=1, workers=1,
                                      init_from=str(tmp_path / "start.pt"), train_towers="text", mlp_norm=True),
                          progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="cannot remove"):
        train_world_model(TrainConfig(steps=1, batch_size=8, pool_size=256, eval_every=1, warmup=1, workers=1,
                                      init_from=str(tmp_path / "mn.pt"), train_towers="image", mlp_norm=False),
                          progress=False, log=lambda _: None)
