"""`make demo`'s pipeline with its own settings, end to end on a local Ray, then again: every step skipped."""
from __future__ import annotations

import json

import pytest
import soundfile as sf


@pytest.fixture
def ray_started_by_the_job():
    """The job starts its own local Ray (as `make demo` does); shut it down for the tests after this one."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_demo_pipeline_runs_end_to_end_and_a_second_run_skips_every_step(ray_started_by_the_job, tmp_path, capsys):
    from jobs.pipeline import main as pipeline

    work = tmp_path / "demo"
    pipeline(["--workdir", str(work)])  # the Makefile's `demo` settings (the defaults)
    first = capsys.readouterr().out
    summary = json.loads((work / "pipeline.json").read_text())
    assert first.count(": finished in ") == len(summary["steps"]) == 11  # every step ran
    for wav in summary["wavs"]:
        info = sf.info(wav)
        assert info.samplerate == 24000 and info.frames == 10 * 24000
    report = json.loads((work / "generate" / "report.json").read_text())
    assert report["checkpoints"]["fine"]["step"] == 30
    table = (work / "evaluate" / "results.md").read_text()
    assert "early best" in table and "final best" in table
    assert (work / "evaluate" / "scores.png").exists()
    assert "generated: " in first and "tensorboard --logdir" in first

    pipeline(["--workdir", str(work)])
    second = capsys.readouterr().out
    assert second.count("done already, skipped") == len(summary["steps"]) and ": finished in " not in second
