// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM head on CUDA (issue 12, item 1): per-token log-probs (and TRL's optional
// outputs: entropy, log sum p^2, mean logit, top-1) straight from hidden states and an LM
// head, and their backward to dHidden, dWeight and dBias, with the logits computed one chunk
// [chunk rows, chunk vocab] at a time by cuBLASLt into the caller's workspace: no
// [rows, vocab] buffer ever exists. The same API shape as
// dpo::cpu::linear_logps / linear_logps_backward (include/dpo/cpu/linear.hpp), over device
// memory, with the contract of dpo/cuda/dpo.cuh:
//
//   status f(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
//            <arguments>, const linear_options& opt, cudaStream_t stream)
//
// * Two-phase workspace: workspace == nullptr checks the arguments' shapes and values and
//   sets workspace_bytes (linear_workspace_size gives the chunk shape too); nothing is
//   enqueued. The logits chunk, the gathered hidden rows, the dHidden accumulator and
//   cuBLASLt's own workspace all live in it. The forward and the backward of one view and
//   options need the same size, so one buffer serves both.
// * The caller's cuBLASLt handle (cublasLtCreate; link CUDA::cublasLt) and stream: every
//   GEMM and kernel is enqueued on `stream`; no allocation (descriptors live on the host
//   stack), no copy, no synchronization, so a call can be captured in a CUDA graph.
// * GEMMs: bf16 / fp16 inputs with fp32 accumulation and an fp32 logits chunk (fp32: fp32,
//   no TF32; fp64: fp64). The logits are never rounded to T. The bias and the transforms
//   (dpo/core/transforms.hpp) are applied by the row kernels between the GEMMs, with the row
//   math of dpo/core/math.hpp and the block primitives of dpo/cuda/block.cuh.
// * Argument errors come back as a status naming the argument before anything is enqueued.
//   Labels are device data: the first kernel checks them and records the lowest bad row in
//   the workspace's error word (dpo/cuda/status.cuh, read_device_error); every later kernel
//   then writes nothing outside the workspace, and the dWeight GEMM adds exact zeros.
// * GEMM algorithms: cuBLASLt's heuristic (its first choice for each GEMM's shapes, types, the
//   matrices' actual alignment and the GEMM workspace), asked for every GEMM of the call
//   before anything is enqueued, so an unsupported one fails with nothing enqueued.
// * Deterministic for a fixed chunk shape and device: fixed reduction trees, no atomics in
//   any sum; cuBLASLt's heuristic picks the same algorithm for the same shapes and handle.
//
// Math and memory model: docs/linear.md (the CPU path), docs/cuda.md (this one).
#pragma once

#include "dpo/cuda/compiler.cuh"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "dpo/core/linear_check.hpp"
#include "dpo/core/linear_view.hpp"
#include "dpo/core/math.hpp"
#include "dpo/core/shard.hpp"
#include "dpo/core/transforms.hpp"
#include "dpo/cuda/block.cuh"
#include "dpo/cuda/dpo.cuh"
#include "dpo/cuda/status.cuh"

namespace dpo {
namespace cuda {

/// The default workspace budget of the CUDA linear head: 1022 MiB (the GEMM workspace
/// included), set by the issue's shape, N = 8192 rows (4 pairs x 2 x 1024, TRL's padded
/// layout), H = 4096, V = 128256 in bf16. Three GEMM passes (dpo/cuda/linear_dpo.cuh) need a
/// whole pair, 2048 rows, in one chunk over the whole vocab: 2048 x (513,024 bytes of fp32
/// logits, dZ and dHidden written inside them (linear_ws), + 8,192 bytes of gathered hidden
/// + 64 bytes of row state) = 1018.1 MiB. cuBLASLt's workspace gets the 3.9 MiB left (the
/// three-pass plan shrinks it from linear_options::gemm_workspace_bytes), and the fused
/// call's own arrays (64 bytes a hidden row: 0.5 MiB, twice with a reference from hidden
/// states) keep its whole workspace under 1 GiB, the issue's limit. A chunk takes only what
/// it needs: smaller shapes get smaller workspaces.
inline constexpr std::int64_t default_linear_workspace_bytes = std::int64_t{1022} << 20;

/// The view, chunk shape, gradient targets and optional outputs are the core's
/// (dpo/core/linear_view.hpp), here with device pointers; T: __nv_bfloat16, __half, float,
/// double.
using dpo::linear_chunking;
using dpo::linear_grads;
using dpo::linear_outputs;
using dpo::linear_view;

/// Run-time options of the CUDA linear head.
struct linear_options {
  /// Bytes of the caller's workspace the call may use, the GEMM workspace included; the
  /// chunk shape follows from it.
  std::int64_t workspace_bytes = default_linear_workspace_bytes;
  /// Fix the chunk shape instead (0 = from the budget); it must still fit the budget.
  std::int64_t chunk_rows = 0;
  std::int64_t chunk_vocab = 0;
  /// cuBLASLt's own workspace, carved from the budget (32 MiB: NVIDIA's recommendation for
  /// Hopper; 0 restricts cuBLASLt to algorithms that need none).
  std::int64_t gemm_workspace_bytes = std::int64_t{32} << 20;
};

namespace detail {

/// Vocab columns of a chunk when the budget allows (rows then grow to fill it).
inline constexpr std::int64_t linear_default_chunk_vocab = 4096;
inline constexpr int linear_block = 256;

template <class T>
inline constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return CUDA_R_16BF;
  if constexpr (std::is_same<T, __half>::value) return CUDA_R_16F;
  if constexpr (std::is_same<T, float>::value) return CUDA_R_32F;
  return CUDA_R_64F;
}

inline constexpr std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

/// Leading dimensions of the workspace matrices: 16-element multiples (32-byte rows at
/// least, so every row of every matrix is 16-byte aligned for the vector loads and for
/// cuBLASLt's fast paths).
inline std::int64_t ld_of(std::int64_t cols) { return round_up(cols > 0 ? cols : 1, 16); }

/// The workspace header: device_error first (its offset, 0, is public).
struct linear_header {
  device_error err;
  unsigned long long label_key;  // lowest row with an out-of-range label
};

/// Per-row state of the current row chunk.
template <class A>
struct linear_row {
  dpo::detail::row_stats<A> acc;  // forward: the statistics so far
  A zy;                           // forward: the label's transformed logit
  A lse_hi, lse_lo;               // backward: the stored lse, split
  A gl, ge, ent;                  // backward: upstream gradients, entropy
  std::int64_t y;                 // the label, or -1 when the row is skipped
};

/// The workspace of a chunk shape, laid out from `base` (0 to measure). Per chunk row:
///   hb  [ldh] T: the row's hidden state (zeros where skipped);
///   z   [ldz] A: its logits (fp32 for bf16 / half / float heads, fp64 for double). The row
///       kernel then writes dZ over them in place: for float / double dZ takes each logit's
///       own slot (dz == z); for bf16 / half, dZ in T fills the first half of the row's own
///       bytes (dz row stride lddz = 2 ldz elements of T; linear_grad_kernel and
///       linear_narrow_kernel write it tile by tile, each tile only over logits already read);
///   dh  [H] A: the dHidden GEMM's fp32 output. In the free second half of the row's z bytes
///       (from element dh_off on, lddh = ldz) when the row is bf16 / half, the chunk spans the
///       whole vocab (`whole_vocab`: one logits GEMM per row chunk, so nothing overwrites the
///       row between the dHidden GEMM and linear_dhidden_kernel) and H fits there; else a
///       buffer of its own [rows, ldh].
/// So a whole-vocab row of a bf16 / half head with H below about V / 2 costs 4 ldz + 2 ldh
/// bytes, plus 64 of row state (docs/cuda.md, the fused head's workspace).
template <class T>
struct linear_ws {
  using A = acc_t<T>;
  linear_header* h = nullptr;
  linear_row<A>* rows = nullptr;  // [chunk rows]
  T* hb = nullptr;                // [chunk rows, ldh]: the chunk's hidden rows, zeros where skipped
  A* z = nullptr;                 // [chunk rows, ldz]: logits, then dZ in place
  T* dz = nullptr;                // [chunk rows, lddz] in T (the GEMMs' input): over z, see above
  A* dh = nullptr;                // [chunk rows, lddh]: dHidden accumulator
  void* gemm = nullptr;
  std::int64_t ldh = 0, ldz = 0, lddz = 0, lddh = 0, gemm_bytes = 0, bytes = 0;
  bool dh_in_z = false;

