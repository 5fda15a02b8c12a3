// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Every rejected input of the CPU API throws dpo::error whose message names the argument,
// and nothing has been written to any output when it does (outputs start as a sentinel).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::layout;

namespace {

using buf_t = fixture::buffers<float, std::int64_t>;

oracle::batch small_batch(bool varying = false) {
  fixture::batch_spec sp = fixture::spec(2, 4, 5, 41);
  sp.varying_rows = varying;
  return fixture::rounded_random_batch<float>(sp);
}

/// One call of every output-writing entry point with the given arguments; each must throw
/// naming `needle` and leave its outputs (and the logits) exactly as they were.
struct scenario {
  dpo::pair_view<float, std::int64_t> view;
  dpo::loss_config cfg;
  const double* rc;
  const double* rr;
};

void expect_rejected(buf_t& buf, const scenario& s, const std::string& needle, bool check_sequence_logps = true) {
  const std::vector<float> logits0 = buf.logits, logits_r0 = buf.logits_r;
  auto unchanged = [&](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  };
  fixture::expect_error([&] { dpo::cpu::dpo_forward(s.view, s.rc, s.rr, s.cfg); }, needle);

  buf.reset_grad();
  const std::vector<float> g0 = buf.grad, gr0 = buf.grad_r;
  fixture::expect_error([&] { dpo::cpu::dpo_forward_backward(s.view, s.rc, s.rr, s.cfg, buf.grad_view()); }, needle);
  CHECK(unchanged(buf.grad, g0));
  CHECK(unchanged(buf.grad_r, gr0));
  // In place: the logits are the output.
  fixture::expect_error([&] { dpo::cpu::dpo_forward_backward(s.view, s.rc, s.rr, s.cfg, buf.inplace_view()); }, needle);
  CHECK(unchanged(buf.logits, logits0));
  CHECK(unchanged(buf.logits_r, logits_r0));

  if (check_sequence_logps) {
    std::vector<double> c(4, -7.0), r(4, -7.0);
    fixture::expect_error([&] { dpo::cpu::pair_logps(s.view, 1.0, c.data(), r.data()); }, needle);
    CHECK(c == std::vector<double>(4, -7.0));
    CHECK(r == std::vector<double>(4, -7.0));
    std::vector<double> sums(8, -7.0), toks(64, -7.0);
    std::vector<std::int64_t> counts(8, -7);
    fixture::expect_error([&] { dpo::cpu::sequence_logps(s.view.chosen, sums.data(), counts.data(), toks.data()); }, needle);
    CHECK(sums == std::vector<double>(8, -7.0));
    CHECK(counts == std::vector<std::int64_t>(8, -7));
    CHECK(toks == std::vector<double>(64, -7.0));
  }
}

struct setup {
  oracle::batch b = small_batch();
  buf_t buf{b, layout::padded, 2};
  std::vector<double> rc{-5.0, -6.0}, rr{-7.0, -8.0};
  scenario ok() const { return {buf.view(), dpo::loss_config{}, rc.data(), rr.data()}; }
  /// buf's padded view, but with `num_seqs` sequences.
  dpo::pair_view<float, std::int64_t> padded_view(std::int64_t num_seqs) {
    return dpo::padded_pairs(buf.logits.data(), buf.labels.data(), num_seqs, buf.seq_len, buf.V, buf.stride);
  }
};

}  // namespace

TEST_CASE("the valid scenario runs (so each error below is caused by its one change)", "[errors]") {
  setup s;
  const scenario sc = s.ok();
  CHECK_NOTHROW(dpo::cpu::dpo_forward_backward(sc.view, sc.rc, sc.rr, sc.cfg, s.buf.grad_view()));
}

