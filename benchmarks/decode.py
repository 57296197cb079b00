"""Decode the same MP3s two ways in one run: soundfile (libsndfile + mpg123) vs PyAV (FFmpeg).

musiclm.audio.io tries soundfile first and falls back to PyAV; this measures why. Prints seconds of audio
decoded per wall second for both (single process, same files, resampled to 24 kHz mono) and the ratio.
    python benchmarks/decode.py [--tracks 8 --seconds 30]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from musiclm.audio import synth
from musiclm.audio.io import _decode_pyav, _decode_soundfile, resample


def run(decoder, files: list[bytes], rate: int) -> float:
    start = time.perf_counter()
    total = 0.0
    for data in files:
        audio, sr = decoder(data)
        total += len(resample(audio.mean(1), sr, rate)) / rate
    return total / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_corpus(tmp, args.tracks, args.seconds, seed=0)
        files = [f.read_bytes() for f in sorted(Path(tmp).rglob("*.mp3"))]
    run(_decode_soundfile, files[:1], 24000)  # warm up both
    run(_decode_pyav, files[:1], 24000)
    sf_speed = max(run(_decode_soundfile, files, 24000) for _ in range(args.repeats))
    av_speed = max(run(_decode_pyav, files, 24000) for _ in range(args.repeats))
    print(f"{args.tracks} MP3s x {args.seconds:g} s (44.1 kHz stereo) -> 24 kHz mono, best of {args.repeats}")
    print(f"soundfile: {sf_speed:8.0f} s of audio per s")
    print(f"PyAV:      {av_speed:8.0f} s of audio per s")
    print(f"ratio soundfile / PyAV: {sf_speed / av_speed:.2f}")


if __name__ == "__main__":
    main()
