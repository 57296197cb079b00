"""The datasets a training run streams (driver side): the train split with random stage crops, and a fixed
validation subset with crops fixed per row, both as Ray Datasets handed to ``TorchTrainer(datasets=...)``.
Ray Train splits each between the workers (``streaming_split(equal=True)``), so no worker ever holds the
whole dataset. Reads and crops ask for a quarter CPU so they fit beside training workers on small machines.

Every epoch re-runs the pipeline. Listing and reading the Parquet shards again costs a few seconds per epoch
(measured: 2–3.6 s on 2 CPUs for a handful of rows, against 0.1 s from memory), which dominates a run whose
epoch is a few batches (the demo, tests, a small fine-tuning set). So a train split of at most
``train.cache_train_mb`` is read once by the driver (pyarrow, one block per shard: no listing or read tasks)
into Ray's object store, and only its crops are drawn anew each epoch (the blocks' order is shuffled per epoch,
as the files are when streaming); the validation subset, whose crops are fixed, is read and cropped once.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ..config import Config
from ..data import dataset as layout
from ..data.shards import STAGE_INPUTS, CropSpec, StageCrop, open_manifest, split_files

DATA_CPUS = 0.25


def valid_subset(root: str | Path, rows: int) -> list[str]:
    """The first shards of the valid split (in name order) holding at least ``rows`` rows: a fixed subset."""
    chosen, total = [], 0
    for f in split_files(root, "valid"):
        chosen.append(f)
        total += pq.ParquetFile(f).metadata.num_rows
        if total >= rows:
            break
    return chosen


def _columns(stage: str) -> list[str]:
    return ["id", "seconds", *STAGE_INPUTS[stage]]


def _stream(files: list[str], stage: str):
    """Read anew every epoch, files in a new order each time."""
    import ray

    return ray.data.read_parquet(files, columns=_columns(stage), shuffle="files", num_cpus=DATA_CPUS)


def _in_memory(files: list[str], stage: str):
    """Read once here, one block per shard, kept in Ray's object store."""
    import ray

    return ray.data.from_arrow([pq.read_table(f, columns=_columns(stage)) for f in files])


def files_mb(files: list[str]) -> float:
    return sum(Path(f).stat().st_size for f in files) / 2 ** 20 if all(Path(f).exists() for f in files) else float("inf")


def stage_datasets(cfg: Config, root: str | Path, manifest: dict | None = None) -> dict:
    """``{"train": ..., "valid": ...}`` Ray Datasets of cropped examples of ``cfg.train.stage``."""
    stage = cfg.train.stage
    manifest = manifest or open_manifest(root)
    spec = CropSpec.make(stage, cfg.model.global_cfg, manifest)
    train_files = split_files(root, "train")
    if not train_files:
        raise layout.DatasetError(f"token dataset {root} has no train shards")
    rows = cfg.train.valid_batches * cfg.train.batch_size * cfg.train.num_workers
    valid_files = valid_subset(root, rows)
    if not valid_files:
        raise layout.DatasetError(f"token dataset {root} has no valid shards (preprocessed with valid_frac 0?): "
                                  f"training needs a validation split")
    crop = dict(batch_format="numpy", num_cpus=DATA_CPUS)
    if files_mb(train_files) <= cfg.train.cache_train_mb:
        train = _in_memory(train_files, stage).randomize_block_order()
    else:
        train = _stream(train_files, stage)
    return {
        "train": train.map_batches(StageCrop(spec), **crop),
        "valid": _in_memory(valid_files, stage).map_batches(StageCrop(spec, seed=cfg.train.seed), **crop).materialize(),
    }


__all__ = ["stage_datasets", "valid_subset", "files_mb", "DATA_CPUS"]