TEST_CASE("shape errors name the argument", "[errors]") {
  struct shape_case {
    const char* what;
    std::function<void(setup&, scenario&)> change;
    const char* needle;
    bool check_sequence_logps;  // the error is one sequence_logps / pair_logps see too
  };
  const shape_case cases[] = {
      {"odd sequence count in the paired layout", [](setup& s, scenario& sc) { sc.view = s.padded_view(3); },
       "num_seqs = 3 is odd", false},
      {"chosen and rejected sequence counts differ", [](setup&, scenario& sc) { sc.view.rejected.num_seqs = 1; },
       "chosen.num_seqs = 2 != rejected.num_seqs = 1", false},
      {"no pairs", [](setup& s, scenario& sc) { sc.view = s.padded_view(0); }, "num_pairs = 0", false},
      {"row_stride < vocab",
       [](setup& s, scenario& sc) { sc.view.chosen.row_stride = sc.view.rejected.row_stride = s.buf.V - 1; },
       "row_stride = 4", true},
      {"vocab < 1", [](setup&, scenario& sc) { sc.view.chosen.vocab = sc.view.rejected.vocab = 0; }, "vocab = 0",
       true},
      {"chosen and rejected vocab differ", [](setup&, scenario& sc) { sc.view.rejected.vocab = 4; },
       "chosen.vocab = 5 != rejected.vocab = 4", false},
      {"negative seq_len", [](setup&, scenario& sc) { sc.view.chosen.seq_len = sc.view.rejected.seq_len = -1; },
       "seq_len = -1", true},
  };
  for (const shape_case& c : cases) {
    INFO(c.what);
    setup s;
    scenario sc = s.ok();
    c.change(s, sc);
    expect_rejected(s.buf, sc, c.needle, c.check_sequence_logps);
  }
}

TEST_CASE("label errors name the label, its row and the vocabulary", "[errors]") {
  setup s;
  // Row 1 of sequence 0 is a completion token in this batch? Find one that is.
  std::int64_t row = -1;
  for (std::int64_t r = 0; r < s.buf.seq_len; ++r)
    if (s.b.chosen[0].y[r] >= 0) row = r;
  REQUIRE(row >= 0);
  SECTION("label = vocab") {
    s.buf.labels[row] = s.buf.V;
    expect_rejected(s.buf, s.ok(), "labels[" + std::to_string(row) + "] = 5 is outside [0, vocab = 5)");
  }
  SECTION("label = -1 is neither a token nor ignore_index (-100)") {
    s.buf.labels[row] = -1;
    expect_rejected(s.buf, s.ok(), "labels[" + std::to_string(row) + "] = -1 is outside");
  }
  SECTION("label = -100 when ignore_index is -1") {
    s.buf.labels[row] = -100;
    scenario sc = s.ok();
    sc.view.chosen.ignore_index = sc.view.rejected.ignore_index = -1;
    // Every other masked row holds -100 too, so the first of them is reported.
    expect_rejected(s.buf, sc, "is outside [0, vocab = 5) and is not ignore_index = -1");
  }
  SECTION("rejected side") {
    s.buf.labels[2 * s.buf.seq_len + row] = 99;
    expect_rejected(s.buf, s.ok(), "logits.rejected.labels[" + std::to_string(2 * s.buf.seq_len + row) + "] = 99",
                    false);
  }
}

TEST_CASE("packed layout: cu_seqlens must be non-decreasing and >= 0", "[errors]") {
  const oracle::batch b = small_batch(true);
  buf_t buf(b, layout::packed, 0);
  std::vector<double> rc{-5.0, -6.0}, rr{-7.0, -8.0};
  scenario sc{buf.view(), dpo::loss_config{}, rc.data(), rr.data()};
  SECTION("decreasing") {
    buf.cu[1] = buf.cu[2] + 1;
    expect_rejected(buf, sc, "cu_seqlens is not non-decreasing: cu_seqlens[2]", false);
  }
  SECTION("negative start") {
    buf.cu[0] = -1;
    expect_rejected(buf, sc, "cu_seqlens[0] = -1", false);
  }
}

