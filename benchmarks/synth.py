"""The synthetic corpus's cost (the demo's first step, and the corpus of every test that trains an encoder): its
tracks rendered and MP3-encoded one after the other vs on a thread per CPU (``synth.write_corpus``'s default).

Prints tracks per second both ways, whether the files are byte-identical, and the ratio.
    python benchmarks/synth.py [--tracks 16 --seconds 10]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from musiclm.audio import synth


def timed(out: Path, tracks: int, seconds: float, threads: int) -> tuple[float, dict[str, bytes]]:
    start = time.perf_counter()
    synth.write_corpus(out, tracks, seconds, seed=5, threads=threads)
    rate = tracks / (time.perf_counter() - start)
    return rate, {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.mp3"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracks", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        serial, a = timed(Path(tmp, "serial"), args.tracks, args.seconds, 1)
        threaded, b = timed(Path(tmp, "threads"), args.tracks, args.seconds, cpus)
    print(f"{args.tracks} tracks of {args.seconds:g} s: one thread {serial:.2f} tracks/s, {cpus} threads "
          f"{threaded:.2f} tracks/s; files identical: {a == b}; ratio {threaded / serial:.2f}")


if __name__ == "__main__":
    main()
