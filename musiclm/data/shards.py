"""Reading the token dataset for training: a Ray Dataset of a split's shards, and the random window crop of
each stage, as a callable for ``Dataset.map_batches``.

Crops follow open-musiclm (REFERENCE.md): an outer crop of the semantic window (10 s) starts at a random
whole second; the CLAP tokens are those of the CLAP window starting there; the stage's own window (semantic
10 s, coarse 4 s, fine 2 s) is a random whole-second stretch inside the outer crop. Semantic tokens of
``w`` seconds are ``w * 50 - 1`` frames (HuBERT's convolutions give one frame fewer), acoustic ``w * 75``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import GlobalConfig
from . import dataset as layout
from .clips import stable_fraction

STAGE_INPUTS = {"semantic": ("clap", "semantic"), "coarse": ("clap", "semantic", "coarse"),
                "fine": ("clap", "coarse", "fine")}


def open_manifest(root: str | Path, fingerprint: str | None = None) -> dict:
    """The dataset's manifest; with ``fingerprint``, refuse a dataset of another token system."""
    manifest = layout.read_manifest(root)
    if manifest is None:
        raise layout.DatasetError(f"{root} is not a token dataset (no {layout.MANIFEST}); make one with "
                                  f"`musiclm preprocess --out {root} ...`")
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        raise layout.DatasetError(
            f"token dataset {root} was made with token system {manifest['fingerprint'][:12]} "
            f"({manifest.get('token_system')}), but this run uses token system {fingerprint[:12]}: their tokens "
            f"mean different things. Preprocess the audio again with this token system, or use the one that "
            f"made the dataset.")
    return manifest


def check_shards(root: str | Path, manifest: dict) -> None:
    """A complete dataset's shards must hold the rows its manifest counts, split by split (footers only: one small
    read per shard): a deleted or half-copied shard would otherwise train on part of the data without a word."""
    from ..infra import storage

    if manifest.get("status") != "complete":
        return
    for split, expected in manifest.get("counts", {}).get("rows", {}).items():
        files = split_files(root, split)
        found = sum(storage.parquet_rows(f) for f in files)
        if found != expected:
            raise layout.DatasetError(
                f"token dataset {root}: its manifest counts {expected} {split} rows, but its {len(files)} {split} "
                f"shard(s) hold {found}: a shard was deleted, lost or not copied with the rest. Copy the dataset "
                f"again, or run the same `musiclm preprocess` into it: the missing tracks are made anew.")


def split_files(root: str | Path, split: str) -> list[str]:
    """The split's shards as locations (paths, or URIs in object storage)."""
    if split not in layout.SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(layout.SPLITS)}")
    return layout.shard_files(root, split)


def read_shards(files: list[str], **kwargs):
    """``ray.data.read_parquet`` of shards on a local or object-store filesystem."""
    import ray

    from ..infra import storage

    fs, paths = storage.filesystem_paths(files)
    return ray.data.read_parquet(paths, filesystem=fs, **kwargs)


def token_dataset(root: str | Path, split: str = "train", stage: str | None = None,
                  fingerprint: str | None = None):
    """A Ray Dataset streaming the split's shards (only the columns ``stage`` reads, when given)."""
    open_manifest(root, fingerprint)
    files = split_files(root, split)
    if not files:
        raise layout.DatasetError(f"token dataset {root} has no {split} shards"
                                  + (" (is valid_frac 0?)" if split == "valid" else ""))
    columns = None if stage is None else ["id", "seconds", *STAGE_INPUTS[stage]]
    return read_shards(files, columns=columns)


