"""Real-data video–audio retrieval: CAV-MAE checkpoints (qshift's own encoder, CAV-MAE's parameter names), the
READ / CAV-MAE JSON datasets with READ's -C layout, and the VGGSound-C / KS50-C families (v2a, a2v)."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sf = pytest.importorskip("soundfile")

from qshift.bench import av_real_families  # noqa: E402,F401  (registers the families)
from qshift.bench.evaluate import evaluate_task  # noqa: E402
from qshift.bench.registry import build_benchmark, list_benchmarks  # noqa: E402
from qshift.data import av_datasets as A  # noqa: E402
from qshift.engine import RunConfig, parse_settings, run_online  # noqa: E402
from qshift.errors import UserError  # noqa: E402
from qshift.models.cavmae import (CAVMAEConfig, CAVMAEEncoder, CAVMAERetrievalModel, cavmae_frame,  # noqa: E402
                                  load_cavmae)
from qshift.models.protocol import check_retrieval_model  # noqa: E402

N_CLIPS = 5
TINY = CAVMAEConfig(embed_dim=32, depth_a=1, depth_v=1, depth_u=1, num_heads=2, mlp_hidden=64, audio_length=64,
                    image_size=32)
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 200)]
#: what a path in READ's released JSONs looks like: its authors' machine
FOREIGN = "/xlearning/mouxing/datasets/ImageAudio/VGGSound"


def _frame(k: int, size=(40, 36), invert: bool = False) -> Image.Image:
    c = COLOURS[k]
    im = Image.new("RGB", size, tuple(255 - x for x in c) if invert else c)
    im.paste(COLOURS[(k + 2) % len(COLOURS)], (4 + 3 * k, 4, 14 + 3 * k, 20))
    return im


def _tone(k: int, rate: int = 16000, seconds: float = 0.7) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * 300 * (k + 1) * t)).astype(np.float32)


def make_read(root: Path) -> Path:
    """READ's layout under ``root``: image_mulframe_test/frame_<i>/<id>.jpg (clip 3 lacks frame_5: it falls back
    to frame_4), audio_test/<id>.wav (clip 2 at 22.05 kHz stereo), json/clean/severity_0.json with the authors'
    absolute paths, READ's video -C JSON + frames for gaussian_noise 5, and audio-C files for rain 3 in the
    sibling ``audio_test-C`` folder (no JSON)."""
    ids = [f"clip{k}_{10 * k}" for k in range(N_CLIPS)]
    for k, vid in enumerate(ids):
        for f in (4, 5):
            if k == 3 and f == 5:
                continue
            p = root / "image_mulframe_test" / f"frame_{f}" / f"{vid}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            _frame(k).save(p, quality=95)
        wav = root / "audio_test" / f"{vid}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        if k == 2:
            w = _tone(k, 22050)
            sf.write(wav, np.stack([w, -w], 1), 22050)
        else:
            sf.write(wav, _tone(k), 16000, subtype="FLOAT")
        c = root / "image_mulframe_test-C" / "gaussian_noise" / "severity_5" / "frame_5" / f"{vid}.jpg"
        c.parent.mkdir(parents=True, exist_ok=True)
        _frame(k, (32, 32), invert=True).save(c, quality=95)
        a = root / "audio_test-C" / "rain" / "severity_3" / f"{vid}.wav"
        a.parent.mkdir(parents=True, exist_ok=True)
        sf.write(a, _tone(k) * 0.5 + 0.01, 16000, subtype="FLOAT")
    entry = lambda vid, vp: {"video_id": vid, "wav": f"{FOREIGN}/audio_test/{vid}.wav", "video_path": vp,  # noqa: E731
                             "labels": "vgg_1"}
    clean = {"data": [entry(v, f"{FOREIGN}/image_mulframe_test") for v in ids]}
    _write(root / "json" / "clean" / "severity_0.json", clean)
    c_entries = [entry(v, f"{FOREIGN}/image_mulframe_test-C/gaussian_noise/severity_5/") for v in ids]
    _write(root / "json" / "video" / "gaussian_noise" / "severity_5.json", {"data": c_entries[::-1]})  # shuffled
    return root


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)


@pytest.fixture(scope="module")
def read_root(tmp_path_factory) -> Path:
    return make_read(tmp_path_factory.mktemp("read"))


@pytest.fixture(scope="module")
def ds(read_root):
    return A.load_av_dataset("vggsound", read_root, read_root / "json" / "clean" / "severity_0.json")


def _checkpoint(state: dict, path: Path) -> Path:
    """``state`` as CAV-MAE saves it: DataParallel's module. prefix, plus MAE-decoder / classifier / READ keys."""
    extra = {"decoder_embed.weight": torch.zeros(4, 32), "mask_token": torch.zeros(1, 1, 4),
             "mlp_head.1.weight": torch.zeros(3, 32), "blocks_u.0.attn.q.weight": torch.zeros(32, 32)}
    torch.save({f"module.{k}": v for k, v in {**state, **extra}.items()}, path)
    return path


