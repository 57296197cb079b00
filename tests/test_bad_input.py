"""Bad input, as a careless or hostile user gives it (issue 37): every case exits 2 with a message naming the file
or key and what to do, leaves what was there before as it was, and the same command succeeds once the input is
fixed. (Per-file pickle trust: test_import.py; settings' ranges and a diverging run: test_config.py and
test_train.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.common import run

ROOT = Path(__file__).parents[1]


def exit_2(capsys, job, argv: list[str]) -> str:
    """Run ``job``'s main as the command line does; it must exit 2; its error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run(lambda: job(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    return err


def test_an_output_location_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, tiny_model_set):
    """Each gave a traceback, import-open-musiclm after converting everything, generate --prompts and evaluate after
    generating every prompt. Now each stops at once, naming the option, and the file is left as it was."""
    from jobs import (evaluate, generate, import_open_musiclm, init_token_system, pipeline, preprocess, synth,
                      train, tune)

    plain = tmp_path / "plain.txt"
    plain.write_text("not a folder\n")
    below = plain / "sub"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("calm piano\n")
    cases = [(synth.main, ["--out", str(plain)], "--out"),
             (init_token_system.main, ["--preset", "tiny", "--out", str(below)], "--out"),
             (import_open_musiclm.main, ["--config", "x.json", "--rvq", "r.pt", "--kmeans", "k.npy", "--semantic",
                                         "s.pt", "--out", str(plain)], "--out"),
             (preprocess.main, ["--source", str(tmp_path), "--token-system", "ts", "--out", str(plain)], "--out"),
             (train.main, ["--stage", "coarse", "--data", "d", "--run-name", "r", "--storage", str(plain)],
              "--storage"),
             (generate.main, ["--prompts", str(prompts), "--models", str(tiny_model_set), "--out", str(plain)],
              "--out"),
             (evaluate.main, ["--prompts", str(prompts), "--models", f"a={tiny_model_set}", "--out", str(plain)],
              "--out"),
             (tune.main, ["--stage", "coarse", "--data", "d", "--name", "s", "--storage", str(below),
                          "--lr", "grid:1e-3"], "--storage"),
             (pipeline.main, ["--workdir", str(plain)], "--workdir")]
    for job, argv, option in cases:
        err = exit_2(capsys, job, argv)
        assert option in err and str(plain) in err and ("is a file" in err or "which is a file" in err), (job, err)
    assert plain.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "plain.txt", "prompts.txt"]


def test_a_run_name_that_is_not_ascii_is_refused_before_ray_or_a_folder(tmp_path, capsys):
    """`--run-name "run ü 1"` crashed inside Ray Train's metrics (UnicodeEncodeError) and left an empty run
    folder."""
    from jobs import train, tune

    err = exit_2(capsys, train.main, ["--stage", "coarse", "--data", "d", "--run-name", "run ü 1",
                                      "--storage", str(tmp_path / "runs")])
    assert "--run-name 'run ü 1': use ASCII letters, digits" in err and "'run-1'" in err
    err = exit_2(capsys, tune.main, ["--stage", "coarse", "--data", "d", "--name", "../up", "--storage",
                                     str(tmp_path / "sweeps"), "--lr", "grid:1e-3"])
    assert "--name '../up'" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


def test_truncated_checkpoints_are_named(tmp_path, capsys, tiny_model_set, token_dataset_dir):
    """A truncated model.safetensors: generate ended in safetensors' "incomplete metadata" naming no file, and
    train --init-from failed in every worker, retried 4 times, and left a run folder with only Ray's marker."""
    from jobs import generate
    from musiclm.config import stage_config
    from musiclm.train.checkpoint import CheckpointError
    from musiclm.train.run import TrainRequest, check_request

    models = tmp_path / "models"
    shutil.copytree(tiny_model_set, models)
    weights = models / "coarse" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    err = exit_2(capsys, generate.main, ["calm piano", "--models", str(models), "--duration", "1",
                                         "--num-samples", "1", "--out", str(tmp_path / "gen")])
    assert f"{weights} cannot be read" in err and "truncated or corrupt" in err, err
    with pytest.raises(CheckpointError, match=rf"{weights} cannot be read .* bytes where its header lays out"):
        check_request(TrainRequest(stage_config("coarse", "tiny"), str(token_dataset_dir), "r", str(tmp_path / "runs"),
                                   init_from=str(models / "coarse")))  # on the driver, before any worker starts
    assert not (tmp_path / "runs").exists()
    weights.write_bytes(whole)  # fixed: the same command works
    check_request(TrainRequest(stage_config("coarse", "tiny"), str(token_dataset_dir), "r", str(tmp_path / "runs"),
                               init_from=str(models / "coarse")))


