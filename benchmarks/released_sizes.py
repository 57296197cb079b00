"""A full-size rehearsal of the seed's workflow: every released piece at its real size, through the CLI.

Writes, with random weights, every file open-musiclm's users start from, each at the exact size and in the exact
key layout of the released one (layouts made by the producers' own code: tests/data/open_musiclm_files/ and
tests/data/laion_clap/layout.json):

  semantic/coarse/fine.transformer.*.pt  open-musiclm's stage state dicts of musiclm_large_small_context.json
                                         (283M / 289M / 298M parameters)
  clap.rvq.950_no_fusion.pt              vector_quantize_pytorch's ResidualVQ state dict, 12 x 1024 x 512
  kmeans_10s_no_fusion.joblib            scikit-learn's MiniBatchKMeans, 1,024 x 768, pickled by joblib
  630k-audioset-best.pt                  laion_clap's {'state_dict': {'module.*'}}: HTSAT-tiny + RoBERTa-base
  MERT-v0/                               a HubertModel of MERT-v0's size (12 layers, width 768), transformers format
  encodec_24khz/                         EnCodec 24 kHz at its real configuration, transformers format

then runs, each as a user would (`python -m jobs.<verb>`, a fresh process, its own local Ray where it uses Ray):

  synth -> import-open-musiclm -> fit-rvq and fit-kmeans (refused: imported) -> preprocess (4 tracks of 30 s) ->
  train semantic, coarse, fine (a few steps each, --init-from the imported stage, 2 workers, ZeRO-2, activation
  checkpointing: without it the fine stage's two workers needed more than 24 GB) -> generate (2 s) ->
  evaluate (2 prompts, imported vs fine-tuned)

and prints each step's wall time and peak memory (the step's process tree, Ray's workers included, sampled every
0.2 s: summed resident memory, and the machine's used memory above the step's start). Not part of `make test`:
on the 2-core development machine it takes about an hour and 8 GB of disk.

    python benchmarks/released_sizes.py [--workdir DIR] [--steps 2] [--num-workers 2] [--from STEP] [--until STEP]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
STEPS = ("files", "synth", "import", "fit-refused", "preprocess", "train-semantic", "train-coarse", "train-fine",
         "generate", "evaluate")


# ------------------------------------------------------------------------------------------ the released files

def random_like_layout(keys: dict, seed: int, fixed: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a layout (name -> shape, dtype): norms' gains 1 and biases 0, BatchNorm statistics 0 / 1, integer
    buffers as given in ``fixed`` (or zeros), the rest normal with std 0.02; ``fixed`` overrides by name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, entry in keys.items():
        shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
        if fixed and name in fixed:
            out[name] = fixed[name].to(dtype).reshape(shape)
        elif not dtype.is_floating_point:
            out[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith(("gamma", "running_var")) or (len(shape) == 1 and name.endswith("weight")):
            out[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith(("beta", "running_mean")) or (len(shape) == 1 and name.endswith("bias")):
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return out


def write_released_files(w: Path) -> dict:
    """The released files at their real sizes, random weights, in the producers' layouts (see the docstring)."""
    w.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "open_musiclm_large_small_context.json", w / "musiclm_large_small_context.json")
    stages = json.loads((DATA / "open_musiclm_files" / "layout.json").read_text())
    files = {"config": str(w / "musiclm_large_small_context.json")}
    for seed, (stage, step) in enumerate((("semantic", 14000), ("coarse", 18000), ("fine", 24000))):
        path = w / f"{stage}.transformer.{step}.pt"
        torch.save(random_like_layout(stages[stage], seed), path)  # open-musiclm's trainer: torch.save(state_dict)
        files[stage] = str(path)

    rvq_layout = json.loads((DATA / "open_musiclm_files" / "rvq_layout.vqp-1.2.2.json").read_text())["keys"]
    g = torch.Generator().manual_seed(10)
    fixed = {}
    for q in range(12):
        embed = torch.nn.functional.normalize(torch.randn(1, 1024, 512, generator=g), dim=-1) * 0.5 ** q
        fixed.update({f"layers.{q}._codebook.embed": embed, f"layers.{q}._codebook.embed_avg": embed.clone(),
                      f"layers.{q}._codebook.cluster_size": torch.ones(1, 1024),
                      f"layers.{q}._codebook.initted": torch.ones(1)})
    torch.save(random_like_layout(rvq_layout, 11, fixed), w / "clap.rvq.950_no_fusion.pt")
    files["rvq"] = str(w / "clap.rvq.950_no_fusion.pt")

    import joblib
    from sklearn.cluster import MiniBatchKMeans

    features = np.random.default_rng(12).normal(size=(4096, 768)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=1024, n_init=1, max_iter=3, batch_size=4096, random_state=0,
                         compute_labels=False).fit(features)
    joblib.dump(km, w / "kmeans_10s_no_fusion.joblib")  # open-musiclm's learn_kmeans: joblib.dump(MiniBatchKMeans)
    files["kmeans"] = str(w / "kmeans_10s_no_fusion.joblib")

    # laion_clap's layout at HTSAT-tiny + roberta-base; the fixed buffers (shifted-window masks, relative position
    # indexes) taken from the fixture laion_clap made at the same depths, heads and window (same values)
    clap_layout = json.loads((DATA / "laion_clap" / "layout.json").read_text())["htsat_tiny"]["keys"]
    narrow = torch.load(DATA / "laion_clap" / "htsat_tiny.pt", weights_only=True)["state_dict"]
    fixed = {k.removeprefix("module."): v for k, v in narrow.items()
             if k.endswith(("attn_mask", "relative_position_index"))}
    fixed["text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    state = random_like_layout(clap_layout, 13, fixed)
    torch.save({"epoch": 45, "name": "rehearsal (random weights)",
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, w / "630k-audioset-best.pt")
    files["clap"] = str(w / "630k-audioset-best.pt")

    from transformers import EncodecConfig, EncodecModel, HubertConfig, HubertModel

    torch.manual_seed(14)
    HubertModel(HubertConfig()).save_pretrained(w / "MERT-v0")  # hubert-base = MERT-v0's sizes (95M)
    encodec = EncodecModel(EncodecConfig())  # facebook/encodec_24khz's configuration (24 kHz, 32 codebooks)
    with torch.no_grad():  # a random EnCodec's codebooks are zeros (every frame codes to 0): draw them
        latents = encodec.encoder(torch.randn(1, 1, 24000) * 0.1)
        for layer in encodec.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed) * latents.std())
            layer.codebook.inited.fill_(1.0)
    encodec.save_pretrained(w / "encodec_24khz")
    files.update(mert=str(w / "MERT-v0"), encodec=str(w / "encodec_24khz"))
    sizes = {k: round(os.path.getsize(v) / 2 ** 20) for k, v in files.items() if Path(v).is_file()}
    print("released-size files (MiB):", sizes, flush=True)
    return files


