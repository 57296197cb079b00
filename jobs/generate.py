"""musiclm generate: text to music through the three stages and EnCodec, best of N by CLAP similarity.

One prompt runs in this process:   musiclm generate "PROMPT" --models DIR --out DIR
An audio prompt instead of a text: musiclm generate --audio-prompt CLIP.wav --models DIR --out DIR
A clip continued (for a prompt):   musiclm generate "PROMPT" --continue CLIP.wav --duration 10 ...
A prompt file runs on Ray:         python -m jobs.generate --prompts FILE --models DIR --out DIR
(a JSON prompt file may hold objects: {"text": ..., "audio": CLIP, "continues": CLIP})
(an actor pool, one model set per actor, a GPU each when the cluster has them; one folder per prompt).

The model set is --models DIR (semantic/, coarse/, fine/, token_system/) or the checkpoints one by one
(--semantic, --coarse, --fine: checkpoint folders or `musiclm train` run folders) with --token-system."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.common import (add_generate_args, add_ray_args, check_outputs, connect, generate_settings, gpu_resources, log,
                         quiet_progress, run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the text prompt (or --audio-prompt, or --prompts FILE)")
    p.add_argument("--audio-prompt", metavar="CLIP", help="condition on this clip's CLAP audio embedding instead of a "
                                                          "text (the stages were trained on audio embeddings)")
    p.add_argument("--continue", dest="continues", metavar="CLIP",
                   help="continue this clip: its tokens are every stage's prefix and --duration seconds follow it "
                        "(written as the clip and its continuation; --continuation-only for the new audio alone); "
                        "without a text or --audio-prompt, the clip is also the audio prompt")
    p.add_argument("--continuation-only", action="store_true",
                   help="with --continue: write the continuation without the clip before it")
    p.add_argument("--prompts", help="file of prompts (one per line, or a JSON list): a batch job on Ray")
    p.add_argument("--out", required=True, help="output folder (one subfolder per prompt with --prompts)")
    p.add_argument("--models", help="model-set folder with semantic/, coarse/, fine/ (and token_system/)")
    for stage in ("semantic", "coarse", "fine"):
        p.add_argument(f"--{stage}", help=f"{stage} stage checkpoint or train run folder (overrides --models)")
    add_generate_args(p)
    add_ray_args(p)
    return p


def model_set(args: argparse.Namespace):
    from musiclm.generation.generate import ModelSet, resolve_checkpoint
    from musiclm.infra import storage

    if args.models:
        models = ModelSet.from_dir(args.models, args.token_system)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("semantic", "coarse", "token_system") if not getattr(args, k)]
        if missing or not (args.fine or args.coarse_only):
            raise ValueError(f"give --models DIR, or {', '.join(missing or ['--fine'])} (and --fine unless --coarse-only)")
        models = ModelSet(None, None, None, storage.location(args.token_system))
    for stage in ("semantic", "coarse", "fine"):
        if getattr(args, stage):
            setattr(models, stage, resolve_checkpoint(getattr(args, stage)))
    return models


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(out=args.out)
    single = bool(args.prompt or args.audio_prompt or args.continues)
    if single == bool(args.prompts):
        raise ValueError("give a PROMPT (or --audio-prompt / --continue CLIP), or --prompts FILE")
    from musiclm.generation.prompts import MusicPrompt, read_music_prompts

    settings = generate_settings(args)
    prompt = MusicPrompt(args.prompt, args.audio_prompt, args.continues) if single else None
    models = model_set(args)
    if args.prompts:
        from musiclm.generation.batch import generate_prompts

        prompts = read_music_prompts(args.prompts)
        resources = gpu_resources(args, connect(args), "the generation actors")
        quiet_progress()
        rows = generate_prompts(prompts, models, settings, args.out, cluster_cpus=resources.get("CPU", 1),
                                cluster_gpus=resources.get("GPU", 0), actors=args.actors,
                                gpus_per_actor=args.gpus_per_actor, log=log)
        failed = [r for r in rows if r["error"]]
        log(f"wrote {len(rows) - len(failed)} prompt folders under {args.out} (index: {args.out}/prompts.json)")
        if failed:
            sys.exit(1)
        return

    from musiclm.generation.generate import MusicGenerator, progress_bar

    generator = MusicGenerator(models, args.device, settings.coarse_only, settings.weights_dtype)
    with progress_bar(generator, settings, enabled=sys.stderr.isatty()) as bar:
        result = generator.generate(prompt, settings, progress=bar)
    report = generator.write(result, settings, args.out)
    log(f"scores (best first): {', '.join(f'{s:.4f}' for s in report['scores'])}")
    log(f"real-time factor {report['timings']['real_time_factor']:.2f}; wrote {', '.join(report['files'])}")
    log(f"report: {args.out}/report.json")
    if argv is None:
        print(json.dumps({"files": report["files"], "best_score": report["best_score"]}))


if __name__ == "__main__":
    run(main)
