"""Draws of open-musiclm's own sampler on fixed logits: the reference tests/test_sampling.py holds ours to.

Runs open-musiclm's sampling step exactly as ``TokenConditionedTransformerWrapper.generate`` does it for one
token (open_musiclm/open_musiclm.py, commit 8e2c6a8): the eos logit set to -inf (eos is never allowed inside a
window), ``top_k(logits, thres=filter_thres)`` then ``gumbel_sample(filtered, temperature=...)`` from
open_musiclm/utils.py, with ``filter_thres=0.9`` (its default) and the temperatures its ``MusicLM.forward`` gives
each stage (semantic 1.0, coarse 0.95, fine 0.4), plus two small vocabularies where ``int((1 - thres) * V)``
rounds (33 keeps 3; 9 keeps the one largest). Every case's eos logit is the largest, so a sampler that lets eos
through draws it most. Writes ``draws.json``: per case the logits, temperature, the kept indices (where its
``top_k`` left a finite logit) and the counts of each token over ``draws`` draws.

Rerun (see README.md): PYTHONPATH=/tmp/open-musiclm:/tmp/ta/x /tmp/clapenv/bin/python make_fixture.py
"""
import importlib.util
import json
from pathlib import Path

import torch

# open_musiclm/utils.py alone (the package's __init__ pulls in every model); it imports torchaudio's resample
spec = importlib.util.spec_from_file_location("open_musiclm_utils", "/tmp/open-musiclm/open_musiclm/utils.py")
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)

DRAWS = 200_000
CASES = [  # name, vocabulary (codebook + eos), temperature, logit scale
    ("semantic", 1025, 1.0, 2.0),
    ("coarse", 1025, 0.95, 2.0),
    ("fine", 1025, 0.4, 1.0),
    ("small", 33, 0.95, 1.5),
    ("one-kept", 9, 1.0, 1.0),
]


def main() -> None:
    torch.manual_seed(20261204)
    cases = []
    for name, vocabulary, temperature, scale in CASES:
        logits = torch.randn(vocabulary) * scale
        logits[-1] = logits.max() + 5.0  # eos the most likely, were it allowed
        counts = torch.zeros(vocabulary, dtype=torch.long)
        for _ in range(DRAWS // 20_000):
            last = logits.repeat(20_000, 1)
            last[:, -1] = float("-inf")  # as generate does unless allow_eos_in_output on the last quantizer
            filtered = utils.top_k(last, thres=0.9)
            counts += torch.bincount(utils.gumbel_sample(filtered, temperature=temperature, dim=-1),
                                     minlength=vocabulary)
        last = logits.clone()[None]
        last[:, -1] = float("-inf")
        kept = torch.isfinite(utils.top_k(last, thres=0.9))[0].nonzero()[:, 0]
        cases.append({"name": name, "temperature": temperature, "filter_thres": 0.9, "draws": DRAWS,
                      "logits": logits.tolist(), "kept": kept.tolist(), "counts": counts.tolist()})
        print(f"{name}: V={vocabulary} kept {len(kept)}, {int((counts > 0).sum())} tokens drawn")
    out = Path(__file__).with_name("draws.json")
    out.write_text(json.dumps({"made_by": "open-musiclm 8e2c6a8 utils.top_k + utils.gumbel_sample, "
                                          "as TokenConditionedTransformerWrapper.generate calls them",
                               "torch": torch.__version__, "cases": cases}))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