@dataclass(frozen=True)
class CropSpec:
    """Window sizes and token rates of one stage's crop."""

    stage: str
    outer_seconds: int  # the semantic window: where the CLAP token comes from
    inner_seconds: int  # the stage's own window
    semantic_hz: int = 50
    acoustic_hz: int = 75
    clap_codebooks: int = 12
    clap_hop_seconds: float = 1.0
    coarse_codebooks: int = 3
    fine_codebooks: int = 5

    @classmethod
    def make(cls, stage: str, windows: GlobalConfig, manifest: dict) -> "CropSpec":
        if stage not in STAGE_INPUTS:
            raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGE_INPUTS)}")
        outer = windows.semantic_audio_length_seconds
        inner = getattr(windows, f"{stage}_audio_length_seconds")
        for name, value in (("semantic", outer), (stage, inner)):
            if float(value) != int(value):
                raise ValueError(f"{name}_audio_length_seconds must be whole seconds to crop tokens, got {value}")
        shortest = manifest["windows"]["pad_to_seconds"]
        if outer > shortest:
            raise layout.DatasetError(
                f"the semantic window is {outer:g} s but rows of this dataset can be as short as {shortest} s "
                f"(pad_to_seconds): preprocess again with pad_to_seconds >= {outer:g}")
        if inner > outer:
            raise ValueError(f"the {stage} window ({inner:g} s) is longer than the semantic window ({outer:g} s)")
        tok = manifest["tokens"]
        return cls(stage, int(outer), int(inner), tok["semantic"]["hz"], tok["coarse"]["hz"],
                   tok["clap"]["codebooks"], manifest["windows"]["clap_hop_seconds"], tok["coarse"]["codebooks"],
                   tok["fine"]["codebooks"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each array one cropped example has."""
        sem = (self.outer_seconds if self.stage == "semantic" else self.inner_seconds) * self.semantic_hz - 1
        ac = self.inner_seconds * self.acoustic_hz
        out = {"clap": (self.clap_codebooks,), "semantic": (sem,), "coarse": (ac, self.coarse_codebooks),
               "fine": (ac, self.fine_codebooks)}
        return {k: out[k] for k in STAGE_INPUTS[self.stage]}


def crop_row(row: dict, spec: CropSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One training example of ``spec.stage`` from one dataset row (token arrays flattened as stored)."""
    seconds = int(row["seconds"])
    if seconds < spec.outer_seconds:
        raise ValueError(f"row {row.get('id')} has {seconds} s of tokens, less than the {spec.outer_seconds} s window")
    outer = int(rng.integers(0, seconds - spec.outer_seconds + 1))
    inner = outer if spec.stage == "semantic" else int(rng.integers(outer, outer + spec.outer_seconds - spec.inner_seconds + 1))
    span = spec.outer_seconds if spec.stage == "semantic" else spec.inner_seconds
    out = {}
    clap = np.asarray(row["clap"]).reshape(-1, spec.clap_codebooks)
    out["clap"] = clap[min(int(round(outer / spec.clap_hop_seconds)), len(clap) - 1)]
    if "semantic" in STAGE_INPUTS[spec.stage]:
        sem = np.asarray(row["semantic"])
        out["semantic"] = sem[inner * spec.semantic_hz: (inner + span) * spec.semantic_hz - 1]
    a0, a1 = inner * spec.acoustic_hz, (inner + span) * spec.acoustic_hz
    for name, q in (("coarse", spec.coarse_codebooks), ("fine", spec.fine_codebooks)):
        if name in STAGE_INPUTS[spec.stage]:
            out[name] = np.asarray(row[name]).reshape(-1, q)[a0:a1]
    for name, shape in spec.shapes().items():
        if out[name].shape != shape:
            raise ValueError(f"row {row.get('id')}: {name} tokens crop to {out[name].shape}, expected {shape}; "
                             f"the row's token arrays do not match its {seconds} s")
    return {k: v.astype(np.int64) for k, v in out.items()}


class StageCrop:
    """``Dataset.map_batches(StageCrop(spec, seed))``: one crop per row, fixed by (seed, row id). Training crops
    anew every epoch on the workers instead (``train.data``): a generator made here would travel pickled to
    every task and draw the same crops each time."""

    def __init__(self, spec: CropSpec, seed: int):
        self.spec, self.seed = spec, seed

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        rows = []
        for i, rid in enumerate(ids):
            rng = np.random.default_rng(int(stable_fraction(self.seed, "window:" + rid) * 2 ** 63))
            rows.append(crop_row({k: batch[k][i] for k in batch}, self.spec, rng))
        out = {k: np.stack([r[k] for r in rows]) for k in self.spec.shapes()}
        out["id"] = np.asarray(ids)
        return out
