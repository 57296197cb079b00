"""What open-musiclm's resampler costs in preprocessing: soxr vs ``sinc_resample`` (torchaudio's windowed sinc,
which tokenization now uses so that tokens match open-musiclm's), on the work one decode task does per track:
30 s of 44.1 kHz mono to CLAP's 48 kHz, the semantic encoder's 16 kHz and EnCodec's 24 kHz.

Prints seconds of audio resampled (to all three rates) per wall second for both, and the ratio.
    python benchmarks/resample.py [--tracks 20 --threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from musiclm.audio.io import resample, sinc_resample

RATES = (48000, 16000, 24000)


def rate_of(fn, tracks: list[np.ndarray], rate: int) -> float:
    fn(tracks[0], rate, RATES[0])  # warm-up
    start = time.perf_counter()
    for x in tracks:
        for r in RATES:
            fn(x, rate, r)
    return sum(len(x) for x in tracks) / rate / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracks", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a decode task has one CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rate = 44100
    rng = np.random.default_rng(0)
    tracks = [(0.1 * rng.standard_normal(int(args.seconds * rate))).astype(np.float32) for _ in range(args.tracks)]
    soxr_rate = rate_of(resample, tracks, rate)
    sinc_rate = rate_of(sinc_resample, tracks, rate)
    print(f"{args.tracks} x {args.seconds:g} s at {rate} Hz -> {', '.join(str(r) for r in RATES)} Hz, "
          f"{args.threads} torch thread(s)")
    print(f"soxr:          {soxr_rate:8.0f} s of audio per s")
    print(f"sinc_resample: {sinc_rate:8.0f} s of audio per s")
    print(f"ratio soxr / sinc: {soxr_rate / sinc_rate:.2f}")


if __name__ == "__main__":
    main()
