// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo::cuda against dpo::cpu on random inputs: every loss type, every dtype, odd vocab,
// misaligned strides, packed and padded layouts, in place and out of place, reference logits
// instead of log-probs, determinism, the error paths, and rows x vocab beyond 2^31. The
// sanitizers run the [sanitize] case; [large] needs about 4.5 GB of device memory.
#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "checks.hpp"
#include "dpo/core/check.hpp"
#include "dpo/core/validate.hpp"
#include "dpo/cpu/dpo.hpp"
#include "dtype_bytes.hpp"
#include "harness.hpp"

namespace {

using dpo_cuda_test::case_in;
using dpo_cuda_test::case_out;
using dpo_cuda_test::dtype;
using dpo_cuda_test::get;
using dpo_cuda_test::mode;
using dpo_cuda_test::put;

/// Shape of a random case.
struct shape {
  std::int64_t pairs = 3;
  std::int64_t seq_len = 9;  // padded rows per sequence; packed: the longest sequence
  std::int64_t vocab = 131;
  std::int64_t pad = 0;      // row_stride = vocab + pad
  bool packed = false;
  bool with_mask = false;
  bool fully_masked = true;  // make one sequence all prompt / padding
  bool neg_inf = false;      // some -inf logits (in the upper half of the vocab, never a label)
};

/// Random logits (normal, sd 2, some rows with a few -inf), labels with an ignored prompt and
/// padding, optional mask.
case_in make_case(dtype t, const shape& sh, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  case_in c;
  c.type = t;
  c.num_seqs = 2 * sh.pairs;
  c.vocab = sh.vocab;
  c.row_stride = sh.vocab + sh.pad;
  std::vector<std::int64_t> lens(static_cast<std::size_t>(c.num_seqs), sh.seq_len);
  if (sh.packed) {
    c.cu_seqlens.push_back(0);
    for (auto& n : lens) {
      n = 1 + static_cast<std::int64_t>(rng() % static_cast<unsigned long long>(sh.seq_len));
      c.cu_seqlens.push_back(c.cu_seqlens.back() + n);
    }
    c.rows = c.cu_seqlens.back() + 2;  // spare rows at the end are never touched
  } else {
    c.seq_len = sh.seq_len;
    c.rows = c.num_seqs * sh.seq_len;
  }
  const std::size_t n = static_cast<std::size_t>(c.rows * c.row_stride);
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  c.logits.resize(n * es);
  for (std::size_t i = 0; i < n; ++i) {
    float x = nd(rng);
    const std::int64_t col = static_cast<std::int64_t>(i) % c.row_stride;
    if (sh.neg_inf && col >= sh.vocab / 2 && rng() % 7 == 0) x = -INFINITY;
    // f64 cases carry digits below float's, drawn only for them
    put(t, c.logits.data() + i * es,
        t == dtype::f64 ? static_cast<double>(x) + 1e-3 * static_cast<double>(nd(rng)) : x);
  }
  c.labels.assign(static_cast<std::size_t>(c.rows), -100);
  std::int64_t row = 0;
  for (std::int64_t s = 0; s < c.num_seqs; ++s) {
    const std::int64_t len = lens[s];
    const std::int64_t prompt = static_cast<std::int64_t>(rng() % 3);
    const std::int64_t padding = static_cast<std::int64_t>(rng() % 2);
    const bool masked = sh.fully_masked && s == 1;
    for (std::int64_t k = 0; k < len; ++k) {
      if (!masked && k >= prompt && k < len - padding)
        c.labels[row + k] = static_cast<std::int64_t>(
            rng() % static_cast<unsigned long long>(sh.neg_inf ? sh.vocab / 2 : sh.vocab));
    }
    row += len;
  }
  if (sh.with_mask) {
    c.mask.resize(static_cast<std::size_t>(c.rows));
    for (auto& m : c.mask) m = rng() % 5 == 0 ? 0 : 1;
  }
  std::normal_distribution<double> rd(-20.0, 5.0);
  for (std::int64_t i = 0; i < sh.pairs; ++i) {
    c.ref_chosen.push_back(rd(rng));
    c.ref_rejected.push_back(rd(rng));
  }
  c.grad_stride = c.row_stride + 1;
  c.grad_offset = 1;  // misaligns the gradient rows against the logits rows
  return c;
}

/// Reference logits for a case: its logits' layout, other random values (normal, sd 2).
std::vector<unsigned char> random_logits(const case_in& c, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  const std::size_t es = dpo_cuda_test::dtype_size(c.type);
  std::vector<unsigned char> out(c.logits.size());
  for (std::size_t i = 0; i < out.size() / es; ++i) {
    put(c.type, out.data() + i * es, nd(rng));
  }
  return out;
}

/// The CPU path on the same bytes: forward result and the gradient buffer (zeros elsewhere).
struct cpu_run {
  dpo::cpu::forward_result fwd;
  std::vector<double> grad;  // rows * row_stride, decoded
  std::vector<double> sums;
  std::vector<std::int64_t> counts;
  std::vector<double> token_logps;
};

/// A bf16 value from its bits (exact: they are a float's top half).
double bf16_bits(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class E>
cpu_run run_cpu_typed(const case_in& c) {
  cpu_run out;
  const E* lp = reinterpret_cast<const E*>(c.logits.data());
  const std::uint8_t* mk = c.mask.empty() ? nullptr : c.mask.data();
  dpo::pair_view<E, std::int64_t> pv =
      c.cu_seqlens.empty()
          ? dpo::padded_pairs(lp, c.labels.data(), c.num_seqs, c.seq_len, c.vocab, c.row_stride, mk,
                              c.ignore_index)
          : dpo::packed_pairs(lp, c.labels.data(), c.cu_seqlens.data(), c.num_seqs, c.vocab,
                              c.row_stride, mk, c.ignore_index);
  if (c.cu_seqlens.empty()) pv.chosen.seq_stride = pv.rejected.seq_stride = c.seq_stride;
  dpo::cpu::options opt;
  opt.metrics = c.metrics;
  opt.num_threads = 1;
  if (c.run == mode::sequence_logps) {
    dpo::token_view<E, std::int64_t> all = pv.chosen;
    all.num_seqs = c.num_seqs;
    out.sums.resize(static_cast<std::size_t>(c.num_seqs));
    out.counts.resize(out.sums.size());
    out.token_logps.assign(static_cast<std::size_t>(c.rows), 0.0);
    dpo::cpu::sequence_logps(all, out.sums.data(), out.counts.data(), out.token_logps.data(), opt);
    return out;
  }
  if (c.run == mode::pair_logps) {
    const std::int64_t P = c.num_seqs / 2;
    out.sums.resize(static_cast<std::size_t>(2 * P));
    dpo::cpu::pair_logps(pv, c.ld_alpha, out.sums.data(), out.sums.data() + P, opt);
    return out;
  }
  const double* rc = c.ref_chosen.empty() ? nullptr : c.ref_chosen.data();
  const double* rr = c.ref_rejected.empty() ? nullptr : c.ref_rejected.data();
  if (c.ref_logits.empty()) {
    out.fwd = dpo::cpu::dpo_forward(pv, rc, rr, c.cfg, opt);
  } else {
    // The CPU's reference-logits overload, on the same bytes and labels (fp32 reference
    // logits with ref_f32: the mixed-dtype overload).
    const auto reference = [&](const auto* rp) {
      using R = std::remove_cv_t<std::remove_pointer_t<decltype(rp)>>;
      dpo::pair_view<R, std::int64_t> rv;
      const std::int64_t* rl = c.ref_labels.empty() ? c.labels.data() : c.ref_labels.data();
      rv.chosen = dpo::token_view<R, std::int64_t>{rp, rl, pv.chosen.mask, pv.chosen.cu_seqlens, pv.chosen.vocab,
                                                   pv.chosen.row_stride, pv.chosen.num_seqs, pv.chosen.seq_len,
                                                   pv.chosen.first_seq, pv.chosen.ignore_index, pv.chosen.seq_stride};
      rv.rejected = dpo::token_view<R, std::int64_t>{
          rp, rl, pv.rejected.mask, pv.rejected.cu_seqlens, pv.rejected.vocab, pv.rejected.row_stride,
          pv.rejected.num_seqs, pv.rejected.seq_len, pv.rejected.first_seq, pv.rejected.ignore_index,
          pv.rejected.seq_stride};
      rv.concatenated_seqs = pv.concatenated_seqs;
      return rv;
    };
    if (c.ref_f32)
      out.fwd = dpo::cpu::dpo_forward(pv, reference(reinterpret_cast<const float*>(c.ref_logits.data())), c.cfg, opt);
    else
      out.fwd = dpo::cpu::dpo_forward(pv, reference(reinterpret_cast<const E*>(c.ref_logits.data())), c.cfg, opt);
  }
  std::vector<E> g(static_cast<std::size_t>(c.rows * c.row_stride), E(0.0f));
  dpo::cpu::dpo_backward(pv, out.fwd, dpo::pair_grad_view<E>{g.data(), c.row_stride, g.data(), c.row_stride},
                         c.run == mode::forward_then_backward || c.run == mode::backward_rows
                             ? c.grad_output
                             : 1.0,
                         opt);
  out.grad.resize(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) out.grad[i] = static_cast<double>(g[i]);
  return out;
}

cpu_run run_cpu(const case_in& c) {
  switch (c.type) {
    case dtype::bf16: return run_cpu_typed<Eigen::bfloat16>(c);
    case dtype::f16: return run_cpu_typed<Eigen::half>(c);
    case dtype::f32: return run_cpu_typed<float>(c);
    case dtype::f64: return run_cpu_typed<double>(c);
  }
  return {};
}

/// Relative tolerance of sequence and pair values (fp32 accumulation of the same bits).
double value_tol(dtype t) { return t == dtype::f64 ? 1e-9 : 2e-5; }
/// Relative tolerance of the gradient buffer in norm (a rounding step of the dtype).
double grad_tol(dtype t) { return dpo_cuda_test::per_dtype(t, 1e-2, 2e-3, 1e-4, 1e-9); }

void check_close(const std::vector<double>& gpu, const Eigen::VectorXd& cpu, double tol, const char* what) {
  INFO(what);
  REQUIRE(gpu.size() == static_cast<std::size_t>(cpu.size()));
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    INFO("index " << i);
    CHECK(gpu[i] == Approx(cpu[static_cast<Eigen::Index>(i)]).epsilon(tol).margin(tol));
  }
}

/// Rows of the case that belong to a sequence.
std::int64_t used_rows(const case_in& c) {
  return c.cu_seqlens.empty() ? c.rows : c.cu_seqlens.back();
}

/// Compares a GPU gradient buffer (raw bytes of c.type) with the CPU gradient (decoded,
/// rows x row_stride) on the rows where inside(r), columns [0, vocab), and checks that
/// nothing else was written: the logits in place, the 0xff poison out of place.
template <class Inside>
void check_grad_buffer(const case_in& c, const std::vector<unsigned char>& gpu,
                       const std::vector<double>& cpu, const Inside& inside) {
  const std::size_t es = dpo_cuda_test::dtype_size(c.type);
  const std::int64_t stride = c.in_place ? c.row_stride : c.grad_stride;
  const std::int64_t offset = c.in_place ? 0 : c.grad_offset;
  double num = 0, den = 0;
  std::int64_t stray = 0, nonfinite = 0;
  for (std::int64_t r = 0; r < c.rows; ++r) {
    for (std::int64_t v = 0; v < stride; ++v) {
      const std::size_t at = static_cast<std::size_t>(offset + r * stride + v) * es;
      if (!inside(r) || v >= c.vocab) {
        bool same = true;
        for (std::size_t b = 0; b < es; ++b) {
          const unsigned char expect =
              c.in_place ? c.logits[static_cast<std::size_t>(r * c.row_stride + v) * es + b] : 0xff;
          same = same && gpu[at + b] == expect;
        }
        stray += same ? 0 : 1;
        continue;
      }
      const double x = get(c.type, gpu.data() + at);
      const double y = cpu[static_cast<std::size_t>(r * c.row_stride + v)];
      if (!std::isfinite(x)) ++nonfinite;
      num += (x - y) * (x - y);
      den += y * y;
    }
  }
  CHECK(stray == 0);
  CHECK(nonfinite == 0);
  INFO("gradient relative error " << std::sqrt(num / (den > 0 ? den : 1.0)));
  CHECK(std::sqrt(num) <= grad_tol(c.type) * std::sqrt(den) + 1e-12);
}

/// The gradient of a pair-level case: every row of a sequence is inside.
void check_grad(const case_in& c, const case_out& g, const cpu_run& cpu) {
  const std::int64_t used = used_rows(c);
  check_grad_buffer(c, g.grad, cpu.grad, [&](std::int64_t r) { return r < used; });
}

/// A case run on the CUDA path (emulated without a GPU) and on the CPU path, with the
/// tolerance of its dtype.
struct both_runs {
  case_out gpu;
  cpu_run cpu;
  double tol;
};

/// Runs a case on both backends; the CUDA run must have succeeded (status and device error).
both_runs run_both(const case_in& c) {
  both_runs r{dpo_cuda_test::run_case(c), {}, value_tol(c.type)};
  INFO(r.gpu.message << r.gpu.device_message);
  REQUIRE(r.gpu.status_code == 0);
  REQUIRE(r.gpu.device_error == 0);
  r.cpu = run_cpu(c);
  return r;
}

/// The pair-level results both DPO modes produce (loss, per-pair values and gradients, the
/// NLL token gradient, the metrics), against the CPU's; skip_logit_metrics: the mean-logit
/// metrics are not compared; token_metrics: false where only pair-level inputs were given
/// (dpo_loss: those four metrics are 0).
void check_pair_results(const case_out& g, const dpo::cpu::forward_result& f, double tol,
                        bool skip_logit_metrics, bool token_metrics) {
  CHECK(g.loss == Approx(f.loss).epsilon(tol).margin(tol));
  check_close(g.losses, f.losses, tol, "losses");
  check_close(g.chosen_rewards, f.chosen_rewards, tol, "chosen_rewards");
  check_close(g.rejected_rewards, f.rejected_rewards, tol, "rejected_rewards");
  check_close(g.weights, f.weights, tol, "weights");
  check_close(g.grad_chosen, f.grad_chosen, tol, "grad_chosen");
  check_close(g.grad_rejected, f.grad_rejected, tol, "grad_rejected");
  CHECK(g.nll_token_grad == Approx(f.nll_token_grad).epsilon(tol).margin(tol));
  const dpo::cpu::metrics& m = f.metrics;
  const auto token = [&](double v) { return token_metrics ? v : 0.0; };
  const double expect[11] = {m.rewards_chosen,          m.rewards_rejected,         m.rewards_margins,
                             m.rewards_accuracies,      m.logps_chosen,             m.logps_rejected,
                             token(m.logits_chosen),    token(m.logits_rejected),   token(m.entropy),
                             token(m.mean_token_accuracy), m.nll_loss};
  for (int k = 0; k < 11; ++k) {
    if (skip_logit_metrics && (k == 6 || k == 7)) continue;
    INFO("metric " << k);
    CHECK(g.metrics[k] == Approx(expect[k]).epsilon(tol).margin(tol));
  }
}

/// Runs a case on both backends and compares everything the mode produces. With -inf logits
/// the mean-logit metrics are -inf on both sides and are not compared.
case_out compare(const case_in& c, bool neg_inf = false) {
  const both_runs both = run_both(c);
  const case_out& g = both.gpu;
  const cpu_run& cpu = both.cpu;
  const double tol = both.tol;
  INFO(g.message << g.device_message);
  if (c.run == mode::sequence_logps) {
    for (std::size_t s = 0; s < cpu.sums.size(); ++s) {
      CHECK(g.sums[s] == Approx(cpu.sums[s]).epsilon(tol).margin(tol));
      CHECK(g.counts[s] == cpu.counts[s]);
    }
    for (std::int64_t r = 0; r < used_rows(c); ++r)
      CHECK(g.token_logps[r] == Approx(cpu.token_logps[r]).epsilon(tol).margin(tol));
    return g;
  }
  if (c.run == mode::pair_logps) {
    for (std::size_t s = 0; s < cpu.sums.size(); ++s)
      CHECK(g.sums[s] == Approx(cpu.sums[s]).epsilon(tol).margin(tol));
    return g;
  }
  const dpo::cpu::forward_result& f = cpu.fwd;
  check_pair_results(g, f, tol, neg_inf, true);
  check_close(g.chosen_logps, f.chosen_logps, tol, "chosen_logps");
  check_close(g.rejected_logps, f.rejected_logps, tol, "rejected_logps");
  check_close(g.chosen_tokens, f.chosen_tokens, 0.0, "chosen_tokens");
  check_close(g.rejected_tokens, f.rejected_tokens, 0.0, "rejected_tokens");
  if (c.run != mode::forward_only) check_grad(c, g, cpu);
  return g;
}

struct named_config {
  std::string name;
  dpo::loss_config cfg;
};

std::vector<named_config> every_loss() {
  std::vector<named_config> out;
  for (int i = 0; i < dpo::num_loss_types; ++i) {
    const auto t = static_cast<dpo::loss_type>(i);
    dpo::loss_config c = dpo::loss_config::of(t);
    if (t == dpo::loss_type::exo_pair) c.label_smoothing = 0.1;
    if (t == dpo::loss_type::robust) c.label_smoothing = 0.2;
    if (t == dpo::loss_type::aot || t == dpo::loss_type::aot_unpaired) c.label_smoothing = 0.05;
    if (t == dpo::loss_type::ipo || t == dpo::loss_type::sppo_hard) c.beta = 0.5;
    out.push_back({dpo::to_string(t), c});
  }
  dpo::loss_config mpo = dpo::loss_config::combination(
      {{dpo::loss_type::sigmoid, 0.8}, {dpo::loss_type::bco_pair, 0.2}, {dpo::loss_type::sft, 1.0}});
  out.push_back({"mpo", mpo});
  dpo::loss_config wpo;
  wpo.use_weighting = true;
  out.push_back({"sigmoid+wpo", wpo});
  dpo::loss_config ld;
  ld.ld_alpha = 0.4;
  out.push_back({"sigmoid+ld", ld});
  dpo::loss_config cpo_ipo = dpo::loss_config::of(dpo::loss_type::cpo);
  cpo_ipo.cpo_base = dpo::loss_type::ipo;
  out.push_back({"cpo-ipo", cpo_ipo});
  for (int f = 1; f < 4; ++f) {
    dpo::loss_config c;
    c.divergence = static_cast<dpo::f_divergence>(f);
    out.push_back({std::string("sigmoid+") + dpo::to_string(c.divergence), c});
  }
  dpo::loss_config rf = dpo::loss_config::of(dpo::loss_type::hinge);
  rf.reference_free = true;
  out.push_back({"hinge+reference_free", rf});
  dpo::loss_config cdpo;
  cdpo.cdpo_smoothing = true;
  cdpo.label_smoothing = 0.1;
  out.push_back({"cdpo", cdpo});
  return out;
}

}  // namespace

