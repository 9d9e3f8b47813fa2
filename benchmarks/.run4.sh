source .device/bin/boot.sh >/dev/null || exit 1
S="compute-sanitizer --print-limit 3 --show-backtrace no"
timeout 150 $S --tool memcheck python3 -m pytest -q -x -p no:cacheprovider tests/test_pretranspose_gpu.py -k "B1- and K128" > $OUT/memcheck.txt 2>&1
grep -m3 -A6 "^========= [A-Z]" $OUT/memcheck.txt | head -40; tail -2 $OUT/memcheck.txt
T="python3 benchmarks/tune.py --iters 20"
$T --layout klast --batch-size 1 4 16 64 --tiles "(4,1,32),(4,2,32),(4,1,16),(4,2,16),(4,2,8),(8,4,32),(8,2,16)" | tail -6
$T --layout klast --state-dtype bfloat16 --batch-size 1 4 16 64 256 --tiles "(4,2,16),(8,2,16),(4,1,16),(8,1,16),(4,2,8),(8,2,8),(4,1,8)" | tail -7
$T --layout klast --seq-len 4 --pool --batch-size 1 16 64 256 --tiles "(4,1,8),(4,2,8),(8,1,8),(4,1,4),(4,2,4),(4,1,16),(4,2,16)" | tail -6
$T --layout klast --seq-len 8 --pool --batch-size 1 64 256 --tiles "(4,1,8),(4,2,8),(4,1,4),(4,2,4)" | tail -5
$T --layout klast --seq-len 4 --pool --state-dtype bfloat16 --batch-size 1 64 256 --tiles "(4,1,8),(4,2,8),(4,1,4),(4,2,4)" | tail -5
