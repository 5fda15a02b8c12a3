// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the tests: uploads a case, runs the dpo::cuda API on it and copies every
// result back. The Catch2 tests (g++) compare the results with dpo::cpu.
#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <dpo/cuda/dpo.cuh>

#include "device_buffer.hpp"
#include "harness.hpp"

namespace dpo_cuda_test {
namespace {

template <class U>
void upload(dev_buf& d, const std::vector<U>& h) {
  if (!h.empty()) DPO_CK(cudaMemcpy(d.p, h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice));
}

template <class U>
std::vector<U> download(const U* d, std::size_t n) {
  std::vector<U> h(n);
  if (n > 0) DPO_CK(cudaMemcpy(h.data(), d, n * sizeof(U), cudaMemcpyDeviceToHost));
  return h;
}

template <class L>
struct label_type {};

/// A case's logits, labels (as L), mask and cu_seqlens, uploaded.
struct device_case {
  dev_buf logits, labels, mask, cu;
  template <class L>
  device_case(const case_in& in, label_type<L>)
      : logits(in.logits.size()),
        labels(in.labels.size() * sizeof(L)),
        mask(in.mask.size()),
        cu(in.cu_seqlens.size() * sizeof(std::int64_t)) {
    upload(logits, in.logits);
    upload(labels, std::vector<L>(in.labels.begin(), in.labels.end()));
    upload(mask, in.mask);
    upload(cu, in.cu_seqlens);
  }
};

/// Where a case's gradient goes: in place the logits; out of place a separate buffer
/// (in.grad_offset elements in) poisoned with 0xff bytes (NaN in every float type).
template <class T>
struct grad_buf {
  std::int64_t stride;
  std::size_t elems;  // of the separate buffer; 0 in place
  dev_buf buf;
  T* ptr;
  grad_buf(const case_in& in, const dev_buf& logits)
      : stride(in.in_place ? in.row_stride : in.grad_stride),
        elems(in.in_place ? 0 : static_cast<std::size_t>(in.grad_offset + in.rows * stride)),
        buf(elems * sizeof(T)),
        ptr(in.in_place ? logits.as<T>() : buf.as<T>() + in.grad_offset) {
    if (elems) DPO_CK(cudaMemset(buf.p, 0xff, elems * sizeof(T)));
  }
  /// The separate buffer's bytes, as the case's output holds them.
  std::vector<unsigned char> download_bytes() const {
    return download(buf.as<unsigned char>(), elems * sizeof(T));
  }
};

bool all_nan(const std::vector<double>& v) {
  for (double x : v)
    if (x == x) return false;
  return true;
}

/// Calls `call` the two-phase way: the size query, then a workspace filled with
/// in.workspace_fill (garbage must not matter: the kernels initialize what they read), 8 bytes
/// short when in.small_workspace. Synchronizes, then records the status and the device error
/// word in `out`. Returns the call's status.
template <class Call>
dpo::cuda::status call_two_phase(const case_in& in, const Call& call, case_out& out) {
  std::size_t bytes = 0;
  dpo::cuda::status st = call(nullptr, bytes);
  if (st) {
    dev_buf ws(bytes + 16);
    DPO_CK(cudaMemset(ws.p, in.workspace_fill, bytes + 16));
    std::size_t given = in.small_workspace ? bytes - 8 : bytes;
    st = call(ws.p, given);
    DPO_CK(cudaDeviceSynchronize());
    if (st) {
      const dpo::cuda::status de = dpo::cuda::read_device_error(ws.p);
      dpo::cuda::device_error e{};
      DPO_CK(cudaMemcpy(&e, ws.p, sizeof(e), cudaMemcpyDeviceToHost));
      out.device_error = e.code;
      out.device_message = de.message;
    }
  }
  out.status_code = static_cast<int>(st.code);
  out.message = st.message;
  return st;
}

/// Per-pair double outputs, poisoned with NaN.
struct pair_outputs {
  std::int64_t P;
  dev_buf buf;
  explicit pair_outputs(std::int64_t pairs) : P(pairs), buf(sizeof(double) * (10 * pairs + 2 + 11)) {
    const std::vector<double> nan(static_cast<std::size_t>(10 * P + 2 + 11),
                                  std::numeric_limits<double>::quiet_NaN());
    upload(buf, nan);
  }
  double* at(int k) const { return buf.as<double>() + k * P; }
  dpo::cuda::forward_outputs outputs() const {
    dpo::cuda::forward_outputs o;
    o.losses = at(0);
    o.chosen_rewards = at(1);
    o.rejected_rewards = at(2);
    o.chosen_logps = at(3);
    o.rejected_logps = at(4);
    o.chosen_tokens = at(5);
    o.rejected_tokens = at(6);
    o.weights = at(7);
    o.grad_chosen = at(8);
    o.grad_rejected = at(9);
    o.loss = at(10);
    o.nll_token_grad = at(10) + 1;
    o.metrics = reinterpret_cast<dpo::cuda::metrics*>(at(10) + 2);
    return o;
  }
  bool read(case_out& out) const {
    const std::vector<double> h = download(buf.as<double>(), static_cast<std::size_t>(10 * P + 13));
    const auto part = [&](int k) {
      return std::vector<double>(h.begin() + k * P, h.begin() + (k + 1) * P);
    };
    out.losses = part(0);
    out.chosen_rewards = part(1);
    out.rejected_rewards = part(2);
    out.chosen_logps = part(3);
    out.rejected_logps = part(4);
    out.chosen_tokens = part(5);
    out.rejected_tokens = part(6);
    out.weights = part(7);
    out.grad_chosen = part(8);
    out.grad_rejected = part(9);
    out.loss = h[10 * P];
    out.nll_token_grad = h[10 * P + 1];
    // The order the tests index (the pre-issue-11 field order), by name: the struct is in
    // the output order now.
    dpo::metrics m;
    std::memcpy(static_cast<void*>(&m), h.data() + 10 * P + 2, sizeof m);  // plain doubles, in order
    out.metrics = {m.rewards_chosen, m.rewards_rejected, m.rewards_margins, m.rewards_accuracies,
                   m.logps_chosen,   m.logps_rejected,   m.logits_chosen,   m.logits_rejected,
                   m.entropy,        m.mean_token_accuracy, m.nll_loss};
    return all_nan(h);
  }
};

template <class T, class L>
case_out run_typed(const case_in& in) {
  case_out out;
  const std::size_t esize = sizeof(T);
  const std::int64_t P = in.num_seqs / 2;
  const std::size_t logits_elems = static_cast<std::size_t>(in.rows * in.row_stride);
  if (in.logits.size() != logits_elems * esize) throw std::runtime_error("case: logits size");
  const device_case d(in, label_type<L>{});
  dev_buf refs(sizeof(double) * (in.ref_chosen.size() + in.ref_rejected.size()));
  upload(refs, in.ref_chosen);
  if (!in.ref_rejected.empty())
    DPO_CK(cudaMemcpy(refs.as<double>() + in.ref_chosen.size(), in.ref_rejected.data(),
                      in.ref_rejected.size() * sizeof(double), cudaMemcpyHostToDevice));
  const double* ref_c = in.ref_chosen.empty() || in.null_ref ? nullptr : refs.as<double>();
  const double* ref_r =
      in.ref_rejected.empty() || in.null_ref ? nullptr : refs.as<double>() + in.ref_chosen.size();

  const grad_buf<T> gb(in, d.logits);
  T* gptr = gb.ptr;
  if (in.grad_overlaps) gptr = d.logits.as<T>() + in.row_stride;

  const T* lp = d.logits.as<T>();
  const L* lab = in.null_labels ? nullptr : d.labels.as<L>();
  const std::uint8_t* mk = in.mask.empty() ? nullptr : d.mask.as<std::uint8_t>();
  const auto view_of = [&](const auto* x, const L* y, std::int64_t seqs) {
    dpo::pair_view<std::remove_cv_t<std::remove_pointer_t<decltype(x)>>, L> v;
    if (in.cu_seqlens.empty()) {
      v = dpo::padded_pairs(x, y, seqs, in.seq_len, in.vocab, in.row_stride, mk,
                            in.ignore_index);
      v.chosen.seq_stride = v.rejected.seq_stride = in.seq_stride;
    } else {
      v = dpo::packed_pairs(x, y, d.cu.as<std::int64_t>(), seqs, in.vocab, in.row_stride, mk,
                            in.ignore_index);
    }
    return v;
  };
  const dpo::pair_view<T, L> pv = view_of(lp, lab, in.num_seqs);
  // The reference logits and, when given, their own labels.
  const bool with_ref_logits = !in.ref_logits.empty();
  if (in.ref_f32 && !std::is_same_v<T, __nv_bfloat16>) throw std::runtime_error("case: ref_f32 needs bf16 logits");
  if (with_ref_logits && in.ref_logits.size() != logits_elems * (in.ref_f32 ? sizeof(float) : esize))
    throw std::runtime_error("case: ref_logits size");
  dev_buf ref_logits(in.ref_logits.size());
  upload(ref_logits, in.ref_logits);
  std::vector<L> ref_labels_h(in.ref_labels.begin(), in.ref_labels.end());
  dev_buf ref_labels(ref_labels_h.size() * sizeof(L));
  upload(ref_labels, ref_labels_h);
  const L* ref_lab = in.ref_labels.empty() ? lab : ref_labels.as<L>();
  const std::int64_t ref_seqs = in.ref_num_seqs > 0 ? in.ref_num_seqs : in.num_seqs;
  const dpo::pair_view<T, L> rv = view_of(in.null_ref ? nullptr : ref_logits.as<T>(), ref_lab, ref_seqs);
  // fn(the reference view): of T, or of float for ref_f32 (the mixed-dtype overloads).
  const auto with_ref = [&](auto&& fn) -> dpo::cuda::status {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (in.ref_f32) return fn(view_of(in.null_ref ? nullptr : ref_logits.as<float>(), ref_lab, ref_seqs));
    }
    return fn(rv);
  };
  dpo::token_view<T, L> all = pv.chosen;
  all.num_seqs = in.num_seqs;
  const dpo::pair_grad_view<T> grad{gptr, gb.stride, gptr, gb.stride};
  dpo::cuda::options opt;
  opt.metrics = in.metrics;
  opt.num_rows = in.give_num_rows ? in.rows : -1;

