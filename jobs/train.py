"""musiclm train: train one stage (semantic, coarse or fine) on a token dataset with Ray Train + DeepSpeed.

The model and training settings come from --preset (tiny, small, large), or --config (a full Config JSON, e.g.
a sweep's best.json, or an open-musiclm model JSON), then --set KEY=VALUE overrides (e.g. train.lr=1e-4
train.num_train_steps=20000 model.coarse_cfg.depth=12; open-musiclm's section names work without ``model.``). Runs live in STORAGE/RUN_NAME; re-running the same command
resumes from the latest checkpoint. --init-from starts from a stage checkpoint's weights (fine-tuning)."""
from __future__ import annotations

import argparse
import json

from jobs.common import (add_eval_args, add_ray_args, add_stage_args, check_outputs, connect, eval_inputs, log,
                         quiet_progress, run, stage_args_config, training_gpu_resources)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm train", description=__doc__)
    add_stage_args(p)
    p.add_argument("--run-name", required=True, help="name of the run; the same name resumes it")
    p.add_argument("--storage", default="runs", help="where runs are kept: a folder every node reaches, or an "
                                                     "object-store URI such as s3://bucket/runs")
    add_eval_args(p, "evaluation beside training (musiclm watch-eval)")
    p.add_argument("--eval-poll-s", type=float, default=30.0, help="seconds between looks for new checkpoints")
    add_ray_args(p)
    return p


def evaluation_beside(args, req, resources: dict):
    """``musiclm.evaluation.watch.Beside`` for --eval-models, or a context that does nothing."""
    import contextlib

    from musiclm.evaluation.watch import Beside, WatchRequest
    from musiclm.train.run import DATA_RESERVE, worker_cpus

    if not args.eval_models:
        return contextlib.nullcontext()
    t = req.config.train
    reserved = t.max_workers * worker_cpus(req.config, resources.get("CPU", 1)) + DATA_RESERVE
    e = eval_inputs(args, resources, reserved)
    watch = WatchRequest(req.run_dir, e.models, e.prompts, e.settings, e.references)
    return Beside(watch, poll_s=args.eval_poll_s, log=log, cluster_cpus=resources.get("CPU", 1),
                  cluster_gpus=e.gpus, cpus_per_actor=e.cpus, gpus_per_actor=e.gpus or None)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.train.run import TrainRequest, check_run_name, resolve_use_gpu, train

    check_outputs(storage=args.storage)
    check_run_name(args.run_name)  # before Ray starts or a folder is made
    cfg, init_from = stage_args_config(args)
    resources = connect(args)
    cfg = resolve_use_gpu(cfg, resources, log)
    req = TrainRequest(cfg, args.data, args.run_name, args.storage, init_from, args.token_system)
    # asked for GPUs: wait for the autoscaler to add them when the cluster lacks them
    resources = training_gpu_resources(args, resources, cfg, f"{cfg.train.min_workers} training workers")
    from musiclm.infra import storage
    from musiclm.train.run import SUMMARY

    quiet_progress()
    with evaluation_beside(args, req, resources):
        train(req, resources.get("CPU", 1), log=log)
    summary = storage.read_json(storage.join(req.run_dir, SUMMARY))  # with the evaluation's scores, if any
    log(json.dumps(summary, indent=2))
    log(f"watch: {summary['tensorboard']}")


if __name__ == "__main__":
    run(main)
