"""fit-rvq and fit-kmeans: which tracks a bounded fit samples. (The jobs themselves run on a local Ray in
test_fit_clap.py, fit-rvq over a folder with a broken file after tuning the CLAP, and in test_pipeline.py, where
fit-kmeans's report is checked.)"""
import pytest

from musiclm.tokens.fit import _select


def test_a_bounded_fit_samples_only_the_tracks_it_needs(tmp_path):
    """2,400 frames at 600 per track, +20 %, is 5 of the 7 files: only those are decoded; the sample is seeded."""
    for i in range(7):
        (tmp_path / f"{i // 4:03d}").mkdir(exist_ok=True)
        (tmp_path / f"{i // 4:03d}" / f"{i:06d}.mp3").write_bytes(b"")
    sample, info = _select(tmp_path, 600, 2400, None, 1, log=lambda m: None)
    assert info["files_in_folder"] == 7 and info["sampled"] == len(sample) == 5
    assert sample == _select(tmp_path, 600, 2400, None, 1, log=lambda m: None)[0]
    assert len(_select(tmp_path, 600, 2400, 3, 1, log=lambda m: None)[0]) == 3  # max_tracks bounds it too
    assert len(_select(tmp_path, 600, None, None, 1, log=lambda m: None)[0]) == 7
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        _select(tmp_path / "empty", 600, None, None, 1)


def test_fit_samples_are_uniform_over_folders():
    """FMA's folders hold tracks in id order: keeping the first vectors to arrive favoured the earliest folders.
    The sample is drawn over every file at once."""
    from musiclm.tokens.fit import sample_tracks

    paths = [f"/fma_large/{f:03d}/{f:03d}{i:03d}.mp3" for f in range(100) for i in range(40)]
    sample = sample_tracks(paths, 1000, seed=0)
    assert len(set(sample)) == 1000 and sample == sample_tracks(list(reversed(paths)), 1000, seed=0)
    per_folder = [sum(p.startswith(f"/fma_large/{f:03d}/") for p in sample) for f in range(100)]
    assert min(per_folder) >= 1 and max(per_folder) <= 25  # 10 expected in each
    assert 450 <= sum(per_folder[:50]) <= 550  # as many from the later folders as from the earlier ones
    assert sample_tracks(paths, 1000, seed=1) != sample