  pair_outputs po(P > 0 ? P : 1);
  const dpo::cuda::forward_outputs fo = po.outputs();
  const std::int64_t S = in.num_seqs;
  dev_buf seq_out(sizeof(double) * (S + 2 + static_cast<std::size_t>(in.rows)) +
                  sizeof(std::int64_t) * S);
  {
    const std::vector<double> nan(static_cast<std::size_t>(S + 2 + in.rows),
                                  std::numeric_limits<double>::quiet_NaN());
    upload(seq_out, nan);
  }
  double* sums = seq_out.as<double>();
  double* token_logps = sums + S + 2;
  auto* counts = reinterpret_cast<std::int64_t*>(token_logps + in.rows);
  double* go = sums + S;
  DPO_CK(cudaMemcpy(go, &in.grad_output, sizeof(double), cudaMemcpyHostToDevice));

  dev_buf row_state(sizeof(double) * 2 * static_cast<std::size_t>(in.rows));
  const auto call = [&](void* ws, std::size_t& bytes) -> dpo::cuda::status {
    switch (in.run) {
      case mode::forward_backward:
        if (with_ref_logits)
          return with_ref([&](const auto& r) {
            return dpo::cuda::dpo_forward_backward(ws, bytes, pv, r, in.cfg, fo, grad, opt);
          });
        return dpo::cuda::dpo_forward_backward(ws, bytes, pv, ref_c, ref_r, in.cfg, fo, grad, opt);
      case mode::forward_then_backward: {
        dpo::cuda::status s =
            with_ref_logits
                ? with_ref([&](const auto& r) { return dpo::cuda::dpo_forward(ws, bytes, pv, r, in.cfg, fo, opt); })
                : dpo::cuda::dpo_forward(ws, bytes, pv, ref_c, ref_r, in.cfg, fo, opt);
        if (!s || ws == nullptr) return s;
        return dpo::cuda::dpo_backward(ws, bytes, pv, grad, go, opt);
      }
      case mode::forward_only:
        if (with_ref_logits)
          return with_ref([&](const auto& r) { return dpo::cuda::dpo_forward(ws, bytes, pv, r, in.cfg, fo, opt); });
        return dpo::cuda::dpo_forward(ws, bytes, pv, ref_c, ref_r, in.cfg, fo, opt);
      case mode::sequence_logps:
        return dpo::cuda::sequence_logps(ws, bytes, all, sums, counts, token_logps, opt);
      case mode::pair_logps:
        return dpo::cuda::pair_logps(ws, bytes, pv, in.ld_alpha, sums, sums + P, opt);
      case mode::backward_only:
        return dpo::cuda::dpo_backward(ws, bytes, pv, grad, go, opt);
      case mode::backward_rows: {
        dpo::cuda::forward_outputs fr = fo;
        fr.row_lse = row_state.as<double>();
        fr.row_coef = row_state.as<double>() + in.rows;
        dpo::cuda::status s = dpo::cuda::dpo_forward(ws, bytes, pv, ref_c, ref_r, in.cfg, fr, opt);
        if (!s || ws == nullptr) return s;
        std::size_t small = 0;
        s = dpo::cuda::dpo_backward_rows(nullptr, small, pv, fr.row_lse, fr.row_coef, grad, go, opt);
        if (!s) return s;
        if (small > bytes) return dpo::cuda::detail::invalid("harness: backward_rows workspace");
        return dpo::cuda::dpo_backward_rows(ws, bytes, pv, fr.row_lse, fr.row_coef, grad, go, opt);
      }
    }
    return {};
  };

