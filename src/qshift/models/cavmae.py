"""CAV-MAE (Gong et al., ICLR 2023) as a video–audio retrieval backbone (directions ``v2a`` and ``a2v``).

:class:`CAVMAEEncoder` is qshift's own module of CAV-MAE's encoder, with CAV-MAE's parameter names, so the
checkpoints of ``YuanGongND/cav-mae`` (the pre-trained ``CAVMAE`` and the fine-tuned ``CAVMAEFT``, e.g.
``cav-mae-scale++.pth``) and READ's source models (``XLearning-SCU/2024-ICLR-READ``: ``vgg_65.5.pth``,
``cav_mae_ks50.pth``) load as they are, after their DataParallel ``module.`` prefix is dropped:

* ``patch_embed_a.proj`` — 1 channel, 16×16 patches over the [target_length × 128] filterbank, which CAV-MAE
  transposes to [128 × target_length] first: an 8 × (target_length / 16) grid, flattened frequency-major;
* ``patch_embed_v.proj`` — 3 channels, 16×16 patches over one 224-px frame (14 × 14);
* ``pos_embed_a`` / ``pos_embed_v`` ([1, N, d]) and ``modality_a`` / ``modality_v`` ([1, 1, d]), added to the
  patch tokens (no class token);
* ``blocks_a`` / ``blocks_v`` — the modality-specific blocks (11 in CAV-MAE), run with their ``norm1`` /
  ``norm2``; ``blocks_u`` — the shared block(s) (1), whose attention and MLP both modalities share but which
  run each modality through its own LayerNorms (``norm1_a`` / ``norm2_a`` or ``norm1_v`` / ``norm2_v``);
* ``norm_a`` / ``norm_v`` — the final norms, then the mean over the tokens.  Nothing is projected: CAV-MAE's
  retrieval (``src/retrieval.py``, ``forward_feat``) compares the L2-normalised mean-pooled tokens.

Every block carries all six LayerNorms (CAV-MAE's ``Block``), and the encoder the unified ``norm``, which the
joint audio-visual pass uses and retrieval does not; they are loaded, never used here.  Sizes (width, depths,
MLP width, patch size, the audio length and image size behind the positional embeddings) are read off the
state dict; the number of heads is not in it (``num_heads``, default width / 64: 12 for CAV-MAE's 768).

Inputs (see :class:`CAVMAERetrievalModel`): video items are uint8 clips [T, H, W, 3] (a batch [B, T, H, W, 3]
or a list of clips), of which the middle frame ``T // 2`` is encoded — CAV-MAE's and READ's evaluation frame
(``frame_use = 5`` of 10 extracted frames) — after CAV-MAE's eval transform (shorter side resized to the
model's image size, bicubic; centre crop; ImageNet mean / std).  Audio items are float waveforms in [-1, 1]
at 16 kHz ([B, N] or a list of 1-D arrays), turned into CAV-MAE's normalised filterbank by
:func:`qshift.data.audio_features.features`; a float [B, target_length, 128] array is taken as filterbanks
already normalised.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from qshift.data.task import DIRECTIONS
from qshift.errors import UserError
from qshift.models.checkpoint import read_checkpoint
from qshift.models.dual_tower import AUTOCAST, freeze_except_adaptable, resolve_device
from qshift.models.protocol import TwoTowerBase

log = logging.getLogger(__name__)

#: CAV-MAE's frame normalisation (``src/dataloader.py``: ``T.Normalize``), ImageNet's
IMAGE_MEAN: tuple[float, float, float] = (0.4850, 0.4560, 0.4060)
IMAGE_STD: tuple[float, float, float] = (0.2290, 0.2240, 0.2250)
#: CAV-MAE's filterbank has 128 mel bins: the audio patch grid is 128 / patch (8) bins high
NUM_MEL_BINS = 128
#: how a clip of several frames is encoded: its middle frame (CAV-MAE) or the mean over every frame's features
FRAME_POOLS: tuple[str, ...] = ("middle", "mean")
#: checkpoint keys of the parts retrieval does not use: the MAE decoder (``CAVMAE``) and the classifier
#: (``CAVMAEFT``'s ``mlp_head``)
IGNORED_PREFIXES: tuple[str, ...] = ("decoder_", "mask_token", "mlp_head.")
#: READ's fusion block copies ``attn.qkv`` into ``attn.q`` / ``attn.k`` / ``attn.v`` for the joint pass (more
#: than 512 tokens); the single-modality passes read ``attn.qkv``, so these are ignored
_READ_FUSION_KEY = re.compile(r"blocks_u\.\d+\.attn\.[qkv]\.(weight|bias)\Z")
#: the keys the sizes are read from
_SIZE_KEYS: tuple[str, ...] = ("patch_embed_a.proj.weight", "patch_embed_v.proj.weight", "pos_embed_a",
                               "pos_embed_v", "blocks_a.0.mlp.fc1.weight")


@dataclass(frozen=True)
class CAVMAEConfig:
    """The encoder's sizes: width, the depths of ``blocks_a`` / ``blocks_v`` / ``blocks_u``, heads, the MLP's
    hidden width, the patch size, the audio length in filterbank frames and the frame size in pixels."""

    embed_dim: int = 768
    depth_a: int = 11
    depth_v: int = 11
    depth_u: int = 1
    num_heads: int = 12
    mlp_hidden: int = 3072
    patch: int = 16
    audio_length: int = 1024
    image_size: int = 224

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise UserError(f"CAV-MAE width {self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if NUM_MEL_BINS % self.patch or self.audio_length % self.patch or self.image_size % self.patch:
            raise UserError(f"patch size {self.patch} must divide the {NUM_MEL_BINS} mel bins, the audio length "
                            f"{self.audio_length} and the image size {self.image_size}")

    @property
    def n_audio_patches(self) -> int:
        return (NUM_MEL_BINS // self.patch) * (self.audio_length // self.patch)

    @property
    def n_video_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


# ------------------------------------------------------------------------------------ modules

class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` × ``patch`` patches → [B, N, d] tokens (``proj`` as CAV-MAE names it)."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's ViT attention (``qkv`` with bias, ``proj``), scaled by head_dim ** -0.5."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm's ViT MLP: ``fc1``, GELU, ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """CAV-MAE's transformer block: one attention and MLP, three pairs of LayerNorms — ``norm1`` / ``norm2``
    (``modality=None``), ``norm1_a`` / ``norm2_a`` (``"a"``) and ``norm1_v`` / ``norm2_v`` (``"v"``)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def norms(self, modality: str | None) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        """The (pre-attention, pre-MLP) LayerNorms a pass of ``modality`` (None, "a", "v") runs through."""
        if modality is None:
            return self.norm1, self.norm2
        if modality == "a":
            return self.norm1_a, self.norm2_a
        if modality == "v":
            return self.norm1_v, self.norm2_v
        raise ValueError(f"modality must be None, 'a' or 'v', got {modality!r}")

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        n1, n2 = self.norms(modality)
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))


