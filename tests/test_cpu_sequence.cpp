// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// dpo::cpu::sequence_logps (with row_lse) and sequence_logps_backward against the float64
// oracle and finite differences: padded views with and without gaps between sequences
// (seq_stride > seq_len, TRL's logits[:, :-1] slice), packed views, a view of later
// sequences (first_seq > 0), in place and out of place, bf16 / f32 / f64 logits, int32 /
// int64 labels, thread independence, bad arguments. Also the pair-level entry points on a
// view with gaps. Gap rows hold NaN logits and out-of-range labels: reading one would show.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "catch.hpp"
#include "fixtures.hpp"
#include "oracle.hpp"

namespace {

using ld = oracle::ld;

template <class T>
using acc = dpo::cpu::acc_t<T>;

template <class T>
T to_t(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return T(static_cast<float>(x));
  }
}

template <class T>
double to_d(T x) {
  return static_cast<double>(static_cast<acc<T>>(x));
}

/// The 2P sequences of a batch (chosen, then rejected) as one padded or packed view in a
/// buffer whose rows between and around the sequences are poison: NaN logits, labels
/// outside [0, vocab) that are not ignore_index, mask 1. Columns [V, stride) are NaN too.
template <class T, class L>
struct seq_buffers {
  std::vector<const oracle::sequence*> seqs;
  std::int64_t V = 0, stride = 0, rows = 0;
  std::vector<T> logits;
  std::vector<L> labels;
  std::vector<std::uint8_t> mask;
  std::vector<std::int64_t> cu;
  std::vector<std::int64_t> start;  // first row of each sequence
  dpo::token_view<T, L> view;

  /// gap > 0: padded with seq_stride = seq_len + gap; packed: sequences back to back from
  /// row `gap`, with `gap` poison rows after them.
  seq_buffers(const oracle::batch& b, bool packed, std::int64_t gap, std::int64_t pad,
              bool explicit_mask = false) {
    for (const auto& s : b.chosen) seqs.push_back(&s);
    for (const auto& s : b.rejected) seqs.push_back(&s);
    const std::int64_t S = static_cast<std::int64_t>(seqs.size());
    V = static_cast<std::int64_t>(seqs[0]->z[0].size());
    stride = V + pad;
    const std::int64_t seq_len = seqs[0]->rows();
    view.vocab = V;
    view.row_stride = stride;
    view.num_seqs = S;
    if (packed) {
      cu.push_back(gap);
      for (const auto* s : seqs) {
        start.push_back(cu.back());
        cu.push_back(cu.back() + s->rows());
      }
      rows = cu.back() + gap;
      view.cu_seqlens = cu.data();
    } else {
      view.seq_len = seq_len;
      view.seq_stride = gap > 0 ? seq_len + gap : 0;
      for (std::int64_t s = 0; s < S; ++s) start.push_back(s * (seq_len + gap));
      rows = S * (seq_len + gap);
    }
    logits.assign(static_cast<std::size_t>(rows * stride), to_t<T>(std::nan("")));
    labels.assign(static_cast<std::size_t>(rows), static_cast<L>(V + 100));
    mask.assign(static_cast<std::size_t>(rows), 1);
    for (std::int64_t s = 0; s < S; ++s) {
      const oracle::sequence& q = *seqs[s];
      for (std::int64_t t = 0; t < q.rows(); ++t) {
        const std::int64_t r = start[s] + t;
        for (std::int64_t v = 0; v < V; ++v) logits[r * stride + v] = to_t<T>(q.z[t][v]);
        const bool active = q.y[t] >= 0;
        if (explicit_mask) {
          labels[r] = static_cast<L>(active ? q.y[t] : -3);  // masked: never range-checked
          mask[r] = active ? 1 : 0;
        } else {
          labels[r] = static_cast<L>(active ? q.y[t] : -100);
        }
      }
    }
    view.logits = logits.data();
    view.labels = labels.data();
    view.mask = explicit_mask ? mask.data() : nullptr;
  }

  /// Whether row r belongs to sequence s (and which row of it).
  bool owner(std::int64_t r, std::int64_t* s, std::int64_t* t) const {
    for (std::size_t k = 0; k < seqs.size(); ++k) {
      if (r >= start[k] && r < start[k] + seqs[k]->rows()) {
        *s = static_cast<std::int64_t>(k);
        *t = r - start[k];
        return true;
      }
    }
    return false;
  }
};

