// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo::cpu::dpo_forward, sequence_logps and pair_logps against the float64 oracle: every
// loss configuration, every logits dtype, both label types, every layout, row strides,
// ignore_index and explicit masks, reference logits.
#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::layout;
using fixture::run_options;

namespace {

/// A few configurations that between them reach every stage: per-pair, batch (aot), NLL,
/// WPO, LD-DPO, length-normalised, reference-free.
std::vector<fixture::named_config> representative() {
  std::vector<fixture::named_config> v;
  for (const auto& c : fixture::all_configs())
    if (c.name == "sigmoid" || c.name == "mpo+wpo" || c.name == "ipo+ld_alpha0+wpo" || c.name == "aot" ||
        c.name == "orpo" || c.name == "simpo" || c.name == "sigmoid_norm/js")
      v.push_back(c);
  return v;
}

template <class T, class L>
void dtype_layout_matrix() {
  const fixture::batch_spec sp = fixture::spec(3, 5, 13, 21);
  const fixture::batch_pair batches = fixture::rounded_batch_pair<T>(sp, 7);
  for (const auto& nc : representative()) {
    for (layout k : {layout::padded, layout::separate, layout::packed}) {
      run_options o;
      o.kind = k;
      fixture::check_forward<T, L>(nc, batches.of(k), o);
      o.stride_extra = 5;
      o.explicit_mask = true;
      fixture::check_forward<T, L>(nc, batches.of(k), o);
    }
  }
}

}  // namespace

TEST_CASE("dpo_forward matches the oracle for every configuration (float, padded)", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 3;
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  for (const auto& nc : fixture::all_configs()) fixture::check_forward<float, std::int64_t>(nc, b, {});
}

TEST_CASE("dpo_forward matches the oracle for every configuration (double, packed)", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 4;
  sp.varying_rows = true;
  sp.rows = 8;
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  run_options o;
  o.kind = layout::packed;
  for (const auto& nc : fixture::all_configs()) fixture::check_forward<double, std::int32_t>(nc, b, o);
}

TEST_CASE("dpo_forward: dtypes x label types x layouts x strides x masks", "[forward]") {
  // bf16 and fp16 inputs: the oracle reads the same rounded values, so the remaining error is
  // fp32 accumulation, bounded per token by fixture::token_tol<float> (derived there).
  SECTION("float / int64") { dtype_layout_matrix<float, std::int64_t>(); }
  SECTION("double / int32") { dtype_layout_matrix<double, std::int32_t>(); }
  SECTION("bfloat16 / int64") { dtype_layout_matrix<Eigen::bfloat16, std::int64_t>(); }
  SECTION("bfloat16 / int32") { dtype_layout_matrix<Eigen::bfloat16, std::int32_t>(); }
  SECTION("half / int64") { dtype_layout_matrix<Eigen::half, std::int64_t>(); }
  SECTION("half / int32") { dtype_layout_matrix<Eigen::half, std::int32_t>(); }
}

TEST_CASE("dpo_forward: custom ignore_index, packed offset, metrics off", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 5;
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  const auto nc = fixture::all_configs()[0];
  run_options o;
  o.ignore_index = -1;
  fixture::check_forward<float, std::int32_t>(nc, b, o);
  o.ignore_index = 1000;
  fixture::check_forward<float, std::int64_t>(nc, b, o);
  o = {};
  o.metrics = false;
  const dpo::cpu::forward_result r = fixture::check_forward<float, std::int64_t>(nc, b, o);
  CHECK(r.metrics.entropy == 0.0);

  // Packed sequences that start after row 0 of the buffer: earlier rows are never read.
  fixture::buffers<float, std::int64_t> buf(b, layout::packed, 3, false, -100, /*packed_offset=*/4);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  const dpo::cpu::forward_result rp = dpo::cpu::dpo_forward(buf.view(), ref.pc(), ref.pr(), nc.cfg);
  fixture::compare_forward(rp, oracle::forward(nc.cfg, b, fixture::to_ld(ref.c), fixture::to_ld(ref.r)),
                           fixture::tolerances<float>(b), nc.cfg, true);
}

