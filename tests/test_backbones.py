import json

import numpy as np
from PIL import Image
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from backbone_fixtures import (TINY_OPENCLIP, tiny_hf_blip, tiny_hf_clip, tiny_karpathy, tiny_nocaps,  # noqa: E402
                               tiny_fashiongen, tiny_openclip_checkpoint, tiny_pedes)

from qshift.api import load_model  # noqa: E402
from qshift.cli import app  # noqa: E402
from qshift.bench.registry import build_benchmark  # noqa: E402
from qshift.data.karpathy import clean_caption, load_karpathy  # noqa: E402
from qshift.models.openclip_model import is_torchscript, needs_quick_gelu  # noqa: E402

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def openclip_ckpt(tmp_path_factory):
    return tiny_openclip_checkpoint(tmp_path_factory.mktemp("openclip"))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    return tiny_hf_clip(tmp_path_factory.mktemp("hfclip"))


@pytest.fixture(scope="module")
def hf_blip_dir(tmp_path_factory):
    return tiny_hf_blip(tmp_path_factory.mktemp("hfblip"))


def _ln_names(prefix, layers, norms=("ln_1", "ln_2")):
    return [f"{prefix}{i}.{n}" for i in range(layers) for n in norms]


def test_openclip_loads_from_a_local_checkpoint_with_the_tcr_parameter_rule(openclip_ckpt):
    rm = load_model(f"openclip:{TINY_OPENCLIP}", "i2t", openclip_ckpt)
    saved = torch.load(openclip_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(rm.clip.state_dict()["visual.ln_post.weight"], saved["visual.ln_post.weight"])
    names = [n for n, _ in rm.adaptable_parameters()]
    modules = ["visual.ln_pre"] + _ln_names("visual.transformer.resblocks.", 2) + ["visual.ln_post"]
    assert names == [f"{m}.{p}" for m in modules for p in ("weight", "bias")]
    text = load_model(f"openclip:{TINY_OPENCLIP}", "t2i", openclip_ckpt)
    tnames = [n for n, _ in text.adaptable_parameters()]
    assert tnames == [f"{m}.{p}" for m in _ln_names("transformer.resblocks.", 2) for p in ("weight", "bias")]
    assert not any("ln_final" in n for n in tnames)
    # only the rule's parameters take gradients; embeddings are normalised
    trainable = {id(p) for p in rm.clip.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in rm.adaptable_parameters()}
    imgs = np.random.default_rng(0).integers(0, 255, (3, 50, 40, 3), dtype=np.uint8)
    z = rm.encode_query(imgs)
    assert z.shape == (3, 16) and torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5) and z.requires_grad
    g = rm.encode_gallery(["a dog", "a red cat"])
    assert g.shape == (2, 16) and not g.requires_grad
    with pytest.raises(ValueError, match="empty"):
        rm.encode_gallery(["  "])