oracle::batch make_batch(std::uint64_t seed, bool varying, std::int64_t vocab = 37) {
  fixture::batch_spec sp;
  sp.pairs = 3;
  sp.rows = 7;
  sp.vocab = vocab;
  sp.varying_rows = varying;
  sp.seed = seed;
  return fixture::random_batch(sp);
}

template <class T>
oracle::batch rounded(oracle::batch b) {
  fixture::round_batch<T>(b);
  return b;
}

/// Per-sequence upstream gradients with both signs, one of them 0.
std::vector<double> seq_grads(std::int64_t S) {
  std::vector<double> g;
  for (std::int64_t s = 0; s < S; ++s) g.push_back(s == 1 ? 0.0 : (s % 2 == 0 ? 1.5 : -0.75) / (1.0 + s));
  return g;
}

/// One check of sequence_logps (+ row_lse) and sequence_logps_backward against the oracle.
template <class T, class L>
void check_against_oracle(bool packed, std::int64_t gap, bool in_place, bool explicit_mask,
                          std::int64_t first_seq, std::uint64_t seed) {
  using A = acc<T>;
  const oracle::batch b = rounded<T>(make_batch(seed, packed));
  seq_buffers<T, L> buf(b, packed, gap, 3, explicit_mask);
  dpo::token_view<T, L> v = buf.view;
  v.first_seq = first_seq;
  v.num_seqs -= first_seq;
  const std::int64_t S = v.num_seqs;
  INFO((packed ? "packed" : "padded") << " gap " << gap << (in_place ? " in place" : "")
                                      << (explicit_mask ? " mask" : "") << " first_seq " << first_seq);
  const double poison = -777.0;
  const std::int64_t r0 = v.row_begin(0);
  std::vector<double> sums(S, poison), toks(static_cast<std::size_t>(v.row_end(S - 1) - r0), poison);
  std::vector<double> lse(static_cast<std::size_t>(buf.rows), poison);
  std::vector<std::int64_t> counts(S, -1);
  dpo::cpu::options opt;
  opt.num_threads = 2;
  dpo::cpu::sequence_logps(v, sums.data(), counts.data(), toks.data(), lse.data(), opt);

  const std::vector<double> g = seq_grads(S);
  const std::vector<T> before = buf.logits;
  std::vector<T> grad_buf(buf.logits.size(), to_t<T>(-12345.0));
  T* grad = in_place ? buf.logits.data() : grad_buf.data();
  dpo::cpu::sequence_logps_backward(v, lse.data(), g.data(), grad, buf.stride, opt);
  const std::vector<T>& out = in_place ? buf.logits : grad_buf;

  const double u = std::is_same_v<T, double> ? 0x1p-52 : std::is_same_v<T, float> ? 0x1p-23 : 0x1p-8;
  const double ua = std::is_same_v<A, double> ? 0x1p-53 : 0x1p-24;
  for (std::int64_t r = 0; r < buf.rows; ++r) {
    std::int64_t s = -1, t = -1;
    const bool mine = buf.owner(r, &s, &t) && s >= first_seq;
    for (std::int64_t c = 0; c < buf.stride; ++c) {
      const std::size_t k = static_cast<std::size_t>(r * buf.stride + c);
      if (!mine || c >= buf.V) {
        // Not a row of the view's sequences, or a padding column: untouched.
        if (in_place) {
          CHECK(std::memcmp(&out[k], &before[k], sizeof(T)) == 0);
        } else {
          CHECK(to_d(out[k]) == to_d(to_t<T>(-12345.0)));
        }
      }
    }
    if (!mine) {
      CHECK(lse[r] == poison);
      if (r >= r0 && r - r0 < static_cast<std::int64_t>(toks.size())) CHECK(toks[r - r0] == poison);
      continue;
    }
    const std::int64_t q = s - first_seq;
    const oracle::sequence& seq = *buf.seqs[s];
    const oracle::token tk = oracle::token_of(seq.z[t], seq.y[t]);
    if (!tk.active) {
      CHECK(lse[r] == 0.0);
      CHECK(toks[r - r0] == 0.0);
      for (std::int64_t c = 0; c < buf.V; ++c) CHECK(to_d(out[r * buf.stride + c]) == 0.0);
      continue;
    }
    const double ttol = fixture::token_tol<A>(buf.V, double(tk.lse), double(tk.logp));
    CHECK(fixture::near(lse[r], double(tk.lse), ttol));
    CHECK(fixture::near(toks[r - r0], double(tk.logp), ttol));
    for (std::int64_t c = 0; c < buf.V; ++c) {
      const ld p = std::exp(ld(seq.z[t][c]) - tk.lse);
      const double want = double(ld(g[q]) * ((c == seq.y[t] ? 1 : 0) - p));
      // Rounding of the output to T, plus the accumulation's error in exp(z - lse).
      const double tol = std::fabs(want) * u + std::fabs(g[q]) * (4 * ttol + 8 * ua);
      const double got = to_d(out[r * buf.stride + c]);
      INFO("row " << r << " col " << c);
      CHECK(fixture::near(got, want, tol));
    }
  }
  for (std::int64_t q = 0; q < S; ++q) {
    const auto ts = oracle::tokens_of(*buf.seqs[first_seq + q]);
    CHECK(counts[q] == static_cast<std::int64_t>(oracle::count(ts)));
    double tol = 0;
    for (const auto& tk : ts)
      if (tk.active) tol += fixture::token_tol<A>(buf.V, double(tk.lse), double(tk.logp));
    CHECK(fixture::near(sums[q], double(oracle::seq_logp(ts, INFINITY, 1.0)), tol));
  }
}

