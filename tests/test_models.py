"""The stage transformer: sizes, incremental decoding, learning, and stage checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from musiclm.config import STAGES, ConfigError, model_preset
from musiclm.models import build_stage, chance_loss, count_parameters, loss_and_metrics
from musiclm.train import checkpoint as ckpt

RELEASED_LAYOUT = Path(__file__).parent / "data" / "open_musiclm_files" / "layout.json"  # by open-musiclm's code


@pytest.mark.parametrize("stage", STAGES)
def test_large_parameter_counts_are_open_musiclms_exactly(stage):
    """The large stages have exactly the parameters of open-musiclm's released ones (283,092,896 / 289,391,520 /
    297,788,320): every tensor of its state dicts less its LayerNorms' ``beta``, buffers of zeros that ours omit."""
    layout = json.loads(RELEASED_LAYOUT.read_text())[stage]
    theirs = sum(math.prod(v["shape"]) for k, v in layout.items() if not k.endswith(".beta"))
    with torch.device("meta"):
        model = build_stage(stage, model_preset("large"))
    assert count_parameters(model) == theirs


def _random_inputs(model, batch, steps, values=None, generator=None):
    seqs = model.sequences
    high = lambda s: values or s.codebook_size  # noqa: E731
    cond = [torch.randint(0, high(s), (batch, 12) if s.name == "clap" else
                          (batch, steps) if s.num_quantizers == 1 else (batch, steps, s.num_quantizers),
                          generator=generator) for s in seqs[:-1]]
    t = seqs[-1]
    target = torch.randint(0, high(t), (batch, steps) if t.num_quantizers == 1 else (batch, steps, t.num_quantizers),
                           generator=generator)
    return cond, target


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("rows", [True, False], ids=["heads-as-rows", "expanded"])
def test_kv_cache_decoding_equals_full_forward(stage, rows, monkeypatch):
    """Logits of token-by-token decoding with the cache equal the teacher-forced forward (max abs diff 1e-4 in
    float32, on logits of magnitude ~1), starting both from an empty target and from a prefix; a step's attention
    with the heads as query rows of the one key/value head (the default) and with keys and values expanded to
    every head, as the forward runs it."""
    from musiclm.models import attention

    monkeypatch.setattr(attention, "SINGLE_QUERY_AS_ROWS", rows)
    torch.manual_seed(0)
    model = build_stage(stage, model_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():  # move gains and scales off 1 so that every path is exercised
            p.add_(0.1 * torch.randn_like(p))
    cond, target = _random_inputs(model, batch=2, steps=5)
    flat = target.reshape(2, -1)
    full = model(cond, target)
    for prefix in (0, 4):
        logits, cache = model.start(cond, flat[:, :prefix] if prefix else None, max_len=8)  # table grows past 8
        steps = [logits]
        for t in range(prefix, flat.shape[1]):
            steps.append(model.step(flat[:, t], cache))
        incremental = torch.stack(steps, dim=1)
        assert incremental.shape == full[:, prefix:].shape
        assert (incremental - full[:, prefix:]).abs().max() < 1e-4
        assert full.abs().mean() > 0.1


def _copy_task(model, batch, steps, generator, values=16):
    """Target: every time step repeats the first clap tokens (codebook k gets clap[k]); values < ``values``.
    The answer is fully determined by the inputs: the first step by the conditioning, the rest by both."""
    cond, _ = _random_inputs(model, batch, steps, values, generator)
    q = model.target.num_quantizers
    target = cond[0][:, :q][:, None, :].expand(batch, steps, q)
    return cond, (target[..., 0] if q == 1 else target).contiguous()


def test_opening_losses_score_the_first_frames_where_the_stage_loss_does():
    """``opening_losses``: each example's cross-entropy over its first frames (every codebook of a frame), at the
    positions ``stage_loss`` scores them: over all frames, with the eos label added back, they are its loss."""
    from musiclm.models import opening_losses, stage_loss

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 10, (3, 4, 2), generator=gen)  # 3 examples, 4 frames x 2 codebooks
    logits = torch.randn(3, 9, 11, generator=gen)  # 8 labels and the eos
    whole = opening_losses(logits, target, frames=4)
    eos = torch.nn.functional.cross_entropy(logits[:, -1], torch.full((3,), 10))
    assert ((whole.sum() * 8 + eos * 3) / 27).item() == pytest.approx(stage_loss(logits, target).item(), rel=1e-6)
    # the first frame is the first 2 labels; an example's opening is its own
    first = opening_losses(logits, target, frames=1)
    changed = logits.clone()
    changed[1, 2:] = 0  # only example 1's later positions
    assert torch.equal(opening_losses(changed, target, frames=1), first)
    assert not torch.equal(opening_losses(changed, target, frames=2)[1], opening_losses(logits, target, frames=2)[1])
    kept = opening_losses(logits, target, frames=2)[[0, 2]]
    assert torch.equal(opening_losses(changed, target, frames=2)[[0, 2]], kept)
    assert opening_losses(logits, target, frames=99).shape == (3,)  # at most the whole window


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_learns_a_task_determined_by_its_inputs(stage):
    torch.manual_seed(0)
    model = build_stage(stage, model_preset("tiny"))
    q = model.target.num_quantizers
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    train_gen, valid_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    valid = _copy_task(model, 64, 8, valid_gen)
    with torch.no_grad():
        initial, _ = loss_and_metrics(model(*valid), valid[1], q)
    assert abs(initial.item() / chance_loss(model) - 1) < 0.05
    for _ in range(250):
        cond, target = _copy_task(model, 16, 8, train_gen)
        loss, _ = loss_and_metrics(model(cond, target, key_drop=0.15), target, q)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(*valid)
        _, metrics = loss_and_metrics(logits, valid[1], q)
        first = (logits[:, :q].argmax(-1) == valid[1].reshape(64, -1)[:, :q]).float().mean()
    assert metrics["accuracy"] > 0.95
    assert first > 0.9  # the tokens only the conditioning can tell


