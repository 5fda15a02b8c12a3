// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The fused LM head on a vocabulary shard (dpo/cpu/linear_shard.hpp): ranks run as threads
// with an in-process all-reduce, each holding rows [start, end) of the weight (uneven
// shards), and every result and gradient is checked against the unsharded head on the same
// batch: per-token log-probs and TRL's extra outputs with their backward (linear_logps), and
// DPO from hidden states (linear_dpo) over every loss configuration, padded / packed /
// separate layouts, a bias and logit transforms, with context parallelism alone and together
// with the vocabulary shards. dHidden is the sum of the ranks' partials (the caller's
// all-reduce); dWeight / dBias rows of each shard are compared with the unsharded rows.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "checks.hpp"
#include "dpo/cpu/linear_shard.hpp"
#include "fixtures.hpp"
#include "shard_ranks.hpp"

namespace {

using fixture::named_config;
using label_t = std::int64_t;
using shard_ranks::cut;
using shard_ranks::kVocab;
using shard_ranks::run_ranks;
using shard_ranks::uneven;
using test_support::check_close;

enum class kind { padded, packed, separate };

/// A batch of 2P sequences of hidden rows (sequences [0, P) chosen), each of `rows[s]` rows,
/// and an LM head [V, H] with a bias.
struct problem {
  std::int64_t P = 0, H = 0, V = 0;
  std::vector<std::vector<std::vector<double>>> hid;  // [2P][rows][H]
  std::vector<std::vector<label_t>> lab;              // [2P][rows]
  std::vector<double> weight, bias;
  dpo::logit_transforms tr;
  std::vector<double> ref_c, ref_r;
};

template <class T>
double rnd(double x) {
  return static_cast<double>(static_cast<T>(x));
}

/// Labels in every shard, prompts and padding masked with -100; `varying`: sequences of
/// different lengths.
template <class T>
problem make_problem(std::int64_t P, std::int64_t rows, std::int64_t H, std::int64_t V, bool varying,
                     std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_int_distribution<label_t> lab(0, V - 1);
  problem p;
  p.P = P;
  p.H = H;
  p.V = V;
  for (std::int64_t s = 0; s < 2 * P; ++s) {
    const std::int64_t n = varying ? rows - (s * 3) % rows / 2 : rows;
    std::vector<std::vector<double>> h(static_cast<std::size_t>(n), std::vector<double>(static_cast<std::size_t>(H)));
    std::vector<label_t> y(static_cast<std::size_t>(n));
    for (std::int64_t t = 0; t < n; ++t) {
      for (auto& x : h[t]) x = rnd<T>(nd(gen));
      y[t] = t < 1 + s % 2 || (!varying && t >= n - s % 3) ? -100 : lab(gen);
    }
    p.hid.push_back(h);
    p.lab.push_back(y);
  }
  for (std::int64_t i = 0; i < V * H; ++i) p.weight.push_back(rnd<T>(nd(gen) * 0.7));
  for (std::int64_t i = 0; i < V; ++i) p.bias.push_back(rnd<T>(nd(gen) * 0.3));
  for (std::int64_t i = 0; i < P; ++i) {
    p.ref_c.push_back(-3.0 * rows + nd(gen));
    p.ref_r.push_back(-3.0 * rows + nd(gen));
  }
  return p;
}

/// One context rank's slice of a problem, laid out in the library's buffers.
template <class T>
struct laid_out {
  kind k;
  std::int64_t P, H, T_ = 0;
  std::vector<T> hidden, hidden_r;          // one buffer, or chosen / rejected
  std::vector<label_t> labels, labels_r;
  std::vector<std::int64_t> cu;
  std::vector<std::vector<std::int64_t>> row_of;  // [2P][t]: buffer row of the slice's row t
  std::vector<T> dh, dh_r;                        // dHidden, same layout

  /// `none`: a context rank holding no row at all (padded T = 0, packed sequences all
  /// empty): every buffer empty, so its pointers are null.
  laid_out(const problem& p, kind kk, int c, int C, bool none = false) : k(kk), P(p.P), H(p.H) {
    std::int64_t longest = 0;
    for (const auto& s : p.hid) {
      const std::int64_t n = static_cast<std::int64_t>(s.size());
      longest = std::max(longest, cut(n, c + 1, C) - cut(n, c, C));
    }
    T_ = none ? 0 : std::max<std::int64_t>(longest, 1);
    cu.push_back(0);
    for (std::int64_t s = 0; s < 2 * P; ++s) {
      const std::int64_t n = static_cast<std::int64_t>(p.hid[s].size());
      const std::int64_t t0 = none ? n : cut(n, c, C), t1 = none ? n : cut(n, c + 1, C);
      const bool second = k == kind::separate && s >= P;
      std::vector<T>& h = second ? hidden_r : hidden;
      std::vector<label_t>& y = second ? labels_r : labels;
      const std::int64_t base = k == kind::packed ? cu.back() : (second ? s - P : s) * T_;
      const std::int64_t len = k == kind::packed ? t1 - t0 : T_;
      h.resize(static_cast<std::size_t>((base + len) * H), T(0));
      y.resize(static_cast<std::size_t>(base + len), -100);
      row_of.emplace_back();
      for (std::int64_t t = t0; t < t1; ++t) {
        const std::int64_t r = base + t - t0;
        row_of.back().push_back(r);
        for (std::int64_t j = 0; j < H; ++j) h[r * H + j] = T(static_cast<float>(p.hid[s][t][j]));
        y[r] = p.lab[s][t];
      }
      cu.push_back(base + len);
    }
    dh.assign(hidden.size(), T(0));
    dh_r.assign(hidden_r.size(), T(0));
  }

  dpo::hidden_pairs<T, label_t> pairs() const {
    if (k == kind::packed) return dpo::linear_packed_pairs(hidden.data(), H, H, labels.data(), cu.data(), 2 * P);
    if (k == kind::padded) return dpo::linear_padded_pairs(hidden.data(), H, H, labels.data(), 2 * P, T_);
    return dpo::linear_separate_pairs(hidden.data(), labels.data(), hidden_r.data(), labels_r.data(), P, T_, H, H);
  }

  template <class G>
  dpo::linear_dpo_grads<T, G> grads(std::vector<G>& dw, std::vector<G>& db) {
    dpo::linear_dpo_grads<T, G> g;
    g.chosen_hidden = dh.data();
    g.rejected_hidden = k == kind::separate ? dh_r.data() : dh.data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
    g.weight = dw.data();
    g.weight_stride = H;
    g.bias = db.data();
    return g;
  }

