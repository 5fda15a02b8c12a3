// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Vocabulary- and context-parallel CPU path (dpo/cpu/shard.hpp): ranks run as threads with
// an in-process all-reduce, and every result and gradient is checked against the unsharded
// call on the same batch (and the forward against the float64 oracle, with the unsharded
// tests' tolerances). Shards are uneven, labels fall in every shard, context slices leave
// some sequences empty on some ranks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <string>
#include <vector>

#include "catch.hpp"
#include "dpo/cpu/shard.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"
#include "shard_ranks.hpp"

namespace {

using fixture::buffers;
using fixture::layout;
using fixture::named_config;

using shard_ranks::cut;
using shard_ranks::group;
using shard_ranks::kVocab;
using shard_ranks::run_ranks;
using shard_ranks::shard_of;
using shard_ranks::slice;
using shard_ranks::uneven;

struct shard_case {
  layout kind = layout::padded;
  std::vector<std::int64_t> cuts;  // vocabulary boundaries: shard t = [cuts[t], cuts[t + 1])
  int context = 1;                 // context-parallel ranks
  bool in_place = false;
  bool explicit_mask = false;
  bool metrics = true;
  bool empty_last = false;  // the last context rank holds no row (the others split the rows)
};

/// Context rank c's rows of a sequence of n rows: [first, last) (of sc.context ranks, the
/// last holding none when sc.empty_last).
struct row_range {
  std::int64_t first, last;
};
inline row_range rows_of_rank(std::int64_t n, int c, const shard_case& sc) {
  const int C = sc.empty_last ? sc.context - 1 : sc.context;
  if (c >= C) return {n, n};
  return {cut(n, c, C), cut(n, c + 1, C)};
}

/// Context rank c's part of the batch: its rows of every sequence (none for an empty rank).
inline oracle::batch part_of(const oracle::batch& b, int c, const shard_case& sc) {
  if (!sc.empty_last) return slice(b, c, sc.context);
  if (c < sc.context - 1) return slice(b, c, sc.context - 1);
  oracle::batch out;
  out.chosen.resize(b.chosen.size());
  out.rejected.resize(b.rejected.size());
  return out;
}

template <class T>
double grad_rel() {
  return std::max(fixture::output_rel<T>(), 0x1p-52);
}

/// The sharded forward and backward on every rank against dpo_forward / dpo_backward.
template <class T, class L>
void check_sharded(const named_config& nc, const oracle::batch& b, const shard_case& sc) {
  using A = dpo::cpu::acc_t<T>;
  const int W = static_cast<int>(sc.cuts.size()) - 1, C = sc.context;
  INFO(nc.name << " layout " << fixture::name_of(sc.kind) << " vocab ranks " << W << " context ranks " << C
               << (sc.in_place ? " in place" : "") << (sc.explicit_mask ? " mask" : "")
               << (sc.empty_last ? " last context rank empty" : ""));
  const std::int64_t P = b.pairs(), V = static_cast<std::int64_t>(b.chosen[0].z[0].size());
  REQUIRE(sc.cuts.front() == 0);
  REQUIRE(sc.cuts.back() == V);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
  dpo::cpu::options o;
  o.num_threads = 1;
  o.metrics = sc.metrics;

  buffers<T, L> full(b, sc.kind, 0, sc.explicit_mask);
  const dpo::cpu::forward_result want = dpo::cpu::dpo_forward(full.view(), ref.pc(), ref.pr(), nc.cfg, o);
  dpo::cpu::dpo_backward(full.view(), want, full.grad_view(), 1.0, o);

  std::vector<oracle::batch> parts;
  std::vector<buffers<T, L>> local;
  for (int c = 0; c < C; ++c) parts.push_back(part_of(b, c, sc));
  // An empty rank's buffers are empty vectors: null logits, labels and gradient pointers.
  for (int c = 0; c < C; ++c) local.emplace_back(parts[c], sc.kind, 0, sc.explicit_mask, -100, 0, V);
  shard_ranks::grid ranks(W, C);
  std::vector<dpo::cpu::forward_result> got(static_cast<std::size_t>(W * C));
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, sc.cuts[t], sc.cuts[t + 1]};
    buffers<T, L>& lb = local[static_cast<std::size_t>(c)];
    const auto view = shard_of(lb.view(), sh);
    dpo::cpu::shard_state state;
    dpo::cpu::dpo_forward_sharded(view, sh, ref.pc(), ref.pr(), nc.cfg, comm,
                                  dpo::cpu::detail::owned_outputs(got[static_cast<std::size_t>(rank)], P), state, o);
    dpo::cpu::dpo_backward_sharded(view, sh, state, shard_of(sc.in_place ? lb.inplace_view() : lb.grad_view(), sh),
                                   1.0, o);
  });
  for (const std::string& e : errors) REQUIRE(e.empty());

  const oracle::result exact = oracle::forward(nc.cfg, b, fixture::to_ld(ref.c), fixture::to_ld(ref.r));
  const fixture::forward_tol tol = fixture::tolerances<A>(b);
  const bool metrics = sc.metrics || nc.cfg.use_weighting;
  for (std::size_t k = 0; k < got.size(); ++k) {
    INFO("rank " << k);
    const dpo::cpu::forward_result& r = got[k];
    // Every rank holds the same values, bitwise.
    CHECK(r.loss == got[0].loss);
    CHECK(std::memcmp(&r.metrics, &got[0].metrics, sizeof r.metrics) == 0);
    CHECK(r.losses == got[0].losses);
    CHECK(r.grad_chosen == got[0].grad_chosen);
    fixture::compare_forward(r, exact, tol, nc.cfg, metrics);
    // Against the unsharded call: both within the oracle's bounds, so within twice them.
    CHECK(fixture::near(r.loss, want.loss, (std::is_same_v<A, float> ? 1e-5 : 2e-9) * (1 + std::fabs(want.loss))));
    CHECK(r.metrics.mean_token_accuracy == want.metrics.mean_token_accuracy);
    CHECK(r.chosen_tokens == want.chosen_tokens);
    CHECK(r.rejected_tokens == want.rejected_tokens);
    CHECK(r.nll_token_grad == Approx(want.nll_token_grad).epsilon(1e-6).margin(1e-300));
  }

  // Gradients: each context rank's rows against the unsharded gradient's.
  for (int c = 0; c < C; ++c) {
    const buffers<T, L>& lb = local[static_cast<std::size_t>(c)];
    for (int side = 0; side < 2; ++side) {
      const std::vector<oracle::sequence>& seqs = side == 0 ? b.chosen : b.rejected;
      const dpo::cpu::side_rows& rows = side == 0 ? want.chosen_rows : want.rejected_rows;
      for (std::int64_t i = 0; i < P; ++i) {
        const row_range rr = rows_of_rank(seqs[i].rows(), c, sc);
        const std::int64_t k0 = rr.first, k1 = rr.last;
        for (std::int64_t k = k0; k < k1; ++k) {
          const std::int64_t row = full.start[side][i] + k;
          const double coef = std::fabs(rows.coef[static_cast<std::size_t>(row - rows.row0)]);
          INFO("context rank " << c << " side " << side << " pair " << i << " row " << k);
          for (std::int64_t v = 0; v < V; ++v) {
            const double g = lb.at(sc.in_place, side, i, k - k0, v);
            const double e = full.at(false, side, i, k, v);
            if (seqs[i].y[k] < 0) {
              CHECK(g == 0.0);
              continue;
            }
            const double tl = 2 * grad_rel<T>() * std::fabs(e) + 2 * coef * (tol.tok + tol.seq) +
                              fixture::output_floor<T>() + 1e-300;
            if (!fixture::near(g, e, tl)) FAIL_CHECK("v " << v << ": got " << g << " want " << e << " tol " << tl);
          }
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("vocabulary shards: every configuration, float, 3 uneven ranks", "[shard]") {
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(3, 6, kVocab, 11));
  shard_case sc;
  sc.cuts = uneven(kVocab, 3);
  for (const named_config& nc : fixture::all_configs()) check_sharded<float, std::int64_t>(nc, b, sc);
}

TEST_CASE("vocabulary shards: layouts, dtypes, masks, in place", "[shard]") {
  const char* names[] = {"sigmoid", "mpo+wpo", "sigmoid+ld_alpha", "aot+aot_unpaired", "cpo/ipo", "orpo"};
  for (const layout kind : {layout::padded, layout::packed, layout::separate}) {
    for (const bool in_place : {false, true}) {
      shard_case sc;
      sc.kind = kind;
      sc.in_place = in_place;
      sc.explicit_mask = in_place;
      for (const int world : {1, 2, 4}) {
        sc.cuts = uneven(kVocab, world);
        fixture::batch_spec sp = fixture::spec(2, 5, kVocab, 21 + world);
        sp.varying_rows = kind == layout::packed;
        for (const char* n : names) {
          const named_config& nc = fixture::config_named(n);
          check_sharded<double, std::int64_t>(nc, fixture::rounded_random_batch<double>(sp), sc);
          check_sharded<Eigen::bfloat16, std::int32_t>(nc, fixture::rounded_random_batch<Eigen::bfloat16>(sp), sc);
        }
        sc.metrics = false;
        check_sharded<Eigen::half, std::int64_t>(fixture::config_named("sigmoid"),
                                                 fixture::rounded_random_batch<Eigen::half>(sp), sc);
        sc.metrics = true;
      }
    }
  }
}

namespace {

/// Context groups of 2 and 3 ranks, each alone and with 2 vocabulary shards (in place), for
/// padded and packed batches of `sp` whose first chosen sequence has at least `min_rows` rows
/// (the fixture's buffers read the vocabulary off chosen[0]); `empty_last`: the last context
/// rank holds no row.
void context_sweep(std::initializer_list<const char*> names, fixture::batch_spec sp, std::int64_t min_rows,
                   bool empty_last) {
  for (const layout kind : {layout::padded, layout::packed}) {
    sp.varying_rows = kind == layout::packed;
    oracle::batch b = fixture::rounded_random_batch<float>(sp);
    while (b.chosen[0].rows() < min_rows) {
      ++sp.seed;
      b = fixture::rounded_random_batch<float>(sp);
    }
    for (const int C : {2, 3}) {
      for (const int W : {1, 2}) {
        shard_case sc;
        sc.kind = kind;
        sc.context = C;
        sc.empty_last = empty_last;
        sc.cuts = uneven(kVocab, W);
        sc.in_place = W == 2;
        for (const char* n : names) check_sharded<float, std::int64_t>(fixture::config_named(n), b, sc);
      }
    }
  }
}

}  // namespace

TEST_CASE("context parallelism, alone and with vocabulary shards", "[shard]") {
  context_sweep({"sigmoid", "mpo+wpo", "ipo", "aot+aot_unpaired", "simpo", "sft"}, fixture::spec(3, 7, kVocab, 31), 3,
                false);
}

TEST_CASE("dpo_forward_sharded makes one max and one sum over the buffer's rows per call", "[shard]") {
  // The concatenated layouts (padded, packed) share one array over the logits buffer's rows,
  // as the PyTorch ops do (docs/distributed.md); separate buffers take one of each per side.
  // World size 1 (the whole vocabulary), so the callbacks only count and sizes can be read.
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(2, 4, kVocab, 17));
  const dpo::loss_config cfg = fixture::config_named("sigmoid").cfg;
  const fixture::reference ref = fixture::make_reference(cfg, b, 7);
  for (const layout kind : {layout::padded, layout::packed, layout::separate}) {
    INFO(fixture::name_of(kind));
    buffers<float, std::int64_t> buf(b, kind);
    const dpo::pair_view<float, std::int64_t> v = buf.view();
    std::vector<std::int64_t> max_sizes, sum_sizes;
    dpo::cpu::collectives comm;
    comm.vocab_max = [&](double*, std::int64_t n) { max_sizes.push_back(n); };
    comm.vocab_sum = [&](double*, std::int64_t n) { sum_sizes.push_back(n); };
    dpo::cpu::shard_state st;
    double loss = 0;
    dpo::forward_outputs out;
    out.loss = &loss;
    dpo::cpu::dpo_forward_sharded(v, dpo::vocab_shard{kVocab, 0, kVocab}, ref.pc(), ref.pr(), cfg, comm, out, st);
    const std::int64_t rows_c = dpo::cpu::detail::rows_end(v.chosen);
    const std::int64_t rows_r = dpo::cpu::detail::rows_end(v.rejected);
    if (kind == layout::separate) {
      CHECK(max_sizes == std::vector<std::int64_t>{rows_c, rows_r});
      CHECK(sum_sizes == std::vector<std::int64_t>{rows_c * dpo::shard_fields, rows_r * dpo::shard_fields});
    } else {
      CHECK(max_sizes == std::vector<std::int64_t>{rows_r});
      CHECK(sum_sizes == std::vector<std::int64_t>{rows_r * dpo::shard_fields});
    }
    CHECK(st.chosen_max.size() == static_cast<std::size_t>(rows_c));
    CHECK(st.rejected_max.size() == static_cast<std::size_t>(rows_r));
    CHECK(loss == Approx(dpo::cpu::dpo_forward(v, ref.pc(), ref.pr(), cfg).loss).epsilon(1e-12));
    // The backward from that state equals the unsharded one.
    const dpo::cpu::forward_result want = dpo::cpu::dpo_forward(v, ref.pc(), ref.pr(), cfg);
    buffers<float, std::int64_t> g(b, kind);
    dpo::cpu::dpo_backward(g.view(), want, g.grad_view());
    dpo::cpu::dpo_backward_sharded(v, dpo::vocab_shard{kVocab, 0, kVocab}, st, buf.grad_view());
    for (std::size_t i = 0; i < g.grad.size(); ++i) CHECK(buf.grad[i] == Approx(g.grad[i]).epsilon(1e-5).margin(1e-7));
    for (std::size_t i = 0; i < g.grad_r.size(); ++i)
      CHECK(buf.grad_r[i] == Approx(g.grad_r[i]).epsilon(1e-5).margin(1e-7));
  }
}

TEST_CASE("argmax ties across shards decide token accuracy as torch.argmax does", "[shard]") {
  // One row per sequence, every logit 0 except 1.0 at columns 3 and 20 (two shards of
  // [0, 10), [10, 37)); the label at 3 is a hit, at 20 a miss (the first maximum wins), at
  // 9 a miss.
  oracle::batch b;
  for (const std::int64_t y : {3, 20, 9, 3}) {
    oracle::sequence s;
    std::vector<double> z(kVocab, 0.0);
    z[3] = z[20] = 1.0;
    s.z.push_back(z);
    s.y.push_back(y);
    (b.chosen.size() < 2 ? b.chosen : b.rejected).push_back(s);
  }
  shard_case sc;
  sc.cuts = {0, 10, kVocab};
  check_sharded<float, std::int64_t>(fixture::config_named("sigmoid"), b, sc);
  sc.cuts = {0, 3, 4, 21, kVocab};
  check_sharded<double, std::int64_t>(fixture::config_named("sigmoid"), b, sc);
}

TEST_CASE("combine_shard_records equals the two all-reduces bitwise", "[shard]") {
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(2, 5, kVocab, 41));
  buffers<float, std::int64_t> full(b, layout::padded);
  const auto v = full.view().chosen;
  const std::vector<std::int64_t> cuts = uneven(kVocab, 3);
  const std::int64_t rows = v.row_end(v.num_seqs - 1);
  std::vector<std::vector<double>> rec(3, std::vector<double>(rows * dpo::shard_fields));
  std::vector<std::vector<double>> mx(3, std::vector<double>(rows));
  for (int t = 0; t < 3; ++t) {
    const dpo::vocab_shard sh{kVocab, cuts[t], cuts[t + 1]};
    auto sv = v;
    sv.logits += sh.start;
    sv.vocab = sh.width();
    dpo::cpu::shard_partials(sv, sh, rec[t].data(), mx[t].data());
  }
  const double* ptrs[3] = {rec[0].data(), rec[1].data(), rec[2].data()};
  std::vector<double> cm(rows), cr(rows * dpo::shard_fields);
  dpo::cpu::combine_shard_records(0, rows, 3, ptrs, cm.data(), cr.data());
  // The collectives' way, as the in-process group computes it.
  std::vector<double> M(rows, -INFINITY), S(rows * dpo::shard_fields, 0.0);
  for (int t = 0; t < 3; ++t)
    for (std::int64_t r = 0; r < rows; ++r) M[r] = mx[t][r] > M[r] ? mx[t][r] : M[r];
  for (int t = 0; t < 3; ++t) {
    std::vector<double> x = rec[t];
    dpo::cpu::shard_rebase(0, rows, M.data(), x.data());
    for (std::size_t i = 0; i < x.size(); ++i) S[i] += x[i];
  }
  CHECK(cm == M);
  CHECK(std::memcmp(cr.data(), S.data(), S.size() * sizeof(double)) == 0);
}

TEST_CASE("sharded sequence log-probs and their backward", "[shard]") {
  fixture::batch_spec sp = fixture::spec(3, 6, kVocab, 51);
  sp.varying_rows = true;
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  buffers<double, std::int64_t> full(b, layout::packed);
  const auto p = full.view();
  dpo::token_view<double, std::int64_t> v = p.chosen;
  v.num_seqs = 2 * p.num_pairs();
  const std::int64_t S = v.num_seqs;
  std::vector<double> sums(S), lse(full.cu.back()), seq_grad(S);
  std::vector<std::int64_t> counts(S);
  dpo::cpu::sequence_logps(v, sums.data(), counts.data(), nullptr, lse.data());
  for (std::int64_t s = 0; s < S; ++s) seq_grad[s] = 0.5 - 0.25 * static_cast<double>(s);
  std::vector<double> g(full.logits.size(), 0.0);
  dpo::cpu::sequence_logps_backward(v, lse.data(), seq_grad.data(), g.data(), full.stride);

  const std::vector<std::int64_t> cuts = uneven(kVocab, 3);
  group grp(3);
  std::vector<std::vector<double>> got_sums(3, std::vector<double>(S)), got_counts(3, std::vector<double>(S));
  std::vector<double> sg(full.logits.size(), -7.0);
  run_ranks(3, [&](int t) {
    const dpo::vocab_shard sh{kVocab, cuts[t], cuts[t + 1]};
    auto sv = v;
    sv.logits += sh.start;
    sv.vocab = sh.width();
    dpo::cpu::collectives comm;
    comm.vocab_max = [&, t](double* d, std::int64_t n) { grp.reduce(t, d, n, true); };
    comm.vocab_sum = [&, t](double* d, std::int64_t n) { grp.reduce(t, d, n, false); };
    dpo::cpu::shard_state st;
    dpo::cpu::sequence_logps_sharded(sv, sh, comm, got_sums[t].data(), got_counts[t].data(), st);
    dpo::cpu::shard_sequence_backward(sv, sh, st.chosen_max.data(), st.chosen_records.data(), seq_grad.data(),
                                      sg.data() + sh.start, full.stride);
  });
  for (int t = 0; t < 3; ++t)
    for (std::int64_t s = 0; s < S; ++s) {
      CHECK(got_sums[t][s] == Approx(sums[s]).epsilon(1e-13));
      CHECK(got_counts[t][s] == static_cast<double>(counts[s]));
    }
  for (std::int64_t r = 0; r < full.cu.back(); ++r)
    for (std::int64_t k = 0; k < kVocab; ++k)
      CHECK(sg[r * full.stride + k] == Approx(g[r * full.stride + k]).epsilon(1e-12).margin(1e-15));
}

TEST_CASE("sharded calls reject bad shards, labels and LD-DPO with context parallelism", "[shard]") {
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(2, 4, kVocab, 61));
  buffers<float, std::int64_t> full(b, layout::padded);
  const fixture::reference ref = fixture::make_reference(fixture::config_named("sigmoid").cfg, b, 7);
  const auto run = [&](const dpo::vocab_shard& sh, const dpo::loss_config& cfg, const dpo::cpu::collectives& comm) {
    dpo::cpu::shard_state st;
    dpo::cpu::forward_result r;
    dpo::cpu::dpo_forward_sharded(shard_of(full.view(), sh), sh, ref.pc(), ref.pr(), cfg, comm,
                                  dpo::cpu::detail::owned_outputs(r, 2), st);
  };
  const dpo::loss_config& cfg = fixture::config_named("sigmoid").cfg;
  dpo::cpu::collectives none;
  fixture::expect_error([&] { run({kVocab, 5, 5}, cfg, none); }, "vocab_shard [start, end)");
  fixture::expect_error([&] { run({kVocab, 30, 40}, cfg, none); }, "vocab_shard [start, end)");
  // The view's width must be the shard's.
  fixture::expect_error(
      [&] {
        dpo::cpu::shard_state st;
        dpo::cpu::forward_result r;
        dpo::cpu::dpo_forward_sharded(full.view(), dpo::vocab_shard{kVocab, 0, 10}, ref.pc(), ref.pr(), cfg, none,
                                      dpo::cpu::detail::owned_outputs(r, 2), st);
      },
      "holds 10 columns");
  // A label past the global vocabulary, whichever shard this is.
  full.labels[1] = kVocab;
  fixture::expect_error([&] { run({kVocab, 0, 10}, cfg, none); }, "outside [0, vocab = 37)");
  full.labels[1] = kVocab - 1;  // on another shard: fine
  run({kVocab, 0, 10}, cfg, none);
  dpo::cpu::collectives cp;
  cp.context_sum = [](double*, std::int64_t) {};
  fixture::expect_error([&] { run({kVocab, 0, kVocab}, fixture::config_named("sigmoid+ld_alpha").cfg, cp); },
                        "ld_alpha");
}

