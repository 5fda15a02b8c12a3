// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO straight from hidden states (issue 12, item 2): the LM head's logits
// z = o(hidden . weight^T + bias) (dpo/core/transforms.hpp) are formed one chunk of rows at a
// time, each row over the full vocab in the accumulation type (fp32; fp64 for double heads),
// and the logits path's stages run on the chunk unchanged: the row kernels of
// dpo/cpu/rows.hpp, the sequence and pair stages of dpo/cpu/dpo.hpp, the metrics of
// dpo/core/metrics.hpp. No [rows, vocab] buffer of the batch ever exists.
//
// Three passes over the weight (logits, dHidden, dWeight) when every chunk holds whole pairs:
// a pair's rows give its sequence log-probs, so its rows' dL/dlogp are known while its logits
// are still in the workspace; the row backward then writes dL/dz in place and two products
// finish the chunk. Four passes otherwise (a pair larger than the budget, or a batch-coupled
// loss: aot, aot_unpaired, an NLL term under WPO): row chunks give every row's log-prob first,
// the pair stage runs on the whole batch, and linear_logps_backward (dpo/cpu/linear.hpp)
// recomputes the logits. The plan is dpo/core/linear_plan.hpp, shared with CUDA.
//
// Determinism: every product has a shape fixed by the chunk plan and is summed by one thread
// (dpo/cpu/linear.hpp; one call of the GEMM hook, dpo/cpu/gemm.hpp), chunks run in order,
// and the per-pair results are combined over the whole batch in pair order at the end,
// exactly as the logits path combines them. Results are bitwise identical run to run and for
// every thread count; across chunk sizes they agree to the rounding of the products. Math and memory model: docs/linear.md.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "dpo/core/layout.hpp"
#include "dpo/core/linear_plan.hpp"
#include "dpo/core/linear_view.hpp"
#include "dpo/core/outputs.hpp"
#include "dpo/core/transforms.hpp"
#include "dpo/cpu/dpo.hpp"
#include "dpo/cpu/linear.hpp"

namespace dpo {
namespace cpu {

/// The default workspace budget of DPO from hidden states: 768 MiB, so that at N = 8192,
/// H = 4096, V = 128256 the extra memory (workspace and about 120 bytes per row) stays under
/// 1 GiB.
inline constexpr std::int64_t default_linear_dpo_workspace_bytes = std::int64_t{768} << 20;

/// The LM head (weight, bias, transforms), the pair layouts over hidden rows and the
/// gradient targets are the core's (dpo/core/linear_view.hpp), here with host pointers.
using namespace dpo::linear_dpo_types;

/// Run-time options of DPO from hidden states.
struct linear_dpo_options {
  /// Worker threads; 0 uses every hardware thread (capped as options::num_threads).
  /// Results are bitwise identical for every value.
  int num_threads = 0;
  /// Compute the token metrics (entropy, logits mean, token accuracy).
  bool metrics = true;
  /// Bytes the call may allocate for its workspace (the logits chunk and its companions);
  /// the chunk size follows from it (docs/linear.md).
  std::int64_t workspace_bytes = default_linear_dpo_workspace_bytes;
  /// Rows per chunk instead of as many as the budget allows (0); must fit the budget.
  /// Three-pass chunks hold whole pairs of at most this many rows.
  std::int64_t chunk_rows = 0;
  /// three_pass fails (dpo::error) where the plan cannot hold whole pairs or the loss is
  /// batch-coupled; four_pass always recomputes; automatic picks.
  linear_mode mode = linear_mode::automatic;
  /// The matrix products, as linear_options::gemm (dpo/cpu/gemm.hpp; Eigen unless replaced).
  linear_gemm gemm;
};

/// What a call will do: its mode, the rows of its largest logits chunk and the bytes it
/// allocates for it (four passes: the larger of the forward's and the backward's workspace).
struct linear_dpo_plan {
  linear_mode mode = linear_mode::four_pass;
  std::int64_t chunk_rows = 0;
  std::int64_t workspace_bytes = 0;
};

namespace detail {

using dpo::detail::fail;

/// The completion rows of one side in sequence order: buffer row, label, and each
/// sequence's offsets (cu, num_seqs + 1). The fused path's chunks are runs of these rows.
struct side_map {
  std::vector<std::int64_t> row, label, cu;
  std::int64_t rows() const { return static_cast<std::int64_t>(row.size()); }
};

template <class T, class L>
side_map map_side(const token_view<T, L>& v) {
  side_map m;
  m.cu.assign(static_cast<std::size_t>(v.num_seqs + 1), 0);
  for (std::int64_t s = 0; s < v.num_seqs; ++s) {
    for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r) {
      const std::int64_t y = v.target(r);
      if (y < 0) continue;
      m.row.push_back(r);
      m.label.push_back(y);
    }
    m.cu[s + 1] = m.rows();
  }
  return m;
}

/// A packed view over `n` consecutive completion rows of a side held in a logits chunk: one
/// sequence per entry of cu (local offsets from 0).
template <class A>
token_view<A, std::int64_t> chunk_view(const A* z, std::int64_t V, const std::int64_t* labels,
                                       const std::int64_t* cu, std::int64_t num_seqs) {
  token_view<A, std::int64_t> v;
  v.logits = z;
  v.labels = labels;
  v.cu_seqlens = cu;
  v.vocab = V;
  v.row_stride = V;
  v.num_seqs = num_seqs;
  v.ignore_index = -1;
  return v;
}

/// The whole batch's completion rows as packed views (for the sequence stage, which reads
/// labels only): the logits are not used.
template <class A>
pair_view<A, std::int64_t> mapped_pairs(const side_map& c, const side_map& r, std::int64_t V) {
  const std::int64_t P = static_cast<std::int64_t>(c.cu.size()) - 1;
  return {chunk_view<A>(nullptr, V, c.label.data(), c.cu.data(), P),
          chunk_view<A>(nullptr, V, r.label.data(), r.cu.data(), P), 0};
}

/// A logits chunk: up to `cap` completion rows over the full vocab, in A, with the row's
/// hidden states gathered and (three-pass) do/du and the dHidden accumulator.
template <class T>
struct linear_chunk {
  using A = acc_t<T>;
  static constexpr bool convert = !std::is_same_v<T, A>;

  const linear_head<T>& head;
  int threads;
  linear_gemm mm;
  std::int64_t H, V, cap, block;
  dpo::detail::transform_params<A> tp;
  bool keep_tg;
  std::unique_ptr<A[]> hb, z, tg, dh, wc;
  std::int64_t nb = 0;

  linear_chunk(const linear_head<T>& h, std::int64_t rows, bool backward, bool hidden_grad, int t,
               const linear_gemm& g)
      : head(h), threads(t), mm(g), H(h.hidden), V(h.vocab), cap(rows), tp(h.transforms),
        keep_tg(backward && h.transforms.softcap != 0.0) {
    block = convert ? std::min<std::int64_t>(V, dpo::detail::linear_convert_block) : V;
    hb = linear_buffer<A>(cap * H);
    z = linear_buffer<A>(cap * V);
    if (keep_tg) tg = linear_buffer<A>(cap * V);
    if (backward && hidden_grad) dh = linear_buffer<A>(cap * H);
    if (convert) wc = linear_buffer<A>(block * H);
  }

