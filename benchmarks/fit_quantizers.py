"""The token system's quantizers fitted two ways in one run, on the same corpus and local Ray:

(a) `fit-rvq` then `fit-kmeans`, each its own Ray Data pass (decode tasks -> its encoder's actor pool), and
(b) `fit_quantizers`: one pass, each track decoded once and one actor pool giving its vectors for both
    (the demo pipeline's `fit-quantizers` step).

Prints both wall times (each from a fresh copy of the same unfitted tiny token system, `ray.init` excluded), the
vectors each fit got, and the ratio (a)/(b).
    python benchmarks/fit_quantizers.py [--tracks 16 --seconds 12 --num-cpus 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=16)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rvq-steps", type=int, default=200)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()

    import ray

    from musiclm.audio import synth
    from musiclm.config import model_preset
    from musiclm.infra.raycompute import plan_actors
    from musiclm.tokens.fit import fit_kmeans, fit_quantizers, fit_rvq
    from musiclm.tokens.system import TokenSystem

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth.write_corpus(tmp / "corpus", num_tracks=args.tracks, seconds=args.seconds, seed=0)
        TokenSystem.create(model_preset("tiny").token_system(), tmp / "unfitted")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        plan = plan_actors(ray.cluster_resources())
        quiet = {"seed": 0, "log": lambda m: None}
        walls, reports = {}, {}
        for way in ("separate", "one pass"):
            ts = tmp / way.replace(" ", "_")
            shutil.copytree(tmp / "unfitted", ts)
            start = time.perf_counter()
            if way == "separate":
                fit_rvq(ts, tmp / "corpus", plan, steps=args.rvq_steps, **quiet)
                fit_kmeans(ts, tmp / "corpus", plan, frames_per_track=10_000, **quiet)
            else:
                fit_quantizers(ts, tmp / "corpus", plan, rvq_steps=args.rvq_steps, frames_per_track=10_000, **quiet)
            walls[way] = time.perf_counter() - start
            reports[way] = {name: json.loads((ts / f"{name}.report.json").read_text())
                            for name in ("fit_rvq", "fit_kmeans")}
        ray.shutdown()
    for way, wall in walls.items():
        r = reports[way]
        print(f"{way}: {wall:.1f} s ({r['fit_rvq']['embeddings']} CLAP embeddings, {r['fit_kmeans']['frames']} "
              f"semantic frames, {r['fit_kmeans']['clusters_used']} clusters used)")
    print(f"{args.tracks} tracks of {args.seconds:g} s, {plan.describe()}: ratio separate / one pass "
          f"{walls['separate'] / walls['one pass']:.2f}")


if __name__ == "__main__":
    main()