TEST_CASE("a context rank's bad slice makes every context rank throw, none waits", "[shard]") {
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(2, 6, kVocab, 71));
  const fixture::reference ref = fixture::make_reference(fixture::config_named("sigmoid").cfg, b, 7);
  std::vector<buffers<float, std::int64_t>> local;
  for (int c = 0; c < 2; ++c) local.emplace_back(slice(b, c, 2), layout::padded);
  local[1].labels[2] = kVocab + 3;  // rank 1's own label, outside the vocabulary
  group grp(2);
  std::vector<std::string> errors(2);
  run_ranks(2, [&](int c) {
    dpo::cpu::collectives comm;
    comm.context_sum = [&, c](double* d, std::int64_t n) { grp.reduce(c, d, n, false); };
    dpo::cpu::shard_state st;
    dpo::cpu::forward_result r;
    try {
      dpo::cpu::dpo_forward_sharded(local[c].view(), dpo::whole_vocab(kVocab), ref.pc(), ref.pr(),
                                    fixture::config_named("sigmoid").cfg, comm, dpo::cpu::detail::owned_outputs(r, 2),
                                    st);
    } catch (const dpo::error& e) {
      errors[c] = e.what();
    }
  });
  CHECK(errors[0].find("rank(s) of the context group rejected their input") != std::string::npos);
  CHECK(errors[1].find("is outside [0, vocab = 37)") != std::string::npos);
  // The same for sequence log-probs.
  errors.assign(2, "");
  run_ranks(2, [&](int c) {
    dpo::cpu::collectives comm;
    comm.context_sum = [&, c](double* d, std::int64_t n) { grp.reduce(c, d, n, false); };
    dpo::cpu::shard_state st;
    auto sv = local[c].view().chosen;
    sv.num_seqs = 4;
    std::vector<double> sums(4), counts(4);
    try {
      dpo::cpu::sequence_logps_sharded(sv, dpo::whole_vocab(kVocab), comm, sums.data(), counts.data(), st);
    } catch (const dpo::error& e) {
      errors[c] = e.what();
    }
  });
  CHECK(errors[0].find("rank(s) of the context group rejected their input") != std::string::npos);
  CHECK(errors[1].find("is outside [0, vocab = 37)") != std::string::npos);
}

