#!/usr/bin/env bash
# Downloads the two anchors of the fused-head comparison (issues 12 and 13) for the GPU check,
# whose machine has no internet and no pip index: TRL's chunked log-prob head
# (trl/kernels/chunked_logprob.py) and Liger-Kernel's LigerFusedLinearDPOLoss
# (liger_kernel/chunked_loss/). Run it here, where PyPI answers; the GPU check then finds them
# in the ignored folder .gpu_wheels/ (the device tool carries it: carry [".gpu_wheels"]).
#
# Exact versions, wheels only, no dependencies: the benchmark never imports the packages'
# __init__ (TRL's pulls in transformers, accelerate, datasets; Liger's its whole op zoo). It
# loads only the module files it measures from .gpu_wheels/site (bench/python/bench_linear_head.py,
# load_anchors()), which need torch, triton (both in PyTorch's CUDA wheels) and `packaging`
# (TRL's version check; fetched too, used only when the machine's python lacks it).
#
#   bash scripts/fetch_gpu_wheels.sh      # PYTHON (python3), GPU_WHEELS_DIR (.gpu_wheels)
#
# Idempotent: a wheel already there is not downloaded again; site/ is unpacked afresh from the
# pinned wheels each run. Fails if the folder would outgrow what the device tool carries.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${GPU_WHEELS_DIR:-$root/.gpu_wheels}
py=${PYTHON:-python3}
# The versions the issues name and the CPU tests run against (/work/main/.venv: trl 1.16.0,
# liger-kernel 0.8.5, packaging 26.4).
pins=(trl==1.16.0 liger-kernel==0.8.5 packaging==26.4)
max_mib=32  # the device tool carries at most 64 MiB of ignored paths in all; leave room

mkdir -p "$dest/wheels"
wheels=()
for pin in "${pins[@]}"; do
  name=${pin%%==*}
  version=${pin##*==}
  pattern="$dest/wheels/${name//-/_}-$version-*.whl"
  # shellcheck disable=SC2086  # the glob is meant
  if ! compgen -G "$pattern" > /dev/null; then
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest/wheels" "$pin"
  fi
  # shellcheck disable=SC2086
  found=$(compgen -G "$pattern" | head -n 1)
  if [[ -z "$found" ]]; then
    echo "fetch_gpu_wheels: no wheel for $pin in $dest/wheels" >&2
    exit 1
  fi
  wheels+=("$found")
done

rm -rf "$dest/site"
mkdir -p "$dest/site"
for w in "${wheels[@]}"; do
  "$py" -m zipfile -e "$w" "$dest/site"
done
find "$dest/site" -name __pycache__ -prune -exec rm -rf {} +

mib=$(du -sm "$dest" | cut -f 1)
if (( mib > max_mib )); then
  echo "fetch_gpu_wheels: $dest is $mib MiB, over the $max_mib MiB this script allows" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $dest ($mib MiB):"
for w in "${wheels[@]}"; do echo "  $(basename "$w")"; done
