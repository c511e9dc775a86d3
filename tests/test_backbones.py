import argparse
import json
import logging
import shutil

import numpy as np
from PIL import Image
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from backbone_fixtures import (FIXTURE_WORDS, TINY_OPENCLIP, retrieval_pairs, tiny_hf_blip,  # noqa: E402
                               tiny_hf_clip, tiny_karpathy, tiny_nocaps, tiny_fashiongen, tiny_openclip_checkpoint,
                               tiny_pedes)

from qshift.api import load_model  # noqa: E402
from qshift.cli import app  # noqa: E402
from qshift.errors import UserError  # noqa: E402
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
    with pytest.raises(UserError, match="checkpoint file not found"):
        load_model(f"openclip:{TINY_OPENCLIP}", "i2t", str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match="unknown open_clip"):
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
    with pytest.raises(UserError, match="RetrievalModel"):
        load_model("custom:my_towers:bad", "t2i")
    with pytest.raises(UserError, match="unknown model spec"):
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


def store_record(out):
    """One full cell record of a grid folder."""
    from qshift.bench import store

    return next(payload for _, payload in store.iter_cell_files(out) if "metrics" in payload)


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
    # the same grid through the CLI (resumes: nothing to run), then its report
    from typer.testing import CliRunner

    from qshift.cli import app

    cli = CliRunner()
    bench = cli.invoke(app, ["bench", "--grid", str(grid_file), "--out", str(out)])
    assert bench.exit_code == 0 and "12 already finished" in " ".join(bench.output.split()), bench.output
    rep = cli.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0, rep.output
    report = (out / "report" / "report.md").read_text()
    assert "coco-c/i2t" in report or "gaussian_noise" in report
    recorded = store_record(out)
    assert recorded["model"]["model"] == f"openclip:{TINY_OPENCLIP}" and recorded["model"]["weights_sha256"]
    assert recorded["model"]["annotation_sha256"] and recorded["shift_seed"] == 0
    assert {"torch", "open_clip_torch", "imagecorruptions-imaug"} <= set(recorded["environment"])
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


# ---------------------------------------------------------------------------------------------------------------
# the tiny fixtures can retrieve: distinct inputs give distinct embeddings, and a short fit of the two projection
# layers (everything else as initialised) aligns them, read back through encode_query / encode_gallery


def _projections(which, rm):
    """The two output projections of each tiny backbone (the only weights the retrieval check fits)."""
    if which == "openclip":
        return [rm.clip.visual.proj, rm.clip.text_projection]
    hf = rm.hf_model
    heads = (hf.visual_projection, hf.text_projection) if which == "hf-clip" else (hf.vision_proj, hf.text_proj)
    return [p for head in heads for p in head.parameters()]


def fit_projections(which, rm, images, captions, steps=60):
    """A symmetric InfoNCE fit of the projections on the fixture pairs (Adam, lr 1e-2, temperature 0.05)."""
    params = _projections(which, rm)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.arange(len(captions))
    for _ in range(steps):
        zi = torch.nn.functional.normalize(rm.encoders["image"](images), dim=-1)
        zt = torch.nn.functional.normalize(rm.encoders["text"](captions), dim=-1)
        logits = zi @ zt.T / 0.05
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return float(loss.detach())


def fixture_recall(which, spec, weights, n=8):
    """R@1 (i2t, t2i) of a tiny backbone on ``n`` fixture pairs before and after the projection fit, the
    largest off-diagonal cosine of its image and its text embeddings, and R@1 of a constant model."""
    from qshift.retrieval.metrics import retrieval_metrics

    torch.manual_seed(0)
    images, captions = retrieval_pairs(n)
    rm = load_model(spec, "i2t", weights)
    ids = torch.arange(n)
    off = ~torch.eye(n, dtype=torch.bool)

    def r1():
        s = rm.encode_query(images).detach() @ rm.encode_gallery(captions).T
        return retrieval_metrics(s, ids, ids)["R@1"], retrieval_metrics(s.T, ids, ids)["R@1"]

    zi, zt = rm.encode_query(images).detach(), rm.encode_gallery(captions)
    out = {"image_cos_max": float((zi @ zi.T)[off].max()), "text_cos_max": float((zt @ zt.T)[off].max()),
           "random_init": r1(), "constant": retrieval_metrics(torch.zeros(n, n), ids, ids)["R@1"]}
    out["loss"] = fit_projections(which, rm, images, captions)
    out["fitted"] = r1()
    return out


