#!/usr/bin/env bash
# One GPU session's checks, run from the project root on a machine with the DSL on PYTHONPATH, each mode
# sized to fit one device call (10 minutes):
#   bash benchmarks/device_check.sh tests      # every GPU test, eight pytest processes side by side
#   bash benchmarks/device_check.sh sanitize   # compute-sanitizer memcheck and racecheck on the newest kernels
#   bash benchmarks/device_check.sh bench DIR  # the results sweep with copy floors (CSV/JSON/PNG into DIR)
#   bash benchmarks/device_check.sh extra DIR  # MTP with intermediates, on contiguous slots, with token slots
#   bash benchmarks/device_check.sh engines DIR # engine rows (sglang too), the fused step's shape grid, padded pools
#   bash benchmarks/device_check.sh replay DIR # the ReplaySSM step grid, its commit on the tensor cores
#                                              # against the token loop, and the host time per call
#   bash benchmarks/device_check.sh commit DIR # the ReplaySSM commit under each table (GPU tests, memcheck,
#                                              # racecheck) and the bf16 commit's candidates, timed
#   bash benchmarks/device_check.sh flashinfer DIR # FlashInfer's fused step beside flashgdn's (four shapes, fp32;
#                                              # its module staged by benchmarks/stage_flashinfer_fused.py)
#   bash benchmarks/device_check.sh tune       # the tensor cores for an fp32 state and for per-token
#                                              # states against the token loop; K-last CTA shapes at small B
#   bash benchmarks/device_check.sh small      # the small-batch floors; the fused step's conv/gate builds
#                                              # by the table against 1024-thread CTAs at small batch
#                                              # and the b/a projection by cuBLAS ("gemm") at large,
#                                              # beside the composed path
#   bash benchmarks/device_check.sh floors     # copy floors of padded pools and per-token state slots
#   bash benchmarks/device_check.sh window     # the ReplaySSM verify with window CTAs at small batch: GPU tests,
#                                              # memcheck, racecheck, and timed beside frozen MTP and the table
#   bash benchmarks/device_check.sh h200       # the fp32 token loop's L2 prefetch at 4 and 6 MiB (T = 3-7, and
#                                              # the ReplaySSM verify beside frozen MTP); frozen fp32 MTP on the
#                                              # tensor cores from T = 4; two batch rows per split gate CTA at
#                                              # Qwen3.5 TP1
# Logs go to $OUT when it is set (a device call's output folder), else to ./device-logs. Every step has a
# time limit (LIMIT seconds, default 240), so a session's budget is never spent on one hung step.
set -uo pipefail
out=${OUT:-device-logs}; mkdir -p "$out"
limit=${LIMIT:-240}
pytest="timeout $limit python3 -m pytest -q -rs -p no:cacheprovider"
sanitizer="timeout $limit compute-sanitizer --print-limit 10"
bench="timeout $limit python3 -m flashgdn.bench.cli"
day=$(date +%F)
summary() {  # the pytest result and the sanitizer summary of each log
  for f in "$@"; do
    echo "== $f: $(grep -E "passed|failed|error" "$out/$f.log" | tail -1) $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/$f.log" | tail -1)"
    grep -E "^FAILED|^ERROR|Invalid __(global|shared)__" "$out/$f.log" | head -6
  done
  return 0
}
tails() {  # the last lines of each log
  for f in "$@"; do echo "== $f"; tail -"${TAIL:-25}" "$out/$f.log"; done
}
# The fused step's layer shapes (label, hidden, q/k heads, value heads): Qwen3-Next and Qwen3.5 at TP1 and TP4.
NEXT_TP1="next_tp1 2048 16 32"; NEXT_TP4="next_tp4 2048 4 8"; Q35_TP1="q35_tp1 5120 16 48"; Q35_TP4="q35_tp4 5120 4 12"
fused_grid() {  # NAME STATE_DTYPES SHAPE...: the fused step at B = 1..256 per layer shape beside the composed path
  # and FlashInfer's step (--compare); CUDA-graph events, so the composed path's launch gaps count.
  # $dir/h200_<day>_NAME_<label>.csv, $out/NAME_<label>.log.
  local name=$1 dtypes=$2 shape; shift 2
  for shape in "$@"; do
    set -- $shape
    $bench --api fused_step --hidden-size "$2" --num-q-heads "$3" --num-v-heads "$4" --state-dtype $dtypes \
      --batch-size 1 4 16 64 256 --timer events --compare --verify --csv "$dir/h200_${day}_${name}_$1.csv" \
      > "$out/${name}_$1.log" 2>&1
  done
}
# The test files of groups t1-t4, t6 and t7 (t1 and t7 split the MTP file, t2 and t8 the ReplaySSM file);
# t5 runs the GPU tests of every other file.
T1="tests/test_mtp_gpu.py"
T2="tests/test_replay_gpu.py"
T6="tests/test_engines_gpu.py tests/test_fused_step_gpu.py"
T3="tests/test_pretranspose_gpu.py tests/test_nontranspose_gpu.py tests/test_ops_gpu.py tests/test_ops_fused_step_gpu.py"
T4="tests/test_flashinfer_patterns_gpu.py"
case "${1:-tests}" in
tests)
  # Compiling dominates a first run: eight processes share the 16 cores (the disk cache is safe to share);
  # the MTP file alone outlasts a 230 s step, so its tensor-core tests run apart (t7), as do the ReplaySSM
  # file's tests of the tensor-core commit (t8).
  rest=$(ls tests/test_*.py | grep -v -x -F -f <(printf "%s\n" $T1 $T2 $T3 $T4 $T6))
  $pytest $T1 -k "not tensor_core" > "$out/t1.log" 2>&1 &
  $pytest $T1 -k tensor_core > "$out/t7.log" 2>&1 &
  $pytest $T2 -k "not commit-mma" > "$out/t2.log" 2>&1 &
  $pytest $T2 -k commit-mma > "$out/t8.log" 2>&1 &
  $pytest $T3 > "$out/t3.log" 2>&1 &
  $pytest $T4 > "$out/t4.log" 2>&1 &
  $pytest -m gpu $rest > "$out/t5.log" 2>&1 &
  $pytest $T6 > "$out/t6.log" 2>&1 &
  wait
  summary t1 t2 t3 t4 t5 t6 t7 t8 ;;