@pytest.fixture(scope="module")
def trained(ds, tmp_path_factory) -> Path:
    """A tiny CAV-MAE trained contrastively on the fixture's clean pairs (all parameters), saved as CAV-MAE
    saves one: it retrieves every clip's own track."""
    torch.manual_seed(0)
    enc = CAVMAEEncoder(TINY)
    rm = CAVMAERetrievalModel(enc, "v2a")
    video, _ = rm.video_input(ds.videos(range(len(ds))))
    audio = rm.audio_input(ds.audios(range(len(ds))))
    enc.train()
    for p in enc.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    labels = torch.arange(len(ds))
    for _ in range(60):
        zv = F.normalize(enc.forward_video(video), dim=-1)
        za = F.normalize(enc.forward_audio(audio), dim=-1)
        logits = zv @ za.T / 0.05
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _checkpoint(enc.state_dict(), tmp_path_factory.mktemp("ckpt") / "audio_model.pth")


# ------------------------------------------------------------------------------------ the checkpoint

#: CAV-MAE's names (src/models/cav_mae.py) for a 1 + 1 + 1 block encoder
CAVMAE_NAMES = {"patch_embed_a.proj.weight", "patch_embed_v.proj.bias", "pos_embed_a", "pos_embed_v", "modality_a",
                "modality_v", "blocks_a.0.norm1.weight", "blocks_v.0.attn.qkv.weight", "blocks_v.0.attn.proj.bias",
                "blocks_u.0.norm1_a.weight", "blocks_u.0.norm2_v.bias", "blocks_u.0.norm1.weight",
                "blocks_u.0.mlp.fc1.weight", "blocks_u.0.mlp.fc2.bias", "norm_a.weight", "norm_v.bias", "norm.weight"}


def test_checkpoint_loads_with_cavmae_names_and_sizes_off_the_state_dict(trained, caplog):
    with caplog.at_level(logging.INFO, logger="qshift.models.cavmae"):
        model = load_cavmae(trained, "v2a", num_heads=2)
    assert model.config == TINY
    assert CAVMAE_NAMES <= set(model.encoder.state_dict())
    assert "ignored 4 key(s)" in caplog.text  # decoder, mask token, classifier, READ's fusion copy
    saved = torch.load(trained, weights_only=True)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, saved[f"module.{k}"]), k
    check_retrieval_model(model, "cavmae", "video")
    assert (model.query_modality, model.gallery_modality) == ("video", "audio")


