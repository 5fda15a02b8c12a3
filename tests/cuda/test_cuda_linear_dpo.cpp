// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// DPO from hidden states on CUDA (dpo/cuda/linear_dpo.cuh) against the CPU's
// (dpo::cpu::linear_dpo, itself checked against a float64 reference and finite differences in
// tests/test_cpu_linear_dpo.cpp) on the same random inputs: every loss type (aot and
// aot_unpaired couple the batch), combinations, both reference modes, padded / packed /
// separate pairs, fp32 and bf16, metrics, per-pair outputs, dHidden / dWeight / dBias, the
// forward + backward split, accumulation; the refused options, argument and device-data errors
// (nothing written). Runs on a GPU, or on the emulator with its reference GEMM standing in for
// cuBLASLt (tests/cuda/emu).
#define EIGEN_DONT_PARALLELIZE
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <dpo/cpu/linear_dpo.hpp>

#include "catch.hpp"
#include "checks.hpp"
#include "dtype_bytes.hpp"
#include "linear_dpo_harness.hpp"

namespace {

using dpo_cuda_test::dtype;
using dpo_cuda_test::ldpo_case;
using dpo_cuda_test::ldpo_layout;
using dpo_cuda_test::ldpo_out;

const char* name_of(ldpo_layout l) {
  return l == ldpo_layout::padded ? "padded" : l == ldpo_layout::packed ? "packed" : "separate";
}

std::vector<unsigned char> random_matrix(dtype t, std::int64_t n, double amp, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::vector<unsigned char> b(static_cast<std::size_t>(n) * es);
  for (std::int64_t i = 0; i < n; ++i) dpo_cuda_test::put(t, b.data() + i * es, amp * u(rng));
  return b;
}

/// P pairs of T rows (packed: lengths 1..T, one empty-completion-free layout), H, V; every 4th
/// row of a sequence ignored (its prompt), bias, reference log-probs and hidden states.
ldpo_case make_case(dtype t, ldpo_layout l, unsigned seed, std::int64_t P = 3, std::int64_t T = 5,
                    std::int64_t H = 8, std::int64_t V = 37) {
  ldpo_case c;
  c.type = t;
  c.fp32_grads = t == dtype::bf16 || t == dtype::f16;
  c.layout = l;
  c.P = P;
  c.T = T;
  c.H = H;
  c.V = V;
  std::mt19937 rng(seed);
  if (l == ldpo_layout::packed) {
    c.cu_seqlens.push_back(0);
    for (std::int64_t s = 0; s < 2 * P; ++s) c.cu_seqlens.push_back(c.cu_seqlens.back() + 2 + (s * 7 + seed) % (T - 1));
    c.rows = c.cu_seqlens.back() + 2;  // two rows past the last sequence: never touched
  } else {
    c.rows = 2 * P * T;
  }
  const std::int64_t R = c.rows;
  c.hidden = random_matrix(t, R * H, 2.0, rng);
  c.weight = random_matrix(t, V * H, 2.0 / std::sqrt(static_cast<double>(H)), rng);
  c.bias = random_matrix(t, V, 0.5, rng);
  std::uniform_int_distribution<std::int64_t> lab(0, V - 1);
  c.labels.resize(static_cast<std::size_t>(R));
  for (std::int64_t r = 0; r < R; ++r) c.labels[r] = r % 4 == 0 ? -100 : lab(rng);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (std::int64_t i = 0; i < 2 * P; ++i) c.ref_logps.push_back(-6.0 + 3.0 * u(rng));
  c.ref_hidden = random_matrix(t, R * H, 2.0, rng);
  c.ref_weight = random_matrix(t, V * H, 2.0 / std::sqrt(static_cast<double>(H)), rng);
  c.ref_bias = random_matrix(t, V, 0.5, rng);
  return c;
}

/// The CPU's results on the same inputs (ok = false when it refused them).
struct cpu_res {
  bool ok = true;
  std::string error;
  double loss = 0;
  dpo::metrics m;
  std::vector<double> pairs, row_lse, row_coef, dhidden, dweight, dbias;
};

template <class E>
std::vector<E> typed(const std::vector<unsigned char>& b) {
  std::vector<E> v(b.size() / sizeof(E));
  if (!b.empty()) std::memcpy(static_cast<void*>(v.data()), b.data(), b.size());
  return v;
}

template <class E, class G>
cpu_res cpu_run(const ldpo_case& c) {
  const std::int64_t P = c.P, H = c.H, V = c.V, R = c.rows;
  const std::vector<E> hidden = typed<E>(c.hidden), weight = typed<E>(c.weight), bias = typed<E>(c.bias);
  const std::vector<E> rh = typed<E>(c.ref_hidden), rw = typed<E>(c.ref_weight), rb = typed<E>(c.ref_bias);
  const bool sep = c.layout == ldpo_layout::separate;
  const std::int64_t half = P * c.T;
  const auto pairs = [&](const E* h) {
    const std::uint8_t* m = c.mask.empty() ? nullptr : c.mask.data();
    switch (c.layout) {
      case ldpo_layout::padded: return dpo::cpu::linear_padded_pairs(h, H, H, c.labels.data(), 2 * P, c.T, m);
      case ldpo_layout::packed:
        return dpo::cpu::linear_packed_pairs(h, H, H, c.labels.data(), c.cu_seqlens.data(), 2 * P, m);
      default:
        return dpo::cpu::linear_separate_pairs(h, c.labels.data(),
                                               h == hidden.data() && c.share_rows ? h : h + half * H,
                                               c.labels.data() + half, P, c.T, H, H, m, m ? m + half : nullptr);
    }
  };
  const auto policy = pairs(hidden.data());
  const auto ref = pairs(rh.data());
  dpo::cpu::linear_head<E> head;
  head.weight = weight.data();
  head.vocab = V;
  head.hidden = H;
  head.weight_stride = H;
  head.bias = bias.empty() ? nullptr : bias.data();
  head.bias_size = bias.empty() ? 0 : V;
  head.transforms = c.transforms;
  dpo::cpu::linear_head<E> ref_head = head;
  ref_head.weight = rw.data();
  ref_head.bias = rb.empty() ? nullptr : rb.data();
  ref_head.bias_size = rb.empty() ? 0 : V;
  cpu_res o;
  o.pairs.assign(static_cast<std::size_t>(dpo::num_pair_outputs * P), 0.0);
  o.row_lse.assign(static_cast<std::size_t>(R), 0.0);
  o.row_coef.assign(static_cast<std::size_t>(R), 0.0);
  dpo::forward_outputs fo;
  fo.loss = &o.loss;
  fo.metrics = &o.m;
  fo.set_pair_outputs(o.pairs.data(), P);
  if (c.split) {
    fo.row_lse = o.row_lse.data();
    fo.row_coef = o.row_coef.data();
  }
  std::vector<E> dh(static_cast<std::size_t>(R * H), E(0.0f));
  std::vector<G> dw(static_cast<std::size_t>(V * H), G(0.0f)), db(static_cast<std::size_t>(V), G(0.0f));
  dpo::cpu::linear_dpo_grads<E, G> g;
  if (c.want_hidden) {
    g.chosen_hidden = dh.data();
    g.rejected_hidden = sep ? dh.data() + half * H : dh.data();
    g.chosen_hidden_stride = g.rejected_hidden_stride = H;
  }
  g.weight = dw.data();
  g.weight_stride = H;
  g.bias = bias.empty() || !c.want_bias ? nullptr : db.data();
  dpo::cpu::linear_dpo_options opt;
  opt.num_threads = 1;
  opt.metrics = c.metrics;
  opt.mode = c.mode;
  const double* rc = c.ref_logps.data();
  const double* rr = c.ref_logps.data() + P;
  try {
    if (c.split) {
      if (c.ref_from_hidden)
        dpo::cpu::linear_dpo_forward(policy, head, ref, ref_head, c.cfg, fo, opt);
      else
        dpo::cpu::linear_dpo_forward(policy, head, rc, rr, c.cfg, fo, opt);
      dpo::cpu::linear_dpo_backward(policy, head, o.row_lse.data(), o.row_coef.data(), g, c.grad_output, opt);
    } else if (c.ref_from_hidden) {
      dpo::cpu::linear_dpo(policy, head, ref, ref_head, c.cfg, fo, g, opt, c.grad_output);
    } else {
      dpo::cpu::linear_dpo(policy, head, rc, rr, c.cfg, fo, g, opt, c.grad_output);
    }
  } catch (const dpo::error& e) {
    o.ok = false;
    o.error = e.what();
    return o;
  }
  for (const E& x : dh) o.dhidden.push_back(static_cast<double>(x));
  for (const G& x : dw) o.dweight.push_back(static_cast<double>(x));
  if (g.bias != nullptr)
    for (const G& x : db) o.dbias.push_back(static_cast<double>(x));
  return o;
}

std::vector<double> doubles(dtype t, const std::vector<unsigned char>& b) {
  const std::size_t es = dpo_cuda_test::dtype_size(t);
  std::vector<double> v(b.size() / es);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = dpo_cuda_test::get(t, b.data() + i * es);
  return v;
}

/// max |a - b| <= tol * max(1, max |b|), NaN only where NaN.
void near(const std::vector<double>& a, const std::vector<double>& b, double tol, const std::string& what) {
  INFO(what);
  REQUIRE(a.size() == b.size());
  double scale = 1.0, worst = 0.0;
  std::size_t at = 0;
  for (double x : b)
    if (std::isfinite(x)) scale = std::max(scale, std::fabs(x));
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(b[i]) || std::isnan(a[i])) {
      INFO("index " << i << ": " << a[i] << " vs " << b[i]);
      CHECK(std::isnan(a[i]) == std::isnan(b[i]));
      continue;
    }
    const double d = a[i] == b[i] ? 0.0 : std::fabs(a[i] - b[i]);
    if (d > worst) {
      worst = d;
      at = i;
    }
  }
  INFO("worst at " << at << ": " << (a.empty() ? 0 : a[at]) << " vs " << (b.empty() ? 0 : b[at]));
  CHECK(worst <= tol * scale);
}

