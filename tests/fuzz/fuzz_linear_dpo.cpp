// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// libFuzzer target for the CPU fused LM head: dpo::cpu::linear_dpo (DPO from hidden states
// and the LM-head weight, the logits never whole) against the logits path (dpo_forward and
// dpo_backward) fed the same logits, on shapes, layouts, masks, transforms, chunk sizes,
// modes, reference forms and loss configurations decoded from the input. Hidden states,
// weight and bias are small dyadic numbers, so every product and sum of the head's GEMM is
// exact and the logits it forms are exactly the ones the logits path is given. Properties:
//   - the head refuses a call (dpo::error) exactly when the logits path refuses it, or when
//     mode = three_pass is forced and the plan cannot take three passes (its message says
//     so); a refused call writes nothing;
//   - the loss, every metric, the per-pair outputs, dL/dpi and the NLL token gradient are
//     bitwise the logits path's, whatever the layout, chunk size, mode and thread count;
//   - dHidden, dWeight and dBias equal the logits path's dL/dlogits through do/du and the
//     products, summed in double, to 1e-4 (float) / 1e-10 (double) of their largest
//     magnitude, added to what the buffers held where they are added to;
//   - prompt, padding, ignored and masked rows are never read (their hidden states are NaN)
//     and get dHidden 0 (or keep theirs when dHidden is accumulated); gap rows and padding
//     columns are never written;
//   - 1 and 2 threads give bitwise the same everything;
//   - (one hidden buffer) linear_dpo_forward with its row state, then linear_dpo_backward,
//     give bitwise what the fused call gives in four passes;
//   - linear_dpo_sharded over 1-3 uneven vocabulary shards x 1-3 context slices of every
//     sequence (ranks as threads) refuses what the logits path refuses (and LD-DPO under
//     context parallelism) and otherwise matches the unsharded call (see check_sharded).
// A violated property traps, so libFuzzer keeps the input.
//
// Input layout (bytes past the end read as 0, so short inputs are valid):
//   [0] flags: bit 0 double (else float), bits 1-2 layout (padded, packed, separate, padded
//       with a gap row after each sequence), bit 3 mask, bit 4 bias, bit 5 transforms, bit 6
//       dHidden accumulated, bit 7 reference from hidden states and its own head (else
//       reference log-probs)
//   [1] pairs - 1 (mod 3)   [2] rows per sequence - 1 (mod 6)   [3] H - 1 (mod 8)
//   [4-5] V - 1 (u16 mod 300)   [6] chunk rows (0: the plan's)   [7] mode (mod 3: automatic,
//   three_pass, four_pass)   [8-11] PRNG seed   [12] label mode   [13] transforms
//   [14..] loss config (fuzz_common.hpp), then one byte per sequence (its rows), then one
//   byte per reference log-prob.
#define EIGEN_DONT_PARALLELIZE  // the head's results are defined for Eigen's GEMM unthreaded
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <vector>

#include <dpo/cpu/dpo.hpp>
#include <dpo/cpu/linear_dpo.hpp>
#include <dpo/cpu/linear_shard.hpp>

#include "../shard_ranks.hpp"
#include "fuzz_common.hpp"

namespace {

using namespace fuzz;
using fuzz::pick;  // beside the overload below, which would hide it
using label_t = std::int64_t;

enum class layout { padded, packed, separate, gapped };

constexpr double sentinel = 77.0;

/// A batch in canonical form: 2P sequences (chosen, then rejected) of len[s] <= T rows,
/// row (s, t) at index s * T + t; hidden states [2P * T, H] (NaN on rows that do not count).
struct problem {
  layout lay = layout::padded;
  bool has_mask = false, has_bias = false, accumulate = false, ref_hidden = false;
  std::int64_t P = 1, T = 1, H = 1, V = 1;
  std::int64_t chunk_rows = 0;
  dpo::linear_mode mode = dpo::linear_mode::automatic;
  dpo::logit_transforms tr;
  dpo::loss_config cfg;
  std::vector<std::int64_t> len;
  std::vector<label_t> lab;
  std::vector<std::uint8_t> msk;
  std::vector<double> hid, ref_hid, w, b, rw, rb, ref_c, ref_r;

