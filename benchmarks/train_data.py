"""A training run's data path two ways in one run: the train split streamed from its Parquet shards every epoch
(Ray Data, ``streaming_split``) vs held by every worker and re-cropped there (``musiclm.train.data.HeldRows``,
the path for splits up to ``train.cache_train_mb``).

Builds the train-step benchmark's small token dataset (synthetic corpus, tiny token system, in-process), starts a
local Ray, and times epochs as a 2-worker training run consumes them (``musiclm.train.data.stage_data``): two
tasks, each reading its share, batch 2. Prints seconds per epoch for both and the ratio.
    python benchmarks/train_data.py [--tracks 6 --epochs 6 --stage coarse]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from train_step import make_dataset  # the same small token dataset as the train-step benchmark

from musiclm.config import stage_config
from musiclm.train.data import HeldRows, stage_data


def epoch_seconds(data, epochs: int) -> list[float]:
    """Seconds per epoch (the slower of the two consumers), epochs after the first."""
    import ray

    @ray.remote(num_cpus=0.5)
    def consume(source, rank, epochs):
        times = []
        for epoch in range(epochs):
            start = time.perf_counter()
            if isinstance(source, HeldRows):
                batches = source.batches(epoch, rank, 2, batch_size=2, drop_last=True)
            else:
                batches = source.iter_batches(batch_size=2, batch_format="numpy", drop_last=True)
            for _ in batches:
                pass
            times.append(time.perf_counter() - start)
        return times

    if "train" in data.held:
        sources = [data.held["train"]] * 2
    else:
        sources = data.datasets["train"].streaming_split(2, equal=True)
    per_worker = ray.get([consume.remote(source, rank, epochs) for rank, source in enumerate(sources)])
    return [max(t) for t in zip(*per_worker)][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tracks", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--stage", default="coarse", choices=["semantic", "coarse", "fine"])
    args = p.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), args.tracks)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = {}
        for name, mb in (("streamed every epoch", 0), ("held by each worker", 256)):
            cfg = stage_config(args.stage, "tiny", None, ["train.batch_size=2", "train.num_workers=2",
                                                          f"train.cache_train_mb={mb}"])
            start = time.perf_counter()
            held = stage_data(cfg, data)
            setup = time.perf_counter() - start
            times = epoch_seconds(held, args.epochs + 1)
            results[name] = statistics.median(times)
            print(f"{name:24s} setup {setup:5.2f} s, median epoch {results[name] * 1000:.2f} ms "
                  f"(epochs {', '.join(f'{t * 1000:.1f}' for t in times)} ms)")
        ray.shutdown()
    streamed, held = results.values()
    print(f"ratio streamed / held per epoch: {streamed / held:.1f}")


if __name__ == "__main__":
    main()
