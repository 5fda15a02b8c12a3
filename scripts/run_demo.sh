#!/usr/bin/env bash
# Builds and runs the demo: examples/train_tiny_dpo.cpp trains a tiny policy with the DPO
# loss of this library (Release build in build/release, the `release` preset). Arguments are
# passed to the demo. DPO_JOBS sets the build parallelism (default 2).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_deps.sh
cmake --preset release
cmake --build --preset release -j "${DPO_JOBS:-2}" --target train_tiny_dpo
demo=$(find build/release -type f -name train_tiny_dpo -perm -u+x -print -quit)
if [[ -z "$demo" ]]; then
  echo "run_demo.sh: train_tiny_dpo was built but not found under build/release" >&2
  exit 1
fi
exec "$demo" "$@"