def test_a_dataset_missing_a_shard_or_with_a_truncated_one_is_refused_by_name(tmp_path, token_dataset_dir):
    """A deleted train shard: training ran on the rows that were left (17 of 33) without a word. A truncated valid
    shard: "Parquet magic bytes not found", no file named."""
    from musiclm.config import stage_config
    from musiclm.data.dataset import DatasetError
    from musiclm.infra.storage import StorageError
    from musiclm.train.run import TrainRequest, check_request

    data = tmp_path / "data"
    shutil.copytree(token_dataset_dir, data)
    request = TrainRequest(stage_config("coarse", "tiny"), str(data), "r", str(tmp_path / "runs"))
    shard = sorted((data / "train").glob("*.parquet"))[0]
    kept = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DatasetError, match=r"its manifest counts \d+ train rows, but its \d+ train shard\(s\) hold"):
        check_request(request)
    shard.write_bytes(kept[:100])
    with pytest.raises(StorageError, match=rf"Parquet file {shard} cannot be read .*truncated or corrupt"):
        check_request(request)
    shard.write_bytes(kept)
    assert check_request(request)["fingerprint"]


def test_an_edited_token_system_is_named_and_a_run_that_wrote_no_row_blocks_nothing(tmp_path, tiny_system_dir,
                                                                                    tiny_model_set, corpus, capsys):
    """An edited token_system.json: preprocess failed inside the Ray actors with a traceback and left a manifest
    of the wrong fingerprint that refused the same command after the file was restored; generate blamed the
    checkpoints. Now the driver refuses it before writing anything, and a manifest of a run that wrote no row does
    not block the next run."""
    from jobs import generate
    from musiclm.config import DataConfig
    from musiclm.data.dataset import read_manifest, write_manifest
    from musiclm.data.preprocess import prepare
    from musiclm.data.sources import open_source
    from musiclm.tokens.system import TokenSystemError

    ts = tmp_path / "ts"
    shutil.copytree(tiny_system_dir, ts)
    meta_file = ts / "token_system.json"
    original = meta_file.read_text()
    meta = json.loads(original)
    meta["config"]["clap_rvq_cfg"]["hop_seconds"] = 2.0
    meta_file.write_text(json.dumps(meta))
    source = open_source(corpus)
    out = tmp_path / "tokens"
    with pytest.raises(TokenSystemError, match=r"was modified after it was written: settings differ"):
        prepare(source, ts, out, DataConfig(clip_seconds=11))
    assert not out.exists()
    models = tmp_path / "models"
    shutil.copytree(tiny_model_set, models, ignore=shutil.ignore_patterns("token_system"))
    err = exit_2(capsys, generate.main, ["calm", "--models", str(models), "--token-system", str(ts),
                                         "--out", str(tmp_path / "gen")])
    assert "was modified after it was written" in err and "trained on token system" not in err, err
    meta_file.write_text(original)
    # a first run that failed in its actors left its manifest and no row: the next run is not refused
    write_manifest(out, {"fingerprint": "0000da454d40" + "0" * 52, "token_system": str(ts), "source": {},
                         "settings": {}, "status": "in_progress", "counts": {}})
    job = prepare(source, ts, out, DataConfig(clip_seconds=11), log=lambda m: None)
    assert job.manifest["fingerprint"] == meta["fingerprint"] and read_manifest(out)["fingerprint"].startswith("0000")


