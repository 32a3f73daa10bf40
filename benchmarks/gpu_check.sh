#!/usr/bin/env bash
# GPU check of the bypass-MoE kernels on one CUDA device (at most 8 minutes: tests <= 120 s, table <= 200 s,
# 8-bit LLaMA2-7B editing <= 150 s):
#   1. the kernel tests on CUDA, interpreter off (fp32 forward + every gradient, fp16/bf16 forward and
#      gradients), one pinned config so that no autotuning is compiled for the tiny test shapes;
#   2. the timing table at LLaMA2-7B block shapes (benchmarks/gpu_check.py), CSV + markdown in $OUT.
# Needs no install of memoe_fast: an import shim maps the checkout's memoe_fast/ and kernels/.
# Wheels brought in .whl/ (packages the machine lacks) are installed into a private target dir.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${1:-$PWD/gpu_check_out}}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
PY="${PYTHON:-python}"

EXTRA=""
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/memoe_site .whl/*.whl \
    && EXTRA="/tmp/memoe_site"
fi
SHIM="$("$PY" benchmarks/gpu_check.py --make-shim /tmp/memoe_fast_shim)"
export PYTHONPATH="$SHIM${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import memoe_fast, memoe_fast.kernels, torch, triton; print('memoe_fast from', memoe_fast.__path__[0], '| torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" \
  | tee "$OUT/env.txt"

status=0
MEMOE_TRITON_CONFIG="BLOCK_M=32,BLOCK_N=32,BLOCK_K=32,num_warps=4,num_stages=2" \
  timeout 120 "$PY" -m pytest tests/test_kernels.py tests/test_torch_path.py -q -p no:cacheprovider -rs \
  2>&1 | tee "$OUT/tests.txt" || status=1

timeout 200 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s 140 2>&1 | tee "$OUT/bench.txt" || status=1
timeout 150 "$PY" benchmarks/gpu_edit_7b.py --out "$OUT/edit_7b" 2>&1 | tee "$OUT/edit_7b.txt" || status=1
echo "gpu_check: tests and table in $OUT (status $status)"
exit $status
