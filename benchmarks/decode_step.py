"""One static-cache decoding step of a stage at its real window length, the attention in both forms, in one run:

- ``expanded``: the one key/value head expanded to every query head, as training runs attention;
- ``rows``: the heads as the query rows of the one key/value head (``attention.SINGLE_QUERY_AS_ROWS``, the
  default): keys and values read once. Inside a compiled step inductor's CPU lowering copies an expanded key/value
  view into a dense (rows, heads, slots, dim_head) tensor for every layer and step.

The step attends over every slot of the window (those not yet written are masked), so its cost does not depend on
how far the window is: a short prompt is consumed and the same step timed ``--steps`` times after a warm-up (the
compile, when compiled), for each ``--rows`` (candidates x windows sampled together: 4 = best of 4, 20 = the fine
stage's 5 windows of a 10 s clip x 4) and each form, ``--repeats`` times in alternation. Prints ms per step, the
best of the repeats.
    python benchmarks/decode_step.py [--preset large --depth 4 --stage fine --rows 4,20 --decoding compiled]
    python benchmarks/decode_step.py --device cuda --depth 0 --dtype bfloat16 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import time

import torch

SLOTS = {"semantic": 512, "coarse": 1116, "fine": 1217}  # positions of each stage's window (12 clap + its tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="large")
    p.add_argument("--depth", type=int, default=4, help="layers (0: the preset's; fewer compile faster)")
    p.add_argument("--stage", default="fine", choices=list(SLOTS))
    p.add_argument("--rows", default="4,20")
    p.add_argument("--decoding", default="compiled", choices=["compiled", "static"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="times each form is compiled and timed, alternating")
    args = p.parse_args()
    from decode_compile import stage_model  # benchmarks/ is the script's folder, hence on sys.path
    from musiclm.models import attention

    device = torch.device(args.device)
    model = stage_model(args.preset, args.stage, args.depth, device, args.dtype)
    slots = SLOTS[args.stage]
    for rows in map(int, args.rows.split(",")):
        cond = [torch.randint(0, s.codebook_size, (rows, 12) if s.name == "clap" else  # a short prompt
                              (rows, 4, *((s.num_quantizers,) if s.num_quantizers > 1 else ())), device=device)
                for s in model.sequences[:-1]]
        token = torch.zeros(rows, dtype=torch.long, device=device)
        best: dict[str, float] = {}
        for form in ("expanded", "rows") * args.repeats:
            attention.SINGLE_QUERY_AS_ROWS = form == "rows"
            torch._dynamo.reset()
            model._compiled_step = None
            if args.decoding == "compiled":
                model.compile_decoding()
            with torch.no_grad():
                _, cache = model.start(cond, None, max_len=slots)
                static = model.static_cache(cache, slots)
                for _ in range(3):
                    model.step(token, static)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    model.step(token, static)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.steps * 1000
            best[form] = min(best.get(form, ms), ms)
        print(json.dumps({"preset": args.preset, "stage": args.stage, "layers": len(model.layers),
                          "heads": model.cfg.heads, "slots": slots, "rows": rows, "decoding": args.decoding,
                          "device": str(device), "dtype": args.dtype,
                          **{f"{k}_ms_per_step": round(v, 2) for k, v in best.items()},
                          "rows_vs_expanded": f"{best['expanded'] / best['rows']:.2f}x faster"}), flush=True)
    attention.SINGLE_QUERY_AS_ROWS = True


if __name__ == "__main__":
    main()