  /// Appends rows[0, n) of a hidden buffer (base, stride) to the chunk, converted to A.
  void gather(const T* base, std::int64_t stride, const std::int64_t* rows, std::int64_t n) {
    const std::int64_t at = nb;
    nb += n;
    gather_rows(base, stride, [&](std::int64_t i) { return rows[i]; }, n, H, hb.get() + at * H, threads);
  }

  /// The weight rows [c0, c0 + n) in A (converted into wc for bf16 / half); their row
  /// stride is weight_stride().
  const A* weight_block(std::int64_t c0, std::int64_t n) {
    if constexpr (convert) {
      gather_rows(head.weight, head.weight_stride, [&](std::int64_t j) { return c0 + j; }, n, H, wc.get(), threads);
      return wc.get();
    } else {
      return head.weight + c0 * head.weight_stride;
    }
  }
  std::int64_t weight_stride() const { return convert ? H : head.weight_stride; }

  /// The logits of the chunk's rows: one product per vocab tile (shape fixed by the chunk),
  /// then bias and transforms per logit; with a cap do/du is kept in tg.
  void forward() {
    const bool touch = head.bias != nullptr || !tp.identity;
    for (std::int64_t c0 = 0; c0 < V; c0 += block) {
      const std::int64_t n = std::min(block, V - c0);
      const A* w = weight_block(c0, n);
      const std::int64_t ws = weight_stride();
      const std::int64_t tiles = (n + linear_vocab_tile - 1) / linear_vocab_tile;
      parallel_tiles(tiles, threads, [&](std::int64_t k0, std::int64_t k1) {
        for (std::int64_t k = k0; k < k1; ++k) {
          const std::int64_t j0 = k * linear_vocab_tile, wd = std::min(linear_vocab_tile, n - j0);
          gemm<A>(mm, false, true, nb, wd, H, hb.get(), H, w + j0 * ws, ws, A(0), z.get() + c0 + j0, V);
          if (!touch) continue;
          for (std::int64_t i = 0; i < nb; ++i) {
            A* zr = z.get() + i * V + c0 + j0;
            A* gr = keep_tg ? tg.get() + i * V + c0 + j0 : nullptr;
            for (std::int64_t j = 0; j < wd; ++j) {
              const A u = head.bias != nullptr ? zr[j] + to_acc<A>(head.bias[c0 + j0 + j]) : zr[j];
              if (gr != nullptr) gr[j] = dpo::detail::transform_logit_grad(tp, u);
              zr[j] = dpo::detail::transform_logit(tp, u);
            }
          }
        }
      });
    }
  }

  /// From dL/do in z (the row backward's output): dL/du = dL/do * do/du, then dHidden into
  /// dh (when kept) and dWeight, dBias into g (each added to).
  template <class G>
  void backward(G* gw, std::int64_t gw_stride, G* gb) {
    if (!tp.identity) {
      const A k = dpo::detail::transform_logit_grad(tp, A(0));  // s / t without a cap
      parallel_for(nb, threads, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) {
          A* zr = z.get() + i * V;
          if (keep_tg) {
            const A* gr = tg.get() + i * V;
            for (std::int64_t j = 0; j < V; ++j) zr[j] *= gr[j];
          } else {
            for (std::int64_t j = 0; j < V; ++j) zr[j] *= k;
          }
        }
      });
    }
    if (dh) std::fill(dh.get(), dh.get() + nb * H, A(0));
    for (std::int64_t c0 = 0; c0 < V; c0 += block) {
      const std::int64_t n = std::min(block, V - c0);
      const A* w = weight_block(c0, n);
      const std::int64_t ws = weight_stride();
      if (dh) {
        const std::int64_t rt = (nb + linear_row_tile - 1) / linear_row_tile;
        parallel_tiles(rt, threads, [&](std::int64_t t0, std::int64_t t1) {
          for (std::int64_t t = t0; t < t1; ++t) {
            const std::int64_t i0 = t * linear_row_tile, h = std::min(linear_row_tile, nb - i0);
            gemm<A>(mm, false, false, h, H, n, z.get() + i0 * V + c0, V, w, ws, A(1), dh.get() + i0 * H, H);
          }
        });
      }
      if (gw == nullptr && gb == nullptr) continue;
      const std::int64_t tiles = (n + linear_vocab_tile - 1) / linear_vocab_tile;
      parallel_tiles(tiles, threads, [&](std::int64_t k0, std::int64_t k1) {
        for (std::int64_t k = k0; k < k1; ++k) {
          const std::int64_t j0 = c0 + k * linear_vocab_tile, wd = std::min(linear_vocab_tile, c0 + n - j0);
          if (gb != nullptr) {
            for (std::int64_t j = 0; j < wd; ++j) {
              A s = A(0);
              for (std::int64_t i = 0; i < nb; ++i) s += z[i * V + j0 + j];
              add_to(gb[j0 + j], s);
            }
          }
          if (gw == nullptr) continue;
          if constexpr (std::is_same_v<G, A>) {
            gemm<A>(mm, true, false, wd, H, nb, z.get() + j0, V, hb.get(), H, A(1), gw + j0 * gw_stride, gw_stride);
          } else {
            // G is bf16 / half: the product in A into this tile's rows of the converted weight
            // block (no longer needed by this block), then one rounding per element.
            A* tmp = wc.get() + (j0 - c0) * H;
            gemm<A>(mm, true, false, wd, H, nb, z.get() + j0, V, hb.get(), H, A(0), tmp, H);
            for (std::int64_t j = 0; j < wd; ++j) {
              G* dst = gw + (j0 + j) * gw_stride;
              for (std::int64_t c = 0; c < H; ++c) add_to(dst[c], tmp[j * H + c]);
            }
          }
        }
      });
    }
  }

  /// Writes (or adds) the dHidden rows [at, at + n) of the chunk to rows[0, n) of a buffer.
  void scatter_hidden(T* base, std::int64_t stride, const std::int64_t* rows, std::int64_t at,
                      std::int64_t n, bool accumulate) {
    parallel_for(n, threads, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t i = i0; i < i1; ++i) {
        T* dst = base + rows[i] * stride;
        const A* src = dh.get() + (at + i) * H;
        if (accumulate) {
          for (std::int64_t c = 0; c < H; ++c) add_to(dst[c], src[c]);
        } else {
          for (std::int64_t c = 0; c < H; ++c) dst[c] = from_acc<T>(src[c]);
        }
      }
    });
  }
};

/// The plan's inputs for a head of dtype T.
template <class T>
linear_plan_in plan_in(const linear_head<T>& head, const linear_dpo_options& opt, bool backward,
                       bool hidden_grad) {
  using A = acc_t<T>;
  linear_plan_in p;
  p.vocab = head.vocab;
  p.hidden = head.hidden;
  p.acc_bytes = sizeof(A);
  p.convert_weight = !std::is_same_v<T, A>;
  p.keep_transform_grad = backward && head.transforms.softcap != 0.0;
  p.hidden_grad = backward && hidden_grad;
  p.budget = opt.workspace_bytes;
  p.chunk_rows = opt.chunk_rows;
  return p;
}

