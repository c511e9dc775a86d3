"""Real-data composed image retrieval: FashionIQ / CIRR loaders, CLIP4Cir checkpoints on open_clip and Hugging
Face CLIP towers, the FashionIQ-C / CIRR-C families, CIRR's submission files and `shifts materialize`."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from typer.testing import CliRunner

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from backbone_fixtures import TINY_OPENCLIP, tiny_hf_clip, tiny_openclip_checkpoint  # noqa: E402

from qshift.bench.registry import build_benchmark, list_benchmarks  # noqa: E402
from qshift.bench.cir_real_families import relevance  # noqa: E402
from qshift.bench.evaluate import evaluate_task  # noqa: E402
from qshift.cli import app  # noqa: E402
from qshift.data import cir_datasets as C  # noqa: E402
from qshift.data.karpathy import read_rgb  # noqa: E402
from qshift.data.retrieval_datasets import load_dataset  # noqa: E402
from qshift.engine import RunConfig, parse_settings, run_online  # noqa: E402
from qshift.errors import UserError  # noqa: E402
from qshift.models.cir_real import Clip4CirCombiner, load_combiner, load_real_cir_model, target_pad  # noqa: E402
from qshift.models.load import load_model  # noqa: E402
from qshift.retrieval.cir_metrics import cirr_metrics, fashioniq_metrics  # noqa: E402
from qshift.retrieval.cirr_submission import (cirr_predictions, write_cirr_submission,  # noqa: E402
                                              write_cirr_submission_for)

runner = CliRunner()
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 200), (20, 210, 210),
           (250, 140, 0), (120, 120, 120), (255, 255, 255), (90, 40, 10)]


def _draw(path: Path, k: int, size=(40, 36)) -> None:
    """An image with its own colours and shape (circle / box / triangle by k)."""
    im = Image.new("RGB", size, COLOURS[(k + 5) % len(COLOURS)])
    d = ImageDraw.Draw(im)
    box = (4 + k % 3, 4, size[0] - 5, size[1] - 4 - k % 4)
    fill = COLOURS[k % len(COLOURS)]
    [d.ellipse, d.rectangle, lambda b, fill: d.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])],
                                                        fill=fill)][k % 3](box, fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)


def make_fashioniq(root: Path) -> Path:
    """dress: 6 images (one a JPEG, a target only), 4 queries (two share a target); shirt: 3 images, 1 query."""
    dress = [f"d{i}" for i in range(6)]
    for i, n in enumerate(dress):
        _draw(root / "images" / (f"{n}.jpg" if i == 5 else f"{n}.png"), i)
    shirt = ["s0", "s1", "s2"]
    for i, n in enumerate(shirt):
        _draw(root / "images" / f"{n}.png", 6 + i)
    caps = {"dress": [{"target": "d1", "candidate": "d0", "captions": ["is red.", " has no sleeves?"]},
                      {"target": "d5", "candidate": "d2", "captions": ["Longer, ", "and blue"]},
                      {"target": "d1", "candidate": "d3", "captions": ["IS SHORTER", "is green."]},
                      {"target": "d4", "candidate": "d1", "captions": ["more pink", "with a belt"]}],
            "shirt": [{"target": "s2", "candidate": "s0", "captions": ["darker", "has a collar"]}]}
    for cat, names in (("dress", dress), ("shirt", shirt)):
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(caps[cat]))
    return root


CIRR_SETS = [["dev-0-0-img0", "dev-0-0-img1", "dev-1-0-img0", "dev-1-0-img1"],
             ["dev-2-0-img0", "dev-2-0-img1", "dev-3-0-img0", "dev-3-0-img1"]]


def make_cirr(root: Path, layout: str = "", shared_target: bool = False, split: str = "val") -> Path:
    """8 images in two img_sets of 4; 4 queries with their own targets (``shared_target``: a 5th query whose
    target is query 0's, with another reference)."""
    names = [n for s in CIRR_SETS for n in s]
    table = {n: f"./dev/{n}.png" for n in names}
    for k, n in enumerate(names):
        _draw(root / layout / "dev" / f"{n}.png", k, size=(44, 34))
    pairs = [(0, 1, 0, "make it green"), (2, 3, 0, "Add a dog."), (4, 6, 1, "two of them"), (7, 5, 1, "darker sky")]
    if shared_target:
        pairs.append((3, 1, 0, "same but at night"))
    entries = []
    for k, (ref, tgt, s, text) in enumerate(pairs):
        e = {"pairid": 100 + k, "reference": names[ref], "caption": text,
             "img_set": {"id": s, "members": CIRR_SETS[s], "reference_rank": 0}}
        if split != "test1":
            e.update({"target_hard": names[tgt], "target_soft": {names[tgt]: 1.0}})
            e["img_set"]["target_rank"] = 1
        entries.append(e)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(table))
    return root


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """The cache of corrupted images and perturbed texts in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSHIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory):
    return make_fashioniq(tmp_path_factory.mktemp("fashioniq"))


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return make_cirr(tmp_path_factory.mktemp("cirr"))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny open_clip saved as CLIP4Cir's {"CLIP": state_dict} and a random combiner as {"Combiner": ...}."""
    folder = tmp_path_factory.mktemp("clip4cir")
    state = torch.load(tiny_openclip_checkpoint(folder), weights_only=True)["state_dict"]
    torch.save({"epoch": 3, "CLIP": state}, folder / "tuned_clip.pt")
    torch.manual_seed(7)
    comb = Clip4CirCombiner(16, 24, 40)
    torch.save({"epoch": 2, "Combiner": comb.state_dict()}, folder / "combiner.pt")
    return folder, state, comb.state_dict()


