"""Clip policy (short tracks, crops, split) and the per-stage window crop used by training."""
from __future__ import annotations

import numpy as np
import pytest

from musiclm.config import DataConfig, GlobalConfig
from musiclm.data.clips import clip_spans, pad_clip, split_of
from musiclm.data.shards import CropSpec, StageCrop, crop_row

MANIFEST = {"windows": {"pad_to_seconds": 10, "clap_hop_seconds": 1.0},
            "tokens": {"clap": {"codebooks": 12}, "semantic": {"hz": 50}, "coarse": {"hz": 75, "codebooks": 3},
                       "fine": {"hz": 75, "codebooks": 5}}}


def test_short_clips_are_repeat_padded_long_ones_padded_to_whole_seconds():
    rate = 100
    short = np.arange(1, 301, dtype=np.float32)  # 3 s
    out = pad_clip(short, rate, 10)
    assert len(out) == 1000 and np.array_equal(out[:900], np.tile(short, 3)) and not out[900:].any()
    long = np.ones(1234, np.float32)
    assert len(pad_clip(long, rate, 10)) == 1300


def test_clip_spans_and_split_are_stable():
    cfg = DataConfig(clip_seconds=10, crops=3, seed=1)
    spans = clip_spans(30 * 100, 100, cfg, "000007")
    assert spans == clip_spans(30 * 100, 100, cfg, "000007") and len(spans) == 3
    assert all(length == 1000 and start % 100 == 0 and start + length <= 3000 for start, length in spans)
    assert clip_spans(5000, 100, DataConfig(clip_seconds=30), "x") == [(0, 3000)]
    ids = [f"{i:06d}" for i in range(2000)]
    valid = sum(split_of(i, 0.05, 0) == "valid" for i in ids)
    assert 60 < valid < 140 and split_of("000123", 0.05, 0) == split_of("000123", 0.05, 0)


def _row(seconds: int) -> dict:
    """Token arrays whose values encode their time, so crops can be checked for alignment."""
    windows = seconds - 10 + 1
    return {"id": "t", "seconds": seconds,
            "clap": np.repeat(np.arange(windows), 12), "semantic": np.arange(seconds * 50 - 1),
            "coarse": np.repeat(np.arange(seconds * 75), 3), "fine": np.repeat(np.arange(seconds * 75), 5)}


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_stage_crops_are_aligned(stage):
    spec = CropSpec.make(stage, GlobalConfig(), MANIFEST)
    for seed in range(20):
        out = crop_row(_row(17), spec, np.random.default_rng(seed))
        assert {k: v.shape for k, v in out.items()} == spec.shapes()
        outer = int(out["clap"][0])  # the CLAP window starting at the outer crop's second
        start = out["semantic"][0] / 50 if "semantic" in out else out["coarse"][0, 0] / 75
        assert start == int(start) and outer <= start <= outer + 10 - spec.inner_seconds
        if "coarse" in out and "semantic" in out:
            assert out["semantic"][0] / 50 == out["coarse"][0, 0] / 75
        if "fine" in out:
            assert np.array_equal(out["fine"][:, 0], out["coarse"][:, 0])
    assert spec.shapes()[{"semantic": "semantic", "coarse": "coarse", "fine": "fine"}[stage]][0] == \
        {"semantic": 499, "coarse": 300, "fine": 150}[stage]


def test_seeded_crops_are_fixed_and_short_windows_refused():
    spec = CropSpec.make("coarse", GlobalConfig(), MANIFEST)
    batch = {k: np.array([v, v], dtype=object) if isinstance(v, np.ndarray) else np.array([v, v])
             for k, v in _row(20).items()}
    batch["id"] = np.array(["a", "b"])
    one, two = StageCrop(spec, seed=3)(batch), StageCrop(spec, seed=3)(batch)
    assert all(np.array_equal(one[k], two[k]) for k in spec.shapes())
    with pytest.raises(Exception, match="preprocess again with pad_to_seconds >= 12"):
        CropSpec.make("semantic", GlobalConfig(semantic_audio_length_seconds=12), MANIFEST)


def test_a_track_whose_crops_span_shards_is_counted_once(tmp_path):
    import pyarrow as pa

    from musiclm.data.dataset import scan, write_shard

    def shard(ids, track):
        return pa.table({"id": ids, "track_id": [track] * len(ids), "rows_in_track": [3] * len(ids),
                         "seconds": [10] * len(ids)})

    write_shard(tmp_path, "train", shard(["a:0", "a:1"], "a"))
    write_shard(tmp_path, "train", shard(["a:2"], "a"))
    counts = scan(tmp_path).counts()
    assert counts["rows"]["train"] == 3 and counts["tracks"]["train"] == 1


