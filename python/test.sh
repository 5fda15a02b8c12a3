#!/usr/bin/env bash
# Builds the dpo_kernels PyTorch extension against torch from PyPI and runs its tests
# (including the comparison against TRL's own DPOTrainer). Idempotent: the virtual
# environment (.venv at the repository root, or $DPO_VENV) is created once and reused.
#
#   bash python/test.sh [extra pytest arguments]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DPO_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "== creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"

# Install (or confirm) the Python dependencies from PyPI. A marker skips pip's resolver on
# reruns; delete it (or the venv) to refresh.
marker="$venv/.dpo_deps_v2"
if [[ ! -f "$marker" ]]; then
  # torch from PyPI brings its CUDA libraries: about 6 GiB installed, more while pip unpacks.
  # Say so up front rather than fail half-way through with pip's "No space left on device".
  need_kib=$((8 * 1024 * 1024))
  free_kib=$(df -Pk "$venv" | awk 'NR == 2 { print $4 }')
  if [[ -n "$free_kib" && "$free_kib" -lt "$need_kib" ]]; then
    echo "python/test.sh: installing torch and the other Python dependencies into $venv needs about 8 GiB" \
         "free on its filesystem; $((free_kib / 1024 / 1024)) GiB are free. Free some space, or point DPO_VENV" \
         "at a filesystem with room (an existing environment with the dependencies is reused)." >&2
    exit 1
  fi
  echo "== installing torch, trl, transformers, pytest, setuptools, ninja, liger-kernel from PyPI"
  "$py" -m pip install --upgrade pip
  "$py" -m pip install torch trl transformers datasets accelerate pytest setuptools wheel ninja numpy
  # Liger-Kernel, the reference of test_liger.py (its chunked losses run as plain torch on the CPU).
  # --no-deps: no re-resolution of torch; its one other requirement, triton, comes with torch on Linux.
  "$py" -m pip install --no-deps liger-kernel==0.8.5
  touch "$marker"
fi
"$py" -c "import torch, trl, transformers; print('torch', torch.__version__, '| trl', trl.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"

if [[ "${DPO_SKIP_BUILD:-0}" != "1" ]]; then
  echo "== building and installing ./python (dpo_kernels) against this torch"
  # Non-editable, no build isolation: the extension must be built against the installed torch.
  MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install --no-build-isolation --no-deps --force-reinstall "$repo/python"
fi

echo "== pytest python/tests"
cd "$repo"
set +e
"$py" -m pytest python/tests -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 0 ]]; then echo "python tests: PASSED"; else echo "python tests: FAILED (pytest exit $rc)"; fi
exit $rc