/// The forward rows of a batch's completion rows, side by side, in row chunks of at most
/// `rows` rows over the full vocab: each side's row values (dpo/cpu/dpo.hpp), indexed as its
/// side_map. The four-pass forward and the reference's forward-only pass.
template <class T, class L>
void forward_all_rows(const hidden_pairs<T, L>& in, const linear_head<T>& head,
                      const side_map* maps, std::int64_t rows, bool metrics, int threads,
                      const linear_gemm& mm, row_values* out) {
  using A = acc_t<T>;
  rows = std::max<std::int64_t>(1, std::min(rows, std::max(maps[0].rows(), maps[1].rows())));
  linear_chunk<T> ch(head, rows, false, false, threads, mm);
  const token_view<T, L>* sides[2] = {&in.pairs.chosen, &in.pairs.rejected};
  for (int s = 0; s < 2; ++s) {
    const side_map& m = maps[s];
    row_values& rv = out[s];
    const std::int64_t n = m.rows();
    rv.reset(n, metrics, 0);
    for (std::int64_t a0 = 0; a0 < n; a0 += rows) {
      const std::int64_t k = std::min(rows, n - a0);
      ch.nb = 0;
      ch.gather(sides[s]->logits, sides[s]->row_stride, m.row.data() + a0, k);
      ch.forward();
      const std::int64_t cu[2] = {0, k};
      row_values part;
      forward_rows(chunk_view<A>(ch.z.get(), head.vocab, m.label.data() + a0, cu, 1), part, metrics, threads);
      rv.place(part, a0, metrics);
    }
  }
}

template <class T>
void check_head(const linear_head<T>& h, const char* name) {
  if (h.vocab < 1) fail(name, ".vocab = ", h.vocab, " is invalid: must be >= 1");
  if (h.hidden < 1) fail(name, ".hidden = ", h.hidden, " is invalid: must be >= 1");
  if (h.weight == nullptr) fail(name, ".weight is null");
  if (h.weight_stride < h.hidden)
    fail(name, ".weight_stride = ", h.weight_stride, " is invalid: must be >= hidden = ", h.hidden);
  if (h.bias != nullptr && h.bias_size != h.vocab)
    fail(name, ".bias_size = ", h.bias_size, " != vocab = ", h.vocab,
         ": the bias must have one entry per vocab row");
  if (h.bias == nullptr && h.bias_size != 0)
    fail(name, ".bias is null but bias_size = ", h.bias_size, " (0 means no bias)");
  double value = 0;
  if (const char* field = dpo::detail::invalid_transform(h.transforms, &value))
    fail(name, ".transforms.", field, " = ", value, " is invalid: must be finite and > 0",
         field[1] == 'o' ? " (or 0 for no cap)" : "");
}

/// The layout and labels (as check_pairs for logits, labels bounded by the head's vocab),
/// the hidden size against the head's, and the row strides.
template <class T, class L>
void check_hidden_pairs(const hidden_pairs<T, L>& in, const linear_head<T>& head,
                        const char* name, const char* head_name) {
  if (in.hidden_size != head.hidden)
    fail(name, ".hidden_size = ", in.hidden_size, " != ", head_name, ".hidden = ", head.hidden,
         ": hidden states and weight must have the same hidden size");
  pair_view<T, L> shadow = in.pairs;
  for (token_view<T, L>* v : {&shadow.chosen, &shadow.rejected}) {
    if (v->row_stride < in.hidden_size)
      fail(name, v == &shadow.chosen ? ".chosen" : ".rejected", ".row_stride = ", v->row_stride,
           " is invalid: must be >= hidden_size = ", in.hidden_size);
    v->vocab = head.vocab;
    v->row_stride = head.vocab;  // the logits rule row_stride >= vocab does not apply here
  }
  check_pairs(shadow, name);
}

/// The bytes of the rows a side's sequences span in a buffer of `cols` columns.
template <class U, class T, class L>
linear_range side_range(const U* base, std::int64_t stride, std::int64_t cols,
                        const token_view<T, L>& v, const char* name) {
  const dpo::detail::row_span r = dpo::detail::rows_of(v, dpo::detail::cpu_policy());
  if (base == nullptr || r.size() == 0) return {{}, name};
  return range_of(base + r.begin * stride, r.size(), cols, stride, name);
}

/// Byte ranges of a pair layout's hidden rows, weight, bias and labels (8 entries).
template <class T, class L>
int pair_input_ranges(const hidden_pairs<T, L>& in, const linear_head<T>& head, linear_range* out,
                      const char* name) {
  const std::int64_t H = in.hidden_size;
  const token_view<T, L>& c = in.pairs.chosen;
  const token_view<T, L>& r = in.pairs.rejected;
  out[0] = side_range(c.logits, c.row_stride, H, c, name);
  out[1] = side_range(r.logits, r.row_stride, H, r, name);
  out[2] = range_of(head.weight, head.vocab, head.hidden, head.weight_stride, "weight");
  out[3] = range_of(head.bias, 1, head.bias_size, head.bias_size, "bias");
  out[4] = side_range(c.labels, 1, 1, c, "labels");
  out[5] = side_range(r.labels, 1, 1, r, "labels");
  out[6] = side_range(c.mask, 1, 1, c, "mask");
  out[7] = side_range(r.mask, 1, 1, r, "mask");
  return 8;
}

/// The gradient arguments: strides, a bias gradient only with a bias, and no output
/// overlapping another or any input (`ins`, n_in entries). Returns the number of gradient
/// ranges (at most 4), copied to `grad_ranges` when it is not null: a fused call's forward
/// outputs may not overlap them either.
template <class T, class L, class G>
int check_linear_grads(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                       const linear_dpo_grads<T, G>& g, const linear_range* ins, int n_in,
                       linear_range* grad_ranges = nullptr) {
  const std::int64_t H = head.hidden, V = head.vocab;
  if (g.chosen_hidden != nullptr && g.chosen_hidden_stride < H)
    fail("grads.chosen_hidden_stride = ", g.chosen_hidden_stride, " is invalid: must be >= hidden = ", H);
  if (g.rejected_hidden != nullptr && g.rejected_hidden_stride < H)
    fail("grads.rejected_hidden_stride = ", g.rejected_hidden_stride, " is invalid: must be >= hidden = ", H);
  if (g.weight != nullptr && g.weight_stride < H)
    fail("grads.weight_stride = ", g.weight_stride, " is invalid: must be >= hidden = ", H);
  if (g.bias != nullptr && head.bias == nullptr) fail("grads.bias is given but the head has no bias");
  linear_range outs[4];
  int n = 0;
  const token_view<T, L>& c = policy.pairs.chosen;
  const token_view<T, L>& r = policy.pairs.rejected;
  const bool one = g.chosen_hidden == g.rejected_hidden && g.chosen_hidden_stride == g.rejected_hidden_stride;
  if (one && g.chosen_hidden != nullptr) {
    // One buffer for both sides: the span of both sides' rows.
    const linear_range a = side_range(g.chosen_hidden, g.chosen_hidden_stride, H, c, "grads.chosen_hidden");
    const linear_range b = side_range(g.rejected_hidden, g.rejected_hidden_stride, H, r, "grads.rejected_hidden");
    linear_range u = a.bytes.lo != 0 ? a : b;
    if (a.bytes.lo != 0 && b.bytes.lo != 0) {
      u.bytes.lo = std::min(a.bytes.lo, b.bytes.lo);
      u.bytes.hi = std::max(a.bytes.hi, b.bytes.hi);
    }
    u.name = "grads.chosen_hidden / grads.rejected_hidden";
    outs[n++] = u;
  } else {
    outs[n++] = side_range(g.chosen_hidden, g.chosen_hidden_stride, H, c, "grads.chosen_hidden");
    outs[n++] = side_range(g.rejected_hidden, g.rejected_hidden_stride, H, r, "grads.rejected_hidden");
  }
  outs[n++] = range_of(g.weight, V, H, g.weight_stride, "grads.weight");
  outs[n++] = range_of(g.bias, 1, V, V, "grads.bias");
  require_no_overlap(outs, n, ins, n_in);
  if (grad_ranges != nullptr) std::copy(outs, outs + n, grad_ranges);
  return n;
}

