// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA building blocks of the vocabulary- and context-parallel path
// (kernels/dpo/cuda/shard.cuh) against the CPU ones (dpo/cpu/shard.hpp): phase-1 records of
// every shard, the rebase, the phase-2 row values, the per-sequence and per-pair sums, the
// device pair stage and the shard-local backwards, on even and uneven shards, padded and
// packed, for a sample of loss families. Built by the host compiler against the emulator's
// runtime (tests/cuda/emu), so it runs on every machine.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

namespace {

/// A host pair view's buffers on the device (one buffer: padded or packed pairs).
template <class T>
struct device_pairs {
  T* logits = nullptr;
  std::int64_t* labels = nullptr;
  std::int64_t* cu = nullptr;
  dpo::pair_view<T, std::int64_t> view;

  explicit device_pairs(const fixture::buffers<T, std::int64_t>& buf) : view(buf.view()) {
    logits = upload(buf.logits);
    labels = upload(buf.labels);
    if (!buf.cu.empty()) cu = upload(buf.cu);
    for (auto* v : {&view.chosen, &view.rejected}) {
      v->logits = logits;
      v->labels = labels;
      v->cu_seqlens = cu;
    }
  }
  ~device_pairs() {
    cudaFree(logits);
    cudaFree(labels);
    if (cu) cudaFree(cu);
  }
};

/// Shard sh's columns of a pair view (its logits start at column sh.start).
template <class T>
dpo::pair_view<T, std::int64_t> shard_of(dpo::pair_view<T, std::int64_t> p, const dpo::vocab_shard& sh) {
  for (auto* v : {&p.chosen, &p.rejected}) {
    v->logits += sh.start;
    v->vocab = sh.width();
  }
  return p;
}

void check_near(const std::vector<double>& got, const std::vector<double>& want, double rel, const char* what) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "] = " << got[i] << ", CPU " << want[i]);
    CHECK(near(got[i], want[i], rel * (std::fabs(want[i]) + 1)));
  }
}

/// The outputs of a pair stage in one buffer: per-pair outputs, loss, metrics, nll.
struct stage_outputs {
  std::int64_t P;
  std::vector<double> host;
  explicit stage_outputs(std::int64_t p)
      : P(p), host(static_cast<std::size_t>(dpo::num_pair_outputs * p + 2 + dpo::num_metrics), -7.0) {}
  dpo::forward_outputs at(double* base) const {
    dpo::forward_outputs o;
    o.set_pair_outputs(base, P);
    o.loss = base + dpo::num_pair_outputs * P;
    o.nll_token_grad = o.loss + 1;
    o.metrics = reinterpret_cast<dpo::metrics*>(o.loss + 2);
    return o;
  }
};

