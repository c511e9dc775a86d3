"""Every bad input of the reliability and real-data issues through the ``qshift`` command line: the
command, its exit status, how long it took, and the lines it printed on stderr.

    python benchmarks/bad_inputs.py [--out TABLE.md]

Fixtures (tiny random backbones in their real checkpoint formats, a six-image COCO folder) are built
in a temporary folder first; each command runs in a fresh process with an empty benchmark cache, as a
new user's would.  A row passes when the command exits 2 (1 for a failed write after a finished run)
with exactly one ``error:`` line and no traceback.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from backbone_fixtures import (TINY_OPENCLIP, tiny_hf_blip, tiny_hf_clip, tiny_karpathy,  # noqa: E402
                               tiny_openclip_checkpoint)


def _fixtures(root: Path) -> dict[str, str]:
    ckpt = tiny_openclip_checkpoint(root / "openclip")
    arch = str(Path(ckpt).parent / f"{TINY_OPENCLIP}.json")
    clip, blip = tiny_hf_clip(root / "clip"), tiny_hf_blip(root / "blip")
    notok = root / "clip_notok"
    shutil.copytree(clip, notok)
    for f in notok.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    bad_ckpt = root / "mismatch.pt"
    sd = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in sd["state_dict"].items() if v.ndim == 2)
    sd["state_dict"][key] = torch.zeros(3, 3)
    torch.save(sd, bad_ckpt)
    world = root / "world_bad.pt"
    from qshift.models.world_model import load_world_model

    load_world_model().save(world)
    payload = torch.load(world, weights_only=True)
    wkey = next(k for k, v in payload["state_dict"].items() if v.ndim == 2)
    payload["state_dict"][wkey] = torch.zeros(3, 3)
    torch.save(payload, world)
    coco = tiny_karpathy(root / "coco", n_images=6)
    afile = root / "afile"
    afile.write_text("x")
    grids = {
        "syntax": "methods: [tcr\nbenchmarks: [world-clean/i2t]\n",
        "unsafe": "methods: [tcr]\nbenchmarks: [world-clean/i2t]\nx: !!python/object/apply:os.system ['true']\n",
        "empty": "methods: []\nbenchmarks: [world-clean/i2t]\n",
        "only_list": "methods: [tcr]\nbenchmarks: [world-clean/i2t]\nonly: [tcr]\n",
        "only_unmatched": "methods: [tcr]\nbenchmarks: [world-clean/i2t]\nonly: {'world-c/*': [tcr]}\n",
        "label": "methods: [{name: tcr, label: ../../escape}]\nbenchmarks: [world-clean/i2t]\n",
    }
    for name, text in grids.items():
        (root / f"grid_{name}.yaml").write_text(text)
    return {"ckpt": ckpt, "arch": arch, "clip": str(clip), "blip": str(blip), "notok": str(notok),
            "bad_ckpt": str(bad_ckpt), "world_bad": str(world), "coco": str(coco), "afile": str(afile),
            "root": str(root)}


def _cases(f: dict[str, str]) -> list[tuple[str, list[str], int]]:
    real = ["--dataset", "coco", "--data-root", f["coco"], "--benchmark", "coco/i2t", "--json"]
    run = ["run", "--benchmark", "world-c/i2t/glass_blur/5"]
    return [
        ("unknown method", [*run, "--method", "nosuch"], 2),
        ("mistyped method option", [*run, "--method", "rest", "--set", "lambda_u=abc"], 2),
        ("unknown option", [*run, "--method", "tcr", "--set", "lambda_zz=1"], 2),
        ("scoring=bogus", [*run, "--method", "tcr", "--set", "scoring=bogus"], 2),
        ("lr=nan", [*run, "--method", "tcr", "--set", "lr=nan"], 2),
        ("batch_size=100000", [*run, "--method", "tcr", "--set", "batch_size=100000"], 2),
        ("--out is a file", [*run, "--method", "tcr", "--out", f["afile"]], 2),
        ("unknown benchmark", ["run", "--method", "tcr", "--benchmark", "world-c/i2t/nosuch/5"], 2),
        ("grid: YAML syntax error", ["bench", "--grid", f"{f['root']}/grid_syntax.yaml"], 2),
        ("grid: unsafe YAML tag", ["bench", "--grid", f"{f['root']}/grid_unsafe.yaml"], 2),
        ("grid: methods: []", ["bench", "--grid", f"{f['root']}/grid_empty.yaml"], 2),
        ("grid: only: as a list", ["bench", "--grid", f"{f['root']}/grid_only_list.yaml"], 2),
        ("grid: only: matches nothing", ["bench", "--grid", f"{f['root']}/grid_only_unmatched.yaml"], 2),
        ("grid: label with ../", ["bench", "--grid", f"{f['root']}/grid_label.yaml"], 2),
        ("world checkpoint: tensors do not fit", ["eval", "--weights", f["world_bad"]], 2),
        ("HF CLIP folder without tokenizer", ["eval", "--model", f"hf-clip:{f['notok']}", *real], 2),
        ("CLIP folder passed as hf-blip", ["eval", "--model", f"hf-blip:{f['clip']}", *real], 2),
        ("BLIP folder passed as hf-clip", ["eval", "--model", f"hf-clip:{f['blip']}", *real], 2),
        ("openclip:ARCH without --weights", ["eval", "--model", f"openclip:{f['arch']}", *real], 2),
        ("checkpoint that does not match its config",
         ["eval", "--model", f"openclip:{f['arch']}", "--weights", f["bad_ckpt"], *real], 2),
        ("offline pretrained tag", ["eval", "--model", "openclip:ViT-B-32", "--weights", "openai", *real], 2),
        ("--device cuda without CUDA",
         ["eval", "--model", f"openclip:{f['arch']}", "--weights", f["ckpt"], "--device", "cuda", *real], 2),
        ("custom:nosuch:build", ["eval", "--model", "custom:nosuch:build", "--weights", "random", *real], 2),
        ("--dataset without --data-root", ["eval", "--model", f"openclip:{f['arch']}", "--weights", f["ckpt"],
                                           "--dataset", "coco", "--benchmark", "coco/i2t"], 2),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qshift-bad-inputs-"))
    fixtures = _fixtures(root)
    env = {**os.environ, "QSHIFT_CACHE": str(root / "empty-cache"), "COLUMNS": "80"}
    rows = ["| bad input | command | exit | seconds | stderr |", "| --- | --- | ---: | ---: | --- |"]
    ok = 0
    cases = _cases(fixtures)
    for what, argv, want in cases:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "qshift.cli", *argv], capture_output=True, text=True, env=env,
                           cwd=root)
        dt = time.perf_counter() - t0
        lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING:")]
        good = p.returncode == want and len([ln for ln in lines if ln.startswith("error:")]) == 1 \
            and "Traceback" not in p.stderr
        ok += good
        shown = " ".join(argv).replace(str(root), "$TMP")
        msg = " / ".join(lines).replace(str(root), "$TMP").replace("|", "\\|")
        rows.append(f"| {what}{'' if good else ' **(FAILS)**'} | `qshift {shown}` | {p.returncode} | {dt:.1f} | {msg} |")
    table = "\n".join(rows) + f"\n\n{ok} of {len(cases)} bad inputs end in one `error:` line with the expected exit status.\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
