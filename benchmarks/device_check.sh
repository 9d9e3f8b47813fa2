#!/usr/bin/env bash
# One GPU session's checks, run from the project root on a machine with the DSL on PYTHONPATH:
#   bash benchmarks/device_check.sh tests      # the GPU test suite
#   bash benchmarks/device_check.sh sanitize   # compute-sanitizer memcheck and racecheck on the changed kernels
#   bash benchmarks/device_check.sh bench DIR  # the results sweep (CSV/JSON/PNG into DIR)
# Logs go to $OUT when it is set (a device call's output folder), else to ./device-logs.
set -uo pipefail
out=${OUT:-device-logs}; mkdir -p "$out"
case "${1:-tests}" in
tests)
  python3 -m pytest -q -rs -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" | tail -40 ;;
sanitize)
  sel=${2:-"tokslot or token or padded or strided or dtype or pretranspose_mtp or intermediate_rows"}
  compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_flashinfer_patterns_gpu.py -k "$sel" 2>&1 | tee "$out/memcheck.log" | tail -8
  compute-sanitizer --tool racecheck --print-limit 20 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_flashinfer_patterns_gpu.py -k "$sel" 2>&1 | tee "$out/racecheck.log" | tail -8 ;;
bench)
  dir=${2:-$out}; mkdir -p "$dir"; day=$(date +%F)
  python3 -m flashgdn.bench.cli --api all --state-dtype fp32 bf16 --compare --verify \
    --csv "$dir/h200_${day}.csv" --json "$dir/h200_${day}.json" --plot "$dir/h200_${day}.png" 2>&1 \
    | tee "$out/bench.log" | tail -60 ;;
esac
