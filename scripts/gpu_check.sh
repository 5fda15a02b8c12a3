#!/usr/bin/env bash
# The GPU check of the CUDA path and the PyTorch ops, for a bare H100/H200 machine (CUDA 13,
# cmake, g++, Eigen, Catch2 3, Google Benchmark, PyTorch with CUDA in python3; no internet).
# In one call, most important first:
#   python_build  the dpo_kernels extension (sm_$CUDA_ARCH), in the background from the start
#   configure, build   test_cuda_dpo, the other CUDA suites, the benchmarks and examples (Release)
#   cuda_tests    dpo::cuda against dpo::cpu on random inputs (every loss, dtype, layout, odd
#                 vocab, masks, in place, graph capture, errors, determinism)
#   linear_tests  the fused LM head (dpo/cuda/linear.cuh, cuBLASLt) against dpo::cpu's, then
#                 DPO from hidden states (dpo/cuda/linear_dpo.cuh, three and four passes, both
#                 reference forms) against dpo::cpu::linear_dpo, then the head on a vocabulary
#                 shard (dpo/cuda/linear_shard.cuh) against dpo::cpu's sharded and whole heads
#   shard_tests   the logits path's vocabulary-shard kernels (dpo/cuda/shard.cuh, test_cuda_shard)
#                 against dpo::cpu's sharded and unsharded calls: every step, fp32/fp64/bf16/fp16,
#                 uneven shards (V 1001 over 3), masks, packed, in place, W x C context ranks
#   bench_cuda    copy / forward / fused forward+backward, TB/s and share of the copy
#   bench_linear  the fused LM head at N 8192, H 4096, V 128256 bf16 against the same cuBLASLt
#                 GEMMs alone (floor_ratio) and the materializing path (full logits), and
#                 linear_dpo in three and four passes, reference from log-probs and from hidden
#                 states, against their GEMM floors (3 or 4 passes, + 1 for the reference)
#   cuda_large    rows x vocab beyond 2^31 elements
#   memcheck, racecheck   compute-sanitizer on the [sanitize] subset
#   linear_memcheck, linear_racecheck   the same over the linear head's [sanitize] cases
#   linear_dpo_memcheck   memcheck over linear_dpo's [sanitize] cases (three and four passes)
#   shard_memcheck        memcheck over the vocabulary-sharded head's [sanitize] cases
#   shard_logits_memcheck, shard_logits_racecheck   memcheck over test_cuda_shard's [sanitize]
#                 cases, racecheck over its [sanitize][pairs] ones (the pair path; racecheck is slow)
#   example       examples/cuda/custom_kernel.cu
#   example_step  examples/cuda/training_step.cu (its three ways agree, bitwise)
#   python_tests  python/tests/test_cuda.py, test_cuda_linear.py (the ops on CUDA tensors against the CPU ops,
#                 CUDA graphs, torch.compile)
#   python_dist_tests  test_cuda_distributed.py, test_cuda_distributed_head.py (the sharded ops' CUDA
#                 kernels against their CPU kernels; world size 1 against the unsharded ops, eager and compiled)
#   linear_head_py  bench/python/bench_linear_head.py --device cuda --shape large: TRL 1.16's
#                 chunked log-prob head (its Triton path) + DPO and Liger 0.8.5's
#                 LigerFusedLinearDPOLoss (compiled) against our fused-head ops, the
#                 materializing path and three (+1 reference) torch.matmul GEMMs, time and extra
#                 memory, reference as log-probs and as a model; TRL and Liger come from
#                 .gpu_wheels/ (SKIPPED(no wheels) without it; ours "unavailable" without CUDA ops)
#   torch_paths   eager / TRL's loop / torch.compile / ours, time and extra memory
#   ncu           (optional, never fails the run) DRAM vs issue utilization of the row
#                 kernels of dpo_forward and dpo_forward_backward at the large shape
# and prints a short table LAST. Every stage has a time limit and the whole run a deadline
# (DEADLINE_S, default 470 s: the issue's 8 minutes, less margin); a stage that fails does
# not stop the others, but the exit code is non-zero if any failed, skipped itself (exit 77:
# no device) or was cut for time. Logs: build-gpu/logs; when $OUT is set (the device tool),
# table.txt, the benchmark JSON files and logs.tgz are copied there.
#
#   bash scripts/gpu_check.sh        # BUILD_DIR, CUDA_ARCH (90), JOBS (16), DEADLINE_S, ONLY
#
# ONLY=name,name,...  runs only those stages (names as in the table; configure and build always
# run, incrementally; the extension only for the python_* stages, linear_head_py, torch_paths). Stages the
# deadline cut are listed at the end as a ready ONLY= line: on a still-warm machine (the build
# directory kept) that rerun costs the selected stages plus an incremental build.
#
# With the device tool: first, here (PyPI reachable), `bash scripts/fetch_gpu_wheels.sh` (TRL and
# Liger wheels, no deps, unpacked into the ignored .gpu_wheels/, ~11 MiB), then `run` with command
# `bash scripts/gpu_check.sh` and carry [".gpu_wheels"] (the machine has no pip and no internet).
set -u