/// The CPU's results for the case's dtype (G: float for 16-bit heads with fp32 gradients).
cpu_res cpu_of(const ldpo_case& c) {
  return dpo_cuda_test::with_host_types(c.type, c.fp32_grads, [&](auto e, auto g) {
    return cpu_run<decltype(e), decltype(g)>(c);
  });
}

/// Runs a case on CUDA and the CPU and compares everything the CPU produced; `expect`: the
/// mode the CUDA plan must pick (automatic: not checked).
void compare(const ldpo_case& c, const std::string& what, dpo::linear_mode expect = dpo::linear_mode::automatic) {
  INFO(what);
  const cpu_res want = cpu_of(c);
  const ldpo_out got = dpo_cuda_test::run_linear_dpo(c);
  if (!want.ok) {
    INFO("the CPU refused: " << want.error);
    if (std::getenv("DPO_TEST_VERBOSE") != nullptr)
      std::printf("CPU refused %s: %s\n", what.c_str(), want.error.c_str());
    CHECK(got.code != 0);
    return;
  }
  INFO(got.message);
  REQUIRE(got.code == 0);
  INFO(got.device_message);
  REQUIRE(got.device_error == 0);
  if (expect != dpo::linear_mode::automatic && !c.split) CHECK(got.mode == expect);
  const bool bf = c.type == dtype::bf16 || c.type == dtype::f16;
  const double tol = bf ? 2e-3 : 2e-5;
  near({got.loss}, {want.loss}, tol, "loss");
  near(got.pairs, want.pairs, tol, "per-pair outputs");
  const double* wm = reinterpret_cast<const double*>(&want.m);
  for (int k = 0; k < dpo::num_metrics; ++k) {
    INFO("metric " << dpo::metric_names[k]);
    near({got.metrics[k]}, {wm[k]}, tol, dpo::metric_names[k]);
  }
  if (c.split) {
    // Rows past the last packed sequence belong to no sequence: never written (poison stays).
    const std::size_t n = c.layout == ldpo_layout::packed ? static_cast<std::size_t>(c.cu_seqlens.back())
                                                          : got.row_lse.size();
    const auto head = [n](const std::vector<double>& v) { return std::vector<double>(v.begin(), v.begin() + n); };
    near(head(got.row_lse), head(want.row_lse), tol, "row_lse");
    near(head(got.row_coef), head(want.row_coef), tol, "row_coef");
    for (std::size_t r = n; r < got.row_lse.size(); ++r) {
      CHECK(got.row_lse[r] == 12345.0);
      CHECK(got.row_coef[r] == 12345.0);
    }
  }
  // dHidden is rounded to the head's dtype: bf16 has 8 bits.
  if (c.want_hidden) near(doubles(c.type, got.dhidden), want.dhidden, bf ? 2e-2 : 1e-4, "dHidden");
  near(doubles(c.fp32_grads ? dtype::f32 : c.type, got.dweight), want.dweight, bf ? 2e-2 : 1e-4, "dWeight");
  if (!want.dbias.empty())
    near(doubles(c.fp32_grads ? dtype::f32 : c.type, got.dbias), want.dbias, bf ? 2e-2 : 1e-4, "dBias");
}

}  // namespace