/// Row-indexed outputs (forward_outputs::row_lse / row_coef) need one hidden buffer (one
/// stride) with each side on rows of its own (dpo::detail::check_row_state).
template <class T, class L>
void check_one_hidden_buffer(const hidden_pairs<T, L>& in, const char* what) {
  const char* otherwise = "with separate buffers use linear_dpo, which runs the backward in the same call";
  if (in.pairs.chosen.row_stride != in.pairs.rejected.row_stride)
    fail(what, " need one hidden buffer for both sides (padded or packed pairs); ", otherwise);
  throw_if(dpo::detail::check_row_state(in.pairs, what, "hidden", otherwise, dpo::detail::cpu_policy()));
}

/// The chunk rows of the three-pass plan (0: none fits) and of the four-pass forward, and the
/// four-pass backward's chunking; throws when the budget cannot hold one row.
template <class T>
struct plan_rows {
  std::int64_t three = 0, four = 0;
  linear_chunking backward;
};

template <class T>
plan_rows<T> plan_chunks(const linear_head<T>& head, std::int64_t N, bool hidden_grad,
                         bool need_backward, const linear_dpo_options& opt) {
  if (opt.workspace_bytes < 0)
    fail("options.workspace_bytes = ", opt.workspace_bytes, " is invalid: must be >= 0");
  if (opt.chunk_rows < 0)
    fail("options.chunk_rows = ", opt.chunk_rows, " is invalid: must be >= 0 (0 = from the budget)");
  check_gemm(opt.gemm);
  plan_rows<T> p;
  const linear_plan_in f = plan_in(head, opt, false, false);
  p.four = std::min(dpo::detail::linear_max_chunk_rows(f), std::max<std::int64_t>(N, 1));
  if (p.four < 1)
    fail("options.workspace_bytes = ", opt.workspace_bytes, " is too small for one row: ",
         opt.chunk_rows > 0 ? "a chunk of options.chunk_rows rows" : "one row",
         " over the full vocab needs ",
         dpo::detail::linear_chunk_bytes(f, std::max<std::int64_t>(opt.chunk_rows, 1)), " bytes");
  p.three = dpo::detail::linear_max_chunk_rows(plan_in(head, opt, true, hidden_grad));
  if (need_backward) {
    linear_options lo;
    lo.workspace_bytes = opt.workspace_bytes;
    lo.chunk_rows = opt.chunk_rows;
    p.backward = linear_chunks<T>(N, head.hidden, head.vocab, lo);
  }
  return p;
}

/// The per-pair completion rows (both sides) of mapped sides.
inline std::vector<std::int64_t> pair_rows(const side_map* m) {
  const std::size_t P = m[0].cu.size() - 1;
  std::vector<std::int64_t> n(P);
  for (std::size_t p = 0; p < P; ++p)
    n[p] = (m[0].cu[p + 1] - m[0].cu[p]) + (m[1].cu[p + 1] - m[1].cu[p]);
  return n;
}

/// Zeros of dHidden on the rows of each side's sequences that are not completion rows (the
/// written mode), or on all of them (`all`, before an accumulating backward).
template <class T, class L, class G>
void zero_hidden_rows(const hidden_pairs<T, L>& in, const linear_dpo_grads<T, G>& g, bool all) {
  const std::int64_t H = in.hidden_size;
  const auto side = [&](const token_view<T, L>& v, T* base, std::int64_t stride) {
    if (base == nullptr) return;
    for (std::int64_t s = 0; s < v.num_seqs; ++s)
      for (std::int64_t r = v.row_begin(s); r < v.row_end(s); ++r)
        if (all || v.target(r) < 0) std::fill(base + r * stride, base + r * stride + H, from_acc<T>(acc_t<T>(0)));
  };
  side(in.pairs.chosen, g.chosen_hidden, g.chosen_hidden_stride);
  side(in.pairs.rejected, g.rejected_hidden, g.rejected_hidden_stride);
}

/// The linear head's options of a DPO-from-hidden call.
inline linear_options linear_options_of(const linear_dpo_options& o) {
  linear_options lo;
  lo.num_threads = o.num_threads;
  lo.workspace_bytes = o.workspace_bytes;
  lo.chunk_rows = o.chunk_rows;
  lo.gemm = o.gemm;
  return lo;
}

/// The linear head's gradient targets for rows [b, ...) of a hidden buffer whose dHidden is
/// `hidden` (null: none; added to) with `stride`, and g's dWeight / dBias.
template <class T, class G>
linear_grads<T, G> rows_grads(const linear_dpo_grads<T, G>& g, T* hidden, std::int64_t stride, std::int64_t b) {
  linear_grads<T, G> lg;
  lg.hidden = hidden != nullptr ? hidden + b * stride : nullptr;
  lg.hidden_stride = stride;
  lg.accumulate_hidden = true;
  lg.weight = g.weight;
  lg.weight_stride = g.weight_stride;
  lg.bias = g.bias;
  return lg;
}

/// The four-pass backward: linear_logps_backward over each hidden buffer with each
/// completion row's dL/dlogp (coef[s][i], side s, mapped row i) and lse, adding to dHidden
/// (zeroed first in the written mode), dWeight and dBias.
template <class T, class L, class G>
void recompute_backward(const hidden_pairs<T, L>& in, const linear_head<T>& head,
                        const side_map* maps, const std::vector<double>* lse,
                        const std::vector<double>* coef, const linear_dpo_grads<T, G>& g,
                        const linear_dpo_options& opt) {
  if (!g.accumulate_hidden) zero_hidden_rows(in, g, true);
  const token_view<T, L>* sides[2] = {&in.pairs.chosen, &in.pairs.rejected};
  T* gh[2] = {g.chosen_hidden, g.rejected_hidden};
  const std::int64_t gs[2] = {g.chosen_hidden_stride, g.rejected_hidden_stride};
  // The concatenated layouts run one backward over both sides' rows: larger products.
  const bool one = sides[0]->logits == sides[1]->logits && sides[0]->row_stride == sides[1]->row_stride &&
                   gh[0] == gh[1] && gs[0] == gs[1];
  const auto run = [&](std::initializer_list<int> which) {
    std::int64_t b = INT64_MAX, e = 0;
    for (int s : which) {
      if (maps[s].rows() == 0) continue;
      b = std::min(b, maps[s].row.front());
      e = std::max(e, maps[s].row.back() + 1);
    }
    if (e <= b) return;
    const std::int64_t n = e - b;
    std::vector<std::int64_t> labels(static_cast<std::size_t>(n), -1);
    std::vector<double> row_lse(labels.size(), 0.0), grad(labels.size(), 0.0);
    for (int s : which)
      for (std::int64_t i = 0; i < maps[s].rows(); ++i) {
        const std::int64_t r = maps[s].row[i] - b;
        labels[r] = maps[s].label[i];
        row_lse[r] = lse[s][i];
        grad[r] = coef[s][i];
      }
    const int s0 = *which.begin();
    const linear_view<T, std::int64_t> v = linear_view_of(sides[s0]->logits + b * sides[s0]->row_stride, n,
                                                          sides[s0]->row_stride, head, labels.data(),
                                                          nullptr, std::int64_t{-1});
    linear_logps_backward(v, row_lse.data(), grad.data(), nullptr, nullptr, rows_grads(g, gh[s0], gs[s0], b),
                          linear_options_of(opt));
  };
  if (one) {
    run({0, 1});
  } else {
    run({0});
    run({1});
  }
}

