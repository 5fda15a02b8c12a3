// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA building blocks of the vocabulary- and context-parallel logits path
// (kernels/dpo/cuda/shard.cuh) against the CPU ones (dpo/cpu/shard.hpp) and the unsharded CPU
// calls: phase-1 records of every shard, the rebase, the phase-2 row values, the per-sequence
// and per-pair sums, the device pair stage and the shard-local backwards (out of place and in
// place), on even and uneven shards (V = 1001 over 3), padded and packed, masked, for a sample
// of loss families, fp32 / fp64 / bf16 / fp16; and a whole step of W vocabulary x C context
// ranks (a loop over the ranks on one device, the collectives on the host) against
// dpo::cpu::dpo_forward_sharded / dpo_backward_sharded on the same ranks as threads. Calls
// go through shard_harness.cu: on a GPU (test_cuda_shard, exits 77 without one) or on the
// emulator (test_cuda_shard_emulated). The [sanitize] cases are the small ones
// scripts/gpu_check.sh runs under compute-sanitizer.
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "catch.hpp"
#include "dpo/cpu/shard.hpp"
#include "../fixtures.hpp"
#include "../shard_ranks.hpp"
#include "shard_harness.hpp"

namespace {

namespace gpu = dpo_cuda_test;
using fixture::layout;
using shard_ranks::shard_of;

/// The harness' logits type of a host one (the same bits).
template <class T>
struct harness_type {
  using type = T;
};
template <>
struct harness_type<Eigen::bfloat16> {
  using type = gpu::bf16_bits;
};
template <>
struct harness_type<Eigen::half> {
  using type = gpu::f16_bits;
};
template <class T>
using hw_t = typename harness_type<T>::type;

/// A host-typed view of device memory as the harness takes it.
template <class T>
gpu::tokens<hw_t<T>> dev(const dpo::token_view<T, std::int64_t>& v) {
  return gpu::retype<hw_t<T>>(v);
}
template <class T>
gpu::pairs<hw_t<T>> dev(const dpo::pair_view<T, std::int64_t>& p) {
  return gpu::retype<hw_t<T>>(p);
}
template <class T>
dpo::pair_grad_view<hw_t<T>> dev(const dpo::pair_grad_view<T>& g) {
  return gpu::retype<hw_t<T>>(g);
}
template <class T>
hw_t<T>* dev(T* p) {
  return reinterpret_cast<hw_t<T>*>(p);
}

/// A device copy of a host vector, exactly its size (none when empty), freed on scope exit.
template <class T>
struct dvec {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dvec(const std::vector<T>& h) : p(static_cast<T*>(gpu::device_alloc(h.size() * sizeof(T)))), n(h.size()) {
    gpu::copy_to_device(p, h.data(), n * sizeof(T));
  }
  dvec(std::size_t count, T fill) : dvec(std::vector<T>(count, fill)) {}
  dvec(dvec&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  ~dvec() { gpu::device_free(p); }
  dvec(const dvec&) = delete;
  dvec& operator=(const dvec&) = delete;
  std::vector<T> get() const {
    std::vector<T> h(n);
    gpu::copy_to_host(h.data(), p, n * sizeof(T));
    return h;
  }
  operator T*() const { return p; }  // NOLINT: passed where the library takes a device pointer
};

/// Raw device memory (a workspace), freed on scope exit.
struct dmem {
  void* p;
  explicit dmem(std::size_t bytes) : p(gpu::device_alloc(bytes)) {}
  ~dmem() { gpu::device_free(p); }
  dmem(const dmem&) = delete;
  dmem& operator=(const dmem&) = delete;
};

void require_ok(const gpu::shard_status& s) {
  INFO(s.message);
  REQUIRE(s);
}

bool near(double a, double b, double tol) { return fixture::near(a, b, tol); }

/// A value both backends compute with the same core code from the same inputs: bitwise on the
/// emulator (one compiler); on a GPU within a few ulps (nvcc contracts to FMA, and the device's
/// exp / log round differently from the host's).
bool same_core(double got, double want) {
#ifdef DPO_CUDA_EMULATION
  return std::memcmp(&got, &want, sizeof got) == 0;
#else
  return near(got, want, 1e-14 * (std::fabs(want) + 1));
#endif
}

void check_near(const std::vector<double>& got, const std::vector<double>& want, double rel, const char* what) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "] = " << got[i] << ", CPU " << want[i]);
    CHECK(near(got[i], want[i], rel * (std::fabs(want[i]) + 1)));
  }
}

/// Relative tolerance of a gradient element written as T by both backends from values equal to
/// `rel`: one rounding to T either way.
template <class T>
double grad_rel(double rel) {
  return std::max(rel, 2 * fixture::output_rel<T>());
}

/// Two gradient (or, in place, logits) buffers of T element by element.
template <class T>
void check_grads(const std::vector<T>& got, const std::vector<T>& want, std::int64_t stride, double rel) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double x = static_cast<double>(got[i]), y = static_cast<double>(want[i]);
    INFO("gradient row " << i / stride << " column " << i % stride << ": " << x << ", CPU " << y);
    CHECK(near(x, y, rel * std::fabs(y) + fixture::output_floor<T>() + 1e-15));
  }
}

template <class T>
double value_rel() {
  return std::is_same_v<dpo::cpu::acc_t<T>, double> ? 1e-12 : 2e-5;
}