TEST_CASE("CUDA linear DPO: every loss type, padded, packed and separate, three and four passes, against the CPU",
          "[linear_dpo]") {
  const ldpo_layout layouts[3] = {ldpo_layout::padded, ldpo_layout::packed, ldpo_layout::separate};
  for (int t = 0; t < dpo::num_loss_types; ++t) {
    for (const dpo::linear_mode mode : {dpo::linear_mode::automatic, dpo::linear_mode::four_pass}) {
      const ldpo_layout l = layouts[t % 3];
      ldpo_case c = make_case(dtype::f32, l, 100u + t);
      c.cfg = dpo::loss_config::of(static_cast<dpo::loss_type>(t));
      if (c.cfg.terms[0].type == dpo::loss_type::exo_pair) c.cfg.label_smoothing = 0.1;  // exo needs one
      c.ref_from_hidden = t % 2 == 1;
      c.labels32 = t % 4 == 2;
      c.mode = mode;
      // automatic: three passes exactly where the loss is separable (the budget holds every pair).
      const dpo::linear_mode expect = mode == dpo::linear_mode::four_pass || !dpo::detail::linear_pairs_separable(c.cfg)
                                          ? dpo::linear_mode::four_pass
                                          : dpo::linear_mode::three_pass;
      compare(c,
              std::string("loss type ") + std::to_string(t) + ", " + name_of(l) +
                  (c.ref_from_hidden ? ", reference hidden" : ", reference log-probs") +
                  (mode == dpo::linear_mode::four_pass ? ", four passes" : ", automatic"),
              expect);
    }
  }
}