TEST_CASE("a context rank holding no row: results and gradients equal the unsharded call", "[shard]") {
  // Its logits, labels and gradient are empty buffers (null pointers, as an empty tensor's),
  // and so are the records and maxima the drivers keep for it.
  context_sweep({"sigmoid", "mpo+wpo", "aot+aot_unpaired", "sft"}, fixture::spec(3, 6, kVocab, 81), 2, true);
}

TEST_CASE("sharded sequence log-probs with a context rank holding no row", "[shard]") {
  fixture::batch_spec sp = fixture::spec(2, 5, kVocab, 91);
  const oracle::batch b = fixture::rounded_random_batch<double>(sp);
  for (const layout kind : {layout::padded, layout::packed}) {
    INFO("layout " << fixture::name_of(kind));
    buffers<double, std::int64_t> full(b, kind);
    auto v = full.view().chosen;
    v.num_seqs = 2 * b.pairs();
    const std::int64_t S = v.num_seqs;
    const std::int64_t rows = kind == layout::packed ? full.cu.back() : S * full.seq_len;
    std::vector<double> sums(S), lse(static_cast<std::size_t>(rows)), seq_grad(S);
    std::vector<std::int64_t> counts(S);
    dpo::cpu::sequence_logps(v, sums.data(), counts.data(), nullptr, lse.data());
    for (std::int64_t s = 0; s < S; ++s) seq_grad[s] = 0.75 - 0.5 * static_cast<double>(s);
    std::vector<double> g(full.logits.size(), 0.0);
    dpo::cpu::sequence_logps_backward(v, lse.data(), seq_grad.data(), g.data(), full.stride);

    oracle::batch none;
    none.chosen.resize(b.chosen.size());
    none.rejected.resize(b.rejected.size());
    buffers<double, std::int64_t> empty(none, kind, 0, false, -100, 0, kVocab);
    group grp(2);
    std::vector<std::vector<double>> got_sums(2, std::vector<double>(S)), got_counts(2, std::vector<double>(S));
    run_ranks(2, [&](int c) {
      buffers<double, std::int64_t>& lb = c == 0 ? full : empty;
      auto sv = lb.view().chosen;
      sv.num_seqs = S;
      dpo::cpu::collectives comm;
      comm.context_sum = [&, c](double* d, std::int64_t n) { grp.reduce(c, d, n, false); };
      dpo::cpu::shard_state st;
      dpo::cpu::sequence_logps_sharded(sv, dpo::whole_vocab(kVocab), comm, got_sums[c].data(), got_counts[c].data(),
                                       st);
      dpo::cpu::shard_sequence_backward(sv, dpo::whole_vocab(kVocab), st.chosen_max.data(), st.chosen_records.data(),
                                        seq_grad.data(), lb.grad.data(), lb.stride);
    });
    CHECK(empty.logits.data() == nullptr);
    for (int c = 0; c < 2; ++c)
      for (std::int64_t s = 0; s < S; ++s) {
        CHECK(got_sums[c][s] == Approx(sums[s]).epsilon(1e-13));
        CHECK(got_counts[c][s] == static_cast<double>(counts[s]));
      }
    for (std::size_t i = 0; i < g.size(); ++i) {
      if (std::isnan(full.logits[i])) continue;  // a column past the vocabulary or a gap
      CHECK(full.grad[i] == Approx(g[i]).epsilon(1e-12).margin(1e-15));
    }
  }
}

