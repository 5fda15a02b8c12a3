// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO from hidden states (dpo/cpu/linear_dpo.hpp) against a float64 reference written here
// (GEMM, bias, scale / soft cap / temperature in double, then the oracle of tests/oracle.hpp
// for log-softmax, the pair loss, the metrics and dL/dlogits), against finite differences of
// the library itself, against the logits path fed with the same fp32 logits (bitwise), over
// chunk sizes, thread counts, modes and layouts, edge shapes, NaN, and bad inputs.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <dpo/cpu/linear_dpo.hpp>

#include "catch.hpp"
#include "checks.hpp"
#include "fixtures.hpp"
#include "lse_limit.hpp"
#include "oracle.hpp"

namespace {

const bool thread_limit_set = test_support::preset_thread_limit("16");

using fixture::layout;
using ld = oracle::ld;
using label_t = std::int64_t;
using test_support::bitwise_equal;
using test_support::check_close;
using test_support::expect_error;

/// A batch of pairs over hidden rows, in double (already rounded to the dtype under test):
/// hid[side][pair][row] is a hidden state, lab[side][pair][row] its label (-100 = prompt or
/// padding).
struct problem {
  std::int64_t P, H, V;
  std::vector<std::vector<std::vector<std::vector<double>>>> hid;
  std::vector<std::vector<std::vector<label_t>>> lab;
  std::vector<double> weight, bias;  // [V, H], [V]
  bool with_bias = true;
  dpo::logit_transforms tr;
  std::int64_t rows(int s, std::int64_t i) const { return static_cast<std::int64_t>(lab[s][i].size()); }
  std::int64_t max_rows() const {
    std::int64_t m = 0;
    for (int s = 0; s < 2; ++s)
      for (std::int64_t i = 0; i < P; ++i) m = std::max(m, rows(s, i));
    return m;
  }
};

template <class T>
double rnd(double x) {
  return static_cast<double>(T(static_cast<float>(x)));
}
template <>
double rnd<double>(double x) {
  return x;
}

/// P pairs of `rows` rows each (varying: 1..rows), hidden size H, vocab V; the first row of
/// each sequence is a prompt row (label -100) and one more row in five is ignored.
template <class T>
problem make_problem(std::int64_t P, std::int64_t rows, std::int64_t H, std::int64_t V,
                     unsigned seed, bool varying = false, double scale = 2.0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<label_t> lab(0, V - 1);
  std::uniform_int_distribution<std::int64_t> len(1, rows);
  problem p;
  p.P = P;
  p.H = H;
  p.V = V;
  p.hid.resize(2);
  p.lab.resize(2);
  for (int s = 0; s < 2; ++s) {
    p.hid[s].resize(P);
    p.lab[s].resize(P);
    for (std::int64_t i = 0; i < P; ++i) {
      const std::int64_t n = varying ? len(rng) : rows;
      for (std::int64_t t = 0; t < n; ++t) {
        std::vector<double> h(H);
        for (auto& x : h) x = rnd<T>(u(rng));
        p.hid[s][i].push_back(h);
        p.lab[s][i].push_back((t == 0 && n > 1) || (t % 5 == 3) ? -100 : lab(rng));
      }
    }
  }
  const double amp = scale / std::sqrt(static_cast<double>(H));
  p.weight.resize(V * H);
  for (auto& x : p.weight) x = rnd<T>(amp * u(rng));
  p.bias.resize(V);
  for (auto& x : p.bias) x = rnd<T>(0.5 * u(rng));
  return p;
}

/// The raw logits of a hidden row, o(u) and do/du, in double.
void logits_of(const problem& p, const std::vector<double>& h, std::vector<double>& o,
               std::vector<double>& d) {
  o.assign(p.V, 0.0);
  d.assign(p.V, 0.0);
  const double s = p.tr.scale, c = p.tr.softcap, t = p.tr.temperature;
  for (std::int64_t v = 0; v < p.V; ++v) {
    double u = p.with_bias ? p.bias[v] : 0.0;
    for (std::int64_t k = 0; k < p.H; ++k) u += h[k] * p.weight[v * p.H + k];
    double x = s * u, dx = s;
    if (c != 0.0) {
      const double th = std::tanh(x / c), ch = std::cosh(x / c);
      dx = s / (ch * ch);
      x = c * th;
    }
    o[v] = x / t;
    d[v] = dx / t;
  }
}

oracle::batch oracle_batch(const problem& p, std::vector<std::vector<std::vector<std::vector<double>>>>* dodu) {
  oracle::batch b;
  if (dodu) dodu->assign(2, {});
  for (int s = 0; s < 2; ++s) {
    auto& side = s == 0 ? b.chosen : b.rejected;
    for (std::int64_t i = 0; i < p.P; ++i) {
      oracle::sequence q;
      if (dodu) (*dodu)[s].emplace_back();
      for (std::int64_t t = 0; t < p.rows(s, i); ++t) {
        std::vector<double> o, d;
        logits_of(p, p.hid[s][i][t], o, d);
        q.z.push_back(o);
        q.y.push_back(p.lab[s][i][t] < 0 ? -1 : p.lab[s][i][t]);
        if (dodu) (*dodu)[s].back().push_back(d);
      }
      side.push_back(q);
    }
  }
  return b;
}

/// What a call returns, gathered into dense double arrays (dh per side, pair, row).
struct result {
  double loss = 0;
  dpo::metrics m;
  std::vector<double> losses, cr, rr, lc, lr, gc, gr;
  std::vector<std::vector<std::vector<std::vector<double>>>> dh;
  std::vector<double> dw, db;
};

/// The float64 reference of a problem (ref_c/ref_r empty for reference-free losses).
result reference_of(const problem& p, const dpo::loss_config& cfg, const std::vector<double>& ref_c,
                    const std::vector<double>& ref_r) {
  std::vector<std::vector<std::vector<std::vector<double>>>> dodu;
  const oracle::batch b = oracle_batch(p, &dodu);
  const std::vector<ld> rc = fixture::to_ld(ref_c), rr = fixture::to_ld(ref_r);
  const oracle::result o = oracle::forward(cfg, b, rc, rr);
  result R;
  R.loss = static_cast<double>(o.loss);
  R.m.rewards_chosen = double(o.rewards_chosen);
  R.m.rewards_rejected = double(o.rewards_rejected);
  R.m.rewards_accuracies = double(o.rewards_accuracies);
  R.m.rewards_margins = double(o.rewards_margins);
  R.m.logps_chosen = double(o.logps_chosen);
  R.m.logps_rejected = double(o.logps_rejected);
  R.m.logits_chosen = double(o.logits_chosen);
  R.m.logits_rejected = double(o.logits_rejected);
  R.m.entropy = double(o.entropy);
  R.m.mean_token_accuracy = double(o.mean_token_accuracy);
  R.m.nll_loss = double(o.nll_loss);
  for (std::int64_t i = 0; i < p.P; ++i) {
    R.losses.push_back(double(o.losses[i]));
    R.cr.push_back(double(o.chosen_rewards[i]));
    R.rr.push_back(double(o.rejected_rewards[i]));
    R.lc.push_back(double(o.pi_c[i]));
    R.lr.push_back(double(o.pi_r[i]));
  }
  const oracle::grads g = oracle::fd_via_tokens(cfg, b, rc, rr);
  R.dh.assign(2, {});
  R.dw.assign(p.V * p.H, 0.0);
  R.db.assign(p.V, 0.0);
  for (int s = 0; s < 2; ++s)
    for (std::int64_t i = 0; i < p.P; ++i) {
      R.dh[s].emplace_back();
      for (std::int64_t t = 0; t < p.rows(s, i); ++t) {
        std::vector<double> dh(p.H, 0.0);
        const std::vector<double>& h = p.hid[s][i][t];
        for (std::int64_t v = 0; v < p.V; ++v) {
          const double du = g[s][i][t][v] * dodu[s][i][t][v];
          R.db[v] += du;
          for (std::int64_t k = 0; k < p.H; ++k) {
            dh[k] += du * p.weight[v * p.H + k];
            R.dw[v * p.H + k] += du * h[k];
          }
        }
        R.dh[s].back().push_back(dh);
      }
    }
  return R;
}

/// The problem in the library's buffers of dtype T for a layout: hidden rows with stride
/// H + 3 (the padding columns and the gap rows hold NaN: never read), labels, and dHidden
/// buffers of the same shape holding a sentinel.
template <class T>
struct laid_out {
  layout kind;
  std::int64_t hs, pitch = 0;
  std::vector<T> hidden[2], weight, bias;
  std::vector<label_t> labels[2];
  std::vector<std::int64_t> cu;
  std::vector<std::int64_t> start[2];  // buffer row of each sequence's first row
  int nbuf = 1;

