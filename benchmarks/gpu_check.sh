#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): the real path of dipo-scale on one GPU
# (unlearn through Ray Train with a worker killed and resumed, the reference precompute, evaluate
# on a GPU actor, the quantize4 attack, in-training evaluation) and the figures of the step
# (tokens/s, MFU, memory against the planner); it writes a JSON and rewrites docs/benchmarks.md's
# GPU section from it. What each part does and checks: benchmarks/gpu_check.py's docstring.
#
#   benchmarks/gpu_check.sh                 # one GPU: the GPU check machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run       # CPU, sizes scaled down: checks that every part runs
#   options: --json PATH  --docs PATH ('' : leave the docs alone)  --work DIR  --peak-tflops N
#
# The GPU check machine (../shared/docs/STACK_NOTES.md) has python3 with torch and transformers but
# no network and no deepspeed, ray, pydantic, ...: they travel as wheels in .gpu_wheels/ (made here
# by `.venv/bin/python benchmarks/gpu_wheels.py`, carried with the checkout). When python3 cannot
# import them, this script installs that folder with pip (--no-index --no-deps) into a folder of its
# own, $GPU_CHECK_SITE, put on PYTHONPATH before the machine's packages; the repository root goes
# on PYTHONPATH too (the project, as `pip install -e .` would make it importable).
#
# Python: $PYTHON, else the repository's .venv, else python3 (the GPU check machine's).
# The whole script stops itself after $GPU_CHECK_LIMIT_S seconds (default 540: with a machine's
# start, under the 12 minutes the check may take), set-up included; every part has its own limit
# within that, and the JSON is written after each part.
set -euo pipefail
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-540}
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ " $* " == *" --dry-run "* ]]; then
  export DS_ACCELERATOR=cpu
else
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; then
    echo "gpu_check: no GPU here (nvidia-smi); on CPU run: benchmarks/gpu_check.sh --dry-run" >&2
    exit 2
  fi
  unset DS_ACCELERATOR  # DeepSpeed picks CUDA
fi
if ! "$PY" -c "import deepspeed, ray, pydantic, bitsandbytes, rouge_score" 2>/dev/null; then
  if [[ ! -f .gpu_wheels/manifest.json ]]; then
    echo "gpu_check: $PY lacks deepspeed/ray/... and there is no .gpu_wheels/ (run .venv/bin/python" \
         "benchmarks/gpu_wheels.py where pip reaches the index, and carry .gpu_wheels)" >&2
    exit 2
  fi
  export GPU_CHECK_SITE=${GPU_CHECK_SITE:-/tmp/dipo_gpu_site}
  rm -rf "$GPU_CHECK_SITE"
  echo "gpu_check: installing .gpu_wheels into $GPU_CHECK_SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$GPU_CHECK_SITE" .gpu_wheels/*.whl
  export PYTHONPATH="$GPU_CHECK_SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$GPU_CHECK_SITE/bin:$PATH" GPU_CHECK_WHEELS_INSTALLED=1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$PY" == */* ]]; then export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"; fi  # its ninja and ray first
export WANDB_MODE=offline RAY_DEDUP_LOGS=0 PYTHONUNBUFFERED=1
# Ray Train notices a dead worker at its next health check (2 s by default)
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5
export GPU_CHECK_SETUP_S=$(( $(date +%s) - STARTED ))
LEFT=$(( LIMIT - GPU_CHECK_SETUP_S ))
exec timeout --signal=INT --kill-after=20 "$LEFT" "$PY" benchmarks/gpu_check.py --deadline $(( STARTED + LIMIT - 15 )) "$@"
