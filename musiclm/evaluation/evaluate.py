"""Compare model sets on a prompt set by CLAP text–audio similarity (REFERENCE.md: pretrained vs fine-tuned on
7 prompts). Every set generates N candidates per prompt with the same settings and seed
(all sets in one actor pool, ``generation.batch.generate_sets``; finished prompts are not generated again); each
prompt gets its best-of-N and mean score per set.

    OUT/<set>/<index>-<prompt>/      the best WAV(s) and report.json of each prompt
    OUT/results.csv, results.md      prompt × set: best-of-N, one random candidate's and mean CLAP score
    OUT/scores.png                   bars: best-of-N per prompt and set; dots: the mean
    OUT/tensorboard/                 scores and the best clip of each prompt and set
    OUT/fad.json                     with reference audio: FAD of each set's clips against it (CLAP and
                                     semantic-encoder embeddings), sample counts, embedding models

Prompts come from a text file (one per line), a JSON list, a MusicCaps-style CSV (``ytid``, ``start_s``,
``end_s``, ``caption``, other columns ignored), or a token dataset's valid split (``dataset_prompts``: each
track's caption and the source audio of its first clip). Reference audio for FAD: a folder of clips
(``reference_audio``; with a CSV, the clip of each prompt is the file named by its ytid, any audio extension,
cut to [start_s, end_s] when it is longer; otherwise every clip in the folder), or the prompts' own clips when
they come from a token dataset.

The random candidate's score is candidate 0's (drawn first, chosen by nobody): best minus random is what
reranking by CLAP buys on that prompt.

Scores are comparable only when every set is scored by the same CLAP encoder, so sets whose token systems
have different CLAP weights are refused.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..infra import storage

from ..generation.batch import generate_sets
from ..generation.generate import GenerateSettings, ModelSet

RESULTS = "results"
PLOT = "scores.png"


@dataclass
class Prompt:
    caption: str
    ytid: str | None = None  # MusicCaps: the YouTube id its reference clip is named by
    start_s: float | None = None
    end_s: float | None = None
    audio: str | None = None  # its reference audio (a file or object; a token dataset's source track)


def _seconds(value) -> float | None:
    return float(value) if value not in (None, "") else None


def read_prompt_set(path: str) -> list[Prompt]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped), a JSON list of
    strings, or a CSV with a ``caption`` column (MusicCaps' layout: ytid, start_s, end_s, ..., caption, ...)."""
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8"
                         ) from None
    if path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "caption" not in rows[0]:
            raise ValueError(f"{path}: a CSV prompt set needs a 'caption' column (MusicCaps' columns: ytid, "
                             f"start_s, end_s, ..., caption)")
        prompts = [Prompt(r["caption"].strip(), (r.get("ytid") or "").strip() or None, _seconds(r.get("start_s")),
                          _seconds(r.get("end_s"))) for r in rows if (r.get("caption") or "").strip()]
    elif path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {path} is not valid JSON ({e}): give a JSON list of strings") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise ValueError(f"{path}: a JSON prompt set is a list of strings")
        prompts = [Prompt(p.strip()) for p in data]
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts: give one prompt per line, a JSON list of strings, or a CSV "
                         f"with a caption column")
    return prompts


def dataset_prompts(root: str) -> list[Prompt]:
    """Prompts and reference clips from a token dataset's valid split: one per track (its first clip, in track
    order), the caption as prompt and the clip's span of the source audio as reference. The source files must
    still be readable where the dataset says they are."""
    from ..data.shards import open_manifest, split_files

    open_manifest(root)
    columns = ["track_id", "path", "caption", "start_seconds", "audio_seconds"]
    first: dict[str, dict] = {}
    for f in split_files(root, "valid"):
        for r in storage.read_parquet(f, columns=columns).to_pylist():
            if r["caption"] and (r["track_id"] not in first or r["start_seconds"] < first[r["track_id"]]["start_seconds"]):
                first[r["track_id"]] = r
    rows = [first[k] for k in sorted(first)]
    if not rows:
        raise ValueError(f"token dataset {root} has no captioned rows in its valid split to use as prompts and "
                         f"reference audio: preprocess with a valid fraction (data.valid_frac > 0)")
    return [Prompt(r["caption"], None, r["start_seconds"], r["start_seconds"] + r["audio_seconds"], r["path"])
            for r in rows]


