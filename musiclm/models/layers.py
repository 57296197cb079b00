"""The layers of the stage decoder (open-musiclm's function, tensor for tensor): a LayerNorm without bias, the
continuous relative position bias, and the feed-forward with its causal depthwise convolution. Attention lives in
``attention.py``, the decoding caches in ``caches.py``, the model that stacks them in ``transformer.py``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .caches import KVCache, LayerSlots

CONV_KERNEL = 3


class LayerNorm(nn.Module):
    """LayerNorm with a learned gain and no bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight)


class RelativePositionBias(nn.Module):
    """Continuous relative position bias: an MLP (three SiLU layers of width ``dim``) maps the distance
    ``i - j`` between query and key to one bias per head."""

    def __init__(self, dim: int, heads: int, layers: int = 3):
        super().__init__()
        sizes = [1] + [dim] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(dim, heads)

    def table(self, n: int, device) -> Tensor:
        """Bias for distances 0..n-1: (heads, n), in the weights' dtype. Computed in float32 whatever that dtype:
        bf16 holds whole numbers exactly only up to 256 (of distances up to 1,216 only 537 survive: 1100-1103
        all become 1104), and the MLP's small outputs would round again on the way. Autocast is off in here: it
        would run these linears in bf16 whatever their inputs (measured on an H100 before this was so: the bf16
        gradients of this MLP's weights were 77 % off the float32 ones)."""
        with torch.autocast(torch.device(device).type, enabled=False):
            x = torch.arange(n, device=device, dtype=torch.float32)[:, None]
            for layer in self.hidden:
                x = F.silu(F.linear(x, layer.weight.float(), layer.bias.float()))
            return F.linear(x, self.out.weight.float(), self.out.bias.float()).t().to(self.out.weight.dtype)


class _CausalDepthwiseConv(torch.autograd.Function):
    """out[:, t] = sum_j w[:, j] * padded[:, t + j] over (batch, time, channels), forward and backward as shifted
    multiply-adds on the tensor as it lies (no transposes, no slice-gradient buffers)."""

    @staticmethod
    def forward(ctx, padded: Tensor, w: Tensor) -> Tensor:
        k = w.shape[1]
        n = padded.shape[1] - k + 1
        ctx.save_for_backward(padded, w)
        out = padded[:, :n] * w[:, 0]
        for j in range(1, k):
            out.addcmul_(padded[:, j:j + n], w[:, j])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        padded, w = ctx.saved_tensors
        k, n = w.shape[1], grad.shape[1]
        g = F.pad(grad, (0, 0, k - 1, k - 1))  # grad_padded[:, s] = sum_j w[:, j] * grad[:, s - j]
        grad_padded = g[:, k - 1:] * w[:, 0]
        for j in range(1, k):
            grad_padded.addcmul_(g[:, k - 1 - j:k - 1 - j + padded.shape[1]], w[:, j])
        acc = torch.promote_types(grad.dtype, torch.float32)  # bf16 products summed in float32
        grad_w = torch.stack([(grad * padded[:, j:j + n]).sum((0, 1), dtype=acc) for j in range(k)], 1)
        return grad_padded, grad_w.to(w.dtype)


def causal_depthwise_conv(padded: Tensor, weight: Tensor) -> Tensor:
    """``nn.Conv1d(c, c, k, groups=c, bias=False)`` (``weight`` (c, 1, k)) over time of ``padded`` (b, k - 1 + n, c),
    the (time, channel) layout the feed-forward holds: ``n`` outputs. The same function as the module applied to
    the transposed tensor; on an H100 that way (two transposed copies and cuDNN's depthwise kernels, ~220 GB/s) was
    a quarter of a large stage's training step. Computes in ``padded``'s dtype (bf16 under autocast, as the
    convolution did)."""
    return _CausalDepthwiseConv.apply(padded, weight[:, 0].to(padded.dtype))


