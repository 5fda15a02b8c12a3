// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA API: the functions of dpo::cpu (include/dpo/cpu/dpo.hpp) over device memory.
//
//   status f(void* workspace, std::size_t& workspace_bytes, <arguments>, options, stream)
//
// * Two-phase workspace, as CUB: with workspace == nullptr the call only checks the
//   arguments' shapes and values (not the pointers, which may not exist yet) and sets
//   workspace_bytes; it launches nothing. Then call again with
//   a device buffer of at least that many bytes (16-byte aligned; cudaMalloc's are).
// * Every pointer in the views, outputs and gradients is a device pointer; sizes and strides
//   are int64 host values (rows x vocab beyond 2^31 elements are fine; vocab < 2^31).
// * No allocation, copy or synchronization: every call only enqueues kernels on `stream`,
//   so it can be captured in a CUDA graph.
// * Argument errors are returned as a status (cudaErrorInvalidValue and a message naming
//   the argument) before anything is enqueued. Errors in device data (a label outside
//   [0, vocab), cu_seqlens decreasing, negative or past options::num_rows) are found by the
//   first kernels, recorded in the workspace's error word (dpo/cuda/status.cuh) and turn
//   every later kernel into a no-op, so no output is written; read them with
//   read_device_error(workspace, stream) (copies the word back and synchronizes) or copy
//   sizeof(device_error) bytes from the workspace yourself.
// * Deterministic: fixed reduction trees, no float atomics; results are bitwise identical
//   run to run (for a given GPU architecture and block configuration). They match the CPU
//   path to rounding (different exponential and summation order), not bitwise.
//
// Dtypes: logits T = __nv_bfloat16, __half, float, double (accumulated in fp32; fp64 for
// double); labels L = int32_t or int64_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "dpo/core/check.hpp"
#include "dpo/core/layout.hpp"
#include "dpo/core/validate.hpp"
#include "dpo/cuda/block.cuh"
#include "dpo/cuda/kernels.cuh"
#include "dpo/cuda/status.cuh"