TEST_CASE("CUDA linear DPO: the sanitizer's subset (three and four passes, both references)",
          "[linear_dpo][sanitize]") {
  ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 400);
  c.cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  c.ref_from_hidden = true;
  c.transforms.softcap = 3.0;
  compare(c, "three passes, padded, reference hidden", dpo::linear_mode::three_pass);
  c = make_case(dtype::bf16, ldpo_layout::packed, 401);
  c.cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  c.cfg.use_weighting = true;
  c.mode = dpo::linear_mode::four_pass;
  compare(c, "four passes, packed, WPO", dpo::linear_mode::four_pass);
  // bf16 dZ written over the fp32 logits in place, across tiles (V > 2 x 2048 columns), by
  // the gradient kernel (no dBias) or by the narrowing kernel after dBias; dHidden in the
  // logits' free half.
  for (const bool bias : {false, true}) {
    c = make_case(dtype::bf16, ldpo_layout::padded, 402, 2, 3, 8, 4133);
    c.cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
    c.want_bias = bias;
    compare(c, bias ? "three passes in place, bf16, dBias" : "three passes in place, bf16", dpo::linear_mode::three_pass);
  }
}

TEST_CASE("CUDA linear DPO, three passes: dZ over the fp32 logits in place, dHidden in their free half",
          "[linear_dpo]") {
  // {H, V}: V over two in-place tiles (256 threads x 8 columns each) with an odd tail, small
  // and odd V, V = 1, and H > V (no room in the logits row: dHidden in a buffer of its own).
  const std::int64_t shapes[][2] = {{8, 4133}, {8, 41}, {5, 67}, {8, 1}, {40, 23}};
  const dtype types[4] = {dtype::bf16, dtype::f16, dtype::f32, dtype::f64};
  const std::int64_t chunks[3] = {0, 10, 20};  // from the budget, one pair, two pairs
  int k = 0;
  for (const dtype t : types) {
    for (const auto& hv : shapes) {
      ldpo_case c = make_case(t, k % 2 ? ldpo_layout::separate : ldpo_layout::padded, 500u + k, 3, 5, hv[0], hv[1]);
      c.cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
      c.mode = dpo::linear_mode::three_pass;
      c.chunk_rows = chunks[k % 3];
      c.want_bias = k % 2 == 0;  // the fp32 dZ kept for dBias, then narrowed in place
      c.fp32_grads = c.fp32_grads && k % 4 != 1;
      c.transforms.softcap = k % 3 == 1 ? 3.0 : 0.0;
      compare(c,
              "dtype " + std::to_string(static_cast<int>(t)) + ", H " + std::to_string(hv[0]) + ", V " +
                  std::to_string(hv[1]) + ", chunk rows " + std::to_string(c.chunk_rows) +
                  (c.want_bias ? ", dBias" : ""),
              dpo::linear_mode::three_pass);
      ++k;
    }
  }
}

TEST_CASE("CUDA linear DPO: a pair that fits the budget only beside a smaller GEMM workspace runs three passes",
          "[linear_dpo]") {
  // The harness gives cuBLASLt 1 MiB; a 10-row bf16 pair needs 3.5 KiB beside it.
  ldpo_case c = make_case(dtype::bf16, ldpo_layout::padded, 520, 3, 5, 8, 41);
  c.cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  c.workspace_bytes = (1 << 20) + 2048;
  compare(c, "tight budget", dpo::linear_mode::three_pass);
}

TEST_CASE("CUDA linear DPO: N = 8192 (4 pairs x 2 x 1024), H = 4096, V = 128256 run three passes in under 1 GiB",
          "[linear_dpo]") {
  // The flagship shape (TRL's padded layout): a size query under the default options,
  // nothing allocated. One pair is 2048 rows over the whole vocab.
  for (const dtype t : {dtype::bf16, dtype::f16}) {
    for (const bool ref_hidden : {false, true}) {
      INFO("dtype " << static_cast<int>(t) << (ref_hidden ? ", reference hidden" : ", reference log-probs"));
      const dpo_cuda_test::ldpo_plan_out p = dpo_cuda_test::plan_linear_dpo(t, 4, 1024, 4096, 128256, ref_hidden);
      INFO(p.message);
      REQUIRE(p.code == 0);
      INFO("workspace " << p.workspace_bytes << " bytes, chunk rows " << p.chunk_rows << ", GEMM workspace "
                        << p.gemm_workspace_bytes);
      CHECK(p.mode == dpo::linear_mode::three_pass);
      CHECK(p.chunk_rows == 2048);
      CHECK(p.workspace_bytes < (std::int64_t{1} << 30));
      CHECK(p.gemm_workspace_bytes > 0);
    }
  }
}

