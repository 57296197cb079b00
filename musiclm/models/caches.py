"""Decoding state of the stage decoder, so that ``step`` decodes one token at a time with the same logits as a
full forward: per layer the keys and values and the last two inputs of the feed-forward's causal convolution.

``KVCache`` grows them token by token; ``StaticKVCache`` holds them in tensors allocated once for the whole window,
with the position as a tensor, so that one decoding step has fixed shapes and no Python state and ``torch.compile``
can capture it (with CUDA graphs on a GPU: ``TokenConditionedTransformer.compile_decoding``), compiling one block
that every layer's step reuses on its own weights and cache slots (``LayerSlots``, ``decode_block_region``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layers import CONV_KERNEL

if TYPE_CHECKING:
    from .transformer import Block

# A static cache's slots are a multiple of this: a GPU's memory-efficient attention wants the float mask's rows
# at a multiple of 8 elements, and a compiled step copies a mask that is not into a padded one in every layer
# (torch/_inductor/lowering.py, sdpa_constraint); windows are 514, 1,116 and 1,217 positions. Extra slots stay masked.
CACHE_SLOT_MULTIPLE = 16


@dataclass
class KVCache:
    """Decoding state: per layer keys/values (batch, time, dim_head) and the convolution's last inputs."""

    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    conv: list = field(default_factory=list)
    key_mask: Tensor | None = None  # (batch, time) False where a key is hidden (conditioning eos slots)
    bias_table: Tensor | None = None  # (heads, max_len) relative position bias, computed once
    length: int = 0  # positions consumed
    targets: int = 0  # tokens of the predicted sequence consumed

    def append_kv(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer == len(self.k):
            self.k.append(k)
            self.v.append(v)
        else:
            self.k[layer] = torch.cat((self.k[layer], k), dim=1)
            self.v[layer] = torch.cat((self.v[layer], v), dim=1)
        return self.k[layer], self.v[layer]

    def conv_input(self, layer: int, h: Tensor) -> Tensor:
        """``h`` (b, n, channels) preceded by the convolution's last inputs (zeros at the start); keeps the new last."""
        past = self.conv[layer]
        if past is None:
            past = h.new_zeros(h.shape[0], CONV_KERNEL - 1, h.shape[2])
        padded = torch.cat((past, h), dim=1)
        self.conv[layer] = padded[:, -(CONV_KERNEL - 1):]
        return padded


class StaticKVCache:
    """Decoding state in tensors allocated once: keys and values (depth, b, slots, dim_head) (slots: ``max_len``
    rounded up to a multiple of ``CACHE_SLOT_MULTIPLE``), the convolution's last inputs (depth, b, 2, channels),
    which keys are visible (b, slots), the position bias table, and the positions and target tokens consumed as
    0-dim tensors on the model's device. A step writes its keys at ``position`` and attends over all slots, those
    not yet written masked: every step has the same shapes, and advancing is an in-place add, so a compiled step
    (or a CUDA graph of it) replays as it is.
    ``fill`` loads a consumed prompt into the same tensors, so one cache (one compiled graph) serves every window
    of a stage."""

    def __init__(self, cache: KVCache, max_len: int):
        k0, b = cache.k[0], cache.key_mask.shape[0]
        device = k0.device
        self.max_len = max_len  # positions a window can reach; slots: allocated, rounded up (CACHE_SLOT_MULTIPLE)
        slots = -(-max_len // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE
        self.k = k0.new_zeros(len(cache.k), b, slots, k0.shape[-1])
        self.v = torch.zeros_like(self.k)
        convs = [c for c in cache.conv if c is not None]
        self.conv = torch.zeros((len(convs), *convs[0].shape), dtype=convs[0].dtype, device=device) if convs else None
        self.key_mask = torch.ones(b, slots, dtype=torch.bool, device=device)
        table = cache.bias_table
        self.bias_table = None if table is None else table.new_zeros(table.shape[0], max_len)
        self.keys = torch.arange(slots, device=device)  # slot i holds position i; slots past max_len stay masked
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.targets = torch.zeros((), dtype=torch.long, device=device)
        self.fill(cache)

    def fits(self, cache: KVCache, max_len: int) -> bool:
        """Whether ``cache`` (batch size, dtype, device) can be filled into this one of ``max_len`` positions."""
        k0 = cache.k[0]
        return (max_len == self.max_len and k0.shape[0] == self.k.shape[1] and k0.dtype == self.k.dtype
                and k0.device == self.k.device)

    def fill(self, cache: KVCache) -> "StaticKVCache":
        """Load a consumed prompt (a growing cache) in place: its keys, values, visible keys, the convolution's
        last inputs, the bias table and the counters; the slots after it are cleared."""
        n = cache.length
        if self.max_len <= n:
            raise ValueError(f"max_len ({self.max_len}) must exceed the {n} positions already consumed")
        self.k.zero_()
        self.v.zero_()
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.k[i, :, :n], self.v[i, :, :n] = k, v
        if self.conv is not None:
            self.conv.copy_(torch.stack([c for c in cache.conv if c is not None]))
        self.key_mask.fill_(True)  # target tokens: all visible
        self.key_mask[:, :n] = cache.key_mask
        if self.bias_table is not None:
            self.bias_table.copy_(cache.bias_table[:, :self.max_len])
        self.position.fill_(n)
        self.targets.fill_(cache.targets)
        return self

    def tensors(self) -> list[Tensor]:
        """Every tensor a step reads or writes in place (what CUDA graphs must see at fixed addresses)."""
        return [t for t in (self.k, self.v, self.conv, self.key_mask, self.bias_table, self.keys, self.position,
                            self.targets) if t is not None]

    def slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """What layer ``layer``'s step reads and writes in place: its keys, values and convolution inputs (views of
        the cache's tensors) and the position."""
        return self.k[layer], self.v[layer], None if self.conv is None else self.conv[layer], self.position

    def attn_mask(self, dtype: torch.dtype) -> Tensor:
        """(b, heads or 1, 1, slots): the bias of the query at ``position`` over every slot, -inf past it and at
        hidden keys; the same values the growing cache's mask has over its keys."""
        allowed = self.key_mask & (self.keys <= self.position)
        if self.bias_table is None:
            bias = torch.zeros(1, self.keys.shape[0], device=self.keys.device)
        else:
            bias = self.bias_table[:, (self.position - self.keys).clamp(min=0)]
        return bias[None, :, None].masked_fill(~allowed[:, None, None], float("-inf")).to(dtype)


class LayerSlots:
    """One layer of a ``StaticKVCache`` as a block's ``cache`` argument: writes this step's key and value at
    ``position`` and keeps the convolution's last inputs, in place."""

    def __init__(self, k: Tensor, v: Tensor, conv: Tensor | None, position: Tensor):
        self.k, self.v, self.conv, self.position = k, v, conv, position

    def append_kv(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # layer: these slots' own
        self.k.index_copy_(1, self.position.view(1), k)
        self.v.index_copy_(1, self.position.view(1), v)
        return self.k, self.v

    def conv_input(self, layer: int, h: Tensor) -> Tensor:
        padded = torch.cat((self.conv, h), dim=1)
        self.conv.copy_(padded[:, -(CONV_KERNEL - 1):])
        return padded


def decode_block(block: "Block", x: Tensor, mask: Tensor, k: Tensor, v: Tensor, conv: Tensor | None,
                 position: Tensor) -> Tensor:
    """One block of a static-cache decoding step, on its layer's cache slots."""
    return block(x, mask, LayerSlots(k, v, conv, position), 0)


# ``decode_block`` as a nested compile region: ``torch.compile`` traces and compiles it once per step graph and
# reuses that code for every layer (they differ only in their weights and cache slots) instead of compiling each
# of the ``depth`` layers anew (benchmarks/decode_compile.py). Outside a compile it would only add calls.
decode_block_region = torch.compiler.nested_compile_region(decode_block)


__all__ = ["CACHE_SLOT_MULTIPLE", "KVCache", "StaticKVCache", "LayerSlots", "decode_block", "decode_block_region"]
