"""Tokens/s and model FLOPs utilization (MFU) of the ``large`` stages training in bf16 on one GPU.

Plain PyTorch (no Ray, no DeepSpeed), so it runs on any GPU machine that has torch: the same model, loss and
optimizer as a real run, random tokens at the real window lengths of each stage (semantic 12 + 499,
coarse 12 + 199 + 300×3, fine 12 + 150×3 + 150×5; until 2026-11-26 evening the fine stage was given 300×3 coarse
tokens, 1,667 positions instead of 1,217). MFU = model FLOPs per token (6 × matmul parameters plus
causal attention) × tokens/s ÷ the GPU's peak dense bf16 FLOP/s.

``--precision bf16`` (default) runs the module in bf16 as DeepSpeed's bf16 mode does in ``musiclm train``;
``autocast`` keeps float32 weights under ``torch.autocast`` (how every training-step figure in RESULTS.md up to
this option was taken).
Each ``--attentions`` path (dense float mask vs FlexAttention) is timed in the same run, with peak memory, and
first checked against a float32 dense forward/backward on the same weights and batch: the loss difference and
the largest relative gradient error over parameters (max |g - g_fp32| / max |g_fp32|) and which parameter.
``--flex-bias-rows 1,128`` times FlexAttention with one bias table (``attention.FLEX_BIAS_ROWS``'s default) and
with the table copied per query row modulo 128.
``--compile`` also times each path with the stage compiled (``train.compile``), its first steps (the compile)
excluded; ``--profile N`` prints the N kernels with the most GPU time in one forward/backward.
``--batch-sizes 8,16,32`` times each path at each micro-batch size (issue 43: MFU against micro-batch);
``--ff-aligns 1,64`` with the feed-forward's inner width real and padded to a multiple of 64 (``train.ff_align``:
zero weights, the same function; checked against float32 like every path).
    python benchmarks/train_step_gpu.py [--preset large --batch-size 8 --steps 20 --peak-tflops 989]
    python benchmarks/train_step_gpu.py --stages coarse --attentions dense --batch-sizes 8,16,32 --ff-aligns 1,64
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def stage_inputs(model, batch: int, device):
    """Random tokens in the shapes of one training crop of the stage (``CropSpec``, the default windows)."""
    from musiclm.config import GlobalConfig
    from musiclm.data.shards import CropSpec

    stage, windows = model.sequences[-1].name, GlobalConfig()
    shapes = CropSpec(stage, int(windows.semantic_audio_length_seconds),
                      int(getattr(windows, f"{stage}_audio_length_seconds"))).shapes()
    return [torch.randint(0, s.codebook_size, (batch, *shapes[s.name]), device=device) for s in model.sequences]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="large")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-sizes", default=None, help="comma-separated micro-batch sizes, each timed (default: "
                                                        "--batch-size); the gradient check uses the first")
    p.add_argument("--ff-aligns", default="1", help="comma-separated train.ff_align values, each path checked and "
                                                    "timed with each (1: open-musiclm's inner width)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s (default: by GPU name, "
                                                                   "musiclm.train.metrics.PEAK_BF16_TFLOPS)")
    p.add_argument("--stages", default="semantic,coarse,fine")
    p.add_argument("--attentions", default=None, help="default: dense,flex on a GPU, dense on a CPU (PyTorch has "
                                                        "no FlexAttention backward there)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "autocast"],
                   help="bf16: the module's weights in bf16, as DeepSpeed's bf16 mode runs it in `musiclm train` (its "
                        "float32 master weights not modelled: AdamW steps the bf16 weights); autocast: float32 "
                        "weights under torch.autocast (a cast of every weight and of many activations per step)")
    p.add_argument("--compile", action="store_true", help="also time every path compiled")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each timing, print the N kernels with the most GPU time in one forward/backward")
    p.add_argument("--flex-kernel-options", default=None,
                   help="JSON list of FlexAttention kernel_options tried in order, the first that builds is used "
                        "(default: musiclm.models.attention.FLEX_KERNEL_OPTIONS alone)")
    p.add_argument("--flex-bias-rows", default=None,
                   help="comma-separated FLEX_BIAS_ROWS values, each flex path timed with each (e.g. 1,128: one bias "
                        "table vs the table copied per query row modulo 128); default: the module's")
    args = p.parse_args()

    from musiclm.config import model_preset
    from musiclm.config import TrainConfig
    from musiclm.models import build_stage, count_parameters, stage_loss
    from musiclm.models.transformer import model_flops
    from musiclm.train.engine import make_optimizer
    from musiclm.train.metrics import peak_flops

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device, args.peak_tflops)
    on_gpu = device.type == "cuda"
    attentions = (args.attentions or ("dense,flex" if on_gpu else "dense")).split(",")
    if args.flex_kernel_options is None:
        from musiclm.models.attention import FLEX_KERNEL_OPTIONS
        args.flex_kernel_options = json.dumps([FLEX_KERNEL_OPTIONS])

    autocast = on_gpu and args.precision == "autocast"

    def forward_backward(model, cond, target, seed=0, bf16=autocast):
        torch.manual_seed(seed)  # the same forgetful mask for every path
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(cond, target, 0.15)
        loss = stage_loss(logits, target)
        loss.backward()
        return float(loss.detach())

    def gradients(model, attention, cond, target, bf16=autocast):
        """Loss and gradients of one forward/backward from the initial weights (float32 copies), in eval mode (the
        model's only use of it: every dropout off; the forgetful mask is drawn all the same): on CUDA the same seed
        draws a different dropout mask for a bf16 tensor than for a float32 one (the kernel's vector width follows
        the dtype), which made bf16's gradients look 2-3x off."""
        model.load_state_dict(initial)
        model.set_attention(attention)
        model.zero_grad(set_to_none=True)
        model.eval()
        try:
            loss = forward_backward(model, cond, target, bf16=bf16)
        finally:
            model.train()
        return loss, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    def error(grads, reference):
        """Largest relative gradient error over parameters, max |g - g_ref| / max |g_ref|, and its parameter."""
        errors = {n: float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                  for n, g in reference.items() if n != "rel_pos.out.bias"}  # its true gradient is 0
        worst = max(errors, key=errors.get)
        return round(errors[worst], 4), worst

    from musiclm.models import attention as attention_module

    bias_rows = ([int(r) for r in args.flex_bias_rows.split(",")] if args.flex_bias_rows
                 else [attention_module.FLEX_BIAS_ROWS])
    paths = [(a, r, f) for a in attentions for r in (bias_rows if a == "flex" else [None])
             for f in (int(x) for x in args.ff_aligns.split(","))]
    batch_sizes = [int(b) for b in (args.batch_sizes or str(args.batch_size)).split(",")]
    for stage in args.stages.split(","):
        torch.manual_seed(0)
        model = build_stage(stage, model_preset(args.preset)).to(device).train()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        *cond, target = stage_inputs(model, batch_sizes[0], device)
        seq = model.positions(cond, target[0].numel())
        # the reference: dense attention in float32 (what bf16 is an approximation of, whichever kernel)
        ref_loss, ref_grads = gradients(model, "dense", cond, target, bf16=False)
        if on_gpu and args.precision == "bf16":
            model.to(torch.bfloat16)  # load_state_dict(initial) now rounds the float32 weights into it
        for attention, rows, align in paths:
            model.set_ff_align(align)
            if rows is not None:
                attention_module.FLEX_BIAS_ROWS = rows
            if attention == "flex" and on_gpu:
                for options in json.loads(args.flex_kernel_options):
                    attention_module.FLEX_KERNEL_OPTIONS.clear()
                    attention_module.FLEX_KERNEL_OPTIONS.update(options)
                    try:
                        loss, grads = gradients(model, attention, cond, target)
                        break
                    except Exception as e:  # noqa: BLE001 - Triton out of shared memory: try the next options
                        print(json.dumps({"stage": stage, "kernel_options": options, "failed": str(e)[-300:]}))
                        torch._dynamo.reset()
                else:
                    continue
                print(json.dumps({"stage": stage, "kernel_options_used": options}), flush=True)
            else:
                loss, grads = gradients(model, attention, cond, target)
            grad_err, worst = error(grads, ref_grads)
            check = {"loss_vs_fp32": round(loss - ref_loss, 5), "grad_rel_err_vs_fp32": grad_err, "worst": worst}
            del grads
            for batch, compiled in ((b, c) for b in batch_sizes for c in ((False, True) if args.compile else (False,))):
                *b_cond, b_target = stage_inputs(model, batch, device)  # the check's inputs stay
                model.load_state_dict(initial)
                # a wrapper (`model` itself stays eager), one graph per batch size (no dynamic batch dimension)
                runner = torch.compile(model, dynamic=False) if compiled else model
                opt, _ = make_optimizer(model, TrainConfig(stage=stage), on_gpu=on_gpu)
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                try:
                    for i in range(args.steps):
                        if on_gpu:
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        opt.zero_grad(set_to_none=True)
                        forward_backward(runner, b_cond, b_target, seed=i)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                        opt.step()
                        if on_gpu:
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                except torch.OutOfMemoryError:  # a micro-batch too big: say so, and go on with the others
                    print(json.dumps({"stage": stage, "attention": attention, "ff_align": align, "batch": batch,
                                      "compiled": compiled, "out_of_memory": True}), flush=True)
                    opt = runner = None  # freed before the cache is emptied
                    if on_gpu:
                        torch.cuda.empty_cache()
                    continue
                if args.profile:
                    profile(lambda r=runner: forward_backward(r, b_cond, b_target), f"{stage} {attention} "
                            f"{'compiled' if compiled else 'eager'}", args.profile)
                step = sum(times[args.warmup:]) / max(1, len(times) - args.warmup)
                tokens_per_s = batch * seq / step
                flops = model_flops(model, seq, target[0].numel() + 1) / seq * tokens_per_s  # + eos
                print(json.dumps({
                    "stage": stage, "preset": args.preset, "device": name, "attention": attention,
                    **({"flex_bias_rows": rows} if rows is not None else {}), "ff_align": align,
                    "precision": args.precision if on_gpu else "float32",
                    "compiled": compiled, "params_M": round(count_parameters(model) / 1e6, 1),
                    "batch": batch, "seq_len": seq, "step_ms": round(step * 1000, 1),
                    "first_steps_s": round(sum(times[:args.warmup]), 1),
                    "tokens_per_s": round(tokens_per_s), "model_tflops": round(flops / 1e12, 1),
                    "mfu": round(flops / peak, 3) if peak else None,
                    "max_mem_GiB": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1) if on_gpu else None,
                    **check}), flush=True)
                del opt, runner
        del model
        if on_gpu:
            torch.cuda.empty_cache()


def profile(step, label: str, top: int) -> None:
    """The ``top`` kernels by device time (on a CPU: operations by CPU time) over one call of ``step``, and how many
    were launched."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = list(prof.key_averages())
    key = "self_cpu_time_total"
    if torch.cuda.is_available():  # the kernels alone: an op and the kernels it launches both carry device time
        key = "self_device_time_total"
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or events
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in events) or 1.0
    print(json.dumps({"profile": label, "ms_total": round(total / 1000, 1), "launches": sum(e.count for e in events),
                      "top": [[e.key[:70], round(getattr(e, key) / 1000, 2), e.count] for e in rows]}), flush=True)


if __name__ == "__main__":
    main()