  /// dHidden of sequence s, slice row t.
  double grad_at(std::int64_t s, std::int64_t t, std::int64_t j) const {
    const bool second = k == kind::separate && s >= P;
    return static_cast<double>((second ? dh_r : dh)[row_of[s][t] * H + j]);
  }
};

template <class T>
dpo::linear_head<T> head_of(const std::vector<T>& w, const std::vector<T>& b, std::int64_t start, std::int64_t width,
                            std::int64_t H, const dpo::logit_transforms& tr) {
  return dpo::make_linear_head(w.data() + start * H, width, H, H, b.data() + start, tr);
}

struct dpo_case {
  kind k = kind::padded;
  std::vector<std::int64_t> cuts;  // vocabulary boundaries
  int context = 1;
  bool metrics = true;
  bool empty_last = false;  // the last context rank holds no row (the others split the rows)
};

/// Relative tolerances of the sharded results against the unsharded ones: the shards' sums
/// are combined in double instead of folded in the accumulation type, and dHidden is a sum
/// of the ranks' partials.
template <class T>
double rel_tol() {
  return std::is_same_v<T, double> ? 1e-10 : 2e-5;
}

std::vector<double> metric_vec(const dpo::cpu::metrics& m) {
  std::vector<double> v(static_cast<std::size_t>(dpo::num_metrics));
  std::memcpy(v.data(), &m, sizeof m);
  return v;
}

template <class T>
void check_linear_dpo(const named_config& nc, const problem& p, const dpo_case& dc) {
  using G = dpo::cpu::acc_t<T>;
  const int W = static_cast<int>(dc.cuts.size()) - 1, C = dc.context;
  INFO(nc.name << " layout " << static_cast<int>(dc.k) << " vocab ranks " << W << " context ranks " << C
               << (dc.empty_last ? " last context rank empty" : ""));
  const int Cr = dc.empty_last ? C - 1 : C;  // the context ranks holding rows
  const std::int64_t P = p.P, H = p.H, V = p.V;
  const bool refs = fixture::needs_reference(nc.cfg) || nc.cfg.reference_free;
  const double* rc = refs ? p.ref_c.data() : nullptr;
  const double* rr = refs ? p.ref_r.data() : nullptr;
  std::vector<T> w, b;
  for (double x : p.weight) w.push_back(T(static_cast<float>(x)));
  for (double x : p.bias) b.push_back(T(static_cast<float>(x)));
  dpo::cpu::linear_dpo_options o;
  o.num_threads = 1;
  o.metrics = dc.metrics;

  laid_out<T> full(p, dc.k, 0, 1);
  std::vector<G> dw(static_cast<std::size_t>(V * H), G(0)), db(static_cast<std::size_t>(V), G(0));
  dpo::cpu::forward_result want;
  dpo::cpu::linear_dpo(full.pairs(), head_of(w, b, 0, V, H, p.tr), rc, rr, nc.cfg,
                       dpo::cpu::detail::owned_outputs(want, P), full.grads(dw, db), o);

  std::deque<laid_out<T>> local;
  for (int c = 0; c < C; ++c) local.emplace_back(p, dc.k, c < Cr ? c : 0, c < Cr ? Cr : 1, c >= Cr);
  // Each vocabulary rank's partial dHidden is kept apart and summed below (the caller's
  // all-reduce); dWeight / dBias rows per vocabulary rank, summed over the context ranks.
  std::deque<laid_out<T>> partial;
  for (int r = 0; r < W * C; ++r) {
    const int c = r / W;
    partial.emplace_back(p, dc.k, c < Cr ? c : 0, c < Cr ? Cr : 1, c >= Cr);
  }
  std::vector<std::vector<G>> gw(static_cast<std::size_t>(W * C)), gb(gw.size());
  shard_ranks::grid ranks(W, C);
  std::vector<dpo::cpu::forward_result> got(static_cast<std::size_t>(W * C));
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, dc.cuts[t], dc.cuts[t + 1]};
    std::vector<G>& rw = gw[static_cast<std::size_t>(rank)];
    std::vector<G>& rb = gb[static_cast<std::size_t>(rank)];
    rw.assign(static_cast<std::size_t>(sh.width() * H), G(0));
    rb.assign(static_cast<std::size_t>(sh.width()), G(0));
    laid_out<T>& mine = partial[static_cast<std::size_t>(rank)];
    dpo::cpu::linear_dpo_sharded(local[static_cast<std::size_t>(c)].pairs(), head_of(w, b, sh.start, sh.width(), H, p.tr),
                                 sh, rc, rr, nc.cfg, comm,
                                 dpo::cpu::detail::owned_outputs(got[static_cast<std::size_t>(rank)], P),
                                 mine.grads(rw, rb), 1.0, o);
  });
  for (const std::string& e : errors) REQUIRE(e == "");

  const double tol = rel_tol<T>();
  for (std::size_t k = 0; k < got.size(); ++k) {
    INFO("rank " << k);
    const dpo::cpu::forward_result& r = got[k];
    CHECK(r.loss == got[0].loss);  // every rank the same, bitwise
    CHECK(std::memcmp(&r.metrics, &got[0].metrics, sizeof r.metrics) == 0);
    CHECK(fixture::near(r.loss, want.loss, tol * (1 + std::fabs(want.loss))));
    check_close(metric_vec(r.metrics), metric_vec(want.metrics), tol, "metrics");
#define DPO_TEST_PAIR(name)                                                                          \
  check_close(std::vector<double>(r.name.data(), r.name.data() + P),                                 \
              std::vector<double>(want.name.data(), want.name.data() + P), tol, #name);
    DPO_PAIR_OUTPUTS(DPO_TEST_PAIR)
#undef DPO_TEST_PAIR
  }
  // dHidden: the vocabulary ranks' partials summed, each context rank's rows.
  std::vector<double> got_h, want_h;
  for (int c = 0; c < Cr; ++c)  // an empty rank has no row
    for (std::int64_t s = 0; s < 2 * P; ++s) {
      const std::int64_t n = static_cast<std::int64_t>(p.hid[s].size());
      const std::int64_t t0 = cut(n, c, Cr);
      for (std::int64_t t = t0; t < cut(n, c + 1, Cr); ++t)
        for (std::int64_t j = 0; j < H; ++j) {
          double sum = 0;
          for (int v = 0; v < W; ++v) sum += partial[static_cast<std::size_t>(c * W + v)].grad_at(s, t - t0, j);
          got_h.push_back(sum);
          want_h.push_back(full.grad_at(s, t, j));
        }
    }
  // Each partial is rounded to T before the sum (the caller all-reduces dHidden in T).
  const double h_tol = std::max(tol, W * fixture::output_rel<T>());
  check_close(got_h, want_h, h_tol, "dHidden");
  // dWeight / dBias: shard rows, summed over the context ranks (the data-parallel sum).
  for (int t = 0; t < W; ++t) {
    const std::int64_t s0 = dc.cuts[t], n = dc.cuts[t + 1] - s0;
    std::vector<double> gwv(static_cast<std::size_t>(n * H), 0.0), gbv(static_cast<std::size_t>(n), 0.0);
    for (int c = 0; c < C; ++c) {
      const auto& rw = gw[static_cast<std::size_t>(c * W + t)];
      const auto& rb = gb[static_cast<std::size_t>(c * W + t)];
      for (std::size_t i = 0; i < gwv.size(); ++i) gwv[i] += static_cast<double>(rw[i]);
      for (std::size_t i = 0; i < gbv.size(); ++i) gbv[i] += static_cast<double>(rb[i]);
    }
    std::vector<double> ww(dw.begin() + s0 * H, dw.begin() + (s0 + n) * H), wb(db.begin() + s0, db.begin() + s0 + n);
    INFO("vocabulary rank " << t);
    check_close(gwv, ww, tol, "dWeight rows");
    check_close(gbv, wb, tol, "dBias rows");
  }
}

}  // namespace

