"""Training a stage on Ray Train + DeepSpeed ZeRO-2 with 2 CPU workers, data and run in a bucket, resuming, and
the guards."""
from __future__ import annotations


import pytest
import torch

from musiclm.config import ConfigError, model_preset, stage_config
from musiclm.data.dataset import DatasetError
from musiclm.infra import storage
from musiclm.models import build_stage
from musiclm.train import checkpoint as ckpt
from musiclm.train.metrics import read_scalars, tensorboard_steps
from musiclm.train.run import TrainRequest, check_request

STEPS = ["train.batch_size=2", "train.save_results_every=10", "train.save_model_every=10", "train.log_every=5",
         "train.valid_batches=1", "train.lr=3e-3", "train.lr_warmup=40",
         "train.peak_tflops=0.5"]  # a CPU has no known peak: give one, so that train/mfu is logged


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    return read_scalars(storage.join(run_dir, "tensorboard"))


def _train_argv(data, runs, steps, run="coarse-run", zero: int = 2, extra: tuple = (), workers: int = 2,
                sets: tuple = ()) -> list[str]:
    """`musiclm train`'s arguments: ``extra`` options, and ``sets`` after the settings of STEPS (the last wins)."""
    return ["--stage", "coarse", "--data", str(data), "--run-name", run, "--storage", str(runs), "--num-workers",
            str(workers),
            *extra, "--set", f"train.num_train_steps={steps}", f"train.zero_stage={zero}", *STEPS, *sets]


PROGRESS = 0.05  # nats: the least fall of the validation loss over these runs' 20 steps (measured 0.12: 6.94 -> 6.82)


def _valid_loss(model, dataset, rows: int, stage: str = "coarse") -> float:
    """The validation loss as the loop computes it (one worker; the loop's is over the same rows and crops)."""
    import pyarrow as pa

    from musiclm.data.shards import CropSpec, open_manifest
    from musiclm.train.data import HeldRows, _table, valid_subset
    from musiclm.train.loop import validation_pass

    spec = CropSpec.make(stage, model_preset("tiny").global_cfg, open_manifest(dataset))
    held = HeldRows(_table(valid_subset(dataset, rows), stage), spec, seed=0, fixed=True)
    assert isinstance(held.table, pa.Table)
    batches, counted = held.lockstep_batches(0, 1, 2)
    sums, _, _ = validation_pass(model.eval(), model, batches, torch.device("cpu"), counted)
    return float(sums.t[0] / sums.t[1])


def _adam_states(deepspeed_dir) -> list[dict]:
    """Every parameter's Adam state (``step``, ``exp_avg``, ``exp_avg_sq``) in every rank's optimizer file of a
    DeepSpeed checkpoint (read weights-only, with DeepSpeed's own record types allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found = []

    def walk(d):
        if isinstance(d, dict):
            if isinstance(d.get("state"), dict) and "param_groups" in d:
                found.extend(d["state"].values())
            for v in d.values():
                walk(v)

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        for f in sorted(deepspeed_dir.rglob("*optim_states.pt")):
            walk(torch.load(f, weights_only=True))
    return found


def _saved_moments(deepspeed_dir) -> dict[str, float]:
    """The totals of Adam's two moments over every rank's optimizer file (their partitions' padding is zeros)."""
    states = _adam_states(deepspeed_dir)
    return {k: sum(float(v[k].double().sum()) for v in states) for k in ("exp_avg", "exp_avg_sq")}


# DeepSpeed in a process of its own (one rank on CPUs), built as a worker builds it, loads a universal checkpoint and
# prints its optimizer's moment totals: what a worker of another count starts from
_LOAD_UNIVERSAL = """
import json, os, socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
import deepspeed, torch
from musiclm.config import apply_overrides, preset
from musiclm.models import build_stage
from musiclm.train.engine import deepspeed_config, make_optimizer, skip_inference_comm_op
cfg = apply_overrides(preset("tiny", "coarse"), json.loads(sys.argv[2]))
torch.manual_seed(0)
model = build_stage("coarse", cfg.model)
optimizer, scheduler = make_optimizer(model, cfg.train, False)
skip_inference_comm_op()
config = {**deepspeed_config(cfg.train, False), "checkpoint": {"load_universal": True}}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
engine.load_checkpoint(sys.argv[1], tag="state")
state = engine.optimizer.optimizer.state.values()
print(json.dumps({k: sum(float(v[k].double().sum()) for v in state) for k in ("exp_avg", "exp_avg_sq")}))
"""


def _loaded_moments(universal_dir, settings: list[str]) -> dict[str, float]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _LOAD_UNIVERSAL, str(universal_dir), json.dumps(settings)],
                          capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _optimizer_steps(deepspeed_dir, workers: int = 2) -> dict:
    """Steps as DeepSpeed's checkpoint records them: the engine's global and skipped steps, and the ``step`` of
    every parameter's Adam state in every rank's optimizer file."""
    # ZeRO-2 writes mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank
    engine = [torch.load(f, weights_only=True) for f in sorted(deepspeed_dir.rglob("*model_states.pt"))]
    assert engine
    files = sorted(deepspeed_dir.rglob("*optim_states.pt"))
    assert len(files) == workers, files  # one per worker
    adam = {int(v["step"]) for v in _adam_states(deepspeed_dir)}
    steps = {(e["global_steps"], e["skipped_steps"]) for e in engine}
    assert len(steps) == 1, steps
    (global_steps, skipped_steps), = steps
    return {"global_steps": global_steps, "skipped_steps": skipped_steps, "adam_steps": adam}