def find_multiple(n: int, k: int) -> int:
    """``n`` rounded up to a multiple of ``k``."""
    return n if n % k == 0 else n + k - n % k


class FeedForward(nn.Module):
    """GEGLU feed-forward; with ``conv`` a causal depthwise convolution over time before the gate (an
    ``nn.Conv1d`` holds its weight, as in open-musiclm's checkpoints; ``causal_depthwise_conv`` applies it).

    ``align`` > 1 (``TokenConditionedTransformer.set_ff_align``): full forwards (training, validation) pad the inner
    width to a multiple of ``align`` with zero weights, so that the two big matmuls' rows are whole multiples of 16
    bytes, which the fastest GPU GEMM kernels need (open-musiclm's 2,730 at dim 1,024 is not:
    ``benchmarks/ff_align.py``). The same function: the padded channels stay exactly zero through the convolution
    and the gate, and the inner LayerNorm takes its statistics over the real width. The parameters keep their real
    shapes (the padding is made from them in each forward and its gradient sliced back), so checkpoints, DeepSpeed's
    partitions and imports are unchanged. Decoding (a cache) keeps the real width: a step's matmuls have one row
    per sequence."""

    def __init__(self, dim: int, dropout: float, conv: bool = True, mult: int = 4):
        super().__init__()
        self.inner = inner = int(dim * 2 * mult / 3) if conv else dim * mult
        self.align = 1
        self.norm = LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(2 * inner, 2 * inner, CONV_KERNEL, groups=2 * inner, bias=False) if conv else None
        self.norm_inner = LayerNorm(inner)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, cache: "KVCache | LayerSlots | None" = None, layer: int = 0) -> Tensor:
        pad = find_multiple(self.inner, self.align) - self.inner if cache is None else 0
        if pad:
            return self._padded(x, pad)
        h = self.proj_in(self.norm(x))
        if self.conv is not None:
            h = self._convolve(h, self.conv.weight, cache, layer)
        a, gate = h.chunk(2, dim=-1)
        return self.proj_out(self.dropout(self.norm_inner(F.gelu(gate) * a)))

    @staticmethod
    def _convolve(h: Tensor, weight: Tensor, cache: "KVCache | LayerSlots | None", layer: int) -> Tensor:
        """The causal convolution over ``h``, preceded by zeros (a full forward) or the cache's last inputs."""
        if cache is None:
            padded = torch.cat((h.new_zeros(h.shape[0], CONV_KERNEL - 1, h.shape[2]), h), dim=1)
        else:
            padded = cache.conv_input(layer, h)
        return causal_depthwise_conv(padded, weight)

    def _padded(self, x: Tensor, pad: int) -> Tensor:
        """``forward`` without a cache at the inner width ``inner + pad``: each half of ``proj_in`` (and of the
        convolution) gains ``pad`` zero rows, ``proj_out`` as many zero columns."""
        inner, dim = self.inner, x.shape[-1]
        w_in = F.pad(self.proj_in.weight.view(2, inner, dim), (0, 0, 0, pad)).view(2 * (inner + pad), dim)
        h = F.linear(self.norm(x), w_in)
        if self.conv is not None:
            w_conv = F.pad(self.conv.weight.view(2, inner, 1, CONV_KERNEL), (0, 0, 0, 0, 0, pad))
            h = self._convolve(h, w_conv.view(2 * (inner + pad), 1, CONV_KERNEL), None, 0)
        a, gate = h.chunk(2, dim=-1)
        g = F.gelu(gate) * a  # zero in the padded channels
        g = F.pad(F.layer_norm(g[..., :inner], (inner,), self.norm_inner.weight), (0, pad))
        return F.linear(self.dropout(g), F.pad(self.proj_out.weight, (0, pad)))


__all__ = ["CONV_KERNEL", "LayerNorm", "RelativePositionBias", "causal_depthwise_conv", "find_multiple", "FeedForward"]