def parse_model_sets(spec: str, token_system: str | None = None) -> dict[str, ModelSet]:
    """``NAME=DIR[,NAME=DIR…]`` (model-set folders or JSON files) into named model sets."""
    sets = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, where = part.partition("=")
        if not sep or not name or not where:
            raise ValueError(f"--models: {part!r} is not NAME=DIR (e.g. pretrained=models/released,tuned=runs/set)")
        if name in sets:
            raise ValueError(f"--models: the name {name!r} is given twice")
        sets[name] = ModelSet.from_dir(where, token_system)
    if not sets:
        raise ValueError("--models: give at least one NAME=DIR")
    return sets


def check_same_scorer(sets: dict[str, ModelSet]) -> None:
    from ..tokens.system import read_meta

    claps = {name: read_meta(ms.token_system)[0]["fingerprint_parts"]["clap_weights"] for name, ms in sets.items()}
    if len(set(claps.values())) > 1:
        detail = ", ".join(f"{n}: {c[:12]}" for n, c in claps.items())
        raise ValueError(f"the model sets' token systems use different CLAP weights ({detail}), so their CLAP "
                         f"scores are not comparable; give --token-system to generate and score all with one")


def evaluate(prompts: list[str | Prompt], sets: dict[str, ModelSet], settings: GenerateSettings, out: str | Path, *,
             cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
             gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
             reference_audio: str | None = None, references: list | None = None, reference_cache: str | None = None,
             guidance_scales: list[float] | None = None, log=print) -> list[dict]:
    """Generate every prompt with every set, score, and write the table, plot and TensorBoard; FAD against
    ``references`` ((clip, Prompt | None) pairs: ``reference_clips`` or ``prompt_clips``) or the clips of
    folder ``reference_audio``. ``reference_cache``: an .npz file keeping the reference embeddings between calls
    (watch-eval embeds the same reference for every checkpoint). ``guidance_scales``: each set is sampled at each
    scale (every stage's guidance), a column each (``guided_sets``)."""
    check_same_scorer(sets)
    items = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    prompts = [p.caption for p in items]
    if reference_audio:
        references = reference_clips(reference_audio, items, log)
    out = storage.location(out)
    sets, set_settings = guided_sets(sets, settings, guidance_scales)
    log(f"evaluate: model sets {', '.join(sets)}")
    indexes = generate_sets(prompts, {name: (models, storage.join(out, name)) for name, models in sets.items()}, settings,
                            cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus, actors=actors,
                            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, set_settings=set_settings,
                            log=log)
    rows = [{"prompt_index": r["index"], "prompt": r["prompt"], "model_set": name,
             "best_score": r["best_score"], "random_score": r["random_score"], "mean_score": r["mean_score"],
             "num_samples": settings.num_samples, "best_file": (r["files"] or [None])[0],
             "files": r["files"], "error": r["error"]} for name, index in indexes.items() for r in index]
    fads = fad_against_reference(rows, sets, references, out, log, reference_cache) if references else None
    write_table(rows, out, fads)
    plot(rows, storage.join(out, PLOT))
    log_tensorboard(rows, storage.join(out, "tensorboard"), fads)
    return rows


def guided_name(name: str, guidance: float) -> str:
    """The column (and folder) of set ``name`` sampled at ``guidance``: the set's own name at 1 (so an unguided
    evaluation's finished prompts count), ``name@g<scale>`` otherwise."""
    return name if guidance == 1 else f"{name}@g{guidance:g}"