@pytest.fixture(scope="module")
def real_model(clip_files):
    folder, _, _ = clip_files
    return load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt", folder / "combiner.pt")


# ------------------------------------------------------------------------------ loaders

def test_fashioniq_loader_rows_texts_and_fingerprint(fiq_root):
    ds = C.load_fashioniq(fiq_root)
    assert set(ds.categories) == {"dress", "shirt"}
    dress = ds.category("dress")
    assert dress.gallery_names == [f"d{i}" for i in range(6)]
    assert dress.gallery_paths[5].name == "d5.jpg" and dress.gallery_paths[0].name == "d0.png"
    assert dress.targets.tolist() == [1, 5, 1, 4]
    assert dress.reference_rows.tolist() == [0, 2, 3, 1]
    assert [p.name for p in dress.references] == ["d0.png", "d2.png", "d3.png", "d1.png"]
    # CLIP4Cir's join: first stripped of ".?, " and capitalised, " and ", second stripped
    assert dress.texts == ["Is red and has no sleeves", "Longer and and blue", "Is shorter and is green",
                           "More pink and with a belt"]
    assert (dress.exclude == -1).all() and dress.subsets is None
    assert dress.pair_ids.tolist() == [0, 1, 2, 3]
    files = [fiq_root / "captions/cap.dress.val.json", fiq_root / "image_splits/split.dress.val.json"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    assert dress.fingerprint() == h.hexdigest()
    assert ds.fingerprint() != dress.fingerprint() and len(ds) == 5
    with pytest.raises(UserError, match=r"cap\.toptee\.val\.json is missing"):
        ds.category("toptee")
    via_registry = load_dataset("fashioniq", fiq_root)
    assert via_registry.name == "fashioniq" and via_registry.fingerprint() == ds.fingerprint()


@pytest.mark.parametrize("layout", ["", "img_raw"])
def test_cirr_loader_excludes_the_reference_and_keeps_the_img_set(tmp_path, layout):
    ds = C.load_cirr(make_cirr(tmp_path, layout))
    names = [n for s in CIRR_SETS for n in s]
    assert ds.gallery_names == names
    assert ds.gallery_paths[3] == tmp_path / layout / "dev" / f"{names[3]}.png"
    assert ds.targets.tolist() == [1, 3, 6, 5]
    assert ds.exclude.tolist() == ds.reference_rows.tolist() == [0, 2, 4, 7]
    assert ds.pair_ids.tolist() == [100, 101, 102, 103]
    assert [sorted(r) for r in ds.subsets.tolist()] == [[1, 2, 3], [0, 1, 3], [5, 6, 7], [4, 5, 6]]
    assert ds.texts[1] == "Add a dog."
    test = C.load_cirr(make_cirr(tmp_path / "t", layout, split="test1"), "test1")
    assert (test.targets == -1).all() and not test.has_targets and test.subsets.shape == (4, 3)


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, pattern", [
    ("no-root", r"data root not found"),
    ("no-captions", r"FashionIQ captions: file not found: .*cap\.dress\.val\.json"),
    ("no-split-folder", r"image split: folder not found"),
    ("bad-entry", r"cap\.dress\.val\.json: entry 2 lacks 'candidate'"),
    ("empty-caption", r"cap\.dress\.val\.json: entry 1: an empty caption"),
    ("not-in-split", r"entry 0: the target image 'zz' is not in split\.dress\.val\.json"),
    ("missing-image", r"FashionIQ image 'd3' .* not found"),
    ("bad-json", r"cap\.dress\.val\.json: not valid JSON"),
])
def test_fashioniq_errors_name_the_file_and_entry(tmp_path, case, pattern):
    root = make_fashioniq(tmp_path / "fiq")
    cap = root / "captions/cap.dress.val.json"
    if case == "no-root":
        root = tmp_path / "nowhere"
    elif case == "no-captions":
        cap.unlink()
    elif case == "no-split-folder":
        for f in (root / "image_splits").iterdir():
            f.unlink()
        (root / "image_splits").rmdir()
    elif case == "bad-entry":
        _rewrite(cap, lambda d: d[2].pop("candidate"))
    elif case == "empty-caption":
        _rewrite(cap, lambda d: d[1].__setitem__("captions", ["ok", " \t "]))
    elif case == "not-in-split":
        _rewrite(cap, lambda d: d[0].__setitem__("target", "zz"))
    elif case == "missing-image":
        (root / "images/d3.png").unlink()
    elif case == "bad-json":
        cap.write_text("[{")
    with pytest.raises(UserError, match=pattern):
        C.load_fashioniq_category(root, "dress")