TEST_CASE("the building blocks take null row state for a side without rows, and name it otherwise", "[shard]") {
  // Padded T = 0 and packed with every sequence empty: no row, every row buffer null.
  const dpo::vocab_shard sh{kVocab, 0, kVocab};
  const std::int64_t zero_cu[5] = {0, 0, 0, 0, 0};
  for (const bool packed : {false, true}) {
    INFO((packed ? "packed" : "padded"));
    dpo::pair_view<float, std::int64_t> p =
        packed ? dpo::packed_pairs<float, std::int64_t>(nullptr, nullptr, zero_cu, 4, kVocab, kVocab)
               : dpo::padded_pairs<float, std::int64_t>(nullptr, nullptr, 4, 0, kVocab, kVocab);
    std::vector<double> seq(static_cast<std::size_t>(dpo::seq_fields * 4), -1.0), seq_grad(4, 0.5);
    dpo::cpu::shard_partials(p.chosen, sh, nullptr, nullptr);
    dpo::cpu::shard_pair_partials(p, sh, nullptr, nullptr, nullptr, nullptr, 1.0, seq.data());
    for (std::int64_t s = 0; s < 4; ++s) CHECK(seq[dpo::detail::at(dpo::seq_field::tokens) * 4 + s] == 0.0);
    dpo::cpu::shard_backward(p, sh, nullptr, nullptr, nullptr, nullptr, seq_grad.data(), 0.0, 1.0,
                             dpo::pair_grad_view<float>{nullptr, kVocab, nullptr, kVocab});
    auto tv = p.chosen;
    tv.num_seqs = 4;
    dpo::cpu::shard_sequence_partials(tv, sh, nullptr, nullptr, seq.data());
    // seq / seq_grad are per sequence: still required.
    fixture::expect_error([&] { dpo::cpu::shard_pair_partials(p, sh, nullptr, nullptr, nullptr, nullptr, 1.0, nullptr); },
                          "shard_pair_partials: seq is null");
    fixture::expect_error(
        [&] {
          dpo::cpu::shard_backward(p, sh, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0, 1.0,
                                   dpo::pair_grad_view<float>{nullptr, kVocab, nullptr, kVocab});
        },
        "shard_backward: seq_grad is null");
    fixture::expect_error([&] { dpo::cpu::shard_sequence_partials(tv, sh, nullptr, nullptr, nullptr); },
                          "seq is null");
  }
  // With rows, each null argument is named.
  const oracle::batch b = fixture::rounded_random_batch<float>(fixture::spec(2, 4, kVocab, 95));
  buffers<float, std::int64_t> full(b, layout::padded);
  const auto p = full.view();
  const std::int64_t rows = 4 * full.seq_len;
  std::vector<double> mx(rows), rec(rows * dpo::shard_fields), seq(dpo::seq_fields * 4), seq_grad(4, 0.5);
  fixture::expect_error([&] { dpo::cpu::shard_partials(p.chosen, sh, nullptr, mx.data()); }, "records is null");
  dpo::cpu::shard_partials(p.chosen, sh, rec.data(), mx.data());
  fixture::expect_error(
      [&] { dpo::cpu::shard_pair_partials(p, sh, mx.data(), rec.data(), mx.data(), nullptr, 1.0, seq.data()); },
      "shard_pair_partials: rejected_records is null");
  fixture::expect_error(
      [&] { dpo::cpu::shard_pair_partials(p, sh, nullptr, rec.data(), mx.data(), rec.data(), 1.0, seq.data()); },
      "shard_pair_partials: chosen_max is null");
  fixture::expect_error(
      [&] {
        dpo::cpu::shard_backward(p, sh, mx.data(), nullptr, mx.data(), rec.data(), seq_grad.data(), 0.0, 1.0,
                                 full.grad_view());
      },
      "shard_backward: chosen_records is null");
  auto tv = p.chosen;
  tv.num_seqs = 4;
  fixture::expect_error([&] { dpo::cpu::shard_sequence_partials(tv, sh, mx.data(), nullptr, seq.data()); },
                        "records is null");
  // grad_output must be finite; nothing is written.
  dpo::cpu::shard_pair_partials(p, sh, mx.data(), rec.data(), mx.data(), rec.data(), 1.0, seq.data());
  std::fill(full.grad.begin(), full.grad.end(), 7.0f);
  std::fill(full.grad_r.begin(), full.grad_r.end(), 7.0f);
  const std::vector<float> grad_before = full.grad, grad_r_before = full.grad_r;
  for (const double bad : {std::nan(""), -HUGE_VAL}) {
    fixture::expect_error(
        [&] {
          dpo::cpu::shard_backward(p, sh, mx.data(), rec.data(), mx.data(), rec.data(), seq_grad.data(), 0.0, 1.0,
                                   full.grad_view(), bad);
        },
        "grad_output");
    CHECK(full.grad == grad_before);
    CHECK(full.grad_r == grad_r_before);
  }
  // nll_token_grad is the forward's value, as seq_grad: NaN where the data were (WPO's mean
  // weight with an NLL term), taken as data and propagated into the chosen rows, as the
  // unsharded backward's row coefficients.
  dpo::cpu::shard_backward(p, sh, mx.data(), rec.data(), mx.data(), rec.data(), seq_grad.data(), std::nan(""), 1.0,
                           full.grad_view());
  CHECK(std::any_of(full.grad.begin(), full.grad.end(), [](float x) { return std::isnan(x); }));
}

