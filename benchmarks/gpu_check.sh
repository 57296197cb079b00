#!/usr/bin/env bash
# The GPU checks of issues 17, 20, 41, 43 and 44 (each item sized for one 10-minute call; items 1 and 2 together take
# about 8 minutes on an H100):
#   1. benchmarks/train_step_gpu.py  plain PyTorch bf16 step of the large stages at their real windows, dense mask
#                                    vs FlexAttention (loss and gradients compared first): step time, MFU, memory
#                                    (TRAIN_COMPILE=1 also times them compiled: minutes more)
#   2. benchmarks/generate.py        10 s text-to-audio, best of 4 batched, untrained large stages, bf16 weights,
#                                    compiled (CUDA graphs) decoding (DECODINGS=compiled,dynamic adds the growing
#                                    cache): real-time factor with the fine stage's windows one after the other vs
#                                    batched (WINDOW_BATCHES, default 8,1: the new default first)
#   3. benchmarks/gpu_smoke.py       with SMOKE=1 (passed on an H200, 2026-11-26): the real
#                                    `musiclm train --use-gpu` path (Ray Train, DeepSpeed, NCCL, bf16):
#                                    SMOKE_SIZES (tiny; tiny,large adds the large coarse transformer), 30 steps,
#                                    checkpoint, resume, export; SMOKE_SET="train.compile=true" adds overrides
#   ALIGN=1 first times the feed-forward's matmuls at open-musiclm's inner width (2,730: rows not 16-byte aligned)
#                                    vs padded widths (benchmarks/ff_align.py; seconds)
#   DECODE_PROFILE=1 also profiles one compiled bf16 window per large stage (benchmarks/generate.py --profile)
#   DECODE_FORMS=1 times one compiled bf16 decoding step of the large fine stage (4 and 20 rows) with its attention
#                                    in both forms: the heads as query rows of the one key/value head (the default
#                                    since 2026-11-27) vs expanded to every head (benchmarks/decode_step.py)
#   DECODE_MODE=max-autotune also times each large stage's bf16 window compiled in that torch.compile mode beside
#                                    the default (reduce-overhead): Triton matmuls tuned for one token per step
#   STEP=0 / GEN=0 skip 1. / 2. (measured already: RESULTS.md), so that a lease goes to what is still open. Issue 20's
#   next lease, in this order, one call each: (a) `STEP=0 ALIGN=1 DECODE_FORMS=1` (about 9 minutes: whether the
#   feed-forward's unaligned width costs matmul speed, for the MFU goal; a decoding step with the heads as query
#   rows vs expanded, 2.1-11.6x on CPUs; then the whole 10 s generation with the fine windows batched, the default,
#   against one after the other: whether the delivered best-of-4 clip's real-time factor is under 1),
#   (b) `STEP=0 GEN=0 SMOKE=1 SMOKE_SIZES=large SMOKE_SET=train.compile=true SMOKE_TIMEOUT=420` (whether
#   train.compile can become the GPU default: the compile took 80 s per stage in plain PyTorch), (c) `GEN=0
#   TRAIN_ARGS="--stages coarse --attentions flex --flex-bias-rows 1,128 --profile 12"` (whether FlexAttention's
#   backward, 5.6x its forward on the H100, gets faster with the bias table copied per query row: if so,
#   FLEX_BIAS_ROWS = 128; if flex then beats the dense mask, `auto` should pick it), (d) `STEP=0 GEN=0
#   DECODE_PROFILE=1` (where a 2 ms decoding step goes), (e) `STEP=0 GEN=0 DECODE_MODE=max-autotune`, (f) `GEN=0
#   TRAIN_COMPILE=1 TRAIN_ARGS="--stages coarse --attentions dense --profile 20"` (where a compiled training step's
#   time goes: the MFU goal), (g) `STEP=0 PROMPTS=4 WINDOW_BATCHES=8 GEN_TIMEOUT=480` (prompts sampled together),
#   (h) `STEP=0 GEN=0 DECODE_COMPILE=1` (the compiled decoding's shared block, measured on CPUs only: compile and
#   step time against every layer compiled apart). TRAIN_ARGS: more options of train_step_gpu.py.
#   DECODE_COMPILE=1 runs benchmarks/decode_compile.py on the large coarse stage (bf16, batch 4).
#   PROMPTS=4 adds to 2. four prompts one at a time vs together (what a Ray prompt worker does with its batches).
#   WORLD=1 runs issue 41's offline world at a size 2 CPUs cannot: `musiclm pipeline --use-gpu` on WORLD_TRACKS
#                                    (1024) synthetic tracks, the semantic stage WORLD_SEMANTIC_STEPS (1000), coarse
#                                    and fine WORLD_STEPS (500), 48 held-out prompts; its prompt-following block to
#                                    $OUT/world_prompt_following.json. Never timed on a GPU: on 2 CPUs 256 tracks took
#                                    15 minutes and made the music follow its prompt on one seed of two
#                                    (RESULTS.md, 2026-12-06); past WORLD_TIMEOUT (560 s) rerun with the same
#                                    WORLD_DIR and every finished step is skipped.
#   MFU=1 (issue 43) times the large stages' bf16 training step in plain PyTorch at micro-batches MFU_BATCHES (8,16,32)
#                                    with the feed-forward's real width and padded to 64 (train.ff_align), dense
#                                    attention, eager (MFU_COMPILE=1: compiled too, about 80 s more per stage and
#                                    batch; MFU_STAGES, default semantic,coarse,fine): MFU and memory against
#                                    micro-batch, every path checked against float32 first. The real path's
#                                    train/mfu: SMOKE=1 SMOKE_SIZES=large SMOKE_BATCH=32 SMOKE_SET="train.ff_align=64"
#   TOKENIZE=1 (issue 44) times tokenizing at the released sizes (benchmarks/tokenize_gpu.py: HTSAT-tiny CLAP, a
#                                    MERT-v0-sized HuBERT, EnCodec 24 kHz, random weights, TOKENIZE_TRACKS (256)
#                                    synthetic 30 s MP3s): decode, waveforms and CLAP features per core, each model on
#                                    the GPU one track at a time and in batches, and `musiclm preprocess` end to end
#                                    with the GPU's utilization; which part bounds it
# Each writes its output to $OUT (default gpu_check_out). Needs the project's packages: on a machine without them,
# put their wheels in .whl/ (`python benchmarks/gpu_wheels.py`) and they are installed under /tmp/site.
#     bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, ray, deepspeed, transformers, pyarrow; print("torch", torch.__version__, "cuda", torch.version.cuda, "ray", ray.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "pyarrow", pyarrow.__version__)'
} 2>&1 | tee "$OUT/versions.txt"
step_default=200; [ -n "${TRAIN_COMPILE:-}" ] && step_default=400  # inductor on the large stages: minutes
if [ -n "${ALIGN:-}" ]; then  # the feed-forward's matmuls at the real inner width (2,730) vs padded: seconds
  timeout "${ALIGN_TIMEOUT:-120}" $PY benchmarks/ff_align.py --device cuda 2>&1 | tee "$OUT/ff_align.txt"