/// Every row kernel of one view (all 2P sequences) over the shards `cuts`, against dpo::cpu's
/// shards and the unsharded forward / backward: records, rebase, row values, sequence sums,
/// and both single-view backwards (from row coefficients, from sequence gradients).
template <class T>
void check_kernels(const std::vector<std::int64_t>& cuts, std::uint64_t seed, bool mask) {
  using A = dpo::cpu::acc_t<T>;
  INFO(cuts.size() - 1 << " shards of " << cuts.back() << (mask ? ", explicit mask" : ""));
  const double rel = value_rel<T>();
  const std::int64_t V = cuts.back();
  const oracle::batch b = fixture::rounded_random_batch<T>(fixture::spec(3, 5, V, seed));
  fixture::buffers<T, std::int64_t> buf(b, layout::padded, 3, mask);
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

  const dvec<T> d_logits(buf.logits);
  const dvec<std::int64_t> d_labels(buf.labels);
  const dvec<std::uint8_t> d_mask(mask ? buf.mask : std::vector<std::uint8_t>{});
  const dvec<double> d_coef(coef);
  dpo::token_view<T, std::int64_t> dv = v;
  dv.logits = d_logits;
  dv.labels = d_labels;
  dv.mask = mask ? d_mask.p : nullptr;

  const int W = static_cast<int>(cuts.size()) - 1;
  std::vector<std::vector<double>> gpu_rec(W);
  std::vector<double> M(rows, -INFINITY), S(rows * F, 0.0);
  {
    std::vector<std::vector<double>> gpu_max(W);
    std::vector<dvec<double>> d_rec, d_max;
    d_rec.reserve(W);
    d_max.reserve(W);
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      std::vector<double> cpu_rec(rows * F, 0.0), cpu_max(rows, -INFINITY);
      auto sv = v;
      sv.logits += sh.start;
      sv.vocab = sh.width();
      dpo::cpu::shard_partials(sv, sh, cpu_rec.data(), cpu_max.data());
      auto sd = dv;
      sd.logits += sh.start;
      sd.vocab = sh.width();
      d_rec.emplace_back(std::vector<double>(rows * F, 0.0));
      d_max.emplace_back(std::vector<double>(rows, -INFINITY));
      require_ok(gpu::shard_partials(dev(sd), sh, d_rec[t], d_max[t]));
      gpu_rec[t] = d_rec[t].get();
      gpu_max[t] = d_max[t].get();
      for (std::int64_t i = 0; i < rows * F; ++i) {
        INFO("shard " << t << " row " << i / F << " field " << i % F);
        CHECK(near(gpu_rec[t][i], cpu_rec[i], rel * (std::fabs(cpu_rec[i]) + 1)));
      }
      CHECK(gpu_max[t] == cpu_max);  // a max is exact
    }
    // The collectives, here on the host, then the rebase on the device.
    for (int t = 0; t < W; ++t)
      for (std::int64_t r = 0; r < rows; ++r) M[r] = std::max(M[r], gpu_max[t][r]);
    const dvec<double> d_M(M);
    for (int t = 0; t < W; ++t) {
      require_ok(gpu::shard_rebase(0, rows, d_M, d_rec[t]));
      std::vector<double> cpu = gpu_rec[t];
      dpo::cpu::shard_rebase(0, rows, M.data(), cpu.data());
      const std::vector<double> got = d_rec[t].get();
      for (std::int64_t i = 0; i < rows * F; ++i) {
        INFO("rebased shard " << t << " row " << i / F << " field " << i % F);
        CHECK(same_core(got[i], cpu[i]));
      }
      for (std::int64_t i = 0; i < rows * F; ++i) S[i] += got[i];
    }
  }
  const dvec<double> d_M(M), d_S(S);
  // Phase 2 per row: the core's finish_row of the combined records (zeros on rows not read),
  // and the log-sum-exp against the unsharded forward's.
  std::vector<dvec<double>> d_row;
  gpu::row_outputs ro{};
  for (std::size_t i = 0; i < ro.size(); ++i) d_row.emplace_back(std::vector<double>(rows, -9.0));
  for (std::size_t i = 0; i < ro.size(); ++i) ro[i] = d_row[i];
  require_ok(gpu::shard_row_values(dev(dv), dpo::whole_vocab(V), d_M, d_S, ro));
  std::vector<std::vector<double>> got_row;
  for (const dvec<double>& d : d_row) got_row.push_back(d.get());
  for (std::int64_t r = 0; r < rows; ++r) {
    if (!v.in_sequence(r)) continue;
    INFO("row " << r);
    const bool read = v.target(r) >= 0;
    const dpo::detail::shard_row_values x =
        read ? dpo::detail::finish_row(M[r], S.data() + r * F, V) : dpo::detail::shard_row_values{};
    const double want[] = {x.logp, x.lse, x.entropy, x.zmean, x.wpo, x.hit ? 1.0 : 0.0};
    for (std::size_t i = 0; i < ro.size(); ++i) {
      INFO("output " << i << " (logp, lse, entropy, zmean, wpo, hit)");
      CHECK(same_core(got_row[i][r], want[i]));
    }
    if (read) CHECK(near(got_row[1][r], lse[r], rel * (std::fabs(lse[r]) + 1)));
  }
  // Phase 2 per sequence on the device against the CPU's, then the pair stage on the host.
  const std::int64_t S2 = v.num_seqs, SF = dpo::seq_fields;
  std::vector<double> seq_cpu(SF * S2);
  dpo::cpu::shard_sequence_partials(v, dpo::whole_vocab(V), M.data(), S.data(), seq_cpu.data());
  const dvec<double> d_seq(SF * S2, -1.0);
  require_ok(gpu::shard_sequence_partials(dev(dv), dpo::whole_vocab(V), d_M, d_S, d_seq));
  const std::vector<double> seq_gpu = d_seq.get();
  for (std::int64_t i = 0; i < SF * S2; ++i) {
    INFO("field " << i / S2 << " sequence " << i % S2);
    CHECK(near(seq_gpu[i], seq_cpu[i], 1e-13 * (std::fabs(seq_cpu[i]) + 1)));
  }
  std::vector<double> seq_grad(S2);
  double nll = 0;
  dpo::forward_outputs po;
  po.nll_token_grad = &nll;
  dpo::cpu::shard_pair_stage(S2 / 2, seq_gpu.data(), ref_c.data(), ref_r.data(), cfg, true, po, seq_grad.data());
  const dvec<double> d_seq_grad(seq_grad);

  // The backward of every shard, out of place, into one device gradient buffer: from the
  // unsharded row coefficients, then from the sharded per-sequence gradients.
  const double grel = grad_rel<T>(rel);
  for (const bool from_sequences : {false, true}) {
    INFO((from_sequences ? "from sequence gradients" : "from row coefficients"));
    const dvec<T> d_grad(buf.logits.size(), T(-5.0f));
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      auto sd = dv;
      sd.logits += sh.start;
      sd.vocab = sh.width();
      require_ok(from_sequences ? gpu::shard_backward_sequences(dev(sd), sh, d_M, d_S, d_seq_grad, nll, S2 / 2, 0.75,
                                                                dev(d_grad.p + sh.start), buf.stride)
                                : gpu::shard_backward_rows(dev(sd), sh, d_M, d_S, d_coef, 0.75,
                                                           dev(d_grad.p + sh.start), buf.stride));
    }
    const std::vector<T> g = d_grad.get();
    for (std::int64_t r = 0; r < rows; ++r) {
      if (!v.in_sequence(r)) continue;
      for (std::int64_t k = 0; k < V; ++k) {
        const double got = static_cast<double>(static_cast<A>(g[r * buf.stride + k]));
        const double exp = static_cast<double>(static_cast<A>(want[r * buf.stride + k]));
        INFO("row " << r << " column " << k);
        CHECK(near(got, exp, grel * std::fabs(exp) + 1e-7 * std::fabs(coef[r]) + fixture::output_floor<T>()));
      }
    }
  }
}

}  // namespace