# --------------------------------------------------------------------------------------------- measuring a step

class Peak:
    """Peak summed RSS of a process tree and peak machine-wide used memory, sampled in a thread."""

    def __init__(self, pid: int):
        self.proc, self.tree, self.used = psutil.Process(pid), 0, 0
        self.base = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.tree = max(self.tree, total)
            self.used = max(self.used, psutil.virtual_memory().used - self.base)
            self._stop.wait(0.2)

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_step(name: str, argv: list[str], log: Path, expect_fail: str | None = None) -> dict:
    """Run ``python -m jobs.<verb> …`` as a user would; wall time, peak memory, exit status."""
    print(f"\n== {name}: musiclm {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = Peak(proc.pid)
        code = proc.wait()
        peak.stop()
    wall = time.perf_counter() - t0
    text = log.read_text()
    print("\n".join(text.splitlines()[-6:]), flush=True)
    ok = (code != 0 and expect_fail in text) if expect_fail else code == 0
    result = {"step": name, "wall_s": round(wall, 1), "peak_tree_gib": round(peak.tree / 2 ** 30, 2),
              "peak_used_gib": round(peak.used / 2 ** 30, 2), "exit": code, "ok": ok, "log": str(log)}
    print(f"-> {name}: {'ok' if ok else 'FAILED'} in {wall:.0f} s, peak process tree {result['peak_tree_gib']} GiB, "
          f"machine +{result['peak_used_gib']} GiB", flush=True)
    if not ok:
        raise SystemExit(f"{name} failed (exit {code}); see {log}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/musiclm-released-sizes"))
    p.add_argument("--steps", type=int, default=2, help="training steps per stage")
    p.add_argument("--num-workers", type=int, default=2, help="training workers (DeepSpeed ZeRO-2)")
    p.add_argument("--from", dest="start", choices=STEPS, default="files",
                   help="skip the steps before this one (their outputs must be in --workdir)")
    p.add_argument("--until", choices=STEPS, default=STEPS[-1], help="stop after this step")
    args = p.parse_args()
    w = args.workdir
    logs = w / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = STEPS[STEPS.index(args.start): STEPS.index(args.until) + 1]
    results = []
    files_json = w / "files.json"
    if "files" in todo:
        t0 = time.perf_counter()
        files = write_released_files(w / "released")
        files_json.write_text(json.dumps(files, indent=1))
        results.append({"step": "files", "wall_s": round(time.perf_counter() - t0, 1), "ok": True})
    files = json.loads(files_json.read_text())
    models, ts = w / "models" / "open-musiclm", w / "models" / "open-musiclm" / "token_system"
    tokenizer = str(DATA / "laion_clap" / "tokenizer")  # roberta-base's files cannot be fetched here
    steps = {
        "synth": (["synth", "--out", str(w / "audio"), "--num-tracks", "4", "--seconds", "30"], None),
        "import": (["import-open-musiclm", "--config", files["config"], "--semantic", files["semantic"],
                    "--coarse", files["coarse"], "--fine", files["fine"], "--rvq", files["rvq"],
                    "--kmeans", files["kmeans"], "--trust-pickle", files["kmeans"], "--clap-checkpoint", files["clap"],
                    "--clap-tokenizer", tokenizer, "--mert", files["mert"], "--encodec", files["encodec"],
                    "--out", str(models), "--overwrite"], None),
        "fit-refused": (["fit-rvq", "--token-system", str(ts), "--audio", str(w / "audio")], "already fitted"),
        "preprocess": (["preprocess", "--source", str(w / "audio"), "--token-system", str(ts),
                        "--out", str(w / "tokens"), "--set", "valid_frac=0.25"], None),
        "generate": (["generate", "a calm piano piece", "--semantic", str(w / "runs" / "semantic"),
                      "--coarse", str(w / "runs" / "coarse"), "--fine", str(w / "runs" / "fine"),
                      "--token-system", str(ts), "--duration", "2", "--num-samples", "2", "--top", "1",
                      "--out", str(w / "gen")], None),
        "evaluate": (["evaluate", "--prompts", str(w / "prompts.txt"),
                      "--models", f"imported={models},tuned={w / 'tuned.json'}", "--duration", "2",
                      "--num-samples", "1", "--out", str(w / "eval")], None),
    }
    for stage in ("semantic", "coarse", "fine"):
        steps[f"train-{stage}"] = (
            ["train", "--stage", stage, "--preset", "large", "--data", str(w / "tokens"), "--run-name", stage,
             "--storage", str(w / "runs"), "--init-from", str(models / stage), "--token-system", str(ts),
             "--num-workers", str(args.num_workers), "--cpu",
             "--set", f"train.num_train_steps={args.steps}", "train.batch_size=1", "train.grad_accum_every=1",
             "train.lr_warmup=0", f"train.save_results_every={args.steps}", f"train.save_model_every={args.steps}",
             "train.valid_batches=1", "train.log_every=1", "train.activation_checkpointing=true"], None)
    (w / "prompts.txt").write_text("a calm piano piece\nfast electronic drums\n")
    (w / "tuned.json").write_text(json.dumps({s: str(w / "runs" / s) for s in ("semantic", "coarse", "fine")}
                                             | {"token_system": str(ts)}))
    for name in todo:
        if name in steps:
            argv, expect_fail = steps[name]
            results.append(run_step(name, argv, logs / f"{name}.log", expect_fail))
    earlier = json.loads((w / "results.json").read_text()) if (w / "results.json").exists() else []
    merged = {r["step"]: r for r in earlier + results}  # this run's figures replace an earlier run's
    results = [merged[s] for s in STEPS if s in merged]
    (w / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| step | wall (s) | peak, process tree (GiB) | peak, machine (+GiB) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['wall_s']} | {r.get('peak_tree_gib', '')} | {r.get('peak_used_gib', '')} |")


if __name__ == "__main__":
    main()
