// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo::cpu::dpo_backward (and dpo_forward_backward) against finite differences of the
// float64 oracle, for every loss configuration, dtype, label type and layout; out of place
// and in place; masked rows exactly 0; columns [V, stride) untouched.
#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::layout;
using fixture::run_options;

namespace {

/// 3 pairs of 5 rows over `vocab`, drawn from `seed`.
fixture::batch_spec small(std::uint64_t seed = 1, std::int64_t vocab = 7) { return fixture::spec(3, 5, vocab, seed); }

template <class T, class L>
void dtype_layout_matrix() {
  const fixture::batch_spec sp = small(31);
  const fixture::batch_pair batches = fixture::rounded_batch_pair<T>(sp);
  for (const auto& nc : fixture::all_configs()) {
    if (nc.name != "sigmoid" && nc.name != "mpo+wpo" && nc.name != "ipo+ld_alpha0+wpo" && nc.name != "aot_unpaired" &&
        nc.name != "orpo" && nc.name != "cpo/ipo" && nc.name != "discopop/alpha0.5")
      continue;
    for (layout k : {layout::padded, layout::separate, layout::packed}) {
      run_options o;
      o.kind = k;
      o.stride_extra = k == layout::separate ? 0 : 3;
      o.explicit_mask = k == layout::packed;
      for (bool in_place : {false, true})
        fixture::check_backward<T, L>(nc, batches.of(k), o, in_place);
    }
  }
}

}  // namespace

TEST_CASE("dpo_backward matches finite differences of the oracle for every configuration", "[backward]") {
  const fixture::batch_spec sp = small(30);
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  run_options o;
  o.stride_extra = 2;
  for (const auto& nc : fixture::all_configs()) fixture::check_backward<double, std::int64_t>(nc, b, o, false);
}

TEST_CASE("dpo_backward: dtypes x label types x layouts, in and out of place", "[backward]") {
  SECTION("double / int32") { dtype_layout_matrix<double, std::int32_t>(); }
  SECTION("float / int64") { dtype_layout_matrix<float, std::int64_t>(); }
  SECTION("bfloat16 / int32") { dtype_layout_matrix<Eigen::bfloat16, std::int32_t>(); }
  SECTION("half / int64") { dtype_layout_matrix<Eigen::half, std::int64_t>(); }
}

TEST_CASE("dpo_backward: grad_output scales the gradient", "[backward]") {
  const fixture::batch_spec sp = small(32);
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  fixture::check_backward<float, std::int64_t>(fixture::all_configs()[0], b, {}, false, false, -2.5);
}

template <class T>
void in_place_equals_out_of_place() {
  const fixture::batch_spec sp = small(33, 37);
  const oracle::batch b = fixture::rounded_random_batch<T>(sp);
  for (const auto& nc : fixture::every_loss_type()) {
    INFO(nc.name);
    for (layout k : {layout::padded, layout::separate}) {
      fixture::buffers<T, std::int64_t> buf(b, k, 4);
      const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
      const auto view = buf.view();
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(view, ref.pc(), ref.pr(), nc.cfg);
      dpo::cpu::dpo_backward(view, r, buf.grad_view());
      dpo::cpu::dpo_backward(view, r, buf.inplace_view());
      // Bitwise equal on [0, V) of every row; the padding columns keep their own contents.
      for (const auto* pair : {&buf.grad, &buf.grad_r}) {
        const std::vector<T>& out = *pair;
        const std::vector<T>& in = pair == &buf.grad ? buf.logits : buf.logits_r;
        for (std::size_t row = 0; row * buf.stride < out.size(); ++row)
          for (std::int64_t v = 0; v < buf.V; ++v)
            REQUIRE(std::memcmp(&out[row * buf.stride + v], &in[row * buf.stride + v], sizeof(T)) == 0);
      }
    }
  }
}