/// The whole pair path of the shards `cuts` on the device against dpo::cpu, step by step
/// from the same inputs: records, pair sums, the pair stage, the backward (grad_output 0.75).
template <class T>
void check_pair_path(const fixture::named_config& nc, fixture::layout k, bool metrics_on,
                     const std::vector<std::int64_t>& cuts, std::uint64_t seed) {
  INFO(nc.name << ", " << fixture::name_of(k) << ", metrics " << metrics_on << ", " << cuts.size() - 1
               << " shards");
  const dpo::loss_config& cfg = nc.cfg;
  const double rel = std::is_same_v<T, double> ? 1e-12 : 2e-5;
  const std::int64_t V = cuts.back(), F = dpo::shard_fields, SF = dpo::seq_fields;
  const oracle::batch b = fixture::rounded_batch_pair<T>(fixture::spec(3, 6, V, seed)).of(k);
  fixture::buffers<T, std::int64_t> buf(b, k, 2);
  const dpo::pair_view<T, std::int64_t> pv = buf.view();
  const std::int64_t P = pv.num_pairs(), rows = static_cast<std::int64_t>(buf.labels.size());
  device_pairs<T> dev(buf);
  const bool metrics = metrics_on || cfg.use_weighting;
  dpo::cpu::options copt;
  copt.metrics = metrics;
  dpo::cuda::options gopt;
  gopt.metrics = metrics;
  gopt.num_rows = rows;

  // Phase 1 per shard, both sides into one array (disjoint rows), on both backends.
  const int W = static_cast<int>(cuts.size()) - 1;
  std::vector<std::vector<double>> gpu_rec(W);
  std::vector<const double*> rank_rec(W);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    std::vector<double> cpu_rec(rows * F, 0.0), cpu_max(rows, -INFINITY);
    const auto cv = shard_of(pv, sh);
    for (const auto& side : {cv.chosen, cv.rejected})
      dpo::cpu::shard_partials(side, sh, cpu_rec.data(), cpu_max.data(), copt);
    double* d_rec = upload(std::vector<double>(rows * F, 0.0));
    double* d_max = upload(std::vector<double>(rows, -INFINITY));
    const auto dv = shard_of(dev.view, sh);
    for (const auto& side : {dv.chosen, dv.rejected}) {
      const dpo::cuda::status s = dpo::cuda::shard_partials(side, sh, d_rec, d_max, gopt);
      INFO(s.message);
      REQUIRE(s);
    }
    gpu_rec[t] = download(d_rec, rows * F);
    CHECK(download(d_max, rows) == cpu_max);
    check_near(gpu_rec[t], cpu_rec, rel, "records");
    rank_rec[t] = gpu_rec[t].data();
    cudaFree(d_rec);
    cudaFree(d_max);
  }
  std::vector<double> M(rows), S(rows * F);
  dpo::cpu::combine_shard_records(0, rows, W, rank_rec.data(), M.data(), S.data());
  double* d_M = upload(M);
  double* d_S = upload(S);

  // Phase 2: the pair sums (LD-DPO weighted) and, on the whole buffer as one view, the
  // sequence sums; every shard gets the same from the same combined records.
  const fixture::reference ref = fixture::make_reference(cfg, b, seed + 1);
  std::vector<double> seq_cpu(SF * 2 * P);
  const dpo::vocab_shard sh0{V, cuts[0], cuts[1]};
  dpo::cpu::shard_pair_partials(shard_of(pv, sh0), sh0, M.data(), S.data(), M.data(), S.data(), cfg.ld_alpha,
                                seq_cpu.data(), copt);
  double* d_seq = upload(std::vector<double>(SF * 2 * P, -1.0));
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    const dpo::cuda::status s = dpo::cuda::shard_pair_partials(shard_of(dev.view, sh), sh, d_M, d_S, d_M, d_S,
                                                               cfg.ld_alpha, d_seq, gopt);
    INFO(s.message);
    REQUIRE(s);
    check_near(download(d_seq, SF * 2 * P), seq_cpu, 1e-13, "pair sums");
  }
  {
    dpo::token_view<T, std::int64_t> one = pv.chosen, done = dev.view.chosen;
    one.num_seqs = done.num_seqs = 2 * P;
    std::vector<double> want(SF * 2 * P);
    dpo::cpu::shard_sequence_partials(one, dpo::whole_vocab(V), M.data(), S.data(), want.data(), copt);
    double* d_one = upload(std::vector<double>(SF * 2 * P, -1.0));
    REQUIRE(dpo::cuda::shard_sequence_partials(done, dpo::whole_vocab(V), d_M, d_S, d_one, gopt));
    check_near(download(d_one, SF * 2 * P), want, 1e-13, "sequence sums");
    cudaFree(d_one);
  }

  // The pair stage on the device's totals, against the CPU's on the same totals.
  const std::vector<double> totals = download(d_seq, SF * 2 * P);
  stage_outputs cpu_out(P), gpu_out(P);
  std::vector<double> seq_grad_cpu(2 * P);
  dpo::cpu::shard_pair_stage(P, totals.data(), ref.pc(), ref.pr(), cfg, metrics_on, cpu_out.at(cpu_out.host.data()),
                             seq_grad_cpu.data());
  double* d_out = upload(gpu_out.host);
  double* d_seq_grad = upload(std::vector<double>(2 * P, -1.0));
  double* d_rc = ref.c.empty() ? nullptr : upload(ref.c);
  double* d_rr = ref.r.empty() ? nullptr : upload(ref.r);
  std::size_t bytes = 0;
  REQUIRE(dpo::cuda::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, cfg, metrics_on, {}, nullptr));
  void* ws = nullptr;
  REQUIRE(cudaMalloc(&ws, bytes) == cudaSuccess);
  {
    const dpo::cuda::status s = dpo::cuda::shard_pair_stage(ws, bytes, P, d_seq, d_rc, d_rr, cfg, metrics_on,
                                                            gpu_out.at(d_out), d_seq_grad);
    INFO(s.message);
    REQUIRE(s);
  }
  check_near(download(d_out, gpu_out.host.size()), cpu_out.host, 1e-12, "pair stage outputs");
  const std::vector<double> seq_grad = download(d_seq_grad, 2 * P);
  check_near(seq_grad, seq_grad_cpu, 1e-12, "seq_grad");
  const double nll = cpu_out.host[dpo::num_pair_outputs * P + 1];

  // The backward of every shard from the same seq_grad and NLL gradient, into one buffer.
  const double go = 0.75;
  double* d_nll = upload(std::vector<double>{nll});
  double* d_go = upload(std::vector<double>{go});
  std::vector<T> want(buf.logits.size(), T(-5.0f));
  T* d_grad = upload(want);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    dpo::cpu::shard_backward(shard_of(pv, sh), sh, M.data(), S.data(), M.data(), S.data(), seq_grad.data(), nll,
                             cfg.ld_alpha, dpo::pair_grad_view<T>{want.data() + sh.start, buf.stride,
                                                                  want.data() + sh.start, buf.stride},
                             go, copt);
    const dpo::pair_grad_view<T> g{d_grad + sh.start, buf.stride, d_grad + sh.start, buf.stride};
    const auto dv = shard_of(dev.view, sh);
    std::size_t need = 0;
    REQUIRE(dpo::cuda::shard_backward(nullptr, need, dv, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                      cfg.ld_alpha, g, nullptr, gopt));
    void* bws = nullptr;
    REQUIRE(cudaMalloc(&bws, need + 16) == cudaSuccess);
    const dpo::cuda::status s = dpo::cuda::shard_backward(bws, need, dv, sh, d_M, d_S, d_M, d_S, d_seq_grad, d_nll,
                                                          cfg.ld_alpha, g, d_go, gopt);
    INFO(s.message);
    REQUIRE(s);
    cudaFree(bws);
  }
  const std::vector<T> got = download(d_grad, want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double x = static_cast<double>(got[i]), y = static_cast<double>(want[i]);
    INFO("gradient row " << i / buf.stride << " column " << i % buf.stride << ": " << x << ", CPU " << y);
    CHECK(near(x, y, rel * std::fabs(y) + 1e-15));
  }
  for (void* p : {static_cast<void*>(d_M), static_cast<void*>(d_S), static_cast<void*>(d_seq),
                  static_cast<void*>(d_out), static_cast<void*>(d_seq_grad), static_cast<void*>(d_rc),
                  static_cast<void*>(d_rr), ws, static_cast<void*>(d_nll), static_cast<void*>(d_go),
                  static_cast<void*>(d_grad)})
    if (p) cudaFree(p);
}

}  // namespace