TEST_CASE("cuda: every loss type matches the CPU path", "[cuda][small]") {
  unsigned seed = 1;
  for (const named_config& nc : every_loss()) {
    for (mode m : {mode::forward_backward, mode::forward_then_backward, mode::backward_rows}) {
      INFO("config " << nc.name << " mode " << static_cast<int>(m));
      REQUIRE(dpo::validate_config(nc.cfg).empty());
      shape sh;
      sh.pairs = 5;
      case_in c = make_case(dtype::f32, sh, seed++);
      c.cfg = nc.cfg;
      c.run = m;
      c.grad_output = 0.75;
      compare(c);
    }
  }
}

TEST_CASE("cuda: dtypes, odd vocab, misaligned rows, layouts, in place", "[cuda][small]") {
  unsigned seed = 100;
  for (dtype t : {dtype::bf16, dtype::f16, dtype::f32, dtype::f64}) {
    for (std::int64_t V : {1, 7, 61, 1031, 4099}) {
      for (std::int64_t pad : {0, 1, 3}) {
        for (int variant = 0; variant < 4; ++variant) {
          shape sh;
          sh.vocab = V;
          sh.pad = pad;
          sh.packed = variant & 1;
          sh.with_mask = variant == 3;
          case_in c = make_case(t, sh, seed++);
          c.in_place = variant & 2;
          c.labels64 = !(variant == 2 && (t == dtype::bf16 || t == dtype::f32));
          c.metrics = variant != 1;
          c.cfg.ld_alpha = variant == 3 ? 0.5 : 1.0;
          if (variant == 1 && V == 61) c.run = mode::backward_rows;
          INFO("dtype " << static_cast<int>(t) << " V " << V << " pad " << pad << " variant " << variant);
          compare(c);
        }
      }
    }
  }
}