  std::int64_t row(std::int64_t s, std::int64_t t) const { return s * T + t; }
  bool counts(std::int64_t s, std::int64_t t) const {
    const std::int64_t r = row(s, t);
    return t < len[s] && lab[r] != -100 && (!has_mask || msk[r] != 0);
  }
};

/// An entry of a short table.
double pick(std::initializer_list<double> table, unsigned i) { return table.begin()[i % table.size()]; }

/// A small dyadic value k / den, k in [-4, 4].
double dyadic(rng& r, double den) { return static_cast<double>(static_cast<int>(r.next() % 9) - 4) / den; }

problem decode(reader& in) {
  problem p;
  const std::uint8_t flags = in.u8();
  p.lay = static_cast<layout>((flags >> 1) & 3);
  p.has_mask = (flags & 8) != 0;
  p.has_bias = (flags & 16) != 0;
  const bool transforms = (flags & 32) != 0;
  p.accumulate = (flags & 64) != 0;
  p.ref_hidden = (flags & 128) != 0;
  p.P = 1 + in.u8() % 3;
  p.T = 1 + in.u8() % 6;
  p.H = 1 + in.u8() % 8;
  p.V = 1 + in.u16() % 300;
  const unsigned c = in.u8();
  p.chunk_rows = c == 0 ? 0 : (c % 4 == 0 ? 1000 : 1 + c % 23);
  p.mode = static_cast<dpo::linear_mode>(in.u8() % 3);
  rng r{in.u32()};
  const unsigned label_mode = in.u8();
  const unsigned t = in.u8();
  if (transforms) {
    static const double scales[] = {1, 0.5, 2, 1.5};
    static const double caps[] = {0, 1.5, 30, 0.25};
    static const double temps[] = {1, 2, 0.5, 0.75};
    p.tr = {pick(temps, t), pick(caps, t / 4), pick(scales, t / 16)};
  }
  p.cfg = read_config(in);
  static const double ignore_share[] = {0.2, 0.0, 0.5, 0.9, 1.0};
  const double p_ignore = pick(ignore_share, label_mode);
  const std::int64_t S = 2 * p.P;
  for (std::int64_t s = 0; s < S; ++s) p.len.push_back(1 + in.u8() % p.T);
  for (std::int64_t i = 0; i < 2 * p.P; ++i) {
    const unsigned b = in.u8();
    (i < p.P ? p.ref_c : p.ref_r).push_back(b < 224 ? -static_cast<double>(b) / 8.0 : pick({nan_v, -inf_v, 0.0, 5.0}, b));
  }
  p.lab.assign(static_cast<std::size_t>(S * p.T), -100);
  p.msk.assign(p.lab.size(), 1);
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t k = 0; k < p.len[s]; ++k) {
      const bool prompt = k == 0 && p.len[s] > 1;
      p.lab[p.row(s, k)] = prompt || r.uniform() < p_ignore ? -100 : static_cast<label_t>(r.next() % p.V);
      p.msk[p.row(s, k)] = r.uniform() < 0.8 ? 1 : 0;
    }
  // |u| <= H * 4/4 * 4/8 + 4/8 = 4.5 with every partial sum a multiple of 1/32: exact in float.
  p.hid.assign(static_cast<std::size_t>(S * p.T * p.H), nan_v);
  p.ref_hid = p.hid;
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t k = 0; k < p.T; ++k)
      if (p.counts(s, k))
        for (std::int64_t j = 0; j < p.H; ++j) {
          p.hid[p.row(s, k) * p.H + j] = dyadic(r, 4);
          p.ref_hid[p.row(s, k) * p.H + j] = dyadic(r, 4);
        }
  for (std::int64_t i = 0; i < p.V * p.H; ++i) {
    p.w.push_back(dyadic(r, 8));
    p.rw.push_back(dyadic(r, 8));
  }
  for (std::int64_t v = 0; v < p.V; ++v) {
    p.b.push_back(p.has_bias ? dyadic(r, 8) : 0.0);
    p.rb.push_back(p.has_bias ? dyadic(r, 8) : 0.0);
  }
  return p;
}

/// The logits path's buffers: padded [2P * T, V] logits of dtype T (0 on rows that do not
/// count), do/du in double, labels and mask as the problem's.
template <class T>
struct logits_batch {
  std::vector<T> z, ref;
  std::vector<double> dodu;
};

template <class T>
logits_batch<T> logits_of(const problem& p) {
  const dpo::detail::transform_params<T> tp(p.tr);
  logits_batch<T> lb;
  const std::int64_t rows = 2 * p.P * p.T;
  lb.z.assign(static_cast<std::size_t>(rows * p.V), T(0));
  lb.ref = lb.z;
  lb.dodu.assign(lb.z.size(), 0.0);
  for (std::int64_t s = 0; s < 2 * p.P; ++s)
    for (std::int64_t k = 0; k < p.T; ++k) {
      if (!p.counts(s, k)) continue;
      const std::int64_t r = p.row(s, k);
      for (std::int64_t v = 0; v < p.V; ++v) {
        double u = p.b[v], ru = p.rb[v];
        for (std::int64_t j = 0; j < p.H; ++j) {
          u += p.hid[r * p.H + j] * p.w[v * p.H + j];
          ru += p.ref_hid[r * p.H + j] * p.rw[v * p.H + j];
        }
        lb.z[r * p.V + v] = dpo::detail::transform_logit(tp, static_cast<T>(u));
        lb.ref[r * p.V + v] = dpo::detail::transform_logit(tp, static_cast<T>(ru));
        lb.dodu[r * p.V + v] = static_cast<double>(dpo::detail::transform_logit_grad(tp, static_cast<T>(u)));
      }
    }
  return lb;
}

/// The head's buffers for the problem's layout: hidden rows of stride H + 1 (the padding
/// column NaN), labels and mask, and where each sequence's first row is.
template <class T>
struct head_batch {
  int nbuf = 1;
  std::int64_t hs = 0, pitch = 0;
  std::vector<T> hidden[2], ref_hidden[2], weight, bias, ref_weight, ref_bias;
  std::vector<label_t> labels[2];
  std::vector<std::uint8_t> mask[2];
  std::vector<std::int64_t> cu, start;  // start[s]: buffer row of sequence s's first row
  std::vector<int> buf;                 // buf[s]: the buffer of sequence s

