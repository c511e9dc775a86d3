"""The video-audio world's model (qshift.models.av_model): its adaptable-parameter rule by name, gradients,
persistence and errors, and DeYO's shuffles for video and audio queries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qshift.errors import UserError
from qshift.methods.confidence_baselines import shuffle_queries
from qshift.models.av_model import AVDualEncoder, AVModelConfig, AVRetrievalModel, load_av_model

TINY = AVModelConfig(width=32, heads=2, video_depth=1, audio_depth=1, shared_depth=1, embed_dim=16,
                     video_stem=(8, 16))


def _clips(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, TINY.frames, TINY.frame_size, TINY.frame_size, 3),
                                                dtype=np.uint8)


def _fbanks(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, TINY.audio_frames, TINY.mel_bins))).float()


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_adaptable_parameters_are_the_query_towers_layernorms(modality):
    model = AVRetrievalModel(AVDualEncoder(TINY), modality)
    names = [n for n, _ in model.adaptable_parameters()]
    assert names == [f"{modality}_blocks.0.ln_1.weight", f"{modality}_blocks.0.ln_1.bias",
                     f"{modality}_blocks.0.ln_2.weight", f"{modality}_blocks.0.ln_2.bias",
                     f"shared_blocks.0.ln_1_{modality}.weight", f"shared_blocks.0.ln_1_{modality}.bias",
                     f"shared_blocks.0.ln_2_{modality}.weight", f"shared_blocks.0.ln_2_{modality}.bias",
                     f"norm_{modality}.weight", f"norm_{modality}.bias"]
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == set(names)  # the shared attention / MLP and the other modality stay frozen


def test_query_gradients_reach_only_the_adaptable_parameters():
    model = AVRetrievalModel(AVDualEncoder(TINY), "video")
    z = model.encode_query(_clips())
    g = model.encode_gallery(_fbanks())
    assert z.shape == (3, 16) and g.shape == (3, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not g.requires_grad
    (z @ g.T).sum().backward()
    grads = {n: p.grad for n, p in model.encoder.named_parameters() if p.grad is not None}
    assert set(grads) == {n for n, _ in model.adaptable_parameters()}
    assert all(float(v.abs().sum()) > 0 for v in grads.values())


def test_audio_queries_from_waveforms():
    cfg = AVModelConfig(width=32, heads=2, video_depth=1, audio_depth=1, shared_depth=1, embed_dim=16)
    model = AVRetrievalModel(AVDualEncoder(cfg), "audio")
    t = np.arange(16_000) / 16_000
    waves = np.stack([np.sin(2 * np.pi * f * t) * 0.3 for f in (220.0, 440.0)]).astype(np.float32)
    z = model.encode_query(waves)
    assert z.shape == (2, 16) and torch.isfinite(z).all()
    assert float((z[0] - z[1]).detach().abs().sum()) > 0  # two tones, two embeddings


def test_save_load_round_trip(tmp_path):
    enc = AVDualEncoder(TINY)
    path = tmp_path / "av.pt"
    enc.save(path, {"note": "test"}, half=False)
    back = AVDualEncoder.load(path)
    clips = _clips()
    assert torch.allclose(enc.eval().encode_video(clips), back.encode_video(clips), atol=1e-6)
    assert back.card == {"note": "test"}
    model = load_av_model(path, "a2v")
    assert model.query_modality == "audio" and model.gallery_modality == "video"


def test_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        AVDualEncoder.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"config": {}}, bad)
    with pytest.raises(UserError, match="not a qshift AV model"):
        AVDualEncoder.load(bad)
    enc = AVDualEncoder(TINY)
    with pytest.raises(UserError, match="video clips"):
        enc.encode_video(np.zeros((2, 3, 32, 32, 3), np.uint8))  # 3 frames, not 8
    with pytest.raises(UserError, match="uint8"):
        enc.encode_video(np.zeros((2, TINY.frames, 32, 32, 3), np.int32))
    with pytest.raises(UserError, match="float audio"):
        enc.encode_audio(np.zeros((2, 100), np.int16))
    with pytest.raises(UserError, match="video-audio direction"):
        load_av_model(None, "i2t")


def test_deyo_shuffles_video_frames_and_audio_segments():
    gen = torch.Generator().manual_seed(0)
    clips = _clips(2)
    out = shuffle_queries(clips, 4, gen)
    assert out.shape == clips.shape and out.dtype == clips.dtype
    for b in range(2):
        for t in range(TINY.frames):  # each frame keeps its pixels, rearranged
            assert sorted(out[b, t].reshape(-1).tolist()) == sorted(clips[b, t].reshape(-1).tolist())
    assert not np.array_equal(out, clips)
    waves = np.random.default_rng(1).normal(size=(2, 1600)).astype(np.float32)
    shuffled = shuffle_queries(waves, 2, gen)  # 4 segments of 400 samples
    assert shuffled.shape == waves.shape and not np.array_equal(shuffled, waves)
    segs = {tuple(s) for s in waves[0].reshape(4, 400).round(6).tolist()}
    assert {tuple(s) for s in shuffled[0].reshape(4, 400).round(6).tolist()} == segs