template <class T, class L>
void check_layouts(std::uint64_t seed) {
  for (bool in_place : {false, true}) {
    check_against_oracle<T, L>(false, 0, in_place, false, 0, seed);
    check_against_oracle<T, L>(false, 1, in_place, false, 0, seed + 1);
    check_against_oracle<T, L>(false, 3, in_place, true, 1, seed + 2);
    check_against_oracle<T, L>(true, 0, in_place, false, 0, seed + 3);
    check_against_oracle<T, L>(true, 2, in_place, true, 2, seed + 4);
  }
}

}  // namespace

TEST_CASE("sequence_logps_backward: oracle, bf16 / f32 / f64, int32 / int64 labels", "[sequence]") {
  check_layouts<double, std::int64_t>(101);
  check_layouts<float, std::int32_t>(201);
  check_layouts<float, std::int64_t>(301);
  check_layouts<Eigen::bfloat16, std::int32_t>(401);
  check_layouts<Eigen::bfloat16, std::int64_t>(501);
  check_layouts<Eigen::half, std::int64_t>(601);
}

TEST_CASE("sequence_logps_backward: finite differences of the forward", "[sequence]") {
  // d/dz of sum_s g_s * sums[s], by central differences of sequence_logps itself (f64).
  const oracle::batch b = make_batch(7, false, 13);
  for (std::int64_t gap : {0, 2}) {
    seq_buffers<double, std::int64_t> buf(b, false, gap, 1);
    const dpo::token_view<double, std::int64_t> v = buf.view;
    const std::int64_t S = v.num_seqs;
    const std::vector<double> g = seq_grads(S);
    std::vector<double> sums(S), lse(static_cast<std::size_t>(buf.rows));
    std::vector<std::int64_t> counts(S);
    dpo::cpu::sequence_logps(v, sums.data(), counts.data(), nullptr, lse.data());
    std::vector<double> grad(buf.logits.size(), 0.0);
    dpo::cpu::sequence_logps_backward(v, lse.data(), g.data(), grad.data(), buf.stride);
    const auto objective = [&]() {
      dpo::cpu::sequence_logps(v, sums.data(), counts.data());
      double f = 0;
      for (std::int64_t s = 0; s < S; ++s) f += g[s] * sums[s];
      return f;
    };
    int checked = 0;
    for (std::int64_t s = 0; s < S; ++s) {
      for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
        for (std::int64_t c = 0; c < buf.V; c += 3) {
          double& z = buf.logits[r * buf.stride + c];
          const double z0 = z, h = 1e-5;
          z = z0 + h;
          const double fp = objective();
          z = z0 - h;
          const double fm = objective();
          z = z0;
          const double fd = (fp - fm) / (2 * h);
          INFO("gap " << gap << " seq " << s << " row " << r << " col " << c);
          CHECK(std::fabs(grad[r * buf.stride + c] - fd) <= 1e-7 * (1 + std::fabs(fd)));
          ++checked;
        }
      }
    }
    CHECK(checked > 100);
  }
}