  call_two_phase(in, call, out);
  DPO_CK(cudaGetLastError());

  bool untouched = po.read(out);
  const std::vector<double> so = download(seq_out.as<double>(), static_cast<std::size_t>(S + 2 + in.rows));
  out.sums.assign(so.begin(), so.begin() + S);
  out.token_logps.assign(so.begin() + S + 2, so.end());
  out.counts = download(counts, static_cast<std::size_t>(S));
  untouched = untouched && all_nan(out.sums) && all_nan(out.token_logps);
  if (in.in_place) {
    out.grad = download(d.logits.as<unsigned char>(), in.logits.size());
    untouched = untouched && out.grad == in.logits;
  } else {
    out.grad = gb.download_bytes();
    for (unsigned char b : out.grad) untouched = untouched && b == 0xff;
  }
  out.outputs_untouched = untouched;
  return out;
}

template <class T>
case_out run_labels(const case_in& in) {
  return in.labels64 ? run_typed<T, std::int64_t>(in) : run_typed<T, std::int32_t>(in);
}

__global__ void fill_kernel(__nv_bfloat16* x, std::int64_t n, unsigned seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    unsigned long long h = static_cast<unsigned long long>(i) * 0x9e3779b97f4a7c15ull + seed;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    const float u = static_cast<float>(h & 0xffffff) / 16777216.0f;
    x[i] = __float2bfloat16_rn(u * 12.0f - 6.0f);
  }
}

/// Fills x[0, n) with pseudo-random bf16 values in [-6, 6) on the default stream.
void fill(__nv_bfloat16* x, std::int64_t n, unsigned seed, unsigned grid) {
  const dpo::cuda::status s =
      dpo::cuda::detail::launch("fill_kernel", fill_kernel, grid, 256, cudaStream_t{}, x, n, seed);
  if (!s) throw std::runtime_error(s.message);
}

}  // namespace

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_name() {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "?";
  return p.name;
}

std::size_t free_device_memory() {
  std::size_t free_b = 0, total = 0;
  if (cudaMemGetInfo(&free_b, &total) != cudaSuccess) return 0;
  return free_b;
}

case_out run_case(const case_in& in) {
  switch (in.type) {
    case dtype::bf16: return run_labels<__nv_bfloat16>(in);
    case dtype::f16: return run_typed<__half, std::int64_t>(in);
    case dtype::f32: return run_labels<float>(in);
    case dtype::f64: return run_typed<double, std::int64_t>(in);
  }
  throw std::runtime_error("case: unknown dtype");
}

bool run_large(large_out* out) {
  const std::int64_t S = 16, T = 1040, V = 129280, N = S * T, P = S / 2;
  const std::size_t elems = static_cast<std::size_t>(N * V);
  std::size_t ws_bytes = 0;
  {
    dpo::pair_view<__nv_bfloat16, std::int64_t> pv =
        dpo::padded_pairs<__nv_bfloat16, std::int64_t>(nullptr, nullptr, S, T, V, V);
    dpo::cuda::dpo_forward_backward(nullptr, ws_bytes, pv, nullptr, nullptr, dpo::loss_config{},
                                    {}, {}, {});
  }
  if (free_device_memory() < elems * 2 + ws_bytes + (256u << 20)) return false;
  out->rows = N;
  out->vocab = V;
  out->seq_len = T;
  out->num_seqs = S;
  dev_buf logits(elems * 2);
  fill(logits.as<__nv_bfloat16>(), static_cast<std::int64_t>(elems), 7u, 4096);
  // Labels: a prompt of 40 ignored rows per sequence, then tokens.
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r)
    labels[r] = r % T < 40 ? -100 : (r * 2654435761ll) % V;
  out->labels = labels;
  dev_buf lab(labels.size() * sizeof(std::int64_t));
  upload(lab, labels);
  dev_buf res(sizeof(double) * (S + 4 * P + 2) + sizeof(std::int64_t) * S);
  double* sums = res.as<double>();
  double* logps = sums + S;  // chosen, rejected, grad_chosen, grad_rejected
  double* loss = logps + 4 * P;
  auto* counts = reinterpret_cast<std::int64_t*>(sums + S + 4 * P + 2);
  const auto* lp = logits.as<__nv_bfloat16>();
  const auto* lb = lab.as<std::int64_t>();
  dpo::token_view<__nv_bfloat16, std::int64_t> all =
      dpo::padded_pairs(lp, lb, S, T, V, V).chosen;
  all.num_seqs = S;
  std::size_t bytes = 0;
  dpo::cuda::sequence_logps(nullptr, bytes, all, sums, counts);
  {
    dev_buf ws(bytes);
    const dpo::cuda::status st = dpo::cuda::sequence_logps(ws.p, bytes, all, sums, counts);
    if (!st) throw std::runtime_error(st.message);
    const dpo::cuda::status de = dpo::cuda::read_device_error(ws.p);
    if (!de) throw std::runtime_error(de.message);
  }
  out->sums = download(sums, static_cast<std::size_t>(S));
  // The last sequence ends past 2^31 elements: copy it back before the in-place backward.
  out->seq_checked = {S - 1};
  out->seq_logits = download(reinterpret_cast<const std::uint16_t*>(lp) + (S - 1) * T * V,
                             static_cast<std::size_t>(T * V));
  out->checked_rows = {N - 1, N - 2, N - T + 40, N / 2 + 100};
  for (std::int64_t r : out->checked_rows) {
    const std::vector<std::uint16_t> row =
        download(reinterpret_cast<const std::uint16_t*>(lp) + r * V, static_cast<std::size_t>(V));
    out->logits_rows.insert(out->logits_rows.end(), row.begin(), row.end());
  }
  // Reference log-probs: the policy's own minus a per-pair offset, so the loss is not trivial.
  std::vector<double> refs(static_cast<std::size_t>(2 * P));
  for (std::int64_t i = 0; i < P; ++i) {
    refs[i] = out->sums[i] - 0.5 * static_cast<double>(i);
    refs[P + i] = out->sums[P + i] + 0.25 * static_cast<double>(i);
  }
  dev_buf rbuf(refs.size() * sizeof(double));
  upload(rbuf, refs);
  out->ref_chosen.assign(refs.begin(), refs.begin() + P);
  out->ref_rejected.assign(refs.begin() + P, refs.end());
  dpo::pair_view<__nv_bfloat16, std::int64_t> pv = dpo::padded_pairs(lp, lb, S, T, V, V);
  __nv_bfloat16* g = logits.as<__nv_bfloat16>();
  const dpo::pair_grad_view<__nv_bfloat16> grad{g, V, g, V};
  dpo::cuda::forward_outputs fo;
  fo.chosen_logps = logps;
  fo.rejected_logps = logps + P;
  fo.grad_chosen = logps + 2 * P;
  fo.grad_rejected = logps + 3 * P;
  fo.loss = loss;
  {
    dev_buf ws(ws_bytes);
    const dpo::cuda::status st = dpo::cuda::dpo_forward_backward(
        ws.p, ws_bytes, pv, rbuf.as<double>(), rbuf.as<double>() + P, dpo::loss_config{}, fo, grad);
    if (!st) throw std::runtime_error(st.message);
    const dpo::cuda::status de = dpo::cuda::read_device_error(ws.p);
    if (!de) throw std::runtime_error(de.message);
  }
  const std::vector<double> l = download(logps, static_cast<std::size_t>(4 * P + 1));
  out->chosen_logps.assign(l.begin(), l.begin() + P);
  out->rejected_logps.assign(l.begin() + P, l.begin() + 2 * P);
  out->grad_chosen.assign(l.begin() + 2 * P, l.begin() + 3 * P);
  out->grad_rejected.assign(l.begin() + 3 * P, l.begin() + 4 * P);
  out->loss = l[4 * P];
  for (std::int64_t r : out->checked_rows) {
    const std::vector<std::uint16_t> row =
        download(reinterpret_cast<const std::uint16_t*>(g) + r * V, static_cast<std::size_t>(V));
    out->grad_rows.insert(out->grad_rows.end(), row.begin(), row.end());
  }
  return true;
}

