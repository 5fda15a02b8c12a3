// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's runtime (see include/cuda_runtime.h for what it models and checks).
// Threads of a block are fibers with their own stacks, switched by a few instructions of
// assembly on x86-64 (ucontext elsewhere, slower). Everything runs on the calling thread.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

namespace dpo_emu {
namespace {

// ---- fibers --------------------------------------------------------------------------------

constexpr std::size_t stack_bytes = 256 * 1024;
constexpr int max_threads = 1024;

#if defined(__x86_64__)
// dpo_emu_switch(from, to): saves the callee-saved registers, the x87 control word and
// MXCSR on the current stack, stores its pointer in *from, and resumes the stack `to`.
// A new fiber's stack is laid out so that the resume "returns" into dpo_emu_start, which
// calls r13(r12).
extern "C" void dpo_emu_switch(void** from, void* to);
extern "C" void dpo_emu_start();
asm(R"(
  .text
  .p2align 4
  .globl dpo_emu_switch
  .type dpo_emu_switch, @function
dpo_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  fnstcw (%rsp)
  stmxcsr 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dpo_emu_switch, .-dpo_emu_switch

  .p2align 4
  .globl dpo_emu_start
  .type dpo_emu_start, @function
dpo_emu_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size dpo_emu_start, .-dpo_emu_start
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

struct fiber {
  void* stack = nullptr;  // stack_bytes, with an inaccessible guard page at the bottom
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

enum class state { ready, block_barrier, warp_barrier, done };

struct thread_slot {
  thread_ctx ctx;
  fiber f;
  state st = state::ready;
  unsigned mask = 0;  // warp_barrier: the mask it named
  const char* file = nullptr;  // block_barrier: where
  int line = 0;
};

struct scheduler {
  std::vector<thread_slot> threads;
  std::vector<unsigned char> slots;  // per warp: 32 lanes x 16 bytes
#if defined(__x86_64__)
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
  thread_slot* running = nullptr;
  std::function<void()>* body = nullptr;
  bool reverse = false;
  thread_ctx host_ctx{{0, 0, 0}, {0, 0, 0}, {1, 1, 1}, {1, 1, 1}, 0};  // outside kernels
};

scheduler& sched() {
  static scheduler s;
  return s;
}

void switch_to_main(thread_slot& t) {
  scheduler& s = sched();
#if defined(__x86_64__)
  dpo_emu_switch(&t.f.sp, s.main_sp);
#else
  swapcontext(&t.f.ctx, &s.main_ctx);
#endif
}

extern "C" void dpo_emu_thread_main(void* arg) {
  thread_slot& t = *static_cast<thread_slot*>(arg);
  (*sched().body)();
  t.st = state::done;
  switch_to_main(t);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void ucontext_entry(unsigned hi, unsigned lo) {
  dpo_emu_thread_main(reinterpret_cast<void*>((static_cast<std::uintptr_t>(hi) << 32) | lo));
}
#endif

void* new_stack() {
  const long page = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cuda emulator: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(p, static_cast<std::size_t>(page), PROT_NONE);  // overflow faults
  return p;
}

void start_fiber(thread_slot& t) {
  if (t.f.stack == nullptr) t.f.stack = new_stack();
#if defined(__x86_64__)
  auto top = reinterpret_cast<std::uintptr_t>(t.f.stack) + stack_bytes;
  top &= ~std::uintptr_t{15};
  // The return-address slot sits at 8 mod 16, so dpo_emu_start calls with an aligned stack.
  auto* slot = reinterpret_cast<std::uint64_t*>(top - 24);
  std::uint64_t* sp = slot - 8;
  sp[0] = 0x037f;  // x87 control word (default)
  sp[1] = 0x1f80;  // MXCSR (default: round to nearest, exceptions masked)
  sp[2] = 0;       // r15
  sp[3] = 0;       // r14
  sp[4] = reinterpret_cast<std::uint64_t>(&dpo_emu_thread_main);  // r13
  sp[5] = reinterpret_cast<std::uint64_t>(&t);                    // r12
  sp[6] = 0;                                                      // rbx
  sp[7] = 0;                                                      // rbp
  slot[0] = reinterpret_cast<std::uint64_t>(&dpo_emu_start);
  t.f.sp = sp;
#else
  getcontext(&t.f.ctx);
  t.f.ctx.uc_stack.ss_sp = t.f.stack;
  t.f.ctx.uc_stack.ss_size = stack_bytes;
  t.f.ctx.uc_link = nullptr;
  const auto a = reinterpret_cast<std::uintptr_t>(&t);
  makecontext(&t.f.ctx, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
              static_cast<unsigned>(a >> 32), static_cast<unsigned>(a & 0xffffffffu));
#endif
  t.st = state::ready;
}

void set_coordinates(const thread_ctx& c) {
  threadIdx = c.thread_idx;
  blockIdx = c.block_idx;
  blockDim = c.block_dim;
  gridDim = c.grid_dim;
}

void resume(thread_slot& t) {
  scheduler& s = sched();
  s.running = &t;
  set_coordinates(t.ctx);
#if defined(__x86_64__)
  dpo_emu_switch(&s.main_sp, t.f.sp);
#else
  swapcontext(&s.main_ctx, &t.f.ctx);
#endif
  s.running = nullptr;
  set_coordinates(s.host_ctx);
}

const char* state_name(state st) {
  switch (st) {
    case state::ready: return "running";
    case state::block_barrier: return "at __syncthreads";
    case state::warp_barrier: return "at a warp shuffle / __syncwarp";
    case state::done: return "exited";
  }
  return "?";
}

[[noreturn]] void deadlock(int n) {
  scheduler& s = sched();
  std::string what = "deadlock: not every thread reached the same barrier (";
  int shown = 0;
  for (int i = 0; i < n && shown < 8; ++i) {
    const thread_slot& t = s.threads[i];
    if (i > 0 && t.st == s.threads[i - 1].st) continue;
    what += "thread " + std::to_string(i) + " " + state_name(t.st) + "; ";
    ++shown;
  }
  what += ")";
  s.running = nullptr;
  fail(what.c_str());
}

/// Runs one block to completion.
void run_block(const uint3& bidx, const dim3& grid, const dim3& block) {
  scheduler& s = sched();
  const int n = static_cast<int>(block.x * block.y * block.z);
  const int warps = (n + 31) / 32;
  if (s.threads.size() < static_cast<std::size_t>(n)) s.threads.resize(static_cast<std::size_t>(n));
  s.slots.assign(static_cast<std::size_t>(warps) * 32 * 16, 0);
  for (int i = 0; i < n; ++i) {
    thread_slot& t = s.threads[i];
    t.ctx.thread_idx = {static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                        static_cast<unsigned>(i) / (block.x * block.y)};
    t.ctx.block_idx = bidx;
    t.ctx.block_dim = block;
    t.ctx.grid_dim = grid;
    t.ctx.linear = i;
    start_fiber(t);
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      thread_slot& t = s.threads[s.reverse ? n - 1 - k : k];
      if (t.st == state::ready) resume(t);
    }
    // Every thread now waits at a barrier or has exited. A warp whose named lanes all wait
    // at a shuffle goes on; else, when every live thread waits at __syncthreads, all go on.
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      const int lo = 32 * w, hi = std::min(n, lo + 32);
      unsigned waiting = 0, mask = 0;
      for (int i = lo; i < hi; ++i) {
        const thread_slot& t = s.threads[i];
        if (t.st != state::warp_barrier) continue;
        if (waiting != 0 && t.mask != mask) fail("lanes of one warp meet at a shuffle with different masks");
        mask = t.mask;
        waiting |= 1u << (i - lo);
      }
      if (waiting == 0 || (mask & waiting) != mask) continue;
      for (int i = lo; i < hi; ++i)
        if (s.threads[i].st == state::warp_barrier) s.threads[i].st = state::ready;
      released = true;
    }
    if (released) continue;
    int done = 0, at_block = 0;
    for (int i = 0; i < n; ++i) {
      done += s.threads[i].st == state::done;
      at_block += s.threads[i].st == state::block_barrier;
    }
    if (done == n) return;
    // A lane named by a shuffle's mask has exited or waits at __syncthreads: never comes.
    if (done + at_block != n) deadlock(n);
    const thread_slot* first = nullptr;
    for (int i = 0; i < n; ++i) {
      const thread_slot& t = s.threads[i];
      if (t.st != state::block_barrier) continue;
      if (first == nullptr) {
        first = &t;
      } else if (t.line != first->line || std::strcmp(t.file, first->file) != 0) {
        const std::string what = "threads " + std::to_string(first->ctx.linear) + " and " +
                                 std::to_string(t.ctx.linear) + " wait at different __syncthreads (" +
                                 first->file + ":" + std::to_string(first->line) + " and " + t.file +
                                 ":" + std::to_string(t.line) + ")";
        fail(what.c_str());
      }
    }
    for (int i = 0; i < n; ++i)
      if (s.threads[i].st == state::block_barrier) s.threads[i].st = state::ready;
  }
}

// ---- device memory -------------------------------------------------------------------------

struct allocation {
  void* map;
  std::size_t map_bytes;  // accessible part, without the guard page at the end
  std::size_t bytes;
};

std::map<std::uintptr_t, allocation>& allocations() {
  static std::map<std::uintptr_t, allocation> a;
  return a;
}

std::size_t page_size() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }

/// Device memory is accessible only while "the device" runs: kernels, copies, memsets.
void protect_device(bool device_access) {
  for (auto& [base, a] : allocations())
    mprotect(a.map, a.map_bytes, device_access ? PROT_READ | PROT_WRITE : PROT_NONE);
}

struct device_scope {
  device_scope() { protect_device(true); }
  ~device_scope() { protect_device(false); }
};

const allocation* find_allocation(const void* p, std::size_t bytes) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  auto& m = allocations();
  auto it = m.upper_bound(a);
  if (it == m.begin()) return nullptr;
  --it;
  if (a + bytes > it->first + it->second.bytes) return nullptr;
  return &it->second;
}

// ---- streams and graphs --------------------------------------------------------------------

cudaError_t last_error = cudaSuccess;

}  // namespace

