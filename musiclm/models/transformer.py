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

Its parts: ``layers.py`` (LayerNorm, position bias, feed-forward), ``attention.py`` (dense and FlexAttention),
``caches.py`` (the growing and the static decoding cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..config import ConfigError, TransformerConfig
from .attention import ATTENTION, Attention, FlexMask, causal_block_mask, compute_dtype, dense_mask
from .caches import KVCache, LayerSlots, StaticKVCache, decode_block, decode_block_region
from .layers import FeedForward, LayerNorm, RelativePositionBias

STATIC_CACHES = 4  # decoding caches kept per stage, one per (batch, window length): generation uses 1-3
# Compiled decoding steps kept for one process: every (stage, batch size, window length) is one entry of the one
# compiled ``_static_step`` (all stages and model sets share its code); past dynamo's default of 8 (a stage set
# tried at three candidate counts) the next shape fails outright under fullgraph.
DECODE_RECOMPILE_LIMIT = 64
CONDITION = "clap"  # the text condition: the sequence that conditioning dropout and guidance replace by the null one


@dataclass(frozen=True)
class TokenSequence:
    """One token sequence of a stage: conditioning (clap, semantic, coarse) or predicted (the last)."""

    name: str
    codebook_size: int
    num_quantizers: int

    @property
    def eos_id(self) -> int:
        return self.codebook_size


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head, cfg.attn_dropout)
        self.ff = FeedForward(cfg.dim, cfg.ff_dropout, conv=cfg.use_conv_ff)

    def forward(self, x: Tensor, mask: Tensor, cache: "KVCache | LayerSlots | None", layer: int) -> Tensor:
        x = x + self.attn(x, mask, cache, layer)
        return x + self.ff(x, cache, layer)


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

    def set_ff_align(self, multiple: int) -> "TokenConditionedTransformer":
        """Full forwards pad every feed-forward's inner width to a multiple of ``multiple`` with zero weights (the
        same function, the same parameters: ``FeedForward``); 1: the real width. ``train.ff_align``."""
        if multiple < 1:
            raise ConfigError(f"ff_align: {multiple} must be >= 1 (1: the feed-forward's real inner width)")
        for block in self.layers:
            block.ff.align = multiple
        return self

    @property
    def target(self) -> TokenSequence:
        return self.sequences[-1]

    @property
    def condition(self) -> int | None:
        """Which conditioning sequence is the text condition (the CLAP tokens) that the null condition replaces
        (conditioning dropout in training, the unconditional rows of guidance): its token embeddings zeroed and
        hidden from attention, its learned start vector alone in their place. Hiding alone would not do: the
        feed-forward's causal convolution carries the last two of them into the positions after. No new weights,
        so a stage imported from open-musiclm learns the null condition by fine-tuning with dropout. None for a
        stage without a text condition."""
        names = [s.name for s in self.sequences[:-1]]
        return names.index(CONDITION) if CONDITION in names else None

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

    def embed_prompt(self, conditioning: list[Tensor], target: Tensor | None,
                     null: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embeddings (b, n, dim) of the conditioning sequences and the target prefix, and the key mask. ``null``
        (b,) bool: the rows whose text condition is the null one (``condition``)."""
        if len(conditioning) != len(self.sequences) - 1:
            raise ValueError(f"expected {len(self.sequences) - 1} conditioning sequences "
                             f"({', '.join(s.name for s in self.sequences[:-1])}), got {len(conditioning)}")
        b = conditioning[0].shape[0]
        device = self.start_tokens[0].device
        parts, mask = [], []
        for i, ids in enumerate(conditioning):
            ids = ids.reshape(b, -1).to(device)
            ids = torch.cat((ids, ids.new_zeros(b, 1)), dim=1)  # the eos slot: row 0, hidden from attention
            embedded = self._embed(i, ids)
            m = torch.ones(b, ids.shape[1] + 1, dtype=torch.bool, device=device)
            m[:, -1] = False
            if null is not None and i == self.condition:  # zeros, not only hidden: the convolution reads them
                keep = ~null.to(device)
                embedded = embedded * keep[:, None, None].to(embedded.dtype)
                m[:, 1:] &= keep[:, None]
            parts += [self.start_tokens[i].expand(b, 1, -1), embedded]
            mask.append(m)
        parts.append(self.start_tokens[-1].expand(b, 1, -1))
        n_target = 0
        if target is not None and target.numel():
            target = target.reshape(b, -1).to(device)
            parts.append(self._embed(len(self.sequences) - 1, target))
            n_target = target.shape[1]
        mask.append(torch.ones(b, 1 + n_target, dtype=torch.bool, device=device))
        return torch.cat(parts, dim=1), torch.cat(mask, dim=1)

    # ------------------------------------------------------------------ forward

    def _run(self, x: Tensor, key_mask: Tensor | None, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        alpha = self.cfg.grad_shrink_alpha
        x = x * alpha + x.detach() * (1 - alpha)
        if isinstance(cache, StaticKVCache):  # one decoding step
            mask = cache.attn_mask(compute_dtype(x))
        elif cache is not None:
            start, total = cache.length, cache.length + x.shape[1]
            cache.key_mask = key_mask if cache.key_mask is None else torch.cat((cache.key_mask, key_mask), 1)
            mask = dense_mask(cache.key_mask, start, x.shape[1], cache.bias_table).to(compute_dtype(x))
            cache.length = total
        else:
            n = x.shape[1]
            table = self.rel_pos.table(n, x.device) if self.rel_pos is not None else None
            if self.attention == "flex":
                table = table.float() if table is not None else None  # scores are float32 inside the kernel
                mask = FlexMask(causal_block_mask(n, str(x.device)), key_mask, table)
            else:
                mask = dense_mask(key_mask, 0, n, table).to(compute_dtype(x))
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

    def forward(self, conditioning: list[Tensor], target: Tensor, key_drop: float = 0.0,
                null: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (b, n + 1, codebook_size + 1) for the ``n`` flattened target tokens and the
        eos after them. ``key_drop`` hides a random fraction of keys (open-musiclm's forgetful causal mask);
        ``null`` (b,) bool: rows conditioned on the null condition instead of their CLAP tokens."""
        x, key_mask = self.embed_prompt(conditioning, target, null)
        if key_drop > 0:
            keep = torch.rand(key_mask.shape, device=key_mask.device) >= key_drop
            keep[:, 0] = True  # every query keeps at least the first start token
            key_mask = key_mask & keep
        n_target = target.reshape(target.shape[0], -1).shape[1]
        hidden = self._run(x, key_mask)[:, -(n_target + 1):]
        return self._logits(hidden, 0)

    # ------------------------------------------------------------------ incremental decoding

    @torch.no_grad()
    def start(self, conditioning: list[Tensor], target: Tensor | None = None, max_len: int | None = None,
              null: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """Consume the prompt; return the logits (b, codebook_size + 1) of the next target token and the cache.
        ``max_len`` bounds the total positions (prompt plus tokens to come) for the position-bias table; ``null``
        as in ``forward``."""
        x, key_mask = self.embed_prompt(conditioning, target, null)
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


__all__ = ["TokenSequence", "Block", "TokenConditionedTransformer", "count_parameters", "model_flops"]