TEST_CASE("CUDA shard kernels match the CPU ones", "[shard][sanitize]") {
  check_kernels<float>({0, 7, 300, 701}, 3, false);
  check_kernels<double>({0, 500, 501, 1030}, 4, true);
  check_kernels<Eigen::bfloat16>({0, 64, 2100}, 5, false);
}

TEST_CASE("CUDA shard kernels: V = 1001 over 3 uneven shards, every dtype, masked", "[shard]") {
  const std::vector<std::int64_t> cuts = shard_ranks::uneven(1001, 3);
  check_kernels<float>(cuts, 6, true);
  check_kernels<Eigen::bfloat16>(cuts, 7, true);
  check_kernels<Eigen::half>(cuts, 8, false);
  check_kernels<Eigen::half>({0, 334, 667, 1001}, 9, true);
}

TEST_CASE("CUDA shard kernels reject bad shards", "[shard][sanitize]") {
  dpo::token_view<float, std::int64_t> v;
  v.vocab = 10;
  v.row_stride = 10;
  v.num_seqs = 1;
  v.seq_len = 1;
  const gpu::shard_status s = gpu::shard_partials(v, dpo::vocab_shard{20, 5, 12}, nullptr, nullptr);
  CHECK(!s);
  CHECK(s.message.find("holds 7 columns") != std::string::npos);
}

namespace {

/// A host pair view's buffers on the device (one buffer: padded or packed pairs).
template <class T>
struct device_pairs {
  dvec<T> logits;
  dvec<std::int64_t> labels, cu;
  dvec<std::uint8_t> mask;
  dpo::pair_view<T, std::int64_t> view;

  explicit device_pairs(const fixture::buffers<T, std::int64_t>& buf)
      : logits(buf.logits), labels(buf.labels), cu(buf.cu),
        mask(buf.use_mask ? buf.mask : std::vector<std::uint8_t>{}), view(buf.view()) {
    for (auto* v : {&view.chosen, &view.rejected}) {
      v->logits = logits;
      v->labels = labels;
      v->cu_seqlens = buf.cu.empty() ? nullptr : cu.p;
      v->mask = buf.use_mask ? mask.p : nullptr;
    }
  }
  /// The gradient view: the logits themselves (in place), or `grad` with their stride.
  dpo::pair_grad_view<T> grads(T* grad, std::int64_t stride) const {
    T* g = grad != nullptr ? grad : logits.p;
    return {g, stride, g, stride};
  }
};

/// The outputs of a pair stage in one buffer: per-pair outputs, loss, nll, metrics.
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
  double nll() const { return host[dpo::num_pair_outputs * P + 1]; }
};

/// The device pair stage from device totals [seq_fields, 2P]: its outputs and seq_grad.
struct device_stage {
  stage_outputs out;
  std::vector<double> seq_grad;
};
device_stage run_pair_stage(std::int64_t P, const double* d_totals, const fixture::reference& ref,
                            const dpo::loss_config& cfg, bool metrics) {
  device_stage r{stage_outputs(P), {}};
  const dvec<double> d_out(r.out.host), d_seq_grad(2 * P, -1.0);
  const dvec<double> d_rc(ref.c), d_rr(ref.r);
  std::size_t bytes = 0;
  require_ok(gpu::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, cfg, metrics, {}, nullptr));
  const dmem ws(bytes);
  require_ok(gpu::shard_pair_stage(ws.p, bytes, P, d_totals, d_rc, d_rr, cfg, metrics, r.out.at(d_out), d_seq_grad));
  r.out.host = d_out.get();
  r.seq_grad = d_seq_grad.get();
  return r;
}

/// shard_backward of one rank on the device, into grad (its workspace sized by the query).
template <class T>
void run_backward(const dpo::pair_view<T, std::int64_t>& dv, const dpo::vocab_shard& sh, std::int64_t num_rows,
                  const double* d_M, const double* d_S, const double* d_seq_grad, const double* d_nll, double ld_alpha,
                  const dpo::pair_grad_view<T>& g, const double* d_go, bool metrics) {
  gpu::shard_options opt;
  opt.metrics = metrics;
  opt.num_rows = num_rows;
  std::size_t need = 0;
  require_ok(gpu::shard_backward(nullptr, need, dev(dv), sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                 ld_alpha, dev(g), nullptr, opt));
  const dmem ws(need);
  require_ok(gpu::shard_backward(ws.p, need, dev(dv), sh, d_M, d_S, d_M, d_S, d_seq_grad, d_nll, ld_alpha, dev(g),
                                 d_go, opt));
}

/// One context rank's phase 1 on every vocabulary shard `cuts` of its buffer (both sides into
/// one array), each against dpo::cpu::shard_partials; the records combined on the host as the
/// two all-reduces would (combine_shard_records), uploaded.
struct combined_records {
  std::vector<double> M, S;
  dvec<double> d_M, d_S;
};
template <class T>
combined_records phase1(const fixture::buffers<T, std::int64_t>& buf, const device_pairs<T>& dev_pairs,
                           const std::vector<std::int64_t>& cuts, bool metrics) {
  const std::int64_t V = cuts.back(), F = dpo::shard_fields, rows = static_cast<std::int64_t>(buf.labels.size());
  const int W = static_cast<int>(cuts.size()) - 1;
  dpo::cpu::options copt;
  copt.metrics = metrics;
  gpu::shard_options gopt;
  gopt.metrics = metrics;
  gopt.num_rows = rows;
  const dpo::pair_view<T, std::int64_t> pv = buf.view();
  std::vector<std::vector<double>> gpu_rec(W);
  std::vector<const double*> rank_rec(W);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    std::vector<double> cpu_rec(rows * F, 0.0), cpu_max(rows, -INFINITY);
    const auto cv = shard_of(pv, sh);
    for (const auto& side : {cv.chosen, cv.rejected})
      dpo::cpu::shard_partials(side, sh, cpu_rec.data(), cpu_max.data(), copt);
    const dvec<double> d_rec(rows * F, 0.0), d_max(rows, -INFINITY);
    const auto dv = shard_of(dev_pairs.view, sh);
    for (const auto& side : {dv.chosen, dv.rejected})
      require_ok(gpu::shard_partials(dev(side), sh, d_rec, d_max, gopt));
    gpu_rec[t] = d_rec.get();
    CHECK(d_max.get() == cpu_max);
    check_near(gpu_rec[t], cpu_rec, value_rel<T>(), "records");
    rank_rec[t] = gpu_rec[t].data();
  }
  std::vector<double> M(rows), S(rows * F);
  dpo::cpu::combine_shard_records(0, rows, W, rank_rec.data(), M.data(), S.data());
  return {M, S, dvec<double>(M), dvec<double>(S)};
}

