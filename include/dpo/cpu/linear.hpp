// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Per-token log-probs straight from hidden states and an LM head (issue 12, item 1): the
// logits z = hidden . weight^T + bias, transformed per logit (dpo/core/transforms.hpp), are
// computed one chunk [chunk rows, chunk vocab] at a time in the accumulation type and folded
// into each row's statistics with the row kernels of dpo/cpu/rows.hpp and the online merge
// of dpo/core/math.hpp, so no [rows, vocab] buffer ever exists. The backward recomputes every
// chunk (four GEMM passes in all: logits, recompute, dHidden, dWeight).
//
// Threads: inside a chunk the units of work are fixed tiles (linear_vocab_tile columns for
// the logits and dWeight products, linear_row_tile rows for the dHidden product), each
// computed by one product of a fixed shape on one thread (a call of the GEMM hook,
// dpo/cpu/gemm.hpp; Eigen by default), and written to memory that
// tile alone owns. Chunks run in a fixed order. So every output element is formed in an
// order that depends on the chunk shape only: results are bitwise identical run to run and
// for every thread count. Eigen's own GEMM threading must be off (it is unless Eigen is built
// with OpenMP; then define EIGEN_DONT_PARALLELIZE or call Eigen::setNbThreads(1)): its
// products split work by its thread count, which would make the rounding depend on it. A
// plugged GEMM owes the same (docs/linear.md, "GEMM hook").
//
// Math and memory model: docs/linear.md.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "dpo/core/linear_check.hpp"
#include "dpo/core/linear_view.hpp"
#include "dpo/core/math.hpp"
#include "dpo/core/shard.hpp"
#include "dpo/core/transforms.hpp"
#include "dpo/cpu/check.hpp"
#include "dpo/cpu/gemm.hpp"
#include "dpo/cpu/parallel.hpp"
#include "dpo/cpu/rows.hpp"
#include "dpo/error.hpp"