namespace dpo {
namespace cuda {

/// Run-time options of the CUDA entry points.
struct options {
  /// Compute the logged metrics (entropy, logits mean, token accuracy) in the forward pass:
  /// extra arithmetic per logit, no extra memory traffic.
  bool metrics = true;
  /// For packed views (cu_seqlens != null): the number of rows of the logits buffer. The
  /// host cannot read cu_seqlens, so this bounds the rows of a view (and sizes the
  /// workspace); the kernels check cu_seqlens against it. Ignored for padded views.
  std::int64_t num_rows = -1;
  /// The vocabulary-shard building blocks of dpo/cuda/shard.cuh only (the other entry points
  /// have a workspace and an error word of their own, and ignore it): the error word written
  /// by an earlier dpo::cuda::shard_check of the same view on the same stream
  /// (shard_error_word(workspace)). When it holds an error, the kernels do not read the view:
  /// the per-sequence sums are written as NaN and nothing else is written. Null: no check
  /// (a bad label poisons its row's record with NaN; cu_seqlens is the caller's contract).
  const device_error* error_word = nullptr;
};

namespace detail {

/// An argument error (cudaErrorInvalidValue) with a printf-style message.
template <class... Args>
status invalid(const char* fmt, Args... args) {
  return make_status(cudaErrorInvalidValue, fmt, args...);
}

/// The argument checks are the core's (dpo/core/check.hpp), returned as a status. The host
/// cannot read device data: packed views are bounded by options::num_rows, and the kernels
/// check labels and cu_seqlens. `pointers`: false in a size query (no pointers yet).
inline dpo::detail::check_policy policy(const options& opt, bool pointers) {
  return dpo::detail::cuda_policy(opt.num_rows, pointers);
}

/// cudaErrorInvalidValue with "dpo: " + msg, or success when msg is empty.
inline status to_status(const std::string& msg) {
  if (msg.empty()) return {};
  return invalid("dpo: %s", msg.c_str());
}

/// One view. Sets *cap to the rows the workspace holds for it: from the first sequence's
/// first row to the last one's end, gaps included (the per-row arrays are indexed by
/// row - row_begin(0)), or num_rows for a packed view.
template <class T, class L>
status check_view(const token_view<T, L>& v, const char* name, const options& opt,
                  std::int64_t* cap, bool pointers) {
  const dpo::detail::check_policy p = policy(opt, pointers);
  const status s = to_status(dpo::detail::check_view(v, name, p));
  *cap = s ? dpo::detail::rows_of(v, p).size() : 0;
  return s;
}

template <class T, class L>
status check_pairs(const pair_view<T, L>& v, const char* name, const options& opt,
                   std::int64_t cap[2], bool pointers) {
  const dpo::detail::check_policy p = policy(opt, pointers);
  const status s = to_status(dpo::detail::check_pairs(v, name, p));
  cap[0] = s ? dpo::detail::rows_of(v.chosen, p).size() : 0;
  cap[1] = s ? dpo::detail::rows_of(v.rejected, p).size() : 0;
  return s;
}

/// The gradient buffers: non-null, stride >= vocab, and either exactly the side's logits
/// (in place: same pointer and stride) or disjoint from every logits row that may be read.
template <class T, class L>
status check_grad(const pair_view<T, L>& p, const pair_grad_view<T>& g, const options& opt) {
  return to_status(dpo::detail::check_grad(p, g, policy(opt, true)));
}

/// ... nor any other input of the call (host code, addresses only): both sides' labels, mask
/// and cu_seqlens, and `extra` (the workspace bytes the call uses, grad_output, row state,
/// reference log-probs).
template <class T, class L>
status check_grad_inputs(const pair_view<T, L>& p, const pair_grad_view<T>& g, const options& opt,
                         std::initializer_list<dpo::detail::named_range> extra) {
  return to_status(
      dpo::detail::check_pair_grad_inputs(p, g, extra.begin(), static_cast<int>(extra.size()), policy(opt, true)));
}

/// The first `bytes` of the workspace as a named range (what a call writes or reads there;
/// compared, never read). Every backend file's aliasing checks use this one.
inline dpo::detail::named_range workspace_range(const void* workspace, std::size_t bytes) {
  const std::int64_t b = static_cast<std::int64_t>(bytes);
  return dpo::detail::range_of(static_cast<const unsigned char*>(workspace), 1, b, b, "workspace");
}

inline status check_workspace(void* workspace, std::size_t workspace_bytes, std::size_t needed) {
  if (workspace_bytes < needed)
    return invalid("dpo: workspace_bytes = %llu is too small: %llu needed", (unsigned long long)workspace_bytes,
                   (unsigned long long)needed);
  if (reinterpret_cast<std::uintptr_t>(workspace) % 16 != 0)
    return invalid("dpo: workspace is not 16-byte aligned");
  return {};
}

/// The two-phase workspace of a call whose arrays cover `cap` rows per side, `seqs`
/// sequences and `pairs` pairs. With workspace == nullptr: stores the size in
/// workspace_bytes, sets *size_only and carves nothing (the caller returns). Otherwise checks
/// the buffer's size and alignment and lays the arrays out in it (w).
inline status reserve(void* workspace, std::size_t& workspace_bytes, const std::int64_t cap[2],
                      std::int64_t seqs, std::int64_t pairs, ws_ptrs* w, bool* size_only) {
  const std::size_t needed = carve(0, cap, seqs, pairs, w);
  *size_only = workspace == nullptr;
  if (*size_only) {
    workspace_bytes = needed;
    return {};
  }
  const status s = check_workspace(workspace, workspace_bytes, needed);
  if (s) carve(reinterpret_cast<std::uintptr_t>(workspace), cap, seqs, pairs, w);
  return s;
}

/// Enqueues kernel<<<grid, block, 0, stream>>>(args...). Written as a call of the runtime's
/// cudaLaunchKernelEx (the same launch) so the test emulator (tests/cuda/emu) can run the
/// pipeline on a machine without a GPU.
template <class... Params, class... Args>
status launch(const char* what, void (*kernel)(Params...), unsigned grid, unsigned block,
              cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess)
    return make_status(e, "dpo: launch of %s failed: %s", what, cudaGetErrorString(e));
  return {};
}

/// Blocks of a persistent row kernel: enough to fill the device, at most one per row.
template <class Kernel>
status row_grid(Kernel kernel, int block, std::int64_t rows, int* grid) {
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0);
  if (e != cudaSuccess) return make_status(e, "dpo: device query failed: %s", cudaGetErrorString(e));
  const std::int64_t full = static_cast<std::int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(rows < full ? (rows > 0 ? rows : 1) : full);
  return {};
}

template <class T, class L>
views<T, L> make_views(const token_view<T, L>& a, const token_view<T, L>* b, const options& opt) {
  views<T, L> vs;
  vs.v[0] = a;
  vs.v[1] = b ? *b : a;
  if (!b) vs.v[1].num_seqs = 0;
  vs.num_sides = b ? 2 : 1;
  vs.num_rows = opt.num_rows;
  return vs;
}

/// check_kernel then rows_kernel: the one read of the logits of a forward pass.
/// after_reference: see check_kernel.
template <bool Metrics, bool Lse2 = false, class T, class L>
status run_rows(const views<T, L>& vs, const ws_ptrs& w, const std::int64_t cap[2],
                cudaStream_t stream, bool after_reference = false) {
  // The device query first: a failure must leave nothing enqueued.
  const auto kernel = rows_kernel<rows_block, Metrics, Lse2, T, L>;
  int grid = 1;
  status s = row_grid(kernel, rows_block, cap[0] + cap[1], &grid);
  if (!s) return s;
  s = launch("check_kernel", check_kernel<T, L>, 1, 256, stream, vs, w.h, after_reference);
  if (!s) return s;
  return launch("rows_kernel", kernel, grid, rows_block, stream, vs, w);
}

template <class T, class L>
status run_sequences(const views<T, L>& vs, const ws_ptrs& w, const sequence_params& p,
                     cudaStream_t stream) {
  const std::int64_t blocks = p.seqs * vs.num_sides;
  return launch("sequence_kernel", sequence_kernel<seq_block, T, L>, static_cast<unsigned>(blocks),
                seq_block, stream, vs, w, p);
}

template <bool Metrics = false, class T, class L>
status run_backward(const views<T, L>& vs, const ws_ptrs& w, const std::int64_t cap[2],
                    const pair_grad_view<T>& grad, const double* grad_output, std::int64_t pairs,
                    cudaStream_t stream) {
  backward_params<T> bp;
  bp.grad[0] = grad.chosen;
  bp.grad[1] = grad.rejected;
  bp.grad_stride[0] = grad.chosen_stride;
  bp.grad_stride[1] = grad.rejected_stride;
  bp.grad_output = grad_output;
  bp.pairs = pairs;
  const auto kernel = Metrics ? backward_metrics_kernel<rows_block, T, L>
                              : backward_kernel<rows_block, T, L>;
  int grid = 1;
  status s = row_grid(kernel, rows_block, cap[0] + cap[1], &grid);
  if (!s) return s;
  return launch(Metrics ? "backward_metrics_kernel" : "backward_kernel", kernel, grid,
                rows_block, stream, vs, w, bp);
}

/// Per-row state indexed by the logits buffer's row (forward_outputs::row_lse / row_coef,
/// dpo_backward_rows' inputs): both sides in one buffer, each on rows of its own, or their
/// row indices would collide (dpo::detail::check_row_state).
template <class T, class L>
status check_row_state(const pair_view<T, L>& policy, const char* what, const options& opt) {
  return to_status(dpo::detail::check_row_state(
      policy, what, "logits", "keep the state in the workspace and use dpo_backward",
      dpo::cuda::detail::policy(opt, true)));
}

/// Checks of dpo_forward's arguments shared with dpo_forward_backward: the row state, when
/// it is asked for.
template <class T, class L>
status check_row_state(const pair_view<T, L>& policy, const forward_outputs& out, const options& opt) {
  if (out.row_lse == nullptr && out.row_coef == nullptr) return {};
  return check_row_state(policy, "out.row_lse / out.row_coef", opt);
}

template <class T, class L>
status check_forward(const pair_view<T, L>& policy, const double* ref_chosen,
                     const double* ref_rejected, const loss_config& cfg, const options& opt,
                     std::int64_t cap[2], bool pointers) {
  status s = to_status(validate_config(cfg));
  if (!s) return s;
  s = check_pairs(policy, "logits", opt, cap, pointers);
  if (!s) return s;
  return to_status(dpo::detail::check_reference(cfg, ref_chosen, ref_rejected,
                                                detail::policy(opt, pointers)));
}

/// `late_metrics` (dpo_forward_backward, never with WPO weights): skip the token metrics,
/// which the backward's read computes instead; pair_kernel leaves them 0.
/// `after_reference`: enqueue_reference ran on this workspace just before (see check_kernel).
template <class T, class L>
status enqueue_forward(const pair_view<T, L>& policy, const double* ref_chosen,
                       const double* ref_rejected, const loss_config& cfg,
                       const forward_outputs& out, const options& opt, const ws_ptrs& w,
                       const std::int64_t cap[2], cudaStream_t stream, bool late_metrics = false,
                       bool after_reference = false) {
  const views<T, L> vs = make_views(policy.chosen, &policy.rejected, opt);
  const bool metrics = !late_metrics && (opt.metrics || cfg.use_weighting);
  const bool ar = after_reference;
  // lse(2z) costs a multiply-add per logit: only for WPO, whose weights need it.
  status s = !metrics ? run_rows<false>(vs, w, cap, stream, ar)
             : cfg.use_weighting ? run_rows<true, true>(vs, w, cap, stream, ar)
                                 : run_rows<true, false>(vs, w, cap, stream, ar);
  if (!s) return s;
  sequence_params sp{};
  sp.seqs = policy.num_pairs();
  sp.ld = cfg.ld_alpha != 1.0;
  sp.ld_alpha = cfg.ld_alpha;
  s = run_sequences(vs, w, sp, stream);
  if (!s) return s;
  pair_params pp;
  pp.cfg = cfg;
  pp.pairs = policy.num_pairs();
  pp.vocab = policy.chosen.vocab;
  pp.metrics = metrics;
  pp.weights = weights_from::wpo_sums;
  const bool ref = dpo::detail::needs_reference(cfg);
  pp.ref_chosen = ref ? ref_chosen : nullptr;
  pp.ref_rejected = ref ? ref_rejected : nullptr;
  pp.out = out;
  status s2 = launch("pair_kernel", pair_kernel<pair_block>, 1, pair_block, stream, w, pp);
  if (!s2 || (out.row_lse == nullptr && out.row_coef == nullptr)) return s2;
  const std::int64_t rows = cap[0] + cap[1];
  const int blocks = static_cast<int>(rows / 256 + 1 < 4096 ? rows / 256 + 1 : 4096);
  return launch("row_state_kernel", row_state_kernel<256, T, L>, blocks, 256, stream, vs, w,
                out.row_lse, out.row_coef);
}

/// dpo_forward_backward's launches after its checks (after_reference: see enqueue_forward).
template <class T, class L>
status enqueue_forward_backward(const pair_view<T, L>& policy, const double* ref_chosen,
                                const double* ref_rejected, const loss_config& cfg,
                                const forward_outputs& out, const pair_grad_view<T>& grad,
                                const options& opt, const ws_ptrs& w, const std::int64_t cap[2],
                                cudaStream_t stream, bool after_reference = false) {
  const std::int64_t P = policy.num_pairs();
  // WPO weights need the row terms in the forward (they scale the loss): keep them there.
  const bool late = !cfg.use_weighting;
  const bool late_metrics = late && opt.metrics && out.metrics != nullptr;
  status s = enqueue_forward(policy, ref_chosen, ref_rejected, cfg, out, opt, w, cap, stream,
                             late, after_reference);
  if (!s) return s;
  const views<T, L> vs = make_views(policy.chosen, &policy.rejected, opt);
  if (!late_metrics) return run_backward(vs, w, cap, grad, nullptr, P, stream);
  s = run_backward<true>(vs, w, cap, grad, nullptr, P, stream);
  if (!s) return s;
  sequence_params sp{};
  sp.seqs = P;
  sp.metrics_only = true;
  s = run_sequences(vs, w, sp, stream);
  if (!s) return s;
  return launch("metrics_kernel", metrics_kernel<pair_block>, 1, pair_block, stream, w, P,
                out.metrics);
}

/// The workspace of the reference-logits overloads: the larger of the reference pass's and
/// the policy pass's arrays at offset 0 (the reference pass runs first, the policy pass then
/// reuses the memory, and dpo_backward finds the forward state where dpo_forward leaves it),
/// then the 2P reference log-probs. The checks of check_forward (but for the reference
/// pointers) and those of the reference happen here, before anything is launched.
template <class T, class R, class L>
status reserve_reference(void* workspace, std::size_t& workspace_bytes,
                         const pair_view<T, L>& policy, const pair_view<R, L>& reference,
                         const loss_config& cfg, const options& opt, std::int64_t cap[2],
                         std::int64_t ref_cap[2], ws_ptrs* w, ws_ptrs* ref_w, double** ref_logps,
                         bool* size_only) {
  const bool pointers = workspace != nullptr;
  status s = to_status(validate_config(cfg));
  if (!s) return s;
  s = check_pairs(policy, "logits", opt, cap, pointers);
  if (!s) return s;
  s = check_pairs(reference, "ref_logits", opt, ref_cap, pointers);
  if (!s) return s;
  s = to_status(dpo::detail::check_reference_pairs(policy, reference));
  if (!s) return s;
  const std::int64_t P = policy.num_pairs();
  const std::size_t a = carve(0, cap, P, P, w);
  const std::size_t b = carve(0, ref_cap, P, P, ref_w);
  const std::size_t head = a > b ? a : b;  // a multiple of 256
  const std::size_t needed = head + static_cast<std::size_t>(2 * P) * sizeof(double);
  *size_only = !pointers;
  if (*size_only) {
    workspace_bytes = needed;
    return {};
  }
  s = check_workspace(workspace, workspace_bytes, needed);
  if (!s) return s;
  const auto base = reinterpret_cast<std::uintptr_t>(workspace);
  carve(base, cap, P, P, w);
  carve(base, ref_cap, P, P, ref_w);
  *ref_logps = reinterpret_cast<double*>(base + head);
  return {};
}

/// The reference pass of the reference-logits overloads: pair_logps over `reference` (LD-DPO
/// weighted as the policy) into ref_logps[0, P) chosen and [P, 2P) rejected. Its errors stay
/// in the error word for the policy pass's check_kernel (after_reference).
template <class R, class L>
status enqueue_reference(const pair_view<R, L>& reference, const loss_config& cfg,
                         const options& opt, const ws_ptrs& w, const std::int64_t cap[2],
                         double* ref_logps, cudaStream_t stream) {
  const views<R, L> vs = make_views(reference.chosen, &reference.rejected, opt);
  status s = run_rows<false>(vs, w, cap, stream);
  if (!s) return s;
  sequence_params sp{};
  sp.seqs = reference.num_pairs();
  sp.ld = cfg.ld_alpha != 1.0;
  sp.ld_alpha = cfg.ld_alpha;
  sp.out_logp[0] = ref_logps;
  sp.out_logp[1] = ref_logps + reference.num_pairs();
  return run_sequences(vs, w, sp, stream);
}

/// What the dpo_forward / dpo_forward_backward entry points lay out before they enqueue
/// anything: rows per side, the workspace arrays and, for the reference-logits overloads,
/// the reference pass's arrays and where it leaves the reference log-probs ([2P]).
struct forward_plan {
  std::int64_t cap[2] = {0, 0};
  std::int64_t ref_cap[2] = {0, 0};
  ws_ptrs w;
  ws_ptrs ref_w;
  double* ref = nullptr;
  std::size_t used = 0;  // the workspace bytes the call writes
  bool size_only = false;
};

/// The forward outputs (dpo::detail::forward_ranges) may overlap neither each other nor the
/// call's inputs: both sides' logits rows, labels, mask and cu_seqlens, the reference
/// log-probs or the reference view's arrays, options::error_word, the gradient buffers
/// (`grad`, may be null: dpo_forward) and the workspace's first `ws_bytes` (what the call
/// writes there). out.row_lse / out.row_coef span the logits buffer's rows up to the last
/// view row (rows_of: options::num_rows for packed views). Addresses only: host code.
template <class T, class L, class R>
status check_forward_outputs(const pair_view<T, L>& policy, const double* ref_chosen,
                             const double* ref_rejected, const pair_view<R, L>* reference,
                             const forward_outputs& out, const pair_grad_view<T>* grad,
                             const void* workspace, std::size_t ws_bytes, const options& opt) {
  using dpo::detail::named_range;
  using dpo::detail::range_of;
  const dpo::detail::check_policy p = dpo::cuda::detail::policy(opt, true);
  const std::int64_t P = policy.num_pairs();
  named_range ins[22];
  int n = 0;
  dpo::detail::view_ranges(policy.chosen, p, dpo::detail::pair_view_names[0], ins + n);
  n += 4;
  dpo::detail::view_ranges(policy.rejected, p, dpo::detail::pair_view_names[1], ins + n);
  n += 4;
  if (reference != nullptr) {
    dpo::detail::view_ranges(reference->chosen, p, dpo::detail::pair_view_names[2], ins + n);
    n += 4;
    dpo::detail::view_ranges(reference->rejected, p, dpo::detail::pair_view_names[3], ins + n);
    n += 4;
  } else {
    ins[n++] = range_of(ref_chosen, 1, P, P, "ref_chosen_logps");
    ins[n++] = range_of(ref_rejected, 1, P, P, "ref_rejected_logps");
  }
  ins[n++] = range_of(opt.error_word, 1, 1, 1, "options::error_word");
  if (grad != nullptr) {
    ins[n++] = {dpo::detail::row_bytes(grad->chosen, grad->chosen_stride, policy.chosen, p), "grad.chosen"};
    ins[n++] = {dpo::detail::row_bytes(grad->rejected, grad->rejected_stride, policy.rejected, p),
                "grad.rejected"};
  }
  const std::int64_t wb = static_cast<std::int64_t>(ws_bytes);
  ins[n++] = range_of(static_cast<const unsigned char*>(workspace), 1, wb, wb, "workspace");
  const std::int64_t rc = dpo::detail::rows_of(policy.chosen, p).end;
  const std::int64_t rr = dpo::detail::rows_of(policy.rejected, p).end;
  return to_status(dpo::detail::check_forward_outputs(out, P, rc > rr ? rc : rr, ins, n));
}

/// The entry points' prologue, as CUB's dispatch layer has one: every argument check (with
/// out's row state), then the two-phase workspace (size query, size and alignment check,
/// carve), then (with a workspace) the aliasing check of the forward outputs against each
/// other and the call's inputs (check_forward_outputs; `grad`: dpo_forward_backward's
/// gradient buffers, else null). `reference` null: reference log-probs (ref_chosen /
/// ref_rejected); else reference logits. Sets plan->size_only for a size query, which the
/// caller then returns.
template <class T, class L, class R>
status plan_forward(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& policy,
                    const double* ref_chosen, const double* ref_rejected,
                    const pair_view<R, L>* reference, const loss_config& cfg,
                    const forward_outputs& out, const options& opt, forward_plan* plan,
                    const pair_grad_view<T>* grad = nullptr) {
  const std::int64_t P = policy.num_pairs();
  status s;
  std::size_t used = 0;  // the workspace bytes the call writes
  if (reference != nullptr) {
    s = check_row_state(policy, out, opt);
    if (!s) return s;
    s = reserve_reference(workspace, workspace_bytes, policy, *reference, cfg, opt, plan->cap,
                          plan->ref_cap, &plan->w, &plan->ref_w, &plan->ref, &plan->size_only);
    if (!s || plan->size_only) return s;
    ws_ptrs scratch;
    const std::size_t a = carve(0, plan->cap, P, P, &scratch);
    const std::size_t b = carve(0, plan->ref_cap, P, P, &scratch);
    used = (a > b ? a : b) + static_cast<std::size_t>(2 * P) * sizeof(double);
  } else {
    s = check_forward(policy, ref_chosen, ref_rejected, cfg, opt, plan->cap, workspace != nullptr);
    if (!s) return s;
    s = check_row_state(policy, out, opt);
    if (!s) return s;
    s = reserve(workspace, workspace_bytes, plan->cap, P, P, &plan->w, &plan->size_only);
    if (!s || plan->size_only) return s;
    ws_ptrs scratch;
    used = carve(0, plan->cap, P, P, &scratch);
  }
  plan->used = used;
  return check_forward_outputs(policy, ref_chosen, ref_rejected, reference, out, grad, workspace, used, opt);
}

}  // namespace detail