namespace {

/// A padded batch of 2 pairs x 3 rows, global vocabulary 8, float64 logits; views of the
/// columns [s0, s1).
struct alias_batch {
  static constexpr std::int64_t P = 2, L = 3, V = 8;
  std::vector<double> logits;
  std::vector<std::int64_t> labels;
  alias_batch() {
    logits.resize(static_cast<std::size_t>(2 * P * L * V));
    for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(0.7 * static_cast<double>(i) + 0.3) * 3.0;
    labels.resize(static_cast<std::size_t>(2 * P * L));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>((i * 5 + 1) % V);
    labels[0] = -100;
  }
  static constexpr std::int64_t rows() { return 2 * P * L; }
  dpo::token_view<double, std::int64_t> view(const double* base, std::int64_t s0, std::int64_t s1) const {
    dpo::token_view<double, std::int64_t> v;
    v.logits = base + s0;
    v.labels = labels.data();
    v.vocab = s1 - s0;
    v.row_stride = V;
    v.num_seqs = 2 * P;
    v.seq_len = L;
    return v;
  }
  dpo::pair_view<double, std::int64_t> pairs(const double* base, std::int64_t s0, std::int64_t s1) const {
    return dpo::padded_pairs<double, std::int64_t>(base + s0, labels.data(), 2 * P, L, s1 - s0, V);
  }
};

}  // namespace

