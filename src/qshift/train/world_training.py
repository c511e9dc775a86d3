"""Train the embedded world's source model (``qshift train-world-model``).

Contrastive (symmetric InfoNCE) training on rendered scenes with generic augmentation only:
small translations and rescaling, brightness / contrast / saturation jitter (no hue: captions name
colours), mild Gaussian blur, Gaussian pixel noise (std up to 0.12, ImageNet-C's severity-1/2 level,
on half the images), mild JPEG re-encoding, no flips (captions say left and right), and on the text
side one-edit misspellings of 10 % of words (our own generic edit, not the benchmark's nlpaug
keyboard / OCR models), as web-trained retrieval models see noisy text.  Each image is paired with a
caption from a random source family, and image→text logits also see one *hard negative* caption
per image (the same scene with one attribute, position or binding changed), which teaches the
towers attribute binding.  The benchmark's corruption functions, held-out caption styles and
rendering domains are never used here.
"""
from __future__ import annotations

import io
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from qshift.data import world
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig, insert_image_mlp_norms, normalise_pixels
from qshift.retrieval.metrics import retrieval_metrics

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
N_HARD = 3


@dataclass
class TrainConfig:
    """Training recipe; the defaults reproduce the shipped model v6.1 (v3: steps 2500, typo_p 0.1,
    typo_max_edits 1, noise_std_max None (= 0.12), render_size 96, stem_norm False)."""
    seed: int = 0
    steps: int = 2300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 150
    pool_size: int = 80_000
    eval_every: int = 500
    hard_negatives: bool = True
    workers: int = 2
    # subword regularisation (like BPE-dropout): each n-gram piece of a word is dropped with this
    # probability at training time, never all pieces of a word
    piece_dropout: float = 0.0
    noise_p: float | None = None  # overrides AUGMENTATIONS["noise_p"] when set
    # overrides the upper end of AUGMENTATIONS["noise_std"] when set: 0.04 is well below ImageNet-C's
    # gaussian_noise severity 1 (0.08); None keeps 0.12 (v3)
    noise_std_max: float | None = 0.04
    # typo regularisation: each caption word is replaced, with this probability, by one of
    # ``typo_variants`` fixed misspellings of it (one random insert / delete / substitute / swap)
    typo_p: float = 0.3
    typo_variants: int = 16
    # each misspelling makes 1..typo_max_edits edits (uniform)
    typo_max_edits: int = 3
    # fine-tuning instead of training from scratch: start from these weights, and train only the
    # named tower ("both", "text" or "image"; the other is frozen and run without gradients)
    init_from: str | None = None
    train_towers: str = "both"
    # overrides the image tower's per-image input standardisation (also of a checkpoint given by
    # init_from); None keeps the model configuration's value
    standardise_input: bool | None = None
    # training scenes are rendered at this size and area-downsampled to the model's input size, as
    # the benchmark's images are (world.RENDER_SIZE); 96 reproduces the v3 weights, rendered at 96 px
    render_size: int = 192
    # from scratch: channel LayerNorms in the image stem (WorldModelConfig.stem_norm); a fine-tune
    # (init_from) keeps its checkpoint's architecture
    stem_norm: bool = True
    # mid-MLP LayerNorms in the image blocks (WorldModelConfig.image_mlp_norm). From scratch: the
    # architecture; with init_from, True inserts them into a checkpoint without them
    # (insert_image_mlp_norms, fitted on clean training scenes); None keeps the default / checkpoint's
    mlp_norm: bool | None = None
    # from scratch: after training, zero the embedding rows of n-gram buckets that no training word (nor
    # any of its typo variants) ever used, so an n-gram the model never saw (e.g. a test-time typo's)
    # adds nothing to its word instead of an untrained random vector; clean captions are unaffected
    zero_unseen_pieces: bool = True
    # low-frequency illumination augmentation: this share of training images is blended with a smooth
    # grey field, (x + a·P) / (1 + a), a ~ U(0, illum_amp_max); fog severity 1 is a = 1.5. Off (0) in v6.1
    illum_p: float = 0.0
    illum_amp_max: float = 0.0


# ------------------------------------------------------------------------------- the pool

