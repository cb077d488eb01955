#!/usr/bin/env bash
# Set up kimi-linear in ./.venv on a machine with only Python >= 3.10.
#   scripts/setup.sh          the package (for `kimi-linear ...`)
#   scripts/setup.sh test     plus the test extra (pytest, triton for its CPU interpreter, transformers for interop)
#   scripts/setup.sh bench    plus the benchmark extra
# An existing torch >= 2.6 (system-wide) is used as it is; otherwise torch==2.13.0 is installed. An unpinned torch
# is never requested, because on Linux that pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv --system-site-packages .venv
fi
py=.venv/bin/python
if ! "$py" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 6) else 1)
PY
then
  "$py" -m pip install -q torch==2.13.0
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
"$py" -m pip install -q -e "$spec"
