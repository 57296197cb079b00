"""musiclm synth: write the synthetic music corpus (MP3 + FMA-style metadata + captions)."""
from __future__ import annotations

import argparse

from jobs.common import check_outputs, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm synth", description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-tracks", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each track")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(out=args.out)
    from musiclm.audio import synth

    tracks = synth.write_corpus(args.out, args.num_tracks, args.seconds, args.seed)
    genres = sorted({t.genre for t in tracks})
    log(f"wrote {len(tracks)} tracks of {args.seconds:g} s to {args.out} (genres: {', '.join(genres)})")


if __name__ == "__main__":
    run(main)
