// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CUDA fused LM head (dpo/cuda/linear.cuh) against the CPU one (dpo/cpu/linear.hpp, itself
// checked against a float64 reference and finite differences in tests/test_cpu_linear.cpp) on
// the same inputs: every dtype, bias or not, the logit transforms, masks and ignored rows,
// chunk sweeps, V = 1 / prime V / H = 1, accumulation modes, determinism, NaN containment and
// the argument and device-data errors (nothing written). Runs on a GPU, or on the emulator
// with its reference GEMM standing in for cuBLASLt (tests/cuda/emu).
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <dpo/cpu/linear.hpp>

#include "catch.hpp"
#include "checks.hpp"
#include "dtype_bytes.hpp"
#include "lse_limit.hpp"
#include "linear_harness.hpp"

namespace {

using dpo_cuda_test::dtype;
using dpo_cuda_test::linear_case;
using dpo_cuda_test::linear_out;
using test_support::check_values;

const char* name_of(dtype t) {
  switch (t) {
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::f32: return "f32";
    case dtype::f64: return "f64";
  }
  return "?";
}

/// Random head inputs in `t` (hidden stride H + 3, weight stride H + 2), every 5th row
/// ignored, every 7th masked.
linear_case make_case(dtype t, std::int64_t N, std::int64_t H, std::int64_t V, unsigned seed, bool bias,
                      bool mask = true) {
  linear_case c;
  c.type = t;
  c.rows = N;
  c.hidden_cols = H;
  c.vocab = V;
  c.hidden_stride = H + 3;
  c.weight_stride = H + 2;
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const double amp = 2.0 / std::sqrt(static_cast<double>(H));
  c.hidden.assign(static_cast<std::size_t>(N * c.hidden_stride) * es, 0);
  c.weight.assign(static_cast<std::size_t>(V * c.weight_stride) * es, 0);
  for (std::int64_t r = 0; r < N; ++r)
    for (std::int64_t k = 0; k < H; ++k)
      dpo_cuda_test::put(t, c.hidden.data() + (r * c.hidden_stride + k) * es, 2.0 * u(rng));
  for (std::int64_t j = 0; j < V; ++j)
    for (std::int64_t k = 0; k < H; ++k)
      dpo_cuda_test::put(t, c.weight.data() + (j * c.weight_stride + k) * es, amp * u(rng));
  if (bias) {
    c.bias.assign(static_cast<std::size_t>(V) * es, 0);
    for (std::int64_t j = 0; j < V; ++j) dpo_cuda_test::put(t, c.bias.data() + j * es, 0.5 * u(rng));
  }
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  c.labels.resize(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r) c.labels[r] = r % 5 == 3 ? -100 : lab(rng);
  if (mask) {
    c.mask.assign(static_cast<std::size_t>(N), 1);
    for (std::int64_t r = 0; r < N; ++r) c.mask[r] = r % 7 == 5 ? 0 : 1;
  }
  c.grad_logps.resize(static_cast<std::size_t>(N));
  c.grad_entropy.resize(static_cast<std::size_t>(N));
  for (auto& x : c.grad_logps) x = u(rng);
  for (auto& x : c.grad_entropy) x = u(rng);
  return c;
}

/// The CPU head's results on the same inputs, as doubles.
struct cpu_out {
  std::vector<double> logps, entropy, row_lse, dhidden, dweight, dbias;
  std::vector<double> log_sum_sq_probs, mean_logits;
  std::vector<std::uint8_t> is_top1;
};

template <class E, class G>
cpu_out cpu_run(const linear_case& c) {
  const std::int64_t N = c.rows, H = c.hidden_cols, V = c.vocab;
  const std::int64_t hs = c.hidden_stride > 0 ? c.hidden_stride : H;
  const std::int64_t ws = c.weight_stride > 0 ? c.weight_stride : H;
  const std::int64_t ghs = c.grad_hidden_stride > 0 ? c.grad_hidden_stride : H;
  const auto typed = [](const std::vector<unsigned char>& b) {
    std::vector<E> v(b.size() / sizeof(E));
    if (!b.empty()) std::memcpy(static_cast<void*>(v.data()), b.data(), b.size());
    return v;
  };
  const std::vector<E> hidden = typed(c.hidden), weight = typed(c.weight), bias = typed(c.bias);
  const dpo::linear_head<E> head =
      dpo::make_linear_head(weight.data(), V, H, ws, bias.empty() ? nullptr : bias.data(), c.transforms);
  const dpo::cpu::linear_view<E, std::int64_t> v = dpo::linear_view_of(
      hidden.data(), N, hs, head, c.labels.data(), c.mask.empty() ? nullptr : c.mask.data(), c.ignore_index);
  cpu_out o;
  o.logps.assign(static_cast<std::size_t>(N), 0);
  o.row_lse.assign(static_cast<std::size_t>(N), 0);
  if (c.entropy) o.entropy.assign(static_cast<std::size_t>(N), 0);
  dpo::cpu::linear_options opt;
  opt.num_threads = 2;
  if (c.outputs) {
    o.log_sum_sq_probs.assign(static_cast<std::size_t>(N), 0);
    o.mean_logits.assign(static_cast<std::size_t>(N), 0);
    o.is_top1.assign(static_cast<std::size_t>(N), 0);
    dpo::cpu::linear_outputs x;
    x.entropy = c.entropy ? o.entropy.data() : nullptr;
    x.log_sum_sq_probs = o.log_sum_sq_probs.data();
    x.mean_logits = o.mean_logits.data();
    x.is_top1 = o.is_top1.data();
    dpo::cpu::linear_logps(v, o.logps.data(), x, o.row_lse.data(), opt);
  } else {
    dpo::cpu::linear_logps(v, o.logps.data(), c.entropy ? o.entropy.data() : nullptr, o.row_lse.data(), opt);
  }
  if (!c.backward) return o;
  // The gradient buffers start as the CUDA case's (0x7f bytes when not given).
  const auto start = [](const std::vector<unsigned char>& b, std::size_t n, std::size_t es) {
    std::vector<unsigned char> bytes = b.empty() ? std::vector<unsigned char>(n * es, 0x7f) : b;
    return bytes;
  };
  std::vector<unsigned char> dh = start(c.dhidden0, static_cast<std::size_t>(N * ghs), sizeof(E));
  std::vector<unsigned char> dw = start(c.dweight0, static_cast<std::size_t>(V * ws), sizeof(G));
  std::vector<unsigned char> db = start(c.dbias0, static_cast<std::size_t>(V), sizeof(G));
  dpo::cpu::linear_grads<E, G> g;
  g.hidden = c.want_hidden ? reinterpret_cast<E*>(dh.data()) : nullptr;
  g.hidden_stride = ghs;
  g.accumulate_hidden = c.accumulate_hidden;
  g.weight = c.want_weight ? reinterpret_cast<G*>(dw.data()) : nullptr;
  g.weight_stride = ws;
  g.bias = c.want_bias && !bias.empty() ? reinterpret_cast<G*>(db.data()) : nullptr;
  dpo::cpu::linear_logps_backward(v, o.row_lse.data(), c.grad_logps.data(), c.entropy ? o.entropy.data() : nullptr,
                                  c.entropy ? c.grad_entropy.data() : nullptr, g, opt);
  const auto doubles = [](const std::vector<unsigned char>& b) {
    std::vector<double> out(b.size() / sizeof(G));
    for (std::size_t i = 0; i < out.size(); ++i) {
      G x;
      std::memcpy(static_cast<void*>(&x), b.data() + i * sizeof(G), sizeof(G));
      out[i] = static_cast<double>(x);
    }
    return out;
  };
  if (c.want_hidden) {
    o.dhidden.resize(dh.size() / sizeof(E));
    for (std::size_t i = 0; i < o.dhidden.size(); ++i) {
      E x;
      std::memcpy(static_cast<void*>(&x), dh.data() + i * sizeof(E), sizeof(E));
      o.dhidden[i] = static_cast<double>(x);
    }
  }
  if (c.want_weight) o.dweight = doubles(dw);
  if (c.want_bias && !bias.empty()) o.dbias = doubles(db);
  return o;
}

cpu_out cpu_reference(const linear_case& c) {
  return dpo_cuda_test::with_host_types(c.type, c.fp32_grads, [&](auto e, auto g) {
    return cpu_run<decltype(e), decltype(g)>(c);
  });
}

/// Bytes of `t` (or float) as doubles.
std::vector<double> decode(const std::vector<unsigned char>& b, dtype t) {
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::vector<double> out(b.size() / es);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = dpo_cuda_test::get(t, b.data() + i * es);
  return out;
}

/// Log-probs, entropy, lse: the logits are fp32 (fp64) on both sides; only the GEMMs' summation
/// order and the exponential differ.
double value_tol(dtype t) { return t == dtype::f64 ? 1e-10 : 2e-4; }

/// Gradients, relative to the largest magnitude of the buffer: the CUDA GEMMs take dZ rounded
/// to bf16 / half (tensor-core inputs) where the CPU keeps it in fp32, and both round the
/// result to the buffer's type.
double grad_tol(dtype t, bool fp32_grads) {
  switch (t) {
    case dtype::bf16: return fp32_grads ? 1.5e-2 : 2.5e-2;
    case dtype::f16: return 4e-3;
    case dtype::f32: return 2e-5;
    case dtype::f64: return 1e-11;
  }
  return 0;
}

void check_grads(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what) {
  REQUIRE(got.size() == want.size());
  double scale = 0;
  for (double x : want)
    if (std::isfinite(x)) scale = std::max(scale, std::abs(x));
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "]: cuda " << got[i] << " cpu " << want[i] << " (scale " << scale << ")");
    if (std::isnan(want[i])) {
      CHECK(std::isnan(got[i]));
    } else {
      CHECK(std::abs(got[i] - want[i]) <= tol * (scale + 1e-30) + 1e-300);
    }
  }
}