@pytest.mark.parametrize("case, pattern", [
    ("no-target", r"cap\.rc2\.val\.json: entry 1 lacks 'target_hard'"),
    ("member-not-in-split", r"entry 3: the image 'dev-9-9-img0' is not in split\.rc2\.val\.json"),
    ("target-outside-set", r"entry 0: the target 'dev-2-0-img0' is not among the img_set members"),
    ("empty-caption", r"entry 2: an empty caption"),
    ("missing-image", r"1 of 8 CIRR images .* are missing"),
    ("split-not-dict", r"expected a JSON object \{image name: relative path\}"),
])
def test_cirr_errors_name_the_file_and_entry(tmp_path, case, pattern):
    root = make_cirr(tmp_path)
    cap, split = root / "captions/cap.rc2.val.json", root / "image_splits/split.rc2.val.json"
    if case == "no-target":
        _rewrite(cap, lambda d: d[1].pop("target_hard"))
    elif case == "member-not-in-split":
        _rewrite(cap, lambda d: d[3]["img_set"]["members"].append("dev-9-9-img0"))
    elif case == "target-outside-set":
        _rewrite(cap, lambda d: d[0].__setitem__("target_hard", "dev-2-0-img0"))
    elif case == "empty-caption":
        _rewrite(cap, lambda d: d[2].__setitem__("caption", "   "))
    elif case == "missing-image":
        (root / "dev/dev-1-0-img1.png").unlink()
    elif case == "split-not-dict":
        split.write_text(json.dumps(["dev-0-0-img0"]))
    with pytest.raises(UserError, match=pattern):
        C.load_cirr(root)


# ------------------------------------------------------------------------------ metrics and submission

def _brute_cirr(scores, ds):
    """CIRR's metrics by hand: rank of the target with the reference removed, and within the subset."""
    ranks, sub_ranks = [], []
    for q in range(len(ds)):
        t, r = int(ds.targets[q]), int(ds.exclude[q])
        ranks.append(sum(1 for j in range(scores.shape[1]) if j not in (t, r) and scores[q, j] >= scores[q, t]))
        group = [int(j) for j in ds.subsets[q] if j >= 0 and j != r]
        sub_ranks.append(sum(1 for j in group if j != t and scores[q, j] >= scores[q, t]))
    out = {f"R@{k}": 100.0 * np.mean([x < k for x in ranks]) for k in (1, 5, 10, 50)}
    out.update({f"R_s@{k}": 100.0 * np.mean([x < k for x in sub_ranks]) for k in (1, 2, 3)})
    out["ranks"] = ranks
    return out


