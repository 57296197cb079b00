"""Step time of a stage's training, two ways in one run, on the same model, batches and settings:

(a) a bare single-process PyTorch loop: AdamW, clipping, the same loss, batches cropped from the same token
    dataset (read beforehand, so data costs nothing), and
(b) this project's loop: Ray Train (TorchTrainer) + DeepSpeed ZeRO-2, streaming and cropping the dataset with
    Ray Data, reporting, validating and checkpointing as a real run does (validation and checkpoints only at
    the end of the timed window), and
(c) (a)'s loop with (b)'s DeepSpeed engine (same config, a gloo group of one process, no Ray), which splits
    (b)'s extra time into DeepSpeed's part (c)/(a) and the rest, Ray's, (b)/(c).

Both use one worker with ``--threads`` torch threads; (b) is also run with 2 workers to show data-parallel
throughput. Prints step time and tokens/s, and the ratios. Timings skip the first steps (warm-up).
    python benchmarks/train_step.py [--preset tiny|small --stage semantic --steps 30]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_dataset(work: Path, tracks: int) -> Path:
    from musiclm.audio import synth
    from musiclm.audio.io import list_audio_files
    from musiclm.config import DataConfig, model_preset
    from musiclm.data.preprocess import prepare, run_local
    from musiclm.data.sources import open_source
    from musiclm.tokens.fit import fit_local
    from musiclm.tokens.system import TokenSystem

    data = work / "dataset"
    if (data / "manifest.json").exists():
        return data
    synth.write_corpus(work / "corpus", num_tracks=tracks, seconds=11.0, seed=0)
    fit_local(TokenSystem.create(model_preset("tiny").token_system(), work / "ts"),
              list_audio_files(work / "corpus")[:8])
    run_local(prepare(open_source(work / "corpus"), work / "ts", data, DataConfig(clip_seconds=11, valid_frac=0.2)),
              log=lambda m: None)
    return data


def bare_loop(cfg, data: Path, steps: int, warmup: int, threads: int, deepspeed: bool = False) -> tuple[float, int]:
    """Seconds per step and positions per step of a plain PyTorch loop, or with ``deepspeed`` the same loop
    driving the DeepSpeed engine that the real loop builds (engine.backward/step: ZeRO's gradient partitions,
    clipping and optimizer step)."""
    import pyarrow.parquet as pq

    from musiclm.data.shards import CropSpec, StageCrop, open_manifest, split_files
    from musiclm.models import build_stage, split_batch, stage_loss
    from musiclm.train.engine import make_optimizer

    torch.set_num_threads(threads)
    t = cfg.train
    table = pq.read_table(split_files(data, "train")).to_pydict()
    crop = StageCrop(CropSpec.make(t.stage, cfg.model.global_cfg, open_manifest(data)), seed=0)
    rows = len(table["id"])
    batches = [crop({k: table[k][(i * t.batch_size) % rows: (i * t.batch_size) % rows + t.batch_size] for k in table})
               for i in range(max(1, rows // t.batch_size))]
    torch.manual_seed(t.seed)
    model = build_stage(t.stage, cfg.model).train()
    opt, sched = make_optimizer(model, t, on_gpu=False)
    engine = deepspeed_engine(model, opt, sched, t) if deepspeed else None
    times, positions = [], 0
    for i in range(steps):
        start = time.perf_counter()
        cond, target = split_batch(model, batches[i % len(batches)])
        logits = (engine or model)(cond, target, t.mask_prob)
        loss = stage_loss(logits, target)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            opt.step()
            sched.step()
        times.append(time.perf_counter() - start)
        positions = logits.shape[0] * model.positions(cond, logits.shape[1] - 1)
    return float(np.mean(times[warmup:])), positions


def deepspeed_engine(model, opt, sched, t):
    """The real loop's DeepSpeed engine (``engine.deepspeed_config``, fp32 on CPU) in this process: a gloo
    process group of one on 127.0.0.1."""
    import os

    import deepspeed
    import torch.distributed as dist

    from musiclm.train.engine import deepspeed_config, skip_inference_comm_op

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    skip_inference_comm_op()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(t, bf16=False))
    return engine


def ray_loop(cfg, data: Path, work: Path, workers: int, cpus: float) -> float:
    """tokens/s reported by the real training loop over its last log window."""
    import dataclasses

    from musiclm.train.run import TrainRequest, train

    train_cfg = dataclasses.replace(cfg.train, num_workers=workers, cpus_per_worker=cpus)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    run = f"bench-{cfg.train.stage}-{workers}w-{time.strftime('%Y%m%d-%H%M%S')}"  # a new run: never resume
    summary = train(TrainRequest(cfg, str(data), run, str(work / "runs")), cluster_cpus=2 * workers + 1,
                    log=lambda m: None)
    return summary["metrics"]["train/tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--stage", default="semantic", choices=["semantic", "coarse", "fine"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tracks", type=int, default=160, help="synthetic 11 s tracks: enough that the timed steps "
                   "stay within one pass over the data (a new pass restarts Ray Data's pipeline)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import ray

    from musiclm.config import stage_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    data = make_dataset(work, tracks=args.tracks)
    warmup = max(2, args.steps // 3)
    cfg = stage_config(args.stage, args.preset, overrides=[
        f"train.batch_size={args.batch_size}", "train.grad_accum_every=1", f"train.num_train_steps={args.steps}",
        f"train.log_every={args.steps - warmup}", f"train.save_results_every={args.steps}",
        f"train.save_model_every={args.steps}", "train.valid_batches=1", "train.lr_warmup=0", "train.zero_stage=2"])
    # (b) first, so that DeepSpeed's one-time op compilation is not inside (a)'s process time
    ray.init(num_cpus=2 * 2 + 1, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    b1 = ray_loop(cfg, data, work, 1, args.threads)
    b2 = ray_loop(cfg, data, work, 2, args.threads)
    ray.shutdown()
    step_a, positions = bare_loop(cfg, data, args.steps, warmup, args.threads)
    step_c, _ = bare_loop(cfg, data, args.steps, warmup, args.threads, deepspeed=True)
    a = positions / step_a
    step_b1 = positions / b1
    print(json.dumps({"preset": args.preset, "stage": args.stage, "batch_size": args.batch_size,
                      "positions_per_step": positions, "threads": args.threads}))
    print(f"(a) bare PyTorch loop, 1 process:            {step_a * 1000:8.1f} ms/step {a:9.0f} tokens/s")
    print(f"(b) Ray Train + DeepSpeed ZeRO-2, 1 worker:   {step_b1 * 1000:8.1f} ms/step {b1:9.0f} tokens/s")
    print(f"(b) Ray Train + DeepSpeed ZeRO-2, 2 workers:  {positions * 2 / b2 * 1000:8.1f} ms/step {b2:9.0f} tokens/s")
    print(f"(c) (a) + the DeepSpeed ZeRO-2 engine, no Ray: {step_c * 1000:8.1f} ms/step {positions / step_c:9.0f} tokens/s")
    print(f"ratio step time (b, 1 worker)/(a): {step_b1 / step_a:.2f}   throughput (b, 2 workers)/(a): {b2 / a:.2f}")
    print(f"of which DeepSpeed (c)/(a): {step_c / step_a:.2f}   Ray Train and the data path (b)/(c): "
          f"{step_b1 / step_c:.2f}")
    if not math.isfinite(b1):
        raise SystemExit("the Ray run reported no throughput")


if __name__ == "__main__":
    main()
