"""musiclm fit-rvq: embed a folder of audio with CLAP on Ray Data and fit the token system's RVQ."""
from __future__ import annotations

import argparse

from jobs.common import actor_plan, add_fit_args, add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm fit-rvq", description=__doc__)
    add_fit_args(p, "an RVQ")
    p.add_argument("--steps", type=int, default=1000, help="EMA steps after k-means init (open-musiclm: 1000)")
    p.add_argument("--batch-size", type=int, default=2048, help="embeddings per EMA step")
    p.add_argument("--max-embeddings", type=int, default=200_000,
                   help="CLAP embeddings to fit on; the tracks sampled (uniformly, seeded) follow from it, about "
                        "21 windows per 30 s track, so only those are decoded")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.tokens.fit import fit_rvq, refuse_refit

    refuse_refit(args.token_system, "clap_rvq", args.overwrite)  # before Ray starts
    plan = actor_plan(args, connect(args), "fit-rvq's CLAP actors")
    fit_rvq(args.token_system, args.audio, plan, steps=args.steps, batch_size=args.batch_size,
            max_tracks=args.max_tracks, max_seconds=args.max_seconds, max_vectors=args.max_embeddings,
            seed=args.seed, overwrite=args.overwrite, log=log)


if __name__ == "__main__":
    run(main)
