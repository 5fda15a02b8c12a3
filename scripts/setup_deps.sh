#!/usr/bin/env bash
# Installs the Debian packages the build, tests, benchmarks, examples and fuzzer need, and
# only those that are missing: a machine that has them all is left alone (no apt-get at all).
#
#   bash scripts/setup_deps.sh            # C++ toolchain, Eigen, Catch2, Google Benchmark, clang
#   bash scripts/setup_deps.sh --python   # also python3 with venv and headers (python/ tests)
#
# Runs as root (no sudo needed) or as a user with sudo. Non-interactive. On a system
# without dpkg/apt-get it only reports what it cannot check.
set -euo pipefail

with_python=0
for arg in "$@"; do
  case "$arg" in
    --python) with_python=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup_deps.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

# Catch2 is the v2 package on Debian 12 (2.13); the tests also build with v3.
packages=(cmake make g++ libeigen3-dev catch2 libbenchmark-dev clang)
if [[ $with_python == 1 ]]; then
  packages+=(python3 python3-venv python3-dev)
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_deps.sh: no dpkg/apt-get here; install these (or equivalents) yourself:" >&2
  echo "  ${packages[*]} libclang-rt-<clang major>-dev" >&2
  exit 0
fi

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

as_root() {
  if [[ $(id -u) == 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "setup_deps.sh: need root or sudo to run: $*" >&2
    return 1
  fi
}

apt_updated=0
install_missing() {
  local missing=() p
  for p in "$@"; do
    is_installed "$p" || missing+=("$p")
  done
  [[ ${#missing[@]} == 0 ]] && return 0
  echo "setup_deps.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [[ $apt_updated == 0 ]]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_missing "${packages[@]}"

# libFuzzer and the sanitizer runtimes come with compiler-rt of the clang actually installed.
clang_major=$(clang -dumpversion 2>/dev/null | cut -d. -f1 || true)
if [[ -z "$clang_major" ]]; then
  echo "setup_deps.sh: clang is installed but 'clang -dumpversion' failed" >&2
  exit 1
fi
install_missing "libclang-rt-${clang_major}-dev"

echo "setup_deps.sh: all dependencies present (clang ${clang_major}, $(cmake --version | head -n1))"
