"""Conditioning dropout and classifier-free guidance: the null condition, guided sampling through every decoder
against a reference that runs the conditional and unconditional forwards apart, and a stage trained with dropout
following its condition more under guidance."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from musiclm.config import STAGES, model_preset
from musiclm.models import build_stage, loss_and_metrics
from musiclm.models.sampling import guide, sample, sample_recompute


def _stage(stage: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = build_stage(stage, model_preset("tiny")).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # gains and scales off 1: every path exercised
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(model, batch: int, steps: int, seed: int = 0, values: int | None = None):
    g = torch.Generator().manual_seed(seed)

    def draw(s, n):
        high = values or s.codebook_size
        return torch.randint(0, high, (batch, n) if s.num_quantizers == 1 else (batch, n, s.num_quantizers),
                             generator=g)

    cond = [torch.randint(0, values or s.codebook_size, (batch, 12), generator=g) if s.name == "clap"
            else draw(s, steps) for s in model.sequences[:-1]]
    return cond, draw(model.sequences[-1], steps)


@pytest.mark.parametrize("stage", STAGES)
def test_the_null_condition_hides_the_clap_tokens_and_nothing_else(stage):
    """A row with the null condition gives the same logits whatever its CLAP tokens (they are hidden; the CLAP start
    vector stays) and other than with them; its neighbours' rows are untouched; decoding with the cache gives the
    forward's logits with the null condition too."""
    model = _stage(stage)
    cond, target = _inputs(model, batch=3, steps=4)
    null = torch.tensor([False, True, False])
    with torch.no_grad():
        plain = model(cond, target)
        nulled = model(cond, target, null=null)
        other_clap = [torch.randint(0, 8, c.shape) if i == model.condition else c for i, c in enumerate(cond)]
        nulled_other = model(other_clap, target, null=null)
    assert model.condition == 0 and model.sequences[0].name == "clap"
    assert torch.equal(nulled[[0, 2]], plain[[0, 2]])
    assert (nulled[1] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(nulled_other[1], nulled[1], rtol=0, atol=1e-12)
    flat = target.reshape(3, -1)
    logits, cache = model.start(cond, flat[:, :2], max_len=64, null=null)
    steps = [logits] + [model.step(flat[:, t], cache) for t in range(2, flat.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), nulled[:, 2:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("stage", STAGES)
def test_guided_decoding_draws_what_two_separate_forwards_draw(stage):
    """Guidance 3 through one doubled batch (the static and the growing cache) draws exactly the tokens of the
    reference that runs the conditional and the null-conditioned forward apart over the whole prefix at every step;
    guidance 1 draws exactly the unguided tokens; guidance 0 draws the null-conditioned model's tokens; guided
    tokens differ from unguided ones. Float64, so that a near-tie cannot flip a draw."""
    model = _stage(stage)
    cond, target = _inputs(model, batch=2, steps=6)
    prefix = target[:, :1]

    def draw(fn=sample, **kw):
        return fn(model, cond, 4, prefix=prefix, temperature=0.95, generator=torch.Generator().manual_seed(5), **kw)

    plain = draw()
    reference = draw(sample_recompute, guidance=3.0)
    for decoding in ("static", "dynamic"):
        assert torch.equal(draw(decoding=decoding, guidance=1.0), plain)
        assert torch.equal(draw(decoding=decoding, guidance=3.0), reference)
    assert not torch.equal(reference, plain)
    # 0: the unconditional logits exactly, so the null-conditioned model's tokens
    logits = torch.randn(4, 9, dtype=torch.float64)
    assert torch.equal(guide(logits, 0.0), logits[2:].float())
    assert torch.equal(draw(guidance=0.0), draw(sample_recompute, guidance=0.0))
    with pytest.raises(ValueError, match="guidance"):
        draw(guidance=-1.0)


def test_compiled_decoding_draws_the_guided_tokens():
    """The compiled step (one cache of 2B rows) draws the eager static cache's guided tokens."""
    model = _stage("coarse", dtype=torch.float32)
    cond, target = _inputs(model, batch=2, steps=6)
    draw = lambda: sample(model, cond, 4, prefix=target[:, :2], temperature=0.95, guidance=2.5,  # noqa: E731
                          generator=torch.Generator().manual_seed(3))
    eager = draw()
    model.compile_decoding()
    assert torch.equal(draw(), eager)


def _half_copy_task(batch: int, generator: torch.Generator, model, values: int = 16):
    """A task the condition decides only in part: the first target token is the first CLAP token with
    probability 1/2, else uniform over ``values``; every later token repeats the first."""
    cond, _ = _inputs(model, batch, 6, values=values, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
    clap = cond[0][:, 0]
    own = torch.rand(batch, generator=generator) < 0.5
    first = torch.where(own, clap, torch.randint(0, values, (batch,), generator=generator))
    return cond, first[:, None].expand(batch, 6).contiguous(), clap


def test_a_stage_trained_with_conditioning_dropout_follows_its_condition_more_under_guidance():
    """The semantic stage learns the half-copy task with the condition dropped on 30 % of the examples. Then the
    probability of the conditioned first token (the CLAP token) is about 1/2 + 1/32 with the condition, about
    1/16 with the null condition (the task's marginal), and guidance 3 raises it well above guidance 1, as
    classifier-free guidance must: p_g ∝ p_uncond · (p_cond / p_uncond)^3."""
    torch.manual_seed(0)
    model = build_stage("semantic", model_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        cond, target, _ = _half_copy_task(32, gen, model)
        null = torch.rand(32, generator=gen) < 0.3
        loss, _ = loss_and_metrics(model(cond, target, null=null), target, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cond, _, clap = _half_copy_task(256, torch.Generator().manual_seed(2), model)

    def p_clap(guidance: float) -> float:
        with torch.no_grad():
            b = clap.shape[0]
            logits, _ = model.start([torch.cat((c, c)) for c in cond], None, null=torch.arange(2 * b) >= b)
        probs = guide(logits, guidance)[:, :-1].softmax(-1)  # eos excluded, as the sampler excludes it
        return float(probs.gather(1, clap[:, None]).mean())

    p0, p1, p3 = p_clap(0.0), p_clap(1.0), p_clap(3.0)
    assert abs(p1 - (0.5 + 1 / 32)) < 0.08, p1
    assert p0 < 0.15, p0
    assert p3 > p1 + 0.15, (p1, p3)


def test_guidance_is_refused_with_a_stage_that_never_learned_the_null_condition(tmp_path):
    """stage.json says how many steps a stage learned the null condition; guidance with one that never did is refused
    naming the stage, the checkpoint and the setting that fixes it; guidance 1 needs nothing."""
    from musiclm.generation.generate import GenerateSettings, check_guidance
    from musiclm.train import checkpoint as ckpt

    cfg = model_preset("tiny")
    model = build_stage("coarse", cfg)
    ckpt.save_stage(tmp_path / "plain", model.state_dict(), "coarse", cfg, 5, "f" * 64)
    ckpt.save_stage(tmp_path / "dropout", model.state_dict(), "coarse", cfg, 5, "f" * 64, null_condition_steps=5)
    plain, dropout = ckpt.read_stage(tmp_path / "plain"), ckpt.read_stage(tmp_path / "dropout")
    assert (plain.null_condition_steps, dropout.null_condition_steps) == (0, 5)
    guided = GenerateSettings(coarse_guidance=3.0)
    check_guidance({"coarse": dropout}, guided)
    check_guidance({"coarse": plain}, GenerateSettings())
    with pytest.raises(ckpt.CheckpointError, match=r"coarse stage.*plain.*train\.cond_drop_prob"):
        check_guidance({"coarse": plain}, guided)


def test_guidance_scale_on_the_command_line():
    import argparse

    from jobs.common import add_generate_args, generate_settings

    p = argparse.ArgumentParser()
    add_generate_args(p)
    s = generate_settings(p.parse_args(["--guidance-scale", "3"]))
    assert (s.semantic_guidance, s.coarse_guidance, s.fine_guidance) == (3.0, 3.0, 3.0)
    s = generate_settings(p.parse_args(["--guidance-scale", "semantic=2.5,coarse=1.5"]))
    assert (s.semantic_guidance, s.coarse_guidance, s.fine_guidance) == (2.5, 1.5, 1.0)
    assert dataclasses.asdict(generate_settings(p.parse_args([]))) == dataclasses.asdict(
        generate_settings(p.parse_args(["--guidance-scale", "1"])))
    for bad in ("loud", "vocals=2"):
        with pytest.raises(SystemExit):
            p.parse_args(["--guidance-scale", bad])


def test_the_pipeline_refuses_guidance_without_conditioning_dropout():
    from musiclm.config import ConfigError
    from musiclm.pipeline import PipelineSettings

    demo = PipelineSettings()  # the demo trains with conditioning dropout and generates with guidance
    assert (demo.cond_drop_prob, demo.guidance) == (0.2, 3.0)
    assert PipelineSettings(cond_drop_prob=0.0, guidance=1.0).guidance == 1.0
    with pytest.raises(ConfigError, match=r"guidance 3 needs stages that learned the null condition.*--cond-drop-prob"
                                          r".*--guidance-scale 1"):
        PipelineSettings(cond_drop_prob=0.0)
