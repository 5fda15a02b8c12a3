// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the vocabulary-shard tests of the logits path: each call of
// dpo/cuda/shard.cuh on the caller's device pointers, its views read with CUDA's element
// type, and the device memory the Catch2 tests (g++, test_cuda_shard.cpp) move their data
// through. Built by nvcc for a GPU and by the host compiler against the emulator
// (emu/shard_harness.cpp): the same source.
#include <dpo/cuda/shard.cuh>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "shard_harness.hpp"

namespace dpo_cuda_test {
namespace {

/// CUDA's element type of a harness logits type (the same bits).
template <class T>
struct device_of {
  using type = T;
};
template <>
struct device_of<bf16_bits> {
  using type = __nv_bfloat16;
};
template <>
struct device_of<f16_bits> {
  using type = __half;
};
template <class T>
using device_t = typename device_of<T>::type;

shard_status to_host(const dpo::cuda::status& s) { return {static_cast<int>(s.code), s.ok() ? "" : s.message}; }

dpo::cuda::options to_device(const shard_options& o) {
  dpo::cuda::options d;
  d.metrics = o.metrics;
  d.num_rows = o.num_rows;
  d.error_word = static_cast<const dpo::cuda::device_error*>(o.error_word);
  return d;
}

}  // namespace

void* device_alloc(std::size_t bytes) {
  void* p = nullptr;
  DPO_CK(cudaMalloc(&p, bytes));
  return p;
}
void device_free(void* p) {
  if (p) cudaFree(p);  // from destructors: no throw
}
void copy_to_device(void* dst, const void* src, std::size_t bytes) {
  if (bytes > 0) DPO_CK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void copy_to_host(void* dst, const void* src, std::size_t bytes) {
  if (bytes > 0) DPO_CK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const tokens<T>& v,
                         const dpo::vocab_shard& sh, const shard_options& opt) {
  return to_host(dpo::cuda::shard_check(workspace, workspace_bytes, retype<device_t<T>>(v), sh, to_device(opt)));
}

template <class T>
shard_status shard_check(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                         const dpo::vocab_shard& sh, const shard_options& opt) {
  return to_host(dpo::cuda::shard_check(workspace, workspace_bytes, retype<device_t<T>>(p), sh, to_device(opt)));
}

const void* shard_error_word(const void* workspace) { return dpo::cuda::shard_error_word(workspace); }

shard_status read_error(const void* workspace) { return to_host(dpo::cuda::read_device_error(workspace)); }

template <class T>
shard_status shard_partials(const tokens<T>& v, const dpo::vocab_shard& sh, double* records, double* row_max,
                            const shard_options& opt) {
  return to_host(dpo::cuda::shard_partials(retype<device_t<T>>(v), sh, records, row_max, to_device(opt)));
}

shard_status shard_rebase(std::int64_t begin, std::int64_t end, const double* row_max, double* records) {
  return to_host(dpo::cuda::shard_rebase(begin, end, row_max, records));
}

template <class T>
shard_status shard_row_values(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                              const double* records, const row_outputs& out, const shard_options& opt) {
  const dpo::cuda::detail::shard_row_outputs o{out[0], out[1], out[2], out[3], out[4], out[5]};
  return to_host(dpo::cuda::shard_row_values(retype<device_t<T>>(v), sh, row_max, records, o, to_device(opt)));
}

template <class T>
shard_status shard_backward_rows(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                 const double* records, const double* row_coef, double grad_output, T* grad,
                                 std::int64_t grad_stride, const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward_rows(retype<device_t<T>>(v), sh, row_max, records, row_coef, grad_output,
                                                reinterpret_cast<device_t<T>*>(grad), grad_stride, to_device(opt)));
}

template <class T>
shard_status shard_sequence_partials(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                     const double* records, double* seq, const shard_options& opt) {
  return to_host(dpo::cuda::shard_sequence_partials(retype<device_t<T>>(v), sh, row_max, records, seq, to_device(opt)));
}

template <class T>
shard_status shard_backward_sequences(const tokens<T>& v, const dpo::vocab_shard& sh, const double* row_max,
                                      const double* records, const double* seq_grad, double nll_token_grad,
                                      std::int64_t nll_seqs, double grad_output, T* grad, std::int64_t grad_stride,
                                      const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward_sequences(retype<device_t<T>>(v), sh, row_max, records, seq_grad,
                                                     nll_token_grad, nll_seqs, grad_output,
                                                     reinterpret_cast<device_t<T>*>(grad), grad_stride,
                                                     to_device(opt)));
}