  laid_out(const problem& p, layout k, bool gaps = false) : kind(k), hs(p.H + 3) {
    const std::int64_t P = p.P;
    const T nan = T(std::numeric_limits<float>::quiet_NaN());
    weight.assign(p.V * (p.H + 2), nan);
    for (std::int64_t v = 0; v < p.V; ++v)
      for (std::int64_t c = 0; c < p.H; ++c) weight[v * (p.H + 2) + c] = T(p.weight[v * p.H + c]);
    for (double x : p.bias) bias.push_back(T(x));
    const auto put = [&](int buf, std::int64_t row, int s, std::int64_t i, std::int64_t t) {
      for (std::int64_t c = 0; c < p.H; ++c) hidden[buf][row * hs + c] = T(p.hid[s][i][t][c]);
      labels[buf][row] = p.lab[s][i][t];
    };
    if (k == layout::packed) {
      cu.push_back(0);
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < P; ++i) cu.push_back(cu.back() + p.rows(s, i));
      hidden[0].assign(cu.back() * hs, nan);
      labels[0].assign(cu.back(), 123456);
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < P; ++i) {
          start[s].push_back(cu[s * P + i]);
          for (std::int64_t t = 0; t < p.rows(s, i); ++t) put(0, cu[s * P + i] + t, s, i, t);
        }
    } else {
      const std::int64_t T_ = p.max_rows();
      pitch = T_ + (gaps ? 1 : 0);
      nbuf = k == layout::separate ? 2 : 1;
      for (int b = 0; b < nbuf; ++b) {
        const std::int64_t seqs = k == layout::separate ? P : 2 * P;
        hidden[b].assign(seqs * pitch * hs, nan);
        labels[b].assign(seqs * pitch + 1, 123456);  // gap labels are out of range: never read
      }
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < P; ++i) {
          const int b = k == layout::separate ? s : 0;
          const std::int64_t seq = k == layout::separate ? i : s * P + i;
          start[s].push_back(seq * pitch);
          for (std::int64_t t = 0; t < T_; ++t) {
            if (t < p.rows(s, i)) {
              put(b, seq * pitch + t, s, i, t);
            } else {
              labels[b][seq * pitch + t] = -100;
              for (std::int64_t c = 0; c < p.H; ++c) hidden[b][(seq * pitch + t) * hs + c] = T(0.0f);
            }
          }
        }
    }
  }

  dpo::cpu::hidden_pairs<T, label_t> pairs(const problem& p) const {
    const std::int64_t P = p.P;
    if (kind == layout::packed)
      return dpo::cpu::linear_packed_pairs(hidden[0].data(), p.H, hs, labels[0].data(), cu.data(), 2 * P);
    if (kind == layout::separate)
      return dpo::cpu::linear_separate_pairs(hidden[0].data(), labels[0].data(), hidden[1].data(),
                                             labels[1].data(), P, p.max_rows(), p.H, hs);
    auto v = dpo::cpu::linear_padded_pairs(hidden[0].data(), p.H, hs, labels[0].data(), 2 * P, p.max_rows());
    v.pairs.chosen.seq_stride = v.pairs.rejected.seq_stride = pitch;
    return v;
  }

  dpo::cpu::linear_head<T> head(const problem& p) const {
    dpo::cpu::linear_head<T> h;
    h.weight = weight.data();
    h.vocab = p.V;
    h.hidden = p.H;
    h.weight_stride = p.H + 2;
    if (p.with_bias) {
      h.bias = bias.data();
      h.bias_size = p.V;
    }
    h.transforms = p.tr;
    return h;
  }
};

const double sentinel = 77.0;

/// Output buffers of a call and their gathering into a result.
template <class T, class G>
struct outputs {
  std::vector<T> dh[2];
  std::vector<G> dw, db;
  double loss = -1;
  dpo::metrics m;
  std::vector<double> losses, cr, rr, lc, lr, gc, gr, row_lse, row_coef;
  std::int64_t ws;

  outputs(const problem& p, const laid_out<T>& lay) : ws(p.H + 1) {
    for (int b = 0; b < lay.nbuf; ++b) dh[b].assign(lay.hidden[b].size(), T(sentinel));
    dw.assign(p.V * ws, G(0.0f));
    db.assign(p.V, G(0.0f));
    for (auto* v : {&losses, &cr, &rr, &lc, &lr, &gc, &gr}) v->assign(p.P, -9.0);
    row_lse.assign(lay.labels[0].size(), -9.0);
    row_coef.assign(lay.labels[0].size(), -9.0);
  }

  dpo::forward_outputs fwd(bool rows = false) {
    dpo::forward_outputs o;
    o.loss = &loss;
    o.metrics = &m;
    o.losses = losses.data();
    o.chosen_rewards = cr.data();
    o.rejected_rewards = rr.data();
    o.chosen_logps = lc.data();
    o.rejected_logps = lr.data();
    o.grad_chosen = gc.data();
    o.grad_rejected = gr.data();
    if (rows) {
      o.row_lse = row_lse.data();
      o.row_coef = row_coef.data();
    }
    return o;
  }

  dpo::cpu::linear_dpo_grads<T, G> grads(const laid_out<T>& lay, bool with_bias, bool accumulate = false) {
    dpo::cpu::linear_dpo_grads<T, G> g;
    g.chosen_hidden = dh[0].data();
    g.rejected_hidden = lay.nbuf == 2 ? dh[1].data() : dh[0].data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = lay.hs;
    g.accumulate_hidden = accumulate;
    g.weight = dw.data();
    g.weight_stride = ws;
    if (with_bias) g.bias = db.data();
    return g;
  }

