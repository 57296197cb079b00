"""The token-conditioned decoder that every stage uses, readable in one sitting.

Layer structure as open-musiclm's ``TokenConditionedTransformer`` (REFERENCE.md), so that its released
checkpoints map onto it tensor for tensor (the key mapping lives with the importer):

- inputs: for each token sequence a learned start vector, then its tokens embedded from one table of
  ``(codebook_size + 1) * num_quantizers`` rows (token ``t`` of quantizer ``q`` is row ``t + q * codebook_size``,
  open-musiclm's offsets); conditioning sequences end with an end-of-sequence slot that is embedded as row 0
  and hidden from attention, exactly as open-musiclm's wrapper does;
- gradient shrink (0.1) on the input, then ``depth`` blocks of
  attention: multi-head queries from the bias-free pre-LayerNorm of the block input, one key/value head shared
  by all query heads projected from the block input itself *before* that LayerNorm (as open-musiclm's
  ``Attention.forward`` takes ``kv_input`` before ``x = self.norm(x)``; its checkpoints were trained so), queries and keys
  L2-normalized and multiplied by learned per-dimension scales, a fixed scale of 8, and a continuous relative
  position bias (an MLP over the distance, shared by all layers);
  feed-forward: LayerNorm, linear to twice the inner width, causal depthwise convolution (kernel 3), GEGLU,
  LayerNorm, dropout, linear back;
- a final LayerNorm and per-quantizer output weights ``(num_quantizers, codebook_size + 1, dim)``.

Attention goes through ``F.scaled_dot_product_attention`` with a dense float mask (relative bias, -inf where a
query may not look), or, with ``attention="flex"``, through FlexAttention: the bias is a ``score_mod`` reading
the (heads, n) table, causality a block mask (blocks above the diagonal are skipped), hidden keys a (batch, n)
bool lookup, so no (batch, heads, n, n) tensor with a gradient is built.

Decoding keeps, per layer, the keys and values and the last two inputs of the feed-forward's causal
convolution, so that ``step`` decodes one token at a time with the same logits as a full forward pass:
``KVCache`` grows them token by token; ``StaticKVCache`` holds them in tensors allocated once for the whole
window, with the position as a tensor, so that one decoding step has fixed shapes and no Python state and
``torch.compile`` can capture it (with CUDA graphs on a GPU: ``compile_decoding``), compiling one block that
every layer's step reuses on its own weights and cache slots (``LayerSlots``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..config import ConfigError, TransformerConfig

CONV_KERNEL = 3
ATTN_SCALE = 8.0  # open-musiclm multiplies q·k of unit vectors (times learned scales) by a fixed 8
STATIC_CACHES = 4  # decoding caches kept per stage, one per (batch, window length): generation uses 1-3
# A static cache's slots are a multiple of this: a GPU's memory-efficient attention wants the float mask's rows
# at a multiple of 8 elements, and a compiled step copies a mask that is not into a padded one in every layer
# (torch/_inductor/lowering.py, sdpa_constraint); windows are 514, 1,116 and 1,217 positions. Extra slots stay masked.
CACHE_SLOT_MULTIPLE = 16
# Compiled decoding steps kept for one process: every (stage, batch size, window length) is one entry of the one
# compiled ``_static_step`` (all stages and model sets share its code); past dynamo's default of 8 (a stage set
# tried at three candidate counts) the next shape fails outright under fullgraph.
DECODE_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class TokenSequence:
    """One token sequence of a stage: conditioning (clap, semantic, coarse) or predicted (the last)."""

    name: str
    codebook_size: int
    num_quantizers: int

    @property
    def eos_id(self) -> int:
        return self.codebook_size


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


class FeedForward(nn.Module):
    """GEGLU feed-forward; with ``conv`` a causal depthwise convolution over time before the gate (an
    ``nn.Conv1d`` holds its weight, as in open-musiclm's checkpoints; ``causal_depthwise_conv`` applies it)."""

    def __init__(self, dim: int, dropout: float, conv: bool = True, mult: int = 4):
        super().__init__()
        inner = int(dim * 2 * mult / 3) if conv else dim * mult
        self.norm = LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(2 * inner, 2 * inner, CONV_KERNEL, groups=2 * inner, bias=False) if conv else None
        self.norm_inner = LayerNorm(inner)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, cache: "KVCache | LayerSlots | None" = None, layer: int = 0) -> Tensor:
        h = self.proj_in(self.norm(x))
        if self.conv is not None:
            if cache is None:
                padded = torch.cat((h.new_zeros(h.shape[0], CONV_KERNEL - 1, h.shape[2]), h), dim=1)
            else:
                padded = cache.conv_input(layer, h)
            h = causal_depthwise_conv(padded, self.conv.weight)
        a, gate = h.chunk(2, dim=-1)
        return self.proj_out(self.dropout(self.norm_inner(F.gelu(gate) * a)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.attn_dropout)
        self.ff = FeedForward(cfg.dim, cfg.ff_dropout, conv=cfg.use_conv_ff)

    def forward(self, x: Tensor, mask: Tensor, cache: "KVCache | LayerSlots | None", layer: int) -> Tensor:
        x = x + self.attn(x, mask, cache, layer)
        return x + self.ff(x, cache, layer)


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


ATTENTION = ("dense", "flex")


def check_supported(cfg: TransformerConfig) -> None:
    if cfg.relative_position_bias_type == "t5":
        raise ConfigError("relative_position_bias_type: 't5' is not supported; use 'continuous' (open-musiclm's "
                          "released configs) or 'none'")
    if cfg.use_absolute_position_embeddings:
        raise ConfigError("use_absolute_position_embeddings: not supported (open-musiclm's released configs do "
                          "not use them); set it to false")
    if cfg.non_causal_prefix_size:
        raise ConfigError("non_causal_prefix_size: only 0 (fully causal, as open-musiclm trains) is supported")


class TokenConditionedTransformer(nn.Module):
    """Decoder over ``[start_1, seq_1…, eos_1, …, start_n, seq_n…]`` predicting the last sequence."""

    def __init__(self, sequences: list[TokenSequence], cfg: TransformerConfig):
        super().__init__()
        check_supported(cfg)
        self.sequences, self.cfg = list(sequences), cfg
        self.start_tokens = nn.ParameterList(nn.Parameter(torch.randn(cfg.dim) * 0.02) for _ in sequences)
        self.embeddings = nn.ModuleList(nn.Embedding((s.codebook_size + 1) * s.num_quantizers, cfg.dim)
                                        for s in sequences)
        self.logit_weights = nn.ParameterList(
            nn.Parameter(torch.randn(s.num_quantizers, s.codebook_size + 1, cfg.dim) * 0.02) for s in sequences)
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.02)
        self.rel_pos = RelativePositionBias(cfg.dim // 2, cfg.heads) \
            if cfg.relative_position_bias_type == "continuous" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.dim)
        self.attention = "dense"  # how a full forward attends: "dense" (float mask) or "flex" (set_attention)
        # training: keep only each block's input and recompute its activations in the backward (the same function
        # and gradients, dropout included: checkpoint replays the RNG state) for memory (train.activation_checkpointing)
        self.checkpoint_blocks = False
        self._compiled_step = None  # compile_decoding
        self._compile_regions = True  # compile_decoding: one block compiled and reused by every layer
        # static caches of the last STATIC_CACHES shapes, most recent last: each shape keeps its tensors, so a
        # compiled step's CUDA graph replays on the addresses it recorded (no re-recording when shapes alternate)
        self._statics: list[StaticKVCache] = []

    def set_attention(self, kind: str) -> "TokenConditionedTransformer":
        """Attention of full forwards (training, validation): ``dense`` or ``flex``. Decoding always uses the
        dense path (one query per step: nothing to fuse)."""
        if kind not in ATTENTION:
            raise ConfigError(f"attention: {kind!r} is not one of {', '.join(ATTENTION)}")
        if kind == "flex" and self.cfg.attn_dropout > 0:
            raise ConfigError("attention: 'flex' has no attention dropout; set attn_dropout to 0 or use 'dense'")
        self.attention = kind
        return self

    @property
    def target(self) -> TokenSequence:
        return self.sequences[-1]

    @staticmethod
    def positions(conditioning: list[Tensor], n_target: int) -> int:
        """Positions one example occupies: each conditioning sequence (batch-first) with its start and eos
        slot, then the target's start and ``n_target`` tokens."""
        return sum(c[0].numel() + 2 for c in conditioning) + 1 + n_target

    # ------------------------------------------------------------------ inputs

    def _embed(self, i: int, ids: Tensor, first: int = 0) -> Tensor:
        """Embed flat ids (b, n) of sequence ``i`` whose first element is element ``first`` of the sequence."""
        s = self.sequences[i]
        if s.num_quantizers > 1:
            q = (torch.arange(ids.shape[1], device=ids.device) + first) % s.num_quantizers
            ids = ids + q * s.codebook_size
        return self.embeddings[i](ids)

    def embed_prompt(self, conditioning: list[Tensor], target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Embeddings (b, n, dim) of the conditioning sequences and the target prefix, and the key mask."""
        if len(conditioning) != len(self.sequences) - 1:
            raise ValueError(f"expected {len(self.sequences) - 1} conditioning sequences "
                             f"({', '.join(s.name for s in self.sequences[:-1])}), got {len(conditioning)}")
        b = conditioning[0].shape[0]
        device = self.start_tokens[0].device
        parts, mask = [], []
        for i, ids in enumerate(conditioning):
            ids = ids.reshape(b, -1).to(device)
            ids = torch.cat((ids, ids.new_zeros(b, 1)), dim=1)  # the eos slot: row 0, hidden from attention
            parts += [self.start_tokens[i].expand(b, 1, -1), self._embed(i, ids)]
            m = torch.ones(b, ids.shape[1] + 1, dtype=torch.bool, device=device)
            m[:, -1] = False
            mask.append(m)
        parts.append(self.start_tokens[-1].expand(b, 1, -1))
        n_target = 0
        if target is not None and target.numel():
            target = target.reshape(b, -1).to(device)
            parts.append(self._embed(len(self.sequences) - 1, target))
            n_target = target.shape[1]
        mask.append(torch.ones(b, 1 + n_target, dtype=torch.bool, device=device))
        return torch.cat(parts, dim=1), torch.cat(mask, dim=1)

    def _attn_mask(self, key_mask: Tensor, start: int, n: int, bias_table: Tensor | None) -> Tensor:
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

    # ------------------------------------------------------------------ forward

    def _run(self, x: Tensor, key_mask: Tensor | None, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        alpha = self.cfg.grad_shrink_alpha
        x = x * alpha + x.detach() * (1 - alpha)
        if isinstance(cache, StaticKVCache):  # one decoding step
            mask = cache.attn_mask(compute_dtype(x))
        elif cache is not None:
            start, total = cache.length, cache.length + x.shape[1]
            cache.key_mask = key_mask if cache.key_mask is None else torch.cat((cache.key_mask, key_mask), 1)
            mask = self._attn_mask(cache.key_mask, start, x.shape[1], cache.bias_table).to(compute_dtype(x))
            cache.length = total
        else:
            n = x.shape[1]
            table = self.rel_pos.table(n, x.device) if self.rel_pos is not None else None
            if self.attention == "flex":
                table = table.float() if table is not None else None  # scores are float32 inside the kernel
                mask = FlexMask(causal_block_mask(n, str(x.device)), key_mask, table)
            else:
                mask = self._attn_mask(key_mask, 0, n, table).to(compute_dtype(x))
        if isinstance(cache, StaticKVCache):
            run = decode_block_region if self._compile_regions and torch.compiler.is_compiling() else decode_block
            for i, block in enumerate(self.layers):
                x = run(block, x, mask, *cache.slots(i))
            cache.position.add_(1)
        elif cache is None and self.checkpoint_blocks and self.training and torch.is_grad_enabled():
            for i, block in enumerate(self.layers):
                x = torch.utils.checkpoint.checkpoint(block, x, mask, None, i, use_reentrant=False)
        else:
            for i, block in enumerate(self.layers):
                x = block(x, mask, cache, i)
        return self.norm(x)

    def _logits(self, hidden: Tensor, first: int) -> Tensor:
        """Logits (b, n, codebook_size + 1) of target elements ``first .. first + n - 1``; element ``i`` uses the
        output weights of codebook ``i % num_quantizers``. Positions are grouped by codebook (one matmul per
        codebook) rather than gathering a weight matrix per position: that gather made an (n, codebook_size + 1,
        dim) tensor, 2.1 GB for a semantic window and 3.8 GB for a coarse one at dim 1024, and its backward a
        scatter of the same size (benchmarks/logits.py: 89-177x slower)."""
        w = self.logit_weights[-1]  # (num_quantizers, codebook_size + 1, dim)
        nq = w.shape[0]
        if nq == 1:
            return F.linear(hidden, w[0])
        b, n, d = hidden.shape
        if n <= nq:  # a decoding step: gathering one matrix per position is the cheap way
            q = (torch.arange(n, device=hidden.device) + first) % nq
            return torch.einsum("bnd,ncd->bnc", hidden, w[q])
        lead = first % nq  # pad to whole groups of num_quantizers positions, codebook 0 first
        grouped = F.pad(hidden, (0, 0, lead, (-(lead + n)) % nq)).view(b, -1, nq, d)
        return torch.einsum("bgqd,qcd->bgqc", grouped, w).reshape(b, -1, w.shape[1])[:, lead: lead + n]

    def forward(self, conditioning: list[Tensor], target: Tensor, key_drop: float = 0.0) -> Tensor:
        """Teacher-forced logits (b, n + 1, codebook_size + 1) for the ``n`` flattened target tokens and the
        eos after them. ``key_drop`` hides a random fraction of keys (open-musiclm's forgetful causal mask)."""
        x, key_mask = self.embed_prompt(conditioning, target)
        if key_drop > 0:
            keep = torch.rand(key_mask.shape, device=key_mask.device) >= key_drop
            keep[:, 0] = True  # every query keeps at least the first start token
            key_mask = key_mask & keep
        n_target = target.reshape(target.shape[0], -1).shape[1]
        hidden = self._run(x, key_mask)[:, -(n_target + 1):]
        return self._logits(hidden, 0)

    # ------------------------------------------------------------------ incremental decoding

    @torch.no_grad()
    def start(self, conditioning: list[Tensor], target: Tensor | None = None,
              max_len: int | None = None) -> tuple[Tensor, KVCache]:
        """Consume the prompt; return the logits (b, codebook_size + 1) of the next target token and the cache.
        ``max_len`` bounds the total positions (prompt plus tokens to come) for the position-bias table."""
        x, key_mask = self.embed_prompt(conditioning, target)
        cache = KVCache(conv=[None] * len(self.layers))
        cache.targets = 0 if target is None else target.reshape(x.shape[0], -1).shape[1]
        total = max(max_len or 0, x.shape[1])
        cache.bias_table = self.rel_pos.table(total, x.device) if self.rel_pos is not None else None
        hidden = self._run(x, key_mask, cache)
        return self._logits(hidden[:, -1:], cache.targets)[:, 0], cache

    @torch.no_grad()
    def step(self, token: Tensor, cache: KVCache | StaticKVCache) -> Tensor:
        """Feed one target token (b,) per batch element; return the logits of the one after it. With a static
        cache the step is the compiled one after ``compile_decoding``."""
        if isinstance(cache, StaticKVCache):
            if self._compiled_step is not None:
                return self._compiled_step(token, cache)
            return self._static_step(token, cache)
        x = self._embed(len(self.sequences) - 1, token.reshape(-1, 1), cache.targets)
        if cache.bias_table is not None and cache.bias_table.shape[1] < cache.length + 1:
            cache.bias_table = self.rel_pos.table(max(2 * cache.bias_table.shape[1], cache.length + 1), x.device)
        key_mask = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
        hidden = self._run(x, key_mask, cache)
        cache.targets += 1
        return self._logits(hidden, cache.targets)[:, 0]

    def _static_step(self, token: Tensor, cache: StaticKVCache) -> Tensor:
        """``step`` on a static cache: fixed shapes, no Python state, the same operations as the growing cache's."""
        x = self._embed(len(self.sequences) - 1, token.reshape(-1, 1), cache.targets)
        hidden = self._run(x, None, cache)
        cache.targets.add_(1)
        return self._logits(hidden, cache.targets)[:, 0]

    def static_cache(self, cache: KVCache, max_len: int) -> StaticKVCache:
        """The growing cache of a consumed prompt moved into a static one of ``max_len`` positions: the one an
        earlier call made for these shapes (a compiled step keeps replaying on the same tensors; the last
        ``STATIC_CACHES`` shapes are kept), else a new one."""
        if cache.bias_table is not None and cache.bias_table.shape[1] < max_len:
            cache.bias_table = self.rel_pos.table(max_len, cache.bias_table.device)
        for static in self._statics:
            if static.fits(cache, max_len):
                self._statics.remove(static)
                self._statics.append(static)
                return static.fill(cache)
        static = StaticKVCache(cache, max_len)
        self._statics.append(static)
        del self._statics[:-STATIC_CACHES]
        if static.k.is_cuda:
            for t in static.tensors():  # CUDA graphs replay on these addresses and see the in-place updates
                torch._dynamo.mark_static_address(t)
        return static

    def compile_decoding(self, mode: str | None = None, regions: bool = True) -> "TokenConditionedTransformer":
        """Compile the static-cache decoding step: ``reduce-overhead`` (CUDA graphs: one launch per step instead
        of hundreds) on a GPU, inductor's default elsewhere. The first step of each batch size and window length
        compiles (seconds to a minute); later ones replay. ``regions``: the layers share one compiled block (the
        compile no longer grows with depth: 24 layers 89 s -> 30 s on 2 CPU cores); False compiles every layer
        apart. Raises dynamo's recompile limit to ``DECODE_RECOMPILE_LIMIT`` (shapes are many, each compiled once)."""
        if mode is None:
            mode = "reduce-overhead" if self.norm.weight.is_cuda else "default"
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, DECODE_RECOMPILE_LIMIT)
        self._compile_regions = regions
        self._compiled_step = torch.compile(self._static_step, mode=mode, fullgraph=True, dynamic=False)
        return self


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops(model: TokenConditionedTransformer, positions: int, predicted: int) -> float:
    """Training FLOPs (forward + backward) of one example of ``positions`` positions whose last ``predicted`` are
    scored: 6 × the layers' matmul weights per position; the attention products under the causal mask (q·k and
    attn·v, 4·dim_head FLOPs per head, layer and pair forward, over half of the positions² pairs); the logits of
    the scored positions. It is what a count of every matmul finds (tests/test_models.py, torch's flop counter)
    less what is not model work: the masked half of dense attention, the relative-position MLP, and the logits
    computed for a time step's padding rows."""
    cfg = model.cfg
    dense = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    attention = 6 * cfg.depth * cfg.heads * cfg.dim_head * positions * positions  # 3 × (2 × 4·dim_head × S²/2)
    head = 6 * cfg.dim * (model.target.codebook_size + 1) * predicted
    return 6 * dense * positions + attention + head


__all__ = ["TokenSequence", "TokenConditionedTransformer", "KVCache", "StaticKVCache", "LayerSlots", "FlexMask",
           "ATTENTION", "count_parameters", "model_flops"]
