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
#include "fixtures.hpp"
#include "oracle.hpp"

namespace {

const bool thread_limit_set = [] {
#ifdef _WIN32
  return std::getenv("DPO_THREAD_LIMIT") != nullptr || _putenv_s("DPO_THREAD_LIMIT", "16") == 0;
#else
  return setenv("DPO_THREAD_LIMIT", "16", 0) == 0;
#endif
}();

using fixture::layout;
using ld = oracle::ld;
using label_t = std::int64_t;

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

double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

/// max |got - want| <= atol + rtol * max |want|.
void check_close(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                 const char* what, double atol = 0) {
  REQUIRE(got.size() == want.size());
  const double tol = atol + rtol * std::max(max_abs(want), 1e-30);
  double worst = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(got[i] - want[i]);
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  INFO(what << ": worst error " << worst << " at " << at << " (got " << got[at] << ", want "
            << want[at] << "), tolerance " << tol);
  CHECK(worst <= tol);
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

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

void check_bitwise(const result& a, const result& b) {
  CHECK(same_bits({a.loss}, {b.loss}));
  CHECK(same_bits(metric_vec(a.m), metric_vec(b.m)));
  CHECK(same_bits(a.losses, b.losses));
  CHECK(same_bits(a.lc, b.lc));
  CHECK(same_bits(a.gc, b.gc));
  CHECK(same_bits(flat(a.dh), flat(b.dh)));
  CHECK(same_bits(a.dw, b.dw));
  CHECK(same_bits(a.db, b.db));
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

template <class E>
void expect_error(const std::string& name, E&& call) {
  try {
    call();
    FAIL("no dpo::error for " << name);
  } catch (const dpo::error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(name) != std::string::npos);
  }
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
