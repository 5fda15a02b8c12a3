// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the fused head shard's tests: uploads one rank's case, runs phase 1, or
// phase 2 and the backward, of dpo/cuda/linear_shard.cuh with a cuBLASLt handle and copies
// every result back. The Catch2 tests (g++) combine the ranks' records and compare with
// dpo::cpu's sharded and unsharded heads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <dpo/cuda/linear_shard.cuh>

#include "device_buffer.hpp"
#include "shard_linear_harness.hpp"

namespace dpo_cuda_test {
namespace {

/// A device copy of a host vector (none when empty).
struct dev_vec : dev_buf {
  template <class U>
  explicit dev_vec(const std::vector<U>& v) : dev_buf(v.size() * sizeof(U)) {
    put(v.data(), n);
  }
};

/// A cuBLASLt handle and a stream, released on scope exit.
struct handle_and_stream {
  cublasLtHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
  handle_and_stream() {
    if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
    DPO_CK(cudaStreamCreate(&stream));
  }
  ~handle_and_stream() {
    cudaStreamDestroy(stream);
    cublasLtDestroy(handle);
  }
};

/// What both runs share: the first failing status (kept in out.code / out.message), the
/// device error word read back at the end, poisoned outputs, the head of the case's shard.
template <class Out>
struct run_state {
  Out out;
  handle_and_stream hs;

