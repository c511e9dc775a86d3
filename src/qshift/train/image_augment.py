"""Generic image augmentation of the world model's training: small translations and rescaling,
brightness / contrast / saturation jitter (no hue: captions name colours), mild Gaussian blur,
Gaussian pixel noise, optional low-frequency illumination; no flips (captions say left and right).
The JPEG re-encoding of the recipe is applied when the pool is rendered (:mod:`qshift.train.world_pool`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qshift.models.world_model import normalise_pixels

AUGMENTATIONS = {
    "translate_px": 4,
    "scale": (0.93, 1.07),
    "brightness": (0.8, 1.2),
    "contrast": (0.75, 1.25),
    "saturation": (0.8, 1.2),
    "blur_p": 0.25, "blur_sigma": (0.3, 0.7),
    "noise_p": 0.5, "noise_std": (0.0, 0.12),
    "jpeg_p": 0.25, "jpeg_quality": (55, 90),
    "hflip": False, "hue": False,
}


def smooth_field(n: int, height: int, width: int, gen: torch.Generator,
                 octaves: tuple[int, ...] = (3, 5, 9)) -> torch.Tensor:
    """``n`` smooth random grey fields in [0, 1], shape [n, 1, H, W]: a few octaves of bilinearly upsampled
    Gaussian noise (coarsest first, each half the amplitude of the one before), min-max scaled per field.
    A cheap stand-in for the plasma fractal behind ImageNet-C's fog."""
    field = torch.zeros(n, 1, height, width)
    for i, cells in enumerate(octaves):
        coarse = torch.randn(n, 1, cells, cells, generator=gen)
        field += 0.5 ** i * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    lo = field.amin((2, 3), keepdim=True)
    hi = field.amax((2, 3), keepdim=True)
    return (field - lo) / (hi - lo).clamp_min(1e-6)


def illuminate(x: torch.Tensor, amp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blend images [B, 3, H, W] in [0, 1] with a smooth grey field: (x + a·P) / (1 + a) per image, ``amp``
    [B] the a's. ImageNet-C's fog is the same form with a = 1.5 (severity 1) to 3 (severity 5)."""
    B, _, H, W = x.shape
    a = amp[:, None, None, None]
    return (x + a * smooth_field(B, H, W, gen)) / (1 + a)


def augment(images: torch.Tensor, gen: torch.Generator, noise_p: float | None = None,
            noise_std_max: float | None = None, illum_p: float = 0.0,
            illum_amp_max: float = 0.0) -> torch.Tensor:
    """uint8 [B, H, W, 3] → augmented, normalised float [B, 3, H, W]. With ``illum_p`` > 0 that share of the
    images gets a smooth low-frequency illumination field (``illuminate``, amplitude U(0, illum_amp_max));
    with it off no random numbers are drawn for it, so the shipped recipe's stream is unchanged."""
    a = dict(AUGMENTATIONS)
    if noise_p is not None:
        a["noise_p"] = noise_p
    if noise_std_max is not None:
        a["noise_std"] = (0.0, noise_std_max)
    x = images.permute(0, 3, 1, 2).float() / 255.0
    B, _, H, W = x.shape
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (B,)), generator=gen)  # noqa: E731
    # translation + mild isotropic rescale, border pixels replicated
    scale = u(*a["scale"])
    shift = u(-1, 1, B, 2) * (2 * a["translate_px"] / W)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # photometric jitter (no hue)
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * u(*a["saturation"])[:, None, None, None]
    m = x.mean((1, 2, 3), keepdim=True)
    x = m + (x - m) * u(*a["contrast"])[:, None, None, None]
    x = x * u(*a["brightness"])[:, None, None, None]
    if illum_p > 0 and illum_amp_max > 0:
        lit = torch.rand(B, generator=gen) < illum_p
        amp = u(0.0, illum_amp_max) * lit
        x = torch.where(lit[:, None, None, None], illuminate(x.clamp(0, 1), amp, gen), x)
    # mild blur on a random subset
    blur = torch.rand(B, generator=gen) < a["blur_p"]
    if blur.any():
        sig = float(u(*a["blur_sigma"], 1))
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-(r ** 2) / (2 * sig ** 2))
        k = k / k.sum()
        xb = x[blur]
        xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        x[blur] = xb
    noisy = (torch.rand(B, generator=gen) < a["noise_p"]).float()[:, None, None, None]
    x = x + noisy * u(*a["noise_std"])[:, None, None, None] * torch.randn(x.shape, generator=gen)
    return normalise_pixels(x.clamp(0, 1))