struct graph {
  std::vector<std::function<void()>> ops;
};
struct graph_exec {
  std::vector<std::function<void()>> ops;
};
struct stream {
  bool capturing = false;
  bool invalidated = false;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  graph* g = nullptr;
};

namespace {

stream legacy_stream;
int global_captures = 0;

std::vector<stream*>& live_streams() {
  static std::vector<stream*> v;
  return v;
}

stream* resolve(cudaStream_t s) { return s == nullptr ? &legacy_stream : s; }

/// An operation that CUDA forbids while a stream captures in global mode: it fails and
/// invalidates the captures.
cudaError_t unsafe_during_capture() {
  if (global_captures == 0) return cudaSuccess;
  for (stream* s : live_streams())
    if (s->capturing) s->invalidated = true;
  return cudaErrorStreamCaptureUnsupported;
}

cudaError_t enqueue(cudaStream_t s, std::function<void()> op) {
  stream* st = resolve(s);
  if (st->capturing) {
    st->g->ops.push_back(std::move(op));
    return cudaSuccess;
  }
  if (global_captures > 0 && st == &legacy_stream) return unsafe_during_capture();
  op();
  return cudaSuccess;
}

}  // namespace

// ---- the interface of cuda_runtime.h -------------------------------------------------------

const thread_ctx& current() {
  scheduler& s = sched();
  return s.running ? s.running->ctx : s.host_ctx;
}

