"""Artifacts in object storage (an S3 server on 127.0.0.1, tests/conftest.py): the storage layer, a token
dataset, a token system and a model set read from a bucket, generation written to one. Preprocessing killed and
resumed into a bucket is in test_preprocess.py, training that checkpoints to and resumes from one in
test_train.py, a sweep kept in one in test_tune.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from musiclm.config import DataConfig
from musiclm.data import dataset as layout
from musiclm.data.preprocess import prepare, run_local
from musiclm.data.sources import open_source
from musiclm.infra import storage


def upload(local, uri: str) -> str:
    storage.upload_dir(local, uri)
    return uri


def test_locations_join_and_resolve(object_store):
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "a", "b.json") == "s3://bucket/runs/a/b.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name(storage.join(uri, "x")) == "x" and storage.parent(storage.join(uri, "x")) == uri
    assert storage.is_remote("gs://b/k") and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp")
    assert storage.location("file:///tmp/a/") == "/tmp/a"
    fs, path = storage.resolve(object_store.bucket() + "/a/b")
    assert type(fs).__name__ == "S3FileSystem" and path.endswith("/a/b")


def test_files_in_a_bucket_are_written_whole_and_listed(object_store, tmp_path):
    root = object_store.bucket() + "/data"
    assert storage.is_empty_dir(root) and not storage.exists(root)
    storage.write_text(storage.join(root, "x", "a.txt"), "one")
    storage.write_text(storage.join(root, "x", "a.txt"), "two")  # overwrite: the last whole write wins
    storage.write_bytes(storage.join(root, "x", "b.bin"), b"\0" * (6 << 20))  # past pyarrow's 5 MiB part size
    storage.write_json(storage.join(root, "c.json"), {"k": 1})
    assert storage.read_text(storage.join(root, "x", "a.txt")) == "two"
    assert storage.size(storage.join(root, "x", "b.bin")) == 6 << 20
    assert storage.list_files(storage.join(root, "x")) == [storage.join(root, "x", n) for n in ("a.txt", "b.bin")]
    assert storage.list_dirs(root) == [storage.join(root, "x")] and storage.read_json(storage.join(root, "c.json"))
    assert storage.remove_temporaries(root) == 0  # nothing is ever written under a temporary name there
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    # Why nothing streams into a final key: pyarrow completes an upload on close, even after an error inside
    # the `with` block, so a writer that failed half way would leave half an object.
    fs, path = storage.resolve(storage.join(root, "streamed"))
    with pytest.raises(RuntimeError), fs.open_output_stream(path) as f:
        f.write(b"half")
        raise RuntimeError("the writer fails here")
    assert storage.read_bytes(storage.join(root, "streamed")) == b"half"
    # A local folder: written under a temporary name, renamed; a killed writer's leftover is cleared.
    storage.write_text(tmp_path / "d" / "m.json", "{}")
    (tmp_path / "d" / ".tmp-dead-m.json").write_text("{")
    assert storage.remove_temporaries(tmp_path / "d") == 1 and storage.list_files(tmp_path / "d") == [
        str(tmp_path / "d" / "m.json")]


def test_unwritable_location_names_itself(tmp_path):
    """Cases that hold for root too (CI runs as root, and permissions do not stop root): a file where a folder goes,
    a folder where the file goes, and a folder no process can create (procfs takes no new entries). Nothing is left
    half written."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(storage.StorageError, match="cannot write .*file/out.json: (File exists|Not a directory)"):
        storage.write_text(tmp_path / "file" / "out.json", "{}")
    (tmp_path / "out.json").mkdir()
    with pytest.raises(storage.StorageError, match="cannot write .*out.json: Is a directory"):
        storage.write_text(tmp_path / "out.json", "{}")
    with pytest.raises(storage.StorageError, match="cannot write /proc/musiclm-test/out.json: No such file"):
        storage.write_text("/proc/musiclm-test/out.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.json"] and not any((tmp_path / "out.json").iterdir())


def test_token_dataset_in_a_bucket_is_written_scanned_and_resumed(object_store, corpus, tiny_system_dir,
                                                                  token_dataset_dir):
    out = object_store.bucket() + "/datasets/synth"
    cfg = DataConfig(clip_seconds=11, valid_frac=0.34, seed=4, rows_per_shard=2)  # token_dataset_dir's rows
    source = open_source(corpus)
    system = upload(tiny_system_dir, object_store.bucket() + "/token_system")  # read from the bucket too
    job = prepare(open_source(corpus), system, out, cfg, log=lambda m: None)
    assert job.out == out and len(job.pending) == 6
    # two tracks first (an interrupted run), then the rest: the rows of a straight local run, token for token
    job.pending = job.pending[:2]
    run_local(job, log=lambda m: None)
    assert storage.read_json(storage.join(out, layout.MANIFEST))["status"] == "in_progress"
    job = prepare(source, system, out, cfg, log=lambda m: None)
    assert len(job.pending) == 4
    run_local(job, log=lambda m: None)
    straight = token_dataset_dir  # the same corpus and settings, tokenized locally in one go

    def rows(root):
        return {r["id"]: r for s in layout.SPLITS for f in layout.shard_files(root, s)
                for r in storage.read_parquet(f).to_pylist()}

    remote, local = rows(out), rows(straight)
    assert sorted(remote) == sorted(local) and all(remote[k][c] == local[k][c] for k in local
                                                   for c in layout.TOKEN_COLUMNS)
    manifest = storage.read_json(storage.join(out, layout.MANIFEST))
    assert manifest["status"] == "complete" and manifest["token_system"] == system
    assert prepare(source, system, out, cfg, log=lambda m: None).pending == []