def test_cirr_metrics_on_the_loaded_rows_equal_a_brute_force_loop(cirr_root):
    ds = C.load_cirr(cirr_root)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        scores = torch.rand(len(ds), len(ds.gallery_names), generator=gen)
        scores[0, 0] = 5.0  # the reference of query 0 scores highest: removed, it must not count
        got = cirr_metrics(scores, torch.as_tensor(ds.targets), torch.as_tensor(ds.exclude), torch.as_tensor(ds.subsets))
        want = _brute_cirr(scores.numpy(), ds)
        for k, v in want.items():
            assert k == "ranks" or got[k] == pytest.approx(v), k
    # FashionIQ keeps the reference: a reference scoring above the target costs a rank
    fiq = C.load_fashioniq_category(make_fashioniq(cirr_root.parent / "fiq_m"), "dress")
    s = torch.zeros(len(fiq), 6)
    s[torch.arange(4), torch.as_tensor(fiq.targets)] = 1.0
    s[torch.arange(4), torch.as_tensor(fiq.reference_rows)] = 2.0
    assert fashioniq_metrics(s, torch.as_tensor(fiq.targets), ks=(1, 2))["R@1"] == 0.0
    assert fashioniq_metrics(s, torch.as_tensor(fiq.targets), ks=(1, 2))["R@2"] == 100.0


def test_cirr_submission_files_hold_the_ranked_names(tmp_path, cirr_root):
    ds = C.load_cirr(cirr_root)
    scores = torch.tensor([[9, 1, 2, 3, 8, 7, 6, 5], [1, 2, 9, 3, 4, 5, 6, 7], [3, 2, 1, 0, 9, 8, 7, 6],
                           [0, 1, 2, 3, 4, 5, 6, 9.]])
    rec_path, sub_path = write_cirr_submission(scores, ds.pair_ids.tolist(), ds.gallery_names, ds.reference_rows,
                                               ds.subsets, tmp_path / "r.json", tmp_path / "s.json")
    rec, sub = json.loads(rec_path.read_text()), json.loads(sub_path.read_text())
    assert rec["version"] == sub["version"] == "rc2"
    assert rec["metric"] == "recall" and sub["metric"] == "recall_subset"
    names = ds.gallery_names
    for q, pid in enumerate(ds.pair_ids.tolist()):
        ref = int(ds.reference_rows[q])
        order = [j for j in np.argsort(-scores[q].numpy(), kind="stable") if j != ref]
        assert rec[str(pid)] == [names[j] for j in order][:50]
        group = set(ds.subsets[q].tolist()) - {-1, ref}
        assert sub[str(pid)] == [names[j] for j in order if j in group][:3]
        assert names[ref] not in rec[str(pid)] and names[ref] not in sub[str(pid)]
    assert len(rec) == len(ds) + 2 and all(len(v) == 7 for k, v in rec.items() if k.isdigit())
    test = C.load_cirr(make_cirr(tmp_path / "test1", split="test1"), "test1")
    r_path, s_path = write_cirr_submission_for(test, torch.rand(4, 8), tmp_path / "sub", "tiny")
    assert r_path.name == "recall_submission_tiny.json" and s_path.name == "recall_subset_submission_tiny.json"
    written = json.loads(s_path.read_text())
    assert sorted(k for k in written if k.isdigit()) == ["100", "101", "102", "103"]
    assert all(len(v) == 3 and test.reference_names[int(k) - 100] not in v for k, v in written.items() if k.isdigit())
    with pytest.raises(ValueError, match="8 gallery columns but 7"):
        cirr_predictions(scores, ds.pair_ids.tolist(), names[:7], ds.reference_rows, ds.subsets)
    with pytest.raises(ValueError, match="3 pair ids"):
        cirr_predictions(scores, ds.pair_ids.tolist()[:3], names, ds.reference_rows, ds.subsets)
    with pytest.raises(ValueError, match="subsets must be"):
        cirr_predictions(scores, ds.pair_ids.tolist(), names, ds.reference_rows, ds.subsets[:2])


