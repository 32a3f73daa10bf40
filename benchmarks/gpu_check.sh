#!/usr/bin/env bash
# GPU check of the bypass-MoE kernels on one CUDA device, one call in at most 8 minutes
# (tests <= 80 s, 7B correctness + chosen configs <= 150 s, table <= 110 s, 8-bit LLaMA2-7B editing <= 130 s):
#   1. the kernel tests on CUDA, interpreter off (fp32 forward + every gradient, fp16/bf16 forward and
#      gradients), one pinned config so that no autotuning is compiled for the tiny test shapes;
#   2. bf16 at LLaMA2-7B shapes with real autotuning: forward and every gradient against the fp32
#      reference (GLU k=2, k=1, GELU with biases), a T=16384 call, then each launch site's chosen config
#      per token bucket with its registers, spills and shared memory on this device;
#   3. the timing table at LLaMA2-7B block shapes (benchmarks/gpu_check.py): the fused path against the
#      eager per-expert loop, torch.bmm, torch's grouped GEMM and the weight-bandwidth roofline;
#   4. the 8-bit LLaMA2-7B editing benchmark.
# It stops at the first failing step and says which. Needs no install of memoe_fast: an import shim maps
# the checkout's memoe_fast/ and kernels/. Wheels brought in .whl/ are installed into a private target dir.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${1:-$PWD/gpu_check_out}}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
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

step() {  # step NAME SECONDS COMMAND...: runs one step; on failure says which and stops
  local name="$1" limit="$2"
  shift 2
  echo "== gpu_check: $name (at most $limit s)"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; then
    echo "gpu_check: FAILED at step '$name' (see $OUT/$name.txt)"
    exit 1
  fi
}

step tests 80 env MEMOE_TRITON_CONFIG="BLOCK_M=32,BLOCK_N=32,BLOCK_K=32,GROUP_M=4,num_warps=4,num_stages=2" \
  MEMOE_TRITON_CONFIG_GATE_FWD="BLOCK_T=32,BLOCK_K=32,num_warps=4,num_stages=2" \
  MEMOE_TRITON_CONFIG_GATE_BWD="BLOCK_T=32,BLOCK_D=32,num_warps=4,num_stages=2" \
  MEMOE_TRITON_CONFIG_GATE_WGRAD="BLOCK_T=32,BLOCK_D=32,num_warps=4,num_stages=2" \
  "$PY" -m pytest tests/test_kernels.py tests/test_torch_path.py -q -p no:cacheprovider -rs
step check_7b 150 "$PY" benchmarks/gpu_check.py --check-7b --out "$OUT"
step table 110 "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s 85
step edit_7b 130 "$PY" benchmarks/gpu_edit_7b.py --out "$OUT/edit_7b"
echo "gpu_check: all steps passed; tables in $OUT"