TEST_CASE("cuda: -inf logits add no probability mass", "[cuda][small]") {
  unsigned seed = 300;
  for (dtype t : {dtype::bf16, dtype::f32}) {
    for (std::int64_t V : {64, 1031}) {
      shape sh;
      sh.vocab = V;
      sh.neg_inf = true;
      case_in c = make_case(t, sh, seed++);
      compare(c, true);
    }
  }
}

TEST_CASE("cuda: sequence_logps and pair_logps match the CPU path", "[cuda][small]") {
  unsigned seed = 500;
  for (dtype t : {dtype::bf16, dtype::f32}) {
    for (bool packed : {false, true}) {
      shape sh;
      sh.vocab = 1031;
      sh.pad = 5;
      sh.packed = packed;
      case_in c = make_case(t, sh, seed++);
      c.run = mode::sequence_logps;
      compare(c);
      c.run = mode::pair_logps;
      c.ld_alpha = 0.3;
      compare(c);
      c.ld_alpha = 1.0;
      compare(c);
    }
  }
}

TEST_CASE("cuda: results are bitwise identical run to run", "[cuda][small]") {
  shape sh;
  sh.pairs = 4;
  sh.seq_len = 33;
  sh.vocab = 32003;
  sh.pad = 1;
  case_in c = make_case(dtype::bf16, sh, 7);
  // With WPO weights the metrics come from the forward's read, without them from the
  // backward's: both reproducible.
  for (bool wpo : {true, false}) {
    INFO("use_weighting " << wpo);
    c.cfg.use_weighting = wpo;
    const case_out a = dpo_cuda_test::run_case(c);
    const case_out b = dpo_cuda_test::run_case(c);
    REQUIRE(a.status_code == 0);
    CHECK(std::memcmp(&a.loss, &b.loss, sizeof(double)) == 0);
    CHECK(a.grad == b.grad);
    CHECK(a.metrics == b.metrics);
    CHECK(a.losses == b.losses);
    CHECK(a.grad_chosen == b.grad_chosen);
    CHECK(a.weights == b.weights);
  }
}

TEST_CASE("cuda: dpo_forward_backward's metrics from the backward's read agree with dpo_forward's",
          "[cuda][small]") {
  // Without WPO weights dpo_forward_backward leaves the token metrics to its backward
  // (block_row_grad_metrics): the same values as dpo_forward's one-read metrics, bitwise
  // except the entropy (summed from p * (z - lse) instead of online), whatever the dtype,
  // layout, or rows whose gradient is 0 (sft: the rejected side; masked labels).
  unsigned seed = 1200;
  for (dtype t : {dtype::bf16, dtype::f16, dtype::f32, dtype::f64}) {
    for (int variant = 0; variant < 3; ++variant) {
      shape sh;
      sh.pairs = 3;
      sh.vocab = variant == 1 ? 32003 : 1031;
      sh.pad = variant;
      sh.packed = variant == 2;
      sh.with_mask = variant == 2;
      case_in c = make_case(t, sh, seed++);
      c.in_place = true;  // the same alignment of logits and gradient rows
      if (variant == 1) c.cfg = dpo::loss_config::of(dpo::loss_type::sft);
      INFO("dtype " << static_cast<int>(t) << " variant " << variant);
      const case_out fused = compare(c);
      c.run = mode::forward_only;
      const case_out fwd = compare(c);
      REQUIRE(fused.metrics.size() == 11);
      REQUIRE(fwd.metrics.size() == 11);
      for (int k = 0; k < 11; ++k) {
        INFO("metric " << k);
        if (k == 8) {
          CHECK(fused.metrics[k] == Approx(fwd.metrics[k]).epsilon(value_tol(t)));
        } else {
          CHECK(std::memcmp(&fused.metrics[k], &fwd.metrics[k], sizeof(double)) == 0);
        }
      }
      CHECK(std::memcmp(&fused.loss, &fwd.loss, sizeof(double)) == 0);
    }
  }
}

TEST_CASE("cuda: sequences longer than a block, batches wider than a block", "[cuda][small]") {
  // sequence_kernel walks a sequence in tiles of seq_block rows (the completion count and
  // LD-DPO's running position carry across tiles); pair_kernel strides over pairs by
  // pair_block. Both past one tile here.
  unsigned seed = 900;
  for (bool packed : {false, true}) {
    for (mode m : {mode::forward_backward, mode::backward_rows, mode::sequence_logps, mode::pair_logps}) {
      shape sh;
      sh.pairs = 3;
      sh.seq_len = 700;
      sh.vocab = 61;
      sh.packed = packed;
      case_in c = make_case(dtype::f32, sh, seed++);
      c.run = m;
      c.cfg.ld_alpha = 0.5;
      c.ld_alpha = 0.5;
      INFO("long sequences, packed " << packed << " mode " << static_cast<int>(m));
      compare(c);
    }
  }
  for (const char* type : {"sigmoid", "apo_zero", "aot", "aot_unpaired"}) {
    shape sh;
    sh.pairs = 300;
    sh.seq_len = 3;
    sh.vocab = 7;
    case_in c = make_case(dtype::f32, sh, seed++);
    REQUIRE(dpo::parse_loss_type(type, &c.cfg.terms[0].type));
    c.cfg.use_weighting = std::string(type) == "sigmoid";  // WPO weights: not with aot
    INFO("300 pairs, " << type);
    compare(c);
  }
}

TEST_CASE("cuda: dpo_loss from sequence log-probs matches the CPU path", "[cuda][small]") {
  std::mt19937_64 rng(77);
  std::normal_distribution<double> nd(-40.0, 8.0);
  std::uniform_real_distribution<double> ud(1.0, 30.0);
  int k = 0;
  for (const named_config& nc : every_loss()) {
    INFO("config " << nc.name);
    dpo_cuda_test::loss_case lc;
    lc.cfg = nc.cfg;
    const std::int64_t P = 7;
    for (std::int64_t i = 0; i < P; ++i) {
      lc.chosen.push_back(nd(rng));
      lc.rejected.push_back(nd(rng));
      lc.ref_chosen.push_back(nd(rng));
      lc.ref_rejected.push_back(nd(rng));
      lc.chosen_tokens.push_back(std::round(ud(rng)));
      lc.rejected_tokens.push_back(std::round(ud(rng)));
      lc.weights.push_back(ud(rng) / 30.0);
    }
    if (k % 3 == 1) lc.weights.clear();
    if (k % 3 == 2) lc.chosen_tokens.clear();
    if (nc.name == "sigmoid+wpo" || nc.name == "aot" || nc.name == "aot_unpaired") lc.weights.clear();
    ++k;
    const dpo::pair_logps_in in = dpo::make_pair_logps(
        P, lc.chosen.data(), lc.rejected.data(), lc.ref_chosen.data(), lc.ref_rejected.data(),
        lc.chosen_tokens.empty() ? nullptr : lc.chosen_tokens.data(), lc.rejected_tokens.data(),
        lc.weights.empty() ? nullptr : lc.weights.data());
    const dpo::cpu::forward_result f = dpo::cpu::dpo_loss(in, nc.cfg);
    const case_out g = dpo_cuda_test::run_dpo_loss(lc);
    INFO(g.message);
    REQUIRE(g.status_code == 0);
    CHECK(g.device_error == 0);
    check_pair_results(g, f, 1e-12, false, false);
  }
}