TEST_CASE("shards: outputs on inputs or on each other, null or negative row ranges, throw and write nothing",
          "[shard]") {
  using dpo::shard_fields;
  constexpr std::int64_t n = alias_batch::rows(), P = alias_batch::P, S = 2 * P, V = alias_batch::V;
  const alias_batch b;
  const dpo::vocab_shard whole{V, 0, V};
  const auto v = b.view(b.logits.data(), 0, V);
  const auto pv = b.pairs(b.logits.data(), 0, V);
  // Valid combined state (world 1): maxima, rebased records, sequence sums.
  std::vector<double> rec(static_cast<std::size_t>(n * shard_fields)), mx(static_cast<std::size_t>(n));
  dpo::cpu::shard_partials(v, whole, rec.data(), mx.data());
  dpo::cpu::shard_rebase(0, n, mx.data(), rec.data());
  std::vector<double> seq(static_cast<std::size_t>(dpo::seq_fields * S));
  dpo::cpu::shard_pair_partials(pv, whole, mx.data(), rec.data(), mx.data(), rec.data(), 1.0, seq.data());
  // One scratch buffer that every aliased output points into: nothing may change in it.
  std::vector<double> buf(static_cast<std::size_t>(n * shard_fields + n * V + 64));
  const auto refused = [&](const char* what, const std::function<void()>& f) {
    INFO(what);
    const std::vector<double> before = buf;
    fixture::expect_error(f, what);
    CHECK(buf == before);
  };
  std::copy(rec.begin(), rec.end(), buf.begin());
  double* const brec = buf.data();  // a copy of the records at the buffer's start

  // Phase 1.
  refused("row_max overlaps records", [&] { dpo::cpu::shard_partials(v, whole, brec, brec + 5); });
  {
    std::vector<double> lg = b.logits;  // records over the logits, one row ahead
    const std::vector<double> before = lg;
    fixture::expect_error([&] { dpo::cpu::shard_partials(b.view(lg.data(), 0, V), whole, lg.data() + V, mx.data()); },
                          "records overlaps logits");
    CHECK(lg == before);
  }
  // Between the collectives.
  refused("records overlaps row_max", [&] { dpo::cpu::shard_rebase(0, n, brec + 8, brec); });
  refused("row_max is null", [&] { dpo::cpu::shard_rebase(0, n, nullptr, brec); });
  refused("records is null", [&] { dpo::cpu::shard_rebase(0, n, mx.data(), nullptr); });
  refused("begin = -1000000000 is invalid", [&] { dpo::cpu::shard_rebase(-1000000000, 1, mx.data(), brec); });
  refused("end = 2 is invalid: must be >= begin = 3", [&] { dpo::cpu::shard_rebase(3, 2, mx.data(), brec); });
  {
    const double* ranks[2] = {rec.data(), brec};
    refused("records overlaps rank_records", [&] {
      dpo::cpu::combine_shard_records(0, n, 2, ranks, buf.data() + n * shard_fields,
                                      brec);
    });
    const double* one_null[2] = {rec.data(), nullptr};
    refused("rank_records[1] is null",
            [&] { dpo::cpu::combine_shard_records(0, n, 2, one_null, buf.data() + n * shard_fields, brec); });
    refused("rank_records is null",
            [&] { dpo::cpu::combine_shard_records(0, n, 2, nullptr, buf.data() + n * shard_fields, brec); });
    refused("row_max overlaps rank_records", [&] {
      const double* r1[1] = {brec};
      dpo::cpu::combine_shard_records(0, n, 1, r1, brec + 3, buf.data() + n * shard_fields);
    });
    refused("begin = -7 is invalid", [&] {
      const double* r1[1] = {rec.data()};
      dpo::cpu::combine_shard_records(-7, 1, 1, r1, mx.data(), brec);
    });
  }
  // Phase 2.
  refused("seq overlaps records", [&] { dpo::cpu::shard_sequence_partials(v, whole, mx.data(), brec, brec + 4); });
  refused("seq overlaps chosen_records",
          [&] { dpo::cpu::shard_pair_partials(pv, whole, mx.data(), brec, mx.data(), rec.data(), 1.0, brec); });
  // The pair stage: seq_grad on a per-pair output, or an output on the totals.
  dpo::loss_config cfg;
  cfg.reference_free = true;
  {
    dpo::forward_outputs o;
    o.losses = buf.data();
    refused("seq_grad overlaps out.losses",
            [&] { dpo::cpu::shard_pair_stage(P, seq.data(), nullptr, nullptr, cfg, true, o, buf.data()); });
    std::copy(seq.begin(), seq.end(), buf.begin());
    o.losses = buf.data() + 1;
    refused("out.losses overlaps seq_totals",
            [&] { dpo::cpu::shard_pair_stage(P, buf.data(), nullptr, nullptr, cfg, true, o, buf.data() + 200); });
    std::copy(rec.begin(), rec.end(), buf.begin());
  }
  // The backward: a gradient on the row state or on seq_grad (not the logits: in place).
  const std::vector<double> sg{0.3, -0.2, -0.4, 0.25};
  {
    std::copy(mx.begin(), mx.end(), buf.begin() + n * shard_fields);
    double* const bmax = buf.data() + n * shard_fields;
    std::vector<double> gr(static_cast<std::size_t>(n * V));
    refused("grad.chosen overlaps chosen_max", [&] {
      dpo::cpu::shard_backward(pv, whole, bmax, rec.data(), mx.data(), rec.data(), sg.data(), 0.0, 1.0,
                               dpo::pair_grad_view<double>{bmax, V, gr.data(), V});
    });
    refused("grad overlaps records", [&] {
      dpo::cpu::shard_sequence_backward(v, whole, mx.data(), brec, sg.data(), brec + 8, V);
    });
    std::copy(sg.begin(), sg.end(), buf.begin());
    refused("grad overlaps seq_grad", [&] {
      dpo::cpu::shard_sequence_backward(v, whole, mx.data(), rec.data(), buf.data(), buf.data(), V);
    });
    // Packed views read cu_seqlens too: an output over it is refused.
    {
      std::int64_t* const cu = reinterpret_cast<std::int64_t*>(buf.data() + 3);
      for (std::int64_t k = 0; k <= S; ++k) cu[k] = k * alias_batch::L;
      const auto pk = dpo::packed_pairs<double, std::int64_t>(b.logits.data(), b.labels.data(), cu, S, V, V);
      std::vector<double> m2(static_cast<std::size_t>(n));
      refused("records overlaps cu_seqlens", [&] { dpo::cpu::shard_partials(pk.chosen, whole, buf.data(), m2.data()); });
      std::vector<double> g2(static_cast<std::size_t>(n * V));
      refused("grad.chosen overlaps cu_seqlens.chosen", [&] {
        dpo::cpu::shard_backward(pk, whole, mx.data(), rec.data(), mx.data(), rec.data(), sg.data(), 0.0, 1.0,
                                 dpo::pair_grad_view<double>{reinterpret_cast<double*>(cu), V, g2.data(), V});
      });
    }
    std::copy(rec.begin(), rec.end(), buf.begin());
    // In place (the gradient over the logits themselves) stays allowed.
    std::vector<double> lg = b.logits;
    std::vector<double> out(static_cast<std::size_t>(n * V));
    dpo::cpu::shard_sequence_backward(b.view(lg.data(), 0, V), whole, mx.data(), rec.data(), sg.data(), lg.data(), V);
    dpo::cpu::shard_sequence_backward(v, whole, mx.data(), rec.data(), sg.data(), out.data(), V);
    CHECK(lg == out);
  }
  // The drivers: a state whose records do not match its maxima; sums on counts.
  {
    dpo::cpu::shard_state st;
    dpo::cpu::dpo_forward_sharded(pv, whole, nullptr, nullptr, cfg, dpo::cpu::collectives{}, dpo::forward_outputs{},
                                  st);
    st.chosen_records.resize(shard_fields);  // one row's record for six rows of maxima
    std::vector<double> g(static_cast<std::size_t>(n * V));
    fixture::expect_error(
        [&] { dpo::cpu::dpo_backward_sharded(pv, whole, st, dpo::pair_grad_view<double>{g.data(), V, g.data(), V}); },
        "shard_state does not match logits");
    std::vector<double> sums(static_cast<std::size_t>(S), 7.0);
    fixture::expect_error(
        [&] { dpo::cpu::sequence_logps_sharded(v, whole, dpo::cpu::collectives{}, sums.data(), sums.data(), st); },
        "sums overlaps counts");
    for (double x : sums) CHECK(x == 7.0);
  }
}