  linear_ws(std::uintptr_t base, std::int64_t rows_, std::int64_t vocab, std::int64_t H,
            std::int64_t gemm_bytes_, bool whole_vocab) {
    std::int64_t off = 0;
    const auto take = [&](std::int64_t n) {
      const std::uintptr_t p = base + static_cast<std::uintptr_t>(off);
      off += round_up(n, 256);
      return p;
    };
    ldh = ld_of(H);
    ldz = ld_of(vocab);
    lddz = ldz * static_cast<std::int64_t>(sizeof(A) / sizeof(T));
    // dZ in T takes the row's first ceil(vocab sizeof(T) / sizeof(A)) elements of A; dh
    // starts 16 elements aligned (64 bytes, as the rows) after them.
    constexpr std::int64_t ta = static_cast<std::int64_t>(sizeof(T)), aa = static_cast<std::int64_t>(sizeof(A));
    const std::int64_t dh_off = round_up((vocab * ta + aa - 1) / aa, 16);
    dh_in_z = sizeof(T) < sizeof(A) && whole_vocab && dh_off + H <= ldz;
    lddh = dh_in_z ? ldz : ldh;
    gemm_bytes = gemm_bytes_;
    h = reinterpret_cast<linear_header*>(take(sizeof(linear_header)));
    rows = reinterpret_cast<linear_row<A>*>(take(rows_ * static_cast<std::int64_t>(sizeof(linear_row<A>))));
    hb = reinterpret_cast<T*>(take(rows_ * ldh * static_cast<std::int64_t>(sizeof(T))));
    z = reinterpret_cast<A*>(take(rows_ * ldz * static_cast<std::int64_t>(sizeof(A))));
    dz = reinterpret_cast<T*>(z);
    dh = dh_in_z ? z + dh_off : reinterpret_cast<A*>(take(rows_ * ldh * static_cast<std::int64_t>(sizeof(A))));
    gemm = reinterpret_cast<void*>(take(gemm_bytes));
    bytes = off;
  }
};

/// The workspace of a chunk seen from its row i on (rows i.. of each per-row buffer): a
/// chunk gathered from several row ranges runs the row kernels on each range's part.
template <class T>
linear_ws<T> ws_from_row(linear_ws<T> w, std::int64_t i) {
  w.rows += i;
  w.hb += i * w.ldh;
  w.z += i * w.ldz;
  w.dz += i * w.lddz;
  w.dh += i * w.lddh;
  return w;
}

/// The chunk shape (as dpo::cpu's: opt.chunk_vocab or up to linear_default_chunk_vocab
/// columns, narrower only when one row does not fit, then as many rows as the budget allows).
template <class T>
status linear_chunks(std::int64_t N, std::int64_t H, std::int64_t V, const linear_options& opt,
                     linear_chunking* out) {
  if (opt.workspace_bytes < 0)
    return invalid("dpo: options.workspace_bytes = %lld is invalid: must be >= 0",
                   (long long)opt.workspace_bytes);
  if (opt.chunk_rows < 0)
    return invalid("dpo: options.chunk_rows = %lld is invalid: must be >= 0 (0 = from the budget)",
                   (long long)opt.chunk_rows);
  if (opt.chunk_vocab < 0)
    return invalid("dpo: options.chunk_vocab = %lld is invalid: must be >= 0 (0 = from the budget)",
                   (long long)opt.chunk_vocab);
  if (opt.gemm_workspace_bytes < 0)
    return invalid("dpo: options.gemm_workspace_bytes = %lld is invalid: must be >= 0",
                   (long long)opt.gemm_workspace_bytes);
  const std::int64_t B = opt.workspace_bytes, G = opt.gemm_workspace_bytes;
  const auto need = [&](std::int64_t r, std::int64_t v) { return linear_ws<T>(0, r, v, H, G, v >= V).bytes; };
  const std::int64_t max_rows = N > 1 ? N : 1;
  linear_chunking c;
  c.vocab = V < (opt.chunk_vocab > 0 ? opt.chunk_vocab : linear_default_chunk_vocab)
                ? V
                : (opt.chunk_vocab > 0 ? opt.chunk_vocab : linear_default_chunk_vocab);
  if (opt.chunk_vocab == 0)
    while (c.vocab > 1 && need(1, c.vocab) > B) c.vocab = (c.vocab + 1) / 2;
  if (opt.chunk_rows > 0) {
    c.rows = opt.chunk_rows < max_rows ? opt.chunk_rows : max_rows;
  } else {
    // Largest row count that fits (the size is affine in the rows up to the 256-byte
    // rounding of each buffer): bisection.
    std::int64_t lo = 1, hi = max_rows;
    if (need(hi, c.vocab) <= B) {
      lo = hi;
    } else {
      while (lo < hi) {
        const std::int64_t mid = lo + (hi - lo + 1) / 2;
        if (need(mid, c.vocab) <= B) lo = mid; else hi = mid - 1;
      }
    }
    c.rows = lo;
  }
  c.workspace_bytes = need(c.rows, c.vocab);
  if (c.workspace_bytes > B)
    return invalid(
        "dpo: options.workspace_bytes = %lld is too small for one row: a chunk of %lld x %lld needs "
        "%lld bytes (options.gemm_workspace_bytes = %lld included)",
        (long long)B, (long long)c.rows, (long long)c.vocab, (long long)c.workspace_bytes, (long long)G);
  *out = c;
  return {};
}

/// The view's sizes, values and pointers (dpo/core/linear_check.hpp, the CPU head's rules;
/// the labels are device data, checked by linear_check_kernel). `pointers`: false in a size
/// query.
template <class T, class L>
status check_linear_view(const linear_view<T, L>& v, bool pointers) {
  return to_status(dpo::detail::check_linear_view(v, dpo::detail::cuda_policy(-1, pointers)));
}

/// Outputs against inputs and each other (device addresses, compared, never read).
inline status check_linear_overlap(const dpo::detail::named_range* outs, int n_out,
                                   const dpo::detail::named_range* ins, int n_in) {
  return to_status(dpo::detail::check_no_overlap(outs, n_out, ins, n_in));
}

/// Blocks of a kernel with one thread per row (256 threads a block; they loop).
inline unsigned seq_grid(std::int64_t n) {
  const std::int64_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

/// Blocks of a row kernel: one per row, at most 65535 x 16 (they loop).
inline unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows < (1 << 20) ? rows : (1 << 20)));
}