TEST_CASE("dpo_forward with reference logits equals the oracle on the reference's log-probs", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 6;
  const oracle::batch policy = fixture::rounded_random_batch<float>(sp);
  sp.seed = 60;
  oracle::batch reference = fixture::rounded_random_batch<float>(sp);
  fixture::copy_labels(policy, reference);  // the reference scores the same completions
  for (const auto& nc : fixture::all_configs()) {
    if (!fixture::needs_reference(nc.cfg)) continue;
    INFO(nc.name);
    for (layout k : {layout::padded, layout::separate, layout::packed}) {
      fixture::buffers<float, std::int64_t> pb(policy, k, 2), rb(reference, k, 2);
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(pb.view(), rb.view(), nc.cfg);
      std::vector<oracle::ld> rc, rr;
      oracle::pair_logps(reference, nc.cfg.ld_alpha, rc, rr);
      const oracle::result want = oracle::forward(nc.cfg, policy, rc, rr);
      fixture::forward_tol t = fixture::tolerances<float>(policy);
      const fixture::forward_tol tr = fixture::tolerances<float>(reference);
      t.seq += tr.seq;  // the reference sums carry their own fp32 error
      fixture::compare_forward(r, want, t, nc.cfg, true);
    }
  }
}

TEST_CASE("reference logits of another dtype are read as they are, not in the policy's dtype", "[forward]") {
  // A bf16 policy with fp64 reference logits of values bf16 cannot hold: the reference pass
  // reads its own dtype, so the result is the oracle's on the fp64 values (rounding them to
  // bf16 moves each reference log-prob by ~0.1, far outside the tolerances).
  fixture::batch_spec sp;
  sp.seed = 61;
  const oracle::batch policy = fixture::rounded_random_batch<Eigen::bfloat16>(sp);
  sp.seed = 62;
  oracle::batch reference = fixture::rounded_random_batch<double>(sp);
  fixture::copy_labels(policy, reference);  // the reference scores the same completions
  for (const auto& nc : fixture::all_configs()) {
    if (!fixture::needs_reference(nc.cfg)) continue;
    INFO(nc.name);
    for (layout k : {layout::padded, layout::separate, layout::packed}) {
      fixture::buffers<Eigen::bfloat16, std::int64_t> pb(policy, k, 2), pb2(policy, k, 2);
      fixture::buffers<double, std::int64_t> rb(reference, k, 2);
      const dpo::cpu::forward_result r = dpo::cpu::dpo_forward(pb.view(), rb.view(), nc.cfg);
      std::vector<oracle::ld> rc, rr;
      oracle::pair_logps(reference, nc.cfg.ld_alpha, rc, rr);
      fixture::forward_tol t = fixture::tolerances<float>(policy);
      t.seq += fixture::tolerances<double>(reference).seq;
      fixture::compare_forward(r, oracle::forward(nc.cfg, policy, rc, rr), t, nc.cfg, true);
      // The same as the reference's own pair_logps passed as log-probs, forward and backward.
      const std::int64_t P = static_cast<std::int64_t>(policy.chosen.size());
      std::vector<double> c(P), j(P);
      dpo::cpu::pair_logps(rb.view(), nc.cfg.ld_alpha, c.data(), j.data());
      const dpo::cpu::forward_result a = dpo::cpu::dpo_forward_backward(pb.view(), rb.view(), nc.cfg, pb.grad_view());
      const dpo::cpu::forward_result b = dpo::cpu::dpo_forward_backward(pb2.view(), c.data(), j.data(), nc.cfg,
                                                                        pb2.grad_view());
      CHECK(a.loss == b.loss);
      CHECK(std::memcmp(pb.grad.data(), pb2.grad.data(), pb.grad.size() * sizeof(Eigen::bfloat16)) == 0);
    }
  }
}

