"""Ray Tune sweeps of one stage (the library behind ``musiclm tune``, ``jobs/tune.py``).

Every trial runs the same train function as `musiclm train` (Ray Train + DeepSpeed) with one point of the
search space applied to the run's Config as dotted overrides (tune/space.py). The sweep lives in
STORAGE/NAME: Tune's state, trials/<id>/ (checkpoints and TensorBoard of each trial), results.csv /
results.md, and best.json (usable as `musiclm train --config best.json --init-from best.json`). Running the
same sweep again resumes it.

Trials are ranked by their best valid/loss, or, with a ``Ranking``, by a music score of each trial's best
checkpoint (``musiclm.evaluation.watch``: eval/clap_score, eval/fad_clap, ...) computed after the sweep, since lower
token loss need not mean music closer to the prompt (REFERENCE.md). Each trial's evaluation is kept in its
folder (trials/<id>/eval/), so a rerun does not generate again."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from functools import partial

from musiclm.config import Config, ConfigError
from musiclm.infra import storage

from .space import build_space

BEST, RESULTS = "best.json", "results"


@dataclass
class Ranking:
    """Rank trials by ``metric`` (one of ``evaluation.watch.SCALARS``) of their best checkpoint, generated with the
    other stages of ``models`` for ``prompts``; FAD metrics need ``references``."""

    metric: str
    models: object  # musiclm.generation.generate.ModelSet
    prompts: list
    settings: object  # musiclm.generation.generate.GenerateSettings
    references: list | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self):
        from musiclm.evaluation.watch import SCALARS

        if self.metric not in SCALARS:
            raise ValueError(f"--rank-by {self.metric}: give valid/loss or one of {', '.join(SCALARS)}")
        if "fad" in self.metric and not self.references:
            raise ValueError(f"--rank-by {self.metric} needs reference audio: --reference-audio or --reference-dataset")

    @property
    def higher_is_better(self) -> bool:
        return "clap_score" in self.metric


@dataclass
class SweepRequest:
    """What to sweep: the base Config (``train.use_gpu`` resolved), the search space (dotted key -> spec),
    where the data is and where the sweep lives, and how Tune schedules the trials."""

    base: Config
    space: dict[str, str]
    data: str
    name: str
    storage: str = "sweeps"
    init_from: str | None = None
    token_system: str | None = None
    num_samples: int = 1
    grace_period: int | None = None  # ASHA: steps before a trial can be stopped (default save_results_every)
    reduction_factor: float = 2.0
    early_stop: bool = True
    max_concurrent: int | None = None  # default: as many as the cluster fits now
    max_failures: int = 2
    ranking: Ranking | None = None  # None: by valid/loss

    def __post_init__(self):
        from musiclm.train.run import check_run_name

        check_run_name(self.name, "--name")


def trial_budget(cfg, resources: dict) -> tuple[float, int]:
    """(CPUs per worker, concurrent trials) that fit the cluster. Each trial's data pipeline needs a whole free
    CPU at times (Ray Data's file listing), so it is counted in the budget; GPU clusters fit by GPUs."""
    t = cfg.train
    if t.elastic:
        raise ConfigError(f"train.num_workers {t.num_workers!r}: Tune trials run at a fixed size (a resize would restart "
                          f"a trial that ASHA is comparing with others at the same step); give one number")
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


def trial_rows(grid, keys: list[str], total_steps: int, sweep_dir: str) -> list[dict]:
    """One row per trial (its search point, best valid loss and accuracy, steps, error), best valid/loss first;
    keys starting with _ are for this module."""
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
        row["_best_checkpoint"] = best_checkpoint(row["_trial_dir"])[0]  # the one ranked, and named in best.json
        row["_config"] = result.config
        rows.append(row)
    rows.sort(key=lambda r: (math.isnan(r["best_valid_loss"]), r["best_valid_loss"]))
    return rows


def rank_by_evaluation(rows: list[dict], ranking: Ranking, resources: dict, log=print) -> None:
    """Score each trial's best checkpoint (kept in trials/<id>/eval/: a rerun reuses it), add the metric to
    its row and sort by it, best first (trials without a score last)."""
    from musiclm.evaluation.watch import WatchRequest, evaluate_checkpoint, read_state, record

    for row in rows:
        row[ranking.metric] = math.nan
        checkpoint = row["_best_checkpoint"]
        if checkpoint is None:
            continue
        req = WatchRequest(row["_trial_dir"], ranking.models, ranking.prompts, ranking.settings, ranking.references)
        state, name = read_state(req), storage.name(checkpoint)
        if name not in state["checkpoints"]:
            log(f"ranking: trial {row['trial']}: evaluating {name}")
            record(req, state, name, evaluate_checkpoint(
                req, checkpoint, cluster_cpus=resources.get("CPU", 1), cluster_gpus=resources.get("GPU", 0),
                cpus_per_actor=ranking.cpus_per_actor, gpus_per_actor=ranking.gpus_per_actor, log=log))
        row[ranking.metric] = state["checkpoints"][name]["scalars"].get(ranking.metric, math.nan)
    sign = -1.0 if ranking.higher_is_better else 1.0
    rows.sort(key=lambda r: (math.isnan(r[ranking.metric]), sign * r[ranking.metric]
                             if not math.isnan(r[ranking.metric]) else 0.0))


def summarize(grid, keys: list[str], total_steps: int, sweep_dir: str, base_cfg, ranking: Ranking | None = None,
              resources: dict | None = None, log=print) -> list[dict]:
    """The trial rows (ranked), results.csv / .md and best.json."""
    from musiclm.config import apply_overrides, to_dict

    rows = trial_rows(grid, keys, total_steps, sweep_dir)
    if ranking is not None:
        rank_by_evaluation(rows, ranking, resources or {}, log)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(public[0]))
    w.writeheader()
    w.writerows(public)
    storage.write_text(storage.join(sweep_dir, f"{RESULTS}.csv"), table.getvalue())
    header = list(public[0])
    lines = [f"Trials ranked by {ranking.metric if ranking else 'best valid/loss'}"
             + (f" ({'higher' if ranking.higher_is_better else 'lower'} is better) of each trial's best checkpoint, "
                f"{len(ranking.prompts)} prompts, best of {ranking.settings.num_samples}" if ranking else "") + ".",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in header) + " |" for r in public]
    storage.write_text(storage.join(sweep_dir, f"{RESULTS}.md"), "\n".join(lines) + "\n")
    best = rows[0]
    if not math.isnan(best["best_valid_loss"]):
        checkpoint = best["_best_checkpoint"]
        cfg = apply_overrides(base_cfg, best["_config"])
        ranked = {"ranked_by": ranking.metric if ranking else "valid/loss"}
        if ranking:
            ranked[ranking.metric] = best[ranking.metric]
        storage.write_text(storage.join(sweep_dir, BEST), json.dumps(
            {"config": to_dict(cfg), "checkpoint": checkpoint, "trial": best["trial"],
             "valid/loss": best["best_valid_loss"], "valid/accuracy": best["valid_accuracy"], **ranked,
             "search": {k: best["_config"].get(k) for k in keys}}, indent=2))
    return public


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sweep(req: SweepRequest, resources: dict, log=print) -> list[dict]:
    """Run (or resume) the sweep on the connected Ray; write results.csv/.md and best.json; return the rows,
    best first. ``resources``: the cluster's (``ray.cluster_resources()``, after any wait for GPU nodes)."""
    from ray import tune

    from musiclm.config import to_dict

    from .trial import run_trial

    base = req.base
    space = build_space(req.space)
    per_worker, concurrent = trial_budget(base, resources)
    if req.max_concurrent and req.max_concurrent > concurrent:
        log(f"{req.max_concurrent} trials at a time (--max-concurrent); the cluster fits {concurrent} now: the other "
            f"trials' workers wait for the autoscaler to add nodes")
    elif not req.max_concurrent:
        log(f"{concurrent} trial(s) at a time: what the cluster fits now. On an autoscaling cluster, --max-concurrent N "
            f"runs more while it adds nodes")
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, cpus_per_worker=per_worker))
    sweep_dir = storage.join(storage.location(req.storage), req.name)
    storage.make_dirs(sweep_dir)
    trainable = tune.with_resources(
        partial(run_trial, base=to_dict(base), data=storage.location(req.data), sweep_dir=sweep_dir,
                cluster_cpus=resources.get("CPU", 1), init_from=req.init_from, token_system=req.token_system),
        {"CPU": 0.05})
    total = base.train.num_train_steps
    scheduler = None if not req.early_stop else tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=total, grace_period=req.grace_period or base.train.save_results_every,
        reduction_factor=req.reduction_factor)
    tune_dir = storage.join(sweep_dir, "tune")
    fs, tune_path = storage.resolve(tune_dir)  # Tune takes the path inside the filesystem, and the filesystem
    if tune.Tuner.can_restore(f"{tune_path}/{req.name}", storage_filesystem=fs):
        log(f"resuming sweep {req.name} from {storage.join(tune_dir, req.name)}")
        tuner = tune.Tuner.restore(f"{tune_path}/{req.name}", trainable=trainable, resume_errored=True,
                                   param_space=space, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="valid/loss", mode="min", scheduler=scheduler,
                                        num_samples=req.num_samples,
                                        max_concurrent_trials=req.max_concurrent or concurrent),
            run_config=tune.RunConfig(name=req.name, storage_path=tune_path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=req.max_failures)))
    log(f"sweep {req.name}: {', '.join(f'{k}={v}' for k, v in req.space.items())}; "
        f"{req.max_concurrent or concurrent} trial(s) at a time, {per_worker:g} CPU per worker")
    grid = tuner.fit()
    rows = summarize(grid, list(req.space), total, sweep_dir, base, req.ranking, resources, log)
    log("results (best first):\n" + storage.read_text(storage.join(sweep_dir, f"{RESULTS}.md")))
    log(f"best config and checkpoint: {storage.join(sweep_dir, BEST)}")
    log(f"curves: tensorboard --logdir {storage.join(sweep_dir, 'trials')} --host 127.0.0.1")
    if all(r["error"] for r in rows):
        raise RuntimeError(f"every trial failed; see the trial logs under {storage.join(tune_dir, req.name)}")
    return rows


__all__ = ["SweepRequest", "Ranking", "sweep", "trial_budget", "best_checkpoint", "summarize", "trial_rows",
           "rank_by_evaluation", "BEST", "RESULTS"]
