"""musiclm pipeline: the whole path in one job, each step skipped when its output exists and matches:
synthetic corpus (or --source) → token system → train its EnCodec and CLAP on the corpus (tiny preset) → fit RVQ
and k-means → preprocess → train semantic, coarse and fine (with conditioning dropout) → generate a prompt (best
of N, with guidance) → evaluate the first checkpoints against the best, unguided and guided, on the held-out
tracks' captions → the prompt-following block: each difference that says the music follows the prompt, with its
noise. `make demo` runs it on a local Ray with the tiny preset; a second run only checks and skips."""
from __future__ import annotations

import argparse
import json

from jobs.common import add_ray_args, check_outputs, connect, log, run


def parser() -> argparse.ArgumentParser:
    from musiclm.pipeline import PipelineSettings

    d = PipelineSettings()
    p = argparse.ArgumentParser(prog="musiclm pipeline", description=__doc__)
    p.add_argument("--workdir", default=d.workdir, help="where every step writes its output")
    p.add_argument("--preset", default=d.preset, choices=["tiny", "small", "large"])
    p.add_argument("--source", help="audio folder to use instead of the synthetic corpus")
    p.add_argument("--num-tracks", type=int, default=d.num_tracks, help="synthetic tracks")
    p.add_argument("--seconds", type=float, default=d.seconds, help="length of each synthetic track")
    p.add_argument("--rvq-steps", type=int, default=d.rvq_steps)
    p.add_argument("--codec-steps", type=int, default=d.codec_steps,
                   help="fit-codec steps for the tiny preset's random EnCodec (0: keep it random)")
    p.add_argument("--clap-steps", type=int, default=d.clap_steps,
                   help="fit-clap steps for the tiny preset's random CLAP on the corpus' captions (0: keep it random)")
    p.add_argument("--train-steps", type=int,
                   help=f"steps per stage (default: {d.semantic_steps} for semantic, {d.train_steps} for coarse and "
                        f"fine)")
    p.add_argument("--semantic-steps", type=int, help="the semantic stage's steps (default: --train-steps if given)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="training workers per stage")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch per worker")
    p.add_argument("--lr", type=float, default=d.lr, help="training learning rate")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds generated for the demo prompt")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="candidates per prompt (best of N)")
    p.add_argument("--eval-duration", type=float, default=d.eval_duration,
                   help="seconds generated per candidate in the evaluation")
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--max-prompts", type=int, default=d.max_prompts,
                   help="held-out captions the evaluation generates for")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--semantic-clusters", type=int, default=d.semantic_clusters,
                   help="semantic k-means clusters (0: the preset's for --source; for the synthetic corpus a power of "
                        "two with at least 64 of its frames per cluster)")
    p.add_argument("--clap-levels", type=int, default=d.clap_levels,
                   help="levels of the CLAP RVQ: the CLAP tokens every stage is conditioned on (0: the preset's 12 for "
                        "--source; 3 for the synthetic corpus)")
    p.add_argument("--clap-codes", type=int, default=d.clap_codes,
                   help="codes per quantizer of the CLAP RVQ (0: the preset's for --source; for the synthetic corpus a "
                        "power of two with at least 8 of its CLAP windows per code)")
    p.add_argument("--clap-from", choices=("audio", "caption"), default=d.clap_from,
                   help="what the stages' CLAP tokens are made of: each window's audio (MusicLM's way) or the track's "
                        "caption (default: audio for --source, caption for the synthetic corpus)")
    p.add_argument("--codec-codes", type=int, default=d.codec_codes,
                   help="codes per codebook of the tiny EnCodec: the coarse and fine stages' vocabulary (0: the "
                        "preset's 1024)")
    p.add_argument("--cond-drop-prob", type=float, default=d.cond_drop_prob,
                   help="conditioning dropout of every stage's training (train.cond_drop_prob; lets guidance work)")
    p.add_argument("--guidance-scale", type=float, default=d.guidance,
                   help="classifier-free guidance of every stage when generating; the evaluation samples unguided and "
                        "at this scale (1: none; needs --cond-drop-prob)")
    p.add_argument("--shift-genre", default=d.shift_genre,
                   help="then fine-tune the final model set on this genre of the corpus (FMA metadata, e.g. Rock) and "
                        "evaluate both on held-out captions outside it, unguided and guided: does prompt alignment "
                        "drop, and does guidance give it back? (WORK/shift-<genre>/)")
    p.add_argument("--shift-steps", type=int, default=d.shift_steps,
                   help="fine-tuning steps per stage for --shift-genre (0: --train-steps)")
    add_ray_args(p)
    return p