  explicit head_batch(const problem& p) : hs(p.H + 1) {
    const std::int64_t S = 2 * p.P;
    const T nan = T(nan_v);
    nbuf = p.lay == layout::separate ? 2 : 1;
    std::int64_t rows[2] = {0, 0};
    if (p.lay == layout::packed) {
      cu.push_back(0);
      for (std::int64_t s = 0; s < S; ++s) {
        start.push_back(cu.back());
        buf.push_back(0);
        cu.push_back(cu.back() + p.len[s]);
      }
      rows[0] = cu.back();
    } else {
      pitch = p.T + (p.lay == layout::gapped ? 1 : 0);
      for (std::int64_t s = 0; s < S; ++s) {
        const int b = nbuf == 2 && s >= p.P ? 1 : 0;
        buf.push_back(b);
        start.push_back((nbuf == 2 ? s % p.P : s) * pitch);
      }
      rows[0] = (nbuf == 2 ? p.P : S) * pitch;
      rows[1] = nbuf == 2 ? rows[0] : 0;
    }
    for (int b = 0; b < nbuf; ++b) {
      hidden[b].assign(static_cast<std::size_t>(std::max<std::int64_t>(1, rows[b] * hs)), nan);
      ref_hidden[b] = hidden[b];
      labels[b].assign(static_cast<std::size_t>(std::max<std::int64_t>(1, rows[b])), 123456);  // gaps: never read
      mask[b].assign(labels[b].size(), 1);
    }
    for (std::int64_t s = 0; s < S; ++s) {
      const std::int64_t n = p.lay == layout::packed ? p.len[s] : p.T;  // the sequence's rows
      for (std::int64_t k = 0; k < n; ++k) {
        const std::int64_t r = start[s] + k, q = p.row(s, k);
        labels[buf[s]][r] = p.lab[q];
        mask[buf[s]][r] = p.msk[q];
        for (std::int64_t j = 0; j < p.H; ++j) {
          hidden[buf[s]][r * hs + j] = T(p.hid[q * p.H + j]);
          ref_hidden[buf[s]][r * hs + j] = T(p.ref_hid[q * p.H + j]);
        }
      }
    }
    // The weights with stride H + 2, their padding columns NaN.
    weight.assign(static_cast<std::size_t>(p.V * (p.H + 2)), nan);
    ref_weight = weight;
    for (std::int64_t v = 0; v < p.V; ++v)
      for (std::int64_t j = 0; j < p.H; ++j) {
        weight[v * (p.H + 2) + j] = T(p.w[v * p.H + j]);
        ref_weight[v * (p.H + 2) + j] = T(p.rw[v * p.H + j]);
      }
    for (std::int64_t v = 0; v < p.V; ++v) {
      bias.push_back(T(p.b[v]));
      ref_bias.push_back(T(p.rb[v]));
    }
  }

  dpo::hidden_pairs<T, label_t> pairs(const problem& p, const std::vector<T>* h) const {
    const std::uint8_t* m0 = p.has_mask ? mask[0].data() : nullptr;
    if (p.lay == layout::packed)
      return dpo::linear_packed_pairs(h[0].data(), p.H, hs, labels[0].data(), cu.data(), 2 * p.P, m0);
    if (p.lay == layout::separate)
      return dpo::linear_separate_pairs(h[0].data(), labels[0].data(), h[1].data(), labels[1].data(), p.P, p.T, p.H,
                                        hs, m0, p.has_mask ? mask[1].data() : nullptr);
    auto v = dpo::linear_padded_pairs(h[0].data(), p.H, hs, labels[0].data(), 2 * p.P, p.T, m0);
    v.pairs.chosen.seq_stride = v.pairs.rejected.seq_stride = pitch;
    return v;
  }

  dpo::linear_head<T> head(const problem& p, bool reference) const {
    dpo::linear_head<T> h;
    h.weight = (reference ? ref_weight : weight).data();
    h.vocab = p.V;
    h.hidden = p.H;
    h.weight_stride = p.H + 2;
    if (p.has_bias) {
      h.bias = (reference ? ref_bias : bias).data();
      h.bias_size = p.V;
    }
    h.transforms = p.tr;
    return h;
  }
};

/// Every output of one fused call: the forward's, and the gradient buffers (dHidden in the
/// hidden buffers' layout, dWeight with stride H + 1, dBias), set to what they held before.
template <class T>
struct fused_out {
  double loss = sentinel, nll = sentinel;
  dpo::metrics m;
  std::vector<double> pair[8];  // [P] each, in fwd()'s order: losses, rewards, logps, dL/dpi, weights
  std::vector<T> dh[2], dw, db;

  fused_out(const problem& p, const head_batch<T>& hb) {
    std::memset(&m, 0x7f, sizeof m);
    for (auto& v : pair) v.assign(static_cast<std::size_t>(p.P), sentinel);
    for (int b = 0; b < hb.nbuf; ++b) {
      dh[b].assign(hb.hidden[b].size(), T(sentinel));
      if (p.accumulate)
        for (std::size_t i = 0; i < dh[b].size(); ++i) dh[b][i] = T(static_cast<double>(i % 7) / 4.0 - 0.75);
    }
    dw.assign(static_cast<std::size_t>(p.V * (p.H + 1)), T(0));
    for (std::size_t i = 0; i < dw.size(); ++i) dw[i] = T(static_cast<double>(i % 5) / 8.0 - 0.25);
    db.assign(static_cast<std::size_t>(p.V), T(0));
    for (std::size_t i = 0; i < db.size(); ++i) db[i] = T(static_cast<double>(i % 3) / 2.0);
  }