TEST_CASE("shards: a forward that throws after a peer's failure leaves the state as it was", "[shard]") {
  const alias_batch b;
  const std::int64_t V = alias_batch::V;
  const dpo::vocab_shard whole{V, 0, V};
  dpo::loss_config cfg;
  cfg.reference_free = true;
  dpo::cpu::collectives ok, peer_failed;
  ok.context_sum = [](double*, std::int64_t) {};
  peer_failed.context_sum = [](double* d, std::int64_t n) { d[n - 1] += 1.0; };  // a peer rejected its slice
  std::vector<double> other = b.logits;
  for (double& x : other) x *= 2;
  // dpo_forward_sharded
  dpo::cpu::shard_state st;
  dpo::cpu::dpo_forward_sharded(b.pairs(b.logits.data(), 0, V), whole, nullptr, nullptr, cfg, ok,
                                dpo::forward_outputs{}, st);
  const dpo::cpu::shard_state before = st;
  fixture::expect_error(
      [&] {
        dpo::cpu::dpo_forward_sharded(b.pairs(other.data(), 0, V), whole, nullptr, nullptr, cfg, peer_failed,
                                      dpo::forward_outputs{}, st);
      },
      "rank(s) of the context group rejected their input");
  CHECK(st.chosen_max == before.chosen_max);
  CHECK(st.chosen_records == before.chosen_records);
  CHECK(st.rejected_records == before.rejected_records);
  CHECK(st.seq_grad == before.seq_grad);
  // sequence_logps_sharded
  const std::int64_t S = 2 * alias_batch::P;
  std::vector<double> sums(static_cast<std::size_t>(S)), counts(sums.size());
  dpo::cpu::sequence_logps_sharded(b.view(b.logits.data(), 0, V), whole, ok, sums.data(), counts.data(), st);
  const dpo::cpu::shard_state seq_before = st;
  fixture::expect_error(
      [&] {
        dpo::cpu::sequence_logps_sharded(b.view(other.data(), 0, V), whole, peer_failed, sums.data(), counts.data(),
                                         st);
      },
      "rank(s) of the context group rejected their input");
  CHECK(st.chosen_max == seq_before.chosen_max);
  CHECK(st.chosen_records == seq_before.chosen_records);
}

