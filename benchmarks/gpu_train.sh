#!/usr/bin/env bash
# Training on a lent CUDA machine in one call: the CUDA parity tests, then `memdist train`
# runs on the GPU (the default model with a local table, its dense peer, a GPU worker over
# two CPU shard servers, and a 1024-wide model with a 1M-row table against its dense peer
# of equal FLOPs). The machine's python3 has torch and triton but not memdist's other
# needs: wheels in .whl (deepspeed, zarr and theirs) are installed to /tmp/site first.
# Ray is not among them (its wheel is over the call's 64 MiB), so shards run in-process.
# Run from the repository root; logs and summary.json (gpu_train_summary.py: tokens/s as
# ratios to the dense peers) go to $OUT (default /tmp/gpu_train). STEPS picks steps.
set -u
STEPS=${STEPS:-tests local scale inprocess dense}
OUT=${OUT:-/tmp/gpu_train}
MINUTES=${MINUTES:-0.75}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# memdist.kernels, .cluster and .storage are top-level folders (pyproject's package-dir).
work=$(mktemp -d)
mkdir "$work/repo" && cp -r memdist tests benchmarks setup.cfg "$work/repo/" || exit 1
for pkg in kernels cluster storage; do cp -r "$pkg" "$work/repo/memdist/$pkg"; done
cd "$work/repo" || exit 1
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, deepspeed, zarr, memdist; print('torch', torch.__version__, \
'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'zarr', zarr.__version__)" \
  2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
# CPU shard servers use the C++ kernels: build them while the GPU tests run.
python3 -c "from memdist.kernels import cpp_ops; print('cpp kernels', cpp_ops.available())" \
  > "$work/cpp_build.txt" 2>&1 &

train() {  # train NAME LOG ARGS...: one run; its final metrics line is the log's last line
  local name=$1 log=$2; shift 2
  timeout "${TRAIN_S:-150}" python3 -m memdist.cli train "$name" --no-progress \
    --run-dir "$work/runs/$log" --set train.max_minutes="$MINUTES" "$@" > "$OUT/$log.log" 2>&1
  echo "train $log rc=$?"; grep '^{' "$OUT/$log.log" | head -1 | cut -c1-400
  grep '^{' "$OUT/$log.log" | tail -1
}
if [[ $STEPS == *tests* ]]; then
  timeout "${TESTS_S:-240}" python3 -m pytest --noconftest -q -p no:cacheprovider \
    -o addopts="-ra --import-mode=importlib --durations=10" \
    tests/test_kernels.py tests/test_kernels_optim.py tests/test_cuda.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -12
fi
wait
tail -1 "$work/cpp_build.txt" | tee -a "$OUT/gpu.txt"
[[ $STEPS == *local* ]] && train small local --shards 0
if [[ $STEPS == *scale* ]]; then
  wide=(--set model.dim=1024 --set model.n_layers=8 --set model.n_heads=16
        --set model.max_seq_len=512 --set data.seq_len=512 --set data.batch_size=16
        --set eval.max_qa=10 --set train.log_every=20 --set train.save_tables=false)
  mem=(--set model.memory.n_keys=1024 --set model.memory.k_dim=512 --set model.memory.heads=4
       --set model.memory.knn=32 --set model.memory.value_lr=1e-3)
  train dense scale_dense "${wide[@]}"
  train small scale_small --shards 0 "${wide[@]}" "${mem[@]}"
fi
[[ $STEPS == *dense* ]] && train dense dense --set eval.max_qa=50
[[ $STEPS == *inprocess* ]] && train small inprocess --shards 2 --transport inprocess \
  --set eval.max_qa=50
python3 benchmarks/gpu_train_summary.py "$OUT" --out "$OUT/summary.json"