TEST_CASE("dpo_backward in place gives bitwise the out-of-place gradient", "[backward]") {
  in_place_equals_out_of_place<float>();
  in_place_equals_out_of_place<double>();
  in_place_equals_out_of_place<Eigen::bfloat16>();
  in_place_equals_out_of_place<Eigen::half>();
}

TEST_CASE("dpo_forward_backward equals dpo_forward then dpo_backward", "[backward]") {
  fixture::batch_spec sp = small(34);
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  const auto nc = fixture::combinations_and_options()[0];  // MPO
  fixture::buffers<float, std::int32_t> one(b, layout::padded, 1), two(b, layout::padded, 1);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  const dpo::cpu::forward_result r1 =
      dpo::cpu::dpo_forward_backward(one.view(), ref.pc(), ref.pr(), nc.cfg, one.grad_view());
  const dpo::cpu::forward_result r2 = dpo::cpu::dpo_forward(two.view(), ref.pc(), ref.pr(), nc.cfg);
  dpo::cpu::dpo_backward(two.view(), r2, two.grad_view());
  CHECK(r1.loss == r2.loss);
  CHECK(std::memcmp(one.grad.data(), two.grad.data(), one.grad.size() * sizeof(float)) == 0);
  // With reference logits: the same as the reference-logits dpo_forward then dpo_backward.
  sp.seed = 36;
  const oracle::batch rb = fixture::rounded_random_batch<float>(sp);
  fixture::buffers<float, std::int32_t> ref_logits(rb, layout::padded, 1);
  fixture::buffers<float, std::int32_t> three(b, layout::padded, 1), four(b, layout::padded, 1);
  const dpo::cpu::forward_result r3 =
      dpo::cpu::dpo_forward_backward(three.view(), ref_logits.view(), nc.cfg, three.grad_view());
  const dpo::cpu::forward_result r4 = dpo::cpu::dpo_forward(four.view(), ref_logits.view(), nc.cfg);
  dpo::cpu::dpo_backward(four.view(), r4, four.grad_view());
  CHECK(r3.loss == r4.loss);
  CHECK(r3.loss != r1.loss);
  CHECK(std::memcmp(three.grad.data(), four.grad.data(), three.grad.size() * sizeof(float)) == 0);
}

template <class T>
void same_as_float_rounded() {
  // bf16 / fp16 -> float is exact and the accumulation is fp32 either way, so on the same
  // values the forward pass equals the float one bitwise and the gradient is the float
  // gradient rounded to nearest-even (Eigen's conversion).
  const fixture::batch_spec sp = small(35, 50);
  const oracle::batch b = fixture::rounded_random_batch<T>(sp);
  for (const auto& nc : fixture::all_configs()) {
    INFO(nc.name);
    fixture::buffers<T, std::int64_t> low(b, layout::padded, 3);
    fixture::buffers<float, std::int64_t> full(b, layout::padded, 3);
    const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
    const dpo::cpu::forward_result rl = dpo::cpu::dpo_forward(low.view(), ref.pc(), ref.pr(), nc.cfg);
    const dpo::cpu::forward_result rf = dpo::cpu::dpo_forward(full.view(), ref.pc(), ref.pr(), nc.cfg);
    CHECK(std::memcmp(&rl.loss, &rf.loss, sizeof(double)) == 0);
    CHECK(std::memcmp(&rl.metrics, &rf.metrics, sizeof(rl.metrics)) == 0);
    CHECK(std::memcmp(rl.losses.data(), rf.losses.data(), sizeof(double) * low.P) == 0);
    dpo::cpu::dpo_backward(low.view(), rl, low.grad_view());
    dpo::cpu::dpo_backward(full.view(), rf, full.grad_view());
    for (std::size_t k = 0; k < low.grad.size(); ++k) {
      if (static_cast<std::int64_t>(k) % low.stride >= low.V) continue;
      const T want = T(full.grad[k]);
      if (std::memcmp(&low.grad[k], &want, sizeof(T)) != 0)
        FAIL_CHECK("element " << k << ": float grad " << full.grad[k] << " rounds to " << float(want) << ", got "
                              << float(low.grad[k]));
    }
  }
}