// ---- the GEMMs -------------------------------------------------------------------------

/// Where and how the GEMMs of a call run. dry: only choose each GEMM's algorithm (a first
/// pass over the call's GEMMs, so an unsupported one fails before anything is enqueued).
struct linear_gemm {
  cublasLtHandle_t handle;
  cudaStream_t stream;
  void* workspace;
  std::size_t workspace_bytes;
  bool dry;
};

/// The largest power of two up to 256 that divides the address (cuBLASLt's heuristic assumes
/// 256-byte aligned matrices unless told otherwise).
inline std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

inline status cublas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return {};
  const cudaError_t code = s == CUBLAS_STATUS_INVALID_VALUE ? cudaErrorInvalidValue
                           : (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_ARCH_MISMATCH)
                               ? cudaErrorNotSupported
                               : cudaErrorUnknown;
  return make_status(code, "dpo: cuBLASLt %s failed: %s (%d)", what, cublasLtGetStatusString(s), static_cast<int>(s));
}

/// One column-major cuBLASLt GEMM D = op(A) op(B) + beta D: op(A) m x k, op(B) k x n, D m x n.
/// Descriptors live on the host stack (no allocation); the algorithm is the heuristic's first
/// for the actual alignments and the workspace given.
template <class S>
status gemm(const linear_gemm& g, const char* what, bool ta, bool tb, std::int64_t m, std::int64_t n,
            std::int64_t k, const void* A, cudaDataType_t at, std::int64_t lda, const void* B,
            cudaDataType_t bt, std::int64_t ldb, S beta, void* D, cudaDataType_t dt, std::int64_t ldd) {
  constexpr bool dbl = std::is_same<S, double>::value;
  cublasLtMatmulDescOpaque_t desc_storage;
  cublasLtMatrixLayoutOpaque_t la, lb, ld;
  cublasLtMatmulDesc_t desc = &desc_storage;
  cublasStatus_t s = cublasLtMatmulDescInit(desc, dbl ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F,
                                            dbl ? CUDA_R_64F : CUDA_R_32F);
  const std::int32_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa));
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb));
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatrixLayoutInit(&la, at, static_cast<std::uint64_t>(ta ? k : m),
                                 static_cast<std::uint64_t>(ta ? m : k), lda);
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatrixLayoutInit(&lb, bt, static_cast<std::uint64_t>(tb ? n : k),
                                 static_cast<std::uint64_t>(tb ? k : n), ldb);
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatrixLayoutInit(&ld, dt, static_cast<std::uint64_t>(m), static_cast<std::uint64_t>(n), ldd);
  cublasLtMatmulPreferenceOpaque_t pref_storage;
  cublasLtMatmulPreference_t pref = &pref_storage;
  if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceInit(pref);
  const std::uint64_t ws = g.workspace_bytes;
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  const std::uint32_t al[4] = {alignment_of(A), alignment_of(B), alignment_of(D), alignment_of(D)};
  const cublasLtMatmulPreferenceAttributes_t al_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; ++i)
    s = cublasLtMatmulPreferenceSetAttribute(pref, al_attr[i], &al[i], sizeof(al[i]));
  cublasLtMatmulHeuristicResult_t best;
  int found = 0;
  if (s == CUBLAS_STATUS_SUCCESS)
    s = cublasLtMatmulAlgoGetHeuristic(g.handle, desc, &la, &lb, &ld, &ld, pref, 1, &best, &found);
  if (s == CUBLAS_STATUS_SUCCESS && found < 1) s = CUBLAS_STATUS_NOT_SUPPORTED;
  if (s != CUBLAS_STATUS_SUCCESS || g.dry) return cublas_status(s, what);
  const S alpha = S(1);
  s = cublasLtMatmul(g.handle, desc, &alpha, A, &la, B, &lb, &beta, D, &ld, D, &ld, &best.algo, g.workspace,
                     g.workspace_bytes, g.stream);
  return cublas_status(s, what);
}

// ---- the kernels -------------------------------------------------------------------------

template <class T>
DPO_CUDA_HD acc_t<T> bias_value(const T* bias, std::int64_t v) {
  return bias != nullptr ? to_acc(bias[v]) : acc_t<T>(0);
}

template <class L>
__device__ __forceinline__ std::int64_t linear_target(const L* labels, const std::uint8_t* mask,
                                                      std::int64_t ignore_index, std::int64_t r) {
  const std::int64_t y = static_cast<std::int64_t>(labels[r]);
  if (y == ignore_index || (mask != nullptr && mask[r] == 0)) return -1;
  return y;
}

/// One block: resets the error word, then records the lowest row whose counted label is
/// outside [0, vocab).
template <class L>
__global__ void linear_check_kernel(const L* labels, const std::uint8_t* mask, std::int64_t rows,
                                    std::int64_t vocab, std::int64_t ignore_index, linear_header* h) {
  __shared__ unsigned long long first;
  if (threadIdx.x == 0) first = ~0ull;
  __syncthreads();
  for (std::int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const std::int64_t y = static_cast<std::int64_t>(labels[r]);
    if (y == ignore_index || (mask != nullptr && mask[r] == 0)) continue;
    if (y < 0 || y >= vocab) atomicMin(&first, static_cast<unsigned long long>(r));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    h->label_key = first;
    h->err = device_error{0, 0, 0, 0, 0};
    if (first != ~0ull) {
      const auto r = static_cast<std::int64_t>(first);
      // side 4: the linear head's labels (describe() names them "labels").
      h->err = device_error{static_cast<std::int32_t>(device_error_code::label_out_of_range), 4, r,
                            static_cast<std::int64_t>(labels[r]), vocab};
    }
  }
}

/// A vocabulary shard's head (dpo/cuda/linear_shard.cuh): the weight holds the columns
/// [sh.start, sh.end) of a vocabulary of sh.vocab (0: no shard) and the labels are global
/// ids, which the gather maps to the shard's column, or to sh.width() (no column of any chunk)
/// when another shard holds the label. The backward takes each row's lse from its combined
/// record (row_max, records: dpo/core/shard.hpp), never from row_lse.
struct linear_shard_rows {
  vocab_shard sh{};
  const double* row_max = nullptr;
  const double* records = nullptr;
};

/// Per-row arguments of the backward (null in the forward). stats_kept: the row state still
/// holds the forward's statistics of this chunk's rows over the whole vocab (three passes of
/// dpo/cuda/linear_dpo.cuh), so each row's lse is taken exactly from them, (m, log s), not
/// from row_lse.
struct linear_bwd_in {
  const double* row_lse;
  const double* grad_logps;
  const double* entropy;
  const double* grad_entropy;
  bool stats_kept;
  linear_shard_rows shard = {};
};

