"""musiclm train: train one stage (semantic, coarse or fine) on a token dataset with Ray Train + DeepSpeed.

The model and training settings come from --preset (tiny, small, large), or --config (a full Config JSON, e.g.
a sweep's best.json, or an open-musiclm model JSON), then --set KEY=VALUE overrides (e.g. train.lr=1e-4
train.num_train_steps=20000 coarse_cfg.depth=12). Runs live in STORAGE/RUN_NAME; re-running the same command
resumes from the latest checkpoint. --init-from starts from a stage checkpoint's weights (fine-tuning)."""
from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_ray_args, connect, log, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="musiclm train", description=__doc__)
    p.add_argument("--stage", required=True, choices=["semantic", "coarse", "fine"])
    p.add_argument("--data", required=True, help="token dataset directory (from musiclm preprocess)")
    p.add_argument("--run-name", required=True, help="name of the run; the same name resumes it")
    p.add_argument("--storage", default="runs", help="where runs are kept (shared storage on a multi-node cluster)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    p.add_argument("--config", help="Config JSON (ours, or open-musiclm's model JSON)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--num-workers", type=int, help="training workers (train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (train.use_gpu)")
    p.add_argument("--init-from", help="stage checkpoint to start from (fine-tuning)")
    p.add_argument("--token-system", help="token system to check against and to decode audio samples with "
                                          "(default: the dataset's, when it exists here)")
    add_ray_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from musiclm.config import stage_config
    from musiclm.train.run import TrainRequest, train

    overrides = list(args.set)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("train.use_gpu=true")
    cfg = stage_config(args.stage, args.preset, args.config, overrides)
    req = TrainRequest(cfg, args.data, args.run_name, args.storage, args.init_from, args.token_system)
    resources = connect(args)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()  # keep job logs readable
    summary = train(req, resources.get("CPU", 1), log=log)
    log(json.dumps(summary, indent=2))
    log(f"watch: {summary['tensorboard']}")


if __name__ == "__main__":
    run(main)