TEST_CASE("configuration errors name the field and value", "[errors]") {
  setup s;
  using dpo::loss_type;
  auto with = [&](dpo::loss_config c) {
    scenario sc = s.ok();
    sc.cfg = c;
    return sc;
  };
  for (double beta : {0.0, -0.1, std::nan(""), double(INFINITY)}) {
    dpo::loss_config c;
    c.beta = beta;
    // Config errors are raised by the loss entry points only (sequence_logps has no config).
    expect_rejected(s.buf, with(c), "beta = ", false);
  }
  struct eps_case {
    loss_type t;
    double eps;
    const char* needle;
  };
  for (const eps_case& e : {eps_case{loss_type::exo_pair, 0.0, "exo_pair needs 0 < label_smoothing < 1"},
                            eps_case{loss_type::exo_pair, 1.0, "exo_pair needs 0 < label_smoothing < 1"},
                            eps_case{loss_type::robust, 0.5, "robust needs 0 <= label_smoothing < 0.5"},
                            eps_case{loss_type::sigmoid, 0.25, "label_smoothing = 0.25 has no effect with loss_type sigmoid"},
                            eps_case{loss_type::hinge, 0.25, "label_smoothing = 0.25 has no effect with loss_type hinge"},
                            eps_case{loss_type::aot, -0.1, "label_smoothing = -0.1"},
                            eps_case{loss_type::aot, 1.5, "label_smoothing = 1.5"}}) {
    INFO("loss " << dpo::to_string(e.t) << " eps " << e.eps);
    expect_rejected(s.buf, with(fixture::of(e.t, 0.1, e.eps)), e.needle, false);
  }
  dpo::loss_config c = fixture::of(loss_type::nca_pair);
  c.divergence = dpo::f_divergence::forward_kl;
  expect_rejected(s.buf, with(c), "f_divergence_type = forward_kl is not supported with loss_type nca_pair", false);
  c = dpo::loss_config::combination({{loss_type::simpo, 1.0}, {loss_type::sigmoid, 1.0}});
  expect_rejected(s.buf, with(c), "simpo, cpo and orpo (reference-free) cannot be combined", false);
  c = dpo::loss_config::combination({{loss_type::orpo, 1.0}, {loss_type::sft, 1.0}});
  expect_rejected(s.buf, with(c), "cannot be combined", false);
  c = fixture::of(loss_type::aot);
  c.use_weighting = true;
  expect_rejected(s.buf, with(c), "use_weighting = true is not supported with loss_type aot", false);
  c = fixture::of(loss_type::sigmoid);
  c.ld_alpha = 1.5;
  expect_rejected(s.buf, with(c), "ld_alpha = 1.5", false);
  c = fixture::of(loss_type::discopop);
  c.discopop_tau = 0.0;
  expect_rejected(s.buf, with(c), "discopop_tau = 0", false);
  c = fixture::of(loss_type::cpo);
  c.cpo_base = loss_type::sft;
  expect_rejected(s.buf, with(c), "cpo_base", false);
  c = fixture::of(loss_type::cpo);
  c.cpo_alpha = -1.0;
  expect_rejected(s.buf, with(c), "cpo_alpha = -1", false);
  c = fixture::of(loss_type::sigmoid);
  c.num_terms = 0;
  expect_rejected(s.buf, with(c), "0 terms given", false);
  c = fixture::of(loss_type::sigmoid);
  c.terms[0].type = static_cast<loss_type>(77);
  expect_rejected(s.buf, with(c), "loss_type[0] = 77", false);
  c = dpo::loss_config::combination({{loss_type::sigmoid, 1.0}, {loss_type::sft, std::nan("")}});
  expect_rejected(s.buf, with(c), "loss_weights[1]", false);
  c = fixture::of(loss_type::sigmoid);
  c.divergence = static_cast<dpo::f_divergence>(9);
  expect_rejected(s.buf, with(c), "f_divergence_type = 9", false);
  c = fixture::of(loss_type::sigmoid);
  c.divergence = dpo::f_divergence::alpha_divergence;
  c.alpha_divergence_coef = INFINITY;
  expect_rejected(s.buf, with(c), "alpha_divergence_coef", false);

  std::vector<double> cl(2, -7.0), rl(2, -7.0);
  fixture::expect_error([&] { dpo::cpu::pair_logps(s.buf.view(), -0.5, cl.data(), rl.data()); }, "ld_alpha = -0.5");
  CHECK(cl == std::vector<double>(2, -7.0));
}

