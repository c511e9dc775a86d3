"""Per-batch wall time: inference only vs each method's adaptation (all inner steps) on one batch.

    python benchmarks/step_cost.py [--batch 64] [--repeats 5] [--methods source,tent,...]
    python benchmarks/step_cost.py --skip-world --vit-batch 8      # only open_clip ViT-B/16
    python benchmarks/step_cost.py --skip-vit                      # only the world model
    python benchmarks/step_cost.py --skip-vit --methods "source,tcr,rest,rest[gen_refresh=batch]"
    python benchmarks/step_cost.py --av                            # the video-audio task (see below)

Uses the shipped world model on image queries (i2t) against the 10,000-caption gallery; the methods
are interleaved within each repeat, and it prints the min and the median over repeats, the ratio to
inference, and REST / TCR.  With open_clip installed it also times
a randomly initialised ViT-B/16 image tower at B = 8 (no weights are downloaded).

``--av`` times the video-audio task instead: the shipped AV model in both directions (v2a: clips against
the 2,000 clean test soundtracks; a2v: soundtracks against the clips) at ``--batch``, and a randomly
initialised CAV-MAE-sized encoder (ViT-B: width 768, 11 + 11 modality blocks and 1 shared block, 224-px
frames, 1,024 filterbank frames) at ``--vit-batch``, v2a and a2v against a random 2,000 × 768 gallery.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np
import torch

from qshift.data import av_world, world
from qshift.methods import available_methods, create
from qshift.methods.base import method_class
from qshift.models.av_model import load_av_model
from qshift.models.cavmae import CAVMAEConfig, CAVMAEEncoder, CAVMAERetrievalModel
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.retrieval.encode import encode_batched


def time_methods(model, gallery, gallery_ids, items, methods, repeats):
    """Seconds per batch of each method, {name: (min, median)}: the methods interleaved within each
    repeat (source, tent, …, then again), so that a slower or busier stretch of the machine falls on
    every method alike, and the ratios are measured side by side."""
    built = {}
    for name in methods:
        method, options = parse_spec(name)
        m = create(method, model, gallery, gallery_ids=gallery_ids, **options)
        labels = torch.zeros(len(items), dtype=torch.long) if m.uses_labels else None
        m.adapt_batch(items, labels=labels)  # warm-up (and fills TCR's queue)
        built[name] = (m, labels)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (m, labels) in built.items():
            t = time.perf_counter()
            m.adapt_batch(items, labels=labels)
            times[name].append(time.perf_counter() - t)
    for m, _ in built.values():
        m.reset()
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


def split_specs(text: str) -> list[str]:
    """Method specs separated by commas outside brackets."""
    return [m.strip() for m in re.split(r",(?![^\[]*\])", text) if m.strip()]


def parse_spec(spec: str) -> tuple[str, dict]:
    """``rest[projection_space=embeddings,gen_refresh=batch]`` → (``rest``, its options, typed)."""
    name, _, rest = spec.partition("[")
    options = {}
    if rest:
        cls = method_class(name)
        for item in rest.rstrip("]").split(","):
            key, _, text = item.partition("=")
            options[key] = cls.Options.parse_value(key, text)
    return name, options


def print_table(t: dict[str, tuple[float, float]]) -> None:
    """Seconds per batch (min and median over the interleaved repeats), the ratio to inference, REST / TCR."""
    base_min, base_med = t["source"]
    width = max(10, *(len(n) for n in t))
    print(f"{'method':<{width}} {'min s':>8} {'median s':>9} {'× inference (min)':>18} {'/ TCR (min, median)':>20}")
    tcr = t.get("tcr")
    for name, (lo, med) in t.items():
        ratio = f"{lo / tcr[0]:.2f}, {med / tcr[1]:.2f}" if tcr else ""
        print(f"{name:<{width}} {lo:>8.3f} {med:>9.3f} {lo / base_min:>18.1f} {ratio:>20}")
    if "rest" in t and "tcr" in t:
        print(f"REST / TCR = {t['rest'][0] / t['tcr'][0]:.2f} (min), {t['rest'][1] / t['tcr'][1]:.2f} (median)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(m for m in available_methods() if m != "oracle"))
    ap.add_argument("--vit-batch", type=int, default=8)
    ap.add_argument("--vit-methods", default="source,tent,tcr,rest")
    ap.add_argument("--skip-world", action="store_true", help="only the open_clip ViT-B/16 timing")
    ap.add_argument("--skip-vit", action="store_true", help="only the world-model timing")
    ap.add_argument("--av", action="store_true", help="the video-audio task: the AV model and a CAV-MAE-sized one")
    args = ap.parse_args()
    if args.av:
        methods = split_specs(args.methods)
        time_av(args.batch, args.repeats, methods if "source" in methods else ["source", *methods])
        if not args.skip_vit:
            time_cavmae(args.vit_batch, args.repeats, split_specs(args.vit_methods))
        return
    if args.skip_world:
        time_openclip(args.vit_batch, args.repeats, split_specs(args.vit_methods))
        return
    methods = split_specs(args.methods)
    if "source" not in methods:
        methods.insert(0, "source")
    test = world.load_split("test")
    model = WorldRetrievalModel(load_world_model(), "image")
    gallery = encode_batched(model.encode_gallery, test.captions)
    items = test.images(list(range(args.batch)))
    print(f"world model, i2t, B = {args.batch}, gallery {len(gallery)}, {torch.get_num_threads()} threads, "
          f"min and median of {args.repeats} interleaved repeats")
    t = time_methods(model, gallery, torch.as_tensor(test.caption_image), items, methods, args.repeats)
    print_table(t)
    if args.skip_vit:
        return
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("open_clip not installed: skipping the ViT-B/16 timing")
        return
    vit_methods = split_specs(args.vit_methods)
    time_openclip(args.vit_batch, args.repeats, vit_methods)


def time_openclip(batch: int, repeats: int, methods: list[str], gallery_size: int = 5000) -> None:
    """A randomly initialised open_clip ViT-B/16 image tower (no download) at batch ``batch``."""
    import resource

    from qshift.models.openclip_model import load_openclip

    torch.manual_seed(0)
    model = load_openclip("ViT-B-16", "random", "image")
    gallery = torch.nn.functional.normalize(torch.randn(gallery_size, 512), dim=-1)
    gallery_ids = torch.arange(gallery_size) // 5
    items = torch.randn(batch, 3, 224, 224)
    n_adapt = sum(p.numel() for _, p in model.adaptable_parameters())
    n_total = sum(p.numel() for p in model.query_tower().parameters())
    print(f"\nopen_clip ViT-B/16 (random weights), i2t, B = {batch}, random gallery {gallery_size} × 512, "
          f"adapted {n_adapt:,} of {n_total:,} image-tower parameters, min and median of {repeats} interleaved repeats")
    if "source" not in methods:
        methods = ["source", *methods]
    t = time_methods(model, gallery, gallery_ids, items, methods, repeats)
    print_table(t)
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def time_av(batch: int, repeats: int, methods: list[str]) -> None:
    """The shipped AV model, v2a and a2v, ``batch`` test queries against the 2,000 clean test items."""
    test = av_world.load_av_split("test")
    videos, audios = test.videos(), test.audios()
    for direction, queries, gallery_items in (("v2a", videos, audios), ("a2v", audios, videos)):
        model = load_av_model(None, direction)
        gallery = encode_batched(model.encode_gallery, gallery_items)
        print(f"\nAV world model, {direction}, B = {batch}, gallery {len(gallery)}, {torch.get_num_threads()} threads, "
              f"min and median of {repeats} interleaved repeats")
        print_table(time_methods(model, gallery, torch.as_tensor(test.ids), queries[:batch], methods, repeats))


def time_cavmae(batch: int, repeats: int, methods: list[str], gallery_size: int = 2000) -> None:
    """A randomly initialised CAV-MAE-sized encoder (no download), v2a and a2v, at batch ``batch``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = CAVMAEConfig()
    encoder = CAVMAEEncoder(cfg).eval()
    gallery = torch.nn.functional.normalize(torch.randn(gallery_size, cfg.embed_dim), dim=-1)
    gallery_ids = torch.arange(gallery_size)
    queries = {"v2a": rng.integers(0, 256, (batch, 1, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
               "a2v": (rng.standard_normal((batch, 160_000)) * 0.1).astype(np.float32)}  # 10 s at 16 kHz
    if "source" not in methods:
        methods = ["source", *methods]
    for direction, items in queries.items():
        model = CAVMAERetrievalModel(encoder, direction)
        n_adapt = sum(p.numel() for _, p in model.adaptable_parameters())
        print(f"\nCAV-MAE-sized encoder (random weights), {direction}, B = {batch}, random gallery {gallery_size} × "
              f"{cfg.embed_dim}, {n_adapt:,} adapted parameters, min and median of {repeats} interleaved repeats")
        print_table(time_methods(model, gallery, gallery_ids, items, methods, repeats))


if __name__ == "__main__":
    main()
