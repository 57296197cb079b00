"""Does the music follow the prompt? The differences that say so, each with its noise, on held-out captions:

- ``clap_caption_match``: the CLAP that scores everything, on held-out real clips: each clip's score for its own
  caption minus its mean score for the other held-out tracks' captions. About 0 for a CLAP that embeds every clip
  alike (the random tiny one); without it, none of the scores below mean anything.
- ``generated_caption_match``: the same on what the final model set generated for the held-out captions: each
  prompt's best clip scored for its own prompt minus for the others. The measure of prompt-following itself; the
  rest say where it is lost.
- ``best_of_n_vs_random``: each prompt's best-of-N score minus one random candidate's (candidate 0): what
  reranking by CLAP buys.
- ``guidance_vs_unguided``: each prompt's mean candidate score sampled with classifier-free guidance minus
  unguided (the same seed, so the same draws where guidance changes nothing).
- ``conditioning_gain/<stage>``: each stage's validation loss with another held-out track's CLAP tokens minus
  with its own (``train.metrics.ConditioningSums``), per batch of the best checkpoint; and
  ``null_condition_gain/<stage>``, the null condition's loss minus its own: what guidance amplifies.

Each is ``{"value": mean, "noise": standard error, "n": items}``: the mean over its items (clips, prompts,
batches) and the standard error of that mean, the spread a rerun with other items of the same kind would show.
A difference is clearly positive when it exceeds twice its noise (``clear``). The error does not see what a rerun
with other training would change: between two seeds of the demo, reranking's gain moved by 0.028 against an error
of 0.002 (benchmarks/RESULTS.md), so compare runs by their spread too.
"""
from __future__ import annotations

import math
from pathlib import Path

CLEAR = 2.0  # a difference is clear when value > CLEAR * noise


def estimate(values) -> dict:
    """Mean, standard error of the mean (0 for one item) and count of ``values``; ``clear`` when the mean exceeds
    ``CLEAR`` standard errors (and is positive)."""
    values = [float(v) for v in values]
    if not values:
        return {"value": None, "noise": None, "n": 0, "clear": False}
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return {"value": mean, "noise": se, "n": n, "clear": n > 1 and mean > CLEAR * se and mean > 0}


def caption_match(system, clips: list, captions: list[str], rate: int) -> dict:
    """Each clip's CLAP score for its own caption minus its mean score for the other clips' captions (half the
    spread of a single mismatched caption's on the demo's 12 held-out clips: 0.09 against 0.17)."""
    import torch

    from ..generation.generate import audio_embedding

    n = len(clips)
    if n < 2:
        raise ValueError(f"{n} held-out clips: the caption match needs at least 2")
    # each clip and each caption embedded once: the similarity that ranks generated candidates (clap_scores)
    text = torch.stack([torch.nn.functional.normalize(system.clap.text_embeddings([c]), dim=-1)[0] for c in captions])
    audio = torch.stack([audio_embedding(system, clip, rate) for clip in clips])
    scores = (text @ audio.T).tolist()  # [caption][clip]
    return estimate(scores[i][i] - sum(scores[j][i] for j in range(n) if j != i) / (n - 1) for i in range(n))


def from_results(rows: list[dict], unguided: str, guided: str | None) -> dict:
    """``best_of_n_vs_random`` of set ``unguided`` and ``guidance_vs_unguided`` (``guided`` against it) from an
    evaluation's rows (``results.csv``: prompt, model_set, best/random/mean scores; a failed prompt's are empty)."""
    def score(r, k):
        v = r.get(f"{k}_score")
        return None if v in (None, "") else float(v)

    cell = {(r["prompt"], r["model_set"]): r for r in rows}
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    base = [cell[p, unguided] for p in prompts if (p, unguided) in cell]
    out = {"best_of_n_vs_random": estimate(score(r, "best") - score(r, "random") for r in base
                                           if score(r, "best") is not None and score(r, "random") is not None)}
    if guided:
        pairs = [(cell[p, guided], cell[p, unguided]) for p in prompts if (p, guided) in cell and (p, unguided) in cell]
        out["guidance_vs_unguided"] = estimate(score(g, "mean") - score(u, "mean") for g, u in pairs
                                               if score(g, "mean") is not None and score(u, "mean") is not None)
    return out


def conditioning_gains(checkpoint: str | Path, dataset: str | Path, stage: str, batch_size: int = 2) -> dict:
    """The ``conditioning_gain`` and ``null_condition_gain`` of a stage checkpoint over every valid row of a token
    dataset, per batch (fixed crops; the swap is the training loop's own, ``validation_pass``)."""
    import torch

    from ..data.shards import CropSpec, open_manifest, split_files
    from ..train.checkpoint import load_stage
    from ..train.data import HeldRows, _table
    from ..train.loop import validation_pass

    model, info = load_stage(str(checkpoint), stage=stage)
    spec = CropSpec.make(stage, info.model.global_cfg, open_manifest(str(dataset)))
    held = HeldRows(_table(split_files(str(dataset), "valid"), stage), spec, seed=0, fixed=True)
    batches, counted = held.lockstep_batches(0, 1, batch_size)
    with torch.no_grad():
        _, sums, _ = validation_pass(model.eval(), model, batches, torch.device("cpu"), counted)
    return {"conditioning_gain": estimate(sums.gains), "null_condition_gain": estimate(sums.null_gains)}


def summary_lines(block: dict) -> list[str]:
    """The block as the pipeline's closing lines: one per difference, value ± noise and whether it is clear."""
    lines = []
    for name, e in block.items():
        if not isinstance(e, dict) or "value" not in e:
            continue
        if e["value"] is None:
            lines.append(f"  {name}: not measured")
            continue
        verdict = "clearly positive" if e["clear"] else "not beyond its noise"
        lines.append(f"  {name}: {e['value']:+.4f} ± {e['noise']:.4f} (n {e['n']}; {verdict})")
    return lines


__all__ = ["CLEAR", "caption_match", "conditioning_gains", "estimate", "from_results", "summary_lines"]
