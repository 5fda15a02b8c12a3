// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO straight from hidden states (issue 13, item 3): the operator linear_dpo binds the
// library's one-call CPU path dpo::cpu::linear_dpo (include/dpo/cpu/linear_dpo.hpp), which
// computes the loss, the metrics and the gradients of hidden, weight and bias in one call
// (three or four passes over the weight, its own choice; docs/linear.md). The gradients are
// outputs of the forward; the autograd formula (dpo_kernels/_linear_dpo.py) scales them by
// the upstream gradient. No [rows, vocab] logits ever exist.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "common.h"
#include "cpu_head.h"
#include "gemm_isa.h"
#include "forward_outputs.h"
#include "dpo/core/metrics.hpp"
#include "dpo/cpu/linear_dpo.hpp"
#include "dpo/cpu/linear_shard.hpp"

namespace dpo_kernels {
namespace {

// Outputs: loss [], metrics [num_metrics], pair values [6, P] (float32; float64 for float64
// hidden), then the gradients of the loss w.r.t. hidden (hidden's shape and dtype), weight and
// bias (their dtypes; dWeight / dBias summed in float, double for float64, and rounded once),
// each [0] when its flag is off.
DPO_LINEAR_DPO_KERNEL(linear_dpo_cpu) {
  const linear_dpo_inputs in(c10::kCPU, DPO_LINEAR_DPO_ARGS);
  const dpo::loss_config& cfg = in.cfg;
  const hidden_layout& l = in.l;
  const pair_result_tensors t(in.P, at::TensorOptions().dtype(at::kDouble));
  const dpo::forward_outputs& out = t.out;

  const grad_tensors gt(l, hidden, in.w, in.b, need_hidden, need_weight, need_bias);
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = at::get_num_threads();
  opt.gemm = cpu_gemm();
  opt.metrics = compute_metrics;
  opt.workspace_bytes = workspace_bytes;
  dispatch_cpu(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const auto g = gt.grads<T, dpo::cpu::acc_t<T>>();
    const auto policy = pairs_of<T, L>(l, ignore_index);
    const auto head = head_of<T>(in.w, in.b, in.tr);
    rethrow_as_value_error([&] {
      if (in.has_ref_hidden)
        dpo::cpu::linear_dpo(policy, head, pairs_of<T, L>(in.rl, ignore_index), head_of<T>(in.rw, in.rb, in.tr), cfg,
                             out, g, opt);
      else
        dpo::cpu::linear_dpo(policy, head, doubles(in.rc), doubles(in.rr), cfg, out, g, opt);
    });
  });
  return gt.linear_dpo_results(t, hidden, weight);
}

// ---- DPO from hidden states on a head shard (dpo/cpu/linear_shard.hpp; docs/distributed.md) -----
// weight / bias hold rows [vocab_start, vocab_start + V_local) of a head of vocab_size rows;
// labels are global ids. Records and maxima are indexed by hidden's rows ([R] and
// [R, shard_fields], R = 2P * T or N), one array for both sides. The collectives between these
// ops are torch.distributed all-reduces issued from Python (dpo_kernels/distributed.py).

at::Tensor row_state(const at::Tensor& t, std::int64_t rows, std::int64_t width, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == rows * width && t.device().is_cpu(), name, " must be the CPU float64 [", rows,
                    width > 1 ? ", " + std::to_string(width) : std::string(), "] tensor of linear_dpo_shard_partials",
                    " for this hidden, got ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

dpo::cpu::linear_dpo_options shard_options(bool metrics, std::int64_t workspace_bytes) {
  dpo::cpu::linear_dpo_options o;
  o.num_threads = at::get_num_threads();
  o.gemm = cpu_gemm();
  o.metrics = metrics;
  o.workspace_bytes = workspace_bytes;
  return o;
}

DPO_LINEAR_DPO_SHARD_PARTIALS_KERNEL(linear_dpo_shard_partials_cpu) {
  const shard_call c = shard_inputs(c10::kCPU, hidden, weight, bias, labels, cu_seqlens, temperature, softcap,
                                    logit_scale, vocab_start, vocab_size, workspace_bytes);
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  // Rows no side's sequences span keep the empty record (nothing in the sums, -inf in the max).
  at::Tensor row_max = at::full({c.l.rows}, -INFINITY, dbl);
  at::Tensor records = at::zeros({c.l.rows, dpo::shard_fields}, dbl);
  records.select(1, static_cast<int>(dpo::shard_field::shard_max)).fill_(-INFINITY);
  dispatch_cpu(c.l.hidden.scalar_type(), c.l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    double* m = row_max.data_ptr<double>();
    double* r = records.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_partials(pairs_of<T, L>(c.l, ignore_index), head_of<T>(c.w, c.b, c.tr), c.sh, m, r,
                                           m, r, shard_options(metrics, workspace_bytes));
    });
  });
  return {row_max, records};
}