# Every stage name, in run order (ONLY= must name some of these).
all_stages=(configure build cuda_tests linear_tests shard_tests bench_cuda bench_linear cuda_large
  memcheck racecheck linear_memcheck linear_racecheck linear_dpo_memcheck shard_memcheck
  shard_logits_memcheck shard_logits_racecheck example example_step python_tests python_dist_tests linear_head_py
  torch_paths ncu)
only=",${ONLY:-},"
only=${only// /}
if [[ -n "${ONLY:-}" ]]; then
  for n in ${ONLY//,/ }; do
    if [[ " ${all_stages[*]} " != *" $n "* ]]; then
      echo "gpu_check: ONLY names an unknown stage '$n'; the stages are: ${all_stages[*]}" >&2
      exit 2
    fi
  done
fi
# selected NAME...: true when ONLY is unset or names one of them (configure and build always).
selected() {
  [[ -z "${ONLY:-}" ]] && return 0
  local n
  for n in "$@"; do
    [[ $n == configure || $n == build || "$only" == *",$n,"* ]] && return 0
  done
  return 1
}

t_start=$(date +%s)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-gpu}
logs=$build/logs
rm -rf "$logs"
mkdir -p "$logs"
deadline=$(( t_start + ${DEADLINE_S:-470} ))
jobs=${JOBS:-16}
arch=${CUDA_ARCH:-90}

names=()
declare -A outcome seconds
failed=0

# stage NAME LIMIT_S CMD...: runs the program CMD (not a shell function: timeout execs it)
# with a time limit that never passes the deadline; logs to $logs/NAME.log; records ok,
# FAIL(rc), TIMEOUT, SKIPPED(no device) (exit 77) or SKIPPED(time).
stage() {
  local name=$1 limit=$2
  shift 2
  selected "$name" || return 0
  names+=("$name")
  local left=$(( deadline - $(date +%s) ))
  if (( left < 10 )); then
    outcome[$name]="SKIPPED(time)"; seconds[$name]=0; failed=1
    echo "== $name: skipped, out of time"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  seconds[$name]=$(( $(date +%s) - t0 ))
  # The benchmark and the example print this and exit 0 on a machine without a device.
  if (( rc == 0 )) && grep -qi "^SKIPPED: no CUDA device\|^no CUDA device" "$logs/$name.log"; then rc=77; fi
  # pytest with every test skipped (no device) exits 0 too: its summary then starts "N skipped".
  if (( rc == 0 )) && tail -n 1 "$logs/$name.log" | grep -qE "^=* *[0-9]+ skipped"; then rc=77; fi
  case $rc in
    0) outcome[$name]=ok ;;
    77) outcome[$name]="SKIPPED(no device)"; failed=1 ;;
    124|137) outcome[$name]=TIMEOUT; failed=1 ;;
    *) outcome[$name]="FAIL(rc=$rc)"; failed=1 ;;
  esac
  tail -n 12 "$logs/$name.log"
  return $rc
}

