// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the tests of DPO from hidden states: uploads a case, runs
// dpo::cuda::linear_dpo (or linear_dpo_forward + linear_dpo_backward) with a cuBLASLt handle
// and copies every result back. The Catch2 tests (g++) compare them with dpo::cpu::linear_dpo.
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <dpo/cuda/linear_dpo.cuh>

#include "device_buffer.hpp"
#include "linear_dpo_harness.hpp"

namespace dpo_cuda_test {
namespace {

template <class T, class L>
dpo::cuda::hidden_pairs<T, L> pairs_of(const ldpo_case& c, const T* h0, const T* h1, const L* lab0, const L* lab1,
                                                   const std::uint8_t* m0, const std::uint8_t* m1,
                                                   const std::int64_t* cu) {
  switch (c.layout) {
    case ldpo_layout::padded: return dpo::cuda::linear_padded_pairs(h0, c.H, c.H, lab0, 2 * c.P, c.T, m0);
    case ldpo_layout::packed: return dpo::cuda::linear_packed_pairs(h0, c.H, c.H, lab0, cu, 2 * c.P, m0);
    case ldpo_layout::separate:
      return dpo::cuda::linear_separate_pairs(h0, lab0, h1, lab1, c.P, c.T, c.H, c.H, m0, m1);
  }
  throw std::runtime_error("bad layout");
}

template <class T, class L, class G>
ldpo_out run_typed(const ldpo_case& c) {
  ldpo_out out;
  const std::int64_t P = c.P, H = c.H, V = c.V, R = c.rows;
  const std::size_t es = sizeof(T);
  const bool sep = c.layout == ldpo_layout::separate;
  const std::int64_t R0 = sep ? P * c.T : R;  // rows of the first buffer
  const std::int64_t R1 = sep ? P * c.T : 0;
  const auto upload_rows = [&](const std::vector<unsigned char>& src, dev_buf& a, dev_buf& b, std::size_t row_bytes) {
    a.put(src.data(), static_cast<std::size_t>(R0) * row_bytes);
    if (sep) b.put(src.data() + static_cast<std::size_t>(R0) * row_bytes, static_cast<std::size_t>(R1) * row_bytes);
  };
  dev_buf h0(R0 * H * es), h1(R1 * H * es), weight(c.weight.size()), bias(c.bias.size());
  upload_rows(c.hidden, h0, h1, H * es);
  const T* hidden1 = c.share_rows ? h0.as<const T>() : h1.as<const T>();
  weight.put(c.weight.data(), c.weight.size());
  bias.put(c.bias.data(), c.bias.size());
  const std::vector<L> lab(c.labels.begin(), c.labels.end());
  std::vector<unsigned char> lab_bytes(lab.size() * sizeof(L));
  std::memcpy(lab_bytes.data(), lab.data(), lab_bytes.size());
  dev_buf l0(R0 * sizeof(L)), l1(R1 * sizeof(L));
  upload_rows(lab_bytes, l0, l1, sizeof(L));
  dev_buf m0(c.mask.empty() ? 0 : R0), m1(c.mask.empty() ? 0 : R1);
  if (!c.mask.empty()) upload_rows(std::vector<unsigned char>(c.mask.begin(), c.mask.end()), m0, m1, 1);
  dev_buf cu(c.cu_seqlens.size() * 8);
  cu.put(c.cu_seqlens.data(), cu.n);
  const auto policy =
      pairs_of<T, L>(c, h0.as<const T>(), sep ? hidden1 : nullptr, l0.as<const L>(),
                     sep ? l1.as<const L>() : nullptr, m0.n ? m0.as<const std::uint8_t>() : nullptr,
                  m1.n ? m1.as<const std::uint8_t>() : nullptr, cu.n ? cu.as<const std::int64_t>() : nullptr);
  dpo::cuda::linear_head<T> head;
  head.weight = weight.as<const T>();
  head.vocab = V;
  head.hidden = H;
  head.weight_stride = H;
  head.bias = c.bias.empty() ? nullptr : bias.as<const T>();
  head.bias_size = c.bias.empty() ? 0 : V;
  head.transforms = c.transforms;
  // The reference.
  dev_buf ref_logps(c.ref_logps.size() * 8);
  ref_logps.put(c.ref_logps.data(), ref_logps.n);
  dev_buf rh0(c.ref_from_hidden ? R0 * H * es : 0), rh1(c.ref_from_hidden ? R1 * H * es : 0);
  dev_buf rw(c.ref_weight.size()), rb(c.ref_bias.size());
  if (c.ref_from_hidden) upload_rows(c.ref_hidden, rh0, rh1, H * es);
  rw.put(c.ref_weight.data(), rw.n);
  rb.put(c.ref_bias.data(), rb.n);
  const auto ref = pairs_of<T, L>(c, rh0.as<const T>(), sep ? rh1.as<const T>() : nullptr, l0.as<const L>(),
                                  sep ? l1.as<const L>() : nullptr,
                               m0.n ? m0.as<const std::uint8_t>() : nullptr,
                               m1.n ? m1.as<const std::uint8_t>() : nullptr,
                               cu.n ? cu.as<const std::int64_t>() : nullptr);
  dpo::cuda::linear_head<T> ref_head = head;
  ref_head.weight = rw.as<const T>();
  ref_head.bias = c.ref_bias.empty() ? nullptr : rb.as<const T>();
  ref_head.bias_size = c.ref_bias.empty() ? 0 : V;
  const double* rc = c.ref_logps.empty() ? nullptr : ref_logps.as<const double>();
  const double* rr = c.ref_logps.empty() ? nullptr : ref_logps.as<const double>() + P;

  dpo::cuda::linear_dpo_options opt;
  opt.chunk_rows = c.chunk_rows;
  opt.num_rows = c.layout == ldpo_layout::packed ? R : -1;
  opt.gemm_workspace_bytes = 1 << 20;
  opt.workspace_bytes = c.workspace_bytes;
  opt.mode = c.mode;
  opt.metrics = c.metrics;
  std::vector<std::int64_t> host_cu = c.cu_seqlens;
  for (std::size_t i = 1; i < host_cu.size(); ++i) host_cu[i] += c.host_cu_shift;
  if (c.layout == ldpo_layout::packed && c.host_cu) opt.host_cu_seqlens = host_cu.data();

  // Outputs: doubles poisoned, gradients filled with c.fill.
  const int nm = dpo::num_metrics;
  const std::vector<double> poison(static_cast<std::size_t>(dpo::num_pair_outputs * P + nm + 2 * R + 8), 12345.0);
  dev_buf dd(poison.size() * 8);
  dd.put(poison.data(), dd.n);
  double* base = dd.as<double>();
  dpo::forward_outputs fo;
  fo.loss = base;
  fo.metrics = reinterpret_cast<dpo::metrics*>(base + 8);
  fo.set_pair_outputs(base + 8 + nm, P);
  double* row_lse = base + 8 + nm + dpo::num_pair_outputs * P;
  double* row_coef = row_lse + R;
  if (c.split) {
    fo.row_lse = row_lse;
    fo.row_coef = row_coef;
  }
  dev_buf go(8);
  go.put(&c.grad_output, 8);
  const std::size_t gsz = sizeof(G);
  dev_buf dh0(c.want_hidden ? R0 * H * es : 0), dh1(c.want_hidden ? R1 * H * es : 0);
  dev_buf dw(V * H * gsz), db(c.bias.empty() || !c.want_bias ? 0 : V * gsz);
  dh0.fill(c.fill);
  dh1.fill(c.fill);
  dw.fill(c.fill);
  db.fill(c.fill);
  dpo::cuda::linear_dpo_grads<T, G> g;
  if (c.want_hidden) {
    g.chosen_hidden = dh0.as<T>();
    g.rejected_hidden = sep ? dh1.as<T>() : dh0.as<T>();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
  }
  g.accumulate_hidden = c.accumulate_hidden;
  g.weight = c.dweight_on_weight ? reinterpret_cast<G*>(weight.p) : dw.as<G>();
  g.weight_stride = H;
  g.bias = db.n ? db.as<G>() : nullptr;

  cublasLtHandle_t handle = nullptr;
  if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
  cudaStream_t stream = nullptr;
  DPO_CK(cudaStreamCreate(&stream));
  const auto finish = [&](const dpo::cuda::status& s) {
    out.code = static_cast<int>(s.code);
    out.message = s.message;
    return s.ok();
  };
  const auto call = [&](void* ws, std::size_t& bytes, cublasLtHandle_t hd, int phase) {
    // phase 0: the fused call or the forward; 1: the backward of the split.
    if (c.pair_logps)
      return dpo::cuda::linear_pair_logps(ws, bytes, hd, policy, head, 1.0, fo.losses, fo.losses + P, opt, stream);
    if (phase == 1)
      return dpo::cuda::linear_dpo_backward(ws, bytes, hd, policy, head, row_lse, row_coef, g,
                                            go.as<const double>(), opt, stream);
    if (c.split)
      return c.ref_from_hidden
                 ? dpo::cuda::linear_dpo_forward(ws, bytes, hd, policy, head, ref, ref_head, c.cfg, fo, opt, stream)
                 : dpo::cuda::linear_dpo_forward(ws, bytes, hd, policy, head, rc, rr, c.cfg, fo, opt, stream);
    return c.ref_from_hidden ? dpo::cuda::linear_dpo(ws, bytes, hd, policy, head, ref, ref_head, c.cfg, fo, g, opt,
                                                     go.as<const double>(), stream)
                             : dpo::cuda::linear_dpo(ws, bytes, hd, policy, head, rc, rr, c.cfg, fo, g, opt,
                                                     go.as<const double>(), stream);
  };
  std::size_t bytes = 0;
  bool ok = finish(call(nullptr, bytes, handle, 0));
  if (ok && c.split) {
    std::size_t b2 = 0;
    ok = finish(call(nullptr, b2, handle, 1));
    if (b2 > bytes) bytes = b2;
  }
  if (ok && !c.split && !c.pair_logps) {
    dpo::cuda::linear_dpo_plan plan;
    ok = finish(c.ref_from_hidden ? dpo::cuda::linear_dpo_workspace_size(policy, head, ref, ref_head, c.cfg, opt, &plan)
                                  : dpo::cuda::linear_dpo_workspace_size(policy, head, c.cfg, opt, &plan));
    if (ok && plan.workspace_bytes != static_cast<std::int64_t>(bytes))
      throw std::runtime_error("linear_dpo_workspace_size and the size query disagree");
    out.mode = plan.mode;
  }
  out.workspace_bytes = static_cast<std::int64_t>(bytes);
  dev_buf work(ok ? bytes : 0);
  if (ok) work.fill(0xa5);
  std::size_t given = c.short_workspace ? bytes - 1 : bytes;
  if (ok) ok = finish(call(work.p, given, c.null_handle ? nullptr : handle, 0));
  if (ok && c.split) ok = finish(call(work.p, given, handle, 1));
  DPO_CK(cudaStreamSynchronize(stream));
  DPO_CK(cudaGetLastError());
  if (work.n > 0 && out.code == 0) {
    const dpo::cuda::status de = dpo::cuda::read_device_error(work.p, stream);
    dpo::cuda::device_error e{};
    DPO_CK(cudaMemcpy(&e, work.p, sizeof(e), cudaMemcpyDeviceToHost));
    out.device_error = e.code;
    out.device_message = de.message;
  }
  const std::vector<double> all = dd.get<double>(poison.size());
  out.loss = all[0];
  out.metrics.assign(all.begin() + 8, all.begin() + 8 + nm);
  out.pairs.assign(all.begin() + 8 + nm, all.begin() + 8 + nm + dpo::num_pair_outputs * P);
  if (c.split) {
    const auto rows_at = all.begin() + 8 + nm + dpo::num_pair_outputs * P;
    out.row_lse.assign(rows_at, rows_at + R);
    out.row_coef.assign(rows_at + R, rows_at + 2 * R);
  }
  if (dh0.n) {
    out.dhidden = dh0.get<unsigned char>(dh0.n);
    const std::vector<unsigned char> b = dh1.get<unsigned char>(dh1.n);
    out.dhidden.insert(out.dhidden.end(), b.begin(), b.end());
  }
  out.dweight = dw.get<unsigned char>(dw.n);
  if (db.n) out.dbias = db.get<unsigned char>(db.n);
  cudaStreamDestroy(stream);
  cublasLtDestroy(handle);
  return out;
}


template <class T>
ldpo_plan_out plan_typed(std::int64_t P, std::int64_t T_, std::int64_t H, std::int64_t V, bool ref_from_hidden) {
  const auto pairs = dpo::cuda::linear_padded_pairs(static_cast<const T*>(nullptr), H, H,
                                                    static_cast<const std::int64_t*>(nullptr), 2 * P, T_);
  const auto head = dpo::make_linear_head<T>(nullptr, V, H, H);
  const dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  dpo::cuda::linear_dpo_plan plan;
  const dpo::cuda::status s = ref_from_hidden
                                  ? dpo::cuda::linear_dpo_workspace_size(pairs, head, pairs, head, cfg, {}, &plan)
                                  : dpo::cuda::linear_dpo_workspace_size(pairs, head, cfg, {}, &plan);
  ldpo_plan_out o;
  o.code = static_cast<int>(s.code);
  o.message = s.message;
  o.mode = plan.mode;
  o.chunk_rows = plan.chunk_rows;
  o.workspace_bytes = plan.workspace_bytes;
  o.gemm_workspace_bytes = plan.gemm_workspace_bytes;
  return o;
}

}  // namespace

ldpo_plan_out plan_linear_dpo(dtype type, std::int64_t P, std::int64_t T, std::int64_t H, std::int64_t V,
                              bool ref_from_hidden) {
  return with_device_types(type, false, true, [&](auto t, auto, auto) {
    return plan_typed<decltype(t)>(P, T, H, V, ref_from_hidden);
  });
}

ldpo_out run_linear_dpo(const ldpo_case& c) {
  return with_device_types(c.type, c.fp32_grads, !c.labels32,
                           [&](auto t, auto g, auto l) { return run_typed<decltype(t), decltype(l), decltype(g)>(c); });
}

packed_shared_out run_packed_shared_rows(const std::vector<float>& hidden, const std::vector<float>& weight,
                                         const std::vector<std::int64_t>& labels,
                                         const std::vector<std::int64_t>& cu_seqlens) {
  using I = std::int64_t;
  const I H = 4, V = 6, R = static_cast<I>(labels.size()), S = static_cast<I>(cu_seqlens.size()) - 1, P = S / 2;
  dev_buf dh(hidden.size() * 4), dw(weight.size() * 4), dy(labels.size() * 8), dcu(cu_seqlens.size() * 8),
      dref(static_cast<std::size_t>(2 * P) * 8), dd(static_cast<std::size_t>(8 + 2 * R) * 8), dgw(weight.size() * 4);
  dh.put(hidden.data(), dh.n);
  dw.put(weight.data(), dw.n);
  dy.put(labels.data(), dy.n);
  dcu.put(cu_seqlens.data(), dcu.n);
  dref.fill(0);
  dd.fill(0);
  dgw.fill(0);
  auto policy = dpo::cuda::linear_packed_pairs(dh.as<const float>(), H, H, dy.as<const I>(), dcu.as<const I>(), S);
  policy.pairs.rejected = policy.pairs.chosen;  // both sides on sequences [0, P): the same rows
  dpo::cuda::linear_head<float> head;
  head.weight = dw.as<const float>();
  head.vocab = V;
  head.hidden = H;
  head.weight_stride = H;
  dpo::cuda::linear_dpo_options opt;
  opt.num_rows = R;
  opt.workspace_bytes = 1 << 20;
  opt.gemm_workspace_bytes = 1 << 16;
  const dpo::loss_config cfg;
  cublasLtHandle_t lt = nullptr;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
  packed_shared_out r;
  double* d = dd.as<double>();
  dpo::forward_outputs split;
  split.loss = d;
  split.row_lse = d + 8;
  split.row_coef = d + 8 + R;
  std::size_t bytes = 0;
  dpo::cuda::status s = dpo::cuda::linear_dpo_forward(nullptr, bytes, lt, policy, head, dref.as<const double>(),
                                                       dref.as<const double>() + P, cfg, split, opt);
  if (s.ok()) {
    dev_buf ws(bytes);
    s = dpo::cuda::linear_dpo_forward(ws.p, bytes, lt, policy, head, dref.as<const double>(),
                                      dref.as<const double>() + P, cfg, split, opt);
  }
  r.row_state_message = s.message;
  dpo::forward_outputs out;
  out.loss = d;
  dpo::cuda::linear_dpo_grads<float, float> g;
  g.weight = dgw.as<float>();
  g.weight_stride = H;
  bytes = 0;
  s = dpo::cuda::linear_dpo(nullptr, bytes, lt, policy, head, dref.as<const double>(), dref.as<const double>() + P,
                            cfg, out, g, opt);
  if (s.ok()) {
    dev_buf ws(bytes);
    s = dpo::cuda::linear_dpo(ws.p, bytes, lt, policy, head, dref.as<const double>(), dref.as<const double>() + P,
                              cfg, out, g, opt);
    if (s.ok()) s = dpo::cuda::read_device_error(ws.p);
  }
  r.code = static_cast<int>(s.code);
  if (s.ok()) {
    r.loss = dd.get<double>(1)[0];
    r.dweight = dgw.get<float>(weight.size());
  } else {
    r.row_state_message += std::string(" | linear_dpo: ") + s.message;
  }
  cublasLtDestroy(lt);
  return r;
}

linear_alias_out linear_output_alias_errors() {
  using I = std::int64_t;
  const I P = 2, T = 3, H = 4, V = 6, R = 2 * P * T;
  std::vector<float> hidden(static_cast<std::size_t>(R * H)), weight(static_cast<std::size_t>(V * H));
  for (std::size_t i = 0; i < hidden.size(); ++i) hidden[i] = 0.05f * static_cast<float>(i % 11) - 0.2f;
  for (std::size_t i = 0; i < weight.size(); ++i) weight[i] = 0.03f * static_cast<float>(i % 13) - 0.1f;
  std::vector<I> labels(static_cast<std::size_t>(R));
  for (I r = 0; r < R; ++r) labels[static_cast<std::size_t>(r)] = r % T == 0 ? -100 : r % V;
  std::vector<double> ref(static_cast<std::size_t>(2 * P), -1.5);
  dev_buf dh(hidden.size() * 4), drh(hidden.size() * 4), dw(weight.size() * 4), drw(weight.size() * 4),
      db(static_cast<std::size_t>(V) * 4), dy(labels.size() * 8), dref(ref.size() * 8),
      dout(static_cast<std::size_t>(dpo::num_pair_outputs * P) * 8), dloss(8), drow(static_cast<std::size_t>(2 * R) * 8),
      dgh(hidden.size() * 4), dgw(weight.size() * 4), dgb(static_cast<std::size_t>(V) * 4), dws(4 << 20);
  dh.put(hidden.data(), dh.n);
  drh.put(hidden.data(), drh.n);
  dw.put(weight.data(), dw.n);
  drw.put(weight.data(), drw.n);
  db.fill(0);
  dy.put(labels.data(), dy.n);
  dref.put(ref.data(), dref.n);
  for (dev_buf* b : {&dout, &dloss, &drow, &dgh, &dgw, &dgb, &dws}) b->fill(0x5a);
  const dev_buf* all[] = {&dh, &drh, &dw, &drw, &db, &dy, &dref, &dout, &dloss, &drow, &dgh, &dgw, &dgb, &dws};
  std::vector<std::vector<unsigned char>> before;
  for (const dev_buf* b : all) before.push_back(b->get<unsigned char>(b->n));

  const auto policy = dpo::cuda::linear_padded_pairs(dh.as<const float>(), H, H, dy.as<const I>(), 2 * P, T);
  const auto ref_pol = dpo::cuda::linear_padded_pairs(drh.as<const float>(), H, H, dy.as<const I>(), 2 * P, T);
  dpo::cuda::linear_head<float> head, ref_head;
  head.weight = dw.as<const float>();
  head.bias = db.as<const float>();
  head.bias_size = V;
  ref_head.weight = drw.as<const float>();
  for (dpo::cuda::linear_head<float>* h : {&head, &ref_head}) {
    h->vocab = V;
    h->hidden = H;
    h->weight_stride = H;
  }
  dpo::cuda::linear_dpo_grads<float, float> g;
  g.chosen_hidden = g.rejected_hidden = dgh.as<float>();
  g.chosen_hidden_stride = g.rejected_hidden_stride = H;
  g.weight = dgw.as<float>();
  g.weight_stride = H;
  g.bias = dgb.as<float>();
  dpo::cuda::linear_dpo_options opt;
  opt.workspace_bytes = 1 << 20;
  opt.gemm_workspace_bytes = 1 << 16;
  const dpo::loss_config cfg;
  const double* rc = dref.as<const double>();
  const double* rr = rc + P;
  double* o = dout.as<double>();
  const auto valid = [&] {
    dpo::forward_outputs out;
    out.loss = dloss.as<double>();
    out.set_pair_outputs(o, P);
    return out;
  };
  cublasLtHandle_t lt = nullptr;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
  linear_alias_out r;
  const auto add = [&](const char* what, const dpo::cuda::status& st) {
    r.cases.push_back({what, st.ok() ? std::string() : std::string(st.message)});
  };
  std::size_t bytes = dws.n;
  {
    dpo::forward_outputs out = valid();
    out.losses = out.chosen_rewards;
    bytes = dws.n;
    add("linear_dpo: out.losses on out.chosen_rewards",
        dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.rejected_rewards = const_cast<double*>(rr);
    bytes = dws.n;
    add("linear_dpo: out.rejected_rewards on ref_rejected_logps",
        dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.loss = reinterpret_cast<double*>(dh.as<float>() + 5 * H);
    bytes = dws.n;
    add("linear_dpo: out.loss on hidden", dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.weights = reinterpret_cast<double*>(dgw.p);
    bytes = dws.n;
    add("linear_dpo: out.weights on grads.weight",
        dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.chosen_logps = reinterpret_cast<double*>(drh.p);
    bytes = dws.n;
    add("linear_dpo (reference hidden): out.chosen_logps on ref_hidden",
        dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, ref_pol, ref_head, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.grad_rejected = reinterpret_cast<double*>(db.p);
    bytes = dws.n;
    add("linear_dpo (reference hidden): out.grad_rejected on bias",
        dpo::cuda::linear_dpo(dws.p, bytes, lt, policy, head, ref_pol, ref_head, cfg, out, g, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.row_lse = drow.as<double>();
    out.row_coef = out.row_lse + R / 2;
    bytes = dws.n;
    add("linear_dpo_forward: out.row_lse on out.row_coef",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.chosen_tokens = reinterpret_cast<double*>(dy.as<I>() + 7);
    bytes = dws.n;
    add("linear_dpo_forward: out.chosen_tokens on labels.chosen",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.losses = const_cast<double*>(rc);
    bytes = dws.n;
    add("linear_dpo_forward: out.losses on ref_chosen_logps",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.metrics = reinterpret_cast<dpo::metrics*>(dws.p);
    bytes = dws.n;
    add("linear_dpo_forward: out.metrics on workspace",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, rc, rr, cfg, out, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.nll_token_grad = reinterpret_cast<double*>(drw.as<float>() + 2);
    bytes = dws.n;
    add("linear_dpo_forward (reference hidden): out.nll_token_grad on ref_head.weight",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, ref_pol, ref_head, cfg, out, opt));
  }
  {
    dpo::forward_outputs out = valid();
    out.row_lse = reinterpret_cast<double*>(dh.p);
    bytes = dws.n;
    add("linear_dpo_forward (reference hidden): out.row_lse on hidden",
        dpo::cuda::linear_dpo_forward(dws.p, bytes, lt, policy, head, ref_pol, ref_head, cfg, out, opt));
  }
  bytes = dws.n;
  add("linear_pair_logps: chosen on rejected", dpo::cuda::linear_pair_logps(dws.p, bytes, lt, policy, head, 1.0, o, o + 1, opt));
  bytes = dws.n;
  add("linear_pair_logps: rejected on hidden",
      dpo::cuda::linear_pair_logps(dws.p, bytes, lt, policy, head, 1.0, o, reinterpret_cast<double*>(dh.p), opt));
  bytes = dws.n;
  add("linear_pair_logps: chosen on workspace",
      dpo::cuda::linear_pair_logps(dws.p, bytes, lt, policy, head, 1.0, static_cast<double*>(dws.p) + 8, o, opt));
  DPO_CK(cudaDeviceSynchronize());
  r.untouched = true;
  for (std::size_t k = 0; k < before.size(); ++k)
    r.untouched = r.untouched && all[k]->get<unsigned char>(all[k]->n) == before[k];
  cublasLtDestroy(lt);
  return r;
}

}  // namespace dpo_cuda_test