sanitize)
  # Eight processes in one wave, as the tests mode runs them: compiling dominates, and the cores are shared.
  # memcheck's "CUDA_ERROR_INVALID_VALUE ... cuGetProcAddress" lines are the host probing driver entry
  # points, not kernel accesses: the kernels' errors show as "Invalid __global__/__shared__ ...".
  $sanitizer --tool memcheck $pytest tests/test_replay_gpu.py \
    -k "(tensor_core or commit_equals or fp16 or out_of_range) and not commit-mma" > "$out/mc1.log" 2>&1 &
  $sanitizer --tool memcheck $pytest tests/test_engines_gpu.py tests/test_engines_sglang_gpu.py tests/test_fused_step_gpu.py \
    tests/test_flashinfer_patterns_gpu.py -k "(vllm or padded or matches_reference or matches_the_contract or negative_write) and not graph" > "$out/mc2.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_replay_gpu.py \
    -k "(commit_equals and commit-loop and (2-3-2 or 3-7-1)) or (tensor_core_verify_outputs and 3-100)" \
    > "$out/rc1.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_fused_step_gpu.py -k "matches_reference and (tp4 or d64)" \
    > "$out/rc2.log" 2>&1 &
  # The tensor-core MTP kernel's fp32-state and per-token-state builds, the MTP builds that write an
  # allocated output's padding rows, and the tensor-core commit (by table: tests/helpers.use_table).
  $sanitizer --tool memcheck $pytest tests/test_mtp_gpu.py tests/test_flashinfer_patterns_gpu.py \
    -k "fp32_tensor_core or tensor_core_intermediates or state_slots_tensor_core or h200-table or allocated_output" \
    > "$out/mc3.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_mtp_gpu.py \
    -k "(fp32_tensor_core and 8-True-True-True-1-64) or (tensor_core_intermediates and 4-sdt1) or plain-h200-table" \
    > "$out/rc3.log" 2>&1 &
  $sanitizer --tool memcheck $pytest tests/test_replay_gpu.py -k "commit-mma and (commit_equals or out_of_range)" \
    > "$out/mc4.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_replay_gpu.py \
    -k "commit-mma and ((commit_equals and (4-40-2 or 8-64-2 or 16-20-2)) or out_of_range)" > "$out/rc4.log" 2>&1 &
  wait
  summary mc1 mc2 rc1 rc2 mc3 rc3 mc4 rc4 ;;
bench)
  dir=${2:-$out}; mkdir -p "$dir"
  $bench --api all --state-dtype fp32 bf16 --compare --verify --floor \
    --csv "$dir/h200_${day}.csv" --json "$dir/h200_${day}.json" --plot "$dir/h200_${day}.png" 2>&1 \
    | tee "$out/bench.log" | tail -70 ;;