/// Runs `c` on CUDA and on the CPU and compares everything.
linear_out compare(const linear_case& c) {
  INFO(name_of(c.type) << " N=" << c.rows << " H=" << c.hidden_cols << " V=" << c.vocab << " chunk "
                       << c.chunk_rows << "x" << c.chunk_vocab << " bias=" << !c.bias.empty()
                       << " entropy=" << c.entropy << " outputs=" << c.outputs << " scale=" << c.transforms.scale
                       << " cap=" << c.transforms.softcap << " t=" << c.transforms.temperature);
  const linear_out o = dpo_cuda_test::run_linear(c);
  INFO(o.message << " " << o.device_message);
  REQUIRE(o.code == 0);
  REQUIRE(o.device_error == 0);
  const cpu_out want = cpu_reference(c);
  const double vt = value_tol(c.type);
  check_values(o.logps, want.logps, vt, "logps");
  check_values(o.row_lse, want.row_lse, vt, "row_lse");
  if (c.entropy) check_values(o.entropy, want.entropy, vt, "entropy");
  if (c.outputs) {
    check_values(o.log_sum_sq_probs, want.log_sum_sq_probs, vt, "log_sum_sq_probs");
    check_values(o.mean_logits, want.mean_logits, vt, "mean_logits");
    CHECK(o.is_top1 == want.is_top1);  // the argmax agrees exactly on random data
  }
  if (c.backward) {
    const double gt = grad_tol(c.type, c.fp32_grads);
    const dtype gtype = c.fp32_grads ? dtype::f32 : c.type;
    if (c.want_hidden) check_grads(decode(o.dhidden, c.type), want.dhidden, gt, "dhidden");
    if (c.want_weight) check_grads(decode(o.dweight, gtype), want.dweight, gt, "dweight");
    if (c.want_bias && !c.bias.empty()) check_grads(decode(o.dbias, gtype), want.dbias, gt, "dbias");
  }
  return o;
}