TEST_CASE("head shards: DPO from hidden states, every configuration, 3 uneven ranks", "[shard_linear]") {
  const problem p = make_problem<float>(3, 6, 8, kVocab, false, 5);
  dpo_case dc;
  dc.cuts = uneven(kVocab, 3);
  for (const named_config& nc : fixture::all_configs()) check_linear_dpo<float>(nc, p, dc);
}

TEST_CASE("head shards: layouts, dtypes, transforms, context parallelism", "[shard_linear]") {
  const char* names[] = {"sigmoid", "mpo+wpo", "aot+aot_unpaired", "cpo/ipo", "simpo", "sft"};
  for (const kind k : {kind::padded, kind::packed, kind::separate}) {
    for (const int W : {1, 2, 4}) {
      for (const int C : {1, 2, 3}) {
        if (C > 1 && k == kind::separate) continue;
        problem p = make_problem<double>(2, 7, 5, kVocab, k == kind::packed, 10 + W + C);
        p.tr.softcap = W == 2 ? 4.0 : 0.0;
        p.tr.temperature = W == 4 ? 0.7 : 1.0;
        dpo_case dc;
        dc.k = k;
        dc.cuts = uneven(kVocab, W);
        dc.context = C;
        dc.metrics = C != 3;
        for (const char* n : names) {
          check_linear_dpo<double>(fixture::config_named(n), p, dc);
          check_linear_dpo<float>(fixture::config_named(n), make_problem<float>(2, 7, 5, kVocab, k == kind::packed,
                                                                                 20 + W + C), dc);
        }
        if (C == 1) check_linear_dpo<double>(fixture::config_named("sigmoid+ld_alpha"), p, dc);
      }
    }
  }
}

TEST_CASE("head shards: both sides on the same rows of one buffer, each with its own labels", "[shard_linear]") {
  // One hidden buffer whose rows both sides read (labels of their own): the sides' records
  // need arrays of their own (one array indexed by buffer row would hold one side's label
  // logit for both).
  const problem p = make_problem<double>(2, 5, 4, kVocab, false, 12);
  const std::int64_t P = p.P, H = p.H, V = p.V;
  laid_out<double> l(p, kind::separate, 0, 1);
  const auto pairs = dpo::linear_separate_pairs(l.hidden.data(), l.labels.data(), l.hidden.data(),
                                                l.labels_r.data(), P, l.T_, H, H);
  const std::vector<double>& w = p.weight;
  const std::vector<double>& b = p.bias;
  const named_config nc = fixture::config_named("sigmoid");
  std::vector<double> dw(static_cast<std::size_t>(V * H), 0.0), db(static_cast<std::size_t>(V), 0.0);
  dpo::cpu::forward_result want;
  dpo::cpu::linear_dpo(pairs, head_of(w, b, 0, V, H, p.tr), p.ref_c.data(), p.ref_r.data(), nc.cfg,
                       dpo::cpu::detail::owned_outputs(want, P), l.grads(dw, db));
  for (const int W : {2, 3}) {
    INFO("vocabulary ranks " << W);
    const std::vector<std::int64_t> cuts = uneven(V, W);
    std::deque<laid_out<double>> partial;
    for (int t = 0; t < W; ++t) partial.emplace_back(p, kind::separate, 0, 1);
    std::vector<std::vector<double>> gw(static_cast<std::size_t>(W)), gb(gw.size());
    std::vector<dpo::cpu::forward_result> got(gw.size());
    shard_ranks::grid ranks(W, 1);
    const std::vector<std::string> errors = ranks.run([&](int rank, int t, int, const dpo::cpu::collectives& comm) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      gw[rank].assign(static_cast<std::size_t>(sh.width() * H), 0.0);
      gb[rank].assign(static_cast<std::size_t>(sh.width()), 0.0);
      dpo::cpu::linear_dpo_sharded(pairs, head_of(w, b, sh.start, sh.width(), H, p.tr), sh, p.ref_c.data(),
                                   p.ref_r.data(), nc.cfg, comm, dpo::cpu::detail::owned_outputs(got[rank], P),
                                   partial[static_cast<std::size_t>(rank)].grads(gw[rank], gb[rank]));
    });
    for (const std::string& e : errors) REQUIRE(e == "");
    for (const dpo::cpu::forward_result& r : got) {
      CHECK(fixture::near(r.loss, want.loss, 1e-10 * (1 + std::fabs(want.loss))));
      check_close(metric_vec(r.metrics), metric_vec(want.metrics), 1e-10, "metrics");
#define DPO_TEST_PAIR(name)                                                  \
  check_close(std::vector<double>(r.name.data(), r.name.data() + P),         \
              std::vector<double>(want.name.data(), want.name.data() + P), 1e-10, #name);
      DPO_PAIR_OUTPUTS(DPO_TEST_PAIR)
#undef DPO_TEST_PAIR
    }
    for (const bool rejected : {false, true}) {
      std::vector<double> sum((rejected ? l.dh_r : l.dh).size(), 0.0);
      for (const laid_out<double>& q : partial)
        for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += (rejected ? q.dh_r : q.dh)[i];
      check_close(sum, rejected ? l.dh_r : l.dh, 1e-10, rejected ? "dHidden (rejected)" : "dHidden (chosen)");
    }
    for (int t = 0; t < W; ++t) {
      const std::int64_t s0 = cuts[t], n = cuts[t + 1] - s0;
      check_close(gw[t], std::vector<double>(dw.begin() + s0 * H, dw.begin() + (s0 + n) * H), 1e-10, "dWeight rows");
      check_close(gb[t], std::vector<double>(db.begin() + s0, db.begin() + s0 + n), 1e-10, "dBias rows");
    }
  }
}

