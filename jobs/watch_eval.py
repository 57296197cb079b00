"""musiclm watch-eval: score a training run's checkpoints as music, beside the training (musiclm/evaluation/watch.py).

    musiclm watch-eval --run runs/coarse --models models/released --reference-dataset tokens/fma \
        --max-prompts 32 --num-samples 2 --duration 10 --follow

Each checkpoint of the run replaces its stage in the model set --models (the other stages and the token system);
the set generates for the prompts (--prompts, or the captions of --reference-dataset's valid split) and
eval/clap_score, eval/clap_score_random, eval/fad_clap and eval/fad_semantic go into the run's TensorBoard at the
checkpoint's step and into its summary.json. Without --follow it evaluates the checkpoints there now and exits;
with it, it keeps looking every --poll-s seconds until a checkpoint at --until-step or later is done (or Ctrl-C).
Evaluated checkpoints are never evaluated again; a stopped evaluation resumes. `musiclm train --eval-models`
runs the same evaluation inside the training job."""
from __future__ import annotations

import argparse

from jobs.common import (add_eval_actor_args, add_generate_args, add_prompt_set_args, add_ray_args, connect,
                         eval_actor_resources, generate_settings, log, prompt_set, quiet_progress, run)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm watch-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the training run: STORAGE/RUN_NAME (a folder or an object-store URI)")
    p.add_argument("--models", required=True, help="model set giving the other stages and the token system")
    p.add_argument("--follow", action="store_true", help="keep watching for new checkpoints")
    p.add_argument("--until-step", type=int, default=None, help="with --follow: stop once this step is evaluated")
    p.add_argument("--poll-s", type=float, default=30.0, help="with --follow: seconds between looks")
    add_prompt_set_args(p)
    add_eval_actor_args(p)
    add_generate_args(p)
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.evaluation.watch import WatchRequest, watch
    from musiclm.generation.generate import ModelSet

    prompts, references = prompt_set(args)
    req = WatchRequest(args.run, ModelSet.from_dir(args.models, args.token_system), prompts,
                       generate_settings(args), references)
    resources = connect(args)
    quiet_progress()
    cpus, gpus = eval_actor_resources(args, resources, reserved_cpus=0.0)
    watch(req, cluster_cpus=resources.get("CPU", 1), cluster_gpus=gpus, cpus_per_actor=cpus,
          gpus_per_actor=gpus or None, follow=args.follow, until_step=args.until_step, poll_s=args.poll_s, log=log)


if __name__ == "__main__":
    run(main)