/// Rows [r0, r0 + nb): the row state, and the hidden rows gathered into hb (zeros for rows
/// that are skipped, so a NaN there cannot reach dWeight through 0 * NaN). Forward: a row
/// counts; backward: it counts and has a nonzero upstream gradient.
template <int BLOCK, bool Backward, class T, class L>
__global__ void __launch_bounds__(BLOCK) linear_gather_kernel(linear_view<T, L> in, std::int64_t r0, std::int64_t nb,
                                                              linear_bwd_in b, linear_ws<T> w) {
  using A = acc_t<T>;
  const bool error = w.h->err.code != 0;
  for (std::int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    const std::int64_t r = r0 + i;
    std::int64_t y = error ? -1 : linear_target(in.labels, in.mask, in.ignore_index, r);
    if (y >= 0 && b.shard.sh.vocab > 0) y = b.shard.sh.holds(y) ? y - b.shard.sh.start : b.shard.sh.width();
    linear_row<A> st;
    st.acc = dpo::detail::row_stats<A>::empty();
    st.zy = A(0);
    st.lse_hi = st.lse_lo = st.gl = st.ge = st.ent = A(0);
    if (Backward && y >= 0) {
      const double gl = b.grad_logps[r];
      const double ge = b.grad_entropy != nullptr ? b.grad_entropy[r] : 0.0;
      if (gl == 0.0 && ge == 0.0) {
        y = -1;
      } else {
        const dpo::detail::lse_parts<A> p =
            b.shard.records != nullptr ? dpo::detail::shard_lse<A>(b.shard.row_max[r], b.shard.records + r * shard_fields)
            : b.stats_kept             ? dpo::detail::lse_parts_of(w.rows[i].acc.m, w.rows[i].acc.s)
                                       : dpo::detail::split_lse<A>(b.row_lse[r]);
        st.lse_hi = p.hi;
        st.lse_lo = p.lo;
        st.gl = static_cast<A>(gl);
        st.ge = static_cast<A>(ge);
        st.ent = b.entropy != nullptr ? static_cast<A>(b.entropy[r]) : A(0);
      }
    }
    st.y = y;
    if (threadIdx.x == 0) w.rows[i] = st;
    const T* src = in.hidden + r * in.hidden_stride;
    T* dst = w.hb + i * w.ldh;
    for (std::int64_t c = threadIdx.x; c < in.hidden_cols; c += BLOCK)
      dst[c] = y >= 0 ? src[c] : from_acc<T>(A(0));
  }
}

/// The per-row outputs of the forward besides the log-prob, lse and entropy; null: not
/// written. The token metrics' row terms of the fused DPO head (dpo/cuda/linear_dpo.cuh), as
/// the CPU's row_values: the row's mean logit in A, WPO's term logp - log sum_v p_v^2, and
/// whether the first argmax is the label (1 or 0). And linear_logps' public outputs, as
/// dpo::cpu::linear_logps computes them: log_sum_sq_probs, mean_logits (in double) and
/// is_top1 (dpo::detail::label_is_top1); outputs.entropy is not read (the kernel's entropy
/// argument is).
struct linear_row_terms {
  double* zmean = nullptr;
  double* wpo = nullptr;
  double* hit = nullptr;
  linear_outputs outputs;

  DPO_HOST_DEVICE bool any() const {
    return zmean != nullptr || wpo != nullptr || hit != nullptr || outputs.any();
  }
};

/// Forward, one vocab chunk [v0, v0 + nv) of rows [r0, r0 + nb): each counted row's
/// statistics of its transformed logits, merged into the row state; at the last chunk the
/// outputs (zeros for rows that do not count). Entropy: the metric statistics (entropy,
/// lse(2z), logit sum, argmax), so that `terms` can be written too.
template <int BLOCK, bool Entropy, class T, class L>
__global__ void __launch_bounds__(BLOCK) linear_stats_kernel(linear_view<T, L> in, std::int64_t r0, std::int64_t nb,
                                                             std::int64_t v0, std::int64_t nv, bool last,
                                                             linear_ws<T> w, double* logps, double* entropy,
                                                             double* row_lse, linear_row_terms terms = {}) {
  using A = acc_t<T>;
  if (w.h->err.code != 0) return;
  const dpo::detail::transform_params<A> tp(in.transforms);
  const bool plain = tp.identity && in.bias == nullptr;
  constexpr int W = vec_width<A>;
  const int tid = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(nv);
  for (std::int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    linear_row<A>* rs = w.rows + i;
    const std::int64_t y = rs->y;  // block-uniform
    const std::int64_t r = r0 + i;
    if (y >= 0) {
      const A* z = w.z + i * w.ldz;
      const std::int64_t yl = y - v0;  // the label's column in this chunk, if in [0, nv)
      thread_stats<A> st = thread_empty<A>();
      const auto logit = [&](A x, std::int64_t j) {
        return plain ? x : dpo::detail::transform_logit(tp, x + bias_value(in.bias, v0 + j));
      };
      const int nvec = n / W;
      for (int k = tid; k < nvec; k += BLOCK) {
        A x[W];
        unpack<A>(reinterpret_cast<const uint4*>(z)[k], x);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const std::int64_t col = static_cast<std::int64_t>(k) * W + j;
          x[j] = logit(x[j], col);
          if (col == yl) rs->zy = x[j];
        }
        push_values<Entropy, W, A, Entropy>(st, x, static_cast<std::int64_t>(k) * W);
      }
      const int tail = nvec * W + tid;
      if (tail < n) {
        const A x = logit(z[tail], tail);
        if (tail == yl) rs->zy = x;
        push_values<Entropy, 1, A, Entropy>(st, &x, tail);
      }
      dpo::detail::row_stats<A> c = block_reduce_stats<BLOCK, Entropy>(to_row_stats(st));
      if (tid == 0) {
        if (Entropy && c.argmax >= 0) c.argmax += v0;  // the chunk's column -> the vocab's
        const dpo::detail::row_stats<A> acc = v0 == 0 ? c : merge_unordered<Entropy>(rs->acc, c);
        rs->acc = acc;
        if (last) {
          // (z_y - m) - log s, never z_y - lse: lse rounds at the scale of m (docs/math.md §1).
          const double lp = acc.log_softmax(rs->zy);
          logps[r] = lp;
          row_lse[r] = acc.logsumexp_double();
          if (Entropy && entropy != nullptr) entropy[r] = static_cast<double>(acc.entropy());
          // The CPU's row_values (dpo/cpu/dpo.hpp): mean logit in A, WPO's term, the hit.
          if (Entropy && terms.zmean != nullptr)
            terms.zmean[r] = static_cast<double>(acc.zsum / static_cast<A>(in.vocab));
          if (Entropy && terms.wpo != nullptr) terms.wpo[r] = lp - acc.log_sum_p2();
          if (Entropy && terms.hit != nullptr) terms.hit[r] = acc.argmax == y ? 1.0 : 0.0;
          const linear_outputs& x = terms.outputs;
          if (Entropy && x.log_sum_sq_probs != nullptr) x.log_sum_sq_probs[r] = acc.log_sum_p2();
          if (Entropy && x.mean_logits != nullptr)
            x.mean_logits[r] = static_cast<double>(acc.zsum) / static_cast<double>(in.vocab);
          if (Entropy && x.is_top1 != nullptr)
            x.is_top1[r] = dpo::detail::label_is_top1(acc.argmax == y, rs->zy) ? 1 : 0;
        }
      }
    } else if (last && tid == 0) {
      logps[r] = 0.0;
      row_lse[r] = 0.0;
      if (Entropy && entropy != nullptr) entropy[r] = 0.0;
      if (terms.zmean != nullptr) terms.zmean[r] = 0.0;
      if (terms.wpo != nullptr) terms.wpo[r] = 0.0;
      if (terms.hit != nullptr) terms.hit[r] = 0.0;
      const linear_outputs& x = terms.outputs;
      if (x.log_sum_sq_probs != nullptr) x.log_sum_sq_probs[r] = 0.0;
      if (x.mean_logits != nullptr) x.mean_logits[r] = 0.0;
      if (x.is_top1 != nullptr) x.is_top1[r] = 0;
    }
  }
}