void fail(const char* what) {
  scheduler& s = sched();
  if (s.running != nullptr) {
    const thread_ctx& c = s.running->ctx;
    std::fprintf(stderr,
                 "cuda emulator: %s\n  in grid (%u,%u,%u) x block (%u,%u,%u), block (%u,%u,%u), "
                 "thread (%u,%u,%u)\n",
                 what, c.grid_dim.x, c.grid_dim.y, c.grid_dim.z, c.block_dim.x,
                 c.block_dim.y, c.block_dim.z, c.block_idx.x, c.block_idx.y, c.block_idx.z,
                 c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
  } else {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
  }
  std::fflush(stderr);
  std::abort();
}

void block_barrier(const char* file, int line) {
  scheduler& s = sched();
  if (s.running == nullptr) fail("__syncthreads outside a kernel");
  thread_slot& t = *s.running;
  t.st = state::block_barrier;
  t.file = file;
  t.line = line;
  switch_to_main(t);
}

void warp_barrier(unsigned mask) {
  scheduler& s = sched();
  if (s.running == nullptr) fail("a warp shuffle outside a kernel");
  thread_slot& t = *s.running;
  if (!(mask >> (t.ctx.linear & 31) & 1u)) fail("a lane calls a warp shuffle whose mask excludes it");
  t.st = state::warp_barrier;
  t.mask = mask;
  switch_to_main(t);
}

unsigned char* warp_slots() {
  scheduler& s = sched();
  return s.slots.data() + static_cast<std::size_t>(s.running->ctx.linear / 32) * 32 * 16;
}

cudaError_t set_last_error(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

bool is_device_range(const void* p, std::size_t bytes) {
  return find_allocation(p, bytes) != nullptr;
}

cudaError_t launch(dim3 grid, dim3 block, cudaStream_t s, std::function<void()> body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u || threads == 0 || threads > max_threads || block.z > 64)
    return set_last_error(cudaErrorInvalidConfiguration);
  return set_last_error(enqueue(s, [=]() mutable {
    scheduler& sc = sched();
    if (sc.running != nullptr) fail("a kernel launched from a kernel");
    const char* order = std::getenv("DPO_EMU_ORDER");
    sc.reverse = order != nullptr && std::string(order) == "reverse";
    sc.body = &body;
    device_scope scope;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) run_block({x, y, z}, grid, block);
    sc.body = nullptr;
  }));
}

}  // namespace dpo_emu