def test_stage_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = model_preset("tiny")
    model = build_stage("coarse", cfg).eval()
    ckpt.save_stage(tmp_path / "c", model.state_dict(), "coarse", cfg, 7, "f" * 64, {"valid/loss": 1.0})
    loaded, info = ckpt.load_stage(tmp_path / "c", stage="coarse", fingerprint="f" * 64)
    assert info.step == 7 and info.stage == "coarse"
    cond, target = _random_inputs(model, 2, 3)
    assert torch.equal(model(cond, target), loaded(cond, target))

    with pytest.raises(ckpt.CheckpointError, match="is a coarse stage checkpoint, but .* needs the fine stage"):
        ckpt.load_stage(tmp_path / "c", stage="fine")
    with pytest.raises(ckpt.CheckpointError, match=r"token system ffffffffffff, but .* uses token system 000000000000"):
        ckpt.load_stage(tmp_path / "c", fingerprint="0" * 64)
    deeper = dataclasses.replace(cfg, coarse_cfg=dataclasses.replace(cfg.coarse_cfg, depth=3))
    with pytest.raises(ckpt.CheckpointError, match="depth: checkpoint 2 vs config 3"):
        ckpt.check_fits(ckpt.read_stage(tmp_path / "c"), "coarse", "f" * 64, deeper)
    with pytest.raises(ckpt.CheckpointError, match="not a stage checkpoint"):
        ckpt.read_stage(tmp_path)

    # a checkpoint saved before keys/values were projected as open-musiclm projects them is refused, not loaded
    import json

    meta = tmp_path / "c" / ckpt.STAGE_FILE
    old = {**json.loads(meta.read_text()), "format": 1}
    meta.write_text(json.dumps(old))
    with pytest.raises(ckpt.CheckpointError, match=r"model format 1, .* keys and values from the layer-normalized "
                                                   r"input.*Retrain the stage, or re-import"):
        ckpt.load_stage(tmp_path / "c")
    del old["format"]  # the first files had no format at all
    meta.write_text(json.dumps(old))
    with pytest.raises(ckpt.CheckpointError, match="model format 1"):
        ckpt.read_stage(tmp_path / "c")


def test_chance_loss_is_log_vocabulary():
    model = build_stage("semantic", model_preset("tiny"))
    assert chance_loss(model) == pytest.approx(math.log(model.target.codebook_size + 1))