TEST_CASE("cuda: the API runs inside CUDA graph capture", "[cuda][small]") {
  CHECK(dpo_cuda_test::graph_capture_check() == "");
}

TEST_CASE("cuda: bad arguments are rejected before any launch", "[cuda][small]") {
  const auto expect_rejected = [](case_in c, const char* needle) {
    const case_out g = dpo_cuda_test::run_case(c);
    INFO(g.message);
    CHECK(g.status_code != 0);
    CHECK(g.message.find(needle) != std::string::npos);
    CHECK(g.outputs_untouched);
  };
  shape sh;
  const case_in base = make_case(dtype::bf16, sh, 11);
  // Each row: one argument broken on a copy of `base`, and what the message must name.
  const std::pair<void (*)(case_in&), const char*> broken[] = {
      {[](case_in& c) { c.num_seqs = 5; }, "odd"},
      {[](case_in& c) { c.null_labels = true; }, "labels is null"},
      {[](case_in& c) { c.null_ref = true; }, "ref_chosen_logps is null"},
      {[](case_in& c) { c.cfg.beta = -1.0; }, "beta"},
      {[](case_in& c) { c.small_workspace = true; }, "workspace_bytes"},
      {[](case_in& c) { c.grad_overlaps = true; }, "aliasing"},
      {[](case_in& c) { c.grad_stride = c.vocab - 1; }, "grad.chosen_stride"},
  };
  for (const auto& b : broken) {
    case_in c = base;
    b.first(c);
    expect_rejected(c, b.second);
  }
  {
    shape p = sh;
    p.packed = true;
    case_in c = make_case(dtype::bf16, p, 12);
    c.give_num_rows = false;
    expect_rejected(c, "num_rows");
  }
}

TEST_CASE("cuda: row state is refused where the sides would share its entries", "[cuda][small]") {
  // row_lse / row_coef are indexed by the logits buffer's row: separate_pairs over one
  // buffer's rows (each side with its own labels) would write and read both sides' state in
  // the same entries, and dpo_backward_rows with two buffers would read one side's state for
  // the other (a silent wrong gradient before these checks).
  const dpo_cuda_test::row_state_out r = dpo_cuda_test::row_state_errors();
  for (const std::string& m : {r.forward_shared, r.forward_backward_shared, r.rows_shared}) {
    INFO(m);
    CHECK(m.find("share rows") != std::string::npos);
  }
  INFO(r.rows_separate);
  CHECK(r.rows_separate.find("row_lse / row_coef need one logits buffer") != std::string::npos);
  CHECK(r.untouched);
}

TEST_CASE("cuda: forward outputs may overlap neither each other nor the inputs", "[cuda][small]") {
  // out.losses on out.chosen_rewards returned the rewards as the losses, silently; an output on
  // the reference log-probs or the logits corrupted what the kernels read later. The rule of
  // dpo::cpu (dpo::detail::check_forward_outputs), before anything is launched.
  const dpo_cuda_test::output_alias_out r = dpo_cuda_test::output_alias_errors();
  REQUIRE(r.cases.size() == 15);
  test_support::check_alias_cases(r.cases);  // "call: A on B": the message names both A and B
  CHECK(r.untouched);
  INFO(r.loss_in_place);
  CHECK(r.loss_in_place.empty());
}

TEST_CASE("cuda: logits gradients and sequence log-probs may not overlap what the call reads", "[cuda][small]") {
  // A gradient over the labels, cu_seqlens, row state, seq_grad, grad_output, the reference
  // log-probs or the workspace's forward state overwrote what the kernels still read (the
  // emulator crashed); sequence_logps / pair_logps outputs were not checked at all.
  const dpo_cuda_test::output_alias_out r = dpo_cuda_test::logits_alias_errors();
  REQUIRE(r.cases.size() == 20);
  test_support::check_alias_cases(r.cases);
  CHECK(r.untouched);
  INFO(r.loss_in_place);
  CHECK(r.loss_in_place.empty());
}

TEST_CASE("cuda: a NaN grad_output gives NaN on completion rows and zeros on masked rows", "[cuda][small]") {
  // grad_output is a device scalar the host cannot check: it propagates, as through a torch op,
  // the same way in dpo_backward and dpo_backward_rows (dpo_backward gave masked rows NaN).
  shape sh;
  sh.pairs = 2;
  sh.seq_len = 5;
  sh.vocab = 7;
  for (const mode m : {mode::forward_then_backward, mode::backward_rows}) {
    case_in c = make_case(dtype::f32, sh, 77);
    c.run = m;
    c.in_place = true;  // the gradient in the logits' rows
    c.grad_output = std::numeric_limits<double>::quiet_NaN();
    const case_out g = dpo_cuda_test::run_case(c);
    INFO("mode " << static_cast<int>(m) << ": " << g.message);
    REQUIRE(g.status_code == 0);
    int masked_rows = 0, counted_rows = 0;
    for (std::int64_t r = 0; r < c.rows; ++r) {
      const bool masked = c.labels[static_cast<std::size_t>(r)] == -100;
      (masked ? masked_rows : counted_rows) += 1;
      for (std::int64_t k = 0; k < c.vocab; ++k) {
        const double x = get(dtype::f32, g.grad.data() + (r * c.row_stride + k) * 4);
        if (masked)
          CHECK(x == 0.0);
        else
          CHECK(std::isnan(x));
      }
    }
    CHECK(masked_rows > 0);
    CHECK(counted_rows > 0);
  }
}

TEST_CASE("cuda: the argument checks return the core's messages", "[cuda][small]") {
  // dpo/core/check.hpp words every check once: the status is "dpo: " + the core's message
  // under the CUDA policy, the same words the CPU throws (tests/test_core_check.cpp).
  const std::int64_t P = 2, T = 3, V = 4, S = 5, rows = 2 * P * T;
  std::vector<float> logits(rows * S, 0.5f), grad(rows * S, 0.0f);
  std::vector<std::int64_t> labels(rows, 1), cu = {0, 2, 5, 6, 9};
  using view_t = dpo::pair_view<float, std::int64_t>;
  const view_t padded = dpo::padded_pairs(logits.data(), labels.data(), 2 * P, T, V, S);
  const view_t packed = dpo::packed_pairs(logits.data(), labels.data(), cu.data(), 2 * P, V, S);
  const dpo::detail::check_policy cuda = dpo::detail::cuda_policy(rows, true);
  const auto expect_core = [&](const view_t& v, const dpo::pair_grad_view<float>* g,
                               const std::string& core, const char* needle) {
    INFO("core: " << core);
    CHECK(core.find(needle) != std::string::npos);
    const std::string status = dpo_cuda_test::check_message(v, g, rows);
    INFO("status: " << status);
    CHECK(status == "dpo: " + core);
  };
  {
    view_t v = padded;
    v.concatenated_seqs = 3;
    expect_core(v, nullptr, dpo::detail::check_pairs(v, "logits", cuda), "num_seqs = 3 is odd");
  }
  {
    view_t v = padded;
    v.rejected.vocab = 3;
    expect_core(v, nullptr, dpo::detail::check_pairs(v, "logits", cuda),
                "chosen.vocab = 4 != rejected.vocab = 3");
  }
  {
    view_t v = padded;
    v.chosen.row_stride = 3;
    expect_core(v, nullptr, dpo::detail::check_pairs(v, "logits", cuda), "row_stride = 3");
  }
  {
    view_t v = padded;
    v.rejected.seq_stride = 2;
    expect_core(v, nullptr, dpo::detail::check_pairs(v, "logits", cuda), "seq_stride = 2");
  }
  {
    view_t v = packed;
    v.rejected.labels = nullptr;
    expect_core(v, nullptr, dpo::detail::check_pairs(v, "logits", cuda),
                "logits.rejected.labels is null");
  }
  {
    dpo::pair_grad_view<float> g{grad.data(), 3, grad.data(), S};
    expect_core(padded, &g, dpo::detail::check_grad(padded, g, cuda), "grad.chosen_stride = 3");
  }
  {
    dpo::pair_grad_view<float> g{logits.data() + 1, S, logits.data() + 1, S};
    expect_core(padded, &g, dpo::detail::check_grad(padded, g, cuda), "unsupported aliasing");
  }
  {
    // One packed buffer, in place: the sides' sequence ranges are disjoint.
    dpo::pair_grad_view<float> g{logits.data(), S, logits.data(), S};
    CHECK(dpo_cuda_test::check_message(packed, &g, rows) == "");
    CHECK(dpo::detail::check_grad(packed, g, cuda) == "");
  }
}

