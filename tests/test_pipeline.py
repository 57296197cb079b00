"""`make demo`'s pipeline, end to end on a local Ray (shortened), then again: every step skipped."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def test_the_quantizers_are_sized_to_the_synthetic_corpus_and_a_users_keep_the_presets():
    """The demo's 64 x 12 s corpus: 38,400 semantic frames give 512 k-means clusters (at least 64 frames each) and
    its 192 CLAP windows (3 per track at a 1 s hop) 16 RVQ codes a level (at least 8 windows each); with the
    preset's 1024 codes every train track had a first code of its own. A --source corpus keeps the preset's sizes."""
    from musiclm.config import model_preset
    from musiclm.pipeline import PipelineSettings

    cfg = model_preset("tiny")
    demo = PipelineSettings()
    assert (demo.num_tracks, demo.seconds) == (64, 12.0)
    assert demo.clusters(cfg.hubert_kmeans_cfg) == 512 and demo.codes(cfg.clap_rvq_cfg) == 16
    assert PipelineSettings(num_tracks=8).codes(cfg.clap_rvq_cfg) == 2  # the pipeline test's corpus
    assert PipelineSettings(clap_codes=64).codes(cfg.clap_rvq_cfg) == 64
    user = PipelineSettings(source="/data/fma")
    assert user.clusters(cfg.hubert_kmeans_cfg) == user.codes(cfg.clap_rvq_cfg) == 1024
    # the CLAP RVQ's levels, the CLAP tokens the token system makes and every stage is conditioned on: 3 for the
    # synthetic corpus (12 levels of 16 codes made each train track a condition of its own), the preset's for a user's
    from musiclm.pipeline import Pipeline

    assert demo.levels(cfg.clap_rvq_cfg) == 3 and user.levels(cfg.clap_rvq_cfg) == 12
    # the stages' CLAP tokens: the captions' for the synthetic corpus (its tiny CLAP does not place a caption where
    # its audio is, so stages trained on audio tokens were prompted with tokens they never saw), MusicLM's audio
    # tokens for a user's corpus
    assert (demo.tokens_from(), user.tokens_from(), PipelineSettings(clap_from="audio").tokens_from()) == (
        "caption", "audio", "audio")
    assert PipelineSettings(clap_levels=6).levels(cfg.clap_rvq_cfg) == 6
    three = Pipeline(demo, {"CPU": 2})
    assert three._model_config().token_system().clap_rvq_cfg.rq_num_quantizers == 3
    assert three._train_config("coarse").model.clap_rvq_cfg.rq_num_quantizers == 3
    assert Pipeline(user, {"CPU": 2})._train_config("fine").model.clap_rvq_cfg.rq_num_quantizers == 12
    # the tiny EnCodec's codes per codebook (--codec-codes), the coarse and fine stages' vocabulary: the preset's
    # 1024 unless given; 64 at the bandwidth that keeps the stages' 3 + 5 codebooks (6 bits at 75 Hz: 3.6 kbps),
    # which the built codec accepts and encodes at; a pretrained EnCodec refuses another size
    from musiclm.config import ConfigError
    from musiclm.tokens import encoders
    from musiclm.tokens.acoustic import AcousticCodec

    assert three._model_config().encodec_cfg == cfg.encodec_cfg and cfg.encodec_cfg.codebook_size == 1024
    small = Pipeline(PipelineSettings(codec_codes=64), {"CPU": 2})
    enc = small._model_config().token_system().encodec_cfg
    assert (enc.codebook_size, enc.bandwidth) == (64, 3.6)
    assert small._train_config("fine").model.encodec_cfg == small._train_config("coarse").model.encodec_cfg == enc
    codec = AcousticCodec(encoders.build_tiny_encodec(0, enc.bandwidth, enc.codebook_size, 2, 1.0), enc)
    codes = codec.encode(np.sin(np.arange(24000) / 7).astype(np.float32))
    assert codes.shape == (75, 8) and 0 <= codes.min() and codes.max() < 64
    assert Pipeline(PipelineSettings(codec_codes=256), {"CPU": 2})._model_config().encodec_cfg.bandwidth == 4.8
    assert PipelineSettings(preset="small").acoustic_codes(model_preset("small").encodec_cfg) == 1024
    with pytest.raises(ConfigError, match="--codec-codes"):
        Pipeline(PipelineSettings(preset="small", codec_codes=64), {"CPU": 2})._model_config()


def test_a_finished_token_dataset_of_the_other_clap_tokens_is_refused_by_name(tmp_path):
    """A demo folder tokenized with audio CLAP tokens (the synthetic corpus's default before caption tokens) is
    neither trained on as if it were the captions' nor overwritten: the run stops and says how to go on."""
    from musiclm.config import ConfigError
    from musiclm.pipeline import Pipeline, PipelineSettings

    (tmp_path / "token_system").mkdir()
    (tmp_path / "token_system" / "token_system.json").write_text(json.dumps({"fingerprint": "f"}))
    (tmp_path / "tokens").mkdir()
    manifest = {"status": "complete", "fingerprint": "f", "tokens": {"clap": {"codebooks": 3}}}  # no "from": audio
    (tmp_path / "tokens" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="made from audio.*--clap-from audio to go on with it, or another --workdir"):
        Pipeline(PipelineSettings(workdir=str(tmp_path)), {"CPU": 2})._dataset_done()
    assert Pipeline(PipelineSettings(workdir=str(tmp_path), clap_from="audio"), {"CPU": 2})._dataset_done()
    manifest["tokens"]["clap"]["from"] = "caption"
    (tmp_path / "tokens" / "manifest.json").write_text(json.dumps(manifest))
    assert Pipeline(PipelineSettings(workdir=str(tmp_path)), {"CPU": 2})._dataset_done()
    assert (tmp_path / "tokens" / "manifest.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_demo_pipeline_runs_end_to_end_and_a_second_run_skips_every_step(local_ray, tmp_path, capsys):
    from jobs.pipeline import main as pipeline

    work = tmp_path / "demo"
    # `make demo` runs the defaults (8.5 min here); every step is the same code with fewer tracks, steps and
    # seconds, which is what this test checks: that each step runs, hands on to the next, and is skipped after.
    argv = ["--workdir", str(work), "--num-tracks", "8", "--rvq-steps", "50", "--codec-steps", "20",
            "--clap-steps", "10", "--train-steps", "10", "--semantic-steps", "12", "--num-workers", "1",
            "--duration", "2", "--eval-duration", "1", "--num-samples", "2"]
    # the first run as `make demo` runs it: its own process and Ray, every worker's output reaching the terminal
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "jobs.pipeline", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    first = done.stdout + done.stderr
    assert done.returncode == 0, first[-3000:]
    # what the demo prints is its own: no library FutureWarning, no Ray Train bookkeeping (eight lines per worker
    # group), no line twice (the chance banner's frame aside), and the chance alarm only for a stage that ends at
    # chance (these 10-step runs: the demo's 60 and 150 steps end below chance and raise none)
    # as a terminal shows it: worker lines carry Ray's "(RayTrainWorker pid=N) " prefix, in colour
    lines = [re.sub(r"^\(\w+ pid=\d+\) ", "", re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in first.splitlines()]
    lines = [line for line in lines if line.strip() and not line.startswith("!!!!")]
    assert "FutureWarning" not in first and "Requesting resources" not in first, first
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    summary = json.loads((work / "pipeline.json").read_text())
    alarmed = {line.split()[1] for line in lines if line.startswith("WARNING: ") and "at chance level" in line}
    assert alarmed <= {stage for stage, r in summary["stages"].items() if r["at_chance"]}, (alarmed, summary["stages"])
    assert first.count(": finished in ") == len(summary["steps"]) == 13  # every step ran
    for wav in summary["wavs"]:
        info = sf.info(wav)
        assert info.samplerate == 24000 and info.frames == 2 * 24000
    # fit-codec trained the random tiny EnCodec on the corpus (re-initialized from it first: its latents hardly move
    # in time) before anything was tokenized with it: its reconstruction of the held-out tracks' audio through codes
    # is far closer than the random codec's (log-mel L1), and its codebooks stay in use: 2 held-out tracks give 608
    # frames, at most 59 % of a codebook; collapsed (trained without re-initializing), a codebook keeps 0.2-0.5 %
    codec = json.loads((work / "token_system" / "fit_codec.report.json").read_text())
    untrained, trained = codec["reconstruction"]["untrained"], codec["reconstruction"]["trained"]
    assert codec["init"]["reinitialized"] and codec["steps"] == 20 and codec["tracks"] == {"train": 6, "valid": 2}
    assert trained["valid/log_mel_distance"] <= untrained["valid/log_mel_distance"] - 1.0, (untrained, trained)
    assert trained["valid/codes_used"] >= 0.05 and trained["valid/codes_used_min"] >= 0.01, trained
    assert json.loads((work / "token_system" / "token_system.json").read_text())["history"][0]["kind"] == "encodec"
    # the RVQ and the k-means were fitted in one pass on the pipeline's Ray (each track decoded once, one actor
    # encoding it for both): every frame of the 8 tracks (12 s at 50 Hz, fewer than --frames-per-track) went into
    # the k-means, sized to them (64 clusters) and using all of its clusters; the RVQ got every track's CLAP windows
    km = json.loads((work / "token_system" / "fit_kmeans.report.json").read_text())
    rvq = json.loads((work / "token_system" / "fit_rvq.report.json").read_text())
    assert km["tracks"] == km["sample"]["sampled"] == rvq["tracks"] == 8 and not km["failed"] and not rvq["failed"]
    from musiclm.tokens.system import TokenSystem

    clap = TokenSystem.load(work / "token_system").clap
    windows = len(clap.windows(np.zeros(round(rvq["seconds_of_audio"] / 8 * clap.sample_rate), np.float32)))
    assert km["frames"] > 4000 and rvq["embeddings"] == 8 * windows > 8
    assert km["clusters_used"] == 64 and km["fingerprint"] == json.loads(
        (work / "token_system" / "token_system.json").read_text())["fingerprint"]
    # fit-clap tuned the random CLAP on the corpus' captions before the RVQ was fitted on it (its fingerprint is the
    # one the RVQ fit saw); the stages learned the null condition, which guidance (3 by default) needs
    clap = json.loads((work / "token_system" / "fit_clap.report.json").read_text())
    assert clap["steps"] == 10 and len(clap["held_out"]) == clap["tracks"]["valid"] == 2
    assert [h["kind"] for h in json.loads((work / "token_system" / "token_system.json").read_text())["history"]] == [
        "encodec", "clap"]
    report = json.loads((work / "generate" / "report.json").read_text())
    assert report["checkpoints"]["fine"]["step"] == 10 and report["settings"]["coarse_guidance"] == 3
    assert report["checkpoints"]["semantic"]["step"] == 12  # --semantic-steps
    # the evaluation generated the held-out tracks' captions with each set, unguided and guided
    from musiclm.evaluation.evaluate import dataset_prompts

    held_out = [p.caption for p in dataset_prompts(str(work / "tokens"))]
    table = (work / "evaluate" / "results.md").read_text()
    assert all(f"{name} best" in table for name in ("early", "final", "early@g3", "final@g3"))
    assert all(caption in table for caption in held_out)
    # the prompt-following block, each difference with its noise over its items: the CLAP judge on fit-clap's
    # held-out clips, reranking and guidance over the evaluation's prompts, each stage's gains over its valid batches
    block = summary["prompt_following"]
    assert block == json.loads((work / "prompt_following.json").read_text())
    assert block["held_out_tracks"] == 2 and block["prompts"] == len(held_out) and block["guidance"] == 3
    counts = {"clap_caption_match": 2, "generated_caption_match": len(held_out), "best_of_n_vs_random": len(held_out),
              "guidance_vs_unguided": len(held_out), "generated_caption_match_unguided": len(held_out)}
    assert set(counts) <= set(block), block
    for name, e in block.items():
        if isinstance(e, dict):
            assert set(e) == {"value", "noise", "n", "clear"} and e["value"] is not None, (name, e)
            assert e["n"] == counts.get(name, e["n"]) >= 2 and e["noise"] >= 0, (name, e)
    assert {n.split("/")[1] for n in block if "/" in n} == {"semantic", "coarse", "fine"}
    # the stages' CLAP tokens are the captions' (the synthetic corpus's default: prompted, they get the kind they
    # trained on), so the block leaves out whether a caption's tokens are its audio's
    from musiclm.data.shards import open_manifest

    assert open_manifest(work / "tokens")["tokens"]["clap"]["from"] == "caption"
    # the generated clips' match is over every candidate of each prompt (the evaluation keeps them all; the demo's
    # generate keeps its best), not the best alone: reranking picked that by the same score. Guided, as generate
    # makes the demo's WAV, and unguided
    import csv

    from musiclm.audio.io import decode_audio
    from musiclm.evaluation.prompt_following import caption_match

    system = TokenSystem.load(work / "token_system")
    rate = system.clap.sample_rate
    with (work / "evaluate" / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for name, column in (("generated_caption_match", "final@g3"), ("generated_caption_match_unguided", "final")):
        done = [r for r in rows if r["model_set"] == column]
        files = [json.loads((Path(r["best_file"]).parent / "report.json").read_text())["files"] for r in done]
        assert [len(f) for f in files] == [2] * len(held_out) and len(summary["wavs"]) == 1
        every = caption_match(system, [[decode_audio(f, rate)[0] for f in group] for group in files],
                              [r["prompt"] for r in done], rate)
        assert block[name]["value"] == pytest.approx(every["value"], abs=1e-6), name
    assert "prompt following (2 held-out tracks' clips" in first and "clap_caption_match: " in first
    assert (work / "evaluate" / "scores.png").exists()
    assert "generated: " in first and "tensorboard --logdir" in first
    # `musiclm train` by hand on the demo's dataset (its k-means is sized to the corpus: 128 codes for the demo's,
    # 64 here; the preset has 1024) takes the dataset's token layout: no --set needed
    from jobs.common import stage_args_config
    from jobs.train import parser
    from musiclm.train.run import check_token_layout

    tokens = work / "tokens"
    cfg, _ = stage_args_config(parser().parse_args(["--stage", "coarse", "--data", str(tokens), "--run-name", "x"]))
    check_token_layout(cfg, open_manifest(tokens), str(tokens))
    assert cfg.model.hubert_kmeans_cfg.codebook_size == open_manifest(tokens)["tokens"]["semantic"]["codebook_size"] \
        < 1024
    # the CLAP RVQ is sized to the corpus too (8 tracks x 3 CLAP windows: 2 codes a level, not 1024, with which
    # every train track had a first code of its own)
    assert cfg.model.clap_rvq_cfg.codebook_size == open_manifest(tokens)["tokens"]["clap"]["codebook_size"] == 2
    # --shift-genre (the seed's experiment; run on the demo's corpus in benchmarks/RESULTS.md) fine-tunes on the
    # corpus' tracks of a genre by FMA metadata's genres_all (Electronic takes in Ambient, its sub-genre) and
    # prompts with the held-out captions outside it; a genre the corpus lacks is refused by name
    from musiclm.audio import synth
    from musiclm.config import ConfigError
    from musiclm.pipeline import Pipeline, PipelineSettings

    shift = Pipeline(PipelineSettings(workdir=str(work), num_tracks=8, shift_genre="electronic"), {"CPU": 2})
    genre = shift._genre_source()
    inside = {t.id: Path(t.path).resolve() for t in genre.tracks}
    assert set(inside) == {f"{i:06d}" for i in range(1, 9)
                           if synth.sample_params(i, 0, 12.0).genre in ("Electronic", "Ambient")}
    assert 0 < len(inside) < 8 and shift._shift_dir() == work / "shift-electronic"
    outside = [p.caption for p in dataset_prompts(str(tokens)) if Path(p.audio).resolve() not in inside.values()]
    if len(outside) >= 2:
        assert shift._shift_prompts(genre) == outside
    else:
        with pytest.raises(ConfigError, match="outside the genre to prompt with"):
            shift._shift_prompts(genre)
    with pytest.raises(ConfigError, match="--shift-genre 'Polka': genre 'Polka' is not in genres.csv"):
        Pipeline(PipelineSettings(workdir=str(work), num_tracks=8, shift_genre="Polka"), {"CPU": 2})._genre_source()

    pipeline(argv)
    second = capsys.readouterr().out
    assert second.count("done already, skipped") == len(summary["steps"]) and ": finished in " not in second