const dtype all_types[] = {dtype::f32, dtype::f64, dtype::bf16, dtype::f16};

dpo::logit_transforms gemma_like() {
  dpo::logit_transforms t;
  t.scale = 1.3;
  t.softcap = 2.5;
  t.temperature = 0.7;
  return t;
}

}  // namespace

TEST_CASE("cuda linear: log-probs, the optional outputs and gradients match the CPU head", "[cuda][linear][sanitize]") {
  unsigned seed = 11;
  for (dtype t : all_types) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool bias = variant & 1, transforms = variant & 2;
      linear_case c = make_case(t, 13, 24, 67, seed++, bias);
      if (transforms) c.transforms = gemma_like();
      c.entropy = variant != 0;
      c.outputs = variant >= 2;
      c.labels64 = variant != 1;
      c.chunk_rows = 5;
      c.chunk_vocab = 16;
      c.backward = true;
      compare(c);
    }
  }
}

TEST_CASE("cuda linear: chunk sweeps agree with the CPU head", "[cuda][linear]") {
  const std::int64_t shapes[][2] = {{1, 1}, {1, 67}, {4, 7}, {13, 33}, {0, 0}, {100, 1000}};
  unsigned seed = 40;
  for (dtype t : {dtype::f32, dtype::bf16}) {
    for (const auto& s : shapes) {
      linear_case c = make_case(t, 11, 20, 67, seed++, true);
      c.entropy = true;
      c.chunk_rows = s[0];
      c.chunk_vocab = s[1];
      c.backward = true;
      const linear_out o = compare(c);
      if (s[0] > 0) CHECK(o.chunk_rows == std::min<std::int64_t>(s[0], 11));
      if (s[1] > 0) CHECK(o.chunk_vocab == std::min<std::int64_t>(s[1], 67));
    }
  }
}

