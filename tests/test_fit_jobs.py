"""fit-rvq and fit-kmeans as a user runs them: the jobs on a local Ray, over a folder with a broken file."""
import json
import shutil

import pytest

from jobs import fit_kmeans, fit_rvq, init_token_system
from musiclm.audio.io import list_audio_files, load_audio
from musiclm.tokens.system import TokenSystem, TokenSystemError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def test_fit_jobs_on_local_ray(local_ray, corpus, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(corpus / "fma_synth", audio)
    (audio / "broken.mp3").write_text("not audio at all\n" * 20)
    ts = tmp_path / "ts"
    init_token_system.main(["--preset", "tiny", "--out", str(ts)])
    assert not TokenSystem.load(ts).rvq_fitted

    fit_rvq.main(["--token-system", str(ts), "--audio", str(audio), "--steps", "30"])
    rvq_report = json.loads((ts / "fit_rvq.report.json").read_text())
    assert rvq_report["tracks"] == 6 and rvq_report["embeddings"] == 12  # 11 s tracks: 2 windows each
    assert [e["path"] for e in rvq_report["failed"]] == [str(audio / "broken.mp3")]
    assert "not a decodable audio file" in rvq_report["failed"][0]["message"]

    # A bounded fit samples only the tracks it needs (uniformly, seeded) and decodes nothing else: 2,400 frames
    # at 600 per track, +20 %, is 5 of the 7 files
    fit_kmeans.main(["--token-system", str(ts), "--audio", str(audio), "--frames-per-track", "600",
                     "--max-frames", "2400", "--seed", "1"])
    km_report = json.loads((ts / "fit_kmeans.report.json").read_text())
    assert km_report["sample"]["files_in_folder"] == 7 and km_report["sample"]["sampled"] == 5
    assert km_report["tracks"] + len(km_report["failed"]) == 5  # every decoded file is one of the sample
    assert km_report["frames"] == 2400 and km_report["clusters_used"] > 900

    system = TokenSystem.load(ts)
    assert system.rvq_fitted and system.kmeans_fitted and system.fingerprint == km_report["fingerprint"]
    tokens = system.tokenize(load_audio(list_audio_files(corpus)[0], 24000), 24000)
    assert tokens["clap"].shape == (2, 12) and tokens["semantic"].shape == (549,)

    with pytest.raises(TokenSystemError, match="already fitted.*--overwrite"):
        fit_rvq.main(["--token-system", str(ts), "--audio", str(audio)])


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