TEST_CASE("cuda: invalid device data is reported and nothing is written", "[cuda][small]") {
  shape sh;
  {
    case_in c = make_case(dtype::bf16, sh, 21);
    c.labels[5] = c.vocab;  // out of range
    c.labels[9] = -7;
    for (mode m : {mode::forward_backward, mode::sequence_logps, mode::pair_logps}) {
      for (bool in_place : {false, true}) {
        c.run = m;
        c.in_place = in_place;
        const case_out g = dpo_cuda_test::run_case(c);
        INFO(g.device_message);
        CHECK(g.status_code == 0);
        CHECK(g.device_error == 1);
        CHECK(g.device_message.find("labels[5]") != std::string::npos);
        CHECK(g.outputs_untouched);
      }
    }
  }
  {
    shape p = sh;
    p.packed = true;
    case_in c = make_case(dtype::f32, p, 22);
    std::swap(c.cu_seqlens[2], c.cu_seqlens[3]);
    const case_out g = dpo_cuda_test::run_case(c);
    CHECK(g.device_error == 3);
    CHECK(g.outputs_untouched);
    case_in d = make_case(dtype::f32, p, 23);
    d.cu_seqlens.back() = d.rows + 1;
    const case_out h = dpo_cuda_test::run_case(d);
    CHECK(h.device_error == 4);
    CHECK(h.outputs_untouched);
  }
  for (int fill : {0xa5, 0x00, 0xff}) {
    // A workspace that never saw dpo_forward, whatever it holds (torch.zeros, cudaMemset 0).
    INFO("workspace filled with " << fill);
    case_in c = make_case(dtype::bf16, sh, 24);
    c.run = mode::backward_only;
    c.workspace_fill = fill;
    const case_out g = dpo_cuda_test::run_case(c);
    CHECK(g.device_error == 5);
    CHECK(g.outputs_untouched);
  }
}

TEST_CASE("cuda: the reference-logits overloads match the CPU path", "[cuda][small]") {
  dpo::loss_config ld;
  ld.ld_alpha = 0.4;
  dpo::loss_config wpo;
  wpo.use_weighting = true;
  dpo::loss_config rf = dpo::loss_config::of(dpo::loss_type::hinge);
  rf.reference_free = true;
  const named_config configs[] = {{"sigmoid", dpo::loss_config{}},
                                  {"sigmoid+ld", ld},
                                  {"sigmoid+wpo", wpo},
                                  {"hinge+reference_free", rf},
                                  {"simpo", dpo::loss_config::of(dpo::loss_type::simpo)}};
  unsigned seed = 800;
  for (const named_config& nc : configs) {
    for (dtype t : {dtype::bf16, dtype::f32}) {
      for (bool packed : {false, true}) {
        for (mode m : {mode::forward_backward, mode::forward_then_backward, mode::forward_only}) {
          INFO("config " << nc.name << " dtype " << static_cast<int>(t) << " packed " << packed
                         << " mode " << static_cast<int>(m));
          shape sh;
          sh.vocab = 1031;
          sh.pad = packed ? 0 : 3;
          sh.packed = packed;
          sh.with_mask = packed;
          case_in c = make_case(t, sh, seed++);
          c.cfg = nc.cfg;
          c.run = m;
          c.in_place = m == mode::forward_backward;
          c.ref_logits = random_logits(c, seed++);
          c.ref_chosen.clear();  // only the reference logits
          c.ref_rejected.clear();
          compare(c);
        }
      }
    }
  }
  {
    // The reference may be the policy's own buffer (then every reward is 0), and may have
    // labels of its own.
    shape sh;
    sh.vocab = 257;
    case_in c = make_case(dtype::bf16, sh, seed++);
    c.ref_logits = c.logits;
    const case_out g = compare(c);
    for (double r : g.chosen_rewards) CHECK(r == 0.0);
    c.ref_labels = make_case(dtype::bf16, sh, seed++).labels;
    compare(c);
  }
}

TEST_CASE("cuda: fp32 reference logits for a bf16 policy are read as fp32", "[cuda][small]") {
  // The mixed-dtype overloads: values bf16 cannot hold, so a reference pass that rounded them
  // to the policy's dtype would be off by far more than the tolerance.
  unsigned seed = 870;
  for (bool packed : {false, true}) {
    for (mode m : {mode::forward_backward, mode::forward_then_backward, mode::forward_only}) {
      INFO("packed " << packed << " mode " << static_cast<int>(m));
      shape sh;
      sh.vocab = 1031;
      sh.pad = packed ? 0 : 3;
      sh.packed = packed;
      case_in c = make_case(dtype::bf16, sh, seed++);
      c.run = m;
      c.in_place = m == mode::forward_backward;
      c.ref_f32 = true;
      case_in f32 = c;
      f32.type = dtype::f32;
      f32.logits.resize(c.logits.size() / 2 * 4);  // random_logits sizes its output by this
      c.ref_logits = random_logits(f32, seed++);
      c.ref_chosen.clear();
      c.ref_rejected.clear();
      const case_out g = compare(c);
      // Against the reference log-probs of the fp32 logits themselves, through the CPU's
      // pair_logps of a float view: the rewards' reference parts agree to fp32 rounding.
      case_in rc = f32;
      rc.logits = c.ref_logits;
      rc.ref_f32 = false;
      rc.run = mode::pair_logps;
      rc.ld_alpha = 1.0;
      const case_out ref = dpo_cuda_test::run_case(rc);
      const std::int64_t P = c.num_seqs / 2;
      REQUIRE(ref.sums.size() == static_cast<std::size_t>(2 * P));
      for (std::int64_t i = 0; i < P; ++i) {
        const double beta = c.cfg.beta;
        CHECK(g.chosen_rewards[i] == Approx(beta * (g.chosen_logps[i] - ref.sums[i])).epsilon(1e-5).margin(1e-6));
        CHECK(g.rejected_rewards[i] ==
              Approx(beta * (g.rejected_logps[i] - ref.sums[P + i])).epsilon(1e-5).margin(1e-6));
      }
    }
  }
}

TEST_CASE("cuda: the reference-logits overloads' argument and data errors", "[cuda][small]") {
  shape sh;
  case_in base = make_case(dtype::bf16, sh, 31);
  base.ref_logits = random_logits(base, 32);
  for (mode m : {mode::forward_backward, mode::forward_only}) {
    INFO("mode " << static_cast<int>(m));
    base.run = m;
    const auto expect_rejected = [](const case_in& c, const char* needle) {
      const case_out g = dpo_cuda_test::run_case(c);
      INFO(g.message);
      CHECK(g.status_code != 0);
      CHECK(g.message.find(needle) != std::string::npos);
      CHECK(g.outputs_untouched);
    };
    {
      case_in c = base;
      c.ref_num_seqs = base.num_seqs - 2;
      expect_rejected(c, "ref_logits.num_pairs = 2 != logits.num_pairs = 3");
    }
    {
      case_in c = base;
      c.ref_num_seqs = 5;
      expect_rejected(c, "ref_logits.num_seqs = 5 is odd");
    }
    {
      case_in c = base;
      c.null_ref = true;
      expect_rejected(c, "ref_logits.chosen.logits is null");
    }
    {
      case_in c = base;
      c.cfg.beta = std::nan("");
      expect_rejected(c, "beta");
    }
    {
      case_in c = base;
      c.small_workspace = true;
      expect_rejected(c, "workspace_bytes");
    }
    if (m == mode::forward_backward) {
      case_in c = base;
      c.grad_overlaps = true;
      expect_rejected(c, "aliasing");
    }
    for (bool policy_too : {false, true}) {
      // A label of the reference's rejected side out of range: reported as the reference's
      // (before any error of the policy), and nothing is written.
      case_in c = base;
      c.ref_labels = c.labels;
      const std::int64_t row = c.seq_len * (c.num_seqs / 2) + 4;  // rejected side
      c.ref_labels[row] = c.vocab + 3;
      if (policy_too) c.labels[2] = -5;
      for (bool in_place : {false, true}) {
        c.in_place = in_place;
        const case_out g = dpo_cuda_test::run_case(c);
        INFO(g.device_message);
        CHECK(g.status_code == 0);
        CHECK(g.device_error == 1);
        CHECK(g.device_message.find("ref_logits.rejected.labels[" + std::to_string(row) + "]") !=
              std::string::npos);
        CHECK(g.outputs_untouched);
      }
    }
    {
      // Valid reference, invalid policy: the policy's error, as without reference logits.
      case_in c = base;
      c.labels[5] = c.vocab;
      c.ref_labels = base.labels;
      const case_out g = dpo_cuda_test::run_case(c);
      INFO(g.device_message);
      CHECK(g.device_error == 1);
      CHECK(g.device_message.find("dpo: chosen.labels[5]") != std::string::npos);
      CHECK(g.outputs_untouched);
    }
  }
}