fi
if [ "${STEP:-1}" != 0 ]; then
  timeout "${STEP_TIMEOUT:-$step_default}" $PY benchmarks/train_step_gpu.py --preset large --batch-size 8 --steps 12 \
    --warmup 4 ${TRAIN_COMPILE:+--compile} ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_step_gpu.txt"
fi
if [ -n "${DECODE_FORMS:-}" ]; then  # a decoding step's attention: heads as query rows (default) vs expanded
  timeout "${FORMS_TIMEOUT:-240}" $PY benchmarks/decode_step.py --device cuda --depth 0 --dtype bfloat16 \
    --rows 4,20 --repeats 1 2>&1 | tee "$OUT/decode_forms.txt"
fi
if [ "${GEN:-1}" != 0 ]; then
  timeout "${GEN_TIMEOUT:-300}" $PY benchmarks/generate.py --device cuda --models-preset large --skip-windows --seconds 10 \
    --num-samples 4 --decodings "${DECODINGS:-compiled}" --window-batches "${WINDOW_BATCHES:-8,1}" \
    ${PROMPTS:+--prompts $PROMPTS} 2>&1 | tee "$OUT/generate.txt"
fi
if [ -n "${DECODE_PROFILE:-}" ]; then  # where a compiled decode step's time goes: kernels per token, top kernels
  timeout "${PROFILE_TIMEOUT:-240}" $PY benchmarks/generate.py --device cuda --preset large --ways compiled \
    --window-dtype bfloat16 --fraction 0.1 --skip-whole --profile 15 2>&1 | tee "$OUT/decode_profile.txt"
