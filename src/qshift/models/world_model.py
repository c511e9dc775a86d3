"""The embedded world's source model: a small ViT image tower and an n-gram text tower.

Both towers are pre-LN transformers whose only normalisation is LayerNorm (so LayerNorm-only
test-time adaptation applies to them as it does to CLIP), projected into one L2-normalised space
and trained contrastively (``qshift train-world-model``).  The trained weights ship inside the
package (``qshift/models/weights/``); ``load_world_model()`` returns them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qshift.models.checkpoint import half_state, read_checkpoint, save_checkpoint
from qshift.models.protocol import TwoTowerBase, layernorm_affine_parameters
from qshift.models.tokenizer import NgramTokenizer

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)
SHIPPED_WEIGHTS = "world_dual_encoder.pt"


@dataclass
class WorldModelConfig:
    image_size: int = 96
    # a fixed (not learnt) Gaussian low-pass at the image input, as anti-aliasing; 0 disables it
    prefilter_sigma: float = 1.0
    # per-image standardisation after the prefilter: subtract each channel's mean, divide by the
    # image's pooled standard deviation (+ a floor), so global contrast and brightness scalings are
    # removed before the stem while relative colour is kept
    standardise_input: bool = True
    # a channel LayerNorm after each of the two stride-2 stem convolutions (as ConvNeXt stems have),
    # so LayerNorm-only adaptation can re-weight low-level filters; False reproduces v1-v3
    stem_norm: bool = False
    stem_channels: tuple[int, int] = (32, 64)
    # a LayerNorm on the hidden activations of each image block's MLP (NormFormer's mid-MLP norm), so
    # LayerNorm-only adaptation can re-weight and re-centre those features; False reproduces v1-v6.1
    image_mlp_norm: bool = False
    patch: int = 3  # stride of the last stem conv, after two stride-2 convs: tokens = (size/4/patch)^2
    image_width: int = 128
    image_depth: int = 6
    text_width: int = 128
    text_depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    embed_dim: int = 128
    tokenizer: dict = field(default_factory=lambda: NgramTokenizer().config())


class Block(nn.Module):
    """Pre-LN transformer block (``ln_1`` → attention, ``ln_2`` → MLP), as in CLIP; with ``mlp_norm`` a
    LayerNorm ``ln_mlp`` also normalises the MLP's hidden activations (NormFormer)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, mlp_norm: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        # a separate attribute (not inside ``mlp``) so the parameter names of checkpoints without it are unchanged
        self.ln_mlp = nn.LayerNorm(mlp_ratio * width) if mlp_norm else None

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_padding is None else (~key_padding)[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, W))
        if self.ln_mlp is None:
            return x + self.mlp(self.ln_2(x))
        return x + self.mlp[2](self.ln_mlp(self.mlp[1](self.mlp[0](self.ln_2(x)))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a [B, C, H, W] map (an ``nn.LayerNorm``, so the
    protocol's parameter selection finds it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ImageTower(nn.Module):
    """Fixed Gaussian prefilter → convolutional stem (channel LayerNorms if ``stem_norm``) → ``ln_pre`` → pre-LN blocks
    → ``ln_post`` on CLS → projection."""

    def __init__(self, cfg: WorldModelConfig) -> None:
        super().__init__()
        c1, c2 = cfg.stem_channels
        w = cfg.image_width
        self.image_size = cfg.image_size
        self.prefilter_sigma = float(cfg.prefilter_sigma)
        self.standardise_input = bool(cfg.standardise_input)
        if self.prefilter_sigma > 0:
            radius = max(1, int(math.ceil(3 * self.prefilter_sigma)))
            r = torch.arange(-radius, radius + 1, dtype=torch.float32)
            k = torch.exp(-(r ** 2) / (2 * self.prefilter_sigma ** 2))
            self.register_buffer("blur_kernel", (k / k.sum()), persistent=False)
        # without stem_norm the layer indices stay those of v1-v3, so their checkpoints load
        norm = (lambda c: [LayerNorm2d(c)]) if cfg.stem_norm else (lambda c: [])
        self.stem = nn.Sequential(
            nn.Conv2d(3, c1, 3, stride=2, padding=1), *norm(c1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), *norm(c2), nn.GELU(),
            nn.Conv2d(c2, w, cfg.patch, stride=cfg.patch),
        )
        grid = cfg.image_size // 4 // cfg.patch
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, w) * 0.02)
        self.ln_pre = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.image_mlp_norm)
                                    for _ in range(cfg.image_depth))
        self.ln_post = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.forward_tokens(pixels, len(self.blocks)), len(self.blocks))

    def forward_tokens(self, pixels: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """Normalised images [B, 3, S, S] → the tokens [B, 1 + grid², width] after the first ``n_blocks``
        blocks (``forward_from(·, n_blocks)`` finishes the forward pass; a trainer caches these)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(f"expected normalised images [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(pixels.shape)}")
        if self.prefilter_sigma > 0:
            pixels = gaussian_blur(pixels, self.blur_kernel)
        if self.standardise_input:
            pixels = standardise(pixels)
        x = self.stem(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.ln_pre(x)
        for blk in self.blocks[:n_blocks]:
            x = blk(x)
        return x

    def forward_from(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens after block ``start`` → the (unnormalised) embedding [B, embed_dim]."""
        x = tokens
        for blk in self.blocks[start:]:
            x = blk(x)
        return self.head(self.ln_post(x[:, 0]))


class TextTower(nn.Module):
    """Bag-of-n-gram word embeddings → pre-LN blocks → ``ln_final`` on CLS → projection."""

    def __init__(self, cfg: WorldModelConfig) -> None:
        super().__init__()
        w = cfg.text_width
        tok = cfg.tokenizer
        self.pieces = nn.Embedding(tok["n_buckets"], w, padding_idx=0)
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        self.pos = nn.Parameter(torch.randn(1, tok["max_words"] + 1, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.text_depth))
        self.ln_final = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, pieces: torch.Tensor) -> torch.Tensor:
        if pieces.ndim != 3:
            raise ValueError(f"expected token pieces [B, words, pieces], got {tuple(pieces.shape)}")
        count = (pieces > 0).sum(-1, keepdim=True)
        words = self.pieces(pieces).sum(-2) / count.clamp(min=1)
        B, L, _ = words.shape
        x = torch.cat([self.cls.expand(B, -1, -1), words], dim=1) + self.pos[:, : L + 1]
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=pieces.device), count[..., 0] == 0], dim=1)
        for blk in self.blocks:
            x = blk(x, key_padding=pad)
        return self.head(self.ln_final(x[:, 0]))


