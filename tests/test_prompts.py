"""Audio prompts and continuation: an audio prompt's tokens are preprocessing's for the same clip; a continuation
keeps the clip's tokens bit for bit as every stage's prefix and adds exactly the asked length after it."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator, sample_windows
from musiclm.generation.prompts import MusicPrompt, clip_tokens, read_music_prompts


def _dataset_rows(dataset) -> list[dict]:
    from musiclm.data.shards import split_files

    return [r for split in ("train", "valid") for f in split_files(dataset, split)
            for r in pq.read_table(f).to_pylist()]


def test_an_audio_prompts_tokens_are_those_preprocessing_gives_the_clip(tiny_system, token_dataset_dir):
    """Every token of a corpus track as an audio prompt (CLAP windows, semantic, coarse, fine) equals the token
    dataset's row of that track, which preprocessing made in its own pass (decode, cut, pad, resample, tokenize)."""
    rows = _dataset_rows(token_dataset_dir)
    assert len(rows) >= 2
    shapes = {"clap": 12, "semantic": 1, "coarse": 3, "fine": 5}
    for row in rows[:2]:
        clip = clip_tokens(tiny_system, row["path"], continuation=False)
        for name, q in shapes.items():
            ours = np.asarray(clip.tokens[name]).reshape(-1, q)
            theirs = np.asarray(row[name], dtype=np.int64).reshape(-1, q)
            assert np.array_equal(ours, theirs), (row["path"], name)


def test_a_continuation_keeps_the_clips_tokens_and_adds_the_asked_length(tiny_model_set, corpus, tmp_path):
    """A 3 s clip continued by 8 s (11 s: past the semantic window, so sliding windows run): every stage's tokens
    begin with the clip's own, bit for bit; the audio is the clip and its continuation (11 s) or the
    continuation alone (8 s); its report names the clip. An audio prompt conditions on the clip's first CLAP
    window and ranks candidates by audio similarity to it."""
    from musiclm.audio.io import decode_audio, write_wav

    audio, rate = decode_audio(sorted(corpus.rglob("*.mp3"))[0])
    clip = tmp_path / "clip.wav"
    write_wav(clip, audio[: int(3.5 * rate)], rate)  # 3.5 s: its 3 whole seconds are the prefix
    gen = MusicGenerator(ModelSet.from_dir(tiny_model_set), "cpu")
    given = clip_tokens(gen.system, str(clip), continuation=True)
    assert given.seconds == 3 and given.tokens["coarse"].shape == (225, 3) and given.tokens["semantic"].shape == (149,)
    settings = GenerateSettings(duration=8.0, num_samples=2, seed=1)
    clap, _, _ = gen.condition(MusicPrompt(text="calm piano"))
    codes, _ = gen.tokens(clap.expand(2, -1), settings, torch.Generator().manual_seed(0), given=given)
    assert codes.shape == (2, 11 * 75, 8)
    for row in codes:
        assert torch.equal(row[:225, :3], torch.as_tensor(given.tokens["coarse"].astype(np.int64)))
        assert torch.equal(row[:225, 3:], torch.as_tensor(given.tokens["fine"].astype(np.int64)))
    assert not torch.equal(codes[0, 225:], codes[1, 225:])  # two candidates, two continuations
    # the semantic stage's own windows: the given tokens stay, the rest is sampled after them
    windows = gen.plan(settings, 225)["semantic"]
    assert len(windows) > 1 and windows[-1][1] == 11 * 50 - 1
    prefix = torch.as_tensor(given.tokens["semantic"].astype(np.int64))[None]
    semantic = sample_windows(gen.models["semantic"], windows, lambda s, e: [clap], temperature=1.0, top_fraction=0.1,
                              generator=torch.Generator().manual_seed(0), given=prefix)
    assert semantic.shape == (1, 549) and torch.equal(semantic[:, :149], prefix)

    settings = GenerateSettings(duration=8.0, num_samples=1, seed=1)
    both = gen.generate(MusicPrompt(text="calm piano", continues=str(clip)), settings)
    alone = gen.generate(MusicPrompt(text="calm piano", continues=str(clip)),
                         dataclasses.replace(settings, continuation_only=True))
    assert both.audio.shape == (1, 11 * 24_000) and alone.audio.shape == (1, 8 * 24_000)
    np.testing.assert_array_equal(both.audio[:, 3 * 24_000:], alone.audio)  # the same draw, cut after the clip
    report = gen.write(both, settings, tmp_path / "out")
    assert report["prompt"] == "calm piano [continues clip.wav]" and report["continued_seconds"] == 3
    assert report["prompt_spec"] == {"text": "calm piano", "continues": str(clip)}
    assert sf.info(report["files"][0]).frames == 11 * 24_000

    heard = gen.generate(MusicPrompt(audio=str(clip)), GenerateSettings(duration=2.0, num_samples=2, seed=1))
    expected = clip_tokens(gen.system, str(clip), continuation=False).tokens["clap"][:1]
    assert torch.equal(gen.condition(MusicPrompt(audio=str(clip)))[0].cpu(), torch.as_tensor(expected))
    from musiclm.generation.generate import audio_embedding

    reference = audio_embedding(gen.system, *decode_audio(str(clip)))
    for candidate, score in zip(heard.audio, heard.scores):
        assert score == pytest.approx(float(audio_embedding(gen.system, candidate, 24_000) @ reference), abs=1e-5)
    assert heard.prompt == "[audio prompt clip.wav]"


def test_prompt_files_hold_audio_prompts_and_continuations_and_bad_ones_are_named(tmp_path, tiny_model_set, corpus,
                                                                                   monkeypatch):
    """A JSON prompt file mixes texts and objects (clip paths relative to the file); the Ray prompt worker generates
    each as its own kind; an entry that is neither is refused naming its index."""
    from musiclm.audio.io import decode_audio, write_wav
    from musiclm.generation.batch import PromptWorker

    audio, rate = decode_audio(sorted(corpus.rglob("*.mp3"))[1])
    write_wav(tmp_path / "clip.wav", audio[: 2 * rate], rate)
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a waltz", {"audio": "clip.wav"}, {"text": "a march", "continues": "clip.wav"}]))
    prompts = read_music_prompts(str(path))
    assert prompts == [MusicPrompt("a waltz"), MusicPrompt(audio=str(tmp_path / "clip.wav")),
                       MusicPrompt("a march", continues=str(tmp_path / "clip.wav"))]
    settings = GenerateSettings(duration=1.0, num_samples=1)
    # the worker sets its process's torch threads: keep the suite's (other thread counts round other tokens in the
    # tests that compare tokenizations after this one)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    worker = PromptWorker({"set": ModelSet.from_dir(tiny_model_set)}, {"set": dataclasses.asdict(settings)}, "cpu", 1)
    folders = [str(tmp_path / f"p{i}") for i in range(3)]
    out = worker({"model_set": ["set"] * 3, "prompt": [p.label for p in prompts],
                  "spec": [p.encode() for p in prompts], "index": [0, 1, 2], "folder": folders})
    assert list(out["error"]) == ["", "", ""]
    reports = [json.loads((tmp_path / f"p{i}" / "report.json").read_text()) for i in range(3)]
    assert [r["prompt"] for r in reports] == ["a waltz", "[audio prompt clip.wav]", "a march [continues clip.wav]"]
    assert sf.info(reports[2]["files"][0]).frames == 3 * 24_000  # 2 s clip + 1 s
    for bad, match in (([{"text": "x", "sound": "y"}], "entry 0"), ([{"text": "x", "audio": "clip.wav"}], "not both"),
                       ([3], "entry 0")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            read_music_prompts(str(path))