/// Per-sequence log-probs (forward only, e.g. the reference model): one read of the logits,
/// with the per-row log-sum-exp that sequence_logps_backward reads.
///
/// `in`: a token_view of device pointers (padded, with or without gaps, or packed; for
/// packed set options::num_rows). Writes sums[s] (double, [num_seqs]) = sum of the
/// completion-token log-probs of sequence s (fp32 per row, fp64 for double logits, summed in
/// fp64) and counts[s] (int64, [num_seqs]) its completion-token count. Optional outputs
/// (null: not written), as dpo::cpu::sequence_logps:
///   token_logps[r - row_begin(0)]  the log-prob of row r (0 for non-completion rows); size
///                                  (num_seqs - 1) * seq_pitch() + seq_len, or
///                                  options::num_rows for packed views;
///   row_lse[r]                     the row's log-sum-exp (accumulation type, exact in
///                                  double; 0 for non-completion rows), indexed by the
///                                  logits buffer's row: row_end(num_seqs - 1) entries, or
///                                  options::num_rows for packed views.
/// Only rows of the view's sequences are written (not the gaps of a padded view, nor packed
/// rows outside every sequence). Deterministic. Does not write the logits.
template <class T, class L>
status sequence_logps(void* workspace, std::size_t& workspace_bytes, const token_view<T, L>& in,
                      double* sums, std::int64_t* counts, double* token_logps, double* row_lse,
                      const options& opt = {}, cudaStream_t stream = 0) {
  std::int64_t cap[2] = {0, 0};
  status s = detail::check_view(in, "logits", opt, &cap[0], workspace != nullptr);
  if (!s) return s;
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, cap, in.num_seqs, 0, &w, &size_only);
  if (!s || size_only) return s;
  if (in.num_seqs > 0 && (sums == nullptr || counts == nullptr))
    return detail::invalid("dpo: %s is null", sums == nullptr ? "sums" : "counts");
  {
    detail::ws_ptrs scratch;
    const dpo::detail::named_range ws = detail::workspace_range(workspace, detail::carve(0, cap, in.num_seqs, 0, &scratch));
    s = detail::to_status(dpo::detail::check_sequence_outputs(in, sums, counts, token_logps, row_lse, &ws, 1,
                                                              detail::policy(opt, true)));
    if (!s) return s;
  }
  const detail::views<T, L> vs = detail::make_views<T, L>(in, nullptr, opt);
  // No sequence: nothing to compute, but the error word still becomes this call's (clear),
  // or read_device_error would report whatever the workspace held.
  if (in.num_seqs == 0)
    return detail::launch("check_kernel", detail::check_kernel<T, L>, 1, 256, stream, vs, w.h, false);
  s = detail::run_rows<false>(vs, w, cap, stream);
  if (!s) return s;
  detail::sequence_params sp{};
  sp.seqs = in.num_seqs;
  sp.ld = false;
  sp.ld_alpha = 1.0;
  sp.out_logp[0] = sums;
  sp.out_count = counts;
  sp.token_logps = token_logps;
  sp.row_lse = row_lse;
  return detail::run_sequences(vs, w, sp, stream);
}

