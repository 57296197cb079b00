"""musiclm tune: sweep learning rate (and more) for one stage with Ray Tune, ASHA on valid/loss.

Every trial runs the same train function as `musiclm train` (Ray Train + DeepSpeed) with one point of the
search space applied to the run's Config as dotted overrides. Search space: --lr/--warmup/--batch-size/--wd/
--zero-stage SPEC, --param KEY=SPEC for any config key, or --space FILE (JSON of key -> spec); SPEC is
loguniform:LOW:HIGH, uniform:LOW:HIGH, grid:V1,V2,... or choice:V1,V2,... (see tune/space.py).
The sweep lives in STORAGE/NAME: Tune's state, trials/<id>/ (checkpoints and TensorBoard of each trial),
results.csv / results.md, and best.json (usable as `musiclm train --config best.json --init-from best.json`).
Re-running the same command resumes an interrupted sweep."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from functools import partial

from musiclm import storage

from jobs.common import add_ray_args, add_stage_args, connect, gpu_resources, log, run, stage_args_config

from .space import SHORTCUTS, build_space, read_space_file

BEST, RESULTS = "best.json", "results"


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


def trial_budget(cfg, resources: dict) -> tuple[float, int]:
    """(CPUs per worker, concurrent trials) that fit the cluster. Each trial's data pipeline needs a whole free
    CPU at times (Ray Data's file listing), so it is counted in the budget; GPU clusters fit by GPUs."""
    t = cfg.train
    cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    if t.use_gpu:
        return t.cpus_per_worker or 1.0, max(1, int(gpus // t.num_workers))
    per_worker = t.cpus_per_worker or 0.5
    per_trial = t.num_workers * per_worker + 1.0 + 0.05
    return per_worker, max(1, int(cpus // per_trial))


def best_checkpoint(trial_dir: str) -> tuple[str | None, float]:
    from musiclm.train.checkpoint import read_stage

    best, loss = None, math.inf
    for d in storage.list_dirs(trial_dir, "checkpoint_*"):
        try:
            value = read_stage(d).metrics.get("valid/loss", math.inf)
        except ValueError:
            continue
        if value < loss:
            best, loss = d, value
    return best, loss


def summarize(grid, keys: list[str], total_steps: int, sweep_dir: str, base_cfg) -> list[dict]:
    from musiclm.config import apply_overrides, to_dict

    rows = []
    for result in grid:
        df = result.metrics_dataframe
        tid = (result.metrics or {}).get("trial_id") or (storage.name(result.path) if result.path else "?")
        row = {"trial": tid, **{k: result.config.get(k) for k in keys}}
        if df is not None and "valid/loss" in df:
            i = df["valid/loss"].idxmin()
            row.update({"best_valid_loss": float(df["valid/loss"][i]),
                        "valid_accuracy": float(df.get("valid/accuracy", [math.nan] * len(df))[i]),
                        "steps": int(df["step"].max())})
        else:
            row.update({"best_valid_loss": math.nan, "valid_accuracy": math.nan, "steps": 0})
        row["stopped_early"] = result.error is None and row["steps"] < total_steps
        row["error"] = type(result.error).__name__ if result.error else ""
        row["_trial_dir"] = storage.join(sweep_dir, "trials", f"trial_{tid}")
        row["_config"] = result.config
        rows.append(row)
    rows.sort(key=lambda r: (math.isnan(r["best_valid_loss"]), r["best_valid_loss"]))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(public[0]))
    w.writeheader()
    w.writerows(public)
    storage.write_text(storage.join(sweep_dir, f"{RESULTS}.csv"), table.getvalue())
    header = list(public[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in header) + " |" for r in public]
    storage.write_text(storage.join(sweep_dir, f"{RESULTS}.md"), "\n".join(lines) + "\n")
    best = rows[0]
    if not math.isnan(best["best_valid_loss"]):
        checkpoint, _ = best_checkpoint(best["_trial_dir"])
        cfg = apply_overrides(base_cfg, best["_config"])
        storage.write_text(storage.join(sweep_dir, BEST), json.dumps(
            {"config": to_dict(cfg), "checkpoint": checkpoint, "trial": best["trial"],
             "valid/loss": best["best_valid_loss"], "valid/accuracy": best["valid_accuracy"],
             "search": {k: best["_config"].get(k) for k in keys}}, indent=2))
    return public


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import dataclasses

    import ray
    from ray import tune

    from musiclm.config import to_dict
    from musiclm.train.run import resolve_use_gpu

    from .trial import run_trial

    base, init_from = stage_args_config(args)
    entries = space_entries(args)
    space = build_space(entries)
    resources = connect(args)
    base = resolve_use_gpu(base, resources, log)
    if base.train.use_gpu:  # at least one trial's GPUs, asked of the autoscaler when the cluster has none yet
        resources = gpu_resources(args, resources, "the first trial's workers",
                                  [{"CPU": 1.0, "GPU": 1.0}] * base.train.num_workers)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    per_worker, concurrent = trial_budget(base, resources)
    if args.max_concurrent and args.max_concurrent > concurrent:
        log(f"{args.max_concurrent} trials at a time (--max-concurrent); the cluster fits {concurrent} now: the other "
            f"trials' workers wait for the autoscaler to add nodes")
    elif not args.max_concurrent:
        log(f"{concurrent} trial(s) at a time: what the cluster fits now. On an autoscaling cluster, --max-concurrent N "
            f"runs more while it adds nodes")
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, cpus_per_worker=per_worker))
    sweep_dir = storage.join(storage.location(args.storage), args.name)
    storage.make_dirs(sweep_dir)
    trainable = tune.with_resources(
        partial(run_trial, base=to_dict(base), data=storage.location(args.data), sweep_dir=sweep_dir,
                cluster_cpus=resources.get("CPU", 1), init_from=init_from, token_system=args.token_system),
        {"CPU": 0.05})
    total = base.train.num_train_steps
    scheduler = None if args.no_early_stop else tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=total, grace_period=args.grace_period or base.train.save_results_every,
        reduction_factor=args.reduction_factor)
    tune_dir = storage.join(sweep_dir, "tune")
    fs, tune_path = storage.resolve(tune_dir)  # Tune takes the path inside the filesystem, and the filesystem
    if tune.Tuner.can_restore(f"{tune_path}/{args.name}", storage_filesystem=fs):
        log(f"resuming sweep {args.name} from {storage.join(tune_dir, args.name)}")
        tuner = tune.Tuner.restore(f"{tune_path}/{args.name}", trainable=trainable, resume_errored=True,
                                   param_space=space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="valid/loss", mode="min", scheduler=scheduler,
                                        num_samples=args.num_samples,
                                        max_concurrent_trials=args.max_concurrent or concurrent),
            run_config=tune.RunConfig(name=args.name, storage_path=tune_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    log(f"sweep {args.name}: {', '.join(f'{k}={v}' for k, v in entries.items())}; "
        f"{args.max_concurrent or concurrent} trial(s) at a time, {per_worker:g} CPU per worker")
    grid = tuner.fit()
    rows = summarize(grid, list(entries), total, sweep_dir, base)
    log("results (best first):\n" + storage.read_text(storage.join(sweep_dir, f"{RESULTS}.md")))
    log(f"best config and checkpoint: {storage.join(sweep_dir, BEST)}")
    log(f"curves: tensorboard --logdir {storage.join(sweep_dir, 'trials')} --host 127.0.0.1")
    if all(r["error"] for r in rows):
        raise RuntimeError(f"every trial failed; see the trial logs under {storage.join(tune_dir, args.name)}")


if __name__ == "__main__":
    run(main)
