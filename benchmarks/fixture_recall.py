"""R@1 of each tiny test backbone on its fixture against a constant model's (the fixtures can retrieve).

    python benchmarks/fixture_recall.py

Builds the tiny open_clip / HF CLIP / HF BLIP models of tests/backbone_fixtures.py in a temporary folder,
loads each back through ``qshift.load_model`` and prints what tests/test_backbones.py asserts: the
largest off-diagonal cosine of image and of text embeddings, R@1 (i2t / t2i) at random initialisation
and after a 60-step fit of the two projection layers, and a constant model's R@1.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from backbone_fixtures import TINY_OPENCLIP, tiny_hf_blip, tiny_hf_clip, tiny_openclip_checkpoint  # noqa: E402
from test_backbones import fixture_recall  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="qshift-fixtures-"))
    specs = {"openclip": (f"openclip:{TINY_OPENCLIP}", tiny_openclip_checkpoint(root / "openclip")),
             "hf-clip": (f"hf-clip:{tiny_hf_clip(root / 'clip')}", None),
             "hf-blip": (f"hf-blip:{tiny_hf_blip(root / 'blip')}", None)}
    print("| backbone | max image cos | max text cos | R@1 random init (i2t / t2i) | R@1 after fit | constant model |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for which, (spec, weights) in specs.items():
        r = fixture_recall(which, spec, weights)
        print(f"| {which} | {r['image_cos_max']:.4f} | {r['text_cos_max']:.4f} | {r['random_init'][0]:.1f} / "
              f"{r['random_init'][1]:.1f} | {r['fitted'][0]:.1f} / {r['fitted'][1]:.1f} | {r['constant']:.1f} |")
    print("\n8 fixture pairs (chance 12.5).")


if __name__ == "__main__":
    main()