/// sequence_logps without row_lse.
template <class T, class L>
status sequence_logps(void* workspace, std::size_t& workspace_bytes, const token_view<T, L>& in,
                      double* sums, std::int64_t* counts, double* token_logps = nullptr,
                      const options& opt = {}, cudaStream_t stream = 0) {
  return sequence_logps(workspace, workspace_bytes, in, sums, counts, token_logps,
                        static_cast<double*>(nullptr), opt, stream);
}

/// The gradient of sum_s seq_grad[s] * sums[s] (sums of sequence_logps) with respect to the
/// logits, as dpo::cpu::sequence_logps_backward: row r of sequence s gets
/// seq_grad[s] * (onehot(y_r) - softmax(z_r)) on completion rows and exact zeros on the
/// sequence's other rows, rounded to T. Averaged log-probs are the caller's: pass
/// seq_grad[s] / max(counts[s], 1).
///
/// Device pointers: row_lse is sequence_logps's row_lse output (by buffer row; only
/// completion rows are read), seq_grad [num_seqs] doubles (so autograd needs no sync), grad
/// rows indexed as the logits, grad_stride >= vocab apart (columns [vocab, grad_stride) not
/// touched). Only rows of the view's sequences are written: gap rows of a padded view and
/// packed rows outside every sequence keep their contents. In place when grad == in.logits
/// and grad_stride == in.row_stride; any other overlap with the logits rows is rejected.
/// One read of the logits rows and one write. A label outside [0, vocab) or a bad
/// cu_seqlens is reported in the error word and nothing is written. The workspace only holds
/// the error word. Deterministic.
template <class T, class L>
status sequence_logps_backward(void* workspace, std::size_t& workspace_bytes,
                               const token_view<T, L>& in, const double* row_lse,
                               const double* seq_grad, T* grad, std::int64_t grad_stride,
                               const options& opt = {}, cudaStream_t stream = 0) {
  std::int64_t cap = 0;
  const bool pointers = workspace != nullptr;
  status s = detail::check_view(in, "logits", opt, &cap, pointers);
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_seq_grad(in, row_lse, seq_grad, grad, grad_stride,
                                                    detail::policy(opt, pointers)));
  if (!s) return s;
  const std::int64_t none[2] = {0, 0};
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, none, 0, 0, &w, &size_only);
  if (!s || size_only) return s;
  {
    // Nor may grad overlap the other inputs (addresses only).
    const dpo::detail::check_policy p = detail::policy(opt, true);
    detail::ws_ptrs scratch;
    const std::int64_t rows = dpo::detail::rows_of(in, p).end, n = in.num_seqs;
    dpo::detail::named_range ins[6];
    dpo::detail::view_index_ranges(in, p, dpo::detail::seq_view_names + 1, ins);
    ins[3] = dpo::detail::range_of(row_lse, 1, rows, rows, "row_lse");
    ins[4] = dpo::detail::range_of(seq_grad, 1, n, n, "seq_grad");
    ins[5] = detail::workspace_range(workspace, detail::carve(0, none, 0, 0, &scratch));
    s = detail::to_status(dpo::detail::check_grad_against(grad, grad_stride, in, "grad", ins, 6, p));
    if (!s) return s;
  }
  const detail::views<T, L> vs = detail::make_views<T, L>(in, nullptr, opt);
  // The device query first: a failure must leave nothing enqueued.
  const auto kernel = detail::backward_sequences_kernel<detail::rows_block, T, L>;
  int grid = 1;
  if (cap > 0) s = detail::row_grid(kernel, detail::rows_block, cap, &grid);
  if (!s) return s;
  // Also without rows: the error word becomes this call's (cu_seqlens checked, else clear).
  s = detail::launch("check_kernel", detail::check_kernel<T, L>, 1, 256, stream, vs, w.h, false);
  if (!s || cap == 0) return s;
  const int label_blocks = static_cast<int>(cap / 256 + 1 < 4096 ? cap / 256 + 1 : 4096);
  s = detail::launch("label_check_kernel", detail::label_check_kernel<256, T, L>, label_blocks,
                     256, stream, vs, w.h, std::int64_t{-1});
  if (!s) return s;
  return detail::launch("backward_sequences_kernel", kernel, grid, detail::rows_block, stream, vs,
                        w.h, row_lse, seq_grad, grad, grad_stride);
}