// The [seq_fields, 2P] sequence sums from the combined records (what the context group sums).
DPO_LINEAR_DPO_SHARD_SEQUENCES_KERNEL(linear_dpo_shard_sequences_cpu) {
  check_backend(hidden, "hidden", c10::kCPU);
  const hidden_layout l = lower_hidden(hidden, labels, cu_seqlens, "hidden");
  const at::Tensor m = row_state(row_max, l.rows, 1, "row_max");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, "records");
  at::Tensor seq = at::zeros({dpo::seq_fields, l.num_seqs}, at::kDouble);
  dispatch_cpu(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const double* pm = m.data_ptr<double>();
    const double* pr = r.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_sequences(pairs_of<T, L>(l, ignore_index), {vocab_size, vocab_start, vocab_end}, pm,
                                            pr, pm, pr, ld_alpha, seq.data_ptr<double>(), metrics);
    });
  });
  return seq;
}

// The shard-local backward: (dHidden PARTIAL in hidden's shape, dWeight rows, dBias rows); the
// caller sums dHidden over the tensor-parallel group.
DPO_LINEAR_DPO_SHARD_BACKWARD_KERNEL(linear_dpo_shard_backward_cpu) {
  const shard_call c = shard_inputs(c10::kCPU, hidden, weight, bias, labels, cu_seqlens, temperature, softcap,
                                    logit_scale, vocab_start, vocab_size, workspace_bytes);
  const hidden_layout& l = c.l;
  const at::Tensor m = row_state(row_max, l.rows, 1, "row_max");
  const at::Tensor r = row_state(records, l.rows, dpo::shard_fields, "records");
  check_seq_grads(seq_grad, nll_token_grad, l);
  const at::Tensor g = seq_grad.to(at::kDouble).contiguous();
  const double nll = nll_token_grad.to(at::kDouble).item<double>();
  const grad_tensors gt(l, hidden, c.w, c.b, need_hidden, need_weight, need_bias);
  dispatch_cpu(l.hidden.scalar_type(), l.labels.scalar_type(), [&](auto* tp, auto* lp) {
    using T = std::remove_pointer_t<decltype(tp)>;
    using L = std::remove_pointer_t<decltype(lp)>;
    const auto gr = gt.grads<T, dpo::cpu::acc_t<T>>();
    const double* pm = m.data_ptr<double>();
    const double* pr = r.data_ptr<double>();
    rethrow_as_value_error([&] {
      dpo::cpu::linear_pair_shard_backward(pairs_of<T, L>(l, ignore_index), head_of<T>(c.w, c.b, c.tr), c.sh, pm, pr,
                                           pm, pr, g.data_ptr<double>(), nll, ld_alpha, gr, 1.0,
                                           shard_options(false, workspace_bytes));
    });
  });
  return gt.result(hidden, weight);
}

#ifndef DPO_KERNELS_WITH_CUDA
// With a CUDA build: linear_dpo in cuda_linear.cu, the shard ops in cuda_linear_shard.cu.
void no_cuda_linear_dpo(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op.schema().name(), ": this dpo_kernels build has no CUDA kernel of this op (",
                              cuda_note(), "): move hidden, weight, bias and labels to the CPU");
}
#endif

}  // namespace
}  // namespace dpo_kernels

TORCH_LIBRARY_FRAGMENT(dpo_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "linear_dpo(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? cu_seqlens, "
      "Tensor? reference_chosen_logps, Tensor? reference_rejected_logps, Tensor? ref_hidden, Tensor? ref_weight, "
      "Tensor? ref_bias, float temperature, float? softcap, float logit_scale, int ignore_index" DPO_CONFIG_SCHEMA
      ", bool compute_metrics, bool need_hidden, bool need_weight, bool need_bias, int workspace_bytes) -> "
      "(Tensor loss, Tensor metrics, Tensor pair_values, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
      tags);
  m.def(
      "linear_dpo_shard_partials(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? cu_seqlens, "
      "float temperature, float? softcap, float logit_scale, int ignore_index, int vocab_start, int vocab_size, "
      "bool metrics, int workspace_bytes) -> (Tensor row_max, Tensor records)",
      tags);
  m.def(
      "linear_dpo_shard_sequences(Tensor hidden, Tensor labels, Tensor? cu_seqlens, Tensor row_max, Tensor records, "
      "int ignore_index, int vocab_start, int vocab_end, int vocab_size, float ld_alpha, bool metrics) -> Tensor",
      tags);
  m.def(
      "linear_dpo_shard_backward(Tensor seq_grad, Tensor nll_token_grad, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, Tensor? cu_seqlens, Tensor row_max, Tensor records, float temperature, float? softcap, "
      "float logit_scale, int ignore_index, int vocab_start, int vocab_size, float ld_alpha, bool need_hidden, "
      "bool need_weight, bool need_bias, int workspace_bytes) -> (Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)",
      tags);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CPU, m) {
  m.impl("linear_dpo", &dpo_kernels::linear_dpo_cpu);
  m.impl("linear_dpo_shard_partials", &dpo_kernels::linear_dpo_shard_partials_cpu);
  m.impl("linear_dpo_shard_sequences", &dpo_kernels::linear_dpo_shard_sequences_cpu);
  m.impl("linear_dpo_shard_backward", &dpo_kernels::linear_dpo_shard_backward_cpu);
}

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
#ifndef DPO_KERNELS_WITH_CUDA
  for (const char* name : {"linear_dpo", "linear_dpo_shard_partials", "linear_dpo_shard_sequences",
                           "linear_dpo_shard_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dpo_kernels::no_cuda_linear_dpo>());
#endif
}