namespace dpo {
namespace cpu {

/// The default workspace budget of the linear head: 256 MiB.
inline constexpr std::int64_t default_linear_workspace_bytes = std::int64_t{256} << 20;

/// The view, chunk shape and gradient targets are the core's (dpo/core/linear_view.hpp),
/// here with host pointers.
using dpo::linear_chunking;
using dpo::linear_grads;
using dpo::linear_outputs;
using dpo::linear_view;

/// Run-time options of the linear head.
struct linear_options {
  /// Worker threads; 0 uses every hardware thread. Results are bitwise identical for every
  /// value.
  int num_threads = 0;
  /// Bytes the call may allocate for its workspace (the logits chunk and its companions,
  /// docs/linear.md); the chunk shape follows from it.
  std::int64_t workspace_bytes = default_linear_workspace_bytes;
  /// Fix the chunk shape instead (0 = from the budget); it must still fit the budget. Results
  /// depend on the chunk shape only through the rounding of the products.
  std::int64_t chunk_rows = 0;
  std::int64_t chunk_vocab = 0;
  /// The matrix products (dpo/cpu/gemm.hpp): Eigen unless replaced, e.g. by a BLAS. The
  /// determinism above holds for a plugged GEMM that keeps the rules of docs/linear.md,
  /// "GEMM hook".
  linear_gemm gemm;
};

namespace detail {

/// Vocab columns per unit of work of the logits and dWeight products.
inline constexpr std::int64_t linear_vocab_tile = 256;
/// Rows per unit of work of the dHidden product. Each unit's product repacks the whole weight
/// chunk ([chunk vocab, H]), so units are tall enough for the packing to stay small against
/// the multiply (2 x 128 flops per packed element).
inline constexpr std::int64_t linear_row_tile = 128;
/// Vocab columns of a chunk when the budget allows (the chunk then grows in rows).
inline constexpr std::int64_t linear_default_chunk_vocab = 8192;

using dpo::detail::fail;

/// Fails unless both GEMMs of the hook are set.
inline void check_gemm(const linear_gemm& g) {
  if (g.sgemm == nullptr) fail("options.gemm.sgemm is null");
  if (g.dgemm == nullptr) fail("options.gemm.dgemm is null");
}

/// C [m, n] (row stride ldc) = op(A) . op(B) + beta * C through the hook, in A (alpha 1):
/// every product of the head is one call.
template <class A>
void gemm(const linear_gemm& g, bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n,
          std::int64_t k, const A* a, std::int64_t lda, const A* b, std::int64_t ldb, A beta, A* c,
          std::int64_t ldc) {
  g.of<A>()(g.context, transpose_a, transpose_b, m, n, k, A(1), a, lda, b, ldb, beta, c, ldc);
}

/// Workspace bytes of a [rows, vocab] chunk: the gathered hidden rows, the logits chunk, the
/// weight chunk converted to A (bf16/half only), and the larger of the forward's row
/// statistics and the backward's dHidden accumulator; plus the list of counted rows.
template <class T>
std::int64_t linear_workspace(std::int64_t rows, std::int64_t vocab, std::int64_t H,
                              std::int64_t N) {
  using A = acc_t<T>;
  const std::int64_t a = sizeof(A);
  const std::int64_t tiles = (vocab + linear_vocab_tile - 1) / linear_vocab_tile;
  const std::int64_t stats = sizeof(dpo::detail::row_stats<A>);
  const std::int64_t fwd = rows * (tiles + 1) * stats + rows * a;
  const std::int64_t bwd = rows * H * a;
  const std::int64_t convert = std::is_same_v<T, A> ? 0 : vocab * H * a;
  return rows * H * a + rows * vocab * a + convert + std::max(fwd, bwd) +
         N * static_cast<std::int64_t>(sizeof(std::int64_t));
}

/// The chunk shape: opt.chunk_vocab or up to linear_default_chunk_vocab columns, then as many
/// rows as the budget allows (opt.chunk_rows if given); narrower chunks only when one row of
/// the default width does not fit. Fails when not even one row fits.
template <class T>
linear_chunking linear_chunks(std::int64_t N, std::int64_t H, std::int64_t V,
                              const linear_options& opt) {
  if (opt.workspace_bytes < 0)
    fail("options.workspace_bytes = ", opt.workspace_bytes, " is invalid: must be >= 0");
  if (opt.chunk_rows < 0)
    fail("options.chunk_rows = ", opt.chunk_rows, " is invalid: must be >= 0 (0 = from the budget)");
  if (opt.chunk_vocab < 0)
    fail("options.chunk_vocab = ", opt.chunk_vocab, " is invalid: must be >= 0 (0 = from the budget)");
  check_gemm(opt.gemm);
  const std::int64_t B = opt.workspace_bytes;
  const std::int64_t max_rows = std::max<std::int64_t>(N, 1);
  linear_chunking c;
  c.vocab = std::min(V, opt.chunk_vocab > 0 ? opt.chunk_vocab : linear_default_chunk_vocab);
  if (opt.chunk_vocab == 0) {
    while (c.vocab > 1 && linear_workspace<T>(1, c.vocab, H, N) > B) c.vocab = (c.vocab + 1) / 2;
  }
  if (opt.chunk_rows > 0) {
    c.rows = std::min(opt.chunk_rows, max_rows);
  } else {
    // The workspace is affine in the rows: fixed + rows * per_row.
    const std::int64_t fixed = linear_workspace<T>(0, c.vocab, H, N);
    const std::int64_t per_row = linear_workspace<T>(1, c.vocab, H, N) - fixed;
    c.rows = B > fixed ? std::min((B - fixed) / per_row, max_rows) : 0;
    c.rows = std::max<std::int64_t>(c.rows, 1);
  }
  c.workspace_bytes = linear_workspace<T>(c.rows, c.vocab, H, N);
  if (c.workspace_bytes > B)
    fail("options.workspace_bytes = ", B, " is too small for one row: a chunk of ", c.rows, " x ",
         c.vocab, " needs ", c.workspace_bytes, " bytes");
  return c;
}

/// The fused head's argument checks are the core's (dpo/core/linear_check.hpp, shared with
/// CUDA), thrown as dpo::error.
using linear_range = dpo::detail::named_range;
using dpo::detail::range_of;

/// `label_bound`: the vocabulary the labels index (0: the view's; a vocabulary shard's view
/// passes the global vocabulary, dpo/cpu/linear_shard.hpp).
template <class T, class L>
void check_linear_view(const linear_view<T, L>& v, std::int64_t label_bound = 0) {
  throw_if(dpo::detail::check_linear_view(v, dpo::detail::cpu_policy(), label_bound));
}

/// The byte ranges of every input of a view (5 entries), for the aliasing checks.
template <class T, class L>
void input_ranges(const linear_view<T, L>& v, linear_range* out) {
  dpo::detail::linear_input_ranges(v, out);
}

/// An uninitialised buffer of n values (the workspace is written before it is read).
template <class A>
std::unique_ptr<A[]> linear_buffer(std::int64_t n) {
  return std::unique_ptr<A[]>(new A[static_cast<std::size_t>(std::max<std::int64_t>(n, 1))]);
}

/// Row i of dst [n, H] (A) = row row_of(i) of src [.., stride] (T), converted; over the pool.
template <class A, class T, class RowOf>
void gather_rows(const T* src, std::int64_t stride, RowOf row_of, std::int64_t n, std::int64_t H, A* dst,
                 int threads) {
  parallel_for(n, threads, [&](std::int64_t i0, std::int64_t i1) {
    for (std::int64_t i = i0; i < i1; ++i) {
      const T* s = src + row_of(i) * stride;
      A* d = dst + i * H;
      for (std::int64_t c = 0; c < H; ++c) d[c] = to_acc<A>(s[c]);
    }
  });
}

/// The state shared by the forward and backward loops: the counted rows, the hidden rows of
/// the current chunk gathered in A, and the weight chunk (converted to A for bf16/half).
template <class T, class L>
struct linear_pass {
  using A = acc_t<T>;
  static constexpr bool convert = !std::is_same_v<T, A>;