template <class T>
shard_status shard_pair_partials(const pairs<T>& p, const dpo::vocab_shard& sh, const double* chosen_max,
                                 const double* chosen_records, const double* rejected_max,
                                 const double* rejected_records, double ld_alpha, double* seq,
                                 const shard_options& opt) {
  return to_host(dpo::cuda::shard_pair_partials(retype<device_t<T>>(p), sh, chosen_max, chosen_records, rejected_max,
                                                rejected_records, ld_alpha, seq, to_device(opt)));
}

shard_status shard_pair_stage(void* workspace, std::size_t& workspace_bytes, std::int64_t P, const double* seq_totals,
                              const double* ref_chosen, const double* ref_rejected, const dpo::loss_config& cfg,
                              bool metrics, const dpo::forward_outputs& out, double* seq_grad) {
  return to_host(dpo::cuda::shard_pair_stage(workspace, workspace_bytes, P, seq_totals, ref_chosen, ref_rejected, cfg,
                                             metrics, out, seq_grad));
}

template <class T>
shard_status shard_backward(void* workspace, std::size_t& workspace_bytes, const pairs<T>& p,
                            const dpo::vocab_shard& sh, const double* chosen_max, const double* chosen_records,
                            const double* rejected_max, const double* rejected_records, const double* seq_grad,
                            const double* nll_token_grad, double ld_alpha, const dpo::pair_grad_view<T>& grad,
                            const double* grad_output, const shard_options& opt) {
  return to_host(dpo::cuda::shard_backward(workspace, workspace_bytes, retype<device_t<T>>(p), sh, chosen_max,
                                           chosen_records, rejected_max, rejected_records, seq_grad, nll_token_grad,
                                           ld_alpha, retype<device_t<T>>(grad), grad_output, to_device(opt)));
}

const char* const shard_alias_names[shard_alias_cases] = {
    "records overlaps row_max",                    // 0 shard_partials: row_max == records
    "records overlaps shard.logits",               // 1 shard_partials: records on logits row 1
    "records overlaps row_max",                    // 2 shard_rebase: row_max inside the records
    "begin = -1 is invalid",                       // 3 shard_rebase: a negative begin
    "out.logp overlaps records",                   // 4 shard_row_values: out.logp on the records
    "seq overlaps records",                        // 5 shard_sequence_partials: seq == records
    "seq overlaps chosen_max",                     // 6 shard_pair_partials: seq == chosen_max
    "grad overlaps row_max",                       // 7 shard_backward_rows: grad on row_max
    "workspace overlaps chosen_records",           // 8 shard_backward: workspace on the records
    "seq_grad overlaps out.losses",                // 9 shard_pair_stage: out.losses == seq_grad
    "seq_grad overlaps seq_totals",                // 10 shard_pair_stage: seq_grad in the totals
    "grad overlaps seq_grad",                      // 11 shard_backward_sequences: seq_grad in grad
    "grad.chosen overlaps chosen_records",         // 12 shard_backward: grad.chosen on the records
    "workspace overlaps shard.labels",             // 13 shard_check: workspace on the labels
    "out.losses overlaps out.chosen_rewards"};     // 14 shard_pair_stage: two forward outputs