@pytest.mark.parametrize("which", ["openclip", "hf-clip", "hf-blip"])
def test_each_tiny_backbone_retrieves_its_fixture_far_above_a_constant_model(which, openclip_ckpt, hf_clip_dir,
                                                                               hf_blip_dir):
    spec, weights = {"openclip": (f"openclip:{TINY_OPENCLIP}", openclip_ckpt), "hf-clip": (f"hf-clip:{hf_clip_dir}", None),
                     "hf-blip": (f"hf-blip:{hf_blip_dir}", None)}[which]
    res = fixture_recall(which, spec, weights)
    # distinct inputs, distinct embeddings (the old BLIP fixture gave every image cosine 0.99999994)
    assert res["image_cos_max"] < 0.999 and res["text_cos_max"] < 0.999, res
    assert res["constant"] == 0.0  # ties count against the query: a constant model retrieves nothing
    assert min(res["fitted"]) == 100.0, res  # 8 pairs, chance 12.5


def test_fixture_tokenizers_know_every_fixture_word(hf_clip_dir, hf_blip_dir):
    from transformers import AutoTokenizer

    _, captions = retrieval_pairs(8)
    for folder in (hf_clip_dir, hf_blip_dir):
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert len({tuple(x) for x in tok(captions)["input_ids"]}) == len(captions)
        for word in FIXTURE_WORDS:  # each fixture word is one token of the vocabulary, never the unknown one
            ids = tok(word, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] in (word, f"{word}</w>"), (folder, word)


# ---------------------------------------------------------------------------------------------------------------
# every bad input is one UserError naming the file or flag and the fix


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink(missing_ok=True)
    return dst


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                   "special_tokens_map.json")


@pytest.mark.parametrize("kind", ["hf-clip", "hf-blip"])
def test_a_model_folder_without_a_usable_tokenizer_is_refused(kind, tmp_path, hf_clip_dir, hf_blip_dir):
    from transformers import BertTokenizer

    src = hf_clip_dir if kind == "hf-clip" else hf_blip_dir
    bare = _copy(src, tmp_path / "bare", TOKENIZER_FILES)
    with pytest.raises(UserError, match=r"no tokenizer files .*tokenizer.save_pretrained"):
        load_model(f"{kind}:{bare}", "t2i")
    # a vocabulary larger than the text tower's embedding table (ids past its end)
    big = _copy(src, tmp_path / "big")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(["zzzq", "qqqz"])
    tok.save_pretrained(str(big))
    with pytest.raises(UserError, match=r"tokenizer has \d+ tokens but the text tower's embedding table has \d+ rows"):
        load_model(f"{kind}:{big}", "t2i")
    # a vocabulary of special tokens only / one that knows no English word
    for name, vocab, fragment in (("specials", None, "only its 5 special tokens"),
                                  ("unk", {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "zebra": 5},
                                   "every word of 'a photo of a dog' to its unknown token")):
        folder = _copy(src, tmp_path / name, TOKENIZER_FILES)
        BertTokenizer(vocab=vocab).save_pretrained(str(folder))
        with pytest.raises(UserError, match=fragment):
            load_model(f"{kind}:{folder}", "t2i")


def test_hf_folders_of_the_wrong_class_or_with_mismatched_weights_are_refused(tmp_path, hf_clip_dir, hf_blip_dir):
    from safetensors.torch import load_file, save_file

    with pytest.raises(UserError, match=r"model_type 'clip', but hf-blip needs a BlipForImageTextRetrieval.*"
                                        r"use --model hf-clip:"):
        load_model(f"hf-blip:{hf_clip_dir}", "i2t")
    with pytest.raises(UserError, match=r"model_type 'blip', but hf-clip needs a CLIPModel .*use --model hf-blip:"):
        load_model(f"hf-clip:{hf_blip_dir}", "i2t")
    captioner = _edit_config(_copy(hf_blip_dir, tmp_path / "cap"),
                             lambda c: c.update(architectures=["BlipForConditionalGeneration"]))
    with pytest.raises(UserError, match="holds a BlipForConditionalGeneration, but hf-blip needs"):
        load_model(f"hf-blip:{captioner}", "i2t")
    shape = _edit_config(_copy(hf_clip_dir, tmp_path / "shape"), lambda c: c.update(projection_dim=8))
    with pytest.raises(UserError, match=r"does not match its config.json: 2 of another shape .*text_projection"):
        load_model(f"hf-clip:{shape}", "i2t")
    missing = _copy(hf_clip_dir, tmp_path / "missing")
    sd = {k: v for k, v in load_file(missing / "model.safetensors").items() if not k.startswith("visual_projection")}
    save_file(sd, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"1 weight missing \(e.g. visual_projection.weight\); they would be "
                                        "initialised randomly"):
        load_model(f"hf-clip:{missing}", "i2t")
    no_weights = _copy(hf_clip_dir, tmp_path / "noweights", ["model.safetensors"])
    with pytest.raises(UserError, match="cannot read the weights"):
        load_model(f"hf-clip:{no_weights}", "i2t")
    eos = _edit_config(_copy(hf_clip_dir, tmp_path / "eos"), lambda c: c["text_config"].update(eos_token_id=5))
    with pytest.raises(UserError, match="end-of-text id is 1, the text config's eos_token_id is 5"):
        load_model(f"hf-clip:{eos}", "t2i")
    with pytest.raises(UserError, match="folder not found"):
        load_model(f"hf-clip:{tmp_path / 'nowhere'}", "i2t")
    with pytest.raises(UserError, match="no config.json"):
        load_model(f"hf-clip:{tmp_path}", "i2t")
    with pytest.raises(UserError, match="reads its weights from the folder .* drop --weights"):
        load_model(f"hf-clip:{hf_clip_dir}", "i2t", "other.pt")


