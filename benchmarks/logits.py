"""Output logits of a stage, two ways in one run, forward and backward, at real window lengths:

(a) gather: one (codebook_size + 1, dim) weight matrix per target position (``w[q]``, an (n, V, dim) tensor)
    and an einsum, as the model computed logits until 2026-11-26;
(b) grouped: positions grouped by codebook, one matmul per codebook (``TokenConditionedTransformer._logits``).

Both give the same logits (checked here). Prints ms per forward+backward and the ratio, per stage and preset.
    python benchmarks/logits.py [--presets small large] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

# target positions of one example: semantic 10 s (499 + eos), coarse 4 s x 3 codebooks, fine 2 s x 5
STAGES = {"semantic": (500, 1), "coarse": (901, 3), "fine": (751, 5)}


def gather(hidden: torch.Tensor, w: torch.Tensor, first: int = 0) -> torch.Tensor:
    q = (torch.arange(hidden.shape[1]) + first) % w.shape[0]
    return torch.einsum("bnd,ncd->bnc", hidden, w[q])


def timed(fn, hidden: torch.Tensor, weight: torch.nn.Parameter, repeats: int) -> float:
    """Mean seconds of forward + backward (into ``hidden`` and the output weights), after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        h = hidden.detach().requires_grad_()
        weight.grad = None
        start = time.perf_counter()
        fn(h).square().mean().backward()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["small", "large"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from musiclm.config import model_preset
    from musiclm.models import build_stage

    torch.set_num_threads(args.threads)
    print("| preset | stage | positions x codebooks | dim | (a) gather ms | (b) grouped ms | (a)/(b) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        cfg = model_preset(preset)
        for stage, (n, q) in STAGES.items():
            model = build_stage(stage, cfg)
            w = model.logit_weights[-1]
            assert w.shape[0] == q
            hidden = torch.randn(1, n, w.shape[2])
            with torch.no_grad():
                torch.testing.assert_close(model._logits(hidden, 0), gather(hidden, w), atol=1e-4, rtol=1e-4)
            a = timed(lambda h: gather(h, w), hidden, w, args.repeats)
            b = timed(lambda h: model._logits(h, 0), hidden, w, args.repeats)
            print(f"| {preset} | {stage} | {n} x {q} | {w.shape[2]} | {a * 1e3:.0f} | {b * 1e3:.0f} | **{a / b:.1f}** |",
                  flush=True)


if __name__ == "__main__":
    main()