  result gather(const problem& p, const laid_out<T>& lay) const {
    result r;
    r.loss = loss;
    r.m = m;
    r.losses = losses;
    r.cr = cr;
    r.rr = rr;
    r.lc = lc;
    r.lr = lr;
    r.gc = gc;
    r.gr = gr;
    r.dh.assign(2, {});
    for (int s = 0; s < 2; ++s)
      for (std::int64_t i = 0; i < p.P; ++i) {
        r.dh[s].emplace_back();
        const std::vector<T>& buf = dh[lay.nbuf == 2 ? s : 0];
        for (std::int64_t t = 0; t < p.rows(s, i); ++t) {
          std::vector<double> row;
          for (std::int64_t c = 0; c < p.H; ++c) row.push_back(double(buf[(lay.start[s][i] + t) * lay.hs + c]));
          r.dh[s].back().push_back(row);
        }
      }
    for (std::int64_t v = 0; v < p.V; ++v)
      for (std::int64_t c = 0; c < p.H; ++c) r.dw.push_back(double(dw[v * ws + c]));
    for (std::int64_t v = 0; v < p.V; ++v) r.db.push_back(p.with_bias ? double(db[v]) : 0.0);
    return r;
  }
};

std::vector<double> flat(const std::vector<std::vector<std::vector<std::vector<double>>>>& x) {
  std::vector<double> f;
  for (const auto& a : x)
    for (const auto& b : a)
      for (const auto& c : b)
        for (double v : c) f.push_back(v);
  return f;
}

std::vector<double> metric_vec(const dpo::metrics& m) {
  std::vector<double> v(dpo::num_metrics);
  std::memcpy(v.data(), &m, sizeof m);
  return v;
}

/// The library's result against the reference: forward values to rtol_f, gradients to
/// rtol_g of their largest magnitude. The accuracy metric is compared only without ties.
void check_result(const result& got, const result& want, double rtol_f, double rtol_g) {
  check_close({got.loss}, {want.loss}, rtol_f, "loss", rtol_f);
  std::vector<double> gm = metric_vec(got.m), wm = metric_vec(want.m);
  gm[2] = wm[2] = 0;  // rewards/accuracies: a tie can flip on the last bit
  check_close(gm, wm, rtol_f, "metrics", rtol_f);
  check_close(got.losses, want.losses, rtol_f, "losses", rtol_f);
  check_close(got.cr, want.cr, rtol_f, "chosen_rewards", rtol_f);
  check_close(got.rr, want.rr, rtol_f, "rejected_rewards", rtol_f);
  check_close(got.lc, want.lc, rtol_f, "chosen_logps", rtol_f);
  check_close(got.lr, want.lr, rtol_f, "rejected_logps", rtol_f);
  const double atol = 1e-9;
  check_close(flat(got.dh), flat(want.dh), rtol_g, "dhidden", atol);
  check_close(got.dw, want.dw, rtol_g, "dweight", atol);
  check_close(got.db, want.db, rtol_g, "dbias", atol);
}

void check_bitwise(const result& a, const result& b) {
  CHECK(bitwise_equal({a.loss}, {b.loss}));
  CHECK(bitwise_equal(metric_vec(a.m), metric_vec(b.m)));
  CHECK(bitwise_equal(a.losses, b.losses));
  CHECK(bitwise_equal(a.lc, b.lc));
  CHECK(bitwise_equal(a.gc, b.gc));
  CHECK(bitwise_equal(flat(a.dh), flat(b.dh)));
  CHECK(bitwise_equal(a.dw, b.dw));
  CHECK(bitwise_equal(a.db, b.db));
}

/// Reference log-probs near the policy's (LD weighted alike); empty for reference-free losses.
fixture::reference ref_logps(const problem& p, const dpo::loss_config& cfg, std::uint64_t seed) {
  fixture::reference r;
  if (fixture::needs_reference(cfg)) fixture::random_reference(oracle_batch(p, nullptr), cfg.ld_alpha, seed, r.c, r.r);
  return r;
}

/// One fused call with reference log-probs.
template <class T, class G = T>
result run(const problem& p, layout k, const dpo::loss_config& cfg, const fixture::reference& ref,
           dpo::cpu::linear_dpo_options opt, bool gaps = false) {
  const laid_out<T> lay(p, k, gaps);
  outputs<T, G> o(p, lay);
  dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, o.fwd(),
                       o.grads(lay, p.with_bias), opt);
  return o.gather(p, lay);
}

dpo::cpu::linear_dpo_options mode(dpo::linear_mode m, std::int64_t chunk_rows = 0, int threads = 1) {
  dpo::cpu::linear_dpo_options o;
  o.mode = m;
  o.chunk_rows = chunk_rows;
  o.num_threads = threads;
  return o;
}

}  // namespace

TEST_CASE("linear DPO: every loss type and option, each layout and mode, against float64",
          "[linear_dpo]") {
  for (const auto& nc : fixture::all_configs()) {
    for (layout k : {layout::padded, layout::packed, layout::separate}) {
      const problem p = make_problem<float>(3, 5, 6, 13, 5, k == layout::packed);
      const fixture::reference ref = ref_logps(p, nc.cfg, 9);
      const result want = reference_of(p, nc.cfg, ref.c, ref.r);
      for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
        INFO(nc.name << ", " << fixture::name_of(k) << ", mode " << static_cast<int>(m));
        check_result(run<float>(p, k, nc.cfg, ref, mode(m)), want, 2e-5, 2e-5);
      }
    }
  }
}

TEST_CASE("linear DPO: every dtype, bias and transforms, both reference modes", "[linear_dpo]") {
  const dpo::logit_transforms trs[] = {{1.0, 0.0, 1.0}, {1.7, 0.0, 0.6}, {2.5, 1.2, 0.7}};
  const char* names[] = {"sigmoid", "sigmoid+wpo", "sft", "aot", "sigmoid+ld_alpha"};
  const auto each = [&](auto tag, double rf, double rg) {
    using T = decltype(tag);
    for (const auto& tr : trs)
      for (const char* name : names)
        for (layout k : {layout::padded, layout::packed}) {
          const dpo::loss_config& cfg = fixture::config_named(name).cfg;
          problem p = make_problem<T>(3, 5, 6, 13, 17, k == layout::packed, 3.0);
          p.tr = tr;
          INFO(name << ", " << fixture::name_of(k) << ", scale " << tr.scale << " cap " << tr.softcap
                    << " temperature " << tr.temperature);
          // Reference log-probs given.
          const fixture::reference ref = ref_logps(p, cfg, 3);
          const result want = reference_of(p, cfg, ref.c, ref.r);
          for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
            check_result(run<T>(p, k, cfg, ref, mode(m)), want, rf, rg);
            if constexpr (!std::is_same_v<T, double> && !std::is_same_v<T, float>)
              check_result(run<T, float>(p, k, cfg, ref, mode(m)), want, rf, rg);
          }
          // The reference from hidden states: another head on other hidden states.
          problem q = make_problem<T>(3, 5, 6, 13, 18, k == layout::packed, 2.0);
          q.lab = p.lab;
          for (int s = 0; s < 2; ++s)
            for (std::int64_t i = 0; i < p.P; ++i) q.hid[s][i].resize(p.hid[s][i].size(), std::vector<double>(p.H, 0.0));
          q.tr = {1.1, 0.0, 1.0};
          std::vector<ld> oc, orr;
          oracle::pair_logps(oracle_batch(q, nullptr), cfg.ld_alpha, oc, orr);
          fixture::reference qref;
          if (fixture::needs_reference(cfg))
            for (std::int64_t i = 0; i < p.P; ++i) {
              qref.c.push_back(double(oc[i]));
              qref.r.push_back(double(orr[i]));
            }
          const result want_q = reference_of(p, cfg, qref.c, qref.r);
          const laid_out<T> lay(p, k), qlay(q, k);
          for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
            outputs<T, T> o(p, lay);
            dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), qlay.pairs(q), qlay.head(q), cfg, o.fwd(),
                                 o.grads(lay, true), mode(m));
            check_result(o.gather(p, lay), want_q, rf, rg);
          }
          // Its log-probs alone, as pair_logps on logits.
          std::vector<double> lc(p.P), lr(p.P);
          dpo::cpu::linear_pair_logps(qlay.pairs(q), qlay.head(q), cfg.ld_alpha, lc.data(), lr.data());
          std::vector<double> wc(oc.begin(), oc.end()), wr(orr.begin(), orr.end());
          check_close(lc, wc, rf, "linear_pair_logps chosen", rf);
          check_close(lr, wr, rf, "linear_pair_logps rejected", rf);
        }
  };
  SECTION("double") { each(double{}, 1e-9, 1e-8); }
  SECTION("float") { each(float{}, 2e-5, 2e-5); }
  SECTION("bf16") { each(Eigen::bfloat16{}, 2e-5, 1.5e-2); }
  SECTION("half") { each(Eigen::half{}, 2e-5, 3e-3); }
}