TEST_CASE("NaN logits in one pair with WPO: the sharded path propagates them as the unsharded one does", "[shard]") {
  // A NaN logit in pair 0's chosen rows makes its WPO weight NaN, hence the batch's mean
  // weight. Without an NLL term that mean is unused: the NLL token gradient is exactly 0 and
  // pair 1's gradient stays finite (it was NaN through 0 * NaN). With one (MPO's sft) every
  // chosen row is NaN. Either way the sharded backward runs (it threw on nll_token_grad =
  // NaN) and equals the unsharded one.
  const oracle::batch b = fixture::rounded_random_batch<double>(fixture::spec(2, 4, kVocab, 5));
  for (const char* name : {"sigmoid+wpo", "mpo+wpo"}) {
    INFO(name);
    const named_config& nc = fixture::config_named(name);
    const bool nll = std::string(name) == "mpo+wpo";
    const fixture::reference ref = fixture::make_reference(nc.cfg, b, 7);
    buffers<double, std::int64_t> full(b, layout::padded);
    for (std::int64_t k = 0; k < b.chosen[0].rows(); ++k)
      full.logits[static_cast<std::size_t>((full.start[0][0] + k) * full.stride + 3)] = NAN;
    buffers<double, std::int64_t> sharded = full;
    dpo::cpu::options o;
    o.num_threads = 1;
    const dpo::cpu::forward_result want = dpo::cpu::dpo_forward(full.view(), ref.pc(), ref.pr(), nc.cfg, o);
    dpo::cpu::dpo_backward(full.view(), want, full.grad_view(), 1.0, o);
    CHECK(std::isnan(want.loss));
    CHECK(std::isnan(want.nll_token_grad) == nll);

    const std::vector<std::int64_t> cuts{0, 11, kVocab};
    shard_ranks::grid ranks(2, 1);
    std::vector<dpo::cpu::forward_result> got(2);
    const std::vector<std::string> errors = ranks.run([&](int rank, int t, int, const dpo::cpu::collectives& comm) {
      const dpo::vocab_shard sh{kVocab, cuts[t], cuts[t + 1]};
      const auto view = shard_of(sharded.view(), sh);
      dpo::cpu::shard_state state;
      dpo::cpu::dpo_forward_sharded(view, sh, ref.pc(), ref.pr(), nc.cfg, comm,
                                    dpo::cpu::detail::owned_outputs(got[static_cast<std::size_t>(rank)], 2), state, o);
      dpo::cpu::dpo_backward_sharded(view, sh, state, shard_of(sharded.grad_view(), sh), 1.0, o);
    });
    for (const std::string& e : errors) CHECK(e.empty());
    CHECK(std::isnan(got[0].loss));
    CHECK(std::isnan(got[0].nll_token_grad) == nll);
    if (!nll) CHECK(got[0].nll_token_grad == 0.0);
    for (int side = 0; side < 2; ++side)
      for (std::int64_t i = 0; i < 2; ++i)
        for (std::int64_t k = 0; k < b.chosen[0].rows(); ++k) {
          if ((side == 0 ? b.chosen : b.rejected)[i].y[k] < 0) continue;
          // Pair 0's rows are NaN (its pi_c and weight are); pair 1's chosen rows only through
          // the NLL.
          const bool nan_row = i == 0 || (side == 0 && nll);
          for (std::int64_t v = 0; v < kVocab; ++v) {
            const double e = full.at(false, side, i, k, v), g = sharded.at(false, side, i, k, v);
            INFO("side " << side << " pair " << i << " row " << k << " column " << v);
            if (nan_row) {
              CHECK(std::isnan(g));
              CHECK(std::isnan(e));
            } else {
              CHECK(std::isfinite(e));
              CHECK(fixture::near(g, e, 1e-12 * (1 + std::fabs(e))));
            }
          }
        }
  }
}