TEST_CASE("head shards: a context rank holding no row", "[shard_linear]") {
  // Its hidden states, labels and dHidden are empty buffers (null pointers, as an empty
  // tensor's), and so are its records and maxima; the loss and gradients equal the
  // unsharded call's.
  const char* names[] = {"sigmoid", "mpo+wpo", "aot+aot_unpaired", "sft"};
  for (const kind k : {kind::padded, kind::packed}) {
    for (const int W : {1, 2}) {
      for (const int C : {2, 3}) {
        dpo_case dc;
        dc.k = k;
        dc.cuts = uneven(kVocab, W);
        dc.context = C;
        dc.empty_last = true;
        for (const char* n : names) {
          check_linear_dpo<double>(fixture::config_named(n),
                                   make_problem<double>(2, 6, 5, kVocab, k == kind::packed, 40 + W + C), dc);
          check_linear_dpo<float>(fixture::config_named(n),
                                  make_problem<float>(2, 6, 5, kVocab, k == kind::packed, 50 + W + C), dc);
        }
      }
    }
  }
}

TEST_CASE("head shards: bfloat16 head with fp32 gradients", "[shard_linear]") {
  const problem p = make_problem<Eigen::bfloat16>(2, 6, 8, kVocab, false, 3);
  dpo_case dc;
  dc.cuts = uneven(kVocab, 3);
  // bf16 logits are formed in fp32 on both paths; the tolerance is fp32's.
  for (const char* n : {"sigmoid", "mpo+wpo"}) check_linear_dpo<Eigen::bfloat16>(fixture::config_named(n), p, dc);
}

TEST_CASE("head shards: per-token log-probs, extra outputs and their backward", "[shard_linear]") {
  const std::int64_t N = 11, H = 6, V = kVocab;
  const problem p = make_problem<double>(1, N, H, V, false, 42);
  std::vector<double> hidden, w = p.weight, b = p.bias;
  std::vector<label_t> labels;
  for (int s = 0; s < 2; ++s)
    for (std::int64_t t = 0; t < N; ++t) {
      for (double x : p.hid[s][t]) hidden.push_back(x);
      labels.push_back(p.lab[s][t]);
    }
  labels[3] = 7;
  labels[4] = V - 1;
  const std::int64_t R = 2 * N;
  dpo::logit_transforms tr;
  tr.softcap = 3.0;
  tr.scale = 1.3;
  const auto view_of = [&](std::int64_t start, std::int64_t width) {
    return dpo::linear_view_of(hidden.data(), R, H, head_of(w, b, start, width, H, tr), labels.data());
  };
  // Unsharded: every output, then the backward of grad_logps . logps + grad_entropy . entropy.
  std::vector<double> logps(R), ent(R), lssp(R), mean(R), lse(R);
  std::vector<std::uint8_t> top1(R);
  dpo::cpu::linear_outputs x{ent.data(), lssp.data(), mean.data(), top1.data()};
  dpo::cpu::linear_logps(view_of(0, V), logps.data(), x, lse.data());
  std::vector<double> gl(R), ge(R);
  for (std::int64_t r = 0; r < R; ++r) {
    gl[r] = 0.3 + 0.1 * static_cast<double>(r % 5);
    ge[r] = -0.2 + 0.05 * static_cast<double>(r % 3);
  }
  std::vector<double> dh(R * H), dw(V * H, 0.0), db(V, 0.0);
  dpo::cpu::linear_grads<double> g{dh.data(), H, false, dw.data(), H, db.data()};
  dpo::cpu::linear_logps_backward(view_of(0, V), lse.data(), gl.data(), ent.data(), ge.data(), g);

  for (const int W : {2, 3}) {
    const std::vector<std::int64_t> cuts = uneven(V, W);
    shard_ranks::grid ranks(W, 1);
    std::vector<std::vector<double>> out(static_cast<std::size_t>(W)), gh(out.size()), gw(out.size()), gb(out.size());
    std::vector<std::vector<std::uint8_t>> hit(out.size());
    run_ranks(W, [&](int t) {
      const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
      const dpo::cpu::collectives comm = ranks.comm(t);
      std::vector<double>& o = out[static_cast<std::size_t>(t)];
      o.assign(static_cast<std::size_t>(5 * R), 0.0);
      hit[t].assign(static_cast<std::size_t>(R), 0);
      dpo::cpu::linear_outputs sx{o.data() + R, o.data() + 2 * R, o.data() + 3 * R, hit[t].data()};
      dpo::cpu::linear_shard_state st;
      const auto v = view_of(sh.start, sh.width());
      dpo::cpu::linear_logps_sharded(v, sh, comm, o.data(), sx, o.data() + 4 * R, st);
      gh[t].assign(static_cast<std::size_t>(R * H), 0.0);
      gw[t].assign(static_cast<std::size_t>(sh.width() * H), 0.0);
      gb[t].assign(static_cast<std::size_t>(sh.width()), 0.0);
      dpo::cpu::linear_grads<double> sg{gh[t].data(), H, false, gw[t].data(), H, gb[t].data()};
      dpo::cpu::linear_shard_backward(v, sh, st.row_max.data(), st.records.data(), gl.data(), o.data() + R,
                                      ge.data(), sg);
    });
    INFO("vocabulary ranks " << W);
    for (int t = 0; t < W; ++t) {
      const std::vector<double>& o = out[static_cast<std::size_t>(t)];
      const auto part = [&](int k) { return std::vector<double>(o.begin() + k * R, o.begin() + (k + 1) * R); };
      check_close(part(0), logps, 1e-12, "logps");
      check_close(part(1), ent, 1e-12, "entropy");
      check_close(part(2), lssp, 1e-12, "log_sum_sq_probs");
      check_close(part(3), mean, 1e-12, "mean_logits");
      check_close(part(4), lse, 1e-12, "row_lse");
      CHECK(hit[t] == top1);
      const std::int64_t s0 = cuts[t], n = cuts[t + 1] - s0;
      check_close(gw[t], std::vector<double>(dw.begin() + s0 * H, dw.begin() + (s0 + n) * H), 1e-12, "dWeight rows");
      check_close(gb[t], std::vector<double>(db.begin() + s0, db.begin() + s0 + n), 1e-12, "dBias rows");
    }
    std::vector<double> sum(static_cast<std::size_t>(R * H), 0.0);
    for (int t = 0; t < W; ++t)
      for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += gh[t][i];
    check_close(sum, dh, 1e-12, "dHidden (summed partials)");
  }
}

