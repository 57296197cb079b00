"""What bounds tokenizing on one machine (issue 44): `musiclm preprocess` with a token system at the released sizes.

The token system is open-musiclm's at its real architecture with random weights (``benchmarks/released_sizes.py``
writes the released files and imports them: HTSAT-tiny CLAP + RVQ, a HuBERT of MERT-v0's size + k-means, EnCodec
24 kHz); the corpus is synthetic 30 s MP3s (44.1 kHz stereo, as FMA's). Each part is timed on the same tracks:

  decode    ``decode_audio`` of each MP3, in this process (one core)
  waveforms the rest of a decode task but CLAP's features: cut and pad the clip, the three tokenizers' waveforms
            (resampled to 48/16/24 kHz); one core
  clap_features  CLAP's log-mel features of every 10 s window (hop 1 s: 21 windows for 30 s); one core
  models    the tokenizer actor's work (``Tokenizer.tokens``) on the device, one track at a time as preprocess runs
            it, split into CLAP (tower + RVQ), semantic (encoder + k-means) and EnCodec, with each one's FLOPs per
            track (torch's FlopCounterMode: what any device needs, hence the ceiling at the GPU's peak); and each of
            the three over BATCH tracks at once (``--batches``: what batching across tracks would give; preprocess
            does not, so that a track's tokens never depend on its neighbours) at each of ``--precisions`` (float32,
            TF32, bf16 autocast), with the share of tokens equal to the per-track float32 ones
  pipeline  ``musiclm preprocess`` as a user runs it (its own local Ray on every CPU, one tokenizer actor per GPU)
            over the whole corpus: tracks/s end to end, and the GPU's utilization (nvidia-smi, every 0.5 s)

and prints, per part, tracks/s with the machine's cores (decode and prepare scale with cores; the models with the
GPU) and which part bounds it. The goal (issue 44): the GPU side at least as fast as 16 cores decode.

    python benchmarks/tokenize_gpu.py --device cuda [--tracks 96 --workdir /tmp/tokenize_gpu --batches 1,8,32]
    python benchmarks/tokenize_gpu.py --device cpu --tiny --tracks 6 --batches 1,2 --precisions fp32,bf16  # on CPUs
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def token_system(work: Path, tiny: bool, corpus: Path) -> Path:
    """The released-size token system (files written and imported by released_sizes.py), or the tiny one fitted
    on the corpus (to check this script where the released sizes take too long)."""
    if tiny:
        from musiclm.audio.io import list_audio_files
        from musiclm.config import model_preset
        from musiclm.tokens.fit import fit_local
        from musiclm.tokens.system import TokenSystem

        root = work / "tiny_token_system"
        if not (root / "token_system.json").exists():
            fit_local(TokenSystem.create(model_preset("tiny").token_system(), root), list_audio_files(corpus)[:8])
        return root
    root = work / "released" / "models" / "open-musiclm" / "token_system"
    if not (root / "token_system.json").exists():
        subprocess.run([sys.executable, "benchmarks/released_sizes.py", "--workdir", str(work / "released"),
                        "--until", "import"], cwd=ROOT, check=True)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def models(rows: list[dict], system_root: Path, fingerprint: str, device: torch.device, batches: list[int],
           precisions: list[str]) -> dict:
    """Per-track seconds of each model as the tokenizer actor runs it, then batched at each precision, with the share
    of tokens equal to the per-track float32 ones."""
    from torch.utils.flop_counter import FlopCounterMode

    from musiclm.data.preprocess import Tokenizer

    tok = Tokenizer(str(system_root), fingerprint, str(device), threads=0)
    s = tok.system
    clap = [np.asarray(r["clap_features"], np.float32).reshape(tuple(int(d) for d in r["clap_shape"])) for r in rows]
    parts = {"clap": lambda i: s.clap.tokens(s.clap.embed_features(clap[i])),
             "semantic": lambda i: s.semantic.tokens(rows[i]["audio_semantic"]),
             "acoustic": lambda i: s.acoustic.encode(rows[i]["audio_acoustic"])}
    for i in range(min(2, len(rows))):  # warm-up: cuDNN's algorithm search, allocator
        tok.tokens(rows[i])
    single, ones = {}, {}
    for name, fn in parts.items():
        outs, total = [], 0.0
        for i in range(len(rows)):
            out, t = timed(lambda: fn(i), device)
            outs.append(out)
            total += t
        single[name], ones[name] = total / len(rows), outs
    whole = sum(timed(lambda: tok.tokens(r), device)[1] for r in rows) / len(rows)
    flops = {}
    for name, fn in parts.items():  # matmuls and convolutions of one track (torch's count: 2 per multiply-add)
        with FlopCounterMode(display=False) as counter:
            fn(0)
        flops[name] = counter.get_total_flops()
    windows, clap_batch = int(clap[0].shape[0]), s.clap.batch_size
    out = {"part": "models", "device": str(device), "windows_per_track": windows,
           "gflop_per_track": {k: round(v / 1e9, 1) for k, v in flops.items()},
           "per_track_ms": {k: round(v * 1e3, 1) for k, v in single.items()},
           "tokens_call_ms": round(whole * 1e3, 1), "tracks_per_s": round(1 / whole, 2), "batched": []}
    for precision in precisions:
        for b in batches:
            if b > len(rows):
                emit({"precision": precision, "batch": b, "skipped": f"only {len(rows)} rows were timed (--timed)"})
                continue
            idx = range(b)
            batched = {"clap": lambda: s.clap.tokens(s.clap.embed_features(np.concatenate([clap[i] for i in idx]))),
                       "semantic": lambda: s.semantic.tokens(np.stack([rows[i]["audio_semantic"] for i in idx])),
                       "acoustic": lambda: s.acoustic.encode(np.stack([rows[i]["audio_acoustic"] for i in idx]))}
            row = {"precision": precision, "batch": b}
            s.clap.batch_size = max(16, windows * b)  # every window of the batch's tracks in one CLAP call
            try:
                with numerics(precision, device):
                    for name, fn in batched.items():
                        fn()  # warm-up at this shape
                        got, t = timed(fn, device)
                        ref = np.concatenate([ones[name][i] for i in idx]).reshape(-1)
                        row[f"{name}_tracks_per_s"] = round(b / t, 2)
                        row[f"{name}_same_tokens"] = round(float(np.mean(np.asarray(got).reshape(-1) == ref)), 4)
            except torch.OutOfMemoryError:
                row["out_of_memory"] = True
                torch.cuda.empty_cache()
            except RuntimeError as e:  # a kernel without this precision: say so and go on
                row["failed"] = str(e)[-200:]
            finally:
                s.clap.batch_size = clap_batch
            out["batched"].append(row)
            emit(row)
    return out


@contextlib.contextmanager
def numerics(precision: str, device: torch.device):
    """fp32: torch's defaults (float32 matmuls; cuDNN's convolutions may use TF32, its default); tf32: matmuls in TF32
    too; bf16: autocast to bfloat16. On a CPU, bf16 runs without oneDNN: its bf16 convolution gave EnCodec's strided
    layer (kernel 8, stride 4) 112 % wrong outputs on the development machine's Xeon (torch 2.13; PyTorch issues
    163347, 169688), the same layer 0.3 % off without it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32" or before[0]
    torch.backends.mkldnn.enabled = before[1] and not (precision == "bf16" and device.type == "cpu")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.mkldnn.enabled = before


