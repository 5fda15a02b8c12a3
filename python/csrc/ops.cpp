// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The dpo_kernels operator schemas (torch.library, namespace dpo_kernels), the argument
// lowering shared by the backends, and the small Python module dpo_kernels._C. Kernels are
// registered per backend in cpu.cpp and cuda.cu; autograd and fake (meta) kernels are
// registered from Python (dpo_kernels/_ops.py).
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "dpo/core/check.hpp"
#include "dpo/core/metrics.hpp"
#include "dpo/version.hpp"

namespace dpo_kernels {

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

}  // namespace

dpo::loss_config make_config(DPO_CONFIG_PARAMS, double exponent_clamp) {
  dpo::loss_config c;
  std::vector<std::string> names;
  {
    // Split by hand: std::getline drops a trailing empty item, which must be rejected
    // ("sigmoid," is a typo, not one loss type).
    const std::string all(loss_type);
    std::size_t begin = 0;
    while (true) {
      const std::size_t comma = all.find(',', begin);
      names.push_back(trim(all.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin)));
      if (comma == std::string::npos) break;
      begin = comma + 1;
    }
  }
  TORCH_CHECK_VALUE(!(names.size() == 1 && names[0].empty()),
                    "loss_type is empty: give at least one of ", dpo::loss_type_names());
  for (std::size_t k = 0; k < names.size(); ++k)
    TORCH_CHECK_VALUE(!names[k].empty(), "loss_type '", std::string(loss_type), "' has an empty name at position ",
                      k, ": give comma-separated names, each one of ", dpo::loss_type_names());
  TORCH_CHECK_VALUE(names.size() <= static_cast<std::size_t>(dpo::max_loss_terms), "loss_type: ",
                    names.size(), " loss types given, at most ", dpo::max_loss_terms,
                    " are supported");
  TORCH_CHECK_VALUE(loss_weights.empty() || loss_weights.size() == names.size(),
                    "loss_weights has ", loss_weights.size(), " entries but loss_type has ",
                    names.size(), ": give one weight per loss type");
  c.num_terms = static_cast<int>(names.size());
  for (std::size_t k = 0; k < names.size(); ++k) {
    dpo::loss_type t;
    TORCH_CHECK_VALUE(dpo::parse_loss_type(names[k], &t), "loss_type '", names[k],
                      "' is not a known loss type (TRL's names: ", dpo::loss_type_names(), ")");
    c.terms[k] = {t, loss_weights.empty() ? 1.0 : loss_weights[k]};
  }
  dpo::f_divergence f;
  TORCH_CHECK_VALUE(dpo::parse_f_divergence(std::string(f_divergence_type), &f),
                    "f_divergence_type '", std::string(f_divergence_type),
                    "' is not one of reverse_kl, forward_kl, js_divergence, alpha_divergence");
  dpo::loss_type base;
  const std::string base_name(cpo_base);
  TORCH_CHECK_VALUE(dpo::parse_loss_type(base_name, &base) &&
                        (base == dpo::loss_type::sigmoid || base == dpo::loss_type::hinge ||
                         base == dpo::loss_type::ipo),
                    "cpo_base '", base_name, "' is not one of sigmoid, hinge, ipo");
  c.beta = beta;
  c.label_smoothing = label_smoothing;
  c.cdpo_smoothing = cdpo_smoothing;
  c.divergence = f;
  c.alpha_divergence_coef = f_alpha_divergence_coef;
  c.alpha_exponent_clamp = exponent_clamp;
  c.discopop_tau = discopop_tau;
  c.simpo_gamma = simpo_gamma;
  c.cpo_alpha = cpo_alpha;
  c.cpo_base = base;
  c.reference_free = reference_free;
  c.use_weighting = use_weighting;
  c.ld_alpha = ld_alpha;
  const std::string msg = dpo::validate_config(c);
  TORCH_CHECK_VALUE(msg.empty(), "dpo: ", msg);
  return c;
}

void check_references(const dpo::loss_config& c, bool has_chosen, bool has_rejected) {
  if (c.reference_free || dpo::detail::is_reference_free_type(c.terms[0].type)) return;
  const char* missing = !has_chosen ? "reference_chosen_logps" : !has_rejected ? "reference_rejected_logps" : nullptr;
  TORCH_CHECK_VALUE(missing == nullptr, missing, " is None but loss_type ", dpo::to_string(c.terms[0].type),
                    " needs the reference log-probs: pass reference_chosen_logps and ",
                    "reference_rejected_logps (or ref_logits to dpo_loss_from_logits), or set ",
                    "reference_free=True");
}