  dpo::forward_outputs fwd() {
    dpo::forward_outputs o;
    o.loss = &loss;
    o.metrics = &m;
    o.nll_token_grad = &nll;
    o.losses = pair[0].data();
    o.chosen_rewards = pair[1].data();
    o.rejected_rewards = pair[2].data();
    o.chosen_logps = pair[3].data();
    o.rejected_logps = pair[4].data();
    o.grad_chosen = pair[5].data();
    o.grad_rejected = pair[6].data();
    o.weights = pair[7].data();
    return o;
  }

  dpo::linear_dpo_grads<T, T> grads(const problem& p, const head_batch<T>& hb) {
    dpo::linear_dpo_grads<T, T> g;
    g.chosen_hidden = dh[0].data();
    g.rejected_hidden = hb.nbuf == 2 ? dh[1].data() : dh[0].data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = hb.hs;
    g.accumulate_hidden = p.accumulate;
    g.weight = dw.data();
    g.weight_stride = p.H + 1;
    if (p.has_bias) g.bias = db.data();
    return g;
  }
};

template <class T>
bool same_vec(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i])) return false;
  return true;
}

template <class T>
bool same_out(const fused_out<T>& a, const fused_out<T>& b) {
  if (!same(a.loss, b.loss) || !same(a.nll, b.nll) || std::memcmp(&a.m, &b.m, sizeof a.m) != 0) return false;
  for (int k = 0; k < 8; ++k)
    if (!same_vec(a.pair[k], b.pair[k])) return false;
  return same_vec(a.dh[0], b.dh[0]) && same_vec(a.dh[1], b.dh[1]) && same_vec(a.dw, b.dw) && same_vec(a.db, b.db);
}

bool same_metrics(const dpo::metrics& a, const dpo::metrics& b) {
  const double* x = reinterpret_cast<const double*>(&a);
  const double* y = reinterpret_cast<const double*>(&b);
  for (int k = 0; k < dpo::num_metrics; ++k)
    if (!same(x[k], y[k])) return false;
  return true;
}

bool same_eigen(const std::vector<double>& a, const Eigen::VectorXd& b) {
  if (static_cast<Eigen::Index>(a.size()) != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[static_cast<Eigen::Index>(i)])) return false;
  return true;
}

/// One fused call into fresh outputs; the dpo::error message, or "" when it returned.
template <class T>
std::string fused_call(const problem& p, const head_batch<T>& hb, int threads, fused_out<T>& o) {
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = threads;
  opt.chunk_rows = p.chunk_rows;
  opt.mode = p.mode;
  try {
    if (p.ref_hidden) {
      dpo::cpu::linear_dpo(hb.pairs(p, hb.hidden), hb.head(p, false), hb.pairs(p, hb.ref_hidden), hb.head(p, true),
                           p.cfg, o.fwd(), o.grads(p, hb), opt);
    } else {
      dpo::cpu::linear_dpo(hb.pairs(p, hb.hidden), hb.head(p, false), p.ref_c.data(), p.ref_r.data(), p.cfg, o.fwd(),
                           o.grads(p, hb), opt);
    }
  } catch (const dpo::error& e) {
    return e.what();
  }
  return {};
}

/// The split API, linear_dpo_forward (writing the row state) then linear_dpo_backward from
/// it, is bitwise the fused call in four passes (one hidden buffer: the row state is indexed
/// by its rows).
template <class T>
void check_split(problem q, const head_batch<T>& hb) {
  q.mode = dpo::linear_mode::four_pass;
  fused_out<T> fused(q, hb), split(q, hb);
  FUZZ_CHECK(fused_call(q, hb, 1, fused).empty());  // four passes are always possible
  const std::size_t rows = hb.hidden[0].size() / static_cast<std::size_t>(hb.hs) + 1;
  std::vector<double> lse(rows, sentinel), coef(rows, sentinel);
  dpo::forward_outputs o = split.fwd();
  o.row_lse = lse.data();
  o.row_coef = coef.data();
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = 1;
  opt.chunk_rows = q.chunk_rows;
  opt.mode = q.mode;
  try {
    if (q.ref_hidden) {
      dpo::cpu::linear_dpo_forward(hb.pairs(q, hb.hidden), hb.head(q, false), hb.pairs(q, hb.ref_hidden),
                                   hb.head(q, true), q.cfg, o, opt);
    } else {
      dpo::cpu::linear_dpo_forward(hb.pairs(q, hb.hidden), hb.head(q, false), q.ref_c.data(), q.ref_r.data(), q.cfg,
                                   o, opt);
    }
    dpo::cpu::linear_dpo_backward(hb.pairs(q, hb.hidden), hb.head(q, false), lse.data(), coef.data(),
                                  split.grads(q, hb), 1.0, opt);
  } catch (const dpo::error& e) {
    std::fprintf(stderr, "the split call threw: %s\n", e.what());
    FUZZ_CHECK(false);
  }
  FUZZ_CHECK(same_out(split, fused));
}

/// |got - want| <= tol * max(max |want|, 1e-3) for every entry, when want is finite.
bool close(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  double scale = 1e-3;
  for (double x : want) {
    if (!std::isfinite(x)) return true;  // a non-finite gradient: nothing to compare to
    scale = std::max(scale, std::abs(x));
  }
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(std::abs(got[i] - want[i]) <= tol * scale)) return false;
  return true;
}