/// The whole pair path of the shards `cuts` on the device against dpo::cpu, step by step
/// from the same inputs: records, pair sums, the pair stage, the backward (grad_output 0.75,
/// out of place or in place).
template <class T>
void check_pair_path(const fixture::named_config& nc, layout k, bool metrics_on, const std::vector<std::int64_t>& cuts,
                     std::uint64_t seed, bool in_place = false, bool mask = false) {
  INFO(nc.name << ", " << fixture::name_of(k) << ", metrics " << metrics_on << ", " << cuts.size() - 1
               << " shards of " << cuts.back() << (in_place ? ", in place" : "") << (mask ? ", explicit mask" : ""));
  const dpo::loss_config& cfg = nc.cfg;
  const double rel = value_rel<T>();
  const std::int64_t V = cuts.back(), SF = dpo::seq_fields;
  const oracle::batch b = fixture::rounded_batch_pair<T>(fixture::spec(3, 6, V, seed)).of(k);
  fixture::buffers<T, std::int64_t> buf(b, k, 2, mask);
  const dpo::pair_view<T, std::int64_t> pv = buf.view();
  const std::int64_t P = pv.num_pairs(), rows = static_cast<std::int64_t>(buf.labels.size());
  const device_pairs<T> devp(buf);
  const bool metrics = metrics_on || cfg.use_weighting;
  dpo::cpu::options copt;
  copt.metrics = metrics;
  gpu::shard_options gopt;
  gopt.metrics = metrics;
  gopt.num_rows = rows;
  const int W = static_cast<int>(cuts.size()) - 1;
  const combined_records rec = phase1(buf, devp, cuts, metrics);

  // Phase 2: the pair sums (LD-DPO weighted) and, on the whole buffer as one view, the
  // sequence sums; every shard gets the same from the same combined records.
  const fixture::reference ref = fixture::make_reference(cfg, b, seed + 1);
  std::vector<double> seq_cpu(SF * 2 * P);
  const dpo::vocab_shard sh0{V, cuts[0], cuts[1]};
  dpo::cpu::shard_pair_partials(shard_of(pv, sh0), sh0, rec.M.data(), rec.S.data(), rec.M.data(), rec.S.data(),
                                cfg.ld_alpha, seq_cpu.data(), copt);
  const dvec<double> d_seq(SF * 2 * P, -1.0);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    require_ok(gpu::shard_pair_partials(dev(shard_of(devp.view, sh)), sh, rec.d_M, rec.d_S, rec.d_M, rec.d_S,
                                        cfg.ld_alpha, d_seq, gopt));
    check_near(d_seq.get(), seq_cpu, 1e-13, "pair sums");
  }
  {
    dpo::token_view<T, std::int64_t> one = pv.chosen, done = devp.view.chosen;
    one.num_seqs = done.num_seqs = 2 * P;
    std::vector<double> want(SF * 2 * P);
    dpo::cpu::shard_sequence_partials(one, dpo::whole_vocab(V), rec.M.data(), rec.S.data(), want.data(), copt);
    const dvec<double> d_one(SF * 2 * P, -1.0);
    require_ok(gpu::shard_sequence_partials(dev(done), dpo::whole_vocab(V), rec.d_M, rec.d_S, d_one, gopt));
    check_near(d_one.get(), want, 1e-13, "sequence sums");
  }

  // The pair stage on the device's totals, against the CPU's on the same totals.
  const std::vector<double> totals = d_seq.get();
  stage_outputs cpu_out(P);
  std::vector<double> seq_grad_cpu(2 * P);
  dpo::cpu::shard_pair_stage(P, totals.data(), ref.pc(), ref.pr(), cfg, metrics_on, cpu_out.at(cpu_out.host.data()),
                             seq_grad_cpu.data());
  const device_stage st = run_pair_stage(P, d_seq, ref, cfg, metrics_on);
  check_near(st.out.host, cpu_out.host, 1e-12, "pair stage outputs");
  check_near(st.seq_grad, seq_grad_cpu, 1e-12, "seq_grad");

  // The backward of every shard from the same seq_grad and NLL gradient, into one buffer (the
  // logits themselves in place; the CPU writes into a copy of them then).
  const double go = 0.75;
  const dvec<double> d_seq_grad(st.seq_grad), d_nll(std::vector<double>{cpu_out.nll()}), d_go(std::vector<double>{go});
  std::vector<T> want = in_place ? buf.logits : std::vector<T>(buf.logits.size(), T(-5.0f));
  const dvec<T> d_grad(in_place ? std::vector<T>{} : want);
  for (int t = 0; t < W; ++t) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    dpo::cpu::shard_backward(shard_of(pv, sh), sh, rec.M.data(), rec.S.data(), rec.M.data(), rec.S.data(),
                             st.seq_grad.data(), cpu_out.nll(), cfg.ld_alpha,
                             shard_of(dpo::pair_grad_view<T>{want.data(), buf.stride, want.data(), buf.stride}, sh),
                             go, copt);
    run_backward(shard_of(devp.view, sh), sh, rows, rec.d_M, rec.d_S, d_seq_grad, d_nll, cfg.ld_alpha,
                 shard_of(devp.grads(d_grad.p, buf.stride), sh), d_go, metrics);
  }
  check_grads((in_place ? devp.logits : d_grad).get(), want, buf.stride, grad_rel<T>(rel));
}

}  // namespace

TEST_CASE("CUDA pair shard path matches the CPU", "[shard][pairs]") {
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
}

TEST_CASE("CUDA pair shard path: fp32, bf16, fp16, V = 1001 over 3 shards, masks, in place", "[shard][pairs]") {
  const std::vector<std::int64_t> cuts = shard_ranks::uneven(1001, 3);
  check_pair_path<float>(fixture::config_named("mpo+wpo"), layout::packed, true, {0, 300, 701}, 3);
  check_pair_path<float>(fixture::config_named("sigmoid+ld_alpha"), layout::padded, true, cuts, 4, true, true);
  check_pair_path<Eigen::bfloat16>(fixture::config_named("ipo"), layout::packed, true, cuts, 5, false, true);
  check_pair_path<Eigen::bfloat16>(fixture::config_named("orpo"), layout::padded, false, cuts, 6, true);
  check_pair_path<Eigen::half>(fixture::config_named("hinge/js"), layout::padded, true, cuts, 7, false, true);
}

