#!/usr/bin/env bash
# Builds everything and runs every test, each stage timed, with a summary at the end:
#   1. dependencies (scripts/setup_deps.sh; installs only what is missing)
#   2. Release build of the tests, benchmarks and examples, CUDA sources included when nvcc
#      is found (`release` preset; CUDA tests skip themselves without a GPU), then ctest
#   3. the CPU tests under AddressSanitizer + UndefinedBehaviorSanitizer (`asan-ubsan`)
#   4. the libFuzzer targets with clang (`fuzz`): the seed corpora replayed, then a bounded
#      run of each (the logits path; the fused LM head against it)
#   5. python/test.sh (PyTorch ops), when it exists
# Every stage runs even if an earlier one failed (a stage whose build failed is reported as
# failed too); the exit status is non-zero when any stage failed. The last line reads
# "N passed, M failed".
#
# Environment: DPO_JOBS (build parallelism, default 2), DPO_FUZZ_SECONDS (default 60).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs=${DPO_JOBS:-2}
fuzz_seconds=${DPO_FUZZ_SECONDS:-60}

summary=()
passed=0
failed=0
declare -A stage_ok=()

fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# stage NAME REQUIRES COMMAND...: runs COMMAND with errexit in a subshell and records the
# result. REQUIRES names an earlier stage that must have passed ("-" for none).
stage() {
  local name=$1 requires=$2 rc start elapsed
  shift 2
  if [[ $requires != - && ${stage_ok[$requires]:-0} != 1 ]]; then
    summary+=("$(printf '%-30s %-8s %8s  (not run: %s failed)' "$name" FAILED - "$requires")")
    failed=$((failed + 1))
    return 0
  fi
  echo
  echo "=== [$name] $(date -u +%H:%M:%S)"
  start=$SECONDS
  set +e
  (set -euo pipefail; "$@")
  rc=$?
  set -e
  elapsed=$((SECONDS - start))
  if [[ $rc == 0 ]]; then
    stage_ok[$name]=1
    passed=$((passed + 1))
    summary+=("$(printf '%-30s %-8s %8s' "$name" passed "$(fmt_time $elapsed)")")
  else
    failed=$((failed + 1))
    summary+=("$(printf '%-30s %-8s %8s  (exit %d)' "$name" FAILED "$(fmt_time $elapsed)" $rc)")
  fi
  echo "=== [$name] exit $rc after $(fmt_time $elapsed)"
}

skip() {
  summary+=("$(printf '%-30s %-8s %8s  (%s)' "$1" skipped - "$2")")
}

have_python_tests() { [[ -f python/test.sh ]]; }

deps() {
  if have_python_tests; then
    bash scripts/setup_deps.sh --python
  else
    bash scripts/setup_deps.sh
  fi
}

build() {
  cmake --preset "$1"
  cmake --build --preset "$1" -j "$jobs"
}

# fuzz_run TARGET SEEDS: the seed corpora replayed (ctest), then a bounded run of TARGET.
fuzz_run() {
  local target=$1 seeds=$2 work=build/fuzz/run/$1
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  # New inputs go to the scratch corpus (first directory); the seeds are only read.
  "build/fuzz/tests/fuzz/$target" -max_total_time="$fuzz_seconds" -timeout=30 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$work/artifacts/" \
    "$work/corpus" "$seeds"
}

total_start=$SECONDS
stage "dependencies" - deps
stage "release build" - build release
stage "release tests" "release build" ctest --preset release -j "$jobs"
stage "asan-ubsan build" - build asan-ubsan
stage "asan-ubsan tests" "asan-ubsan build" ctest --preset asan-ubsan -j "$jobs"
stage "fuzz build" - build fuzz
stage "fuzz seed corpora" "fuzz build" ctest --preset fuzz
stage "fuzz run, logits (${fuzz_seconds}s)" "fuzz build" fuzz_run fuzz_dpo tests/fuzz/corpus
stage "fuzz run, fused head (${fuzz_seconds}s)" "fuzz build" fuzz_run fuzz_linear_dpo tests/fuzz/corpus_linear
if have_python_tests; then
  stage "python tests" - bash python/test.sh
else
  skip "python tests" "python/test.sh not found"
fi

echo
echo "=== summary (total $(fmt_time $((SECONDS - total_start))))"
printf '%s\n' "${summary[@]}"
echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