TEST_CASE("cuda linear: the budget picks the chunk; a small budget gives smaller chunks, same results",
          "[cuda][linear]") {
  linear_case c = make_case(dtype::f32, 12, 16, 300, 77, false);
  c.backward = true;
  c.gemm_workspace = 0;
  const linear_out big = compare(c);
  CHECK(big.chunk_rows == 12);
  CHECK(big.chunk_vocab == 300);
  c.workspace_budget = 12000;
  const linear_out small = compare(c);
  CHECK(small.workspace_bytes <= 12000);
  CHECK(small.chunk_rows * small.chunk_vocab < 12 * 300);
}

TEST_CASE("cuda linear: V = 1, prime V, H = 1", "[cuda][linear]") {
  unsigned seed = 90;
  for (dtype t : all_types) {
    for (const auto& s : {std::vector<std::int64_t>{6, 8, 1}, {9, 5, 101}, {10, 1, 37}}) {
      linear_case c = make_case(t, s[0], s[1], s[2], seed++, true);
      c.entropy = true;
      c.transforms.temperature = 0.8;
      c.chunk_vocab = 32;
      c.backward = true;
      compare(c);
    }
  }
}

TEST_CASE("cuda linear: whole-vocab chunks: dZ over the logits in place, dHidden in their free half",
          "[cuda][linear]") {
  // One vocab chunk (V <= 4096): 16-bit heads write dZ over the fp32 logits row by row, tile
  // by tile (V = 2100: two tiles of 2048 columns), and keep dHidden in each row's free half
  // when H fits there (H = 24), else in a buffer of its own (H = 64 > V = 37). With a bias,
  // dBias sums the fp32 dZ first.
  unsigned seed = 700;
  for (dtype t : all_types) {
    for (const auto& s : {std::vector<std::int64_t>{13, 24, 2100}, {9, 64, 37}, {6, 8, 1}}) {
      for (const bool bias : {false, true}) {
        linear_case c = make_case(t, s[0], s[1], s[2], seed++, bias);
        c.entropy = bias;
        c.fp32_grads = bias && (t == dtype::bf16 || t == dtype::f16);
        c.backward = true;
        CHECK(compare(c).chunk_vocab == s[2]);
      }
    }
  }
}