case_out run_dpo_loss(const loss_case& in) {
  const std::int64_t P = static_cast<std::int64_t>(in.chosen.size());
  const std::vector<double>* arrays[7] = {&in.chosen, &in.rejected, &in.ref_chosen, &in.ref_rejected,
                                          &in.chosen_tokens, &in.rejected_tokens, &in.weights};
  dev_buf buf(sizeof(double) * 7 * static_cast<std::size_t>(P));
  const double* ptr[7];
  for (int k = 0; k < 7; ++k) {
    double* d = buf.as<double>() + k * P;
    if (!arrays[k]->empty())
      DPO_CK(cudaMemcpy(d, arrays[k]->data(), sizeof(double) * P, cudaMemcpyHostToDevice));
    ptr[k] = arrays[k]->empty() ? nullptr : d;
  }
  const dpo::pair_logps_in li = dpo::make_pair_logps(P, ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6]);
  pair_outputs po(P);
  case_out out;
  std::size_t bytes = 0;
  dpo::cuda::status st = dpo::cuda::dpo_loss(nullptr, bytes, li, in.cfg, po.outputs());
  if (st) {
    dev_buf ws(bytes);
    DPO_CK(cudaMemset(ws.p, 0xa5, bytes));
    st = dpo::cuda::dpo_loss(ws.p, bytes, li, in.cfg, po.outputs());
    DPO_CK(cudaDeviceSynchronize());
    if (st) {
      dpo::cuda::device_error e{};
      DPO_CK(cudaMemcpy(&e, ws.p, sizeof(e), cudaMemcpyDeviceToHost));
      out.device_error = e.code;
    }
  }
  out.status_code = static_cast<int>(st.code);
  out.message = st.message;
  out.outputs_untouched = po.read(out);
  return out;
}

std::string graph_capture_check() {
  const std::int64_t S = 4, T = 37, V = 5003, N = S * T, P = S / 2;
  dev_buf logits(static_cast<std::size_t>(N * V) * 2);
  fill(logits.as<__nv_bfloat16>(), N * V, 3u, 256);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r) labels[r] = r % T < 3 ? -100 : (r * 7919) % V;
  dev_buf lab(labels.size() * sizeof(std::int64_t));
  upload(lab, labels);
  const std::vector<double> refs = {-30.0, -31.0, -29.5, -32.0};
  dev_buf rbuf(refs.size() * sizeof(double));
  upload(rbuf, refs);
  dev_buf grads(2 * static_cast<std::size_t>(N * V) * 2);  // direct, then graph
  dev_buf outs(sizeof(double) * 2 * (1 + S));
  const auto* lp = logits.as<__nv_bfloat16>();
  const auto pv = dpo::padded_pairs(lp, lab.as<std::int64_t>(), S, T, V, V);
  dpo::token_view<__nv_bfloat16, std::int64_t> all = pv.chosen;
  all.num_seqs = S;
  std::size_t bytes = 0, seq_bytes = 0;
  dpo::cuda::forward_outputs fo;
  dpo::cuda::dpo_forward_backward(nullptr, bytes, pv, rbuf.as<double>(), rbuf.as<double>() + P,
                                  dpo::loss_config{}, fo, {}, {});
  std::int64_t* counts = nullptr;
  dpo::cuda::sequence_logps(nullptr, seq_bytes, all, outs.as<double>(), counts);
  dev_buf ws(bytes), ws2(seq_bytes), cnt(sizeof(std::int64_t) * S);
  cudaStream_t stream;
  DPO_CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const auto enqueue = [&](int k) {
    __nv_bfloat16* g = grads.as<__nv_bfloat16>() + k * N * V;
    dpo::cuda::forward_outputs o;
    o.loss = outs.as<double>() + k * (1 + S);
    const dpo::cuda::status a = dpo::cuda::dpo_forward_backward(
        ws.p, bytes, pv, rbuf.as<double>(), rbuf.as<double>() + P, dpo::loss_config{}, o,
        dpo::pair_grad_view<__nv_bfloat16>{g, V, g, V}, {}, stream);
    if (!a) return std::string(a.message);
    const dpo::cuda::status b = dpo::cuda::sequence_logps(
        ws2.p, seq_bytes, all, outs.as<double>() + k * (1 + S) + 1, cnt.as<std::int64_t>(), nullptr, {},
        stream);
    return b ? std::string() : std::string(b.message);
  };
  std::string err = enqueue(0);
  if (!err.empty()) return "direct call: " + err;
  DPO_CK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  DPO_CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  err = enqueue(1);
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  if (!err.empty()) return "captured call: " + err;
  if (end != cudaSuccess) return std::string("capture failed: ") + cudaGetErrorString(end);
  cudaGraphExec_t exec;
  DPO_CK(cudaGraphInstantiate(&exec, graph, 0));
  for (int rep = 0; rep < 2; ++rep) DPO_CK(cudaGraphLaunch(exec, stream));
  DPO_CK(cudaStreamSynchronize(stream));
  const dpo::cuda::status de = dpo::cuda::read_device_error(ws.p, stream);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  if (!de) return std::string("device error: ") + de.message;
  const std::vector<double> o = download(outs.as<double>(), static_cast<std::size_t>(2 * (1 + S)));
  if (std::memcmp(o.data(), o.data() + 1 + S, sizeof(double) * (1 + S)) != 0)
    return "graph replay results differ from the direct call";
  if (!(o[0] == o[0])) return "loss is NaN";
  const std::vector<std::uint16_t> g =
      download(grads.as<std::uint16_t>(), 2 * static_cast<std::size_t>(N * V));
  if (!std::equal(g.begin(), g.begin() + N * V, g.begin() + N * V))
    return "graph replay gradient differs from the direct call";
  return "";
}