TEST_CASE("cuda: rows x vocab beyond 2^31 elements", "[cuda][large]") {
  dpo_cuda_test::large_out o;
  if (!dpo_cuda_test::run_large(&o)) {
    WARN("SKIPPED: not enough free device memory for the 2^31 case");
    return;
  }
  const std::int64_t V = o.vocab, T = o.seq_len, P = o.num_seqs / 2;
  // The last sequence (rows past 2^31 elements) on the CPU.
  const auto* z = reinterpret_cast<const Eigen::bfloat16*>(o.seq_logits.data());
  const std::int64_t s = o.num_seqs - 1;
  dpo::token_view<Eigen::bfloat16, std::int64_t> v;
  v.logits = z;
  v.labels = o.labels.data() + s * T;
  v.vocab = V;
  v.row_stride = V;
  v.num_seqs = 1;
  v.seq_len = T;
  double sum = 0;
  std::int64_t count = 0;
  dpo::cpu::sequence_logps(v, &sum, &count);
  CHECK(o.sums[s] == Approx(sum).epsilon(2e-5));
  CHECK(o.rejected_logps[P - 1] == Approx(sum).epsilon(2e-5));
  // Pair stage on the GPU's log-probs.
  dpo::cpu::pair_logps_in pin;
  pin.num_pairs = P;
  pin.chosen_logps = o.chosen_logps.data();
  pin.rejected_logps = o.rejected_logps.data();
  pin.ref_chosen_logps = o.ref_chosen.data();
  pin.ref_rejected_logps = o.ref_rejected.data();
  const dpo::cpu::forward_result f = dpo::cpu::dpo_loss(pin, dpo::loss_config{});
  CHECK(o.loss == Approx(f.loss).epsilon(1e-9));
  for (std::int64_t i = 0; i < P; ++i) {
    CHECK(o.grad_chosen[i] == Approx(f.grad_chosen[i]).epsilon(1e-9));
    CHECK(o.grad_rejected[i] == Approx(f.grad_rejected[i]).epsilon(1e-9));
  }
  // Gradient rows, in place: coef * (onehot - softmax) from the logits copied before.
  for (std::size_t k = 0; k < o.checked_rows.size(); ++k) {
    const std::int64_t r = o.checked_rows[k];
    const std::int64_t seq = r / T;
    const double coef = seq < P ? o.grad_chosen[seq] : o.grad_rejected[seq - P];
    const std::int64_t y = o.labels[r];
    double m = -INFINITY, se = 0;
    std::vector<double> x(static_cast<std::size_t>(V));
    for (std::int64_t c = 0; c < V; ++c) {
      x[c] = bf16_bits(o.logits_rows[k * V + c]);
      m = std::max(m, x[c]);
    }
    for (double xi : x) se += std::exp(xi - m);
    const double lse = m + std::log(se);
    double num = 0, den = 0;
    for (std::int64_t c = 0; c < V; ++c) {
      const double expect = y < 0 ? 0.0 : coef * ((c == y ? 1.0 : 0.0) - std::exp(x[c] - lse));
      const double got = bf16_bits(o.grad_rows[k * V + c]);
      num += (got - expect) * (got - expect);
      den += expect * expect;
    }
    INFO("row " << r);
    CHECK(std::sqrt(num) <= 1e-2 * std::sqrt(den) + 1e-30);
  }
}

TEST_CASE("cuda: sanitizer subset", "[cuda][sanitize]") {
  // Few, small launches covering every kernel and access pattern: what scripts/gpu_check.sh
  // runs under compute-sanitizer memcheck and racecheck.
  shape a;
  a.vocab = 1031;
  a.pad = 3;
  a.packed = true;
  a.with_mask = true;
  case_in c = make_case(dtype::bf16, a, 901);
  c.in_place = true;
  c.cfg.ld_alpha = 0.5;
  compare(c);
  shape b;
  b.vocab = 7;
  b.pad = 1;
  case_in d = make_case(dtype::f32, b, 902);
  d.labels64 = false;
  d.cfg = dpo::loss_config::of(dpo::loss_type::aot);
  d.cfg.label_smoothing = 0.1;
  d.run = mode::forward_then_backward;
  compare(d);
  case_in e = make_case(dtype::f64, b, 903);
  e.cfg.use_weighting = true;
  compare(e);
  case_in f = make_case(dtype::f16, a, 904);
  f.run = mode::sequence_logps;
  compare(f);
  f.run = mode::pair_logps;
  f.ld_alpha = 0.25;
  compare(f);
  case_in r = make_case(dtype::bf16, a, 906);  // the reference-logits overload, fused
  r.in_place = true;
  r.cfg.ld_alpha = 0.5;
  r.ref_logits = random_logits(r, 907);
  compare(r);
  case_in g = make_case(dtype::bf16, b, 905);
  g.labels[3] = g.vocab + 5;
  const case_out bad = dpo_cuda_test::run_case(g);
  CHECK(bad.device_error == 1);
  CHECK(bad.outputs_untouched);
  g.ref_logits = random_logits(g, 908);  // the same error in the reference's labels
  g.ref_labels = g.labels;
  g.labels[3] = 0;
  const case_out bad_ref = dpo_cuda_test::run_case(g);
  CHECK(bad_ref.device_error == 1);
  CHECK(bad_ref.device_message.find("ref_logits.chosen.labels[3]") != std::string::npos);
  CHECK(bad_ref.outputs_untouched);
  g.ref_logits.clear();
  g.ref_labels.clear();
  g.run = mode::backward_only;
  g.labels[3] = 0;
  CHECK(dpo_cuda_test::run_case(g).device_error == 5);
  dpo_cuda_test::loss_case lc;
  lc.cfg = dpo::loss_config::of(dpo::loss_type::aot_unpaired);
  lc.chosen = {-10, -12, -9};
  lc.rejected = {-11, -10, -13};
  lc.ref_chosen = {-10.5, -11, -9};
  lc.ref_rejected = {-10, -12, -12};
  const case_out l = dpo_cuda_test::run_dpo_loss(lc);
  CHECK(l.status_code == 0);
  CHECK(std::isfinite(l.loss));
}

namespace {

/// make_case's sequences laid out for run_sequence_case with poison around them: padded
/// sequences `gap` rows apart (seq_stride = seq_len + gap), packed ones from row `gap` on.
/// Rows outside every sequence hold NaN logits (0xff bytes) and labels outside [0, vocab) or
/// ignore_index, alternately (a kernel reading the first reports a label error, one treating
/// the second as a masked row of a sequence writes zeros there).
case_in make_sequence_case(dtype t, bool packed, std::int64_t gap, unsigned seed, std::int64_t* seq_stride) {
  shape sh;
  sh.packed = packed;
  sh.vocab = 67;
  sh.pad = 2;
  sh.with_mask = seed % 2 == 0;
  case_in c = make_case(t, sh, seed);
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  const std::size_t row_bytes = static_cast<std::size_t>(c.row_stride) * es;
  std::vector<std::int64_t> src_row, dst_row;  // sequence rows: where from, where to
  std::int64_t rows = 0;
  if (packed) {
    for (std::int64_t r = c.cu_seqlens.front(); r < c.cu_seqlens.back(); ++r) {
      src_row.push_back(r);
      dst_row.push_back(r + gap);
    }
    for (auto& x : c.cu_seqlens) x += gap;
    rows = c.cu_seqlens.back() + gap;
    *seq_stride = 0;
  } else {
    *seq_stride = c.seq_len + gap;
    for (std::int64_t s = 0; s < c.num_seqs; ++s)
      for (std::int64_t k = 0; k < c.seq_len; ++k) {
        src_row.push_back(s * c.seq_len + k);
        dst_row.push_back(s * *seq_stride + k);
      }
    rows = c.num_seqs * *seq_stride;
  }
  std::vector<unsigned char> logits(static_cast<std::size_t>(rows) * row_bytes, 0xff);
  std::vector<std::int64_t> labels(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) labels[r] = r % 2 ? c.vocab + 50 : c.ignore_index;
  std::vector<std::uint8_t> mask(c.mask.empty() ? 0 : static_cast<std::size_t>(rows), 1);
  for (std::size_t i = 0; i < src_row.size(); ++i) {
    std::memcpy(&logits[static_cast<std::size_t>(dst_row[i]) * row_bytes],
                &c.logits[static_cast<std::size_t>(src_row[i]) * row_bytes], row_bytes);
    labels[dst_row[i]] = c.labels[src_row[i]];
    if (!mask.empty()) mask[dst_row[i]] = c.mask[src_row[i]];
  }
  c.logits = logits;
  c.labels = labels;
  c.mask = mask;
  c.rows = rows;
  return c;
}

struct cpu_sequence_run {
  std::vector<double> sums, row_lse, grad;  // grad: rows * row_stride, decoded
  std::vector<std::int64_t> counts;
  std::vector<bool> in_seq;                 // per row: owned by a sequence
};

template <class E>
cpu_sequence_run run_cpu_sequence_typed(const case_in& c, std::int64_t seq_stride, const std::vector<double>& g) {
  cpu_sequence_run out;
  dpo::token_view<E, std::int64_t> v;
  v.logits = reinterpret_cast<const E*>(c.logits.data());
  v.labels = c.labels.data();
  v.mask = c.mask.empty() ? nullptr : c.mask.data();
  v.cu_seqlens = c.cu_seqlens.empty() ? nullptr : c.cu_seqlens.data();
  v.vocab = c.vocab;
  v.row_stride = c.row_stride;
  v.num_seqs = c.num_seqs;
  v.seq_len = c.seq_len;
  v.seq_stride = seq_stride;
  v.ignore_index = c.ignore_index;
  out.sums.resize(static_cast<std::size_t>(c.num_seqs));
  out.counts.resize(out.sums.size());
  out.row_lse.assign(static_cast<std::size_t>(c.rows), 0.0);
  dpo::cpu::sequence_logps(v, out.sums.data(), out.counts.data(), nullptr, out.row_lse.data());
  std::vector<E> grad(static_cast<std::size_t>(c.rows * c.row_stride), E(0.0f));
  dpo::cpu::sequence_logps_backward(v, out.row_lse.data(), g.data(), grad.data(), c.row_stride);
  for (const E& x : grad) out.grad.push_back(static_cast<double>(x));
  out.in_seq.assign(static_cast<std::size_t>(c.rows), false);
  for (std::int64_t s = 0; s < v.num_seqs; ++s)
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) out.in_seq[r] = true;
  return out;
}