extra)
  dir=${2:-$out}; mkdir -p "$dir"
  $bench --api mtp --state-dtype fp32 bf16 --cache-intermediate --compare --verify --floor \
    --csv "$dir/h200_${day}_mtp_inter.csv" > "$out/mtp_inter.log" 2>&1
  $bench --api mtp --state-dtype fp32 bf16 --pool-slots contiguous --compare --verify --floor \
    --csv "$dir/h200_${day}_mtp_contiguous.csv" > "$out/mtp_contiguous.log" 2>&1
  $bench --api mtp --state-dtype fp32 bf16 --token-slots --batch-size 1 16 64 256 --compare --verify --floor \
    --csv "$dir/h200_${day}_token_slots.csv" > "$out/token_slots.log" 2>&1
  # FlashInfer's bf16-state MTP entry point: pretranspose with T > 1 (flashgdn serves it with the MTP kernels).
  $bench --api pretranspose --seq-len 2 4 8 --state-dtype bf16 --pool --batch-size 1 4 16 64 256 --compare --verify \
    --floor --csv "$dir/h200_${day}_pretranspose_mtp.csv" > "$out/pretranspose_mtp.log" 2>&1
  TAIL=40 tails mtp_inter mtp_contiguous token_slots pretranspose_mtp ;;
engines)
  dir=${2:-$out}; mkdir -p "$dir"
  # The engine rows (--api engines), one run per entry point: each within the step's time limit.
  for api in packed recurrent sigmoid_vllm sglang fused_step; do
    $bench --api $api --state-dtype fp32 bf16 --compare --verify --csv "$dir/h200_${day}_engines_$api.csv" \
      > "$out/engines_$api.log" 2>&1
  done
  fused_grid fused "fp32 bf16" "$NEXT_TP1" "$NEXT_TP4" "$Q35_TP1" "$Q35_TP4"
  # CUPTI sums the step's two kernels without the gap between them: against the events rows above, what a
  # one-launch step could save at most.
  $bench --api fused_step --state-dtype fp32 bf16 --batch-size 1 4 16 64 256 --timer cupti \
    --csv "$dir/h200_${day}_fused_next_tp1_cupti.csv" > "$out/fused_cupti.log" 2>&1
  # The decode as a programmatic dependent launch (PDL) against plain stream order.
  timeout "$limit" python3 benchmarks/fused_table.py --settings fused_step_pdl=False fused_step_pdl=True \
    > "$out/fused_pdl.log" 2>&1
  # Pools with padded strides against packed ones (same rows, same run).
  for api in pretranspose mtp; do
    [ $api = mtp ] && T="2 4 8" || T=1
    for pad in 0 64; do
      $bench --api $api --pool --pool-padding $pad --state-dtype fp32 bf16 --batch-size 64 256 --seq-len $T \
        --csv "$dir/h200_${day}_pad${pad}_$api.csv" > "$out/pad${pad}_$api.log" 2>&1
    done
  done
  TAIL=30 tails engines_packed engines_recurrent engines_sigmoid_vllm engines_sglang engines_fused_step \
    fused_next_tp1 fused_next_tp4 fused_q35_tp1 fused_q35_tp4 fused_cupti fused_pdl pad0_pretranspose pad64_pretranspose \
    pad0_mtp pad64_mtp ;;
replay)
  dir=${2:-$out}; mkdir -p "$dir"
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --csv "$dir/h200_${day}_replay.csv" \
    > "$out/replay.log" 2>&1
  # The commit on the tensor cores (ReplayCommitMma) against the table, every other call as it is: for a bf16
  # checkpoint at T = 4 and 8, either side of the table's threshold (the tensor cores from T = 8; fp32 and
  # bf16 T = 2-4 measured slower on them, RESULTS.md "ReplaySSM").
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --state-dtype bfloat16 --tokens 8 4 \
    --batch-size 16 64 256 --settings table "commit_mma_min_tokens={'bfloat16': 2}" \
    --csv "$dir/h200_${day}_replay_commit_mma.csv" > "$out/replay_mma.log" 2>&1
  $bench --host --profile --state-dtype fp32 bf16 --json "$dir/h200_${day}_host.json" > "$out/host.log" 2>&1
  TAIL=60 tails replay replay_mma host ;;