namespace {

template <class T, class L>
sequence_out run_sequence_typed(const case_in& in, std::int64_t seq_stride,
                                const std::vector<double>& seq_grad) {
  sequence_out out;
  const std::size_t esize = sizeof(T);
  const std::int64_t S = in.num_seqs;
  const std::size_t rows = static_cast<std::size_t>(in.rows);
  if (in.logits.size() != rows * static_cast<std::size_t>(in.row_stride) * esize)
    throw std::runtime_error("sequence case: logits size");
  if (seq_grad.size() != static_cast<std::size_t>(S)) throw std::runtime_error("sequence case: seq_grad size");
  const device_case d(in, label_type<L>{});
  dev_buf sg(seq_grad.size() * sizeof(double));
  upload(sg, seq_grad);

  const grad_buf<T> gb(in, d.logits);
  T* gptr = gb.ptr;

  dpo::token_view<T, L> v;
  v.logits = d.logits.as<T>();
  v.labels = d.labels.as<L>();
  v.mask = in.mask.empty() ? nullptr : d.mask.as<std::uint8_t>();
  v.cu_seqlens = in.cu_seqlens.empty() ? nullptr : d.cu.as<std::int64_t>();
  v.vocab = in.vocab;
  v.row_stride = in.row_stride;
  v.num_seqs = S;
  v.seq_len = in.seq_len;
  v.seq_stride = seq_stride;
  v.ignore_index = in.ignore_index;
  dpo::cuda::options opt;
  opt.num_rows = in.give_num_rows ? in.rows : -1;

  // sums [S], counts [S], token_logps [rows], row_lse [rows], all NaN at first.
  const std::size_t nd = static_cast<std::size_t>(S) + 2 * rows;
  dev_buf res(sizeof(double) * nd + sizeof(std::int64_t) * static_cast<std::size_t>(S));
  upload(res, std::vector<double>(nd, std::numeric_limits<double>::quiet_NaN()));
  double* sums = res.as<double>();
  double* token_logps = sums + S;
  double* row_lse = token_logps + rows;
  auto* counts = reinterpret_cast<std::int64_t*>(row_lse + rows);

  const auto run = [&](const auto& call) {
    return call_two_phase(in, call, out).ok() && out.device_error == 0;
  };
  const bool forward_ok = run([&](void* ws, std::size_t& bytes) {
    return dpo::cuda::sequence_logps(ws, bytes, v, sums, counts, token_logps, row_lse, opt);
  });
  if (forward_ok) {
    run([&](void* ws, std::size_t& bytes) {
      return dpo::cuda::sequence_logps_backward(ws, bytes, v, row_lse, sg.as<double>(), gptr, gb.stride,
                                                opt);
    });
  }
  DPO_CK(cudaGetLastError());
  const std::vector<double> h = download(res.as<double>(), nd);
  out.sums.assign(h.begin(), h.begin() + S);
  out.token_logps.assign(h.begin() + S, h.begin() + S + static_cast<std::ptrdiff_t>(rows));
  out.row_lse.assign(h.begin() + S + static_cast<std::ptrdiff_t>(rows), h.end());
  out.counts = download(counts, static_cast<std::size_t>(S));
  out.grad = in.in_place ? download(d.logits.as<unsigned char>(), in.logits.size())
                         : gb.download_bytes();
  return out;
}

template <class T>
sequence_out run_sequence_labels(const case_in& in, std::int64_t seq_stride,
                                 const std::vector<double>& seq_grad) {
  return in.labels64 ? run_sequence_typed<T, std::int64_t>(in, seq_stride, seq_grad)
                     : run_sequence_typed<T, std::int32_t>(in, seq_stride, seq_grad);
}

}  // namespace

sequence_out run_sequence_case(const case_in& in, std::int64_t seq_stride,
                               const std::vector<double>& seq_grad) {
  switch (in.type) {
    case dtype::bf16: return run_sequence_labels<__nv_bfloat16>(in, seq_stride, seq_grad);
    case dtype::f16: return run_sequence_labels<__half>(in, seq_stride, seq_grad);
    case dtype::f32: return run_sequence_labels<float>(in, seq_stride, seq_grad);
    case dtype::f64: return run_sequence_labels<double>(in, seq_stride, seq_grad);
  }
  throw std::runtime_error("sequence case: unknown dtype");
}