# A stage that could not run for a reason outside the code (tool refuses the device).
not_run() {
  selected "$1" || return 0
  names+=("$1"); outcome[$1]=$2; seconds[$1]=0; failed=1
  echo "== $1: $2"
}

{
  echo "date: $(date -u)"; uname -a; echo "cores: $(nproc)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  for t in nvcc cmake make ninja g++ compute-sanitizer python3; do echo "$t: $(command -v $t)"; done
  nvcc --version 2>&1 | tail -2; cmake --version | head -1; g++ --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
} > "$logs/env.log" 2>&1
cat "$logs/env.log"

# The extension compiles for minutes (torch's headers): start it first, on 6 of the cores.
# In place: python/dpo_kernels/_C*.so next to the package's Python files.
# Only when a stage that uses it is selected; a rerun reuses the object files in python-tmp.
py_pid=
if selected python_tests python_dist_tests linear_head_py torch_paths; then
  rm -f "$root"/python/dpo_kernels/_C*.so
  (
    cd "$root/python" &&
    DPO_KERNELS_CUDA=1 DPO_KERNELS_CUDA_ARCHS=$arch MAX_JOBS=6 timeout 330 \
      python3 setup.py build_ext --inplace --build-temp "$build/python-tmp" \
      > "$logs/python_build.log" 2>&1
    echo $? > "$logs/python_build.rc"
  ) &
  py_pid=$!
fi

# CMAKE_POLICY_VERSION_MINIMUM: CMake 4 refuses package configs written for CMake < 3.5.
# Ninja when there is one: it builds the listed targets as one graph on every core, where the
# Makefile generator builds them one after another (its top-level Makefile is .NOTPARALLEL),
# each waiting on its own longest nvcc translation unit.
# keep_going: a target that fails to compile does not stop the others, so the stages whose
# binaries did build still run (the build stage is then FAIL and the run's exit code non-zero).
gen=(-G "Unix Makefiles"); keep_going=(-k)
command -v ninja > /dev/null && { gen=(-G Ninja); keep_going=(-k 0); }
if [[ -f "$build/CMakeCache.txt" ]] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=${gen[1]}" "$build/CMakeCache.txt"; then
  rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"  # a build folder of the other generator
fi
stage configure 90 cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DDPO_BUILD_FUZZERS=OFF \
  -DCMAKE_POLICY_VERSION_MINIMUM=3.5
if ! grep -q "dpo: CUDA enabled" "$logs/configure.log"; then
  echo "configure did not enable CUDA: nothing below can run"; failed=1
fi
stage build 240 cmake --build "$build" -j "$(( jobs > 6 ? jobs - 6 : jobs ))" --target test_cuda_dpo \
  dpo_bench_cuda dpo_example_custom_kernel dpo_example_training_step test_cuda_linear test_cuda_linear_dpo dpo_bench_cuda_linear \
  test_cuda_shard_linear test_cuda_shard -- "${keep_going[@]}"

tbin=$build/tests/cuda/test_cuda_dpo
stage cuda_tests 120 "$tbin" "~[large]" --durations yes
lbin=$build/tests/cuda/test_cuda_linear
sbin=$build/tests/cuda/test_cuda_shard_linear
stage linear_tests 60 bash -c "\"$lbin\" --durations yes && \"$build/tests/cuda/test_cuda_linear_dpo\" --durations yes \
  && \"$sbin\" --durations yes"
# The logits path's shard kernels (the emulator runs the same suite in CI: test_cuda_shard_emulated).
shbin=$build/tests/cuda/test_cuda_shard
stage shard_tests 60 "$shbin" --durations yes
stage bench_cuda 120 "$build/bench/cuda/dpo_bench_cuda" --benchmark_out="$logs/bench_cuda.json" \
  --benchmark_out_format=json