void check_pair_vector(const at::Tensor& t, std::int64_t n, const at::Device& device,
                       const char* name) {
  TORCH_CHECK_TYPE(is_floating(t.scalar_type()), name, " must be float32, float64, bfloat16 or ",
                   "float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ",
                    device);
}

/// Checks the pair-level inputs of pair_loss / pair_loss_backward: 1-D floating [P >= 1]
/// vectors on one device (optional ones may be absent). Returns P.
std::int64_t check_pair_inputs(const at::Tensor& policy_chosen_logps,
                               const at::Tensor& policy_rejected_logps,
                               const std::optional<at::Tensor>& reference_chosen_logps,
                               const std::optional<at::Tensor>& reference_rejected_logps,
                               const std::optional<at::Tensor>& chosen_lengths,
                               const std::optional<at::Tensor>& rejected_lengths,
                               const std::optional<at::Tensor>& weights) {
  const auto dev = policy_chosen_logps.device();
  TORCH_CHECK_VALUE(policy_chosen_logps.dim() == 1, "policy_chosen_logps must be 1-D [P], got shape ",
                    policy_chosen_logps.sizes());
  const std::int64_t P = policy_chosen_logps.size(0);
  TORCH_CHECK_VALUE(P >= 1, "policy_chosen_logps is empty: need at least one pair");
  check_pair_vector(policy_chosen_logps, P, dev, "policy_chosen_logps");
  check_pair_vector(policy_rejected_logps, P, dev, "policy_rejected_logps");
  const std::pair<const std::optional<at::Tensor>*, const char*> optional_inputs[] = {
      {&reference_chosen_logps, "reference_chosen_logps"},
      {&reference_rejected_logps, "reference_rejected_logps"},
      {&chosen_lengths, "chosen_lengths"},
      {&rejected_lengths, "rejected_lengths"},
      {&weights, "weights"}};
  for (const auto& [t, name] : optional_inputs) {
    if (!t->has_value()) continue;
    const at::Tensor& x = **t;
    // Log-probs and weights are real values: floating, as dpo_loss_from_logits requires of its
    // reference log-probs; the lengths are token counts (integer or floating), never bool.
    const bool lengths = t == &chosen_lengths || t == &rejected_lengths;
    TORCH_CHECK_TYPE(lengths ? x.scalar_type() != at::kBool && !at::isComplexType(x.scalar_type())
                             : is_floating(x.scalar_type()),
                     name, lengths ? " must be an integer or floating tensor of token counts, got "
                                   : " must be float32, float64, bfloat16 or float16, got ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == P, name, " must have shape [", P, "], got ", x.sizes());
    TORCH_CHECK_VALUE(x.device() == dev, name, " is on ", x.device(), " but policy_chosen_logps is on ", dev);
  }
  return P;
}

pair_inputs lower_pairs(const at::Tensor& policy_chosen_logps, const at::Tensor& policy_rejected_logps,
                        const std::optional<at::Tensor>& reference_chosen_logps,
                        const std::optional<at::Tensor>& reference_rejected_logps,
                        const std::optional<at::Tensor>& chosen_lengths,
                        const std::optional<at::Tensor>& rejected_lengths,
                        const std::optional<at::Tensor>& weights) {
  const std::int64_t P =
      check_pair_inputs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_lengths, rejected_lengths, weights);
  const auto to_double = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  const auto dev = policy_chosen_logps.device();  // every input's (checked above)
  pair_inputs p;
  p.pc = to_double(policy_chosen_logps);
  p.pr = to_double(policy_rejected_logps);
  p.in.num_pairs = P;
  p.in.chosen_logps = p.pc.data_ptr<double>();
  p.in.rejected_logps = p.pr.data_ptr<double>();
  p.in.ref_chosen_logps = doubles_or_null(reference_chosen_logps, p.rc, dev);
  p.in.ref_rejected_logps = doubles_or_null(reference_rejected_logps, p.rr, dev);
  p.in.chosen_tokens = doubles_or_null(chosen_lengths, p.lc, dev);
  p.in.rejected_tokens = doubles_or_null(rejected_lengths, p.lr, dev);
  p.in.weights = doubles_or_null(weights, p.w, dev);
  if (dev.is_cpu()) {
    // The token counts by the core's rule (finite, >= 0), named as the Python arguments; on CUDA
    // reading them would synchronise (the docs say so).
    for (const auto& [n, name] : {std::pair{p.in.chosen_tokens, "chosen_lengths"},
                                  std::pair{p.in.rejected_tokens, "rejected_lengths"}}) {
      const std::string e = dpo::detail::check_token_counts(n, P, name);
      TORCH_CHECK_VALUE(e.empty(), e);
    }
  }
  return p;
}