TEST_CASE("cuda linear: accumulation modes (dHidden added, fp32 dWeight / dBias, frozen parts)",
          "[cuda][linear]") {
  unsigned seed = 120;
  for (dtype t : all_types) {
    for (int fp32 = 0; fp32 < 2; ++fp32) {
      if (fp32 && (t == dtype::f32 || t == dtype::f64)) continue;
      linear_case c = make_case(t, 10, 12, 45, seed++, true);
      c.entropy = true;
      c.backward = true;
      c.fp32_grads = fp32 != 0;
      c.accumulate_hidden = true;
      c.grad_hidden_stride = 15;
      c.chunk_rows = 4;
      c.chunk_vocab = 16;
      const dtype gt = c.fp32_grads ? dtype::f32 : t;
      const std::size_t es = dpo_cuda_test::dtype_size(t), gs = dpo_cuda_test::dtype_size(gt);
      std::mt19937 rng(seed);
      std::uniform_real_distribution<double> u(-1.0, 1.0);
      c.dhidden0.resize(static_cast<std::size_t>(10 * 15) * es);
      for (std::size_t i = 0; i < c.dhidden0.size() / es; ++i) dpo_cuda_test::put(t, c.dhidden0.data() + i * es, u(rng));
      c.dweight0.resize(static_cast<std::size_t>(45 * 14) * gs);
      for (std::size_t i = 0; i < c.dweight0.size() / gs; ++i) dpo_cuda_test::put(gt, c.dweight0.data() + i * gs, u(rng));
      c.dbias0.resize(45 * gs);
      for (std::size_t i = 0; i < 45; ++i) dpo_cuda_test::put(gt, c.dbias0.data() + i * gs, u(rng));
      compare(c);
      // A frozen head: only dHidden.
      c.want_weight = c.want_bias = false;
      compare(c);
      // Only the head's gradients.
      c.want_weight = c.want_bias = true;
      c.want_hidden = false;
      compare(c);
    }
  }
}

TEST_CASE("cuda linear: -inf bias entries (masked tokens) add no probability mass", "[cuda][linear]") {
  unsigned seed = 150;
  for (dtype t : {dtype::f32, dtype::bf16, dtype::f64}) {
    for (bool cap : {false, true}) {
      linear_case c = make_case(t, 10, 8, 40, seed++, true);
      const std::size_t es = dpo_cuda_test::dtype_size(t);
      // Columns 30..39 are masked out (no label points there); a whole vocab chunk of them
      // with chunk_vocab 10.
      for (auto& y : c.labels)
        if (y >= 30) y -= 30;
      for (std::int64_t j = 30; j < 40; ++j)
        dpo_cuda_test::put(t, c.bias.data() + j * es, -std::numeric_limits<double>::infinity());
      dpo_cuda_test::put(t, c.bias.data() + 5 * es, -std::numeric_limits<double>::infinity());
      for (auto& y : c.labels)
        if (y == 5) y = 6;
      if (cap) c.transforms.softcap = 4.0;
      c.entropy = true;
      c.outputs = true;
      c.chunk_vocab = 10;
      c.backward = true;
      const linear_out o = compare(c);
      for (double x : o.logps) CHECK(std::isfinite(x));
      for (double x : o.entropy) CHECK(std::isfinite(x));
    }
  }
}

TEST_CASE("cuda linear: a -inf label logit is never top-1, not even in a row of only -inf logits",
          "[cuda][linear]") {
  // fp32 logits without a soft cap or temperature keep the bias's -inf. Columns [0, 12) get a
  // -inf bias: labels there have a -inf logit below a finite maximum. Then every column: each
  // row's first maximum is column 0, yet no label is top-1 (dpo::detail::label_is_top1).
  for (const bool whole_row : {false, true}) {
    INFO("whole row -inf: " << whole_row);
    linear_case c = make_case(dtype::f32, 10, 8, 40, 170, true);
    for (std::int64_t j = 0; j < (whole_row ? 40 : 12); ++j)
      dpo_cuda_test::put(dtype::f32, c.bias.data() + j * 4, -std::numeric_limits<double>::infinity());
    for (std::int64_t r = 0; r < 10; ++r)
      if (c.labels[r] >= 0) c.labels[r] = r % 2 == 0 ? 0 : r;
    c.entropy = true;
    c.outputs = true;
    c.chunk_vocab = 16;
    const linear_out o = compare(c);
    for (std::int64_t r = 0; r < 10; ++r) {
      INFO("row " << r);
      CHECK(o.is_top1[r] == 0);
      if (c.labels[r] < 0 || c.mask[r] == 0) continue;
      if (whole_row) {
        CHECK(std::isnan(o.logps[r]));  // -inf - (-inf): docs/math.md
      } else {
        CHECK(o.logps[r] == -INFINITY);
      }
    }
  }
}

