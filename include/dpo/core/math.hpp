// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The scalar math core shared by the CPU path and the CUDA kernels. Every function here is
// DPO_HOST_DEVICE, so both backends evaluate the same expressions in the same order and
// cannot drift apart. Nothing here allocates, throws or depends on Eigen.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DPO_HOST_DEVICE __host__ __device__
#define DPO_FORCEINLINE __forceinline__
#else
#define DPO_HOST_DEVICE
#define DPO_FORCEINLINE inline
#endif

namespace dpo {
namespace detail {

// Unqualified calls after `using std::x` pick the CUDA device overloads under nvcc and the
// standard ones on the host (the pattern Eigen uses for EIGEN_USING_STD).

/// log(sigmoid(x)) without overflow: x - softplus(x) for x < 0, -log1p(exp(-x)) otherwise.
/// NaN in, NaN out.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A log_sigmoid(A x) {
  using std::exp;
  using std::log1p;
  return x >= A(0) ? -log1p(exp(-x)) : x - log1p(exp(x));
}

/// softplus(x) = log(1 + exp(x)) = -log_sigmoid(-x), stable for any finite x.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A softplus(A x) {
  return -log_sigmoid(-x);
}

/// sigmoid(x), stable for any finite x (never exp of a large positive number).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A sigmoid(A x) {
  using std::exp;
  if (x >= A(0)) return A(1) / (A(1) + exp(-x));
  const A e = exp(x);
  return e / (A(1) + e);
}

/// log(1 - exp(a)) for a < 0 (Maechler's split: log1p(-exp(a)) far from 0, log(-expm1(a))
/// near it). a >= 0 gives NaN or -inf, as the exact value does.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A log1mexp(A a) {
  using std::exp;
  using std::expm1;
  using std::log;
  using std::log1p;
  return a < A(-0.6931471805599453) ? log1p(-exp(a)) : log(-expm1(a));
}

/// exp(d) * d with the limit 0 at d = -inf (a -inf logit has probability 0 and adds 0 to
/// the entropy sum instead of 0 * inf = NaN).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A exp_times(A e, A d) {
  return e == A(0) ? A(0) : e * d;
}

/// a * b with 0 * inf = 0: the limit where the zero factor vanishes faster than the other
/// diverges (a weight exp(-inf), a saturated sigmoid or score derivative, a label-smoothing
/// eps of 0, an LD-DPO weight of 0), where IEEE gives NaN. A NaN factor still gives NaN.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE A times(A a, A b) {
  const A r = a * b;
  return r != r && a == a && b == b ? A(0) : r;
}

/// Per-row statistics of a logits row, accumulated online (one read of the row).
///
/// With m the running max: s = sum exp(z - m), t = sum exp(z - m) * (z - m),
/// s2 = sum exp(2 (z - m)), zsum = sum z. From them:
///   logsumexp(z)    = m + log(s)
///   entropy         = log(s) - t / s
///   logsumexp(2 z)  = 2 m + log(s2)
///   mean logit      = zsum / V
/// argmax is the first index of the maximum (ties go to the lower index, as torch.argmax).
/// A NaN anywhere in the row makes s NaN, so it propagates to every derived quantity.
template <class A>
struct row_stats {
  A m;
  A s;
  A t;
  A s2;
  A zsum;
  std::int64_t argmax;

  DPO_HOST_DEVICE static row_stats empty() {
    row_stats r;
    r.m = -INFINITY;
    r.s = A(0);
    r.t = A(0);
    r.s2 = A(0);
    r.zsum = A(0);
    r.argmax = -1;
    return r;
  }

  DPO_HOST_DEVICE A logsumexp() const {
    using std::log;
    return m + log(s);
  }
  /// logsumexp(z) in double: double(m) + log(s), what the backends store for the backward.
  /// Rounded once at the scale of m in double instead of in A (at |m| = 1e7 a float lse has
  /// spacing 1, larger than log(s) itself).
  DPO_HOST_DEVICE double logsumexp_double() const {
    using std::log;
    return static_cast<double>(m) + log(static_cast<double>(s));
  }
  /// z - logsumexp(z) for a logit z of the row, as (z - m) - log(s): z - m is exact for the
  /// logits near the max (the ones with probability that matters), so the result is not
  /// rounded at the scale of m (z - (m + log s) gives 0 for four tied maxima at 1e17 in
  /// double). In double, for every A.
  DPO_HOST_DEVICE double log_softmax(A z) const {
    using std::log;
    return (static_cast<double>(z) - static_cast<double>(m)) - log(static_cast<double>(s));
  }
  /// logsumexp(2 z) - 2 logsumexp(z) = log(s2) - 2 log(s): WPO's log sum_v p_v^2, with m
  /// cancelled exactly.
  DPO_HOST_DEVICE double log_sum_p2() const {
    using std::log;
    return log(static_cast<double>(s2)) - 2.0 * log(static_cast<double>(s));
  }
  DPO_HOST_DEVICE A entropy() const {
    using std::log;
    return log(s) - t / s;
  }
  DPO_HOST_DEVICE A logsumexp2() const {
    using std::log;
    return A(2) * m + log(s2);
  }
};