TEST_CASE("sequence_logps: sums, counts and per-token log-probs", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 8;
  sp.varying_rows = true;
  sp.rows = 6;
  const oracle::batch packed = fixture::rounded_random_batch<Eigen::bfloat16>(sp);
  sp.varying_rows = false;
  const oracle::batch padded = fixture::rounded_random_batch<Eigen::bfloat16>(sp);
  for (layout k : {layout::padded, layout::packed}) {
    const oracle::batch& bb = k == layout::packed ? packed : padded;
    const fixture::forward_tol t = fixture::tolerances<float>(bb);
    fixture::buffers<Eigen::bfloat16, std::int32_t> buf(bb, k, 3, true);
    // All 2P sequences as one view.
    dpo::token_view<Eigen::bfloat16, std::int32_t> v = buf.view().chosen;
    v.num_seqs = 2 * buf.P;
    const std::int64_t rows = v.row_end(v.num_seqs - 1) - v.row_begin(0);
    std::vector<double> sums(v.num_seqs, -7.0), toks(rows, -7.0);
    std::vector<std::int64_t> counts(v.num_seqs, -7);
    dpo::cpu::sequence_logps(v, sums.data(), counts.data(), toks.data());
    for (std::int64_t s = 0; s < v.num_seqs; ++s) {
      const oracle::sequence& q = s < buf.P ? bb.chosen[s] : bb.rejected[s - buf.P];
      const auto ts = oracle::tokens_of(q);
      CHECK(counts[s] == static_cast<std::int64_t>(oracle::count(ts)));
      CHECK(fixture::near(sums[s], double(oracle::seq_logp(ts, INFINITY, 1.0)), t.seq));
      for (std::int64_t r = 0; r < q.rows(); ++r) {
        const double got = toks[v.row_begin(s) - v.row_begin(0) + r];
        if (ts[r].active) {
          CHECK(fixture::near(got, double(ts[r].logp), t.tok));
        } else {
          CHECK(got == 0.0);
        }
      }
    }
  }
}

TEST_CASE("pair_logps: LD-DPO weighting of both sides", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 9;
  sp.rows = 8;
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  for (double a : {1.0, 0.5, 0.0}) {
    fixture::buffers<double, std::int64_t> buf(b, layout::separate, 1);
    std::vector<double> c(buf.P), r(buf.P);
    dpo::cpu::pair_logps(buf.view(), a, c.data(), r.data());
    std::vector<oracle::ld> oc, orr;
    oracle::pair_logps(b, a, oc, orr);
    for (std::int64_t i = 0; i < buf.P; ++i) {
      CHECK(fixture::near(c[i], double(oc[i]), 1e-12));
      CHECK(fixture::near(r[i], double(orr[i]), 1e-12));
    }
  }
}