at::Tensor weigh_by_upstream(const at::Tensor& grad_losses, pair_inputs& p) {
  const std::int64_t P = p.in.num_pairs;
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == P, "grad_losses must have shape [",
                    P, "], got ", grad_losses.sizes());
  at::Tensor wu = grad_losses.to(p.pc.options());
  if (p.in.weights != nullptr) wu = wu * p.w;
  wu = wu.contiguous();
  p.in.weights = wu.data_ptr<double>();
  return wu;
}

row_layout make_layout(const at::Tensor& logits, const at::Tensor& labels,
                       const std::optional<at::Tensor>& cu_seqlens, std::int64_t ignore_index,
                       const char* name) {
  TORCH_CHECK_TYPE(is_floating(logits.scalar_type()), name,
                   " must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels is on ", labels.device(), " but ",
                    name, " is on ", logits.device());
  // Padding labels are filled with ignore_index, and a value int32 labels cannot hold
  // could never match one: a mistake either way.
  TORCH_CHECK_VALUE(labels.scalar_type() != at::kInt ||
                        (ignore_index >= std::numeric_limits<std::int32_t>::min() &&
                         ignore_index <= std::numeric_limits<std::int32_t>::max()),
                    "ignore_index = ", ignore_index, " is outside the range of int32 labels [",
                    std::numeric_limits<std::int32_t>::min(), ", ", std::numeric_limits<std::int32_t>::max(), "]");
  TORCH_CHECK_VALUE(logits.dim() == 3 || logits.dim() == 2, name,
                    " must be [B, T, V] (padded sequences) or [N, V] (packed rows), got shape ",
                    logits.sizes());
  row_layout l;
  l.vocab = logits.size(-1);
  TORCH_CHECK_VALUE(l.vocab >= 1, name, " has an empty vocabulary dimension: shape ", logits.sizes());
  at::Tensor z = logits;
  if (z.stride(-1) != 1) {
    z = z.contiguous();
    l.copied = true;
  }
  if (logits.dim() == 3) {
    TORCH_CHECK_VALUE(!cu_seqlens.has_value(), "cu_seqlens is only valid with packed ", name,
                      " of shape [N, V]; got ", name, " of shape ", logits.sizes());
    const std::int64_t B = z.size(0), T = z.size(1);
    TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == T,
                      "labels must have shape [", B, ", ", T, "] to match ", name, " ",
                      logits.sizes(), ", got ", labels.sizes());
    std::int64_t k = T;
    if (T > 0 && B > 0) {
      if (!padded_in_place<std::int64_t>(B, T, l.vocab, z.stride(0), z.stride(1), z.stride(2))) {
        z = z.contiguous();
        l.copied = true;
      }
      l.row_stride = T > 1 ? z.stride(1) : B == 1 ? l.vocab : z.stride(0);
      k = view_seq_len<std::int64_t>(B, T, l.vocab, z.stride(0), z.stride(1), z.stride(2));
    } else {
      l.row_stride = l.vocab;
    }
    l.num_seqs = B;
    l.tokens = T;
    l.seq_len = k;
    l.rows = B * T;
    at::Tensor y = labels.contiguous();
    if (k > T) {
      at::Tensor padded = at::full({B, k}, ignore_index, y.options());
      padded.narrow(1, 0, T).copy_(y);
      y = padded;
    }
    l.labels = y;
  } else {
    const std::int64_t N = z.size(0);
    TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == N, "labels must have shape [", N,
                      "] to match ", name, " ", logits.sizes(), ", got ", labels.sizes());
    if (N > 1 && z.stride(0) < l.vocab) {
      z = z.contiguous();
      l.copied = true;
    }
    l.row_stride = N > 1 ? z.stride(0) : l.vocab;
    l.rows = N;
    l.labels = labels.contiguous();
    if (cu_seqlens.has_value()) {
      const at::Tensor& cu = *cu_seqlens;
      TORCH_CHECK_TYPE(cu.scalar_type() == at::kLong || cu.scalar_type() == at::kInt,
                       "cu_seqlens must be int64 or int32, got ", cu.scalar_type());
      // S = 0 (cu_seqlens = [c]) is an empty batch, as padded logits with B = 0.
      TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "cu_seqlens must be 1-D with S + 1 >= 1 ",
                        "entries, got shape ", cu.sizes());
      TORCH_CHECK_VALUE(cu.device() == logits.device(), "cu_seqlens is on ", cu.device(), " but ", name,
                        " is on ", logits.device());
      l.cu_seqlens = cu.to(at::kLong).contiguous();
      l.packed = true;
      l.num_seqs = cu.size(0) - 1;
    } else {
      // One sequence over all N rows.
      l.num_seqs = 1;
      l.seq_len = N;
      l.tokens = N;
    }
  }
  l.logits = z;
  return l;
}

