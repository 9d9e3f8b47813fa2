#!/usr/bin/env bash
# One GPU session's checks, run from the project root on a machine with the DSL on PYTHONPATH:
#   bash benchmarks/device_check.sh tests      # the GPU test suite, four pytest processes side by side
#   bash benchmarks/device_check.sh sanitize   # compute-sanitizer memcheck and racecheck on the newest kernels
#   bash benchmarks/device_check.sh bench DIR  # the results sweep (CSV/JSON/PNG into DIR)
#   bash benchmarks/device_check.sh extra DIR  # MTP with intermediates and contiguous slots, engine rows,
#                                              # the fused step and the ReplaySSM step
# Logs go to $OUT when it is set (a device call's output folder), else to ./device-logs. Every step has a
# time limit (LIMIT seconds, default 240), so a session's budget is never spent on one hung step.
set -uo pipefail
out=${OUT:-device-logs}; mkdir -p "$out"
limit=${LIMIT:-240}
pytest="timeout $limit python3 -m pytest -q -rs -p no:cacheprovider"
sanitizer="timeout $limit compute-sanitizer --print-limit 10"
bench="timeout $limit python3 -m flashgdn.bench.cli"
summary() {  # the pytest result and the sanitizer summary of each log
  for f in "$@"; do
    echo "== $f: $(grep -E "passed|failed|error" "$out/$f.log" | tail -1) $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$f.log" | tail -1)"
    grep -E "^FAILED|^ERROR|Invalid __(global|shared)__" "$out/$f.log" | head -6
  done
}
case "${1:-tests}" in
tests)
  # Compiling dominates a first run: four processes share the 16 cores (the disk cache is safe to share).
  $pytest tests/test_mtp_gpu.py > "$out/t1.log" 2>&1 &
  $pytest tests/test_replay_gpu.py tests/test_engines_gpu.py > "$out/t2.log" 2>&1 &
  $pytest tests/test_pretranspose_gpu.py tests/test_nontranspose_gpu.py tests/test_ops_gpu.py \
    tests/test_ops_fused_step_gpu.py > "$out/t3.log" 2>&1 &
  $pytest tests/test_flashinfer_patterns_gpu.py tests/test_fused_step_gpu.py > "$out/t4.log" 2>&1 &
  wait
  summary t1 t2 t3 t4 ;;
sanitize)
  # memcheck's "CUDA_ERROR_INVALID_VALUE ... cuGetProcAddress" lines are the host probing driver entry
  # points, not kernel accesses: the kernels' errors show as "Invalid __global__/__shared__ ...".
  $sanitizer --tool memcheck $pytest tests/test_replay_gpu.py -k "not graph" > "$out/mc1.log" 2>&1 &
  $sanitizer --tool memcheck $pytest tests/test_engines_gpu.py tests/test_fused_step_gpu.py \
    tests/test_flashinfer_patterns_gpu.py -k "(vllm or padded or matches_reference) and not graph" > "$out/mc2.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_replay_gpu.py \
    -k "(commit_equals and (2-3-2 or 3-7-1)) or (tensor_core_verify_outputs and 3-100)" > "$out/rc1.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_fused_step_gpu.py -k "matches_reference and (tp4 or d64)" \
    > "$out/rc2.log" 2>&1 &
  wait
  summary mc1 mc2 rc1 rc2 ;;
bench)
  dir=${2:-$out}; mkdir -p "$dir"; day=$(date +%F)
  $bench --api all --state-dtype fp32 bf16 --compare --verify \
    --csv "$dir/h200_${day}.csv" --json "$dir/h200_${day}.json" --plot "$dir/h200_${day}.png" 2>&1 \
    | tee "$out/bench.log" | tail -60 ;;
extra)
  dir=${2:-$out}; mkdir -p "$dir"; day=$(date +%F)
  $bench --api mtp --state-dtype fp32 bf16 --cache-intermediate --compare --verify \
    --csv "$dir/h200_${day}_mtp_inter.csv" > "$out/mtp_inter.log" 2>&1
  $bench --api mtp --state-dtype fp32 bf16 --pool-slots contiguous --compare --verify \
    --csv "$dir/h200_${day}_mtp_contiguous.csv" > "$out/mtp_contiguous.log" 2>&1
  $bench --api engines --state-dtype fp32 bf16 --compare --verify --csv "$dir/h200_${day}_engines.csv" \
    > "$out/engines.log" 2>&1
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --csv "$dir/h200_${day}_replay.csv" \
    > "$out/replay.log" 2>&1
  for f in mtp_inter mtp_contiguous engines replay; do echo "== $f"; tail -25 "$out/$f.log"; done ;;
esac
