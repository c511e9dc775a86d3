"""The training pool of the world model: rendered training scenes (JPEG re-encoded at random, then
area-downsampled), a caption per source family and hard-negative captions of perturbed scenes, with the
captions as word ids; rendered in parallel, deterministically."""
from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from qshift.data import world
from qshift.models.tokenizer import NgramTokenizer
from qshift.train.image_augment import AUGMENTATIONS
from qshift.train.recipe import TrainConfig

#: hard-negative captions rendered per training image
N_HARD = 3


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