  const linear_view<T, L>& in;
  linear_chunking ch;
  int threads;
  linear_gemm mm;
  std::int64_t H;
  std::vector<std::int64_t> active;  // counted rows, ascending
  std::unique_ptr<A[]> hb;           // [ch.rows, H]
  std::unique_ptr<A[]> z;            // [ch.rows, ch.vocab], row stride = the chunk's width
  std::unique_ptr<A[]> wc;           // [ch.vocab, H] when convert
  std::int64_t nb = 0;               // rows of the current chunk
  std::int64_t v0 = 0, nv = 0;       // columns of the current chunk

  linear_pass(const linear_view<T, L>& v, const linear_chunking& c, int t, const linear_gemm& g)
      : in(v), ch(c), threads(t), mm(g), H(v.hidden_cols) {
    hb = linear_buffer<A>(ch.rows * H);
    z = linear_buffer<A>(ch.rows * ch.vocab);
    if (convert) wc = linear_buffer<A>(ch.vocab * H);
  }

  /// The counted rows (label not ignored, not masked) into `active`; skipped(r) for the others.
  template <class Fn>
  void select_counted(Fn&& skipped) {
    for (std::int64_t r = 0; r < in.rows; ++r) {
      if (in.target(r) >= 0) {
        active.push_back(r);
      } else {
        skipped(r);
      }
    }
  }

  /// Loads rows active[b0, b0 + n) of hidden into hb (converted to A).
  void gather(std::int64_t b0, std::int64_t n) {
    nb = n;
    gather_rows(in.hidden, in.hidden_stride, [&](std::int64_t i) { return active[b0 + i]; }, n, H, hb.get(),
                threads);
  }

  /// Selects vocab rows [c0, c0 + n) as the current chunk (converting them for bf16/half).
  void select_vocab(std::int64_t c0, std::int64_t n) {
    v0 = c0;
    nv = n;
    if constexpr (convert)
      gather_rows(in.weight, in.weight_stride, [&](std::int64_t j) { return v0 + j; }, n, H, wc.get(), threads);
  }

  std::int64_t tiles() const { return (nv + linear_vocab_tile - 1) / linear_vocab_tile; }

  /// The weight chunk [nv, H] in A and its row stride.
  const A* weight_chunk() const {
    if constexpr (convert) {
      return wc.get();
    } else {
      return in.weight + v0 * in.weight_stride;
    }
  }
  std::int64_t weight_chunk_stride() const { return convert ? H : in.weight_stride; }

  /// Raw logits of tile k: z[:, j0 : j0 + w) = hb . weight[v0 + j0, v0 + j0 + w)^T, one
  /// product of shape [nb, H] x [H, w] (fixed by the chunk, never by the threads).
  void tile_logits(std::int64_t k, std::int64_t* j0, std::int64_t* w) {
    *j0 = k * linear_vocab_tile;
    *w = std::min(linear_vocab_tile, nv - *j0);
    const std::int64_t ws = weight_chunk_stride();
    gemm<A>(mm, false, true, nb, *w, H, hb.get(), H, weight_chunk() + *j0 * ws, ws, A(0), z.get() + *j0, nv);
  }

  /// dWeight of tile [j0, j0 + w) of the chunk: c [w, H] (row stride ldc) = beta * c +
  /// z[:, j0 : j0 + w)^T . hb, one product of shape [w, nb] x [nb, H].
  void tile_weight_grad(std::int64_t j0, std::int64_t w, A beta, A* c, std::int64_t ldc) const {
    gemm<A>(mm, true, false, w, H, nb, z.get() + j0, nv, hb.get(), H, beta, c, ldc);
  }

  /// dHidden of rows [i0, i0 + h) of the chunk: dh[i0 : i0 + h) += z[i0 : i0 + h) . weight
  /// chunk, one product of shape [h, nv] x [nv, H].
  void rows_hidden_grad(std::int64_t i0, std::int64_t h, A* dh) const {
    gemm<A>(mm, false, false, h, H, nv, z.get() + i0 * nv, nv, weight_chunk(), weight_chunk_stride(), A(1),
            dh + i0 * H, H);
  }