@pytest.mark.parametrize("direction, side, other", [("v2a", "v", "a"), ("a2v", "a", "v")])
def test_adaptable_parameters_are_the_query_pass_layernorms(trained, ds, direction, side, other):
    model = load_cavmae(trained, direction, num_heads=2)
    names = [n for n, _ in model.adaptable_parameters()]
    assert names == [f"blocks_{side}.0.norm1.weight", f"blocks_{side}.0.norm1.bias",
                     f"blocks_{side}.0.norm2.weight", f"blocks_{side}.0.norm2.bias",
                     f"blocks_u.0.norm1_{side}.weight", f"blocks_u.0.norm1_{side}.bias",
                     f"blocks_u.0.norm2_{side}.weight", f"blocks_u.0.norm2_{side}.bias",
                     f"norm_{side}.weight", f"norm_{side}.bias"]
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    # differentiable only through them: a loss on the queries reaches every adaptable parameter, nothing else
    q = ds.videos(range(3)) if side == "v" else ds.audios(range(3))
    z = model.encode_query(q)
    assert z.shape == (3, 32) and z.requires_grad
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    z.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.adaptable_parameters())
    assert all(p.grad is None for n, p in model.encoder.named_parameters() if n not in set(names))
    # the gallery pass is gradient-free, and moving every adaptable parameter leaves it where it was
    g_items = ds.audios(range(3)) if side == "v" else ds.videos(range(3))
    g = model.encode_gallery(g_items)
    assert not g.requires_grad and torch.allclose(g.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        for _, p in model.adaptable_parameters():
            p.add_(0.3)
    assert torch.equal(model.encode_gallery(g_items), g)
    assert not torch.allclose(model.encode_query(q).detach(), z.detach())


def test_inputs_frame_choice_and_precomputed_filterbanks(trained, ds):
    model = load_cavmae(trained, "v2a", num_heads=2)
    clips = np.stack(ds.videos(range(2), size=48))  # [2, 1, 48, 48, 3]
    ten = np.repeat(clips, 10, axis=1)
    ten[:, 5] = clips[:, 0][:, ::-1]  # CAV-MAE encodes frame 5 of 10: only it counts
    ten[:, :5] = 0
    with torch.no_grad():
        a = model.encode_query(ten)
        b = model.encode_query([c[::-1] for c in clips[:, 0]])  # a list of single frames [H, W, 3]
    assert torch.allclose(a, b, atol=1e-5)
    x = cavmae_frame(np.zeros((36, 40, 3), np.uint8), 32)
    assert x.shape == (3, 32, 32) and np.allclose(x[0], -0.485 / 0.229, atol=1e-5)
    from qshift.data.audio_features import features

    fb = features(ds.audios(range(3)), target_length=64)
    with torch.no_grad():
        assert torch.allclose(model.encode_gallery(fb), model.encode_gallery(ds.audios(range(3))), atol=1e-6)
    with pytest.raises(UserError, match=r"\[B, 64, 128\]"):
        model.encode_gallery(np.zeros((2, 32, 128), np.float32))
    with pytest.raises(UserError, match="uint8 clip"):
        model.encode_query([np.zeros((1, 8, 8, 3), np.float32)])
    mean = load_cavmae(trained, "v2a", num_heads=2, frame_pool="mean")
    with torch.no_grad():
        two = mean.encode_query(np.concatenate([clips, clips], axis=1))
        assert torch.allclose(two, mean.encode_query(clips), atol=1e-5)


def test_checkpoint_errors_are_one_line_user_errors(trained, tmp_path):
    state = {k[len("module."):]: v for k, v in torch.load(trained, weights_only=True).items()}
    del state["blocks_v.0.norm1.weight"]
    with pytest.raises(UserError, match=r"lacks CAV-MAE encoder weights: blocks_v\.0\.norm1\.weight"):
        load_cavmae(_checkpoint(state, tmp_path / "a.pth"), "v2a", num_heads=2)
    with pytest.raises(UserError, match="not a CAV-MAE checkpoint: no 'patch_embed_a.proj.weight'"):
        load_cavmae(_checkpoint({"w": torch.zeros(2)}, tmp_path / "b.pth"), "v2a")
    with pytest.raises(UserError, match="not a multiple of 64; pass num_heads="):
        load_cavmae(trained, "a2v")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_cavmae(tmp_path / "none.pth", "v2a")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a readable CAV-MAE checkpoint"):
        load_cavmae(tmp_path / "junk.pth", "v2a")
    with pytest.raises(UserError, match="v2a and a2v"):
        load_cavmae(trained, "i2t", num_heads=2)


# ------------------------------------------------------------------------------------ the dataset

def test_loader_rebases_foreign_paths_falls_back_to_earlier_frames_and_resamples(ds, read_root):
    assert len(ds) == N_CLIPS and ds.ids[0] == "clip0_0" and ds.labels[0] == "vgg_1"
    assert ds.wavs[0] == read_root / "audio_test" / "clip0_0.wav"
    assert ds.video_paths[0] == read_root / "image_mulframe_test"
    assert ds.json_root == read_root / "json" and len(ds.fingerprint()) == 64
    assert ds.frame_path(3, 5).parent.name == "frame_4"  # CAV-MAE's fallback to the highest earlier frame
    clips = ds.videos([0, 3])
    assert clips[0].shape == (1, 36, 40, 3) and clips[0].dtype == np.uint8
    assert ds.videos([0], size=32).shape == (1, 1, 32, 32, 3)
    w = ds.audios([2, 0])
    assert w[0].dtype == np.float32 and abs(len(w[0]) - len(w[1])) <= 1  # 22.05 kHz stereo → 16 kHz mono
    assert np.allclose(w[1], _tone(0), atol=1e-6)


def test_loader_errors_name_the_file(read_root, tmp_path):
    clean = read_root / "json" / "clean" / "severity_0.json"
    bad = tmp_path / "bad.json"
    _write(bad, {"clips": []})
    with pytest.raises(UserError, match='with a "data" list'):
        A.load_av_dataset("vggsound", read_root, bad)
    _write(bad, "{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        A.load_av_dataset("vggsound", read_root, bad)
    entries = json.loads(clean.read_text())["data"]
    _write(bad, {"data": [{k: v for k, v in entries[0].items() if k != "wav"}]})
    with pytest.raises(UserError, match="entry 0 lacks 'wav'"):
        A.load_av_dataset("vggsound", read_root, bad)
    _write(bad, {"data": [entries[0], {**entries[1], "wav": f"{FOREIGN}/audio_test/gone.wav"}]})
    with pytest.raises(UserError, match=r"1 of 2 wav files .* wav not found: .*gone\.wav"):
        A.load_av_dataset("vggsound", read_root, bad)
    _write(bad, {"data": [{**entries[0], "video_id": "nothing"}]})
    with pytest.raises(UserError, match=r"no frame of video 'nothing'"):
        A.load_av_dataset("vggsound", read_root, bad)
    lazy = A.load_av_dataset("vggsound", read_root, bad, check_files=False)
    with pytest.raises(UserError, match=r"no frame of video 'nothing'.*frame_5/nothing\.jpg"):
        lazy.video(0)
    with pytest.raises(UserError, match="no annotation found"):
        A.load_av_dataset("ks50", tmp_path)
    with pytest.raises(UserError, match="unknown video-audio dataset"):
        A.load_av_dataset("coco", read_root)


# ------------------------------------------------------------------------------------ the families

def test_families_list_and_build_one_to_one_tasks(ds):
    pytest.importorskip("qshift.shifts.audio")  # the a2v-c family lists its corruptions from it
    names = list_benchmarks("vggsound")
    assert {"vggsound/v2a/clean", "vggsound/a2v/clean", "vggsound-c/v2a/gaussian_noise/5"} <= set(names)
    task = build_benchmark("vggsound/v2a/clean", dataset=ds)
    assert (task.direction, task.query_modality, task.gallery_modality) == ("v2a", "video", "audio")
    assert task.query_sets[0].ids.tolist() == task.gallery_ids.tolist() == list(range(N_CLIPS))
    assert task.relevance is None and task.meta["shift_source"] == "clean"
    assert task.query_sets[0].items[0].shape == (1, 36, 40, 3) and len(task.gallery[1:3]) == 2
    assert build_benchmark("vggsound/a2v/clean", dataset=ds).gallery[0].shape == (1, 36, 40, 3)
    with pytest.raises(ValueError, match="belongs to dataset 'ks50'"):
        build_benchmark("ks50/v2a/clean", dataset=ds)


def test_read_c_files_are_read_matched_by_video_id(ds, read_root):
    task = build_benchmark("vggsound-c/v2a/gaussian_noise/5", dataset=ds)
    assert task.meta["shift_source"] == "read-c" and task.query_sets[0].domain == "gaussian_noise-5"
    for k in range(N_CLIPS):  # READ's JSON lists them in reverse; each query is its own clip's -C frame
        want = np.asarray(Image.open(read_root / "image_mulframe_test-C" / "gaussian_noise" / "severity_5" /
                                     "frame_5" / f"{ds.ids[k]}.jpg").convert("RGB"))
        assert np.array_equal(task.query_sets[0].items[k][0], want)
    assert np.array_equal(task.clean_queries.items[0], ds.video(0))
    files_only = A.load_av_dataset("vggsound", read_root, ds.annotation, check_files=False, shift_source="files")
    with pytest.raises(UserError, match="no READ -C data for video fog severity 2"):
        build_benchmark("vggsound-c/v2a/fog/2", dataset=files_only)
    # the sibling audio_test-C folder, without a JSON (the dataset finds it; the family needs the audio names)
    rain = ds.corrupted_source("audio", "rain", 3)
    assert rain is not None and rain.wavs[1] == read_root / "audio_test-C" / "rain" / "severity_3" / f"{ds.ids[1]}.wav"
    assert ds.corrupted_source("audio", "wind", 3) is None
    pytest.importorskip("qshift.shifts.audio")
    audio = build_benchmark("vggsound-c/a2v/rain/3", dataset=ds)
    assert audio.meta["shift_source"] == "read-c"
    assert np.allclose(audio.query_sets[0].items[1], _tone(1) * 0.5 + 0.01, atol=1e-6)


def test_on_the_fly_video_corruption_is_reads_crop_then_corrupt_clip(ds):
    from qshift.shifts.video import corrupt_clip

    task = build_benchmark("vggsound-c/v2a/gaussian_noise/2", shift_seed=3, dataset=ds)
    assert task.meta["shift_source"] == "on-the-fly"
    item = task.query_sets[0].items[1]
    assert item.shape == (1, 224, 224, 3)
    want = corrupt_clip(np.stack([A.read_crop(f) for f in ds.video(1)]), "gaussian_noise", 2, item_id=1, seed=3)
    assert np.array_equal(item, want)
    assert np.array_equal(build_benchmark("vggsound-c/v2a/gaussian_noise/2", shift_seed=3, dataset=ds)
                          .query_sets[0].items[1], item)


def test_on_the_fly_audio_corruption(ds):
    audio = pytest.importorskip("qshift.shifts.audio")
    task = build_benchmark("vggsound-c/a2v/gaussian_noise/4", shift_seed=1, dataset=ds)
    assert task.meta["shift_source"] == "on-the-fly"
    want = audio.corrupt_audio(ds.audio(0), "gaussian_noise", 4, item_id=0, seed=1, noise_dir=ds.noise_dir)
    assert np.allclose(task.query_sets[0].items[0], want)


@pytest.mark.parametrize("direction", ["v2a", "a2v"])
def test_trained_fixture_retrieves_and_adapts_through_the_engine(trained, ds, direction):
    model = load_cavmae(trained, direction, num_heads=2)
    task = build_benchmark(f"vggsound/{direction}/clean", dataset=ds)
    result = run_online(model, task, RunConfig("source"), progress=False)
    assert result.n_queries == N_CLIPS and result.metrics["R@1"] == pytest.approx(100.0)
    offline, _ = evaluate_task(model, task)
    assert offline is not None
    if direction == "a2v":
        return
    source = {n: p.detach().clone() for n, p in model.adaptable_parameters()}
    frozen = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if n not in source}
    gallery = model.encode_gallery(ds.audios(range(N_CLIPS)))
    tent = run_online(model, build_benchmark("vggsound-c/v2a/gaussian_noise/5", dataset=ds),
                      parse_settings("tent", ["lr=0.01"]), progress=False, keep_adapted=True)
    assert tent.n_queries == N_CLIPS
    assert any(not torch.equal(p, source[n]) for n, p in model.adaptable_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.encoder.named_parameters() if n in frozen)
    assert torch.equal(model.encode_gallery(ds.audios(range(N_CLIPS))), gallery)
