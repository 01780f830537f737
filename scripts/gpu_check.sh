#!/usr/bin/env bash
# One prepared check of the GPU paths, for a machine with CUDA, torch and
# transformers (no vLLM, no internet needed; pytest and hypothesis for the
# differential tests):
#
#   scripts/gpu_check.sh          # on the GPU
#   scripts/gpu_check.sh --cpu    # dry run of the same steps on the CPU, tiny sizes
#
# Checks, one line each (`gpu_check <name>: ok|FAIL (<seconds>s)`, a failed
# check's log tail below it); the exit status is the number of failures:
#   cuda          torch sees a CUDA device (GPU mode only)
#   bench         scripts/bench_simulator.py --device cuda: both engines agree, no MISMATCH
#   differential  tests/test_differential.py with STEPFORGE_TEST_DEVICE=cuda
#   tiny_model    stepforge tiny-model
#   hf_sample     stepforge sample --backend hf --device cuda on the tiny model
#   sft_bf16      a short bf16 LoRA SFT of the tiny model (configs/sft_tiny.yaml)
# Set PYTHON to choose the interpreter (default: python3).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu) MODE=cpu ;;
  *) echo "usage: scripts/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1

# The repository root is the package `stepforge`: import this checkout through a link,
# ahead of any installed copy.
ln -s "$ROOT" "$WORK/stepforge"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
found="$(cd "$WORK" && "$PY" -c "import os, stepforge; print(os.path.realpath(os.path.dirname(stepforge.__file__)))")"
if [[ "$found" != "$(realpath "$ROOT")" ]]; then
  echo "gpu_check: 'import stepforge' finds $found, not this checkout $ROOT" >&2
  exit 1
fi
cd "$ROOT"

if [[ $MODE == gpu ]]; then
  DEVICE=cuda BENCH_ARGS=(--builtin --repeats 3) DIFF_ARGS=() SFT_STEPS=20 MAX_TOKENS=32
else
  DEVICE=cpu BENCH_ARGS=(--builtin --repeats 1 --sizes default) DIFF_ARGS=(-k generated_programs) SFT_STEPS=2 MAX_TOKENS=8
fi
TINY="$WORK/tiny-model"
failures=0

check() {  # check NAME COMMAND...: run it, print one line, keep its log
  local name=$1 start status
  shift
  start=$EPOCHREALTIME
  if "$@" >"$WORK/$name.log" 2>&1; then status=ok; else status=FAIL; failures=$((failures + 1)); fi
  printf 'gpu_check %s: %s (%.1fs)\n' "$name" "$status" "$(awk "BEGIN {print $EPOCHREALTIME - $start}")"
  if [[ $status == FAIL ]]; then tail -n 15 "$WORK/$name.log" | sed 's/^/    /'; fi
}

cuda_ok() {
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print(torch.cuda.get_device_name())"
}

bench() {
  "$PY" scripts/bench_simulator.py "${BENCH_ARGS[@]}" --device "$DEVICE" | tee "$WORK/bench.out"
  ! grep -q MISMATCH "$WORK/bench.out" && grep -q '^speedup' "$WORK/bench.out"
}

differential() {
  STEPFORGE_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_differential.py "${DIFF_ARGS[@]}"
}

hf_sample() {
  "$PY" -m stepforge.cli sample --backend hf --model "$TINY" --device "$DEVICE" --prompt "E1 = step." \
    -n 2 --max-tokens "$MAX_TOKENS" --seed 1 --json >"$WORK/sample.json" || return 1
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); assert len(d['completions']) == 2 and d['usage']['completion_tokens'] > 0, d; print(d)" "$WORK/sample.json"
}

sft_bf16() {
  "$PY" -m stepforge.cli train sft --model "$TINY" --config configs/sft_tiny.yaml \
    --extra-tasks moe-index/G_0_3_04,moe-index/G_0_3_03 --out "$WORK/sft" \
    --set precision=bf16 --set device="$DEVICE" --set max_steps="$SFT_STEPS" --set logging_steps=1 || return 1
  test -f "$WORK/sft/adapter_config.json" || { echo "no adapter written under $WORK/sft"; ls -R "$WORK/sft"; return 1; }
}

echo "gpu_check: mode $MODE, device $DEVICE, python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [[ $MODE == gpu ]]; then
  check cuda cuda_ok
fi
check bench bench
check differential differential
check tiny_model "$PY" -m stepforge.cli tiny-model "$TINY"
check hf_sample hf_sample
check sft_bf16 sft_bf16
echo "gpu_check: $failures failed"
exit "$failures"
