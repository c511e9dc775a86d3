"""READ and DeYO on the N-way gallery softmax (docs/method.md §6), and the query-shuffling helpers DeYO needs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.entropy_baselines import entropy_filter_options, entropy_margin
from qshift.methods.objectives import softmax_entropy
from qshift.methods.simple import TEMPERATURE_HELP
from qshift.options import Options, option


def take_items(items: Any, rows: torch.Tensor | np.ndarray | list[int]) -> Any:
    """Rows of a query batch: numpy / torch arrays are indexed, sequences (captions) gathered."""
    rows = [int(r) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)]
    if isinstance(items, np.ndarray):
        return items[rows]
    if isinstance(items, torch.Tensor):
        return items[torch.as_tensor(rows, dtype=torch.long, device=items.device)]
    return [items[r] for r in rows]


def shuffle_queries(items: Any, grid: int, gen: torch.Generator) -> Any:
    """Destroy the structure of each query while keeping its content (DeYO's PLPD probe).

    Images (uint8 [B, H, W, C] numpy or float [B, C, H, W] torch): cut into ``grid × grid`` patches and
    permute them (one random permutation per image).  Captions (list of str): the token-shuffle
    analogue — permute each caption's words, which keeps the bag of words and breaks word order (for
    the world's captions, which attribute binds to which object and where).  Composed queries (a list of
    (image, text) pairs): each half by its own rule — the image patch-shuffled, the text word-shuffled.
    Video clips (uint8 [B, T, H, W, C]): every frame patch-shuffled (its own permutation), so appearance is
    kept and layout destroyed.  Audio (float waveforms [B, N]): cut into ``grid × grid`` equal segments in
    time and permuted — the spectrogram-patch shuffle along time, done on the waveform the model reads
    (pitch and timbre are kept; rhythm, envelope and onsets are broken).
    """
    if isinstance(items, np.ndarray) and items.ndim == 5:
        B, T = items.shape[:2]
        frames = shuffle_queries(items.reshape(B * T, *items.shape[2:]), grid, gen)
        return frames.reshape(items.shape)
    if isinstance(items, np.ndarray) and items.ndim == 2 and np.issubdtype(items.dtype, np.floating):
        k = grid * grid
        B, N = items.shape
        seg = N // k
        if seg == 0:
            raise ValueError(f"waveforms of {N} samples are too short for {k} shuffled segments")
        out = items.copy()
        for b in range(B):
            perm = torch.randperm(k, generator=gen).numpy()
            out[b, : seg * k] = items[b, : seg * k].reshape(k, seg)[perm].reshape(-1)
        return out
    if isinstance(items, (list, tuple)) and items and isinstance(items[0], (list, tuple)):
        images = shuffle_queries(np.stack([np.asarray(im) for im, _ in items]), grid, gen)
        texts = shuffle_queries([t for _, t in items], grid, gen)
        return [(im, t) for im, t in zip(images, texts)]
    if isinstance(items, (list, tuple)):
        out = []
        for text in items:
            words = str(text).split()
            perm = torch.randperm(len(words), generator=gen).tolist()
            out.append(" ".join(words[i] for i in perm))
        return out
    channels_last = isinstance(items, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(items)) if channels_last else items
    if x.ndim != 4:
        raise ValueError(f"patch shuffling needs a batch of images [B, H, W, C] or [B, C, H, W], got {tuple(x.shape)}")
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    B, C, H, W = x.shape
    ph, pw = H // grid, W // grid
    if ph == 0 or pw == 0:
        raise ValueError(f"images of {H}×{W} px are too small for a {grid}×{grid} patch grid")
    core = x[:, :, : ph * grid, : pw * grid]
    patches = core.reshape(B, C, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, C, ph, pw)
    perm = torch.stack([torch.randperm(grid * grid, generator=gen) for _ in range(B)]).to(patches.device)
    patches = patches[torch.arange(B, device=patches.device)[:, None], perm]
    core = patches.reshape(B, grid, grid, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, ph * grid, pw * grid)
    out = x.clone()
    out[:, :, : ph * grid, : pw * grid] = core
    if channels_last:
        return out.permute(0, 2, 3, 1).contiguous().numpy()
    return out


@register("read")
class READ(Method):
    """READ (Yang et al., ICLR 2024): confidence-aware self-entropy minus a balance term.

    For each query with top-1 probability p, ℓ(p) = p·(1 − log(p / γ)); its derivative log(γ / p) makes
    confident queries (p > γ) sharper and suppresses unconfident ones (p < γ), γ = e⁻¹.  The balance
    term is the entropy of the batch's mean prediction, which keeps predictions spread over the gallery.
    """

    @dataclass(frozen=True)
    class Options(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)
        gamma: float = option(math.exp(-1), "confidence pivot γ: queries with top-1 probability above it are "
                                            "sharpened, below it suppressed", minimum=0.0, maximum=1.0,
                              exclusive_minimum=True)
        balance_weight: float = option(1.0, "weight of the balance term (entropy of the mean prediction)")

    def setup(self) -> None:
        if self.opts.gamma >= 1:
            raise ValueError(f"option 'gamma' of method 'read' must be in (0, 1), got {self.opts.gamma}")
        self.temperature, self.gamma, self.balance_weight = self.opts.temperature, self.opts.gamma, \
            self.opts.balance_weight

    def loss(self, z, sims, step, labels):
        p = (sims / self.temperature).softmax(1)
        p_max = p.max(1).values.clamp_min(1e-12)
        confidence = (p_max * (1.0 - torch.log(p_max / self.gamma))).mean()
        mean_p = self.mean_prediction(p)
        balance = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        return StepOutput(confidence - self.balance_weight * balance,
                          {"confidence_loss": float(confidence.detach()), "balance": float(balance.detach()),
                           "confident": int((p_max > self.gamma).sum())})


@register("deyo")
class DeYO(Method):
    """DeYO (Lee et al., ICLR 2024): entropy of queries that are confident *and* whose prediction
    depends on structure — the probability of the predicted gallery item must drop by more than
    ``plpd_threshold`` when the query is shuffled (PLPD).  Image queries are patch-shuffled; text
    queries are word-shuffled (the token-shuffle analogue); video frames are each patch-shuffled and audio
    is cut into time segments that are permuted (see :func:`shuffle_queries`).  Kept queries
    are weighted by exp(E0 − H) + exp(PLPD), as in the paper.
    """

    @dataclass(frozen=True)
    class Options(entropy_filter_options(e_margin_default=0.5)):
        plpd_threshold: float = option(0.2, "keep queries whose predicted item's probability drops by more than "
                                            "this when the query is shuffled (PLPD)")
        grid: int = option(4, "patch grid of the image shuffle (grid × grid patches)", minimum=1)
        seed: int = option(0, "seed of the shuffles")

    def setup(self) -> None:
        o = self.opts
        self.temperature, self.plpd_threshold, self.grid = o.temperature, o.plpd_threshold, o.grid
        self.e0 = entropy_margin(o.e_margin, self.n_columns)
        self.gen = torch.Generator().manual_seed(o.seed)
        self._shuffled_z: torch.Tensor | None = None

    def extra_state(self) -> dict:
        return {"generator": self.gen.get_state()}  # the patch shuffles to come

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.gen.set_state(state["generator"])

    def on_batch_start(self, items) -> None:
        with torch.no_grad():
            self._shuffled_z = self.encode(shuffle_queries(items, self.grid, self.gen)).detach()

    def loss(self, z, sims, step, labels):
        logits = sims / self.temperature
        h = softmax_entropy(logits)
        p = logits.softmax(1).detach()
        pred = p.argmax(1)
        p_shuf = (self.score_rows(self._shuffled_z, self.cols) / self.temperature).softmax(1)
        plpd = p.gather(1, pred[:, None]).squeeze(1) - p_shuf.gather(1, pred[:, None]).squeeze(1)
        keep = (h.detach() < self.e0) & (plpd > self.plpd_threshold)
        logs = {"kept": int(keep.sum()), "entropy": float(h.mean().detach()), "plpd": float(plpd.mean())}
        if not bool(keep.any()):
            return StepOutput(None, logs)
        w = torch.exp(self.e0 - h.detach()) + torch.exp(plpd)
        return StepOutput((h * w)[keep].mean(), logs)
