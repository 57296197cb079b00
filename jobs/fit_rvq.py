"""musiclm fit-rvq: embed a folder of audio with CLAP on Ray Data and fit the token system's RVQ."""
from __future__ import annotations

import argparse

from jobs.common import add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm fit-rvq", description=__doc__)
    p.add_argument("--token-system", required=True, help="token-system directory (see init-token-system)")
    p.add_argument("--audio", required=True, help="folder of audio files (searched recursively)")
    p.add_argument("--steps", type=int, default=1000, help="EMA steps after k-means init (open-musiclm: 1000)")
    p.add_argument("--batch-size", type=int, default=2048, help="embeddings per EMA step")
    p.add_argument("--max-tracks", type=int, default=None, help="use a random subset of this many files")
    p.add_argument("--max-seconds", type=float, default=30.0, help="use at most this much of each track")
    p.add_argument("--max-embeddings", type=int, default=200_000, help="cap on embeddings kept in memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="re-fit an RVQ that is already fitted")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.raycompute import plan_actors
    from musiclm.tokens.fit import fit_rvq

    plan = plan_actors(connect(args), args.actors, args.gpus_per_actor)
    fit_rvq(args.token_system, args.audio, plan, steps=args.steps, batch_size=args.batch_size,
            max_tracks=args.max_tracks, max_seconds=args.max_seconds, max_vectors=args.max_embeddings,
            seed=args.seed, overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