TEST_CASE("bf16 and fp16 logits: the float path's results, gradient rounded to nearest-even", "[backward]") {
  same_as_float_rounded<Eigen::bfloat16>();
  same_as_float_rounded<Eigen::half>();
}

namespace {

/// dpo_backward_rows from a caller-owned forward's row_lse / row_coef against dpo_backward
/// from the owned result: bitwise the same gradient, the same untouched rows and columns.
template <class T, class L>
void check_backward_rows(const fixture::named_config& nc, const oracle::batch& b, layout k, bool in_place,
                         double grad_output) {
  INFO(nc.name << " layout " << fixture::name_of(k) << " in_place " << in_place << " grad_output "
               << grad_output);
  const std::int64_t offset = k == layout::packed ? 2 : 0;
  fixture::buffers<T, L> a(b, k, 3, k == layout::packed, -100, offset);
  fixture::buffers<T, L> c(b, k, 3, k == layout::packed, -100, offset);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  dpo::cpu::options opt;
  opt.num_threads = 3;
  const dpo::cpu::forward_result f = dpo::cpu::dpo_forward(a.view(), ref.pc(), ref.pr(), nc.cfg, opt);
  dpo::cpu::dpo_backward(a.view(), f, in_place ? a.inplace_view() : a.grad_view(), grad_output, opt);
  const std::size_t rows = c.logits.size() / static_cast<std::size_t>(c.stride);
  std::vector<double> lse(rows, 0.0), coef(rows, 0.0);
  dpo::forward_outputs out;
  out.row_lse = lse.data();
  out.row_coef = coef.data();
  dpo::cpu::dpo_forward(c.view(), ref.pc(), ref.pr(), nc.cfg, out, opt);
  dpo::cpu::dpo_backward_rows(c.view(), lse.data(), coef.data(), in_place ? c.inplace_view() : c.grad_view(),
                              grad_output, opt);
  const std::vector<T>& ga = in_place ? a.logits : a.grad;
  const std::vector<T>& gc = in_place ? c.logits : c.grad;
  REQUIRE(ga.size() == gc.size());
  CHECK(std::memcmp(ga.data(), gc.data(), ga.size() * sizeof(T)) == 0);
}

}  // namespace

TEST_CASE("dpo_backward_rows from caller-owned row state equals dpo_backward bitwise", "[backward][outputs]") {
  fixture::batch_spec sp = small(41);
  const fixture::batch_pair batches = fixture::rounded_batch_pair<float>(sp);
  for (const auto& nc : fixture::all_configs())
    for (layout k : {layout::padded, layout::packed})
      for (bool in_place : {false, true})
        check_backward_rows<float, std::int64_t>(nc, batches.of(k), k, in_place,
                                                 in_place ? 1.0 : -0.37);
  sp.varying_rows = false;
  const oracle::batch bf = fixture::rounded_random_batch<Eigen::bfloat16>(sp);
  for (const auto& nc : fixture::all_configs())
    check_backward_rows<Eigen::bfloat16, std::int32_t>(nc, bf, layout::padded, false, 2.0);
}

TEST_CASE("dpo_backward_rows: bad arguments write nothing", "[backward][outputs]") {
  const oracle::batch b = fixture::rounded_random_batch<float>(small());
  fixture::buffers<float, std::int64_t> sep(b, layout::separate);
  fixture::buffers<float, std::int64_t> pad(b, layout::padded);
  std::vector<double> rows(pad.logits.size(), 0.0);
  fixture::expect_error(
      [&] { dpo::cpu::dpo_backward_rows(pad.view(), nullptr, rows.data(), pad.grad_view()); }, "row_lse is null");
  fixture::expect_error(
      [&] { dpo::cpu::dpo_backward_rows(sep.view(), rows.data(), rows.data(), sep.grad_view()); },
      "one logits buffer");
  // Both sides on the same rows of one buffer: row r's entry cannot hold both sides' state
  // (before this check the chosen side silently got the rejected side's coefficient).
  auto shared = sep.view();
  shared.rejected.logits = shared.chosen.logits;
  fixture::expect_error(
      [&] { dpo::cpu::dpo_backward_rows(shared, rows.data(), rows.data(), sep.grad_view()); }, "share rows");
  for (float g : pad.grad) CHECK(g == fixture::buffers<float, std::int64_t>::sentinel());
  for (float g : sep.grad) CHECK(g == fixture::buffers<float, std::int64_t>::sentinel());
}