/// Whether a row's label is its top-1 token, linear_logps' is_top1 on both backends, sharded
/// or not: the label is the row's first maximum (torch.argmax's tie rule) and its logit is
/// above -inf. A row whose logits are all -inf has its first maximum at column 0 but no
/// top-1 token. (The DPO metrics' token accuracy counts the first maximum alone, as the
/// logits path always has: docs/losses.md.)
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE bool label_is_top1(bool first_max_is_label, A label_logit) {
  return first_max_is_label && label_logit > -INFINITY;
}

/// A row's log-sum-exp as an unevaluated sum hi + lo in the accumulation type A, for the
/// backward's exp((z - hi) - lo): z - hi is exact for the logits near the max, so the
/// probabilities that matter are not rounded at the scale of the lse (one subtraction more
/// per element than exp(z - lse)). From a single A, lo = 0 (the plain exp(z - lse)).
template <class A>
struct lse_parts {
  A hi;
  A lo;
  DPO_HOST_DEVICE lse_parts(A lse) : hi(lse), lo(A(0)) {}  // NOLINT: implicit on purpose
  DPO_HOST_DEVICE lse_parts(A h, A l) : hi(h), lo(l) {}
};

/// |lse| from which a stored double lse is too coarse for a row's backward in A: a double
/// lse is rounded by up to |lse| 2^-53, which shifts every exp(z - lse) by that much
/// relatively. For A = double that error passes 2^-43 (about 500 ulp) at |lse| = 2^10; for
/// A = float it stays under 2^-27 (below float's own rounding) up to 2^26. Rows at or past
/// the limit recompute their max and sum in the backward (one more read of such rows only).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE double lse_recompute_limit() {
  return sizeof(A) >= sizeof(double) ? 1024.0 : 67108864.0;
}

/// Whether a row whose stored lse is `lse` must recompute its statistics in the backward.
/// NaN and infinities never do (they have nothing to recover).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE bool lse_needs_recompute(double lse) {
  using std::fabs;
  return fabs(lse) >= lse_recompute_limit<A>() && fabs(lse) < INFINITY;
}

/// A stored double lse as hi = A(lse), lo = A(lse - hi): together they carry about twice
/// A's precision, exact enough below lse_recompute_limit<A>().
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE lse_parts<A> split_lse(double lse) {
  const A hi = static_cast<A>(lse);
  // An infinite or NaN lse has no low part (inf - inf would be NaN).
  const double rest = lse - static_cast<double>(hi);
  return lse_parts<A>(hi, rest == rest ? static_cast<A>(rest) : A(0));
}

/// The parts of a row's exact lse from recomputed statistics: hi = m, lo = log(s).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE lse_parts<A> lse_parts_of(A m, A s) {
  using std::log;
  return lse_parts<A>(m, log(s));
}

/// Folds the statistics of a later chunk `b` (column indices above those of `a`) into `a`.
/// The result depends only on the order of the merges, never on timing: callers fix that
/// order (left to right over a row) so results are bitwise reproducible.
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE void merge_row_stats(row_stats<A>& a, const row_stats<A>& b) {
  using std::exp;
  if (b.argmax < 0) return;
  if (a.argmax < 0) {
    a = b;
    return;
  }
  const bool b_wins = b.m > a.m;
  const A m = b_wins ? b.m : a.m;
  // Each side's terms were taken relative to its own max; shift them to the common one.
  const A da = a.m - m;  // <= 0
  const A db = b.m - m;  // <= 0
  const A fa = exp(da);
  const A fb = exp(db);
  const A s = a.s * fa + b.s * fb;
  const A t = fa * a.t + exp_times(fa, da) * a.s + fb * b.t + exp_times(fb, db) * b.s;
  const A s2 = a.s2 * fa * fa + b.s2 * fb * fb;
  a.m = m;
  a.s = s;
  a.t = t;
  a.s2 = s2;
  a.zsum = a.zsum + b.zsum;
  if (b_wins) a.argmax = b.argmax;
}

/// Folds one logit z at column v (greater than every column seen so far) into `a`.
/// NaN propagates: a NaN z lands in s through exp(NaN).
template <class A>
DPO_HOST_DEVICE DPO_FORCEINLINE void push_logit(row_stats<A>& a, A z, std::int64_t v) {
  using std::exp;
  if (a.argmax < 0) {
    a.m = z;
    a.s = A(1);
    a.t = A(0);
    a.s2 = A(1);
    a.zsum = z;
    a.argmax = v;
    if (z != z) a.s = z;
    return;
  }
  if (z > a.m) {
    const A d = a.m - z;  // < 0
    const A f = exp(d);
    a.t = f * a.t + exp_times(f, d) * a.s;
    a.s = a.s * f + A(1);
    a.s2 = a.s2 * f * f + A(1);
    a.m = z;
    a.argmax = v;
  } else {
    const A d = z - a.m;
    const A e = exp(d);
    a.s += e;
    a.t += exp_times(e, d);
    a.s2 += e * e;
  }
  a.zsum += z;
}

}  // namespace detail
}  // namespace dpo
