"""Attention of the stage decoder: multi-head queries over one key/value head, queries and keys L2-normalized
with learned per-dimension scales and a fixed scale of 8, plus the relative position bias.

A full forward attends through ``F.scaled_dot_product_attention`` with a dense float mask (``dense_mask``: the
bias where a query may look, -inf elsewhere) or, with ``attention="flex"``, through FlexAttention: the bias is a
``score_mod`` reading the (heads, n) table, causality a block mask (blocks above the diagonal are skipped), hidden
keys a (batch, n) bool lookup, so no (batch, heads, n, n) tensor with a gradient is built (``FlexMask``). A decoding
step (one query position) attends in the multi-query form (``SINGLE_QUERY_AS_ROWS``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerNorm

if TYPE_CHECKING:
    from .caches import KVCache, LayerSlots

ATTN_SCALE = 8.0  # open-musiclm multiplies q·k of unit vectors (times learned scales) by a fixed 8
ATTENTION = ("dense", "flex")  # how a full forward attends (TokenConditionedTransformer.set_attention)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's (bf16 in GPU training) when it is on, else ``x``'s. The float mask
    is cast to it once per forward; left in float32 under autocast, every layer's attention cast the whole
    (batch, heads, n, n) mask again (about a quarter of a large-stage training step on an H200)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def toeplitz_bias(table: Tensor, start: int, n: int) -> Tensor:
    """Bias (heads, n, start + n) of queries ``start .. start + n - 1`` over keys ``0 .. start + n - 1``: entry
    [h, i, j] = table[h, max(start + i - j, 0)] (distances below 0 are masked by the caller). Built as windows of
    one vector over the distances (``unfold``: every row is the previous one shifted by one) instead of indexing
    the table with an (n, start + n) matrix of distances, whose backward is a scatter-add of n² elements into a
    few thousand: on an H200 that backward alone was 16 % of a training step of the large coarse stage."""
    total = start + n
    t = table[:, :total]
    w = torch.cat((t.flip(-1), t[:, :1].expand(-1, n - 1)), dim=-1)  # w[m] = t[max(total - 1 - m, 0)]
    return w.unfold(-1, total, 1).flip(1)  # row i: w[n - 1 - i : n - 1 - i + total]


def dense_mask(key_mask: Tensor, start: int, n: int, bias_table: Tensor | None) -> Tensor:
    """Float mask (b, heads or 1, n, start+n): relative bias where a query may attend, -inf elsewhere."""
    total = start + n
    qpos = torch.arange(start, total, device=key_mask.device)[:, None]
    dist = qpos - torch.arange(total, device=key_mask.device)[None, :]
    allowed = (dist >= 0)[None] & key_mask[:, None, :]  # (b, n, total)
    if bias_table is None:
        bias = torch.zeros(1, n, total, device=key_mask.device)
    else:
        bias = toeplitz_bias(bias_table, start, n)  # (heads, n, total)
    return bias[None].masked_fill(~allowed[:, None], float("-inf"))


SINGLE_QUERY_AS_ROWS = True  # decoding attention in the multi-query form (``Attention.forward``); False: as training


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)  # one key/value head shared by all query heads
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor, cache: "KVCache | LayerSlots | None" = None, layer: int = 0) -> Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # from the block input, not the normalized one: open-musiclm's function
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        if cache is not None:
            k, v = cache.append_kv(layer, k, v)
        if isinstance(mask, FlexMask):
            out = mask.attend(q, k[:, None], v[:, None])
            return self.to_out(F.dropout(out.transpose(1, 2).reshape(b, n, -1), self.dropout, self.training))
        if n == 1 and SINGLE_QUERY_AS_ROWS and not (self.training and self.dropout):
            # one position (a decoding step): its heads as the query rows of one head over the one key/value head,
            # so that the keys and values are read once, not expanded to every head (a copy per layer and step
            # inside a compiled step); the mask (b, heads or 1, 1, keys) lies the same way
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k[:, None], v[:, None],
                                                 attn_mask=mask.transpose(1, 2), scale=ATTN_SCALE)
            return self.to_out(out.reshape(b, 1, -1))
        kh = k[:, None].expand(b, self.heads, k.shape[1], self.dim_head)
        vh = v[:, None].expand(b, self.heads, v.shape[1], self.dim_head)
        out = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask, scale=ATTN_SCALE,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = F.dropout(out.transpose(1, 2).reshape(b, n, -1), self.dropout, self.training)
        return self.to_out(out)


@dataclass
class FlexMask:
    """What FlexAttention needs in place of the dense mask: the position-bias table (heads, n) added by a
    ``score_mod`` at distance ``q - k``, which keys each example hides (b, n), and a causal block mask."""

    block_mask: object
    key_mask: Tensor
    table: Tensor | None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        table, key_mask = self.table, self.key_mask
        dtype = compute_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # the q/k scales are float32 parameters
        rows = FLEX_BIAS_ROWS if table is not None and table.requires_grad and torch.is_grad_enabled() else 1
        if rows > 1:  # one copy of the table per query row modulo ``rows``: the gradients of a tile's scores land
            table = table[:, None].expand(-1, rows, -1).contiguous()  # on distinct addresses (summed back after)

        def score_mod(score, b, h, q_idx, kv_idx):
            if table is not None:
                d = (q_idx - kv_idx).clamp(min=0)
                score = score + (table[h, q_idx % rows, d] if rows > 1 else table[h, d])
            return torch.where(key_mask[b, kv_idx], score, -float("inf"))

        return flex_attention_fn(q.device.type)(q, k, v, score_mod=score_mod, block_mask=self.block_mask,
                                                scale=ATTN_SCALE, enable_gqa=True,
                                                kernel_options=dict(FLEX_KERNEL_OPTIONS) if q.is_cuda else None)


# Tile sizes of the fused FlexAttention forward on a GPU. PyTorch 2.11's default for bf16, head dim 64 on an H100
# (128 x 128 tiles, 3 stages) asks 311,296 bytes of shared memory for this score_mod (which gathers from the bias
# table and the hidden-key mask per score) where the chip has 232,448: it does not build. 128 x 64 tiles
# in 2 stages build and run (2026-11-26, H100); benchmarks/train_step_gpu.py --flex-kernel-options tries others.
FLEX_KERNEL_OPTIONS: dict = {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 2}
# The bias table's gradient in FlexAttention's backward is a scatter with atomic adds, one per score, into the
# table's (heads, n) entries: an M x N tile's scores fall on M + N - 1 distances (64 x 64: 127, ~32 adds to each
# address), and adds to one address are serialized. With ``FLEX_BIAS_ROWS`` above 1 training reads the table from
# that many copies, one per query row modulo it, so that a tile of up to that many rows adds to distinct addresses
# (128: 9 MB in float32 for 16 heads x 1,116 positions). The same function (tested); 1 (one table) until a GPU
# shows that more pays: benchmarks/train_step_gpu.py --flex-bias-rows 1,128 (gpu_check.sh's lease item (c)).
FLEX_BIAS_ROWS = 1


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def causal_block_mask(n: int, device: str):
    """The causal block mask of ``n`` positions (one for every batch and head), made once per length."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, n, n, device=device)


@functools.lru_cache(maxsize=4)
def flex_attention_fn(device_type: str):
    """FlexAttention compiled into one fused kernel on a GPU; on the CPU it runs unfused (forward only: PyTorch
    has no FlexAttention backward on the CPU), which serves tests and inference."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


__all__ = ["ATTN_SCALE", "ATTENTION", "compute_dtype", "toeplitz_bias", "dense_mask", "Attention", "FlexMask",
           "causal_block_mask", "flex_attention_fn"]