TEST_CASE("dpo_backward_rows on zero rows takes null row state; with rows it names it", "[backward][outputs]") {
  // Padded T = 0 and packed with every sequence empty (cu_seqlens [0, 0, 0, 0, 0]): the
  // forward accepts them, and an empty tensor's data pointer is null, so the backward must
  // accept null logits, row_lse, row_coef and gradient buffers there.
  const std::int64_t V = 8, zero_cu[5] = {0, 0, 0, 0, 0};
  const std::vector<double> rc = {-1.0, -3.0}, rr = {-2.0, -1.5};
  for (const bool packed : {false, true}) {
    INFO((packed ? "packed" : "padded"));
    const dpo::pair_view<float, std::int64_t> p =
        packed ? dpo::packed_pairs<float, std::int64_t>(nullptr, nullptr, zero_cu, 4, V, V)
               : dpo::padded_pairs<float, std::int64_t>(nullptr, nullptr, 4, 0, V, V);
    double loss = 0;
    dpo::forward_outputs out;
    out.loss = &loss;
    dpo::cpu::dpo_forward(p, rc.data(), rr.data(), fixture::config_named("sigmoid").cfg, out);
    CHECK(std::isfinite(loss));
    dpo::cpu::dpo_backward_rows(p, nullptr, nullptr, dpo::pair_grad_view<float>{nullptr, V, nullptr, V}, 0.5);
  }
  // With rows, a null row_coef is named, and nothing is written.
  const oracle::batch b = fixture::rounded_random_batch<float>(small());
  fixture::buffers<float, std::int64_t> pad(b, layout::padded);
  std::vector<double> rows(pad.logits.size(), 0.0);
  fixture::expect_error([&] { dpo::cpu::dpo_backward_rows(pad.view(), rows.data(), nullptr, pad.grad_view()); },
                        "row_coef is null");
  for (float g : pad.grad) CHECK(g == fixture::buffers<float, std::int64_t>::sentinel());
}

