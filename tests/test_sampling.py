"""Our sampler against open-musiclm's own: draws of its ``top_k`` + ``gumbel_sample`` on fixed logits
(tests/data/open_musiclm_sampling, made by its code) and draws of ``pick`` on the same logits must keep the same
tokens and follow the same law.

The frequency checks are chi-square tests at a false-alarm rate of 1e-6 each (bins with fewer than 5 expected
draws pooled): with this file's fixed seeds they are deterministic; with any other seed a correct sampler fails
one of the 15 with probability about 1.5e-5. Their power: ``logits * temperature`` in place of
``logits / temperature`` moves the coarse stage's law (temperature 0.95) by a chi-square of several hundred.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from musiclm.models.sampling import keep_top_fraction, kept_count, pick

DRAWS = json.loads((Path(__file__).parent / "data" / "open_musiclm_sampling" / "draws.json").read_text())
CASES = {c["name"]: c for c in DRAWS["cases"]}
FALSE_ALARM = 1e-6


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with ``dof`` degrees of freedom (the regularized upper gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def pooled(expected: torch.Tensor, *counts: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Bins with at least 5 expected draws, the rest pooled into one (the chi-square approximation's rule)."""
    big, small = expected >= 5, (expected > 0) & (expected < 5)  # tokens of probability 0 are checked apart
    merge = lambda t: torch.cat([t[big], t[small].sum()[None]]) if small.any() else t[big]
    return merge(expected), [merge(c) for c in counts]


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected, (observed,) = pooled(probs * counts.sum(), counts.double())
    if len(expected) < 2:
        return 1.0
    return chi2_sf(float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1)


def homogeneity(a: torch.Tensor, b: torch.Tensor, probs: torch.Tensor) -> float:
    """Two samples (of any sizes) from one law? The chi-square of their 2 x k table."""
    _, (a, b) = pooled(probs * min(a.sum(), b.sum()), a.double(), b.double())
    if len(a) < 2:
        return 1.0
    total = a + b
    ea, eb = total * a.sum() / total.sum(), total * b.sum() / total.sum()
    return chi2_sf(float(((a - ea) ** 2 / ea + (b - eb) ** 2 / eb).sum()), len(a) - 1)


OUR_DRAWS = 50_000  # open-musiclm's are 200,000


def our_counts(case: dict, seed: int = 0, chunk: int = 10_000) -> torch.Tensor:
    logits = torch.tensor(case["logits"])
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(logits), dtype=torch.long)
    for _ in range(OUR_DRAWS // chunk):
        drawn = pick(logits.repeat(chunk, 1), case["temperature"], 1 - case["filter_thres"], generator)
        counts += torch.bincount(drawn, minlength=len(logits))
    return counts


def law(case: dict) -> torch.Tensor:
    """The softmax at the case's temperature over the tokens open-musiclm's top_k kept."""
    logits = torch.tensor(case["logits"], dtype=torch.float64)
    kept = torch.tensor(case["kept"])
    probs = torch.zeros_like(logits)
    probs[kept] = torch.softmax(logits[kept] / case["temperature"], -1)
    return probs


@pytest.mark.parametrize("name", list(CASES))
def test_pick_keeps_open_musiclms_tokens_and_draws_them_at_its_frequencies(name):
    case = CASES[name]
    logits = torch.tensor(case["logits"])
    theirs = torch.tensor(case["counts"])
    kept = set(case["kept"])
    # the kept set: exactly open-musiclm's top_k's (eos excluded first; its count rounds as open-musiclm's)
    masked = logits.clone()
    masked[-1] = float("-inf")
    assert set(torch.isfinite(keep_top_fraction(masked[None], 1 - case["filter_thres"]))[0].nonzero()[:, 0].tolist()) \
        == kept
    assert kept_count(len(logits), 1 - case["filter_thres"]) == len(kept)
    assert set(theirs.nonzero()[:, 0].tolist()) <= kept  # the fixture itself: eos never drawn, nothing outside
    ours = our_counts(case)
    assert set(ours.nonzero()[:, 0].tolist()) <= kept, "drew a token open-musiclm's top_k removes (eos or below k)"
    assert ours[-1] == 0, "eos drawn inside a window"
    probs = law(case)
    assert goodness_of_fit(theirs, probs) > FALSE_ALARM  # open-musiclm's draws follow the stated law
    assert goodness_of_fit(ours, probs) > FALSE_ALARM, f"{name}: our draws do not follow softmax(logits / T)"
    assert homogeneity(ours, theirs, probs) > FALSE_ALARM, f"{name}: our draws differ from open-musiclm's"


def test_the_frequency_checks_have_power():
    """The checks above can fail: draws at another temperature (the inverted one, 0.95 -> 1/0.95) and draws of the
    fixture's counts shifted by one token are rejected by a wide margin."""
    case = dict(CASES["coarse"])
    probs = law(case)
    inverted_law = law(dict(case, temperature=1 / case["temperature"]))
    inverted = torch.bincount(torch.multinomial(inverted_law, OUR_DRAWS, replacement=True,
                                                generator=torch.Generator().manual_seed(1)), minlength=len(probs))
    assert goodness_of_fit(inverted, probs) < 1e-30
    assert homogeneity(inverted, torch.tensor(case["counts"]), probs) < 1e-30
    theirs = torch.tensor(case["counts"])
    kept = torch.tensor(case["kept"])
    shifted = theirs.clone()
    shifted[kept] = theirs[kept.roll(1)]
    assert goodness_of_fit(shifted, probs) < 1e-30


def test_temperature_zero_is_the_argmax_of_the_kept_tokens():
    case = CASES["semantic"]
    logits = torch.tensor(case["logits"])
    drawn = pick(logits.repeat(3, 1), 0.0, 0.1, torch.Generator().manual_seed(0))
    assert drawn.tolist() == [int(logits[:-1].argmax())] * 3  # not eos, though its logit is the largest