/// Sequence log-probs of both sides of a batch of pairs, LD-DPO weighted when ld_alpha < 1
/// (use it for the reference model so policy and reference are weighted alike). Writes
/// chosen[i], rejected[i] (device, [P]). One read of the logits; deterministic.
template <class T, class L>
status pair_logps(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& in,
                  double ld_alpha, double* chosen, double* rejected, const options& opt = {},
                  cudaStream_t stream = 0) {
  std::int64_t cap[2] = {0, 0};
  status s = detail::check_pairs(in, "logits", opt, cap, workspace != nullptr);
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_unit(ld_alpha, "ld_alpha"));
  if (!s) return s;
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, cap, in.num_pairs(), in.num_pairs(), &w,
                      &size_only);
  if (!s || size_only) return s;
  if (chosen == nullptr || rejected == nullptr)
    return detail::invalid("dpo: %s is null", chosen == nullptr ? "chosen" : "rejected");
  {
    detail::ws_ptrs scratch;
    const dpo::detail::named_range ws =
        detail::workspace_range(workspace, detail::carve(0, cap, in.num_pairs(), in.num_pairs(), &scratch));
    s = detail::to_status(dpo::detail::check_pair_logps_outputs(in, chosen, rejected, &ws, 1, detail::policy(opt, true)));
    if (!s) return s;
  }
  const detail::views<T, L> vs = detail::make_views(in.chosen, &in.rejected, opt);
  s = detail::run_rows<false>(vs, w, cap, stream);
  if (!s) return s;
  detail::sequence_params sp{};
  sp.seqs = in.num_pairs();
  sp.ld = ld_alpha != 1.0;
  sp.ld_alpha = ld_alpha;
  sp.out_logp[0] = chosen;
  sp.out_logp[1] = rejected;
  return detail::run_sequences(vs, w, sp, stream);
}