  /// The raw logit u of column j of the chunk from the product's value: + bias.
  A raw(A prod, std::int64_t j) const {
    return in.bias != nullptr ? prod + to_acc<A>(in.bias[v0 + j]) : prod;
  }
};

/// Runs fn(k0, k1) over [0, n) in fixed tiles [k, k + 1), claimed one at a time
/// (parallel_blocks). fn(k, k + 1)'s work depends on k only and writes memory that tile k
/// alone owns, so which thread runs it changes nothing.
template <class Fn>
void parallel_tiles(std::int64_t n, int threads, Fn&& fn) {
  parallel_blocks(n, threads, std::forward<Fn>(fn), 1);
}

/// Folds the statistics of a later column range into `acc`, as row_forward does between its
/// chunks: a range of only -inf logits adds its logit sum and no mass (merging would shift
/// by -inf - m).
template <class A>
void merge_linear_stats(dpo::detail::row_stats<A>& acc, const dpo::detail::row_stats<A>& c) {
  if (c.m == -INFINITY && c.s == A(0) && acc.argmax >= 0) {
    acc.zsum += c.zsum;
    return;
  }
  dpo::detail::merge_row_stats(acc, c);
}

/// The row statistics of the pass's active rows, p.active, ch.rows rows at a time: each block
/// [b0, b0 + p.nb) gets every vocab chunk's logits (bias and transforms applied) folded tile by
/// tile into its rows' row_stats (argmax as a vocab index), in a fixed order. After each vocab
/// chunk, on_chunk(b0, i) runs for every row i of the block while that chunk's logits are in
/// p.z; after the block, on_block(b0, acc) gets the block's statistics.
template <bool Metrics, class T, class L, class OnChunk, class OnBlock>
void fold_rows(linear_pass<T, L>& p, int threads, OnChunk on_chunk, OnBlock on_block) {
  using A = acc_t<T>;
  using stats = dpo::detail::row_stats<A>;
  const linear_view<T, L>& in = p.in;
  const linear_chunking& ch = p.ch;
  const dpo::detail::transform_params<A> tp(in.transforms);
  const std::int64_t max_tiles = (ch.vocab + linear_vocab_tile - 1) / linear_vocab_tile;
  std::vector<stats> part(static_cast<std::size_t>(ch.rows * max_tiles));
  std::vector<stats> acc(static_cast<std::size_t>(ch.rows));
  const std::int64_t n = static_cast<std::int64_t>(p.active.size());
  for (std::int64_t b0 = 0; b0 < n; b0 += ch.rows) {
    p.gather(b0, std::min(ch.rows, n - b0));
    std::fill(acc.begin(), acc.end(), stats::empty());
    for (std::int64_t c0 = 0; c0 < in.vocab; c0 += ch.vocab) {
      p.select_vocab(c0, std::min(ch.vocab, in.vocab - c0));
      const std::int64_t tiles = p.tiles();
      parallel_tiles(tiles, threads, [&](std::int64_t k0, std::int64_t k1) {
        row_scratch<A> scratch;
        for (std::int64_t k = k0; k < k1; ++k) {
          std::int64_t j0 = 0, w = 0;
          p.tile_logits(k, &j0, &w);
          for (std::int64_t i = 0; i < p.nb; ++i) {
            A* zr = p.z.get() + i * p.nv + j0;
            if (in.bias != nullptr || !tp.identity)
              for (std::int64_t j = 0; j < w; ++j)
                zr[j] = dpo::detail::transform_logit(tp, p.raw(zr[j], j0 + j));
            stats st = row_forward<Metrics>(zr, w, scratch);
            // row_forward's argmax is tile-relative; the merge below needs the vocab index.
            if (Metrics && st.argmax >= 0) st.argmax += p.v0 + j0;
            part[i * tiles + k] = st;
          }
        }
      });
      parallel_for(p.nb, threads, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) {
          for (std::int64_t k = 0; k < tiles; ++k) merge_linear_stats(acc[i], part[i * tiles + k]);
          on_chunk(b0, i);
        }
      });
    }
    on_block(b0, acc);
  }
}

template <bool Metrics, class T, class L>
void linear_forward_impl(const linear_view<T, L>& in, const linear_chunking& ch, double* logps,
                         const linear_outputs& x, double* row_lse, int threads, const linear_gemm& mm) {
  using A = acc_t<T>;
  using stats = dpo::detail::row_stats<A>;
  linear_pass<T, L> p(in, ch, threads, mm);
  p.select_counted([&](std::int64_t r) {
    logps[r] = 0;
    row_lse[r] = 0;
    if (x.entropy != nullptr) x.entropy[r] = 0;
    if (x.log_sum_sq_probs != nullptr) x.log_sum_sq_probs[r] = 0;
    if (x.mean_logits != nullptr) x.mean_logits[r] = 0;
    if (x.is_top1 != nullptr) x.is_top1[r] = 0;
  });
  std::vector<A> zy(static_cast<std::size_t>(ch.rows));
  fold_rows<Metrics>(
      p, threads,
      [&](std::int64_t b0, std::int64_t i) {  // a vocab chunk's logits are in p.z: the label's
        const std::int64_t y = in.target(p.active[b0 + i]) - p.v0;
        if (y >= 0 && y < p.nv) zy[i] = p.z[i * p.nv + y];
      },
      [&](std::int64_t b0, const std::vector<stats>& acc) {
        parallel_for(p.nb, threads, [&](std::int64_t i0, std::int64_t i1) {
          for (std::int64_t i = i0; i < i1; ++i) {
            const std::int64_t r = p.active[b0 + i];
            const stats& st = acc[i];
            // (z_y - m) - log s, never z_y - lse: lse rounds at the scale of m (docs/math.md §1).
            logps[r] = st.log_softmax(zy[i]);
            row_lse[r] = st.logsumexp_double();
            if (!Metrics) continue;
            if (x.entropy != nullptr) x.entropy[r] = static_cast<double>(st.entropy());
            if (x.log_sum_sq_probs != nullptr) x.log_sum_sq_probs[r] = st.log_sum_p2();
            if (x.mean_logits != nullptr)
              x.mean_logits[r] = static_cast<double>(st.zsum) / static_cast<double>(in.vocab);
            if (x.is_top1 != nullptr)
              x.is_top1[r] = dpo::detail::label_is_top1(st.argmax == in.target(r), zy[i]) ? 1 : 0;
          }
        });
      });
}

/// dst += v, rounded once to G.
template <class G, class A>
inline void add_to(G& dst, A v) {
  dst = from_acc<G>(to_acc<A>(dst) + v);
}

/// The exact lse parts (max, log sum) of rows `rows` of a view, recomputed from the logits:
/// for rows whose stored double lse is too coarse for A (dpo::detail::lse_needs_recompute:
/// |lse| >= 2^10 in double, 2^26 in float), as the logits path's row backward recomputes
/// them. One more logits product over those rows only, in the pass's workspace (free then).
template <class T, class L>
std::vector<dpo::detail::lse_parts<acc_t<T>>> linear_exact_lse(linear_pass<T, L>& p,
                                                               const std::vector<std::int64_t>& rows,
                                                               int threads) {
  using A = acc_t<T>;
  using stats = dpo::detail::row_stats<A>;
  std::vector<dpo::detail::lse_parts<A>> out;
  if (rows.empty()) return out;
  std::vector<std::int64_t> counted = std::move(p.active);
  p.active = rows;
  fold_rows<false>(
      p, threads, [](std::int64_t, std::int64_t) {},
      [&](std::int64_t, const std::vector<stats>& acc) {
        for (std::int64_t i = 0; i < p.nb; ++i) out.push_back(dpo::detail::lse_parts_of(acc[i].m, acc[i].s));
      });
  p.active = std::move(counted);
  return out;
}

/// A vocabulary shard's backward (dpo/cpu/linear_shard.hpp): the view's weight rows are the
/// vocabulary columns [label_offset, label_offset + vocab), its labels global ids, and each
/// row's exact log-sum-exp comes from its combined record (row_max[r], records[r *
/// shard_fields]) instead of row_lse: never recomputed, since a shard's own logits do not
/// hold the row's mass.
struct linear_shard_rows {
  std::int64_t label_offset = 0;
  const double* row_max = nullptr;
  const double* records = nullptr;
};

template <bool Entropy, class T, class L, class G>
void linear_backward_impl(const linear_view<T, L>& in, const linear_chunking& ch,
                          const double* row_lse, const double* grad_logps, const double* entropy,
                          const double* grad_entropy, const linear_grads<T, G>& g, int threads,
                          const linear_gemm& mm, const linear_shard_rows* shard = nullptr) {
  using A = acc_t<T>;
  const dpo::detail::transform_params<A> tp(in.transforms);
  const std::int64_t H = in.hidden_cols;
  linear_pass<T, L> p(in, ch, threads, mm);
  for (std::int64_t r = 0; r < in.rows; ++r) {
    // A row with zero upstream gradients contributes exact zeros: it is skipped, so a NaN in
    // its hidden state cannot reach dWeight through 0 * NaN.
    const bool wanted = grad_logps[r] != 0.0 || (Entropy && grad_entropy[r] != 0.0);
    if (in.target(r) >= 0 && wanted) {
      p.active.push_back(r);
    } else if (g.hidden != nullptr && !g.accumulate_hidden) {
      T* dst = g.hidden + r * g.hidden_stride;
      for (std::int64_t c = 0; c < H; ++c) dst[c] = from_acc<T>(A(0));
    }
  }
  // Per-row scalars of the current row chunk.
  struct row_coef {
    dpo::detail::lse_parts<A> lse{A(0)};
    A gl, ge, ent;
    std::int64_t y;
  };
  std::vector<row_coef> rc(static_cast<std::size_t>(ch.rows));
  std::unique_ptr<A[]> dh = linear_buffer<A>(g.hidden != nullptr ? ch.rows * H : 0);
  const std::int64_t n_act = static_cast<std::int64_t>(p.active.size());
  std::vector<std::int64_t> coarse;  // rows whose stored lse is too coarse for A
  if (shard == nullptr)
    for (const std::int64_t r : p.active)
      if (dpo::detail::lse_needs_recompute<A>(row_lse[r])) coarse.push_back(r);
  const std::vector<dpo::detail::lse_parts<A>> exact = linear_exact_lse(p, coarse, threads);
  std::size_t next_coarse = 0;
  for (std::int64_t b0 = 0; b0 < n_act; b0 += ch.rows) {
    p.gather(b0, std::min(ch.rows, n_act - b0));
    for (std::int64_t i = 0; i < p.nb; ++i) {
      const std::int64_t r = p.active[b0 + i];
      const bool is_coarse = next_coarse < coarse.size() && coarse[next_coarse] == r;
      if (shard != nullptr) {
        rc[i].lse = dpo::detail::shard_lse<A>(shard->row_max[r], shard->records + r * shard_fields);
      } else {
        rc[i].lse = is_coarse ? exact[next_coarse++] : dpo::detail::split_lse<A>(row_lse[r]);
      }
      rc[i].gl = static_cast<A>(grad_logps[r]);
      rc[i].ge = Entropy ? static_cast<A>(grad_entropy[r]) : A(0);
      rc[i].ent = Entropy ? static_cast<A>(entropy[r]) : A(0);
      rc[i].y = in.target(r) - (shard != nullptr ? shard->label_offset : 0);
    }
    if (g.hidden != nullptr) std::fill(dh.get(), dh.get() + p.nb * H, A(0));
    for (std::int64_t c0 = 0; c0 < in.vocab; c0 += ch.vocab) {
      p.select_vocab(c0, std::min(ch.vocab, in.vocab - c0));
      // Tiles: recompute the logits, turn them into dZ in place, then dWeight and dBias of
      // the tile's vocab rows (owned by this tile: summed over the chunk's rows in order).
      parallel_tiles(p.tiles(), threads, [&](std::int64_t k0, std::int64_t k1) {
        for (std::int64_t k = k0; k < k1; ++k) {
          std::int64_t j0 = 0, w = 0;
          p.tile_logits(k, &j0, &w);
          for (std::int64_t i = 0; i < p.nb; ++i) {
            A* zr = p.z.get() + i * p.nv + j0;
            const row_coef& q = rc[i];
            // dlogp/do_v = 1[v = y] - p_v;  dH/do_v = -p_v (log p_v + H)  (docs/linear.md)
            const auto grad_o = [&](A o) {
              const A d = clamp_lo((o - q.lse.hi) - q.lse.lo, exp_lo<A>);
              const A pv = exp_clamped(d);
              return Entropy ? -pv * (q.gl + q.ge * (d + q.ent)) : -pv * q.gl;
            };
            // The label column's product, kept for its one-hot term below.
            const std::int64_t y = q.y - p.v0 - j0;
            const bool has_y = y >= 0 && y < w;
            const A prod_y = has_y ? zr[y] : A(0);
            if (in.bias == nullptr && tp.identity) {
              for (std::int64_t j = 0; j < w; ++j) zr[j] = grad_o(zr[j]);
            } else {
              for (std::int64_t j = 0; j < w; ++j) {
                const A u = p.raw(zr[j], j0 + j);
                zr[j] = tp.identity ? grad_o(u)
                                    : grad_o(dpo::detail::transform_logit(tp, u)) *
                                          dpo::detail::transform_logit_grad(tp, u);
              }
            }
            if (has_y) {
              const A u = p.raw(prod_y, j0 + y);
              const A o = dpo::detail::transform_logit(tp, u);
              zr[y] = (q.gl + grad_o(o)) * dpo::detail::transform_logit_grad(tp, u);
            }
          }
          if (g.bias != nullptr) {
            for (std::int64_t j = 0; j < w; ++j) {
              A s = A(0);
              for (std::int64_t i = 0; i < p.nb; ++i) s += p.z[i * p.nv + j0 + j];
              add_to(g.bias[p.v0 + j0 + j], s);
            }
          }
          if constexpr (std::is_same_v<G, A>) {
            if (g.weight != nullptr)
              p.tile_weight_grad(j0, w, A(1), g.weight + (p.v0 + j0) * g.weight_stride, g.weight_stride);
          }
        }
      });
      if (g.hidden != nullptr) {
        const std::int64_t rt = (p.nb + linear_row_tile - 1) / linear_row_tile;
        parallel_tiles(rt, threads, [&](std::int64_t t0, std::int64_t t1) {
          for (std::int64_t t = t0; t < t1; ++t) {
            const std::int64_t i0 = t * linear_row_tile, h = std::min(linear_row_tile, p.nb - i0);
            p.rows_hidden_grad(i0, h, dh.get());
          }
        });
      }
      if constexpr (!std::is_same_v<G, A>) {
        // dWeight into bf16/half: the product in A into the converted weight chunk (no longer
        // needed by this chunk), then one rounding per element.
        if (g.weight != nullptr) {
          parallel_tiles(p.tiles(), threads, [&](std::int64_t k0, std::int64_t k1) {
            for (std::int64_t k = k0; k < k1; ++k) {
              const std::int64_t j0 = k * linear_vocab_tile, w = std::min(linear_vocab_tile, p.nv - j0);
              A* tmp = p.wc.get() + j0 * H;
              p.tile_weight_grad(j0, w, A(0), tmp, H);
              for (std::int64_t j = 0; j < w; ++j) {
                G* dst = g.weight + (p.v0 + j0 + j) * g.weight_stride;
                for (std::int64_t c = 0; c < H; ++c) add_to(dst[c], tmp[j * H + c]);
              }
            }
          });
        }
      }
    }
    if (g.hidden != nullptr) {
      parallel_for(p.nb, threads, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) {
          T* dst = g.hidden + p.active[b0 + i] * g.hidden_stride;
          const A* src = dh.get() + i * H;
          if (g.accumulate_hidden) {
            for (std::int64_t c = 0; c < H; ++c) add_to(dst[c], src[c]);
          } else {
            for (std::int64_t c = 0; c < H; ++c) dst[c] = from_acc<T>(src[c]);
          }
        }
      });
    }
  }
}

}  // namespace detail