TEST_CASE("cuda linear: results are bitwise identical run to run", "[cuda][linear]") {
  linear_case c = make_case(dtype::bf16, 13, 24, 67, 5, true);
  c.entropy = true;
  c.transforms = gemma_like();
  c.chunk_rows = 5;
  c.chunk_vocab = 16;
  c.backward = true;
  const linear_out a = dpo_cuda_test::run_linear(c), b = dpo_cuda_test::run_linear(c);
  REQUIRE(a.code == 0);
  CHECK(a.logps == b.logps);
  CHECK(a.entropy == b.entropy);
  CHECK(a.row_lse == b.row_lse);
  CHECK(a.dhidden == b.dhidden);
  CHECK(a.dweight == b.dweight);
  CHECK(a.dbias == b.dbias);
}

TEST_CASE("cuda linear: rows that do not count get zeros; a NaN hidden row stays in its row",
          "[cuda][linear][sanitize]") {
  for (dtype t : {dtype::f32, dtype::bf16}) {
    linear_case c = make_case(t, 14, 10, 40, 9, true);
    c.entropy = true;
    c.backward = true;
    c.chunk_rows = 4;
    c.chunk_vocab = 16;
    const std::size_t es = dpo_cuda_test::dtype_size(t);
    // Row 3 is ignored (label -100) and row 5 masked: NaN hidden states there must not reach
    // any output. Row 9 counts: its NaN stays in its own log-prob (and, through dZ, dWeight).
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (std::int64_t r : {3, 5})
      for (std::int64_t k = 0; k < 10; ++k) dpo_cuda_test::put(t, c.hidden.data() + (r * c.hidden_stride + k) * es, nan);
    linear_out o = compare(c);
    for (std::int64_t r : {3, 5}) {
      CHECK(o.logps[r] == 0.0);
      CHECK(o.entropy[r] == 0.0);
      for (std::int64_t k = 0; k < 10; ++k) CHECK(dpo_cuda_test::get(t, o.dhidden.data() + (r * 10 + k) * es) == 0.0);
    }
    for (double x : decode(o.dweight, t)) CHECK(std::isfinite(x));
    c.grad_logps[2] = 0.0;  // a counted row with zero upstream gradients: skipped, zeros
    c.grad_entropy[2] = 0.0;
    dpo_cuda_test::put(t, c.hidden.data() + (9 * c.hidden_stride) * es, nan);
    o = compare(c);
    CHECK(std::isnan(o.logps[9]));
    for (std::int64_t r = 0; r < 14; ++r)
      if (r != 9) CHECK(!std::isnan(o.logps[r]));
    for (std::int64_t k = 0; k < 10; ++k) CHECK(dpo_cuda_test::get(t, o.dhidden.data() + (2 * 10 + k) * es) == 0.0);
  }
}

