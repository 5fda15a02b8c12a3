// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA row kernels of the vocabulary-parallel path (kernels/dpo/cuda/shard.cuh) against
// the CPU ones (dpo/cpu/shard.hpp): phase-1 records of every shard, the rebase, the phase-2
// row values and the shard-local backward, on uneven shards. Built by the host compiler
// against the emulator's runtime (tests/cuda/emu), so it runs on every machine.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "catch.hpp"
#include "dpo/cpu/shard.hpp"
#include "dpo/cuda/shard.cuh"
#include "fixtures.hpp"

namespace {

template <class T>
T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  REQUIRE(cudaMalloc(&d, h.size() * sizeof(T) + 16) == cudaSuccess);
  if (!h.empty()) REQUIRE(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return d;
}

template <class T>
std::vector<T> download(const T* d, std::size_t n) {
  std::vector<T> h(n);
  if (n) REQUIRE(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

/// Device element type of a host logits type (same bits).
template <class T>
struct device_type {
  using type = T;
};
template <>
struct device_type<Eigen::bfloat16> {
  using type = __nv_bfloat16;
};

bool near(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol;
}

template <class T>
void check_kernels(const std::vector<std::int64_t>& cuts, std::uint64_t seed) {
  using D = typename device_type<T>::type;
  using A = dpo::cpu::acc_t<T>;
  const double rel = std::is_same_v<A, double> ? 1e-12 : 2e-5;
  const std::int64_t V = cuts.back();
  const oracle::batch b = fixture::rounded_random_batch<T>(fixture::spec(3, 5, V, seed));
  fixture::buffers<T, std::int64_t> buf(b, fixture::layout::padded, 3);
  const dpo::pair_view<T, std::int64_t> pv = buf.view();
  dpo::token_view<T, std::int64_t> v = pv.chosen;
  v.num_seqs = 2 * pv.num_pairs();  // all 2P sequences as one view
  const std::int64_t rows = v.row_end(v.num_seqs - 1), F = dpo::shard_fields;

  // The unsharded row coefficients and gradient: what the shards' backward must reproduce.
  std::vector<double> lse(rows), coef(rows);
  dpo::forward_outputs out;
  double loss = 0;
  out.loss = &loss;
  out.row_lse = lse.data();
  out.row_coef = coef.data();
  std::vector<double> ref_c(3, -20.0), ref_r(3, -21.0);
  const dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  dpo::cpu::dpo_forward(pv, ref_c.data(), ref_r.data(), cfg, out);
  std::vector<T> want(buf.logits.size(), T(0.0f));
  const dpo::pair_grad_view<T> want_view{want.data(), buf.stride, want.data(), buf.stride};
  dpo::cpu::dpo_backward_rows(pv, lse.data(), coef.data(), want_view, 0.75);

  const std::vector<D> host_dev(reinterpret_cast<const D*>(buf.logits.data()),
                                reinterpret_cast<const D*>(buf.logits.data()) + buf.logits.size());
  D* d_logits = upload(host_dev);
  std::int64_t* d_labels = upload(buf.labels);
  double* d_coef = upload(coef);
  dpo::token_view<D, std::int64_t> dv;
  std::memcpy(static_cast<void*>(&dv), &v, sizeof dv);  // same layout, device element type
  dv.logits = d_logits;
  dv.labels = d_labels;

  const int W = static_cast<int>(cuts.size()) - 1;
  std::vector<std::vector<double>> cpu_rec(W, std::vector<double>(rows * F, 0.0)), gpu_rec = cpu_rec;
  std::vector<std::vector<double>> cpu_max(W, std::vector<double>(rows, -INFINITY)), gpu_max = cpu_max;
  std::vector<double*> d_rec(W), d_max(W);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    auto sv = v;
    sv.logits += sh.start;
    sv.vocab = sh.width();
    dpo::cpu::shard_partials(sv, sh, cpu_rec[t].data(), cpu_max[t].data());
    auto sd = dv;
    sd.logits += sh.start;
    sd.vocab = sh.width();
    d_rec[t] = upload(gpu_rec[t]);
    d_max[t] = upload(gpu_max[t]);
    const dpo::cuda::status s = dpo::cuda::shard_partials(sd, sh, d_rec[t], d_max[t]);
    INFO(s.message);
    REQUIRE(s);
    gpu_rec[t] = download(d_rec[t], rows * F);
    gpu_max[t] = download(d_max[t], rows);
    for (std::int64_t i = 0; i < rows * F; ++i) {
      INFO("shard " << t << " row " << i / F << " field " << i % F);
      CHECK(near(gpu_rec[t][i], cpu_rec[t][i], rel * (std::fabs(cpu_rec[t][i]) + 1)));
    }
    CHECK(gpu_max[t] == cpu_max[t]);  // a max is exact
  }
  // The collectives, here on the host, then the rebase on the device.
  std::vector<double> M(rows, -INFINITY), S(rows * F, 0.0);
  for (int t = 0; t < W; ++t)
    for (std::int64_t r = 0; r < rows; ++r) M[r] = std::max(M[r], gpu_max[t][r]);
  double* d_M = upload(M);
  for (int t = 0; t < W; ++t) {
    REQUIRE(dpo::cuda::shard_rebase(0, rows, d_M, d_rec[t]));
    std::vector<double> cpu = gpu_rec[t];
    dpo::cpu::shard_rebase(0, rows, M.data(), cpu.data());
    const std::vector<double> got = download(d_rec[t], rows * F);
    CHECK(std::memcmp(got.data(), cpu.data(), got.size() * sizeof(double)) == 0);  // the same core code
    for (std::int64_t i = 0; i < rows * F; ++i) S[i] += got[i];
  }
  double* d_S = upload(S);
  // Phase 2 per row against the unsharded row log-sum-exp, and the label log-probs.
  std::vector<double> zeros(rows, 0.0);
  double* d_logp = upload(zeros);
  double* d_lse = upload(zeros);
  dpo::cuda::detail::shard_row_outputs ro;
  ro.logp = d_logp;
  ro.lse = d_lse;
  REQUIRE(dpo::cuda::shard_row_values(dv, dpo::whole_vocab(V), d_M, d_S, ro));
  const std::vector<double> got_lse = download(d_lse, rows), got_logp = download(d_logp, rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    if (!v.in_sequence(r) || v.target(r) < 0) continue;
    INFO("row " << r);
    CHECK(near(got_lse[r], lse[r], rel * (std::fabs(lse[r]) + 1)));
    const dpo::detail::shard_row_values x = dpo::detail::finish_row(M[r], S.data() + r * F, V);
    CHECK(got_logp[r] == x.logp);
  }
  // Phase 2 per sequence on the device against the CPU's, then the pair stage on the host.
  const std::int64_t S2 = v.num_seqs, SF = dpo::seq_fields;
  std::vector<double> seq_cpu(SF * S2);
  dpo::cpu::shard_sequence_partials(v, dpo::whole_vocab(V), M.data(), S.data(), seq_cpu.data());
  double* d_seq = upload(std::vector<double>(SF * S2, -1.0));
  REQUIRE(dpo::cuda::shard_sequence_partials(dv, dpo::whole_vocab(V), d_M, d_S, d_seq));
  const std::vector<double> seq_gpu = download(d_seq, SF * S2);
  for (std::int64_t i = 0; i < SF * S2; ++i) {
    INFO("field " << i / S2 << " sequence " << i % S2);
    CHECK(near(seq_gpu[i], seq_cpu[i], 1e-13 * (std::fabs(seq_cpu[i]) + 1)));
  }
  std::vector<double> seq_grad(S2);
  double nll = 0;
  dpo::forward_outputs po;
  po.nll_token_grad = &nll;
  dpo::cpu::shard_pair_stage(S2 / 2, seq_gpu.data(), ref_c.data(), ref_r.data(), cfg, true, po, seq_grad.data());
  double* d_seq_grad = upload(seq_grad);

  // The backward of every shard, out of place, into one device gradient buffer: from the
  // unsharded row coefficients, then from the sharded per-sequence gradients.
  const double grel = std::is_same_v<T, Eigen::bfloat16> ? 0x1p-7 : rel;
  for (const bool from_sequences : {false, true}) {
    INFO((from_sequences ? "from sequence gradients" : "from row coefficients"));
    std::vector<D> sentinel(buf.logits.size(), D(-5.0f));
    D* d_grad = upload(sentinel);
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      auto sd = dv;
      sd.logits += sh.start;
      sd.vocab = sh.width();
      const dpo::cuda::status s =
          from_sequences ? dpo::cuda::shard_backward_sequences(sd, sh, d_M, d_S, d_seq_grad, nll, S2 / 2, 0.75,
                                                               d_grad + sh.start, buf.stride)
                         : dpo::cuda::shard_backward_rows(sd, sh, d_M, d_S, d_coef, 0.75, d_grad + sh.start,
                                                          buf.stride);
      INFO(s.message);
      REQUIRE(s);
    }
    const std::vector<D> g = download(d_grad, buf.logits.size());
    cudaFree(d_grad);
    for (std::int64_t r = 0; r < rows; ++r) {
      if (!v.in_sequence(r)) continue;
      for (std::int64_t k = 0; k < V; ++k) {
        T gt;
        std::memcpy(static_cast<void*>(&gt), &g[r * buf.stride + k], sizeof gt);
        const double got = static_cast<double>(static_cast<A>(gt));
        const double exp = static_cast<double>(static_cast<A>(want[r * buf.stride + k]));
        INFO("row " << r << " column " << k);
        CHECK(near(got, exp, grel * std::fabs(exp) + 1e-7 * std::fabs(coef[r])));
      }
    }
  }
  for (void* p : {static_cast<void*>(d_logits), static_cast<void*>(d_labels), static_cast<void*>(d_coef),
                  static_cast<void*>(d_M), static_cast<void*>(d_S), static_cast<void*>(d_logp),
                  static_cast<void*>(d_lse), static_cast<void*>(d_seq), static_cast<void*>(d_seq_grad)})
    cudaFree(p);
  for (int t = 0; t < W; ++t) {
    cudaFree(d_rec[t]);
    cudaFree(d_max[t]);
  }
}

}  // namespace

TEST_CASE("CUDA shard kernels match the CPU ones", "[shard]") {
  check_kernels<float>({0, 7, 300, 701}, 3);
  check_kernels<double>({0, 500, 501, 1030}, 4);
  check_kernels<Eigen::bfloat16>({0, 64, 2100}, 5);
}

TEST_CASE("CUDA shard kernels reject bad shards", "[shard]") {
  dpo::token_view<float, std::int64_t> v;
  v.vocab = 10;
  v.row_stride = 10;
  v.num_seqs = 1;
  v.seq_len = 1;
  const dpo::cuda::status s = dpo::cuda::shard_partials(v, dpo::vocab_shard{20, 5, 12}, nullptr, nullptr);
  CHECK(!s);
  CHECK(std::string(s.message).find("holds 7 columns") != std::string::npos);
}