TEST_CASE("linear DPO: the plan picks three passes for separable losses whose pairs fit", "[linear_dpo]") {
  const problem p = make_problem<float>(3, 5, 6, 13, 5);
  const laid_out<float> lay(p, layout::padded);
  const auto plan = [&](const char* name, dpo::cpu::linear_dpo_options o = {}) {
    return dpo::cpu::linear_dpo_workspace_size(lay.pairs(p), lay.head(p), fixture::config_named(name).cfg, o);
  };
  CHECK(plan("sigmoid").mode == dpo::linear_mode::three_pass);
  CHECK(plan("sigmoid+wpo").mode == dpo::linear_mode::three_pass);  // WPO without an NLL term
  CHECK(plan("sft").mode == dpo::linear_mode::three_pass);
  CHECK(plan("aot").mode == dpo::linear_mode::four_pass);
  CHECK(plan("aot_unpaired").mode == dpo::linear_mode::four_pass);
  CHECK(plan("mpo+wpo").mode == dpo::linear_mode::four_pass);  // an NLL term under WPO
  CHECK(plan("sigmoid", mode(dpo::linear_mode::automatic, 1)).mode == dpo::linear_mode::four_pass);
  const auto whole = plan("sigmoid", mode(dpo::linear_mode::automatic, 8));
  CHECK(whole.mode == dpo::linear_mode::three_pass);
  CHECK(whole.chunk_rows == 6);  // one pair (3 + 3 completion rows) per chunk
  CHECK(plan("sigmoid").chunk_rows == 18);  // the whole batch: the workspace holds no more
  // The default budget keeps the extra memory under 1 GiB at N = 8192, H = 4096, V = 128256,
  // and one 2 x 1024-row pair does not fit it: four passes there.
  dpo::linear_plan_in big;
  big.vocab = 128256;
  big.hidden = 4096;
  big.acc_bytes = 4;
  big.convert_weight = true;
  big.budget = dpo::cpu::default_linear_dpo_workspace_bytes;
  const std::int64_t rows = dpo::detail::linear_max_chunk_rows(big);
  CHECK(rows > 1000);
  CHECK(dpo::detail::linear_chunk_bytes(big, rows) <= big.budget);
  CHECK(big.budget + 8192 * 200 < (std::int64_t{1} << 30));
  const std::int64_t pair[1] = {2048};
  CHECK(!dpo::detail::linear_pairs_fit(pair, 1, rows));
}

TEST_CASE("linear DPO: finite differences of the library in double", "[linear_dpo]") {
  for (const char* name : {"sigmoid", "mpo", "sigmoid+ld_alpha", "ipo"}) {
    for (dpo::linear_mode m : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
      problem p = make_problem<double>(2, 4, 3, 5, 21, false, 3.0);
      p.tr = {2.5, 1.2, 0.7};
      const dpo::loss_config& cfg = fixture::config_named(name).cfg;
      INFO(name << ", mode " << static_cast<int>(m));
      const fixture::reference ref = ref_logps(p, cfg, 4);
      const result got = run<double>(p, layout::padded, cfg, ref, mode(m));
      const auto loss = [&](const problem& q) { return run<double>(q, layout::padded, cfg, ref, mode(m)).loss; };
      const double h = 1e-6;
      std::vector<double> dh, dw, db;
      for (int s = 0; s < 2; ++s)
        for (std::int64_t i = 0; i < p.P; ++i)
          for (std::int64_t t = 0; t < p.rows(s, i); ++t)
            for (std::int64_t k = 0; k < p.H; ++k) {
              problem a = p, b = p;
              a.hid[s][i][t][k] += h;
              b.hid[s][i][t][k] -= h;
              dh.push_back((loss(a) - loss(b)) / (2 * h));
            }
      for (std::size_t j = 0; j < p.weight.size(); ++j) {
        problem a = p, b = p;
        a.weight[j] += h;
        b.weight[j] -= h;
        dw.push_back((loss(a) - loss(b)) / (2 * h));
      }
      for (std::size_t j = 0; j < p.bias.size(); ++j) {
        problem a = p, b = p;
        a.bias[j] += h;
        b.bias[j] -= h;
        db.push_back((loss(a) - loss(b)) / (2 * h));
      }
      check_close(flat(got.dh), dh, 0, "dhidden", 1e-8);
      check_close(got.dw, dw, 0, "dweight", 1e-8);
      check_close(got.db, db, 0, "dbias", 1e-8);
    }
  }
}