class WorldDualEncoder(nn.Module):
    """Image and text towers sharing one normalised embedding space."""

    def __init__(self, cfg: WorldModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or WorldModelConfig()
        self.tokenizer = NgramTokenizer(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in self.cfg.tokenizer.items()})
        self.visual = ImageTower(self.cfg)
        self.text = TextTower(self.cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- preprocessing ------------------------------------------------------------------
    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (numpy or torch) → normalised float [B, 3, S, S], S = ``cfg.image_size``.

        Images larger than S by a whole factor k (the world renders at 2 × S) are area-downsampled
        (k × k box mean), the model's fixed resize, like CLIP's resize transform."""
        t = torch.as_tensor(images)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(t.shape)}")
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {t.dtype}")
        x = t.permute(0, 3, 1, 2).float().div_(255.0)
        S = self.cfg.image_size
        h, w = x.shape[-2:]
        if h != w or h % S:
            raise ValueError(f"expected square images of {S} px or a whole multiple of it, got {h}×{w}")
        if h != S:
            x = F.avg_pool2d(x, h // S)
        return normalise_pixels(x)

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        return self.tokenizer(texts)

    # -- encoding ----------------------------------------------------------------------
    def encode_image(self, images: Any) -> torch.Tensor:
        """Images (uint8 HWC batch, or already-normalised float BCHW) → normalised [B, d]."""
        x = images if isinstance(images, torch.Tensor) and images.is_floating_point() else self.preprocess_images(images)
        return F.normalize(self.visual(x.to(self.logit_scale.device)), dim=-1)

    def encode_text(self, texts: Any) -> torch.Tensor:
        """Captions (list of str, or token pieces from ``tokenize``) → normalised [B, d]."""
        t = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self.text(t.to(self.logit_scale.device)), dim=-1)

    # -- persistence -------------------------------------------------------------------
    def save(self, path: str | Path, card: dict | None = None, half: bool = True) -> None:
        """Save weights (fp16 by default) with the config and an optional model-card dict."""
        save_checkpoint(path, {"config": asdict(self.cfg), "state_dict": half_state(self.state_dict(), half)}, card)

    @classmethod
    def load(cls, path: str | Path) -> "WorldDualEncoder":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"world model weights not found: {path}")
        payload = read_checkpoint(path, "qshift world model checkpoint", error=ValueError)
        if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
            raise ValueError(f"{path} is not a qshift world model checkpoint (expected the keys 'config' and "
                             f"'state_dict', as `qshift train-world-model` writes)")
        try:
            cfg = dict(payload["config"])
            cfg["stem_channels"] = tuple(cfg["stem_channels"])
            cfg.setdefault("prefilter_sigma", 0.0)  # weights saved before the prefilter existed
            cfg.setdefault("standardise_input", False)  # ... or before input standardisation
            model = cls(WorldModelConfig(**cfg))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: the checkpoint's model config is not a world-model config ({e})") from e
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # keys or shapes that do not fit the config
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
            raise ValueError(f"{path}: the checkpoint's tensors do not match its config ({first}); was it "
                             "edited, or saved by another version?") from e
        model.card = payload.get("card", {})
        return model.eval()


@torch.no_grad()
def insert_image_mlp_norms(model: WorldDualEncoder, images: torch.Tensor) -> None:
    """Give a trained image tower without them the mid-MLP LayerNorms of ``image_mlp_norm``, in place.

    Each new norm starts as the per-channel least-squares fit of the hidden activations it replaces,
    h_c ≈ γ_c·LN(h)_c + β_c, on ``images`` (normalised float [N, 3, S, S]), one block at a time so each
    fit sees the previous blocks' new norms; the tower then computes nearly what it did, and a
    fine-tune starts from there rather than from a broken network."""
    if model.cfg.image_mlp_norm:
        raise ValueError("this model's image tower already has mid-MLP LayerNorms")
    was_training = model.training
    model.eval()
    for blk in model.visual.blocks:
        captured = []
        hook = blk.mlp[1].register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        model.visual(images)
        hook.remove()
        h = captured[0].reshape(-1, captured[0].shape[-1]).double()
        ln = nn.LayerNorm(h.shape[-1])
        n = F.layer_norm(h, (h.shape[-1],), eps=ln.eps)
        nc, hc = n - n.mean(0), h - h.mean(0)
        gamma = (nc * hc).mean(0) / nc.pow(2).mean(0).clamp(min=1e-12)
        ln.weight.copy_(gamma.float())
        ln.bias.copy_((h.mean(0) - gamma * n.mean(0)).float())
        blk.ln_mlp = ln.to(blk.mlp[0].weight.device)
    model.cfg = replace(model.cfg, image_mlp_norm=True)
    model.train(was_training)


def gaussian_blur(x: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Separable blur of BCHW images with a 1-D kernel, borders replicated."""
    r = kernel_1d.numel() // 2
    c = x.shape[1]
    kx = kernel_1d.to(x.dtype).view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel_1d.to(x.dtype).view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=c)


