// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA emulator's cuBLASLt: a reference GEMM (see include/cublasLt.h for what it models
// and checks). Runs on the stream as a one-thread kernel, so device memory is accessible and
// graph capture records it.
#include "cublasLt.h"

#include <cstring>
#include <new>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace dpo_emu {

struct cublaslt_context {
  std::uint64_t magic;
};

namespace {

constexpr std::uint64_t handle_magic = 0x43424c54454d5531ull;  // "CBLTEMU1"
constexpr std::uint64_t layout_magic = 0x4c41594f55543031ull;
constexpr std::uint64_t desc_magic = 0x4d4d444553433031ull;
constexpr std::uint64_t pref_magic = 0x50524546454d5531ull;
constexpr std::uint64_t algo_magic = 0x414c474f454d5531ull;
long long matmul_count = 0;

// Layout: data[0] magic, [1] type, [2] rows, [3] cols, [4] ld.
// Desc: data[0] magic, [1] compute, [2] scale, [3] transa, [4] transb, [5] pointer mode.
// Preference: data[0] magic, [1] max workspace, [2..5] min alignment of A, B, C, D.
// Algo: data[0] magic, [1..4] the preference's min alignments of A, B, C, D.

bool known_type(cudaDataType t) {
  return t == CUDA_R_16F || t == CUDA_R_16BF || t == CUDA_R_32F || t == CUDA_R_64F;
}

std::size_t type_size(cudaDataType t) {
  switch (t) {
    case CUDA_R_16F:
    case CUDA_R_16BF: return 2;
    case CUDA_R_32F: return 4;
    case CUDA_R_64F: return 8;
  }
  return 0;
}

double load(cudaDataType t, const void* base, std::int64_t i) {
  switch (t) {
    case CUDA_R_16F: return static_cast<double>(__half2float(static_cast<const __half*>(base)[i]));
    case CUDA_R_16BF: return static_cast<double>(static_cast<float>(static_cast<const __nv_bfloat16*>(base)[i]));
    case CUDA_R_32F: return static_cast<double>(static_cast<const float*>(base)[i]);
    case CUDA_R_64F: return static_cast<const double*>(base)[i];
  }
  return 0;
}

/// Stores v rounded once to t (a float value for the 32F paths, which round to float first:
/// rounding the float to bf16/fp16 equals rounding the exact sum only up to double rounding,
/// as on the device, whose epilogue works in fp32).
void store(cudaDataType t, void* base, std::int64_t i, double v) {
  switch (t) {
    case CUDA_R_16F: static_cast<__half*>(base)[i] = __float2half_rn(static_cast<float>(v)); return;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(static_cast<float>(v)); return;
    case CUDA_R_32F: static_cast<float*>(base)[i] = static_cast<float>(v); return;
    case CUDA_R_64F: static_cast<double*>(base)[i] = v; return;
  }
}

struct layout {
  cudaDataType type;
  std::uint64_t rows, cols;
  std::int64_t ld;
};

bool read_layout(cublasLtMatrixLayout_t l, layout* out) {
  if (l == nullptr || l->data[0] != layout_magic) return false;
  out->type = static_cast<cudaDataType>(l->data[1]);
  out->rows = l->data[2];
  out->cols = l->data[3];
  out->ld = static_cast<std::int64_t>(l->data[4]);
  return true;
}

/// Bytes from the first to one past the last element of a column-major matrix.
std::size_t span_bytes(const layout& l) {
  if (l.rows == 0 || l.cols == 0) return 0;
  return ((l.cols - 1) * static_cast<std::uint64_t>(l.ld) + l.rows) * type_size(l.type);
}

bool device_or_empty(const void* p, const layout& l) {
  const std::size_t n = span_bytes(l);
  return n == 0 || (p != nullptr && is_device_range(p, n));
}

/// The combinations of the library's GEMMs (a subset of cuBLASLt's table).
bool supported(cublasComputeType_t compute, cudaDataType scale, cudaDataType a, cudaDataType b,
               cudaDataType c, cudaDataType d) {
  if (a != b || c != d) return false;
  if (compute == CUBLAS_COMPUTE_64F || compute == CUBLAS_COMPUTE_64F_PEDANTIC)
    return scale == CUDA_R_64F && a == CUDA_R_64F && c == CUDA_R_64F;
  if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC &&
      compute != CUBLAS_COMPUTE_32F_FAST_TF32)
    return false;
  if (scale != CUDA_R_32F) return false;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  if (a == CUDA_R_16BF || a == CUDA_R_16F) return c == CUDA_R_32F || c == a;
  return false;
}

/// The problem of a matmul: shapes and types, as cuBLASLt validates them.
struct problem {
  layout a, b, c, d;
  bool ta, tb, dbl;
  std::uint64_t m, n, k;
};

