"""The embedded video–audio world's source model: a small dual encoder shaped like CAV-MAE (Gong et al.,
ICLR 2023).

Each modality has its own patch embedding and transformer blocks (``video_blocks`` / ``audio_blocks``);
then ``shared_blocks`` whose attention and MLP weights both modalities use but whose LayerNorms are the
modality's own (``ln_1_video`` / ``ln_1_audio``, ``ln_2_…``), as CAV-MAE's unified layers; then a final
per-modality LayerNorm over the mean-pooled tokens and a linear head into the joint space.  LayerNorm is
the only normalisation, so LayerNorm-only test-time adaptation reaches every stage of the query tower.

Inputs: a video clip is uint8 [T, S, S, 3] (the world's frames, or a whole multiple of S, area-downsampled);
audio is a 16 kHz float32 waveform, turned into Kaldi-compatible log-mel filterbanks
(:func:`qshift.data.audio_features.features`, 128 bins, 10 ms shift) normalised with the mean / std stored in
the model's config (measured on the training split by ``qshift train-av-model``).

Weights: ``qshift/models/weights/av_model.pt`` with its card ``av_model.md``
(:mod:`qshift.train.av_training` writes both).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qshift.data import audio_features
from qshift.errors import UserError
from qshift.models.checkpoint import half_state, read_checkpoint, save_checkpoint
from qshift.models.protocol import TwoTowerBase, layernorm_affine_parameters
from qshift.models.world_model import IMAGE_MEAN, IMAGE_STD, Block

SHIPPED_AV_MODEL = "av_model.pt"
#: the ``format`` tag of an AV checkpoint (:meth:`AVDualEncoder.save`)
AV_FORMAT = "qshift-av-v1"
#: the towers, by modality
AV_MODALITIES: tuple[str, ...] = ("video", "audio")


@dataclass
class AVModelConfig:
    frames: int = 8
    frame_size: int = 32
    video_patch: int = 2  # stride of the last stem conv, after two stride-2 convs: tokens per frame = (S/4/p)^2
    video_stem: tuple[int, int] = (32, 64)
    sample_rate: int = 16_000
    audio_frames: int = 96  # fbank frames (target length: padded / cropped)
    mel_bins: int = 128
    audio_patch: tuple[int, int] = (8, 16)  # (time, frequency) patch of the filterbank
    fbank_mean: float = 0.0  # the filterbank normalisation (audio_features.normalise)
    fbank_std: float = 1.0
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    video_depth: int = 3
    audio_depth: int = 3
    shared_depth: int = 1
    embed_dim: int = 128

    @property
    def video_grid(self) -> int:
        return self.frame_size // 4 // self.video_patch

    @property
    def audio_grid(self) -> tuple[int, int]:
        return self.audio_frames // self.audio_patch[0], self.mel_bins // self.audio_patch[1]


class SharedBlock(nn.Module):
    """A pre-LN transformer block whose attention and MLP weights all modalities share and whose two
    LayerNorms are each modality's own (``ln_1_<m>``, ``ln_2_<m>``), as CAV-MAE's unified layers."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, modalities: tuple[str, ...] = AV_MODALITIES) -> None:
        super().__init__()
        self.inner = Block(width, heads, mlp_ratio)
        del self.inner.ln_1, self.inner.ln_2  # replaced by the per-modality norms below
        for m in modalities:
            self.add_module(f"ln_1_{m}", nn.LayerNorm(width))
            self.add_module(f"ln_2_{m}", nn.LayerNorm(width))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        b = self.inner
        B, L, W = x.shape
        h = getattr(self, f"ln_1_{modality}")(x)
        q, k, v = b.qkv(h).view(B, L, 3, b.heads, W // b.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + b.proj(a.transpose(1, 2).reshape(B, L, W))
        return x + b.mlp(getattr(self, f"ln_2_{modality}")(x))


class AVDualEncoder(nn.Module):
    """Video and audio towers (modality-specific blocks, shared blocks with per-modality norms) sharing one
    normalised embedding space."""

    def __init__(self, cfg: AVModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AVModelConfig()
        w = cfg.width
        if cfg.frame_size % (4 * cfg.video_patch) or cfg.audio_frames % cfg.audio_patch[0] \
                or cfg.mel_bins % cfg.audio_patch[1]:
            raise ValueError("the patch sizes must divide the frame size / 4 and the filterbank's shape")
        c1, c2 = cfg.video_stem
        self.video_embed = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c2, w, cfg.video_patch, stride=cfg.video_patch))
        self.video_pos = nn.Parameter(torch.randn(1, 1, cfg.video_grid ** 2, w) * 0.02)
        self.video_time = nn.Parameter(torch.randn(1, cfg.frames, 1, w) * 0.02)
        self.audio_embed = nn.Conv2d(1, w, cfg.audio_patch, stride=cfg.audio_patch)
        ga, gf = cfg.audio_grid
        self.audio_pos = nn.Parameter(torch.randn(1, ga * gf, w) * 0.02)
        self.modality_video = nn.Parameter(torch.zeros(1, 1, w))
        self.modality_audio = nn.Parameter(torch.zeros(1, 1, w))
        self.video_blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.video_depth))
        self.audio_blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.audio_depth))
        self.shared_blocks = nn.ModuleList(SharedBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.shared_depth))
        self.norm_video = nn.LayerNorm(w)
        self.norm_audio = nn.LayerNorm(w)
        self.head_video = nn.Linear(w, cfg.embed_dim, bias=False)
        self.head_audio = nn.Linear(w, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- preprocessing ------------------------------------------------------------------
    def preprocess_video(self, clips: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 clips [B, T, H, W, 3] → normalised float [B, T, 3, S, S] (H = W = a whole multiple of S:
        area-downsampled)."""
        t = torch.as_tensor(np.asarray(clips)) if not isinstance(clips, torch.Tensor) else clips
        cfg = self.cfg
        if t.ndim == 4:
            t = t[None]
        if t.ndim != 5 or t.shape[-1] != 3 or t.shape[1] != cfg.frames:
            raise UserError(f"expected uint8 video clips [B, {cfg.frames}, H, W, 3], got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            raise UserError(f"expected uint8 video clips, got {t.dtype}")
        B, T, H, W, _ = t.shape
        S = cfg.frame_size
        if H != W or H % S:
            raise UserError(f"expected square frames of {S} px or a whole multiple of it, got {H}×{W}")
        x = t.reshape(B * T, H, W, 3).permute(0, 3, 1, 2).float().div_(255.0)
        if H != S:
            x = F.avg_pool2d(x, H // S)
        mean = torch.tensor(IMAGE_MEAN)[None, :, None, None]
        std = torch.tensor(IMAGE_STD)[None, :, None, None]
        return ((x - mean) / std).reshape(B, T, 3, S, S)

    def preprocess_audio(self, waveforms: np.ndarray | torch.Tensor) -> torch.Tensor:
        """float waveforms [B, N] at ``cfg.sample_rate`` → normalised filterbanks [B, audio_frames, mel_bins]."""
        a = waveforms.detach().cpu().numpy() if isinstance(waveforms, torch.Tensor) else np.asarray(waveforms)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise UserError(f"expected float audio waveforms [B, samples], got {a.dtype} {tuple(a.shape)}")
        fb = audio_features.features(a.astype(np.float32), self.cfg.audio_frames, self.cfg.fbank_mean,
                                     self.cfg.fbank_std, sample_rate=self.cfg.sample_rate,
                                     num_mel_bins=self.cfg.mel_bins)
        return torch.from_numpy(fb)

    # -- towers -------------------------------------------------------------------------
    def video_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised clips [B, T, 3, S, S] → tokens [B, T·grid², width] before the blocks."""
        B, T = x.shape[:2]
        if T != self.cfg.frames:
            raise UserError(f"expected {self.cfg.frames} frames per clip, got {T}")
        t = self.video_embed(x.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B·T, g², w]
        t = t.reshape(B, T, -1, t.shape[-1]) + self.video_pos + self.video_time
        return t.flatten(1, 2) + self.modality_video

    def audio_tokens(self, fb: torch.Tensor) -> torch.Tensor:
        """Normalised filterbanks [B, F, bins] → tokens [B, patches, width] before the blocks."""
        t = self.audio_embed(fb[:, None]).flatten(2).transpose(1, 2)
        return t + self.audio_pos + self.modality_audio

    def tower(self, modality: str, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens → the (unnormalised) embedding [B, embed_dim] through ``modality``'s blocks, the shared
        blocks with its norms, its final norm over the mean-pooled tokens and its head."""
        x = tokens
        for blk in (self.video_blocks if modality == "video" else self.audio_blocks):
            x = blk(x)
        for blk in self.shared_blocks:
            x = blk(x, modality)
        norm, head = (self.norm_video, self.head_video) if modality == "video" else (self.norm_audio, self.head_audio)
        return head(norm(x.mean(1)))

    def encode_video(self, clips: Any) -> torch.Tensor:
        """Clips (uint8 [B, T, H, W, 3], or already-normalised float [B, T, 3, S, S]) → normalised [B, d]."""
        x = clips if isinstance(clips, torch.Tensor) and clips.is_floating_point() else self.preprocess_video(clips)
        x = x.to(self.logit_scale.device)
        return F.normalize(self.tower("video", self.video_tokens(x)), dim=-1)

    def encode_audio(self, audio: Any) -> torch.Tensor:
        """Waveforms (float [B, N]) or normalised filterbanks (float torch [B, F, bins]) → normalised [B, d]."""
        fb = audio if isinstance(audio, torch.Tensor) and audio.ndim == 3 else self.preprocess_audio(audio)
        fb = fb.to(self.logit_scale.device)
        return F.normalize(self.tower("audio", self.audio_tokens(fb)), dim=-1)

    def encode(self, modality: str, batch: Any) -> torch.Tensor:
        return self.encode_video(batch) if modality == "video" else self.encode_audio(batch)

    def tower_parameters(self, modality: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything on ``modality``'s path (its embedding, blocks, norm and head, and
        the shared blocks' weights)."""
        own = ("video_", "modality_video", "norm_video", "head_video") if modality == "video" else \
              ("audio_", "modality_audio", "norm_audio", "head_audio")
        return [(n, p) for n, p in self.named_parameters() if n.startswith(own) or
                (n.startswith("shared_blocks.") and (".inner." in n or n.endswith(f"_{modality}.weight")
                                                      or n.endswith(f"_{modality}.bias")))]

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, card: dict | None = None, half: bool = True) -> None:
        """Save weights (fp16 by default) with the config and an optional model-card dict, atomically."""
        save_checkpoint(path, {"format": AV_FORMAT, "config": asdict(self.cfg),
                               "state_dict": half_state(self.state_dict(), half)}, card)

    @classmethod
    def load(cls, path: str | Path) -> "AVDualEncoder":
        """A model saved by :meth:`save`; a one-line UserError for a missing, unreadable or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"AV model weights not found: {path} (make them with `qshift train-av-model --out FILE`)")
        payload = read_checkpoint(path, "qshift AV model checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != AV_FORMAT:
            raise UserError(f"{path} is not a qshift AV model checkpoint (format {AV_FORMAT!r}, as "
                            "`qshift train-av-model` writes)")
        try:
            cfg = dict(payload["config"])
            for key in ("video_stem", "audio_patch"):
                cfg[key] = tuple(cfg[key])
            model = cls(AVModelConfig(**cfg))
            model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in payload["state_dict"].items()})
        except (TypeError, KeyError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: the checkpoint's tensors do not form an AV model ({first})") from e
        model.card = payload.get("card", {})
        return model.eval()


def shipped_av_weights_path() -> Path:
    return Path(str(resources.files("qshift.models") / "weights" / SHIPPED_AV_MODEL))


def load_av_encoder(path: str | Path | None = None) -> AVDualEncoder:
    """The shipped AV source model (or the one saved at ``path``), in eval mode, on CPU."""
    p = Path(path) if path is not None else shipped_av_weights_path()
    if path is None and not p.is_file():
        raise UserError(f"the shipped AV model is missing ({p}): reinstall qshift, or train one with "
                        "`qshift train-av-model`")
    return AVDualEncoder.load(p)


class AVRetrievalModel(TwoTowerBase):
    """RetrievalModel adapter over an :class:`AVDualEncoder` for ``v2a`` (video queries) or ``a2v``.

    Adaptable parameters — the query tower's LayerNorms, by name: for video queries every ``ln_1`` /
    ``ln_2`` of ``video_blocks``, the shared blocks' ``ln_1_video`` / ``ln_2_video`` and ``norm_video``; for
    audio queries the same on the audio side.  The shared blocks' attention / MLP weights and the other
    modality's norms are frozen (so the gallery's tower, encoded once, is untouched by adaptation)."""

    #: the protocol learning rate of this small model trained from scratch (as the world model's)
    default_lr: float = 1e-3

    def __init__(self, encoder: AVDualEncoder, query_modality: str = "video") -> None:
        if query_modality not in AV_MODALITIES:
            raise UserError(f"query_modality must be one of {', '.join(AV_MODALITIES)}, got {query_modality!r}")
        self.encoder = encoder.eval()
        self.query_modality = query_modality
        self.gallery_modality = "audio" if query_modality == "video" else "video"
        for p in encoder.parameters():
            p.requires_grad_(False)
        for _, p in self.adaptable_parameters():
            p.requires_grad_(True)

    def _encode(self, modality: str, batch: Any) -> torch.Tensor:
        return self.encoder.encode(modality, batch)

    @property
    def embed_dim(self) -> int:
        return self.encoder.cfg.embed_dim

    def query_tower(self) -> nn.Module:
        return self.encoder

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        m = self.query_modality
        out = layernorm_affine_parameters(getattr(self.encoder, f"{m}_blocks"), prefix=f"{m}_blocks")
        for i, blk in enumerate(self.encoder.shared_blocks):
            for ln in (f"ln_1_{m}", f"ln_2_{m}"):
                out += [(f"shared_blocks.{i}.{ln}.{k}", p) for k, p in getattr(blk, ln).named_parameters()]
        out += [(f"norm_{m}.{k}", p) for k, p in getattr(self.encoder, f"norm_{m}").named_parameters()]
        return out


def load_av_model(weights: str | Path | None = None, direction: str = "v2a",
                  device: str | torch.device = "cpu") -> AVRetrievalModel:
    """The RetrievalModel for ``direction`` (``v2a`` / ``a2v``) over the shipped AV model or ``weights``."""
    from qshift.data.task import get_direction

    d = get_direction(direction)
    if d.task != "video-audio":
        raise UserError(f"direction {direction!r} is not a video-audio direction (v2a, a2v)")
    return AVRetrievalModel(load_av_encoder(weights).to(device), d.query)
