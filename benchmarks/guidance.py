"""What classifier-free guidance costs: the same stage samples the same tokens' worth of steps unguided (B rows)
and guided (the conditional and unconditional rows as one batch of 2B through one cache), in one run, alternating.

On a CPU a decoding step's matmuls grow with the rows, so guidance should cost up to 2x there; on a GPU a step is
launch- and weight-read-bound and 2B rows cost little more than B (run it with ``--device cuda``). Prints ms per
decoding step for each way and the ratio guided / unguided, the best of ``--repeats``.
    python benchmarks/guidance.py [--preset small --stage coarse --rows 4 --steps 48 --decoding static]
    python benchmarks/guidance.py --device cuda --preset large --dtype bfloat16 --decoding compiled
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--depth", type=int, default=0, help="layers (0: the preset's)")
    p.add_argument("--stage", default="coarse", choices=["semantic", "coarse", "fine"])
    p.add_argument("--rows", type=int, default=4, help="candidates sampled together (best of N)")
    p.add_argument("--steps", type=int, default=16, help="time steps sampled per timing (x the stage's codebooks)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--decoding", default="static", choices=["static", "dynamic", "compiled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from decode_compile import stage_model  # benchmarks/ is the script's folder, hence on sys.path
    from generate import WINDOWS, sync
    from musiclm.models.sampling import sample

    device = torch.device(args.device)
    model = stage_model(args.preset, args.stage, args.depth, device, args.dtype)
    if args.decoding == "compiled":
        model.compile_decoding()
    window = WINDOWS[args.stage]
    g = torch.Generator().manual_seed(0)
    cond = [torch.randint(0, s.codebook_size, (args.rows, *window[s.name]), generator=g).to(device)
            for s in model.sequences[:-1]]
    decoding = "dynamic" if args.decoding == "dynamic" else "static"
    tokens = args.steps * model.target.num_quantizers

    def run(guidance: float) -> float:
        sync(device)
        t0 = time.perf_counter()
        sample(model, cond, args.steps, temperature=1.0, decoding=decoding, guidance=guidance,
               generator=torch.Generator(device=device).manual_seed(1))
        sync(device)
        return (time.perf_counter() - t0) / tokens * 1e3

    ways = {"unguided": 1.0, f"guided {args.guidance:g}": args.guidance}
    for guidance in ways.values():  # warm-up: compiles each batch size once
        run(guidance)
    best = {name: min(run(g) for _ in range(args.repeats)) for name, g in ways.items()}
    names = list(ways)
    print(json.dumps({"preset": args.preset, "stage": args.stage, "depth": args.depth or "preset", "rows": args.rows,
                      "decoding": args.decoding, "device": str(device), "dtype": args.dtype,
                      "ms_per_step": {k: round(v, 2) for k, v in best.items()},
                      "guided_over_unguided": round(best[names[1]] / best[names[0]], 2)}))


if __name__ == "__main__":
    main()
