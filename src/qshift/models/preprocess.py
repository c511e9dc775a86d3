"""Image inputs for real backbones: any batch form → PIL images → the model's transform.

``tcr`` preprocessing (what TCR's code does, so numbers can be compared with its tables): a square
bicubic resize to the model's input size (no centre crop) and CLIP's mean / std.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T
from PIL import Image

from qshift.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("model", "tcr")


def to_pil_list(items: Any) -> list[Image.Image]:
    """A batch of images as RGB PIL images: PIL images, file paths, or a uint8 array [B, H, W, 3]."""
    if isinstance(items, np.ndarray):
        if items.ndim != 4 or items.shape[-1] != 3 or items.dtype != np.uint8:
            raise UserError(f"image arrays must be uint8 [B, H, W, 3], got {items.dtype} {items.shape}")
        return [Image.fromarray(x) for x in items]
    out = []
    for x in items:
        if isinstance(x, Image.Image):
            out.append(x.convert("RGB"))
        elif isinstance(x, (str, Path)):
            p = Path(x)
            if not p.is_file():
                raise FileNotFoundError(f"image not found: {p}")
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        elif isinstance(x, np.ndarray):
            out.append(Image.fromarray(x).convert("RGB"))
        else:
            raise TypeError(f"cannot read an image from {type(x).__name__}")
    return out


def tcr_transform(size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Callable:
    """Square bicubic resize to ``size`` (no centre crop), to tensor, normalise."""
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(mean, std)])


def images_to_tensor(items: Any, transform: Callable, device: torch.device | str) -> torch.Tensor:
    """Apply a per-image transform to a batch (float tensors [B, 3, H, W] pass through)."""
    if isinstance(items, torch.Tensor) and items.is_floating_point():
        if items.ndim != 4:
            raise UserError(f"image tensors must be [B, 3, H, W], got {tuple(items.shape)}")
        return items.to(device)
    return torch.stack([transform(im) for im in to_pil_list(items)]).to(device)


def check_texts(texts: Any) -> list[str]:
    """A batch of captions as a list of non-empty strings (a clear error otherwise)."""
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"caption {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise UserError(f"caption {i} is empty")
        out.append(t)
    return out
