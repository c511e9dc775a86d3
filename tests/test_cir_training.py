"""Training the CIR source model (qshift.train.cir_training): which tower parameters move, the token cache,
and the epoch selected on val."""
from dataclasses import replace

import torch

from qshift.data.cir_world import generate_cir_world
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig
from qshift.train import cir_training as T


def tiny_encoder() -> WorldDualEncoder:
    torch.manual_seed(0)
    cfg = WorldModelConfig(stem_channels=(8, 16), image_width=32, image_depth=2, text_width=32, text_depth=1,
                           heads=2, embed_dim=16)
    return WorldDualEncoder(cfg).eval()


CFG = T.CIRTrainConfig(epochs=2, batch_size=8, proj_dim=16, hidden_dim=24, tune_image_blocks=1, render_workers=0,
                       hard_negatives=2)


def test_fit_tunes_only_the_top_blocks_and_selects_on_val(tmp_path):
    model = tiny_encoder()
    train, val = generate_cir_world(7, 24), generate_cir_world(8, 10)
    cfg = replace(CFG, cache_dir=str(tmp_path / "cache"))
    td = T.train_data(model, train, cfg, False, lambda s: None, "sha")
    vd = T.eval_data(model, val, cfg, False, lambda s: None, "sha")
    assert td.references.shape == (24, 1 + 8 * 8, 32) and td.references.dtype == torch.float16
    assert td.negatives.shape[:2] == (24, 2) and len(td.texts) == 6  # own, 4 re-worded, typo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned, combiner, history, epoch = T.fit_cir_model(model, td, vd, cfg, progress=False, log=lambda s: None)
    assert [h["epoch"] for h in history] == [1, 2] and 1 <= epoch <= 2
    best = max(h["val_R@1"] for h in history)
    assert T.cir_metrics_of(tuned, vd, "combiner", combiner, start=1)["R@1"] == best  # the selected state
    after = tuned.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("visual.blocks.1.") for k in moved)
    assert any(k.startswith("text.blocks.0.") for k in moved)
    assert "visual.ln_post.weight" in moved and "visual.head.weight" in moved
    frozen = [k for k in before if k.startswith(("visual.blocks.0.", "visual.stem", "visual.ln_pre", "text.pieces"))]
    assert frozen and not (set(frozen) & moved)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)  # the source model is untouched
    assert not any(p.requires_grad for p in tuned.parameters())
    # the token cache: a second call reads the same tensors from disk
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    again = T.train_data(model, train, cfg, False, lambda s: None, "sha")
    assert torch.equal(again.references, td.references)


def test_frozen_towers_move_nothing_but_the_combiner():
    model = tiny_encoder()
    train, val = generate_cir_world(7, 16), generate_cir_world(8, 8)
    cfg = replace(CFG, tune_image_blocks=0, tune_text=False, epochs=1)
    assert T.tuned_tower_parameters(model, cfg) == []
    td = T.train_data(model, train, cfg, False, lambda s: None, "sha")
    vd = T.eval_data(model, val, cfg, False, lambda s: None, "sha")
    tuned, _, _, _ = T.fit_cir_model(model, td, vd, cfg, progress=False, log=lambda s: None)
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in model.state_dict().items())