TEST_CASE("CUDA pair shard path, small cases", "[shard][pairs][sanitize]") {
  check_pair_path<float>(fixture::config_named("sigmoid+ld_alpha"), layout::padded, true, {0, 6, 13}, 21, true, true);
  check_pair_path<Eigen::bfloat16>(fixture::config_named("aot+aot_unpaired"), layout::packed, true, {0, 4, 5, 17},
                                   22);
}

namespace {

/// A whole step on W vocabulary x C context ranks, each rank's calls on the device in a loop
/// (its rows: shard_ranks::slice; its columns: cuts), the collectives on the host in rank
/// order, against dpo::cpu::dpo_forward_sharded / dpo_backward_sharded on the same ranks as
/// threads (shard_ranks::grid), and the loss against the unsharded dpo::cpu::dpo_forward.
template <class T>
void check_step(const fixture::named_config& nc, layout k, const std::vector<std::int64_t>& cuts, int C,
                std::uint64_t seed, bool in_place, bool mask) {
  INFO(nc.name << ", " << fixture::name_of(k) << ", " << cuts.size() - 1 << " shards of " << cuts.back() << " x " << C
               << " context ranks" << (in_place ? ", in place" : "") << (mask ? ", explicit mask" : ""));
  const dpo::loss_config& cfg = nc.cfg;
  const int W = static_cast<int>(cuts.size()) - 1;
  const std::int64_t V = cuts.back(), SF = dpo::seq_fields;
  const oracle::batch b = fixture::rounded_batch_pair<T>(fixture::spec(3, 7, V, seed)).of(k);
  const std::int64_t P = b.pairs();
  const fixture::reference ref = fixture::make_reference(cfg, b, seed + 1);
  const bool metrics = true;
  std::vector<fixture::buffers<T, std::int64_t>> local;
  for (int c = 0; c < C; ++c) local.emplace_back(shard_ranks::slice(b, c, C), k, 1, mask);

  // The device: every context rank's phase 1 and pair sums, the context sum, the stage.
  std::vector<device_pairs<T>> devs;
  devs.reserve(C);
  for (int c = 0; c < C; ++c) devs.emplace_back(local[c]);
  std::vector<combined_records> recs;
  std::vector<double> totals(SF * 2 * P, 0.0);
  gpu::shard_options gopt;
  gopt.metrics = metrics;
  for (int c = 0; c < C; ++c) {
    recs.push_back(phase1(local[c], devs[c], cuts, metrics));
    gopt.num_rows = static_cast<std::int64_t>(local[c].labels.size());
    std::vector<double> mine;
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      const dvec<double> d_seq(SF * 2 * P, -1.0);
      require_ok(gpu::shard_pair_partials(dev(shard_of(devs[c].view, sh)), sh, recs[c].d_M, recs[c].d_S, recs[c].d_M,
                                          recs[c].d_S, cfg.ld_alpha, d_seq, gopt));
      if (t == 0) mine = d_seq.get();
      CHECK(d_seq.get() == mine);  // every shard of a context rank: the same sums, bitwise
    }
    for (std::size_t i = 0; i < totals.size(); ++i) totals[i] += mine[i];
  }
  const dvec<double> d_totals(totals);
  const device_stage st = run_pair_stage(P, d_totals, ref, cfg, metrics);

  // The CPU's sharded calls on the same ranks as threads (in place or not, as the device).
  std::vector<stage_outputs> cpu_out(static_cast<std::size_t>(W * C), stage_outputs(P));
  shard_ranks::grid ranks(W, C);
  dpo::cpu::options o;
  o.num_threads = 1;
  o.metrics = metrics;
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    fixture::buffers<T, std::int64_t>& lb = local[static_cast<std::size_t>(c)];
    const auto view = shard_of(lb.view(), sh);
    stage_outputs& co = cpu_out[static_cast<std::size_t>(rank)];
    dpo::cpu::shard_state state;
    dpo::cpu::dpo_forward_sharded(view, sh, ref.pc(), ref.pr(), cfg, comm, co.at(co.host.data()), state, o);
    dpo::cpu::dpo_backward_sharded(view, sh, state, shard_of(in_place ? lb.inplace_view() : lb.grad_view(), sh), 0.75,
                                   o);
  });
  for (const std::string& e : errors) REQUIRE(e.empty());
  for (const stage_outputs& co : cpu_out) check_near(st.out.host, co.host, value_rel<T>(), "step outputs");

  // The unsharded CPU forward on the whole batch: the same loss and log-probs.
  fixture::buffers<T, std::int64_t> full(b, k, 0, mask);
  const dpo::cpu::forward_result whole = dpo::cpu::dpo_forward(full.view(), ref.pc(), ref.pr(), cfg, o);
  const double lrel = std::is_same_v<dpo::cpu::acc_t<T>, float> ? 1e-5 : 2e-9;
  stage_outputs got = st.out;
  const dpo::forward_outputs g = got.at(got.host.data());
  CHECK(near(*g.loss, whole.loss, lrel * (1 + std::fabs(whole.loss))));
  for (std::int64_t i = 0; i < P; ++i) {
    INFO("pair " << i);
    CHECK(near(g.chosen_logps[i], whole.chosen_logps[i], lrel * (1 + std::fabs(whole.chosen_logps[i]))));
  }

  // The backward of every rank on the device from the device stage's seq_grad, each context
  // rank's buffer against the CPU rank's.
  const dvec<double> d_seq_grad(st.seq_grad), d_nll(std::vector<double>{st.out.nll()}), d_go(std::vector<double>{0.75});
  for (int c = 0; c < C; ++c) {
    INFO("context rank " << c);
    const fixture::buffers<T, std::int64_t>& lb = local[c];
    const dvec<T> d_grad(in_place ? std::vector<T>{} : std::vector<T>(lb.logits.size(), lb.sentinel()));
    for (int t = 0; t < W; ++t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      run_backward(shard_of(devs[c].view, sh), sh, static_cast<std::int64_t>(lb.labels.size()), recs[c].d_M,
                   recs[c].d_S, d_seq_grad, d_nll, cfg.ld_alpha, shard_of(devs[c].grads(d_grad.p, lb.stride), sh),
                   d_go, metrics);
    }
    check_grads((in_place ? devs[c].logits : d_grad).get(), in_place ? lb.logits : lb.grad, lb.stride,
                grad_rel<T>(value_rel<T>()));
  }
}

}  // namespace