TEST_CASE("linear DPO: equals the logits path fed with the same fp32 logits", "[linear_dpo]") {
  // Dyadic inputs: every product and sum of the GEMM is exact in float, so the logits the
  // head forms are exactly the ones given to the logits path.
  problem p = make_problem<float>(3, 6, 4, 11, 31);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(-4, 4);
  for (auto& side : p.hid)
    for (auto& seq : side)
      for (auto& row : seq)
        for (double& x : row) x = small(rng) / 4.0;
  for (double& x : p.weight) x = small(rng) / 8.0;
  for (double& x : p.bias) x = small(rng) / 8.0;
  for (const dpo::logit_transforms& tr : {dpo::logit_transforms{}, dpo::logit_transforms{2.0, 1.5, 0.5}}) {
    p.tr = tr;
    const dpo::detail::transform_params<float> tp(tr);
    const std::int64_t T = p.max_rows(), V = p.V, P = p.P;
    std::vector<float> z(2 * P * T * V), dodu(z.size());
    std::vector<label_t> labels(2 * P * T);
    for (int s = 0; s < 2; ++s)
      for (std::int64_t i = 0; i < P; ++i)
        for (std::int64_t t = 0; t < T; ++t) {
          const std::int64_t r = (s * P + i) * T + t;
          labels[r] = p.lab[s][i][t];
          for (std::int64_t v = 0; v < V; ++v) {
            double u = p.bias[v];
            for (std::int64_t k = 0; k < p.H; ++k) u += p.hid[s][i][t][k] * p.weight[v * p.H + k];
            z[r * V + v] = dpo::detail::transform_logit(tp, static_cast<float>(u));
            dodu[r * V + v] = dpo::detail::transform_logit_grad(tp, static_cast<float>(u));
          }
        }
    for (const char* name : {"sigmoid", "mpo", "sigmoid+wpo", "ipo+ld_alpha0+wpo", "aot", "orpo"}) {
      const dpo::loss_config& cfg = fixture::config_named(name).cfg;
      const fixture::reference ref = ref_logps(p, cfg, 8);
      const auto view = dpo::padded_pairs(z.data(), labels.data(), 2 * P, T, V, V);
      const dpo::cpu::forward_result want = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), cfg);
      std::vector<float> dz(z.size(), 0.0f);
      dpo::cpu::dpo_backward(view, want, dpo::pair_grad_view<float>{dz.data(), V, dz.data(), V});
      for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
        INFO(name << ", mode " << static_cast<int>(m) << ", cap " << tr.softcap);
        const result got = run<float>(p, layout::padded, cfg, ref, mode(m));
        CHECK(bitwise_equal({got.loss}, {want.loss}));
        CHECK(bitwise_equal(metric_vec(got.m), metric_vec(want.metrics)));
        const auto vec = [](const Eigen::VectorXd& x) { return std::vector<double>(x.data(), x.data() + x.size()); };
        CHECK(bitwise_equal(got.losses, vec(want.losses)));
        CHECK(bitwise_equal(got.cr, vec(want.chosen_rewards)));
        CHECK(bitwise_equal(got.lc, vec(want.chosen_logps)));
        CHECK(bitwise_equal(got.lr, vec(want.rejected_logps)));
        CHECK(bitwise_equal(got.gc, vec(want.grad_chosen)));
        CHECK(bitwise_equal(got.gr, vec(want.grad_rejected)));
        // The gradients: the logits path's dZ through do/du and the products, in double.
        std::vector<double> dh, dw(V * p.H, 0.0), db(V, 0.0);
        for (int s = 0; s < 2; ++s)
          for (std::int64_t i = 0; i < P; ++i)
            for (std::int64_t t = 0; t < T; ++t) {
              const std::int64_t r = (s * P + i) * T + t;
              std::vector<double> row(p.H, 0.0);
              for (std::int64_t v = 0; v < V; ++v) {
                const double du = double(dz[r * V + v]) * double(dodu[r * V + v]);
                db[v] += du;
                for (std::int64_t k = 0; k < p.H; ++k) {
                  row[k] += du * p.weight[v * p.H + k];
                  dw[v * p.H + k] += du * p.hid[s][i][t][k];
                }
              }
              for (double x : row) dh.push_back(x);
            }
        check_close(flat(got.dh), dh, 1e-6, "dhidden", 1e-9);
        check_close(got.dw, dw, 1e-6, "dweight", 1e-9);
        check_close(got.db, db, 1e-6, "dbias", 1e-9);
      }
    }
  }
}

TEST_CASE("linear DPO: chunk sweeps, thread counts, modes; bitwise repeatable", "[linear_dpo]") {
  REQUIRE(thread_limit_set);
  problem p = make_problem<float>(4, 7, 8, 37, 41, true, 3.0);
  p.tr = {1.3, 2.0, 0.8};
  for (const char* name : {"sigmoid", "aot", "sigmoid+ld_alpha"}) {
    const dpo::loss_config& cfg = fixture::config_named(name).cfg;
    const fixture::reference ref = ref_logps(p, cfg, 2);
    const result want = reference_of(p, cfg, ref.c, ref.r);
    for (layout k : {layout::padded, layout::packed, layout::separate}) {
      // 1 row, part of a pair, whole pairs, more rows than the batch.
      for (std::int64_t rows : {1, 3, 12, 20, 1000}) {
        INFO(name << ", " << fixture::name_of(k) << ", chunk rows " << rows);
        const result a = run<float>(p, k, cfg, ref, mode(dpo::linear_mode::automatic, rows));
        check_result(a, want, 2e-5, 2e-5);
        check_bitwise(a, run<float>(p, k, cfg, ref, mode(dpo::linear_mode::automatic, rows)));
        for (int t : {2, 7}) check_bitwise(a, run<float>(p, k, cfg, ref, mode(dpo::linear_mode::automatic, rows, t)));
      }
    }
    // Three and four passes agree to rounding (double: to 1e-12).
    problem q = make_problem<double>(4, 7, 8, 37, 41, true, 3.0);
    q.tr = p.tr;
    const fixture::reference qref = ref_logps(q, cfg, 2);
    if (dpo::detail::linear_pairs_separable(cfg)) {
      const result three = run<double>(q, layout::padded, cfg, qref, mode(dpo::linear_mode::three_pass));
      const result four = run<double>(q, layout::padded, cfg, qref, mode(dpo::linear_mode::four_pass));
      check_result(three, four, 1e-12, 1e-12);
    }
  }
  // bf16 with the weight gradient in float, over threads.
  problem b = make_problem<Eigen::bfloat16>(3, 9, 16, 600, 43, false, 3.0);
  const dpo::loss_config& cfg = fixture::config_named("sigmoid").cfg;
  const fixture::reference ref = ref_logps(b, cfg, 2);
  for (dpo::linear_mode m : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    const result a = run<Eigen::bfloat16, float>(b, layout::padded, cfg, ref, mode(m, 0, 1));
    for (int t : {2, 7}) check_bitwise(a, run<Eigen::bfloat16, float>(b, layout::padded, cfg, ref, mode(m, 0, t)));
  }
}

TEST_CASE("linear DPO: V = 1, prime V, H = 1", "[linear_dpo]") {
  const std::int64_t shapes[][2] = {{1, 1}, {5, 1}, {1, 7}, {3, 31}, {2, 257}};
  for (const auto& sh : shapes) {
    problem p = make_problem<double>(2, 5, sh[0], sh[1], 51);
    for (const char* name : {"sigmoid", "aot"}) {
      const dpo::loss_config& cfg = fixture::config_named(name).cfg;
      const fixture::reference ref = ref_logps(p, cfg, 2);
      const result want = reference_of(p, cfg, ref.c, ref.r);
      for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
        INFO("H " << sh[0] << ", V " << sh[1] << ", " << name);
        check_result(run<double>(p, layout::padded, cfg, ref, mode(m)), want, 1e-9, 1e-8);
      }
    }
  }
}