commit)
  # The commit under each table as it is (its L2 prefetch: the H200's 6 MiB on the tensor cores, 4 MiB on the
  # token loop for an fp32 checkpoint, none for a bf16 one): GPU tests, memcheck and racecheck; then the bf16
  # commit's open cells (T = 8 at 89.6-89.9 %, T = 4 at 89.7-90.6 %; RESULTS.md "ReplaySSM") against the tensor
  # cores from T = 4, an 8 MiB distance and two other tensor-core CTA shapes.
  dir=${2:-$out}; mkdir -p "$dir"
  $pytest tests/test_replay_gpu.py -k "l2_prefetch or tables_as_they_are" > "$out/commit_tests.log" 2>&1 &
  $sanitizer --tool memcheck $pytest tests/test_replay_gpu.py -k "tables_as_they_are and h200" \
    > "$out/commit_memcheck.log" 2>&1 &
  # racecheck: the two builds with a prefetch, a process each (95-117 s per test on an H100)
  for build in T8 fp32; do
    $sanitizer --tool racecheck $pytest tests/test_replay_gpu.py -k "tables_as_they_are and h200 and $build" \
      > "$out/commit_racecheck_$build.log" 2>&1 &
  done
  wait
  mma="('commit_mma', 'large', 'bfloat16')"
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --state-dtype bfloat16 --tokens 8 4 \
    --batch-size 64 256 --calls commit commit_all_T --iters 30 --settings table \
    "commit_mma_min_tokens={'bfloat16': 4}" "prefetch_bytes+={'commit_mma': 8388608}" \
    "tiles+={$mma: (2, 2)}" "tiles+={$mma: (4, 1)}" \
    --csv "$dir/h200_${day}_commit_bf16.csv" > "$out/commit_bf16.log" 2>&1
  summary commit_tests commit_memcheck commit_racecheck_T8 commit_racecheck_fp32
  TAIL=30 tails commit_bf16 ;;
flashinfer)
  dir=${2:-$out}; mkdir -p "$dir"
  fused_grid fused_flashinfer fp32 "$NEXT_TP1" "$Q35_TP1" "$NEXT_TP4" "$Q35_TP4"  # FlashInfer's contract: fp32 state
  TAIL=14 tails fused_flashinfer_next_tp1 fused_flashinfer_q35_tp1 fused_flashinfer_next_tp4 fused_flashinfer_q35_tp4 ;;
tune)
  # 2-tuples: the tensor-core kernel, (warps, 16-row blocks); 3-tuples: the token loop's table shapes.
  for T in 4 8; do
    timeout "$limit" python3 benchmarks/tune.py --state-dtype float32 --seq-len $T --pool --batch-size 16 64 256 \
      --tiles "(4,2,8),(4,4,8),(2,1),(4,1),(8,1),(4,2)" > "$out/tune_f32_T$T.log" 2>&1
  done
  # A state per token (intermediates): the token loop's mtp_inter shapes against the tensor cores.
  for sdt in float32 bfloat16; do
    timeout "$limit" python3 benchmarks/tune.py --state-dtype $sdt --seq-len 4 --pool --inter --batch-size 16 64 256 \
      --tiles "(8,1,16),(4,2,16),(2,1),(4,1),(8,1),(4,2)" > "$out/tune_inter_$sdt.log" 2>&1
  done
  # Small batches of the K-last T = 1 decode (issue #26's B = 1 targets): every CTA shape of tune.py.
  for sdt in float32 bfloat16; do
    timeout "$limit" python3 benchmarks/tune.py --state-dtype $sdt --batch-size 1 4 16 > "$out/tune_klast_$sdt.log" 2>&1
  done
  TAIL=8 tails tune_f32_T4 tune_f32_T8 tune_inter_float32 tune_inter_bfloat16 tune_klast_float32 tune_klast_bfloat16 ;;
small)
  # The floors of the small-batch rows: a one-element kernel and the fastest copy kernel per size.
  timeout "$limit" python3 benchmarks/tune.py --calibrate > "$out/calibrate.log" 2>&1
  # The fused step's conv/gate kernel as the table builds it (512 threads at small batch, 4 batch rows
  # per gate CTA for a large w_ba) against 1024-thread CTAs at small batch, and against the "gemm"
  # regime (the b/a projection by cuBLAS, a conv-only kernel) at large batch, beside the composed path
  # an engine runs (the fused step's large-batch target).
  for shape in "2048 16 32" "2048 4 8" "5120 16 48" "5120 4 12"; do
    set -- $shape
    timeout "$limit" python3 benchmarks/fused_table.py --hidden-size "$1" --num-q-heads "$2" --num-v-heads "$3" \
      --batch-size 1 4 16 --settings table conv_gate_threads_small=1024 > "$out/conv_small_$1_$3.log" 2>&1
    timeout "$limit" python3 benchmarks/fused_table.py --hidden-size "$1" --num-q-heads "$2" --num-v-heads "$3" \
      --batch-size 64 256 --settings table conv_gate_gemm_heads_per_sm=2 --composed > "$out/conv_large_$1_$3.log" 2>&1
  done
  TAIL=8 tails calibrate conv_small_2048_32 conv_small_2048_8 conv_small_5120_48 conv_small_5120_12 \
    conv_large_2048_32 conv_large_2048_8 conv_large_5120_48 conv_large_5120_12 ;;