namespace {

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

void check_same(const double* got, const Eigen::VectorXd& want, const char* what) {
  INFO(what);
  for (Eigen::Index i = 0; i < want.size(); ++i) CHECK(same_bits(got[i], want[i]));
}

/// Every per-pair output written to `out` against the owned result's, bitwise.
void check_same_pair_outputs(const dpo::forward_outputs& out, const dpo::cpu::forward_result& want) {
#define DPO_TEST_CHECK_SAME(name) check_same(out.name, want.name, #name);
  DPO_PAIR_OUTPUTS(DPO_TEST_CHECK_SAME)
#undef DPO_TEST_CHECK_SAME
}

/// The caller-owned dpo_forward against the owned-result one: bitwise the same values, and
/// the row state at the buffer's rows (entries outside every sequence untouched).
template <class T, class L>
void check_caller_owned(const fixture::named_config& nc, const oracle::batch& b, layout k, bool metrics,
                        bool reference_logits) {
  INFO(nc.name << " layout " << fixture::name_of(k) << " metrics " << metrics << " ref_logits "
               << reference_logits);
  fixture::buffers<T, L> buf(b, k, 3, k == layout::padded, -100, k == layout::packed ? 2 : 0);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  dpo::cpu::options opt;
  opt.num_threads = 2;
  opt.metrics = metrics;
  fixture::buffers<T, L> rbuf(b, k, 3, k == layout::padded, -100, k == layout::packed ? 2 : 0);
  const dpo::cpu::forward_result want = reference_logits
                                            ? dpo::cpu::dpo_forward(buf.view(), rbuf.view(), nc.cfg, opt)
                                            : dpo::cpu::dpo_forward(buf.view(), ref.pc(), ref.pr(), nc.cfg, opt);
  const std::int64_t P = buf.P;
  const double canary = -777.0;
  std::vector<double> pv(dpo::num_pair_outputs * P, canary), scalars(2, canary);
  dpo::metrics m;
  m.entropy = canary;
  const std::int64_t rows = static_cast<std::int64_t>(buf.logits.size()) / buf.stride;
  std::vector<double> lse(rows, canary), coef(rows, canary);
  dpo::forward_outputs out;
  out.loss = &scalars[0];
  out.nll_token_grad = &scalars[1];
  out.metrics = &m;
  out.set_pair_outputs(pv.data(), P);
  const bool one_buffer = k != layout::separate;
  if (one_buffer) {
    out.row_lse = lse.data();
    out.row_coef = coef.data();
  }
  if (reference_logits) {
    dpo::cpu::dpo_forward(buf.view(), rbuf.view(), nc.cfg, out, opt);
  } else {
    dpo::cpu::dpo_forward(buf.view(), ref.pc(), ref.pr(), nc.cfg, out, opt);
  }
  CHECK(same_bits(scalars[0], want.loss));
  CHECK(same_bits(scalars[1], want.nll_token_grad));
  CHECK(std::memcmp(&m, &want.metrics, sizeof m) == 0);
  check_same_pair_outputs(out, want);
  if (!one_buffer) return;
  const auto view = buf.view();
  std::vector<bool> inside(static_cast<std::size_t>(rows), false);
  for (const auto* side : {&want.chosen_rows, &want.rejected_rows}) {
    const auto& v = side == &want.chosen_rows ? view.chosen : view.rejected;
    for (std::size_t i = 0; i < side->coef.size(); ++i) {
      const std::int64_t r = side->row0 + static_cast<std::int64_t>(i);
      if (!v.in_sequence(r)) continue;
      inside[static_cast<std::size_t>(r)] = true;
      INFO("row " << r);
      CHECK(same_bits(lse[r], side->lse[i]));
      CHECK(same_bits(coef[r], side->coef[i]));
    }
  }
  for (std::int64_t r = 0; r < rows; ++r)
    if (!inside[static_cast<std::size_t>(r)]) CHECK((lse[r] == canary && coef[r] == canary));
}

}  // namespace

TEST_CASE("caller-owned dpo_forward equals the owned result bitwise (every layout and configuration)",
          "[forward][outputs]") {
  const fixture::batch_spec sp = fixture::spec(3, 5, 13, 33);
  const fixture::batch_pair batches = fixture::rounded_batch_pair<float>(sp, 7);
  for (const auto& nc : fixture::all_configs())
    for (layout k : {layout::padded, layout::separate, layout::packed})
      for (bool metrics : {true, false})
        check_caller_owned<float, std::int64_t>(nc, batches.of(k), k, metrics, false);
  for (const auto& nc : representative())
    for (layout k : {layout::padded, layout::packed})
      check_caller_owned<float, std::int32_t>(nc, batches.of(k), k, true, true);
}

