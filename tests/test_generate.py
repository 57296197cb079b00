"""Text-to-music generation with tiny stages trained in the session: files, scores, seeds, long outputs and
refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from jobs import generate as generate_job
from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator, slide
from musiclm.generation.prompts import MusicPrompt
from musiclm.train.checkpoint import CheckpointError


def independent_clap_score(system_dir, prompt: str, wav_path) -> float:
    """CLAP cosine similarity straight from transformers: the file's audio at 48 kHz, quantized to int16 as
    laion_clap's get_audio_embedding_from_data does, one repeat-padded window."""
    import soxr
    from transformers import ClapModel, ClapProcessor

    model = ClapModel.from_pretrained(system_dir / "encoders" / "clap").eval()
    processor = ClapProcessor.from_pretrained(system_dir / "encoders" / "clap")
    audio, rate = sf.read(wav_path, dtype="float32")
    audio = soxr.resample(audio, rate, 48000)
    audio = (np.clip(audio, -1, 1) * np.float32(32767)).astype(np.int16) / np.float32(32767)
    with torch.no_grad():
        feats = processor.feature_extractor(audio, sampling_rate=48000, padding="repeatpad", return_tensors="pt")
        a = model.get_audio_features(input_features=feats["input_features"],
                                     is_longer=torch.zeros(1, 1, dtype=torch.bool))
        text = processor.tokenizer([prompt], return_tensors="pt")
        t = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    a = getattr(a, "pooler_output", a)
    t = getattr(t, "pooler_output", t)
    return float(torch.nn.functional.cosine_similarity(a, t).item())


def test_generate_writes_the_top_k_with_sorted_scores_equal_to_clap(tiny_model_set, tiny_system_dir, tmp_path):
    out = tmp_path / "out"
    prompt = "a calm piano melody"
    generate_job.main([prompt, "--models", str(tiny_model_set), "--duration", "3", "--num-samples", "3",
                       "--top", "2", "--seed", "1", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["prompt"] == prompt and report["seed"] == 1
    assert report["scores"] == sorted(report["scores"], reverse=True) and len(report["scores"]) == 3
    assert sorted(c["candidate"] for c in report["candidates"]) == [0, 1, 2]
    assert set(report["checkpoints"]) == {"semantic", "coarse", "fine"}
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["sample_1.wav", "sample_2.wav"]
    for rank, wav in enumerate(wavs):
        info = sf.info(wav)
        assert info.samplerate == 24000 and info.frames == 3 * 24000
        assert independent_clap_score(tiny_system_dir, prompt, wav) == pytest.approx(report["scores"][rank], abs=1e-5)


def _audio(generator, settings):
    return generator.generate("drums and bass", settings).audio


def test_same_seed_same_audio_other_seed_other_audio(tiny_model_set):
    generator = MusicGenerator(ModelSet.from_dir(tiny_model_set), device="cpu")
    settings = GenerateSettings(duration=2.0, num_samples=2, seed=5)
    first, again = _audio(generator, settings), _audio(generator, settings)
    other = _audio(generator, GenerateSettings(duration=2.0, num_samples=2, seed=6))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1])  # candidates differ from each other


def test_bfloat16_weights_generate_and_auto_is_float32_on_a_cpu(tiny_model_set, monkeypatch):
    """--weights-dtype: bfloat16 stage weights (the default on a GPU that has them) generate full, finite clips;
    on a CPU "auto" keeps float32, drawing exactly the tokens of an explicit float32 run."""
    from musiclm.generation.generate import inference_dtype

    models = ModelSet.from_dir(tiny_model_set)
    settings = GenerateSettings(duration=1.0, num_samples=2, seed=3)
    auto = MusicGenerator(models, device="cpu")
    assert auto.dtype == torch.float32 and auto.describe()["weights_dtype"] == "float32"
    explicit = MusicGenerator(models, device="cpu", weights_dtype="float32")
    assert np.array_equal(_audio(auto, settings), _audio(explicit, settings))
    half = MusicGenerator(models, device="cpu", weights_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for m in half.models.values() for p in m.parameters())
    audio = _audio(half, settings)
    assert audio.shape == (2, 24_000) and np.isfinite(audio).all()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype("auto", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="weights_dtype"):
        GenerateSettings(weights_dtype="int8")
    with pytest.raises(ValueError, match="decoding"):
        GenerateSettings(decoding="fast")