TEST_CASE("CUDA shard step: vocabulary x context ranks match dpo::cpu's sharded step", "[shard][context]") {
  const std::vector<std::int64_t> cuts = shard_ranks::uneven(1001, 3);
  check_step<float>(fixture::config_named("sigmoid"), layout::padded, cuts, 2, 31, false, true);
  check_step<float>(fixture::config_named("mpo+wpo"), layout::packed, cuts, 3, 32, true, false);
  check_step<Eigen::bfloat16>(fixture::config_named("orpo"), layout::packed, cuts, 2, 33, false, true);
  check_step<double>(fixture::config_named("ipo"), layout::padded, {0, 4, 5, 17}, 3, 34, true, true);
}

TEST_CASE("CUDA shard step, small", "[shard][context][sanitize]") {
  check_step<float>(fixture::config_named("sigmoid+wpo"), layout::packed, {0, 6, 13}, 2, 41, true, true);
}

namespace {

void expect_invalid(const gpu::shard_status& s, const char* needle) {
  INFO("expected an error naming '" << needle << "', got: " << (s ? "success" : s.message));
  CHECK(!s);
  CHECK(s.message.find(needle) != std::string::npos);
}

}  // namespace

TEST_CASE("CUDA pair shard entry points reject bad arguments and write nothing", "[shard][pairs][sanitize]") {
  const oracle::batch b = fixture::rounded_random_batch<double>(fixture::spec(2, 4, 9, 7));
  fixture::buffers<double, std::int64_t> buf(b, layout::padded);
  const device_pairs<double> devp(buf);
  const auto dview = dev(devp.view);
  const std::int64_t P = 2, rows = static_cast<std::int64_t>(buf.labels.size()), SF = dpo::seq_fields;
  const dpo::vocab_shard sh = dpo::whole_vocab(9);
  const std::vector<double> sentinel(SF * 2 * P, -3.0);
  const dvec<double> d_rec(rows * dpo::shard_fields, 0.0), d_max(rows, 0.0), d_seq(sentinel);
  const auto untouched = [&] { CHECK(d_seq.get() == sentinel); };

  // Phase 2 pairs.
  expect_invalid(gpu::shard_pair_partials(dview, sh, d_max, d_rec, d_max, d_rec, 1.5, d_seq), "ld_alpha");
  expect_invalid(gpu::shard_pair_partials(dview, sh, d_max, d_rec, d_max, nullptr, 1.0, d_seq), "rejected_records");
  expect_invalid(gpu::shard_pair_partials(dview, dpo::vocab_shard{20, 0, 8}, d_max, d_rec, d_max, d_rec, 1.0, d_seq),
                 "holds 8 columns");
  auto packed = dview;
  packed.chosen.cu_seqlens = packed.rejected.cu_seqlens = devp.labels;  // any device pointer: never read
  packed.chosen.first_seq = 0;
  expect_invalid(gpu::shard_pair_partials(packed, sh, d_max, d_rec, d_max, d_rec, 1.0, d_seq), "num_rows");
  untouched();

  // The device pair stage.
  const dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  const dvec<double> d_ref(P, -10.0), d_grad(sentinel);
  std::size_t bytes = 0;
  expect_invalid(gpu::shard_pair_stage(nullptr, bytes, 0, nullptr, nullptr, nullptr, cfg, true, {}, nullptr),
                 "num_pairs");
  dpo::loss_config bad = cfg;
  bad.beta = NAN;
  expect_invalid(gpu::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, bad, true, {}, nullptr), "beta");
  require_ok(gpu::shard_pair_stage(nullptr, bytes, P, nullptr, nullptr, nullptr, cfg, true, {}, nullptr));
  const dmem ws(bytes);
  dpo::forward_outputs out;
  out.losses = d_seq;
  expect_invalid(gpu::shard_pair_stage(ws.p, bytes, P, d_seq, nullptr, d_ref, cfg, true, out, d_grad),
                 "ref_chosen_logps");
  std::size_t small = bytes - 8;
  expect_invalid(gpu::shard_pair_stage(ws.p, small, P, d_seq, d_ref, d_ref, cfg, true, out, d_grad),
                 "workspace_bytes");
  expect_invalid(gpu::shard_pair_stage(ws.p, bytes, P, d_seq, d_ref, d_ref, cfg, true, out, nullptr), "seq_grad");
  expect_invalid(gpu::shard_pair_stage(ws.p, bytes, P, nullptr, d_ref, d_ref, cfg, true, out, d_grad), "seq_totals");
  untouched();
  CHECK(d_grad.get() == sentinel);

  // The paired backward.
  const dvec<double> d_g(buf.logits.size(), -3.0);
  const dpo::pair_grad_view<double> g{d_g, buf.stride, d_g, buf.stride};
  std::size_t need = 0;
  expect_invalid(gpu::shard_backward(nullptr, need, dview, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                     -0.5, g),
                 "ld_alpha");
  require_ok(gpu::shard_backward(nullptr, need, dview, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0,
                                 g));
  const dmem bws(need);
  expect_invalid(gpu::shard_backward(bws.p, need, dview, sh, d_max, d_rec, d_max, d_rec, nullptr, nullptr, 1.0, g),
                 "seq_grad");
  std::size_t less = need - 8;
  expect_invalid(gpu::shard_backward(bws.p, less, dview, sh, d_max, d_rec, d_max, d_rec, d_grad, nullptr, 1.0, g),
                 "workspace_bytes");
  const dpo::pair_grad_view<double> narrow{d_g, 4, d_g, 4};
  expect_invalid(gpu::shard_backward(bws.p, need, dview, sh, d_max, d_rec, d_max, d_rec, d_grad, nullptr, 1.0, narrow),
                 "grad.chosen_stride");
  CHECK(d_g.get() == std::vector<double>(buf.logits.size(), -3.0));
}

