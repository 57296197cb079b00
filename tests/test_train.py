"""Training a stage on Ray Train + DeepSpeed ZeRO-2 with 2 CPU workers, data and run in a bucket, resuming, and
the guards."""
from __future__ import annotations


import pytest
import torch

from musiclm import storage
from musiclm.config import model_preset, stage_config
from musiclm.data.dataset import DatasetError
from musiclm.models import build_stage
from musiclm.train import checkpoint as ckpt
from musiclm.train.metrics import read_scalars
from musiclm.train.run import TrainRequest, check_request

STEPS = ["train.batch_size=2", "train.save_results_every=10", "train.save_model_every=10", "train.log_every=5",
         "train.valid_batches=1", "train.lr=3e-3", "train.lr_warmup=40"]


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    return read_scalars(storage.join(run_dir, "tensorboard"))


def _train(data, runs, steps, run="coarse-run"):
    from jobs.train import main

    main(["--stage", "coarse", "--data", str(data), "--run-name", run, "--storage", str(runs),
          "--num-workers", "2", "--set", f"train.num_train_steps={steps}", *STEPS])
    return storage.read_json(storage.join(runs, run, "summary.json"))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_worker_zero2_run_checkpoints_and_resumes(local_ray, object_store, token_dataset_dir, tmp_path):
    """The token dataset is read from a bucket and the run is kept in one, as on a cluster without a shared
    file system: checkpoints go up, the resume comes back down."""
    bucket = object_store.bucket()
    data, runs = bucket + "/datasets/synth", bucket + "/runs"
    storage.upload_dir(token_dataset_dir, data)
    summary = _train(data, runs, steps=20)
    run_dir = storage.join(runs, "coarse-run")
    assert summary["run"] == run_dir and summary["latest_checkpoint"].startswith(run_dir + "/checkpoint_")
    scalars = _scalars(run_dir)
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss", "valid/accuracy",
                 "valid/accuracy_q0", "valid/accuracy_q1", "valid/accuracy_q2"):
        assert name in scalars, name
    assert [s for s, _ in scalars["valid/loss"]] == [10, 20]
    assert summary["metrics"]["step"] == 20

    # The consolidated weights equal DeepSpeed's own consolidation of its ZeRO-2 shards, and load into a
    # fresh model that computes the same outputs.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = summary["latest_checkpoint"]
    model, info = ckpt.load_stage(latest, stage="coarse")
    assert info.step == 20
    reference = build_stage("coarse", model_preset("tiny")).eval()
    storage.download_dir(storage.join(latest, "deepspeed"), tmp_path / "deepspeed")
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "deepspeed"), tag="state"))
    fresh = build_stage("coarse", info.model).eval()
    assert not torch.equal(fresh.logit_weights[0], reference.logit_weights[0])
    cond = [torch.randint(0, 1024, (2, 12)), torch.randint(0, 1024, (2, 10))]
    target = torch.randint(0, 1024, (2, 6, 3))
    assert torch.equal(model(cond, target), reference(cond, target))

    # Re-running the same command with more steps continues from step 20: same optimizer and lr schedule.
    first_loss = scalars["train/loss"][0][1]
    loss_at_20 = dict(scalars["train/loss"])[20]
    _train(data, runs, steps=30)
    after = _scalars(run_dir)
    resumed = dict(after["train/loss"])
    assert sorted(resumed) == [5, 10, 15, 20, 25, 30]
    assert abs(resumed[25] - loss_at_20) < abs(resumed[25] - first_loss), (first_loss, loss_at_20, resumed)
    assert dict(after["train/lr"])[25] == pytest.approx(3e-3 * 26 / 40, rel=1e-4)  # warm-up went on, not restarted
    assert ckpt.read_stage(ckpt_latest(run_dir)).step == 30


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


def test_deepspeed_on_cpu_skips_compiling_its_inference_only_comm_op():
    # The op serves tensor-parallel inference only; compiling it cost 30-70 s on every fresh machine.
    from deepspeed.comm.torch import build_shm_op

    from musiclm.train.engine import skip_inference_comm_op

    skip_inference_comm_op()
    assert build_shm_op() is None
