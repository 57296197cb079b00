"""musiclm tune: sweep learning rate (and more) for one stage with Ray Tune, ASHA on valid/loss.

Every trial runs the same train function as `musiclm train` (Ray Train + DeepSpeed) with one point of the
search space applied to the run's Config as dotted overrides. Search space: --lr/--warmup/--batch-size/--wd/
--zero-stage SPEC, --param KEY=SPEC for any config key, or --space FILE (JSON of key -> spec); SPEC is
loguniform:LOW:HIGH, uniform:LOW:HIGH, grid:V1,V2,... or choice:V1,V2,... (see tune/space.py).
The sweep lives in STORAGE/NAME: Tune's state, trials/<id>/ (checkpoints and TensorBoard of each trial),
results.csv / results.md, and best.json (usable as `musiclm train --config best.json --init-from best.json`).
Re-running the same command resumes an interrupted sweep. The sweep itself is tune/sweep.py."""
from __future__ import annotations

import argparse

from jobs.common import (add_eval_args, add_ray_args, add_stage_args, check_outputs, connect, eval_inputs, log,
                         quiet_progress, run, stage_args_config, training_gpu_resources)
from tune.space import SHORTCUTS, read_space_file


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm tune", description=__doc__)
    add_stage_args(p)
    p.add_argument("--name", required=True, help="sweep name; the same name resumes the sweep")
    p.add_argument("--storage", default="sweeps", help="where sweeps are kept: a folder every node reaches, or an "
                                                       "object-store URI such as s3://bucket/sweeps")
    g = p.add_argument_group("search space")
    for flag in SHORTCUTS:
        g.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar="SPEC", help=f"{SHORTCUTS[flag]}")
    g.add_argument("--param", action="append", default=[], metavar="KEY=SPEC", help="any dotted config key")
    g.add_argument("--space", help="JSON file of dotted key -> spec")
    s = p.add_argument_group("scheduling")
    s.add_argument("--num-samples", type=int, default=1, help="samples of the space (times every grid point)")
    s.add_argument("--grace-period", type=int, default=None, help="ASHA: steps before a trial can be stopped "
                                                                  "(default: train.save_results_every)")
    s.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/factor of trials per rung")
    s.add_argument("--no-early-stop", action="store_true", help="run every trial to the end (FIFO)")
    s.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at a time (default: as many as the cluster fits at the start). More than fit now: "
                        "the autoscaler adds nodes for the waiting trials' workers")
    s.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (from its checkpoint)")
    s.add_argument("--rank-by", default="valid/loss",
                   help="rank trials by valid/loss, or by a music score of each trial's best checkpoint computed after "
                        "the sweep: eval/clap_score, eval/clap_score_random (higher is better), eval/fad_clap, "
                        "eval/fad_semantic (lower is better); needs --eval-models")
    add_eval_args(p, "scoring trials as music (--rank-by eval/...)")
    add_ray_args(p)
    return p


def space_entries(args) -> dict:
    entries = read_space_file(args.space) if args.space else {}
    for flag, key in SHORTCUTS.items():
        if getattr(args, flag):
            entries[key] = getattr(args, flag)
    for item in args.param:
        key, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r} must look like KEY=SPEC")
        entries[key] = spec
    if not entries:
        raise ValueError("empty search space: give --lr SPEC (e.g. --lr grid:1e-4,3e-4,1e-3), --param or --space")
    return entries


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.train.run import check_run_name, resolve_use_gpu
    from tune.sweep import Ranking, SweepRequest, sweep

    check_outputs(storage=args.storage)
    check_run_name(args.name, "--name")  # before Ray starts or a folder is made

    base, init_from = stage_args_config(args)
    entries = space_entries(args)
    resources = connect(args)
    base = resolve_use_gpu(base, resources, log)
    # at least one trial's GPUs, asked of the autoscaler when the cluster has none yet
    resources = training_gpu_resources(args, resources, base, "the first trial's workers")
    ranking = None
    if args.rank_by != "valid/loss":
        if not args.eval_models:
            raise ValueError(f"--rank-by {args.rank_by} scores each trial's best checkpoint with the other stages of "
                             f"a model set: give --eval-models DIR")
        e = eval_inputs(args, resources, reserved_cpus=0.0)  # after the sweep: the cluster is free again
        ranking = Ranking(args.rank_by, e.models, e.prompts, e.settings, e.references, e.cpus, e.gpus or None)
    req = SweepRequest(base=base, space=entries, data=args.data, name=args.name, storage=args.storage,
                       init_from=init_from, token_system=args.token_system, num_samples=args.num_samples,
                       grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                       early_stop=not args.no_early_stop, max_concurrent=args.max_concurrent,
                       max_failures=args.max_failures, ranking=ranking)
    quiet_progress()
    sweep(req, resources, log=log)


if __name__ == "__main__":
    run(main)