TEST_CASE("null pointers are named", "[errors]") {
  setup s;
  scenario sc = s.ok();
  sc.rc = nullptr;
  expect_rejected(s.buf, sc, "ref_chosen_logps is null", false);
  sc = s.ok();
  sc.rr = nullptr;
  expect_rejected(s.buf, sc, "ref_rejected_logps is null", false);
  sc = s.ok();
  sc.view.chosen.logits = nullptr;
  expect_rejected(s.buf, sc, ".logits is null");
  sc = s.ok();
  sc.view.rejected.labels = nullptr;
  expect_rejected(s.buf, sc, "logits.rejected.labels is null", false);

  const scenario ok = s.ok();
  std::vector<std::int64_t> counts(2, -7);
  std::vector<double> sums(2, -7.0);
  fixture::expect_error([&] { dpo::cpu::sequence_logps(ok.view.chosen, static_cast<double*>(nullptr), counts.data()); },
               "sums is null");
  fixture::expect_error([&] { dpo::cpu::sequence_logps(ok.view.chosen, sums.data(), nullptr); }, "counts is null");
  CHECK(counts == std::vector<std::int64_t>(2, -7));
  CHECK(sums == std::vector<double>(2, -7.0));
  fixture::expect_error([&] { dpo::cpu::pair_logps(ok.view, 1.0, nullptr, sums.data()); }, "chosen is null");

  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(ok.view, ok.rc, ok.rr, ok.cfg);
  s.buf.reset_grad();
  const std::vector<float> g0 = s.buf.grad;
  dpo::pair_grad_view<float> g = s.buf.grad_view();
  g.chosen = nullptr;
  fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "grad.chosen is null");
  g = s.buf.grad_view();
  g.rejected = nullptr;
  fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "grad.rejected is null");
  CHECK(std::memcmp(s.buf.grad.data(), g0.data(), g0.size() * sizeof(float)) == 0);

  dpo::cpu::pair_logps_in in;
  in.num_pairs = 2;
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, dpo::loss_config{}); }, "chosen_logps is null");
  in.chosen_logps = s.rc.data();
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, dpo::loss_config{}); }, "rejected_logps is null");
  in.rejected_logps = s.rr.data();
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, dpo::loss_config{}); }, "ref_chosen_logps is null");
  in.num_pairs = 0;
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, dpo::loss_config{}); }, "num_pairs = 0");
  in.num_pairs = 2;
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, fixture::of(dpo::loss_type::exo_pair)); }, "label_smoothing");
}

TEST_CASE("dpo_loss: token counts must be finite and >= 0; nothing written otherwise", "[errors]") {
  const std::vector<double> pc = {-4.0, -6.0}, pr = {-9.0, -7.0}, rc = {-5.0, -5.0}, rr = {-8.0, -8.0};
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const char* side : {"chosen_tokens", "rejected_tokens"}) {
    for (const double bad : {-3.0, -0.5, nan, inf, -inf}) {
      INFO(side << " = " << bad);
      std::vector<double> good = {3.0, 5.0}, wrong = {3.0, bad};
      const bool chosen = std::string(side) == "chosen_tokens";
      const dpo::pair_logps_in in = dpo::make_pair_logps(2, pc.data(), pr.data(), rc.data(), rr.data(),
                                                         chosen ? wrong.data() : good.data(),
                                                         chosen ? good.data() : wrong.data());
      std::vector<double> losses(2, -7.0);
      double loss = -7.0;
      dpo::forward_outputs out;
      out.loss = &loss;
      out.losses = losses.data();
      fixture::expect_error([&] { dpo::cpu::dpo_loss(in, fixture::of(dpo::loss_type::ipo), out); },
                            std::string(side) + "[1] = ");
      CHECK(loss == -7.0);
      CHECK(losses == std::vector<double>(2, -7.0));
    }
  }
  // 0 (an empty completion) is a count: it divides as 1, as the fused paths' empty sequences.
  const std::vector<double> zero = {0.0, 2.0}, one = {1.0, 2.0};
  const dpo::loss_config ipo = fixture::of(dpo::loss_type::ipo);
  const auto a = dpo::cpu::dpo_loss(dpo::make_pair_logps(2, pc.data(), pr.data(), rc.data(), rr.data(), zero.data(), one.data()), ipo);
  const auto b = dpo::cpu::dpo_loss(dpo::make_pair_logps(2, pc.data(), pr.data(), rc.data(), rr.data(), one.data(), one.data()), ipo);
  CHECK(a.losses == b.losses);
}

