#!/usr/bin/env bash
# One device call for the chunk KDA kernels: GPU tests, then the benchmark (ours vs FLA vs SDPA, decode).
# Expects FLA's wheels installed on PYTHONPATH beforehand (DESIGN.md §5), e.g. on the H200:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#   bash benchmarks/gpu_kda.sh "$OUT" [--sweep]
set -o pipefail
OUT_DIR=${1:-benchmarks/results}
shift || true
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python -m pytest -q -rs -p no:cacheprovider ${KDA_TEST_ARGS:-} tests/ops/test_kda_chunk_triton.py 2>&1 | tee "$OUT_DIR/kda_chunk_tests.log"
python benchmarks/kda_kernels.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/kda_kernels.log"