TEST_CASE("logits gradients may not overlap the labels / mask / cu_seqlens / row state they read", "[backward][errors]") {
  // Each input is moved into the gradient buffer's bytes: the backward would overwrite it
  // while it still reads it (labels that turn into garbage index out of the row).
  using buffers = fixture::buffers<float, std::int64_t>;
  const oracle::batch b = fixture::rounded_random_batch<float>(small(7));
  const dpo::loss_config cfg = fixture::config_named("sigmoid").cfg;
  for (layout k : {layout::padded, layout::packed}) {
    INFO((k == layout::packed ? "packed" : "padded"));
    buffers x(b, k, 0, /*explicit_mask=*/true);
    const dpo::pair_view<float, std::int64_t> v = x.view();
    const std::int64_t P = x.P, rows = static_cast<std::int64_t>(x.labels.size());
    const std::vector<double> rc(static_cast<std::size_t>(P), -1.0), rr(static_cast<std::size_t>(P), -2.0);
    std::vector<double> lse(static_cast<std::size_t>(rows)), coef(static_cast<std::size_t>(rows));
    dpo::forward_outputs out;
    out.row_lse = lse.data();
    out.row_coef = coef.data();
    dpo::cpu::dpo_forward(v, rc.data(), rr.data(), cfg, out);
    const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(v, rc.data(), rr.data(), cfg);
    // The gradient buffer, with room for every input in its first bytes.
    std::vector<float> g(x.grad.size(), 7.0f);
    REQUIRE(g.size() * sizeof(float) >= static_cast<std::size_t>(rows) * sizeof(double) * 2);
    const dpo::pair_grad_view<float> gv{g.data(), x.stride, g.data(), x.stride};
    const auto place = [&](const auto& src, std::size_t at_bytes) {
      using E = typename std::decay_t<decltype(src)>::value_type;
      std::memcpy(reinterpret_cast<unsigned char*>(g.data()) + at_bytes, src.data(), src.size() * sizeof(E));
      return reinterpret_cast<const E*>(reinterpret_cast<unsigned char*>(g.data()) + at_bytes);
    };
    // sequence_logps_backward's names: "grad" and the token view's "labels" / "mask" / ...
    const auto seq_message = [](std::string w) {
      w.replace(0, 11, "grad");
      return w.substr(0, w.size() - 7);
    };
    const auto refused = [&](const char* what, const dpo::pair_view<float, std::int64_t>& vv, const double* l,
                             const double* c) {
      INFO(what);
      const std::vector<float> before = g;
      fixture::expect_error([&] { dpo::cpu::dpo_backward(vv, r, gv); }, what);
      fixture::expect_error([&] { dpo::cpu::dpo_forward_backward(vv, rc.data(), rr.data(), cfg, gv); }, what);
      fixture::expect_error([&] { dpo::cpu::dpo_backward_rows(vv, l, c, gv); }, what);
      fixture::expect_error(
          [&] { dpo::cpu::sequence_logps_backward(vv.chosen, l, rc.data(), g.data(), x.stride); },
          seq_message(what));
      CHECK(std::memcmp(g.data(), before.data(), g.size() * sizeof(float)) == 0);
    };
    {
      auto vv = v;
      vv.chosen.labels = vv.rejected.labels = place(x.labels, 0);
      refused("grad.chosen overlaps labels.chosen", vv, lse.data(), coef.data());
    }
    {
      auto vv = v;
      vv.chosen.mask = vv.rejected.mask = place(x.mask, 8);
      refused("grad.chosen overlaps mask.chosen", vv, lse.data(), coef.data());
    }
    if (k == layout::packed) {
      auto vv = v;
      vv.chosen.cu_seqlens = vv.rejected.cu_seqlens = place(x.cu, 16);
      refused("grad.chosen overlaps cu_seqlens.chosen", vv, lse.data(), coef.data());
    }
    // Row state: dpo_backward_rows and sequence_logps_backward read it.
    const double* l = place(lse, 0);
    fixture::expect_error([&] { dpo::cpu::dpo_backward_rows(v, l, coef.data(), gv); }, "grad.chosen overlaps row_lse");
    fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(v.chosen, l, rc.data(), g.data(), x.stride); },
                          "grad overlaps row_lse");
    fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(v.chosen, lse.data(), l, g.data(), x.stride); },
                          "grad overlaps seq_grad");
    // row_coef on the rejected rows' gradient only.
    const std::size_t rejected_at = static_cast<std::size_t>(v.rejected.row_begin(0) * x.stride) * sizeof(float);
    REQUIRE(rejected_at + coef.size() * sizeof(double) <= g.size() * sizeof(float));
    const double* c = place(coef, rejected_at);
    fixture::expect_error([&] { dpo::cpu::dpo_backward_rows(v, lse.data(), c, gv); }, "grad.rejected overlaps row_coef");
    // The same state out of the way: accepted, and the gradient of dpo_backward.
    std::vector<float> want(x.grad.size(), 7.0f), got(x.grad.size(), 7.0f);
    dpo::cpu::dpo_backward(v, r, {want.data(), x.stride, want.data(), x.stride});
    dpo::cpu::dpo_backward_rows(v, lse.data(), coef.data(), {got.data(), x.stride, got.data(), x.stride});
    CHECK(std::memcmp(want.data(), got.data(), got.size() * sizeof(float)) == 0);
  }
}
