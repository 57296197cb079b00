"""Preprocessing on real Ray Data: synthetic corpus -> token dataset, bad files -> error rows, interrupt and
resume, fingerprint refusal."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from musiclm.audio.io import list_audio_files
from musiclm.config import DataConfig
from musiclm.data import dataset as layout
from musiclm.data.preprocess import prepare, run
from musiclm.data.sources import open_source
from musiclm.infra import storage
from musiclm.infra.raycompute import plan_actors

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def preprocess(source_dir, system_dir, out, cfg=None, **kw):
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    job = prepare(open_source(source_dir, **kw), system_dir, out, cfg or DataConfig(), log=lambda m: None)
    return job, (run(job, plan_actors(ray.cluster_resources()), log=lambda m: None) if job.pending else None)


def read_rows(out) -> dict[str, dict]:
    rows = {}
    for split in layout.SPLITS:
        for f in layout.shard_files(out, split):
            fs, path = storage.resolve(f)  # a local path or a bucket's key
            for r in pq.read_table(path, filesystem=fs).to_pylist():  # plain pyarrow opens every shard
                assert r["id"] not in rows, f"row {r['id']} written twice"
                rows[r["id"]] = r
    return rows


def read_errors(out) -> dict[str, dict]:
    return {r["track_id"]: r for f in layout.shard_files(out, layout.ERRORS) for r in pq.read_table(f).to_pylist()}


@pytest.fixture(scope="module")
def corpus_on_ray(local_ray, corpus, tiny_system_dir, tmp_path_factory):
    """The session corpus tokenized on Ray Data in one uninterrupted run: checked as a dataset, and the reference
    that a killed and resumed run must equal (one Ray Data run for both: each costs 13-15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("on-ray") / "ds"
    _, summary = preprocess(corpus, tiny_system_dir, out, DataConfig(valid_frac=0.3, rows_per_shard=2))
    return out, summary


def test_synthetic_corpus_to_dataset(local_ray, corpus_on_ray, corpus, tiny_system_dir):
    out, summary = corpus_on_ray
    rows = read_rows(out)
    ids = sorted(json.loads(line)["id"] for line in (corpus / "captions.jsonl").read_text().splitlines())
    assert sorted(rows) == ids and summary["run"]["tracks"] == 6
    assert {r["split"] for r in rows.values()} == {"train", "valid"}
    for r in rows.values():  # 11 s tracks are padded to 11 whole seconds
        assert r["seconds"] == 11 and r["audio_seconds"] == pytest.approx(11.0, abs=0.05)
        assert len(r["clap"]) == (11 - 10 + 1) * 12 and len(r["semantic"]) == 11 * 50 - 1
        assert len(r["coarse"]) == 11 * 75 * 3 and len(r["fine"]) == 11 * 75 * 5
        assert r["caption"] and max(r["semantic"]) < 1024 and max(r["fine"]) < 1024
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == {
        s: sum(r["split"] == s for r in rows.values()) for s in layout.SPLITS}
    for split in layout.SPLITS:  # rows_per_shard rows in every shard of a split but its last
        sizes = sorted((pq.ParquetFile(f).metadata.num_rows for f in layout.shard_files(out, split)), reverse=True)
        assert sizes[:-1] == [2] * (len(sizes) - 1) and 1 <= sizes[-1] <= 2, (split, sizes)
    again, _ = preprocess(corpus, tiny_system_dir, out, DataConfig(valid_frac=0.3, rows_per_shard=2))
    assert again.pending == []  # a finished dataset: nothing left to do
    # the run has given back every CPU it reserved, its writer actor's share too: that actor, left to the driver's
    # garbage collector, lived on, and the pipeline's next job (evaluation: one actor asking every CPU) waited until
    # Ray had it collected
    cpus, deadline = local_ray.cluster_resources()["CPU"], time.time() + 20  # actors end asynchronously
    while local_ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.2)
    assert local_ray.available_resources().get("CPU", 0) == cpus, local_ray.available_resources()