def test_openclip_needs_explicit_weights_and_a_matching_checkpoint(tmp_path, openclip_ckpt, caplog):
    spec = f"openclip:{TINY_OPENCLIP}"
    with pytest.raises(UserError, match=rf"openclip:{TINY_OPENCLIP} needs --weights: .* or 'random'"):
        load_model(spec, "i2t")
    with caplog.at_level(logging.WARNING, logger="qshift.models.openclip_model"):
        rm = load_model(spec, "i2t", "random")
    assert "untrained model" in caplog.text and rm.encode_query(torch.randn(1, 3, 32, 32)).shape == (1, 16)
    sd = torch.load(openclip_ckpt, weights_only=True)["state_dict"]
    dropped = tmp_path / "dropped.pt"
    torch.save({k: v for k, v in sd.items() if k != "visual.proj"}, dropped)
    with pytest.raises(UserError, match=rf"does not match open_clip architecture {TINY_OPENCLIP}: 1 missing key "
                                        r"\(e.g. visual.proj\)"):
        load_model(spec, "i2t", str(dropped))
    reshaped = tmp_path / "reshaped.pt"
    torch.save({**sd, "visual.proj": torch.zeros(32, 8)}, reshaped)
    with pytest.raises(UserError, match=r"1 shape mismatch \(e.g. visual.proj: checkpoint \[32, 8\], architecture "
                                        r"\[32, 16\]\)"):
        load_model(spec, "i2t", str(reshaped))
    posemb = tmp_path / "posemb.pt"  # open_clip's own assertion on the text positions, before load_state_dict
    torch.save({**sd, "positional_embedding": torch.zeros(3, 3)}, posemb)
    with pytest.raises(UserError, match=rf"does not fit open_clip architecture {TINY_OPENCLIP} \(AssertionError"):
        load_model(spec, "i2t", str(posemb))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="garbage.pt: cannot be read as a PyTorch checkpoint: not a file torch.save"):
        load_model(spec, "i2t", str(garbage))
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-3)}, pickled)
    with pytest.raises(UserError, match=r"weights_only=True\) refuses \(Unsupported global: GLOBAL argparse.Namespace\); "
                                        "re-save its state_dict alone"):
        load_model(spec, "i2t", str(pickled))
    with pytest.raises(UserError, match="did you mean ViT-B-16"):
        load_model("openclip:ViT-B-61", "i2t", "random")
    with pytest.raises(UserError, match="architecture config not found"):
        load_model(f"openclip:{tmp_path / 'nope.json'}", "i2t", "random")
    with pytest.raises(UserError, match="is a folder"):
        load_model(spec, "i2t", str(tmp_path))
    with pytest.raises(UserError, match="unknown option fp8_everywhere"):
        load_model(spec, "i2t", "random", fp8_everywhere=True)


def test_openclip_tags_are_offline_only_and_the_vocabulary_must_fit(tmp_path):
    # a known tag that is not cached: no download is attempted, the message says to pass a file
    for tag in ("openai", "laion2b_s34b_b88k"):
        with pytest.raises(UserError, match=rf"tag '{tag}' of ViT-B-16 is not in cache_dir .* does not download "
                                            "weights; pass the checkpoint file"):
            load_model("openclip:ViT-B-16", "i2t", tag, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"neither a file nor an open_clip pretrained tag of ViT-B-16 \(its "
                                        r"pretrained tags: openai"):
        load_model("openclip:ViT-B-16", "i2t", "nosuchtag")
    # once the tag's file is in the (Hugging Face hub) cache, the tag is accepted and resolves to that file
    from qshift.models.openclip_model import cached_tag_file, resolve_weights
    snapshot = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert cached_tag_file("ViT-B-16", "openai", str(tmp_path)) == str(snapshot / "open_clip_model.safetensors")
    assert resolve_weights("ViT-B-16", "openai", str(tmp_path)) == "tag"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    small = tmp_path / "qshift-small-vocab.json"
    small.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="tokenizer has 49408 tokens but the text tower embeds only 1000"):
        load_model(f"openclip:{small}", "t2i", "random")


