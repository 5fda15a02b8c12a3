// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's runtime: a test-only stand-in for <cuda_runtime.h> that lets g++ build
// the library's CUDA code (kernels/dpo/cuda) and the CUDA test harness, and run them on the
// CPU. Only this directory's tests put it on the include path; nothing is installed.
//
// What it models, and what it checks that a real device would also reject:
//  * Kernels: every block runs its threads as fibers on one OS thread, so __syncthreads,
//    warp shuffles, __shared__ data and CUB block primitives have their CUDA meaning. A
//    barrier that not every live thread reaches (or that threads reach at different
//    __syncthreads calls), or a shuffle whose mask names a lane that has exited or is
//    elsewhere, stops the program with a diagnostic (a hang or undefined behaviour on a GPU). After a barrier the threads resume in forward or reverse order
//    (DPO_EMU_ORDER=reverse), which exposes shared-memory reuse without a barrier.
//  * Device memory: cudaMalloc'd buffers end flush against an inaccessible page (reads or
//    writes past the end fault), start as 0xff bytes (NaN, -1: uninitialised reads show),
//    and are inaccessible (PROT_NONE) while host code runs: a host dereference of a device
//    pointer faults, as it would with a real GPU.
//  * Streams run in order, synchronously. Graph capture records the enqueued work; in
//    cudaStreamCaptureModeGlobal an allocation, free or synchronous copy during capture is
//    an error (cudaErrorStreamCaptureUnsupported) and invalidates the capture, as in CUDA.
// What it does not model: timing, the memory model across blocks (blocks run one after
// another), warp-synchronous code without shuffles, and float rounding of device math
// (exp, exp2 and fma are the host's).
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block's threads share one host thread, and blocks run one at a time.
#define __shared__ static

struct alignas(8) uint2 {
  unsigned x, y;
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(const uint3& u) : x(u.x), y(u.y), z(u.z) {}
};

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorStreamCaptureWrongThread = 908,
  cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
};

enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
};

#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01

namespace dpo_emu {
struct stream;
struct graph;
struct graph_exec;
struct event;
}  // namespace dpo_emu
typedef dpo_emu::stream* cudaStream_t;
typedef dpo_emu::event* cudaEvent_t;
typedef dpo_emu::graph* cudaGraph_t;
typedef dpo_emu::graph_exec* cudaGraphExec_t;

struct cudaDeviceProp {
  char name[256];
  std::size_t totalGlobalMem;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int major;
  int minor;
};

struct cudaLaunchAttribute;
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  std::size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

cudaError_t cudaMalloc(void** p, std::size_t bytes);
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* p, int value, std::size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemGetInfo(std::size_t* free_bytes, std::size_t* total_bytes);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
// Events hold the host clock at the moment the (synchronous) stream reached them.
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop);

namespace dpo_emu {

/// The thread being run: its coordinates and launch shape.
struct thread_ctx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
};
const thread_ctx& current();
/// Stops the program with a diagnostic naming the kernel, block and thread.
[[noreturn]] void fail(const char* what);
/// Waits until every live thread of the block arrives (__syncthreads), at the same barrier:
/// the source line tells barriers apart (CUDA requires block-uniform control flow there).
void block_barrier(const char* file, int line);
/// Waits until every lane in `mask` of the calling warp arrives; they must all name `mask`.
void warp_barrier(unsigned mask);
/// 32 lanes x 16 bytes of the calling warp, for shuffles.
unsigned char* warp_slots();
/// Runs `body` as every thread of a grid (or records it, when `s` is capturing).
cudaError_t launch(dim3 grid, dim3 block, cudaStream_t s,
                   std::function<void()> body);
/// Records the last error, as a failed launch does.
cudaError_t set_last_error(cudaError_t e);
/// Whether [p, p + bytes) lies inside one cudaMalloc'd buffer (the emulated cuBLASLt
/// rejects host pointers, which a device would fault on).
bool is_device_range(const void* p, std::size_t bytes);

}  // namespace dpo_emu

// The running thread's coordinates: the scheduler sets them before it resumes a thread
// (all zero outside kernels).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

#define __syncthreads() ::dpo_emu::block_barrier(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { dpo_emu::warp_barrier(mask); }

namespace dpo_emu {
template <class T, class Src>
T shuffle(unsigned mask, const T& v, Src src) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "shuffle of a 16-byte type at most");
  const int lane = current().linear & 31;
  unsigned char* slots = warp_slots();
  std::memcpy(slots + 16 * lane, &v, sizeof(T));
  warp_barrier(mask);
  T out = v;
  const int from = src(lane);
  if (from >= 0 && from < 32) {
    // Reading a lane outside the mask is undefined on a GPU.
    if (!(mask >> from & 1u)) fail("a warp shuffle reads a lane that is not in its mask");
    std::memcpy(&out, slots + 16 * from, sizeof(T));
  }
  warp_barrier(mask);
  return out;
}
}  // namespace dpo_emu

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return dpo_emu::shuffle(mask, v, [&](int lane) {
    return (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  });
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return dpo_emu::shuffle(mask, v, [&](int lane) {
    return (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return dpo_emu::shuffle(mask, v, [&](int lane) {
    const int to = lane ^ lane_mask;
    return to / width == lane / width ? to : lane;
  });
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return dpo_emu::shuffle(mask, v, [&](int lane) { return (lane / width) * width + src % width; });
}

// Atomics: threads never interleave inside an emulated instruction.
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
template <class T>
T __ldg(const T* p) {
  return *p;
}

/// The runtime's type-safe launch (CUDA 12+): kernel(args...) on config->gridDim x blockDim.
template <class... Params, class... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...),
                               Args&&... args) {
  if (config == nullptr || kernel == nullptr) return dpo_emu::set_last_error(cudaErrorInvalidValue);
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel arity");
  // Kernel parameters are copied at launch, as CUDA does.
  auto params = std::make_shared<std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
  return dpo_emu::launch(config->gridDim, config->blockDim, config->stream,
                         [kernel, params] { std::apply(kernel, *params); });
}

template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel, int block, std::size_t) {
  if (n == nullptr || block <= 0 || block > 1024) return cudaErrorInvalidValue;
  *n = 2048 / block < 32 ? 2048 / block : 32;
  return cudaSuccess;
}
