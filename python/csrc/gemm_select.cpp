// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// cpu_gemm() (gemm_isa.h): the CPU head's GEMM for the level the row kernels run at, and two
// private ops for the tests, which run each built variant directly:
//   _cpu_gemm_levels() -> str[]: the levels with a GEMM of their own that this CPU supports
//   _cpu_gemm(a, b, c, transpose_a, transpose_b, alpha, beta, level) -> Tensor:
//     alpha * op(a) @ op(b) + beta * c (float32 or float64, 2-D, CPU) by that level's GEMM
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"
#include "dpo/cpu/isa.hpp"
#include "gemm_isa.h"

namespace dpo_kernels {

#ifdef DPO_KERNELS_GEMM_VARIANTS
extern const gemm_pair gemm_avx2;
extern const gemm_pair gemm_avx512;
#endif

namespace {

/// The GEMMs of a level: the variant compiled for it (avx512_bf16 uses avx512's), or the
/// library's default (Eigen with the extension's own flags) for baseline or without variants.
dpo::cpu::linear_gemm gemm_of(dpo::cpu::isa level) {
  dpo::cpu::linear_gemm g;
#ifdef DPO_KERNELS_GEMM_VARIANTS
  const gemm_pair* v = nullptr;
  switch (level) {
    case dpo::cpu::isa::avx2:
      v = &gemm_avx2;
      break;
    case dpo::cpu::isa::avx512:
    case dpo::cpu::isa::avx512_bf16:
      v = &gemm_avx512;
      break;
    default:
      break;
  }
  if (v != nullptr) {
    g.sgemm = v->sgemm;
    g.dgemm = v->dgemm;
  }
#else
  (void)level;
#endif
  return g;
}

/// The levels that have a GEMM of their own, up to what this CPU supports.
std::vector<dpo::cpu::isa> gemm_levels() {
  std::vector<dpo::cpu::isa> out = {dpo::cpu::isa::baseline};
#ifdef DPO_KERNELS_GEMM_VARIANTS
  for (dpo::cpu::isa l : {dpo::cpu::isa::avx2, dpo::cpu::isa::avx512})
    if (static_cast<int>(l) <= static_cast<int>(dpo::cpu::cpu_isa_supported())) out.push_back(l);
#endif
  return out;
}

std::vector<std::string> cpu_gemm_levels() {
  std::vector<std::string> names;
  for (dpo::cpu::isa l : gemm_levels()) names.emplace_back(dpo::cpu::isa_name(l));
  return names;
}

at::Tensor run_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool transpose_a,
                    bool transpose_b, double alpha, double beta, const std::string& level) {
  const std::vector<dpo::cpu::isa> levels = gemm_levels();
  const dpo::cpu::isa* found = nullptr;
  for (const dpo::cpu::isa& l : levels)
    if (level == dpo::cpu::isa_name(l)) found = &l;
  TORCH_CHECK_VALUE(found != nullptr, "level = '", level, "' has no GEMM on this CPU: must be one of ",
                    c10::Join(", ", cpu_gemm_levels()));
  for (const at::Tensor* t : {&a, &b, &c}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->device().is_cpu(), "a, b and c must be 2-D CPU tensors");
    TORCH_CHECK_TYPE(t->scalar_type() == a.scalar_type(), "a, b and c must have one dtype");
  }
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                   "a must be float32 or float64, got ", a.scalar_type());
  const std::int64_t m = transpose_a ? a.size(1) : a.size(0), k = transpose_a ? a.size(0) : a.size(1);
  const std::int64_t n = transpose_b ? b.size(0) : b.size(1);
  TORCH_CHECK_VALUE((transpose_b ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n && m > 0 &&
                        n > 0 && k > 0,
                    "shapes do not match: op(a) ", m, " x ", k, ", b ", b.sizes(), ", c ", c.sizes());
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  at::Tensor C = c.clone(at::MemoryFormat::Contiguous);
  const dpo::cpu::linear_gemm g = gemm_of(*found);
  if (a.scalar_type() == at::kFloat) {
    g.sgemm(g.context, transpose_a, transpose_b, m, n, k, static_cast<float>(alpha), A.data_ptr<float>(), A.size(1),
            B.data_ptr<float>(), B.size(1), static_cast<float>(beta), C.data_ptr<float>(), n);
  } else {
    g.dgemm(g.context, transpose_a, transpose_b, m, n, k, alpha, A.data_ptr<double>(), A.size(1),
            B.data_ptr<double>(), B.size(1), beta, C.data_ptr<double>(), n);
  }
  return C;
}

}  // namespace

// The level is read here, before any row kernel, so a bad DPO_CPU_ISA gets the row kernels'
// ValueError from here too.
dpo::cpu::linear_gemm cpu_gemm() {
  return rethrow_as_value_error([] { return gemm_of(dpo::cpu::cpu_isa()); });
}

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  m.def("_cpu_gemm_levels() -> str[]", &cpu_gemm_levels);
  m.def("_cpu_gemm(Tensor a, Tensor b, Tensor c, bool transpose_a, bool transpose_b, float alpha, float beta, "
        "str level) -> Tensor",
        &run_gemm);
}

}  // namespace dpo_kernels