/// The fused forward pass: per-token log-probs of the policy logits, their sequence sums,
/// the pair losses against the reference log-probs (device [P] each; null for
/// reference-free losses) and every metric, with one read of the logits. Results go to
/// `out` (device pointers, each optional); the workspace keeps what dpo_backward needs, so
/// pass the same workspace, views and options to dpo_backward. Deterministic.
template <class T, class L>
status dpo_forward(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& policy,
                   const double* ref_chosen, const double* ref_rejected, const loss_config& cfg,
                   const forward_outputs& out, const options& opt = {}, cudaStream_t stream = 0) {
  detail::forward_plan plan;
  const status s = detail::plan_forward<T, L, T>(workspace, workspace_bytes, policy, ref_chosen,
                                                 ref_rejected, nullptr, cfg, out, opt, &plan);
  if (!s || plan.size_only) return s;
  return detail::enqueue_forward(policy, ref_chosen, ref_rejected, cfg, out, opt, plan.w, plan.cap,
                                 stream);
}

/// The pair loss's sequence-level inputs (see dpo/core/layout.hpp).
using dpo::pair_logps_in;


/// The pair-level loss from sequence log-probs, on the device: loss, per-pair losses,
/// rewards and dL/dpi in `out` (the logits metrics stay 0), as dpo::cpu::dpo_loss. NLL
/// terms (sft, cpo, orpo) take NLL(chosen) = -sum(chosen_logps) / sum(chosen_tokens). The
/// token counts are device memory and not checked (the CPU refuses negative or non-finite
/// ones; see pair_logps_in). Deterministic; O(P) work (O(P^2 / 256) per thread for aot's
/// ranks), one block.
inline status dpo_loss(void* workspace, std::size_t& workspace_bytes, const pair_logps_in& in,
                       const loss_config& cfg, const forward_outputs& out,
                       cudaStream_t stream = 0) {
  status s = detail::to_status(validate_config(cfg));
  if (!s) return s;
  s = detail::to_status(dpo::detail::check_logps_in(
      in, cfg, dpo::detail::cuda_policy(-1, workspace != nullptr)));
  if (!s) return s;
  const std::int64_t P = in.num_pairs;
  const std::int64_t cap[2] = {0, 0};
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, cap, P, P, &w, &size_only);
  if (!s || size_only) return s;
  {
    // Outputs on each other, the workspace and the reference log-probs (read where they
    // are), as dpo::cpu::dpo_loss: the policy's inputs are copied into the workspace first
    // (out.chosen_logps may be in.chosen_logps itself).
    detail::ws_ptrs scratch;
    const std::int64_t used = static_cast<std::int64_t>(detail::carve(0, cap, P, P, &scratch));
    const dpo::detail::named_range ins[3] = {
        dpo::detail::range_of(static_cast<const unsigned char*>(workspace), 1, used, used, "workspace"),
        dpo::detail::range_of(in.ref_chosen_logps, 1, P, P, "ref_chosen_logps"),
        dpo::detail::range_of(in.ref_rejected_logps, 1, P, P, "ref_rejected_logps")};
    s = detail::to_status(dpo::detail::check_forward_outputs(out, P, 0, ins, 3));
    if (!s) return s;
  }
  const detail::loss_inputs li{in.chosen_logps, in.rejected_logps, in.chosen_tokens,
                               in.rejected_tokens, in.weights};
  const int blocks = static_cast<int>(P / 256 + 1 < 1024 ? P / 256 + 1 : 1024);
  s = detail::launch("loss_inputs_kernel", detail::loss_inputs_kernel<256>, blocks, 256, stream, w,
                     li, P);
  if (!s) return s;
  detail::pair_params pp;
  pp.cfg = cfg;
  pp.pairs = P;
  pp.vocab = 0;
  pp.metrics = false;
  pp.weights = in.weights != nullptr ? detail::weights_from::workspace : detail::weights_from::ones;
  pp.ref_chosen = in.ref_chosen_logps;
  pp.ref_rejected = in.ref_rejected_logps;
  pp.out = out;
  return detail::launch("pair_kernel", detail::pair_kernel<detail::pair_block>, 1,
                        detail::pair_block, stream, w, pp);
}