TEST_CASE("CUDA pair shard entry points: a side without rows takes null row state", "[shard][pairs][sanitize]") {
  // Padded T = 0 (a context rank holding no row): the logits, labels, records, maxima and
  // gradient are empty buffers, null pointers; seq / seq_grad are still required.
  const std::int64_t P = 2, V = 9, SF = dpo::seq_fields;
  const dpo::vocab_shard sh = dpo::whole_vocab(V);
  const auto empty = dev(dpo::padded_pairs<double, std::int64_t>(nullptr, nullptr, 2 * P, 0, V, V));
  const dvec<double> d_seq(std::vector<double>(SF * 2 * P, -3.0));
  require_ok(gpu::shard_pair_partials(empty, sh, nullptr, nullptr, nullptr, nullptr, 1.0, d_seq));
  const std::vector<double> seq = d_seq.get();
  for (std::int64_t s = 0; s < 2 * P; ++s) CHECK(seq[dpo::detail::at(dpo::seq_field::tokens) * 2 * P + s] == 0.0);
  expect_invalid(gpu::shard_pair_partials(empty, sh, nullptr, nullptr, nullptr, nullptr, 1.0, nullptr), "seq is null");
  auto tv = empty.chosen;
  tv.num_seqs = 2 * P;
  require_ok(gpu::shard_sequence_partials(tv, sh, nullptr, nullptr, d_seq));
  expect_invalid(gpu::shard_sequence_partials(tv, sh, nullptr, nullptr, nullptr), "seq is null");
  const dvec<double> d_grad(std::vector<double>(2 * P, 0.5));
  const dpo::pair_grad_view<double> g{nullptr, V, nullptr, V};
  std::size_t need = 0;
  require_ok(gpu::shard_backward(nullptr, need, empty, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0,
                                 g));
  const dmem bws(need > 0 ? need : 256);
  require_ok(gpu::shard_backward(bws.p, need, empty, sh, nullptr, nullptr, nullptr, nullptr, d_grad, nullptr, 1.0, g));
  expect_invalid(gpu::shard_backward(bws.p, need, empty, sh, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0,
                                     g),
                 "seq_grad is null");
  // With rows, the missing state is named.
  const oracle::batch b = fixture::rounded_random_batch<double>(fixture::spec(2, 4, V, 9));
  fixture::buffers<double, std::int64_t> buf(b, layout::padded);
  const device_pairs<double> devp(buf);
  const auto dview = dev(devp.view);
  const std::int64_t rows = static_cast<std::int64_t>(buf.labels.size());
  const dvec<double> d_rec(rows * dpo::shard_fields, 0.0), d_max(rows, 0.0);
  expect_invalid(gpu::shard_pair_partials(dview, sh, nullptr, d_rec, d_max, d_rec, 1.0, d_seq), "chosen_max is null");
  expect_invalid(gpu::shard_sequence_partials(dview.chosen, sh, d_max, nullptr, d_seq), "records is null");
}

namespace {

/// The device-data check of a packed pair batch of V = 1001 on its middle shard [334, 667):
/// shard_check of the pairs (and of the chosen side alone), then every call of the step
/// gated by the word. Returns the check's status. When the data is bad, checks that the gated
/// calls wrote nothing but NaN sums; when it is good, that they wrote what the ungated ones do.
gpu::shard_status check_and_gate(const fixture::buffers<float, std::int64_t>& buf, bool bad) {
  const std::int64_t V = 1001, F = dpo::shard_fields, SF = dpo::seq_fields, P = buf.P;
  const std::int64_t rows = static_cast<std::int64_t>(buf.labels.size());
  const dpo::vocab_shard sh{V, 334, 667};
  const device_pairs<float> devp(buf);
  const auto dv = shard_of(devp.view, sh);
  gpu::shard_options opt;
  opt.num_rows = rows;
  std::size_t bytes = 0;
  require_ok(gpu::shard_check(nullptr, bytes, dev(dv), sh, opt));
  CHECK(bytes >= 64);
  const dmem ws(bytes);
  const gpu::shard_status s = gpu::shard_check(ws.p, bytes, dev(dv), sh, opt);
  REQUIRE(s);  // the launch; the data's verdict is in the word
  const gpu::shard_status verdict = gpu::read_error(ws.p);
  CHECK(verdict.ok() != bad);
  // The chosen side alone passes: the sections below plant every bad value on the rejected
  // side, whose labels and cu_seqlens entries a view of the chosen sequences does not read.
  {
    std::size_t one = 0;
    require_ok(gpu::shard_check(nullptr, one, dev(dv.chosen), sh, opt));
    const dmem ws1(one);
    require_ok(gpu::shard_check(ws1.p, one, dev(dv.chosen), sh, opt));
    require_ok(gpu::read_error(ws1.p));
  }
  gpu::shard_options gated = opt;
  gated.error_word = gpu::shard_error_word(ws.p);

  // Phase 1, then phase 2 per row and per pair, each gated and (good data) ungated.
  const std::vector<double> rec0(rows * F, -3.0), max0(rows, -4.0);
  const dvec<double> g_rec(rec0), g_max(max0), u_rec(rec0), u_max(max0);
  for (const auto& side : {dv.chosen, dv.rejected}) {
    require_ok(gpu::shard_partials(dev(side), sh, g_rec, g_max, gated));
    if (!bad) require_ok(gpu::shard_partials(dev(side), sh, u_rec, u_max, opt));
  }
  if (bad) {
    CHECK(g_rec.get() == rec0);
    CHECK(g_max.get() == max0);
  } else {
    CHECK(g_rec.get() == u_rec.get());
    CHECK(g_max.get() == u_max.get());
  }
  std::vector<dvec<double>> outs;
  gpu::row_outputs ro{};
  for (std::size_t i = 0; i < ro.size(); ++i) outs.emplace_back(std::vector<double>(rows, -9.0));
  for (std::size_t i = 0; i < ro.size(); ++i) ro[i] = outs[i];
  require_ok(gpu::shard_row_values(dev(dv.chosen), sh, g_max, g_rec, ro, gated));
  if (bad)
    for (const dvec<double>& o : outs) CHECK(o.get() == std::vector<double>(rows, -9.0));
  const dvec<double> g_seq(SF * 2 * P, -1.0), u_seq(SF * 2 * P, -1.0), g_one(SF * P, -1.0);
  require_ok(gpu::shard_pair_partials(dev(dv), sh, g_max, g_rec, g_max, g_rec, 0.5, g_seq, gated));
  require_ok(gpu::shard_sequence_partials(dev(dv.chosen), sh, g_max, g_rec, g_one, gated));
  if (bad) {
    for (const double x : g_seq.get()) CHECK(std::isnan(x));
    for (const double x : g_one.get()) CHECK(std::isnan(x));
  } else {
    require_ok(gpu::shard_pair_partials(dev(dv), sh, u_max, u_rec, u_max, u_rec, 0.5, u_seq, opt));
    const std::vector<double> got = g_seq.get();
    CHECK(got == u_seq.get());
    for (const double x : got) CHECK(std::isfinite(x));
  }

  // The backwards: nothing written when bad (the sentinel stays), as ungated when good.
  const std::vector<double> coef(rows, 0.5), seq_grad(2 * P, 0.25);
  const dvec<double> d_coef(coef), d_seq_grad(seq_grad), d_nll(1, 0.1);
  const std::vector<float> g0(buf.logits.size(), -7.0f);
  for (int which = 0; which < 3; ++which) {
    INFO("backward " << which << " (rows, sequences, pairs)");
    const dvec<float> g_grad(g0), u_grad(g0);
    for (const bool use_gate : {true, false}) {
      if (bad && !use_gate) continue;
      const gpu::shard_options& o = use_gate ? gated : opt;
      float* out = (use_gate ? g_grad.p : u_grad.p) + sh.start;
      if (which == 0) {
        require_ok(gpu::shard_backward_rows(dev(dv.chosen), sh, g_max, g_rec, d_coef, 1.0, out, buf.stride, o));
      } else if (which == 1) {
        require_ok(gpu::shard_backward_sequences(dev(dv.chosen), sh, g_max, g_rec, d_seq_grad, 0.1, P, 1.0, out,
                                                 buf.stride, o));
      } else {
        std::size_t need = 0;
        const dpo::pair_grad_view<float> gv{out, buf.stride, out, buf.stride};
        require_ok(gpu::shard_backward(nullptr, need, dev(dv), sh, nullptr, nullptr, nullptr, nullptr, nullptr,
                                       nullptr, 0.5, dev(gv), nullptr, o));
        const dmem bws(need);
        require_ok(gpu::shard_backward(bws.p, need, dev(dv), sh, g_max, g_rec, g_max, g_rec, d_seq_grad, d_nll, 0.5,
                                       dev(gv), nullptr, o));
      }
    }
    if (bad)
      CHECK(g_grad.get() == g0);
    else
      CHECK(g_grad.get() == u_grad.get());
  }
  return verdict;
}

/// The rows of sequence i of a side of a packed buffer whose labels count (completion rows).
std::vector<std::int64_t> completion_rows(const fixture::buffers<float, std::int64_t>& buf, int side, std::int64_t i) {
  const std::int64_t begin = buf.cu[side * buf.P + i], end = buf.cu[side * buf.P + i + 1];
  std::vector<std::int64_t> r;
  for (std::int64_t k = begin; k < end; ++k)
    if (buf.labels[k] != buf.ignore_index) r.push_back(k);
  return r;
}

}  // namespace