DEMO_LIMITS = ("with the tiny preset, EnCodec and CLAP learned the synthetic corpus in the fit-codec and fit-clap "
               "steps (minutes, not the days of the released ones), and the semantic encoder is a band-energy "
               "filterbank in HuBERT's form: its tokens follow pitch and timbre but carry no meaning. The "
               "prompt-following block says which differences this world shows beyond their noise.")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_outputs(workdir=args.workdir)
    import ray

    from musiclm.pipeline import Pipeline, PipelineSettings

    settings = PipelineSettings(workdir=args.workdir, preset=args.preset, source=args.source,
                                num_tracks=args.num_tracks, seconds=args.seconds, rvq_steps=args.rvq_steps,
                                codec_steps=args.codec_steps, clap_steps=args.clap_steps,
                                max_prompts=args.max_prompts,
                                train_steps=args.train_steps or PipelineSettings.train_steps,
                                semantic_steps=(args.semantic_steps or args.train_steps
                                                or PipelineSettings.semantic_steps),
                                num_workers=args.num_workers, batch_size=args.batch_size,
                                lr=args.lr, use_gpu=args.use_gpu,
                                duration=args.duration, num_samples=args.num_samples, prompt=args.prompt,
                                eval_duration=args.eval_duration, seed=args.seed,
                                semantic_clusters=args.semantic_clusters, clap_codes=args.clap_codes,
                                clap_levels=args.clap_levels, codec_codes=args.codec_codes,
                                clap_from=args.clap_from,
                                cond_drop_prob=args.cond_drop_prob, guidance=args.guidance_scale,
                                shift_genre=args.shift_genre, shift_steps=args.shift_steps)
    resources = connect(args)
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the demo's log readable
    summary = Pipeline(settings, resources, args.actors, args.gpus_per_actor, log=log).run()
    log(json.dumps(summary["steps"]))
    log(f"pipeline finished in {summary['seconds']:.0f} s")
    for stage, r in summary["stages"].items():
        gain = r["conditioning_gain"]
        log(f"{stage}: valid loss {r['best_valid_loss']:.3f}, {r['below_chance']:.3f} nats "
            f"({r['below_chance_pct']:.1f} %) below chance ln V = {r['chance']:.3f}"
            + (" (at chance)" if r["at_chance"] else "")
            + (f"; conditioning gain {gain:+.4f} nats" if gain is not None else ""))
    if args.preset == "tiny":
        log(DEMO_LIMITS)
    from musiclm.evaluation.prompt_following import CLEAR, summary_lines

    block = summary["prompt_following"]
    log(f"prompt following ({block['held_out_tracks']} held-out tracks' clips for CLAP, {block['prompts']} held-out "
        f"captions generated; value ± standard error, clear when above {CLEAR:g} errors):")
    for line in summary_lines(block):
        log(line)
    if "genre_shift" in summary:
        shift = summary["genre_shift"]
        log(f"genre shift: the final set fine-tuned {shift['steps']} steps on {shift['tracks'].get('train', 0)} "
            f"{shift['genre']} tracks, scored on {shift['prompts_outside']} held-out captions outside the genre "
            f"(mean CLAP score per prompt; alignment_change below 0: the fine-tuning cost prompt alignment):")
        for line in summary_lines(shift):
            log(line)
        log(f"  lower after the fine-tuning on {shift['lower_on']['prompts']} of {shift['lower_on']['of']} prompts "
            f"(the study's fine-tuning on FMA: 6 of 7, REFERENCE.md)")
    log("generated: " + ", ".join(summary["wavs"]))
    log(f"report: {summary['report']}")
    log(f"evaluation: {summary['evaluation']} and {summary['plot']}")
    log(f"watch: {summary['tensorboard']}")


if __name__ == "__main__":
    run(main)