def gpu_sampler(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout.split()
            samples.append(float(out[0]))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return


def pipeline(corpus: Path, system_root: Path, out: Path, use_gpu: bool, timeout: float) -> dict:
    """``musiclm preprocess`` as a user types it, into a fresh dataset."""
    shutil.rmtree(out, ignore_errors=True)
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=gpu_sampler, args=(stop, samples), daemon=True)
    if use_gpu:
        sampler.start()
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", "--source", str(corpus), "--token-system",
           str(system_root), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    stop.set()
    if proc.returncode != 0:
        print(proc.stdout[-4000:], flush=True)
        raise SystemExit(f"musiclm preprocess failed with exit code {proc.returncode}")
    counts = json.loads((out / "manifest.json").read_text()).get("counts", {})
    plan = [line for line in proc.stdout.splitlines() if "tokenizing" in line][:1]
    return {"part": "pipeline", "wall_s": round(wall, 1), "counts": counts, "plan": plan,
            "gpu_util_mean": round(float(np.mean(samples)), 1) if samples else None,
            "gpu_util_samples": len(samples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tokenize_gpu"))
    p.add_argument("--tracks", type=int, default=96, help="synthetic 30 s MP3s")
    p.add_argument("--timed", type=int, default=24, help="tracks the parts are timed on (the pipeline takes all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny token system instead of the released sizes")
    p.add_argument("--token-system", type=Path, default=None,
                   help="a fitted token system to use instead (e.g. a demo's trained tiny one: demo_out/token_system)")
    p.add_argument("--batches", default="1,8,32", help="tracks per batch for the models' batched timings")
    p.add_argument("--precisions", default="fp32,tf32,bf16",
                   help="the batched timings at each: fp32 (torch's defaults), tf32 (matmuls too), bf16 (autocast)")
    p.add_argument("--no-pipeline", action="store_true", help="skip `musiclm preprocess` over the corpus")
    p.add_argument("--timeout", type=float, default=400, help="seconds allowed for `musiclm preprocess`")
    args = p.parse_args()

    from musiclm.audio import synth
    from musiclm.audio.io import decode_audio
    from musiclm.config import DataConfig
    from musiclm.data.preprocess import decode_local, prepare, track_clips
    from musiclm.data.sources import open_source
    from musiclm.tokens.system import load_clap_featurizer
    from musiclm.train.metrics import peak_flops

    work, device = args.workdir.resolve(), torch.device(args.device)
    corpus = work / "corpus"
    start = time.perf_counter()
    if not (corpus / "captions.jsonl").exists():
        synth.write_corpus(corpus, args.tracks, 30.0, seed=0)
    root = args.token_system.resolve() if args.token_system else token_system(work, args.tiny, corpus)
    cores = os.cpu_count() or 1
    emit({"setup_s": round(time.perf_counter() - start, 1), "token_system": str(root), "cores": cores,
          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__})

    job = prepare(open_source(corpus), root, work / "scratch_dataset", DataConfig(), log=lambda m: None)
    tracks, cpu = job.pending[: args.timed], torch.device("cpu")
    featurizer = load_clap_featurizer(root)
    spent = {"decode": 0.0, "waveforms": 0.0, "clap_features": 0.0}
    for t in tracks:  # a decode task's steps, timed apart (decode_track runs them in this order)
        (audio, rate), s = timed(lambda t=t: decode_audio(t.path), cpu)
        spent["decode"] += s
        clips, s = timed(lambda: list(track_clips(audio, rate, job.cfg, t.id, job.rates)), cpu)
        spent["waveforms"] += s
        spent["clap_features"] += sum(timed(lambda c=c: featurizer(c[3]["clap"]), cpu)[1] for c in clips)
    per = {k: v / len(tracks) for k, v in spent.items()}
    for name, sec in per.items():
        emit({"part": name, "per_track_ms": round(sec * 1e3, 1), "tracks_per_s_per_core": round(1 / sec, 1)})
    rows = [r for t in tracks for r in decode_local(job, t)]
    bad = [r for r in rows if r["kind"]]
    if bad:
        raise SystemExit(f"decode failed: {bad[0]['kind']}: {bad[0]['message']}")
    decode_s, prepare_s = per["decode"], per["waveforms"] + per["clap_features"]
    m = models(rows, root, job.manifest["fingerprint"], device, [int(b) for b in args.batches.split(",")],
               args.precisions.split(","))
    emit({k: v for k, v in m.items() if k != "batched"})  # the batched rows were printed as they came
    tasks = "decode tasks (decode, waveforms, CLAP features)"
    bounds = {"decode": cores / decode_s, tasks: cores / (decode_s + prepare_s),
              "models, one track at a time": m["tracks_per_s"]}
    for b in m["batched"]:
        if all(f"{k}_tracks_per_s" in b for k in ("clap", "semantic", "acoustic")):
            bounds[f"models, {b['batch']} tracks a batch, {b['precision']}"] = 1 / sum(
                1 / b[f"{k}_tracks_per_s"] for k in ("clap", "semantic", "acoustic"))
    gflop = sum(m["gflop_per_track"].values())
    peak = peak_flops(device)
    emit({"models_gflop_per_track": round(gflop, 1), "tracks_per_s_at_640_needs_tflops": round(640 * gflop / 1e3),
          **({"ceiling_tracks_per_s_at_dense_bf16_peak": round(peak / (gflop * 1e9), 1)} if peak else {})})
    if not args.no_pipeline:
        pipe = pipeline(corpus, root, work / "dataset", device.type == "cuda", args.timeout)
        pipe["tracks_per_s"] = round(args.tracks / pipe["wall_s"], 2)
        emit(pipe)
    print(f"\n| part | tracks/s on this machine ({cores} cores, {device.type}) |\n|---|---|")
    for name, rate in bounds.items():
        print(f"| {name} | {rate:.1f} |")
    if not args.no_pipeline:
        print(f"| `musiclm preprocess` end to end (start-up included) | {pipe['tracks_per_s']:.2f} |")
    slowest = min((tasks, "models, one track at a time"), key=bounds.get)
    print(f"bound of preprocess as it runs: {slowest} ({bounds[slowest]:.1f} tracks/s); 16 cores decode "
          f"{16 / decode_s:.0f} tracks/s here")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