TEST_CASE("linear DPO: masked and gap rows; written and accumulated dHidden", "[linear_dpo]") {
  const problem p = make_problem<float>(3, 6, 5, 17, 61, true);
  const dpo::loss_config& cfg = fixture::config_named("sigmoid").cfg;
  const fixture::reference ref = ref_logps(p, cfg, 2);
  for (dpo::linear_mode m : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    const laid_out<float> lay(p, layout::padded, /*gaps=*/true);
    outputs<float, float> w(p, lay), a(p, lay);
    dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, w.fwd(), w.grads(lay, true), mode(m));
    dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, a.fwd(), a.grads(lay, true, true), mode(m));
    INFO("mode " << static_cast<int>(m));
    for (int s = 0; s < 2; ++s)
      for (std::int64_t i = 0; i < p.P; ++i)
        for (std::int64_t t = 0; t < lay.pitch; ++t) {
          const std::int64_t r = lay.start[s][i] + t;
          const bool in_seq = t < p.max_rows();
          const bool counts = t < p.rows(s, i) && p.lab[s][i][t] >= 0;
          for (std::int64_t c = 0; c < p.H; ++c) {
            const float wv = w.dh[0][r * lay.hs + c], av = a.dh[0][r * lay.hs + c];
            if (!in_seq) {
              CHECK(wv == float(sentinel));  // gap rows: never written
              CHECK(av == float(sentinel));
            } else if (!counts) {
              CHECK(wv == 0.0f);  // masked rows: zeros when written, untouched when accumulated
              CHECK(av == float(sentinel));
            } else {
              CHECK(av == Approx(sentinel + wv).epsilon(1e-6));
            }
          }
        }
  }
}

TEST_CASE("linear DPO: NaN in one hidden row stays in its pair", "[linear_dpo]") {
  problem p = make_problem<float>(3, 5, 6, 13, 71);
  const dpo::loss_config& cfg = fixture::config_named("sigmoid").cfg;
  const fixture::reference ref = ref_logps(p, cfg, 2);
  for (dpo::linear_mode m : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    for (layout k : {layout::padded, layout::separate}) {
      INFO("mode " << static_cast<int>(m) << ", " << fixture::name_of(k));
      const result clean = run<float>(p, k, cfg, ref, mode(m));
      problem q = p;
      q.hid[0][1][2][3] = std::numeric_limits<double>::quiet_NaN();  // a completion row of pair 1
      REQUIRE(q.lab[0][1][2] >= 0);
      const result dirty = run<float>(q, k, cfg, ref, mode(m));
      CHECK(std::isnan(dirty.loss));
      CHECK(std::isnan(dirty.losses[1]));
      for (std::int64_t i : {0, 2}) {
        CHECK(bitwise_equal({dirty.losses[i]}, {clean.losses[i]}));
        CHECK(bitwise_equal({dirty.gc[i]}, {clean.gc[i]}));
        for (int s = 0; s < 2; ++s) CHECK(bitwise_equal(flat({{dirty.dh[s][i]}}), flat({{clean.dh[s][i]}})));
      }
      // A NaN in a prompt row is never read.
      problem r = p;
      r.hid[1][2][0][0] = std::numeric_limits<double>::quiet_NaN();
      REQUIRE(r.lab[1][2][0] < 0);
      check_bitwise(run<float>(r, k, cfg, ref, mode(m)), clean);
    }
  }
}

TEST_CASE("linear DPO: forward alone then backward equals the fused four-pass call", "[linear_dpo]") {
  problem p = make_problem<float>(3, 6, 7, 19, 81, true, 3.0);
  p.tr = {1.0, 3.0, 1.0};
  for (const char* name : {"sigmoid", "aot", "mpo+wpo"}) {
    const dpo::loss_config& cfg = fixture::config_named(name).cfg;
    const fixture::reference ref = ref_logps(p, cfg, 2);
    for (layout k : {layout::padded, layout::packed}) {
      INFO(name << ", " << fixture::name_of(k));
      const laid_out<float> lay(p, k);
      outputs<float, float> f(p, lay), s(p, lay);
      dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, f.fwd(true), f.grads(lay, true),
                           mode(dpo::linear_mode::four_pass));
      dpo::cpu::linear_dpo_forward(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, s.fwd(true));
      CHECK(s.dh[0][lay.hs] == float(sentinel));  // the forward writes no gradient
      dpo::cpu::linear_dpo_backward(lay.pairs(p), lay.head(p), s.row_lse.data(), s.row_coef.data(),
                                    s.grads(lay, true));
      check_bitwise(f.gather(p, lay), s.gather(p, lay));
      CHECK(bitwise_equal(f.row_lse, s.row_lse));
      CHECK(bitwise_equal(f.row_coef, s.row_coef));
      // The three-pass call writes the same row state up to rounding.
      outputs<float, float> t(p, lay);
      dpo::cpu::linear_dpo(lay.pairs(p), lay.head(p), ref.pc(), ref.pr(), cfg, t.fwd(true), t.grads(lay, true));
      check_close(t.row_lse, f.row_lse, 1e-6, "row_lse", 1e-6);
      check_close(t.row_coef, f.row_coef, 1e-6, "row_coef", 1e-9);
      // grad_output scales the gradient.
      outputs<float, float> h(p, lay);
      dpo::cpu::linear_dpo_backward(lay.pairs(p), lay.head(p), s.row_lse.data(), s.row_coef.data(),
                                    h.grads(lay, true), 0.5);
      const result full = s.gather(p, lay), half = h.gather(p, lay);
      std::vector<double> twice = half.dw;
      for (double& x : twice) x *= 2;
      check_close(twice, full.dw, 1e-6, "dweight at grad_output 0.5");
    }
  }
}

TEST_CASE("linear head: the backward is exact for rows past the lse recompute limit", "[linear_dpo]") {
  // The backward recomputes those rows' max and sum (as the logits path): tests/support/lse_limit.hpp.
  test_support::lse_limit_case k;
  const std::int64_t V = k.V;
  const std::vector<label_t> labels(k.labels.begin(), k.labels.end());
  dpo::cpu::linear_view<double, label_t> in;
  in.hidden = k.hidden.data();
  in.rows = 2;
  in.hidden_cols = in.hidden_stride = 1;
  in.weight = k.weight.data();
  in.vocab = V;
  in.weight_cols = in.weight_stride = 1;
  in.bias = k.bias.data();
  in.bias_size = V;
  in.labels = labels.data();
  std::vector<double> logp(2), lse(2);
  dpo::cpu::linear_logps(in, logp.data(), nullptr, lse.data());
  REQUIRE(std::fabs(lse[0]) >= 1024.0);
  std::vector<double> db(V, 0.0);
  dpo::cpu::linear_grads<double> g;
  g.bias = db.data();
  dpo::cpu::linear_logps_backward(in, lse.data(), k.grad_logps.data(), nullptr, nullptr, g);
  k.check_dbias(db);
}