stage bench_linear 90 "$build/bench/cuda/dpo_bench_cuda_linear" --benchmark_out="$logs/bench_cuda_linear.json" \
  --benchmark_out_format=json
# TRL 1.16's chunked head and Liger's fused DPO at the same shape run from Python: linear_head_py below.
stage cuda_large 90 "$tbin" "[large]" --durations yes
san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
san_stages=(memcheck racecheck linear_memcheck linear_racecheck linear_dpo_memcheck shard_memcheck
  shard_logits_memcheck shard_logits_racecheck)
# compute-sanitizer refuses the device on some sandboxes (gVisor): probe once, cheaply (not
# when no sanitizer stage is selected, nor with under 40 s left: the stages are then cut).
if ! selected "${san_stages[@]}"; then
  :
elif (( deadline - $(date +%s) < 40 )); then
  for n in "${san_stages[@]}"; do not_run "$n" "SKIPPED(time)"; done
elif timeout 60 "$san" --tool memcheck "$tbin" "cuda: bad arguments*" > "$logs/sanitizer_probe.log" 2>&1; then
  stage memcheck 90 "$san" --tool memcheck --error-exitcode 99 --leak-check full "$tbin" "[sanitize]"
  stage racecheck 120 "$san" --tool racecheck --error-exitcode 99 --racecheck-report all "$tbin" "[sanitize]"
  stage linear_memcheck 90 "$san" --tool memcheck --error-exitcode 99 --leak-check full "$lbin" "[sanitize]"
  stage linear_racecheck 90 "$san" --tool racecheck --error-exitcode 99 --racecheck-report all "$lbin" "[sanitize]"
  stage linear_dpo_memcheck 60 "$san" --tool memcheck --error-exitcode 99 --leak-check full \
    "$build/tests/cuda/test_cuda_linear_dpo" "[sanitize]"
  stage shard_memcheck 60 "$san" --tool memcheck --error-exitcode 99 --leak-check full "$sbin" "[sanitize]"
  stage shard_logits_memcheck 40 "$san" --tool memcheck --error-exitcode 99 --leak-check full "$shbin" "[sanitize]"
  stage shard_logits_racecheck 40 "$san" --tool racecheck --error-exitcode 99 --racecheck-report all "$shbin" \
    "[sanitize][pairs]"
else
  why="SKIPPED(sanitizer: $(grep -v '^\s*$' "$logs/sanitizer_probe.log" | head -n 1 | cut -c 1-40))"
  for n in "${san_stages[@]}"; do not_run "$n" "$why"; done
fi
stage example 30 "$build/examples/cuda/dpo_example_custom_kernel"
stage example_step 30 "$build/examples/cuda/dpo_example_training_step"

left=$(( deadline - $(date +%s) ))
if [[ -n $py_pid ]]; then
  if ! timeout $(( left > 0 ? left : 1 )) tail --pid="$py_pid" -f /dev/null; then kill "$py_pid" 2> /dev/null; fi
  tail -n 5 "$logs/python_build.log"
fi
py_ok=0
if [[ -z $py_pid ]]; then
  :  # no Python stage selected
elif [[ "$(cat "$logs/python_build.rc" 2> /dev/null)" == 0 ]]; then
  py_ok=1
  export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
  # Every CUDA op against its CPU kernel, in two stages so that one cut for time keeps the
  # other's results: the logits and fused-head ops, then the sharded ops. --durations: the
  # slowest tests, to say where the time went.
  tdir=$root/python/tests
  stage python_tests 180 python3 -m pytest -q -p no:cacheprovider -rf --tb=line --durations=8 \
    "$tdir/test_cuda.py" "$tdir/test_cuda_linear.py"
  stage python_dist_tests 150 python3 -m pytest -q -p no:cacheprovider -rf --tb=line --durations=8 \
    "$tdir/test_cuda_distributed.py" "$tdir/test_cuda_distributed_head.py"