/// dZ in T written over one row's fp32 logits in place (bf16 / half heads, linear_ws): the
/// columns [0, n) go in tiles of BLOCK * W (W = vec_width<T> = 8 contiguous columns a
/// thread). In each tile every thread reads its columns' fp32 values into registers and
/// turns them into dZ (value(j, x); nothing is read when `read` is false: zeros), the block
/// meets at a barrier, then every thread writes its columns' dZ in T.
///
/// No thread overwrites a value that another has yet to read: the tile [t0, t0 + BLOCK W)
/// writes the row's bytes [t0 sizeof(T), (t0 + BLOCK W) sizeof(T)), which lie in its fp32
/// elements [t0 / 2, (t0 + BLOCK W) / 2) (sizeof(A) = 2 sizeof(T)), all below t0 + BLOCK W:
/// read in this tile or an earlier one, by threads that have all passed this tile's barrier.
/// The next tile reads the elements from t0 + BLOCK W on, which no write of this or an
/// earlier tile reaches, so one barrier a tile suffices (the writes of tile k and the reads
/// of tile k + 1 may run concurrently). Each block writes only the bytes of its own rows
/// (z rows never overlap), so blocks do not interact. The trip count depends on n only, so
/// every thread of the block reaches every barrier.
template <int BLOCK, class T, class F>
__device__ __forceinline__ void narrow_row_in_place(const acc_t<T>* z, T* dz, int n, bool read, F value) {
  using A = acc_t<T>;
  constexpr int W = vec_width<T>, WA = vec_width<A>;
  static_assert(sizeof(A) == 2 * sizeof(T), "dZ in place over the logits halves each element");
  for (int t0 = 0; t0 < n; t0 += BLOCK * W) {
    const int c0 = t0 + static_cast<int>(threadIdx.x) * W;
    A g[W];
    if (read && c0 + W <= n) {
#pragma unroll
      for (int k = 0; k < W / WA; ++k) unpack<A>(reinterpret_cast<const uint4*>(z + c0)[k], g + k * WA);
#pragma unroll
      for (int k = 0; k < W; ++k) g[k] = value(c0 + k, g[k]);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) g[k] = read && c0 + k < n ? value(c0 + k, z[c0 + k]) : A(0);
    }
    __syncthreads();
    if (c0 + W <= n) {
      *reinterpret_cast<uint4*>(dz + c0) = pack<T>(g);
    } else {
      for (int k = 0; k < W && c0 + k < n; ++k) dz[c0 + k] = from_acc<T>(g[k]);
    }
  }
}

/// Backward, one vocab chunk: the recomputed logits of each row become dZ, in place
/// (linear_ws): dlogp/do_v = 1[v = y] - p_v, dH/do_v = -p_v (log p_v + H), times do/du
/// (docs/linear.md). Skipped rows get zeros (their logits are not read). Float / double
/// heads: each dZ in its logit's slot. bf16 / half: dZ in T over the row's first half
/// (narrow_row_in_place), or, with `keep_fp32` (a bias gradient), the fp32 dZ in each
/// logit's slot for linear_dbias_kernel, then linear_narrow_kernel rounds it to T in place.
/// In the fp32 slot-by-slot writes each value is read and written by one thread.
template <int BLOCK, bool Entropy, class T, class L>
__global__ void __launch_bounds__(BLOCK) linear_grad_kernel(linear_view<T, L> in, std::int64_t nb, std::int64_t v0,
                                                            std::int64_t nv, linear_ws<T> w, bool keep_fp32) {
  using A = acc_t<T>;
  const dpo::detail::transform_params<A> tp(in.transforms);
  const bool plain = tp.identity && in.bias == nullptr;
  const int n = static_cast<int>(nv);
  for (std::int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    const linear_row<A> q = w.rows[i];  // q.y: block-uniform
    A* z = w.z + i * w.ldz;
    const std::int64_t yl = q.y >= 0 ? q.y - v0 : -1;
    const auto grad = [&](int j, A x) {
      const A u = plain ? x : x + bias_value(in.bias, v0 + j);
      const A o = plain ? u : dpo::detail::transform_logit(tp, u);
      // (o - hi) - lo: exact for the logits near the max; clamped below so a -inf logit
      // adds 0 * finite to the entropy term (as the CPU's exp_lo clamp).
      const A d = fmax((o - q.lse_hi) - q.lse_lo, std::is_same<A, double>::value ? A(-746) : A(-88));
      const A p = exp2_fast(d * log2e<A>::value);
      A g = Entropy ? -p * (q.gl + q.ge * (d + q.ent)) : -p * q.gl;
      if (j == yl) g = q.gl + g;
      if (!plain && !tp.identity) g = g * dpo::detail::transform_logit_grad(tp, u);
      return g;
    };
    const auto in_slots = [&] {
      for (int j = static_cast<int>(threadIdx.x); j < n; j += BLOCK) z[j] = q.y >= 0 ? grad(j, z[j]) : A(0);
    };
    if constexpr (std::is_same<T, A>::value) {
      in_slots();  // dz == z
    } else if (keep_fp32) {
      in_slots();
    } else {
      narrow_row_in_place<BLOCK, T>(z, w.dz + i * w.lddz, n, q.y >= 0, grad);
    }
  }
}

/// bf16 / half heads with a bias gradient, after linear_dbias_kernel: each row's fp32 dZ
/// rounded to T in place (narrow_row_in_place) for the dHidden and dWeight GEMMs.
template <int BLOCK, class T>
__global__ void __launch_bounds__(BLOCK) linear_narrow_kernel(std::int64_t nb, std::int64_t nv, linear_ws<T> w) {
  using A = acc_t<T>;
  for (std::int64_t i = blockIdx.x; i < nb; i += gridDim.x)
    narrow_row_in_place<BLOCK, T>(w.z + i * w.ldz, w.dz + i * w.lddz, static_cast<int>(nv), true,
                                  [](int, A x) { return x; });
}

/// dst += v, rounded once to G.
template <class G, class A>
DPO_CUDA_HD void add_to(G& dst, A v) {
  using GA = acc_t<G>;
  dst = from_acc<G>(static_cast<GA>(to_acc(dst) + static_cast<GA>(v)));
}

/// dBias of one vocab chunk: each column's dZ summed over the chunk's rows in a fixed order
/// (8 row slices per column, then slice 0..7), added to bias[v0 + j] once.
template <class T, class G>
__global__ void __launch_bounds__(256) linear_dbias_kernel(std::int64_t nb, std::int64_t v0, std::int64_t nv,
                                                           linear_ws<T> w, G* dbias) {
  using A = acc_t<T>;
  __shared__ A part[8][32];
  if (w.h->err.code != 0) return;
  const int tx = static_cast<int>(threadIdx.x) & 31, ty = static_cast<int>(threadIdx.x) >> 5;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * 32 + tx;
  A s = A(0);
  if (j < nv)
    for (std::int64_t i = ty; i < nb; i += 8) s += w.z[i * w.ldz + j];
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && j < nv) {
    A t = part[0][tx];
    for (int k = 1; k < 8; ++k) t += part[k][tx];
    add_to(dbias[v0 + j], t);
  }
}