# OpenAI's CLIP checkpoints are TorchScript archives, so the test writes one; torch deprecates the writer
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_quick_gelu_is_decided_and_applied(openclip_ckpt, tmp_path):
    assert needs_quick_gelu("ViT-B-16", "openai") is True
    assert needs_quick_gelu("ViT-B-16-quickgelu", None) is True
    assert needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False
    assert needs_quick_gelu("ViT-B-16", None) is False
    scripted = tmp_path / "openai_style.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    assert is_torchscript(scripted) and not is_torchscript(plain)
    assert needs_quick_gelu("ViT-B-16", str(scripted)) and not needs_quick_gelu("ViT-B-16", str(plain))

    def acts(rm):
        return {type(m).__name__ for m in rm.clip.visual.modules() if "GELU" in type(m).__name__}

    quick = load_model(f"openclip:{TINY_OPENCLIP}", "i2t", openclip_ckpt, quick_gelu=True)
    plain_model = load_model(f"openclip:{TINY_OPENCLIP}", "i2t", openclip_ckpt)
    assert acts(quick) == {"QuickGELU"} and acts(plain_model) == {"GELU"}
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(quick.encode_query(x), plain_model.encode_query(x))
    with pytest.raises(FileNotFoundError):
        load_model(f"openclip:{TINY_OPENCLIP}", "i2t", str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown open_clip"):
        load_model("openclip:NoSuchArch", "i2t")


def test_hf_clip_parameter_rule_and_encoding(hf_clip_dir):
    rm = load_model(f"hf-clip:{hf_clip_dir}", "i2t")
    names = [n for n, _ in rm.adaptable_parameters()]
    modules = ["vision_model.pre_layrnorm"] + \
        _ln_names("vision_model.encoder.layers.", 2, ("layer_norm1", "layer_norm2")) + ["vision_model.post_layernorm"]
    assert names == [f"{m}.{p}" for m in modules for p in ("weight", "bias")]
    text = load_model(f"hf-clip:{hf_clip_dir}", "t2i")
    tnames = [n for n, _ in text.adaptable_parameters()]
    assert tnames == [f"{m}.{p}" for m in _ln_names("text_model.encoder.layers.", 2, ("layer_norm1", "layer_norm2"))
                      for p in ("weight", "bias")]
    z = rm.encode_query(np.zeros((2, 40, 30, 3), np.uint8))
    assert z.shape == (2, 16)
    assert text.encode_query(["a dog", "a cat on a mat"]).shape == (2, 16)
    tcr = load_model(f"hf-clip:{hf_clip_dir}", "i2t", preprocess="tcr")
    assert tcr.encode_query(np.zeros((1, 40, 30, 3), np.uint8)).shape == (1, 16)


def test_hf_blip_uses_itc_embeddings_and_every_layernorm(hf_blip_dir):
    rm = load_model(f"hf-blip:{hf_blip_dir}", "i2t")
    names = [n for n, _ in rm.adaptable_parameters()]
    vit = [n for n, m in rm.hf_model.vision_model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert names == [f"vision_model.{m}.{p}" for m in vit for p in ("weight", "bias")]
    text = load_model(f"hf-blip:{hf_blip_dir}", "t2i")
    bert = [n for n, m in text.hf_model.text_encoder.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert [n for n, _ in text.adaptable_parameters()] == [f"text_encoder.{m}.{p}" for m in bert for p in ("weight", "bias")]
    assert "text_encoder.embeddings.LayerNorm.weight" in dict(text.adaptable_parameters())
    # docs/method.md §2: BLIP text queries adapt at 3e-5 by default, its image queries at the modality's 3e-4
    from qshift.engine import default_lr
    assert default_lr(text) == 3e-5 and default_lr(rm) == 3e-4
    # ITC: the projected CLS token of each tower, normalised
    pix = torch.randn(2, 3, 32, 32)
    hf = rm.hf_model
    ref = torch.nn.functional.normalize(hf.vision_proj(hf.vision_model(pixel_values=pix)[0][:, 0]), dim=-1)
    assert torch.allclose(rm.encode_query(pix), ref, atol=1e-5)


def test_custom_towers_spec(tmp_path, monkeypatch, tiny_model):
    (tmp_path / "my_towers.py").write_text(
        "from qshift.models.world_model import WorldRetrievalModel, WorldDualEncoder, WorldModelConfig\n"
        "def build(direction, weights=None):\n"
        "    cfg = WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2,"
        " embed_dim=16, stem_channels=(8, 16))\n"
        "    return WorldRetrievalModel(WorldDualEncoder(cfg), 'image' if direction == 'i2t' else 'text')\n"
        "def bad(direction, weights=None):\n    return object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rm = load_model("custom:my_towers:build", "t2i")
    assert rm.query_modality == "text"
    with pytest.raises(TypeError, match="RetrievalModel"):
        load_model("custom:my_towers:bad", "t2i")
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model("torchvision:resnet", "i2t")


def test_karpathy_formats_and_early_errors(tmp_path):
    assert clean_caption("A Dog (on) the mat!!  #2.") == "a dog on the mat 2"
    assert len(clean_caption(" ".join(["w"] * 40)).split()) == 30
    root = tiny_karpathy(tmp_path / "coco", "coco", n_images=4)
    ds = load_karpathy("coco", root)
    assert len(ds) == 4 and len(ds.captions) == 20  # COCO keeps the first five of six captions
    assert ds.caption_image.tolist() == [i for i in range(4) for _ in range(5)]
    flickr = tiny_karpathy(tmp_path / "flickr", "flickr", n_images=3, captions_as_list=False)
    fds = load_karpathy("flickr", flickr)
    assert len(fds.captions) == 3 and fds.captions[0] == "a red dog, on the mat 0"
    (root / "images" / "img_002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="unreadable image .*img_002.jpg"):
        load_karpathy("coco", root)
    (root / "images" / "img_001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_karpathy("coco", root)
    with pytest.raises(FileNotFoundError, match="annotation"):
        load_karpathy("coco", tmp_path)
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(ValueError, match="entry 0"):
        load_karpathy("coco", tmp_path)
    task = build_benchmark("flickr-c/i2t/gaussian_noise/3", dataset=fds)
    a, b = task.query_sets[0].items[1], task.query_sets[0].items[1]
    assert np.array_equal(a, b) and not np.array_equal(a, task.clean_queries.items[1])
    with pytest.raises(ValueError, match="unknown benchmark 'flickr-c/i2t/nothing/3'"):
        build_benchmark("flickr-c/i2t/nothing/3", dataset=fds)
    with pytest.raises(ValueError, match="belongs to dataset 'coco'"):
        build_benchmark("coco/i2t", dataset=fds)
    with pytest.raises(ValueError, match="needs its dataset"):
        build_benchmark("flickr/i2t")


@pytest.mark.parametrize("which", ["openclip", "blip"])
def test_end_to_end_rest_run_on_a_fixture(which, tmp_path, openclip_ckpt, hf_blip_dir):
    root = tiny_karpathy(tmp_path / "data", "flickr", n_images=6)
    spec = ["--model", f"openclip:{TINY_OPENCLIP}", "--weights", openclip_ckpt] if which == "openclip" \
        else ["--model", f"hf-blip:{hf_blip_dir}"]
    res = runner.invoke(app, ["run", "--method", "rest", "--benchmark", "flickr-c/i2t/gaussian_noise/5",
                              "--dataset", "flickr", "--data-root", str(root), *spec, "--json",
                              "--set", "batch_size=4", "--set", "steps=1", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["method"] == "rest" and row["n_queries"] == 6 and row["n_gallery"] == 30
    rec = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert rec["params_adapted"] > 0 and rec["params_adapted"] < rec["params_total"]
    assert rec["config"]["lr"] == 3e-4  # image queries: docs/method.md §2's rate, not the world model's
    bad = runner.invoke(app, ["run", "--method", "rest", "--benchmark", "flickr/i2t", "--dataset", "flickr",
                              "--data-root", str(tmp_path / "none"), *spec])
    assert bad.exit_code == 2 and "not found" in bad.output


def test_pedes_and_nocaps_formats_with_many_to_many_relevance(tmp_path):
    from qshift.data.retrieval_datasets import load_dataset

    pedes = load_dataset("cuhk-pedes", tiny_pedes(tmp_path / "cuhk"))
    assert len(pedes) == 6 and len(pedes.captions) == 12 and pedes.image_ids.tolist() == [0, 0, 1, 1, 2, 2]
    task = build_benchmark("cuhk-pedes/t2i", dataset=pedes)
    # a caption of person 0 is relevant to both of person 0's images
    assert (task.gallery_ids == task.query_sets[0].ids[0]).sum() == 2
    icfg = load_dataset("icfg-pedes", tiny_pedes(tmp_path / "icfg", "ICFG-PEDES.json"))
    assert len(icfg) == 6
    root = tiny_nocaps(tmp_path / "nocaps")
    assert len(load_dataset("nocaps", root)) == 4 and len(load_dataset("nocaps-out", root)) == 2
    near = load_dataset("nocaps-near", root)
    assert len(near) == 1 and near.captions == ["thing 1 number 0", "thing 1 number 1", "thing 1 number 2"]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", root)


def test_eval_cli_with_a_real_backbone_and_dataset(tmp_path, openclip_ckpt):
    root = tiny_karpathy(tmp_path / "data", "coco", n_images=4)
    res = runner.invoke(app, ["eval", "--model", f"openclip:{TINY_OPENCLIP}", "--weights", openclip_ckpt,
                              "--dataset", "coco", "--data-root", str(root), "--benchmark", "coco/t2i",
                              "--benchmark", "coco-c/i2t/fog/2", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [(r["benchmark"], r["n_queries"], r["n_gallery"]) for r in rows] == [("coco/t2i", 20, 4),
                                                                             ("coco-c/i2t/fog/2", 4, 20)]
    missing = runner.invoke(app, ["eval", "--model", f"openclip:{TINY_OPENCLIP}", "--dataset", "coco",
                                  "--data-root", str(root)])
    assert missing.exit_code == 2 and "--benchmark" in missing.output


def test_materialize_writes_the_same_pixels_as_the_stream(tmp_path):
    root = tiny_karpathy(tmp_path / "data", "flickr", n_images=3)
    out = tmp_path / "flickr-c"
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "flickr", "--data-root", str(root),
                              "--out", str(out), "--corruption", "pixelate", "--severity", "4"])
    assert res.exit_code == 0, res.output
    folder = out / "pixelate" / "4"
    assert (folder / "flickr30k_test.json").is_file()
    ds = load_karpathy("flickr", folder)  # a drop-in data root
    streamed = build_benchmark("flickr-c/i2t/pixelate/4", dataset=load_karpathy("flickr", root)).query_sets[0].items[2]
    on_disk = np.asarray(Image.open(ds.image_paths[2]).convert("RGB")).astype(int)
    clean = np.asarray(Image.open(root / "images" / "img_002.jpg").convert("RGB")).astype(int)
    # equal up to JPEG q95 re-encoding: far closer to the streamed pixels than to the clean image
    assert on_disk.shape == streamed.shape
    assert np.abs(on_disk - streamed).mean() < 0.5 * np.abs(on_disk - clean).mean()
    tcr = runner.invoke(app, ["shifts", "materialize", "--dataset", "flickr", "--data-root", str(root),
                              "--out", str(tmp_path / "tcr"), "--corruption", "fog", "--severity", "5", "--layout", "tcr"])
    assert tcr.exit_code == 0, tcr.output
    assert (tmp_path / "tcr" / "flickr-IP" / "Flickr30K_IP_fog_5" / "images" / "img_000.jpg").is_file()
    bad = runner.invoke(app, ["shifts", "materialize", "--dataset", "flickr", "--data-root", str(root),
                              "--out", str(out), "--corruption", "nope"])
    assert bad.exit_code == 2 and "unknown corruption" in bad.output


def test_fashiongen_hdf5_streams_images_with_product_relevance(tmp_path):
    pytest.importorskip("h5py")
    from qshift.data.retrieval_datasets import load_dataset

    ds = load_dataset("fashiongen", tiny_fashiongen(tmp_path / "fg"))
    assert len(ds) == 4 and ds.captions[0] == "black wool coat, style 0" and ds.image_ids.tolist() == [500, 500, 501, 501]
    task = build_benchmark("fashiongen-c/i2t/shot_noise/2", dataset=ds)
    img = task.query_sets[0].items[3]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert not np.array_equal(img, task.clean_queries.items[3])
    assert (task.gallery_ids == 501).sum() == 2  # both images of product 501 are relevant to its captions
    with pytest.raises(ValueError, match="inside one file"):
        from qshift.data.karpathy import materialize
        materialize(ds, tmp_path / "fg", tmp_path / "fg" / "x.h5", tmp_path / "out", ["fog"], [1], progress=False)


def test_openclip_config_file_autocast_and_checkpointing(openclip_ckpt):
    from pathlib import Path

    cfg = str(Path(openclip_ckpt).parent / f"{TINY_OPENCLIP}.json")
    rm = load_model(f"openclip:{cfg}", "i2t", openclip_ckpt, autocast="bf16", grad_checkpointing=True)
    x = torch.randn(2, 3, 32, 32)
    z = rm.encode_query(x)
    assert z.dtype == torch.float32 and z.shape == (2, 16)
    z.sum().backward()  # gradients reach the adapted LayerNorms through checkpointed blocks
    assert all(p.grad is not None for _, p in rm.adaptable_parameters())
    with pytest.raises(ValueError, match="autocast"):
        load_model(f"openclip:{cfg}", "i2t", openclip_ckpt, autocast="fp8")


def test_a_grid_runs_on_a_real_backbone_over_a_local_dataset(tmp_path, openclip_ckpt):
    """`qshift bench` takes the same model and dataset specs as `qshift run`: a tiny random open_clip
    model on a tiny COCO-format dataset, cells resumable and stale when the weights change."""
    from qshift.bench import grid as G
    from qshift.bench.report import load_cells

    root = tiny_karpathy(tmp_path / "coco", n_images=6)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        "methods: [source, tcr]\n"
        "benchmarks: ['coco/i2t', 'coco-c/i2t/gaussian_noise/*']\n"
        "seeds: [0]\n"
        "protocol: {batch_size: 4, steps: 1}\n"
        f"model: openclip:{TINY_OPENCLIP}\nweights: {openclip_ckpt}\ndataset: coco\ndata_root: {root}\n")
    spec, only = G.load_grid(grid_file)
    assert len(spec.expanded_benchmarks()) == 6  # clean + 5 severities
    out = tmp_path / "run"
    counts = G.run_grid(spec, out, only, progress=False, log=lambda m: None)
    assert counts == {"cells": 12, "skipped": 0, "done": 12, "failed": 0, "stale": 0}
    cells = load_cells(out)
    assert len(cells) == 12 and {c.method for c in cells} == {"source", "tcr"}
    rec = json.loads(json.dumps(cells[0].protocol))
    assert rec["lr"] == rec["lr_default"] == 3e-4  # open_clip's protocol rate, resolved by the backbone
    again = G.run_grid(spec, out, only, progress=False, log=lambda m: None)
    assert again["skipped"] == 12 and again["done"] == 0
    # other weights: another model identity, so every cell is stale and reruns
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    sd = torch.load(openclip_ckpt, weights_only=True)
    sd["state_dict"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in sd["state_dict"].items()}
    torch.save(sd, other)
    spec2 = spec.model_copy(update={"weights": str(other), "benchmarks": ["coco/i2t"], "methods": spec.methods[:1]})
    assert G.run_grid(spec2, out, only, progress=False, log=lambda m: None)["done"] == 1
    with pytest.raises(ValueError, match="unknown benchmark"):
        spec.model_copy(update={"benchmarks": ["coco-c/i2t/nothing/3"]}).expanded_benchmarks()