TEST_CASE("linear DPO: bad input names the argument and writes nothing", "[linear_dpo]") {
  problem p = make_problem<float>(2, 4, 5, 11, 91);
  const dpo::loss_config& cfg = fixture::config_named("sigmoid").cfg;
  const fixture::reference ref = ref_logps(p, cfg, 2);
  const laid_out<float> lay(p, layout::padded);
  outputs<float, float> o(p, lay);
  const auto fused = [&](const dpo::cpu::hidden_pairs<float, label_t>& in, const dpo::cpu::linear_head<float>& h,
                         const dpo::cpu::linear_dpo_grads<float, float>& g, dpo::cpu::linear_dpo_options opt = {},
                         const dpo::loss_config& c = fixture::config_named("sigmoid").cfg) {
    return [=, &o, &ref] { dpo::cpu::linear_dpo(in, h, ref.pc(), ref.pr(), c, o.fwd(), g, opt); };
  };
  const auto in = lay.pairs(p);
  const auto head = lay.head(p);
  const auto g = o.grads(lay, true);
  auto bad_in = in;
  bad_in.hidden_size = p.H + 1;
  expect_error("hidden_size", fused(bad_in, head, g));
  auto bad_head = head;
  bad_head.bias_size = p.V - 1;
  expect_error("bias_size", fused(in, bad_head, g));
  bad_head = head;
  bad_head.transforms.temperature = 0.0;
  expect_error("temperature", fused(in, bad_head, g));
  bad_head = head;
  bad_head.transforms.softcap = -1.0;
  expect_error("softcap", fused(in, bad_head, g));
  bad_head = head;
  bad_head.weight_stride = p.H - 1;
  expect_error("weight_stride", fused(in, bad_head, g));
  bad_head = head;
  bad_head.bias = nullptr;
  bad_head.bias_size = 0;
  expect_error("grads.bias", fused(in, bad_head, g));
  std::vector<label_t> labels = lay.labels[0];
  labels[1] = p.V;
  auto bad_labels = in;
  bad_labels.pairs.chosen.labels = bad_labels.pairs.rejected.labels = labels.data();
  expect_error("labels[1]", fused(bad_labels, head, g));
  labels[1] = -1;
  expect_error("labels[1]", fused(bad_labels, head, g));
  auto small = mode(dpo::linear_mode::automatic);
  small.workspace_bytes = 100;
  expect_error("workspace_bytes", fused(in, head, g, small));
  expect_error("three_pass", fused(in, head, g, mode(dpo::linear_mode::three_pass), fixture::config_named("aot").cfg));
  expect_error("three_pass", fused(in, head, g, mode(dpo::linear_mode::three_pass, 2)));
  auto alias = g;
  alias.weight = const_cast<float*>(lay.weight.data());
  alias.weight_stride = p.H + 2;
  expect_error("grads.weight overlaps weight", fused(in, head, alias));
  alias = g;
  alias.chosen_hidden = alias.rejected_hidden = const_cast<float*>(lay.hidden[0].data());
  expect_error("overlaps hidden", fused(in, head, alias));
  alias = g;
  alias.weight = reinterpret_cast<float*>(o.dh[0].data());
  alias.weight_stride = p.H;
  expect_error("unsupported aliasing", fused(in, head, alias));
  auto bad_stride = g;
  bad_stride.chosen_hidden_stride = p.H - 1;
  expect_error("chosen_hidden_stride", fused(in, head, bad_stride));
  auto bad_rows = in;
  bad_rows.pairs.chosen.row_stride = bad_rows.pairs.rejected.row_stride = p.H - 1;
  expect_error("row_stride", fused(bad_rows, head, g));
  expect_error("ref_chosen_logps", [&] {
    dpo::cpu::linear_dpo(in, head, nullptr, nullptr, cfg, o.fwd(), g);
  });
  expect_error("grad_output", [&] {
    dpo::cpu::linear_dpo(in, head, ref.pc(), ref.pr(), cfg, o.fwd(), g, {}, NAN);
  });
  // The reference from hidden states: its head must match.
  auto ref_head = head;
  ref_head.vocab = p.V - 1;
  ref_head.bias_size = p.V - 1;
  expect_error("ref_head.vocab", [&] { dpo::cpu::linear_dpo(in, head, in, ref_head, cfg, o.fwd(), g); });
  // Row state needs one hidden buffer.
  const laid_out<float> sep(p, layout::separate);
  outputs<float, float> so(p, sep);
  expect_error("one hidden buffer", [&] {
    dpo::cpu::linear_dpo_forward(sep.pairs(p), sep.head(p), ref.pc(), ref.pr(), cfg, so.fwd(true));
  });
  // ... with each side on rows of its own: not both sides on the same rows of one buffer.
  auto shared = sep.pairs(p);
  shared.pairs.rejected.logits = shared.pairs.chosen.logits;
  expect_error("share rows", [&] {
    dpo::cpu::linear_dpo_forward(shared, sep.head(p), ref.pc(), ref.pr(), cfg, so.fwd(true));
  });
  expect_error("share rows", [&] {
    dpo::cpu::linear_dpo_backward(shared, sep.head(p), o.row_lse.data(), o.row_coef.data(), g);
  });
  expect_error("row_lse", [&] {
    dpo::cpu::linear_dpo_backward(in, head, nullptr, o.row_coef.data(), g);
  });
  // Forward outputs on each other, on the reference log-probs or on the hidden rows.
  {
    dpo::forward_outputs fo = o.fwd(true);
    fo.chosen_rewards = fo.losses;
    expect_error("out.losses overlaps out.chosen_rewards",
                 [&] { dpo::cpu::linear_dpo(in, head, ref.pc(), ref.pr(), cfg, fo, g); });
    expect_error("out.losses overlaps out.chosen_rewards",
                 [&] { dpo::cpu::linear_dpo_forward(in, head, ref.pc(), ref.pr(), cfg, fo); });
    expect_error("out.losses overlaps out.chosen_rewards",
                 [&] { dpo::cpu::linear_dpo(in, head, in, head, cfg, fo, g); });
    expect_error("out.losses overlaps out.chosen_rewards",
                 [&] { dpo::cpu::linear_dpo_forward(in, head, in, head, cfg, fo); });
    fo = o.fwd(true);
    fo.row_coef = fo.row_lse + 1;
    expect_error("out.row_lse overlaps out.row_coef",
                 [&] { dpo::cpu::linear_dpo_forward(in, head, ref.pc(), ref.pr(), cfg, fo); });
    std::vector<double> refs = ref.c;
    fo = o.fwd();
    fo.rejected_logps = refs.data();
    expect_error("out.rejected_logps overlaps ref_chosen_logps",
                 [&] { dpo::cpu::linear_dpo(in, head, refs.data(), ref.pr(), cfg, fo, g); });
    CHECK(refs == ref.c);
    std::vector<float> hid = lay.hidden[0];
    auto on_hidden = in;
    on_hidden.pairs.chosen.logits = on_hidden.pairs.rejected.logits = hid.data();
    fo = o.fwd();
    fo.grad_rejected = reinterpret_cast<double*>(hid.data() + 2);
    expect_error("out.grad_rejected overlaps hidden", [&] {
      dpo::cpu::linear_dpo(on_hidden, head, ref.pc(), ref.pr(), cfg, fo, g);
    });
    CHECK(std::memcmp(hid.data(), lay.hidden[0].data(), hid.size() * sizeof(float)) == 0);  // NaN padding
    // linear_pair_logps: its outputs on each other or on the hidden rows.
    std::vector<double> pl(2 * p.P, -5.0);
    expect_error("chosen overlaps rejected",
                 [&] { dpo::cpu::linear_pair_logps(in, head, 1.0, pl.data(), pl.data() + 1); });
    expect_error("rejected overlaps hidden", [&] {
      dpo::cpu::linear_pair_logps(on_hidden, head, 1.0, pl.data(), reinterpret_cast<double*>(hid.data() + 3));
    });
    CHECK(pl == std::vector<double>(2 * p.P, -5.0));
    CHECK(std::memcmp(hid.data(), lay.hidden[0].data(), hid.size() * sizeof(float)) == 0);
    // ... or on the call's own gradient buffers (written after the forward outputs).
    fo = o.fwd();
    fo.losses = reinterpret_cast<double*>(o.dw.data() + 3);
    expect_error("out.losses overlaps grads.weight",
                 [&] { dpo::cpu::linear_dpo(in, head, ref.pc(), ref.pr(), cfg, fo, g); });
    expect_error("out.losses overlaps grads.weight", [&] { dpo::cpu::linear_dpo(in, head, in, head, cfg, fo, g); });
    fo = o.fwd();
    fo.chosen_logps = reinterpret_cast<double*>(o.db.data());
    expect_error("out.chosen_logps overlaps grads.bias",
                 [&] { dpo::cpu::linear_dpo(in, head, ref.pc(), ref.pr(), cfg, fo, g); });
    fo = o.fwd();
    fo.metrics = reinterpret_cast<dpo::metrics*>(o.dh[0].data() + 2 * p.H);
    expect_error("out.metrics overlaps grads.chosen_hidden / grads.rejected_hidden",
                 [&] { dpo::cpu::linear_dpo(in, head, in, head, cfg, fo, g); });
  }
  // Nothing was written by any of the rejected calls.
  CHECK(o.loss == -1.0);
  for (float x : o.dh[0]) CHECK(x == float(sentinel));
  for (float x : o.dw) CHECK(x == 0.0f);
  for (float x : o.db) CHECK(x == 0.0f);
  for (double x : o.losses) CHECK(x == -9.0);
  for (double x : o.row_coef) CHECK(x == -9.0);
}

