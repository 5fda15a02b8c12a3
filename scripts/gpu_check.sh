#!/usr/bin/env bash
# The GPU check of the CUDA path, for a bare H100/H200 machine (CUDA 13, cmake, g++, Catch2 3,
# Google Benchmark, Eigen, PyTorch with CUDA in python3; no internet):
#   configure + build (Release, sm_90, every target, keep going past failures)
#   CPU tests (ctest, not cuda/package labels)
#   CUDA tests against the CPU path ([large]: rows x vocab beyond 2^31)
#   compute-sanitizer memcheck and racecheck on the [sanitize] subset
#   the example, the CUDA benchmark (Google Benchmark JSON), bench/torch_paths.py
# and prints a short table LAST. Every stage has a timeout and the whole run a deadline
# (DEADLINE_S, default 465 s); a failed stage does not stop the others, but the exit code is
# non-zero if any stage failed or was skipped for time. Logs and JSON go to $OUT (if set)
# or build-gpu/logs.
#
#   bash scripts/gpu_check.sh            # from anywhere; BUILD_DIR=... to change build-gpu
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-gpu}
logs=${OUT:-$build/logs}
mkdir -p "$logs"
deadline=$(( $(date +%s) + ${DEADLINE_S:-465} ))
jobs=${JOBS:-16}
arch=${CUDA_ARCH:-90}

names=()
declare -A outcome seconds
failed=0

# stage NAME LIMIT_S CMD...: runs CMD with a timeout (never past the deadline), logs to
# $logs/NAME.log, records ok / FAIL(rc) / TIMEOUT / SKIPPED.
stage() {
  local name=$1 limit=$2
  shift 2
  names+=("$name")
  local left=$(( deadline - $(date +%s) ))
  if (( left < 15 )); then
    outcome[$name]="SKIPPED(time)"; seconds[$name]=0; failed=1
    echo "== $name: skipped, out of time" | tee -a "$logs/summary.log"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$logs/summary.log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    outcome[$name]=ok
  elif (( rc == 124 || rc == 137 )); then
    outcome[$name]="TIMEOUT"; failed=1
  else
    outcome[$name]="FAIL(rc=$rc)"; failed=1
  fi
  tail -n 15 "$logs/$name.log"
  return $rc
}

# A CUDA test binary that reports "skipped" (exit 77: no device) fails the check here.
run_cuda_test() {
  "$@"
  local rc=$?
  if (( rc == 77 )); then echo "the test skipped itself: no usable CUDA device"; return 77; fi
  return $rc
}

{
  echo "date: $(date -u)"; uname -a
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -2; cmake --version | head -1; g++ --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} > "$logs/env.log" 2>&1
cat "$logs/env.log"

stage configure 120 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DDPO_BUILD_FUZZERS=OFF
# One build of everything (the CUDA targets compile in parallel with the CPU tests); -k keeps
# going past a broken target so the CUDA stages still get their binaries.
stage build 300 cmake --build "$build" -j "$jobs" -- -k
stage cpu_tests 150 ctest --test-dir "$build" -LE "cuda|package" -j 8 --timeout 120 --output-on-failure

tbin=$build/tests/cuda/test_cuda_dpo
stage cuda_tests 180 run_cuda_test "$tbin" "~[large]" --durations yes
stage cuda_large 120 run_cuda_test "$tbin" "[large]" --durations yes
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
stage memcheck 150 "$san" --tool memcheck --error-exitcode 99 --leak-check full "$tbin" "[sanitize]"
stage racecheck 150 "$san" --tool racecheck --error-exitcode 99 --racecheck-report all "$tbin" "[sanitize]"
stage example 60 "$build/examples/cuda/dpo_example_custom_kernel"
stage bench_cuda 150 "$build/bench/cuda/dpo_bench_cuda" --benchmark_out="$logs/bench_cuda.json" \
  --benchmark_out_format=json
stage torch_paths 200 python3 "$root/bench/torch_paths.py" --shapes large --repeat 5 \
  --json "$logs/torch_paths.json"

# The table, last.
{
  echo
  echo "==================== gpu_check summary ===================="
  echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
  printf "%-12s %-16s %6s\n" stage result seconds
  for n in "${names[@]}"; do printf "%-12s %-16s %6s\n" "$n" "${outcome[$n]}" "${seconds[$n]}"; done
  python3 - "$logs" <<'PY' 2>/dev/null || echo "(no benchmark numbers)"
import json, os, sys
logs = sys.argv[1]
rows = []
p = os.path.join(logs, "bench_cuda.json")
if os.path.exists(p):
    for b in json.load(open(p)).get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        share = b.get("copy_share")
        rows.append((b["name"].split("/")[1], "dpo:" + b["name"].split("/")[0], b.get("median_ms", 0.0),
                     b.get("TB_s", 0.0), f"{share:.0%}" if share else "", ""))
p = os.path.join(logs, "torch_paths.json")
if os.path.exists(p):
    for r in json.load(open(p))["results"]:
        if r["path"] == "copy":
            continue
        rows.append((r["shape"], f"torch:{r['path']}:{r['mode']}", r["ms"], r["TB_s"] or 0.0, "",
                     f"{r['extra_GiB']:.2f}"))
print(f"{'shape':<22} {'path':<26} {'ms':>9} {'TB/s':>6} {'of copy':>7} {'extra GiB':>9}")
for s, path, ms, tb, share, mem in rows:
    print(f"{s:<22} {path:<26} {ms:>9.3f} {tb:>6.2f} {share:>7} {mem:>9}")
PY
  if (( failed )); then echo "RESULT: FAILED (logs in $logs)"; else echo "RESULT: all stages passed (logs in $logs)"; fi
} | tee "$logs/table.txt"
exit $failed