  /// Records s when it is the first failure; returns whether it succeeded.
  bool record(const dpo::cuda::status& s) {
    if (!s && out.code == 0) {
      out.code = static_cast<int>(s.code);
      out.message = s.message;
    }
    return s.ok();
  }
  /// `given`, or `count` poison values.
  static dev_vec poisoned(std::size_t count, const std::vector<double>& given = {}) {
    return dev_vec(given.empty() ? std::vector<double>(count, 12345.0) : given);
  }
  /// Waits for the stream, then reads the workspace's error word (its first bytes) into out.
  void finish(const dev_buf& work) {
    DPO_CK(cudaStreamSynchronize(hs.stream));
    DPO_CK(cudaGetLastError());
    dpo::cuda::device_error e{};
    if (work.n > 0 && out.code == 0) DPO_CK(cudaMemcpy(&e, work.p, sizeof e, cudaMemcpyDeviceToHost));
    out.device_error = e.code;
    out.device_message = dpo::cuda::describe(e).message;
  }
};

/// The case's head: its weight rows (width, or the shard's), its bias when given.
template <class T, class Case>
dpo::linear_head<T> case_head(const Case& c, const dev_vec& weight, const dev_vec& bias) {
  const std::int64_t W = c.width >= 0 ? c.width : c.sh.width();
  return dpo::make_linear_head(weight.as<const T>(), W, c.hidden_cols, c.hidden_cols,
                               c.bias.empty() ? nullptr : bias.as<const T>(), c.transforms);
}

/// The gradient buffers of `rows` hidden rows and a head of `head.vocab` rows: dHidden poisoned
/// (0x7f bytes), dWeight and dBias zeros (they are added to).
template <class T>
struct grad_buffers {
  dev_buf dh, dw, db;
  grad_buffers(std::int64_t rows, const dpo::linear_head<T>& head)
      : dh(static_cast<std::size_t>(rows * head.hidden) * sizeof(T)),
        dw(static_cast<std::size_t>(head.vocab * head.hidden) * sizeof(T)),
        db(head.bias != nullptr ? static_cast<std::size_t>(head.vocab) * sizeof(T) : 0) {
    dh.fill(0x7f);
    dw.fill(0);
    db.fill(0);
  }
  template <class Out>
  void copy_to(Out& out) const {
    out.dhidden = dh.get<unsigned char>(dh.n);
    out.dweight = dw.get<unsigned char>(dw.n);
    out.dbias = db.get<unsigned char>(db.n);
  }
};

template <class T, class L>
shard_linear_out run_typed(const shard_linear_case& c) {
  run_state<shard_linear_out> st;
  const std::int64_t N = c.rows, H = c.hidden_cols;
  const std::size_t n = static_cast<std::size_t>(N), F = static_cast<std::size_t>(dpo::shard_fields);
  const dev_vec hidden(c.hidden), weight(c.weight), bias(c.bias), mask(c.mask);
  const dev_vec labels(std::vector<L>(c.labels.begin(), c.labels.end()));
  const dpo::linear_head<T> head = case_head<T>(c, weight, bias);
  const dpo::linear_view<T, L> v = dpo::linear_view_of(hidden.as<const T>(), N, H, head, labels.as<const L>(),
                                                       c.mask.empty() ? nullptr : mask.as<const std::uint8_t>());
  dpo::cuda::linear_options opt;
  opt.chunk_rows = c.chunk_rows;
  opt.chunk_vocab = c.chunk_vocab;
  opt.gemm_workspace_bytes = 1 << 20;
  const cublasLtHandle_t handle = st.hs.handle;
  const cudaStream_t stream = st.hs.stream;
  // The size query of linear_workspace_size serves every call on the shard's view.
  dpo::cuda::linear_chunking ch;
  const bool sized = st.record(dpo::cuda::linear_workspace_size(v, opt, &ch));
  dev_buf work(sized ? static_cast<std::size_t>(ch.workspace_bytes) : 0);
  work.fill(0xa5);
  std::size_t bytes = work.n;
  dev_vec rec = st.poisoned(n * F, c.records), mx = st.poisoned(n, c.row_max);
  double* recp = c.null_records ? nullptr : rec.as<double>();
  dev_vec logp = st.poisoned(n), lse = st.poisoned(n), ent = st.poisoned(n), zmean = st.poisoned(n),
          wpo = st.poisoned(n), hit = st.poisoned(n);
  const grad_buffers<T> gb(N, head);
  if (sized && c.records.empty()) {
    std::size_t asked = 0;
    if (st.record(dpo::cuda::linear_shard_partials(nullptr, asked, handle, v, c.sh, recp, mx.as<double>(),
                                                   c.metrics, opt, stream)) &&
        asked != bytes)
      throw std::runtime_error("linear_shard_partials' size query and linear_workspace_size disagree");
    st.record(dpo::cuda::linear_shard_partials(work.p, bytes, handle, v, c.sh, recp, mx.as<double>(), c.metrics,
                                               opt, stream));
  } else if (sized) {
    dpo::cuda::detail::shard_row_outputs o;
    o.logp = logp.as<double>();
    o.lse = lse.as<double>();
    o.entropy = ent.as<double>();
    o.zmean = zmean.as<double>();
    o.wpo = wpo.as<double>();
    o.hit = hit.as<double>();
    st.record(dpo::cuda::linear_shard_logps(v, c.sh.vocab, mx.as<double>(), recp, o, stream));
    const dev_vec gl(c.grad_logps), ge(c.grad_entropy);
    const bool with_entropy = !c.grad_entropy.empty();
    dpo::linear_grads<T, T> g;
    g.hidden = gb.dh.template as<T>();
    g.hidden_stride = H;
    g.weight = gb.dw.template as<T>();
    g.weight_stride = H;
    g.bias = gb.db.n ? gb.db.template as<T>() : nullptr;
    std::size_t asked = 0;
    if (st.record(dpo::cuda::linear_shard_backward(nullptr, asked, handle, v, c.sh, mx.as<double>(), recp,
                                                   gl.as<double>(), with_entropy ? ent.as<double>() : nullptr,
                                                   with_entropy ? ge.as<double>() : nullptr, g, opt, stream)) &&
        asked != bytes)
      throw std::runtime_error("linear_shard_backward's size query and linear_workspace_size disagree");
    st.record(dpo::cuda::linear_shard_backward(work.p, bytes, handle, v, c.sh, mx.as<double>(), recp,
                                               gl.as<double>(), with_entropy ? ent.as<double>() : nullptr,
                                               with_entropy ? ge.as<double>() : nullptr, g, opt, stream));
  }
  st.finish(work);
  shard_linear_out& out = st.out;
  out.records = rec.get<double>(n * F);
  out.row_max = mx.get<double>(n);
  if (!c.records.empty()) {
    out.logp = logp.get<double>(n);
    out.lse = lse.get<double>(n);
    out.entropy = ent.get<double>(n);
    out.zmean = zmean.get<double>(n);
    out.wpo = wpo.get<double>(n);
    out.hit = hit.get<double>(n);
    gb.copy_to(out);
  }
  return out;
}

template <class T, class L>
pair_shard_out run_pair_typed(const pair_shard_case& c) {
  run_state<pair_shard_out> st;
  const std::int64_t R = c.rows, H = c.hidden_cols, S = c.num_seqs;
  const std::size_t n = static_cast<std::size_t>(R), F = static_cast<std::size_t>(dpo::shard_fields);
  const dev_vec hidden(c.hidden), weight(c.weight), bias(c.bias), cu(c.cu_seqlens);
  const dev_vec labels(std::vector<L>(c.labels.begin(), c.labels.end()));
  const dpo::linear_head<T> head = case_head<T>(c, weight, bias);
  const dpo::hidden_pairs<T, L> pairs =
      c.seq_len > 0 ? dpo::linear_padded_pairs<T, L>(hidden.as<const T>(), H, H, labels.as<const L>(), S, c.seq_len)
                    : dpo::linear_packed_pairs<T, L>(hidden.as<const T>(), H, H, labels.as<const L>(),
                                                     cu.as<const std::int64_t>(), S);
  dpo::cuda::linear_dpo_options opt;
  opt.metrics = c.metrics;
  opt.chunk_rows = c.chunk_rows;
  opt.gemm_workspace_bytes = 1 << 20;
  if (c.seq_len == 0) opt.num_rows = R;
  const cublasLtHandle_t lt = st.hs.handle;
  // One size for the three calls: phase 1's query (the sequences need no more, the backward the same).
  std::size_t bytes = 0;
  const bool sized = st.record(dpo::cuda::linear_pair_shard_partials(nullptr, bytes, lt, pairs, head, c.sh, nullptr,
                                                                     nullptr, nullptr, nullptr, opt));
  dev_buf work(sized ? bytes : 0);
  work.fill(0xa5);
  dev_vec rec = st.poisoned(n * F, c.records), mx = st.poisoned(n, c.row_max);
  dev_vec rec2 = st.poisoned(c.two_arrays ? n * F : 0), mx2 = st.poisoned(c.two_arrays ? n : 0);
  double* rrec = c.two_arrays ? rec2.as<double>() : rec.as<double>();
  double* rmx = c.two_arrays ? mx2.as<double>() : mx.as<double>();
  dev_vec seq = st.poisoned(static_cast<std::size_t>(dpo::seq_fields * S));
  const grad_buffers<T> gb(R, head);
  if (sized && c.records.empty()) {
    st.record(dpo::cuda::linear_pair_shard_partials(work.p, bytes, lt, pairs, head, c.sh, mx.as<double>(),
                                                    rec.as<double>(), rmx, rrec, opt, st.hs.stream));
  } else if (sized) {
    std::size_t asked = 0;
    if (st.record(dpo::cuda::linear_pair_shard_sequences(nullptr, asked, pairs, c.sh, nullptr, nullptr, nullptr,
                                                         nullptr, c.ld_alpha, nullptr, c.metrics, opt)) &&
        asked > bytes)
      throw std::runtime_error("linear_pair_shard_sequences needs more workspace than phase 1");
    st.record(dpo::cuda::linear_pair_shard_sequences(work.p, bytes, pairs, c.sh, mx.as<double>(), rec.as<double>(),
                                                     rmx, rrec, c.ld_alpha, seq.as<double>(), c.metrics, opt,
                                                     st.hs.stream));
    const dev_vec sg(c.seq_grad), nll(std::vector<double>{c.nll_token_grad}), go(std::vector<double>{c.grad_output});
    dpo::linear_dpo_grads<T, T> g;
    g.chosen_hidden = g.rejected_hidden = gb.dh.template as<T>();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    g.accumulate_hidden = c.accumulate_hidden;
    g.weight = gb.dw.template as<T>();
    g.weight_stride = H;
    g.bias = gb.db.n ? gb.db.template as<T>() : nullptr;
    asked = 0;
    if (st.record(dpo::cuda::linear_pair_shard_backward(nullptr, asked, lt, pairs, head, c.sh, nullptr, nullptr,
                                                        nullptr, nullptr, nullptr, nullptr, c.ld_alpha, g, nullptr,
                                                        opt)) &&
        asked != bytes)
      throw std::runtime_error("linear_pair_shard_backward's size query and phase 1's disagree");
    st.record(dpo::cuda::linear_pair_shard_backward(work.p, bytes, lt, pairs, head, c.sh, mx.as<double>(),
                                                    rec.as<double>(), rmx, rrec, sg.as<double>(), nll.as<double>(),
                                                    c.ld_alpha, g, go.as<double>(), opt, st.hs.stream));
  }
  st.finish(work);
  pair_shard_out& out = st.out;
  out.records = rec.get<double>(n * F);
  out.row_max = mx.get<double>(n);
  if (!c.records.empty()) {
    out.seq = seq.get<double>(static_cast<std::size_t>(dpo::seq_fields * S));
    gb.copy_to(out);
  }
  return out;
}

}  // namespace

pair_shard_out run_pair_shard(const pair_shard_case& c) {
  return with_device_types(c.type, false, c.labels64,
                           [&](auto t, auto, auto l) { return run_pair_typed<decltype(t), decltype(l)>(c); });
}

shard_linear_out run_shard_linear(const shard_linear_case& c) {
  return with_device_types(c.type, false, c.labels64,
                           [&](auto t, auto, auto l) { return run_typed<decltype(t), decltype(l)>(c); });
}

std::string linear_empty_call_error(int which, bool previous_error) {
  using I = std::int64_t;
  const I H = 4, V = 5, N = 3;
  const std::vector<float> hidden(N * H, 0.5f), weight(V * H, 0.25f);
  const std::vector<I> bad(N, V + 2);
  dev_buf dh(hidden.size() * sizeof(float)), dw(weight.size() * sizeof(float)), dy(N * sizeof(I)),
      dlp(N * sizeof(double)), dlse(N * sizeof(double));
  dh.put(hidden.data(), hidden.size() * sizeof(float));
  dw.put(weight.data(), weight.size() * sizeof(float));
  dy.put(bad.data(), bad.size() * sizeof(I));
  cublasLtHandle_t lt = nullptr;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
  dpo::cuda::linear_view<float, I> v{dh.as<float>(), N, H, H, dw.as<float>(), V, H, H, nullptr, 0, dy.as<I>(),
                                      nullptr, -100, {}};
  std::size_t bytes = 0;
  dpo::cuda::status s = dpo::cuda::linear_logps(nullptr, bytes, lt, v, dlp.as<double>(), nullptr, dlse.as<double>());
  dev_buf ws(bytes);
  ws.fill(0xa5);
  std::string out;
  if (s.ok() && previous_error) {  // the labels are out of range: this call leaves its error in the word
    s = dpo::cuda::linear_logps(ws.p, bytes, lt, v, dlp.as<double>(), nullptr, dlse.as<double>());
    if (s.ok() && dpo::cuda::read_device_error(ws.p).ok()) out = "the previous call found no error";
  }
  dpo::cuda::linear_view<float, I> none = v;  // valid, with nothing to compute
  none.rows = 0;
  const dpo::vocab_shard sh{V, 0, V};
  const dpo::cuda::linear_grads<float> g;
  if (s.ok() && out.empty()) {
    switch (which) {
      case 0: s = dpo::cuda::linear_logps(ws.p, bytes, lt, none, (double*)nullptr, nullptr, (double*)nullptr); break;
      case 1:
        s = dpo::cuda::linear_logps_backward(ws.p, bytes, lt, none, (const double*)nullptr, (const double*)nullptr,
                                             nullptr, nullptr, g);
        break;
      case 2: s = dpo::cuda::linear_shard_partials(ws.p, bytes, lt, none, sh, nullptr, nullptr, false); break;
      default:
        s = dpo::cuda::linear_shard_backward(ws.p, bytes, lt, none, sh, nullptr, nullptr, nullptr, nullptr, nullptr, g);
    }
    out = s.ok() ? dpo::cuda::read_device_error(ws.p).message : std::string("the call failed: ") + s.message;
  } else if (!s.ok()) {
    out = std::string("setup failed: ") + s.message;
  }
  cublasLtDestroy(lt);
  return out;
}

std::string linear_shard_logps_alias_error(int which, bool* written) {
  using I = std::int64_t;
  const I N = 4, V = 7;
  const I F = dpo::shard_fields;
  // One device buffer: row_max [N], records [N, F], then the six outputs [N] each.
  const I total = N + N * F + 6 * N;
  dev_buf buf(total * sizeof(double)), dy(N * sizeof(I));
  const std::vector<double> start(total, 0.5);
  buf.put(start.data(), total * sizeof(double));
  const std::vector<I> labels{0, 3, -100, 6};
  dy.put(labels.data(), N * sizeof(I));
  double* const b = buf.as<double>();
  const double* row_max = b;
  const double* records = b + N;
  dpo::cuda::detail::shard_row_outputs o;
  double* out = b + N + N * F;
  o.logp = out;
  o.lse = out + N;
  o.entropy = out + 2 * N;
  o.zmean = out + 3 * N;
  o.wpo = out + 4 * N;
  o.hit = out + 5 * N;
  switch (which) {
    case 0: o.logp = b; break;                       // an output on row_max
    case 1: o.lse = b + N + 3; break;                // an output inside the records
    case 2: o.entropy = o.logp + 1; break;           // two outputs on each other
    default: o.hit = reinterpret_cast<double*>(dy.p);  // an output on the labels
  }
  dpo::cuda::linear_view<float, I> v{nullptr, N, 3, 3, nullptr, V, 3, 3, nullptr, 0, dy.as<I>(), nullptr, -100, {}};
  const dpo::cuda::status s = dpo::cuda::linear_shard_logps(v, V, row_max, records, o);
  DPO_CK(cudaDeviceSynchronize());
  *written = buf.get<double>(total) != start || dy.get<I>(N) != labels;
  return s.ok() ? std::string() : std::string(s.message);
}


namespace {

/// The arena of shard_linear_alias_errors: every array of a case in one device buffer of
/// doubles (labels int64, masks bytes, all 8-byte slots), so that an aliased argument is an
/// offset into it and a write anywhere shows as a changed byte.
struct alias_arena {
  static constexpr std::int64_t P = 2, L = 3, R = 2 * P * L, H = 3, V = 7, F = dpo::shard_fields;
  static constexpr std::int64_t S = 2 * P, SF = dpo::seq_fields;
  // Offsets (doubles), each array followed by `pad` unused doubles so that an argument put
  // at an array's start overlaps that array alone: hidden [R, H] (separate layouts: chosen
  // rows [0, R/2), rejected [R/2, R)), weight [V, H], bias [V], labels [R], mask [R] bytes,
  // max [R], records [R, F], a second max and records, seq_grad [S], nll, grad_output,
  // dHidden [R, H], dWeight [V, H], dBias [V], seq [SF, S].
  static constexpr std::int64_t pad = 256;
  static constexpr std::int64_t hidden = 0, weight = hidden + R * H + pad, bias = weight + V * H + pad,
                                labels = bias + V + pad, mask = labels + R + pad, max = mask + R + pad,
                                records = max + R + pad, max2 = records + R * F + pad, records2 = max2 + R + pad,
                                seq_grad = records2 + R * F + pad, nll = seq_grad + S + pad,
                                grad_output = nll + 1 + pad, dh = grad_output + 1 + pad, dw = dh + R * H + pad,
                                db = dw + V * H + pad, seq = db + V + pad, total = seq + SF * S + pad;
  dev_buf buf{total * sizeof(double)};
  std::vector<double> start;
  double* at(std::int64_t off) const { return buf.as<double>() + off; }
};

}  // namespace

shard_linear_alias_out shard_linear_alias_errors() {
  using I = std::int64_t;
  using A = alias_arena;
  namespace dc = dpo::cuda;
  alias_arena a;
  // Host values: hidden rows and head, labels (prompt rows -100), mask all ones, seq_grad.
  std::vector<double> host(static_cast<std::size_t>(A::total), 0.0);
  for (I i = 0; i < A::R * A::H; ++i) host[A::hidden + i] = std::sin(0.37 * static_cast<double>(i) + 0.2);
  for (I i = 0; i < A::V * A::H; ++i) host[A::weight + i] = std::cos(0.3 * static_cast<double>(i) + 0.1);
  for (I i = 0; i < A::V; ++i) host[A::bias + i] = 0.1 * static_cast<double>(i);
  I* labels = reinterpret_cast<I*>(host.data() + A::labels);
  for (I r = 0; r < A::R; ++r) labels[r] = r % A::L == 0 ? -100 : (r * 5 + 1) % A::V;
  std::memset(host.data() + A::mask, 1, static_cast<std::size_t>(A::R));
  const double sg[A::S] = {0.3, -0.2, -0.4, 0.25};
  std::copy(sg, sg + A::S, host.data() + A::seq_grad);
  host[A::nll] = 0.1;
  host[A::grad_output] = 1.0;
  for (I i = 0; i < A::SF * A::S; ++i) host[A::seq + i] = 0.5;  // grad_logps [R] of linear_shard_backward
  a.buf.put(host.data(), host.size() * sizeof(double));

  const dpo::vocab_shard whole{A::V, 0, A::V};
  const dpo::linear_head<double> head =
      dpo::make_linear_head<double>(a.at(A::weight), A::V, A::H, A::H, a.at(A::bias));
  const I* dlabels = reinterpret_cast<const I*>(a.at(A::labels));
  const std::uint8_t* dmask = reinterpret_cast<const std::uint8_t*>(a.at(A::mask));
  const I half = A::R / 2;
  const dpo::hidden_pairs<double, I> padded =
      dpo::linear_padded_pairs<double, I>(a.at(A::hidden), A::H, A::H, dlabels, 2 * A::P, A::L, dmask);
  const dpo::hidden_pairs<double, I> separate = dpo::linear_separate_pairs<double, I>(
      a.at(A::hidden), dlabels, a.at(A::hidden + half * A::H), dlabels + half, A::P, A::L, A::H, A::H, dmask,
      dmask + half);
  const dpo::linear_view<double, I> view =
      dpo::linear_view_of<double, I>(a.at(A::hidden), A::R, A::H, head, dlabels, dmask);
  handle_and_stream hs;
  dc::linear_dpo_options po;
  po.gemm_workspace_bytes = 1 << 20;
  dc::linear_options lo;
  lo.gemm_workspace_bytes = 1 << 20;
  std::size_t pair_bytes = 0, view_bytes = 0;
  dc::status s = dc::linear_pair_shard_partials(nullptr, pair_bytes, hs.handle, padded, head, whole, nullptr, nullptr,
                                                nullptr, nullptr, po);
  if (s) s = dc::linear_shard_partials(nullptr, view_bytes, hs.handle, view, whole, nullptr, nullptr, true, lo);
  std::size_t logps_bytes = 0;
  if (s) s = dc::linear_pair_logps(nullptr, logps_bytes, hs.handle, padded, head, 1.0, nullptr, nullptr, po);
  if (!s) throw std::runtime_error(std::string("alias arena: size query failed: ") + s.message);
  dev_buf work(std::max({pair_bytes, view_bytes, logps_bytes}) + 4096);
  std::size_t bytes = work.n;
  // A valid combined state (one vocabulary rank: phase 1 and the rebase) in both state arrays.
  s = dc::linear_pair_shard_partials(work.p, bytes, hs.handle, padded, head, whole, a.at(A::max), a.at(A::records),
                                     a.at(A::max), a.at(A::records), po, hs.stream);
  if (s) s = dc::shard_rebase(0, A::R, a.at(A::max), a.at(A::records), hs.stream);
  if (s) s = dc::linear_pair_shard_partials(work.p, bytes, hs.handle, padded, head, whole, a.at(A::max2),
                                            a.at(A::records2), a.at(A::max2), a.at(A::records2), po, hs.stream);
  if (s) s = dc::shard_rebase(0, A::R, a.at(A::max2), a.at(A::records2), hs.stream);
  DPO_CK(cudaStreamSynchronize(hs.stream));
  if (!s) throw std::runtime_error(std::string("alias arena: setup failed: ") + s.message);
  a.start = a.buf.get<double>(static_cast<std::size_t>(A::total));

  shard_linear_alias_out out;
  const auto run = [&](const char* what, auto&& call) {
    a.buf.put(a.start.data(), a.start.size() * sizeof(double));
    bytes = work.n;
    const dc::status st = call();
    DPO_CK(cudaStreamSynchronize(hs.stream));
    DPO_CK(cudaGetLastError());
    const std::vector<double> now = a.buf.get<double>(static_cast<std::size_t>(A::total));
    const bool written = std::memcmp(now.data(), a.start.data(), now.size() * sizeof(double)) != 0;
    out.cases.push_back({what, st.ok() ? std::string() : std::string(st.message), written});
  };
  dpo::linear_grads<double, double> lg;
  lg.hidden_stride = lg.weight_stride = A::H;
  const double* mx = a.at(A::max);
  const double* rec = a.at(A::records);
  {
    dpo::linear_grads<double, double> g = lg;
    g.hidden = a.at(A::max);
    run("linear_shard_backward: grads.hidden on row_max", [&] {
      return dc::linear_shard_backward(work.p, bytes, hs.handle, view, whole, mx, rec, a.at(A::seq), nullptr, nullptr,
                                       g, lo, hs.stream);
    });
    g = lg;
    g.bias = a.at(A::max);
    run("linear_shard_backward: grads.bias on row_max", [&] {
      return dc::linear_shard_backward(work.p, bytes, hs.handle, view, whole, mx, rec, a.at(A::seq), nullptr, nullptr,
                                       g, lo, hs.stream);
    });
  }
  run("linear_pair_shard_partials: chosen_records on hidden.rejected", [&] {
    return dc::linear_pair_shard_partials(work.p, bytes, hs.handle, separate, head, whole, a.at(A::max2),
                                          a.at(A::hidden + half * A::H), a.at(A::max), a.at(A::records), po,
                                          hs.stream);
  });
  run("linear_pair_shard_partials: rejected_max on hidden.rejected", [&] {
    return dc::linear_pair_shard_partials(work.p, bytes, hs.handle, separate, head, whole, a.at(A::max),
                                          a.at(A::records), a.at(A::hidden + half * A::H + 1), a.at(A::records2), po,
                                          hs.stream);
  });
  run("linear_pair_shard_partials: chosen_max on mask.chosen", [&] {
    return dc::linear_pair_shard_partials(work.p, bytes, hs.handle, padded, head, whole, a.at(A::mask),
                                          a.at(A::records), a.at(A::mask), a.at(A::records), po, hs.stream);
  });
  run("linear_pair_shard_sequences: seq on labels.chosen", [&] {
    return dc::linear_pair_shard_sequences(work.p, bytes, padded, whole, mx, rec, mx, rec, 1.0, a.at(A::labels),
                                           true, po, hs.stream);
  });
  dpo::linear_dpo_grads<double, double> pg;
  pg.chosen_hidden = pg.rejected_hidden = a.at(A::dh);
  pg.chosen_hidden_stride = pg.rejected_hidden_stride = A::H;
  pg.weight = a.at(A::dw);
  pg.weight_stride = A::H;
  pg.bias = a.at(A::db);
  const auto backward = [&](const dpo::linear_dpo_grads<double, double>& g) {
    return dc::linear_pair_shard_backward(work.p, bytes, hs.handle, padded, head, whole, mx, rec, mx, rec,
                                          a.at(A::seq_grad), a.at(A::nll), 1.0, g, a.at(A::grad_output), po,
                                          hs.stream);
  };
  {
    dpo::linear_dpo_grads<double, double> g = pg;
    g.weight = a.at(A::nll);
    run("linear_pair_shard_backward: grads.weight on nll_token_grad", [&] { return backward(g); });
    g = pg;
    g.bias = a.at(A::grad_output);
    run("linear_pair_shard_backward: grads.bias on grad_output", [&] { return backward(g); });
    g = pg;
    g.chosen_hidden = g.rejected_hidden = a.at(A::seq_grad);
    run("linear_pair_shard_backward: grads.chosen_hidden on seq_grad", [&] { return backward(g); });
    g = pg;
    g.chosen_hidden = g.rejected_hidden = a.at(A::mask);
    run("linear_pair_shard_backward: grads.chosen_hidden on mask.chosen", [&] { return backward(g); });
  }
  // The unsharded pairs' forward-only log-probs (dpo/cuda/linear_dpo.cuh), on the same arena.
  run("linear_pair_logps: chosen on rejected", [&] {
    return dc::linear_pair_logps(work.p, bytes, hs.handle, padded, head, 1.0, a.at(A::seq), a.at(A::seq), po,
                                 hs.stream);
  });
  run("linear_pair_logps: rejected on hidden", [&] {
    return dc::linear_pair_logps(work.p, bytes, hs.handle, padded, head, 1.0, a.at(A::seq), a.at(A::hidden + 4), po,
                                 hs.stream);
  });
  return out;
}

}  // namespace dpo_cuda_test