TEST_CASE("caller-owned dpo_forward: null outputs are skipped, separate buffers refuse row state",
          "[forward][outputs]") {
  fixture::batch_spec sp;
  const oracle::batch b = fixture::rounded_random_batch<float>(sp);
  fixture::buffers<float, std::int64_t> sep(b, layout::separate);
  const dpo::loss_config cfg = fixture::of(dpo::loss_type::sigmoid);
  const fixture::reference ref = fixture::make_reference(cfg, b, 7);
  double loss = 0;
  dpo::forward_outputs out;
  out.loss = &loss;
  dpo::cpu::dpo_forward(sep.view(), ref.pc(), ref.pr(), cfg, out);
  CHECK(loss == dpo::cpu::dpo_forward(sep.view(), ref.pc(), ref.pr(), cfg).loss);
  std::vector<double> rows(static_cast<std::size_t>(sep.logits.size()), 0.0);
  out.row_lse = rows.data();
  fixture::expect_error([&] { dpo::cpu::dpo_forward(sep.view(), ref.pc(), ref.pr(), cfg, out); },
                        "one logits buffer");
  // One buffer whose rows both sides read (each with its own labels): the row state of the
  // two sides would share entries, so it is refused too, with nothing written.
  auto shared = sep.view();
  shared.rejected.logits = shared.chosen.logits;
  loss = -7.0;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(shared, ref.pc(), ref.pr(), cfg, out); }, "share rows");
  fixture::expect_error([&] { dpo::cpu::dpo_forward(shared, shared, cfg, out); }, "share rows");
  CHECK(loss == -7.0);
  for (double x : rows) CHECK(x == 0.0);
  out.row_lse = nullptr;
  dpo::cpu::dpo_forward(shared, ref.pc(), ref.pr(), cfg, out);  // without row state it is a valid call
  CHECK(loss != -7.0);
}

TEST_CASE("caller-owned dpo_loss equals the owned result bitwise", "[forward][outputs]") {
  for (const auto& nc : fixture::all_configs()) {
    INFO(nc.name);
    const std::int64_t P = 5;
    std::vector<double> lc(P), lr(P), rc(P), rr(P), nc_(P), nr(P), w(P);
    for (std::int64_t i = 0; i < P; ++i) {
      lc[i] = -10.0 - 1.7 * i;
      lr[i] = -11.0 - 0.9 * i;
      rc[i] = -10.5 - 1.1 * i;
      rr[i] = -10.2 - 1.3 * i;
      nc_[i] = 3 + i;
      nr[i] = 4 + (i % 2);
      w[i] = 0.5 + 0.1 * i;
    }
    const dpo::pair_logps_in in = dpo::make_pair_logps(P, lc.data(), lr.data(), rc.data(), rr.data(), nc_.data(),
                                                       nr.data(), nc.cfg.use_weighting ? w.data() : nullptr);
    const dpo::cpu::forward_result want = dpo::cpu::dpo_loss(in, nc.cfg);
    std::vector<double> pv(dpo::num_pair_outputs * P, -1.0);
    double loss = 0, nllg = 0;
    dpo::metrics m;
    dpo::forward_outputs out;
    out.loss = &loss;
    out.nll_token_grad = &nllg;
    out.metrics = &m;
    out.set_pair_outputs(pv.data(), P);
    dpo::cpu::dpo_loss(in, nc.cfg, out);
    CHECK(same_bits(loss, want.loss));
    CHECK(same_bits(nllg, want.nll_token_grad));
    CHECK(std::memcmp(&m, &want.metrics, sizeof m) == 0);
    check_same_pair_outputs(out, want);
  }
}

