"""Tokens/s and model FLOPs utilization (MFU) of the ``large`` stages training in bf16 on one GPU.

Plain PyTorch (no Ray, no DeepSpeed), so it runs on any GPU machine that has torch: the same model, loss and
optimizer as a real run, random tokens at the real window lengths of each stage (semantic 12 + 499,
coarse 12 + 199 + 300×3, fine 12 + 150×3 + 150×5). MFU = model FLOPs per token (6 × matmul parameters plus
causal attention) × tokens/s ÷ the GPU's peak dense bf16 FLOP/s.
    python benchmarks/train_step_gpu.py [--preset large --batch-size 8 --steps 20 --peak-tflops 989]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

def stage_inputs(model, batch: int, device):
    shapes = {"clap": (batch, 12), "semantic": (batch, 499), "coarse": (batch, 300, 3), "fine": (batch, 150, 5)}
    if model.sequences[-1].name == "coarse":
        shapes["semantic"] = (batch, 199)
    return [torch.randint(0, s.codebook_size, shapes[s.name], device=device) for s in model.sequences]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="large")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s (default: by GPU name, "
                                                                   "musiclm.train.metrics.PEAK_BF16_TFLOPS)")
    p.add_argument("--stages", default="semantic,coarse,fine")
    args = p.parse_args()

    from musiclm.config import model_preset
    from musiclm.models import build_stage, count_parameters, stage_loss
    from musiclm.models.transformer import model_flops_per_token
    from musiclm.train.engine import make_optimizer
    from musiclm.train.metrics import peak_flops
    from musiclm.config import TrainConfig

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device, args.peak_tflops)
    for stage in args.stages.split(","):
        torch.manual_seed(0)
        model = build_stage(stage, model_preset(args.preset)).to(device).train()
        opt, _ = make_optimizer(model, TrainConfig(stage=stage), on_gpu=device.type == "cuda")
        *cond, target = stage_inputs(model, args.batch_size, device)
        seq = model.positions(cond, target[0].numel())
        times = []
        for i in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(cond, target, 0.15)
            loss = stage_loss(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step = sum(times[args.warmup:]) / max(1, len(times) - args.warmup)
        tokens_per_s = args.batch_size * seq / step
        flops = model_flops_per_token(model, seq) * tokens_per_s
        print(json.dumps({
            "stage": stage, "preset": args.preset, "device": name, "params_M": round(count_parameters(model) / 1e6, 1),
            "batch": args.batch_size, "seq_len": seq, "step_ms": round(step * 1000, 1),
            "tokens_per_s": round(tokens_per_s), "model_tflops": round(flops / 1e12, 1),
            "mfu": round(flops / peak, 3) if peak else None,
            "max_mem_GiB": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1) if device.type == "cuda" else None,
        }), flush=True)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