def test_bad_files_become_error_rows(local_ray, corpus, tiny_system_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = list_audio_files(corpus)[:2]
    for i, p in enumerate(good):
        shutil.copy(p, folder / f"good{i}.mp3")
    data = Path(good[0]).read_bytes()
    (folder / "truncated.mp3").write_bytes(data[: len(data) // 2])
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "text.mp3").write_text("this is not audio\n" * 50)
    sf.write(folder / "short.mp3", np.sin(np.arange(44100) / 10).astype(np.float32) * 0.3, 44100,
             format="MP3", subtype="MPEG_LAYER_III")
    (folder / "dir.mp3").mkdir()  # named like a track, but a directory
    (folder / "link.mp3").symlink_to(tmp_path / "gone.mp3")  # a link to nothing
    (folder / "ioerror.mp3").symlink_to("/proc/self/mem")  # reading it fails with EIO, as a bad disk's sector does,
    shutil.copy(good[1], folder / "locked.mp3")           # for root too (who reads a file of mode 0)
    os.chmod(folder / "locked.mp3", 0)
    try:
        preprocess(folder, tiny_system_dir, tmp_path / "ds")
    finally:
        os.chmod(folder / "locked.mp3", 0o644)
    rows, errors = read_rows(tmp_path / "ds"), read_errors(tmp_path / "ds")
    kinds = {k: e["kind"] for k, e in errors.items()}
    expected = {"truncated": "truncated", "empty": "empty", "text": "not_audio", "short": "too_short",
                "dir": "not_a_file", "link": "broken_link", "ioerror": "unreadable"}
    root_reads_anything = os.geteuid() == 0  # permissions do not stop root: then the locked file is good
    if not root_reads_anything:
        expected["locked"] = "unreadable"
    assert kinds == expected
    assert sorted(rows) == sorted(["good0", "good1"] + (["locked"] if root_reads_anything else []))
    assert "shorter than min_seconds" in errors["short"]["message"] and errors["text"]["stage"] == "decode"
    assert errors["link"]["stage"] == "list" and "gone.mp3" in errors["link"]["message"]
    assert "Input/output error" in errors["ioerror"]["message"]
    counted = json.loads((tmp_path / "ds" / "manifest.json").read_text())["counts"]["errors_by_kind"]
    assert counted == dict(Counter(expected.values()))


killed_tokenizer: list[int] = []


def _kill_first_process_named(marker: str, timeout: float = 120.0):
    """A thread that SIGKILLs the first process whose command line (Ray's process title) names ``marker``, once
    it has run 2 s (its model loaded, its first batch under way); its pid goes to ``killed_tokenizer``."""
    import threading

    def kill() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
                if marker in " ".join(p.info["cmdline"] or []) and time.time() - p.info["create_time"] > 2:
                    p.kill()
                    killed_tokenizer.append(p.info["pid"])
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.faults
def test_killed_run_into_a_bucket_resumes_to_the_uninterrupted_rows(local_ray, object_store, corpus, tiny_system_dir,
                                                                      corpus_on_ray):
    """The driver (and the local Ray it started) killed with SIGKILL once the first shard is in the bucket: the
    rerun tokenizes only the rest, losing a tokenizer actor on the way, and the dataset equals an uninterrupted
    run's, token for token, with no temporary objects left."""
    n = len(list_audio_files(corpus))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run_and_kill(out: str) -> tuple[dict, str]:
        cmd = [sys.executable, "-m", "jobs.preprocess", "--source", str(corpus), "--token-system",
               str(tiny_system_dir), "--out", out, "--num-cpus", "2", "--set", "rows_per_shard=1"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).parents[1])

        def shards():
            return [f for part in (*layout.SPLITS, layout.ERRORS) for f in layout.shard_files(out, part)]

        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not shards():
            time.sleep(0.1)
        # the driver and every process of its Ray at once (a lost node), mid-upload or not: no goodbye. Ray's
        # workers are not in the driver's process group, so they are found as its descendants.
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        for p in [psutil.Process(proc.pid), *ray_processes]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        output = proc.communicate(timeout=60)[0].decode()  # reaps the driver (psutil must not: its status is ours)
        psutil.wait_procs(ray_processes, timeout=30)
        assert proc.returncode == -signal.SIGKILL, output
        assert "no GPUs in the cluster now: running on CPUs" in output, output  # the CPU fallback is announced
        return read_rows(out), output

    # Ray Data can hand the writer several finished rows at once, so now and then every shard is up before the
    # kill lands: then the run is repeated into a new bucket (the kill must find it part way, at most 3 tries)
    for attempt in range(3):
        out = object_store.bucket() + "/datasets/interrupted"
        first, _ = run_and_kill(out)
        if len(first) < n:
            break
    assert 0 < len(first) < n, f"the first run should have stopped part way, it wrote {len(first)} rows"
    assert storage.read_json(storage.join(out, layout.MANIFEST))["status"] == "in_progress"
    objects = storage.list_files(out, recursive=True)
    assert all(storage.name(o) == layout.MANIFEST or storage.name(o).startswith("part-") for o in objects), objects

    # The rerun loses a tokenizer actor (SIGKILL of its process) as soon as it has one: Ray Data starts another
    # and retries its batches, and the run completes without a rerun
    cfg = DataConfig(rows_per_shard=1)
    killer = _kill_first_process_named("Tokenizer")
    job, _ = preprocess(corpus, tiny_system_dir, out, cfg)
    killer.join(timeout=10)
    assert killed_tokenizer, "no tokenizer actor process was found to kill"
    assert len(job.pending) == n - len(first)  # tokenized tracks are not repeated
    objects = storage.list_files(out, recursive=True)
    assert all(storage.name(o) == layout.MANIFEST or storage.name(o).startswith("part-") for o in objects), objects
    # the uninterrupted run is on Ray too: the tokenizer actors' one thread each (run_local's torch threads sum in
    # another order, which moves a few near-tie codes). Its shard size and splits differ; tokens do not depend on them.
    resumed, straight = read_rows(out), read_rows(corpus_on_ray[0])
    assert sorted(resumed) == sorted(straight)
    for rid, row in straight.items():
        for col in layout.TOKEN_COLUMNS:
            assert resumed[rid][col] == row[col], (rid, col)
    assert storage.read_json(storage.join(out, layout.MANIFEST))["status"] == "complete"


def test_gpus_asked_of_a_local_ray_without_them_are_refused_at_once(local_ray, corpus, tiny_system_dir, tmp_path):
    """Asked for GPUs, a job plans for them instead of falling back to CPUs; a local Ray never grows, so it does
    not wait (on a cluster it asks the autoscaler and waits: tests/test_cluster.py)."""
    from jobs.preprocess import main
    from musiclm.infra.raycompute import ResourceWaitTimeout

    assert plan_actors({"CPU": 8.0}, gpus_per_actor=1.0).gpus_per_actor == 1.0  # none up yet: still a GPU plan
    assert plan_actors({"CPU": 8.0, "GPU": 4.0}).actors == 4
    with pytest.raises(ResourceWaitTimeout, match=r"tokenizer actors: 1 CPU, 1 GPU asked for, .*--wait-for-nodes 0"):
        main(["--source", str(corpus), "--token-system", str(tiny_system_dir), "--out", str(tmp_path / "ds"),
              "--gpus-per-actor", "1"])


def test_other_token_system_is_refused(corpus, tiny_system_dir, tmp_path):
    out = tmp_path / "ds"
    layout.write_manifest(out, {"fingerprint": "f" * 64, "token_system": "/elsewhere/ts", "source": {},
                                "settings": {}, "status": "complete"})
    with pytest.raises(layout.DatasetError) as err:
        prepare(open_source(corpus), tiny_system_dir, out, DataConfig(), log=lambda m: None)
    text = str(err.value)
    assert "ffffffffffff" in text and "/elsewhere/ts" in text and str(tiny_system_dir) in text
    fingerprint = json.loads((Path(tiny_system_dir) / "token_system.json").read_text())["fingerprint"]
    assert fingerprint[:12] in text


def test_a_dataset_begun_with_other_waveform_handling_is_not_resumed(corpus, tiny_system_dir, tmp_path):
    """Rows made before the tokenizers' waveforms were made as open-musiclm makes them carry no ``waveforms``
    setting: adding rows made the new way to such a dataset would mix two kinds of tokens."""
    import pyarrow as pa

    job = prepare(open_source(corpus), tiny_system_dir, tmp_path / "ds", DataConfig(), log=lambda m: None)
    old = {**job.manifest, "settings": {k: v for k, v in job.manifest["settings"].items() if k != "waveforms"}}
    layout.write_manifest(job.out, {**old, "status": "in_progress"})
    # with a row of its own (here an error row): a manifest without any row is of a run that made nothing and
    # does not hold the next one back
    layout.write_shard(job.out, layout.ERRORS, pa.table({"id": ["000001"], "track_id": ["000001"],
                                                          "kind": ["too_short"]}))
    with pytest.raises(layout.DatasetError, match="settings.waveforms: dataset has None"):
        prepare(open_source(corpus), tiny_system_dir, job.out, DataConfig(), log=lambda m: None)


def test_a_tracks_tokens_do_not_depend_on_its_batch(corpus, tiny_system_dir, tmp_path):
    """The tokenizer actor encodes each track on its own, so a track gets the same tokens (bit for bit) whatever
    else shares its batch: a resumed or re-batched run writes the rows an uninterrupted run would."""
    from musiclm.data.preprocess import Tokenizer, decode_local

    job = prepare(open_source(corpus), tiny_system_dir, tmp_path / "ds", DataConfig(clip_seconds=11),
                  log=lambda m: None)
    a, b = (decode_local(job, t) for t in job.pending[:2])
    tokenizer = Tokenizer(str(tiny_system_dir), job.manifest["fingerprint"], "cpu", threads=0)

    def tokens_of(rows):
        out = tokenizer({c: [r[c] for r in rows] for c in rows[0]})
        return {rid: {c: out[c][i] for c in layout.TOKEN_COLUMNS} for i, rid in enumerate(out["id"])}

    alone, first, last = tokens_of(a), tokens_of(a + b), tokens_of(b + a)
    assert set(alone) == {r["id"] for r in a} and not set(alone) & {r["id"] for r in b}
    for rid, tokens in alone.items():
        assert all(len(tokens[c]) for c in layout.TOKEN_COLUMNS)
        for c in layout.TOKEN_COLUMNS:
            assert np.array_equal(tokens[c], first[rid][c]) and np.array_equal(tokens[c], last[rid][c]), (rid, c)


def test_clap_tokens_from_captions_are_each_captions_own_and_a_track_without_one_is_an_error(corpus, tiny_system_dir,
                                                                                            tmp_path):
    """``clap_from=caption``: every CLAP window of a row carries its track's caption's CLAP text tokens (what a
    prompt is turned into when generating), the other columns are those ``audio`` gives, a track without a caption
    becomes an error row that says what to do, and the manifest records it: a dataset made one way is not resumed
    the other."""
    from musiclm.data.preprocess import Tokenizer, decode_local
    from musiclm.tokens.system import TokenSystem

    made, decoded = {}, {}
    for kind in ("audio", "caption"):
        job = prepare(open_source(corpus), tiny_system_dir, tmp_path / kind, DataConfig(clip_seconds=11, crops=1,
                      clap_from=kind), log=lambda m: None)
        assert job.manifest["tokens"]["clap"]["from"] == kind
        # the random tiny CLAP's text tower gives the corpus' captions one set of tokens: the second track gets a
        # caption it tokenizes otherwise
        tracks = [job.pending[0], dataclasses.replace(job.pending[1], caption="Piano solo, slow.")]
        captions = {t.id: t.caption for t in tracks}
        rows = decoded[kind] = [r for t in tracks for r in decode_local(job, t)]
        tokenizer = Tokenizer(str(tiny_system_dir), job.manifest["fingerprint"], "cpu", threads=0, clap_from=kind)
        made[kind] = tokenizer({c: [r[c] for r in rows] for c in rows[0]})
    clap = TokenSystem.load(tiny_system_dir).clap
    levels = clap.cfg.rq_num_quantizers
    for i, track in enumerate(made["caption"]["track_id"]):
        own = np.asarray(clap.text_tokens([captions[track]]))[0]
        windows = made["caption"]["clap"][i].reshape(-1, levels)
        assert len(windows) == len(made["audio"]["clap"][i]) // levels >= 2 and (windows == own).all(), track
        for c in ("semantic", "coarse", "fine"):
            assert np.array_equal(made["caption"][c][i], made["audio"][c][i])
    assert not np.array_equal(made["caption"]["clap"][0], made["caption"]["clap"][1])  # two captions, two conditions
    # the decode tasks skip CLAP's features there and count the windows: as many as the features would have had
    from musiclm.tokens.system import load_clap_featurizer

    featurizer = load_clap_featurizer(str(tiny_system_dir))
    for samples in (featurizer.window // 3, featurizer.window, featurizer.window + 3 * featurizer.hop + 7):
        assert featurizer.window_count(samples) == len(featurizer.windows(np.zeros(samples, np.float32))), samples
    assert all(len(r["clap_features"]) == 0 for r in decoded["caption"])
    assert all(len(r["clap_features"]) > 0 for r in decoded["audio"])
    # a track without a caption: an error row naming the cure, no tokens
    job = prepare(open_source(corpus), tiny_system_dir, tmp_path / "c2", DataConfig(clap_from="caption"),
                  log=lambda m: None)
    from musiclm.data.preprocess import decode_track, track_row

    bare = dataclasses.replace(job.pending[0], caption="")
    [error] = decode_track(track_row(bare), str(tiny_system_dir), dataclasses.asdict(job.cfg), job.rates)
    assert error["kind"] == "no_caption" and "captions file" in error["message"]
    # the way the tokens were made is part of what a resumed run must match
    layout.write_manifest(job.out, {**job.manifest, "status": "in_progress"})
    layout.write_shard(job.out, layout.ERRORS, pa.table({"id": ["000001"], "track_id": ["000001"],
                                                          "kind": ["too_short"]}))
    with pytest.raises(layout.DatasetError, match="tokens.clap.from: dataset has 'caption', this run 'audio'"):
        prepare(open_source(corpus), tiny_system_dir, job.out, DataConfig(), log=lambda m: None)
    with pytest.raises(ValueError, match="clap_from"):
        DataConfig(clap_from="lyrics")
