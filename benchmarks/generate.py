"""Sampling speed of each stage, several ways in one run, on the same model, conditioning and seed:

- ``recompute``: open-musiclm's way, a full forward over the whole prefix for every new token (``--recompute``);
- ``dynamic``: the KV cache growing by one token per step (this project's first cached decoder);
- ``static``: the cache allocated once for the window, fixed-shape steps;
- ``compiled``: the static step compiled (inductor on a CPU, CUDA graphs on a GPU), its compile timed apart;

over one window of each stage at its real length (semantic 10 s: 12 clap + 499 tokens; coarse 4 s: 12 clap +
199 semantic → 300 × 3 tokens; fine 2 s: 12 clap + 150 × 3 coarse → 150 × 5 tokens), ``--batch`` candidates
at once. All draw the same tokens in float32 (checked). Prints tokens/s per way and ratios. ``--decode-attention
rows,expanded`` times every way (and every whole generation below) with each form of a decoding step's attention
(``SINGLE_QUERY_AS_ROWS``).

Then the real-time factor (wall time / audio time, per candidate and for the one best-of-N clip delivered) of a
whole text-to-audio generation of ``--seconds`` (10 s) and ``--num-samples`` candidates (best of 4) for each
``--decodings`` mode and each ``--window-batches`` value (1: the fine stage's windows one after the other; 8: up to
8 at once, as one batch), with the ratio: CLAP text tokens,
the three stages with sliding windows, EnCodec decoding and CLAP scoring, on ``--models DIR`` (a model set) or,
without it, a set built here (tiny token system fitted on two synthetic tracks, untrained stages of
``--models-preset``'s sizes: speed does not depend on the weights); a 1 s warm-up generation first (it compiles).
    python benchmarks/generate.py [--preset tiny --device cpu --fraction 1.0 --models DIR --seconds 10]
    python benchmarks/generate.py --device cuda --preset large --ways compiled --fraction 0.1 --skip-whole --profile 15
    python benchmarks/generate.py --device cuda --preset large --ways static,compiled --compile-mode max-autotune
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
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
    p.add_argument("--batch", type=int, default=1, help="candidates sampled together in the window timings")
    p.add_argument("--recompute", action="store_true", help="also time open-musiclm's recomputing sampler")
    p.add_argument("--ways", default="dynamic,static,compiled", help="decoders timed per window")
    p.add_argument("--decodings", default="dynamic,static,compiled", help="decoding modes of the whole generation")
    p.add_argument("--num-samples", type=int, default=4, help="candidates of the whole generation (batched)")
    p.add_argument("--window-batches", default="1,8",
                   help="window_batch values of the whole generation, each timed: 1 samples the fine stage's "
                        "windows one after the other, 8 as one batch (for 10 s: 5 windows x the candidates)")
    p.add_argument("--prompts", type=int, default=0, metavar="P",
                   help="also time P prompts (each --num-samples candidates of --seconds) generated one at a time vs "
                        "together (generate_many: what a Ray prompt worker does), with the first of --decodings")
    p.add_argument("--weights-dtype", default="auto", help="stage weights of the whole generation")
    p.add_argument("--window-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stage weights of the window timings (float32: every way draws the same tokens, checked)")
    p.add_argument("--skip-windows", action="store_true", help="only the whole-generation timing")
    p.add_argument("--skip-whole", action="store_true", help="only the per-window timings")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled decoding step (default: the model's choice, "
                        "reduce-overhead on a GPU): max-autotune also tunes Triton kernels for the one-token matmuls")
    p.add_argument("--decode-attention", default="rows",
                   help="attention form(s) of a decoding step, each timed (windows and whole generation): rows "
                        "(the heads as query rows of the one key/value head, the default) and/or expanded (keys and "
                        "values expanded to every head, as training runs it; attention.SINGLE_QUERY_AS_ROWS = False)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each window's timings, profile the same draw again with the last of --ways: the N "
                        "kernels with the most GPU time, and the kernel launches (on a CPU: operations)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_windows:
        windows(args)
    if not args.skip_whole:
        whole_generation(args)
    if args.prompts:
        prompts_together(args)


def windows(args) -> None:
    from musiclm.config import model_preset
    from musiclm.models import attention, build_stage
    from musiclm.models.sampling import sample, sample_recompute

    device = torch.device(args.device)
    forms = args.decode_attention.split(",")
    ways = [(name, form) for form in forms
            for name in (["recompute"] if args.recompute else []) + args.ways.split(",")]
    for stage, window in WINDOWS.items():
        torch.manual_seed(0)
        model = build_stage(stage, model_preset(args.preset)).to(device, getattr(torch, args.window_dtype)).eval()
        cond = [torch.randint(0, s.codebook_size, (args.batch, *window[s.name]), device=device)
                for s in model.sequences[:-1]]
        steps = max(1, int(window["target"] * args.fraction))
        n_tokens = steps * model.target.num_quantizers * args.batch
        timings, outputs, compile_s = {}, {}, {}
        for name, form in ways:
            attention.SINGLE_QUERY_AS_ROWS = form == "rows"
            model._compiled_step = None  # the eager ways after another form's compiled one: eager again
            key = name if len(forms) == 1 else f"{name}_{form}"
            fn = sample_recompute if name == "recompute" else sample
            kw = {} if name == "recompute" else {"decoding": "dynamic" if name == "dynamic" else "static"}
            if name == "compiled":
                torch._dynamo.reset()  # the other form's compiled step is not reused
                model.compile_decoding(args.compile_mode)
                start = time.perf_counter()  # a short draw of the same shapes compiles (and captures the graph)
                sample(model, cond, steps, temperature=1.0, generator=torch.Generator(device).manual_seed(9),
                       decoding="static")
                sync(device)
                compile_s[key] = time.perf_counter() - start
            start = time.perf_counter()
            outputs[key] = fn(model, cond, steps, temperature=1.0, generator=torch.Generator(device).manual_seed(0),
                              **kw)
            sync(device)
            timings[key] = time.perf_counter() - start
        attention.SINGLE_QUERY_AS_ROWS = forms[-1] == "rows"  # as the profile below runs it
        base = next(iter(timings))
        print(json.dumps({"stage": stage, "preset": args.preset, "device": str(device), "batch": args.batch,
                          "tokens": n_tokens, "prompt": model.positions(cond, 0),
                          **{f"{k}_tokens_per_s": round(n_tokens / t, 1) for k, t in timings.items()},
                          **{f"{k}_vs_{base}": round(timings[base] / t, 2) for k, t in timings.items() if k != base},
                          **{"compile_s" if k == "compiled" else f"{k}_compile_s": round(t, 1)
                             for k, t in compile_s.items()},
                          "same_tokens": all(torch.equal(o.cpu(), outputs[base].cpu()) for o in outputs.values())}),
              flush=True)
        if args.profile:
            from train_step_gpu import profile  # benchmarks/ is the script's folder, hence on sys.path

            name = ways[-1][0]  # the same draw as timed last, so a compiled step replays what it captured
            draw = (lambda: sample_recompute(model, cond, steps, temperature=1.0)) if name == "recompute" else (
                lambda: sample(model, cond, steps, temperature=1.0, generator=torch.Generator(device).manual_seed(0),
                               decoding="dynamic" if name == "dynamic" else "static"))
            n = steps * model.target.num_quantizers  # one decode step per token
            profile(draw, f"{stage} {name}: {n} tokens (launches / {n}: per decode step, the prompt's forward "
                          f"included)", args.profile)
    attention.SINGLE_QUERY_AS_ROWS = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model_set(root: Path, preset: str = "tiny") -> Path:
    """A tiny token system (fitted on two synthetic tracks) and untrained stages of ``preset``'s transformer sizes,
    as a model-set folder (the tiny token system has the real token rates and codebook sizes)."""
    from musiclm.audio import synth
    from musiclm.audio.io import list_audio_files
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
    from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator
    from musiclm.models import attention

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else random_model_set(Path(tmp), args.models_preset)
        generator = MusicGenerator(ModelSet.from_dir(root), args.device, weights_dtype=args.weights_dtype,
                                   compile_mode=args.compile_mode)
        tokens, times = {}, {}
        forms = args.decode_attention.split(",")
        for form, mode, window_batch in [(f, m, b) for f in forms for m in args.decodings.split(",")
                                         for b in map(int, args.window_batches.split(","))]:
            attention.SINGLE_QUERY_AS_ROWS = form == "rows"
            if mode == "compiled" and len(forms) > 1:
                torch._dynamo.reset()  # the other form's compiled steps are not reused
            settings = GenerateSettings(duration=args.seconds, num_samples=args.num_samples, decoding=mode,
                                        weights_dtype=args.weights_dtype, window_batch=window_batch)
            start = time.perf_counter()  # compiled: every window shape of the real run, so that it compiles here
            generator.generate("warm-up", settings if mode == "compiled" else
                               dataclasses.replace(settings, duration=1.0))
            warm = time.perf_counter() - start
            result = generator.generate("an upbeat jazz piano", settings)
            tokens.setdefault(window_batch, {})[mode, form] = result.audio
            t = result.timings
            times[mode, window_batch, form] = t["total"]
            print(json.dumps({"whole_generation": mode, "window_batch": window_batch,
                              **({"decode_attention": form} if len(forms) > 1 else {}),
                              "models": str(args.models or f"untrained {args.models_preset} (built here)"),
                              "device": args.device, "weights": generator.describe()["weights_dtype"],
                              **({"compile_mode": args.compile_mode} if mode == "compiled" and args.compile_mode
                                 else {}),
                              "audio_s": args.seconds, "candidates": args.num_samples, "warm_up_s": round(warm, 1),
                              **{k: t[k] for k in ("semantic", "coarse", "fine", "decode", "score", "total")},
                              "real_time_factor": round(t["real_time_factor"], 3),  # per candidate
                              # the wall time of the one clip delivered (the best of the candidates)
                              "best_of_n_real_time_factor": round(t["total"] / args.seconds, 3)}), flush=True)
        for window_batch, audio in tokens.items():  # decoders draw the same tokens for one window_batch
            first = next(iter(audio.values()))
            print(json.dumps({"window_batch": window_batch,
                              "same_audio_every_mode": all(np.array_equal(a, first) for a in audio.values())}))
        for mode in args.decodings.split(","):
            batches = sorted({b for m, b, f in times if m == mode and f == forms[-1]})
            if len(batches) > 1:
                print(json.dumps({"decoding": mode, f"window_batch {batches[-1]} vs {batches[0]} (whole generation)":
                                  f"{times[mode, batches[0], forms[-1]] / times[mode, batches[-1], forms[-1]]:.2f}x "
                                  "faster"}))
            for b in batches if len(forms) > 1 else []:
                print(json.dumps({"decoding": mode, "window_batch": b, f"{forms[-1]} vs {forms[0]} (whole generation)":
                                  f"{times[mode, b, forms[0]] / times[mode, b, forms[-1]]:.2f}x faster"}))
        attention.SINGLE_QUERY_AS_ROWS = True


def prompts_together(args) -> None:
    """``--prompts`` prompts one at a time (``generate``) vs together (``generate_many``): wall time, and whether
    every prompt got the same candidates both ways."""
    from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator

    prompts = [f"prompt {i}: a jazz trio" for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.models) if args.models else random_model_set(Path(tmp), args.models_preset)
        generator = MusicGenerator(ModelSet.from_dir(root), args.device, weights_dtype=args.weights_dtype,
                                   compile_mode=args.compile_mode)
        settings = GenerateSettings(duration=args.seconds, num_samples=args.num_samples,
                                    decoding=args.decodings.split(",")[0], weights_dtype=args.weights_dtype)
        generator.generate_many(prompts[:2], settings)  # warm-up: compiles the shapes of both ways
        generator.generate(prompts[0], settings)
        start = time.perf_counter()
        alone = [generator.generate(p, settings) for p in prompts]
        one_at_a_time = time.perf_counter() - start
        start = time.perf_counter()
        together = generator.generate_many(prompts, settings)
        at_once = time.perf_counter() - start
        print(json.dumps({"prompts": args.prompts, "candidates_each": args.num_samples, "audio_s": args.seconds,
                          "decoding": settings.decoding, "device": args.device,
                          "models": str(args.models or f"untrained {args.models_preset} (built here)"),
                          "one_at_a_time_s": round(one_at_a_time, 2), "together_s": round(at_once, 2),
                          "together_vs_one_at_a_time": f"{one_at_a_time / at_once:.2f}x faster",
                          "same_candidates": all(np.array_equal(a.audio, t.audio) for a, t in zip(alone, together))}),
              flush=True)


if __name__ == "__main__":
    main()