# ------------------------------------------------------------------------------ models

def _ln_names(prefix, layers, norms):
    return [f"{prefix}{i}.{n}.{p}" for i in range(layers) for n in norms for p in ("weight", "bias")]


def test_clip4cir_checkpoints_load_into_open_clip_with_the_composed_rule(real_model, clip_files):
    _, clip_state, comb_state = clip_files
    m = real_model
    assert m.query_modality == "image+text" and m.gallery_modality == "image" and m.embed_dim == 16
    own = m.towers.root.state_dict()
    assert all(torch.equal(own[k], v) for k, v in clip_state.items())
    assert all(torch.equal(m.combiner.state_dict()[k], v) for k, v in comb_state.items())
    assert m.towers.root.quick_gelu  # CLIP4Cir fine-tunes OpenAI's CLIP
    names = [n for n, _ in m.adaptable_parameters()]
    want = (["visual.ln_pre.weight", "visual.ln_pre.bias"] + _ln_names("visual.transformer.resblocks.", 2, ("ln_1", "ln_2"))
            + ["visual.ln_post.weight", "visual.ln_post.bias"] + _ln_names("transformer.resblocks.", 2, ("ln_1", "ln_2")))
    assert names == want
    trainable = {id(p) for _, p in m.adaptable_parameters()}
    everything = list(m.towers.root.parameters()) + list(m.gallery_image.parameters()) + list(m.combiner.parameters())
    assert all(p.requires_grad == (id(p) in trainable) for p in everything)
    assert not any(p.requires_grad for p in m.gallery_image.parameters())