row_state_out row_state_errors() {
  const std::int64_t P = 2, T = 3, V = 5, half = P * T, rows = 2 * half;
  std::vector<float> logits(static_cast<std::size_t>(rows * V));
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = 0.1f * static_cast<float>(i % 7);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) labels[static_cast<std::size_t>(r)] = r % V;
  const std::vector<double> ref(static_cast<std::size_t>(P), -1.0);
  dev_buf dz(logits.size() * sizeof(float)), dz2(logits.size() * sizeof(float)), dy(labels.size() * 8),
      dref(ref.size() * 8), dloss(8), dlse(static_cast<std::size_t>(rows) * 8), dcoef(static_cast<std::size_t>(rows) * 8),
      dgrad(logits.size() * sizeof(float)), dws(1 << 20);
  dz.put(logits.data(), logits.size() * sizeof(float));
  dz2.put(logits.data(), logits.size() * sizeof(float));
  dy.put(labels.data(), labels.size() * 8);
  dref.put(ref.data(), ref.size() * 8);
  for (dev_buf* b : {&dloss, &dlse, &dcoef, &dgrad}) b->fill(0x5a);
  const float* z = dz.as<float>();
  const std::int64_t* y = dy.as<std::int64_t>();
  // Both sides read rows [0, P*T) of one buffer, each with its own labels.
  const auto shared = dpo::separate_pairs(z, y, z, y + half, P, T, V, V);
  const auto separate = dpo::separate_pairs(z, y, dz2.as<float>(), y + half, P, T, V, V);
  dpo::forward_outputs out;
  out.loss = dloss.as<double>();
  out.row_lse = dlse.as<double>();
  out.row_coef = dcoef.as<double>();
  const dpo::loss_config cfg;
  float* g = dgrad.as<float>();
  const dpo::pair_grad_view<float> gv{g, V, g + half * V, V};
  row_state_out r;
  std::size_t bytes = dws.n;
  r.forward_shared = dpo::cuda::dpo_forward(dws.p, bytes, shared, dref.as<double>(), dref.as<double>(), cfg, out)
                         .message;
  bytes = dws.n;
  r.forward_backward_shared =
      dpo::cuda::dpo_forward_backward(dws.p, bytes, shared, dref.as<double>(), dref.as<double>(), cfg, out, gv)
          .message;
  bytes = dws.n;
  r.rows_shared = dpo::cuda::dpo_backward_rows(dws.p, bytes, shared, dlse.as<double>(), dcoef.as<double>(), gv)
                      .message;
  bytes = dws.n;
  r.rows_separate =
      dpo::cuda::dpo_backward_rows(dws.p, bytes, separate, dlse.as<double>(), dcoef.as<double>(), gv).message;
  DPO_CK(cudaDeviceSynchronize());
  r.untouched = true;
  for (const dev_buf* b : {&dloss, &dlse, &dcoef, &dgrad})
    for (unsigned char c : b->get<unsigned char>(b->n)) r.untouched = r.untouched && c == 0x5a;
  return r;
}

