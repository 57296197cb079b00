"""musiclm pipeline: the whole path in one job, each step skipped when its output already exists.

Steps so far: synthetic corpus -> token system (tiny, offline) -> fit RVQ -> fit k-means -> tokenize one
track and decode its acoustic tokens back to a WAV. Later steps (preprocess, train, generate, evaluate)
join here as they land. `make demo` runs this on a local Ray with the embedded defaults."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.common import add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm pipeline", description=__doc__)
    p.add_argument("--workdir", default="demo_out", help="where every step writes its output")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    p.add_argument("--num-tracks", type=int, default=24)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--rvq-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import numpy as np

    from musiclm import synth
    from musiclm.audio import load_audio, write_wav
    from musiclm.config import model_preset
    from musiclm.raycompute import plan_actors
    from musiclm.tokens.fit import fit_kmeans, fit_rvq
    from musiclm.tokens.system import CONFIG_FILE, TokenSystem

    work = Path(args.workdir)
    corpus, ts_dir = work / "corpus", work / "token_system"
    start = time.time()

    def step(name: str, done: bool, action) -> None:
        if done:
            log(f"step {name}: done already, skipped")
            return
        t = time.time()
        action()
        log(f"step {name}: finished in {time.time() - t:.1f} s")

    captions = corpus / "captions.jsonl"
    step("synth", captions.exists() and sum(1 for _ in captions.open()) == args.num_tracks,
         lambda: synth.write_corpus(corpus, args.num_tracks, args.seconds, args.seed))
    step("init-token-system", (ts_dir / CONFIG_FILE).exists(),
         lambda: TokenSystem.create(model_preset(args.preset).token_system(), ts_dir, seed=args.seed, overwrite=False))
    system = TokenSystem.load(ts_dir)
    plan = None if system.rvq_fitted and system.kmeans_fitted else plan_actors(connect(args), args.actors, args.gpus_per_actor)
    step("fit-rvq", system.rvq_fitted,
         lambda: fit_rvq(ts_dir, corpus, plan, steps=args.rvq_steps, seed=args.seed, log=log))
    step("fit-kmeans", system.kmeans_fitted,
         lambda: fit_kmeans(ts_dir, corpus, plan, frames_per_track=10_000, seed=args.seed, log=log))

    system = TokenSystem.load(ts_dir)
    first = json.loads(captions.open().readline())
    audio = load_audio(corpus / first["path"], system.acoustic.sample_rate, max_seconds=10.0)
    tokens = system.tokenize(audio, system.acoustic.sample_rate)
    codes = np.concatenate([tokens["coarse"], tokens["fine"]], axis=1)
    wav = write_wav(work / "reconstruction.wav", system.acoustic.decode(codes), system.acoustic.sample_rate)
    log(system.describe())
    log(f"tokens of {first['path']!s} ({first['caption']}): " +
        ", ".join(f"{k} {tuple(v.shape)}" for k, v in tokens.items()))
    log(f"acoustic tokens decoded back to {wav}")
    log(f"pipeline finished in {time.time() - start:.1f} s; outputs under {work}")


if __name__ == "__main__":
    run(main)
