// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA side of the linear head's tests: uploads a case, runs dpo::cuda::linear_logps (and
// linear_logps_backward) with a cuBLASLt handle and copies every result back. The Catch2
// tests (g++) compare the results with dpo::cpu's linear head.
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <dpo/cuda/linear.cuh>

#include "device_buffer.hpp"
#include "linear_harness.hpp"

namespace dpo_cuda_test {
namespace {

template <class T, class L, class G>
linear_out run_typed(const linear_case& c) {
  linear_out out;
  const std::int64_t N = c.rows, H = c.hidden_cols, V = c.vocab;
  const std::int64_t hs = c.hidden_stride > 0 ? c.hidden_stride : H;
  const std::int64_t ws = c.weight_stride > 0 ? c.weight_stride : H;
  const std::int64_t ghs = c.grad_hidden_stride > 0 ? c.grad_hidden_stride : H;
  dev_buf hidden(c.hidden.size()), weight(c.weight.size()), bias(c.bias.size());
  hidden.put(c.hidden.data(), c.hidden.size());
  weight.put(c.weight.data(), c.weight.size());
  bias.put(c.bias.data(), c.bias.size());
  std::vector<L> labels(c.labels.begin(), c.labels.end());
  dev_buf dlabels(labels.size() * sizeof(L)), dmask(c.mask.size());
  dlabels.put(labels.data(), labels.size() * sizeof(L));
  dmask.put(c.mask.data(), c.mask.size());
  const std::size_t n = static_cast<std::size_t>(N);
  const std::vector<double> poison(n, 12345.0);
  dev_buf logps(n * 8), entropy(c.entropy ? n * 8 : 0), lse(n * 8);
  logps.put(poison.data(), n * 8);
  lse.put(poison.data(), n * 8);
  if (c.entropy) entropy.put(poison.data(), n * 8);
  dev_buf lssp(c.outputs ? n * 8 : 0), mean(c.outputs ? n * 8 : 0), top1(c.outputs ? n : 0);
  if (c.outputs) {
    lssp.put(poison.data(), n * 8);
    mean.put(poison.data(), n * 8);
    top1.fill(0x5a);
  }
  // The optional outputs through the linear_outputs overload, or the entropy alone through the
  // pointer one.
  dpo::cuda::linear_outputs extra;
  extra.entropy = c.entropy ? entropy.as<double>() : nullptr;
  if (c.outputs) {
    extra.log_sum_sq_probs = lssp.as<double>();
    extra.mean_logits = mean.as<double>();
    extra.is_top1 = top1.as<std::uint8_t>();
  }

  dpo::cuda::linear_view<T, L> v;
  v.hidden = hidden.as<const T>();
  v.rows = N;
  v.hidden_cols = H;
  v.hidden_stride = hs;
  v.weight = weight.as<const T>();
  v.vocab = V;
  v.weight_cols = c.weight_cols >= 0 ? c.weight_cols : H;
  v.weight_stride = ws;
  v.bias = c.bias.empty() ? nullptr : bias.as<const T>();
  v.bias_size = c.bias_size >= 0 ? c.bias_size : (c.bias.empty() ? 0 : V);
  v.labels = dlabels.as<const L>();
  v.mask = c.mask.empty() ? nullptr : dmask.as<const std::uint8_t>();
  v.ignore_index = c.ignore_index;
  v.transforms = c.transforms;
  dpo::cuda::linear_options opt;
  if (c.workspace_budget > 0) opt.workspace_bytes = c.workspace_budget;
  opt.chunk_rows = c.chunk_rows;
  opt.chunk_vocab = c.chunk_vocab;
  opt.gemm_workspace_bytes = c.gemm_workspace;

  double* out_logps = c.logps_on_labels ? reinterpret_cast<double*>(dlabels.p) : logps.as<double>();
  const auto finish = [&](const dpo::cuda::status& s) {
    out.code = static_cast<int>(s.code);
    out.message = s.message;
    return s.ok();
  };

  // Gradient buffers, set up before any call so a failing call can be checked for writes.
  const std::size_t gsz = sizeof(G);
  dev_buf dh(c.backward && c.want_hidden ? n * ghs * sizeof(T) : 0);
  dev_buf dw(c.backward && c.want_weight ? static_cast<std::size_t>(V * ws) * gsz : 0);
  dev_buf db(c.backward && c.want_bias && !c.bias.empty() ? static_cast<std::size_t>(V) * gsz : 0);
  const auto init = [](dev_buf& b, const std::vector<unsigned char>& v0) {
    if (b.n == 0) return;
    if (v0.empty()) {
      b.fill(0x7f);
    } else {
      if (v0.size() != b.n) throw std::runtime_error("linear_case: initial gradient of the wrong size");
      b.put(v0.data(), v0.size());
    }
  };
  init(dh, c.dhidden0);
  init(dw, c.dweight0);
  init(db, c.dbias0);

  cublasLtHandle_t handle = nullptr;
  if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasLtCreate failed");
  cudaStream_t stream = nullptr;
  DPO_CK(cudaStreamCreate(&stream));
  std::size_t bytes = 0;
  dpo::cuda::linear_chunking ch;
  bool ok = finish(dpo::cuda::linear_workspace_size(v, opt, &ch));
  const auto forward = [&](void* ws, std::size_t& b, cublasLtHandle_t hd) {
    return c.outputs ? dpo::cuda::linear_logps(ws, b, hd, v, out_logps, extra, lse.as<double>(), opt, stream)
                     : dpo::cuda::linear_logps(ws, b, hd, v, out_logps, extra.entropy, lse.as<double>(), opt, stream);
  };
  if (ok) ok = finish(forward(nullptr, bytes, handle));
  out.chunk_rows = ch.rows;
  out.chunk_vocab = ch.vocab;
  out.workspace_bytes = static_cast<std::int64_t>(bytes);
  if (ok && static_cast<std::int64_t>(bytes) != ch.workspace_bytes)
    throw std::runtime_error("the size query and linear_workspace_size disagree");
  dev_buf work(ok ? bytes + 256 : 0);
  if (ok) work.fill(0xa5);
  std::size_t given = c.short_workspace ? bytes - 1 : bytes;
  cublasLtHandle_t h = c.null_handle ? nullptr : handle;
  if (ok) ok = finish(forward(work.p, given, h));
  if (ok && c.backward) {
    dev_buf gl(n * 8), ge(c.entropy ? n * 8 : 0);
    gl.put(c.grad_logps.data(), n * 8);
    if (c.entropy) ge.put(c.grad_entropy.data(), n * 8);
    dpo::cuda::linear_grads<T, G> g;
    g.hidden = dh.n ? dh.as<T>() : nullptr;
    g.hidden_stride = ghs;
    g.accumulate_hidden = c.accumulate_hidden;
    g.weight = c.dweight_on_weight ? reinterpret_cast<G*>(weight.p) : (dw.n ? dw.as<G>() : nullptr);
    g.weight_stride = ws;
    g.bias = db.n ? db.as<G>() : nullptr;
    std::size_t b2 = 0;
    ok = finish(dpo::cuda::linear_logps_backward(nullptr, b2, handle, v, lse.as<double>(), gl.as<double>(),
                                                 c.entropy ? entropy.as<double>() : nullptr,
                                                 c.entropy ? ge.as<double>() : nullptr, g, opt, stream));
    if (ok && b2 != bytes) throw std::runtime_error("forward and backward workspace sizes differ");
    if (ok)
      ok = finish(dpo::cuda::linear_logps_backward(work.p, b2, handle, v, lse.as<double>(), gl.as<double>(),
                                                   c.entropy ? entropy.as<double>() : nullptr,
                                                   c.entropy ? ge.as<double>() : nullptr, g, opt, stream));
    DPO_CK(cudaStreamSynchronize(stream));
  }
  DPO_CK(cudaStreamSynchronize(stream));
  DPO_CK(cudaGetLastError());
  if (work.n > 0 && out.code == 0) {
    const dpo::cuda::status de = dpo::cuda::read_device_error(work.p, stream);
    dpo::cuda::device_error e{};
    DPO_CK(cudaMemcpy(&e, work.p, sizeof(e), cudaMemcpyDeviceToHost));
    out.device_error = e.code;
    out.device_message = de.message;
  }
  out.logps = logps.get<double>(n);
  out.row_lse = lse.get<double>(n);
  if (c.entropy) out.entropy = entropy.get<double>(n);
  if (c.outputs) {
    out.log_sum_sq_probs = lssp.get<double>(n);
    out.mean_logits = mean.get<double>(n);
    out.is_top1 = top1.get<std::uint8_t>(n);
  }
  if (dh.n) out.dhidden = dh.get<unsigned char>(dh.n);
  if (dw.n) out.dweight = dw.get<unsigned char>(dw.n);
  if (db.n) out.dbias = db.get<unsigned char>(db.n);
  cudaStreamDestroy(stream);
  cublasLtDestroy(handle);
  return out;
}


}  // namespace

linear_out run_linear(const linear_case& c) {
  return with_device_types(c.type, c.fp32_grads, c.labels64,
                           [&](auto t, auto g, auto l) { return run_typed<decltype(t), decltype(l), decltype(g)>(c); });
}

std::string linear_graph_check() {
  using T = float;
  const std::int64_t N = 9, H = 12, V = 50;
  std::vector<float> h(N * H), w(V * H), b(V);
  std::vector<std::int64_t> y(N);
  for (std::int64_t i = 0; i < N * H; ++i) h[i] = static_cast<float>((i * 37 % 17) - 8) / 8.0f;
  for (std::int64_t i = 0; i < V * H; ++i) w[i] = static_cast<float>((i * 53 % 23) - 11) / 30.0f;
  for (std::int64_t i = 0; i < V; ++i) b[i] = static_cast<float>(i % 7) / 10.0f;
  for (std::int64_t r = 0; r < N; ++r) y[r] = r == 4 ? -100 : (r * 13) % V;
  dev_buf dh_(N * H * 4), dw_(V * H * 4), db_(V * 4), dy(N * 8);
  dh_.put(h.data(), h.size() * 4);
  dw_.put(w.data(), w.size() * 4);
  db_.put(b.data(), b.size() * 4);
  dy.put(y.data(), y.size() * 8);
  std::vector<double> ones(N, 0.5);
  dev_buf gl(N * 8), ge(N * 8);
  gl.put(ones.data(), N * 8);
  ge.put(ones.data(), N * 8);
  dpo::cuda::linear_view<T, std::int64_t> v;
  v.hidden = dh_.as<const T>();
  v.rows = N;
  v.hidden_cols = v.hidden_stride = v.weight_cols = v.weight_stride = H;
  v.weight = dw_.as<const T>();
  v.vocab = V;
  v.bias = db_.as<const T>();
  v.bias_size = V;
  v.labels = dy.as<const std::int64_t>();
  v.transforms.softcap = 3.0;
  dpo::cuda::linear_options opt;
  opt.chunk_rows = 4;
  opt.chunk_vocab = 16;
  opt.gemm_workspace_bytes = 1 << 16;
  cublasLtHandle_t handle = nullptr;
  if (cublasLtCreate(&handle) != CUBLAS_STATUS_SUCCESS) return "cublasLtCreate failed";
  cudaStream_t stream = nullptr;
  DPO_CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::size_t bytes = 0;
  std::string err;
  const auto fail = [&](const dpo::cuda::status& st, const char* what) {
    if (!st && err.empty()) err = std::string(what) + ": " + st.message;
  };
  fail(dpo::cuda::linear_logps(nullptr, bytes, handle, v, nullptr, nullptr, nullptr, opt), "size query");
  dev_buf ws(bytes), logps(N * 8), ent(N * 8), lse(N * 8), gh(N * H * 4), gw(V * H * 4), gb(V * 4);
  dpo::cuda::linear_grads<T, T> g;
  g.hidden = gh.as<T>();
  g.hidden_stride = H;
  g.weight = gw.as<T>();
  g.weight_stride = H;
  g.bias = gb.as<T>();
  const auto step = [&] {
    fail(dpo::cuda::linear_logps(ws.p, bytes, handle, v, logps.as<double>(), ent.as<double>(), lse.as<double>(), opt,
                                 stream),
         "linear_logps");
    fail(dpo::cuda::linear_logps_backward(ws.p, bytes, handle, v, lse.as<double>(), gl.as<double>(), ent.as<double>(),
                                          ge.as<double>(), g, opt, stream),
         "linear_logps_backward");
  };
  const auto results = [&] {
    DPO_CK(cudaStreamSynchronize(stream));
    std::vector<unsigned char> all;
    for (const dev_buf* b : {&logps, &ent, &lse, &gh, &gw, &gb}) {
      const std::vector<unsigned char> x = b->get<unsigned char>(b->n);
      all.insert(all.end(), x.begin(), x.end());
    }
    return all;
  };
  const auto reset = [&] {
    DPO_CK(cudaMemsetAsync(gw.p, 0, gw.n, stream));
    DPO_CK(cudaMemsetAsync(gb.p, 0, gb.n, stream));
  };
  reset();
  step();
  const std::vector<unsigned char> direct = results();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  DPO_CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  step();
  const cudaError_t ce = cudaStreamEndCapture(stream, &graph);
  if (ce != cudaSuccess && err.empty()) err = std::string("capture: ") + cudaGetErrorString(ce);
  if (err.empty()) {
    DPO_CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int k = 0; k < 2 && err.empty(); ++k) {
      reset();
      DPO_CK(cudaMemsetAsync(logps.p, 0, logps.n, stream));
      DPO_CK(cudaGraphLaunch(exec, stream));
      if (results() != direct) err = "graph replay " + std::to_string(k) + " differs from the direct calls";
    }
    cudaGraphExecDestroy(exec);
  }
  if (graph) cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  cublasLtDestroy(handle);
  return err;
}

long long emulated_gemms() {
#if defined(DPO_CUDA_EMULATION)
  return dpo_emu::cublaslt_matmul_count();
#else
  return -1;
#endif
}

}  // namespace dpo_cuda_test