class CAVMAEEncoder(nn.Module):
    """CAV-MAE's encoder with its parameter names (module docstring); :meth:`forward_audio` /
    :meth:`forward_video` are ``forward_feat``'s two passes, mean-pooled ([B, d], unnormalised)."""

    def __init__(self, config: CAVMAEConfig) -> None:
        super().__init__()
        c = self.config = config
        d = c.embed_dim
        self.patch_embed_a = PatchEmbed(1, d, c.patch)
        self.patch_embed_v = PatchEmbed(3, d, c.patch)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, c.n_audio_patches, d))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, c.n_video_patches, d))
        self.blocks_a = nn.ModuleList([Block(d, c.num_heads, c.mlp_hidden) for _ in range(c.depth_a)])
        self.blocks_v = nn.ModuleList([Block(d, c.num_heads, c.mlp_hidden) for _ in range(c.depth_v)])
        self.blocks_u = nn.ModuleList([Block(d, c.num_heads, c.mlp_hidden) for _ in range(c.depth_u)])
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        for p in (self.modality_a, self.modality_v, self.pos_embed_a, self.pos_embed_v):
            nn.init.normal_(p, std=0.02)  # a random start (tests); a checkpoint overwrites it

    def tokens_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """Normalised filterbanks [B, audio_length, 128] → the audio pass's tokens [B, N_a, d] (after norm_a)."""
        a = self.patch_embed_a(fbank.unsqueeze(1).transpose(2, 3))  # [B, 1, 128, T]: CAV-MAE's layout
        a = a + self.pos_embed_a + self.modality_a
        for blk in self.blocks_a:
            a = blk(a)
        for blk in self.blocks_u:
            a = blk(a, "a")
        return self.norm_a(a)

    def tokens_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised frames [B, 3, S, S] → the video pass's tokens [B, N_v, d] (after norm_v)."""
        v = self.patch_embed_v(pixels) + self.pos_embed_v + self.modality_v
        for blk in self.blocks_v:
            v = blk(v)
        for blk in self.blocks_u:
            v = blk(v, "v")
        return self.norm_v(v)

    def forward_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.tokens_audio(fbank).mean(dim=1)

    def forward_video(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens_video(pixels).mean(dim=1)

    def side_layernorms(self, side: str) -> list[tuple[str, nn.Parameter]]:
        """(state-dict name, parameter) of the LayerNorm affine parameters the ``side`` ("a" / "v") pass runs
        through: ``blocks_<side>.i.norm1`` / ``norm2``, ``blocks_u.j.norm1_<side>`` / ``norm2_<side>``,
        ``norm_<side>`` — weight then bias, in that order."""
        out: list[tuple[str, nn.LayerNorm]] = []
        for i, blk in enumerate(getattr(self, f"blocks_{side}")):
            out += [(f"blocks_{side}.{i}.norm1", blk.norm1), (f"blocks_{side}.{i}.norm2", blk.norm2)]
        for j, blk in enumerate(self.blocks_u):
            n1, n2 = blk.norms(side)
            out += [(f"blocks_u.{j}.norm1_{side}", n1), (f"blocks_u.{j}.norm2_{side}", n2)]
        out.append((f"norm_{side}", getattr(self, f"norm_{side}")))
        return [(f"{name}.{p}", getattr(m, p)) for name, m in out for p in ("weight", "bias")]

    # ---------------------------------------------------------------------------- checkpoints

    @staticmethod
    def config_from_state_dict(state: dict[str, torch.Tensor], num_heads: int | None = None,
                               where: str = "the checkpoint") -> CAVMAEConfig:
        """The sizes of the encoder ``state`` (CAV-MAE's names, no ``module.`` prefix) holds."""
        missing = [k for k in _SIZE_KEYS if k not in state]
        if missing:
            raise UserError(f"{where} is not a CAV-MAE checkpoint: no {missing[0]!r} (its keys: {_some(state)})")
        wa, wv = state["patch_embed_a.proj.weight"], state["patch_embed_v.proj.weight"]
        if wa.ndim != 4 or wv.ndim != 4 or wa.shape[1] != 1 or wv.shape[1] != 3 or wa.shape[2] != wa.shape[3] \
                or tuple(wa.shape[2:]) != tuple(wv.shape[2:]) or wa.shape[0] != wv.shape[0]:
            raise UserError(f"{where}: patch embeddings of shape {tuple(wa.shape)} / {tuple(wv.shape)}; CAV-MAE's "
                            "are [d, 1, p, p] (audio) and [d, 3, p, p] (video)")
        d, p = int(wa.shape[0]), int(wa.shape[2])
        na, nv = state["pos_embed_a"], state["pos_embed_v"]
        if na.ndim != 3 or nv.ndim != 3 or na.shape[-1] != d or nv.shape[-1] != d:
            raise UserError(f"{where}: positional embeddings of shape {tuple(na.shape)} / {tuple(nv.shape)}, "
                            f"expected [1, N, {d}]")
        rows = NUM_MEL_BINS // p
        if NUM_MEL_BINS % p or na.shape[1] % rows:
            raise UserError(f"{where}: {na.shape[1]} audio patches are not a {rows}-row grid over "
                            f"{NUM_MEL_BINS} mel bins with {p}-px patches")
        side = math.isqrt(int(nv.shape[1]))
        if side * side != nv.shape[1]:
            raise UserError(f"{where}: {nv.shape[1]} video patches are not a square grid")
        if num_heads is None:
            if d % 64:
                raise UserError(f"{where}: width {d} is not a multiple of 64; pass num_heads= (the checkpoint does "
                                "not record it; CAV-MAE's 768-wide encoder has 12)")
            num_heads = d // 64
        depths = [_depth(state, f"blocks_{s}") for s in ("a", "v", "u")]
        if depths[0] < 1 or depths[1] < 1:
            raise UserError(f"{where}: no blocks_a / blocks_v blocks")
        return CAVMAEConfig(embed_dim=d, depth_a=depths[0], depth_v=depths[1], depth_u=depths[2],
                            num_heads=int(num_heads), mlp_hidden=int(state["blocks_a.0.mlp.fc1.weight"].shape[0]),
                            patch=p, audio_length=int(na.shape[1]) // rows * p, image_size=side * p)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], num_heads: int | None = None,
                        where: str = "the checkpoint") -> "CAVMAEEncoder":
        """An encoder sized from ``state`` with ``state``'s encoder tensors loaded (every one required); the
        MAE decoder, the classifier and READ's fusion q / k / v copies are ignored with a logged note."""
        enc = cls(cls.config_from_state_dict(state, num_heads, where))
        own = enc.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            shown = ", ".join(missing[:4]) + (f", … ({len(missing)} in all)" if len(missing) > 4 else "")
            raise UserError(f"{where} lacks CAV-MAE encoder weights: {shown}")
        extra = [k for k in state if k not in own]
        ignored = [k for k in extra if k.startswith(IGNORED_PREFIXES) or _READ_FUSION_KEY.match(k)]
        unknown = [k for k in extra if k not in set(ignored)]
        if ignored:
            log.info("%s: ignored %d key(s) retrieval does not use (MAE decoder / classifier / READ fusion "
                     "copies), e.g. %s", where, len(ignored), ", ".join(ignored[:3]))
        if unknown:
            log.warning("%s: ignored %d key(s) that are not CAV-MAE's, e.g. %s", where, len(unknown),
                        ", ".join(unknown[:3]))
        bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise UserError(f"{where}: {k!r} has shape {tuple(state[k].shape)}, the encoder sized from the checkpoint "
                            f"expects {tuple(own[k].shape)}")
        enc.load_state_dict({k: state[k].float() for k in own}, strict=True)
        return enc.eval()


def _depth(state: dict[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _some(state: dict[str, Any], n: int = 4) -> str:
    keys = sorted(map(str, state))
    return (", ".join(keys[:n]) + (", …" if len(keys) > n else "")) or "none"


def read_cavmae_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a CAV-MAE / READ checkpoint at ``path``: a bare ``state_dict()`` (what CAV-MAE and READ
    save, DataParallel ``module.`` prefix and all), or one under ``"state_dict"`` / ``"model"``; the prefix is
    dropped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"CAV-MAE checkpoint not found: {p}")
    payload = read_checkpoint(p, "CAV-MAE checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not (isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values())):
        what = _some(payload) if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{p}: not a CAV-MAE state dict of tensors (found {what})")
    if all(isinstance(k, str) and k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


# ------------------------------------------------------------------------------------ inputs

def cavmae_frame(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """CAV-MAE's eval transform of one uint8 [H, W, 3] frame: the shorter side resized to ``size`` (bicubic,
    the longer side ``int(size · long / short)`` as torchvision's ``Resize``; skipped when already ``size``),
    a centre ``size`` × ``size`` crop, /255 and ImageNet's mean / std → float32 [3, size, size]."""
    im = TF.resize(Image.fromarray(frame), size, interpolation=TF.InterpolationMode.BICUBIC)
    x = np.asarray(TF.center_crop(im, [size, size]), dtype=np.float32) / 255.0
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _clips(batch: Any) -> list[np.ndarray]:
    """A video batch as a list of uint8 [T, H, W, 3] clips (a frame [H, W, 3] is a one-frame clip)."""
    if isinstance(batch, np.ndarray) and batch.ndim in (4, 5):
        items: Sequence = list(batch)  # [B, T, H, W, 3] clips, or [B, H, W, 3]: one frame per item
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        raise UserError(f"a video batch must be a uint8 array [B, T, H, W, 3] or a list of [T, H, W, 3] clips, got "
                        f"{type(batch).__name__} {getattr(batch, 'shape', '')}")
    if not items:
        raise UserError("an empty video batch")
    out = []
    for k, c in enumerate(items):
        c = np.asarray(c)
        if c.ndim == 3:
            c = c[None]
        if c.dtype != np.uint8 or c.ndim != 4 or c.shape[-1] != 3 or 0 in c.shape:
            raise UserError(f"video item {k}: expected a uint8 clip [T, H, W, 3] (or a frame [H, W, 3]), got "
                            f"{c.dtype} {tuple(c.shape)}")
        out.append(c)
    return out


class CAVMAERetrievalModel(TwoTowerBase):
    """RetrievalModel over a CAV-MAE encoder: ``v2a`` (video queries, audio gallery) or ``a2v``.

    Both towers are the one encoder's two passes (:class:`CAVMAEEncoder`); the audio pass and the video pass
    share only ``blocks_u``'s attention and MLP, which are frozen.  **Adaptable parameters** (the rule): the
    affine weight and bias of every LayerNorm the *query* pass runs through, named as in the checkpoint —

    * ``v2a``: ``blocks_v.<i>.norm1`` / ``.norm2`` of every video block, ``blocks_u.<j>.norm1_v`` /
      ``.norm2_v`` of every shared block, and ``norm_v``;
    * ``a2v``: ``blocks_a.<i>.norm1`` / ``.norm2``, ``blocks_u.<j>.norm1_a`` / ``.norm2_a`` and ``norm_a``.

    The gallery pass reads none of them, so adapting never moves the gallery's embeddings (no copy is
    needed); the norms neither pass uses (a block's other-modality and unified norms, ``norm``) stay frozen.
    Everything else has ``requires_grad=False`` (:func:`qshift.models.dual_tower.freeze_except_adaptable`).

    Inputs: see the module docstring; ``frame_pool="mean"`` encodes every frame of a clip and averages the
    pooled features (qshift's option; CAV-MAE encodes the middle frame).  ``autocast`` (``bf16`` / ``fp16``)
    runs the encoder under ``torch.autocast``; embeddings are float32, L2-normalised.
    """

    #: docs/method.md §2: 3e-4 for video queries; audio queries take the same rate
    default_lr: float = 3e-4

    def __init__(self, encoder: CAVMAEEncoder, direction: str, device: str | torch.device = "cpu",
                 audio_mean: float | None = None, audio_std: float | None = None, frame_pool: str = "middle",
                 autocast: str | None = None) -> None:
        from qshift.data import audio_features as af

        d = DIRECTIONS.get(direction)
        if d is None or d.task != "video-audio":
            raise UserError(f"CAV-MAE serves the video-audio directions v2a and a2v, not {direction!r}")
        if frame_pool not in FRAME_POOLS:
            raise UserError(f"frame_pool must be one of {', '.join(FRAME_POOLS)}, got {frame_pool!r}")
        if autocast not in AUTOCAST:
            raise UserError(f"autocast must be one of {', '.join(str(k) for k in AUTOCAST if k)}, got {autocast!r}")
        self.direction = direction
        self.query_modality, self.gallery_modality = d.query, d.gallery
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device)
        self.config = encoder.config
        self.audio_mean = af.CAVMAE_MEAN if audio_mean is None else float(audio_mean)
        self.audio_std = af.CAVMAE_STD if audio_std is None else float(audio_std)
        if not self.audio_std > 0:
            raise UserError(f"audio_std must be positive, got {audio_std}")
        self.frame_pool = frame_pool
        self.autocast = AUTOCAST[autocast]
        freeze_except_adaptable(self, [self.encoder])

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def _side(self) -> str:
        return "v" if self.query_modality == "video" else "a"

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.encoder.side_layernorms(self._side)

    def query_tower(self) -> nn.Module:
        """The modules of the query pass (its patch embedding, its blocks, the shared blocks, its final norm)."""
        s = self._side
        e = self.encoder
        return nn.ModuleList([getattr(e, f"patch_embed_{s}"), getattr(e, f"blocks_{s}"), e.blocks_u,
                              getattr(e, f"norm_{s}")])

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # ------------------------------------------------------------------------ preprocessing

    def video_input(self, batch: Any) -> tuple[torch.Tensor, int]:
        """(normalised frames [B·F, 3, S, S] on the device, F frames per clip) of a video batch."""
        clips = _clips(batch)
        if self.frame_pool == "middle":
            frames = [c[len(c) // 2] for c in clips]
            per = 1
        else:
            lengths = {len(c) for c in clips}
            if len(lengths) != 1:
                raise UserError(f"frame_pool='mean' needs clips of one length, got {sorted(lengths)}")
            per = lengths.pop()
            frames = [f for c in clips for f in c]
        x = np.stack([cavmae_frame(f, self.config.image_size) for f in frames])
        return torch.from_numpy(x).to(self.device), per

    def audio_input(self, batch: Any) -> torch.Tensor:
        """Normalised filterbanks [B, audio_length, 128] on the device: from waveforms (16 kHz, [B, N] or a list
        of 1-D arrays) by :func:`qshift.data.audio_features.features`, or given as a float [B, T, 128] array."""
        from qshift.data import audio_features as af

        t = self.config.audio_length
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        if isinstance(batch, np.ndarray) and batch.ndim == 3:
            if tuple(batch.shape[1:]) != (t, NUM_MEL_BINS) or not np.issubdtype(batch.dtype, np.floating):
                raise UserError(f"an audio batch of filterbanks must be float [B, {t}, {NUM_MEL_BINS}] (this "
                                f"checkpoint's length), got {batch.dtype} {tuple(batch.shape)}")
            fb = batch.astype(np.float32, copy=False)
        elif (isinstance(batch, np.ndarray) and batch.ndim == 2) or isinstance(batch, (list, tuple)):
            if len(batch) == 0:
                raise UserError("an empty audio batch")
            fb = af.features(batch, target_length=t, mean=self.audio_mean, std=self.audio_std)
        else:
            raise UserError(f"an audio batch must be float waveforms [B, N] (16 kHz), a list of 1-D waveforms or "
                            f"filterbanks [B, {t}, {NUM_MEL_BINS}], got {type(batch).__name__} "
                            f"{getattr(batch, 'shape', '')}")
        return torch.from_numpy(np.ascontiguousarray(fb)).to(self.device)

    # ------------------------------------------------------------------------ encoding

    def features(self, modality: str, batch: Any) -> torch.Tensor:
        """Unnormalised mean-pooled features [B, d] of a ``modality`` ("video" / "audio") batch."""
        if modality == "video":
            x, per = self.video_input(batch)
            with self._ctx():
                z = self.encoder.forward_video(x)
            z = z.float()
            return z.view(-1, per, z.shape[-1]).mean(1) if per > 1 else z
        if modality == "audio":
            x = self.audio_input(batch)
            with self._ctx():
                z = self.encoder.forward_audio(x)
            return z.float()
        raise UserError(f"CAV-MAE encodes video or audio, not {modality!r}")

    def _encode(self, modality: str, batch: Any) -> torch.Tensor:
        return F.normalize(self.features(modality, batch), dim=-1)


def load_cavmae(path: str | Path, direction: str, *, device: str = "cpu", num_heads: int | None = None,
                audio_mean: float | None = None, audio_std: float | None = None, frame_pool: str = "middle",
                autocast: str | None = None, preprocess: str = "model") -> CAVMAERetrievalModel:
    """A ``v2a`` / ``a2v`` RetrievalModel from a CAV-MAE or READ checkpoint at ``path``.

    ``num_heads``: the encoder's attention heads (default width / 64); ``audio_mean`` / ``audio_std``: the
    filterbank normalisation (default CAV-MAE's -5.081 / 4.4849, what its retrieval and READ use);
    ``frame_pool``: ``middle`` (CAV-MAE) or ``mean``; ``autocast``: None, ``bf16`` or ``fp16``;
    ``preprocess``: only ``model`` (CAV-MAE's own transforms).  Every mistake is a :class:`UserError`."""
    if preprocess != "model":
        raise UserError(f"cavmae:{path} takes only --preprocess model (CAV-MAE's own frame and filterbank "
                        f"transforms), got {preprocess!r}")
    if num_heads is not None:
        try:
            num_heads = int(num_heads)
        except (TypeError, ValueError):
            raise UserError(f"num_heads must be a whole number, got {num_heads!r}") from None
        if num_heads < 1:
            raise UserError(f"num_heads must be positive, got {num_heads}")
    encoder = CAVMAEEncoder.from_state_dict(read_cavmae_state(path), num_heads, where=str(path))
    return CAVMAERetrievalModel(encoder, direction, device=device, audio_mean=audio_mean, audio_std=audio_std,
                                frame_pool=frame_pool, autocast=autocast)


__all__ = ["CAVMAEConfig", "CAVMAEEncoder", "CAVMAERetrievalModel", "Block", "FRAME_POOLS", "IMAGE_MEAN",
           "IMAGE_STD", "cavmae_frame", "load_cavmae", "read_cavmae_state"]
