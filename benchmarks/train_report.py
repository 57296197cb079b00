"""What a ``ray.train.report`` costs a training run, two ways in one run on the same Ray: a Ray Train run of 2 CPU
workers doing ``--steps`` steps of a small model (gloo all-reduce of the gradients, as the stages' loop does),
(a) reporting a metrics dict every ``--every`` steps, as the training loop did until 2026-12-05 (every
``log_every``), and (b) reporting once, at the end, as it does now between validations. Prints the steps' time
both ways and the cost of one report.

    python benchmarks/train_report.py [--steps 60 --every 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time


def train_fn(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256)
    dist.barrier()
    start = time.perf_counter()
    for step in range(1, config["steps"] + 1):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        if config["every"] and step % config["every"] == 0 and step < config["steps"]:
            ray.train.report({"train/loss": float(loss), "step": step})
    elapsed = time.perf_counter() - start
    ray.train.report({"step": config["steps"]})
    if ray.train.get_context().get_world_rank() == 0:  # Ray's result keeps only a checkpoint's metrics
        with open(config["out"], "w") as f:
            f.write(str(elapsed))


def timed(steps: int, every: int, storage: str) -> float:
    import os

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(storage, f"seconds-{time.time_ns()}")
    trainer = TorchTrainer(train_fn, train_loop_config={"steps": steps, "every": every, "out": out},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                        resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name=f"report-{every}-{time.time_ns()}", storage_path=storage))
    trainer.fit()
    with open(out) as f:
        return float(f.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=5)
    args = p.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        timed(10, 0, storage)  # warm-up: worker processes and imports
        every = timed(args.steps, args.every, storage)
        once = timed(args.steps, 0, storage)
    reports = (args.steps - 1) // args.every
    print(f"{args.steps} steps, 2 workers: (a) a report every {args.every} steps ({reports} reports) {every:.2f} s; "
          f"(b) one at the end {once:.2f} s")
    print(f"(a)/(b) = {every / once:.2f}; one report costs {(every - once) / reports * 1000:.0f} ms")


if __name__ == "__main__":
    main()