TEST_CASE("CUDA linear DPO, three passes: layouts, dtypes, transforms, references, chunks, options",
          "[linear_dpo]") {
  using dpo::loss_type;
  const ldpo_layout layouts[3] = {ldpo_layout::padded, ldpo_layout::packed, ldpo_layout::separate};
  const dtype types[4] = {dtype::f32, dtype::bf16, dtype::f16, dtype::f64};
  const std::int64_t chunks[3] = {0, 10, 25};  // from the budget, one pair (2T rows), two pairs
  int k = 0;
  for (const ldpo_layout l : layouts) {
    for (const dtype t : types) {
      for (int ref = 0; ref < 2; ++ref, ++k) {
        ldpo_case c = make_case(t, l, 200u + k, 4, 5, 8, 41);
        c.cfg = dpo::loss_config::of(k % 3 == 0 ? loss_type::sigmoid : k % 3 == 1 ? loss_type::ipo : loss_type::robust);
        c.cfg.label_smoothing = k % 3 == 2 ? 0.1 : 0.0;
        c.ref_from_hidden = ref == 1;
        c.mode = dpo::linear_mode::three_pass;
        c.chunk_rows = chunks[k % 3];
        c.transforms.scale = k % 2 ? 0.8 : 1.0;
        c.transforms.softcap = k % 4 < 2 ? 3.0 : 0.0;
        c.transforms.temperature = k % 5 == 0 ? 0.7 : 1.0;
        c.fp32_grads = c.fp32_grads && k % 4 != 1;  // 16-bit dWeight too
        c.labels32 = k % 2 == 0;
        compare(c,
                std::string(name_of(l)) + ", dtype " + std::to_string(static_cast<int>(t)) +
                    (ref ? ", reference hidden" : ", reference log-probs") + ", chunk rows " +
                    std::to_string(c.chunk_rows),
                dpo::linear_mode::three_pass);
      }
    }
  }
  SECTION("an NLL term, LD-DPO, masks, metrics off, grad_output, accumulation, no bias gradient") {
    for (int j = 0; j < 3; ++j) {
      ldpo_case c = make_case(j == 1 ? dtype::bf16 : dtype::f32, layouts[j], 300u + j);
      c.cfg = j == 0 ? dpo::loss_config::combination({{loss_type::sigmoid, 1.0}, {loss_type::sft, 0.5}})
                     : dpo::loss_config::of(j == 1 ? loss_type::hinge : loss_type::sigmoid);
      if (j != 0) c.cfg.ld_alpha = 0.4;
      c.cfg.divergence = j == 2 ? dpo::f_divergence::js_divergence : c.cfg.divergence;
      c.mask.assign(static_cast<std::size_t>(c.rows), 1);
      for (std::int64_t r = 0; r < c.rows; ++r) c.mask[r] = r % 7 == 3 ? 0 : 1;
      c.grad_output = 0.75;
      c.want_bias = j != 1;
      c.accumulate_hidden = j == 2;
      c.ref_from_hidden = j == 1;
      compare(c, "options case " + std::to_string(j), dpo::linear_mode::three_pass);
    }
  }
  SECTION("NaN in one hidden row: the same NaNs as the CPU") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::packed, 311);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    dpo_cuda_test::put(c.type, c.hidden.data() + (1 * c.H + 2) * 4, std::nan(""));
    compare(c, "NaN row", dpo::linear_mode::three_pass);
  }
  SECTION("a budget that holds no pair, packed pairs without a host cu_seqlens: four passes") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 312);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    c.chunk_rows = 3;  // a pair has 10 rows
    compare(c, "chunk_rows 3", dpo::linear_mode::four_pass);
    c = make_case(dtype::f32, ldpo_layout::packed, 313);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    c.host_cu = false;
    compare(c, "packed, no host cu_seqlens", dpo::linear_mode::four_pass);
  }
  SECTION("separate pairs over one hidden buffer (both sides read the same rows)") {
    for (const dpo::linear_mode mode : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
      ldpo_case c = make_case(dtype::f32, ldpo_layout::separate, 314);
      c.cfg = dpo::loss_config::of(loss_type::sigmoid);
      c.share_rows = true;
      c.mode = mode;
      compare(c, "shared rows", mode);
    }
  }
  SECTION("bitwise repeatable, written equals accumulated from zeros") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::separate, 315);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    c.chunk_rows = 10;
    const ldpo_out a = dpo_cuda_test::run_linear_dpo(c);
    const ldpo_out b = dpo_cuda_test::run_linear_dpo(c);
    REQUIRE(a.code == 0);
    CHECK(a.mode == dpo::linear_mode::three_pass);
    CHECK(a.dweight == b.dweight);
    CHECK(a.dhidden == b.dhidden);
    CHECK(a.loss == b.loss);
    c.accumulate_hidden = true;
    CHECK(dpo_cuda_test::run_linear_dpo(c).dhidden == a.dhidden);
  }
}