cpu_sequence_run run_cpu_sequence(const case_in& c, std::int64_t seq_stride, const std::vector<double>& g) {
  switch (c.type) {
    case dtype::bf16: return run_cpu_sequence_typed<Eigen::bfloat16>(c, seq_stride, g);
    case dtype::f16: return run_cpu_sequence_typed<Eigen::half>(c, seq_stride, g);
    case dtype::f32: return run_cpu_sequence_typed<float>(c, seq_stride, g);
    case dtype::f64: return run_cpu_sequence_typed<double>(c, seq_stride, g);
  }
  return {};
}

void compare_sequence(const case_in& c, std::int64_t seq_stride) {
  std::vector<double> g;
  for (std::int64_t s = 0; s < c.num_seqs; ++s) g.push_back(s == 2 ? 0.0 : (s % 2 ? -0.6 : 1.3) / (1.0 + s));
  const dpo_cuda_test::sequence_out d = dpo_cuda_test::run_sequence_case(c, seq_stride, g);
  INFO(d.message << d.device_message);
  REQUIRE(d.status_code == 0);
  REQUIRE(d.device_error == 0);
  const cpu_sequence_run h = run_cpu_sequence(c, seq_stride, g);
  const double tol = value_tol(c.type);
  for (std::size_t s = 0; s < h.sums.size(); ++s) {
    CHECK(d.sums[s] == Approx(h.sums[s]).epsilon(tol).margin(tol));
    CHECK(d.counts[s] == h.counts[s]);
  }
  for (std::int64_t r = 0; r < c.rows; ++r) {
    if (h.in_seq[r]) {
      CHECK(d.row_lse[r] == Approx(h.row_lse[r]).epsilon(tol).margin(tol));
    } else {
      CHECK(std::isnan(d.row_lse[r]));  // not written
    }
  }
  check_grad_buffer(c, d.grad, h.grad, [&](std::int64_t r) { return h.in_seq[r]; });
}

}  // namespace

TEST_CASE("cuda: sequence_logps row_lse and sequence_logps_backward match the CPU path", "[cuda][small]") {
  unsigned seed = 1200;
  for (dtype t : {dtype::bf16, dtype::f16, dtype::f32, dtype::f64}) {
    for (bool packed : {false, true}) {
      for (std::int64_t gap : {0, 2}) {
        for (bool in_place : {false, true}) {
          std::int64_t seq_stride = 0;
          case_in c = make_sequence_case(t, packed, gap, ++seed, &seq_stride);
          c.in_place = in_place;
          c.labels64 = seed % 3 != 0;
          INFO("dtype " << static_cast<int>(t) << (packed ? " packed" : " padded") << " gap " << gap
                        << (in_place ? " in place" : "") << " labels" << (c.labels64 ? 64 : 32));
          compare_sequence(c, seq_stride);
        }
      }
    }
  }
}

TEST_CASE("cuda: sequence_logps_backward argument and data errors", "[cuda][small]") {
  std::int64_t seq_stride = 0;
  case_in c = make_sequence_case(dtype::f32, false, 1, 1300, &seq_stride);
  const std::vector<double> g(static_cast<std::size_t>(c.num_seqs), 1.0);
  {
    const dpo_cuda_test::sequence_out d = dpo_cuda_test::run_sequence_case(c, c.seq_len - 1, g);
    CHECK(d.status_code != 0);
    CHECK(d.message.find("seq_stride") != std::string::npos);
  }
  {
    case_in e = c;
    e.grad_stride = e.vocab - 1;
    const dpo_cuda_test::sequence_out d = dpo_cuda_test::run_sequence_case(e, seq_stride, g);
    CHECK(d.status_code != 0);
    CHECK(d.message.find("grad_stride") != std::string::npos);
  }
  {
    case_in e = c;
    e.small_workspace = true;
    CHECK(dpo_cuda_test::run_sequence_case(e, seq_stride, g).status_code != 0);
  }
  {
    // A bad label inside a sequence is found (the gap rows' labels are all out of range).
    case_in e = c;
    e.labels[static_cast<std::size_t>(seq_stride + 1)] = e.vocab + 5;
    const dpo_cuda_test::sequence_out d = dpo_cuda_test::run_sequence_case(e, seq_stride, g);
    CHECK(d.device_error == 1);
    for (unsigned char b : d.grad) CHECK(b == 0xff);
  }
}

TEST_CASE("cuda: calls with nothing to compute leave this call's error word, not the workspace's",
          "[cuda][small]") {
  // sequence_logps of no sequence and sequence_logps_backward without rows launched nothing,
  // so read_device_error reported the workspace's old bytes (or the previous call's error).
  for (const bool backward : {false, true})
    for (const bool previous : {false, true}) {
      INFO("backward " << backward << ", previous error " << previous);
      CHECK(dpo_cuda_test::empty_call_error(backward, previous) == "");
    }
}

TEST_CASE("cuda: the pair entry points on padded views with gaps match the CPU path", "[cuda][small]") {
  // Row kernels (rows, row state, both backward kernels) must skip the gap rows, which hold
  // NaN logits and out-of-range labels, and leave the gradient there untouched.
  unsigned seed = 1400;
  for (dtype t : {dtype::bf16, dtype::f32}) {
    for (mode m : {mode::forward_backward, mode::forward_then_backward, mode::backward_rows}) {
      for (bool in_place : {false, true}) {
        std::int64_t seq_stride = 0;
        case_in c = make_sequence_case(t, false, 2, ++seed, &seq_stride);
        c.seq_stride = seq_stride;
        c.run = m;
        c.in_place = in_place;
        c.grad_output = 0.75;
        c.cfg.ld_alpha = 0.5;
        INFO("dtype " << static_cast<int>(t) << " mode " << static_cast<int>(m) << (in_place ? " in place" : ""));
        const both_runs both = run_both(c);
        const case_out& g = both.gpu;
        const cpu_run& cpu = both.cpu;
        const double tol = both.tol;
        INFO(g.message << g.device_message);
        CHECK(g.loss == Approx(cpu.fwd.loss).epsilon(tol).margin(tol));
        check_close(g.chosen_logps, cpu.fwd.chosen_logps, tol, "chosen_logps");
        check_close(g.rejected_logps, cpu.fwd.rejected_logps, tol, "rejected_logps");
        check_close(g.grad_chosen, cpu.fwd.grad_chosen, tol, "grad_chosen");
        check_grad_buffer(c, g.grad, cpu.grad,
                          [&](std::int64_t r) { return r % seq_stride < c.seq_len; });
      }
    }
  }
}

namespace {

/// One pair of one-row sequences whose rows hold four tied maxima at `big` (columns 0, 2, 3,
/// 5 of 7, the others |big| lower): chosen labelled at column 2, rejected at 0.
case_in tied_maxima_case(dtype t, double big) {
  case_in c;
  c.type = t;
  c.num_seqs = 2;
  c.seq_len = 1;
  c.vocab = 7;
  c.row_stride = 8;
  c.rows = 2;
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  c.logits.assign(static_cast<std::size_t>(c.rows * c.row_stride) * es, 0);
  for (std::int64_t r = 0; r < 2; ++r)
    for (std::int64_t v = 0; v < c.row_stride; ++v) {
      const bool max = v == 0 || v == 2 || v == 3 || v == 5;
      const double x = v >= c.vocab ? 0.0 : max ? big : big - std::fabs(big) * (big > 0 ? 2 : 1);
      put(t, c.logits.data() + static_cast<std::size_t>(r * c.row_stride + v) * es, x);
    }
  c.labels = {2, 0};
  c.ref_chosen = {0.0};
  c.ref_rejected = {0.0};
  c.cfg = dpo::loss_config::of(dpo::loss_type::sft);
  c.grad_stride = c.row_stride + 1;
  c.grad_offset = 1;
  return c;
}

double tied_tol(dtype t) {
  switch (t) {
    case dtype::f64: return 1e-14;
    case dtype::f32: return 2e-6;
    default: return 4e-3;
  }
}

/// Row r of a gradient buffer as the harness returns it: coef * (onehot(label) - softmax),
/// i.e. coef * 0.75 at the label, -coef * 0.25 at the other maxima, 0 elsewhere, sum 0.
void check_tied_grad(const case_in& c, const std::vector<unsigned char>& grad, std::int64_t r,
                     std::int64_t label, double coef) {
  const std::size_t es = dpo_cuda_test::dtype_size(c.type);
  const std::int64_t stride = c.in_place ? c.row_stride : c.grad_stride;
  const std::int64_t offset = c.in_place ? 0 : c.grad_offset;
  const double tol = tied_tol(c.type) * std::fabs(coef);
  double sum = 0;
  for (std::int64_t v = 0; v < c.vocab; ++v) {
    const double g = get(c.type, grad.data() + static_cast<std::size_t>(offset + r * stride + v) * es);
    const bool max = v == 0 || v == 2 || v == 3 || v == 5;
    const double want = coef * ((v == label ? 1.0 : 0.0) - (max ? 0.25 : 0.0));
    INFO("row " << r << " column " << v << ": got " << g << " want " << want);
    CHECK(std::fabs(g - want) <= tol);
    sum += g;
  }
  INFO("row " << r << " sum " << sum);
  CHECK(std::fabs(sum) <= 4 * tol);
}

}  // namespace