/// The gradient of grad_output * loss with respect to the policy logits, from the state a
/// dpo_forward with the same views, options and workspace left there. grad_output is a
/// device scalar (null means 1), so autograd needs no sync. Writes `grad` (dtype T, one
/// buffer per side, rows indexed as the side's logits; columns [vocab, stride) untouched).
/// In place when grad points at the logits with the same stride (the logits are then
/// overwritten); any other overlap is rejected. One read of the logits, one write. Masked
/// rows get exact zeros. If the workspace holds no matching forward state, nothing is
/// written and the error word says so. Deterministic.
template <class T, class L>
status dpo_backward(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& policy,
                    const pair_grad_view<T>& grad, const double* grad_output = nullptr,
                    const options& opt = {}, cudaStream_t stream = 0) {
  std::int64_t cap[2] = {0, 0};
  status s = detail::check_pairs(policy, "logits", opt, cap, workspace != nullptr);
  if (!s) return s;
  detail::ws_ptrs w;
  const std::int64_t P = policy.num_pairs();
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, cap, P, P, &w, &size_only);
  if (!s || size_only) return s;
  s = detail::check_grad(policy, grad, opt);
  if (!s) return s;
  {
    detail::ws_ptrs scratch;  // the forward state it reads
    s = detail::check_grad_inputs(policy, grad, opt,
                                  {detail::workspace_range(workspace, detail::carve(0, cap, P, P, &scratch)),
                                   dpo::detail::range_of(grad_output, 1, 1, 1, "grad_output")});
    if (!s) return s;
  }
  const detail::views<T, L> vs = detail::make_views(policy.chosen, &policy.rejected, opt);
  return detail::run_backward(vs, w, cap, grad, grad_output, P, stream);
}

/// The gradient of grad_output * loss from per-row state the caller kept
/// (forward_outputs::row_lse and row_coef of a dpo_forward: device arrays indexed by the
/// logits' row), so nothing has to stay in a workspace between forward and backward. Same
/// writes, aliasing rules and determinism as dpo_backward; rows whose label is masked get
/// zeros. The workspace only holds the error word (cu_seqlens is checked again).
template <class T, class L>
status dpo_backward_rows(void* workspace, std::size_t& workspace_bytes,
                         const pair_view<T, L>& policy, const double* row_lse,
                         const double* row_coef, const pair_grad_view<T>& grad,
                         const double* grad_output = nullptr, const options& opt = {},
                         cudaStream_t stream = 0) {
  std::int64_t cap[2] = {0, 0};
  status s = detail::check_pairs(policy, "logits", opt, cap, workspace != nullptr);
  if (!s) return s;
  const std::int64_t none[2] = {0, 0};
  detail::ws_ptrs w;
  bool size_only = false;
  s = detail::reserve(workspace, workspace_bytes, none, 0, 0, &w, &size_only);
  if (!s || size_only) return s;
  s = detail::check_grad(policy, grad, opt);
  if (!s) return s;
  s = detail::check_row_state(policy, "row_lse / row_coef", opt);
  if (!s) return s;
  // Read only on the views' rows: without any (T = 0) they may be null, an empty tensor's pointer.
  const bool rows = cap[0] + cap[1] > 0;
  if (rows && (row_lse == nullptr || row_coef == nullptr))
    return detail::invalid("dpo: %s is null", row_lse == nullptr ? "row_lse" : "row_coef");
  {
    const dpo::detail::check_policy p = detail::policy(opt, true);
    const std::int64_t rc = dpo::detail::rows_of(policy.chosen, p).end, rr = dpo::detail::rows_of(policy.rejected, p).end;
    const std::int64_t n = rc > rr ? rc : rr;
    detail::ws_ptrs scratch;
    s = detail::check_grad_inputs(policy, grad, opt,
                                  {dpo::detail::range_of(row_lse, 1, n, n, "row_lse"),
                                   dpo::detail::range_of(row_coef, 1, n, n, "row_coef"),
                                   detail::workspace_range(workspace, detail::carve(0, none, 0, 0, &scratch)),
                                   dpo::detail::range_of(grad_output, 1, 1, 1, "grad_output")});
    if (!s) return s;
  }
  const detail::views<T, L> vs = detail::make_views(policy.chosen, &policy.rejected, opt);
  const auto kernel = detail::backward_rows_kernel<detail::rows_block, T, L>;
  int grid = 1;
  if (rows) s = detail::row_grid(kernel, detail::rows_block, cap[0] + cap[1], &grid);
  if (!s) return s;
  s = detail::launch("check_kernel", detail::check_kernel<T, L>, 1, 256, stream, vs, w.h, false);
  if (!s || !rows) return s;
  detail::backward_params<T> bp;
  bp.grad[0] = grad.chosen;
  bp.grad[1] = grad.rejected;
  bp.grad_stride[0] = grad.chosen_stride;
  bp.grad_stride[1] = grad.rejected_stride;
  bp.grad_output = grad_output;
  bp.pairs = policy.num_pairs();
  return detail::launch("backward_rows_kernel", kernel, grid, detail::rows_block, stream, vs, w,
                        bp, row_lse, row_coef);
}

