"""Compiling the static-cache decoding step: every layer compiled apart (``regions=False``) vs the layers sharing
one compiled block (``regions=True``, ``torch.compiler.nested_compile_region``), on one stage's real window.

Each way runs in a process of its own, twice: first with an empty inductor cache (a user's first generation on a
machine: everything compiles), then with the cache that run left (a later process: dynamo still traces, inductor
finds its code). Prints per run the compile time (the first draw of the window's shapes: compile and, on a GPU,
CUDA-graph capture), then steady decoding in ms per token step (best of --repeats) and whether both ways drew the
same tokens (float32: they must; bf16 may round differently where the fusion boundaries differ).
    python benchmarks/decode_compile.py [--preset tiny --depth 24 --stage coarse --batch 2 --fraction 0.2]
    python benchmarks/decode_compile.py --device cuda --preset large --batch 4 --dtype bfloat16 --fraction 0.1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

WAYS = {"unrolled": False, "regions": True}


def stage_model(preset_name: str, stage: str, depth: int, device, dtype: str):
    """The ``stage`` of ``preset_name`` with ``depth`` layers (0: the preset's), seeded, on ``device``, eval mode."""
    import torch

    from musiclm.config import model_preset
    from musiclm.models import build_stage

    preset = model_preset(preset_name)
    if depth:
        cfg = getattr(preset, f"{stage}_cfg")
        preset = dataclasses.replace(preset, **{f"{stage}_cfg": dataclasses.replace(cfg, depth=depth)})
    torch.manual_seed(0)
    return build_stage(stage, preset).to(device, getattr(torch, dtype)).eval()


def child(args) -> None:
    import torch

    from generate import WINDOWS, sync  # benchmarks/ is the script's folder, hence on sys.path
    from musiclm.models.sampling import sample

    device = torch.device(args.device)
    model = stage_model(args.preset, args.stage, args.depth, device, args.dtype)
    window = WINDOWS[args.stage]
    cond = [torch.randint(0, s.codebook_size, (args.batch, *window[s.name]), device=device)
            for s in model.sequences[:-1]]
    steps = max(1, int(window["target"] * args.fraction))
    model.compile_decoding(regions=WAYS[args.child])

    def draw():
        out = sample(model, cond, steps, generator=torch.Generator(device).manual_seed(0))
        sync(device)
        return out

    start = time.perf_counter()
    tokens = draw()
    compile_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        draw()
        best = min(best, time.perf_counter() - start)
    n = steps * model.target.num_quantizers
    print(json.dumps({"way": args.child, "compile_s": round(compile_s, 1), "ms_per_step": round(1000 * best / n, 3),
                      "tokens": tokens.flatten().tolist()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depth", type=int, default=24, help="layers of the stage (0: the preset's)")
    p.add_argument("--stage", default="coarse", choices=["semantic", "coarse", "fine"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.2, help="generate this fraction of the stage's window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=list(WAYS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in WAYS:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, way))
            for cache in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", way], env=env,
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{way} ({cache} cache) failed:\n{out.stderr[-4000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[way, cache] = r
                print(json.dumps({"way": way, "inductor_cache": cache, "compile_s": r["compile_s"],
                                  "ms_per_step": r["ms_per_step"]}), flush=True)
    summary = {"preset": args.preset, "depth": args.depth or "preset", "stage": args.stage, "device": args.device,
               "dtype": args.dtype, "batch": args.batch}
    for cache in ("cold", "warm"):
        u, r = results["unrolled", cache], results["regions", cache]
        summary[f"compile_{cache}_unrolled_over_regions"] = round(u["compile_s"] / r["compile_s"], 2)
        summary[f"step_{cache}_unrolled_over_regions"] = round(u["ms_per_step"] / r["ms_per_step"], 2)
    summary["same_tokens"] = results["unrolled", "cold"]["tokens"] == results["regions", "cold"]["tokens"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