TEST_CASE("CUDA linear DPO: combinations, transforms, bf16, grad_output, chunks", "[linear_dpo]") {
  using dpo::loss_type;
  SECTION("sigmoid + sft, packed, reference hidden, transforms, two-row chunks") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::packed, 7);
    c.cfg = dpo::loss_config::combination({{loss_type::sigmoid, 1.0}, {loss_type::sft, 0.5}});
    c.transforms.scale = 0.8;
    c.transforms.softcap = 3.0;
    c.transforms.temperature = 0.7;
    c.ref_from_hidden = true;
    c.chunk_rows = 2;
    c.grad_output = 0.75;
    compare(c, "combination");
  }
  SECTION("aot (batch-coupled), bf16 with fp32 dWeight, padded and separate, both references") {
    for (int k = 0; k < 4; ++k) {
      ldpo_case c = make_case(dtype::bf16, k % 2 ? ldpo_layout::separate : ldpo_layout::padded, 20u + k, 4, 6, 16, 53);
      c.cfg = dpo::loss_config::of(k < 2 ? loss_type::aot : loss_type::ipo);
      c.ref_from_hidden = k >= 2;
      compare(c, "bf16 case " + std::to_string(k));
    }
  }
  SECTION("LD-DPO: sigmoid, aot and ipo, padded / packed / separate, both references, split") {
    const loss_type types[3] = {loss_type::sigmoid, loss_type::aot, loss_type::ipo};
    const ldpo_layout ls[3] = {ldpo_layout::packed, ldpo_layout::padded, ldpo_layout::separate};
    for (int k = 0; k < 3; ++k) {
      ldpo_case c = make_case(k == 2 ? dtype::bf16 : dtype::f32, ls[k], 30u + k);
      c.cfg = dpo::loss_config::of(types[k]);
      c.cfg.ld_alpha = k == 1 ? 0.0 : 0.4;
      c.ref_from_hidden = k != 0;
      c.split = k == 1;
      compare(c, "LD-DPO case " + std::to_string(k));
    }
  }
  SECTION("WPO and LD-DPO with an NLL term, both modes, every layout; metrics off") {
    const ldpo_layout ls[3] = {ldpo_layout::padded, ldpo_layout::packed, ldpo_layout::separate};
    for (int k = 0; k < 6; ++k) {
      ldpo_case c = make_case(k % 3 == 1 ? dtype::bf16 : dtype::f32, ls[k % 3], 80u + k);
      // WPO alone is separable (three passes); WPO with an NLL term couples the batch.
      c.cfg = k < 3 ? dpo::loss_config::of(loss_type::sigmoid)
                    : dpo::loss_config::combination({{loss_type::sigmoid, 1.0}, {loss_type::sft, 0.5}});
      c.cfg.use_weighting = k != 4;
      if (k >= 4) c.cfg.ld_alpha = 0.5;
      c.ref_from_hidden = k % 2 == 1;
      c.mode = k == 2 ? dpo::linear_mode::four_pass : dpo::linear_mode::automatic;
      const bool three = k != 2 && dpo::detail::linear_pairs_separable(c.cfg);
      compare(c, "WPO / LD-DPO + NLL case " + std::to_string(k),
              three ? dpo::linear_mode::three_pass : dpo::linear_mode::four_pass);
    }
    ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 90);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    c.metrics = false;
    compare(c, "metrics off");
  }
  SECTION("NaN in one hidden row: the same NaNs as the CPU (its pair, dWeight), the rest equal") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 11);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    dpo_cuda_test::put(c.type, c.hidden.data() + (1 * c.H + 2) * 4, std::nan(""));  // row 1: pair 0, chosen
    compare(c, "NaN row");
  }
  SECTION("robust with label smoothing, f-divergence, masks, no bias gradient") {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 9);
    c.cfg = dpo::loss_config::of(loss_type::sigmoid);
    c.cfg.divergence = dpo::f_divergence::js_divergence;
    c.mask.assign(static_cast<std::size_t>(c.rows), 1);
    for (std::int64_t r = 0; r < c.rows; ++r) c.mask[r] = r % 7 == 3 ? 0 : 1;
    c.want_bias = false;
    compare(c, "f-divergence + mask");
  }
}

TEST_CASE("CUDA linear DPO: forward then backward equals the CPU split; accumulation", "[linear_dpo]") {
  for (int k = 0; k < 3; ++k) {
    ldpo_case c = make_case(k == 2 ? dtype::bf16 : dtype::f32, k == 1 ? ldpo_layout::packed : ldpo_layout::padded,
                            40u + k);
    c.cfg = dpo::loss_config::of(k == 1 ? dpo::loss_type::aot_unpaired : dpo::loss_type::sigmoid);
    c.split = true;
    c.ref_from_hidden = k == 1;
    c.grad_output = 1.5;
    compare(c, "split " + std::to_string(k));
  }
  // Accumulated dHidden starting from zeros equals written dHidden.
  ldpo_case c = make_case(dtype::f32, ldpo_layout::separate, 50);
  c.cfg = dpo::loss_config::of(dpo::loss_type::hinge);
  const ldpo_out written = dpo_cuda_test::run_linear_dpo(c);
  c.accumulate_hidden = true;
  const ldpo_out added = dpo_cuda_test::run_linear_dpo(c);
  REQUIRE(written.code == 0);
  REQUIRE(added.code == 0);
  CHECK(written.dhidden == added.dhidden);
  CHECK(written.dweight == added.dweight);
  // Bitwise repeatable.
  CHECK(dpo_cuda_test::run_linear_dpo(c).dweight == added.dweight);
}