cublasStatus_t validate(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc,
                        cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                        problem* p) {
  if (handle == nullptr || handle->magic != handle_magic) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (desc == nullptr || desc->data[0] != desc_magic) return CUBLAS_STATUS_INVALID_VALUE;
  if (!read_layout(Adesc, &p->a) || !read_layout(Bdesc, &p->b) || !read_layout(Cdesc, &p->c) ||
      !read_layout(Ddesc, &p->d))
    return CUBLAS_STATUS_INVALID_VALUE;
  const auto compute = static_cast<cublasComputeType_t>(desc->data[1]);
  const auto scale = static_cast<cudaDataType>(desc->data[2]);
  p->ta = desc->data[3] == CUBLAS_OP_T;
  p->tb = desc->data[4] == CUBLAS_OP_T;
  p->dbl = scale == CUDA_R_64F;
  if (!supported(compute, scale, p->a.type, p->b.type, p->c.type, p->d.type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  // op(A) is m x k, op(B) is k x n, C and D are m x n.
  p->m = p->ta ? p->a.cols : p->a.rows;
  p->k = p->ta ? p->a.rows : p->a.cols;
  const std::uint64_t kb = p->tb ? p->b.cols : p->b.rows;
  p->n = p->tb ? p->b.rows : p->b.cols;
  if (p->k != kb || p->c.rows != p->m || p->c.cols != p->n || p->d.rows != p->m || p->d.cols != p->n)
    return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}

bool aligned(const void* p, std::uint64_t bytes) {
  return bytes <= 1 || reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

}  // namespace

long long cublaslt_matmul_count() { return matmul_count; }

}  // namespace dpo_emu

using dpo_emu::cublaslt_context;

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new (std::nothrow) cublaslt_context{dpo_emu::handle_magic};
  return *handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle) {
  if (handle == nullptr || handle->magic != dpo_emu::handle_magic) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->magic = 0;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasLtGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasLtGetStatusString(cublasStatus_t status) { return cublasLtGetStatusName(status); }

cublasStatus_t cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t l, std::size_t size,
                                                 cudaDataType type, std::uint64_t rows,
                                                 std::uint64_t cols, std::int64_t ld) {
  if (l == nullptr || size != sizeof(*l)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!dpo_emu::known_type(type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  // cuBLASLt: ld must be >= rows (and > 0) for a column-major matrix with columns.
  if (ld < 1 || (cols > 0 && static_cast<std::uint64_t>(ld) < rows)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(l, 0, sizeof(*l));
  l->data[0] = dpo_emu::layout_magic;
  l->data[1] = static_cast<std::uint64_t>(type);
  l->data[2] = rows;
  l->data[3] = cols;
  l->data[4] = static_cast<std::uint64_t>(ld);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType type,
                                          std::uint64_t rows, std::uint64_t cols, std::int64_t ld) {
  if (l == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* p = new (std::nothrow) cublasLtMatrixLayoutOpaque_t;
  if (p == nullptr) return CUBLAS_STATUS_ALLOC_FAILED;
  const cublasStatus_t s = cublasLtMatrixLayoutInit(p, type, rows, cols, ld);
  if (s != CUBLAS_STATUS_SUCCESS) {
    delete p;
    return s;
  }
  *l = p;
  return s;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t d, std::size_t size,
                                               cublasComputeType_t compute, cudaDataType_t scale) {
  if (d == nullptr || size != sizeof(*d)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(d, 0, sizeof(*d));
  d->data[0] = dpo_emu::desc_magic;
  d->data[1] = static_cast<std::uint64_t>(compute);
  d->data[2] = static_cast<std::uint64_t>(scale);
  d->data[3] = CUBLAS_OP_N;
  d->data[4] = CUBLAS_OP_N;
  d->data[5] = CUBLASLT_POINTER_MODE_HOST;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
  if (d == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  auto* p = new (std::nothrow) cublasLtMatmulDescOpaque_t;
  if (p == nullptr) return CUBLAS_STATUS_ALLOC_FAILED;
  cublasLtMatmulDescInit(p, compute, scale);
  *d = p;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              std::size_t size) {
  if (d == nullptr || d->data[0] != dpo_emu::desc_magic || buf == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  std::int32_t v = 0;
  if (size != sizeof(v)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&v, buf, sizeof(v));
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
      if (v != CUBLAS_OP_N && v != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
      d->data[attr == CUBLASLT_MATMUL_DESC_TRANSA ? 3 : 4] = static_cast<std::uint64_t>(v);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_POINTER_MODE:
      // Only host pointer mode is modelled.
      if (v != CUBLASLT_POINTER_MODE_HOST) return CUBLAS_STATUS_NOT_SUPPORTED;
      d->data[5] = static_cast<std::uint64_t>(v);
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE:
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE:
      d->data[attr == CUBLASLT_MATMUL_DESC_COMPUTE_TYPE ? 1 : 2] = static_cast<std::uint64_t>(v);
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, std::size_t size) {
  if (pref == nullptr || size != sizeof(*pref)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(pref, 0, sizeof(*pref));
  pref->data[0] = dpo_emu::pref_magic;
  for (int i = 2; i < 6; ++i) pref->data[i] = 256;  // cuBLASLt's default minimum alignment
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, std::size_t size) {
  if (pref == nullptr || pref->data[0] != dpo_emu::pref_magic || buf == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      if (size != sizeof(std::uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&pref->data[1], buf, sizeof(std::uint64_t));
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: {
      std::uint32_t v = 0;
      if (size != sizeof(v)) return CUBLAS_STATUS_INVALID_VALUE;
      std::memcpy(&v, buf, sizeof(v));
      pref->data[2 + (attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES)] = v;
      return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE:
      return CUBLAS_STATUS_SUCCESS;
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t results[], int* returned) {
  if (returned != nullptr) *returned = 0;
  if (pref == nullptr || pref->data[0] != dpo_emu::pref_magic || requested < 1 || results == nullptr ||
      returned == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  dpo_emu::problem p;
  const cublasStatus_t s = dpo_emu::validate(handle, desc, Adesc, Bdesc, Cdesc, Ddesc, &p);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  std::memset(&results[0], 0, sizeof(results[0]));
  results[0].algo.data[0] = dpo_emu::algo_magic;
  for (int i = 0; i < 4; ++i) results[0].algo.data[1 + i] = pref->data[2 + i];
  results[0].workspaceSize = 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.0f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                              const void* A, cublasLtMatrixLayout_t Adesc, const void* B,
                              cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                              cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t* algo, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream) {
  using namespace dpo_emu;
  problem pr;
  const cublasStatus_t vs = validate(handle, desc, Adesc, Bdesc, Cdesc, Ddesc, &pr);
  if (vs != CUBLAS_STATUS_SUCCESS) return vs;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (algo != nullptr) {
    if (algo->data[0] != algo_magic) return CUBLAS_STATUS_INVALID_VALUE;
    // The algorithm was chosen for buffers at least this aligned.
    if (!aligned(A, algo->data[1]) || !aligned(B, algo->data[2]) || !aligned(C, algo->data[3]) ||
        !aligned(D, algo->data[4]))
      return CUBLAS_STATUS_INVALID_VALUE;
  }
  const layout a = pr.a, b = pr.b, c = pr.c, d = pr.d;
  const bool ta = pr.ta, tb = pr.tb;
  const std::uint64_t m = pr.m, n = pr.n, k = pr.k;
  const bool dbl = pr.dbl;
  const double al = dbl ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double be = dbl ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  // In place (C == D) needs the same layout; otherwise D may not overlap C.
  if (C == D && be != 0.0 && (c.ld != d.ld || c.type != d.type)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!device_or_empty(A, a) || !device_or_empty(B, b) || !device_or_empty(D, d) ||
      (be != 0.0 && !device_or_empty(C, c)))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (workspace_bytes > 0 && (workspace == nullptr || !is_device_range(workspace, workspace_bytes)))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  ++matmul_count;
  const cudaError_t e = launch(dim3(1), dim3(1), stream, [=] {
    for (std::uint64_t j = 0; j < n; ++j) {
      for (std::uint64_t i = 0; i < m; ++i) {
        double acc = 0;
        float accf = 0;
        for (std::uint64_t p = 0; p < k; ++p) {
          const std::int64_t ia = static_cast<std::int64_t>(ta ? p + i * a.ld : i + p * a.ld);
          const std::int64_t ib = static_cast<std::int64_t>(tb ? j + p * b.ld : p + j * b.ld);
          const double x = load(a.type, A, ia) * load(b.type, B, ib);
          // fp32 compute: products of bf16/fp16/fp32 inputs summed in fp32 (fma, as a core).
          if (dbl) {
            acc += x;
          } else {
            accf = static_cast<float>(static_cast<double>(accf) + x);
          }
        }
        const double prod = dbl ? acc : static_cast<double>(accf);
        const std::int64_t id = static_cast<std::int64_t>(i + j * d.ld);
        double out = al * prod;
        if (be != 0.0) {
          const double cv = load(c.type, C, static_cast<std::int64_t>(i + j * c.ld));
          out = dbl ? out + be * cv : static_cast<double>(static_cast<float>(al * prod) + static_cast<float>(be * cv));
        }
        store(d.type, D, id, out);
      }
    }
  });
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