fi
if [ -n "${DECODE_COMPILE:-}" ]; then  # the decoding step's layers compiled apart vs as one shared block (regions)
  timeout "${DC_TIMEOUT:-300}" $PY benchmarks/decode_compile.py --device cuda --preset large --depth 0 --batch 4 \
    --dtype bfloat16 --fraction 0.1 2>&1 | tee "$OUT/decode_compile.txt"
fi
if [ -n "${DECODE_MODE:-}" ]; then  # a 10th of each window: the default compiled step, then DECODE_MODE's
  for mode in reduce-overhead "$DECODE_MODE"; do
    timeout "${MODE_TIMEOUT:-300}" $PY benchmarks/generate.py --device cuda --preset large --ways compiled \
      --window-dtype bfloat16 --fraction 0.1 --skip-whole --batch 4 --compile-mode "$mode" 2>&1 \
      | tee -a "$OUT/decode_modes.txt"
  done
fi
if [ -n "${MFU:-}" ]; then  # issue 43: MFU against micro-batch, feed-forward real and aligned (plain PyTorch, bf16)
  timeout "${MFU_TIMEOUT:-420}" $PY benchmarks/train_step_gpu.py --preset large --stages "${MFU_STAGES:-semantic,coarse,fine}" \
    --attentions dense --batch-sizes "${MFU_BATCHES:-8,16,32}" --ff-aligns 1,64 --steps 8 --warmup 3 \
    ${MFU_COMPILE:+--compile} 2>&1 | tee "$OUT/train_mfu.txt"
fi
if [ -n "${SMOKE:-}" ]; then
  timeout "${SMOKE_TIMEOUT:-150}" $PY benchmarks/gpu_smoke.py --workdir /tmp/gpu_smoke --sizes "${SMOKE_SIZES:-tiny}" \
    --steps 30 --batch-size "${SMOKE_BATCH:-8}" ${SMOKE_SET:+--set $SMOKE_SET} 2>&1 | tee "$OUT/gpu_smoke.txt"
fi
if [ -n "${TOKENIZE:-}" ]; then  # issue 44: tokenizing at the released sizes, what bounds it
  timeout "${TOKENIZE_TIMEOUT:-560}" $PY benchmarks/tokenize_gpu.py --device cuda --workdir /tmp/tokenize_gpu \
    --tracks "${TOKENIZE_TRACKS:-256}" --timed 32 --batches 1,8,32 --timeout 300 2>&1 | tee "$OUT/tokenize_gpu.txt"
fi
if [ -n "${WORLD:-}" ]; then  # issue 41: does the music follow the prompt in a world of 1024 tracks?
  WORLD_DIR=${WORLD_DIR:-/tmp/world}
  timeout "${WORLD_TIMEOUT:-560}" $PY -m jobs.pipeline --workdir "$WORLD_DIR" --use-gpu \
    --num-tracks "${WORLD_TRACKS:-1024}" --semantic-steps "${WORLD_SEMANTIC_STEPS:-1000}" \
    --train-steps "${WORLD_STEPS:-500}" --max-prompts 48 2>&1 | tee "$OUT/world.txt"
  cp "$WORLD_DIR/prompt_following.json" "$OUT/world_prompt_following.json" 2>/dev/null
  cp "$WORLD_DIR/pipeline.json" "$OUT/world_pipeline.json" 2>/dev/null
fi
