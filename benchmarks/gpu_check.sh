#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): DiPO with the fused LM head and the hidden
# reference cache against plain fine-tuning on a ~1B-parameter Llama-shape model, bf16, DeepSpeed
# ZeRO-3 on one GPU (tokens/s, MFU, peak memory, fused vs logits memory), and the generation
# tokens/s of `dipo-scale evaluate --device cuda`; it rewrites docs/benchmarks.md's GPU section.
# What each figure measures: benchmarks/gpu_check.py's docstring.
#
#   benchmarks/gpu_check.sh                 # one GPU; an H200: under 8 minutes (a hard limit here)
#   benchmarks/gpu_check.sh --dry-run       # CPU, sizes scaled down: checks that it runs
#   options: --json PATH  --docs PATH ('' : leave the docs alone)  --work DIR  --peak-tflops N
#
# Python: $PYTHON, else the repository's .venv, else python3 (the Docker image's CUDA environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
LIMIT=480  # 8 minutes, all included
if [[ " $* " == *" --dry-run "* ]]; then
  export DS_ACCELERATOR=cpu
else
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; then
    echo "gpu_check: no GPU here (nvidia-smi); on CPU run: benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
  fi
  unset DS_ACCELERATOR  # DeepSpeed picks CUDA
fi
if [[ "$PY" == */* ]]; then export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"; fi  # its ninja and ray first
export WANDB_MODE=offline RAY_DEDUP_LOGS=0
exec timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_check.py "$@"
