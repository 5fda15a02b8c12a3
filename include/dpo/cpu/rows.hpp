// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU row kernels: one logits row in, its statistics out (forward), or its gradient
// written (backward). Rows are processed in fixed chunks that stay in L1, vectorised by
// Eigen, and folded left to right with the shared merge of dpo/core/math.hpp, so the
// result of a row never depends on threads.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

#include "dpo/core/math.hpp"

namespace dpo {
namespace cpu {

/// The accumulation type for a logits type: double for double, float otherwise.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace detail {

/// Columns per chunk: 2048 floats = 8 KiB, so a chunk and its exp() stay in L1.
inline constexpr std::int64_t row_chunk = 2048;

template <class A>
using chunk_array = Eigen::Array<A, Eigen::Dynamic, 1>;

/// Scratch for one thread: the converted chunk and its exponentials.
template <class A>
struct row_scratch {
  chunk_array<A> x{row_chunk};
  chunk_array<A> e{row_chunk};
};

/// The chunk [c0, c0 + n) of row z as accumulation-type values: a view when T == A, else a
/// converted copy in scratch.
template <class T, class A>
Eigen::Map<const chunk_array<A>> load_chunk(const T* z, std::int64_t c0, std::int64_t n,
                                            row_scratch<A>& s) {
  if constexpr (std::is_same_v<T, A>) {
    return Eigen::Map<const chunk_array<A>>(z + c0, n);
  } else {
    s.x.head(n) = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(z + c0, n).template cast<A>();
    return Eigen::Map<const chunk_array<A>>(s.x.data(), n);
  }
}

/// Statistics of one row (see dpo::detail::row_stats). With Metrics = false only m and s
/// (the log-sum-exp) are filled; the rest stay 0 and argmax is -1 or the chunk origin.
template <bool Metrics, class T, class A>
dpo::detail::row_stats<A> row_forward(const T* z, std::int64_t V, row_scratch<A>& scratch) {
  using dpo::detail::row_stats;
  row_stats<A> acc = row_stats<A>::empty();
  for (std::int64_t c0 = 0; c0 < V; c0 += row_chunk) {
    const std::int64_t n = V - c0 < row_chunk ? V - c0 : row_chunk;
    const auto x = load_chunk<T, A>(z, c0, n, scratch);
    row_stats<A> c;
    if constexpr (Metrics) {
      Eigen::Index idx = 0;
      c.m = x.maxCoeff(&idx);
      auto e = scratch.e.head(n);
      e = (x - c.m).exp();
      c.s = e.sum();
      // A -inf logit has e = 0 and adds 0, not 0 * -inf.
      c.t = (e > A(0)).select(e * (x - c.m), A(0)).sum();
      c.s2 = e.square().sum();
      c.zsum = x.sum();
      c.argmax = c0 + static_cast<std::int64_t>(idx);
    } else {
      c.m = x.maxCoeff();
      c.s = (x - c.m).exp().sum();
      c.t = A(0);
      c.s2 = A(0);
      c.zsum = A(0);
      c.argmax = c0;
    }
    // A NaN max makes every comparison false; force it into s so it propagates.
    if (c.m != c.m) c.s = c.m;
    dpo::detail::merge_row_stats(acc, c);
  }
  return acc;
}

/// Writes the gradient of one row: g[v] = coef * (1[v == y] - exp(z[v] - lse)). coef == 0
/// (a masked row) writes exact zeros without reading z. g may equal z (in place): each chunk
/// is read before it is written.
template <class T, class A>
void row_backward(const T* z, T* g, std::int64_t V, A lse, A coef, std::int64_t y,
                  row_scratch<A>& scratch) {
  for (std::int64_t c0 = 0; c0 < V; c0 += row_chunk) {
    const std::int64_t n = V - c0 < row_chunk ? V - c0 : row_chunk;
    Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> out(g + c0, n);
    if (coef == A(0)) {
      out.setZero();
      continue;
    }
    const auto x = load_chunk<T, A>(z, c0, n, scratch);
    auto e = scratch.e.head(n);
    e = (x - lse).exp() * (-coef);
    if (y >= c0 && y < c0 + n) e(y - c0) += coef;
    if constexpr (std::is_same_v<T, A>) {
      out = e;
    } else {
      out = e.template cast<T>();
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace dpo