TEST_CASE("head shards: a -inf label logit is never top-1, as in the unsharded head", "[shard_linear]") {
  // fp32 logits without a soft cap or temperature keep the bias's -inf. First the columns of
  // the first shard get a -inf bias (labels there: a -inf logit below a finite maximum), then
  // every column: each row's first maximum is column 0, yet no label is top-1
  // (dpo::detail::label_is_top1), and the sharded values equal the unsharded ones, NaN and
  // infinities included.
  const std::int64_t R = 8, H = 4, V = kVocab;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> hidden(R * H), w(V * H), b(V);
  for (float& x : hidden) x = u(rng);
  for (float& x : w) x = 0.5f * u(rng);
  for (float& x : b) x = 0.2f * u(rng);
  std::vector<label_t> labels(R);
  for (std::int64_t r = 0; r < R; ++r) labels[r] = r % 2 == 0 ? 0 : 1 + r % 4;  // 0, 2 or 4
  for (const int W : {2, 3}) {
    const std::vector<std::int64_t> cuts = uneven(V, W);
    REQUIRE(cuts[1] > 4);  // every label lies in the first shard
    for (const bool whole_row : {false, true}) {
      INFO(W << " ranks, whole row -inf: " << whole_row);
      for (std::int64_t j = 0; j < (whole_row ? V : cuts[1]); ++j) b[j] = -INFINITY;
      const auto view_of = [&](std::int64_t start, std::int64_t width) {
        return dpo::linear_view_of(hidden.data(), R, H, head_of(w, b, start, width, H, {}), labels.data());
      };
      std::vector<double> want(5 * R);
      std::vector<std::uint8_t> want_top1(R, 1);
      dpo::cpu::linear_outputs x{want.data() + R, want.data() + 2 * R, want.data() + 3 * R, want_top1.data()};
      dpo::cpu::linear_logps(view_of(0, V), want.data(), x, want.data() + 4 * R);
      CHECK(want_top1 == std::vector<std::uint8_t>(R, 0));
      shard_ranks::grid ranks(W, 1);
      std::vector<std::vector<double>> out(static_cast<std::size_t>(W), std::vector<double>(5 * R));
      std::vector<std::vector<std::uint8_t>> top1(out.size(), std::vector<std::uint8_t>(R, 1));
      run_ranks(W, [&](int t) {
        const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
        double* o = out[static_cast<std::size_t>(t)].data();
        dpo::cpu::linear_outputs sx{o + R, o + 2 * R, o + 3 * R, top1[t].data()};
        dpo::cpu::linear_shard_state st;
        dpo::cpu::linear_logps_sharded(view_of(sh.start, sh.width()), sh, ranks.comm(t), o, sx, o + 4 * R, st);
      });
      for (int t = 0; t < W; ++t) {
        CHECK(top1[t] == want_top1);
        // logps, entropy, log_sum_sq_probs, mean_logits, row_lse, R values each
        test_support::check_values(out[static_cast<std::size_t>(t)], want, 1e-5, "sharded outputs");
      }
    }
  }
}

TEST_CASE("head shards: bad input throws on every rank before any collective", "[shard_linear]") {
  const problem p = make_problem<float>(2, 5, 4, kVocab, false, 9);
  laid_out<float> l(p, kind::padded, 0, 1);
  l.labels[3] = kVocab;  // past the global vocabulary: every vocabulary rank holds the same labels
  std::vector<float> w(p.weight.begin(), p.weight.end()), b(p.bias.begin(), p.bias.end());
  const std::vector<std::int64_t> cuts = uneven(kVocab, 3);
  std::vector<std::string> errors(3);
  std::atomic<int> collectives_run{0};
  run_ranks(3, [&](int t) {
    const dpo::vocab_shard sh{kVocab, cuts[t], cuts[t + 1]};
    dpo::cpu::collectives comm;  // a rank in a collective its peers skip would hang: none may run
    comm.vocab_max = comm.vocab_sum = [&](double*, std::int64_t) { ++collectives_run; };
    std::vector<float> dw(static_cast<std::size_t>(sh.width() * 4)), db(static_cast<std::size_t>(sh.width()));
    dpo::cpu::forward_result r;
    try {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head_of(w, b, sh.start, sh.width(), 4, p.tr), sh, p.ref_c.data(),
                                   p.ref_r.data(), fixture::config_named("sigmoid").cfg, comm,
                                   dpo::cpu::detail::owned_outputs(r, 2), l.grads(dw, db));
    } catch (const dpo::error& e) {
      errors[static_cast<std::size_t>(t)] = e.what();
    }
  });
  CHECK(collectives_run == 0);
  for (const std::string& e : errors) CHECK(e.find("outside [0, vocab = 37)") != std::string::npos);

  // A shard description that does not match the weight shard's rows.
  l.labels[3] = 1;
  dpo::cpu::forward_result r;
  std::vector<float> dw(10 * 4), db(10);
  std::vector<double> rec(3 * dpo::shard_fields), rmax(3);
  test_support::expect_error("holds 12 columns", [&] {
    dpo::cpu::linear_dpo_sharded(l.pairs(), head_of(w, b, 0, 10, 4, p.tr), dpo::vocab_shard{kVocab, 0, 12},
                                 p.ref_c.data(), p.ref_r.data(), fixture::config_named("sigmoid").cfg,
                                 dpo::cpu::collectives{}, dpo::cpu::detail::owned_outputs(r, 2), l.grads(dw, db));
  });
  test_support::expect_error("vocab_shard [start, end)", [&] {
    dpo::cpu::linear_shard_partials(dpo::linear_view_of(l.hidden.data(), 3, 4, head_of(w, b, 30, 7, 4, p.tr),
                                                        l.labels.data()),
                                    dpo::vocab_shard{kVocab, 30, 40}, rec.data(), rmax.data(), true);
  });
}

