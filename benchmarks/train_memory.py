"""A large stage's training step with and without activation checkpointing: peak memory and time.

One forward and backward of a `large` stage (random weights, one example of the stage's window, the forgetful
causal mask on, as training runs it) in a fresh process per way, so each peak (``ru_maxrss``) is its own:

  plain       every block's activations kept for the backward (dense attention keeps (heads, n, n) scores)
  checkpoint  ``train.activation_checkpointing``: each block's input kept, the block recomputed in the backward

Prints the peak resident memory above the model and its gradients, the seconds of the forward and the backward,
and the ratios. Both ways compute the same loss (printed).

    python benchmarks/train_memory.py [--stage fine] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(stage: str, checkpoint: bool, threads: int) -> dict:
    import resource

    import torch

    from musiclm.config import model_preset
    from musiclm.models import build_stage, stage_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_stage(stage, model_preset("large")).train()
    model.checkpoint_blocks = checkpoint
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    cfg = model_preset("large").global_cfg
    semantic = int(cfg.semantic_audio_length_seconds * 50) - 1  # 499
    acoustic = {"coarse": cfg.coarse_audio_length_seconds, "fine": cfg.fine_audio_length_seconds}
    shapes = {"semantic": [(1, 12), (1, semantic)],
              "coarse": [(1, 12), (1, int(acoustic["coarse"] * 50)), (1, int(acoustic["coarse"] * 75), 3)],
              "fine": [(1, 12), (1, int(acoustic["fine"] * 75), 3), (1, int(acoustic["fine"] * 75), 5)]}[stage]
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 1024, s, generator=g) for s in shapes]
    t0 = time.perf_counter()
    loss = stage_loss(model(ids[:-1], ids[-1], 0.15), ids[-1])
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"positions": model.positions(ids[:-1], ids[-1][0].numel()), "loss": float(loss),
            "activations_gib": round(peak - base, 2), "forward_s": round(t1 - t0, 1), "backward_s": round(t2 - t1, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="fine", choices=("semantic", "coarse", "fine"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=("plain", "checkpoint"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.stage, args.one == "checkpoint", args.threads)))
        return
    results = {}
    for way in ("plain", "checkpoint"):
        out = subprocess.run([sys.executable, __file__, "--stage", args.stage, "--threads", str(args.threads),
                              "--one", way], capture_output=True, text=True, check=True)
        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
        print(way, results[way], flush=True)
    a, b = results["plain"], results["checkpoint"]
    print(f"{args.stage} (large), {a['positions']} positions, {args.threads} threads: activations "
          f"{a['activations_gib']} -> {b['activations_gib']} GiB ({a['activations_gib'] / b['activations_gib']:.2f}x "
          f"less), step {a['forward_s'] + a['backward_s']:.1f} -> {b['forward_s'] + b['backward_s']:.1f} s "
          f"({(b['forward_s'] + b['backward_s']) / (a['forward_s'] + a['backward_s']):.2f}x time); "
          f"same loss: {a['loss'] == b['loss']}")


if __name__ == "__main__":
    main()
