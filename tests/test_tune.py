"""A learning-rate sweep with ASHA on the synthetic token dataset, 2 CPUs, kept in a bucket, and a training run
set up from its best.json."""
from __future__ import annotations

import csv
import io
import math

import pytest

from musiclm.config import ConfigError
from musiclm.infra import storage
from tune.space import build_space

SETTINGS = ["train.num_train_steps=12", "train.batch_size=2", "train.save_results_every=4",
            "train.save_model_every=4", "train.log_every=2", "train.valid_batches=1", "train.lr_warmup=0",
            "train.mask_prob=0"]


def test_search_space_specs():
    space = build_space({"train.lr": "loguniform:1e-4:1e-2", "train.batch_size": "grid:2,4", "train.wd": 0.1})
    assert space["train.batch_size"] == {"grid_search": [2, 4]} and space["train.wd"] == 0.1
    assert 1e-4 <= space["train.lr"].sample() <= 1e-2
    with pytest.raises(ConfigError, match="train.lr: 'loguniform:0:1' is not"):
        build_space({"train.lr": "loguniform:0:1"})


def _run_and_kill_once_a_trial_has_a_checkpoint(argv: list[str], trials: str, address: str) -> None:
    import subprocess
    import sys
    import time
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", *argv, "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(
            storage.list_dirs(t, "checkpoint_*") for t in storage.list_dirs(trials)):
        time.sleep(0.2)
    proc.kill()
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -9, output[-3000:]  # killed mid-sweep, not finished or failed


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(600)
def test_lr_sweep_stops_the_absurd_rate_and_its_best_trains(local_ray, object_store, token_dataset_dir, tiny_model_set,
                                                            tmp_path):
    from musiclm.train.metrics import read_scalars
    from jobs.tune import main as sweep

    sweeps = object_store.bucket() + "/sweeps"
    argv = ["--stage", "semantic", "--data", str(token_dataset_dir), "--name", "lr", "--storage", sweeps,
            "--lr", "grid:3e-3,10", "--grace-period", "4", "--reduction-factor", "2", "--set", *SETTINGS]
    sweep_dir = storage.join(sweeps, "lr")
    # The sweep's driver (a process of its own on the same Ray) is killed with SIGKILL once the first trial has a
    # checkpoint; the same command then finishes the sweep, and everything below is what a complete sweep gives.
    _run_and_kill_once_a_trial_has_a_checkpoint(argv, storage.join(sweep_dir, "trials"),
                                                local_ray.get_runtime_context().gcs_address)
    sweep(argv)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep_dir, "results.csv")))))
    assert len(rows) == 2
    by_lr = {float(r["train.lr"]): r for r in rows}
    # trials run one at a time in grid order: 3e-3 meets every rung first and goes on; 10 is worse at a rung
    assert by_lr[10.0]["stopped_early"] == "True" and int(by_lr[10.0]["steps"]) < 12
    assert by_lr[3e-3]["stopped_early"] == "False" and int(by_lr[3e-3]["steps"]) == 12
    best = storage.read_json(storage.join(sweep_dir, "best.json"))
    assert best["checkpoint"].startswith(storage.join(sweep_dir, "trials") + "/")
    assert best["search"]["train.lr"] == 3e-3
    assert best["config"]["train"]["lr"] == best["search"]["train.lr"]
    trials = storage.list_dirs(storage.join(sweep_dir, "trials"))
    assert len(trials) == 2
    for trial in trials:
        assert "valid/loss" in read_scalars(storage.join(trial, "tensorboard")), trial

    # best.json is a config and names a checkpoint: a training run starts from it (checked up to the trainer;
    # loading --init-from weights into the workers is the same code as loading any stage checkpoint)
    from jobs.common import stage_args_config
    from jobs.train import parser
    from musiclm.train import checkpoint as ckpt
    from musiclm.train.run import TrainRequest, check_request

    args = parser().parse_args(["--stage", "semantic", "--data", str(token_dataset_dir), "--run-name", "from-best",
                                "--storage", str(tmp_path / "runs"), "--config", storage.join(sweep_dir, "best.json"),
                                "--init-from", storage.join(sweep_dir, "best.json")])
    cfg, init_from = stage_args_config(args)
    assert init_from == best["checkpoint"] and cfg.train.lr == 3e-3
    loop_cfg = check_request(TrainRequest(cfg, args.data, "from-best", args.storage, init_from), log=lambda m: None)
    assert loop_cfg["init_from"] == best["checkpoint"]
    model, info = ckpt.load_stage(init_from, stage="semantic")
    assert info.metrics["valid/loss"] == pytest.approx(best["valid/loss"], rel=1e-6)

    # The same command again finds the sweep complete; ranked by FAD (CLAP embeddings) of each trial's best
    # checkpoint, generated with the other stages of a tiny set, instead of by valid/loss: the table gains the
    # column, is sorted by it, and best.json names the trial it puts first.
    sweep(["--stage", "semantic", "--data", str(token_dataset_dir), "--name", "lr", "--storage", sweeps,
           "--lr", "grid:3e-3,10", "--grace-period", "4", "--reduction-factor", "2", "--set", *SETTINGS,
           "--rank-by", "eval/fad_clap", "--eval-models", str(tiny_model_set), "--eval-duration", "1",
           "--eval-num-samples", "1", "--max-prompts", "2"])
    ranked = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep_dir, "results.csv")))))
    fads = [float(r["eval/fad_clap"]) for r in ranked]
    assert len(ranked) == 2 and all(math.isfinite(f) and f >= 0 for f in fads) and fads == sorted(fads)
    assert storage.read_text(storage.join(sweep_dir, "results.md")).startswith("Trials ranked by eval/fad_clap")
    by_fad = storage.read_json(storage.join(sweep_dir, "best.json"))
    assert by_fad["ranked_by"] == "eval/fad_clap" and by_fad["trial"] == ranked[0]["trial"]
    assert by_fad["eval/fad_clap"] == pytest.approx(fads[0])
    for trial in trials:  # each trial's evaluation is kept beside it, as watch-eval keeps a run's
        assert storage.exists(storage.join(trial, "eval", "evaluated.json")), trial


def test_trials_run_at_a_fixed_size_and_an_elastic_range_is_refused():
    from musiclm.config import apply_overrides, preset
    from tune.sweep import trial_budget

    cfg = apply_overrides(preset("tiny", "semantic"), ["train.num_workers=2:4", "train.use_gpu=false"])
    with pytest.raises(ConfigError, match=r"train.num_workers '2:4': Tune trials run at a fixed size"):
        trial_budget(cfg, {"CPU": 8})
    assert trial_budget(apply_overrides(cfg, ["train.num_workers=2"]), {"CPU": 8}) == (0.5, 3)  # 8 // (2 x 0.5 + 1 for its data + 0.05)