std::int64_t concatenated_pairs(const row_layout& l) {
  TORCH_CHECK_VALUE(l.num_seqs % 2 == 0 && l.num_seqs >= 2, "logits holds ", l.num_seqs,
                    " sequences: the concatenated layout needs an even number 2P >= 2 ",
                    "(rows [0, P) chosen, [P, 2P) rejected)");
  return l.num_seqs / 2;
}

std::optional<row_layout> reference_layout(const at::Tensor& logits, const at::Tensor& labels,
                                           const std::optional<at::Tensor>& cu_seqlens,
                                           const std::optional<at::Tensor>& reference_chosen_logps,
                                           const std::optional<at::Tensor>& reference_rejected_logps,
                                           const std::optional<at::Tensor>& ref_logits,
                                           std::int64_t ignore_index, std::int64_t P) {
  if (!ref_logits.has_value()) {
    if (reference_chosen_logps.has_value())
      check_pair_vector(*reference_chosen_logps, P, logits.device(), "reference_chosen_logps");
    if (reference_rejected_logps.has_value())
      check_pair_vector(*reference_rejected_logps, P, logits.device(), "reference_rejected_logps");
    return std::nullopt;
  }
  TORCH_CHECK_VALUE(!reference_chosen_logps.has_value() && !reference_rejected_logps.has_value(),
                    "give either ref_logits or reference_chosen_logps/reference_rejected_logps, not both");
  TORCH_CHECK_VALUE(ref_logits->sizes() == logits.sizes(), "ref_logits must have the shape of logits ",
                    logits.sizes(), ", got ", ref_logits->sizes());
  TORCH_CHECK_VALUE(ref_logits->device() == logits.device(), "ref_logits is on ", ref_logits->device(),
                    " but logits is on ", logits.device());
  // In its own dtype (fp32 reference logits for a bf16 policy are read as they are, as
  // sequence_logps would read them), never rounded to the policy's.
  return make_layout(*ref_logits, labels, cu_seqlens, ignore_index, "ref_logits");
}

void check_inplace(const row_layout& l, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(!l.copied && l.seq_len == l.tokens,
                    "inplace_backward needs logits whose rows are evenly strided with unit stride over ",
                    "the vocabulary and no gap between sequences (e.g. a contiguous tensor); got strides ",
                    logits.strides(), " for shape ", logits.sizes(),
                    ". Pass a contiguous tensor or use inplace_backward=False.");
}

void check_backward(const at::Tensor& grad_loss, const row_layout& l, const at::Device& device) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one value, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == device, "grad_loss is on ", grad_loss.device(), " but logits is on ",
                    device);
  concatenated_pairs(l);
}

}  // namespace dpo_kernels

TORCH_LIBRARY(dpo_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "sequence_logps(Tensor logits, Tensor labels, Tensor? cu_seqlens, int ignore_index, "
      "bool average) -> (Tensor logps, Tensor row_lse)",
      tags);
  m.def(
      "sequence_logps_backward(Tensor grad, Tensor logits, Tensor labels, Tensor? cu_seqlens, "
      "Tensor row_lse, int ignore_index, bool average) -> Tensor",
      tags);
  m.def(
      "pair_loss(Tensor policy_chosen_logps, Tensor policy_rejected_logps, "
      "Tensor? reference_chosen_logps, Tensor? reference_rejected_logps, Tensor? chosen_lengths, "
      "Tensor? rejected_lengths, Tensor? weights" DPO_CONFIG_SCHEMA
      ") -> (Tensor losses, Tensor chosen_rewards, Tensor rejected_rewards)",
      tags);
  m.def(
      "pair_loss_backward(Tensor grad_losses, Tensor policy_chosen_logps, "
      "Tensor policy_rejected_logps, Tensor? reference_chosen_logps, "
      "Tensor? reference_rejected_logps, Tensor? chosen_lengths, Tensor? rejected_lengths, "
      "Tensor? weights" DPO_CONFIG_SCHEMA ") -> (Tensor grad_chosen, Tensor grad_rejected)",
      tags);
  m.def(
      "dpo_forward(Tensor logits, Tensor labels, Tensor? cu_seqlens, "
      "Tensor? reference_chosen_logps, Tensor? reference_rejected_logps, Tensor? ref_logits, "
      "int ignore_index" DPO_CONFIG_SCHEMA
      ", bool compute_metrics, bool inplace_backward) -> (Tensor loss, Tensor metrics, Tensor pair_values, "
      "Tensor row_lse, Tensor row_coef)",
      tags);
  m.def(
      "dpo_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor? cu_seqlens, "
      "Tensor row_lse, Tensor row_coef, int ignore_index) -> Tensor",
      tags);
  m.def(
      "dpo_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor labels, Tensor? cu_seqlens, "
      "Tensor row_lse, Tensor row_coef, int ignore_index) -> ()",
      tags);
}