@pytest.mark.parametrize("stage", STAGES)
def test_cached_sampling_draws_what_recomputing_draws(stage):
    """Same seed: the KV-cached sampler and open-musiclm's recompute-everything loop give the same tokens;
    another seed gives other tokens; eos never appears; only the top 10 % of logits are ever drawn.
    The two paths compute the logits in different shapes, so in float32 they differ in the last bits and a
    near-tie could draw another token; in float64 (rounded to float32 before the draw) they do not."""
    from musiclm.models.sampling import keep_top_fraction, kept_count, sample, sample_recompute

    torch.manual_seed(0)
    model = build_stage(stage, model_preset("tiny")).double().eval()
    cond, target = _random_inputs(model, batch=2, steps=3)
    prefix = target[:, :1]
    draw = lambda fn, seed: fn(model, cond, 3, prefix=prefix, temperature=0.95,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    cached = draw(sample, 1)
    assert cached.shape == (2, 3) + target.shape[2:]
    assert torch.equal(cached, draw(sample_recompute, 1))
    assert torch.equal(cached, draw(sample, 1)) and not torch.equal(cached, draw(sample, 2))
    assert int(cached.max()) < model.target.codebook_size
    # open-musiclm's top_k(logits, thres=0.9) keeps max(int((1 - 0.9) * n), 1): 102 of 1025 (not 103), and 1
    # of 20 ((1 - 0.9) * 20 is 1.9999999999999996 in floats), exactly that many even among ties
    assert kept_count(1025, 0.1) == 102 and kept_count(20, 0.1) == 1 and kept_count(5, 0.1) == 1
    kept = keep_top_fraction(torch.arange(1025.0)[None], 0.1)
    assert torch.isfinite(kept).sum() == 102 and torch.isfinite(kept[0, -102:]).all()
    assert torch.isfinite(keep_top_fraction(torch.zeros(2, 1025), 0.1)).sum(-1).tolist() == [102, 102]


def test_bf16_position_bias_keeps_every_distance_and_logits_stay_close_to_float32():
    """bf16 holds whole numbers exactly only up to 256: a table built from bf16 distances gave 1100-1103 one
    bias. The table is computed in float32 (then cast), also under bf16 autocast, so a bf16 model gives a float32
    model's table for the same weights, and a 1,217-position fine example (2 s window) gives nearly float32
    logits."""
    assert len(torch.arange(1217, dtype=torch.bfloat16).unique()) == 537  # what arange in bf16 keeps
    torch.manual_seed(0)
    bf16 = build_stage("fine", model_preset("tiny")).eval().to(torch.bfloat16)
    f32 = build_stage("fine", model_preset("tiny")).eval()
    f32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # the same (rounded) weights
    table = bf16.rel_pos.table(2048, "cpu")
    assert table.dtype == torch.bfloat16 and torch.equal(table, f32.rel_pos.table(2048, "cpu").to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training's bf16: autocast must not run the MLP in bf16
        in_autocast = f32.rel_pos.table(2048, "cpu")
    assert in_autocast.dtype == torch.float32 and torch.equal(in_autocast, f32.rel_pos.table(2048, "cpu"))
    cond = [torch.randint(0, 1024, (1, 12)), torch.randint(0, 1024, (1, 150, 3))]
    target = torch.randint(0, 1024, (1, 150, 5))
    assert f32.positions(cond, target[0].numel()) == 1217
    with torch.no_grad():
        ref, got = f32(cond, target), bf16(cond, target).float()
    # bf16 keeps 8 bits of mantissa. Measured here: largest difference 0.0093, mean 0.0012, logits' std 0.16
    # (6 % and 0.8 % of it), the top choice the same at 98 % of positions. Bounds: 10 %, 2 %, 95 %.
    diff = (got - ref).abs()
    assert diff.max() < 0.1 * ref.std() and diff.mean() < 0.02 * ref.std(), (diff.max(), diff.mean(), ref.std())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("start,n", [(0, 1217), (0, 7), (37, 1), (20, 5)])
def test_toeplitz_bias_equals_indexing_the_table_by_distance_forward_and_backward(start, n):
    """The bias built from windows of one vector (``unfold``) is the table indexed by clamped distances, for a
    training window (start 0) and for cached decoding steps (start > 0); the gradients into the table agree up to
    summation order (the reference's backward is a scatter-add, the new one a sum over windows)."""
    from musiclm.models.attention import toeplitz_bias

    torch.manual_seed(0)
    table = torch.randn(4, start + n + 3, dtype=torch.float64, requires_grad=True)  # a cache's table is longer
    dist = torch.arange(start, start + n)[:, None] - torch.arange(start + n)[None, :]
    ref, got = table[:, dist.clamp(min=0)], toeplitz_bias(table, start, n)
    assert got.shape == ref.shape == (4, n, start + n) and torch.equal(got, ref)
    upstream = torch.randn_like(ref)
    (g_ref,), (g_got,) = torch.autograd.grad(ref, table, upstream), torch.autograd.grad(got, table, upstream)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-9)


def test_attention_mask_is_cast_once_to_the_autocast_dtype():
    """Under autocast the float mask handed to every layer is already in autocast's dtype (bf16), so attention
    does not cast the whole (batch, heads, n, n) mask again in each layer; without autocast it stays float32."""
    from musiclm.models.attention import compute_dtype

    torch.manual_seed(0)
    model = build_stage("coarse", model_preset("tiny")).eval()
    seen = []
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[1].dtype))
    cond = [torch.randint(0, 1024, (2, 12)), torch.randint(0, 1024, (2, 20))]
    target = torch.randint(0, 1024, (2, 10, 3))
    with torch.no_grad():
        model(cond, target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(cond, target)
            assert compute_dtype(torch.zeros(1)) == torch.bfloat16
    assert seen == [torch.float32, torch.bfloat16]


def test_conditioning_gain_shows_whether_a_stage_uses_its_text_condition():
    """The validation pass of training (``loop.validation_pass``) scores each example again with the CLAP tokens of
    the example half the subset away: a model that learned the copy task above (its first tokens are the CLAP
    tokens) loses much more with them swapped, most over each window's opening (``valid/..._opening``); the
    untrained one, nothing to speak of."""
    from musiclm.train.loop import validation_pass

    torch.manual_seed(0)
    model = build_stage("semantic", model_preset("tiny"))
    valid = _copy_task(model, 12, 8, torch.Generator().manual_seed(2))
    names = [s.name for s in model.sequences]
    batches = [{n: t[i: i + 4].numpy() for n, t in zip(names, [*valid[0], valid[1]])} for i in range(0, 12, 4)]

    def gain(m):
        m.eval()
        sums, cond_sums, _ = validation_pass(m, m, batches, "cpu")
        out = {**sums.reduce("cpu"), **cond_sums.reduce("cpu")}
        assert out["valid/loss_cond_shuffled"] - out["valid/loss"] == pytest.approx(out["valid/conditioning_gain"])
        assert len(cond_sums.opening_gains) == len(cond_sums.opening_null_gains) == 12  # one per example
        return out["valid/conditioning_gain"], out["valid/conditioning_gain_opening"]

    (before, before_opening) = gain(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    model.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(150):
        cond, target = _copy_task(model, 16, 8, gen)
        loss, _ = loss_and_metrics(model(cond, target), target, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, after_opening = gain(model)
    assert abs(before) < 0.05 and after > 1.0, (before, after)
    # the first step is the condition's alone (the later ones the context tells too): the opening shows more
    assert abs(before_opening) < 0.1 and after_opening > after, (before_opening, after_opening)


def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_memory_kept():
    """train.activation_checkpointing recomputes each block in the backward: the same loss and gradients, dropout
    and the forgetful causal mask included (the checkpoint replays the RNG), while the forward keeps only each
    block's input (the full-size rehearsal's fine stage ran out of memory on 24 GB without it)."""
    cfg = model_preset("tiny")
    cfg = dataclasses.replace(cfg, fine_cfg=dataclasses.replace(cfg.fine_cfg, ff_dropout=0.1, attn_dropout=0.1))
    torch.manual_seed(0)
    model = build_stage("fine", cfg).train()
    cond = [torch.randint(0, 1024, (2, 12)), torch.randint(0, 1024, (2, 6, 3))]
    target = torch.randint(0, 1024, (2, 6, 5))

    def run(checkpointed: bool):
        model.checkpoint_blocks = checkpointed
        model.zero_grad()
        torch.manual_seed(1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logits = model(cond, target, key_drop=0.15)
        loss, _ = loss_and_metrics(logits, target, 5)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)

    plain, checkpointed = run(False), run(True)
    assert torch.equal(plain[0], checkpointed[0]) and plain[1].keys() == checkpointed[1].keys()
    for name, grad in plain[1].items():
        assert torch.allclose(grad, checkpointed[1][name], atol=1e-6, rtol=1e-5), name
    assert checkpointed[2] < plain[2] / 2, (plain[2], checkpointed[2])  # elements kept for the backward
    with torch.no_grad():  # evaluation and decoding never checkpoint
        model.eval()
        assert torch.equal(model(cond, target), model(cond, target))


class LinearWeights(TorchFunctionMode):
    """The weight shapes of every ``F.linear`` called inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.shapes.add(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", STAGES)
def test_feed_forward_padded_to_an_aligned_width_is_the_same_function_and_parameters(stage):
    """train.ff_align pads the feed-forward's inner width (170 at the tiny preset's dim 64) with zero weights in a
    training forward: the same loss and the same gradients of the same parameters (forgetful mask included), while
    the matmuls really run at the padded width; decoding with a cache keeps the real width."""
    cfg = model_preset("tiny")
    cfg = dataclasses.replace(cfg, **{f"{stage}_cfg": dataclasses.replace(cfg.stage(stage), ff_dropout=0.0)})
    torch.manual_seed(0)
    model = build_stage(stage, cfg).train()
    keys = {n: p.shape for n, p in model.state_dict().items()}
    shapes = {"clap": (12,), "semantic": (9,), "coarse": (4, 3), "fine": (3, 5)}
    *cond, target = [torch.randint(0, s.codebook_size, (2, *shapes[s.name])) for s in model.sequences]

    def run(align: int):
        model.set_ff_align(align).zero_grad()
        torch.manual_seed(1)
        with LinearWeights() as linears:
            loss, _ = loss_and_metrics(model(cond, target, key_drop=0.15), target, model.target.num_quantizers)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, linears

    plain, padded = run(1), run(64)
    inner = model.layers[0].ff.inner
    assert inner % 64 and (64, inner) in plain[2].shapes  # the real width...
    assert {(2 * 192, 64), (64, 192)} <= padded[2].shapes and (64, inner) not in padded[2].shapes  # ...padded
    assert {n: p.shape for n, p in model.state_dict().items()} == keys
    assert torch.allclose(plain[0], padded[0], atol=1e-6) and plain[1].keys() == padded[1].keys()
    for name, grad in plain[1].items():
        assert torch.allclose(grad, padded[1][name], atol=1e-6, rtol=1e-4), name
    with torch.no_grad():  # a cache: the real width whatever the setting
        model.eval()
        _, cache = model.start(cond, target[:, :1])
        assert cache.conv[0].shape[-1] == 2 * inner
    with pytest.raises(ConfigError, match="ff_align"):
        model.set_ff_align(0)


@pytest.mark.parametrize("stage", STAGES)
def test_model_flops_is_an_independent_count_of_every_matmul_less_the_masked_half(stage):
    """``model_flops`` (train/mfu, the cost table of docs/fma-at-scale.md) against torch's FLOP counter over a real forward and
    backward: the counter sees every matmul the stage runs, which by hand are 6 × the layers' weights per
    position, 12·depth·heads·dim_head per pair of positions (q·k and attn·v over the full dense matrix), the logits
    of the predicted rows rounded up to whole time steps, and the relative-position MLP (counted apart). The model
    FLOPs are that count less the masked half of attention, the padding rows and the MLP."""
    from torch.utils.flop_counter import FlopCounterMode

    from musiclm.models import stage_loss
    from musiclm.models.transformer import model_flops

    torch.manual_seed(0)
    model = build_stage(stage, model_preset("tiny")).train()
    b = 2
    cond, target = _random_inputs(model, b, 7)
    q, n_target = model.target.num_quantizers, target[0].numel()
    positions, predicted = model.positions(cond, n_target), n_target + 1  # the target's tokens and eos
    with FlopCounterMode(display=False) as counter:
        stage_loss(model(cond, target), target).backward()
    with FlopCounterMode(display=False) as mlp:
        model.rel_pos.table(positions, torch.device("cpu")).sum().backward()
    m = model.cfg
    dense = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    attention_pairs = 12 * m.depth * m.heads * m.dim_head * positions ** 2
    rows = -(-predicted // q) * q
    head = 6 * m.dim * (model.target.codebook_size + 1)
    assert m.depth >= 2 and dense > 0
    assert counter.get_total_flops() == b * (6 * dense * positions + attention_pairs + head * rows) \
        + mlp.get_total_flops()
    assert b * model_flops(model, positions, predicted) == \
        counter.get_total_flops() - b * attention_pairs // 2 - b * head * (rows - predicted) - mlp.get_total_flops()