else
  # Under the stages' names, so that ONLY= reruns them (the build is their first step).
  why="FAIL(python_build rc=$(cat "$logs/python_build.rc" 2> /dev/null || echo timeout))"
  not_run python_tests "$why"; not_run python_dist_tests "$why"
fi
# The fused head from Python against TRL's and Liger's (issues 12, 13). Without the extension it
# still measures TRL, Liger, the floor and the materializing path (ours: "unavailable").
if [[ -d "$root/.gpu_wheels/site" ]]; then
  stage linear_head_py 90 python3 "$root/bench/python/bench_linear_head.py" --device cuda --shape large \
    --reps 3 --wheels "$root/.gpu_wheels" --json "$logs/linear_head.json"
else
  not_run linear_head_py "SKIPPED(no wheels)"
fi
if (( py_ok )); then
  stage torch_paths 150 python3 "$root/bench/torch_paths.py" --shapes large --repeat 5 --require-ours \
    --json "$logs/torch_paths.json"
else
  stage torch_paths 150 python3 "$root/bench/torch_paths.py" --shapes large --repeat 5 \
    --paths eager,trl_loop,compiled --json "$logs/torch_paths.json"
fi

# Optional, after everything else: hardware counters (Nsight Compute) of the policy pass's row
# kernels at the large shape, to say whether each is bound by DRAM or by instruction issue.
# Never fails the run: skipped without ncu, without 80 s left, or when ncu cannot read the
# counters (gVisor); --clock-control none leaves the clocks as the benchmarks saw them.
ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
ncu_metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
ncu_metrics+=,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active
ncu_metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
ncu_metrics+=,launch__registers_per_thread
if ! selected ncu; then
  :
elif [[ -x "$ncu_bin" && -x "$build/bench/cuda/dpo_bench_cuda" ]] && (( deadline - $(date +%s) > 80 )); then
  for what in dpo_forward fused_inplace; do
    echo "== ncu $what (optional)"
    DPO_BENCH_MIN_TIME=0.01 timeout --kill-after=5 35 "$ncu_bin" --clock-control none --csv --print-kernel-base function \
      --metrics "$ncu_metrics" --kernel-name regex:'rows_kernel|backward_kernel|backward_metrics_kernel' \
      --launch-skip 2 --launch-count 2 "$build/bench/cuda/dpo_bench_cuda" \
      --benchmark_filter="^$what/8x1024" > "$logs/ncu_$what.log" 2>&1
    echo "ncu rc=$?" >> "$logs/ncu_$what.log"
    tail -n 3 "$logs/ncu_$what.log"
  done
else
  echo "== ncu: skipped (optional: no ncu, no benchmark binary, or under 80 s left)"
fi

# The table, last.
{
  echo
  echo "==================== gpu_check summary ===================="
  echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2> /dev/null | head -n 1)"
  printf "%-22s %-30s %6s\n" stage result seconds
  for n in "${names[@]}"; do printf "%-22s %-30s %6s\n" "$n" "${outcome[$n]}" "${seconds[$n]}"; done
  grep -h "^test cases:\|^All tests passed\|passed\|failed" "$logs/cuda_tests.log" "$logs/cuda_large.log" \
    "$logs/linear_tests.log" "$logs/shard_tests.log" "$logs/python_tests.log" "$logs/python_dist_tests.log" 2> /dev/null | grep -v "^$" | tail -n 8
  python3 - "$logs" <<'PY' 2> /dev/null || echo "(no benchmark numbers)"
import json, os, sys
logs = sys.argv[1]
rows = []
p = os.path.join(logs, "bench_cuda.json")
if os.path.exists(p):
    for b in json.load(open(p)).get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        share = b.get("copy_share")
        what, shape = b["name"].split("/")[:2]
        rows.append((shape, "dpo:" + what, b.get("median_ms", 0.0), b.get("TB_s", 0.0),
                     f"{share:.0%}" if share else "", ""))