/// The reference's sequence log-probs (LD-DPO weighted as the policy's), forward only.
template <class T, class L>
void reference_from_hidden(const hidden_pairs<T, L>& ref, const linear_head<T>& head,
                           double ld_alpha, std::int64_t rows, int threads, const linear_gemm& mm,
                           std::vector<double>& chosen, std::vector<double>& rejected) {
  using A = acc_t<T>;
  const side_map maps[2] = {map_side(ref.pairs.chosen), map_side(ref.pairs.rejected)};
  row_values rv[2];
  forward_all_rows(ref, head, maps, rows, false, threads, mm, rv);
  const batch_sequences s = sequence_stage(mapped_pairs<A>(maps[0], maps[1], head.vocab), rv[0], rv[1], ld_alpha, false);
  chosen = s.sc.logp;
  rejected = s.sr.logp;
}

/// Writes the row-indexed state (forward_outputs::row_lse / row_coef) of mapped rows.
inline void write_row_state(const forward_outputs& out, const side_map& m, const std::vector<double>& lse,
                            const std::vector<double>& coef, std::int64_t a0, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t r = m.row[a0 + i];
    if (out.row_lse != nullptr) out.row_lse[r] = lse[i];
    if (out.row_coef != nullptr) out.row_coef[r] = coef[i];
  }
}

/// Zeros of the row-indexed state on the sequences' rows that are not completion rows.
template <class T, class L>
void zero_row_state(const hidden_pairs<T, L>& in, const forward_outputs& out) {
  if (out.row_lse == nullptr && out.row_coef == nullptr) return;
  for (const token_view<T, L>* v : {&in.pairs.chosen, &in.pairs.rejected})
    for (std::int64_t s = 0; s < v->num_seqs; ++s)
      for (std::int64_t r = v->row_begin(s); r < v->row_end(s); ++r) {
        if (v->target(r) >= 0) continue;
        if (out.row_lse != nullptr) out.row_lse[r] = 0.0;
        if (out.row_coef != nullptr) out.row_coef[r] = 0.0;
      }
}

/// The four-pass forward: every completion row's values, the sequence and pair stages over
/// the whole batch, and each row's dL/dlogp (coef) and lse, per side.
template <class T, class L>
void forward_four(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                  const side_map* maps, const double* ref_chosen, const double* ref_rejected,
                  const loss_config& cfg, const forward_outputs& out, bool metrics,
                  std::int64_t rows, int threads, const linear_gemm& mm, std::vector<double>* lse,
                  std::vector<double>* coef) {
  using A = acc_t<T>;
  row_values rv[2];
  forward_all_rows(policy, head, maps, rows, metrics, threads, mm, rv);
  const pair_view<A, std::int64_t> pv = mapped_pairs<A>(maps[0], maps[1], head.vocab);
  const batch_sequences s = sequence_stage(pv, rv[0], rv[1], cfg.ld_alpha, metrics);
  std::vector<double> gc, gr;
  const double nll = pair_stage(s, ref_chosen, ref_rejected, cfg, out, metrics, gc, gr);
  const token_view<A, std::int64_t>* views[2] = {&pv.chosen, &pv.rejected};
  const std::vector<double>* g[2] = {&gc, &gr};
  zero_row_state(policy, out);
  for (int k = 0; k < 2; ++k) {
    coef[k].assign(static_cast<std::size_t>(maps[k].rows()), 0.0);
    side_coefs(*views[k], rv[k].target, s.shared, cfg.ld_alpha, g[k]->data(), k == 0 ? nll : 0.0,
               [&](std::int64_t, std::size_t i, double c) { coef[k][i] = c; });
    lse[k] = std::move(rv[k].lse);
    write_row_state(out, maps[k], lse[k], coef[k], 0, maps[k].rows());
  }
}

/// The three-pass call: chunks of whole pairs, each with its logits formed once, its rows'
/// forward, its pairs' dL/dpi, the row backward in place and the two backward products; then
/// the pair stage over the whole batch writes the outputs (the same dL/dpi, in pair order).
template <class T, class L, class G>
void fused_three(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                 const side_map* maps, const double* ref_chosen, const double* ref_rejected,
                 const loss_config& cfg, const forward_outputs& out,
                 const linear_dpo_grads<T, G>& g, double grad_output, bool metrics,
                 std::int64_t max_rows, int threads, const linear_gemm& mm) {
  using A = acc_t<T>;
  const std::int64_t P = policy.num_pairs(), V = head.vocab;
  const bool needs_ref = dpo::detail::needs_reference(cfg);
  const std::vector<std::int64_t> rows_of_pair = pair_rows(maps);
  batch_sequences S;
  S.nc.resize(static_cast<std::size_t>(P));
  S.nr.resize(S.nc.size());
  for (std::int64_t p = 0; p < P; ++p) {
    S.nc[p] = static_cast<double>(maps[0].cu[p + 1] - maps[0].cu[p]);
    S.nr[p] = static_cast<double>(maps[1].cu[p + 1] - maps[1].cu[p]);
  }
  S.shared = shared_lengths(S.nc, S.nr, cfg.ld_alpha);
  for (seq_sums* q : {&S.sc, &S.sr}) q->reset(S.nc.size(), metrics);
  std::vector<double> W(S.nc.size(), 1.0), gc(S.nc.size()), gr(S.nc.size());
  // dL/dpi of a pair reads only its own values, the weights and P (dpo/core/pair_batch.hpp);
  // the batch NLL and mean weight, not known yet, feed the loss values only.
  const dpo::detail::pair_batch_in b = dpo::detail::make_pair_batch(
      P, S.sc.logp.data(), S.sr.logp.data(), needs_ref ? ref_chosen : nullptr,
      needs_ref ? ref_rejected : nullptr, S.nc.data(), S.nr.data(),
      cfg.use_weighting ? W.data() : nullptr, token_totals{}, static_cast<double>(P));
  // Separable losses have no NLL term under WPO, so the mean weight does not enter.
  const double nll = dpo::detail::nll_token_grad(cfg, 1.0, total(S.nc));
  const token_view<T, L>* sides[2] = {&policy.pairs.chosen, &policy.pairs.rejected};
  T* gh[2] = {g.chosen_hidden, g.rejected_hidden};
  const std::int64_t gs[2] = {g.chosen_hidden_stride, g.rejected_hidden_stride};
  // The workspace holds the largest chunk actually cut, not the most the budget allows.
  const std::int64_t largest = std::max<std::int64_t>(
      1, dpo::detail::linear_largest_chunk(rows_of_pair.data(), P, max_rows));
  linear_chunk<T> ch(head, largest, true, gh[0] != nullptr || gh[1] != nullptr, threads, mm);
  zero_row_state(policy, out);
  if (!g.accumulate_hidden) zero_hidden_rows(policy, g, false);
  for (std::int64_t p0 = 0, p1 = 0; p0 < P; p0 = p1) {
    p1 = dpo::detail::linear_next_chunk(rows_of_pair.data(), P, p0, max_rows);
    const std::int64_t k = p1 - p0;
    ch.nb = 0;
    std::int64_t at[3] = {0, 0, 0};
    std::vector<std::int64_t> cu[2];
    for (int s = 0; s < 2; ++s) {
      const side_map& m = maps[s];
      const std::int64_t a0 = m.cu[p0], n = m.cu[p1] - a0;
      ch.gather(sides[s]->logits, sides[s]->row_stride, m.row.data() + a0, n);
      at[s + 1] = at[s] + n;
      cu[s].resize(static_cast<std::size_t>(k + 1));
      for (std::int64_t q = 0; q <= k; ++q) cu[s][q] = m.cu[p0 + q] - a0;
    }
    ch.forward();
    const std::vector<double> shared(S.shared.begin() + p0, S.shared.begin() + p1);
    token_view<A, std::int64_t> v[2];
    row_values rv[2];
    for (int s = 0; s < 2; ++s) {
      v[s] = chunk_view<A>(ch.z.get() + at[s] * V, V, maps[s].label.data() + maps[s].cu[p0], cu[s].data(), k);
      forward_rows(v[s], rv[s], metrics, threads);
      const seq_sums q = sum_sequences(v[s], rv[s], shared, cfg.ld_alpha, metrics);
      (s == 0 ? S.sc : S.sr).place(q, p0, metrics);
    }
    for (std::int64_t p = p0; p < p1; ++p) {
      if (cfg.use_weighting) W[p] = dpo::detail::wpo_weight(S.sc.wpo[p], S.nc[p], S.sr.wpo[p], S.nr[p]);
    }
    for (std::int64_t p = p0; p < p1; ++p) {
      const dpo::detail::pair_contribution pc = dpo::detail::contribution(cfg, b, p);
      gc[p] = pc.g_c;
      gr[p] = pc.g_r;
    }
    for (int s = 0; s < 2; ++s) {
      std::vector<double> coef(rv[s].target.size(), 0.0);
      side_coefs(v[s], rv[s].target, shared, cfg.ld_alpha, (s == 0 ? gc : gr).data() + p0,
                 s == 0 ? nll : 0.0, [&](std::int64_t, std::size_t i, double c) { coef[i] = c; });
      write_row_state(out, maps[s], rv[s].lse, coef, maps[s].cu[p0], at[s + 1] - at[s]);
      backward_side(
          v[s], [&](std::int64_t, std::int64_t i) { return rv[s].lse[i]; },
          [&](std::int64_t, std::int64_t i) { return coef[i]; }, grad_output, ch.z.get() + at[s] * V,
          V, threads);
    }
    ch.backward(g.weight, g.weight_stride, g.bias);
    for (int s = 0; s < 2; ++s)
      if (gh[s] != nullptr)
        ch.scatter_hidden(gh[s], gs[s], maps[s].row.data() + maps[s].cu[p0], at[s], at[s + 1] - at[s],
                          g.accumulate_hidden);
  }
  std::vector<double> gc2, gr2;
  pair_stage(S, ref_chosen, ref_rejected, cfg, out, metrics, gc2, gr2);
}

