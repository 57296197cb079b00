"""Sampling speed of each stage, two ways in one run, on the same model, conditioning and seed:

(a) open-musiclm's way: a full forward over the whole prefix for every new token (``sample_recompute``), and
(b) this project's KV-cached decoding (``sample``),

over one window of each stage at its real length (semantic 10 s: 12 clap + 499 tokens; coarse 4 s: 12 clap +
199 semantic → 300 × 3 tokens; fine 2 s: 12 clap + 150 × 3 coarse → 150 × 5 tokens). Both draw the same
tokens (checked). Prints tokens/s and the ratio (b)/(a) per stage. Goal: at least 10× at these lengths.
    python benchmarks/generate.py [--preset tiny --device cpu --fraction 1.0]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

WINDOWS = {"semantic": {"clap": (12,), "target": 499}, "coarse": {"clap": (12,), "semantic": (199,), "target": 300},
           "fine": {"clap": (12,), "coarse": (150, 3), "target": 150}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fraction", type=float, default=1.0, help="generate this fraction of each window")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from musiclm.config import model_preset
    from musiclm.models import build_stage
    from musiclm.models.sampling import sample, sample_recompute

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for stage, window in WINDOWS.items():
        torch.manual_seed(0)
        model = build_stage(stage, model_preset(args.preset)).to(device).eval()
        cond = [torch.randint(0, s.codebook_size, (1, *window[s.name]), device=device) for s in model.sequences[:-1]]
        steps = max(1, int(window["target"] * args.fraction))
        n_tokens = steps * model.target.num_quantizers
        timings, outputs = {}, {}
        for name, fn in (("recompute", sample_recompute), ("kv_cache", sample)):
            start = time.perf_counter()
            outputs[name] = fn(model, cond, steps, temperature=1.0, generator=torch.Generator().manual_seed(0))
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
        same = torch.equal(outputs["recompute"].cpu(), outputs["kv_cache"].cpu())
        print(json.dumps({"stage": stage, "preset": args.preset, "device": str(device), "tokens": n_tokens,
                          "prompt": model.positions(cond, 0),
                          "recompute_tokens_per_s": round(n_tokens / timings["recompute"], 1),
                          "kv_cache_tokens_per_s": round(n_tokens / timings["kv_cache"], 1),
                          "ratio": round(timings["recompute"] / timings["kv_cache"], 1), "same_tokens": same}),
              flush=True)


if __name__ == "__main__":
    main()
