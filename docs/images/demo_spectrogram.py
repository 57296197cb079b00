"""The README's picture of what `make demo` generates: log-spectrograms of a held-out corpus track (the one whose
caption is most like the prompt) and of the demo's WAV (its prompt is a caption of the corpus's kind), one above the
other on one colour scale.

    .venv/bin/python docs/images/demo_spectrogram.py demo_out docs/images/demo_spectrogram.jpg
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def log_spectrogram(audio: np.ndarray, rate: int, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.signal import spectrogram

    audio = audio[: int(seconds * rate)]
    freqs, _, power = spectrogram(audio, fs=rate, nperseg=1024, noverlap=768)
    keep = freqs <= 6000
    return freqs[keep], 10 * np.log10(power[keep] + 1e-10)


def main(workdir: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from musiclm.audio.io import decode_audio
    from musiclm.evaluation.evaluate import dataset_prompts

    work = Path(workdir)
    report = json.loads((work / "generate" / "report.json").read_text())
    words = set(report["prompt"].lower().split())  # the held-out track whose caption shares most of the prompt's words
    held_out = max(dataset_prompts(str(work / "tokens")), key=lambda p: len(words & set(p.caption.lower().split())))
    rate, seconds = 24000, 10.0
    panels = [(f"held-out corpus track: {held_out.caption}", decode_audio(held_out.audio, rate)[0]),
              (f"generated for: {report['prompt']}", decode_audio(report["files"][0], rate)[0])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 6), sharex=True)
    specs = [log_spectrogram(audio, rate, seconds) for _, audio in panels]
    top = max(s.max() for _, s in specs)
    for ax, (title, _), (freqs, spec) in zip(axes, panels, specs):
        ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
                  extent=(0, seconds, freqs[0], freqs[-1]))
        ax.set_title(title if len(title) < 110 else title[:108] + "…", fontsize=8)
        ax.set_ylabel("Hz")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=80, pil_kwargs={"quality": 80} if out.endswith(".jpg") else None)


if __name__ == "__main__":
    main(*sys.argv[1:3])
