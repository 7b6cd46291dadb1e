#!/usr/bin/env bash
# Every GPU check this project owes, for one lent H100 session (device tool: `bash bench/gpu_session.sh part1`,
# then `... part2` to `part5`; each part aims at the 10-minute limit of one call; the loss suite saves
# its JSON after every test, so a part cut short keeps what it measured). Writes logs and JSON to $OUT.
# Peers: the device reaches no package index; wheels placed in .whl/ (gitignored; pass carry [".whl"]),
# are installed first, e.g. on the CPU machine: `pip download --no-deps -d .whl liger-kernel trl accelerate
# datasets pyarrow dill multiprocess xxhash` (+ a cut-cross-entropy wheel built with `pip wheel --no-deps`).
# Peers that are still missing are skipped with the reason in the log and the JSON rows.
#   part1: build the CUDA extension, the test suite on CUDA (no interpreter), kernel correctness,
#          tile sweep (incl. TMA) and fused-vs-naive at the Llama-3-8B head (bench/cuda_check.py).
#   part2: pytest-benchmark loss suite, Llama-3-8B head (bf16, N 2k-32k, 10/50/100% response, fp32 spot check).
#   part3: the loss suite for the Qwen2.5-7B, Pythia-2.8B and Gemma-2-2B heads.
#   part4: one REBEL iteration end to end on a random-weight Pythia-1.4B (preset pythia_1b4_random: 512 prompts,
#          2 x 53 tokens, 4 epochs), per phase and peak memory, 2 iterations each, ours vs TRL's RLOOTrainer
#          (k = 2; needs trl, datasets and accelerate, e.g. from .whl/), saved JSON (bench/test_bench_iteration.py).
#   part5: generation suite with saved JSON.
set -u
OUT=${OUT:-/tmp/rebel_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl > "$OUT/peers.log" 2>&1 || tail -5 "$OUT/peers.log"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/device.txt"
case "${1:-part1}" in
  part1)
    timeout 300 python3 -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1; tail -5 "$OUT/tests_cuda.log"
    timeout 240 python3 bench/cuda_check.py "$OUT/cuda_check.json" > "$OUT/cuda_check.log" 2>&1; tail -15 "$OUT/cuda_check.log"
    ;;
  part2)
    REBEL_BENCH_SAVE=1 REBEL_BENCH_MODELS=llama3_8b REBEL_BENCH_TAG=llama3_8b REBEL_BENCH_RESULTS_DIR="$OUT" \
      timeout 540 python3 -m pytest bench/test_bench_loss.py -q -rs > "$OUT/bench_loss_llama.log" 2>&1
    tail -5 "$OUT/bench_loss_llama.log"
    ;;
  part3)
    REBEL_BENCH_SAVE=1 REBEL_BENCH_MODELS=qwen2_5_7b,pythia_2_8b,gemma2_2b REBEL_BENCH_TAG=others \
      REBEL_BENCH_RESULTS_DIR="$OUT" timeout 540 python3 -m pytest bench/test_bench_loss.py -q -rs \
      > "$OUT/bench_loss_others.log" 2>&1
    tail -5 "$OUT/bench_loss_others.log"
    ;;
  part4)
    REBEL_BENCH_SAVE=1 REBEL_BENCH_RESULTS_DIR="$OUT" timeout 540 python3 -m pytest bench/test_bench_iteration.py -q -rs \
      > "$OUT/bench_iteration.log" 2>&1; tail -8 "$OUT/bench_iteration.log"
    python3 bench/report.py "$OUT"/*_iteration.json 2>/dev/null | tail -12
    ;;
  part5)
    REBEL_BENCH_SAVE=1 REBEL_BENCH_RESULTS_DIR="$OUT" timeout 540 python3 -m pytest bench/test_bench_generate.py -q \
      > "$OUT/bench_generate.log" 2>&1; tail -5 "$OUT/bench_generate.log"
    ;;
esac