/// dHidden of rows [r0, r0 + nb) from the accumulator: written or added for the rows that
/// took part, zeros written (not accumulating) or untouched (accumulating) for the others.
template <int BLOCK, class T, class L>
__global__ void __launch_bounds__(BLOCK) linear_dhidden_kernel(std::int64_t H, std::int64_t r0, std::int64_t nb,
                                                               linear_ws<T> w, T* dh, std::int64_t stride,
                                                               bool accumulate) {
  using A = acc_t<T>;
  if (w.h->err.code != 0) return;
  for (std::int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    const bool active = w.rows[i].y >= 0;
    if (!active && accumulate) continue;
    T* dst = dh + (r0 + i) * stride;
    const A* src = w.dh + i * w.lddh;
    for (std::int64_t c = threadIdx.x; c < H; c += BLOCK) {
      if (!active) {
        dst[c] = from_acc<T>(A(0));
      } else if (accumulate) {
        add_to(dst[c], src[c]);
      } else {
        dst[c] = from_acc<T>(src[c]);
      }
    }
  }
}

/// Double heads: the rows of [r0, r0 + nb) whose stored lse is past the recompute limit
/// (dpo::detail::lse_needs_recompute: |lse| >= 2^10, where the double lse is rounded by more
/// than 2^-43 relative to the probabilities) take their lse from the statistics just
/// recomputed over the whole vocab (linear_stats_kernel, last = false), as the CPU head does.
template <class T>
__global__ void linear_exact_lse_kernel(std::int64_t r0, std::int64_t nb, const double* row_lse, linear_ws<T> w) {
  using A = acc_t<T>;
  if (w.h->err.code != 0) return;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < nb;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    linear_row<A>& q = w.rows[i];
    if (q.y < 0 || !dpo::detail::lse_needs_recompute<A>(row_lse[r0 + i])) continue;
    const dpo::detail::lse_parts<A> p = dpo::detail::lse_parts_of(q.acc.m, q.acc.s);
    q.lse_hi = p.hi;
    q.lse_lo = p.lo;
  }
}

/// The checks and workspace of a call. Returns the chunking in *ch and the carved workspace
/// in *w; *size_only when only the size was asked for.
template <class T, class L>
status linear_prologue(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                       const linear_view<T, L>& in, const linear_options& opt, linear_chunking* ch,
                       linear_ws<T>* w, bool* size_only) {
  const bool pointers = workspace != nullptr;
  status s = check_linear_view(in, pointers);
  if (!s) return s;
  s = linear_chunks<T>(in.rows, in.hidden_cols, in.vocab, opt, ch);
  if (!s) return s;
  *size_only = !pointers;
  if (!pointers) {
    workspace_bytes = static_cast<std::size_t>(ch->workspace_bytes);
    return {};
  }
  if (handle == nullptr) return invalid("dpo: handle is null (create one with cublasLtCreate)");
  s = check_workspace(workspace, workspace_bytes, static_cast<std::size_t>(ch->workspace_bytes));
  if (!s) return s;
  *w = linear_ws<T>(reinterpret_cast<std::uintptr_t>(workspace), ch->rows, ch->vocab, in.hidden_cols,
                    opt.gemm_workspace_bytes, ch->vocab >= in.vocab);
  return {};
}

/// z [nb, nv] (row-major, ldz) = hb [nb, H] . weight[v0 : v0 + nv]^T: column-major
/// z^T = op_T(weight chunk) . hb^T.
template <class T, class L>
status logits_gemm(const linear_gemm& g, const linear_view<T, L>& in, const linear_ws<T>& w, std::int64_t nb,
                   std::int64_t v0, std::int64_t nv) {
  using A = acc_t<T>;
  return gemm<A>(g, "logits GEMM", true, false, nv, nb, in.hidden_cols, in.weight + v0 * in.weight_stride,
                 cuda_type<T>(), in.weight_stride, w.hb, cuda_type<T>(), w.ldh, A(0), w.z, cuda_type<A>(), w.ldz);
}

/// A chunk's dZ from its logits (linear_grad_kernel) and, with dbias, dBias from the fp32 dZ
/// (linear_dbias_kernel), then, for bf16 / half heads, dZ rounded to T in place
/// (linear_narrow_kernel).
template <bool Entropy, class T, class L, class G>
status linear_dz(const linear_view<T, L>& in, std::int64_t nb, std::int64_t v0, std::int64_t nv,
                 const linear_ws<T>& w, G* dbias, cudaStream_t stream) {
  constexpr int B = linear_block;
  status s = launch("linear_grad_kernel", linear_grad_kernel<B, Entropy, T, L>, row_blocks(nb), B, stream, in, nb,
                    v0, nv, w, dbias != nullptr);
  if (s && dbias != nullptr)
    s = launch("linear_dbias_kernel", linear_dbias_kernel<T, G>, static_cast<unsigned>((nv + 31) / 32), 256, stream,
               nb, v0, nv, w, dbias);
  if constexpr (!std::is_same<T, acc_t<T>>::value)
    if (s && dbias != nullptr)
      s = launch("linear_narrow_kernel", linear_narrow_kernel<B, T>, row_blocks(nb), B, stream, nb, nv, w);
  return s;
}

/// The backward GEMMs of a chunk (column-major): with dh, dh^T [H, nb] = beta_h dh^T +
/// weight chunk^T [H, nv] . dZ^T [nv, nb] into the workspace; with dweight (the chunk's
/// first row of the gradient), dWeight^T [H, nv] += hb^T [H, nb] . dZ [nb, nv].
template <class T, class G>
status linear_grad_gemms(const linear_gemm& gm, const T* weight, std::int64_t weight_stride, std::int64_t H,
                         std::int64_t nb, std::int64_t nv, const linear_ws<T>& w, bool dh, acc_t<T> beta_h,
                         G* dweight, std::int64_t dweight_stride) {
  using A = acc_t<T>;
  status s;
  if (dh)
    s = gemm<A>(gm, "dHidden GEMM", false, false, H, nb, nv, weight, cuda_type<T>(), weight_stride, w.dz,
                cuda_type<T>(), w.lddz, beta_h, w.dh, cuda_type<A>(), w.lddh);
  if (s && dweight != nullptr)
    s = gemm<A>(gm, "dWeight GEMM", false, true, H, nv, nb, w.hb, cuda_type<T>(), w.ldh, w.dz, cuda_type<T>(),
                w.lddz, A(1), dweight, cuda_type<G>(), dweight_stride);
  return s;
}

}  // namespace detail

/// The chunk shape and workspace bytes of linear_logps / linear_logps_backward for `in`
/// under `opt` (both use the same). Fails (a status naming the argument) when the budget is
/// too small for one row or the view's sizes are invalid.
template <class T, class L>
status linear_workspace_size(const linear_view<T, L>& in, const linear_options& opt, linear_chunking* out) {
  if (out == nullptr) return detail::invalid("dpo: linear_workspace_size: out is null");
  const status s = detail::check_linear_view(in, false);
  if (!s) return s;
  return detail::linear_chunks<T>(in.rows, in.hidden_cols, in.vocab, opt, out);
}

