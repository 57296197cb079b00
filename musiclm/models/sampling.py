"""Sampling a stage's target tokens: open-musiclm's rule (keep the top fraction of logits, Gumbel-max at a
temperature, no eos inside the window), with the KV cache, or by recomputing the whole prefix at every step
as open-musiclm does (kept for comparison: ``benchmarks/generate.py``).

Classifier-free guidance (``guidance``, MusicGen's ``cfg_coef``): each row is decoded twice in one batch, with its
text condition and with the null one (``TokenConditionedTransformer.condition``), through one cache of 2B rows, and
a token is drawn from ``uncond + (cond - uncond) * guidance`` of the two rows' logits; 1 is no guidance (one row
each, exactly the unguided draw), 0 the null-conditioned model alone.

Decoding (``sample``'s ``decoding``): ``static`` (a cache allocated once for the window; the step is compiled
when the model's ``compile_decoding`` was called), or ``dynamic`` (the cache grows by one token per step; the
reference the static path is tested against).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .transformer import TokenConditionedTransformer


def kept_count(vocabulary: int, fraction: float) -> int:
    """How many logits open-musiclm's ``top_k(logits, thres)`` keeps, ``max(int((1 - thres) * V), 1)``, with
    ``thres = 1 - fraction`` formed as its callers form it, float rounding included: 102 of 1025 at 0.1."""
    thres = 1.0 - fraction
    return max(int((1 - thres) * vocabulary), 1)


def keep_top_fraction(logits: Tensor, fraction: float) -> Tensor:
    """Exactly ``kept_count`` logits kept (the largest; ties broken by ``topk`` as open-musiclm's), the rest -inf."""
    values, index = logits.topk(kept_count(logits.shape[-1], fraction), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


class RowGenerators:
    """The sampling noise of a batch whose rows belong to independent draws (several prompts sampled together):
    each group of rows takes its noise from its own generator, in the order that draw alone has its rows, so a
    prompt draws the noise it draws by itself whatever shares its batch."""

    def __init__(self, groups: list[tuple[torch.Generator, Tensor]]):
        self.groups = groups  # (generator, row indices in the batch, in its own draw's order)

    def rand(self, shape: torch.Size, device: torch.device) -> Tensor:
        if sum(len(rows) for _, rows in self.groups) != shape[0]:
            raise ValueError(f"noise for {shape[0]} rows asked of generators of "
                             f"{sum(len(rows) for _, rows in self.groups)} rows")
        u = torch.empty(shape, device=device)
        for generator, rows in self.groups:
            u[rows.to(device)] = torch.rand((len(rows), *shape[1:]), generator=generator,
                                            device=generator.device).to(device)
        return u

    def tile(self, copies: int, rows: int) -> "RowGenerators":
        """The same draws for a batch of ``copies`` copies of this one's ``rows`` rows, copy-major (windows sampled
        together): each group's rows in the first copy, then in the second, ... (its own draw's order then)."""
        return RowGenerators([(g, torch.cat([r + i * rows for i in range(copies)])) for g, r in self.groups])


def noise(shape: torch.Size, device: torch.device, generator: "torch.Generator | RowGenerators | None") -> Tensor:
    """Uniform noise for ``pick``, drawn where the generator lives: a generator on the GPU keeps the draw there
    (no copy per token)."""
    if isinstance(generator, RowGenerators):
        return generator.rand(shape, device)
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu")
    return u.to(device)


def pick(logits: Tensor, temperature: float, top_fraction: float,
         generator: "torch.Generator | RowGenerators | None") -> Tensor:
    """One token per row: Gumbel-max over the filtered logits at ``temperature`` (argmax when it is 0)."""
    logits = logits.float().clone()
    logits[..., -1] = float("-inf")  # eos never falls inside a window
    logits = keep_top_fraction(logits, top_fraction)
    if temperature <= 0:
        return logits.argmax(-1)
    u = noise(logits.shape, logits.device, generator).clamp_(1e-20, 1.0)
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)


DECODING = ("static", "dynamic")


def guide(logits: Tensor, guidance: float) -> Tensor:
    """The guided logits of a doubled batch (the conditioned rows, then the same rows with the null condition):
    ``uncond + (cond - uncond) * guidance`` in float32."""
    cond, uncond = logits.float().chunk(2)
    return uncond + (cond - uncond) * guidance


def doubled(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.cat((t, t))


def null_rows(b: int, device=None) -> Tensor:
    """(2b,) bool: the second half of a doubled batch takes the null condition."""
    return torch.arange(2 * b, device=device) >= b


def _shape(tokens: Tensor, b: int, q: int) -> Tensor:
    return tokens.reshape(b, -1, q) if q > 1 else tokens.reshape(b, -1)


@torch.no_grad()
def sample(model: TokenConditionedTransformer, conditioning: list[Tensor], steps: int, *,
           prefix: Tensor | None = None, temperature: float = 1.0, top_fraction: float = 0.1,
           generator: "torch.Generator | RowGenerators | None" = None, decoding: str = "static",
           guidance: float = 1.0) -> Tensor:
    """Generate ``steps`` time steps (× num_quantizers tokens) after ``prefix`` with the KV cache; returns the
    new tokens as (b, steps) or (b, steps, q). ``guidance``: classifier-free guidance (module docstring)."""
    if decoding not in DECODING:
        raise ValueError(f"decoding: {decoding!r} is not one of {', '.join(DECODING)}")
    check_guidance(model, guidance)
    q = model.target.num_quantizers
    b = conditioning[0].shape[0]
    n = steps * q
    done = 0 if prefix is None else prefix.reshape(b, -1).shape[1]
    max_len = model.positions(conditioning, done + n)
    guided = guidance != 1.0
    if guided:
        logits, cache = model.start([doubled(c) for c in conditioning], doubled(prefix), max_len=max_len,
                                    null=null_rows(b))
    else:
        logits, cache = model.start(conditioning, prefix, max_len=max_len)
    if decoding == "static" and n > 1:
        cache = model.static_cache(cache, max_len)
    out = []
    for i in range(n):
        token = pick(guide(logits, guidance) if guided else logits, temperature, top_fraction, generator)
        out.append(token)
        if i < n - 1:
            logits = model.step(doubled(token) if guided else token, cache)
    return _shape(torch.stack(out, 1), b, q)


def check_guidance(model: TokenConditionedTransformer, guidance: float) -> None:
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance: {guidance} must be a finite number >= 0 (1: no guidance)")
    if guidance != 1.0 and model.condition is None:
        raise ValueError("guidance: this stage has no text condition to guide by")


@torch.no_grad()
def sample_recompute(model: TokenConditionedTransformer, conditioning: list[Tensor], steps: int, *,
                     prefix: Tensor | None = None, temperature: float = 1.0, top_fraction: float = 0.1,
                     generator: "torch.Generator | RowGenerators | None" = None, guidance: float = 1.0) -> Tensor:
    """The same draw as ``sample`` without a cache: a full forward over the whole prefix for every token (with
    guidance, one forward with the text condition and one with the null condition, each of ``b`` rows)."""
    check_guidance(model, guidance)
    q = model.target.num_quantizers
    b = conditioning[0].shape[0]
    tokens = torch.zeros(b, 0, dtype=torch.long) if prefix is None else prefix.reshape(b, -1).long()
    start = tokens.shape[1]
    everything = torch.ones(b, dtype=torch.bool)
    for _ in range(steps * q):
        logits = model(conditioning, tokens)[:, -1]
        if guidance != 1.0:
            logits = torch.cat((logits, model(conditioning, tokens, null=everything)[:, -1]))
            logits = guide(logits, guidance)
        token = pick(logits, temperature, top_fraction, generator)
        tokens = torch.cat((tokens, token[:, None].to(tokens.device)), 1)
    return _shape(tokens[:, start:], b, q)



__all__ = ["DECODING", "RowGenerators", "check_guidance", "guide", "kept_count", "keep_top_fraction", "noise", "pick",
           "sample", "sample_recompute"]