/// A context rank's packed copy of its rows of every sequence (rows [cut(n, c, C),
/// cut(n, c + 1, C)) of each, tests/shard_ranks.hpp): hidden states, labels, mask, its own
/// cu_seqlens, and its dHidden buffer (sentinel-filled, one row more than it holds, never
/// written); buf / orig map a copy row to the batch's buffer and row.
template <class T>
struct context_rows {
  std::vector<T> h, dh;
  std::vector<label_t> y;
  std::vector<std::uint8_t> m;
  std::vector<std::int64_t> cu{0}, orig;
  std::vector<int> buf;
  std::int64_t rows = 0;

  context_rows(const problem& p, const head_batch<T>& hb, int c, int C) {
    for (std::int64_t s = 0; s < 2 * p.P; ++s) {
      const std::int64_t n = p.lay == layout::packed ? p.len[s] : p.T;
      const int b = hb.buf[s];
      for (std::int64_t t = shard_ranks::cut(n, c, C); t < shard_ranks::cut(n, c + 1, C); ++t) {
        const std::int64_t r = hb.start[s] + t;
        h.insert(h.end(), hb.hidden[b].begin() + r * hb.hs, hb.hidden[b].begin() + (r + 1) * hb.hs);
        y.push_back(hb.labels[b][r]);
        m.push_back(hb.mask[b][r]);
        buf.push_back(b);
        orig.push_back(r);
      }
      cu.push_back(static_cast<std::int64_t>(orig.size()));
    }
    rows = static_cast<std::int64_t>(orig.size());
    h.resize(static_cast<std::size_t>((rows + 1) * hb.hs), T(nan_v));
    y.resize(static_cast<std::size_t>(rows + 1), label_t{-100});
    m.resize(y.size(), 1);
    dh.assign(h.size(), T(sentinel));
  }

  dpo::hidden_pairs<T, label_t> pairs(const problem& p, const head_batch<T>& hb) const {
    return dpo::linear_packed_pairs(h.data(), p.H, hb.hs, y.data(), cu.data(), 2 * p.P,
                                    p.has_mask ? m.data() : nullptr);
  }
};