namespace detail {

/// linear_logps, with the row terms (linear_row_terms: the public call's optional outputs,
/// the DPO head's metric terms).
template <class T, class L>
status linear_logps_impl(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                         const linear_view<T, L>& in, double* logps, double* entropy, double* row_lse,
                         linear_row_terms terms, const linear_options& opt, cudaStream_t stream) {
  linear_chunking ch;
  linear_ws<T> w(0, 0, 1, 1, 0, false);
  bool size_only = false;
  status s = linear_prologue(workspace, workspace_bytes, handle, in, opt, &ch, &w, &size_only);
  if (!s || size_only) return s;
  const std::int64_t N = in.rows;
  if (N > 0 && logps == nullptr) return invalid("dpo: logps is null");
  if (N > 0 && row_lse == nullptr) return invalid("dpo: row_lse is null");
  dpo::detail::named_range ins[6];
  dpo::detail::linear_input_ranges(in, ins);
  ins[5] = workspace_range(workspace, ch.workspace_bytes);
  const dpo::detail::named_range outs[6] = {
      dpo::detail::range_of(logps, 1, N, N, "logps"),
      dpo::detail::range_of(entropy, 1, N, N, "entropy"),
      dpo::detail::range_of(row_lse, 1, N, N, "row_lse"),
      dpo::detail::range_of(terms.outputs.log_sum_sq_probs, 1, N, N, "log_sum_sq_probs"),
      dpo::detail::range_of(terms.outputs.mean_logits, 1, N, N, "mean_logits"),
      dpo::detail::range_of(terms.outputs.is_top1, 1, N, N, "is_top1")};
  s = check_linear_overlap(outs, 6, ins, 6);
  if (!s) return s;
  // No row: nothing to compute, but the error word becomes this call's (clear), or
  // read_device_error would report whatever the workspace held.
  if (N == 0)
    return launch("linear_check_kernel", linear_check_kernel<L>, 1, 256, stream, in.labels, in.mask, N, in.vocab,
                  in.ignore_index, w.h);
  constexpr int B = linear_block;
  // Twice over the same loop: first only choosing every GEMM's algorithm (dry), then enqueuing.
  const auto pass = [&](bool dry) {
    const linear_gemm g{handle, stream, w.gemm, static_cast<std::size_t>(w.gemm_bytes), dry};
    status s;
    if (!dry)
      s = launch("linear_check_kernel", linear_check_kernel<L>, 1, 256, stream, in.labels,
                         in.mask, N, in.vocab, in.ignore_index, w.h);
    for (std::int64_t r0 = 0; s && r0 < N; r0 += ch.rows) {
      const std::int64_t nb = ch.rows < N - r0 ? ch.rows : N - r0;
      if (!dry)
        s = launch("linear_gather_kernel", linear_gather_kernel<B, false, T, L>,
                           row_blocks(nb), B, stream, in, r0, nb, linear_bwd_in{}, w);
      for (std::int64_t v0 = 0; s && v0 < in.vocab; v0 += ch.vocab) {
        const std::int64_t nv = ch.vocab < in.vocab - v0 ? ch.vocab : in.vocab - v0;
        s = logits_gemm(g, in, w, nb, v0, nv);
        if (!s || dry) continue;
        const bool last = v0 + nv == in.vocab;
        if (entropy != nullptr || terms.any()) {
          s = launch("linear_stats_kernel", linear_stats_kernel<B, true, T, L>,
                             row_blocks(nb), B, stream, in, r0, nb, v0, nv, last, w, logps,
                             entropy, row_lse, terms);
        } else {
          s = launch("linear_stats_kernel", linear_stats_kernel<B, false, T, L>,
                             row_blocks(nb), B, stream, in, r0, nb, v0, nv, last, w, logps,
                             entropy, row_lse, terms);
        }
      }
    }
    return s;
  };
  s = pass(true);
  return s ? pass(false) : s;
}

}  // namespace detail

/// Per-token log-probs of an LM head on the device, as dpo::cpu::linear_logps:
/// logp_r = log softmax(o(hidden_r . weight^T + bias))[y_r], o the transforms.
///
/// - logps: [rows] doubles, 0 on rows that do not count.
/// - extra: the optional outputs (linear_outputs: entropy, log_sum_sq_probs, mean_logits,
///   is_top1), each [rows] device memory or null; 0 on rows that do not count. The same
///   formulas as the CPU's (dpo/core/math.hpp row_stats; is_top1: dpo::detail::label_is_top1).
/// - row_lse: [rows]: each counted row's log-sum-exp (0 elsewhere), for the backward.
/// Two-phase workspace (see the top of this file); one GEMM per chunk (the hidden rows of a
/// row chunk times a vocab chunk of the weight) and one read of the fp32 logits chunk.
/// Outputs may not overlap each other or any input. A label outside [0, vocab) is reported
/// in the error word (read_device_error) and nothing is written.
template <class T, class L>
status linear_logps(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                    const linear_view<T, L>& in, double* logps, const linear_outputs& extra, double* row_lse,
                    const linear_options& opt = {}, cudaStream_t stream = 0) {
  detail::linear_row_terms terms;
  terms.outputs = extra;
  return detail::linear_logps_impl(workspace, workspace_bytes, handle, in, logps, extra.entropy, row_lse, terms,
                                   opt, stream);
}

/// linear_logps with the entropy as the only optional output (null: none).
template <class T, class L>
status linear_logps(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                    const linear_view<T, L>& in, double* logps, double* entropy, double* row_lse,
                    const linear_options& opt = {}, cudaStream_t stream = 0) {
  linear_outputs extra;
  extra.entropy = entropy;
  return linear_logps(workspace, workspace_bytes, handle, in, logps, extra, row_lse, opt, stream);
}