/// The chunk shape and workspace bytes that linear_logps / linear_logps_backward use for
/// `in` under `opt` (both use the same). Throws dpo::error when the budget is too small for
/// one row, or when the view's sizes are invalid.
template <class T, class L>
linear_chunking linear_workspace_size(const linear_view<T, L>& in, const linear_options& opt = {}) {
  detail::check_linear_view(in);
  return detail::linear_chunks<T>(in.rows, in.hidden_cols, in.vocab, opt);
}

/// Per-token log-probs of an LM head: logp_r = log softmax(o(hidden_r . weight^T + bias))[y_r],
/// with o the transforms (scale, soft cap, temperature).
///
/// - logps: [rows], 0 on rows that do not count (ignore_index or masked).
/// - extra: the optional outputs (linear_outputs: entropy, log_sum_sq_probs, mean_logits,
///   is_top1), each [rows] or null; 0 on rows that do not count.
/// - row_lse: [rows], each counted row's log-sum-exp of the transformed logits in double
///   (0 elsewhere): what linear_logps_backward reads.
/// T: float, double, Eigen::bfloat16, Eigen::half; L: an integer type. Products accumulate
/// in float (double for double) and the logits are kept in that type, never rounded to T.
/// Outputs may not overlap each other or any input. Allocates linear_workspace_size(in,
/// opt).workspace_bytes, never a [rows, vocab] buffer. Deterministic and independent of
/// opt.num_threads. Throws dpo::error naming the argument before writing anything.
///
///   dpo::cpu::linear_view<float, std::int64_t> v;
///   v.hidden = h; v.rows = N; v.hidden_cols = H; v.hidden_stride = H;
///   v.weight = w; v.vocab = V; v.weight_cols = H; v.weight_stride = H; v.labels = y;
///   dpo::cpu::linear_outputs x;
///   x.entropy = ent;
///   dpo::cpu::linear_logps(v, logps, x, lse);
template <class T, class L>
void linear_logps(const linear_view<T, L>& in, double* logps, const linear_outputs& extra, double* row_lse,
                  const linear_options& opt = {}) {
  detail::check_linear_view(in);
  const linear_chunking ch = detail::linear_chunks<T>(in.rows, in.hidden_cols, in.vocab, opt);
  if (in.rows > 0 && logps == nullptr) detail::fail("logps is null");
  if (in.rows > 0 && row_lse == nullptr) detail::fail("row_lse is null");
  detail::linear_range ins[5];
  detail::input_ranges(in, ins);
  const std::int64_t N = in.rows;
  const detail::linear_range outs[6] = {
      detail::range_of(logps, 1, N, N, "logps"),
      detail::range_of(extra.entropy, 1, N, N, "entropy"),
      detail::range_of(row_lse, 1, N, N, "row_lse"),
      detail::range_of(extra.log_sum_sq_probs, 1, N, N, "log_sum_sq_probs"),
      detail::range_of(extra.mean_logits, 1, N, N, "mean_logits"),
      detail::range_of(extra.is_top1, 1, N, N, "is_top1")};
  detail::require_no_overlap(outs, 6, ins, 5);
  if (N == 0) return;
  const int threads = detail::resolve_threads(opt.num_threads);
  if (extra.any()) {
    detail::linear_forward_impl<true>(in, ch, logps, extra, row_lse, threads, opt.gemm);
  } else {
    detail::linear_forward_impl<false>(in, ch, logps, extra, row_lse, threads, opt.gemm);
  }
}