def test_a_12_second_request_gives_12_seconds_through_sliding_windows(tiny_model_set):
    """Longer than every stage's window and not a whole number of window steps (open-musiclm's unfold drops the
    partial last window): each stage's last window is moved back to end exactly at the requested length."""
    generator = MusicGenerator(ModelSet.from_dir(tiny_model_set), device="cpu")
    settings = GenerateSettings(duration=12.0, num_samples=1)
    plan = generator.plan(settings)
    assert (generator.windows.semantic, generator.windows.coarse, generator.windows.fine) == (499, 300, 150)
    assert plan["semantic"] == [(0, 499), (100, 599)]
    assert plan["coarse"][-1] == (600, 900) and plan["fine"][-1] == (750, 900)
    result = generator.generate("a long song", settings)
    assert result.audio.shape == (1, 12 * 24000)
    coarse_only = generator.generate("a long song", GenerateSettings(duration=5.0, num_samples=1, coarse_only=True))
    assert coarse_only.audio.shape == (1, 5 * 24000)


def test_windows_cover_the_length_and_end_exactly_there():
    assert slide(499, 499, 0.5) == [(0, 499)]
    assert slide(100, 499, 0.5) == [(0, 100)]
    assert slide(750, 300, 0.5, grid=3) == [(0, 300), (150, 450), (300, 600), (450, 750)]
    assert slide(600, 150, 1.0) == [(0, 150), (150, 300), (300, 450), (450, 600)]
    assert slide(1000, 300, 0.5, grid=3)[-1] == (700, 1000)
    assert all(s % 3 == 0 for s, _ in slide(1002, 300, 0.5, grid=3))


