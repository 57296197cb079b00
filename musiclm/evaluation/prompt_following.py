"""Does the music follow the prompt? The differences that say so, each with its noise, on held-out captions:

- ``clap_caption_match``: the CLAP that scores everything, on held-out real clips: each caption's score of its own
  clip minus its mean score of the other clips. About 0 for a CLAP that embeds every clip alike (the random tiny
  one); without it, none of the scores below mean anything.
- ``caption_tokens_match/first_level`` and ``/all_levels``: on the same clips, whether a caption's CLAP tokens
  (what a prompt conditions the stages on) are its own audio's rather than another clip's (``token_match``): the
  step between the judge and the stages, where CLAP's modality gap can lose the prompt (the pipeline reports it for
  stages trained on audio tokens: trained on caption tokens, they are prompted with the kind they learned from).
- ``generated_caption_match``: the same on what the final model set generated for the held-out captions, over every
  candidate of each prompt (not only the best: the best is the one its own prompt scored highest, which would
  count reranking's gain as prompt-following), at the guidance the pipeline generates with;
  ``generated_caption_match_unguided`` the same unguided. The measure of prompt-following itself; the rest say
  where it is lost.
- ``best_of_n_vs_random``: each prompt's best-of-N score minus one random candidate's (candidate 0): what
  reranking by CLAP buys.
- ``guidance_vs_unguided``: each prompt's mean candidate score sampled with classifier-free guidance minus
  unguided (the same seed, so the same draws where guidance changes nothing).
- ``conditioning_gain/<stage>``: each stage's validation loss with another held-out track's CLAP tokens minus
  with its own (``train.metrics.ConditioningSums``), per batch of the best checkpoint; and
  ``null_condition_gain/<stage>``, the null condition's loss minus its own: what guidance amplifies.
- ``conditioning_gain_opening/<stage>`` and ``null_condition_gain_opening/<stage>``: the same two per example over
  the first ``models.stages.OPENING_FRAMES`` frames of each window, where the condition is most of what the
  stage knows of the track (further on, the window's own tokens tell it); where generation takes its direction.

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


def clearly_negative(e: dict) -> bool:
    """An ``estimate`` below 0 by more than ``CLEAR`` standard errors (``clear`` is the positive side)."""
    return e["n"] > 1 and e["value"] < -CLEAR * e["noise"]


def caption_match(system, clips: list, captions: list[str], rate: int) -> dict:
    """Per caption, its CLAP score of its own clip minus its mean score of the other captions' clips: the comparison
    reranking makes (one prompt's scores of several clips). ``clips[i]`` is caption i's clip, or a list of its clips
    (every candidate generated for it: the mean over them, and over each other caption's as one).

    Compared within a caption, the caption's own offset cancels: captions differ far more in how high they score
    any clip (8 held-out captions of a demo run scored one generated clip from -0.60 to +0.71) than clips differ for
    one caption, and that spread was the noise when the scores were compared within a clip instead (the standard
    error 0.226 against 0.004 on that run's 8 clips; with one clip a caption the mean is the same either way)."""
    import torch

    from ..generation.generate import audio_embedding

    n = len(clips)
    if n < 2:
        raise ValueError(f"{n} held-out clips: the caption match needs at least 2")
    groups = [list(c) if isinstance(c, (list, tuple)) else [c] for c in clips]
    # each caption and each clip embedded once: the similarity that ranks generated candidates (clap_scores)
    text = torch.stack([torch.nn.functional.normalize(system.clap.text_embeddings([c]), dim=-1)[0] for c in captions])
    scores = [(text @ torch.stack([audio_embedding(system, clip, rate) for clip in g]).T).mean(1).tolist()
              for g in groups]  # [clip group][caption]: each caption's mean score of each group's clips
    return estimate(scores[i][i] - sum(scores[k][i] for k in range(n) if k != i) / (n - 1) for i in range(n))


def token_match(system, clips: list, captions: list[str], rate: int) -> dict:
    """The CLAP tokens a caption conditions the stages on (its text embedding through the RVQ), against those of
    its own clip's audio (its first 10 s window, what the stages trained on) and the other clips': per clip, whether
    its caption's tokens equal its audio's, minus the fraction of the other clips' audio they equal. Two estimates:
    ``first_level`` (the first code) and ``all_levels`` (every code). About 0 when the prompts' tokens are not their
    music's: the RVQ is fitted on audio embeddings, and a text embedding far from them (CLAP's modality gap)
    quantizes to codes no audio has, so generation conditions the stages on tokens they never trained on."""
    import numpy as np

    from ..audio.io import resample

    n = len(clips)
    if n < 2:
        raise ValueError(f"{n} held-out clips: the token match needs at least 2")
    text = np.asarray(system.clap.text_tokens(list(captions)))
    audio = np.stack([system.clap.audio_tokens(resample(clip, rate, system.clap.sample_rate))[0] for clip in clips])

    def agreement(levels: int) -> dict:
        same = (text[:, None, :levels] == audio[None, :, :levels]).all(-1)  # [caption][clip]
        return estimate(float(same[i, i]) - sum(float(same[i, j]) for j in range(n) if j != i) / (n - 1)
                        for i in range(n))

    return {"first_level": agreement(1), "all_levels": agreement(text.shape[1])}


def _score(row: dict, kind: str) -> float | None:
    v = row.get(f"{kind}_score")
    return None if v in (None, "") else float(v)


def paired_difference(rows: list[dict], a: str, b: str) -> dict:
    """Per prompt, set ``a``'s mean candidate score minus set ``b``'s, over the prompts both scored (an
    evaluation's rows, ``results.csv``: prompt, model_set, best/random/mean scores; a failed prompt's are
    empty)."""
    cell = {(r["prompt"], r["model_set"]): r for r in rows}
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    pairs = [(cell[p, a], cell[p, b]) for p in prompts if (p, a) in cell and (p, b) in cell]
    return estimate(_score(x, "mean") - _score(y, "mean") for x, y in pairs
                    if _score(x, "mean") is not None and _score(y, "mean") is not None)


def from_results(rows: list[dict], unguided: str, guided: str | None) -> dict:
    """``best_of_n_vs_random`` of set ``unguided`` and ``guidance_vs_unguided`` (``guided`` against it) from an
    evaluation's rows."""
    base = [r for r in rows if r["model_set"] == unguided]
    out = {"best_of_n_vs_random": estimate(_score(r, "best") - _score(r, "random") for r in base
                                           if _score(r, "best") is not None and _score(r, "random") is not None)}
    if guided:
        out["guidance_vs_unguided"] = paired_difference(rows, guided, unguided)
    return out


def genre_shift(rows: list[dict], base: str, shifted: str, guided_name=None) -> dict:
    """The seed's experiment (REFERENCE.md: prompt alignment fell after fine-tuning on FMA) from an evaluation of
    ``base`` and ``shifted`` (``base`` fine-tuned on one genre) on prompts outside that genre; ``guided_name``
    maps a set to its guided column (None: no guided columns).

    - ``alignment_change``: per prompt, ``shifted``'s mean CLAP score minus ``base``'s, unguided: below 0 when
      the fine-tuning cost prompt alignment;
    - ``alignment_change_guided``: the same with both guided;
    - ``recovered_by_guidance``: ``shifted`` guided minus ``base`` unguided: whether guidance gives it back;
    - ``guidance_on_<set>``: each set guided minus unguided;
    - ``lower_on``: on how many of the prompts both scored ``shifted`` scored lower (the seed's figure: 6 of 7);
    - ``mean_score/<column>``: each column's mean over the prompts."""
    mean = {(r["prompt"], r["model_set"]): _score(r, "mean") for r in rows}
    both = [p for p in dict.fromkeys(r["prompt"] for r in rows)
            if mean.get((p, base)) is not None and mean.get((p, shifted)) is not None]
    out = {"alignment_change": paired_difference(rows, shifted, base),
           "lower_on": {"prompts": sum(mean[p, shifted] < mean[p, base] for p in both), "of": len(both)}}
    columns = [base, shifted]
    if guided_name is not None:
        out["alignment_change_guided"] = paired_difference(rows, guided_name(shifted), guided_name(base))
        out["recovered_by_guidance"] = paired_difference(rows, guided_name(shifted), base)
        for name in (base, shifted):
            out[f"guidance_on_{name}"] = paired_difference(rows, guided_name(name), name)
        columns += [guided_name(base), guided_name(shifted)]
    for column in columns:
        out[f"mean_score/{column}"] = estimate(_score(r, "mean") for r in rows
                                               if r["model_set"] == column and _score(r, "mean") is not None)
    return out


def conditioning_gains(checkpoint: str | Path, dataset: str | Path, stage: str, batch_size: int = 2) -> dict:
    """The ``conditioning_gain`` and ``null_condition_gain`` of a stage checkpoint over every valid row of a token
    dataset, per batch (fixed crops; the swap is the training loop's own, ``validation_pass``), and the same two
    over each example's opening (``..._opening``, per example)."""
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
    return {"conditioning_gain": estimate(sums.gains), "null_condition_gain": estimate(sums.null_gains),
            "conditioning_gain_opening": estimate(sums.opening_gains),
            "null_condition_gain_opening": estimate(sums.opening_null_gains)}


def _number(v: float, sign: str = "") -> str:
    """4 decimals, or 2 significant digits below 0.001: a clear +0.00003 (best-of-N is never below the random
    candidate, so a few prompts whose candidates differ in the last digits make it clear) must not read as +0.0000."""
    return f"{v:{sign}.4f}" if abs(v) < 1e-9 or abs(v) >= 1e-3 else f"{v:{sign}.1e}"


def summary_lines(block: dict) -> list[str]:
    """The block as the pipeline's closing lines: one per difference, value ± noise and whether it is clear."""
    lines = []
    for name, e in block.items():
        if not isinstance(e, dict) or "value" not in e:
            continue
        if e["value"] is None:
            lines.append(f"  {name}: not measured")
            continue
        verdict = ("clearly positive" if e["clear"] else "clearly negative" if clearly_negative(e)
                   else "not beyond its noise")
        lines.append(f"  {name}: {_number(e['value'], '+')} ± {_number(e['noise'])} (n {e['n']}; {verdict})")
    return lines


__all__ = ["CLEAR", "caption_match", "clearly_negative", "conditioning_gains", "estimate", "from_results",
           "genre_shift", "paired_difference", "summary_lines", "token_match"]