def test_unreadable_inputs_are_named(tmp_path, capsys, tiny_model_set):
    """A binary manifest.json, a prompt file that is not UTF-8, an object .npy as --kmeans centers, a stale .tmp file
    in a prompt folder; and train --help's own example `--set coarse_cfg.depth=12` (open-musiclm's section names)."""
    import numpy as np

    from jobs import generate
    from musiclm.config import stage_config
    from musiclm.data.dataset import DatasetError, read_manifest
    from musiclm.evaluation.evaluate import read_prompt_set
    from musiclm.interop.open_musiclm import OpenMusicLMImportError, load_kmeans_centers

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_bytes(bytes(range(256)))
    with pytest.raises(DatasetError, match=r"manifest\.json is not text"):
        read_manifest(tmp_path / "ds")
    (tmp_path / "prompts.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"prompt file {tmp_path / 'prompts.txt'} is not UTF-8"):
        read_prompt_set(str(tmp_path / "prompts.txt"))
    np.save(tmp_path / "centers.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(OpenMusicLMImportError, match=rf"k-means file {tmp_path / 'centers.npy'} does not hold"):
        load_kmeans_centers(tmp_path / "centers.npy")
    assert stage_config("coarse", "tiny", overrides=["coarse_cfg.depth=3",
                                                    "hubert_kmeans_cfg.codebook_size=128"]).model.coarse_cfg.depth == 3
    gen = tmp_path / "gen"
    argv = ["calm piano", "--models", str(tiny_model_set), "--duration", "1", "--num-samples", "1", "--out", str(gen)]
    gen.mkdir()
    (gen / ".tmp-sample_1.wav-123").write_bytes(b"half a file")  # a killed earlier write
    generate.main(argv)
    assert sorted(p.name for p in gen.iterdir()) == ["report.json", "sample_1.wav"]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_named_error_raised_in_a_ray_actor_exits_2_with_its_message(local_ray, capsys):
    """Ray reports an actor whose constructor failed as ActorDiedError, the cause only as text: a tokenizer actor
    refusing a modified token system gave exit 1 and a traceback. The job's error line is the project's message."""
    import ray

    from musiclm.tokens.system import TokenSystemError

    @ray.remote(num_cpus=0)
    class Refuses:
        def __init__(self):
            raise TokenSystemError("token system /x was modified after it was written: encodec_weights differ")

        def ping(self):
            return 1

    def job(_argv):
        ray.get(Refuses.remote().ping.remote())

    err = exit_2(capsys, job, [])
    assert err.strip() == "error: token system /x was modified after it was written: encodec_weights differ", err


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from jobs.cli import main
main(sys.argv[1:])
"""


@pytest.mark.faults
def test_a_full_disk_exits_2_naming_where_and_keeps_what_was_there(tmp_path):
    """A disk that takes no file over 20 kB (a file-size limit standing in for a full disk): synth and
    init-token-system gave OSError tracebacks (exit 1); now exit 2 naming the output location, and a file already
    there is left as it was."""
    for argv in (["synth", "--out", str(tmp_path / "audio"), "--num-tracks", "1", "--seconds", "5"],
                 ["init-token-system", "--preset", "tiny", "--out", str(tmp_path / "ts")]):
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir()
        (out / "keep.txt").write_text("earlier work\n")
        proc = subprocess.run([sys.executable, "-c", FULL_DISK, *argv], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot") and str(out) in last and "File too large" in last, last
        assert (out / "keep.txt").read_text() == "earlier work\n"


def test_a_folder_no_process_can_create_exits_2_naming_it(tmp_path, capsys):
    """Unwritable as root too (CI runs as root; a chmod'ed folder does not stop root): an output folder under
    /proc, which takes no new entries. The job stops at its first write with exit 2 naming the file."""
    from jobs import synth

    err = exit_2(capsys, synth.main, ["--out", "/proc/musiclm-test/audio", "--num-tracks", "1", "--seconds", "5"])
    assert err.startswith("error: cannot write /proc/musiclm-test/audio/") and "No such file or directory" in err, err


def test_train_takes_the_datasets_token_layout_and_names_the_key_of_a_real_mismatch(tmp_path, token_dataset_dir,
                                                                                    capsys):
    """A dataset made by a token system whose k-means has 128 codes, trained with the preset (1024): the layout
    comes from the dataset (before: refused, and the message did not say which setting). A layout the user gave
    is kept, and a real mismatch names the exact --set that fixes it."""
    from jobs.common import stage_args_config
    from jobs.train import parser
    from musiclm.config import ConfigError
    from musiclm.data.shards import open_manifest
    from musiclm.train.run import check_token_layout

    data = tmp_path / "ds"
    data.mkdir()
    manifest = json.loads((token_dataset_dir / "manifest.json").read_text())
    manifest["tokens"]["semantic"]["codebook_size"] = 128
    (data / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--stage", "coarse", "--data", str(data), "--run-name", "x"]
    cfg, _ = stage_args_config(parser().parse_args(argv))
    assert cfg.model.hubert_kmeans_cfg.codebook_size == 128 and "hubert_kmeans_cfg.codebook_size=128" in \
        capsys.readouterr().out
    check_token_layout(cfg, open_manifest(data), str(data))
    cfg, _ = stage_args_config(parser().parse_args([*argv, "--set", "hubert_kmeans_cfg.codebook_size=1024"]))
    assert cfg.model.hubert_kmeans_cfg.codebook_size == 1024
    with pytest.raises(ConfigError, match=r"--set model\.hubert_kmeans_cfg\.codebook_size=128, or leave"):
        check_token_layout(cfg, open_manifest(data), str(data))