def perturb_scene(scene: world.Scene, rng: np.random.Generator) -> world.Scene | None:
    """The same scene with one describable change (attribute, position or binding)."""
    objs = list(scene.objects)
    n = len(objs)
    kind = rng.choice(["colour", "shape", "size", "move", "swap_colour", "swap_shape", "swap_pos"]
                      if n > 1 else ["colour", "shape", "size", "move"])
    i = int(rng.integers(n))
    o = objs[i]
    if kind == "colour":
        objs[i] = replace(o, colour=list(world.COLOURS)[int(rng.integers(len(world.COLOURS)))])
    elif kind == "shape":
        objs[i] = replace(o, shape=world.SHAPES[int(rng.integers(len(world.SHAPES)))])
    elif kind == "size":
        objs[i] = replace(o, size="small" if o.size == "large" else "large")
    elif kind == "move":
        objs[i] = replace(o, x=float(rng.uniform(5, world.IMAGE_SIZE - 5)), y=float(rng.uniform(5, world.IMAGE_SIZE - 5)))
    else:
        j = int((i + 1 + rng.integers(n - 1)) % n)
        p = objs[j]
        if kind == "swap_colour":
            objs[i], objs[j] = replace(o, colour=p.colour), replace(p, colour=o.colour)
        elif kind == "swap_shape":
            objs[i], objs[j] = replace(o, shape=p.shape), replace(p, shape=o.shape)
        else:
            objs[i], objs[j] = replace(o, x=p.x, y=p.y), replace(p, x=o.x, y=o.y)
    new = replace(scene, objects=tuple(objs))
    if new.layout_key == scene.layout_key:
        return None
    if len({(x.shape, x.colour) for x in objs}) < n:
        return None
    return new


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[list[str]], list[list[str]]]:
    start, stop, seed, render_size = args
    images, positives, negatives = [], [], []
    for idx in range(start, stop):
        scene, caps = world.train_scene(idx, seed=world.TRAIN_SEED + 1000 * seed)
        rng = np.random.default_rng(np.random.SeedSequence([seed, idx, 7]))
        img = world.render_scene(scene, size=render_size)
        if rng.random() < AUGMENTATIONS["jpeg_p"]:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(*AUGMENTATIONS["jpeg_quality"])))
            img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        images.append(world.area_downsample(img[None])[0])
        pos = [caps[f] for f in world.SOURCE_FAMILIES]
        negs: list[str] = []
        for _ in range(20):
            if len(negs) == N_HARD:
                break
            bad = perturb_scene(scene, rng)
            if bad is None:
                continue
            fam = world.SOURCE_FAMILIES[int(rng.integers(len(world.SOURCE_FAMILIES)))]
            text = world.caption_scene(bad, fam, rng)
            if text not in pos and text not in negs:
                negs.append(text)
        while len(negs) < N_HARD:  # fall back to another scene's caption
            other, oc = world.train_scene(idx + 10_000_000, seed=world.TRAIN_SEED + 1000 * seed)
            negs.append(oc[world.SOURCE_FAMILIES[len(negs)]])
        positives.append(pos)
        negatives.append(negs)
    return np.stack(images), positives, negatives


@dataclass
class Pool:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    pos_words: torch.Tensor  # int32 [N, F, L]
    neg_words: torch.Tensor  # int32 [N, H, L]
    vocab: list[str]


def build_pool(cfg: TrainConfig, progress: bool = True) -> Pool:
    """Render ``pool_size`` training scenes with their captions, in parallel, deterministically."""
    chunk = 1000
    if cfg.render_size % world.IMAGE_SIZE:
        raise ValueError(f"render_size must be a multiple of {world.IMAGE_SIZE}, got {cfg.render_size}")
    jobs = [(s, min(s + chunk, cfg.pool_size), cfg.seed, cfg.render_size) for s in range(0, cfg.pool_size, chunk)]
    images, pos, neg = [], [], []
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as ex:
        for im, p, n in tqdm(ex.map(_render_chunk, jobs), total=len(jobs), desc="rendering training scenes",
                             disable=not progress, unit="k scenes"):
            images.append(im)
            pos.extend(p)
            neg.extend(n)
    vocab: dict[str, int] = {"": 0}
    from qshift.models.tokenizer import NgramTokenizer

    def words(texts: list[list[str]]) -> torch.Tensor:
        seqs = [[[vocab.setdefault(w, len(vocab)) for w in NgramTokenizer.split_words(t)] for t in row] for row in texts]
        L = max(len(s) for row in seqs for s in row)
        out = torch.zeros(len(seqs), len(seqs[0]), L, dtype=torch.int32)
        for i, row in enumerate(seqs):
            for j, s in enumerate(row):
                out[i, j, : len(s)] = torch.tensor(s, dtype=torch.int32)
        return out

    pw, nw = words(pos), words(neg)
    return Pool(torch.from_numpy(np.concatenate(images)), pw, nw, [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])])


