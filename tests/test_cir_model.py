"""The CIR source model (qshift.models.cir_model): the adaptable-parameter rule, the frozen gallery tower,
the fusions, loading, and the shipped combiner's retrieval on the clean CIR world."""
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from qshift.data.cir_world import load_cir_split
from qshift.errors import UserError
from qshift.models.cir_model import (CIR_FORMAT, FUSIONS, Combiner, ComposedRetrievalModel, load_cir_model,
                                     save_cir_model, shipped_cir_model_path)
from qshift.models.load import load_model
from qshift.models.protocol import check_retrieval_model
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig
from qshift.retrieval.cir_metrics import cirr_metrics
from qshift.train.cir_training import _render_chunk

D = 16


def tiny_encoder(seed: int = 0) -> WorldDualEncoder:
    torch.manual_seed(seed)
    cfg = WorldModelConfig(stem_channels=(8, 16), stem_norm=True, image_width=32, image_depth=1, text_width=32,
                           text_depth=1, heads=2, embed_dim=D)
    return WorldDualEncoder(cfg).eval()


def tiny_model(fusion: str = "combiner") -> ComposedRetrievalModel:
    torch.manual_seed(1)
    combiner = Combiner(D, 24, 32) if fusion == "combiner" else None
    return ComposedRetrievalModel(tiny_encoder(), combiner, fusion=fusion)


def queries(n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    texts = ["make the red circle blue", "remove the star", "+ small green square, top", "the moon is gone"]
    return [(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), texts[i % len(texts)]) for i in range(n)]


def test_adaptable_parameters_are_the_query_side_layernorms():
    model = tiny_model()
    params = model.adaptable_parameters()
    names = [n for n, _ in params]
    assert len(names) == len(set(names)) and names
    assert all(n.split(".")[0] in ("visual", "text", "combiner") for n in names)
    assert {n.split(".")[0] for n in names} == {"visual", "text", "combiner"}
    owners = {"visual": model.encoder.visual, "text": model.encoder.text, "combiner": model.combiner}
    expected = {f"{k}.{mod_name}.{p}" for k, m in owners.items() for mod_name, mod in m.named_modules()
                if isinstance(mod, nn.LayerNorm) for p in ("weight", "bias")}
    assert set(names) == expected
    assert {"combiner.ln_image.weight", "combiner.ln_text.bias", "combiner.ln_mix.weight"} <= set(names)
    chosen = {id(p) for _, p in params}
    assert not chosen & {id(p) for p in model.gallery_visual.parameters()}
    everything = [*model.encoder.parameters(), *model.combiner.parameters(), *model.gallery_visual.parameters()]
    assert all(p.requires_grad == (id(p) in chosen) for p in everything)
    assert check_retrieval_model(model, "test", query_modality="image+text") is model
    assert (model.query_modality, model.gallery_modality, model.embed_dim, model.default_lr) == \
        ("image+text", "image", D, 1e-3)
    assert [n.split(".")[0] for n, _ in tiny_model("sum").adaptable_parameters()].count("combiner") == 0