TEST_CASE("sequence_logps_backward: results do not depend on the thread count", "[sequence]") {
  for (bool packed : {false, true}) {
    // vocab 2100: two row chunks. Padded views need sequences of one length.
    const oracle::batch b = rounded<Eigen::bfloat16>(make_batch(11, packed, 2100));
    seq_buffers<Eigen::bfloat16, std::int64_t> buf(b, packed, 1, 0);
    const auto v = buf.view;
    const std::vector<double> g = seq_grads(v.num_seqs);
    std::vector<std::uint16_t> first;
    for (int threads : {1, 2, 3, 7}) {
      dpo::cpu::options opt;
      opt.num_threads = threads;
      std::vector<double> sums(v.num_seqs), lse(static_cast<std::size_t>(buf.rows), 0.0);
      std::vector<std::int64_t> counts(v.num_seqs);
      dpo::cpu::sequence_logps(v, sums.data(), counts.data(), nullptr, lse.data(), opt);
      std::vector<Eigen::bfloat16> grad(buf.logits.size(), Eigen::bfloat16(0.0f));
      dpo::cpu::sequence_logps_backward(v, lse.data(), g.data(), grad.data(), buf.stride, opt);
      std::vector<std::uint16_t> bits(grad.size());
      std::memcpy(bits.data(), grad.data(), bits.size() * 2);
      if (first.empty()) {
        first = bits;
      } else {
        CHECK(bits == first);
      }
    }
  }
}

TEST_CASE("sequence_logps / sequence_logps_backward: bad arguments", "[sequence][errors]") {
  const oracle::batch b = rounded<float>(make_batch(13, false, 5));
  seq_buffers<float, std::int64_t> buf(b, false, 2, 1);
  const dpo::token_view<float, std::int64_t> ok = buf.view;
  const std::int64_t S = ok.num_seqs;
  std::vector<double> sums(S), lse(static_cast<std::size_t>(buf.rows), 0.0);
  std::vector<std::int64_t> counts(S);
  // Garbage in the gaps is fine.
  dpo::cpu::sequence_logps(ok, sums.data(), counts.data(), nullptr, lse.data());
  const std::vector<double> g = seq_grads(S);
  std::vector<float> grad(buf.logits.size(), -5.0f);
  const std::vector<float> untouched = grad;
  const auto both = [&](const dpo::token_view<float, std::int64_t>& v, const std::string& needle) {
    std::vector<double> s2(S, -1.0), l2(lse.size(), -1.0);
    fixture::expect_error([&] { dpo::cpu::sequence_logps(v, s2.data(), counts.data(), nullptr, l2.data()); }, needle);
    CHECK(s2 == std::vector<double>(S, -1.0));
    CHECK(l2 == std::vector<double>(lse.size(), -1.0));
    fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(v, lse.data(), g.data(), grad.data(), buf.stride); },
                 needle);
    CHECK(grad == untouched);
  };
  dpo::token_view<float, std::int64_t> v = ok;
  v.seq_stride = ok.seq_len - 1;
  both(v, "seq_stride = " + std::to_string(ok.seq_len - 1));
  v.seq_stride = -3;
  both(v, "seq_stride = -3");
  // A bad label in a sequence row (not a gap) is still found.
  buf.labels[static_cast<std::size_t>(ok.row_begin(1))] = 99;
  both(ok, "labels[" + std::to_string(ok.row_begin(1)) + "] = 99");
  buf.labels[static_cast<std::size_t>(ok.row_begin(1))] = -100;

  fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(ok, nullptr, g.data(), grad.data(), buf.stride); },
               "row_lse is null");
  fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(ok, lse.data(), nullptr, grad.data(), buf.stride); },
               "seq_grad is null");
  fixture::expect_error([&] { dpo::cpu::sequence_logps_backward<float, std::int64_t>(ok, lse.data(), g.data(), nullptr,
                                                                            buf.stride); },
               "grad is null");
  fixture::expect_error([&] { dpo::cpu::sequence_logps_backward(ok, lse.data(), g.data(), grad.data(), buf.V - 1); },
               "grad_stride = " + std::to_string(buf.V - 1));
  // The logits shifted by a row, or with another stride, are not "in place".
  fixture::expect_error([&] {
    dpo::cpu::sequence_logps_backward(ok, lse.data(), g.data(), buf.logits.data() + buf.stride, buf.stride);
  }, "overlaps the logits");
  fixture::expect_error([&] {
    dpo::cpu::sequence_logps_backward(ok, lse.data(), g.data(), buf.logits.data(), buf.V);
  }, "overlaps the logits");
  CHECK(grad == untouched);
  // No rows: nothing is read, null pointers are fine.
  dpo::token_view<float, std::int64_t> none = ok;
  none.num_seqs = 0;
  dpo::cpu::sequence_logps_backward<float, std::int64_t>(none, nullptr, nullptr, nullptr, buf.V);
  none = ok;
  none.seq_len = 0;
  none.logits = nullptr;
  none.labels = nullptr;
  dpo::cpu::sequence_logps_backward<float, std::int64_t>(none, nullptr, g.data(), nullptr, buf.V);
}