def test_rows_held_by_every_worker_are_split_evenly_and_cropped_anew_each_epoch():
    """The small-train-split path (musiclm.train.data.HeldRows): every epoch the ranks share out one permutation
    of the rows (disjoint, equal shares), each row is cropped by (seed, epoch, rank, row id), and the same
    seed gives the same epochs again; validation rows keep their order and their crop."""
    import pyarrow as pa

    from musiclm.train.data import HeldRows

    rows = [{**_row(20), "id": f"t{i}"} for i in range(9)]
    table = pa.table({k: [r[k] for r in rows] for k in ("id", "seconds", "clap", "semantic", "coarse")})
    spec = CropSpec.make("coarse", GlobalConfig(), MANIFEST)
    train = HeldRows(table, spec, seed=5, fixed=False)

    def epoch(held, e, world=2):
        return [[b for b in held.batches(e, r, world, batch_size=2, drop_last=True)] for r in range(world)]

    first, second = epoch(train, 0), epoch(train, 1)
    for batches in (first, second):
        ids = [[i for b in rank for i in b["id"]] for rank in batches]
        assert len(ids[0]) == len(ids[1]) == 4 and not set(ids[0]) & set(ids[1])  # 9 // 2 each, in 2 batches
        assert all(b["coarse"].shape == (2, 300, 3) and b["clap"].shape == (2, 12) for rank in batches for b in rank)
    starts = lambda batches: {i: int(b["coarse"][k, 0, 0]) for rank in batches for b in rank  # noqa: E731
                              for k, i in enumerate(b["id"])}
    order = lambda batches: [list(b["id"]) for rank in batches for b in rank]  # noqa: E731
    assert order(first) != order(second)  # a new row order every epoch
    common = set(starts(first)) & set(starts(second))
    assert any(starts(first)[i] != starts(second)[i] for i in common)  # and new crops
    again = epoch(HeldRows(table, spec, seed=5, fixed=False), 1)
    assert order(again) == order(second) and starts(again) == starts(second)  # reproducible

    valid = HeldRows(table, spec, seed=5, fixed=True)
    assert order(epoch(valid, 0)) == order(epoch(valid, 3)) and starts(epoch(valid, 0)) == starts(epoch(valid, 3))
    batch = {k: np.array([r[k] for r in rows[:2]], dtype=object) for k in ("clap", "semantic", "coarse")}
    batch.update(id=np.array(["t0", "t1"]), seconds=np.array([20, 20]))
    fixed = StageCrop(spec, seed=5)(batch)  # the crops validation had when it ran on Ray Data
    held = next(valid.batches(0, 0, 1, batch_size=2, drop_last=False))
    assert all(np.array_equal(fixed[k], held[k]) for k in spec.shapes())


def test_validation_counts_every_row_once_also_with_fewer_rows_than_workers():
    """Validation deals every row out (one valid track and two workers: the full-size rehearsal's case, which
    failed with "the validation subset gave no batches" on the rank that had none and retried until it gave up);
    ranks run as many forwards (ZeRO-3 gathers in each) with filler that counts nothing, and the sums over the
    ranks are those of one worker scoring every row."""
    import pyarrow as pa
    import torch

    from musiclm.config import model_preset
    from musiclm.models import build_stage
    from musiclm.train.data import HeldRows
    from musiclm.train.loop import validation_pass

    rng = np.random.default_rng(0)
    rows = [{"id": f"v{i}", "seconds": 12, "clap": rng.integers(0, 1024, 3 * 12),
             "semantic": rng.integers(0, 1024, 12 * 50 - 1), "coarse": rng.integers(0, 1024, 12 * 75 * 3)}
            for i in range(5)]
    spec = CropSpec.make("coarse", GlobalConfig(), MANIFEST)
    torch.manual_seed(0)
    model = build_stage("coarse", model_preset("tiny")).eval()
    for n, world, batch_size in ((1, 2, 1), (5, 2, 2), (3, 4, 1)):
        table = pa.table({k: [r[k] for r in rows[:n]] for k in ("id", "seconds", "clap", "semantic", "coarse")})
        valid = HeldRows(table, spec, seed=5, fixed=True)
        alone = validation_pass(model, model, list(valid.batches(0, 0, 1, batch_size, False)), "cpu")[0].t
        split = [valid.lockstep_batches(rank, world, batch_size) for rank in range(world)]
        assert len({len(batches) for batches, _ in split}) == 1  # as many forwards on every rank
        ids = [i for batches, counted in split for b, c in zip(batches, counted) if c for i in b["id"]]
        assert sorted(ids) == [f"v{i}" for i in range(n)]  # every row counted once
        total = sum(validation_pass(model, model, batches, "cpu", counted)[0].t for batches, counted in split)
        assert alone[1] > 0 and torch.allclose(total, alone), (n, world, total, alone)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_streamed_rows_are_shuffled_and_cropped_anew_each_epoch_on_the_worker(local_ray, monkeypatch):
    """The large-train-split path (musiclm.train.data.StreamedRows) on a real Ray Dataset iterator: rows mixed
    by a seeded local shuffle buffer, each cropped on the worker by (seed, epoch, rank, row id); the same seed
    gives the same epoch again, another epoch or rank other crops. (It used to crop on the driver's dataset
    with one pickled generator: the same crop of a row in every epoch.)"""
    import pyarrow as pa
    import ray.train

    from musiclm.train.data import StreamedRows

    rows = [{**_row(20), "id": f"t{i}"} for i in range(12)]
    table = pa.table({k: [r[k] for r in rows] for k in ("id", "seconds", "clap", "semantic", "coarse")})
    data = local_ray.data.from_arrow(table)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda split: data.iterator())
    spec = CropSpec.make("coarse", GlobalConfig(), MANIFEST)

    def epoch(e, rank=0):
        batches = list(StreamedRows(spec, seed=5, shuffle_rows=8).batches(e, rank, 1, batch_size=4, drop_last=True))
        assert all(b["coarse"].shape == (4, 300, 3) and b["clap"].shape == (4, 12) for b in batches)
        return [i for b in batches for i in b["id"]], {i: int(c[0, 0]) for b in batches
                                                       for i, c in zip(b["id"], b["coarse"])}

    (order0, crops0), (order1, crops1) = epoch(0), epoch(1)
    assert sorted(order0) == sorted(r["id"] for r in rows) and order0 != sorted(order0)  # every row, mixed
    assert epoch(0) == (order0, crops0)  # reproducible
    assert order1 != order0 and sum(crops0[i] != crops1[i] for i in crops0) >= 6  # a new order, new crops
    assert sum(crops0[i] != epoch(0, rank=1)[1][i] for i in crops0) >= 6  # ranks crop differently