def _raise(error):
    def stand_in(*args, **kwargs):
        raise error

    return stand_in


def _train(data, runs, steps, run="coarse-run", zero: int = 2, extra: tuple = (), workers: int = 2,
           sets: tuple = ()):
    from jobs.train import main

    main(_train_argv(data, runs, steps, run, zero, extra, workers, sets))
    return storage.read_json(storage.join(runs, run, "summary.json"))


@pytest.mark.ray
@pytest.mark.faults
@pytest.mark.timeout(600)
def test_two_worker_zero_run_checkpoints_evaluates_and_resumes(local_ray, object_store, token_dataset_dir,
                                                               tiny_model_set, tmp_path, capsys, monkeypatch):
    """A ZeRO-3 run (parameters partitioned too: the hardest of DeepSpeed's layouts to save, consolidate and
    convert) on two workers with evaluation beside it; resumed on one worker where two saved it; scored by
    watch-eval through two interruptions; then it diverges and goes on at a lower lr on two workers where one saved
    it (ZeRO-3's 1 -> 2). The token dataset is read from a bucket and the runs are kept in one, as on a cluster
    without a shared file system: checkpoints go up, the resume comes back down. ZeRO-2, the default, runs in
    test_cluster.py's elastic run (2 -> 1 -> 2 workers, a node lost and one added, DeepSpeed's step counts
    checked), the pipeline and the sweeps; its export in test_export_is_the_fp32_master_weights. (It ran here too,
    the same checks at 2, until the suite's 20 minutes needed its 108 s.)"""
    zero = 3
    bucket = object_store.bucket()
    data, runs = bucket + "/datasets/synth", bucket + "/runs"
    storage.upload_dir(token_dataset_dir, data)
    run_dir = storage.join(runs, "coarse-run")
    # The run scores its checkpoints as music while it trains (--eval-models: the other stages of a tiny set,
    # prompts and FAD reference from the dataset's valid split). It drops the condition of half its examples
    # (train.cond_drop_prob): stage.json counts the steps that taught the null condition through every resume, and
    # validation reports the loss with the null condition.
    evaluation = ("--eval-models", str(tiny_model_set), "--eval-duration", "1", "--eval-num-samples", "1",
                  "--max-prompts", "2", "--eval-poll-s", "2")
    sets = ("train.cond_drop_prob=0.5",)
    summary = _train(data, runs, steps=20, zero=zero, extra=evaluation, sets=sets)
    assert summary["run"] == run_dir and summary["latest_checkpoint"].startswith(run_dir + "/checkpoint_")
    scalars = _scalars(run_dir)
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss", "valid/accuracy",
                 "valid/accuracy_q0", "valid/accuracy_q1", "valid/accuracy_q2"):
        assert name in scalars, name
    assert [s for s, _ in scalars["valid/loss"]] == [10, 20]
    assert summary["metrics"]["step"] == 20
    # as TensorBoard shows the run (every event file in order, a restart's purge applied): each step once, in order
    seen = tensorboard_steps(storage.join(run_dir, "tensorboard"))
    assert seen["train/loss"] == [5, 10, 15, 20] and seen["valid/loss"] == [10, 20], seen
    _check_mfu(scalars, workers=2, peak=0.5e12)

    # The consolidated weights equal DeepSpeed's own consolidation of its ZeRO shards, and load into a
    # fresh model that computes the same outputs.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = summary["latest_checkpoint"]
    model, info = ckpt.load_stage(latest, stage="coarse")
    assert info.step == 20
    reference = build_stage("coarse", model_preset("tiny")).eval()
    storage.download_dir(storage.join(latest, "deepspeed"), tmp_path / "deepspeed")
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "deepspeed"), tag="state"))
    # It trained: the validation loss (the loop's own figure, recomputed here on the same fixed crops) is well
    # below the initial weights' (every rank builds them from train.seed), and DeepSpeed took one optimizer step
    # per training step (its step counters and Adam's, read from its own checkpoint files)
    torch.manual_seed(0)
    initial = build_stage("coarse", info.model).eval()
    trained = _valid_loss(model, token_dataset_dir, rows=4)
    assert trained == pytest.approx(dict(scalars["valid/loss"])[20], rel=1e-4)
    assert _valid_loss(initial, token_dataset_dir, rows=4) - trained > PROGRESS, "the loss did not fall: no training"
    assert _optimizer_steps(tmp_path / "deepspeed") == {"global_steps": 20, "skipped_steps": 0, "adam_steps": {20}}
    cond = [torch.randint(0, 1024, (2, 12)), torch.randint(0, 1024, (2, 10))]
    target = torch.randint(0, 1024, (2, 6, 3))
    assert torch.equal(model(cond, target), reference(cond, target))

    from musiclm.evaluation.watch import SCALARS
    from jobs.watch_eval import main as watch_eval

    watch_args = ["--run", run_dir, "--models", str(tiny_model_set), "--reference-dataset", data,
                  "--max-prompts", "2", "--num-samples", "1", "--duration", "1"]
    # every checkpoint got eval/ scalars at its step while the run trained, and the summary keeps them
    for tag in SCALARS:
        assert [step for step, _ in scalars[tag]] == [10, 20], tag
    assert sorted(summary["eval"], key=int) == ["10", "20"] and summary["best_checkpoint"]
    # `musiclm watch-eval` on the same run, with the same prompts and settings as the evaluation beside
    # training: every checkpoint is scored already, so it evaluates nothing and writes no event file
    events = storage.list_files(storage.join(run_dir, "tensorboard"))
    capsys.readouterr()
    watch_eval(watch_args)
    assert "no new checkpoints" in capsys.readouterr().out
    assert storage.list_files(storage.join(run_dir, "tensorboard")) == events

    # The run resumes on one worker where two saved it: the same command with 30 steps (and no evaluation beside
    # it) goes on from step 20, the worker converting its DeepSpeed state to the universal format; gradient
    # accumulation doubles so that the batch per optimizer step stays 4; the warm-up goes on; DeepSpeed's own
    # checkpoint counts 30 optimizer steps, Adam's included (its state carried, not restarted at step 20), and Adam's
    # moments as DeepSpeed loads them into one worker total the two workers' saved ones
    capsys.readouterr()
    resumed = _train(data, runs, steps=30, zero=zero, workers=1, sets=sets)
    out = capsys.readouterr().out
    assert "resuming with 1 workers a run saved by 2: the batch per optimizer step stays 4 (gradient " \
           "accumulation 1 -> 2)" in out, out[-3000:]
    assert resumed["metrics"]["step"] == 30
    assert tensorboard_steps(storage.join(run_dir, "tensorboard"))["train/loss"] == [5, 10, 15, 20, 25, 30]
    assert dict(_scalars(run_dir)["train/lr"])[25] == pytest.approx(3e-3 * 26 / 40, rel=1e-4)
    storage.download_dir(storage.join(resumed["latest_checkpoint"], "deepspeed"), tmp_path / "resumed")
    assert _optimizer_steps(tmp_path / "resumed", workers=1) == {"global_steps": 30, "skipped_steps": 0,
                                                                 "adam_steps": {30}}
    from musiclm.train.loop import UNIVERSAL_DIR

    storage.download_dir(storage.join(latest, UNIVERSAL_DIR), tmp_path / "universal")
    saved, loaded = _saved_moments(tmp_path / "deepspeed"), _loaded_moments(
        tmp_path / "universal", [f"train.zero_stage={zero}", "train.batch_size=2", "train.grad_accum_every=2"])
    assert saved["exp_avg_sq"] > 0 and loaded == pytest.approx(saved, rel=1e-5, abs=1e-9), (saved, loaded)

    # watch-eval stopped (Ctrl-C) in the new checkpoint's evaluation, its prompts generated and scored but
    # nothing recorded yet; rerun and stopped again after recording it, before its TensorBoard points; rerun:
    # that checkpoint is evaluated once more (its prompts not generated again), then not again, and every
    # checkpoint has its scalars once
    from musiclm.evaluation import watch as watching
    from musiclm.train import metrics

    evaluated = lambda: storage.read_json(storage.join(run_dir, "eval", "evaluated.json"))["checkpoints"]  # noqa: E731
    monkeypatch.setattr(watching, "record", _raise(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        watch_eval(watch_args)
    monkeypatch.undo()
    assert len(evaluated()) == 2
    written = storage.list_files(storage.join(run_dir, "eval", "step_000030"), "*.wav", recursive=True)
    assert len(written) == 2  # one clip per prompt
    before = [storage.read_bytes(f) for f in written]
    capsys.readouterr()
    run_board, scalars = storage.join(run_dir, "tensorboard"), metrics.TensorBoard.scalars

    def stop_at_the_runs_board(board, *args, **kwargs):  # evaluate's own board (eval/step_*/) writes on
        if board.remote == run_board:
            raise KeyboardInterrupt
        return scalars(board, *args, **kwargs)

    monkeypatch.setattr(metrics.TensorBoard, "scalars", stop_at_the_runs_board)
    with pytest.raises(KeyboardInterrupt):
        watch_eval(watch_args)
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert "2 prompts, 2 already done" in out, out[-3000:]  # nothing generated again
    assert [storage.read_bytes(f) for f in written] == before and len(evaluated()) == 3
    assert 30 not in tensorboard_steps(storage.join(run_dir, "tensorboard"))["eval/clap_score"]
    watch_eval(watch_args)
    out = capsys.readouterr().out
    assert "no new checkpoints" in out and "TensorBoard points of step(s) 30" in out, out[-2000:]
    for tag in SCALARS:
        assert tensorboard_steps(storage.join(run_dir, "tensorboard"))[tag] == [10, 20, 30], tag
    assert sorted(storage.read_json(storage.join(run_dir, "summary.json"))["eval"], key=int) == ["10", "20", "30"]
    _diverges_then_goes_on_at_a_lower_lr(data, runs, run_dir, capsys)


def _diverges_then_goes_on_at_a_lower_lr(data, runs, run_dir: str, capsys) -> None:
    """The ZeRO-3 run of ``test_two_worker_zero_run...``, saved at step 30 by one worker, resumed at an absurd rate: a
    loss that turns non-finite stops the run at once (exit 2, a message naming the step, the rate and what to do)
    without validating or saving that step, so the latest checkpoint keeps the last good weights; the same command at
    a lower lr goes on from it, on two workers (ZeRO-3's partitions converted by the workers through DeepSpeed's
    universal format: its 1 -> 2). (Before, lr=1e400 trained 200 NaN steps, exited 0 and saved NaNs.)"""
    from jobs.common import run

    def command(lr: str, workers: int) -> list[str]:
        return _train_argv(data, runs, 32, zero=3, workers=workers,
                           sets=("train.cond_drop_prob=0.5", "train.save_results_every=2", "train.save_model_every=2",
                                 "train.log_every=1", "train.lr_warmup=0", f"train.lr={lr}"))

    from jobs.train import main

    good = ckpt_latest(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # resumed at step 30 with an absurd rate: its weights blow up at step 31
        run(lambda: main(command("1e30", workers=1)))
    message = capsys.readouterr().err
    assert stop.value.code == 2 and "became non-finite at step 32 (lr 1e+30)" in message, message
    assert "--set train.lr=1e+29" in message and good in message
    assert ckpt_latest(run_dir) == good  # nothing of the diverged steps was saved
    model, info = ckpt.load_stage(good, stage="coarse")
    assert info.step == 30 and all(torch.isfinite(w).all() for w in model.state_dict().values())
    # goes on with two workers where one saved it: step, schedule and counts carried
    main(command("3e-3", workers=2))
    summary = storage.read_json(storage.join(run_dir, "summary.json"))
    assert summary["metrics"]["step"] == 32 and ckpt.read_stage(summary["latest_checkpoint"]).step == 32
    scalars = _scalars(run_dir)
    lr = dict(scalars["train/lr"])
    assert lr[31] == pytest.approx(3e-3) and lr[32] == pytest.approx(3e-3)  # the rerun's rate, from step 30 on
    assert info.null_condition_steps == 30 and ckpt.read_stage(summary["latest_checkpoint"]).null_condition_steps == 32
    null, own = dict(scalars["valid/loss_null_condition"]), dict(scalars["valid/loss"])
    assert sorted(null) == [10, 20, 30, 32]
    assert dict(scalars["valid/null_condition_gain"])[32] == pytest.approx(null[32] - own[32], abs=1e-5)


def _check_mfu(scalars: dict, workers: int, peak: float) -> None:
    """train/mfu is the model FLOPs per second of a worker over the peak: with every crop of the same length,
    mfu × peak × workers / tokens_per_s is the model FLOPs of one window (forward + backward) per position.
    (Whether ``model_flops`` counts the model's matmuls right is test_models.py's.)"""
    from musiclm.models.transformer import model_flops

    model = build_stage("coarse", model_preset("tiny"))
    per_position = dict(scalars["train/mfu"])[20] * peak * workers / dict(scalars["train/tokens_per_s"])[20]
    cond = [torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 199, dtype=torch.long)]
    positions = model.positions(cond, 300 * 3)  # the tiny coarse window: 300 time steps of 3 tokens, and eos
    assert per_position == pytest.approx(model_flops(model, positions, 300 * 3 + 1) / positions, rel=1e-4)


def test_peak_flops_by_gpu_name_or_config(monkeypatch):
    from musiclm.train.metrics import peak_flops

    assert peak_flops("cpu") is None and peak_flops("cpu", 2.0) == 2e12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, tflops in (("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops("cuda:0") == (tflops * 1e12 if tflops else None), name


def ckpt_latest(run_dir: str) -> str:
    from musiclm.train.run import latest_checkpoint

    return latest_checkpoint(run_dir)


def test_mismatched_fingerprint_and_model_config_are_refused(token_dataset_dir, tiny_system_dir, tmp_path):
    from musiclm.tokens.system import TokenSystem, read_meta

    cfg = stage_config("coarse", "tiny")
    fingerprint = read_meta(tiny_system_dir)[0]["fingerprint"]
    # another token system than the dataset's
    other = TokenSystem.create(model_preset("tiny").token_system(), tmp_path / "other", seed=5)
    with pytest.raises(DatasetError, match=rf"made with token system {fingerprint[:12]}.*uses token system "
                                           rf"{other.fingerprint[:12]}"):
        check_request(TrainRequest(cfg, str(token_dataset_dir), "r", str(tmp_path), token_system=str(tmp_path / "other")))
    # an initial checkpoint of another token system
    model = build_stage("coarse", cfg.model)
    ckpt.save_stage(tmp_path / "foreign", model.state_dict(), "coarse", cfg.model, 5, other.fingerprint)
    with pytest.raises(ckpt.CheckpointError, match=rf"trained on token system {other.fingerprint[:12]}, but .* uses "
                                                   rf"token system {fingerprint[:12]}"):
        check_request(TrainRequest(cfg, str(token_dataset_dir), "r", str(tmp_path), init_from=str(tmp_path / "foreign")))
    # a checkpoint of another shape than the config
    ckpt.save_stage(tmp_path / "ours", model.state_dict(), "coarse", cfg.model, 5, fingerprint)
    deeper = stage_config("coarse", "tiny", overrides=["model.coarse_cfg.depth=4"])
    with pytest.raises(ckpt.CheckpointError, match="depth: checkpoint 2 vs config 4"):
        check_request(TrainRequest(deeper, str(token_dataset_dir), "r", str(tmp_path), init_from=str(tmp_path / "ours")))
    # and a model config whose token layout is not the dataset's
    wide = stage_config("coarse", "tiny", overrides=["model.global_cfg.num_coarse_quantizers=4"])
    with pytest.raises(ValueError, match="expects coarse tokens of 4 codebooks × 1024 codes, but token dataset"):
        check_request(TrainRequest(wide, str(token_dataset_dir), "r", str(tmp_path)))
    assert check_request(TrainRequest(cfg, str(token_dataset_dir), "r", str(tmp_path),
                                      init_from=str(tmp_path / "ours")))["fingerprint"] == fingerprint
    # a run from a checkpoint that learned the null condition carries its count on (stage.json's null_condition_steps)
    ckpt.save_stage(tmp_path / "dropout", model.state_dict(), "coarse", cfg.model, 5, fingerprint,
                    null_condition_steps=3)
    assert check_request(TrainRequest(cfg, str(token_dataset_dir), "r", str(tmp_path),
                                      init_from=str(tmp_path / "dropout")))["init_null_steps"] == 3
    # FlexAttention on CPU workers: refused by the driver before any worker starts (the workers' first step
    # failed 45 s later on 2 CPUs)
    from musiclm.train.run import build_trainer

    flex = stage_config("coarse", "tiny", overrides=["train.attention=flex", "train.use_gpu=false"])
    with pytest.raises(ConfigError, match=r"train\.attention: 'flex' trains only on a GPU"):
        build_trainer(TrainRequest(flex, str(token_dataset_dir), "r", str(tmp_path)), {}, cluster_cpus=2)


def test_deepspeed_on_cpu_skips_compiling_its_inference_only_comm_op():
    # The op serves tensor-parallel inference only; compiling it cost 30-70 s on every fresh machine.
    from deepspeed.comm.torch import build_shm_op

    from musiclm.train.engine import skip_inference_comm_op

    skip_inference_comm_op()
    assert build_shm_op() is None


def test_local_folders_of_killed_workers_are_removed_by_the_next_worker(tmp_path, monkeypatch, object_store):
    """A worker SIGKILLed while saving leaves its checkpoint staging folder (a checkpoint's size) in the temp
    folder, and a rank-0 worker that Tune stops leaves the folder its TensorBoard events for a bucket go through:
    the next such folder made on the node removes those of dead processes once nothing was written into them for
    an hour, and keeps the folders of live processes and fresh ones (a process of another PID namespace looks
    dead). A closed writer removes its own after uploading it."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from musiclm.train.metrics import TENSORBOARD_PREFIX, TensorBoard

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, old = socket.gethostname(), time.time() - 2 * 3600
    folders = {}
    for prefix in (ckpt.STAGING_PREFIX, TENSORBOARD_PREFIX):
        for name, pid, age in (("dead_old", dead.stdout.strip(), old), ("dead_fresh", dead.stdout.strip(), None),
                               ("live_old", os.getpid(), old), ("other_host", dead.stdout.strip(), old)):
            d = tmp_path / f"{prefix}{'elsewhere' if name == 'other_host' else host}-{pid}-{name}"
            (d / "deepspeed").mkdir(parents=True)
            (d / "deepspeed" / "shard.pt").write_bytes(b"x" * 100)
            if age:
                for f in (d / "deepspeed" / "shard.pt", d / "deepspeed", d):
                    os.utime(f, (age, age))
            folders[prefix, name] = d

    def removed():
        return [key for key, d in folders.items() if not d.exists()]

    with ckpt.staging_dir() as staging:
        assert Path(staging).parent == tmp_path and Path(staging).name.startswith(f"{ckpt.STAGING_PREFIX}{host}-")
    assert removed() == [(ckpt.STAGING_PREFIX, "dead_old")]
    events = object_store.bucket() + "/tensorboard"
    tb = TensorBoard(events)
    local = Path(tb.local.name)
    assert local.parent == tmp_path and local.name.startswith(f"{TENSORBOARD_PREFIX}{host}-{os.getpid()}-")
    assert removed() == [(ckpt.STAGING_PREFIX, "dead_old"), (TENSORBOARD_PREFIX, "dead_old")]
    tb.scalars({"train/loss": 1.0}, 1)
    tb.close()
    assert not local.exists() and storage.list_files(events, "events.*")


def test_export_is_the_fp32_master_weights(tmp_path, monkeypatch):
    """Under bf16 the module's weights are rounded copies of DeepSpeed's fp32 masters: the export must be the
    masters, as DeepSpeed's own consolidation of its checkpoint gives them (one process, gloo, on CPU). Under fp32
    the export takes the module's weights without a gather: the same masters. A rank that does not write the
    file keeps nothing. And ``train.compile`` under DeepSpeed ZeRO-2 trains as eager does: the same losses (within
    1e-4) and weights (all but a few within 1e-3, every one within a step of 3e-3: Adam magnifies last-bit gradient
    differences in embedding rows seldom used) after 10 steps."""
    import dataclasses
    import socket

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from musiclm.config import TrainConfig
    from musiclm.models import stage_loss
    from musiclm.train.engine import deepspeed_config, make_optimizer, skip_inference_comm_op
    from musiclm.train.loop import export_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    losses, weights = {}, {}
    try:
        # one process group: DeepSpeed keeps its groups across the runs. The last run is train.compile's path
        # (DeepSpeed's engine.compile) under ZeRO-2: its 10 steps against the eager fp32 run's
        for precision, compiled in (("bf16", False), ("fp32", False), ("fp32", True)):
            torch.manual_seed(0)
            model = build_stage("coarse", model_preset("tiny"))
            tc = dataclasses.replace(TrainConfig(), precision=precision, zero_stage=2, batch_size=2, grad_accum_every=1,
                                     lr=3e-3, lr_warmup=0)
            optimizer, scheduler = make_optimizer(model, tc, on_gpu=False)
            skip_inference_comm_op()
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(tc, bf16=precision == "bf16"))
            if compiled:
                engine.compile()
                assert engine.is_compiled
            run = (precision, compiled)
            losses[run] = []
            for step in range(10 if precision == "fp32" else 3):
                g = torch.Generator().manual_seed(step)
                cond = [torch.randint(0, 1024, (2, 12), generator=g), torch.randint(0, 1024, (2, 10), generator=g)]
                target = torch.randint(0, 1024, (2, 6, 3), generator=g)
                loss = stage_loss(engine(cond, target), target)
                engine.backward(loss)
                engine.step()
                losses[run].append(float(loss.detach()))
            exported = weights[run] = export_weights(engine)
            if compiled:
                continue
            engine.save_checkpoint(str(tmp_path / precision), tag="t")
            masters = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / precision), tag="t")
            rounded = engine.module.state_dict()
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
            assert next(iter(rounded.values())).dtype == dtype
            assert set(exported) == set(rounded) and all(v.dtype == torch.float32 for v in exported.values())
            for k in masters:
                assert torch.equal(exported[k], masters[k].float()), k
            if precision == "bf16":
                assert any(not torch.equal(exported[k], rounded[k].float()) for k in masters)  # not the bf16 copies
            assert export_weights(engine, keep=False) == {}
    finally:
        dist.destroy_process_group()
    eager, compiled = ("fp32", False), ("fp32", True)
    assert losses[compiled] == pytest.approx(losses[eager], abs=1e-4)  # docs/training.md: "within 1e-4 over 10 steps"
    torch.manual_seed(0)
    initial = build_stage("coarse", model_preset("tiny")).state_dict()
    assert max(float((weights[eager][k] - w).abs().max()) for k, w in initial.items()) > 1e-2  # the steps moved it
    # Adam magnifies last-bit gradient differences in embedding rows seldom used: a few of its ~1.3M weights may end
    # a little past 1e-3 apart (one of 787,200 was 1.003e-3 with one torch thread), none by a whole step (lr 3e-3)
    far = sum(int(((weights[compiled][k] - w).abs() > 1e-3).sum()) for k, w in weights[eager].items())
    assert far <= 10, far
    for k, w in weights[eager].items():
        torch.testing.assert_close(weights[compiled][k], w, rtol=0, atol=3e-3)


def test_collectives_of_the_loop_run_on_the_training_device(monkeypatch):
    """NCCL (Ray Train's process group on GPUs) takes CUDA tensors only: the loop reduces through one helper that
    moves the tensor to the engine's device. Checked with a stand-in process group of two workers (the device is
    only named: this machine has no GPU to move a tensor to)."""
    import inspect

    import numpy as np

    from musiclm.train import loop, metrics

    handed = []

    class TwoWorkers:
        is_available = staticmethod(lambda: True)
        is_initialized = staticmethod(lambda: True)
        get_world_size = staticmethod(lambda: 2)

        @staticmethod
        def all_reduce(t):
            handed.append(t)
            t.mul_(2)  # the other worker holds the same sums

    monkeypatch.setattr(metrics, "dist", TwoWorkers)
    sums = metrics.ValidSums(2)
    logits, target = torch.zeros(1, 5, 7), torch.zeros(1, 2, 2, dtype=torch.long)  # 2 steps x 2 codebooks, eos
    sums.add(torch.tensor(1.5), logits, target)
    kept = sums.t.clone()
    out = sums.reduce(torch.device("cpu"))
    assert out["valid/loss"] == 1.5 and torch.equal(sums.t, kept)  # reduced a copy: the sums are untouched
    assert metrics.mean_over_workers(3.0, "cpu") == 3.0 and len(handed) == 2

    devices = []
    real = metrics.all_reduce_sum
    monkeypatch.setattr(metrics, "all_reduce_sum", lambda t, device: devices.append(device) or real(t, "cpu"))
    s = metrics.ValidSums(2)
    s.add(torch.tensor(0.0), logits, target)
    s.reduce(torch.device("cuda", 3))
    c = metrics.ConditioningSums()
    c.add(torch.tensor(1.0), torch.tensor(2.0), 10)
    assert c.reduce(torch.device("cuda", 3)) == {"valid/loss_cond_shuffled": 2.0, "valid/conditioning_gain": 1.0}
    metrics.mean_over_workers(float(np.mean([1.0])), torch.device("cuda", 3))
    assert devices == [torch.device("cuda", 3)] * 3
    # and the loop reduces only through these, always with the engine's device: the validation sums and the
    # conditioning sums, and the mean train/loss, tokens/s and MFU
    source = inspect.getsource(loop)
    assert "dist." not in source and "all_reduce" not in source
    assert source.count("sums.reduce(device)") == 2 and source.count("mean_over_workers(") == 3
    assert source.count(", device)") >= 3


def test_use_gpu_auto_follows_the_cluster_and_says_so():
    from musiclm.config import ConfigError
    from musiclm.train.run import TrainRequest, build_trainer, resolve_use_gpu

    cfg = stage_config("coarse", "tiny", None, [])
    assert cfg.train.use_gpu == "auto"
    said = []
    assert resolve_use_gpu(cfg, {"CPU": 16.0, "GPU": 2.0}, said.append).train.use_gpu is True
    assert resolve_use_gpu(cfg, {"CPU": 16.0}, said.append).train.use_gpu is False
    assert "2 GPUs" in said[0] and "--cpu" in said[0] and "runs on CPUs" in said[1] and "--use-gpu" in said[1]
    forced = stage_config("coarse", "tiny", None, ["train.use_gpu=false"])
    assert resolve_use_gpu(forced, {"GPU": 8.0}, said.append) is forced and len(said) == 2  # asked: kept, quiet
    with pytest.raises(ConfigError, match="use_gpu is 'auto'"):
        build_trainer(TrainRequest(cfg, "unused", "r"), {}, 2.0)


def test_worker_lines_reach_the_driver_once(monkeypatch):
    """In a Ray Train V2 worker ``print`` is Ray's ``redirected_print``; with Ray's own stream in ``sys.stdout`` it
    writes the line there and logs it to the console as well: twice in the driver's log. ``worker_print`` writes
    it once, to the process's stdout (here a buffer standing in for it)."""
    import builtins
    import io
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from musiclm.train.loop import worker_print

    ray_stream, process_stdout, logged = io.StringIO(), io.StringIO(), []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as Ray Train configures its workers' root logger
    try:
        monkeypatch.setattr(sys, "stdout", ray_stream)
        monkeypatch.setattr(sys, "__stdout__", process_stdout)
        monkeypatch.setattr(builtins, "print", redirected_print)
        print("[train coarse] step 5")  # what the loop did: the line arrives twice
        assert ray_stream.getvalue().count("step 5") + logged.count("[train coarse] step 5") == 2
        ray_stream.seek(0), ray_stream.truncate(0), logged.clear()
        worker_print("[train coarse] step 10")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    seen = ray_stream.getvalue() + process_stdout.getvalue() + "".join(logged)
    assert seen.count("step 10") == 1 and process_stdout.getvalue() == "[train coarse] step 10\n"


def test_the_chance_alarm_judges_the_trend_not_a_run_still_warming_up():
    """The demo's coarse and fine runs raised the chance banner at their first validation (step 15 of 30) though
    both ended below chance. Now: at chance and flat (or at the end) alarms; at chance and falling does not."""
    from musiclm.train.metrics import stuck_at_chance

    v = 1025  # ln(1025) = 6.932; tolerance 2 %: within 0.139; "flat": fell less than 0.035
    assert not stuck_at_chance([6.93], v, final=False)  # the first look, mid-run: wait for the trend
    assert stuck_at_chance([6.93], v, final=True)
    assert stuck_at_chance([6.94, 6.93], v, final=False)  # flat at chance
    assert not stuck_at_chance([6.98, 6.90], v, final=False)  # at chance but falling
    assert not stuck_at_chance([6.9, 5.0], v, final=True) and not stuck_at_chance([], v, final=True)