TEST_CASE("head shards: linear_shard_logps refuses outputs on its inputs or on each other", "[shard_linear]") {
  const std::int64_t N = 4, H = 3, V = kVocab;
  const problem p = make_problem<double>(1, N, H, V, false, 11);
  std::vector<double> hidden;
  std::vector<label_t> labels;
  for (std::int64_t t = 0; t < N; ++t) {
    for (double x : p.hid[0][t]) hidden.push_back(x);
    labels.push_back(p.lab[0][t]);
  }
  std::vector<double> w = p.weight, b = p.bias;
  const auto v = dpo::linear_view_of(hidden.data(), N, H, head_of(w, b, 0, V, H, p.tr), labels.data());
  // One buffer: row_max [N], records [N, F], then logps, row_lse, entropy [N] each.
  const std::int64_t F = dpo::shard_fields;
  std::vector<double> buf(static_cast<std::size_t>(N + N * F + 3 * N));
  double* const row_max = buf.data();
  double* const records = buf.data() + N;
  double* const out = records + N * F;
  dpo::cpu::linear_shard_partials(v, dpo::vocab_shard{V, 0, V}, records, row_max, true);
  const std::vector<double> before = buf;
  const auto refused = [&](const char* what, double* logps, double* lse, double* entropy) {
    INFO(what);
    dpo::cpu::linear_outputs x;
    x.entropy = entropy;
    test_support::expect_error(what, [&] { dpo::cpu::linear_shard_logps(v, V, row_max, records, logps, x, lse); });
    CHECK(buf == before);
  };
  refused("logps overlaps row_max", row_max + 1, out + N, out + 2 * N);
  refused("row_lse overlaps records", out, records + 5, out + 2 * N);
  refused("logps overlaps entropy", out, out + N, out + 1);
  refused("logps overlaps labels", reinterpret_cast<double*>(labels.data()), out + N, out + 2 * N);
  // The same buffers, disjoint: the unsharded head's values.
  dpo::cpu::linear_outputs x;
  x.entropy = out + 2 * N;
  dpo::cpu::linear_shard_logps(v, V, row_max, records, out, x, out + N);
  std::vector<double> logps(N), lse(N), ent(N);
  dpo::cpu::linear_outputs ux;
  ux.entropy = ent.data();
  dpo::cpu::linear_logps(v, logps.data(), ux, lse.data());
  check_close(std::vector<double>(out, out + N), logps, 1e-12, "logps");
  check_close(std::vector<double>(out + N, out + 2 * N), lse, 1e-12, "row_lse");
  check_close(std::vector<double>(out + 2 * N, out + 3 * N), ent, 1e-12, "entropy");
}

