"""fit-clap: a token system's CLAP tuned on captioned audio learns held-out text<->audio retrieval."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from musiclm.tokens.clap_tuning import retrieval
from musiclm.tokens.system import TokenSystem, TokenSystemError


def test_retrieval_ranks_each_caption_against_every_held_out_track():
    ids = ["a", "a", "b", "c"]  # track a has two windows: its embedding is their mean
    audio = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    perfect = retrieval(audio, text, ids)
    assert perfect["valid/recall@1"] == 1.0 and perfect["valid/mean_rank"] == 1.0
    assert perfect["valid/chance_recall@1"] == pytest.approx(1 / 3)
    swapped = retrieval(audio, text[[2, 2, 0, 3]], ids)  # a's and b's captions exchanged
    assert swapped["valid/text_to_audio/recall@1"] == pytest.approx(1 / 3)
    # the mean cosine of each caption with its own track's audio: how far apart the towers put a pair
    a = torch.nn.functional.normalize(audio[0] + torch.nn.functional.normalize(audio[1], dim=0), dim=0)
    assert perfect["valid/caption_cosine"] == pytest.approx((a[0].item() + 2) / 3)
    assert swapped["valid/caption_cosine"] == pytest.approx((a[1].item() + 0 + 1) / 3)
    # a CLAP that embeds every clip alike ranks nothing: ties count against the true pair
    alike = retrieval(torch.ones(4, 3), text, ids)
    assert alike["valid/text_to_audio/recall@1"] == 0.0 and alike["valid/text_to_audio/mean_rank"] == 3.0


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fit_clap_raises_held_out_retrieval_and_writes_the_token_system(local_ray, tiny_system_dir, tmp_path):
    from jobs.fit_clap import main as fit_clap
    from musiclm.audio import synth

    # 80 four-second tracks (CLAP repeat-pads them to its 10 s window) whose captions name their lead instrument and
    # drums (the synthetic set's own captions, with tempo, key and mood too, need more tracks and steps than a test
    # affords: the demo tunes on those); one more file is broken
    corpus = tmp_path / "corpus"
    tracks = synth.write_corpus(corpus, num_tracks=80, seconds=4.0, seed=11)
    (corpus / "fma_synth" / "000" / "000081.mp3").write_text("not audio\n")
    captions = [{"id": f"{t.track_id:06d}", "path": str(synth.track_path(corpus, t.track_id).relative_to(corpus)),
                 "caption": f"{t.instrument} lead with {t.drums} drums"} for t in tracks]
    captions.append({"id": "000081", "path": "fma_synth/000/000081.mp3", "caption": "a broken file"})
    (corpus / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    ts = tmp_path / "ts"
    shutil.copytree(tiny_system_dir, ts)  # RVQ and k-means fitted on the random CLAP
    before = TokenSystem.load(ts)
    argv = ["--source", str(corpus), "--token-system", str(ts), "--storage", str(tmp_path / "runs"),
            "--run-name", "clap", "--steps", "60", "--batch-size", "16", "--lr", "5e-4", "--warmup", "10",
            "--eval-every", "30", "--valid-tracks", "16", "--windows-per-track", "1"]
    # the RVQ was fitted on this CLAP: refused, naming what would need re-doing, before any work
    with pytest.raises(TokenSystemError, match="--overwrite.*fit-rvq.*preprocess"):
        fit_clap(argv)
    assert not (tmp_path / "runs").exists()

    fit_clap(argv + ["--overwrite"])
    report = json.loads((ts / "fit_clap.report.json").read_text())
    untuned, tuned = report["retrieval"]["untuned"], report["retrieval"]["tuned"]
    print("fit-clap held-out retrieval, untuned:", untuned, "tuned:", tuned)
    assert report["tracks"] == {"train": 65, "valid": 16} and report["steps"] == 60
    # the random CLAP embeds every clip alike: no better than chance; tuned, it ranks held-out captions' tracks
    # (and tracks' captions) well above chance (16 tracks: recall@1 0.06, recall@5 0.31, mean rank 8.5)
    assert untuned["valid/recall@5"] <= 5 / 16 + 0.1 and untuned["valid/mean_rank"] >= 7
    assert tuned["valid/recall@5"] >= untuned["valid/recall@5"] + 0.15, (untuned, tuned)
    assert tuned["valid/mean_rank"] <= untuned["valid/mean_rank"] - 2.5, (untuned, tuned)
    assert report["skipped"] == {"000081": report["skipped"]["000081"]}  # whichever side it fell on
    assert "not a decodable audio file" in report["skipped"]["000081"]

    # the tuned weights are the token system's CLAP now, in the same format; the RVQ fitted on the old one is gone
    after = TokenSystem.load(ts)
    assert after.fingerprint == report["fingerprint"] != before.fingerprint
    assert not after.rvq_fitted and after.kmeans_fitted
    assert after.history[-1]["kind"] == "clap" and after.history[-1]["corpus"] == str(corpus)
    caption = ["A warm folk track at 90 BPM in D minor, with a piano lead and no drums."]
    assert not torch.allclose(after.clap.text_embeddings(caption), before.clap.text_embeddings(caption))
    with pytest.raises(TokenSystemError, match="fit-rvq"):
        after.require_fitted()
    # TensorBoard has the scores before the first step and at each checkpoint
    from musiclm.train.metrics import tensorboard_steps

    steps = tensorboard_steps(tmp_path / "runs" / "clap" / "tensorboard")
    assert steps["valid/recall@1"] == [0, 30, 60] and steps["train/loss"] == [30, 60]

    # the same command with more steps resumes the run from its checkpoint at step 60 (no new untuned score)
    fit_clap([a if a != "60" else "70" for a in argv])
    assert json.loads((ts / "fit_clap.report.json").read_text())["steps"] == 70
    steps = tensorboard_steps(tmp_path / "runs" / "clap" / "tensorboard")
    assert steps["valid/recall@1"] == [0, 30, 60, 70] and steps["train/loss"] == [30, 60, 70]
    assert len(TokenSystem.load(ts).history) == 2
    # AdamW's state was carried, not restarted: its step counts are the run's 70
    from safetensors.torch import load_file

    latest = json.loads((ts / "fit_clap.report.json").read_text())["checkpoint"]
    adam_steps = {float(v) for k, v in load_file(f"{latest}/optimizer.safetensors").items() if k.endswith(".step")}
    assert adam_steps == {70.0}, adam_steps

    # fit-rvq, the step the refusal named, as a user runs it next (a job on the local Ray), over the same folder with
    # its broken file: fitted on the tuned CLAP, the broken file named, and a second fit refused without --overwrite
    from jobs import fit_rvq
    from musiclm.audio.io import load_audio

    rvq_args = ["--token-system", str(ts), "--audio", str(corpus / "fma_synth"), "--steps", "30"]
    fit_rvq.main(rvq_args)
    rvq_report = json.loads((ts / "fit_rvq.report.json").read_text())
    assert rvq_report["tracks"] == 80 and rvq_report["embeddings"] == 80  # 4 s tracks: one CLAP window each
    broken = corpus / "fma_synth" / "000" / "000081.mp3"
    assert [e["path"] for e in rvq_report["failed"]] == [str(broken)]
    assert "not a decodable audio file" in rvq_report["failed"][0]["message"]
    system = TokenSystem.load(ts)
    assert system.rvq_fitted and system.kmeans_fitted and system.fingerprint == rvq_report["fingerprint"]
    tokens = system.tokenize(load_audio(synth.track_path(corpus, tracks[0].track_id), 24000), 24000)
    assert tokens["clap"].shape == (1, 12)
    with pytest.raises(TokenSystemError, match="already fitted.*--overwrite"):
        fit_rvq.main(rvq_args)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_tuning_rows_come_in_the_tracks_order_whatever_finishes_first(local_ray):
    """fit-clap's and fit-codec's train rows reach the loop in the tracks' order, not in the order their decoding
    tasks finish: the loop's seeded shuffle buffer then gives one seed the same batches (two fit-clap runs of one
    seed trained different weights before; the same weights since, checked by hand)."""
    from types import SimpleNamespace

    from musiclm.tokens.tuning import TuneSettings, track_dataset

    def slow_rows(row: dict, delay: float) -> list[dict]:  # nested: Ray's workers get it by value
        import time

        time.sleep(delay * (8 - int(row["id"])))  # the first tracks finish last
        return [{"id": row["id"], "window": w} for w in range(2)]

    tracks = [SimpleNamespace(id=str(i), path=f"/x/{i}.mp3", caption="") for i in range(8)]
    ds, cached = track_dataset(tracks, slow_rows, {"delay": 0.05}, TuneSettings(), row_bytes=1)
    assert cached
    assert [(r["id"], r["window"]) for r in ds.iter_rows()] == [(str(i), w) for i in range(8) for w in range(2)]
