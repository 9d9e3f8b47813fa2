source .device/bin/boot.sh >/dev/null
export PYTHONUNBUFFERED=1
S="compute-sanitizer --print-limit 5"
( timeout 200 $S --tool memcheck python3 -m pytest -q -x -p no:cacheprovider tests/test_pretranspose_gpu.py tests/test_nontranspose_gpu.py -k "B1- or B33- or invalid or agrees" 2>&1 | tail -4 ) > $OUT/memcheck.txt
( timeout 120 $S --tool racecheck python3 -m pytest -q -x -p no:cacheprovider tests/test_nontranspose_gpu.py tests/test_pretranspose_gpu.py -k "B1- or B257-" 2>&1 | tail -4 ) > $OUT/racecheck.txt
NCU="ncu --clock-control none -k regex:Decode -s 2 -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats"
timeout 90 $NCU python3 benchmarks/tune.py --layout klast --batch-size 1 --tiles "(4,1)" --iters 3 > $OUT/ncu_klast_b1.txt 2>&1
timeout 90 $NCU python3 benchmarks/tune.py --layout klast --state-dtype bfloat16 --batch-size 64 --tiles "(4,4)" --iters 3 > $OUT/ncu_klast_bf16_b64.txt 2>&1
python3 benchmarks/tune.py --layout klast --seq-len 4 --pool --batch-size 1 16 64 256 --tiles "(4,1),(4,2),(4,4),(8,2),(8,4)" --iters 20 | tail -6
python3 benchmarks/tune.py --layout klast --seq-len 8 --pool --batch-size 1 64 256 --tiles "(4,1),(4,2),(4,4),(8,2)" --iters 20 | tail -5
python3 benchmarks/tune.py --layout kmajor --state-dtype bfloat16 --batch-size 1 4 16 64 --tiles "(8,4),(4,4),(4,2),(8,8)" --iters 20 | tail -6
cat $OUT/memcheck.txt $OUT/racecheck.txt
for f in $OUT/ncu_*.txt; do echo "== $f"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Stall|L2 Hit|Block Limit|Waves Per SM|Warp Cycles Per Issued" $f | head -30; done