# ------------------------------------------------------------------------------ augmentation

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def misspell(word: str, rng: np.random.Generator, edits: int = 1) -> str:
    """``word`` with ``edits`` successive random character edits (insert, delete, substitute or
    adjacent swap); words shorter than 3 characters are left alone."""
    if len(word) < 3:
        return word
    for _ in range(edits - 1):
        word = _one_edit(word, rng) if len(word) >= 3 else word
    return _one_edit(word, rng) if len(word) >= 3 else word


def _one_edit(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(len(word)))
    op = int(rng.integers(4))
    c = _LETTERS[int(rng.integers(26))]
    if op == 0:
        return word[:i] + c + word[i:]
    if op == 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + c + word[i + 1:]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def typo_table(model: WorldDualEncoder, vocab: list[str], k: int, seed: int, max_edits: int = 1) -> torch.Tensor:
    """[V, 1 + k, P] piece ids: slot 0 the word itself, slots 1..k fixed misspellings of it, each with
    1..``max_edits`` edits."""
    if max_edits < 1:
        raise ValueError(f"max_edits must be at least 1, got {max_edits}")
    tok = model.tokenizer
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))

    def variant(w: str) -> tuple[int, ...]:
        # with max_edits == 1 no extra number is drawn, so the shipped table is reproduced exactly
        edits = 1 if max_edits == 1 else int(rng.integers(1, max_edits + 1))
        return tok.word_pieces(misspell(w, rng, edits))

    rows = [[tok.word_pieces(w) if w else ()] + [variant(w) if w else () for _ in range(k)] for w in vocab]
    P = max(len(r) for row in rows for r in row)
    out = torch.zeros(len(vocab), 1 + k, P, dtype=torch.long)
    for i, row in enumerate(rows):
        for j, r in enumerate(row):
            out[i, j, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def word_pieces_with_typos(table: torch.Tensor, words: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Look up [B, L] word ids in a :func:`typo_table`, each word misspelt with probability ``p``."""
    if p <= 0:
        return table[words, 0]
    k = table.shape[1] - 1
    slot = torch.randint(1, k + 1, words.shape, generator=gen)
    slot = torch.where(torch.rand(words.shape, generator=gen) < p, slot, torch.zeros_like(slot))
    return table[words, slot]


def drop_pieces(pieces: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each non-padding piece with probability ``p``; a word that would lose all keeps its own."""
    if p <= 0:
        return pieces
    real = pieces > 0
    drop = (torch.rand(pieces.shape, generator=gen) < p) & real
    emptied = (real & ~drop).sum(-1) == 0
    drop[emptied] = False
    return pieces.masked_fill(drop, 0)


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


# -------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_split(model: WorldDualEncoder, split: world.WorldSplit, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Clean i2t and t2i metrics of ``model`` on ``split``."""
    model.eval()
    imgs = split.images()
    zi = torch.cat([model.encode_image(imgs[s:s + batch_size]) for s in range(0, len(imgs), batch_size)])
    zt = torch.cat([model.encode_text(split.captions[s:s + batch_size]) for s in range(0, len(split.captions), batch_size)])
    image_ids = torch.arange(len(imgs))
    cap_ids = torch.as_tensor(split.caption_image)
    return {
        "i2t": retrieval_metrics(zi @ zt.T, image_ids, cap_ids),
        "t2i": retrieval_metrics(zt @ zi.T, cap_ids, image_ids),
    }


# --------------------------------------------------------------------------------- training

def _param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pieces" in name or name.endswith((".pos", ".cls")) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def parent_record(card: dict) -> dict:
    """What a fine-tuned model's card keeps of the checkpoint it started from: how that was made and
    how long the whole chain of trainings took (the 60-minute budget is for the chain)."""
    own = float(card.get("total_seconds", 0.0))
    return {"command": card.get("command"), "total_seconds": own,
            "chain_total_seconds": float(card.get("chain_total_seconds", own)),
            "train_config": card.get("train_config"), "augmentations": card.get("augmentations"),
            "parent": card.get("parent")}


def zero_unseen_pieces(model: WorldDualEncoder, seen: torch.Tensor) -> int:
    """Zero the text tower's n-gram embedding rows whose bucket is not in ``seen`` (bool [n_buckets]).

    An n-gram bucket that training never used still holds its random initialisation; at test time a
    misspelt word's new n-grams would add that noise to the word.  Zeroed, they add nothing, and a typo
    keeps the (scaled) meaning of the n-grams it shares with the correct word.  Words made only of
    seen n-grams (every clean caption of the world) encode exactly as before.  Returns the rows zeroed
    (the padding row 0 is zero already and not counted)."""
    emb = model.text.pieces.weight
    if seen.shape != (emb.shape[0],) or seen.dtype != torch.bool:
        raise ValueError(f"seen must be a bool tensor of shape ({emb.shape[0]},), got {seen.dtype} {tuple(seen.shape)}")
    unseen = ~seen.clone()
    unseen[0] = False
    with torch.no_grad():
        emb[unseen] = 0
    return int(unseen.sum())


def trained_pieces_by_init(model: WorldDualEncoder, seed: int = 0, tol: float = 2e-3) -> torch.Tensor:
    """For a model trained from scratch by :func:`train_world_model` with ``seed``: the bool mask of n-gram
    buckets training used, found by rebuilding the seeded initialisation (a bucket never used gets no
    gradient, and AdamW without weight decay on the embeddings leaves it exactly at its initial value;
    ``tol`` is the relative change below which a row counts as unmoved, above fp16 rounding).  Used to apply :func:`zero_unseen_pieces` to a model trained before that step
    existed (v6; the result is the shipped v6.1)."""
    torch.manual_seed(seed)
    init = WorldDualEncoder(model.cfg).text.pieces.weight.detach()
    trained = model.text.pieces.weight.detach().float()
    moved = (trained - init).norm(dim=1) / init.norm(dim=1).clamp(min=1e-6)
    seen = moved > tol
    seen[0] = True
    return seen


def train_world_model(cfg: TrainConfig, model_cfg: WorldModelConfig | None = None, out: str | Path | None = None,
                      progress: bool = True, log=None) -> tuple[WorldDualEncoder, dict]:
    """Train a world dual encoder from scratch; returns the model and a training record."""
    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if cfg.train_towers not in ("both", "text", "image"):
        raise ValueError(f"train_towers must be 'both', 'text' or 'image', got {cfg.train_towers!r}")
    if cfg.init_from is not None:
        if model_cfg is not None:
            raise ValueError("init_from takes the model configuration from the checkpoint; do not pass model_cfg")
        model = WorldDualEncoder.load(cfg.init_from).float()
        parent = parent_record(model.card)
        log(f"fine-tuning from {cfg.init_from} (towers trained: {cfg.train_towers})")
    else:
        parent = None
        if cfg.train_towers != "both":
            raise ValueError("training a single tower needs init_from (the other tower must come from somewhere)")
        model = WorldDualEncoder(model_cfg or WorldModelConfig(stem_norm=cfg.stem_norm,
                                                               image_mlp_norm=bool(cfg.mlp_norm)))
    if cfg.standardise_input is not None:
        model.cfg = replace(model.cfg, standardise_input=bool(cfg.standardise_input))
        model.visual.standardise_input = bool(cfg.standardise_input)
        log(f"input standardisation: {'on' if cfg.standardise_input else 'off'}")
    frozen = {"text": model.visual, "image": model.text}.get(cfg.train_towers)
    if frozen is not None:
        frozen.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    pool = build_pool(cfg, progress=progress)
    t_pool = time.time() - t0
    log(f"pool: {len(pool.images)} scenes, vocab {len(pool.vocab)} words, rendered in {t_pool:.0f}s")
    if cfg.init_from is not None and cfg.mlp_norm is not None and cfg.mlp_norm != model.cfg.image_mlp_norm:
        if not cfg.mlp_norm:
            raise ValueError("the checkpoint has mid-MLP LayerNorms; a fine-tune cannot remove them")
        if cfg.train_towers == "text":
            raise ValueError("inserting image mid-MLP LayerNorms needs the image tower trained (--train-towers "
                             "image or both)")
        insert_image_mlp_norms(model, model.preprocess_images(pool.images[:512]))
        log("inserted mid-MLP LayerNorms into the image blocks (fitted on 512 clean training scenes)")
    table = typo_table(model, pool.vocab, cfg.typo_variants, cfg.seed, cfg.typo_max_edits)
    val = world.load_split("val")
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = torch.zeros(model.text.pieces.num_embeddings, dtype=torch.bool)
    history = []
    N, n_fam = pool.pos_words.shape[:2]
    bar = tqdm(range(cfg.steps), desc="training", disable=not progress)
    t_train = time.time()
    for step in bar:
        model.train()
        idx = torch.randint(N, (cfg.batch_size,), generator=gen)
        fam = torch.randint(n_fam, (cfg.batch_size,), generator=gen)
        x = augment(pool.images[idx], gen, cfg.noise_p, cfg.noise_std_max, cfg.illum_p, cfg.illum_amp_max)
        words = pool.pos_words[idx, fam].long()
        if cfg.hard_negatives:
            hn = torch.randint(pool.neg_words.shape[1], (cfg.batch_size,), generator=gen)
            neg = pool.neg_words[idx, hn].long()
            L = max(words.shape[1], neg.shape[1])
            words = torch.cat([F.pad(words, (0, L - words.shape[1])), F.pad(neg, (0, L - neg.shape[1]))])
        keep = int((words > 0).any(0).nonzero().max()) + 1
        pieces = drop_pieces(word_pieces_with_typos(table, words[:, :keep], cfg.typo_p, gen), cfg.piece_dropout, gen)
        seen[pieces.unique()] = True
        with torch.set_grad_enabled(cfg.train_towers != "text"):
            zi = F.normalize(model.visual(x), dim=-1)
        with torch.set_grad_enabled(cfg.train_towers != "image"):
            zt = F.normalize(model.text(pieces), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        B = cfg.batch_size
        logits = scale * zi @ zt.T  # [B, B(+B)]
        target = torch.arange(B)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = evaluate_split(model, val)
            rec = {"step": step + 1, "loss": loss.item(), "minutes": (time.time() - t0) / 60,
                   "val_i2t_R@1": m["i2t"]["R@1"], "val_t2i_R@1": m["t2i"]["R@1"]}
            history.append(rec)
            log(f"step {step + 1}: loss {loss.item():.3f}  val i2t R@1 {m['i2t']['R@1']:.1f}  "
                f"t2i R@1 {m['t2i']['R@1']:.1f}  ({rec['minutes']:.1f} min)")
    model.eval()
    zeroed = 0
    if cfg.zero_unseen_pieces and cfg.init_from is None:
        zeroed = zero_unseen_pieces(model, seen)
        log(f"n-gram buckets never used in training, zeroed: {zeroed} of {len(seen) - 1}")
    record = {
        "train_config": asdict(cfg),
        "model_config": asdict(model.cfg),
        "world_variant": world.world_variant(),
        "augmentations": {**AUGMENTATIONS, **({"noise_p": cfg.noise_p} if cfg.noise_p is not None else {}),
                          **({"noise_std": (0.0, cfg.noise_std_max)} if cfg.noise_std_max is not None else {}),
                          "piece_dropout": cfg.piece_dropout, "typo_p": cfg.typo_p, "typo_max_edits": cfg.typo_max_edits,
                          "illum_p": cfg.illum_p, "illum_amp_max": cfg.illum_amp_max},
        "hard_negatives_per_image": N_HARD if cfg.hard_negatives else 0,
        "pool_seconds": round(t_pool, 1),
        "train_seconds": round(time.time() - t_train, 1),
        "total_seconds": round(time.time() - t0, 1),
        "history": history,
        "hardware": {"platform": platform.platform(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "unseen_pieces_zeroed": zeroed,
    }
    record["parent"] = parent
    record["chain_total_seconds"] = round(record["total_seconds"] + (parent or {}).get("chain_total_seconds", 0.0), 1)
    if out is not None:
        model.save(out, card=record)
    return model, record