std::string shard_alias_error(int which, bool* written) {
  using I = std::int64_t;
  namespace dc = dpo::cuda;
  const I P = 2, L = 3, R = 2 * P * L, V = 8, F = dpo::shard_fields, SF = dpo::seq_fields;
  const dpo::vocab_shard sh = dpo::whole_vocab(V);
  // One arena of doubles: logits [R, V], records [R, F], row_max [R], seq [SF, 2P],
  // seq_grad [2P], row_coef [R], six row outputs [R], grad [R, V], a workspace (16-aligned).
  const I o_logits = 0, o_rec = o_logits + R * V, o_max = o_rec + R * F, o_seq = o_max + R,
          o_sg = o_seq + SF * 2 * P, o_coef = o_sg + 2 * P, o_out = o_coef + R, o_grad = o_out + 6 * R,
          o_ws = (o_grad + R * V + 1) / 2 * 2, ws_doubles = 1024, total = o_ws + ws_doubles;
  // The labels' buffer has room for shard_check's header (case 13 puts the workspace there).
  const std::size_t label_bytes = 512;
  dev_buf buf(total * sizeof(double)), dy(label_bytes);
  dy.fill(0);
  std::vector<double> start(total, 0.0);
  for (I i = 0; i < R * V; ++i) start[o_logits + i] = std::sin(0.7 * i + 0.3) * 3.0;
  for (I i = 0; i < 2 * P; ++i) start[o_sg + i] = 0.1 * (i + 1) * (i % 2 ? -1 : 1);
  for (I i = 0; i < R; ++i) start[o_coef + i] = 0.7;
  // A gradient buffer that is not zero: case 11 reads its seq_grad there (zeros would write
  // zeros, no change to see).
  for (I i = 0; i < R * V; ++i) start[o_grad + i] = 0.25;
  buf.put(start.data(), total * sizeof(double));
  std::vector<I> labels(R);
  for (I i = 0; i < R; ++i) labels[i] = (i * 5 + 1) % V;
  labels[0] = -100;
  dy.put(labels.data(), R * sizeof(I));
  double* const b = buf.as<double>();
  double *logits = b + o_logits, *rec = b + o_rec, *mx = b + o_max, *seq = b + o_seq, *sg = b + o_sg,
         *coef = b + o_coef, *out = b + o_out, *grad = b + o_grad;
  void* ws = b + o_ws;
  const auto must = [](const dc::status& s) {
    if (!s.ok()) throw std::runtime_error(std::string("shard_alias_error setup: ") + s.message);
  };
  dpo::token_view<double, I> v;
  v.logits = logits;
  v.labels = dy.as<I>();
  v.vocab = V;
  v.row_stride = V;
  v.num_seqs = 2 * P;
  v.seq_len = L;
  const dpo::pair_view<double, I> pv = dpo::padded_pairs<double, I>(logits, dy.as<I>(), 2 * P, L, V, V);
  // Valid state: combined records, maxima and the pairs' totals.
  must(dc::shard_partials(v, sh, rec, mx));
  must(dc::shard_rebase(0, R, mx, rec));
  must(dc::shard_pair_partials(pv, sh, mx, rec, mx, rec, 1.0, seq));
  DPO_CK(cudaDeviceSynchronize());
  // Bytes, not doubles: NaN == NaN is false.
  const std::vector<unsigned char> before = buf.get<unsigned char>(total * sizeof(double)),
                                   labels_before = dy.get<unsigned char>(label_bytes);
  dpo::loss_config cfg;
  cfg.reference_free = true;
  dc::status s;
  std::size_t bytes = 0;
  dc::detail::shard_row_outputs o;
  o.logp = out;
  o.lse = out + R;
  dpo::forward_outputs fo;
  fo.losses = out;
  switch (which) {
    case 0: s = dc::shard_partials(v, sh, rec, rec); break;
    case 1: s = dc::shard_partials(v, sh, logits + V, mx); break;
    case 2: s = dc::shard_rebase(0, R, rec + 8, rec); break;
    case 3: s = dc::shard_rebase(-1, R, mx, rec); break;
    case 4:
      o.logp = rec + 3 * F;
      s = dc::shard_row_values(v, sh, mx, rec, o);
      break;
    case 5: s = dc::shard_sequence_partials(v, sh, mx, rec, rec); break;
    case 6: s = dc::shard_pair_partials(pv, sh, mx, rec, mx, rec, 1.0, mx); break;
    case 7: s = dc::shard_backward_rows(v, sh, mx, rec, coef, 1.0, mx, V); break;
    case 8:
    case 12: {
      must(dc::shard_backward(nullptr, bytes, pv, sh, mx, rec, mx, rec, sg, nullptr, 1.0,
                              dpo::pair_grad_view<double>{grad, V, grad, V}));
      const bool on_records = which == 8;
      const dpo::pair_grad_view<double> g{on_records ? grad : rec, V, grad, V};
      s = dc::shard_backward(on_records ? static_cast<void*>(rec) : ws, bytes, pv, sh, mx, rec, mx, rec, sg, nullptr,
                             1.0, g);
      break;
    }
    case 9:
    case 10:
    case 14:
      must(dc::shard_pair_stage(nullptr, bytes, P, seq, nullptr, nullptr, cfg, true, {}, nullptr));
      if (bytes > ws_doubles * sizeof(double)) throw std::runtime_error("shard_alias_error: workspace too small");
      if (which == 9) fo.losses = sg;
      if (which == 14) fo.chosen_rewards = fo.losses;
      s = dc::shard_pair_stage(ws, bytes, P, seq, nullptr, nullptr, cfg, true, fo, which == 10 ? seq + 2 * P : sg);
      break;
    case 11: s = dc::shard_backward_sequences(v, sh, mx, rec, grad + 5, 0.0, 0, 1.0, grad, V); break;
    default: {
      must(dc::shard_check(nullptr, bytes, v, sh));
      s = dc::shard_check(dy.p, bytes, v, sh);
    }
  }
  DPO_CK(cudaDeviceSynchronize());
  *written = buf.get<unsigned char>(total * sizeof(double)) != before ||
             dy.get<unsigned char>(label_bytes) != labels_before;
  return s.ok() ? std::string() : std::string(s.message);
}