/// Everything a call checks, before anything is computed or written.
template <class T, class L>
void check_policy_call(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                       const double* ref_chosen, const double* ref_rejected,
                       const loss_config& cfg, bool ref_hidden) {
  check_config(cfg);
  check_head(head, "head");
  check_hidden_pairs(policy, head, "hidden", "head");
  if (!ref_hidden) check_reference(cfg, ref_chosen, ref_rejected);
}

template <class T, class L>
void check_reference_call(const hidden_pairs<T, L>& policy, const hidden_pairs<T, L>& ref,
                          const linear_head<T>& ref_head, const linear_head<T>& head) {
  check_head(ref_head, "ref_head");
  if (ref_head.vocab != head.vocab)
    fail("ref_head.vocab = ", ref_head.vocab, " != head.vocab = ", head.vocab);
  check_hidden_pairs(ref, ref_head, "ref_hidden", "ref_head");
  if (ref.num_pairs() != policy.num_pairs())
    fail("ref_hidden.num_pairs = ", ref.num_pairs(), " != hidden.num_pairs = ", policy.num_pairs());
}

/// The rows of a layout's sequences (the size of the largest side's span).
template <class T, class L>
std::int64_t layout_rows(const hidden_pairs<T, L>& in) {
  const auto n = [](const token_view<T, L>& v) {
    return dpo::detail::rows_of(v, dpo::detail::cpu_policy()).size();
  };
  return n(in.pairs.chosen) + n(in.pairs.rejected);
}

/// The forward outputs may overlap neither each other nor the call's inputs `ins` (row_lse /
/// row_coef: the hidden buffer's rows up to the last sequence's end).
template <class T, class L>
void check_outputs(const hidden_pairs<T, L>& policy, const forward_outputs& out, const linear_range* ins, int n_in) {
  const dpo::detail::check_policy pol = dpo::detail::cpu_policy();
  const std::int64_t rows = std::max(dpo::detail::rows_of(policy.pairs.chosen, pol).end,
                                     dpo::detail::rows_of(policy.pairs.rejected, pol).end);
  throw_if(dpo::detail::check_forward_outputs(out, policy.num_pairs(), rows, ins, n_in));
}

/// The fused call after its checks; ref_* are the reference log-probs.
template <class T, class L, class G>
void fused(const hidden_pairs<T, L>& policy, const linear_head<T>& head, const double* ref_chosen,
           const double* ref_rejected, const loss_config& cfg, const forward_outputs& out,
           const linear_dpo_grads<T, G>& g, double grad_output, const linear_dpo_options& opt,
           const plan_rows<T>& plan, const side_map* maps, linear_mode mode) {
  const bool metrics = opt.metrics || cfg.use_weighting;
  const int threads = resolve_threads(opt.num_threads);
  if (mode == linear_mode::three_pass) {
    fused_three(policy, head, maps, ref_chosen, ref_rejected, cfg, out, g, grad_output, metrics,
                plan.three, threads, opt.gemm);
    return;
  }
  std::vector<double> lse[2], coef[2];
  forward_four(policy, head, maps, ref_chosen, ref_rejected, cfg, out, metrics, plan.four, threads,
               opt.gemm, lse, coef);
  for (int s = 0; s < 2; ++s)
    for (double& c : coef[s]) c = dpo::detail::times(c, grad_output);
  recompute_backward(policy, head, maps, lse, coef, g, opt);
}

/// The mode of a fused call, or a dpo::error when three_pass was asked for and is impossible.
template <class T>
linear_mode choose_mode(const loss_config& cfg, const std::vector<std::int64_t>& rows,
                        const plan_rows<T>& plan, const linear_dpo_options& opt) {
  const std::int64_t P = static_cast<std::int64_t>(rows.size());
  if (opt.mode == linear_mode::three_pass) {
    const std::string why = dpo::detail::linear_three_pass_refusal(cfg, rows.data(), P, plan.three, "completion rows");
    if (!why.empty()) fail(why);
  }
  return dpo::detail::linear_choose_mode(opt.mode, cfg, rows.data(), P, plan.three);
}

}  // namespace detail

