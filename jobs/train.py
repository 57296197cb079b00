"""musiclm train: train one stage (semantic, coarse or fine) on a token dataset with Ray Train + DeepSpeed.

The model and training settings come from --preset (tiny, small, large), or --config (a full Config JSON, e.g.
a sweep's best.json, or an open-musiclm model JSON), then --set KEY=VALUE overrides (e.g. train.lr=1e-4
train.num_train_steps=20000 coarse_cfg.depth=12). Runs live in STORAGE/RUN_NAME; re-running the same command
resumes from the latest checkpoint. --init-from starts from a stage checkpoint's weights (fine-tuning)."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_ray_args, add_stage_args, connect, gpu_resources, log, run, stage_args_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm train", description=__doc__)
    add_stage_args(p)
    p.add_argument("--run-name", required=True, help="name of the run; the same name resumes it")
    p.add_argument("--storage", default="runs", help="where runs are kept: a folder every node reaches, or an "
                                                     "object-store URI such as s3://bucket/runs")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.train.run import TrainRequest, resolve_use_gpu, train

    cfg, init_from = stage_args_config(args)
    resources = connect(args)
    cfg = resolve_use_gpu(cfg, resources, log)
    req = TrainRequest(cfg, args.data, args.run_name, args.storage, init_from, args.token_system)
    if cfg.train.use_gpu:  # asked for GPUs: wait for the autoscaler to add them when the cluster lacks them
        resources = gpu_resources(args, resources, f"{cfg.train.num_workers} training workers",
                                  [{"CPU": 1.0, "GPU": 1.0}] * cfg.train.num_workers)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()  # keep job logs readable
    summary = train(req, resources.get("CPU", 1), log=log)
    log(json.dumps(summary, indent=2))
    log(f"watch: {summary['tensorboard']}")


if __name__ == "__main__":
    run(main)