def test_gallery_is_encoded_by_the_frozen_source_tower():
    model = tiny_model()
    gallery = np.random.default_rng(3).integers(0, 256, (5, 192, 192, 3), dtype=np.uint8)
    before_g, before_q = model.encode_gallery(gallery), model.encode_query(queries()).detach()
    with torch.no_grad():
        for _, p in model.adaptable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert torch.equal(model.encode_gallery(gallery), before_g)
    assert not torch.allclose(model.encode_query(queries()), before_q, atol=1e-3)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusions_give_unit_norm_embeddings_and_gradients(fusion):
    model = tiny_model(fusion)
    z = model.encode_query(queries(3))
    assert z.shape == (3, D)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    z.sum().backward()
    assert all(p.grad is not None for _, p in model.adaptable_parameters())
    g = model.encode_gallery(np.stack([q[0] for q in queries(2)]))
    assert g.shape == (2, D) and torch.allclose(g.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_bad_query_batches_get_clear_errors():
    model = tiny_model("sum")
    with pytest.raises(UserError, match="list of"):
        model.encode_query(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(UserError, match="query 1 is not an"):
        model.encode_query([queries(1)[0], "just text"])
    with pytest.raises(UserError, match="uint8"):
        model.encode_query([(np.zeros((96, 96, 3), np.float32), "x")])
    with pytest.raises(UserError, match="unknown fusion"):
        ComposedRetrievalModel(tiny_encoder(), None, fusion="concat")


def test_cir_checkpoint_round_trip_through_load_cir_model(tmp_path):
    torch.manual_seed(5)
    encoder, combiner = tiny_encoder(3), Combiner(D, 24, 32)
    path = tmp_path / "c.pt"
    save_cir_model(encoder, combiner, path, {"note": "test", "history": [1, 2]})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CIR_FORMAT and "history" not in payload["card"]
    assert set(payload["combiner"]) == set(combiner.state_dict())
    model = load_cir_model(path)
    for k, v in combiner.state_dict().items():
        assert torch.equal(model.combiner.state_dict()[k], v)
    # the towers are stored in fp16, like the world model's
    direct = ComposedRetrievalModel(WorldDualEncoder.load(path), combiner)
    q = queries(2)
    assert torch.allclose(model.encode_query(q), direct.encode_query(q), atol=1e-6)
    # a training-free fusion over the checkpoint's towers reads no combiner
    assert load_cir_model(path, fusion="sum").combiner is None
    # `--model world` answers the composed direction with the same checkpoint and options
    via_spec = load_model("world", "cir", path)
    assert torch.allclose(via_spec.encode_query(q), model.encode_query(q), atol=1e-6)
    assert load_model("world", "cir", path, fusion="interp", alpha=0.3).alpha == 0.3
    with pytest.raises(UserError, match="unknown fusion 'concat'"):
        load_model("world", "cir", path, fusion="concat")
    with pytest.raises(UserError, match="unknown option"):
        load_model("world", "cir", path, quick_gelu=True)


def test_missing_or_corrupt_weights_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIR model weights not found.*nope.pt"):
        load_cir_model(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="CIR model weights not found.*nope.pt"):
        load_model("world", "cir", tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable CIR model"):
        load_cir_model(bad)
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="not a qshift CIR model checkpoint"):
        load_cir_model(other)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": CIR_FORMAT, "config": {}, "state_dict": {}, "combiner": {"weight": torch.zeros(3)}}, wrong)
    with pytest.raises(UserError):
        load_cir_model(wrong)


def test_shipped_cir_model_is_small_and_loads_as_a_world_model():
    path = shipped_cir_model_path()
    assert path.stat().st_size <= 10 * 2**20
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CIR_FORMAT
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in payload["combiner"].values())
    assert isinstance(WorldDualEncoder.load(path), WorldDualEncoder)


def test_shipped_model_retrieves_on_clean_test_queries():
    split = load_cir_split("test").subset(200)
    scenes = split.gallery
    with ProcessPoolExecutor(2) as ex:
        images = np.concatenate(list(ex.map(_render_chunk, [scenes[s:s + 200] for s in range(0, len(scenes), 200)])))
    pairs = [(images[r], t) for r, t in zip(split.reference_row.tolist(), split.texts)]
    inputs = split.metric_inputs()
    r1 = {}
    for fusion in ("combiner", "sum"):
        model = load_cir_model(fusion=fusion)
        with torch.no_grad():
            q = torch.cat([model.encode_query(pairs[s:s + 100]) for s in range(0, len(pairs), 100)])
            g = torch.cat([model.encode_gallery(images[s:s + 256]) for s in range(0, len(images), 256)])
        r1[fusion] = cirr_metrics(q @ g.T, **inputs)["R@1"]
    chance = 100.0 / (len(scenes) - 1)
    assert r1["combiner"] > 20 * chance
    assert r1["combiner"] > r1["sum"] + 5, r1


def test_model_options_on_the_command_line():
    from typer.testing import CliRunner

    from qshift.cli import app
    from qshift.cli.common import parse_model_options

    assert parse_model_options(["fusion=interp", "alpha=0.3", "quick_gelu=true", "n=2", "combiner=a=b.pt"]) == \
        {"fusion": "interp", "alpha": 0.3, "quick_gelu": True, "n": 2, "combiner": "a=b.pt"}
    with pytest.raises(ValueError, match="key=value"):
        parse_model_options(["fusion"])
    res = CliRunner().invoke(app, ["run", "--method", "source", "--benchmark", "world-cir/clean",
                                   "--model-option", "fusion=concat"])
    assert res.exit_code == 2 and "unknown fusion 'concat'" in res.output and "Traceback" not in res.output