def test_model_set_in_a_bucket_generates_into_a_bucket(object_store, tiny_model_set, tiny_system_dir, tmp_path):
    from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator
    from musiclm.tokens.system import local_root, read_meta

    bucket = object_store.bucket()
    local_set = tmp_path / "set"
    shutil.copytree(tiny_model_set, local_set, symlinks=False)
    models_uri = upload(local_set, bucket + "/models/tiny")
    models = ModelSet.from_dir(models_uri)
    assert models.coarse == models_uri + "/coarse" and models.token_system == models_uri + "/token_system"
    # the token system is fetched once per node into the cache, and again only when it changed
    cached = local_root(models.token_system)
    assert cached != tiny_system_dir and local_root(models.token_system) == cached
    assert read_meta(cached)[0]["fingerprint"] == read_meta(tiny_system_dir)[0]["fingerprint"]

    settings = GenerateSettings(duration=1.0, num_samples=1, top=1, seed=3)
    remote_gen, local_gen = MusicGenerator(models), MusicGenerator(ModelSet.from_dir(tiny_model_set))
    result = remote_gen.generate("a calm piano", settings)
    out = bucket + "/outputs/calm"
    report = remote_gen.write(result, settings, out)
    assert report["files"] == [out + "/sample_1.wav"] and storage.read_json(out + "/report.json")["prompt"]
    assert storage.read_bytes(out + "/sample_1.wav")[:4] == b"RIFF"
    np.testing.assert_array_equal(result.audio, local_gen.generate("a calm piano", settings).audio)


def test_tensorboard_events_reach_a_bucket(object_store):
    from musiclm.train.metrics import TensorBoard, read_scalars

    log_dir = object_store.bucket() + "/run/tensorboard"
    tb = TensorBoard(log_dir)
    tb.scalars({"train/loss": 2.0}, 5)
    tb.flush()  # readable from the bucket after every flush
    assert read_scalars(log_dir) == {"train/loss": [(5, 2.0)]}
    tb.scalars({"train/loss": 1.5}, 10)
    tb.close()
    resumed = TensorBoard(log_dir, purge_step=10)  # a resumed run: a new events file beside the first
    resumed.scalars({"train/loss": 1.25}, 10)
    resumed.close()
    assert len(storage.list_files(log_dir, "events.*")) == 2
    assert read_scalars(log_dir)["train/loss"] == [(5, 2.0), (10, 1.25)]


def test_parquet_shard_round_trip_in_a_bucket(object_store):
    root = object_store.bucket() + "/ds"
    table = pa.table({"id": ["a", "b"], "v": [1, 2]})
    path = layout.write_shard(root, "errors", table)
    assert path.startswith(root + "/errors/part-") and layout.shard_files(root, "errors") == [path]
    assert storage.read_parquet(path).equals(table) and storage.parquet_rows(path) == 2
    assert layout.write_shard(root, "errors", table) == path  # the same rows: the same name, replaced
    assert json.loads(json.dumps(storage.read_parquet(path, ["id"]).to_pylist())) == [{"id": "a"}, {"id": "b"}]


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.argv = ["musiclm generate"] + sys.argv[1:]
from jobs.common import run
from jobs.generate import main
run(main)
"""


@pytest.mark.faults
def test_a_full_disk_fails_naming_the_file_and_keeps_what_was_written(tiny_model_set, tmp_path):
    """A generation into a folder that already holds one, on a disk that takes no file over 100 kB (a file-size
    limit standing in for a full disk): the job stops with exit 2 and a message naming the file and what to
    check; the earlier WAV and report are untouched and no temporary file is left."""
    import subprocess
    import sys

    from jobs.generate import main as generate

    out = tmp_path / "gen"
    generate(["calm piano", "--models", str(tiny_model_set), "--duration", "1", "--num-samples", "1", "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"sample_1.wav", "report.json"}
    # 4 s at 24 kHz, 16-bit: a 192 kB WAV
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "fast drums", "--models", str(tiny_model_set),
                           "--duration", "4", "--num-samples", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"cannot write {out / 'sample_1.wav'}" in proc.stderr and "has room" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