TEST_CASE("CUDA linear_pair_logps: sequence log-probs from hidden states equal the CPU's", "[linear_dpo]") {
  const ldpo_layout layouts[3] = {ldpo_layout::padded, ldpo_layout::packed, ldpo_layout::separate};
  for (int k = 0; k < 3; ++k) {
    ldpo_case c = make_case(k == 1 ? dtype::bf16 : dtype::f32, layouts[k], 70u + k);
    c.pair_logps = true;
    c.transforms.temperature = 1.3;
    INFO(name_of(layouts[k]));
    const std::vector<unsigned char>& hb = c.hidden;
    const ldpo_out got = dpo_cuda_test::run_linear_dpo(c);
    REQUIRE(got.code == 0);
    REQUIRE(got.device_error == 0);
    std::vector<double> want(static_cast<std::size_t>(2 * c.P));
    const auto run = [&](auto tag) {
      using E = decltype(tag);
      const std::vector<E> hidden = typed<E>(hb), weight = typed<E>(c.weight), bias = typed<E>(c.bias);
      const std::int64_t half = c.P * c.T;
      const auto in = c.layout == ldpo_layout::padded
                          ? dpo::cpu::linear_padded_pairs(hidden.data(), c.H, c.H, c.labels.data(), 2 * c.P, c.T)
                      : c.layout == ldpo_layout::packed
                          ? dpo::cpu::linear_packed_pairs(hidden.data(), c.H, c.H, c.labels.data(),
                                                          c.cu_seqlens.data(), 2 * c.P)
                          : dpo::cpu::linear_separate_pairs(hidden.data(), c.labels.data(), hidden.data() + half * c.H,
                                                            c.labels.data() + half, c.P, c.T, c.H, c.H);
      dpo::cpu::linear_head<E> head;
      head.weight = weight.data();
      head.vocab = c.V;
      head.hidden = c.H;
      head.weight_stride = c.H;
      head.bias = bias.data();
      head.bias_size = c.V;
      head.transforms = c.transforms;
      dpo::cpu::linear_pair_logps(in, head, 1.0, want.data(), want.data() + c.P);
    };
    if (c.type == dtype::bf16) {
      run(Eigen::bfloat16());
    } else {
      run(float());
    }
    near(std::vector<double>(got.pairs.begin(), got.pairs.begin() + 2 * c.P), want, c.type == dtype::bf16 ? 2e-3 : 2e-5,
         "sequence log-probs");
  }
}

TEST_CASE("CUDA linear DPO: refused options and bad input name the argument and write nothing", "[linear_dpo]") {
  const auto untouched = [](const ldpo_out& o) {
    CHECK(o.loss == 12345.0);
    for (double x : o.pairs) CHECK(x == 12345.0);
    for (unsigned char b : o.dhidden) CHECK(b == 0x7f);
    for (unsigned char b : o.dweight) CHECK(b == 0x7f);
    for (unsigned char b : o.dbias) CHECK(b == 0x7f);
  };
  const auto base = [] {
    ldpo_case c = make_case(dtype::f32, ldpo_layout::padded, 60);
    c.fill = 0x7f;
    return c;
  };
  const auto fails = [&](const ldpo_case& c, const char* needle) {
    const ldpo_out o = dpo_cuda_test::run_linear_dpo(c);
    INFO(o.message);
    CHECK(o.code != 0);
    CHECK(o.message.find(needle) != std::string::npos);
    untouched(o);
  };
  {  // three passes where the plan does not allow them
    ldpo_case c = base();
    c.mode = dpo::linear_mode::three_pass;
    c.cfg = dpo::loss_config::of(dpo::loss_type::aot);
    fails(c, "three_pass is impossible for this loss");
    c = base();
    c.mode = dpo::linear_mode::three_pass;
    c.chunk_rows = 3;
    fails(c, "do not fit a chunk of 3 rows");
    c = make_case(dtype::f32, ldpo_layout::packed, 62);
    c.fill = 0x7f;
    c.mode = dpo::linear_mode::three_pass;
    c.host_cu = false;
    fails(c, "host_cu_seqlens");
  }
  {  // a host copy of cu_seqlens past options.num_rows: refused on the host
    ldpo_case c = make_case(dtype::f32, ldpo_layout::packed, 64);
    c.fill = 0x7f;
    c.host_cu_shift = 100;
    fails(c, "options.host_cu_seqlens[1]");
  }
  {
    ldpo_case c = base();
    c.null_handle = true;
    fails(c, "handle");
  }
  {
    ldpo_case c = base();
    c.short_workspace = true;
    fails(c, "workspace_bytes");
  }
  {
    ldpo_case c = base();
    c.dweight_on_weight = true;
    fails(c, "grads.weight");
  }
  {
    ldpo_case c = base();
    c.cfg.beta = std::nan("");
    fails(c, "beta");
  }
  {
    ldpo_case c = base();
    c.ref_logps.clear();  // sigmoid needs the reference
    fails(c, "ref");
  }
  // Device data: the call succeeds, the error word names the value, nothing is written.
  const auto device_fails = [&](const ldpo_case& c, const char* needle) {
    const ldpo_out o = dpo_cuda_test::run_linear_dpo(c);
    CHECK(o.code == 0);
    CHECK(o.device_error != 0);
    INFO(o.device_message);
    CHECK(o.device_message.find(needle) != std::string::npos);
    untouched(o);
  };
  for (const dpo::linear_mode mode : {dpo::linear_mode::three_pass, dpo::linear_mode::four_pass}) {
    // A label outside [0, vocab).
    ldpo_case c = base();
    c.mode = mode;
    c.labels[13] = c.V;
    device_fails(c, "labels[13]");
  }
  {  // Three passes over packed pairs: the device's cu_seqlens differ from the host copy.
    ldpo_case c = make_case(dtype::f32, ldpo_layout::packed, 63);
    c.fill = 0x7f;
    c.mode = dpo::linear_mode::three_pass;
    c.host_cu_shift = 1;
    device_fails(c, "differs from options.host_cu_seqlens");
  }
  {  // A decreasing cu_seqlens.
    ldpo_case c = make_case(dtype::f32, ldpo_layout::packed, 61);
    c.fill = 0x7f;
    c.cu_seqlens[2] = c.cu_seqlens[1] - 1;
    c.host_cu = false;  // (a host copy this bad is refused on the host: above)
    device_fails(c, "cu_seqlens");
  }
}

