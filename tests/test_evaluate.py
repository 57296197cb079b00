"""Evaluation of two model sets on a prompt file, on a local Ray (Ray Data actor pool): table, plot, reruns."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import train_tiny_stage


MUSICCAPS_HEADER = "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset," \
                   "is_audioset_eval"  # musiccaps-public.csv (Agostinelli et al. 2023), first line


def test_prompt_sets_from_text_json_and_a_musiccaps_csv(tmp_path):
    from musiclm.evaluation.evaluate import Prompt, read_prompt_set

    (tmp_path / "p.txt").write_text("# comment\nslow ambient pads\n\n fast techno beat \n")
    (tmp_path / "p.json").write_text('["slow ambient pads", "fast techno beat"]')
    (tmp_path / "caps.csv").write_text(
        MUSICCAPS_HEADER + "\n"
        "-0Gj8-vB1q4,30,40,\"/m/0140xf,/m/02cjck\",\"['low quality', 'sustained strings']\","
        "\"The low quality recording features a \"\"ballad\"\" song, with strings.\nIt sounds sad.\",4,False,True\n"
        "-0SdAVK79lg,30,40,/m/0155w,\"['guitar']\",A guitar plays.,0,False,False\n")
    expected = [Prompt("slow ambient pads"), Prompt("fast techno beat")]
    assert read_prompt_set(str(tmp_path / "p.txt")) == expected == read_prompt_set(str(tmp_path / "p.json"))
    caps = read_prompt_set(str(tmp_path / "caps.csv"))
    assert caps == [Prompt('The low quality recording features a "ballad" song, with strings.\nIt sounds sad.',
                           "-0Gj8-vB1q4", 30.0, 40.0), Prompt("A guitar plays.", "-0SdAVK79lg", 30.0, 40.0)]
    (tmp_path / "bad.csv").write_text("ytid,text\nx,y\n")
    with pytest.raises(ValueError, match="caption"):
        read_prompt_set(str(tmp_path / "bad.csv"))


@pytest.fixture
def second_model_set(tiny_model_set, token_dataset_dir, tmp_path):
    """Another set: its own semantic stage (another seed), the first set's coarse and fine stages."""
    from musiclm.tokens.system import read_meta

    root = tmp_path / "set_b"
    fingerprint = read_meta(tiny_model_set / "token_system")[0]["fingerprint"]
    train_tiny_stage("semantic", token_dataset_dir, fingerprint, root / "semantic", steps=4, seed=1)
    for name in ("coarse", "fine", "token_system"):
        (root / name).symlink_to((tiny_model_set / name).resolve(), target_is_directory=True)
    return root


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_evaluate_two_model_sets_writes_table_plot_and_skips_done_prompts(local_ray, tiny_model_set,
                                                                          second_model_set, tmp_path, capsys):
    from jobs.evaluate import main as evaluate

    from musiclm.audio import synth
    from musiclm.audio.io import write_wav

    prompts = tmp_path / "musiccaps.csv"  # MusicCaps' layout, its reference clips named by ytid
    prompts.write_text(MUSICCAPS_HEADER + "\n"
                       "abc123,30,40,/m/0,\"['ambient']\",\"slow ambient pads, warm and calm\",1,False,True\n"
                       "xyz789,0,10,/m/1,\"['techno']\",fast techno beat,2,True,False\n")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, ytid in enumerate(("abc123", "xyz789", "unused")):
        write_wav(reference / f"{ytid}.wav", synth.render(synth.sample_params(i, 0, 2.0), 24_000), 24_000)
    out = tmp_path / "eval"
    argv = ["--prompts", str(prompts), "--models", f"base={tiny_model_set},other={second_model_set}",
            "--num-samples", "2", "--duration", "1", "--out", str(out), "--reference-audio", str(reference)]
    evaluate(argv)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["prompt_index"], r["model_set"]) for r in rows] == [("0", "base"), ("1", "base"), ("0", "other"),
                                                                    ("1", "other")]
    from musiclm.audio.io import decode_audio
    from musiclm.generation.generate import clap_scores
    from musiclm.tokens.system import TokenSystem

    system = TokenSystem.load(tiny_model_set / "token_system", "cpu")
    for r in rows:
        assert r["error"] == "" and len(list((out / r["model_set"]).glob("*/sample_1.wav"))) == 2
        # the table's scores are the prompt's report's: the best is the saved clip's, the random one candidate 0's
        report = json.loads(next((out / r["model_set"]).glob(f"{int(r['prompt_index']):03d}-*/report.json")).read_text())
        by_candidate = {c["candidate"]: c["score"] for c in report["candidates"]}
        assert float(r["best_score"]) == pytest.approx(max(by_candidate.values()), abs=1e-4)
        assert float(r["random_score"]) == pytest.approx(by_candidate[0], abs=1e-4)
        assert float(r["mean_score"]) == pytest.approx(sum(by_candidate.values()) / 2, abs=1e-4)
        saved = report["files"][0]
        audio, rate = decode_audio(saved)
        assert clap_scores(system, report["prompt"], audio[None], rate)[0] == pytest.approx(
            float(r["best_score"]), abs=2e-3)  # the saved WAV (16-bit) scores what the table says
    assert (out / "base" / "000-slow-ambient-pads-warm-and-calm" / "sample_1.wav").exists()
    table = (out / "results.md").read_text()
    assert "base best" in table and "base random" in table and "other mean" in table and "fast techno beat" in table
    assert "base: reranking 2 candidates by CLAP raises the score by" in table
    fads = json.loads((out / "fad.json").read_text())
    assert fads["reference_clips"] == 2 and set(fads["sets"]) == {"base", "other"}
    for f in fads["sets"].values():
        for kind in ("fad_clap", "fad_semantic"):
            assert f[kind]["n_generated"] == 2 and f[kind]["fad"] >= 0 and math.isfinite(f[kind]["fad"])
            assert "biased" in f[kind]["warnings"][0]  # 2 clips for 512 / 64 dimensions, and it says so
    # each set's FAD is that of its own saved clips against the prompts' reference clips (not "unused"),
    # recomputed here from the files
    from musiclm.evaluation.quality import clap_embeddings, fad

    def embeddings(paths):
        return np.concatenate([clap_embeddings(system, *decode_audio(str(p), system.clap.sample_rate)).numpy()
                               for p in paths])

    ref = embeddings([reference / "abc123.wav", reference / "xyz789.wav"])
    for name in ("base", "other"):
        gen = embeddings(sorted((out / name).glob("*/sample_1.wav")))
        assert fads["sets"][name]["fad_clap"]["fad"] == pytest.approx(fad(gen, ref)["fad"], rel=1e-4, abs=1e-9)
    assert "FAD against 2 reference clips" in table and "layer 7" in table
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    capsys.readouterr()
    evaluate(argv)  # everything is done: nothing is generated again
    assert capsys.readouterr().out.count("2 prompts, 2 already done") == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_evaluate_sweeps_guidance_scales_as_columns(local_ray, tiny_model_set, token_dataset_dir, tmp_path, capsys):
    """--guidance-scales 1,3: every set sampled at both scales, a column each (the set's own name at 1, NAME@g3 at
    3), with the table's sentence on what guidance buys; the guided column's reports carry its scale. A set whose
    stages never learned the null condition is refused before any generation, naming the checkpoint."""
    from jobs.common import run
    from jobs.evaluate import main as evaluate
    from musiclm.tokens.system import read_meta

    guided = tmp_path / "guided"
    fingerprint = read_meta(tiny_model_set / "token_system")[0]["fingerprint"]
    for stage in ("semantic", "coarse", "fine"):
        train_tiny_stage(stage, token_dataset_dir, fingerprint, guided / stage, steps=4, cond_drop_prob=0.3)
    (guided / "token_system").symlink_to((tiny_model_set / "token_system").resolve(), target_is_directory=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("slow ambient pads\nfast techno beat\n")
    out = tmp_path / "eval"
    argv = ["--prompts", str(prompts), "--models", f"tuned={guided}", "--num-samples", "1", "--duration", "1",
            "--out", str(out), "--guidance-scales", "1,3"]
    evaluate(argv)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["model_set"], r["error"]) for r in rows] == [("tuned", ""), ("tuned", ""), ("tuned@g3", ""),
                                                              ("tuned@g3", "")]
    for column, g in (("tuned", 1.0), ("tuned@g3", 3.0)):
        for report in (out / column).glob("*/report.json"):
            settings = json.loads(report.read_text())["settings"]
            assert (settings["semantic_guidance"], settings["coarse_guidance"], settings["fine_guidance"]) == (g, g, g)
    table = (out / "results.md").read_text()
    assert "tuned@g3 best" in table and "tuned@g3: guidance 3 changes the best-of-1 score by" in table
    assert "tuned@g3 scores" in table or "score the same" in table
    # a set of stages trained without conditioning dropout cannot be guided: refused by name, nothing generated
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run(lambda: evaluate(["--prompts", str(prompts), "--models", f"plain={tiny_model_set}", "--num-samples", "1",
                              "--duration", "1", "--out", str(tmp_path / "plain"), "--guidance-scales", "1,3"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "never learned the null condition" in err and "cond_drop_prob" in err
    assert not (tmp_path / "plain" / "plain").exists()


def test_a_musiccaps_reference_longer_than_its_segment_is_cut_to_start_s_end_s(tmp_path):
    """MusicCaps' reference files may be a whole video's audio: the [start_s, end_s] segment is what the caption
    describes. A file no longer than the segment (plus a second) is taken whole."""
    import numpy as np

    from musiclm.audio.io import write_wav
    from musiclm.evaluation.evaluate import Prompt, _load_clip

    rate = 8_000
    t = np.arange(50 * rate) / rate
    audio = np.where((t >= 30) & (t < 40), 0.5, 0.1) * np.sin(2 * np.pi * 440 * t)  # louder in [30, 40)
    write_wav(tmp_path / "long.wav", audio.astype(np.float32), rate)
    cut = _load_clip(str(tmp_path / "long.wav"), rate, Prompt("x", "long", 30.0, 40.0))
    assert len(cut) == 10 * rate
    assert np.abs(cut).max() == pytest.approx(0.5, abs=1e-3) and np.abs(cut[: rate]).max() > 0.45
    write_wav(tmp_path / "short.wav", audio[: 10 * rate].astype(np.float32), rate)
    assert len(_load_clip(str(tmp_path / "short.wav"), rate, Prompt("x", "short", 30.0, 40.0))) == 10 * rate


def test_the_comparison_sentence_counts_only_differences_beyond_the_tables_precision():
    """The demo's random CLAP scores every clip 0.0710: the report said early scored higher than final on 3 of 3."""
    from musiclm.evaluation.evaluate import compare_sentence

    equal = [(0.07102, 0.07100), (0.07101, 0.07104), (0.0710, 0.0710)]
    assert compare_sentence("early", "final", 2, equal) == \
        "early and final (best of 2) score the same (within 0.0005) on all 3 prompts."
    mixed = [(0.30, 0.20), (0.10, 0.25), (0.2001, 0.2)]
    assert compare_sentence("a", "b", 4, mixed) == \
        "a scores higher than b (best of 4) on 1 of 3 prompts, lower on 1, the same (within 0.0005) on 1."