TEST_CASE("cuda linear: bad arguments give a status naming them, nothing written", "[cuda][linear][sanitize]") {
  // (Errors of the backward's own arguments leave the forward's outputs written.)
  struct breaker {
    const char* needle;
    void (*apply)(linear_case&);
    bool backward_only = false;
  };
  const breaker cases[] = {
      {"weight_cols = 9 != hidden_cols = 10", [](linear_case& c) { c.weight_cols = 9; }},
      {"bias_size = 3 != vocab = 40", [](linear_case& c) { c.bias_size = 3; }},
      {"transforms.temperature = 0", [](linear_case& c) { c.transforms.temperature = 0; }},
      {"transforms.softcap = -1", [](linear_case& c) { c.transforms.softcap = -1; }},
      {"transforms.scale = nan", [](linear_case& c) { c.transforms.scale = std::nan(""); }},
      {"options.workspace_bytes = 1000 is too small for one row", [](linear_case& c) { c.workspace_budget = 1000; }},
      {"workspace_bytes = ", [](linear_case& c) { c.short_workspace = true; }},
      {"handle is null", [](linear_case& c) { c.null_handle = true; }},
      {"logps overlaps labels", [](linear_case& c) { c.logps_on_labels = true; }},
      {"grads.weight overlaps weight", [](linear_case& c) { c.dweight_on_weight = true; }, true},
  };
  for (const breaker& b : cases) {
    linear_case c = make_case(dtype::f32, 8, 10, 40, 3, true);
    c.backward = true;
    c.entropy = true;
    c.dweight0.resize(static_cast<std::size_t>(40 * 12) * 4);
    for (std::size_t i = 0; i < c.dweight0.size(); ++i) c.dweight0[i] = static_cast<unsigned char>(i * 7);
    b.apply(c);
    const linear_out o = dpo_cuda_test::run_linear(c);
    INFO(b.needle << " -> " << o.message);
    CHECK(o.code != 0);
    CHECK(o.message.find(b.needle) != std::string::npos);
    if (!b.backward_only)
      for (double x : o.logps) CHECK(x == 12345.0);
    if (!c.dweight_on_weight) CHECK(o.dweight == c.dweight0);
    for (unsigned char x : o.dhidden) CHECK(x == 0x7f);
  }
}

TEST_CASE("cuda linear: a label outside [0, vocab) is a device error; nothing written", "[cuda][linear][sanitize]") {
  for (bool labels64 : {true, false}) {
    linear_case c = make_case(dtype::bf16, 9, 10, 40, 4, true);
    c.labels64 = labels64;
    c.labels[6] = 40;
    c.labels[7] = -3;
    c.backward = true;
    c.entropy = true;
    c.dweight0.resize(static_cast<std::size_t>(40 * 12) * 2);
    for (std::size_t i = 0; i < 40 * 12; ++i)
      dpo_cuda_test::put(dtype::bf16, c.dweight0.data() + 2 * i, 0.25 + 0.01 * static_cast<double>(i % 50));
    const linear_out o = dpo_cuda_test::run_linear(c);
    INFO(o.message << " / " << o.device_message);
    CHECK(o.code == 0);
    CHECK(o.device_error == 1);
    CHECK(o.device_message.find("labels[6] = 40 is outside [0, vocab = 40)") != std::string::npos);
    for (double x : o.logps) CHECK(x == 12345.0);
    for (double x : o.row_lse) CHECK(x == 12345.0);
    CHECK(o.dweight == c.dweight0);  // the dWeight GEMMs added exact zeros
    for (unsigned char x : o.dhidden) CHECK(x == 0x7f);
    for (unsigned char x : o.dbias) CHECK(x == 0x7f);
  }
}

TEST_CASE("cuda linear: the GEMMs run through cuBLASLt", "[cuda][linear]") {
  const long long before = dpo_cuda_test::emulated_gemms();
  linear_case c = make_case(dtype::f32, 6, 8, 20, 2, false);
  c.chunk_vocab = 8;
  c.backward = true;
  compare(c);
  const long long after = dpo_cuda_test::emulated_gemms();
  // Forward: 3 vocab chunks; backward: 3 x (recompute, dHidden, dWeight).
  if (before >= 0) CHECK(after - before == 3 + 9);
}

TEST_CASE("cuda linear: captured in a CUDA graph, replays bitwise equal to direct calls", "[cuda][linear]") {
  CHECK(dpo_cuda_test::linear_graph_check() == "");
}

