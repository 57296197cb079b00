"""The fast paths against the reference ones: static-cache (and compiled) decoding draws the growing cache's
tokens; FlexAttention gives the dense mask's logits and gradients; a compiled stage gives the eager one's."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from musiclm.config import STAGES, ConfigError, TrainConfig, model_preset
from musiclm.models import build_stage
from musiclm.models.sampling import sample


def _stage(stage: str, depth: int | None = None, dtype=torch.float32):
    """A tiny stage with its gains and scales moved off 1 (so that every path is exercised)."""
    cfg = model_preset("tiny")
    if depth is not None:
        cfg = dataclasses.replace(cfg, **{f"{stage}_cfg": dataclasses.replace(cfg.stage(stage), depth=depth)})
    torch.manual_seed(0)
    model = build_stage(stage, cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(model, batch: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seqs = model.sequences

    def draw(s, n):
        return torch.randint(0, s.codebook_size, (batch, n) if s.num_quantizers == 1 else (batch, n, s.num_quantizers),
                             generator=g)

    cond = [torch.randint(0, s.codebook_size, (batch, 12), generator=g) if s.name == "clap" else draw(s, steps)
            for s in seqs[:-1]]
    return cond, draw(seqs[-1], steps)


@pytest.mark.parametrize("stage", STAGES)
def test_static_cache_draws_the_growing_caches_tokens_in_float32(stage):
    """Same generator, float32: the static cache draws exactly the growing cache's tokens, from an empty target
    and after a prefix (a later sliding window), over 24 time steps (24-120 tokens)."""
    model = _stage(stage)
    cond, target = _inputs(model, batch=2, steps=28)
    for prefix in (None, target[:, :4]):
        draws = {d: sample(model, cond, 24, prefix=prefix, temperature=1.0, decoding=d,
                           generator=torch.Generator().manual_seed(1)) for d in ("dynamic", "static")}
        assert torch.equal(draws["dynamic"], draws["static"])
    with pytest.raises(ValueError, match="decoding"):
        sample(model, cond, 2, decoding="fast")


@pytest.mark.parametrize("stage", ["semantic", "coarse"])  # the fine stage's windows: test_generate (batched)
def test_sliding_windows_draw_the_same_tokens_with_every_decoder(stage):
    """Generation's sliding windows (``generate.sample_windows``: each window conditioned on the overlap with
    what exists, the last moved back to end at the requested length) fill the same tokens with the static cache as
    with the growing one, and one static cache (one set of tensors for a compiled step) serves every window."""
    from functools import partial

    from musiclm.generation.generate import sample_windows, slide

    model = _stage(stage)
    cond, _ = _inputs(model, batch=2, steps=40)
    windows = slide(35, 16, 0.5)
    assert windows == [(0, 16), (8, 24), (16, 32), (19, 35)]
    conditioning = (lambda s, e: cond) if stage == "semantic" else (lambda s, e: [cond[0], cond[1][:, s:e]])
    caches = []

    def static(*args, **kwargs):
        out = sample(*args, **kwargs, decoding="static")
        caches.append(model._statics[-1])
        return out

    draws = {d: sample_windows(model, windows, conditioning, temperature=1.0, top_fraction=0.1,
                               generator=torch.Generator().manual_seed(2), sampler=sampler)
             for d, sampler in (("dynamic", partial(sample, decoding="dynamic")), ("static", static))}
    assert draws["static"].shape[:2] == (2, 35) and torch.equal(draws["static"], draws["dynamic"])
    assert len(caches) == 4 and all(c is caches[0] for c in caches)
    model.compile_decoding()  # the compiled step over the same windows (its first window compiles)
    compiled = sample_windows(model, windows, conditioning, temperature=1.0, top_fraction=0.1,
                              generator=torch.Generator().manual_seed(2), sampler=partial(sample, decoding="static"))
    assert torch.equal(compiled, draws["dynamic"])


def test_windows_end_to_end_are_sampled_as_one_batch():
    """The fine stage's windows (step 1: end to end) need none of each other's tokens: sampled as one batch, up to
    ``window_batch`` at once, they draw what they draw one after the other, row for row (argmax, float64: the
    conditioning of each row is its own window's); the last window, moved back over the one before it, is
    sampled alone after them with that overlap as its prefix. Overlapping windows are never batched."""
    from musiclm.generation.generate import sample_windows, slide, window_groups

    model = _stage("fine", dtype=torch.float64)
    cond, _ = _inputs(model, batch=2, steps=40)
    windows = slide(40, 12, 1.0)
    assert windows == [(0, 12), (12, 24), (24, 36), (28, 40)]
    assert window_groups(windows, 8) == [[(0, 12), (12, 24), (24, 36)], [(28, 40)]]
    assert window_groups(windows, 2) == [[(0, 12), (12, 24)], [(24, 36)], [(28, 40)]]
    assert window_groups(slide(35, 16, 0.5), 8) == [[w] for w in slide(35, 16, 0.5)]
    calls = []

    def counted(model, conditioning, steps, **kwargs):
        calls.append((conditioning[1].shape[0], steps, kwargs.get("prefix") is not None))
        return sample(model, conditioning, steps, **kwargs)

    def draw(n):
        return sample_windows(model, windows, lambda s, e: [cond[0], cond[1][:, s:e]], temperature=0.0,
                              top_fraction=0.1, generator=None, sampler=counted, window_batch=n)

    draws = {n: draw(n) for n in (1, 2, 8)}
    assert draws[1].shape == (2, 40, 5)
    assert torch.equal(draws[2], draws[1]) and torch.equal(draws[8], draws[1])
    assert calls[-2:] == [(6, 12, False), (2, 4, True)]  # window_batch 8: 3 windows x 2 rows, then the last
    # a static cache per batch shape (2, 4, 6 rows), kept: drawing again reuses their tensors (a CUDA graph's)
    kept = {id(c) for c in model._statics}
    assert len(kept) == 3 and torch.equal(draw(8), draws[1]) and {id(c) for c in model._statics} == kept


def test_static_cache_step_has_the_growing_caches_logits():
    """Step by step, the static cache's logits equal the growing cache's (float32, max difference ~1e-7) while
    the key and value slots past the position stay unwritten."""
    model = _stage("coarse")
    cond, target = _inputs(model, batch=2, steps=8)
    flat = target.reshape(2, -1)
    max_len = model.positions(cond, flat.shape[1])
    logits, grow = model.start(cond, flat[:, :4], max_len=max_len)
    _, cache = model.start(cond, flat[:, :4], max_len=max_len)
    static = model.static_cache(cache, max_len)
    assert max_len % 16 and static.k.shape[2] == -(-max_len // 16) * 16  # slots: a whole number of 16
    assert int(static.position) == grow.length
    for t in range(4, flat.shape[1]):
        a, b = model.step(flat[:, t], grow), model.step(flat[:, t], static)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert int(static.position) == grow.length and int(static.targets) == grow.targets
    assert static.k[:, :, grow.length:].abs().sum() == 0


@pytest.mark.parametrize("regions", [True, False], ids=["one-block-for-all-layers", "every-layer-apart"])
def test_compiled_decoding_draws_the_eager_tokens(regions):
    """The compiled step (inductor on the CPU; CUDA graphs on a GPU, checked by benchmarks/gpu_check.sh) draws
    the eager static cache's tokens, for a codebook-interleaved stage (coarse), with a prefix; with the layers
    sharing one compiled block (each its own weights and cache slots: two layers) or compiled apart. Each compile
    is ~10 s of the test. Every shape compiles anew, all stages together counted against dynamo's recompile
    limit (a hard failure under fullgraph once reached): ``compile_decoding`` raises it, checked from a limit of 1."""
    model = _stage("coarse", depth=2)
    cond, target = _inputs(model, batch=2, steps=12)
    draw = lambda rows=2: sample(model, [c[:rows] for c in cond], 10, prefix=target[:rows, :2],  # noqa: E731
                                 temperature=0.95, generator=torch.Generator().manual_seed(3))
    eager = draw()
    with torch._dynamo.config.patch(recompile_limit=1):
        model.compile_decoding(regions=regions)
        assert torch.equal(draw(), eager)
        if regions:
            assert draw(rows=1).shape == (1, 10, 3)  # a second shape: beyond a limit of 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # unfused on purpose: the CPU
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("bias_rows", [1, 4, 128])
def test_flex_attention_gives_the_dense_masks_logits_and_gradients(stage, bias_rows, monkeypatch):
    """FlexAttention (bias as score_mod, causal block mask, hidden keys looked up per example) against the dense
    float mask, float64, with the forgetful causal mask on: logits within 1e-10; every parameter's gradient within
    1e-5 of the largest gradient (the position-bias MLP runs in float32 in both), the bias table read from one copy
    or from one per query row modulo ``bias_rows`` (``FLEX_BIAS_ROWS``: 4 wraps around). On the CPU PyTorch refuses
    FlexAttention's backward at its entry check; its unfused implementation (the one that runs on a CPU) has
    one, and that is what this test differentiates, to check the score_mod and masks (the GPU kernel is checked
    by benchmarks/gpu_check.sh)."""
    import torch.nn.attention.flex_attention as fa

    from musiclm.models import attention

    monkeypatch.setattr(attention, "FLEX_BIAS_ROWS", bias_rows)
    model = _stage(stage, dtype=torch.float64)
    cond, target = _inputs(model, batch=2, steps=12)
    with torch.no_grad():
        dense = model(cond, target)
        flex = model.set_attention("flex")(cond, target)
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-10)

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    grads = {}
    for kind in ("dense", "flex"):
        model.set_attention(kind).zero_grad()
        torch.manual_seed(5)  # the same hidden keys in both
        logits = model(cond, target, key_drop=0.15)
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        grads[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["flex"].keys() == grads["dense"].keys()
    scale = max(float(g.abs().max()) for g in grads["dense"].values())
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["flex"][name], g, rtol=0, atol=1e-5 * scale, msg=name)


def test_flex_attention_is_refused_where_it_cannot_train():
    from musiclm.train.engine import training_attention

    assert training_attention(TrainConfig(), on_gpu=True) == "dense"
    assert training_attention(TrainConfig(attention="flex"), on_gpu=True) == "flex"
    with pytest.raises(ConfigError, match="only on a GPU"):
        training_attention(TrainConfig(attention="flex"), on_gpu=False)
    with pytest.raises(ConfigError, match=r"the coarse stage has attn_dropout 0.1; set model.coarse_cfg.attn_dropout=0"):
        training_attention(TrainConfig(stage="coarse", attention="flex"), on_gpu=True,
                           model=dataclasses.replace(model_preset("tiny").coarse_cfg, attn_dropout=0.1))
    model = build_stage("semantic", model_preset("tiny"))
    with pytest.raises(ConfigError, match="not one of"):
        model.set_attention("fused")
    model.cfg.attn_dropout = 0.1
    with pytest.raises(ConfigError, match="attn_dropout"):
        model.set_attention("flex")


def test_compiled_stage_gives_the_eager_logits_and_gradients():
    """``train.compile``: the stage compiled in place (as DeepSpeed's ``engine.compile`` does) and captured whole
    (``fullgraph``: no graph break in the forward, forgetful causal mask included) gives the eager logits and
    gradients (float32, dropout off), and its parameter names, hence checkpoints, are unchanged. The backend is
    ``aot_eager`` (the same capture and autograd graph as inductor, without generating C++): inductor's code for
    the forward and backward takes 45-90 s to build on 2 cores; benchmarks/train_step.py runs it."""
    model = _stage("fine", depth=1)
    cond, target = _inputs(model, batch=2, steps=6)
    names = list(model.state_dict())

    def run():
        model.zero_grad()
        torch.manual_seed(4)
        logits = model(cond, target, key_drop=0.15)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = run()
    model.compile(backend="aot_eager", fullgraph=True)
    logits, grads = run()
    assert list(model.state_dict()) == names and grads.keys() == eager_grads.keys()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_causal_depthwise_conv_is_the_conv1d_forward_and_backward():
    """The feed-forward's shifted multiply-adds compute nn.Conv1d's function (the module open-musiclm's checkpoints
    hold the weight of) on the transposed tensor: outputs and both gradients in float64, and gradcheck."""
    from musiclm.models.layers import CONV_KERNEL, causal_depthwise_conv

    torch.manual_seed(0)
    b, n, c = 2, 7, 5
    conv = torch.nn.Conv1d(c, c, CONV_KERNEL, groups=c, bias=False).double()
    padded = torch.randn(b, n + CONV_KERNEL - 1, c, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, n, c, dtype=torch.float64)
    ours = causal_depthwise_conv(padded, conv.weight)
    (g_padded, g_weight) = torch.autograd.grad(ours, (padded, conv.weight), grad)
    theirs = conv(padded.transpose(1, 2)).transpose(1, 2)
    (r_padded, r_weight) = torch.autograd.grad(theirs, (padded, conv.weight), grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_padded, r_padded, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_weight, r_weight, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(causal_depthwise_conv, (padded, conv.weight))
    # the decoding shape: one new step after the two kept inputs
    one = causal_depthwise_conv(padded[:, -CONV_KERNEL:], conv.weight)
    torch.testing.assert_close(one, theirs[:, -1:], rtol=0, atol=1e-12)