TEST_CASE("dpo_loss: weights with aot / aot_unpaired weigh the sorted entries (documented), use_weighting is refused", "[errors]") {
  // The C++ dpo_loss's weights multiply loss entry i, which for the sorting losses is the i-th
  // sorted position (what the PyTorch op's vector-Jacobian product passes); per-pair weights
  // are refused where the library derives them itself (use_weighting) and by the PyTorch op.
  for (const dpo::loss_type t : {dpo::loss_type::aot, dpo::loss_type::aot_unpaired}) {
    dpo::loss_config c = fixture::of(t);
    c.use_weighting = true;
    const std::string msg = dpo::validate_config(c);
    CHECK(msg.find("use_weighting = true is not supported with loss_type") != std::string::npos);
    CHECK(dpo::check_pair_weights(fixture::of(t), "weights").rfind("weights is not supported with loss_type ", 0) == 0);
  }
  CHECK(dpo::check_pair_weights(fixture::of(dpo::loss_type::sigmoid), "weights").empty());
}

TEST_CASE("backward: unsupported aliasing, bad grad_output, mismatched forward_result", "[errors]") {
  setup s;
  const scenario ok = s.ok();
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(ok.view, ok.rc, ok.rr, ok.cfg);
  const std::vector<float> logits0 = s.buf.logits;
  s.buf.reset_grad();
  const std::vector<float> g0 = s.buf.grad;
  auto untouched = [&] {
    CHECK(std::memcmp(s.buf.logits.data(), logits0.data(), logits0.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(s.buf.grad.data(), g0.data(), g0.size() * sizeof(float)) == 0);
  };
  SECTION("grad overlaps the logits, shifted by one element") {
    dpo::pair_grad_view<float> g{s.buf.logits.data() + 1, s.buf.stride, s.buf.logits.data() + 1, s.buf.stride};
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "unsupported aliasing");
    untouched();
  }
  SECTION("grad is the logits pointer with another stride") {
    dpo::pair_grad_view<float> g{s.buf.logits.data(), s.buf.V, s.buf.logits.data(), s.buf.V};
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "grad.chosen overlaps the logits");
    untouched();
  }
  SECTION("grad.chosen is the logits shifted by one row") {
    dpo::pair_grad_view<float> g = s.buf.grad_view();
    g.chosen = s.buf.logits.data() + s.buf.stride;
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "grad.chosen overlaps the logits");
    untouched();
  }
  SECTION("grad.chosen and grad.rejected overlap each other (separate layout)") {
    buf_t sep(s.b, layout::separate, 0);
    const auto v = sep.view();
    const dpo::cpu::forward_result rs = dpo::cpu::dpo_forward(v, ok.rc, ok.rr, ok.cfg);
    sep.reset_grad();
    const std::vector<float> sg0 = sep.grad;
    dpo::pair_grad_view<float> g{sep.grad.data(), sep.stride, sep.grad.data(), sep.stride};
    fixture::expect_error([&] { dpo::cpu::dpo_backward(v, rs, g); }, "grad.chosen and grad.rejected overlap");
    CHECK(std::memcmp(sep.grad.data(), sg0.data(), sg0.size() * sizeof(float)) == 0);
  }
  SECTION("grad stride < vocab") {
    dpo::pair_grad_view<float> g = s.buf.grad_view();
    g.chosen_stride = 3;
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, g); }, "grad.chosen_stride = 3");
    untouched();
  }
  SECTION("grad_output not finite") {
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, s.buf.grad_view(), std::nan("")); }, "grad_output");
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, r, s.buf.inplace_view(), INFINITY); }, "grad_output");
    untouched();
  }
  SECTION("forward_result of another batch") {
    fixture::batch_spec sp = fixture::spec(3, 4, 5);
    const oracle::batch other = fixture::random_batch(sp);
    buf_t ob(other, layout::padded, 2);
    std::vector<double> rc(3, -5.0), rr(3, -6.0);
    const dpo::cpu::forward_result ro = dpo::cpu::dpo_forward(ob.view(), rc.data(), rr.data(), ok.cfg);
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, ro, s.buf.grad_view()); }, "forward_result does not match");
    untouched();
  }
  SECTION("forward_result whose rejected rows differ (chosen rows match)") {
    // The rejected side's mismatch must be found before the chosen side is written.
    buf_t sep(s.b, layout::separate, 0);
    const auto v = sep.view();
    auto shorter = v;
    shorter.rejected.seq_len = sep.seq_len - 1;
    const dpo::cpu::forward_result rs = dpo::cpu::dpo_forward(shorter, ok.rc, ok.rr, ok.cfg);
    sep.reset_grad();
    const std::vector<float> sg0 = sep.grad, sgr0 = sep.grad_r;
    fixture::expect_error([&] { dpo::cpu::dpo_backward(v, rs, sep.grad_view()); }, "forward_result does not match");
    CHECK(std::memcmp(sep.grad.data(), sg0.data(), sg0.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(sep.grad_r.data(), sgr0.data(), sgr0.size() * sizeof(float)) == 0);
  }
  SECTION("forward_result with other row ranges") {
    scenario shifted = ok;
    shifted.view.chosen.seq_len = shifted.view.rejected.seq_len = s.buf.seq_len - 1;
    const dpo::cpu::forward_result rr = dpo::cpu::dpo_forward(shifted.view, ok.rc, ok.rr, ok.cfg);
    fixture::expect_error([&] { dpo::cpu::dpo_backward(ok.view, rr, s.buf.grad_view()); }, "forward_result does not match");
    untouched();
  }
}