TEST_CASE("CUDA linear DPO: packed sides on the same rows keep their own labels and refuse row state", "[linear_dpo]") {
  // Packed views whose rejected side reads the chosen side's rows (the same cu_seqlens and
  // sequences) looked disjoint to the CUDA layout, which shared one row-label array between
  // them and accepted row state both sides would write. Now they take one array each (the
  // loss and dWeight equal the CPU's) and row state is refused, as on the CPU.
  const std::int64_t H = 4, V = 6;
  const std::vector<std::int64_t> cu = {0, 3, 5, 8, 10};
  const std::int64_t R = cu.back();
  std::vector<float> hidden(static_cast<std::size_t>(R * H)), weight(static_cast<std::size_t>(V * H));
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& x : hidden) x = nd(rng);
  for (float& x : weight) x = 0.5f * nd(rng);
  std::vector<std::int64_t> labels = {-100, 1, 2, 3, 4, 5, -100, 0, 1, 2};
  const dpo_cuda_test::packed_shared_out got = dpo_cuda_test::run_packed_shared_rows(hidden, weight, labels, cu);
  INFO(got.row_state_message);
  CHECK(got.row_state_message.find("one hidden buffer") != std::string::npos);
  REQUIRE(got.code == 0);
  auto policy = dpo::cpu::linear_packed_pairs(hidden.data(), H, H, labels.data(), cu.data(), 4);
  policy.pairs.rejected = policy.pairs.chosen;
  dpo::cpu::linear_head<float> head;
  head.weight = weight.data();
  head.vocab = V;
  head.hidden = H;
  head.weight_stride = H;
  const std::vector<double> ref(2, 0.0);
  double loss = 0;
  dpo::forward_outputs out;
  out.loss = &loss;
  std::vector<float> dw(weight.size(), 0.0f);
  dpo::cpu::linear_dpo_grads<float, float> g;
  g.weight = dw.data();
  g.weight_stride = H;
  dpo::cpu::linear_dpo(policy, head, ref.data(), ref.data(), dpo::loss_config{}, out, g);
  CHECK(got.loss == Approx(loss).epsilon(1e-6));
  REQUIRE(got.dweight.size() == dw.size());
  for (std::size_t i = 0; i < dw.size(); ++i) CHECK(got.dweight[i] == Approx(dw[i]).epsilon(1e-4).margin(1e-6));
}

TEST_CASE("CUDA linear DPO: forward outputs may overlap neither each other nor the inputs", "[linear_dpo]") {
  // The rule of dpo::cpu::linear_dpo (dpo::detail::check_forward_outputs), before anything is
  // launched: out.losses on out.chosen_rewards returned the rewards as the losses, silently.
  // linear_pair_logps' chosen / rejected were not checked at all.
  const dpo_cuda_test::linear_alias_out r = dpo_cuda_test::linear_output_alias_errors();
  REQUIRE(r.cases.size() == 15);
  test_support::check_alias_cases(r.cases);
  CHECK(r.untouched);
}