p = os.path.join(logs, "torch_paths.json")
if os.path.exists(p):
    results = json.load(open(p))["results"]
    copy = {r["shape"]: r["TB_s"] for r in results if r["path"] == "copy"}
    for r in results:
        if r["path"] == "copy":
            continue
        tb = r["TB_s"] or 0.0
        share = f"{tb / copy[r['shape']]:.0%}" if tb and copy.get(r["shape"]) else ""
        rows.append((r["shape"], f"torch:{r['path']}:{r['mode']}", r["ms"], tb, share,
                     f"{r['extra_GiB']:.2f}"))
print(f"{'shape':<22} {'path':<26} {'ms':>9} {'TB/s':>6} {'of copy':>7} {'extra GiB':>9}")
for s, path, ms, tb, share, mem in rows:
    print(f"{s:<22} {path:<26} {ms:>9.3f} {tb:>6.2f} {share:>7} {mem:>9}")
# The fused LM head: ms against its cuBLASLt GEMM floor measured in the same run.
p = os.path.join(logs, "bench_cuda_linear.json")
if os.path.exists(p):
    print(f"{'linear head':<28} {'shape':<26} {'ms':>9} {'x floor':>7} {'extra GiB':>9}")
    for b in json.load(open(p)).get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        what, shape = b["name"].split("/")[:2]
        ratio = b.get("floor_ratio")
        print(f"{what:<28} {shape:<26} {b.get('median_ms', 0.0):>9.3f} "
              f"{(f'{ratio:.2f}x' if ratio else ''):>7} {b.get('extra_GiB', 0.0):>9.2f}")
# The fused head from Python: ms, x the torch.matmul GEMM floor, speed-up over TRL's and Liger's heads.
p = os.path.join(logs, "linear_head.json")
if os.path.exists(p):
    d = json.load(open(p))
    s = d["shape"]
    print(f"fused head from python, N {s['N']} H {s['H']} V {s['V']} {s['dtype']} ({d['device']})")
    print(f"{'section':<25} {'path':<42} {'ms':>8} {'x floor':>7} {'vs TRL':>6} {'vs Liger':>8} {'extra GiB':>9}")
    f = lambda v, spec: "" if v is None else format(v, spec)
    for r in d["results"]:
        if r["status"] != "ok":
            print(f"{r['section']:<25} {r['path']:<42} {r['status'][:70]}")
            continue
        print(f"{r['section']:<25} {r['path']:<42} {f(r.get('ms'), '8.2f'):>8} {f(r.get('x_floor'), '.2f') + 'x':>7} "
              f"{f(r.get('vs_trl'), '.2f'):>6} {f(r.get('vs_liger'), '.2f'):>8} {f(r.get('extra_GiB'), '.2f'):>9}")
PY
  python3 "$root/scripts/ncu_table.py" "$logs"/ncu_*.log 2> /dev/null
  echo "wall: $(( $(date +%s) - t_start )) s${ONLY:+ (ONLY=$ONLY)}"
  cut=()
  for n in "${names[@]}"; do [[ ${outcome[$n]} == "SKIPPED(time)" ]] && cut+=("$n"); done
  if (( ${#cut[@]} )); then
    list=$(IFS=,; echo "${cut[*]}")
    echo "cut by the deadline; rerun them: ONLY=$list bash scripts/gpu_check.sh"
  fi
  if (( failed )); then echo "RESULT: FAILED (logs in $logs)"; else echo "RESULT: all stages passed"; fi
} | tee "$logs/table.txt"

if [[ -n "${OUT:-}" ]]; then
  # The device tool returns at most 8 files: the table, the four JSON files, one archive.
  cp "$logs/table.txt" "$OUT/" 2> /dev/null
  cp "$logs"/bench_cuda.json "$logs"/bench_cuda_linear.json "$logs"/torch_paths.json "$logs"/linear_head.json \
    "$OUT/" 2> /dev/null
  tar czf "$OUT/logs.tgz" -C "$build" logs 2> /dev/null
fi
exit $failed
