#!/usr/bin/env bash
# Every GPU check this project owes, for one lent H100 session (device tool: `bash bench/gpu_session.sh part1`,
# then `... part2`; each part fits the 10-minute limit of one call). Writes logs and JSON to $OUT.
#   part1: build the CUDA extension, the test suite on CUDA (no interpreter), kernel correctness,
#          tile sweep (incl. TMA) and fused-vs-naive at the Llama-3-8B head (bench/cuda_check.py).
#   part2: pytest-benchmark loss + generation suites with saved JSON, and 3 iterations of the
#          engine on a random-weight Pythia-1.4B (preset pythia_1b4_random): per-phase time, peak memory.
set -u
OUT=${OUT:-/tmp/rebel_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/device.txt"
case "${1:-part1}" in
  part1)
    timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1; tail -5 "$OUT/tests_cuda.log"
    timeout 240 python3 bench/cuda_check.py "$OUT/cuda_check.json" > "$OUT/cuda_check.log" 2>&1; tail -15 "$OUT/cuda_check.log"
    ;;
  part2)
    REBEL_BENCH_SAVE=1 timeout 360 python3 -m pytest bench -q > "$OUT/bench.log" 2>&1; tail -5 "$OUT/bench.log"
    cp bench/results/*.json "$OUT/" 2>/dev/null
    timeout 200 python3 engine/train.py --preset pythia_1b4_random --run_dir /tmp/pythia \
      --logging.progress false > "$OUT/pythia.log" 2>&1; tail -3 "$OUT/pythia.log"
    cp /tmp/pythia/metrics.jsonl "$OUT/pythia_metrics.jsonl" 2>/dev/null
    ;;
esac
