"""The optimizer, the learning-rate schedule and the DeepSpeed configuration of a stage's training.

AdamW with weight decay on matrices only (as open-musiclm), a linear warm-up then constant (open-musiclm) or
cosine; the optimizer is a plain ``torch.optim.AdamW`` handed to DeepSpeed, which wraps it for ZeRO (this
avoids compiling DeepSpeed's fused Adam, which needs a CUDA toolchain and takes ~45 s on CPU).
"""
from __future__ import annotations

import math

import torch

from ..config import ConfigError, TrainConfig, TransformerConfig


def uses_bf16(cfg: TrainConfig, on_gpu: bool) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)


def training_attention(cfg: TrainConfig, on_gpu: bool, model: TransformerConfig | None = None) -> str:
    """The attention path of training's forwards: ``flex`` only where asked for, and only on a GPU (PyTorch has
    no FlexAttention backward on the CPU) for a stage (``model``) without attention dropout; ``auto`` stays
    ``dense`` until flex has been measured on a GPU (benchmarks/gpu_check.sh prints both)."""
    if cfg.attention == "flex" and not on_gpu:
        raise ConfigError("train.attention: 'flex' trains only on a GPU (PyTorch has no FlexAttention backward on the "
                          "CPU); use 'dense' or 'auto' here")
    if cfg.attention == "flex" and model is not None and model.attn_dropout > 0:
        raise ConfigError(f"train.attention: 'flex' has no attention dropout, and the {cfg.stage} stage has "
                          f"attn_dropout {model.attn_dropout:g}; set model.{cfg.stage}_cfg.attn_dropout=0 or use 'dense'")
    return "flex" if cfg.attention == "flex" else "dense"


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce op at ``initialize``.

    That op serves only ``inference_all_reduce`` (tensor-parallel inference), which training never calls; gradient
    all-reduces go through the gloo process group either way. Compiling it costs 30-70 s the first time
    ``initialize`` runs in a fresh environment (every new CI machine, every new cluster node). DeepSpeed reads
    which ops it may build from one cached dict, ``deepspeed.ops.__compatible_ops__``; marking the op
    incompatible there makes ``build_shm_op`` return None, as on a machine without a compiler.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_every,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and the embedding/output tables), none on gains, scales and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig):
    """Multiplier of the base lr after ``step`` optimizer steps."""
    warmup, total = cfg.lr_warmup, cfg.num_train_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, on_gpu: bool):
    opt = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=tuple(cfg.betas),
                            fused=True if on_gpu else None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))


__all__ = ["training_attention", "deepspeed_config", "param_groups", "lr_factor", "make_optimizer", "uses_bf16"]