def test_mismatched_checkpoints_are_refused_before_sampling(tiny_model_set, tmp_path):
    wrong_stage = tmp_path / "wrong_stage"
    shutil.copytree(tiny_model_set, wrong_stage, symlinks=True)
    shutil.rmtree(wrong_stage / "coarse")
    shutil.copytree(tiny_model_set / "fine", wrong_stage / "coarse")
    with pytest.raises(CheckpointError, match=r"is a fine stage checkpoint, but --coarse needs the coarse stage"):
        MusicGenerator(ModelSet.from_dir(wrong_stage), device="cpu")

    other_system = tmp_path / "other_system"
    shutil.copytree(tiny_model_set, other_system, symlinks=True)
    info = json.loads((other_system / "fine" / "stage.json").read_text())
    info["fingerprint"] = "f" * 64
    (other_system / "fine" / "stage.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"fine.*trained on token system ffffffffffff"):
        MusicGenerator(ModelSet.from_dir(other_system), device="cpu")
    unchained = tmp_path / "unchained"
    shutil.copytree(tiny_model_set, unchained, symlinks=True)
    info = json.loads((unchained / "coarse" / "stage.json").read_text())
    info["model"]["global_cfg"]["num_coarse_quantizers"] = 4  # the fine stage reads 3 coarse codebooks
    (unchained / "coarse" / "stage.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"the fine checkpoint .* has coarse tokens 3x1024 but the coarse "
                                              r"checkpoint .* has 4x1024: the stages do not chain"):
        MusicGenerator(ModelSet.from_dir(unchained), device="cpu")
    # the command line says the same in one line and exits 2, before writing anything
    with pytest.raises(SystemExit) as stop:
        from jobs.common import run

        run(lambda: generate_job.main(["x", "--models", str(other_system), "--out", str(tmp_path / "o")]))
    assert stop.value.code == 2 and not (tmp_path / "o").exists()


def test_a_finished_report_is_current_whatever_the_decoder(tmp_path):
    """Every decoder draws the same tokens, so a batch rerun with another --decoding keeps the prompts it finished
    (a report written before the setting existed too); another seed does not."""
    import dataclasses

    from musiclm.generation.batch import finished_report

    settings = GenerateSettings(decoding="static")
    saved = dataclasses.asdict(settings)
    checkpoints = {"semantic": {"path": "s", "step": 1, "fingerprint": "f"}}
    (tmp_path / "report.json").write_text(json.dumps({"prompt": "p", "settings": saved, "checkpoints": checkpoints,
                                                      "files": []}))
    assert finished_report(tmp_path, "p", dataclasses.replace(settings, decoding="dynamic"), checkpoints)
    assert finished_report(tmp_path, "p", dataclasses.replace(settings, seed=1), checkpoints) is None
    del saved["decoding"]
    (tmp_path / "report.json").write_text(json.dumps({"prompt": "p", "settings": saved, "checkpoints": checkpoints,
                                                      "files": []}))
    assert finished_report(tmp_path, "p", settings, checkpoints)


def test_prompts_sampled_together_get_the_candidates_they_get_alone(tiny_model_set):
    """``generate_many``: the candidates of several prompts in one batch (4 s: two fine windows batched too), each
    prompt's noise drawn from its own generator as it is drawn alone: the second prompt's clips and scores are
    exactly those it gets alone. (Hot temperatures: the session's tiny stages are sure of their few tracks, and
    every draw must depend on its noise for the comparison to mean anything.)"""
    generator = MusicGenerator(ModelSet.from_dir(tiny_model_set), device="cpu")
    settings = GenerateSettings(duration=4.0, num_samples=2, seed=2, semantic_temperature=3.0,
                                coarse_temperature=3.0, fine_temperature=3.0, top_fraction=1.0)
    together = generator.generate_many(["a calm piano melody", "drums and bass"], settings)
    alone = generator.generate("drums and bass", settings)
    assert [c.prompt for c in together] == ["a calm piano melody", "drums and bass"]
    assert np.array_equal(together[1].audio, alone.audio) and np.array_equal(together[1].scores, alone.scores)
    assert not np.array_equal(alone.audio[0], alone.audio[1])  # the draws depend on the noise
    assert together[1].timings["prompts_together"] == 2


def test_a_failed_batch_of_prompts_is_retried_one_at_a_time(tiny_model_set, tmp_path, monkeypatch):
    """Ray's prompt worker samples a call's prompts together; when that fails (out of memory, say) it tries them
    one at a time, so only the prompt that fails alone is recorded as failed (error.txt) and the others are
    written."""
    import dataclasses

    from musiclm.generation.batch import PromptWorker

    real = MusicGenerator.generate_many

    def generate_many(self, prompts, settings, *args, **kwargs):
        if "bad" in [p.label for p in prompts]:
            raise RuntimeError(f"out of memory for {len(prompts)} prompts")
        return real(self, prompts, settings, *args, **kwargs)

    monkeypatch.setattr(MusicGenerator, "generate_many", generate_many)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the worker's, for this process: keep the suite's
    settings = GenerateSettings(duration=1.0, num_samples=1)
    worker = PromptWorker({"set": ModelSet.from_dir(tiny_model_set)}, {"set": dataclasses.asdict(settings)}, "cpu", 1)
    prompts = ["a waltz", "bad", "a march"]
    out = worker({"model_set": ["set"] * 3, "prompt": prompts, "spec": [MusicPrompt(p).encode() for p in prompts],
                  "index": [0, 1, 2],
                  "folder": [str(tmp_path / p) for p in prompts]})
    assert list(out["error"]) == ["", "RuntimeError: out of memory for 1 prompts", ""]
    assert (tmp_path / "bad" / "error.txt").read_text().startswith("RuntimeError: out of memory for 1 prompts")
    assert all((tmp_path / p / "report.json").exists() for p in ("a waltz", "a march"))