/// The plan of a fused call (linear_dpo): mode, chunk rows and the workspace it allocates.
/// Throws dpo::error when the arguments are invalid or the budget cannot hold one row.
template <class T, class L>
linear_dpo_plan linear_dpo_workspace_size(const hidden_pairs<T, L>& policy,
                                          const linear_head<T>& head, const loss_config& cfg,
                                          const linear_dpo_options& opt = {},
                                          bool hidden_grad = true) {
  detail::check_config(cfg);
  detail::check_head(head, "head");
  detail::check_hidden_pairs(policy, head, "hidden", "head");
  const detail::plan_rows<T> plan = detail::plan_chunks(head, detail::layout_rows(policy), hidden_grad, true, opt);
  const detail::side_map maps[2] = {detail::map_side(policy.pairs.chosen), detail::map_side(policy.pairs.rejected)};
  linear_dpo_plan r;
  const std::vector<std::int64_t> rows = detail::pair_rows(maps);
  r.mode = detail::choose_mode(cfg, rows, plan, opt);
  if (r.mode == linear_mode::three_pass) {
    r.chunk_rows = std::max<std::int64_t>(
        1, dpo::detail::linear_largest_chunk(rows.data(), policy.num_pairs(), plan.three));
    r.workspace_bytes = dpo::detail::linear_chunk_bytes(detail::plan_in(head, opt, true, hidden_grad), r.chunk_rows);
  } else {
    r.chunk_rows = std::max<std::int64_t>(1, std::min(plan.four, std::max(maps[0].rows(), maps[1].rows())));
    r.workspace_bytes = std::max(dpo::detail::linear_chunk_bytes(detail::plan_in(head, opt, false, false), r.chunk_rows),
                                 plan.backward.workspace_bytes);
  }
  return r;
}

/// DPO from hidden states in one call: the loss, every metric and per-pair output of
/// dpo_forward (out: caller-owned, each pointer may be null; out.row_lse / row_coef, indexed
/// by hidden row, need one hidden buffer) and the gradients of grad_output * loss with
/// respect to the hidden states, the weight and the bias (g: see linear_dpo_grads).
///
/// - policy: the pairs over hidden rows (hidden_pairs); head: weight, bias, transforms.
/// - ref_chosen / ref_rejected: the reference's sequence log-probs [P] each (LD-DPO weighted
///   alike when ld_alpha < 1; null for reference-free losses).
/// - cfg: every loss type, combination and option of the logits path.
/// Three GEMM passes over the weight when every chunk can hold whole pairs and the loss is
/// separable, four otherwise (linear_dpo_workspace_size tells which; docs/linear.md).
/// T: float, double, Eigen::bfloat16, Eigen::half; products accumulate in float (double for
/// double) and the logits are kept in that type. Allocates at most opt.workspace_bytes plus
/// O(rows) bookkeeping; never a [rows, vocab] buffer. Outputs may not overlap inputs.
/// Deterministic and independent of opt.num_threads. Throws dpo::error naming the argument
/// before writing anything.
///
///   auto policy = dpo::cpu::linear_padded_pairs(h, H, H, labels, 2 * P, T);
///   dpo::cpu::linear_head<float> head;
///   head.weight = w; head.vocab = V; head.hidden = H; head.weight_stride = H;
///   dpo::cpu::linear_dpo_grads<float> g;
///   g.chosen_hidden = g.rejected_hidden = dh; g.chosen_hidden_stride = g.rejected_hidden_stride = H;
///   g.weight = dw; g.weight_stride = H;
///   double loss; dpo::forward_outputs out; out.loss = &loss;
///   dpo::cpu::linear_dpo(policy, head, ref_c, ref_r, cfg, out, g);
template <class T, class L, class G>
void linear_dpo(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                const double* ref_chosen, const double* ref_rejected, const loss_config& cfg,
                const forward_outputs& out, const linear_dpo_grads<T, G>& g,
                const linear_dpo_options& opt = {}, double grad_output = 1.0) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, acc_t<T>>,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  detail::check_policy_call(policy, head, ref_chosen, ref_rejected, cfg, false);
  detail::check_finite(grad_output, "grad_output");
  detail::linear_range ins[14];
  int n = detail::pair_input_ranges(policy, head, ins, "hidden");
  const std::int64_t P = policy.num_pairs();
  ins[n++] = detail::range_of(ref_chosen, 1, P, P, "ref_chosen_logps");
  ins[n++] = detail::range_of(ref_rejected, 1, P, P, "ref_rejected_logps");
  n += detail::check_linear_grads(policy, head, g, ins, n, ins + n);
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_hidden_buffer(policy, "out.row_lse / out.row_coef");
  detail::check_outputs(policy, out, ins, n);  // the gradients among the inputs
  const bool dh = g.chosen_hidden != nullptr || g.rejected_hidden != nullptr;
  const detail::plan_rows<T> plan = detail::plan_chunks(head, detail::layout_rows(policy), dh, true, opt);
  const detail::side_map maps[2] = {detail::map_side(policy.pairs.chosen), detail::map_side(policy.pairs.rejected)};
  const linear_mode mode = detail::choose_mode(cfg, detail::pair_rows(maps), plan, opt);
  detail::fused(policy, head, ref_chosen, ref_rejected, cfg, out, g, grad_output, opt, plan, maps, mode);
}

/// linear_dpo with the reference from hidden states: ref (same pairs and labels as policy)
/// through ref_head (same vocab), forward only, LD-DPO weighted as the policy; then
/// linear_dpo with its sequence log-probs. Everything is checked before either pass.
template <class T, class L, class G>
void linear_dpo(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                const hidden_pairs<T, L>& ref, const linear_head<T>& ref_head,
                const loss_config& cfg, const forward_outputs& out,
                const linear_dpo_grads<T, G>& g, const linear_dpo_options& opt = {},
                double grad_output = 1.0) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, acc_t<T>>,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  detail::check_policy_call(policy, head, nullptr, nullptr, cfg, true);
  detail::check_reference_call(policy, ref, ref_head, head);
  detail::check_finite(grad_output, "grad_output");
  detail::linear_range ins[20];
  int n = detail::pair_input_ranges(policy, head, ins, "hidden");
  n += detail::pair_input_ranges(ref, ref_head, ins + n, "ref_hidden");
  n += detail::check_linear_grads(policy, head, g, ins, n, ins + n);
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_hidden_buffer(policy, "out.row_lse / out.row_coef");
  detail::check_outputs(policy, out, ins, n);  // the gradients among the inputs
  const bool dh = g.chosen_hidden != nullptr || g.rejected_hidden != nullptr;
  const detail::plan_rows<T> plan = detail::plan_chunks(head, detail::layout_rows(policy), dh, true, opt);
  const detail::plan_rows<T> ref_plan = detail::plan_chunks(ref_head, detail::layout_rows(ref), false, false, opt);
  const detail::side_map maps[2] = {detail::map_side(policy.pairs.chosen), detail::map_side(policy.pairs.rejected)};
  const linear_mode mode = detail::choose_mode(cfg, detail::pair_rows(maps), plan, opt);
  std::vector<double> rc, rr;
  if (dpo::detail::needs_reference(cfg))
    detail::reference_from_hidden(ref, ref_head, cfg.ld_alpha, ref_plan.four,
                                  detail::resolve_threads(opt.num_threads), opt.gemm, rc, rr);
  detail::fused(policy, head, rc.empty() ? nullptr : rc.data(), rr.empty() ? nullptr : rr.data(), cfg,
                out, g, grad_output, opt, plan, maps, mode);
}