output_alias_out output_alias_errors() {
  const std::int64_t P = 2, T = 3, V = 5, half = P * T, rows = 2 * half;
  std::vector<float> logits(static_cast<std::size_t>(rows * V));
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = 0.1f * static_cast<float>(i % 7);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) labels[static_cast<std::size_t>(r)] = r % V;
  std::vector<double> logps(static_cast<std::size_t>(4 * P));  // ref_chosen, ref_rejected, chosen, rejected
  for (std::size_t i = 0; i < logps.size(); ++i) logps[i] = -1.0 - 0.25 * static_cast<double>(i);
  dev_buf dz(logits.size() * sizeof(float)), dzr(logits.size() * sizeof(float)), dy(labels.size() * 8),
      dlp(logps.size() * 8), dout(static_cast<std::size_t>(dpo::num_pair_outputs * P) * 8), dloss(8),
      drow(static_cast<std::size_t>(2 * rows) * 8), dgrad(logits.size() * sizeof(float)), dws(1 << 20);
  dz.put(logits.data(), logits.size() * sizeof(float));
  dzr.put(logits.data(), logits.size() * sizeof(float));
  dy.put(labels.data(), labels.size() * 8);
  dlp.put(logps.data(), logps.size() * 8);
  for (dev_buf* b : {&dout, &dloss, &drow, &dgrad, &dws}) b->fill(0x5a);
  const dev_buf* all[] = {&dz, &dzr, &dy, &dlp, &dout, &dloss, &drow, &dgrad, &dws};
  std::vector<std::vector<unsigned char>> before;
  for (const dev_buf* b : all) before.push_back(b->get<unsigned char>(b->n));

  const float* z = dz.as<float>();
  const std::int64_t* y = dy.as<std::int64_t>();
  const auto policy = dpo::padded_pairs(z, y, 2 * P, T, V, V);
  const auto reference = dpo::padded_pairs(dzr.as<float>(), y, 2 * P, T, V, V);
  const double* ref_c = dlp.as<double>();
  const double* ref_r = ref_c + P;
  float* g = dgrad.as<float>();
  const dpo::pair_grad_view<float> gv{g, V, g, V};
  double* o = dout.as<double>();
  // Valid outputs: per-pair slices of dout, the loss, the row state in drow's two halves.
  const auto valid = [&] {
    dpo::forward_outputs out;
    out.loss = dloss.as<double>();
    out.set_pair_outputs(o, P);
    out.row_lse = drow.as<double>();
    out.row_coef = drow.as<double>() + rows;
    return out;
  };
  const dpo::loss_config cfg;
  output_alias_out r;
  const auto add = [&](const char* what, const dpo::cuda::status& st) {
    r.cases.push_back({what, st.ok() ? std::string() : std::string(st.message)});
  };
  std::size_t bytes = dws.n;
  {
    dpo::forward_outputs out = valid();
    out.losses = out.chosen_rewards;
    bytes = dws.n;
    add("forward: out.losses on out.chosen_rewards",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, ref_c, ref_r, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.rejected_rewards = const_cast<double*>(ref_r);
    bytes = dws.n;
    add("forward: out.rejected_rewards on ref_rejected_logps",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, ref_c, ref_r, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.row_coef = out.row_lse + rows / 2;
    bytes = dws.n;
    add("forward: out.row_lse on out.row_coef",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, ref_c, ref_r, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.loss = reinterpret_cast<double*>(dz.as<float>() + half * V);  // in the rejected rows
    bytes = dws.n;
    add("forward: out.loss on logits.rejected",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, ref_c, ref_r, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.weights = reinterpret_cast<double*>(dws.p) + 1;
    bytes = dws.n;
    add("forward: out.weights on workspace",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, ref_c, ref_r, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.chosen_logps = reinterpret_cast<double*>(dzr.p);
    bytes = dws.n;
    add("forward (reference logits): out.chosen_logps on ref_logits.chosen",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, reference, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.grad_rejected = out.grad_chosen;
    bytes = dws.n;
    add("forward (reference logits): out.grad_chosen on out.grad_rejected",
        dpo::cuda::dpo_forward(dws.p, bytes, policy, reference, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.row_lse = reinterpret_cast<double*>(g + 3 * V);
    bytes = dws.n;
    add("forward_backward: out.row_lse on grad.chosen",
        dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, ref_c, ref_r, cfg, out, gv));
  }
  {
    dpo::forward_outputs out = valid();
    out.chosen_tokens = reinterpret_cast<double*>(dy.as<std::int64_t>() + half);
    bytes = dws.n;
    add("forward_backward: out.chosen_tokens on labels.rejected",
        dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, ref_c, ref_r, cfg, out, gv));
  }
  {
    dpo::forward_outputs out = valid();
    out.losses = const_cast<double*>(ref_c);
    bytes = dws.n;
    add("forward_backward: out.losses on ref_chosen_logps",
        dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, ref_c, ref_r, cfg, out, gv));
  }
  {
    dpo::forward_outputs out = valid();
    out.nll_token_grad = out.loss;
    bytes = dws.n;
    add("forward_backward (reference logits): out.loss on out.nll_token_grad",
        dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, reference, cfg, out, gv));
  }
  {
    dpo::forward_outputs out = valid();
    out.rejected_logps = reinterpret_cast<double*>(dzr.as<float>() + half * V);
    bytes = dws.n;
    add("forward_backward (reference logits): out.rejected_logps on ref_logits.rejected",
        dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, reference, cfg, out, gv));
  }
  const dpo::pair_logps_in li = dpo::make_pair_logps(P, ref_c + 2 * P, ref_c + 3 * P, ref_c, ref_r);
  {
    dpo::forward_outputs out = valid();
    out.row_lse = out.row_coef = nullptr;
    out.losses = out.chosen_rewards;
    bytes = dws.n;
    add("loss: out.losses on out.chosen_rewards", dpo::cuda::dpo_loss(dws.p, bytes, li, cfg, out));
  }
  {
    dpo::forward_outputs out = valid();
    out.row_lse = out.row_coef = nullptr;
    out.metrics = reinterpret_cast<dpo::metrics*>(dws.p);
    bytes = dws.n;
    add("loss: out.metrics on workspace", dpo::cuda::dpo_loss(dws.p, bytes, li, cfg, out));
  }
  {
    // The reference log-probs are read where they are (not copied): an output on them is not.
    dpo::forward_outputs out = valid();
    out.row_lse = out.row_coef = nullptr;
    out.chosen_rewards = const_cast<double*>(ref_c);
    bytes = dws.n;
    add("loss: out.chosen_rewards on ref_chosen_logps", dpo::cuda::dpo_loss(dws.p, bytes, li, cfg, out));
  }
  DPO_CK(cudaDeviceSynchronize());
  r.untouched = true;
  for (std::size_t k = 0; k < before.size(); ++k) r.untouched = r.untouched && all[k]->get<unsigned char>(all[k]->n) == before[k];
  // dpo_loss copies the policy inputs first: an output on one is fine (as dpo::cpu::dpo_loss).
  {
    dpo::forward_outputs out = valid();
    out.row_lse = out.row_coef = nullptr;
    out.chosen_logps = const_cast<double*>(li.chosen_logps);
    bytes = dws.n;
    const dpo::cuda::status st = dpo::cuda::dpo_loss(dws.p, bytes, li, cfg, out);
    r.loss_in_place = st.ok() ? std::string() : std::string(st.message);
    DPO_CK(cudaDeviceSynchronize());
  }
  return r;
}

output_alias_out logits_alias_errors() {
  const std::int64_t P = 2, T = 3, V = 5, half = P * T, rows = 2 * half;
  std::vector<float> logits(static_cast<std::size_t>(rows * V));
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = 0.1f * static_cast<float>(i % 7);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(rows)), cu = {0, 3, 6, 9, 12};
  for (std::int64_t r = 0; r < rows; ++r) labels[static_cast<std::size_t>(r)] = r % V;
  std::vector<double> logps(static_cast<std::size_t>(2 * P), -1.5), state(static_cast<std::size_t>(2 * rows), 0.5);
  dev_buf dz(logits.size() * sizeof(float)), dy(labels.size() * 8), dcu(cu.size() * 8), dlp(logps.size() * 8),
      drow(state.size() * 8), dgrad(logits.size() * sizeof(float) + 256), dws(1 << 20), dgo(8),
      dso(static_cast<std::size_t>(4 * P + 2 * rows) * 8);
  dz.put(logits.data(), logits.size() * sizeof(float));
  dy.put(labels.data(), labels.size() * 8);
  dcu.put(cu.data(), cu.size() * 8);
  dlp.put(logps.data(), logps.size() * 8);
  drow.put(state.data(), state.size() * 8);
  for (dev_buf* b : {&dgrad, &dws, &dgo, &dso}) b->fill(0x5a);
  const dev_buf* all[] = {&dz, &dy, &dcu, &dlp, &drow, &dgrad, &dws, &dgo, &dso};
  std::vector<std::vector<unsigned char>> before;
  for (const dev_buf* b : all) before.push_back(b->get<unsigned char>(b->n));

  const float* z = dz.as<float>();
  const auto policy = dpo::padded_pairs(z, dy.as<std::int64_t>(), 2 * P, T, V, V);
  const auto reference = dpo::padded_pairs(z, dy.as<std::int64_t>(), 2 * P, T, V, V);
  const double* ref_c = dlp.as<double>();
  const double* ref_r = ref_c + P;
  const double* lse = drow.as<double>();
  const double* coef = lse + rows;
  float* g = dgrad.as<float>();
  const dpo::pair_grad_view<float> gv{g, V, g, V};
  const auto on = [&](const void* p) {  // a gradient whose chosen rows start at p
    float* q = static_cast<float*>(const_cast<void*>(p));
    return dpo::pair_grad_view<float>{q, V, g, V};
  };
  const dpo::loss_config cfg;
  output_alias_out r;
  std::size_t bytes = dws.n;
  const auto add = [&](const char* what, const dpo::cuda::status& st) {
    r.cases.push_back({what, st.ok() ? std::string() : std::string(st.message)});
    bytes = dws.n;
  };
  dpo::forward_outputs out;  // no output: the gradients' rules alone
  add("backward: grad.chosen on labels.chosen", dpo::cuda::dpo_backward(dws.p, bytes, policy, on(dy.p)));
  add("backward: grad.chosen on workspace", dpo::cuda::dpo_backward(dws.p, bytes, policy, on(dws.p)));
  add("backward: grad.chosen on grad_output",
      dpo::cuda::dpo_backward(dws.p, bytes, policy, gv, reinterpret_cast<const double*>(g + 4)));
  add("backward_rows: grad.chosen on row_lse", dpo::cuda::dpo_backward_rows(dws.p, bytes, policy, lse, coef, on(lse)));
  add("backward_rows: grad.rejected on row_coef",
      dpo::cuda::dpo_backward_rows(dws.p, bytes, policy, lse, reinterpret_cast<const double*>(g + half * V), gv));
  add("backward_rows: grad.chosen on grad_output",
      dpo::cuda::dpo_backward_rows(dws.p, bytes, policy, lse, coef, on(dgo.p), dgo.as<double>()));
  {
    dpo::cuda::options opt;
    opt.num_rows = rows;
    const auto packed = dpo::packed_pairs(z, dy.as<std::int64_t>(), reinterpret_cast<const std::int64_t*>(g + 2),
                                          2 * P, V, V);
    add("backward_rows (packed): grad.chosen on cu_seqlens.chosen",
        dpo::cuda::dpo_backward_rows(dws.p, bytes, packed, lse, coef, gv, nullptr, opt));
  }
  add("forward_backward: grad.chosen on ref_chosen_logps",
      dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, ref_c, ref_r, cfg, out, on(ref_c)));
  add("forward_backward: grad.chosen on workspace",
      dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, ref_c, ref_r, cfg, out, on(dws.p)));
  add("forward_backward (reference logits): grad.chosen on workspace",
      dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, reference, cfg, out, on(dws.p)));
  const std::vector<double> seq(4, 0.5);
  dev_buf dseq(seq.size() * 8);
  dseq.put(seq.data(), seq.size() * 8);
  add("sequence_backward: grad on labels",
      dpo::cuda::sequence_logps_backward(dws.p, bytes, policy.chosen, lse, dseq.as<double>(),
                                         static_cast<float*>(dy.p), V));
  add("sequence_backward: grad on row_lse",
      dpo::cuda::sequence_logps_backward(dws.p, bytes, policy.chosen, lse, dseq.as<double>(),
                                         reinterpret_cast<float*>(drow.p), V));
  {
    // sequence_logps / pair_logps outputs: sums [2P], counts [2P], token_logps and row_lse [rows].
    const auto one = policy.chosen;  // P sequences of T rows
    double* so = dso.as<double>();
    std::int64_t* counts = reinterpret_cast<std::int64_t*>(so + P);
    double* tok = so + 2 * P;
    double* rl = tok + rows;
    add("sequence: sums on counts",
        dpo::cuda::sequence_logps(dws.p, bytes, one, so, reinterpret_cast<std::int64_t*>(so + 1), tok, rl));
    add("sequence: token_logps on row_lse", dpo::cuda::sequence_logps(dws.p, bytes, one, so, counts, tok, tok + 2));
    add("sequence: row_lse on labels",
        dpo::cuda::sequence_logps(dws.p, bytes, one, so, counts, tok, static_cast<double*>(dy.p)));
    add("sequence: sums on workspace",
        dpo::cuda::sequence_logps(dws.p, bytes, one, static_cast<double*>(dws.p) + 3, counts, tok, rl));
    add("pair: chosen on rejected", dpo::cuda::pair_logps(dws.p, bytes, policy, 1.0, so, so + 1));
    add("pair: rejected on logits.rejected",
        dpo::cuda::pair_logps(dws.p, bytes, policy, 1.0, so, reinterpret_cast<double*>(dz.as<float>() + half * V)));
    add("pair: chosen on workspace", dpo::cuda::pair_logps(dws.p, bytes, policy, 1.0, static_cast<double*>(dws.p), so));
  }
  add("sequence_backward: grad on seq_grad",
      dpo::cuda::sequence_logps_backward(dws.p, bytes, policy.chosen, lse, dseq.as<double>(),
                                         reinterpret_cast<float*>(dseq.p), V));
  DPO_CK(cudaDeviceSynchronize());
  r.untouched = true;
  for (std::size_t k = 0; k < before.size(); ++k)
    r.untouched = r.untouched && all[k]->get<unsigned char>(all[k]->n) == before[k];
  // The in-place gradient over the logits (also the reference's here) stays valid.
  {
    const dpo::pair_grad_view<float> in_place{dz.as<float>(), V, dz.as<float>(), V};
    const dpo::cuda::status st = dpo::cuda::dpo_forward_backward(dws.p, bytes, policy, reference, cfg, out, in_place);
    r.loss_in_place = st.ok() ? std::string() : std::string(st.message);
    DPO_CK(cudaDeviceSynchronize());
  }
  return r;
}

