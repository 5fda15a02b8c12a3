// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo::cpu::dpo_forward, sequence_logps and pair_logps against the float64 oracle: every
// loss configuration, every logits dtype, both label types, every layout, row strides,
// ignore_index and explicit masks, reference logits.
#include <Eigen/Core>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

using fixture::layout;
using fixture::run_options;

namespace {

template <class T>
oracle::batch rounded_batch(fixture::batch_spec sp) {
  oracle::batch b = fixture::random_batch(sp);
  fixture::round_batch<T>(b);
  return b;
}

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
  fixture::batch_spec sp;
  sp.pairs = 3;
  sp.rows = 5;
  sp.vocab = 13;
  sp.seed = 21;
  const oracle::batch padded = rounded_batch<T>(sp);
  sp.varying_rows = true;
  sp.rows = 7;
  const oracle::batch packed = rounded_batch<T>(sp);
  for (const auto& nc : representative()) {
    for (layout k : {layout::padded, layout::separate, layout::packed}) {
      run_options o;
      o.kind = k;
      fixture::check_forward<T, L>(nc, k == layout::packed ? packed : padded, o);
      o.stride_extra = 5;
      o.explicit_mask = true;
      fixture::check_forward<T, L>(nc, k == layout::packed ? packed : padded, o);
    }
  }
}

}  // namespace

TEST_CASE("dpo_forward matches the oracle for every configuration (float, padded)", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 3;
  const oracle::batch b = rounded_batch<float>(sp);
  for (const auto& nc : fixture::all_configs()) fixture::check_forward<float, std::int64_t>(nc, b, {});
}

TEST_CASE("dpo_forward matches the oracle for every configuration (double, packed)", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 4;
  sp.varying_rows = true;
  sp.rows = 8;
  const oracle::batch b = rounded_batch<double>(sp);
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
  const oracle::batch b = rounded_batch<float>(sp);
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
  const oracle::batch policy = rounded_batch<float>(sp);
  sp.seed = 60;
  oracle::batch reference = rounded_batch<float>(sp);
  // Same labels as the policy: the reference scores the same completions.
  for (int s = 0; s < 2; ++s)
    for (std::size_t i = 0; i < policy.chosen.size(); ++i)
      (s == 0 ? reference.chosen : reference.rejected)[i].y = (s == 0 ? policy.chosen : policy.rejected)[i].y;
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

TEST_CASE("sequence_logps: sums, counts and per-token log-probs", "[forward]") {
  fixture::batch_spec sp;
  sp.seed = 8;
  sp.varying_rows = true;
  sp.rows = 6;
  const oracle::batch packed = rounded_batch<Eigen::bfloat16>(sp);
  sp.varying_rows = false;
  const oracle::batch padded = rounded_batch<Eigen::bfloat16>(sp);
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
  const oracle::batch b = rounded_batch<double>(sp);
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
