"""musiclm fit-kmeans: extract semantic features of a folder of audio on Ray Data and fit the k-means."""
from __future__ import annotations

import argparse

from jobs.common import actor_plan, add_fit_args, add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm fit-kmeans", description=__doc__)
    add_fit_args(p, "a k-means")
    p.add_argument("--frames-per-track", type=int, default=100, help="random feature frames kept per track")
    p.add_argument("--max-frames", type=int, default=1_000_000,
                   help="feature frames to fit on; the tracks sampled (uniformly, seeded) follow from it at "
                        "--frames-per-track each, so only those are decoded")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.tokens.fit import fit_kmeans, refuse_refit

    refuse_refit(args.token_system, "semantic_kmeans", args.overwrite)  # before Ray starts
    plan = actor_plan(args, connect(args), "fit-kmeans's semantic-encoder actors")
    fit_kmeans(args.token_system, args.audio, plan, frames_per_track=args.frames_per_track,
               max_tracks=args.max_tracks, max_seconds=args.max_seconds, max_vectors=args.max_frames,
               seed=args.seed, overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
