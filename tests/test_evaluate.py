"""Evaluation of two model sets on a prompt file, on a local Ray (Ray Data actor pool): table, plot, reruns."""
from __future__ import annotations

import csv

import pytest

from conftest import train_tiny_stage


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

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nslow ambient pads\n\nfast techno beat\n")
    out = tmp_path / "eval"
    argv = ["--prompts", str(prompts), "--models", f"base={tiny_model_set},other={second_model_set}",
            "--num-samples", "2", "--duration", "1", "--out", str(out)]
    evaluate(argv)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["prompt_index"], r["model_set"]) for r in rows] == [("0", "base"), ("1", "base"), ("0", "other"),
                                                                    ("1", "other")]
    for r in rows:
        assert r["error"] == "" and float(r["best_score"]) >= float(r["mean_score"])
        assert len(list((out / r["model_set"]).glob("*/sample_1.wav"))) == 2
    assert (out / "base" / "000-slow-ambient-pads" / "sample_1.wav").exists()
    table = (out / "results.md").read_text()
    assert "base best" in table and "other mean" in table and "fast techno beat" in table
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    capsys.readouterr()
    evaluate(argv)  # everything is done: nothing is generated again
    assert capsys.readouterr().out.count("2 prompts, 2 already done") == 2
