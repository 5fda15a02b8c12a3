// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The matrix products of the CPU fused LM head (dpo/cpu/linear.hpp, linear_dpo.hpp,
// linear_shard.hpp) go through one hook, linear_gemm: a pair of function pointers of the
// shape of a row-major BLAS GEMM. The default is Eigen (eigen_gemm below), compiled with the
// including file's flags; a caller can plug any BLAS (cblas_sgemm / cblas_dgemm, MKL, its own
// kernels) or an Eigen compiled for a wider instruction set (the Python extension does,
// python/csrc/gemm_isa.h). What a plugged GEMM must guarantee: docs/linear.md, "GEMM hook".
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

namespace dpo {
namespace cpu {

/// C = alpha * op(A) * op(B) + beta * C on row-major matrices, S = float or double:
/// op(A) is [m, k] and op(B) is [k, n]; A is stored [m, k] (transpose_a false) or [k, m]
/// (true) with rows lda elements apart, B likewise [k, n] or [n, k] with ldb, and C [m, n]
/// with ldc. beta == 0 means C is written, never read (it may hold anything, NaN included).
/// m, n, k >= 1; the leading dimensions are at least the stored row lengths. A and B do
/// not overlap C. `context` is linear_gemm::context. The CBLAS equivalent is
///   cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? ... , m, n, k, alpha,
///               a, lda, b, ldb, beta, c, ldc).
template <class S>
using gemm_fn = void (*)(void* context, bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n,
                         std::int64_t k, S alpha, const S* a, std::int64_t lda, const S* b, std::int64_t ldb,
                         S beta, S* c, std::int64_t ldc);

namespace detail {

/// The Eigen implementation of gemm_fn: the products the head used before the hook existed,
/// expression for expression (alpha 1 and beta 0 or 1 are the head's calls; they take the
/// plain assignment and += paths), so its results are bitwise what they were.
///
/// `EigenTag` is never passed: its default, a type of Eigen's namespace, puts that namespace
/// in this function's linker name. A translation unit that renames Eigen (`#define Eigen
/// my_eigen_avx2` before including it, to compile it for another instruction set) then gets
/// its own instantiation, eigen_gemm<float, my_eigen_avx2::OuterStride<...>>, which the linker
/// cannot merge with (and substitute for) the one of the files built with baseline flags.
template <class S, class EigenTag = Eigen::OuterStride<>>
void eigen_gemm(void* /*context*/, bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n,
                std::int64_t k, S alpha, const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c,
                std::int64_t ldc) {
  using matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using cmap = Eigen::Map<const matrix, 0, EigenTag>;
  using map = Eigen::Map<matrix, 0, EigenTag>;
  map cm(c, m, n, EigenTag(ldc));
  // Four operand shapes, each one Eigen product expression; the head uses NT, NN and TN.
  const auto run = [&](const auto& lhs, const auto& rhs) {
    if (beta == S(0)) {
      if (alpha == S(1)) {
        cm.noalias() = lhs * rhs;
      } else {
        cm.noalias() = alpha * (lhs * rhs);
      }
      return;
    }
    if (beta != S(1)) cm *= beta;
    if (alpha == S(1)) {
      cm.noalias() += lhs * rhs;
    } else {
      cm.noalias() += alpha * (lhs * rhs);
    }
  };
  const cmap am = transpose_a ? cmap(a, k, m, EigenTag(lda)) : cmap(a, m, k, EigenTag(lda));
  const cmap bm = transpose_b ? cmap(b, n, k, EigenTag(ldb)) : cmap(b, k, n, EigenTag(ldb));
  if (transpose_a) {
    if (transpose_b) {
      run(am.transpose(), bm.transpose());
    } else {
      run(am.transpose(), bm);
    }
  } else if (transpose_b) {
    run(am, bm.transpose());
  } else {
    run(am, bm);
  }
}

}  // namespace detail

/// The GEMM hook of the CPU linear head (linear_options::gemm, linear_dpo_options::gemm).
/// Every product of the head is one call, C = alpha * op(A) * op(B) + beta * C, in the
/// accumulation type: float for float, bf16 and half heads (16-bit hidden states and weight
/// rows are converted to float in the head's workspace first, so a GEMM sees only float and
/// accumulates in float) and double for double heads. The head calls it with alpha = 1 and
/// beta = 0 (logits) or 1 (dHidden and dWeight, summed over vocab chunks), concurrently from
/// its worker threads, on tiles whose shapes depend on the chunk shape only
/// (docs/linear.md, "GEMM hook": what a plugged GEMM must guarantee for the head's
/// determinism).
///
///   void my_sgemm(void*, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
///                 const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
///                 std::int64_t ldc) {
///     cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k,
///                 alpha, a, lda, b, ldb, beta, c, ldc);
///   }
///   dpo::cpu::linear_options opt;
///   opt.gemm.sgemm = &my_sgemm;  // dgemm stays Eigen's
struct linear_gemm {
  /// The float GEMM (float, bf16 and half heads). Never null.
  gemm_fn<float> sgemm = &detail::eigen_gemm<float>;
  /// The double GEMM (double heads). Never null.
  gemm_fn<double> dgemm = &detail::eigen_gemm<double>;
  /// Passed to both as their first argument, untouched by the library.
  void* context = nullptr;

  /// The GEMM of S (float or double).
  template <class S>
  gemm_fn<S> of() const {
    if constexpr (std::is_same_v<S, float>) {
      return sgemm;
    } else {
      return dgemm;
    }
  }
};

}  // namespace cpu
}  // namespace dpo