/// The forward pass alone (four-pass mode's first half): writes `out` as linear_dpo does;
/// out.row_lse and out.row_coef (indexed by hidden row; at least row_end(last) doubles; rows of
/// the sequences that are not completion rows get 0; gap rows are not written) hold what
/// linear_dpo_backward needs, and need one hidden buffer for both sides. Throws dpo::error
/// before writing anything. Deterministic and independent of opt.num_threads.
template <class T, class L>
void linear_dpo_forward(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                        const double* ref_chosen, const double* ref_rejected,
                        const loss_config& cfg, const forward_outputs& out,
                        const linear_dpo_options& opt = {}) {
  detail::check_policy_call(policy, head, ref_chosen, ref_rejected, cfg, false);
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_hidden_buffer(policy, "out.row_lse / out.row_coef");
  {
    detail::linear_range ins[10];
    int n = detail::pair_input_ranges(policy, head, ins, "hidden");
    const std::int64_t P = policy.num_pairs();
    ins[n++] = detail::range_of(ref_chosen, 1, P, P, "ref_chosen_logps");
    ins[n++] = detail::range_of(ref_rejected, 1, P, P, "ref_rejected_logps");
    detail::check_outputs(policy, out, ins, n);
  }
  const detail::plan_rows<T> plan = detail::plan_chunks(head, detail::layout_rows(policy), false, false, opt);
  const detail::side_map maps[2] = {detail::map_side(policy.pairs.chosen), detail::map_side(policy.pairs.rejected)};
  std::vector<double> lse[2], coef[2];
  detail::forward_four(policy, head, maps, ref_chosen, ref_rejected, cfg, out,
                       opt.metrics || cfg.use_weighting, plan.four,
                       detail::resolve_threads(opt.num_threads), opt.gemm, lse, coef);
}

/// linear_dpo_forward with the reference from hidden states (as the fused overload).
template <class T, class L>
void linear_dpo_forward(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                        const hidden_pairs<T, L>& ref, const linear_head<T>& ref_head,
                        const loss_config& cfg, const forward_outputs& out,
                        const linear_dpo_options& opt = {}) {
  detail::check_policy_call(policy, head, nullptr, nullptr, cfg, true);
  detail::check_reference_call(policy, ref, ref_head, head);
  if (out.row_lse != nullptr || out.row_coef != nullptr)
    detail::check_one_hidden_buffer(policy, "out.row_lse / out.row_coef");
  {
    detail::linear_range ins[16];
    int n = detail::pair_input_ranges(policy, head, ins, "hidden");
    n += detail::pair_input_ranges(ref, ref_head, ins + n, "ref_hidden");
    detail::check_outputs(policy, out, ins, n);  // before the reference pass
  }
  detail::plan_chunks(head, detail::layout_rows(policy), false, false, opt);
  const detail::plan_rows<T> ref_plan = detail::plan_chunks(ref_head, detail::layout_rows(ref), false, false, opt);
  std::vector<double> rc, rr;
  if (dpo::detail::needs_reference(cfg))
    detail::reference_from_hidden(ref, ref_head, cfg.ld_alpha, ref_plan.four,
                                  detail::resolve_threads(opt.num_threads), opt.gemm, rc, rr);
  linear_dpo_forward(policy, head, rc.empty() ? nullptr : rc.data(), rr.empty() ? nullptr : rr.data(),
                     cfg, out, opt);
}

/// The backward of linear_dpo_forward (four-pass mode's second half): the gradients of
/// grad_output * loss from the row state it wrote (row_lse, row_coef: indexed by hidden
/// row; only completion rows are read), recomputing the logits (linear_logps_backward).
/// g as for linear_dpo; one hidden buffer for both sides. Throws dpo::error before writing
/// anything. Deterministic and independent of opt.num_threads.
template <class T, class L, class G>
void linear_dpo_backward(const hidden_pairs<T, L>& policy, const linear_head<T>& head,
                         const double* row_lse, const double* row_coef,
                         const linear_dpo_grads<T, G>& g, double grad_output = 1.0,
                         const linear_dpo_options& opt = {}) {
  static_assert(std::is_same_v<G, T> || std::is_same_v<G, acc_t<T>>,
                "dWeight and dBias must have the head's dtype or its accumulation type");
  detail::check_head(head, "head");
  detail::check_hidden_pairs(policy, head, "hidden", "head");
  detail::check_finite(grad_output, "grad_output");
  detail::check_one_hidden_buffer(policy, "row_lse / row_coef");
  // Read only on completion rows: pairs without rows (T = 0) may pass null.
  if ((detail::has_rows(policy.pairs.chosen) || detail::has_rows(policy.pairs.rejected)) &&
      (row_lse == nullptr || row_coef == nullptr))
    detail::fail(row_lse == nullptr ? "row_lse" : "row_coef", " is null");
  detail::linear_range ins[10];
  int n = detail::pair_input_ranges(policy, head, ins, "hidden");
  const std::int64_t rows = dpo::detail::rows_of(policy.pairs.rejected, dpo::detail::cpu_policy()).end;
  const std::int64_t rows_c = dpo::detail::rows_of(policy.pairs.chosen, dpo::detail::cpu_policy()).end;
  ins[n++] = detail::range_of(row_lse, 1, std::max(rows, rows_c), 0, "row_lse");
  ins[n++] = detail::range_of(row_coef, 1, std::max(rows, rows_c), 0, "row_coef");
  detail::check_linear_grads(policy, head, g, ins, n);
  detail::plan_chunks(head, detail::layout_rows(policy), false, true, opt);
  const detail::side_map maps[2] = {detail::map_side(policy.pairs.chosen), detail::map_side(policy.pairs.rejected)};
  std::vector<double> lse[2], coef[2];
  for (int s = 0; s < 2; ++s) {
    for (const std::int64_t r : maps[s].row) {
      lse[s].push_back(row_lse[r]);
      coef[s].push_back(dpo::detail::times(row_coef[r], grad_output));
    }
  }
  detail::recompute_backward(policy, head, maps, lse, coef, g, opt);
}

/// The reference's (or any model's) sequence log-probs from hidden states, forward only, as
/// pair_logps on logits: chosen[i], rejected[i] for i < P, LD-DPO weighted when ld_alpha < 1.
template <class T, class L>
void linear_pair_logps(const hidden_pairs<T, L>& in, const linear_head<T>& head, double ld_alpha,
                       double* chosen, double* rejected, const linear_dpo_options& opt = {}) {
  detail::check_head(head, "head");
  detail::check_hidden_pairs(in, head, "hidden", "head");
  detail::check_unit(ld_alpha, "ld_alpha");
  if (chosen == nullptr || rejected == nullptr)
    detail::fail(chosen == nullptr ? "chosen" : "rejected", " is null");
  {
    // The outputs may overlap neither each other nor the hidden rows, head, labels or mask.
    detail::linear_range ins[8];
    const int n = detail::pair_input_ranges(in, head, ins, "hidden");
    const std::int64_t P = in.num_pairs();
    const detail::linear_range outs[2] = {detail::range_of(chosen, 1, P, P, "chosen"),
                                          detail::range_of(rejected, 1, P, P, "rejected")};
    detail::require_no_overlap(outs, 2, ins, n);
  }
  const detail::plan_rows<T> plan = detail::plan_chunks(head, detail::layout_rows(in), false, false, opt);
  std::vector<double> rc, rr;
  detail::reference_from_hidden(in, head, ld_alpha, plan.four, detail::resolve_threads(opt.num_threads), opt.gemm,
                                rc, rr);
  std::copy(rc.begin(), rc.end(), chosen);
  std::copy(rr.begin(), rr.end(), rejected);
}

}  // namespace cpu
}  // namespace dpo