TEST_CASE("cuda: tied maxima at large magnitudes give exact log-probs and gradients", "[cuda][small][issue16]") {
  // The label log-prob is log 0.25 and the gradient of -logp is -0.75 at the label, 0.25 at
  // the other maxima, at any magnitude (torch.log_softmax's answers): the forward forms
  // (z - m) - log(s), the backward (z - hi) - lo from the stored double lse, recomputing the
  // row's statistics where a double lse is too coarse (fp64 at 1e17, fp32 at 1e30).
  const std::pair<dtype, std::vector<double>> cases[] = {
      {dtype::f32, {1e5, 1e7, -1e7, 1e30}},
      {dtype::f64, {1e5, 1e17, -1e17, 1e300}},
      {dtype::bf16, {1e4, 1e6, 1e30}},
      {dtype::f16, {1e4, 3e4, -3e4}}};
  const double log_quarter = std::log(0.25);
  for (const auto& tc : cases) {
    const double lp_tol = tc.first == dtype::f64 ? 1e-15 : 1e-6;
    for (double big : tc.second) {
      for (mode m : {mode::forward_backward, mode::forward_then_backward, mode::backward_rows}) {
        for (bool in_place : {false, true}) {
          INFO("dtype " << static_cast<int>(tc.first) << " maxima at " << big << " mode " << static_cast<int>(m)
                        << (in_place ? " in place" : ""));
          case_in c = tied_maxima_case(tc.first, big);
          c.run = m;
          c.in_place = in_place;
          const case_out g = dpo_cuda_test::run_case(c);
          INFO(g.message << g.device_message);
          REQUIRE(g.status_code == 0);
          REQUIRE(g.device_error == 0);
          CHECK(std::fabs(g.chosen_logps[0] - log_quarter) <= lp_tol);
          CHECK(std::fabs(g.rejected_logps[0] - log_quarter) <= lp_tol);
          CHECK(std::fabs(g.loss + log_quarter) <= lp_tol);
          // sft: dL/dlogp of the chosen token is -1 (grad_output 1 by default), rejected 0.
          check_tied_grad(c, g.grad, 0, 2, -1.0);
          check_tied_grad(c, g.grad, 1, 0, 0.0);
        }
      }
      INFO("dtype " << static_cast<int>(tc.first) << " maxima at " << big << " sequence_logps");
      case_in c = tied_maxima_case(tc.first, big);
      const dpo_cuda_test::sequence_out d = dpo_cuda_test::run_sequence_case(c, 0, {-1.0, 0.5});
      INFO(d.message << d.device_message);
      REQUIRE(d.status_code == 0);
      REQUIRE(d.device_error == 0);
      CHECK(std::fabs(d.sums[0] - log_quarter) <= lp_tol);
      CHECK(std::fabs(d.sums[1] - log_quarter) <= lp_tol);
      check_tied_grad(c, d.grad, 0, 2, -1.0);
      check_tied_grad(c, d.grad, 1, 0, 0.5);
    }
  }
}

TEST_CASE("cuda: a -inf rejected label logit gives the limit loss and a finite gradient", "[cuda][small][issue16]") {
  // pi_r = -inf: sigmoid's loss is -log_sigmoid(+inf) = 0 for that pair, with a zero
  // gradient, not 0 * inf = NaN; the CPU path gives the same.
  std::vector<named_config> configs = {{"sigmoid", dpo::loss_config{}}};
  dpo::loss_config wpo;
  wpo.use_weighting = true;
  configs.push_back({"sigmoid+wpo", wpo});
  dpo::loss_config fkl = dpo::loss_config::of(dpo::loss_type::sigmoid_norm);
  fkl.divergence = dpo::f_divergence::forward_kl;
  configs.push_back({"sigmoid_norm+forward_kl", fkl});
  configs.push_back({"aot+aot_unpaired", dpo::loss_config::combination(
                                             {{dpo::loss_type::aot, 0.5}, {dpo::loss_type::aot_unpaired, 1.0}})});
  unsigned seed = 1616;
  for (const named_config& nc : configs) {
    for (mode m : {mode::forward_backward, mode::backward_rows}) {
      INFO(nc.name << " mode " << static_cast<int>(m));
      shape sh;
      sh.pairs = 3;
      sh.vocab = 61;
      sh.fully_masked = false;
      case_in c = make_case(dtype::f32, sh, seed++);
      c.cfg = nc.cfg;
      c.run = m;
      // The first completion row of rejected sequence 1 (sequence P + 1): its label's logit.
      const std::int64_t s = sh.pairs + 1;
      std::int64_t row = -1;
      for (std::int64_t r = s * sh.seq_len; r < (s + 1) * sh.seq_len && row < 0; ++r)
        if (c.labels[r] >= 0) row = r;
      REQUIRE(row >= 0);
      put(c.type, c.logits.data() + static_cast<std::size_t>(row * c.row_stride + c.labels[row]) * 4, -INFINITY);
      const case_out g = compare(c, true);
      CHECK(g.rejected_logps[1] == -INFINITY);
      CHECK(std::isfinite(g.loss));
      test_support::check_pairs_finite(g.losses, g.grad_chosen, g.grad_rejected);
      if (nc.name == "sigmoid") {
        CHECK(g.losses[1] == 0.0);
        CHECK(g.grad_rejected[1] == 0.0);
      }
    }
  }
}

TEST_CASE("cuda: aot and aot_unpaired together match the CPU path and the sum of the terms, in either order",
          "[cuda][small][issue16]") {
  unsigned seed = 1617;
  const auto cfg = [](std::initializer_list<dpo::loss_term> terms) {
    dpo::loss_config c = dpo::loss_config::combination(terms);
    c.label_smoothing = 0.05;
    return c;
  };
  shape sh;
  sh.pairs = 4;
  sh.seq_len = 3;
  sh.vocab = 5;
  sh.fully_masked = false;
  for (dtype t : {dtype::f64, dtype::f32}) {
    case_in c = make_case(t, sh, seed++);
    c.cfg = cfg({{dpo::loss_type::aot, 1.0}});
    const double la = dpo_cuda_test::run_case(c).loss;
    c.cfg = cfg({{dpo::loss_type::aot_unpaired, 1.0}});
    const double lu = dpo_cuda_test::run_case(c).loss;
    for (bool swapped : {false, true}) {
      INFO("dtype " << static_cast<int>(t) << (swapped ? " aot_unpaired first" : " aot first"));
      c.cfg = swapped ? cfg({{dpo::loss_type::aot_unpaired, 0.4}, {dpo::loss_type::aot, 0.7}})
                      : cfg({{dpo::loss_type::aot, 0.7}, {dpo::loss_type::aot_unpaired, 0.4}});
      const case_out g = compare(c);
      CHECK(g.loss == Approx(0.7 * la + 0.4 * lu).epsilon(1e-12));
    }
  }
  // dpo_loss from sequence log-probs, weights given.
  dpo_cuda_test::loss_case lc;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(-40.0, 8.0);
  for (int i = 0; i < 9; ++i) {
    lc.chosen.push_back(nd(rng));
    lc.rejected.push_back(nd(rng));
    lc.ref_chosen.push_back(nd(rng));
    lc.ref_rejected.push_back(nd(rng));
    lc.weights.push_back(0.5 + 0.1 * i);
  }
  for (bool swapped : {false, true}) {
    INFO((swapped ? "dpo_loss, aot_unpaired first" : "dpo_loss, aot first"));
    lc.cfg = swapped ? cfg({{dpo::loss_type::aot_unpaired, 0.4}, {dpo::loss_type::aot, 0.7}})
                     : cfg({{dpo::loss_type::aot, 0.7}, {dpo::loss_type::aot_unpaired, 0.4}});
    const dpo::pair_logps_in in =
        dpo::make_pair_logps(static_cast<std::int64_t>(lc.chosen.size()), lc.chosen.data(), lc.rejected.data(),
                             lc.ref_chosen.data(), lc.ref_rejected.data(), nullptr, nullptr, lc.weights.data());
    const dpo::cpu::forward_result f = dpo::cpu::dpo_loss(in, lc.cfg);
    const case_out g = dpo_cuda_test::run_dpo_loss(lc);
    REQUIRE(g.status_code == 0);
    CHECK(g.loss == Approx(f.loss).epsilon(1e-12));
    check_close(g.losses, f.losses, 1e-12, "losses");
    check_close(g.grad_chosen, f.grad_chosen, 1e-12, "grad_chosen");
    check_close(g.grad_rejected, f.grad_rejected, 1e-12, "grad_rejected");
  }
}