#define DPO_SHARD_HARNESS(T)                                                                                          \
  template shard_status shard_check<T>(void*, std::size_t&, const tokens<T>&, const dpo::vocab_shard&,              \
                                       const shard_options&);                                                        \
  template shard_status shard_check<T>(void*, std::size_t&, const pairs<T>&, const dpo::vocab_shard&,               \
                                       const shard_options&);                                                        \
  template shard_status shard_partials<T>(const tokens<T>&, const dpo::vocab_shard&, double*, double*,              \
                                          const shard_options&);                                                     \
  template shard_status shard_row_values<T>(const tokens<T>&, const dpo::vocab_shard&, const double*, const double*, \
                                            const row_outputs&, const shard_options&);                               \
  template shard_status shard_backward_rows<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,            \
                                               const double*, const double*, double, T*, std::int64_t,              \
                                               const shard_options&);                                                \
  template shard_status shard_sequence_partials<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,        \
                                                   const double*, double*, const shard_options&);                    \
  template shard_status shard_backward_sequences<T>(const tokens<T>&, const dpo::vocab_shard&, const double*,       \
                                                    const double*, const double*, double, std::int64_t, double, T*, \
                                                    std::int64_t, const shard_options&);                             \
  template shard_status shard_pair_partials<T>(const pairs<T>&, const dpo::vocab_shard&, const double*,             \
                                               const double*, const double*, const double*, double, double*,        \
                                               const shard_options&);                                                \
  template shard_status shard_backward<T>(void*, std::size_t&, const pairs<T>&, const dpo::vocab_shard&,           \
                                          const double*, const double*, const double*, const double*,               \
                                          const double*, const double*, double, const dpo::pair_grad_view<T>&,      \
                                          const double*, const shard_options&);
DPO_SHARD_HARNESS(float)
DPO_SHARD_HARNESS(double)
DPO_SHARD_HARNESS(bf16_bits)
DPO_SHARD_HARNESS(f16_bits)
#undef DPO_SHARD_HARNESS

}  // namespace dpo_cuda_test