#ifndef DPO_KERNELS_WITH_CUDA
namespace {

// Without the CUDA kernels, CUDA tensors get a clear error instead of the dispatcher's
// "could not run ... with arguments from the 'CUDA' backend".
void no_cuda_kernel(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK_VALUE(false, op.schema().name(), ": this dpo_kernels build has no CUDA kernels ",
                    "(built CPU-only: torch or nvcc without CUDA, or DPO_KERNELS_CUDA=0); ",
                    "pass CPU tensors or rebuild with CUDA");
}

}  // namespace

TORCH_LIBRARY_IMPL(dpo_kernels, CUDA, m) {
  for (const char* name : {"sequence_logps", "sequence_logps_backward", "pair_loss", "pair_loss_backward",
                           "dpo_forward", "dpo_backward", "dpo_backward_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernel>());
}
#endif

namespace {

// Called by the fake (meta) kernels so a bad configuration fails at trace time too.
void check_config(DPO_CONFIG_VALUE_PARAMS) { dpo_kernels::make_config(DPO_CONFIG_ARGS); }

// The fake (meta) kernels' check of the reference log-probs a configuration needs.
void check_references(DPO_CONFIG_VALUE_PARAMS, bool has_chosen, bool has_rejected) {
  dpo_kernels::check_references(dpo_kernels::make_config(DPO_CONFIG_ARGS), has_chosen, has_rejected);
}

// make_layout's rows per sequence for the fake kernels, on the sizes and strides they see:
// ints, or SymInts under dynamic shapes (the rule's comparisons then become guards).
c10::SymInt view_seq_len(const std::vector<c10::SymInt>& sizes, const std::vector<c10::SymInt>& strides) {
  TORCH_CHECK_VALUE(sizes.size() == 3 && strides.size() == 3,
                    "view_seq_len takes the sizes and strides of padded logits [B, T, V], got ", sizes.size(),
                    " sizes and ", strides.size(), " strides");
  return dpo_kernels::view_seq_len(sizes[0], sizes[1], sizes[2], strides[0], strides[1], strides[2]);
}

}  // namespace

namespace dpo_kernels {
void add_shard_names(pybind11::module& m);  // shard.cpp
}  // namespace dpo_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpo_kernels native module: registers the torch.ops.dpo_kernels operators";
  m.def("check_config", &check_config, "Raises ValueError if the loss configuration is invalid");
  m.def("check_references", &check_references,
        "Raises ValueError if the configuration needs reference log-probs that are missing");
  {
    // (name, schema type, default) of each config argument, in schema order.
    pybind11::list fields;
#define DPO_CONFIG_FIELD_ENTRY_(name, schema, param, value, def) \
  fields.append(pybind11::make_tuple(#name, schema, pybind11::cast(value{def})));
    DPO_CONFIG_FIELDS(DPO_CONFIG_FIELD_ENTRY_)
#undef DPO_CONFIG_FIELD_ENTRY_
    m.attr("config_fields") = pybind11::tuple(fields);
  }
  m.def("view_seq_len", &view_seq_len, pybind11::arg("sizes"), pybind11::arg("strides"),
        "Rows per sequence of the kernels' view of padded logits [B, T, V] with these sizes and strides");
  m.attr("__version__") = DPO_VERSION_STRING;
  {
    std::vector<std::string> names;
    for (int i = 0; i < dpo::num_loss_types; ++i) names.push_back(dpo::to_string(static_cast<dpo::loss_type>(i)));
    m.attr("loss_types") = pybind11::tuple(pybind11::cast(names));
  }
  m.def("cuda_built", []() {
#ifdef DPO_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The metrics' order and TRL names come from the library's table (DPO_METRICS): the
  // `metrics` output of dpo_forward is the dpo::metrics struct.
  m.attr("num_metrics") = dpo::num_metrics;
  dpo_kernels::add_shard_names(m);
  m.attr("metric_names") = pybind11::tuple(pybind11::cast(
      std::vector<std::string>(std::begin(dpo::metric_names), std::end(dpo::metric_names))));
}