std::string empty_call_error(bool backward, bool previous_error) {
  const std::int64_t T = 3, V = 5;
  std::vector<float> logits(static_cast<std::size_t>(2 * T * V), 0.25f);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(2 * T), 1);
  dev_buf dz(logits.size() * sizeof(float)), dy(labels.size() * 8), dsum(16), dcount(16), dws(1 << 16),
      dgrad(logits.size() * sizeof(float)), dlse(2 * T * 8), dseq(16);
  dz.put(logits.data(), logits.size() * sizeof(float));
  dws.fill(0xa5);
  const float* z = dz.as<float>();
  std::size_t bytes = dws.n;
  if (previous_error) {  // a label outside [0, V) leaves its error in the word
    labels[1] = V + 3;
    dy.put(labels.data(), labels.size() * 8);
    const auto bad = dpo::padded_pairs(z, dy.as<std::int64_t>(), 2, T, V, V).chosen;
    DPO_CK(dpo::cuda::sequence_logps(dws.p, bytes, bad, dsum.as<double>(), dcount.as<std::int64_t>()).code);
    if (dpo::cuda::read_device_error(dws.p).code == cudaSuccess) return "the previous call found no error";
  }
  // Valid views with nothing to do: no sequence, or sequences of no row (T = 0).
  auto none = dpo::padded_pairs(z, dy.as<std::int64_t>(), 2, T, V, V).chosen;
  none.num_seqs = 0;
  auto no_rows = dpo::padded_pairs(z, dy.as<std::int64_t>(), 2, 0, V, V).chosen;
  bytes = dws.n;
  const dpo::cuda::status s =
      backward ? dpo::cuda::sequence_logps_backward(dws.p, bytes, no_rows, dlse.as<double>(), dseq.as<double>(),
                                                    dgrad.as<float>(), V)
               : dpo::cuda::sequence_logps(dws.p, bytes, none, dsum.as<double>(), dcount.as<std::int64_t>());
  if (!s.ok()) return std::string("the call failed: ") + s.message;
  return dpo::cuda::read_device_error(dws.p).message;
}

std::string check_message(const dpo::pair_view<float, std::int64_t>& view,
                          const dpo::pair_grad_view<float>* grad, std::int64_t num_rows) {
  dpo::cuda::options opt;
  opt.num_rows = num_rows;
  std::int64_t cap[2] = {0, 0};
  dpo::cuda::status s = dpo::cuda::detail::check_pairs(view, "logits", opt, cap, true);
  if (s && grad != nullptr) s = dpo::cuda::detail::check_grad(view, *grad, opt);
  return s.message;
}

}  // namespace dpo_cuda_test