TEST_CASE("head shards: records, maxima and gradients may overlap no input the call reads, nor each other",
          "[shard_linear]") {
  // The audit's probes: each call was accepted and wrote into the aliased input (phase 1's
  // records over the hidden rows or the maxima, one array for both sides of separate
  // buffers, the backward's dHidden or dBias over the maxima, records or seq_grad), or
  // wrote dHidden before refusing it; a negative label that is not ignore_index was a row
  // that does not count.
  using dpo::shard_fields;
  constexpr std::int64_t P = 2, L = 3, R = 2 * P * L, H = 3, V = kVocab, F = shard_fields, N = R;
  const dpo::vocab_shard whole{V, 0, V};
  const problem p = make_problem<double>(P, L, H, V, false, 12);
  std::vector<double> w = p.weight, b = p.bias;
  const dpo::linear_head<double> head = head_of(w, b, 0, V, H, p.tr);
  std::vector<label_t> labels(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) labels[r] = r % L == 0 ? -100 : (r * 5 + 1) % V;
  // One arena for every array a call reads or writes, so that an aliased argument is an
  // offset into it and nothing may change in it: hidden [R, H], then the state, seq_grad,
  // the gradients and grad_logps [R], each after a gap of `pad`.
  constexpr std::int64_t pad = 256;
  constexpr std::int64_t hid = 0, mx = hid + R * H + pad, rec = mx + R + pad, mx2 = rec + R * F + pad,
                         rec2 = mx2 + R + pad, sgr = rec2 + R * F + pad, dh = sgr + 2 * P + pad, dw = dh + R * H + pad,
                         db = dw + V * H + pad, gl = db + V + pad, total = gl + R + pad;
  std::vector<double> arena(static_cast<std::size_t>(total), 0.0);
  double* const a = arena.data();
  for (std::int64_t i = 0; i < R * H; ++i) a[hid + i] = std::sin(0.37 * static_cast<double>(i) + 0.2);
  const auto view = dpo::linear_view_of(static_cast<const double*>(a + hid), N, H, head, labels.data());
  const auto padded = dpo::linear_padded_pairs(static_cast<const double*>(a + hid), H, H, labels.data(), 2 * P, L);
  const std::int64_t half = R / 2;
  const auto separate =
      dpo::linear_separate_pairs(static_cast<const double*>(a + hid), labels.data(),
                                 static_cast<const double*>(a + hid + half * H), labels.data() + half, P, L, H, H);
  // A valid combined state (one vocabulary rank) in both state arrays, and seq_grad.
  dpo::cpu::linear_pair_shard_partials(padded, head, whole, a + mx, a + rec, a + mx, a + rec);
  dpo::cpu::shard_rebase(0, R, a + mx, a + rec);
  std::copy(a + mx, a + mx + R, a + mx2);
  std::copy(a + rec, a + rec + R * F, a + rec2);
  const double sg[2 * P] = {0.3, -0.2, -0.4, 0.25};
  std::copy(sg, sg + 2 * P, a + sgr);
  std::fill(a + gl, a + gl + R, 0.5);
  // The message of the dpo::error a call throws ("" when it returns): every case is checked
  // even when an earlier one fails.
  const auto error_of = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const dpo::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const auto refused = [&](const char* what, const std::function<void()>& f) {
    const std::vector<double> before = arena;
    const std::string msg = error_of(f);
    INFO(what << " -> " << msg);
    CHECK(msg.find(what) != std::string::npos);
    CHECK(std::memcmp(before.data(), arena.data(), arena.size() * sizeof(double)) == 0);
  };
  // Phase 1 of the per-token head.
  refused("records overlaps row_max", [&] { dpo::cpu::linear_shard_partials(view, whole, a + rec, a + rec + 2, true); });
  refused("records overlaps hidden", [&] { dpo::cpu::linear_shard_partials(view, whole, a + hid + 1, a + mx, true); });
  {
    std::vector<double> w2 = w;
    const dpo::linear_head<double> h2 = head_of(w2, b, 0, V, H, p.tr);
    const auto v2 = dpo::linear_view_of(static_cast<const double*>(a + hid), N, H, h2, labels.data());
    const std::vector<double> before = w2;
    refused("row_max overlaps weight", [&] { dpo::cpu::linear_shard_partials(v2, whole, a + rec, w2.data(), true); });
    CHECK(w2 == before);
  }
  // Its backward: a gradient on the maxima it reads.
  {
    dpo::cpu::linear_grads<double> g;
    g.hidden = a + mx;
    g.hidden_stride = H;
    refused("grads.hidden overlaps row_max", [&] {
      dpo::cpu::linear_shard_backward(view, whole, a + mx, a + rec, a + gl, nullptr, nullptr, g);
    });
    dpo::cpu::linear_grads<double> gb;
    gb.bias = a + mx;
    refused("grads.bias overlaps row_max", [&] {
      dpo::cpu::linear_shard_backward(view, whole, a + mx, a + rec, a + gl, nullptr, nullptr, gb);
    });
  }
  // Phase 2: a negative label that is not ignore_index.
  {
    std::vector<label_t> bad = labels;
    bad[1] = -5;
    const auto vb = dpo::linear_view_of(static_cast<const double*>(a + hid), N, H, head, bad.data());
    std::vector<double> lp(static_cast<std::size_t>(N), 9.0);
    refused("labels[1] = -5 is outside [0, vocab = 37)", [&] {
      dpo::cpu::linear_shard_logps(vb, V, a + mx, a + rec, lp.data(), dpo::cpu::linear_outputs{}, nullptr);
    });
    CHECK(lp == std::vector<double>(static_cast<std::size_t>(N), 9.0));
  }
  // Phase 1 of the pairs: separate buffers sharing one state array, or state on hidden rows.
  refused("chosen_max overlaps rejected_max",
          [&] { dpo::cpu::linear_pair_shard_partials(separate, head, whole, a + mx, a + rec, a + mx, a + rec); });
  refused("rejected_records overlaps policy", [&] {
    dpo::cpu::linear_pair_shard_partials(separate, head, whole, a + mx, a + rec, a + mx2, a + hid + 1);
  });
  // The pair backward: a gradient on the row state or on seq_grad (dHidden was zeroed first).
  dpo::linear_dpo_grads<double, double> pg;
  pg.chosen_hidden = pg.rejected_hidden = a + dh;
  pg.chosen_hidden_stride = pg.rejected_hidden_stride = H;
  pg.weight = a + dw;
  pg.weight_stride = H;
  pg.bias = a + db;
  const auto backward = [&](const dpo::linear_dpo_grads<double, double>& g) {
    dpo::cpu::linear_pair_shard_backward(padded, head, whole, a + mx, a + rec, a + mx, a + rec, a + sgr, 0.1, 1.0, g);
  };
  {
    dpo::linear_dpo_grads<double, double> g = pg;
    g.chosen_hidden = g.rejected_hidden = a + rec;
    refused("grads.chosen_hidden / grads.rejected_hidden overlaps chosen_records", [&] { backward(g); });
    g = pg;
    g.weight = a + sgr;
    refused("grads.weight overlaps seq_grad", [&] { backward(g); });
    g = pg;
    g.bias = a + mx;
    refused("grads.bias overlaps chosen_max", [&] { backward(g); });
  }
  // A non-finite grad_output: refused before dHidden is zeroed (nll_token_grad is the
  // forward's value, as seq_grad: NaN data propagate, test_cpu_shard.cpp).
  for (const double bad : {std::nan(""), HUGE_VAL}) {
    refused("grad_output", [&] {
      dpo::cpu::linear_pair_shard_backward(padded, head, whole, a + mx, a + rec, a + mx, a + rec, a + sgr, 0.1, 1.0,
                                           pg, bad);
    });
  }
  // The same calls on disjoint arrays, one state array for both sides of one buffer and
  // the separate buffers' own arrays, are accepted.
  backward(pg);
  dpo::cpu::linear_pair_shard_partials(separate, head, whole, a + mx, a + rec, a + mx2, a + rec2);
  dpo::cpu::linear_pair_shard_partials(padded, head, whole, a + mx, a + rec, a + mx, a + rec);
}

TEST_CASE("head shards: linear_logps_sharded throws before any collective and keeps its state", "[shard_linear]") {
  // The audit's probes: outputs on each other were refused only after both collectives ran,
  // logps over the hidden rows was accepted, and a label past the vocabulary threw after the
  // state had been reset.
  const std::int64_t N = 4, H = 3, V = kVocab;
  const problem p = make_problem<double>(1, N, H, V, false, 13);
  std::vector<double> hidden, w = p.weight, b = p.bias;
  std::vector<label_t> labels;
  for (std::int64_t t = 0; t < N; ++t) {
    for (double x : p.hid[0][t]) hidden.push_back(x);
    labels.push_back(p.lab[0][t] < 0 ? 5 : p.lab[0][t]);
  }
  const dpo::vocab_shard whole{V, 0, V};
  const dpo::linear_head<double> head = head_of(w, b, 0, V, H, p.tr);
  const auto v = dpo::linear_view_of(static_cast<const double*>(hidden.data()), N, H, head, labels.data());
  std::vector<double> lp(static_cast<std::size_t>(N)), ent(lp.size()), lse(lp.size());
  dpo::cpu::linear_outputs x;
  x.entropy = ent.data();
  dpo::cpu::linear_shard_state st;
  dpo::cpu::linear_logps_sharded(v, whole, dpo::cpu::collectives{}, lp.data(), x, lse.data(), st);
  const dpo::cpu::linear_shard_state before = st;
  const std::vector<double> hidden_before = hidden;
  int collectives_run = 0;
  dpo::cpu::collectives comm;
  comm.vocab_max = comm.vocab_sum = [&](double*, std::int64_t) { ++collectives_run; };
  const auto refused = [&](const char* what, const std::function<void()>& f) {
    std::string msg;
    try {
      f();
    } catch (const dpo::error& e) {
      msg = e.what();
    }
    INFO(what << " -> " << msg);
    CHECK(msg.find(what) != std::string::npos);
    CHECK(collectives_run == 0);
    CHECK(test_support::bitwise_equal(st.row_max, before.row_max));
    CHECK(test_support::bitwise_equal(st.records, before.records));
    CHECK(hidden == hidden_before);
    collectives_run = 0;
    st = before;
    hidden = hidden_before;
  };
  refused("logps overlaps entropy", [&] {
    dpo::cpu::linear_outputs y;
    y.entropy = lp.data() + 1;
    dpo::cpu::linear_logps_sharded(v, whole, comm, lp.data(), y, lse.data(), st);
  });
  refused("logps overlaps hidden",
          [&] { dpo::cpu::linear_logps_sharded(v, whole, comm, hidden.data() + 2, x, lse.data(), st); });
  std::vector<label_t> bad = labels;
  bad[0] = V + 3;
  const auto vb = dpo::linear_view_of(static_cast<const double*>(hidden.data()), N, H, head, bad.data());
  refused("labels[0] = 40 is outside [0, vocab = 37)",
          [&] { dpo::cpu::linear_logps_sharded(vb, whole, comm, lp.data(), x, lse.data(), st); });
}