TEST_CASE("cuda linear: the backward matches central finite differences of the forward (fp64)",
          "[cuda][linear]") {
  // Objective: sum_r gl_r logp_r + ge_r entropy_r, over hidden, weight and bias entries, with
  // a soft cap, a scale and a temperature; chunks of 2 x 3 so every row and column crosses
  // chunk edges.
  linear_case c = make_case(dtype::f64, 5, 3, 7, 21, true);
  c.entropy = true;
  c.transforms = gemma_like();
  c.chunk_rows = 2;
  c.chunk_vocab = 3;
  c.gemm_workspace = 0;
  const auto objective = [](const linear_case& k) {
    linear_case f = k;
    f.backward = false;
    const linear_out o = dpo_cuda_test::run_linear(f);
    REQUIRE(o.code == 0);
    double s = 0;
    for (std::int64_t r = 0; r < f.rows; ++r) s += f.grad_logps[r] * o.logps[r] + f.grad_entropy[r] * o.entropy[r];
    return s;
  };
  linear_case b = c;
  b.backward = true;
  b.dweight0.assign(static_cast<std::size_t>(7 * 5) * 8, 0);
  b.dbias0.assign(7 * 8, 0);
  const linear_out g = dpo_cuda_test::run_linear(b);
  REQUIRE(g.code == 0);
  const std::vector<double> dh = decode(g.dhidden, dtype::f64), dw = decode(g.dweight, dtype::f64),
                            db = decode(g.dbias, dtype::f64);
  const double eps = 1e-6;
  const auto fd = [&](std::vector<unsigned char> linear_case::*buf, std::size_t idx) {
    linear_case p = c, m = c;
    const double x = dpo_cuda_test::get(dtype::f64, (c.*buf).data() + idx * 8);
    dpo_cuda_test::put(dtype::f64, (p.*buf).data() + idx * 8, x + eps);
    dpo_cuda_test::put(dtype::f64, (m.*buf).data() + idx * 8, x - eps);
    return (objective(p) - objective(m)) / (2 * eps);
  };
  for (std::int64_t r = 0; r < 5; ++r)
    for (std::int64_t k = 0; k < 3; ++k) {
      INFO("dhidden[" << r << "][" << k << "]");
      CHECK(std::abs(fd(&linear_case::hidden, static_cast<std::size_t>(r * c.hidden_stride + k)) - dh[r * 3 + k]) <=
            1e-6);
    }
  for (std::int64_t j = 0; j < 7; ++j) {
    for (std::int64_t k = 0; k < 3; ++k) {
      INFO("dweight[" << j << "][" << k << "]");
      const std::size_t i = static_cast<std::size_t>(j * c.weight_stride + k);
      CHECK(std::abs(fd(&linear_case::weight, i) - dw[i]) <= 1e-6);
    }
    INFO("dbias[" << j << "]");
    CHECK(std::abs(fd(&linear_case::bias, static_cast<std::size_t>(j)) - db[j]) <= 1e-6);
  }
}

TEST_CASE("cuda linear: the double backward is exact for rows past the lse recompute limit", "[cuda][linear]") {
  // As the CPU head's test (tests/support/lse_limit.hpp): the backward recomputes the max and
  // sum of rows past |lse| >= 2^10. Vocab chunks of 4, so the recomputed statistics cross chunks.
  const test_support::lse_limit_case k;
  const auto bytes = [](const std::vector<double>& x) {
    std::vector<unsigned char> b(x.size() * sizeof(double));
    std::memcpy(b.data(), x.data(), b.size());
    return b;
  };
  linear_case c;
  c.type = dtype::f64;
  c.rows = 2;
  c.hidden_cols = c.hidden_stride = c.weight_stride = 1;
  c.vocab = k.V;
  c.chunk_vocab = 4;
  c.hidden = bytes(k.hidden);
  c.weight = bytes(k.weight);
  c.bias = bytes(k.bias);
  c.labels = k.labels;
  c.backward = true;
  c.grad_logps = k.grad_logps;
  c.want_hidden = c.want_weight = false;
  c.dbias0 = bytes(std::vector<double>(k.V, 0.0));
  const linear_out o = dpo_cuda_test::run_linear(c);
  REQUIRE(o.code == 0);
  REQUIRE(std::fabs(o.row_lse[0]) >= 1024.0);
  std::vector<double> db(k.V);
  std::memcpy(db.data(), o.dbias.data(), db.size() * sizeof(double));
  k.check_dbias(db);
}
