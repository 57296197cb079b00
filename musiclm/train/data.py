"""The data a training run reads (built on the driver): the train split with random stage crops, and a fixed
validation subset with crops fixed per row.

Two ways to hand the train split to the workers, chosen by its size:
- **Held by every worker** (at most ``train.cache_train_mb`` of shards, the default for small sets: the demo,
  tests, a fine-tuning set): the driver reads the shards once (pyarrow) into one Arrow table in Ray's object
  store, and each worker reads it from there (zero-copy on its node). Every epoch, all ranks draw the same
  permutation of the rows from (seed, epoch) and rank ``r`` takes every ``world``-th row of it, equal shares as
  ``streaming_split(equal=True)`` gives; each row is cropped with a generator seeded by (seed, epoch, rank, row
  id): new crops and a new row order every epoch, the same ones on a rerun, and a resume skips exactly the
  batches that were consumed. No Ray Data execution per epoch: that cost 1.2-1.4 s per epoch inside a 2-worker
  run on 2 CPUs (measured from the run's logs), which is the whole run when an epoch is one batch.
- **Streamed** (larger splits): a Ray Dataset of the stage's columns handed to ``TorchTrainer(datasets=...)``;
  Ray Train splits it between the workers (``streaming_split(equal=True)``), so no worker holds the whole split;
  every epoch re-reads the Parquet shards (files in a new order), each worker mixes rows through a local shuffle
  buffer seeded by (seed, epoch, rank) and crops each row on the worker with a generator seeded by (seed, epoch,
  rank, row id), as the held path does (``StreamedRows``). Cropping on the driver's dataset instead drew every
  epoch's crops from one pickled generator: the same crop of a row in every epoch.
The validation subset (``valid_batches × batch_size × workers`` rows, from the first valid shards) is always
held by every worker, its crops fixed by row id, so validation needs no Ray Data execution either.
Reads and crops of the streamed path ask for a quarter CPU so they fit beside training workers on small machines.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Config
from ..data import dataset as layout
from ..data.clips import stable_fraction
from ..data.shards import STAGE_INPUTS, CropSpec, crop_row, open_manifest, read_shards, split_files
from ..infra import storage

DATA_CPUS = 0.25


def valid_subset(root: str | Path, rows: int) -> list[str]:
    """The first shards of the valid split (in name order) holding at least ``rows`` rows: a fixed subset."""
    chosen, total = [], 0
    for f in split_files(root, "valid"):
        chosen.append(f)
        total += storage.parquet_rows(f)
        if total >= rows:
            break
    return chosen


def _columns(stage: str) -> list[str]:
    return ["id", "seconds", *STAGE_INPUTS[stage]]


def _stream(files: list[str], stage: str):
    """Read anew every epoch, files in a new order each time."""
    return read_shards(files, columns=_columns(stage), shuffle="files", num_cpus=DATA_CPUS)


def _table(files: list[str], stage: str):
    """The shards' rows (the columns ``stage`` reads) as one Arrow table, read here."""
    import pyarrow as pa

    return pa.concat_tables([storage.read_parquet(f, columns=_columns(stage)) for f in files])


def files_mb(files: list[str], limit: float = float("inf")) -> float:
    """The shards' size in MiB; once past ``limit``, the size so far (one request per file in object storage)."""
    total = 0.0
    for f in files:
        total += storage.size(f) / 2 ** 20
        if total > limit:
            break
    return total


def crop_rng(seed: int, row_id: str, epoch_rank: tuple[int, int] | None) -> np.random.Generator:
    """The generator of one row's crop: fixed by (seed, row id) for validation, else by (seed, epoch, rank, row
    id): a new crop every epoch, the same on a rerun."""
    key = f"window:{row_id}" if epoch_rank is None else f"crop:{epoch_rank[0]}:{epoch_rank[1]}:{row_id}"
    return np.random.default_rng(int(stable_fraction(seed, key) * 2 ** 63))


def crop_batch(rows: list[dict], spec: CropSpec, rngs) -> dict:
    """Crop each row with its generator; stack into a batch as ``DataIterator.iter_batches`` gives it."""
    crops = [crop_row(r, spec, g) for r, g in zip(rows, rngs)]
    batch = {k: np.stack([c[k] for c in crops]) for k in spec.shapes()}
    batch["id"] = np.asarray([str(r["id"]) for r in rows])
    return batch