def guided_sets(sets: dict[str, ModelSet], settings: GenerateSettings,
                scales: list[float] | None) -> tuple[dict[str, ModelSet], dict[str, GenerateSettings]]:
    """Every set at every guidance scale (all stages at that scale): the columns' model sets and settings. Without
    ``scales``, the sets as given with ``settings``' own guidance."""
    if not scales:
        return dict(sets), {}
    columns, each = {}, {}
    for name, models in sets.items():
        for g in dict.fromkeys(scales):
            column = guided_name(name, g)
            columns[column] = models
            each[column] = dataclasses.replace(settings, semantic_guidance=g, coarse_guidance=g, fine_guidance=g)
    return columns, each


def reference_clips(folder: str, prompts: list[Prompt], log=print) -> list[tuple[str, Prompt | None]]:
    """The reference clips: each prompt's ytid-named file when the prompts have ytids, else every clip."""
    from ..audio.io import list_audio_files

    files = list_audio_files(folder)
    if not any(p.ytid for p in prompts):
        chosen = [(f, None) for f in files]
    else:
        by_id = {Path(f).stem: f for f in files}
        missing = [p.ytid for p in prompts if p.ytid and p.ytid not in by_id]
        if missing:
            log(f"evaluate: {len(missing)} of {len(prompts)} reference clips are not in {folder} "
                f"(e.g. {', '.join(missing[:3])}); FAD uses the {len(prompts) - len(missing)} found")
        chosen = [(by_id[p.ytid], p) for p in prompts if p.ytid in by_id]
    if len(chosen) < 2:
        raise ValueError(f"--reference-audio {folder}: {len(chosen)} usable clips; FAD needs at least 2")
    return chosen


def prompt_clips(prompts: list[Prompt]) -> list[tuple[str, Prompt]]:
    """The reference clips the prompts carry (``dataset_prompts``)."""
    chosen = [(p.audio, p) for p in prompts if p.audio]
    if len(chosen) < 2:
        raise ValueError(f"{len(chosen)} prompts carry reference audio; FAD needs at least 2")
    return chosen


def _load_clip(path: str, rate: int, prompt: Prompt | None):
    from ..audio.io import decode_audio

    audio = decode_audio(storage.read_bytes(path), rate, path=path)[0]  # a file or an object in a bucket
    if prompt and prompt.start_s is not None and prompt.end_s is not None and \
            len(audio) > (prompt.end_s - prompt.start_s + 1) * rate:  # the whole video's audio: cut the segment
        audio = audio[int(prompt.start_s * rate): int(prompt.end_s * rate)]
    return audio


def fad_against_reference(rows: list[dict], sets: dict[str, ModelSet], references, out: str, log=print,
                          cache: str | None = None) -> dict:
    """FAD of each set's saved clips against the reference clips, with CLAP audio embeddings and with the
    semantic encoder's (the first set's token system embeds everything, so the numbers compare); fad.json."""
    import numpy as np

    from ..tokens.system import TokenSystem
    from .quality import clap_embeddings, embedding_names, fad, semantic_embeddings

    system = TokenSystem.load(next(iter(sets.values())).token_system)
    rate = system.clap.sample_rate

    def embed(clips) -> dict:
        audio = [_load_clip(path, rate, prompt) for path, prompt in clips]
        return {"clap": np.concatenate([clap_embeddings(system, a, rate).numpy() for a in audio]),
                "semantic": np.concatenate([semantic_embeddings(system, a, rate).numpy() for a in audio])}

    names = embedding_names(system)
    log(f"evaluate: FAD against {len(references)} reference clips")
    ref = _cached_reference(cache, references, names, lambda: embed(references))
    result = {"reference_clips": len(references), "embeddings": names, "sets": {}}
    for name in sets:
        files = [f for r in rows if r["model_set"] == name for f in (r.get("files") or [])]
        if len(files) < 2:
            result["sets"][name] = {"error": f"{len(files)} generated clips; FAD needs at least 2"}
            continue
        gen = embed([(f, None) for f in files])
        result["sets"][name] = {f"fad_{kind}": fad(gen[kind], ref[kind]) for kind in ("clap", "semantic")}
    storage.write_json(storage.join(out, "fad.json"), result)
    return result