TEST_CASE("CUDA shard_check: labels against the global vocabulary and cu_seqlens, gating the step",
          "[shard][check][sanitize]") {
  const std::int64_t V = 1001;
  const oracle::batch b = fixture::rounded_batch_pair<float>(fixture::spec(3, 6, V, 29)).of(layout::packed);
  const fixture::buffers<float, std::int64_t> good(b, layout::packed);
  REQUIRE(good.cu.size() == static_cast<std::size_t>(2 * good.P + 1));
  const std::int64_t rows = static_cast<std::int64_t>(good.labels.size());

  SECTION("valid data, labels on every shard: the gated calls write what the ungated ones do") {
    fixture::buffers<float, std::int64_t> buf = good;
    // Labels outside this rank's shard [334, 667) are valid: global ids.
    std::vector<std::int64_t> c0;
    for (std::int64_t i = 0; i < buf.P; ++i)
      for (const std::int64_t r : completion_rows(buf, 0, i)) c0.push_back(r);
    REQUIRE(c0.size() >= 3);
    buf.labels[c0[0]] = 0;
    buf.labels[c0[1]] = 700;
    buf.labels[c0[2]] = V - 1;
    require_ok(check_and_gate(buf, false));
  }
  SECTION("a label outside [0, V): the lowest bad row is named, with the global vocabulary") {
    fixture::buffers<float, std::int64_t> buf = good;
    const std::vector<std::int64_t> r1 = completion_rows(buf, 1, 1), r2 = completion_rows(buf, 1, 2);
    REQUIRE(r1.size() >= 2);
    REQUIRE(!r2.empty());
    buf.labels[r2[0]] = -5;  // a later row: not the one reported
    buf.labels[r1[1]] = V;
    const gpu::shard_status s = check_and_gate(buf, true);
    INFO(s.message);
    CHECK(s.message == "dpo: rejected.labels[" + std::to_string(r1[1]) + "] = 1001 is outside [0, vocab = 1001) "
                       "and is not ignore_index");
  }
  SECTION("a negative label that is not ignore_index") {
    fixture::buffers<float, std::int64_t> buf = good;
    const std::vector<std::int64_t> r = completion_rows(buf, 1, 0);
    buf.labels[r.back()] = -1;
    const gpu::shard_status s = check_and_gate(buf, true);
    CHECK(s.message.find("rejected.labels[" + std::to_string(r.back()) + "] = -1 is outside") != std::string::npos);
  }
  SECTION("cu_seqlens decreasing") {
    fixture::buffers<float, std::int64_t> buf = good;
    const std::int64_t q = buf.P + 2;  // a rejected sequence's end before its start
    buf.cu[q] = buf.cu[q - 1] - 1;
    const gpu::shard_status s = check_and_gate(buf, true);
    CHECK(s.message == "dpo: rejected.cu_seqlens is not non-decreasing: cu_seqlens[" + std::to_string(q) + "] = " +
                           std::to_string(buf.cu[q]) + " < cu_seqlens[" + std::to_string(q - 1) + "] = " +
                           std::to_string(buf.cu[q - 1]));
  }
  SECTION("cu_seqlens past the buffer's rows: nothing reads past them") {
    fixture::buffers<float, std::int64_t> buf = good;
    const std::int64_t q = 2 * buf.P;
    buf.cu[q] = rows + 1000;
    const gpu::shard_status s = check_and_gate(buf, true);
    CHECK(s.message == "dpo: rejected.cu_seqlens[" + std::to_string(q) + "] = " + std::to_string(rows + 1000) +
                           " is past options.num_rows = " + std::to_string(rows));
  }
}

TEST_CASE("CUDA shard entry points refuse outputs on their inputs or on each other, and write nothing",
          "[shard][sanitize]") {
  // The audit's probes: each call was accepted with an ok status and wrong values (or a
  // crash, shard_rebase with a negative begin).
  for (int which = 0; which < gpu::shard_alias_cases; ++which) {
    INFO("case " << which << ": " << gpu::shard_alias_names[which]);
    bool written = true;
    const std::string msg = gpu::shard_alias_error(which, &written);
    CHECK(msg.find(gpu::shard_alias_names[which]) != std::string::npos);
    CHECK_FALSE(written);
  }
}
