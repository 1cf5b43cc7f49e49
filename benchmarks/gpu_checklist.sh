#!/usr/bin/env bash
# The GPU checklist in one call, for a lent CUDA machine whose python3 has torch and triton
# but not memdist's other dependencies. Run from the repository root; logs and the report
# go to $OUT (default /tmp/gpu_checklist). Steps: the kernel tests compiled, then
# bench_gpu_kernels.py (sweep, 64-bit rows, bandwidth against a copy), then
# compute-sanitizer's memcheck and initcheck on a small case.
# STEPS (default "tests bench sanitize") picks steps; arguments go to the benchmark.
set -u
STEPS=${STEPS:-tests bench sanitize}
OUT=${OUT:-/tmp/gpu_checklist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# memdist.kernels is the top-level kernels/ folder (pyproject's package-dir): put it in place.
work=$(mktemp -d)
cp -r . "$work/repo" && cp -r kernels "$work/repo/memdist/kernels" && cd "$work/repo" || exit 1
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $STEPS == *tests* ]]; then
timeout "${TESTS_S:-150}" python3 -m pytest --noconftest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_kernels_optim.py > "$OUT/tests.log" 2>&1
echo "kernel tests rc=$?"; tail -15 "$OUT/tests.log"
fi
if [[ $STEPS == *bench* ]]; then
timeout "${BENCH_S:-240}" python3 benchmarks/bench_gpu_kernels.py --out "$OUT" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; grep -v '^{"benchmark"' "$OUT/bench.log" | tail -40
fi
[[ $STEPS == *sanitize* ]] || exit 0
for tool in memcheck initcheck; do
  timeout "${SANITIZE_S:-60}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
    python3 benchmarks/bench_gpu_kernels.py --sanitize > "$OUT/sanitize_$tool.log" 2>&1
  echo "compute-sanitizer $tool rc=$?"; tail -4 "$OUT/sanitize_$tool.log"
done