@dataclass
class HeldRows:
    """A split held by every worker: an Arrow table in Ray's object store, cropped on the worker.

    ``fixed``: each row's crop is fixed by (seed, row id) and the rows keep their order (validation); otherwise
    the order and the crops are drawn anew every epoch (training). In training every rank gets the same number
    of rows (``len // world``; the remainder of that epoch's order is left out), so ranks step in lockstep, as
    ZeRO needs. Validation deals every row out (ranks differ by one row at most; a rank may get none when there
    are fewer rows than workers), and ``lockstep_batches`` evens the number of forwards out with uncounted filler.
    """

    table: object  # ray.ObjectRef of a pyarrow.Table (the table itself once loaded on a worker)
    spec: CropSpec
    seed: int
    fixed: bool
    _rows: dict | None = field(default=None, repr=False, compare=False)

    def _load(self) -> dict:
        if self._rows is None:
            import pyarrow as pa
            import ray

            table = self.table if isinstance(self.table, pa.Table) else ray.get(self.table)
            cols = {"id": [str(i) for i in table.column("id").to_pylist()],
                    "seconds": table.column("seconds").to_numpy()}
            for name in STAGE_INPUTS[self.spec.stage]:  # flat values + offsets: rows are views, nothing copied
                arr = table.column(name).combine_chunks()
                cols[name] = (arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy())
            self._rows = cols
        return self._rows

    def __len__(self) -> int:
        return len(self._load()["id"])

    def _row(self, i: int) -> dict:
        rows = self._load()
        out = {"id": rows["id"][i], "seconds": rows["seconds"][i]}
        for name in STAGE_INPUTS[self.spec.stage]:
            values, offsets = rows[name]
            out[name] = values[offsets[i]: offsets[i + 1]]
        return out

    def order(self, epoch: int, rank: int, world: int) -> np.ndarray:
        """The row indices rank ``rank`` reads in ``epoch``."""
        n = len(self)
        if self.fixed:
            return np.arange(n)[rank::world]
        each = n // world
        return np.random.default_rng([self.seed, epoch]).permutation(n)[: each * world][rank::world]

    def rng(self, row_id: str, epoch: int, rank: int) -> np.random.Generator:
        return crop_rng(self.seed, row_id, None if self.fixed else (epoch, rank))

    def batches(self, epoch: int, rank: int, world: int, batch_size: int, drop_last: bool) -> Iterator[dict]:
        """Numpy batches as ``DataIterator.iter_batches`` gives them: each input stacked, and ``id``."""
        mine = self.order(epoch, rank, world)
        stop = len(mine) - len(mine) % batch_size if drop_last else len(mine)
        for start in range(0, stop, batch_size):
            rows = [self._row(int(i)) for i in mine[start: start + batch_size]]
            yield crop_batch(rows, self.spec, [self.rng(r["id"], epoch, rank) for r in rows])

    def lockstep_batches(self, rank: int, world: int, batch_size: int) -> tuple[list[dict], list[bool]]:
        """This rank's batches of a fixed split and whether each counts: its own rows' (counted), then filler
        batches of the split's first row (not counted) until it has as many as the rank with the most rows, so
        that every rank runs as many forwards (under ZeRO-3 each forward gathers parameters from all ranks)."""
        batches = list(self.batches(0, rank, world, batch_size, drop_last=False))
        most_rows = -(-len(self) // world)  # rank 0's: rows are dealt round-robin
        missing = -(-most_rows // batch_size) - len(batches)
        if missing > 0:
            row = self._row(0)
            batches += [crop_batch([row], self.spec, [self.rng(row["id"], 0, rank)])] * missing
        return batches, [True] * (len(batches) - max(missing, 0)) + [False] * max(missing, 0)

    def __getstate__(self):  # ship the reference, never the loaded rows
        return {**self.__dict__, "_rows": None}


@dataclass
class StreamedRows:
    """The worker's side of a streamed split (Ray Train's dataset shard ``split``): rows mixed through a local
    shuffle buffer seeded by (seed, epoch, rank), each cropped on the worker (``crop_rng``)."""

    spec: CropSpec
    seed: int
    split: str = "train"
    shuffle_rows: int = 256  # the local shuffle buffer, in rows

    def batches(self, epoch: int, rank: int, world: int, batch_size: int, drop_last: bool) -> Iterator[dict]:
        import ray.train

        shard = ray.train.get_dataset_shard(self.split)
        shuffle_seed = int(stable_fraction(self.seed, f"shuffle:{epoch}:{rank}") * 2 ** 31)
        for raw in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                      local_shuffle_buffer_size=self.shuffle_rows or None,
                                      local_shuffle_seed=shuffle_seed):
            rows = [{k: raw[k][i] for k in raw} for i in range(len(raw["id"]))]
            yield crop_batch(rows, self.spec, [crop_rng(self.seed, str(r["id"]), (epoch, rank)) for r in rows])


@dataclass
class StageData:
    """What a run reads: ``datasets`` for ``TorchTrainer`` (the streamed train split, when streamed) and the
    splits held by every worker (``train`` when small enough, ``valid`` always), for the loop's config."""

    datasets: dict
    held: dict


def stage_data(cfg: Config, root: str | Path, manifest: dict | None = None) -> StageData:
    """The train split and the validation subset of ``cfg.train.stage`` for a run. Needs a connected Ray."""
    import ray

    stage = cfg.train.stage
    manifest = manifest or open_manifest(root)
    spec = CropSpec.make(stage, cfg.model.global_cfg, manifest)
    train_files = split_files(root, "train")
    if not train_files:
        raise layout.DatasetError(f"token dataset {root} has no train shards")
    rows = cfg.train.valid_batches * cfg.train.batch_size * cfg.train.max_workers  # the same subset at any size
    valid_files = valid_subset(root, rows)
    if not valid_files:
        raise layout.DatasetError(f"token dataset {root} has no valid shards (preprocessed with valid_frac 0?): "
                                  f"training needs a validation split")
    held = {"valid": HeldRows(ray.put(_table(valid_files, stage)), spec, cfg.train.seed, fixed=True)}
    datasets = {}
    if files_mb(train_files, cfg.train.cache_train_mb) <= cfg.train.cache_train_mb:
        held["train"] = HeldRows(ray.put(_table(train_files, stage)), spec, cfg.train.seed, fixed=False)
    else:
        datasets["train"] = _stream(train_files, stage)
        held["train"] = StreamedRows(spec, cfg.train.seed)  # not held: how each worker crops its stream
    return StageData(datasets, held)


__all__ = ["stage_data", "StageData", "HeldRows", "StreamedRows", "crop_rng", "crop_batch", "valid_subset", "files_mb", "DATA_CPUS"]