TEST_CASE("caller-owned dpo_forward / dpo_loss: outputs on each other or on the inputs throw and write nothing",
          "[forward][outputs]") {
  // out.losses on out.chosen_rewards used to return the rewards as the losses.
  fixture::batch_spec sp;
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  fixture::buffers<double, std::int64_t> pad(b, layout::padded);
  const dpo::loss_config cfg = fixture::of(dpo::loss_type::sigmoid);
  const fixture::reference ref = fixture::make_reference(cfg, b, 7);
  const std::int64_t P = pad.view().num_pairs();
  std::vector<double> pv(static_cast<std::size_t>(dpo::num_pair_outputs * P), -1.0);
  std::vector<double> rows(pad.logits.size(), -2.0);
  double loss = -3.0;
  const auto untouched = [&] {
    CHECK(loss == -3.0);
    for (double x : pv) CHECK(x == -1.0);
    for (double x : rows) CHECK(x == -2.0);
  };
  const auto fresh = [&] {
    dpo::forward_outputs o;
    o.loss = &loss;
    o.set_pair_outputs(pv.data(), P);
    return o;
  };
  dpo::forward_outputs out = fresh();
  out.chosen_rewards = out.losses;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(pad.view(), ref.pc(), ref.pr(), cfg, out); },
                        "out.losses overlaps out.chosen_rewards");
  fixture::expect_error([&] { dpo::cpu::dpo_forward(pad.view(), pad.view(), cfg, out); },
                        "out.losses overlaps out.chosen_rewards");
  untouched();
  out = fresh();
  out.row_lse = rows.data();
  out.row_coef = rows.data() + 1;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(pad.view(), ref.pc(), ref.pr(), cfg, out); },
                        "out.row_lse overlaps out.row_coef");
  untouched();
  // An output on the reference log-probs or on the logits.
  std::vector<double> refs(ref.c.begin(), ref.c.end());
  refs.insert(refs.end(), ref.r.begin(), ref.r.end());
  const std::vector<double> refs_before = refs;
  out = fresh();
  out.weights = refs.data() + P;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(pad.view(), refs.data(), refs.data() + P, cfg, out); },
                        "out.weights overlaps ref_rejected_logps");
  CHECK(refs == refs_before);
  std::vector<double> lg = pad.logits;
  auto on_logits = pad.view();
  on_logits.chosen.logits = on_logits.rejected.logits = lg.data();
  out = fresh();
  out.grad_chosen = lg.data() + 3;
  fixture::expect_error([&] { dpo::cpu::dpo_forward(on_logits, ref.pc(), ref.pr(), cfg, out); },
                        "out.grad_chosen overlaps logits.chosen");
  CHECK(lg == pad.logits);
  untouched();
  // ... or on a packed view's cu_seqlens, or on an explicit mask.
  {
    fixture::buffers<double, std::int64_t> pk(b, layout::packed, 0, /*explicit_mask=*/true);
    std::vector<std::int64_t> cu = pk.cu;
    auto on_cu = pk.view();
    on_cu.chosen.cu_seqlens = on_cu.rejected.cu_seqlens = cu.data();
    out = fresh();
    out.chosen_rewards = reinterpret_cast<double*>(cu.data() + 1);
    fixture::expect_error([&] { dpo::cpu::dpo_forward(on_cu, ref.pc(), ref.pr(), cfg, out); },
                          "out.chosen_rewards overlaps cu_seqlens.chosen");
    CHECK(cu == pk.cu);
    std::vector<std::uint8_t> mask = pk.mask;
    auto on_mask = pk.view();
    on_mask.chosen.mask = on_mask.rejected.mask = mask.data();
    out = fresh();
    out.loss = reinterpret_cast<double*>(mask.data() + 8);
    fixture::expect_error([&] { dpo::cpu::dpo_forward(on_mask, ref.pc(), ref.pr(), cfg, out); },
                          "out.loss overlaps mask.chosen");
    CHECK(mask == pk.mask);
    untouched();
  }
  // dpo_loss: outputs among themselves and on the reference (it copies the policy's inputs,
  // so out.chosen_logps may be in.chosen_logps).
  std::vector<double> lc(static_cast<std::size_t>(P), -10.0), lr(static_cast<std::size_t>(P), -11.0);
  const dpo::pair_logps_in in = dpo::make_pair_logps(P, lc.data(), lr.data(), ref.pc(), ref.pr());
  out = fresh();
  out.metrics = reinterpret_cast<dpo::metrics*>(pv.data());
  fixture::expect_error([&] { dpo::cpu::dpo_loss(in, cfg, out); }, "out.metrics overlaps out.losses");
  untouched();
  out = fresh();
  out.chosen_rewards = refs.data();
  const dpo::pair_logps_in on_ref = dpo::make_pair_logps(P, lc.data(), lr.data(), refs.data(), refs.data() + P);
  fixture::expect_error([&] { dpo::cpu::dpo_loss(on_ref, cfg, out); },
                        "out.chosen_rewards overlaps ref_chosen_logps");
  CHECK(refs == refs_before);
  untouched();
  out = fresh();
  out.chosen_logps = lc.data();
  dpo::cpu::dpo_loss(in, cfg, out);
  CHECK(lc[0] == -10.0);
  CHECK(loss != -3.0);
}