/// linear_logps with the entropy as the only optional output (null: none).
template <class T, class L>
void linear_logps(const linear_view<T, L>& in, double* logps, double* entropy, double* row_lse,
                  const linear_options& opt = {}) {
  linear_outputs extra;
  extra.entropy = entropy;
  linear_logps(in, logps, extra, row_lse, opt);
}

namespace detail {

/// linear_logps_backward's checks and run, shared with the vocabulary shard's backward
/// (shard: null, or the shard's records in place of row_lse; label_bound as for
/// check_linear_view).
template <class T, class L, class G>
void linear_backward_checked(const linear_view<T, L>& in, std::int64_t label_bound, const double* row_lse,
                             const linear_shard_rows* shard, const double* grad_logps, const double* entropy,
                             const double* grad_entropy, const linear_grads<T, G>& g, const linear_options& opt) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, acc_t<T>>,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  check_linear_view(in, label_bound);
  const linear_chunking ch = linear_chunks<T>(in.rows, in.hidden_cols, in.vocab, opt);
  const std::int64_t N = in.rows, H = in.hidden_cols, V = in.vocab;
  if (N > 0 && shard == nullptr && row_lse == nullptr) fail("row_lse is null");
  if (N > 0 && shard != nullptr && (shard->row_max == nullptr || shard->records == nullptr))
    fail(shard->row_max == nullptr ? "row_max is null" : "records is null");
  if (N > 0 && grad_logps == nullptr) fail("grad_logps is null");
  if ((entropy == nullptr) != (grad_entropy == nullptr))
    fail(entropy == nullptr ? "entropy is null but grad_entropy is given" : "grad_entropy is null but entropy is given");
  if (g.hidden != nullptr && g.hidden_stride < H)
    fail("grads.hidden_stride = ", g.hidden_stride, " is invalid: must be >= hidden_cols = ", H);
  if (g.weight != nullptr && g.weight_stride < H)
    fail("grads.weight_stride = ", g.weight_stride, " is invalid: must be >= hidden_cols = ", H);
  if (g.bias != nullptr && in.bias == nullptr) fail("grads.bias is given but the view has no bias");
  // A shard's rows read both its records and its maxima (row_lse's place).
  linear_range ins[10];
  input_ranges(in, ins);
  ins[5] = shard != nullptr ? range_of(shard->records, N, shard_fields, shard_fields, "records")
                           : range_of(row_lse, 1, N, N, "row_lse");
  ins[6] = range_of(grad_logps, 1, N, N, "grad_logps");
  ins[7] = range_of(entropy, 1, N, N, "entropy");
  ins[8] = range_of(grad_entropy, 1, N, N, "grad_entropy");
  ins[9] = range_of(shard != nullptr ? shard->row_max : nullptr, 1, N, N, "row_max");
  const linear_range outs[3] = {range_of(g.hidden, N, H, g.hidden_stride, "grads.hidden"),
                                range_of(g.weight, V, H, g.weight_stride, "grads.weight"),
                                range_of(g.bias, 1, V, V, "grads.bias")};
  require_no_overlap(outs, 3, ins, 10);
  if (N == 0) return;
  const int threads = resolve_threads(opt.num_threads);
  if (grad_entropy != nullptr) {
    linear_backward_impl<true>(in, ch, row_lse, grad_logps, entropy, grad_entropy, g, threads, opt.gemm, shard);
  } else {
    linear_backward_impl<false>(in, ch, row_lse, grad_logps, nullptr, nullptr, g, threads, opt.gemm, shard);
  }
}

}  // namespace detail

