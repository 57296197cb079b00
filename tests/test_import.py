"""Importing open-musiclm's artifacts: converted checkpoints against logits made by open-musiclm's own code
(tests/data/open_musiclm, the ground truth); as an extra, state dicts built here with its key names and shapes
checked against a forward pass written out by hand; an RVQ checked against direct residual quantization; and
the whole import → generate path."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musiclm.config_io import from_dict
from musiclm.interop.open_musiclm import OpenMusicLMImportError, convert_rvq, convert_transformer, load_kmeans_centers
from musiclm.models import build_stage

DIM, DEPTH, HEADS, DIM_HEAD = 64, 2, 2, 64  # open-musiclm's Attention uses dim_head 64
SEQUENCES = {"semantic": [(1024, 12), (1024, 1)], "coarse": [(1024, 12), (1024, 1), (1024, 3)],
             "fine": [(1024, 12), (1024, 3), (1024, 5)]}


def small_model_config():
    """open-musiclm's large_small_context JSON with small transformers (as a user's own JSON would be)."""
    data = json.loads(open("tests/data/open_musiclm_large_small_context.json").read())
    for stage in ("semantic", "coarse", "fine"):
        data[f"{stage}_cfg"].update(dim=DIM, depth=DEPTH, heads=HEADS, ff_dropout=0.0)
    return data


def open_musiclm_state(sequences, generator) -> dict[str, torch.Tensor]:
    """A TokenConditionedTransformer state dict named and shaped as open-musiclm's: per sequence a start token,
    an embedding of (C+1)·Q rows, logit weights (Q, C+1, dim); a transformer with a continuous relative
    position bias (Linear 1→dim/2, two Linear dim/2→dim/2, each followed by SiLU, then Linear dim/2→heads),
    per layer [attention, no cross-attention, conv feed-forward], and a final LayerNorm (gamma, beta)."""

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    s = {}
    for i, (c, q) in enumerate(sequences):
        s[f"start_tokens.{i}"] = rnd(DIM, scale=1.0)
        s[f"embeddings.{i}.weight"] = rnd((c + 1) * q, DIM, scale=1.0)
        s[f"logit_weights.{i}"] = rnd(q, c + 1, DIM)
    half = DIM // 2
    for j, (fan_out, fan_in) in enumerate([(half, 1), (half, half), (half, half)]):
        s[f"transformer.rel_pos_bias.net.{j}.0.weight"] = rnd(fan_out, fan_in, scale=0.5)
        s[f"transformer.rel_pos_bias.net.{j}.0.bias"] = rnd(fan_out)
    s["transformer.rel_pos_bias.net.3.weight"] = rnd(HEADS, half)
    s["transformer.rel_pos_bias.net.3.bias"] = rnd(HEADS)
    inner = int(DIM * 2 * 4 / 3)
    for layer in range(DEPTH):
        a, f = f"transformer.layers.{layer}.0.", f"transformer.layers.{layer}.2."
        s[a + "norm.gamma"], s[a + "norm.beta"] = 1 + rnd(DIM, scale=0.1), torch.zeros(DIM)
        s[a + "to_q.weight"] = rnd(HEADS * DIM_HEAD, DIM)
        s[a + "to_kv.weight"] = rnd(2 * DIM_HEAD, DIM)
        s[a + "q_scale"], s[a + "k_scale"] = 1 + rnd(DIM_HEAD, scale=0.1), 1 + rnd(DIM_HEAD, scale=0.1)
        s[a + "to_out.0.weight"] = rnd(DIM, HEADS * DIM_HEAD)
        s[f + "0.gamma"], s[f + "0.beta"] = 1 + rnd(DIM, scale=0.1), torch.zeros(DIM)
        s[f + "1.weight"] = rnd(2 * inner, DIM)
        s[f + "2.ds_conv.weight"] = rnd(2 * inner, 1, 3, scale=0.5)
        s[f + "4.gamma"], s[f + "4.beta"] = 1 + rnd(inner, scale=0.1), torch.zeros(inner)
        s[f + "6.weight"] = rnd(DIM, inner)
    s["transformer.norm.gamma"], s["transformer.norm.beta"] = 1 + rnd(DIM, scale=0.1), torch.zeros(DIM)
    return s


def reference_logits(s, sequences, conditioning, target) -> torch.Tensor:
    """The documented computation, written out: [start_i, tokens_i (+ q·C offsets), eos_i] for each
    conditioning sequence (eos embedded as id 0 and not attended to), then [start, tokens] of the target;
    grad-shrunk input (identity forward); per layer x += attn(x), x += ff(x); final LayerNorm; logits of the
    target positions with the logit weights of their codebook (position k → codebook k mod Q)."""
    b = target.shape[0]
    parts, keep = [], []
    for i, ((c, q), ids) in enumerate(zip(sequences, [*conditioning, target])):
        flat = ids.reshape(b, -1)
        offsets = (torch.arange(flat.shape[1]) % q) * c
        emb = s[f"embeddings.{i}.weight"][flat + offsets]
        pieces = [s[f"start_tokens.{i}"].expand(b, 1, DIM), emb]
        mask = [torch.ones(b, 1 + flat.shape[1], dtype=torch.bool)]
        if i < len(conditioning):
            pieces.append(s[f"embeddings.{i}.weight"][0].expand(b, 1, DIM))
            mask.append(torch.zeros(b, 1, dtype=torch.bool))
        parts.append(torch.cat(pieces, 1))
        keep.append(torch.cat(mask, 1))
    x, keep = torch.cat(parts, 1), torch.cat(keep, 1)
    n = x.shape[1]

    def ln(v, prefix):
        return F.layer_norm(v, v.shape[-1:], s[prefix + "gamma"], s[prefix + "beta"])

    rel = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()[..., None]
    for j in range(3):
        rel = F.silu(rel @ s[f"transformer.rel_pos_bias.net.{j}.0.weight"].T + s[f"transformer.rel_pos_bias.net.{j}.0.bias"])
    bias = (rel @ s["transformer.rel_pos_bias.net.3.weight"].T + s["transformer.rel_pos_bias.net.3.bias"]).permute(2, 0, 1)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    for layer in range(DEPTH):
        a, f = f"transformer.layers.{layer}.0.", f"transformer.layers.{layer}.2."
        h = ln(x, a + "norm.")
        q = (h @ s[a + "to_q.weight"].T).reshape(b, n, HEADS, DIM_HEAD).transpose(1, 2)
        k, v = (x @ s[a + "to_kv.weight"].T).chunk(2, dim=-1)  # keys/values from the block input, before the norm
        q = q / q.norm(dim=-1, keepdim=True) * s[a + "q_scale"]
        k = k / k.norm(dim=-1, keepdim=True) * s[a + "k_scale"]
        sim = torch.einsum("bhid,bjd->bhij", q, k) * 8 + bias
        sim = sim.masked_fill(~keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        sim = sim.masked_fill(future, -torch.finfo(sim.dtype).max)
        out = torch.einsum("bhij,bjd->bhid", sim.softmax(-1), v).transpose(1, 2).reshape(b, n, HEADS * DIM_HEAD)
        x = x + out @ s[a + "to_out.0.weight"].T
        h = ln(x, f + "0.") @ s[f + "1.weight"].T
        h = F.conv1d(F.pad(h.transpose(1, 2), (2, 0)), s[f + "2.ds_conv.weight"], groups=h.shape[-1]).transpose(1, 2)
        value, gate = h.chunk(2, dim=-1)
        h = ln(F.gelu(gate) * value, f + "4.") @ s[f + "6.weight"].T
        x = x + h
    x = ln(x, "transformer.norm.")
    c, q = sequences[-1]
    steps = target.reshape(b, -1).shape[1] + 1
    out = x[:, -steps:]
    weights = s[f"logit_weights.{len(sequences) - 1}"]
    return torch.stack([out[:, k] @ weights[k % q].T for k in range(steps)], 1)


FIXTURE = Path(__file__).parent / "data" / "open_musiclm"  # made by open-musiclm's own code: see its README.md


@pytest.mark.parametrize("align", [1, 96])
@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_converted_checkpoints_reproduce_open_musiclms_own_logits(stage, align):
    """Ground truth: logits that open-musiclm's TokenConditionedTransformerWrapper (commit 8e2c6a8, eval mode)
    returned for its saved state dict. Ours, after conversion, must give them to 1e-5 relative in float32; with the
    feed-forward's inner width padded (train.ff_align: 256 -> 288 here) as well."""
    from safetensors.torch import load_file

    from musiclm.config import load_model_config
    from musiclm.interop.open_musiclm import load_torch_state

    cfg = load_model_config(FIXTURE / "config.json")
    model = build_stage(stage, cfg).eval().set_ff_align(align)
    model.load_state_dict(convert_transformer(
        load_torch_state(FIXTURE / f"{stage}.transformer.500.pt", "fixture"), stage, cfg))
    assert align == 1 or model.layers[0].ff.inner % align  # a width that really gets padded
    expected = load_file(str(FIXTURE / f"{stage}.expected.safetensors"))
    inputs = [expected[f"input_{i}"].long() for i in range(len(model.sequences))]
    theirs = expected[f"logits_{len(inputs) - 1}"][:, : inputs[-1].shape[1] + 1]
    with torch.no_grad():
        ours = model(inputs[:-1], inputs[-1])
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 1.0  # logits of a meaningful size, not near-zero outputs
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale, (ours - theirs).abs().max().item() / scale


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_converted_weights_reproduce_the_reference_logits(stage):
    from musiclm.config import ModelConfig

    cfg = from_dict(ModelConfig, small_model_config())
    g = torch.Generator().manual_seed(0)
    theirs = open_musiclm_state(SEQUENCES[stage], g)
    model = build_stage(stage, cfg).eval()
    model.load_state_dict(convert_transformer(theirs, stage, cfg))
    steps = {"clap": (1,), "semantic": (7,), "coarse": (5, 3), "fine": (4, 5)}
    names = [s.name for s in model.sequences]
    ids = [torch.randint(0, 1024, (2, *(steps[n] if n != "clap" else (12,))), generator=g) for n in names]
    with torch.no_grad():
        ours = model(ids[:-1], ids[-1])
        ref = reference_logits(theirs, SEQUENCES[stage], ids[:-1], ids[-1])
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    assert ref.std() > 0.1  # a meaningful comparison, not of near-zero outputs