TEST_CASE("head shards: bad gradient buffers or budgets throw before any collective or write", "[shard_linear]") {
  const problem p = make_problem<float>(2, 5, 4, kVocab, false, 10);
  laid_out<float> l(p, kind::padded, 0, 1);
  std::vector<float> w(p.weight.begin(), p.weight.end()), b(p.bias.begin(), p.bias.end());
  const dpo::vocab_shard sh{kVocab, 0, kVocab};
  const dpo::linear_head<float> head = head_of(w, b, 0, kVocab, 4, p.tr);
  std::vector<float> dw(static_cast<std::size_t>(kVocab * 4), 555.0f), db(static_cast<std::size_t>(kVocab), 555.0f);
  std::fill(l.dh.begin(), l.dh.end(), 777.0f);
  const auto untouched = [&] {
    for (float x : l.dh) CHECK(x == 777.0f);
    for (float x : dw) CHECK(x == 555.0f);
    for (float x : db) CHECK(x == 555.0f);
  };
  int collectives_run = 0;
  dpo::cpu::collectives comm;
  comm.vocab_max = comm.vocab_sum = [&](double*, std::int64_t) { ++collectives_run; };
  double loss = 777.0;
  dpo::cpu::forward_outputs out;
  out.loss = &loss;
  const dpo::loss_config cfg = fixture::config_named("sigmoid").cfg;
  {
    // A dHidden stride below H, and a dHidden overlapping the hidden states: the driver
    // checks the gradient buffers before its collectives, as the unsharded linear_dpo does.
    dpo::linear_dpo_grads<float, float> g = l.grads(dw, db);
    g.chosen_hidden_stride = g.rejected_hidden_stride = 3;
    test_support::expect_error("grads.chosen_hidden_stride = 3 is invalid", [&] {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head, sh, p.ref_c.data(), p.ref_r.data(), cfg, comm, out, g);
    });
    g = l.grads(dw, db);
    g.chosen_hidden = g.rejected_hidden = l.hidden.data() + 1;
    test_support::expect_error("overlap", [&] {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head, sh, p.ref_c.data(), p.ref_r.data(), cfg, comm, out, g);
    });
    CHECK(collectives_run == 0);
    CHECK(loss == 777.0);
    untouched();
  }
  {
    // Forward outputs on the gradient buffers (the backward writes them after the outputs) or
    // on the hidden rows (which the backward reads): refused before any collective too.
    const dpo::linear_dpo_grads<float, float> g = l.grads(dw, db);
    dpo::cpu::forward_outputs o = out;
    o.losses = reinterpret_cast<double*>(dw.data() + 4);
    test_support::expect_error("out.losses overlaps grads.weight", [&] {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head, sh, p.ref_c.data(), p.ref_r.data(), cfg, comm, o, g);
    });
    o = out;
    o.loss = reinterpret_cast<double*>(l.dh.data() + 8);
    test_support::expect_error("out.loss overlaps grads.chosen_hidden", [&] {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head, sh, p.ref_c.data(), p.ref_r.data(), cfg, comm, o, g);
    });
    std::vector<float> hid = l.hidden;
    auto on_hidden = l.pairs();
    on_hidden.pairs.chosen.logits = on_hidden.pairs.rejected.logits = hid.data();
    o = out;
    o.chosen_rewards = reinterpret_cast<double*>(hid.data() + 4);
    test_support::expect_error("out.chosen_rewards overlaps policy", [&] {
      dpo::cpu::linear_dpo_sharded(on_hidden, head, sh, p.ref_c.data(), p.ref_r.data(), cfg, comm, o, g);
    });
    CHECK(std::memcmp(hid.data(), l.hidden.data(), hid.size() * sizeof(float)) == 0);
    std::vector<double> refs = p.ref_c;
    o = out;
    o.chosen_logps = refs.data();
    test_support::expect_error("out.chosen_logps overlaps ref_chosen_logps", [&] {
      dpo::cpu::linear_dpo_sharded(l.pairs(), head, sh, refs.data(), p.ref_r.data(), cfg, comm, o, g);
    });
    CHECK(refs == p.ref_c);
    CHECK(collectives_run == 0);
    CHECK(loss == 777.0);
    untouched();
  }
  {
    // The shard-local backward with a budget below one row: nothing written, dHidden included.
    const std::int64_t n = static_cast<std::int64_t>(l.labels.size());
    std::vector<double> rmax(static_cast<std::size_t>(n)), rec(static_cast<std::size_t>(n * dpo::shard_fields));
    dpo::cpu::linear_pair_shard_partials(l.pairs(), head, sh, rmax.data(), rec.data(), rmax.data(), rec.data());
    dpo::cpu::shard_rebase(0, n, rmax.data(), rec.data());
    const std::vector<double> seq_grad(4, 0.25);
    dpo::cpu::linear_dpo_options o;
    o.workspace_bytes = 1;
    test_support::expect_error("too small for one row", [&] {
      dpo::cpu::linear_pair_shard_backward(l.pairs(), head, sh, rmax.data(), rec.data(), rmax.data(), rec.data(),
                                           seq_grad.data(), 0.0, 1.0, l.grads(dw, db), 1.0, o);
    });
    untouched();
    // Phase 1 with that budget: no record or maximum is written either.
    std::vector<double> rmax2(rmax.size(), 333.0), rec2(rec.size(), 333.0);
    test_support::expect_error("too small for one row", [&] {
      dpo::cpu::linear_pair_shard_partials(l.pairs(), head, sh, rmax2.data(), rec2.data(), rmax2.data(), rec2.data(),
                                           o);
    });
    for (double x : rmax2) CHECK(x == 333.0);
    for (double x : rec2) CHECK(x == 333.0);
  }
}