namespace detail {

/// linear_logps_backward, or a vocabulary shard's (shard.sh.vocab > 0, dpo/cuda/linear_shard.cuh:
/// labels global ids below shard.sh.vocab, each row's lse from its record, row_lse not read).
template <class T, class L, class G>
status linear_backward_run(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                           const linear_view<T, L>& in, const double* row_lse, const linear_shard_rows& shard,
                           const double* grad_logps, const double* entropy, const double* grad_entropy,
                           const linear_grads<T, G>& g, const linear_options& opt, cudaStream_t stream) {
  static_assert(std::is_same<G, T>::value || std::is_same<G, acc_t<T>>::value,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  using A = acc_t<T>;
  linear_chunking ch;
  detail::linear_ws<T> w(0, 0, 1, 1, 0, false);
  bool size_only = false;
  status s = detail::linear_prologue(workspace, workspace_bytes, handle, in, opt, &ch, &w, &size_only);
  if (!s || size_only) return s;
  const std::int64_t N = in.rows, H = in.hidden_cols, V = in.vocab;
  if (N > 0 && shard.sh.vocab == 0 && row_lse == nullptr) return detail::invalid("dpo: row_lse is null");
  if (N > 0 && shard.sh.vocab > 0 && (shard.row_max == nullptr || shard.records == nullptr))
    return detail::invalid(shard.row_max == nullptr ? "dpo: row_max is null" : "dpo: records is null");
  if (N > 0 && grad_logps == nullptr) return detail::invalid("dpo: grad_logps is null");
  if ((entropy == nullptr) != (grad_entropy == nullptr))
    return detail::invalid(entropy == nullptr ? "dpo: entropy is null but grad_entropy is given"
                                              : "dpo: grad_entropy is null but entropy is given");
  if (g.hidden != nullptr && g.hidden_stride < H)
    return detail::invalid("dpo: grads.hidden_stride = %lld is invalid: must be >= hidden_cols = %lld",
                           (long long)g.hidden_stride, (long long)H);
  if (g.weight != nullptr && g.weight_stride < H)
    return detail::invalid("dpo: grads.weight_stride = %lld is invalid: must be >= hidden_cols = %lld",
                           (long long)g.weight_stride, (long long)H);
  if (g.bias != nullptr && in.bias == nullptr)
    return detail::invalid("dpo: grads.bias is given but the view has no bias");
  // A shard's rows read both its records and its maxima (row_lse's place).
  dpo::detail::named_range ins[11];
  dpo::detail::linear_input_ranges(in, ins);
  ins[5] = shard.sh.vocab > 0 ? dpo::detail::range_of(shard.records, N, shard_fields, shard_fields, "records")
                              : dpo::detail::range_of(row_lse, 1, N, N, "row_lse");
  ins[6] = dpo::detail::range_of(grad_logps, 1, N, N, "grad_logps");
  ins[7] = dpo::detail::range_of(entropy, 1, N, N, "entropy");
  ins[8] = dpo::detail::range_of(grad_entropy, 1, N, N, "grad_entropy");
  ins[9] = detail::workspace_range(workspace, ch.workspace_bytes);
  ins[10] = dpo::detail::range_of(shard.sh.vocab > 0 ? shard.row_max : nullptr, 1, N, N, "row_max");
  const dpo::detail::named_range outs[3] = {
      dpo::detail::range_of(g.hidden, N, H, g.hidden_stride, "grads.hidden"),
      dpo::detail::range_of(g.weight, V, H, g.weight_stride, "grads.weight"),
      dpo::detail::range_of(g.bias, 1, V, V, "grads.bias")};
  s = detail::check_linear_overlap(outs, 3, ins, 11);
  if (!s) return s;
  if (N == 0)  // nothing to compute; the error word still becomes this call's (clear)
    return detail::launch("linear_check_kernel", detail::linear_check_kernel<L>, 1, 256, stream, in.labels, in.mask,
                          N, shard.sh.vocab > 0 ? shard.sh.vocab : V, in.ignore_index, w.h);
  constexpr int B = detail::linear_block;
  const detail::linear_bwd_in bin{row_lse, grad_logps, entropy, grad_entropy, false, shard};
  // Twice over the same loop: first only choosing every GEMM's algorithm (dry), then enqueuing.
  const auto pass = [&](bool dry) {
    const detail::linear_gemm gm{handle, stream, w.gemm, static_cast<std::size_t>(w.gemm_bytes), dry};
    status s;
    if (!dry)
      s = detail::launch("linear_check_kernel", detail::linear_check_kernel<L>, 1, 256, stream, in.labels,
                         in.mask, N, shard.sh.vocab > 0 ? shard.sh.vocab : V, in.ignore_index, w.h);
    for (std::int64_t r0 = 0; s && r0 < N; r0 += ch.rows) {
      const std::int64_t nb = ch.rows < N - r0 ? ch.rows : N - r0;
      if (!dry)
        s = detail::launch("linear_gather_kernel", detail::linear_gather_kernel<B, true, T, L>,
                           detail::row_blocks(nb), B, stream, in, r0, nb, bin, w);
      // Double heads only: one more pass over the vocab for the rows past the lse recompute
      // limit (the host cannot see which rows those are). Float accumulation's limit is
      // |lse| >= 2^26, where the fp32 logits themselves are rounded by more than the stored
      // lse is: not recomputed (docs/cuda.md).
      if (std::is_same<A, double>::value && shard.sh.vocab == 0) {
        for (std::int64_t v0 = 0; s && v0 < V; v0 += ch.vocab) {
          const std::int64_t nv = ch.vocab < V - v0 ? ch.vocab : V - v0;
          s = detail::logits_gemm(gm, in, w, nb, v0, nv);
          if (s && !dry)
            s = detail::launch("linear_stats_kernel", detail::linear_stats_kernel<B, false, T, L>,
                               detail::row_blocks(nb), B, stream, in, r0, nb, v0, nv, false, w,
                               static_cast<double*>(nullptr), static_cast<double*>(nullptr),
                               static_cast<double*>(nullptr), detail::linear_row_terms{});
        }
        if (s && !dry)
          s = detail::launch("linear_exact_lse_kernel", detail::linear_exact_lse_kernel<T>, detail::seq_grid(nb), 256,
                             stream, r0, nb, row_lse, w);
      }
      for (std::int64_t v0 = 0; s && v0 < V; v0 += ch.vocab) {
        const std::int64_t nv = ch.vocab < V - v0 ? ch.vocab : V - v0;
        s = detail::logits_gemm(gm, in, w, nb, v0, nv);
        if (s && !dry)
          s = grad_entropy != nullptr ? detail::linear_dz<true>(in, nb, v0, nv, w, g.bias, stream)
                                      : detail::linear_dz<false>(in, nb, v0, nv, w, g.bias, stream);
        if (s)
          s = detail::linear_grad_gemms(gm, in.weight + v0 * in.weight_stride, in.weight_stride, H, nb, nv, w,
                                        g.hidden != nullptr, v0 == 0 ? A(0) : A(1),
                                        g.weight != nullptr ? g.weight + v0 * g.weight_stride : nullptr,
                                        g.weight_stride);
      }
      if (s && !dry && g.hidden != nullptr)
        s = detail::launch("linear_dhidden_kernel", detail::linear_dhidden_kernel<B, T, L>,
                           detail::row_blocks(nb), B, stream, H, r0, nb, w, g.hidden, g.hidden_stride,
                           g.accumulate_hidden);
    }
    return s;
  };
  s = pass(true);
  return s ? pass(false) : s;
}

}  // namespace detail

/// The gradient of sum_r grad_logps[r] * logps[r] (+ sum_r grad_entropy[r] * entropy[r]) of
/// linear_logps with respect to hidden, weight and bias, as dpo::cpu::linear_logps_backward.
///
/// - row_lse: linear_logps' row_lse on the same view; grad_logps: [rows] (entries of rows
///   that do not count are ignored); entropy, grad_entropy: [rows] each, or both null.
/// - g: device pointers (see linear_grads). g.bias needs a view with a bias.
/// Per chunk: the logits GEMM again (recompute), the row kernel turning them into dZ, then
/// dHidden += dZ . weight chunk (fp32 accumulator in the workspace) and dWeight += dZ^T .
/// hidden rows straight into g.weight (cuBLASLt, beta = 1). For bf16 / half heads dZ enters
/// those two GEMMs rounded to T (tensor-core inputs; fp32 accumulation); dBias sums the fp32
/// dZ. Rows whose upstream gradients are both 0 are skipped (exact zeros; their hidden
/// states are not read). Outputs may not overlap each other or any input. A label outside
/// [0, vocab) is reported in the error word and nothing is written (the dWeight GEMMs then
/// add exact zeros).
template <class T, class L, class G>
status linear_logps_backward(void* workspace, std::size_t& workspace_bytes, cublasLtHandle_t handle,
                             const linear_view<T, L>& in, const double* row_lse, const double* grad_logps,
                             const double* entropy, const double* grad_entropy, const linear_grads<T, G>& g,
                             const linear_options& opt = {}, cudaStream_t stream = 0) {
  return detail::linear_backward_run(workspace, workspace_bytes, handle, in, row_lse, detail::linear_shard_rows{},
                                     grad_logps, entropy, grad_entropy, g, opt, stream);
}

}  // namespace cuda
}  // namespace dpo
