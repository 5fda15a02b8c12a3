// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// CPU kernels of the dpo_kernels operators: thin adapters from tensors to the dpo::cpu API
// (include/dpo/cpu/dpo.hpp). Every check of the library runs before anything is written,
// and its dpo::error reaches Python as ValueError.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Eigen/Core>
#include <cmath>
#include <vector>

#include "common.h"
#include "forward_outputs.h"
#include "dpo/cpu/dpo.hpp"

namespace dpo_kernels {
namespace {

/// The dpo::cpu element types of bfloat16 and float16 tensors (dispatch_views).
struct cpu_types {
  using bf16 = Eigen::bfloat16;
  using f16 = Eigen::half;
};

dpo::cpu::options cpu_options(bool metrics = true) {
  dpo::cpu::options o;
  o.num_threads = at::get_num_threads();
  o.metrics = metrics;
  return o;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
}

/// Zeroes gradient rows of packed logits that lie outside every sequence (the library leaves
/// them untouched).
void zero_rows_outside(at::Tensor grad2d, const row_layout& l) {
  if (!l.packed) return;
  const std::int64_t first = l.cu_seqlens.data_ptr<std::int64_t>()[0];
  const std::int64_t last = l.cu_seqlens.data_ptr<std::int64_t>()[l.num_seqs];
  if (first > 0) grad2d.narrow(0, 0, std::min(first, l.rows)).zero_();
  if (last < l.rows && last >= 0) grad2d.narrow(0, last, l.rows - last).zero_();
}

/// 0 <= cu_seqlens[0] and cu_seqlens[S] <= N for packed logits [N, V]: the library reads
/// the rows cu_seqlens names (and checks the rest when S > 0; with S = 0 it reads nothing).
void check_packed_rows(const row_layout& l) {
  if (!l.packed) return;
  const std::int64_t first = l.cu_seqlens.data_ptr<std::int64_t>()[0];
  TORCH_CHECK_VALUE(first >= 0, "cu_seqlens[0] = ", first, " is invalid: must be >= 0");
  const std::int64_t last = l.cu_seqlens.data_ptr<std::int64_t>()[l.num_seqs];
  TORCH_CHECK_VALUE(last <= l.rows, "cu_seqlens[", l.num_seqs, "] = ", last, " is past the ", l.rows,
                    " rows of logits");
}

// ---- sequence_logps ----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sequence_logps_cpu(const at::Tensor& logits,
                                                      const at::Tensor& labels,
                                                      const std::optional<at::Tensor>& cu_seqlens,
                                                      std::int64_t ignore_index, bool average) {
  check_cpu(logits, "logits");
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_packed_rows(l);
  const auto out_dtype = result_dtype(logits.scalar_type());
  std::vector<std::int64_t> row_shape(logits.sizes().begin(), logits.sizes().end() - 1);
  if (l.num_seqs == 0)
    return {at::empty({0}, logits.options().dtype(out_dtype)), at::zeros(row_shape, logits.options().dtype(at::kDouble))};
  at::Tensor sums = at::empty({l.num_seqs}, at::kDouble);
  at::Tensor counts = at::empty({l.num_seqs}, at::kLong);
  // The library's row log-sum-exp by view row (what the backward reads), 0 off completion rows.
  at::Tensor lse = at::zeros({l.view_rows()}, at::kDouble);
  dispatch_views<cpu_types>(l, ignore_index, [&](auto v) {
    rethrow_as_value_error([&] {
      dpo::cpu::sequence_logps(v.tokens(), sums.data_ptr<double>(), counts.data_ptr<std::int64_t>(), nullptr,
                               lse.data_ptr<double>(), cpu_options(false));
    });
  });
  const at::Tensor logps = average ? sums / counts.clamp_min(1).to(at::kDouble) : sums;
  // row_lse stays double: the backward splits it into a high and a low part (issue 16), which a
  // float32 copy would lose.
  return {logps.to(out_dtype), view_rows_to_input(lse, l, logits)};
}

at::Tensor sequence_logps_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                       const at::Tensor& labels,
                                       const std::optional<at::Tensor>& cu_seqlens,
                                       const at::Tensor& row_lse, std::int64_t ignore_index,
                                       bool average) {
  check_cpu(logits, "logits");
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_packed_rows(l);
  const at::Tensor lse = input_rows_to_view(row_lse, l, "row_lse");
  if (l.num_seqs == 0) return at::zeros(logits.sizes(), logits.options());
  const at::Tensor g = sequence_grad(grad, l, ignore_index, average);
  at::Tensor out = at::empty({l.view_rows(), l.vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_views<cpu_types>(l, ignore_index, [&](auto v) {
    rethrow_as_value_error([&] {
      dpo::cpu::sequence_logps_backward(v.tokens(), lse.data_ptr<double>(), g.data_ptr<double>(),
                                        v.elements(out.data_ptr()), l.vocab, cpu_options());
    });
  });
  zero_rows_outside(out, l);
  return grad_as_logits(out, l, logits);
}

// ---- pair-level loss ---------------------------------------------------------------------

/// The CPU backend of the pair-level ops (pair_loss_op, pair_loss_backward_op).
struct cpu_pairs {
  explicit cpu_pairs(const at::Tensor& policy_chosen_logps) {
    check_cpu(policy_chosen_logps, "policy_chosen_logps");
  }
  void dpo_loss(const dpo::pair_logps_in& in, const dpo::loss_config& cfg, const dpo::forward_outputs& o) const {
    rethrow_as_value_error([&] { dpo::cpu::dpo_loss(in, cfg, o); });
  }
};

// ---- fused forward / backward --------------------------------------------------------------

DPO_FORWARD_KERNEL(dpo_forward_cpu) {
  check_cpu(logits, "logits");
  const dpo::loss_config cfg = make_config(DPO_CONFIG_ARGS);
  const forward_inputs f = lower_forward(cfg, logits, labels, cu_seqlens, reference_chosen_logps,
                                         reference_rejected_logps, ref_logits, ignore_index, check_packed_rows);
  forward_tensors t(f.l, f.P, at::TensorOptions().dtype(at::kDouble));
  dispatch_views<cpu_types>(f.l, ignore_index, [&](auto v) {
    rethrow_as_value_error([&] {
      const dpo::cpu::options opt = cpu_options(compute_metrics);
      if (!f.rl.has_value()) return dpo::cpu::dpo_forward(v.pairs(), f.ref_c, f.ref_r, cfg, t.out, opt);
      dispatch_reference<cpu_types>(v, *f.rl, [&](auto ref) { dpo::cpu::dpo_forward(v.pairs(), ref, cfg, t.out, opt); });
    });
  });
  return t.results(f.l, logits);
}

void run_backward(const at::Tensor& grad_loss, const row_layout& l, const at::Tensor& row_lse,
                  const at::Tensor& row_coef, std::int64_t ignore_index, void* grad_ptr,
                  std::int64_t grad_stride) {
  check_backward(grad_loss, l, l.logits.device());
  double go = grad_loss.to(at::kDouble).item<double>();
  const at::Tensor lse = input_rows_to_view(row_lse, l, "row_lse");
  at::Tensor coef = input_rows_to_view(row_coef, l, "row_coef");
  if (!std::isfinite(go)) {
    // An upstream gradient of NaN or +-inf propagates, as through any torch op and as on CUDA
    // (whose kernels read it on the device): folded into the row coefficients with dpo's
    // times() (0 * inf = 0, NaN stays NaN), since dpo::cpu refuses a non-finite grad_output.
    const at::Tensor scaled = coef * go;
    coef = std::isnan(go) ? scaled : at::where(coef == 0, at::zeros_like(coef), scaled);
    go = 1.0;
  }
  dispatch_views<cpu_types>(l, ignore_index, [&](auto v) {
    const auto g = v.elements(grad_ptr);
    const dpo::pair_grad_view<typename decltype(v)::value_type> gv{g, grad_stride, g, grad_stride};
    rethrow_as_value_error([&] {
      dpo::cpu::dpo_backward_rows(v.pairs(), lse.data_ptr<double>(), coef.data_ptr<double>(), gv, go, cpu_options());
    });
  });
}

at::Tensor dpo_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                            const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_lse,
                            const at::Tensor& row_coef, std::int64_t ignore_index) {
  check_cpu(logits, "logits");
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_packed_rows(l);
  // The gradient buffer has the view's row indexing: [B, seq_len, V] (seq_len >= T) or [N, V].
  at::Tensor grad = at::empty({l.view_rows(), l.vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  run_backward(grad_loss, l, row_lse, row_coef, ignore_index, grad.data_ptr(), l.vocab);
  zero_rows_outside(grad, l);
  return grad_as_logits(grad, l, logits);
}

void dpo_backward_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                              const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& row_lse,
                              const at::Tensor& row_coef, std::int64_t ignore_index) {
  check_cpu(logits, "logits");
  const row_layout l = make_layout(logits, labels, cu_seqlens, ignore_index, "logits");
  check_packed_rows(l);
  check_inplace(l, logits);
  run_backward(grad_loss, l, row_lse, row_coef, ignore_index, logits.data_ptr(), l.row_stride);
  if (l.packed) {
    at::Tensor rows2d = logits;
    zero_rows_outside(rows2d, l);
  }
}

}  // namespace

DPO_KERNELS_IMPL(CPU, cpu)

}  // namespace dpo_kernels
