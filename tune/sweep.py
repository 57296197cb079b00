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
import json
import math
import sys
from functools import partial
from pathlib import Path

from jobs.common import add_ray_args, add_stage_args, connect, log, run, stage_args_config

from .space import SHORTCUTS, build_space, read_space_file

BEST, RESULTS = "best.json", "results"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm tune", description=__doc__)
    add_stage_args(p)
    p.add_argument("--name", required=True, help="sweep name; the same name resumes the sweep")
    p.add_argument("--storage", default="sweeps", help="where sweeps are kept (shared storage on a cluster)")
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
    s.add_argument("--max-concurrent", type=int, default=None, help="default: as many as the cluster fits")
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


def best_checkpoint(trial_dir: Path) -> tuple[str | None, float]:
    from musiclm.train.checkpoint import read_stage

    best, loss = None, math.inf
    for d in trial_dir.glob("checkpoint_*"):
        try:
            value = read_stage(d).metrics.get("valid/loss", math.inf)
        except ValueError:
            continue
        if value < loss:
            best, loss = str(d), value
    return best, loss


def summarize(grid, keys: list[str], total_steps: int, sweep_dir: Path, base_cfg) -> list[dict]:
    from musiclm.config import apply_overrides, to_dict

    rows = []
    for result in grid:
        df = result.metrics_dataframe
        tid = (result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else "?")
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
        row["_trial_dir"] = str(sweep_dir / "trials" / f"trial_{tid}")
        row["_config"] = result.config
        rows.append(row)
    rows.sort(key=lambda r: (math.isnan(r["best_valid_loss"]), r["best_valid_loss"]))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    with open(sweep_dir / f"{RESULTS}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(public[0]))
        w.writeheader()
        w.writerows(public)
    header = list(public[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in header) + " |" for r in public]
    (sweep_dir / f"{RESULTS}.md").write_text("\n".join(lines) + "\n")
    best = rows[0]
    if not math.isnan(best["best_valid_loss"]):
        checkpoint, _ = best_checkpoint(Path(best["_trial_dir"]))
        cfg = apply_overrides(base_cfg, best["_config"])
        (sweep_dir / BEST).write_text(json.dumps(
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

    from .trial import run_trial

    base, init_from = stage_args_config(args)
    entries = space_entries(args)
    space = build_space(entries)
    resources = connect(args)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    per_worker, concurrent = trial_budget(base, resources)
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, cpus_per_worker=per_worker))
    sweep_dir = Path(args.storage).expanduser().resolve() / args.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        partial(run_trial, base=to_dict(base), data=str(Path(args.data).resolve()), sweep_dir=str(sweep_dir),
                cluster_cpus=resources.get("CPU", 1), init_from=init_from, token_system=args.token_system),
        {"CPU": 0.05})
    total = base.train.num_train_steps
    scheduler = None if args.no_early_stop else tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=total, grace_period=args.grace_period or base.train.save_results_every,
        reduction_factor=args.reduction_factor)
    tune_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(tune_dir / args.name)):
        log(f"resuming sweep {args.name} from {tune_dir / args.name}")
        tuner = tune.Tuner.restore(str(tune_dir / args.name), trainable=trainable, resume_errored=True,
                                   param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="valid/loss", mode="min", scheduler=scheduler,
                                        num_samples=args.num_samples,
                                        max_concurrent_trials=args.max_concurrent or concurrent),
            run_config=tune.RunConfig(name=args.name, storage_path=str(tune_dir),
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures)))
    log(f"sweep {args.name}: {', '.join(f'{k}={v}' for k, v in entries.items())}; "
        f"{args.max_concurrent or concurrent} trial(s) at a time, {per_worker:g} CPU per worker")
    grid = tuner.fit()
    rows = summarize(grid, list(entries), total, sweep_dir, base)
    log("results (best first):\n" + (sweep_dir / f"{RESULTS}.md").read_text())
    log(f"best config and checkpoint: {sweep_dir / BEST}")
    log(f"curves: tensorboard --logdir {sweep_dir / 'trials'} --host 127.0.0.1")
    if all(r["error"] for r in rows):
        raise RuntimeError(f"every trial failed; see the trial logs under {tune_dir / args.name}")


if __name__ == "__main__":
    run(main)