TEST_CASE("linear_pair_logps: chosen and rejected may overlap neither each other nor the inputs", "[linear_dpo]") {
  // The audit's probes: chosen == rejected returned the rejected sums as both, and chosen on
  // the hidden rows overwrote them; both were accepted.
  const std::int64_t P = 2, L = 3, R = 2 * P * L, H = 3, V = 7;
  std::vector<double> w(static_cast<std::size_t>(V * H)), hid(static_cast<std::size_t>(R * H));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.3 * static_cast<double>(i) + 0.1);
  for (std::size_t i = 0; i < hid.size(); ++i) hid[i] = std::cos(0.37 * static_cast<double>(i) + 0.2);
  std::vector<label_t> labels(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) labels[r] = r % L == 0 ? -100 : (r * 5 + 1) % V;
  const auto head = dpo::make_linear_head(static_cast<const double*>(w.data()), V, H, H);
  const auto pairs = dpo::linear_padded_pairs(static_cast<const double*>(hid.data()), H, H, labels.data(), 2 * P, L);
  const std::vector<double> hid0 = hid;
  const std::vector<label_t> labels0 = labels;
  std::vector<double> both(static_cast<std::size_t>(P), 7.0), r(both.size(), 7.0);
  fixture::expect_error([&] { dpo::cpu::linear_pair_logps(pairs, head, 1.0, both.data(), both.data()); },
                        "chosen overlaps rejected");
  CHECK(both == std::vector<double>(both.size(), 7.0));
  fixture::expect_error([&] { dpo::cpu::linear_pair_logps(pairs, head, 1.0, hid.data() + 3, r.data()); },
                        "chosen overlaps hidden");
  CHECK(hid == hid0);
  fixture::expect_error(
      [&] { dpo::cpu::linear_pair_logps(pairs, head, 1.0, both.data(), reinterpret_cast<double*>(labels.data() + 1)); },
      "rejected overlaps labels");
  CHECK(labels == labels0);
  CHECK(r == std::vector<double>(r.size(), 7.0));
}

TEST_CASE("linear DPO: pairs without completion rows and a fully masked batch", "[linear_dpo]") {
  for (const char* name : {"sigmoid", "sft", "aot"}) {
    problem p = make_problem<double>(3, 5, 4, 11, 101);
    for (int s = 0; s < 2; ++s)
      for (auto& y : p.lab[s][1]) y = -100;  // pair 1 has no completion token
    const dpo::loss_config& cfg = fixture::config_named(name).cfg;
    const fixture::reference ref = ref_logps(p, cfg, 2);
    const result want = reference_of(p, cfg, ref.c, ref.r);
    for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
      INFO(name << ", mode " << static_cast<int>(m));
      check_result(run<double>(p, layout::padded, cfg, ref, mode(m)), want, 1e-9, 1e-8);
      check_result(run<double>(p, layout::packed, cfg, ref, mode(m, 1)), want, 1e-9, 1e-8);
    }
    for (auto& side : p.lab)
      for (auto& seq : side)
        for (auto& y : seq) y = -100;
    const result none = reference_of(p, cfg, ref.c, ref.r);
    for (dpo::linear_mode m : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
      const result got = run<double>(p, layout::padded, cfg, ref, mode(m));
      check_result(got, none, 1e-9, 1e-8);
      for (double x : flat(got.dh)) CHECK(x == 0.0);
    }
  }
}

TEST_CASE("linear DPO: the header's example; null gradient members are skipped", "[linear_dpo]") {
  const std::int64_t P = 2, T = 4, H = 3, V = 7;
  std::vector<float> h(2 * P * T * H), w(V * H), dh(h.size()), dw(w.size(), 0.0f);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = std::sin(0.7f * static_cast<float>(i));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = std::cos(1.3f * static_cast<float>(i));
  std::vector<std::int64_t> labels(2 * P * T);
  for (std::size_t r = 0; r < labels.size(); ++r) labels[r] = r % T == 0 ? -100 : static_cast<std::int64_t>(r % V);
  const double ref_c[P] = {-5.0, -6.0}, ref_r[P] = {-6.5, -5.5};
  dpo::loss_config cfg;
  // The example of linear_dpo's doc comment, verbatim but for the names.
  auto policy = dpo::cpu::linear_padded_pairs(h.data(), H, H, labels.data(), 2 * P, T);
  dpo::cpu::linear_head<float> head;
  head.weight = w.data(); head.vocab = V; head.hidden = H; head.weight_stride = H;
  dpo::cpu::linear_dpo_grads<float> g;
  g.chosen_hidden = g.rejected_hidden = dh.data(); g.chosen_hidden_stride = g.rejected_hidden_stride = H;
  g.weight = dw.data(); g.weight_stride = H;
  double loss;
  dpo::forward_outputs out;
  out.loss = &loss;
  dpo::cpu::linear_dpo(policy, head, ref_c, ref_r, cfg, out, g);
  CHECK(std::isfinite(loss));
  // Only dHidden, then only dWeight: the same values as together.
  for (dpo::linear_mode m : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    std::vector<float> dh2(h.size(), 9.0f), dw2(w.size(), 0.0f);
    dpo::cpu::linear_dpo_grads<float> only_h;
    only_h.chosen_hidden = only_h.rejected_hidden = dh2.data();
    only_h.chosen_hidden_stride = only_h.rejected_hidden_stride = H;
    dpo::cpu::linear_dpo_grads<float> only_w;
    only_w.weight = dw2.data();
    only_w.weight_stride = H;
    double l2 = 0;
    out.loss = &l2;
    dpo::cpu::linear_dpo(policy, head, ref_c, ref_r, cfg, out, only_h, mode(m));
    dpo::cpu::linear_dpo(policy, head, ref_c, ref_r, cfg, out, only_w, mode(m));
    CHECK(l2 == loss);
    for (std::size_t i = 0; i < dh.size(); ++i) CHECK(dh2[i] == Approx(dh[i]).margin(1e-6));
    for (std::size_t i = 0; i < dw.size(); ++i) CHECK(dw2[i] == Approx(dw[i]).margin(1e-6));
  }
}
