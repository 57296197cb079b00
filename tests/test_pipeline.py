"""`make demo`'s pipeline, end to end on a local Ray (shortened), then again: every step skipped."""
from __future__ import annotations

import json

import pytest
import soundfile as sf


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_demo_pipeline_runs_end_to_end_and_a_second_run_skips_every_step(local_ray, tmp_path, capsys):
    from jobs.pipeline import main as pipeline

    work = tmp_path / "demo"
    # `make demo` runs the defaults (4.3 min here); every step is the same code with fewer tracks, steps and
    # seconds, which is what this test checks: that each step runs, hands on to the next, and is skipped after.
    argv = ["--workdir", str(work), "--num-tracks", "8", "--rvq-steps", "50", "--train-steps", "10",
            "--num-workers", "1", "--duration", "2", "--eval-duration", "1", "--num-samples", "1"]
    pipeline(argv)
    first = capsys.readouterr().out
    summary = json.loads((work / "pipeline.json").read_text())
    assert first.count(": finished in ") == len(summary["steps"]) == 11  # every step ran
    for wav in summary["wavs"]:
        info = sf.info(wav)
        assert info.samplerate == 24000 and info.frames == 2 * 24000
    report = json.loads((work / "generate" / "report.json").read_text())
    assert report["checkpoints"]["fine"]["step"] == 10
    table = (work / "evaluate" / "results.md").read_text()
    assert "early best" in table and "final best" in table
    assert (work / "evaluate" / "scores.png").exists()
    assert "generated: " in first and "tensorboard --logdir" in first
    # `musiclm train` by hand on the demo's dataset (its k-means is sized to the corpus: 128 codes for the demo's,
    # 64 here; the preset has 1024) takes the dataset's token layout: no --set needed
    from jobs.common import stage_args_config
    from jobs.train import parser
    from musiclm.data.shards import open_manifest
    from musiclm.train.run import check_token_layout

    tokens = work / "tokens"
    cfg, _ = stage_args_config(parser().parse_args(["--stage", "coarse", "--data", str(tokens), "--run-name", "x"]))
    check_token_layout(cfg, open_manifest(tokens), str(tokens))
    assert cfg.model.hubert_kmeans_cfg.codebook_size == open_manifest(tokens)["tokens"]["semantic"]["codebook_size"] \
        < 1024

    pipeline(argv)
    second = capsys.readouterr().out
    assert second.count("done already, skipped") == len(summary["steps"]) and ": finished in " not in second