TEST_CASE("sequence_logps / pair_logps: outputs may overlap neither each other nor the inputs", "[sequence][errors]") {
  // sums on counts gave a count's bits as a sum, token_logps on row_lse one of them, silently;
  // an output on the logits or labels corrupted the caller's inputs.
  const oracle::batch b = rounded<float>(make_batch(13, false, 5));
  seq_buffers<float, std::int64_t> buf(b, false, 2, 1);
  const dpo::token_view<float, std::int64_t> ok = buf.view;
  const std::int64_t S = ok.num_seqs, rows = buf.rows;
  // One scratch array for every output: sums, counts, token_logps, row_lse, in that order.
  std::vector<double> scratch(static_cast<std::size_t>(2 * S + 2 * rows), -7.0);
  double* const sums = scratch.data();
  std::int64_t* const counts = reinterpret_cast<std::int64_t*>(scratch.data() + S);
  double* const tok = scratch.data() + 2 * S;
  double* const lse = tok + rows;
  const std::vector<double> before = scratch;
  const std::vector<float> logits0 = buf.logits;
  const auto refused = [&](const std::string& what, double* s, std::int64_t* c, double* t, double* l) {
    INFO(what);
    fixture::expect_error([&] { dpo::cpu::sequence_logps(ok, s, c, t, l); }, what);
    CHECK(std::memcmp(scratch.data(), before.data(), scratch.size() * sizeof(double)) == 0);
    CHECK(std::memcmp(buf.logits.data(), logits0.data(), logits0.size() * sizeof(float)) == 0);  // NaN gaps
  };
  refused("sums overlaps counts", sums, reinterpret_cast<std::int64_t*>(sums + 1), tok, lse);
  refused("token_logps overlaps row_lse", sums, counts, tok, tok + 3);
  refused("counts overlaps token_logps", sums, counts, tok - 1, lse);
  const std::int64_t r0 = ok.row_begin(0);
  refused("sums overlaps logits", reinterpret_cast<double*>(buf.logits.data() + (r0 + 1) * buf.stride), counts, tok,
          lse);
  refused("row_lse overlaps labels", sums, counts, tok, reinterpret_cast<double*>(buf.labels.data() + r0));
  // Disjoint, in one array: accepted.
  dpo::cpu::sequence_logps(ok, sums, counts, tok, lse);
  std::vector<double> s2(static_cast<std::size_t>(S)), t2(static_cast<std::size_t>(rows)), l2(static_cast<std::size_t>(rows));
  std::vector<std::int64_t> c2(static_cast<std::size_t>(S));
  dpo::cpu::sequence_logps(ok, s2.data(), c2.data(), t2.data(), l2.data());
  CHECK(std::vector<double>(sums, sums + S) == s2);
  CHECK(std::vector<std::int64_t>(counts, counts + S) == c2);

  // pair_logps: chosen and rejected against each other and both sides' arrays.
  fixture::batch_spec sp = fixture::spec(3, 4, 6, 17);
  const oracle::batch pb = fixture::rounded_random_batch<float>(sp);
  fixture::buffers<float, std::int64_t> pbuf(pb, fixture::layout::padded);
  const auto pv = pbuf.view();
  std::vector<double> pc(6, -7.0);
  const std::vector<double> pc0 = pc;
  fixture::expect_error([&] { dpo::cpu::pair_logps(pv, 1.0, pc.data(), pc.data() + 2); }, "chosen overlaps rejected");
  fixture::expect_error(
      [&] { dpo::cpu::pair_logps(pv, 1.0, pc.data(), reinterpret_cast<double*>(pbuf.labels.data() + 2)); },
      "rejected overlaps labels.chosen");
  CHECK(pc == pc0);
  dpo::cpu::pair_logps(pv, 1.0, pc.data(), pc.data() + 3);
  std::vector<double> wc(3), wr(3);
  dpo::cpu::pair_logps(pv, 1.0, wc.data(), wr.data());
  CHECK(std::vector<double>(pc.begin(), pc.begin() + 3) == wc);
  CHECK(std::vector<double>(pc.begin() + 3, pc.end()) == wr);
}