/// The head on vocabulary shards and context slices: linear_dpo_sharded over W x C ranks
/// picked by the problem's first label and sizes (ranks as threads with an in-process
/// all-reduce, tests/shard_ranks.hpp), 1 to 3 uneven vocabulary shards, each over 1 to 3
/// context ranks (C > 1: each holds a packed copy of its slice of every sequence,
/// context_rows), reference log-probs, against the unsharded fused call `u` (or the logits
/// path's refusal):
///   - every rank refuses exactly when the logits path does, and then writes nothing; with
///     C > 1 an LD-DPO ld_alpha != 1 is refused on every rank, naming it;
///   - every rank holds bitwise the same forward outputs; the token accuracy is equal;
///   - each sequence's log-prob within the bound of its rows (rounding of the accumulation
///     type, as fuzz_dpo's check_sharded), rewards within |beta| times it, WPO weights within
///     the bound of their exponent, the loss (without WPO) within the Lipschitz bound of both
///     calls' dL/dpi and NLL token gradients;
///   - where both calls' dL/dpi agree to 1e-6 relative, the ranks' dHidden partials summed,
///     and the dWeight / dBias rows each rank adds, equal the unsharded gradients within the
///     fuzzer's gradient tolerance; dWeight's padding column and the rows of dHidden that do
///     not count stay as they were.
template <class T>
void check_sharded(const problem& p, const head_batch<T>& hb, const fused_out<T>* u, const fused_out<T>& before) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const std::int64_t V = p.V, P = p.P;
  rng pick_shards{static_cast<std::uint64_t>(p.lab[0] + 7 * V + 13 * p.T + 31 * p.H)};
  const int W = static_cast<int>(std::min<std::int64_t>(V, 1 + static_cast<std::int64_t>(pick_shards.next() % 3)));
  const std::vector<std::int64_t> cuts = random_cuts(V, W, pick_shards);
  const int C = 1 + static_cast<int>(pick_shards.next() % 3);
  std::vector<context_rows<T>> slices;
  for (int c = 0; c < C && C > 1; ++c) slices.emplace_back(p, hb, c, C);

  std::vector<fused_out<T>> outs;
  for (int k = 0; k < W * C; ++k) outs.emplace_back(p, hb);
  fused_out<T> shared = before;  // dWeight / dBias: each rank adds its own rows
  const dpo::linear_head<T> full = hb.head(p, false);
  shard_ranks::grid ranks(W, C);
  // C > 1: every rank writes its dHidden partial into its own copy of its slice's buffer
  // (the vocabulary shards of a slice write the same rows), and its dWeight / dBias rows into
  // its slice's copy of the head's gradients (slice 0's holds what the buffers held, the
  // others start at 0), which the caller of a context-parallel head sums over the context
  // group (here below, in double).
  std::vector<std::vector<T>> cdh(static_cast<std::size_t>(W * C));
  for (int k = 0; k < W * C && C > 1; ++k) cdh[static_cast<std::size_t>(k)] = slices[static_cast<std::size_t>(k / W)].dh;
  std::vector<std::vector<T>> cdw(static_cast<std::size_t>(C), std::vector<T>(before.dw.size(), T(0)));
  std::vector<std::vector<T>> cdb(static_cast<std::size_t>(C), std::vector<T>(before.db.size(), T(0)));
  cdw[0] = before.dw;
  cdb[0] = before.db;
  const std::vector<std::string> errors = ranks.run([&](int rank, int t, int c, const dpo::cpu::collectives& comm) {
    const dpo::vocab_shard sh{V, cuts[t], cuts[t + 1]};
    dpo::linear_head<T> head = full;
    head.weight += sh.start * head.weight_stride;
    head.vocab = sh.width();
    if (head.bias != nullptr) {
      head.bias += sh.start;
      head.bias_size = sh.width();
    }
    fused_out<T>& o = outs[static_cast<std::size_t>(rank)];
    dpo::linear_dpo_grads<T, T> g = o.grads(p, hb);
    g.accumulate_hidden = false;  // the partial alone: summed below
    if (C > 1) g.chosen_hidden = g.rejected_hidden = cdh[static_cast<std::size_t>(rank)].data();
    g.weight = cdw[static_cast<std::size_t>(c)].data() + sh.start * (p.H + 1);
    g.bias = p.has_bias ? cdb[static_cast<std::size_t>(c)].data() + sh.start : nullptr;
    dpo::cpu::linear_dpo_options opt;
    opt.num_threads = 1;
    opt.chunk_rows = p.chunk_rows;
    dpo::cpu::linear_dpo_sharded(C > 1 ? slices[static_cast<std::size_t>(c)].pairs(p, hb) : hb.pairs(p, hb.hidden),
                                 head, sh, p.ref_c.data(), p.ref_r.data(), p.cfg, comm, o.fwd(), g, 1.0, opt);
  });
  for (std::size_t i = 0; i < shared.dw.size(); ++i) {
    double sum = static_cast<double>(cdw[0][i]);
    for (int c = 1; c < C; ++c) sum += static_cast<double>(cdw[static_cast<std::size_t>(c)][i]);
    shared.dw[i] = static_cast<T>(sum);  // C = 1: bitwise cdw[0][i]
  }
  for (std::size_t i = 0; i < shared.db.size(); ++i) {
    double sum = static_cast<double>(cdb[0][i]);
    for (int c = 1; c < C; ++c) sum += static_cast<double>(cdb[static_cast<std::size_t>(c)][i]);
    shared.db[i] = static_cast<T>(sum);
  }
  // C > 1: each rank's dHidden partial into its fused_out, at the batch's rows (0 on the rows
  // of the other context slices); the row past the copy's must be untouched.
  for (int k = 0; k < W * C && C > 1; ++k) {
    const context_rows<T>& cr = slices[static_cast<std::size_t>(k / W)];
    const std::vector<T>& d = cdh[static_cast<std::size_t>(k)];
    fused_out<T>& o = outs[static_cast<std::size_t>(k)];
    for (std::int64_t j = 0; j < hb.hs; ++j) FUZZ_CHECK(same(d[static_cast<std::size_t>(cr.rows * hb.hs + j)], T(sentinel)));
    if (u == nullptr) {
      for (const T x : d) FUZZ_CHECK(same(x, T(sentinel)));
      continue;
    }
    for (int b = 0; b < hb.nbuf; ++b) std::fill(o.dh[b].begin(), o.dh[b].end(), T(0));
    for (std::int64_t i = 0; i < cr.rows; ++i)
      std::copy_n(d.begin() + i * hb.hs, hb.hs,
                  o.dh[cr.buf[static_cast<std::size_t>(i)]].begin() + cr.orig[static_cast<std::size_t>(i)] * hb.hs);
  }
  if (check_sharded_refusal(errors, u != nullptr, C > 1, p.cfg.ld_alpha, "linear_dpo_sharded")) {
    FUZZ_CHECK(same_vec(shared.dw, before.dw) && same_vec(shared.db, before.db));
    for (const fused_out<T>& o : outs) FUZZ_CHECK(same(o.loss, before.loss) && same_vec(o.pair[0], before.pair[0]));
    for (const std::vector<T>& d : cdh)
      for (const T x : d) FUZZ_CHECK(same(x, T(sentinel)));
    for (int c = 1; c < C; ++c)
      for (std::size_t i = 0; i < cdw[0].size(); ++i) FUZZ_CHECK(cdw[static_cast<std::size_t>(c)][i] == T(0));
    return;
  }
  const fused_out<T>& r = outs[0];
  for (const fused_out<T>& o : outs) {
    FUZZ_CHECK(same(o.loss, r.loss) && same(o.nll, r.nll) && same_metrics(o.m, r.m));
    for (int k = 0; k < 8; ++k) FUZZ_CHECK(same_vec(o.pair[k], r.pair[k]));
  }
  FUZZ_CHECK(same(r.m.mean_token_accuracy, u->m.mean_token_accuracy));

  // Each sequence's log-prob: both calls within 64 eps (V + 8) of each row's exact value
  // (the logits are small here: no magnitude term).
  const double eps = std::numeric_limits<A>::epsilon(), deps = std::numeric_limits<double>::epsilon();
  const double rel = 64 * eps * (static_cast<double>(V) + 8);
  std::vector<double> tol(static_cast<std::size_t>(2 * P), 0.0);
  for (std::int64_t s = 0; s < 2 * P; ++s)
    for (std::int64_t k = 0; k < p.len[s]; ++k)
      if (p.counts(s, k)) tol[static_cast<std::size_t>(s)] += 2 * rel;
  double loss_tol = (std::is_same_v<A, float> ? 1e-4 : 1e-9) * (1 + std::fabs(u->loss));
  bool finite = std::isfinite(u->loss) && std::isfinite(r.loss), grads_agree = true;
  for (std::int64_t i = 0; i < P; ++i)
    for (int side = 0; side < 2; ++side) {
      const std::size_t s = static_cast<std::size_t>(side * P + i);
      const double pi = u->pair[3 + side][i], pi_sh = r.pair[3 + side][i];
      FUZZ_CHECK(std::isnan(pi) == std::isnan(pi_sh));
      if (std::isfinite(pi)) FUZZ_CHECK(std::fabs(pi_sh - pi) <= tol[s] + 4 * deps * std::fabs(pi));
      const double rw = u->pair[1 + side][i], rw_sh = r.pair[1 + side][i];
      if (std::isfinite(rw) && std::isfinite(rw_sh))
        FUZZ_CHECK(std::fabs(rw_sh - rw) <= std::fabs(p.cfg.beta) * (tol[s] + 4 * deps * std::fabs(pi)) +
                                                 4 * deps * std::fabs(rw));
      const double g0 = u->pair[5 + side][i], g1 = r.pair[5 + side][i];
      finite = finite && std::isfinite(g0) && std::isfinite(g1);
      loss_tol += (std::fmax(std::fabs(g0), std::fabs(g1)) +
                   (side == 0 ? std::fmax(std::fabs(u->nll), std::fabs(r.nll)) : 0.0)) * tol[s];
      grads_agree = grads_agree && std::fabs(g1 - g0) <= 1e-6 * std::fabs(g0) + 1e-300;
    }
  // WPO weights within the bound of their exponent (each row's WPO term within twice its
  // log-prob's, over the side's clamped token count).
  for (std::int64_t i = 0; i < P && p.cfg.use_weighting; ++i) {
    double e = 0;
    for (int side = 0; side < 2; ++side) {
      const std::int64_t s = side * P + i;
      double n = 0;
      for (std::int64_t k = 0; k < p.len[s]; ++k) n += p.counts(s, k) ? 1 : 0;
      e += 2 * tol[static_cast<std::size_t>(s)] / std::max(n, 1.0);
    }
    const double w = u->pair[7][i], w_sh = r.pair[7][i];
    if (std::isfinite(w)) FUZZ_CHECK(w_sh == w || std::fabs(w_sh - w) <= w * (std::expm1(e) + 4 * deps));
  }
  grads_agree = grads_agree && std::fabs(r.nll - u->nll) <= 1e-6 * std::fabs(u->nll);
  if (finite && !p.cfg.use_weighting) FUZZ_CHECK(std::fabs(r.loss - u->loss) <= loss_tol);

  // Gradients.
  for (std::int64_t v = 0; v < V; ++v) FUZZ_CHECK(same(shared.dw[v * (p.H + 1) + p.H], before.dw[v * (p.H + 1) + p.H]));
  if (!p.has_bias) FUZZ_CHECK(same_vec(shared.db, before.db));
  if (!finite || !grads_agree) return;
  std::vector<double> got_dh, want_dh, got_dw, want_dw, got_db, want_db;
  for (std::int64_t s = 0; s < 2 * P; ++s) {
    const int b = hb.buf[s];
    const std::int64_t n = p.lay == layout::packed ? p.len[s] : p.T;
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t at = (hb.start[s] + k) * hb.hs;
      for (std::int64_t j = 0; j < p.H; ++j) {
        double sum = p.accumulate ? static_cast<double>(before.dh[b][at + j]) : 0.0;
        for (const fused_out<T>& o : outs) sum += static_cast<double>(o.dh[b][at + j]);
        got_dh.push_back(sum);
        want_dh.push_back(static_cast<double>(u->dh[b][at + j]));
      }
    }
  }
  for (std::int64_t v = 0; v < V; ++v) {
    for (std::int64_t j = 0; j < p.H; ++j) {
      got_dw.push_back(static_cast<double>(shared.dw[v * (p.H + 1) + j]));
      want_dw.push_back(static_cast<double>(u->dw[v * (p.H + 1) + j]));
    }
    got_db.push_back(static_cast<double>(shared.db[v]));
    want_db.push_back(static_cast<double>(u->db[v]));
  }
  const double gtol = sizeof(T) == 4 ? 1e-4 : 1e-10;
  FUZZ_CHECK(close(got_dh, want_dh, 2 * gtol));
  FUZZ_CHECK(close(got_dw, want_dw, 2 * gtol));
  FUZZ_CHECK(close(got_db, want_db, 2 * gtol));
}