/// dpo_forward then dpo_backward (grad_output 1): two reads and one write of the logits,
/// with the same results. One difference in where the work happens: without WPO weights
/// the token metrics (entropy, logit means, token accuracy) come from the backward's read
/// (block_row_grad_metrics) instead of the forward's, which leaves the forward the
/// reference pass's cheap row loop; they are computed only when out.metrics is set and
/// options::metrics is on. The entropy then agrees with dpo_forward's to rounding, the other
/// metrics bitwise (same alignment of logits and gradient rows).
template <class T, class L>
status dpo_forward_backward(void* workspace, std::size_t& workspace_bytes,
                            const pair_view<T, L>& policy, const double* ref_chosen,
                            const double* ref_rejected, const loss_config& cfg,
                            const forward_outputs& out, const pair_grad_view<T>& grad,
                            const options& opt = {}, cudaStream_t stream = 0) {
  // Every check before anything is launched.
  detail::forward_plan plan;
  status s = detail::plan_forward<T, L, T>(workspace, workspace_bytes, policy, ref_chosen,
                                           ref_rejected, nullptr, cfg, out, opt, &plan, &grad);
  if (!s || plan.size_only) return s;
  s = detail::check_grad(policy, grad, opt);
  if (!s) return s;
  const std::int64_t P = policy.num_pairs();
  s = detail::check_grad_inputs(policy, grad, opt,
                                {detail::workspace_range(workspace, plan.used),
                                 dpo::detail::range_of(ref_chosen, 1, P, P, "ref_chosen_logps"),
                                 dpo::detail::range_of(ref_rejected, 1, P, P, "ref_rejected_logps")});
  if (!s) return s;
  return detail::enqueue_forward_backward(policy, ref_chosen, ref_rejected, cfg, out, grad, opt,
                                          plan.w, plan.cap, stream);
}

/// dpo_forward with reference logits instead of reference log-probs, as the CPU overload:
/// pair_logps over `reference` (device pointers; same pair layout as `policy`, LD-DPO
/// weighted alike with cfg.ld_alpha) into the workspace, then dpo_forward. One read of each
/// logits buffer; nothing else to allocate or synchronize. The workspace is larger than
/// dpo_forward's (it also holds the reference log-probs) and keeps the same forward state:
/// pass it to dpo_backward as for dpo_forward. The reference logits may be any buffer, the
/// policy's included, in its own element type R (e.g. fp32 reference logits for a bf16
/// policy, read as they are); `opt` applies to both views (packed views: options::num_rows
/// bounds both buffers). Device-data errors of the reference (a label outside [0, vocab), a bad
/// cu_seqlens) are reported in the error word with sides 2 (ref_logits.chosen) and
/// 3 (ref_logits.rejected), and then nothing is written.
template <class T, class R, class L>
status dpo_forward(void* workspace, std::size_t& workspace_bytes, const pair_view<T, L>& policy,
                   const pair_view<R, L>& reference, const loss_config& cfg,
                   const forward_outputs& out, const options& opt = {}, cudaStream_t stream = 0) {
  detail::forward_plan plan;
  status s = detail::plan_forward(workspace, workspace_bytes, policy, nullptr, nullptr, &reference,
                                  cfg, out, opt, &plan);
  if (!s || plan.size_only) return s;
  s = detail::enqueue_reference(reference, cfg, opt, plan.ref_w, plan.ref_cap, plan.ref, stream);
  if (!s) return s;
  return detail::enqueue_forward(policy, plan.ref, plan.ref + policy.num_pairs(), cfg, out, opt,
                                 plan.w, plan.cap, stream, false, true);
}

/// dpo_forward_backward with reference logits instead of reference log-probs: the reference
/// pass of the reference-logits dpo_forward, then dpo_forward_backward. Same workspace,
/// results and error reporting as that dpo_forward followed by dpo_backward.
template <class T, class R, class L>
status dpo_forward_backward(void* workspace, std::size_t& workspace_bytes,
                            const pair_view<T, L>& policy, const pair_view<R, L>& reference,
                            const loss_config& cfg, const forward_outputs& out,
                            const pair_grad_view<T>& grad, const options& opt = {},
                            cudaStream_t stream = 0) {
  detail::forward_plan plan;
  status s = detail::plan_forward(workspace, workspace_bytes, policy, nullptr, nullptr, &reference,
                                  cfg, out, opt, &plan, &grad);
  if (!s || plan.size_only) return s;
  s = detail::check_grad(policy, grad, opt);
  if (!s) return s;
  // (The gradient may be the policy's logits in place, which may be the reference's too.)
  s = detail::check_grad_inputs(policy, grad, opt, {detail::workspace_range(workspace, plan.used)});
  if (!s) return s;
  s = detail::enqueue_reference(reference, cfg, opt, plan.ref_w, plan.ref_cap, plan.ref, stream);
  if (!s) return s;
  return detail::enqueue_forward_backward(policy, plan.ref, plan.ref + policy.num_pairs(), cfg, out,
                                          grad, opt, plan.w, plan.cap, stream, true);
}

}  // namespace cuda
}  // namespace dpo
