"""GPU smoke test of the real training path: ``musiclm train --use-gpu`` (a local Ray, Ray Train, DeepSpeed ZeRO,
NCCL, bf16) on one GPU, for the coarse stage at its real window (12 CLAP + 199 semantic + 300 × 3 coarse tokens).

For each model size (``tiny``, then the ``large`` transformer: dim 1024, depth 24, 16 heads), two commands:
the first trains ``--steps``/2 steps and checkpoints, the same command with ``--steps`` resumes from that
checkpoint and finishes; then the run's exported ``model.safetensors`` is loaded back as a stage. Prints, per
size, the steps and loss seen, tokens/s and MFU (``train/mfu`` from the run's TensorBoard), the checkpoint
sizes and the wall time of each command, as JSON lines. The token dataset is made first, in-process: synthetic
tracks tokenized by the offline ``tiny`` token system (its token rates and codebook sizes are the real ones,
so the windows are the real windows; only the encoders are small and random).

    python benchmarks/gpu_smoke.py [--workdir gpu_smoke_out --sizes tiny,large --steps 30 --batch-size 8]
    python benchmarks/gpu_smoke.py --cpu --sizes tiny   # the same path on CPUs (gloo, fp32), to check the script
    python benchmarks/gpu_smoke.py --sizes large --set train.compile=true   # the stage compiled under DeepSpeed

Exits non-zero when a command fails or a check does not hold (steps, resume, export).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGE = ["model.coarse_cfg.dim=1024", "model.coarse_cfg.depth=24", "model.coarse_cfg.heads=16", "model.coarse_cfg.dim_head=64",
         "model.coarse_cfg.ff_dropout=0.1"]  # the large preset's coarse transformer (open-musiclm's released size)


def make_dataset(work: Path, tracks: int) -> tuple[Path, Path]:
    """Synthetic tracks tokenized by a tiny token system fitted on them (in-process, no Ray)."""
    from musiclm.audio import synth
    from musiclm.audio.io import list_audio_files
    from musiclm.config import DataConfig, model_preset
    from musiclm.data.preprocess import prepare, run_local
    from musiclm.data.sources import open_source
    from musiclm.tokens.fit import fit_local
    from musiclm.tokens.system import TokenSystem

    system, data = work / "token_system", work / "dataset"
    if not (data / "manifest.json").exists():
        synth.write_corpus(work / "audio", num_tracks=tracks, seconds=11.0, seed=0)
        if not (system / "token_system.json").exists():
            fit_local(TokenSystem.create(model_preset("tiny").token_system(), system),
                      list_audio_files(work / "audio"))
        cfg = DataConfig(clip_seconds=11, valid_frac=0.2, seed=0)
        run_local(prepare(open_source(work / "audio"), system, data, cfg, log=lambda m: None), log=lambda m: None)
    return system, data


def train(args, size: str, steps: int, system: Path, data: Path, runs: Path) -> float:
    """One ``musiclm train`` command, as a user types it; returns its wall time."""
    overrides = [f"train.num_train_steps={steps}", f"train.save_model_every={max(1, args.steps // 2)}",
                 f"train.save_results_every={max(1, args.steps // 2)}", "train.log_every=5", "train.lr_warmup=5",
                 f"train.batch_size={args.batch_size}", "train.grad_accum_every=1", "train.valid_batches=2",
                 *(LARGE if size == "large" else []), *args.set]
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--stage", "coarse", "--data", str(data),
           "--token-system", str(system), "--preset", "tiny", "--run-name", f"smoke-{size}", "--storage", str(runs),
           "--cpu" if args.cpu else "--use-gpu", "--set", *overrides]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if any(k in l for k in ("step ", "resum", "use_gpu", "Error",
                                                                          "error", "Traceback", "MFU"))]
    print("\n".join(lines[-40:]), flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], flush=True)
        raise SystemExit(f"musiclm train ({size}, {steps} steps) failed with exit code {proc.returncode}")
    return wall


def check_run(size: str, run: Path, steps: int, walls: list[float]) -> dict:
    """The run's summary, TensorBoard and exported weights, checked and summarized."""
    from safetensors.torch import load_file

    from musiclm.train.checkpoint import read_stage
    from musiclm.train.metrics import read_scalars

    summary = json.loads((run / "summary.json").read_text())
    latest = Path(summary["latest_checkpoint"])
    info = read_stage(latest)
    weights = load_file(latest / "model.safetensors")
    scalars = read_scalars(run / "tensorboard")
    loss_steps = [s for s, _ in scalars.get("train/loss", [])]
    problems = []
    if info.step != steps:
        problems.append(f"latest checkpoint is at step {info.step}, not {steps}")
    if loss_steps != sorted(set(loss_steps)) or (loss_steps and loss_steps[-1] != steps):
        problems.append(f"train/loss steps {loss_steps}: not increasing to {steps}")
    if not all(bool(w.isfinite().all()) for w in weights.values()):
        problems.append("exported weights are not all finite")
    if any(w.dtype.is_floating_point and w.dtype != __import__("torch").float32 for w in weights.values()):
        problems.append("exported weights are not float32")
    tokens = [v for s, v in scalars.get("train/tokens_per_s", []) if s > 5]  # after the first logging window
    mfu = [v for s, v in scalars.get("train/mfu", []) if s > 5]
    out = {"size": size, "steps": info.step, "loss_logged_at": loss_steps,
           "first_loss": scalars.get("train/loss", [(0, None)])[0][1], "last_loss": scalars["train/loss"][-1][1],
           "valid_loss": summary.get("best_valid_loss"),
           "params_M": round(sum(w.numel() for w in weights.values()) / 1e6, 1),
           "tokens_per_s": round(sum(tokens) / len(tokens)) if tokens else None,
           "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
           "checkpoint_MB": round(sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) / 1e6),
           "wall_s": [round(w, 1) for w in walls], "problems": problems}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="gpu_smoke_out")
    p.add_argument("--sizes", default="tiny,large")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tracks", type=int, default=24, help="synthetic tracks in the dataset")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per train command")
    p.add_argument("--cpu", action="store_true", help="train on CPUs (a check of this script without a GPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every train command, e.g. train.compile=true")
    args = p.parse_args()

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    system, data = make_dataset(work, args.tracks)
    print(json.dumps({"dataset_s": round(time.perf_counter() - start, 1), "dataset": str(data)}), flush=True)
    import torch

    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}), flush=True)
    failed = []
    for size in args.sizes.split(","):
        runs = work / "runs"
        shutil.rmtree(runs / f"smoke-{size}", ignore_errors=True)  # a fresh run: the second command resumes it
        walls = [train(args, size, args.steps // 2, system, data, runs), train(args, size, args.steps, system, data, runs)]
        if check_run(size, runs / f"smoke-{size}", args.steps, walls)["problems"]:
            failed.append(size)
    if failed:
        raise SystemExit(f"checks failed for {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
