"""musiclm fit-kmeans: extract semantic features of a folder of audio on Ray Data and fit the k-means."""
from __future__ import annotations

import argparse

from jobs.common import add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm fit-kmeans", description=__doc__)
    p.add_argument("--token-system", required=True, help="token-system directory (see init-token-system)")
    p.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
    p.add_argument("--frames-per-track", type=int, default=100, help="random feature frames kept per track")
    p.add_argument("--max-tracks", type=int, default=None, help="use a random subset of this many files")
    p.add_argument("--max-seconds", type=float, default=30.0, help="use at most this much of each track")
    p.add_argument("--max-frames", type=int, default=1_000_000, help="cap on feature frames kept in memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="re-fit a k-means that is already fitted")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.raycompute import plan_actors
    from musiclm.tokens.fit import fit_kmeans

    plan = plan_actors(connect(args), args.actors, args.gpus_per_actor)
    fit_kmeans(args.token_system, args.audio, plan, frames_per_track=args.frames_per_track,
               max_tracks=args.max_tracks, max_seconds=args.max_seconds, max_vectors=args.max_frames,
               seed=args.seed, overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
