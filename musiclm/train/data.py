"""The datasets a training run streams (driver side): the train split with random stage crops, and a fixed
validation subset with crops fixed per row, both as Ray Datasets handed to ``TorchTrainer(datasets=...)``.
Ray Train splits each between the workers (``streaming_split(equal=True)``), so no worker ever holds the
whole dataset. Reads and crops ask for a quarter CPU so they fit beside training workers on small machines.
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


def _read(files: list[str], stage: str, shuffle: bool):
    import ray

    return ray.data.read_parquet(files, columns=["id", "seconds", *STAGE_INPUTS[stage]],
                                 shuffle="files" if shuffle else None, num_cpus=DATA_CPUS)


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
    return {
        "train": _read(train_files, stage, shuffle=True).map_batches(StageCrop(spec), **crop),
        "valid": _read(valid_files, stage, shuffle=False).map_batches(StageCrop(spec, seed=cfg.train.seed), **crop),
    }


__all__ = ["stage_datasets", "valid_subset", "DATA_CPUS"]