def test_encodings_are_unit_norm_and_the_gallery_copy_is_frozen(real_model, fiq_root):
    m = real_model
    ds = C.load_fashioniq_category(fiq_root, "dress")
    arrays = [read_rgb(p) for p in ds.gallery_paths]
    batch = [(arrays[0], ds.texts[0]), (Image.open(ds.references[1]), ds.texts[1]), (str(ds.references[2]), ds.texts[2])]
    q = m.encode_query(batch)
    g = m.encode_gallery(ds.gallery_paths)
    assert q.shape == (3, 16) and g.shape == (6, 16) and q.requires_grad and not g.requires_grad
    assert torch.allclose(q.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(g.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(m.encode_gallery(np.stack(arrays)), g, atol=1e-5)
    # the combiner's formula, by hand, on the towers' raw features
    with torch.no_grad():
        pixels = m._pixels([arrays[0]])
        zi, zt = m.towers.image(pixels), m.towers.encode_text([ds.texts[0]])
        c = m.combiner
        t, i = F.relu(c.text_projection_layer(zt)), F.relu(c.image_projection_layer(zi))
        raw = torch.cat([t, i], -1)
        gate = torch.sigmoid(c.dynamic_scalar[3](F.relu(c.dynamic_scalar[0](raw))))
        want = F.normalize(c.output_layer(F.relu(c.combiner_layer(raw))) + gate * zt + (1 - gate) * zi, dim=-1)
    assert torch.allclose(q[:1].detach(), want, atol=1e-5)
    before = [p.detach().clone() for _, p in m.adaptable_parameters()]
    try:
        with torch.no_grad():
            for _, p in m.adaptable_parameters():
                p.add_(0.5)
        assert torch.allclose(m.encode_gallery(ds.gallery_paths), g, atol=1e-6)
        assert not torch.allclose(m.encode_query(batch), q, atol=1e-3)
    finally:
        with torch.no_grad():
            for (_, p), b in zip(m.adaptable_parameters(), before):
                p.copy_(b)
    with pytest.raises(UserError, match="composed query 1: the image must be uint8"):
        m.encode_query([(arrays[0], "x"), (arrays[0].astype(np.float32), "y")])


def test_training_free_fusions_and_hf_clip(tmp_path, clip_files, fiq_root):
    folder, _, _ = clip_files
    ds = C.load_fashioniq_category(fiq_root, "dress")
    pair = [(ds.references[0], ds.texts[0])]
    s = load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt", fusion="sum")
    i = load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt", fusion="interp", alpha=1.0)
    with torch.no_grad():
        zi = F.normalize(s.towers.image(s._pixels([ds.references[0]])), dim=-1)
        zt = F.normalize(s.towers.encode_text([ds.texts[0]]), dim=-1)
        assert torch.allclose(s.encode_query(pair), F.normalize(zi + zt, dim=-1), atol=1e-5)
        assert torch.allclose(i.encode_query(pair), zt, atol=1e-5)
    assert s.combiner is None and len(s.adaptable_parameters()) == 20
    # `--model openclip:ARCH --direction cir` is the same model, options passed through
    via_spec = load_model(f"openclip:{TINY_OPENCLIP}", "cir", folder / "tuned_clip.pt", fusion="sum")
    with torch.no_grad():
        assert torch.allclose(via_spec.encode_query(pair), s.encode_query(pair), atol=1e-6)
    with pytest.raises(UserError, match="does not serve"):
        load_model("hf-blip:whatever", "cir")
    hf = load_real_cir_model(f"hf-clip:{tiny_hf_clip(tmp_path / 'hf')}", fusion="interp", alpha=0.3,
                             target_pad=1.25)
    names = [n for n, _ in hf.adaptable_parameters()]
    assert names[:2] == ["vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias"]
    assert "vision_model.post_layernorm.weight" in names and "text_model.encoder.layers.1.layer_norm2.bias" in names
    assert not any("final_layer_norm" in n for n in names)
    wide = target_pad(Image.new("RGB", (40, 10), (255, 0, 0)))  # CLIP4Cir's TargetPad: to the ratio 1.25
    assert wide.size == (40, 32) and wide.getpixel((0, 0)) == (0, 0, 0) and wide.getpixel((20, 16)) == (255, 0, 0)
    assert target_pad(Image.new("RGB", (40, 36))).size == (40, 36)
    q, g = hf.encode_query(pair), hf.encode_gallery(ds.gallery_paths[:3])
    assert q.shape == (1, 16) and g.shape == (3, 16)
    assert torch.allclose(g.norm(dim=1), torch.ones(3), atol=1e-5)


def test_checkpoint_errors_are_one_line_user_errors(tmp_path, clip_files):
    folder, state, comb_state = clip_files
    bad = tmp_path / "wrong_keys.pt"
    torch.save({"epoch": 1, "model": comb_state}, bad)
    with pytest.raises(UserError, match=r"not a combiner checkpoint \(found epoch, model\)"):
        load_combiner(bad)
    torch.save({"Combiner": {"layer.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(UserError, match="not a CLIP4Cir combiner: no 'text_projection_layer.weight'"):
        load_combiner(bad)
    bare = tmp_path / "bare.pt"  # a bare state dict saved from DataParallel loads too
    torch.save({f"module.{k}": v for k, v in comb_state.items()}, bare)
    assert torch.equal(load_combiner(bare).output_layer.weight, comb_state["output_layer.weight"])
    wrong_dim = tmp_path / "comb32.pt"
    torch.save({"Combiner": Clip4CirCombiner(32, 8, 8).state_dict()}, wrong_dim)
    with pytest.raises(UserError, match="fuses 32-d features; this CLIP's are 16-d"):
        load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt", wrong_dim)
    short = tmp_path / "short_clip.pt"
    torch.save({"CLIP": {k: v for k, v in state.items() if k != "visual.proj"}}, short)
    with pytest.raises(UserError, match=r"'CLIP' weights do not match .*1 missing key \(e\.g\. visual\.proj\)"):
        load_real_cir_model(f"openclip:{TINY_OPENCLIP}", short, fusion="sum")
    with pytest.raises(UserError, match="fusion 'combiner' needs a combiner checkpoint"):
        load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt")
    with pytest.raises(UserError, match="not found"):
        load_combiner(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="unknown option"):
        load_real_cir_model(f"openclip:{TINY_OPENCLIP}", folder / "tuned_clip.pt", fusion="sum", colour="red")


# ------------------------------------------------------------------------------ families and the engine

def test_fashioniq_c_streams_corrupted_references_against_the_category_gallery(fiq_root):
    ds = C.load_fashioniq(fiq_root)
    assert "fashioniq-c/dress/fog/3" in list_benchmarks("fashioniq")
    assert "fashioniq-c/shirt/text/keyboard/2" in list_benchmarks("fashioniq")
    task = build_benchmark("fashioniq-c/dress/gaussian_noise/3", shift_seed=4, workers=0, dataset=ds)
    dress = ds.category("dress")
    assert task.direction == "cir" and task.relevance is None and len(task.gallery) == 6
    qs = task.query_sets[0]
    assert qs.ids.tolist() == dress.targets.tolist() == task.clean_queries.ids.tolist()
    for k in range(len(dress)):
        image, text = qs.items[k]
        assert text == dress.texts[k]
        assert np.array_equal(image, C.corrupted_reference(dress, int(dress.reference_rows[k]), "gaussian_noise", 3, 4))
        assert np.array_equal(task.clean_queries.items[k][0], read_rgb(dress.references[k]))
    text_task = build_benchmark("fashioniq-c/dress/text/char_swap/4", dataset=ds)
    want, _ = C.perturb_queries(dress, "char_swap", 4)
    assert [t for _, t in text_task.query_sets[0].items] == want != dress.texts
    with pytest.raises(UserError, match="toptee"):
        build_benchmark("fashioniq-c/toptee/fog/1", dataset=ds)


def test_cirr_benchmark_runs_through_the_engine_with_its_relevance(real_model, clip_files, cirr_root):
    ds = load_dataset("cirr", cirr_root)
    task = build_benchmark("cirr/clean", dataset=ds)
    # query ids are query indices; each query names its own reference, group and target row
    assert task.query_sets[0].ids.tolist() == task.clean_queries.ids.tolist() == list(range(len(ds)))
    assert task.relevance.exclude.tolist() == ds.exclude.tolist()
    assert task.relevance.positive.tolist() == ds.targets.tolist()
    assert task.relevance.subsets.tolist() == ds.subsets.tolist()
    # text weight 0: each query is its reference's own embedding, which scores highest unless it is removed
    image_only = load_real_cir_model(f"openclip:{TINY_OPENCLIP}", clip_files[0] / "tuned_clip.pt", fusion="interp",
                                     alpha=0.0)
    result = run_online(image_only, task, RunConfig("source"), progress=False)
    with torch.no_grad():
        q = image_only.encode_query([task.query_sets[0].items[k] for k in range(len(ds))])
        scores = q @ image_only.encode_gallery(ds.gallery_paths).T
    assert (scores.argmax(1) == torch.as_tensor(ds.reference_rows)).all()
    want = _brute_cirr(scores.numpy(), ds)
    assert want["R@5"] > 0
    for k in ("R@1", "R@5", "R@10", "R_s@1", "R_s@2", "R_s@3"):
        assert result.metrics[k] == pytest.approx(want[k]), k
    assert sorted(r for b in result.batches for r in b["ranks"]) == sorted(want["ranks"])
    # an adapting method changes the query-side LayerNorms only: the gallery copy and the combiner stay
    source = {n: p.detach().clone() for n, p in real_model.adaptable_parameters()}
    frozen = [p.detach().clone() for p in [*real_model.gallery_image.parameters(), *real_model.combiner.parameters()]]
    try:
        tent = run_online(real_model, build_benchmark("cirr-c/text/keyboard/5", dataset=ds),
                          parse_settings("tent", ["lr=0.01"]), progress=False, keep_adapted=True)
        assert tent.n_queries == len(ds)
        assert any(not torch.equal(p, source[n]) for n, p in real_model.adaptable_parameters())
        after = [*real_model.gallery_image.parameters(), *real_model.combiner.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(after, frozen))
    finally:
        with torch.no_grad():
            for n, p in real_model.adaptable_parameters():
                p.copy_(source[n])
    # queries that share a target but not a reference (real CIRR val): the benchmark builds, and each query
    # removes its own reference, online and offline, as a brute-force loop over the loaded rows does
    shared = load_dataset("cirr", make_cirr(cirr_root.parent / "shared", shared_target=True))
    assert len(np.unique(shared.targets)) < len(shared) and len(np.unique(shared.exclude)) == len(shared)
    ids, rel = relevance(shared)
    assert ids.tolist() == list(range(len(shared))) and rel.positive.tolist() == shared.targets.tolist()
    shared_task = build_benchmark("cirr/clean", dataset=shared)
    with torch.no_grad():
        q = image_only.encode_query([shared_task.query_sets[0].items[k] for k in range(len(shared))])
        scores = q @ image_only.encode_gallery(shared.gallery_paths).T
    want = _brute_cirr(scores.numpy(), shared)
    online = run_online(image_only, shared_task, RunConfig("source"), progress=False)
    offline, _ = evaluate_task(image_only, shared_task)
    for k in ("R@1", "R@5", "R@10", "R@50", "R_s@1", "R_s@2", "R_s@3"):
        assert online.metrics[k] == pytest.approx(want[k]) == offline.metrics[k], k
    assert sorted(r for b in online.batches for r in b["ranks"]) == sorted(want["ranks"])


# ------------------------------------------------------------------------------ materialize

def test_materialize_round_trips_through_the_loaders(tmp_path, fiq_root, cirr_root):
    out = tmp_path / "fiq_out"
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "fashioniq", "--data-root", str(fiq_root),
                              "--out", str(out), "--corruption", "gaussian_noise", "--severity", "2",
                              "--perturbation", "char_delete", "--level", "3", "--seed", "1"])
    assert res.exit_code == 0, res.output
    clean = C.load_fashioniq(fiq_root)
    shifted = C.load_fashioniq(out / "gaussian_noise" / "2")
    for cat in ("dress", "shirt"):
        a, b = clean.category(cat), shifted.category(cat)
        assert b.texts == a.texts and b.gallery_paths == a.gallery_paths  # the gallery stays the clean one
        for k in range(len(a)):
            assert b.references[k] != a.references[k]
            assert np.array_equal(read_rgb(b.references[k]),
                                  C.corrupted_reference(a, int(a.reference_rows[k]), "gaussian_noise", 2, 1))
        perturbed = C.load_fashioniq(out / "text" / "char_delete" / "3").category(cat)
        assert perturbed.texts == C.perturb_queries(a, "char_delete", 3, seed=1)[0]
        assert perturbed.references == a.references
    # the materialised root is a drop-in --data-root for the clean benchmark: the same queries as on the fly
    on_the_fly = build_benchmark("fashioniq-c/dress/gaussian_noise/2", shift_seed=1, workers=0, dataset=clean)
    dropped_in = build_benchmark("fashioniq/dress", dataset=load_dataset("fashioniq", out / "gaussian_noise" / "2"))
    for k in range(4):
        assert np.array_equal(on_the_fly.query_sets[0].items[k][0], dropped_in.query_sets[0].items[k][0])
    cout = tmp_path / "cirr_out"
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "cirr", "--data-root", str(cirr_root),
                              "--out", str(cout), "--corruption", "contrast", "--severity", "4",
                              "--perturbation", "word_swap", "--level", "7"])
    assert res.exit_code == 0, res.output
    a = C.load_cirr(cirr_root)
    b = C.load_cirr(cout / "contrast" / "4")
    assert b.gallery_paths == a.gallery_paths and b.fingerprint() != a.fingerprint()
    assert np.array_equal(read_rgb(b.references[2]), C.corrupted_reference(a, 4, "contrast", 4))
    assert C.load_cirr(cout / "text" / "word_swap" / "7").texts == C.perturb_queries(a, "word_swap", 7)[0]
    listed = runner.invoke(app, ["shifts", "list", "--dataset", "cirr", "keyboard/3"])
    assert listed.exit_code == 0 and listed.stdout.split() == ["cirr-c/text/keyboard/3"]
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "cirr", "--data-root", str(tmp_path / "none"),
                              "--out", str(cout), "--corruption", "fog"])
    assert res.exit_code == 2 and "CIRR data root not found" in res.output