TEST_CASE("pair entry points on a padded view with gaps match the gap-free layout", "[sequence]") {
  // TRL's concatenated batch read through logits[:, :-1]: the same sequences with and without
  // poison rows between them give bitwise the same forward, and the backward leaves the gap
  // rows alone.
  const oracle::batch b = rounded<float>(make_batch(17, false, 29));
  seq_buffers<float, std::int64_t> dense(b, false, 0, 2), gapped(b, false, 1, 2);
  const std::int64_t P = b.pairs();
  const auto pairs_of = [&](const seq_buffers<float, std::int64_t>& s) {
    dpo::pair_view<float, std::int64_t> p = dpo::padded_pairs(s.view.logits, s.view.labels, 2 * P, s.view.seq_len,
                                                              s.V, s.stride);
    p.chosen.seq_stride = p.rejected.seq_stride = s.view.seq_stride;
    return p;
  };
  std::vector<double> rc, rr;
  fixture::random_reference(b, 1.0, 3, rc, rr);
  for (const fixture::named_config& nc : fixture::combinations_and_options()) {
    INFO(nc.name);
    const auto pd = pairs_of(dense), pg = pairs_of(gapped);
    const dpo::cpu::forward_result fd = dpo::cpu::dpo_forward(pd, rc.data(), rr.data(), nc.cfg);
    const dpo::cpu::forward_result fg = dpo::cpu::dpo_forward(pg, rc.data(), rr.data(), nc.cfg);
    CHECK(std::memcmp(&fd.loss, &fg.loss, sizeof(double)) == 0);
    CHECK(fd.losses == fg.losses);
    CHECK(fd.grad_chosen == fg.grad_chosen);
    CHECK(fd.metrics.entropy == fg.metrics.entropy);
    std::vector<double> cd(P), cr(P), gd(P), gr(P);
    dpo::cpu::pair_logps(pd, 0.5, cd.data(), cr.data());
    dpo::cpu::pair_logps(pg, 0.5, gd.data(), gr.data());
    CHECK(cd == gd);
    CHECK(cr == gr);
    std::vector<float> od(dense.logits.size(), -9.0f), og(gapped.logits.size(), -9.0f);
    dpo::cpu::dpo_backward(pd, fd, dpo::pair_grad_view<float>{od.data(), dense.stride, od.data(), dense.stride});
    dpo::cpu::dpo_backward(pg, fg, dpo::pair_grad_view<float>{og.data(), gapped.stride, og.data(), gapped.stride});
    for (std::int64_t r = 0; r < gapped.rows; ++r) {
      std::int64_t s = -1, t = -1;
      const bool mine = gapped.owner(r, &s, &t);
      for (std::int64_t c = 0; c < gapped.stride; ++c) {
        const float got = og[static_cast<std::size_t>(r * gapped.stride + c)];
        if (!mine || c >= gapped.V) {
          CHECK(got == -9.0f);
        } else {
          CHECK(got == od[static_cast<std::size_t>((dense.start[s] + t) * dense.stride + c)]);
        }
      }
    }
  }
}