TEST_CASE("CUDA pair shard path matches the CPU", "[shard][pairs]") {
  using fixture::layout;
  const char* names[] = {"sigmoid", "ipo", "mpo", "hinge/js", "sigmoid+wpo", "sigmoid+ld_alpha",
                         "ipo+ld_alpha0+wpo", "aot+aot_unpaired", "orpo", "sigmoid+reference_free"};
  std::uint64_t seed = 10;
  for (const char* name : names)
    for (const layout k : {layout::padded, layout::packed})
      for (const bool metrics : {true, false}) {
        const std::vector<std::int64_t> cuts =
            seed % 2 ? std::vector<std::int64_t>{0, 6, 13} : std::vector<std::int64_t>{0, 4, 5, 17};
        check_pair_path<double>(fixture::config_named(name), k, metrics, cuts, ++seed);
      }
  check_pair_path<float>(fixture::config_named("mpo+wpo"), layout::packed, true, {0, 300, 701}, 3);
}

namespace {

void expect_invalid(const dpo::cuda::status& s, const char* needle) {
  INFO("expected an error naming '" << needle << "', got: " << (s ? "success" : s.message));
  CHECK(!s);
  CHECK(std::string(s.message).find(needle) != std::string::npos);
}

}  // namespace

TEST_CASE("CUDA pair shard entry points reject bad arguments and write nothing", "[shard][pairs]") {
  const oracle::batch b = fixture::rounded_random_batch<double>(fixture::spec(2, 4, 9, 7));
  fixture::buffers<double, std::int64_t> buf(b, fixture::layout::padded);
  device_pairs<double> dev(buf);
  const std::int64_t P = 2, rows = static_cast<std::int64_t>(buf.labels.size()), SF = dpo::seq_fields;
  const dpo::vocab_shard sh = dpo::whole_vocab(9);
  const std::vector<double> sentinel(SF * 2 * P, -3.0);
  double* d_rec = upload(std::vector<double>(rows * dpo::shard_fields, 0.0));
  double* d_max = upload(std::vector<double>(rows, 0.0));
  double* d_seq = upload(sentinel);
  const auto untouched = [&] { CHECK(download(d_seq, sentinel.size()) == sentinel); };

  // Phase 2 pairs.
  expect_invalid(dpo::cuda::shard_pair_partials(dev.view, sh, d_max, d_rec, d_max, d_rec, 1.5, d_seq), "ld_alpha");
  expect_invalid(dpo::cuda::shard_pair_partials(dev.view, sh, d_max, d_rec, d_max, nullptr, 1.0, d_seq),
                 "rejected_records");
  expect_invalid(dpo::cuda::shard_pair_partials(dev.view, dpo::vocab_shard{20, 0, 8}, d_max, d_rec, d_max, d_rec, 1.0,
                                                d_seq),
                 "holds 8 columns");
  auto packed = dev.view;
  packed.chosen.cu_seqlens = packed.rejected.cu_seqlens = dev.labels;  // any device pointer: never read
  packed.chosen.first_seq = 0;
  expect_invalid(dpo::cuda::shard_pair_partials(packed, sh, d_max, d_rec, d_max, d_rec, 1.0, d_seq), "num_rows");
  untouched();

  // The device pair stage.
  const dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  std::vector<double> ref(P, -10.0);
  double* d_ref = upload(ref);
  double* d_grad = upload(sentinel);
  std::size_t bytes = 0;
  expect_invalid(dpo::cuda::shard_pair_stage(nullptr, bytes, 0, nullptr, nullptr, nullptr, cfg, true, {}, nullptr),
                 "num_pairs");
  dpo::loss_config bad = cfg;
  bad.beta = NAN;
  expect_invalid(dpo::cuda::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, bad, true, {}, nullptr),
                 "beta");
  REQUIRE(dpo::cuda::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, cfg, true, {}, nullptr));
  void* ws = nullptr;
  REQUIRE(cudaMalloc(&ws, bytes) == cudaSuccess);
  dpo::forward_outputs out;
  out.losses = d_seq;
  expect_invalid(dpo::cuda::shard_pair_stage(ws, bytes, P, d_seq, nullptr, d_ref, cfg, true, out, d_grad),
                 "ref_chosen_logps");
  std::size_t small = bytes - 8;
  expect_invalid(dpo::cuda::shard_pair_stage(ws, small, P, d_seq, d_ref, d_ref, cfg, true, out, d_grad),
                 "workspace_bytes");
  expect_invalid(dpo::cuda::shard_pair_stage(ws, bytes, P, d_seq, d_ref, d_ref, cfg, true, out, nullptr), "seq_grad");
  expect_invalid(dpo::cuda::shard_pair_stage(ws, bytes, P, nullptr, d_ref, d_ref, cfg, true, out, d_grad),
                 "seq_totals");
  untouched();
  CHECK(download(d_grad, sentinel.size()) == sentinel);

  // The paired backward.
  double* d_g = upload(std::vector<double>(buf.logits.size(), -3.0));
  const dpo::pair_grad_view<double> g{d_g, buf.stride, d_g, buf.stride};
  std::size_t need = 0;
  expect_invalid(dpo::cuda::shard_backward(nullptr, need, dev.view, sh, nullptr, nullptr, nullptr, nullptr, nullptr,
                                           nullptr, -0.5, g),
                 "ld_alpha");
  REQUIRE(dpo::cuda::shard_backward(nullptr, need, dev.view, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                    1.0, g));
  void* bws = nullptr;
  REQUIRE(cudaMalloc(&bws, need) == cudaSuccess);
  expect_invalid(dpo::cuda::shard_backward(bws, need, dev.view, sh, d_max, d_rec, d_max, d_rec, nullptr, nullptr, 1.0,
                                           g),
                 "seq_grad");
  std::size_t less = need - 8;
  expect_invalid(dpo::cuda::shard_backward(bws, less, dev.view, sh, d_max, d_rec, d_max, d_rec, d_grad, nullptr, 1.0,
                                           g),
                 "workspace_bytes");
  const dpo::pair_grad_view<double> narrow{d_g, 4, d_g, 4};
  expect_invalid(dpo::cuda::shard_backward(bws, need, dev.view, sh, d_max, d_rec, d_max, d_rec, d_grad, nullptr, 1.0,
                                           narrow),
                 "grad.chosen_stride");
  CHECK(download(d_g, buf.logits.size()) == std::vector<double>(buf.logits.size(), -3.0));
  for (void* p : {static_cast<void*>(d_rec), static_cast<void*>(d_max), static_cast<void*>(d_seq),
                  static_cast<void*>(d_ref), static_cast<void*>(d_grad), ws, static_cast<void*>(d_g), bws})
    cudaFree(p);
}
