"""Tokenize the same files with the same token system two ways in one run:

(a) one file at a time in one process, as open-musiclm's preprocessing does (decode, pad, resample,
    CLAP windows in batches, semantic, EnCodec; torch with its default threads), and
(b) this project's Ray Data pipeline (`musiclm.data.preprocess`) on a local Ray with the same CPUs.

Prints seconds of audio tokenized per wall second for both and the ratio (b)/(a). Both timings include
loading the token system; (b) includes Ray Data's start-up but not `ray.init`.
    python benchmarks/preprocess.py [--tracks 120 --seconds 30 --num-cpus 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path


def single_process(paths: list[str], token_system: Path, cfg) -> float:
    from musiclm.audio.io import decode_audio
    from musiclm.data.clips import pad_clip
    from musiclm.tokens.system import TokenSystem

    start = time.perf_counter()
    system = TokenSystem.load(token_system)
    total = 0.0
    for path in paths:
        audio, rate = decode_audio(path)
        clip = pad_clip(audio[: cfg.clip_seconds * rate], rate, cfg.pad_to_seconds)
        tokens = system.tokenize(clip, rate)
        assert len(tokens["coarse"]) > 0
        total += min(len(audio), cfg.clip_seconds * rate) / rate
    return total / (time.perf_counter() - start)


def pipeline(corpus: Path, token_system: Path, out: Path, cfg, actors, threads) -> tuple[float, str]:
    import ray

    from musiclm.data.preprocess import prepare, run
    from musiclm.data.sources import open_source
    from musiclm.infra.raycompute import plan_actors

    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    job = prepare(open_source(corpus), token_system, out, cfg, log=lambda m: None)
    plan = plan_actors(ray.cluster_resources(), actors)
    if threads:
        plan = dataclasses.replace(plan, threads_per_actor=threads)
    summary = run(job, plan, log=lambda m: None)
    wall = time.perf_counter() - start
    return summary["run"]["audio_seconds"] / wall, plan.describe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tracks", type=int, default=120)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--actors", type=int, default=None, help="tokenizer actors (default: the job's plan)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: the job's plan)")
    p.add_argument("--workdir", default=None, help="keep corpus and token system here (default: a temp dir)")
    args = p.parse_args()

    import ray

    from musiclm.audio import synth
    from musiclm.audio.io import list_audio_files
    from musiclm.config import DataConfig, model_preset
    from musiclm.infra.raycompute import plan_actors
    from musiclm.tokens.fit import fit_kmeans, fit_rvq
    from musiclm.tokens.system import TokenSystem

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_"))
    corpus, ts = work / "corpus", work / "token_system"
    if not (corpus / "captions.jsonl").exists():
        synth.write_corpus(corpus, args.tracks, args.seconds, seed=0)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    if not (ts / "token_system.json").exists():
        TokenSystem.create(model_preset("tiny").token_system(), ts)
        fit_plan = plan_actors(ray.cluster_resources())
        fit_rvq(ts, corpus, fit_plan, steps=20, max_tracks=8, log=lambda m: None)
        fit_kmeans(ts, corpus, fit_plan, max_tracks=8, frames_per_track=1000, log=lambda m: None)
    cfg = DataConfig()
    paths = list_audio_files(corpus)

    a = single_process(paths, ts, cfg)
    out = work / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    b, plan = pipeline(corpus, ts, out, cfg, args.actors, args.threads)
    print(f"{len(paths)} synthetic MP3s x {args.seconds:g} s, tiny token system, {args.num_cpus} CPUs")
    print(f"(a) one file at a time, one process: {a:7.1f} s of audio per s")
    print(f"(b) Ray Data pipeline [{plan}]: {b:7.1f} s of audio per s")
    print(f"ratio (b)/(a): {b / a:.2f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
