"""Truncation detection two ways on one corpus: the length libsndfile declares vs what it decodes (the rule
before 2026-11-26) and the MP3's own frames (``musiclm.audio.mp3``, used by ``musiclm.audio.io.decode_audio`` now).

The corpus (``musiclm.audio.mp3_corpus.full_variants``): FFmpeg/libmp3lame and libsndfile/LAME, CBR/VBR/ABR,
8-48 kHz, mono/stereo, with and without a Xing/Info header, ID3v1/v2, music and digital silence, 3/30/60 s,
and WAV/FLAC/OGG/random bytes named .mp3; every file also cut at 33/50/90/99 % of its bytes and at an MPEG frame
boundary near the middle. Prints, for both rules: intact files rejected (goal 0) or decoding short, cut files
rejected as truncated, cut files kept (and whether their decoded length is below the intact one, i.e. stated
truthfully).
    python benchmarks/truncation.py [--seconds 30] [--keep DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import soundfile as sf

from musiclm.audio import mp3_corpus
from musiclm.audio.io import AudioDecodeError, decode_audio

TOLERANCE = 2 * 1152  # the old rule's allowance, in samples


def old_rule(path: Path) -> tuple[str, float]:
    """(verdict, decoded seconds) by libsndfile's declared length, falling back to FFmpeg as before."""
    try:
        with sf.SoundFile(str(path)) as f:
            declared, audio, rate = f.frames, f.read(dtype="float32", always_2d=True), f.samplerate
        if 0 < declared and len(audio) + TOLERANCE < declared:
            return "truncated", len(audio) / rate
        return ("kept", len(audio) / rate) if len(audio) else ("error", 0.0)
    except Exception:
        try:
            audio, rate = decode_audio(path)  # not an MP3 libsndfile reads: FFmpeg, as both rules do
            return "kept", len(audio) / rate
        except AudioDecodeError:
            return "error", 0.0


def new_rule(path: Path) -> tuple[str, float]:
    try:
        audio, rate = decode_audio(path)
        return "kept", len(audio) / rate
    except AudioDecodeError as e:
        return ("truncated" if e.kind == "truncated" else "error"), 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--keep", type=Path, help="write the corpus here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        files = mp3_corpus.write(root, mp3_corpus.full_variants(args.seconds))
        print(f"{len(files)} files: {sum(not f.cut for f in files)} intact, {sum(bool(f.cut) for f in files)} cut")
        for name, rule in (("libsndfile declared length (before)", old_rule), ("MP3 frames (now)", new_rule)):
            tally, notes = Counter(), []
            for f in files:
                verdict, seconds = rule(f.path)
                garbage = f.variant.container == "random"
                if not f.cut:
                    key = "garbage rejected" if garbage and verdict == "error" else f"intact {verdict}"
                    if verdict == "kept" and seconds < f.intact_seconds - 0.1:  # audio lost
                        key = "intact kept, but decodes SHORT"
                        notes.append(f"  intact {f.path.name}: decodes to {seconds:.2f} of {f.intact_seconds:.2f} s")
                    elif verdict == "kept" and seconds > f.intact_seconds + 0.1:  # no gapless info to trim with
                        key = "intact kept, with the encoder's delay"
                    elif verdict != "kept" and not garbage:
                        notes.append(f"  intact {f.path.name}: {verdict}")
                else:
                    key = f"cut {verdict}"
                    if verdict == "error":
                        notes.append(f"  cut {f.path.name}: rejected as not decodable")
                    if verdict == "kept":
                        truthful = seconds < f.intact_seconds - 0.05
                        key += " (shorter length stated)" if truthful else " (full length claimed!)"
                        notes.append(f"  cut {f.path.name}: kept, decodes to {seconds:.2f} of {f.intact_seconds:.2f} s")
                tally[key] += 1
            print(f"\n{name}:")
            for key, n in sorted(tally.items()):
                print(f"  {key:40s} {n}")
            for line in sorted(notes, key=lambda n: not n.startswith("  intact"))[:60]:
                print(line)


if __name__ == "__main__":
    main()