/// The gradient of sum_r grad_logps[r] * logps[r] (+ sum_r grad_entropy[r] * entropy[r]) of
/// linear_logps with respect to hidden, weight and bias.
///
/// - row_lse: linear_logps' row_lse on the same view (and transforms).
/// - grad_logps: [rows]; entries of rows that do not count are ignored.
/// - entropy, grad_entropy: [rows] each, or both null; entropy is linear_logps' output.
/// - g: where the gradients go (see linear_grads: dHidden written or added, dWeight and dBias
///   added; null members are skipped). g.bias needs a view with a bias.
/// Recomputes every logits chunk (one product), then two products per chunk: dHidden by
/// row tiles, dWeight by vocab tiles, so each output element is summed by one thread in a
/// fixed order: deterministic and independent of opt.num_threads. Rows whose row_lse is at or
/// past the recompute limit (|lse| >= 2^10 for double, 2^26 for the others, where the double
/// lse is too coarse for the accumulation type) first recompute their max and sum, one more
/// product over those rows only, as the logits path does. Rows whose upstream
/// gradients are both 0 are skipped (exact zeros; their hidden states are not read).
/// Outputs may not overlap each other or any input. Throws dpo::error naming the argument
/// before writing anything.
template <class T, class L, class G>
void linear_logps_backward(const linear_view<T, L>& in, const double* row_lse,
                           const double* grad_logps, const double* entropy,
                           const double* grad_entropy, const linear_grads<T, G>& g,
                           const linear_options& opt = {}) {
  detail::linear_backward_checked(in, 0, row_lse, nullptr, grad_logps, entropy, grad_entropy, g, opt);
}

}  // namespace cpu
}  // namespace dpo