window)
  # The verify's windows stored by CTAs of their own (verify_window_ctas) at B = 1-8 against the decode CTAs
  # storing them (5-7 % over frozen MTP at B = 1; RESULTS.md "ReplaySSM"): the table, neither, both state dtypes
  # with a window CTA per value head and per 4 and 8 value heads.
  $pytest tests/test_replay_gpu.py -k "window" > "$out/window_tests.log" 2>&1 &
  $sanitizer --tool memcheck $pytest tests/test_replay_gpu.py -k "window and (B1- or B5-) and T2" \
    > "$out/window_memcheck.log" 2>&1 &
  $sanitizer --tool racecheck $pytest tests/test_replay_gpu.py -k "window_ctas and (B5- or B3-) and (T3 or T8)" \
    > "$out/window_racecheck.log" 2>&1 &
  wait
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --state-dtype bfloat16 float32 --tokens 2 4 8 \
    --batch-size 1 4 8 --calls mtp_frozen verify --iters 100 --rounds 5 \
    --settings table "verify_window_ctas=()" "verify_window_ctas=('float32', 'bfloat16')" \
    "verify_window_ctas=('float32', 'bfloat16'),verify_window_heads=4" \
    "verify_window_ctas=('float32', 'bfloat16'),verify_window_heads=8" \
    > "$out/window_timing.log" 2>&1
  summary window_tests window_memcheck window_racecheck
  grep "=" "$out/window_timing.log" | sed -E "s/layers=48, timer=cupti, //" | cut -c1-200 ;;
h200)
  # The fp32 token loop's L2 prefetch ("mtp": 4 MiB in the table) at 6 MiB, 1.5 % faster at T = 4 in one run
  # (RESULTS.md, the misses table): the other builds that share the distance, T = 3-7 with the state update
  # (tune.py) and the ReplaySSM verify beside frozen MTP (replay_step.py), at 4 and 6 MiB.
  for T in 3 4 5 6 7; do
    timeout "$limit" python3 benchmarks/tune.py --state-dtype float32 --seq-len $T --pool --batch-size 64 256 \
      --tiles "(4,2,8)" --prefetch-mib 4 6 > "$out/tune_f32_T$T.log" 2>&1
  done
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --state-dtype float32 --tokens 4 6 \
    --batch-size 64 256 --calls mtp_frozen verify --settings table "prefetch_bytes+={'mtp': 6291456}" \
    > "$out/verify_mtp_prefetch.log" 2>&1
  # Frozen MTP and the verify on the tensor cores for an fp32 state below the table's T = 8 (the H100 table's
  # mma_min_tokens_frozen: from T = 6, 1.07-1.29x there over the token loop).
  timeout "$limit" python3 benchmarks/replay_step.py --timer cupti --state-dtype float32 --tokens 4 6 7 \
    --batch-size 16 64 256 --calls mtp_frozen verify --rounds 2 --settings table \
    "mma_min_tokens_frozen={'float32': 4}" > "$out/frozen_mma_fp32.log" 2>&1
  # Two batch rows per split gate CTA (the H100 table's from a 512 KiB w_ba, 1.03-1.05x there) at Qwen3.5 TP1.
  timeout "$limit" python3 benchmarks/fused_table.py --hidden-size 5120 --num-q-heads 16 --num-v-heads 48 \
    --batch-size 12 16 20 --state-dtype bf16 --settings table conv_gate_split_batch_rows=2 --composed --decode-alone \
    > "$out/split_rows.log" 2>&1
  TAIL=4 tails tune_f32_T3 tune_f32_T4 tune_f32_T5 tune_f32_T6 tune_f32_T7
  TAIL=12 tails verify_mtp_prefetch split_rows
  TAIL=20 tails frozen_mma_fp32 ;;
floors)
  # What a plain copy of the same bytes in the same pattern costs: a padded pool against a packed one, T
  # scattered token slots against a contiguous buffer (the FlashInfer parity issue's two layout targets).
  timeout "$limit" python3 benchmarks/layout_floors.py > "$out/layout_floors.log" 2>&1
  TAIL=40 tails layout_floors ;;
esac