template <class T>
void run(const problem& p) {
  const logits_batch<T> lb = logits_of<T>(p);
  const std::uint8_t* m = p.has_mask ? p.msk.data() : nullptr;
  const auto view = dpo::padded_pairs(lb.z.data(), p.lab.data(), 2 * p.P, p.T, p.V, p.V, m);
  const auto ref_view = dpo::padded_pairs(lb.ref.data(), p.lab.data(), 2 * p.P, p.T, p.V, p.V, m);
  dpo::cpu::forward_result want;
  std::vector<T> dz(lb.z.size(), T(0));
  bool refused = false;
  try {
    want = p.ref_hidden ? dpo::cpu::dpo_forward(view, ref_view, p.cfg)
                        : dpo::cpu::dpo_forward(view, p.ref_c.data(), p.ref_r.data(), p.cfg);
    dpo::cpu::dpo_backward(view, want, dpo::pair_grad_view<T>{dz.data(), p.V, dz.data(), p.V});
  } catch (const dpo::error&) {
    refused = true;
  }

  const head_batch<T> hb(p);
  fused_out<T> got(p, hb);
  const fused_out<T> before = got;
  const std::string err = fused_call(p, hb, 1, got);
  if (!err.empty()) {
    // Refused: as the logits path, or three passes forced where the plan cannot have them.
    FUZZ_CHECK(refused || (p.mode == dpo::linear_mode::three_pass &&
                           err.find("options.mode = three_pass is impossible") != std::string::npos));
    FUZZ_CHECK(same_out(got, before));
    if (!p.ref_hidden && refused) check_sharded<T>(p, hb, nullptr, before);
    return;
  }
  FUZZ_CHECK(!refused);

  // The forward: bitwise the logits path's.
  FUZZ_CHECK(same(got.loss, want.loss));
  FUZZ_CHECK(same_metrics(got.m, want.metrics));
  FUZZ_CHECK(same(got.nll, want.nll_token_grad));
  FUZZ_CHECK(same_eigen(got.pair[0], want.losses));
  FUZZ_CHECK(same_eigen(got.pair[1], want.chosen_rewards));
  FUZZ_CHECK(same_eigen(got.pair[2], want.rejected_rewards));
  FUZZ_CHECK(same_eigen(got.pair[3], want.chosen_logps));
  FUZZ_CHECK(same_eigen(got.pair[4], want.rejected_logps));
  FUZZ_CHECK(same_eigen(got.pair[5], want.grad_chosen));
  FUZZ_CHECK(same_eigen(got.pair[6], want.grad_rejected));
  FUZZ_CHECK(same_eigen(got.pair[7], want.weights));

  // The gradients: dL/dlogits through do/du and the products, in double, plus what the
  // buffers held (dHidden only when accumulated).
  std::vector<double> want_dh, got_dh, want_dw(static_cast<std::size_t>(p.V * p.H), 0.0), got_dw,
      want_db(static_cast<std::size_t>(p.V), 0.0), got_db;
  for (std::int64_t s = 0; s < 2 * p.P; ++s) {
    const int b = hb.buf[s];
    const std::int64_t n = p.lay == layout::packed ? p.len[s] : p.T;
    for (std::int64_t k = 0; k < n; ++k) {
      const std::int64_t r = p.row(s, k), br = hb.start[s] + k;
      std::vector<double> row(static_cast<std::size_t>(p.H), 0.0);
      if (p.counts(s, k)) {
        for (std::int64_t v = 0; v < p.V; ++v) {
          const double du = static_cast<double>(dz[r * p.V + v]) * lb.dodu[r * p.V + v];
          want_db[v] += du;
          for (std::int64_t j = 0; j < p.H; ++j) {
            row[j] += du * p.w[v * p.H + j];
            want_dw[v * p.H + j] += du * p.hid[r * p.H + j];
          }
        }
      } else {
        // A row that does not count: exactly 0, or what it held.
        for (std::int64_t j = 0; j < p.H; ++j)
          FUZZ_CHECK(same(got.dh[b][br * hb.hs + j], p.accumulate ? before.dh[b][br * hb.hs + j] : T(0)));
      }
      for (std::int64_t j = 0; j < p.H; ++j) {
        want_dh.push_back(row[j] + (p.accumulate ? static_cast<double>(before.dh[b][br * hb.hs + j]) : 0.0));
        got_dh.push_back(static_cast<double>(got.dh[b][br * hb.hs + j]));
      }
      FUZZ_CHECK(same(got.dh[b][br * hb.hs + p.H], before.dh[b][br * hb.hs + p.H]));  // padding column
    }
    // The gap row after a sequence is never written.
    if (p.lay == layout::gapped) {
      const std::int64_t gap = hb.start[s] + p.T;
      for (std::int64_t j = 0; j < hb.hs; ++j) FUZZ_CHECK(same(got.dh[b][gap * hb.hs + j], before.dh[b][gap * hb.hs + j]));
    }
  }
  for (std::int64_t v = 0; v < p.V; ++v) {
    for (std::int64_t j = 0; j < p.H; ++j) {
      want_dw[v * p.H + j] += static_cast<double>(before.dw[v * (p.H + 1) + j]);
      got_dw.push_back(static_cast<double>(got.dw[v * (p.H + 1) + j]));
    }
    FUZZ_CHECK(same(got.dw[v * (p.H + 1) + p.H], before.dw[v * (p.H + 1) + p.H]));  // padding column
    want_db[v] += static_cast<double>(before.db[v]);
    got_db.push_back(static_cast<double>(got.db[v]));
  }
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-10;
  FUZZ_CHECK(close(got_dh, want_dh, tol));
  FUZZ_CHECK(close(got_dw, want_dw, tol));
  if (p.has_bias) {
    FUZZ_CHECK(close(got_db, want_db, tol));
  } else {
    FUZZ_CHECK(same_vec(got.db, before.db));  // no bias: dBias untouched
  }

  // Two threads: bitwise the same.
  fused_out<T> two(p, hb);
  FUZZ_CHECK(fused_call(p, hb, 2, two).empty());
  FUZZ_CHECK(same_out(two, got));

  if (p.lay != layout::separate) check_split(p, hb);
  if (!p.ref_hidden) check_sharded<T>(p, hb, &got, before);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader in{data, size};
  const bool dbl = size > 0 && (data[0] & 1) != 0;
  const problem p = decode(in);
  if (dbl) {
    run<double>(p);
  } else {
    run<float>(p);
  }
  return 0;
}
