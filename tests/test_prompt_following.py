"""The prompt-following block: each difference with its noise, from an evaluation's rows and a stage checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from musiclm.evaluation.prompt_following import (caption_match, conditioning_gains, estimate, from_results,
                                                 genre_shift, summary_lines, token_match)


def test_a_difference_is_its_mean_with_the_standard_error_and_clear_only_beyond_two_errors():
    values = [0.3, 0.1, 0.2, 0.4]
    e = estimate(values)
    assert e["value"] == pytest.approx(np.mean(values))
    assert e["noise"] == pytest.approx(np.std(values, ddof=1) / 2) and e["n"] == 4 and e["clear"]
    assert not estimate([0.3, -0.1, 0.2, -0.2])["clear"]  # positive mean, inside its noise
    assert not estimate([-0.3, -0.1, -0.2, -0.4])["clear"]  # beyond its noise, but negative
    assert not estimate([0.5])["clear"] and estimate([0.5])["noise"] == 0.0  # one item: no spread to judge by
    assert estimate([]) == {"value": None, "noise": None, "n": 0, "clear": False}


def test_reranking_and_guidance_come_from_the_evaluations_rows_prompt_by_prompt():
    rows = [  # as results.csv holds them: strings, a failed prompt's scores empty
        {"prompt": "a", "model_set": "final", "best_score": "0.30", "random_score": "0.10", "mean_score": "0.20"},
        {"prompt": "b", "model_set": "final", "best_score": "0.50", "random_score": "0.50", "mean_score": "0.40"},
        {"prompt": "c", "model_set": "final", "best_score": "", "random_score": "", "mean_score": ""},
        {"prompt": "a", "model_set": "final@g3", "best_score": "0.40", "random_score": "0.30", "mean_score": "0.35"},
        {"prompt": "b", "model_set": "final@g3", "best_score": "0.60", "random_score": "0.40", "mean_score": "0.50"},
        {"prompt": "a", "model_set": "early", "best_score": "0.90", "random_score": "0.00", "mean_score": "0.50"},
    ]
    out = from_results(rows, "final", "final@g3")
    assert out["best_of_n_vs_random"]["value"] == pytest.approx(0.1) and out["best_of_n_vs_random"]["n"] == 2
    assert out["guidance_vs_unguided"]["value"] == pytest.approx(0.125)  # means: +0.15 and +0.10
    assert out["guidance_vs_unguided"]["noise"] == pytest.approx(0.025) and out["guidance_vs_unguided"]["n"] == 2
    assert "guidance_vs_unguided" not in from_results(rows, "final", None)


def test_the_caption_match_compares_each_captions_scores_of_its_own_clips_and_the_others():
    """Per caption: its score of its own clip (the mean over its clips when it has several: every candidate
    generated for it) minus its mean score of the other captions' clips. Scores are compared within a caption, so
    captions that score every clip higher or lower (a text's own offset, larger than what the clips change) add no
    noise. The CLAP here is a table of unit embeddings (the pipeline test runs it on the tuned CLAP)."""
    text = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}
    audio = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]  # clip k's embedding; scores [caption][clip] = text . audio

    class Clap:  # the token system's CLAP as caption_match reads it
        sample_rate = 100

        def text_embeddings(self, captions):
            return torch.tensor([text[c] for c in captions])

        def audio_embeddings(self, clip):
            return torch.tensor([audio[int(clip[0])]] * 2)  # one row per window

    system = type("System", (), {"clap": Clap()})()
    clip = [np.full(100, k, np.float32) for k in range(3)]
    out = caption_match(system, clip, ["a", "b", "c"], 100)
    # a: 1 - (0 + 0.6) / 2; b: 1 - (0 + 0.8) / 2; c: 1 - (0.6 + 0.8) / 2
    assert out["value"] == pytest.approx(0.5333, abs=1e-4) and out["n"] == 3
    assert out["noise"] == pytest.approx(np.std([0.7, 0.6, 0.3], ddof=1) / np.sqrt(3))
    # several clips a caption: a's own are clips 0 and 1 (its mean score 0.5; b's 0.5, c's 0.7 of the pair)
    out = caption_match(system, [[clip[0], clip[1]], clip[1], clip[2]], ["a", "b", "c"], 100)
    assert out["value"] == pytest.approx(np.mean([0.5 - 0.3, 1 - (0.5 + 0.8) / 2, 1 - (0.7 + 0.8) / 2]))
    # every caption's clip the same: nothing follows a caption, whatever each caption's offset (a's 1, b's 0)
    same = caption_match(system, [clip[0]] * 3, ["a", "b", "c"], 100)
    assert same["value"] == pytest.approx(0) and same["noise"] == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        caption_match(system, clip[:1], ["a"], 100)


def test_the_token_match_sets_a_captions_clap_tokens_against_its_own_clips_and_the_others():
    """Per clip: whether its caption's CLAP tokens are its audio's (1 or 0) minus the share of the other clips' audio
    they equal; on the first code and on every code. The CLAP here is a table of tokens (the tokens are the input
    of this arithmetic; the pipeline test runs it on the tuned CLAP)."""
    text = {"a": [1, 2], "b": [3, 4], "c": [1, 5]}
    audio = [[1, 2], [3, 0], [1, 5]]  # clip k's tokens, for its first window

    class Clap:  # the token system's CLAP as token_match reads it
        sample_rate = 100

        def text_tokens(self, captions):
            return np.array([text[c] for c in captions])

        def audio_tokens(self, clip):
            return np.array([audio[int(clip[0])]] * 3)  # one row per window

    system = type("System", (), {"clap": Clap()})()
    clips = [np.full(100, k, np.float32) for k in range(3)]
    out = token_match(system, clips, ["a", "b", "c"], 100)
    # first code: a 1 - (0 + 1) / 2, b 1 - 0, c 1 - (1 + 0) / 2; every code: a 1 - 0, b 0 - 0, c 1 - 0
    assert out["first_level"]["value"] == pytest.approx(2 / 3) and out["first_level"]["n"] == 3
    assert out["first_level"]["noise"] == pytest.approx(np.std([0.5, 1, 0.5], ddof=1) / np.sqrt(3))
    assert out["all_levels"]["value"] == pytest.approx(2 / 3)
    assert out["all_levels"]["noise"] == pytest.approx(np.std([1, 0, 1], ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError, match="at least 2"):
        token_match(system, clips[:1], ["a"], 100)


def test_the_genre_shift_compares_the_sets_prompt_by_prompt_and_says_which_way_it_went():
    """The seed's experiment from an evaluation of final and shifted (final fine-tuned on one genre) on prompts
    outside the genre: what the fine-tuning did to prompt alignment, and what guidance does about it."""
    def row(prompt, model_set, mean):
        return {"prompt": prompt, "model_set": model_set, "best_score": "", "random_score": "", "mean_score": mean}

    rows = [row("a", "final", "0.30"), row("b", "final", "0.40"), row("c", "final", "0.50"),
            row("a", "shifted", "0.10"), row("b", "shifted", "0.21"), row("c", "shifted", "0.29"),
            row("a", "final@g3", "0.35"), row("b", "final@g3", "0.45"), row("c", "final@g3", "0.55"),
            row("a", "shifted@g3", "0.30"), row("b", "shifted@g3", ""), row("c", "shifted@g3", "0.52")]
    out = genre_shift(rows, "final", "shifted", lambda name: f"{name}@g3")
    assert out["alignment_change"]["value"] == pytest.approx(-0.2) and out["alignment_change"]["n"] == 3
    assert out["lower_on"] == {"prompts": 3, "of": 3}
    assert out["recovered_by_guidance"]["value"] == pytest.approx(0.01) and out["recovered_by_guidance"]["n"] == 2
    assert out["alignment_change_guided"]["value"] == pytest.approx(-0.04)  # (-0.05 - 0.03) / 2
    assert out["guidance_on_shifted"]["value"] == pytest.approx(0.215)  # (0.20 + 0.23) / 2: b failed guided
    assert out["guidance_on_final"]["value"] == pytest.approx(0.05) and out["guidance_on_final"]["noise"] < 1e-9
    assert out["mean_score/shifted"]["value"] == pytest.approx(0.2) and out["mean_score/shifted@g3"]["n"] == 2
    lines = summary_lines(out)
    assert "  alignment_change: -0.2000 ± 0.0058 (n 3; clearly negative)" in lines
    assert any(line.startswith("  recovered_by_guidance: +0.0100") and "not beyond its noise" in line
               for line in lines)
    # a difference in the last digits is shown in them, not as +0.0000 beside its verdict
    tiny = summary_lines({"best_of_n_vs_random": estimate([3e-5, 2e-5, 4e-5, 3e-5])})
    assert tiny == ["  best_of_n_vs_random: +3.0e-05 ± 4.1e-06 (n 4; clearly positive)"], tiny
    unguided = genre_shift(rows, "final", "shifted")
    assert set(unguided) == {"alignment_change", "lower_on", "mean_score/final", "mean_score/shifted"}


def test_conditioning_gains_per_batch_average_to_the_training_loops_figures(tiny_model_set, token_dataset_dir):
    """The block's per-batch gains of a checkpoint are the validation's own: their mean is the loop's
    label-weighted valid/conditioning_gain and valid/null_condition_gain over the same rows and crops; and so are
    its per-example gains over each window's opening."""
    from musiclm.data.shards import CropSpec, open_manifest, split_files
    from musiclm.train.checkpoint import load_stage
    from musiclm.train.data import HeldRows, _table
    from musiclm.train.loop import validation_pass

    stage = "semantic"
    gains = conditioning_gains(tiny_model_set / stage, token_dataset_dir, stage, batch_size=1)
    model, info = load_stage(tiny_model_set / stage)
    spec = CropSpec.make(stage, info.model.global_cfg, open_manifest(token_dataset_dir))
    held = HeldRows(_table(split_files(token_dataset_dir, "valid"), stage), spec, seed=0, fixed=True)
    batches, counted = held.lockstep_batches(0, 1, 1)  # the fixture's dataset holds two valid rows
    with torch.no_grad():
        _, sums, _ = validation_pass(model.eval(), model, batches, torch.device("cpu"), counted)
    loop = sums.reduce("cpu")
    assert gains["conditioning_gain"]["n"] == len(batches) >= 2
    assert gains["conditioning_gain"]["value"] == pytest.approx(loop["valid/conditioning_gain"], abs=1e-5)
    assert gains["null_condition_gain"]["value"] == pytest.approx(loop["valid/null_condition_gain"], abs=1e-5)
    assert gains["conditioning_gain"]["value"] != 0 and gains["conditioning_gain"]["noise"] > 0
    # the openings: one gain per example, averaging to the loop's example-weighted figures
    examples = sum(len(b["id"]) for b, c in zip(batches, counted) if c)
    for name in ("conditioning_gain", "null_condition_gain"):
        assert gains[f"{name}_opening"]["n"] == examples
        assert gains[f"{name}_opening"]["value"] == pytest.approx(loop[f"valid/{name}_opening"], abs=1e-5)
    assert gains["conditioning_gain_opening"]["value"] != gains["conditioning_gain"]["value"]