using dpo_emu::allocations;

cudaError_t cudaMalloc(void** p, std::size_t bytes) {
  if (p == nullptr) return cudaErrorInvalidValue;
  if (dpo_emu::global_captures > 0) return dpo_emu::unsafe_during_capture();
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  // The buffer ends 16-byte aligned flush against a guard page: reads past its end fault.
  const std::size_t page = dpo_emu::page_size();
  const std::size_t padded = (bytes + 15) / 16 * 16;
  const std::size_t map_bytes = (padded + page - 1) / page * page;
  void* m = mmap(nullptr, map_bytes + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return cudaErrorMemoryAllocation;
  auto* base = static_cast<unsigned char*>(m) + (map_bytes - padded);
  mprotect(m, map_bytes, PROT_READ | PROT_WRITE);
  std::memset(base, 0xff, padded);  // uninitialised device memory reads as NaN / -1
  mprotect(m, map_bytes, PROT_NONE);
  allocations()[reinterpret_cast<std::uintptr_t>(base)] = {m, map_bytes, bytes};
  *p = base;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  if (dpo_emu::global_captures > 0) return dpo_emu::unsafe_during_capture();
  auto it = allocations().find(reinterpret_cast<std::uintptr_t>(p));
  if (it == allocations().end()) return cudaErrorInvalidValue;
  munmap(it->second.map, it->second.map_bytes + dpo_emu::page_size());
  allocations().erase(it);
  return cudaSuccess;
}

namespace {

cudaError_t check_copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  const bool dst_dev = dpo_emu::find_allocation(dst, bytes) != nullptr;
  const bool src_dev = dpo_emu::find_allocation(src, bytes) != nullptr;
  switch (kind) {
    case cudaMemcpyHostToDevice: return dst_dev && !src_dev ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDeviceToHost: return src_dev && !dst_dev ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDeviceToDevice: return src_dev && dst_dev ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyHostToHost: return !src_dev && !dst_dev ? cudaSuccess : cudaErrorInvalidValue;
    case cudaMemcpyDefault: return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  const cudaError_t e = check_copy(dst, src, bytes, kind);
  if (e != cudaSuccess) return e;
  return dpo_emu::enqueue(stream, [=] {
    dpo_emu::device_scope scope;
    std::memmove(dst, src, bytes);
  });
}

cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
  if (dpo_emu::global_captures > 0) return dpo_emu::unsafe_during_capture();
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream) {
  if (bytes > 0 && dpo_emu::find_allocation(p, bytes) == nullptr) return cudaErrorInvalidValue;
  return dpo_emu::enqueue(stream, [=] {
    dpo_emu::device_scope scope;
    std::memset(p, value, bytes);
  });
}

cudaError_t cudaMemset(void* p, int value, std::size_t bytes) {
  if (dpo_emu::global_captures > 0) return dpo_emu::unsafe_during_capture();
  return cudaMemsetAsync(p, value, bytes, nullptr);
}

cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes) {
  const long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
  if (free_bytes) *free_bytes = static_cast<std::size_t>(avail) * dpo_emu::page_size() / 2;
  if (total_bytes) *total_bytes = static_cast<std::size_t>(pages) * dpo_emu::page_size();
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = dpo_emu::last_error;
  dpo_emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return dpo_emu::last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return cudaGetErrorName(e);
  }
}

