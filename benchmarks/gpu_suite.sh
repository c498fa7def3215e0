#!/usr/bin/env bash
# Every GPU benchmark at the reference shapes (docs/reference-figures.md; random weights, no Ray), one JSON line
# per measurement.
#   benchmarks/gpu_suite.sh [OUT_DIR]     -> OUT_DIR/gpu_suite.jsonl and one log per benchmark
# Each benchmark has its own time limit, so one that hangs costs its limit, not the whole suite.
set -u
out=${1:-gpu-suite}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="platform:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  local tick=$SECONDS
  timeout "$limit" python3 "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - tick)) s" >&2
  grep '^{' "$out/$name.log" >>"$out/gpu_suite.jsonl"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
run msm 170 benchmarks/msm.py --suite gpu
run finetune 120 benchmarks/finetune.py --suite gpu
run generate 150 benchmarks/generate.py --suite gpu --repeats 3
run finetune_compiled 300 benchmarks/finetune.py --compile reduce-overhead --steps 20
run generate_compiled 240 benchmarks/generate.py --steps 25 --repeats 5 --compile reduce-overhead
run serve 120 benchmarks/serve.py --mode inprocess --model sd15-shape --requests 64 --concurrency 16
cat "$out/gpu_suite.jsonl"