TEST_CASE("dpo_forward with reference logits: the reference is checked too", "[errors]") {
  setup s;
  const scenario ok = s.ok();
  fixture::batch_spec sp = fixture::spec(3, 4, 5);
  const oracle::batch other = fixture::random_batch(sp);
  buf_t ob(other, layout::padded, 0);
  fixture::expect_error([&] { dpo::cpu::dpo_forward(ok.view, ob.view(), ok.cfg); },
               "ref_logits.num_pairs = 3 != logits.num_pairs = 2");
  buf_t rb(s.b, layout::padded, 0);
  rb.labels[1] = 17;
  rb.labels[0] = 17;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(ok.view, rb.view(), ok.cfg); }, "ref_logits.chosen.labels[");
  // dpo_forward_backward: the reference's errors too, with the gradient buffer untouched.
  s.buf.reset_grad();
  const std::vector<float> g0 = s.buf.grad, gr0 = s.buf.grad_r;
  fixture::expect_error([&] { dpo::cpu::dpo_forward_backward(ok.view, ob.view(), ok.cfg, s.buf.grad_view()); },
                        "ref_logits.num_pairs = 3 != logits.num_pairs = 2");
  fixture::expect_error([&] { dpo::cpu::dpo_forward_backward(ok.view, rb.view(), ok.cfg, s.buf.grad_view()); },
                        "ref_logits.chosen.labels[");
  CHECK(s.buf.grad == g0);  // the sentinel (-12345) everywhere
  CHECK(s.buf.grad_r == gr0);
}
