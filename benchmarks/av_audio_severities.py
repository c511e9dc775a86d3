"""How the shipped AV model's a2v R@1 falls with the audio-noise severity, and the signal-to-noise ratio
each severity makes on the world's soundtracks (a diagnosis beside benchmarks/av_validity.py, which
measures severity 5 only).

    python benchmarks/av_audio_severities.py [--split val] [--every 5] [--weights av_model.pt]

Queries: every ``--every``-th clip of the split (400 of 2,000 by default), their soundtracks under each audio
noise of :mod:`qshift.shifts.audio` at severities 1–5; gallery: all the split's clips, clean, as the
benchmark renders them.  Prints one line per noise (R@1 by severity) and the mean SNR in dB by severity.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from qshift.bench.av_families import AUDIO_CORRUPTIONS, clean_videos
from qshift.data.av_world import load_av_split
from qshift.models.av_model import load_av_encoder
from qshift.shifts.audio import SEVERITIES, corrupt_audio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--weights", default=None, help="an AV checkpoint (default: the shipped one)")
    args = ap.parse_args()
    split, enc = load_av_split(args.split), load_av_encoder(args.weights)
    rows = np.arange(0, len(split), args.every)
    with torch.no_grad():
        videos = clean_videos(split, np.arange(len(split)))
        zv = torch.cat([enc.encode_video(videos[i:i + 200]) for i in range(0, len(videos), 200)])
    clean = split.audios(rows)
    ids = torch.as_tensor(rows)
    print(f"{args.split}: {len(rows)} queries, gallery {len(split)} clips; soundtrack RMS "
          f"{20 * np.log10(np.sqrt((clean ** 2).mean(1)).mean()):.1f} dBFS")
    print("noise            " + "  ".join(f"s{s} R@1 (SNR dB)" for s in SEVERITIES))
    for c in ("clean",) + AUDIO_CORRUPTIONS:
        cells = []
        for sev in SEVERITIES:
            x = clean if c == "clean" else np.stack(
                [corrupt_audio(clean[j], c, sev, item_id=int(r), seed=0) for j, r in enumerate(rows)]).astype(np.float32)
            with torch.no_grad():
                za = torch.cat([enc.encode_audio(x[i:i + 100]) for i in range(0, len(x), 100)])
            r1 = float(((za @ zv.T).argmax(1) == ids).float().mean() * 100)
            snr = 10 * np.log10((clean ** 2).sum(1) / np.maximum(((x - clean) ** 2).sum(1), 1e-12)).mean()
            cells.append(f"{r1:5.1f} ({'—' if c == 'clean' else f'{snr:+.1f}'})")
            if c == "clean":
                break
        print(f"{c:16s} " + "  ".join(f"{x:>15s}" for x in cells), flush=True)


if __name__ == "__main__":
    main()