def test_missing_and_extra_keys_are_named():
    from musiclm.config import ModelConfig

    cfg = from_dict(ModelConfig, small_model_config())
    theirs = open_musiclm_state(SEQUENCES["coarse"], torch.Generator().manual_seed(1))
    del theirs["transformer.layers.1.2.2.ds_conv.weight"]
    theirs["transformer.layers.0.1.null_kv"] = torch.zeros(2, 1, 64)  # a cross-attention this layout lacks
    with pytest.raises(OpenMusicLMImportError) as err:
        convert_transformer(theirs, "coarse", cfg, "coarse.transformer.pt")
    assert "transformer.layers.1.2.2.ds_conv.weight" in str(err.value)
    assert "transformer.layers.0.1.null_kv" in str(err.value)
    deeper = from_dict(ModelConfig, {**small_model_config(), "coarse_cfg": {"dim": DIM, "depth": 3, "heads": HEADS}})
    with pytest.raises(OpenMusicLMImportError, match=r"missing .*transformer\.layers\.2\.0\.to_q\.weight"):
        convert_transformer(open_musiclm_state(SEQUENCES["coarse"], torch.Generator()), "coarse", deeper)


def test_rvq_conversion_gives_direct_residual_quantization_ids():
    from musiclm.tokens.rvq import ResidualVQ

    g = torch.Generator().manual_seed(2)
    q, k, d = 4, 64, 16
    books = [torch.randn(1, k, d, generator=g) * (0.5 ** level) for level in range(q)]
    state = {}
    for level, book in enumerate(books):
        state[f"layers.{level}._codebook.embed"] = book
        state[f"layers.{level}._codebook.embed_avg"] = book.clone()
        state[f"layers.{level}._codebook.cluster_size"] = torch.ones(1, k)
        state[f"layers.{level}._codebook.initted"] = torch.tensor([True])
    rvq = ResidualVQ(q, k, d)
    rvq.load_tensors(convert_rvq(state, q, k, d), "test")
    x = torch.randn(300, d, generator=g)
    residual, direct = x.numpy().astype(np.float64), []
    for book in books:
        codes = book[0].numpy().astype(np.float64)
        idx = ((residual[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)
        direct.append(idx)
        residual = residual - codes[idx]
    assert np.array_equal(rvq.encode(x).numpy(), np.stack(direct, 1))
    with pytest.raises(OpenMusicLMImportError, match=r"missing layers\.3\._codebook\.embed"):
        convert_rvq({k_: v for k_, v in state.items() if not k_.startswith("layers.3.")}, q, k, d)


def _released_like_files(tmp_path) -> tuple[list[str], object]:
    """open-musiclm-style files of the small config (stage state dicts, RVQ, a k-means joblib written by
    scikit-learn) and the import command's arguments for them, without any --trust-pickle."""
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    (tmp_path / "model.json").write_text(json.dumps(small_model_config()))
    g = torch.Generator().manual_seed(3)
    for stage, step in (("semantic", 14000), ("coarse", 18000), ("fine", 24000)):
        torch.save(open_musiclm_state(SEQUENCES[stage], g), tmp_path / f"{stage}.transformer.{step}.pt")
    torch.save({f"layers.{i}._codebook.embed": torch.nn.functional.normalize(torch.randn(1, 1024, 512, generator=g), dim=-1)
                for i in range(12)}, tmp_path / "clap.rvq.950_no_fusion.pt")
    hidden = 64  # the tiny semantic encoder's width
    km = MiniBatchKMeans(n_clusters=1024, n_init=1, max_iter=2, random_state=0, batch_size=2048)
    joblib.dump(km.fit(np.random.default_rng(0).normal(size=(2048, hidden))), tmp_path / "kmeans.joblib")
    argv = ["--config", str(tmp_path / "model.json"), "--rvq", str(tmp_path / "clap.rvq.950_no_fusion.pt"),
            "--kmeans", str(tmp_path / "kmeans.joblib"), "--clap", "tiny", "--mert", "tiny", "--encodec", "tiny",
            "--out", str(tmp_path / "set")] + [a for stage, step in (("semantic", 14000), ("coarse", 18000),
                                                                     ("fine", 24000))
                                               for a in (f"--{stage}", str(tmp_path / f"{stage}.transformer.{step}.pt"))]
    return argv, km


def test_import_then_generate_and_the_pickle_needs_consent(tmp_path):
    from jobs.common import run
    from jobs.import_open_musiclm import main as import_main
    from musiclm.generation.generate import GenerateSettings, ModelSet, MusicGenerator

    argv, km = _released_like_files(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run(lambda: import_main(argv))
    assert stop.value.code == 2 and not (tmp_path / "set").exists()  # refused before writing anything
    with pytest.raises(OpenMusicLMImportError, match="--trust-pickle"):
        load_kmeans_centers(tmp_path / "kmeans.joblib")

    import_main(argv + ["--trust-pickle", str(tmp_path / "kmeans.joblib")])
    record = json.loads((tmp_path / "set" / "import.json").read_text())
    stage_info = json.loads((tmp_path / "set" / "coarse" / "stage.json").read_text())
    assert stage_info["fingerprint"] == record["fingerprint"] and stage_info["step"] == 18000
    np.save(tmp_path / "centers.npy", km.cluster_centers_)
    assert np.allclose(load_kmeans_centers(tmp_path / "centers.npy"), km.cluster_centers_)

    generator = MusicGenerator(ModelSet.from_dir(tmp_path / "set"), device="cpu")
    result = generator.generate("imported", GenerateSettings(duration=1.0, num_samples=1))
    assert result.audio.shape == (1, 24000) and math.isfinite(float(result.scores[0]))


class _RunsCode:
    """Unpickling this creates the file ``marker`` (what a hostile checkpoint's ``__reduce__`` can do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_trust_is_per_file_a_hostile_clap_checkpoint_never_runs_code(tmp_path):
    """The README's command trusts the k-means joblib with --trust-pickle; a CLAP checkpoint given beside it is
    still read weights-only: a file whose unpickling runs code is refused (exit 2, named) and its code never runs
    unless --trust-pickle names that file itself. A --trust-pickle naming none of the files is refused."""
    from jobs.common import run
    from jobs.import_open_musiclm import main as import_main

    argv, _ = _released_like_files(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"module.x": _RunsCode(str(marker))}}, tmp_path / "630k-audioset-best.pt")
    evil = ["--clap-checkpoint", str(tmp_path / "630k-audioset-best.pt")]
    for extra in (["--trust-pickle", str(tmp_path / "kmeans.joblib")], ["--trust-pickle", str(tmp_path / "k.joblib")]):
        with pytest.raises(SystemExit) as stop:
            run(lambda: import_main(argv + evil + extra))
        assert stop.value.code == 2 and not marker.exists() and not (tmp_path / "set").exists()
    with pytest.raises(SystemExit):  # trusted by name: its code runs (then it is no state dict of tensors)
        run(lambda: import_main(argv + evil + ["--trust-pickle", str(tmp_path / "kmeans.joblib"),
                                               "--trust-pickle", str(tmp_path / "630k-audioset-best.pt")]))
    assert marker.exists()