cudaError_t cudaGetDeviceCount(int* n) {
  if (n == nullptr) return cudaErrorInvalidValue;
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  if (d == nullptr) return cudaErrorInvalidValue;
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

namespace {
/// Streaming multiprocessors of the emulated device (DPO_EMU_SMS, default 3): few, so the
/// persistent row kernels loop over many rows per block.
int sm_count() {
  const char* v = std::getenv("DPO_EMU_SMS");
  const int n = v ? std::atoi(v) : 3;
  return n > 0 ? n : 3;
}
}  // namespace

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (p == nullptr || device != 0) return cudaErrorInvalidValue;
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof(p->name), "dpo CUDA emulator (CPU, %d SMs)", sm_count());
  cudaMemGetInfo(nullptr, &p->totalGlobalMem);
  p->multiProcessorCount = sm_count();
  p->maxThreadsPerBlock = 1024;
  p->major = 9;
  p->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = sm_count(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaDeviceSynchronize() {
  if (dpo_emu::global_captures > 0) return dpo_emu::unsafe_during_capture();
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  if (s == nullptr) return cudaErrorInvalidValue;
  *s = new dpo_emu::stream;
  dpo_emu::live_streams().push_back(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  auto& v = dpo_emu::live_streams();
  auto it = std::find(v.begin(), v.end(), s);
  if (it == v.end()) return cudaErrorInvalidResourceHandle;
  v.erase(it);
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (dpo_emu::resolve(s)->capturing) {
    dpo_emu::resolve(s)->invalidated = true;
    return cudaErrorStreamCaptureUnsupported;
  }
  if (dpo_emu::global_captures > 0 && s == nullptr) return dpo_emu::unsafe_during_capture();
  return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
  if (s == nullptr) return cudaErrorStreamCaptureUnsupported;  // not the legacy stream
  if (s->capturing) return cudaErrorInvalidValue;
  s->capturing = true;
  s->invalidated = false;
  s->mode = mode;
  s->g = new dpo_emu::graph;
  if (mode == cudaStreamCaptureModeGlobal) ++dpo_emu::global_captures;
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  if (s == nullptr || !s->capturing || g == nullptr) return cudaErrorInvalidValue;
  s->capturing = false;
  if (s->mode == cudaStreamCaptureModeGlobal) --dpo_emu::global_captures;
  if (s->invalidated) {
    delete s->g;
    s->g = nullptr;
    *g = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  *g = s->g;
  s->g = nullptr;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long) {
  if (exec == nullptr || g == nullptr) return cudaErrorInvalidValue;
  *exec = new dpo_emu::graph_exec{g->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  if (exec == nullptr) return cudaErrorInvalidValue;
  for (auto& op : exec->ops) {
    const cudaError_t e = dpo_emu::enqueue(s, op);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}

struct dpo_emu::event {
  double ms = -1.0;  // host clock when recorded; -1 before
};

cudaError_t cudaEventCreate(cudaEvent_t* e) {
  if (e == nullptr) return cudaErrorInvalidValue;
  *e = new dpo_emu::event;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (e == nullptr) return cudaErrorInvalidResourceHandle;
  return dpo_emu::enqueue(s, [e] {
    e->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
  });
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return e == nullptr ? cudaErrorInvalidResourceHandle : cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop) {
  if (ms == nullptr || start == nullptr || stop == nullptr || start->ms < 0 || stop->ms < 0)
    return cudaErrorInvalidResourceHandle;
  *ms = static_cast<float>(stop->ms - start->ms);
  return cudaSuccess;
}
