"""Sampling speed of each stage, two ways in one run, on the same model, conditioning and seed:

(a) open-musiclm's way: a full forward over the whole prefix for every new token (``sample_recompute``), and
(b) this project's KV-cached decoding (``sample``),

over one window of each stage at its real length (semantic 10 s: 12 clap + 499 tokens; coarse 4 s: 12 clap +
199 semantic → 300 × 3 tokens; fine 2 s: 12 clap + 150 × 3 coarse → 150 × 5 tokens). Both draw the same
tokens (checked). Prints tokens/s and the ratio (b)/(a) per stage. Goal: at least 10× at these lengths.

Then the real-time factor (wall time / audio time) of a whole text-to-audio generation of ``--seconds`` (10 s)
with the KV cache: CLAP text tokens, the three stages with sliding windows, EnCodec decoding and CLAP scoring,
on ``--models DIR`` (a model set) or, without it, a set built here (tiny token system fitted on two
synthetic tracks, untrained stages of ``--models-preset``'s sizes: speed does not depend on the weights). ``--whole-recompute`` also times
the whole generation the recomputing way (slow: minutes even for tiny).
    python benchmarks/generate.py [--preset tiny --device cpu --fraction 1.0 --models DIR --seconds 10]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

WINDOWS = {"semantic": {"clap": (12,), "target": 499}, "coarse": {"clap": (12,), "semantic": (199,), "target": 300},
           "fine": {"clap": (12,), "coarse": (150, 3), "target": 150}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fraction", type=float, default=1.0, help="generate this fraction of each window")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--models", help="model set for the whole-generation timing (default: a tiny set built here)")
    p.add_argument("--models-preset", default="tiny", choices=["tiny", "small", "large"],
                   help="without --models: the transformer sizes of the untrained set built here")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length of the whole generation")
    p.add_argument("--whole-recompute", action="store_true", help="also time the whole generation without cache")
    p.add_argument("--skip-windows", action="store_true", help="only the whole-generation timing")
    args = p.parse_args()

    from musiclm.config import model_preset
    from musiclm.models import build_stage
    from musiclm.models.sampling import sample, sample_recompute

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for stage, window in ({} if args.skip_windows else WINDOWS).items():
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
    whole_generation(args)


def random_model_set(root: Path, preset: str = "tiny") -> Path:
    """A tiny token system (fitted on two synthetic tracks) and untrained stages of ``preset``'s transformer sizes,
    as a model-set folder (the tiny token system has the real token rates and codebook sizes)."""
    import dataclasses

    from musiclm import synth
    from musiclm.audio import list_audio_files
    from musiclm.config import model_preset
    from musiclm.models import build_stage
    from musiclm.tokens.fit import fit_local
    from musiclm.tokens.system import TokenSystem
    from musiclm.train.checkpoint import save_stage

    sizes = model_preset(preset)
    cfg = dataclasses.replace(model_preset("tiny"), semantic_cfg=sizes.semantic_cfg, coarse_cfg=sizes.coarse_cfg,
                              fine_cfg=sizes.fine_cfg)
    synth.write_corpus(root / "audio", num_tracks=2, seconds=11.0, seed=0)
    system = TokenSystem.create(cfg.token_system(), root / "token_system")
    fit_local(system, list_audio_files(root / "audio"))
    for stage in ("semantic", "coarse", "fine"):
        torch.manual_seed(0)
        save_stage(root / stage, build_stage(stage, cfg).state_dict(), stage, cfg, 0, system.fingerprint)
    return root


def whole_generation(args) -> None:
    from musiclm.generate import GenerateSettings, ModelSet, MusicGenerator
    from musiclm.models.sampling import sample, sample_recompute

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else random_model_set(Path(tmp), args.models_preset)
        generator = MusicGenerator(ModelSet.from_dir(root), args.device)
        settings = GenerateSettings(duration=args.seconds, num_samples=1)
        generator.generate("warm-up", GenerateSettings(duration=1.0, num_samples=1))
        ways = [("kv_cache", sample)] + ([("recompute", sample_recompute)] if args.whole_recompute else [])
        for name, sampler in ways:
            result = generator.generate("an upbeat jazz piano", settings, sampler=sampler)
            t = result.timings
            print(json.dumps({"whole_generation": name,
                              "models": str(args.models or f"untrained {args.models_preset} (built here)"),
                              "device": args.device, "audio_s": args.seconds,
                              **{k: t[k] for k in ("semantic", "coarse", "fine", "decode", "score", "total")},
                              "real_time_factor": round(t["real_time_factor"], 3)}), flush=True)


if __name__ == "__main__":
    main()