STANDARDISE_FLOOR = 0.02  # in normalised units (about 1.3 grey levels), so flat images stay flat


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of BCHW: channel means removed, divided by the pooled std."""
    centred = x - x.mean((2, 3), keepdim=True)
    scale = centred.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + STANDARDISE_FLOOR
    return centred / scale


def normalise_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float BCHW → the model's normalised input."""
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - mean) / std


def shipped_weights_path() -> Path:
    return Path(str(resources.files("qshift.models") / "weights" / SHIPPED_WEIGHTS))


def load_world_model(path: str | Path | None = None) -> WorldDualEncoder:
    """The shipped source model (or the one saved at ``path``), in eval mode, on CPU."""
    p = Path(path) if path is not None else shipped_weights_path()
    if not p.is_file():
        hint = ("the shipped weights are missing: reinstall qshift" if path is None
                else "check the path, or make weights with `qshift train-world-model --out FILE`")
        raise FileNotFoundError(f"world model weights not found at {p}; {hint}")
    return WorldDualEncoder.load(p)


class WorldRetrievalModel(TwoTowerBase):
    """RetrievalModel adapter over a ``WorldDualEncoder`` for one direction.

    ``query_modality="image"`` gives image→text retrieval (i2t), ``"text"`` gives t2i.
    Adaptable parameters: every LayerNorm weight and bias of the query tower (image: ``ln_pre``,
    each block's ``ln_1``/``ln_2``, ``ln_post``; text: each block's ``ln_1``/``ln_2`` and ``ln_final``).
    """

    #: The embedded world model's protocol learning rate (all methods alike, when a run sets none;
    #: read through ``qshift.models.protocol.default_lr``). docs/method.md §2 gives 3e-4 for CLIP-family
    #: queries and 3e-5 for BLIP text: per backbone, as TCR's code. This small model trained from scratch
    #: needs 1e-3: at 3e-4 even the label oracle recovers only +7.4 mean R@1 on the 16 severity-5
    #: corruptions (+10.5 at 1e-3), and no world or model change measured moved that (docs/world.md).
    default_lr: float = 1e-3

    def __init__(self, encoder: WorldDualEncoder, query_modality: str = "image") -> None:
        if query_modality not in ("image", "text"):
            raise ValueError(f"query_modality must be 'image' or 'text', got {query_modality!r}")
        self.encoder = encoder.eval()
        self.query_modality = query_modality
        self.gallery_modality = "text" if query_modality == "image" else "image"

    def _encode(self, modality: str, batch: Any) -> torch.Tensor:
        return self.encoder.encode_image(batch) if modality == "image" else self.encoder.encode_text(batch)

    @property
    def embed_dim(self) -> int:
        """The joint embedding's dimension (an Adapter checks precomputed gallery embeddings against it)."""
        return self.encoder.cfg.embed_dim

    def query_tower(self) -> nn.Module:
        return self.encoder.visual if self.query_modality == "image" else self.encoder.text

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        prefix = "visual" if self.query_modality == "image" else "text"
        return layernorm_affine_parameters(self.query_tower(), prefix=prefix)


def model_card_json(model: WorldDualEncoder) -> str:
    return json.dumps(getattr(model, "card", {}), indent=2)
