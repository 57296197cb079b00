"""musiclm evaluate: compare model sets on a prompt set by CLAP text–audio similarity.

    python -m jobs.evaluate --prompts prompts.txt --models pretrained=models/released,tuned=models/fma \
        --num-samples 4 --out eval/
    python -m jobs.evaluate --reference-dataset tokens/fma --max-prompts 64 --models ... --out eval/

Each set generates N candidates per prompt (same settings and seed for all sets) on Ray; the table
(results.csv, results.md) gives best-of-N and mean CLAP score per prompt and set, scores.png plots them, and
OUT/tensorboard holds the scores and the best clip of each prompt. Re-running skips finished prompts."""
from __future__ import annotations

import argparse
import sys

from jobs.common import (add_generate_args, add_prompt_set_args, add_ray_args, check_outputs, connect,
                         generate_settings, gpu_resources, log, prompt_set, quiet_progress, run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_set_args(p)
    p.add_argument("--models", required=True, help="NAME=DIR[,NAME=DIR…]: model-set folders to compare")
    p.add_argument("--out", required=True, help="output folder or object-store URI")
    add_generate_args(p)
    p.add_argument("--guidance-scales", type=guidance_scales, default=None, metavar="G,G,...",
                   help="sample every set at each of these guidance scales (every stage's), a column each "
                        "(NAME@gG; NAME alone at 1): what guidance buys on these prompts, beside best-of-N")
    add_ray_args(p)
    return p


def guidance_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas (1,3)")
    if not scales or any(not 0 <= s < float("inf") for s in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: give finite numbers >= 0 separated by commas (1,3)")
    return scales


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.guidance_scales and args.guidance_scale:
        p.error("give --guidance-scale (one scale for every set) or --guidance-scales (a column per scale), not both")
    check_outputs(out=args.out)
    from musiclm.evaluation.evaluate import PLOT, RESULTS, evaluate, parse_model_sets
    from musiclm.infra import storage

    settings = generate_settings(args)
    sets = parse_model_sets(args.models, args.token_system)
    prompts, references = prompt_set(args)
    resources = gpu_resources(args, connect(args), "the generation actors")
    quiet_progress()
    rows = evaluate(prompts, sets, settings, args.out, cluster_cpus=resources.get("CPU", 1),
                    cluster_gpus=resources.get("GPU", 0), actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                    reference_audio=args.reference_audio, references=references,
                    guidance_scales=args.guidance_scales, log=log)
    out = storage.location(args.out)
    print(storage.read_text(storage.join(out, f"{RESULTS}.md")))
    log(f"table: {storage.join(out, RESULTS)}.csv, .md; plot: {storage.join(out, PLOT)}")
    log(f"watch: tensorboard --logdir {storage.join(out, 'tensorboard')} --host 127.0.0.1")
    if any(r["error"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    run(main)