def _cached_reference(cache: str | None, references, names: dict, embed) -> dict:
    """The reference embeddings, from ``cache`` when it was made of the same clips with the same embedding
    models, else computed (and kept there)."""
    import hashlib

    import numpy as np

    key = hashlib.sha256(json.dumps([[str(c), p.start_s if p else None, p.end_s if p else None]
                                     for c, p in references] + [names], sort_keys=True).encode()).hexdigest()
    if cache and storage.exists(cache):
        with np.load(io.BytesIO(storage.read_bytes(cache)), allow_pickle=False) as data:
            if str(data["key"]) == key:
                return {"clap": data["clap"], "semantic": data["semantic"]}
    ref = embed()
    if cache:
        buf = io.BytesIO()
        np.savez(buf, key=np.asarray(key), **ref)
        storage.write_bytes(cache, buf.getvalue())
    return ref


def _by(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    names = list(dict.fromkeys(r["model_set"] for r in rows))
    return prompts, names, {(r["prompt"], r["model_set"]): r for r in rows}


SAME_SCORE = 5e-4  # CLAP scores closer than this are equal at the table's precision (4 decimals)


def compare_sentence(a: str, b: str, n: int, pairs: list[tuple[float, float]]) -> str:
    """How set ``a``'s best-of-``n`` scores compare with ``b``'s, prompt by prompt; a difference under
    ``SAME_SCORE`` counts as neither higher nor lower (a random CLAP scores every clip alike)."""
    higher = sum(x - y >= SAME_SCORE for x, y in pairs)
    lower = sum(y - x >= SAME_SCORE for x, y in pairs)
    same = len(pairs) - higher - lower
    if same == len(pairs):
        return f"{a} and {b} (best of {n}) score the same (within {SAME_SCORE:g}) on all {len(pairs)} prompts."
    return (f"{a} scores higher than {b} (best of {n}) on {higher} of {len(pairs)} prompts, lower on {lower}"
            + (f", the same (within {SAME_SCORE:g}) on {same}." if same else "."))


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def mean_of_known(values) -> float | None:
    """The mean of the values that are not None (prompts that failed have none); None when none are known."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_table(rows: list[dict], out: str | Path, fads: dict | None = None) -> None:
    fields = ["prompt_index", "prompt", "model_set", "best_score", "random_score", "mean_score", "num_samples",
              "best_file", "error"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out, f"{RESULTS}.csv"), table.getvalue())
    prompts, names, cell = _by(rows)
    n = rows[0]["num_samples"] if rows else 0
    kinds = ("best", "random", "mean")
    lines = [f"CLAP text–audio cosine similarity per prompt: the best of {n} candidates (what generation keeps), "
             f"one random candidate (no reranking) and the mean of the {n}. Best minus random is what reranking "
             f"buys.", "",
             "| # | prompt | " + " | ".join(f"{m} {k}" for m in names for k in kinds) + " |",
             "|---|---|" + "---|" * len(kinds) * len(names)]
    for i, p in enumerate(prompts):
        cells = " | ".join(_fmt(cell[p, m].get(f"{k}_score")) for m in names for k in kinds)
        lines.append(f"| {i} | {p} | {cells} |")
    means = " | ".join(_fmt(mean_of_known(cell[p, m].get(f"{k}_score") for p in prompts)) for m in names for k in kinds)
    lines.append(f"| | **mean** | {means} |")
    for m in names:
        gain = mean_of_known(cell[p, m]["best_score"] - cell[p, m]["random_score"] for p in prompts
                     if cell[p, m]["best_score"] is not None and cell[p, m].get("random_score") is not None)
        lines.append(f"\n{m}: reranking {n} candidates by CLAP raises the score by {_fmt(gain)} on average "
                     f"over one random candidate.")
    for m in names:  # what guidance buys: a guided column against its set's unguided one
        base = m.split("@g")[0]
        if m != base and base in names:
            gain = mean_of_known(cell[p, m]["best_score"] - cell[p, base]["best_score"] for p in prompts
                                 if cell[p, m]["best_score"] is not None and cell[p, base]["best_score"] is not None)
            lines.append(f"\n{m}: guidance {m.split('@g')[1]} changes the best-of-{n} score by {_fmt(gain)} on "
                         f"average over {base} unguided.")
    for j, a in enumerate(names):
        for b in names[j + 1:]:
            pairs = [(cell[p, a]["best_score"], cell[p, b]["best_score"]) for p in prompts]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            lines.append("\n" + compare_sentence(a, b, n, pairs))
    if fads:
        lines += ["", f"FAD against {fads['reference_clips']} reference clips (lower is closer to the reference "
                      f"music); embeddings: CLAP {fads['embeddings']['clap']}; semantic {fads['embeddings']['semantic']}.",
                  "", "| model set | FAD (CLAP) | FAD (semantic) | generated embeddings | notes |", "|---|---|---|---|---|"]
        for name, f in fads["sets"].items():
            if "error" in f:
                lines.append(f"| {name} | — | — | — | {f['error']} |")
                continue
            notes = "; ".join(dict.fromkeys(w for k in ("fad_clap", "fad_semantic") for w in f[k]["warnings"]))
            lines.append(f"| {name} | {_fmt(f['fad_clap']['fad'])} | {_fmt(f['fad_semantic']['fad'])} | "
                         f"{f['fad_clap']['n_generated']} / {f['fad_semantic']['n_generated']} | {notes} |")
    storage.write_text(storage.join(out, f"{RESULTS}.md"), "\n".join(lines) + "\n")


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts, names, cell = _by(rows)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(prompts) + 2), 4.0))
    for j, m in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(prompts))]
        best = [cell[p, m]["best_score"] if cell[p, m]["best_score"] is not None else math.nan for p in prompts]
        mean = [cell[p, m]["mean_score"] if cell[p, m]["mean_score"] is not None else math.nan for p in prompts]
        ax.bar(xs, best, width, label=f"{m} (best of {rows[0]['num_samples']})")
        ax.plot(xs, mean, "k.", markersize=8, label="mean" if j == 0 else None)
        rand = [cell[p, m].get("random_score") for p in prompts]
        ax.plot(xs, [math.nan if v is None else v for v in rand], "rx", markersize=7,
                label="one random candidate" if j == 0 else None)
    ax.set_xticks(range(len(prompts)))
    ax.set_xticklabels([p if len(p) <= 24 else p[:22] + "…" for p in prompts], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("CLAP cosine similarity")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("text–audio similarity by model set")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format=storage.name(path).rsplit(".", 1)[-1])
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def log_tensorboard(rows: list[dict], log_dir: str | Path, fads: dict | None = None) -> None:
    import soundfile as sf

    from ..train.metrics import TensorBoard

    board = TensorBoard(str(log_dir))
    for r in rows:
        m, i = r["model_set"], r["prompt_index"]
        if r["best_score"] is not None:
            board.scalars({f"evaluate/{m}/best": r["best_score"], f"evaluate/{m}/mean": r["mean_score"],
                           **({f"evaluate/{m}/random": r["random_score"]} if r.get("random_score") is not None
                              else {})}, i)
        if r["best_file"]:
            audio, rate = sf.read(io.BytesIO(storage.read_bytes(r["best_file"])), dtype="float32")
            board.audio(f"samples/{m}/{i:03d}", audio, rate, 0)
        board.text(f"prompts/{i:03d}", r["prompt"], 0)
    for name, f in ((fads or {}).get("sets") or {}).items():
        if "error" not in f:
            board.scalars({f"evaluate/{name}/fad_clap": f["fad_clap"]["fad"],
                           f"evaluate/{name}/fad_semantic": f["fad_semantic"]["fad"]}, 0)
    board.close()


__all__ = ["evaluate", "guided_name", "guided_sets", "mean_of_known", "parse_model_sets", "dataset_prompts", "prompt_clips", "read_prompt_set", "Prompt", "check_same_scorer", "write_table", "plot", "RESULTS",
           "PLOT"]