@pytest.mark.parametrize("device, fragment", [
    ("gibberish", "--device 'gibberish' is not a device name; use cpu, cuda or cuda:N"),
    ("cuda:7", r"--device cuda:7: (no CUDA GPU|this torch build has no CUDA|this machine has \d CUDA device)"),
    ("cuda", r"--device cuda: (no CUDA GPU|this torch build has no CUDA)"),
    ("meta", "unsupported device type 'meta'"),
])
def test_a_device_that_does_not_exist_is_refused(device, fragment, openclip_ckpt, hf_clip_dir):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for spec, weights in (("world", None), (f"openclip:{TINY_OPENCLIP}", openclip_ckpt), (f"hf-clip:{hf_clip_dir}", None)):
        with pytest.raises(UserError, match=fragment):
            load_model(spec, "i2t", weights, device=device)
    from qshift.models.hf_models import load_hf_clip
    with pytest.raises(UserError, match=fragment):  # the backbone loaders check it too
        load_hf_clip(hf_clip_dir, device=device)


def test_custom_factories_are_checked(tmp_path, monkeypatch):
    (tmp_path / "factories.py").write_text(
        "import torch\n"
        "from qshift.models.dual_tower import DualTowerModel\n"
        "def _towers(frozen):\n"
        "    tower = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))\n"
        "    for p in tower.parameters():\n"
        "        p.requires_grad_(not frozen)\n"
        "    return DualTowerModel({'image': tower, 'text': tower}, {'image': tower, 'text': tower}, 'image')\n"
        "def good(direction, weights=None, **options):\n    return _towers(False)\n"
        "def frozen(direction, weights=None):\n    return _towers(True)\n"
        "def raises(direction, weights=None):\n    raise RuntimeError('boom\\nsecond line')\n"
        "def plain(direction, weights=None):\n    return object()\n"
        "def no_args():\n    return _towers(False)\n"
        "not_callable = 3\n")
    (tmp_path / "broken_import.py").write_text("import nosuchdependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model("custom:factories:good", "i2t", "w.pt", extra=1).query_modality == "image"
    cases = [
        ("custom:nosuch:build", "no module named 'nosuch' on the Python path; run from the folder holding nosuch.py"),
        ("custom:broken_import:build", "importing 'broken_import' failed: No module named 'nosuchdependency_xyz'"),
        ("custom:factories:missing", "module 'factories' has no attribute 'missing'"),
        ("custom:factories:not_callable", "has a non-callable 'not_callable'"),
        ("custom:factories:raises", "the factory raised RuntimeError: boom second line"),
        ("custom:factories:plain", r"returned object, which lacks query_modality, gallery_modality, encode_query"),
        ("custom:factories:frozen", r"adaptable parameter '1.weight' has requires_grad=False"),
        ("custom:factories:no_args", r"no_args\(\) cannot be called with direction, weights"),
        ("custom:factories", "unknown model spec"),
        ("custom::build", "unknown model spec"),
    ]
    for spec, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            load_model(spec, "i2t")
    with pytest.raises(UserError, match="query_modality is 'image'; this direction queries with 'text'"):
        load_model("custom:factories:good", "t2i")
    with pytest.raises(UserError, match="--direction must be one of i2t, t2i"):
        load_model("world", "x2y")
    with pytest.raises(UserError, match="--preprocess must be one of model, tcr"):
        load_model("world", "i2t", preprocess="fancy")
    with pytest.raises(UserError, match="--model world: unknown option quick_gelu"):
        load_model("world", "i2t", quick_gelu=True)


def test_the_cli_prints_a_bad_backbone_as_one_error_line(tmp_path, openclip_ckpt):
    root = tiny_karpathy(tmp_path / "data", "coco", n_images=2)
    res = runner.invoke(app, ["eval", "--model", f"openclip:{TINY_OPENCLIP}", "--dataset", "coco", "--data-root",
                              str(root), "--benchmark", "coco/i2t", "--json"])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "needs --weights" in lines[0], res.output
