// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The argument checks of dpo/core/check.hpp called directly: what each backend policy
// rejects and with which message, and that the CPU wrapper (dpo/cpu/check.hpp) and the CPU
// entry points throw exactly the core's message behind "dpo: ". tests/cuda/test_cuda_dpo.cpp
// checks the CUDA wrapper against the same core messages.
#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "catch.hpp"
#include "dpo/core/check.hpp"
#include "dpo/cpu/dpo.hpp"

namespace {

using view_t = dpo::pair_view<float, std::int64_t>;
using dpo::detail::check_policy;
using dpo::detail::cpu_policy;
using dpo::detail::cuda_policy;

/// A valid padded batch: 2 pairs of 3 rows, vocab 4, row_stride 5, every row a completion.
struct batch {
  static constexpr std::int64_t P = 2, T = 3, V = 4, S = 5, rows = 2 * P * T;
  std::vector<float> logits = std::vector<float>(rows * S, 0.5f);
  std::vector<std::int64_t> labels = std::vector<std::int64_t>(rows, 1);
  std::vector<std::int64_t> cu = {0, 2, 5, 6, 9};  // packed: 4 sequences in 9 rows
  std::vector<float> grad = std::vector<float>(rows * S, 0.0f);
  view_t padded() const {
    return dpo::padded_pairs(logits.data(), labels.data(), 2 * P, T, V, S);
  }
  view_t packed() const {
    return dpo::packed_pairs(logits.data(), labels.data(), cu.data(), 2 * P, V, S);
  }
  dpo::pair_grad_view<float> grad_view() { return {grad.data(), S, grad.data(), S}; }
};

/// The message dpo::error carries when f throws, or "" when it does not.
std::string thrown(const std::function<void()>& f) {
  try {
    f();
  } catch (const dpo::error& e) {
    return e.what();
  }
  return "";
}

struct bad_view {
  const char* what;
  std::function<void(view_t&, batch&)> make;
  const char* needle;  // a substring of the core's message
};

/// Views each rejected on both backends for one reason (CUDA does not read labels or
/// cu_seqlens, so those cases are the CPU's only and are listed separately).
std::vector<bad_view> bad_shapes() {
  return {
      {"odd concatenated count", [](view_t& v, batch&) { v.concatenated_seqs = 3; },
       "logits.num_seqs = 3 is odd"},
      {"chosen / rejected counts differ", [](view_t& v, batch&) { v.rejected.num_seqs = 1; },
       "logits: chosen.num_seqs = 2 != rejected.num_seqs = 1"},
      {"no pairs", [](view_t& v, batch&) { v.chosen.num_seqs = v.rejected.num_seqs = 0; },
       "logits.num_pairs = 0 is invalid: must be >= 1"},
      {"vocab differs", [](view_t& v, batch&) { v.rejected.vocab = 3; },
       "logits: chosen.vocab = 4 != rejected.vocab = 3"},
      {"vocab 0", [](view_t& v, batch&) { v.chosen.vocab = v.rejected.vocab = 0; },
       "logits.chosen.vocab = 0 is invalid"},
      {"row_stride < vocab", [](view_t& v, batch&) { v.rejected.row_stride = 3; },
       "logits.rejected.row_stride = 3 is invalid: must be >= vocab = 4"},
      {"negative first_seq", [](view_t& v, batch&) { v.chosen.first_seq = -1; },
       "logits.chosen.first_seq = -1 is invalid: must be >= 0"},
      {"negative seq_len", [](view_t& v, batch&) { v.chosen.seq_len = -1; },
       "logits.chosen.seq_len = -1 is invalid: must be >= 0"},
      {"seq_stride < seq_len", [](view_t& v, batch&) { v.rejected.seq_stride = 2; },
       "logits.rejected.seq_stride = 2 is invalid: must be 0 (= seq_len) or >= seq_len = 3"},
      {"null logits", [](view_t& v, batch&) { v.rejected.logits = nullptr; },
       "logits.rejected.logits is null"},
      {"null labels", [](view_t& v, batch&) { v.chosen.labels = nullptr; },
       "logits.chosen.labels is null"},
  };
}

}  // namespace

TEST_CASE("core: valid views pass every policy", "[core][check]") {
  batch b;
  for (const view_t& v : {b.padded(), b.packed()}) {
    CHECK(dpo::detail::check_pairs(v, "logits", cpu_policy()) == "");
    CHECK(dpo::detail::check_pairs(v, "logits", cuda_policy(batch::rows, true)) == "");
    CHECK(dpo::detail::check_grad(v, b.grad_view(), cpu_policy()) == "");
    CHECK(dpo::detail::check_grad(v, b.grad_view(), cuda_policy(batch::rows, true)) == "");
    // In place: exactly the logits buffer with its stride.
    float* z = b.logits.data();
    CHECK(dpo::detail::check_grad(v, {z, batch::S, z, batch::S}, cpu_policy()) == "");
    CHECK(dpo::detail::check_grad(v, {z, batch::S, z, batch::S}, cuda_policy(batch::rows, true)) ==
          "");
  }
}

TEST_CASE("core: the CPU wrapper and entry points throw the core's message", "[core][check]") {
  for (const bad_view& c : bad_shapes()) {
    INFO(c.what);
    batch b;
    view_t v = b.padded();
    c.make(v, b);
    const std::string core = dpo::detail::check_pairs(v, "logits", cpu_policy());
    INFO("core: " << core);
    CHECK(core.find(c.needle) != std::string::npos);
    CHECK(thrown([&] { dpo::cpu::detail::check_pairs(v, "logits"); }) == "dpo: " + core);
    const std::vector<double> rc(2, -1.0), rr(2, -2.0);
    CHECK(thrown([&] { dpo::cpu::dpo_forward(v, rc.data(), rr.data(), dpo::loss_config{}); }) ==
          "dpo: " + core);
  }
}

TEST_CASE("core: host data (cu_seqlens, labels) is read with the CPU policy only", "[core][check]") {
  const std::vector<std::pair<std::function<void(batch&)>, std::string>> cases = {
      {[](batch& x) { x.cu[0] = -1; }, "logits.chosen.cu_seqlens[0] = -1 is invalid: must be >= 0"},
      {[](batch& x) { x.cu[2] = 1; },
       "logits.chosen.cu_seqlens is not non-decreasing: cu_seqlens[2] = 1 < cu_seqlens[1] = 2"},
      {[](batch& x) { x.labels[7] = 4; },
       "logits.rejected.labels[7] = 4 is outside [0, vocab = 4) and is not ignore_index = -100"},
      {[](batch& x) { x.labels[0] = -1; }, "logits.chosen.labels[0] = -1 is outside"},
  };
  for (const auto& c : cases) {
    batch x;
    c.first(x);
    const view_t v = x.packed();
    const std::string core = dpo::detail::check_pairs(v, "logits", cpu_policy());
    INFO("core: " << core);
    CHECK(core.find(c.second) != std::string::npos);
    CHECK(thrown([&] { dpo::cpu::detail::check_pairs(v, "logits"); }) == "dpo: " + core);
    // CUDA's kernels check these on the device.
    CHECK(dpo::detail::check_pairs(v, "logits", cuda_policy(batch::rows, true)) == "");
  }
  // A masked row's label is not read.
  batch m;
  m.labels[3] = -100;
  CHECK(dpo::detail::check_pairs(m.padded(), "logits", cpu_policy()) == "");
}

TEST_CASE("core: what only the CUDA policy rejects", "[core][check]") {
  batch b;
  const check_policy cuda = cuda_policy(batch::rows, true);
  view_t v = b.padded();
  v.chosen.vocab = v.rejected.vocab = INT_MAX;
  v.chosen.row_stride = v.rejected.row_stride = INT_MAX;
  CHECK(dpo::detail::check_pairs(v, "logits", cuda) ==
        "logits.chosen.vocab = 2147483647 is invalid: must be in [1, 2^31)");
  v = b.padded();
  v.chosen.num_seqs = v.rejected.num_seqs = std::int64_t(INT_MAX) / 2 + 1;
  CHECK(dpo::detail::check_pairs(v, "logits", cuda) ==
        "logits.num_pairs = 1073741824 is invalid: must be <= 1073741823");
  v = b.padded();
  v.chosen.row_stride = v.rejected.row_stride = INT64_MAX / 4;
  CHECK(dpo::detail::check_pairs(v, "logits", cuda) ==
        "logits.chosen: rows x row_stride overflows int64");
  v = b.packed();
  CHECK(dpo::detail::check_pairs(v, "logits", cuda_policy(-1, true)) ==
        "options.num_rows = -1 is invalid for the packed view logits.chosen: give the rows of "
        "the logits buffer (>= 0)");
  CHECK(dpo::detail::check_pairs(v, "logits", cpu_policy()) == "");
  // A size query checks no pointer.
  v = b.padded();
  v.chosen.logits = nullptr;
  CHECK(dpo::detail::check_pairs(v, "logits", cuda_policy(-1, false)) == "");
  CHECK(dpo::detail::check_pairs(v, "logits", cuda) == "logits.chosen.logits is null");
}

TEST_CASE("core: the rows a view may occupy, per policy", "[core][check]") {
  batch b;
  view_t v = b.padded();
  v.chosen.seq_stride = v.rejected.seq_stride = 4;  // one gap row after each sequence
  v.rejected.first_seq = 2;
  const dpo::detail::row_span c = dpo::detail::rows_of(v.rejected, cpu_policy());
  CHECK(c.begin == 8);
  CHECK(c.end == 15);
  const view_t p = b.packed();
  CHECK(dpo::detail::rows_of(p.rejected, cpu_policy()).begin == 5);
  CHECK(dpo::detail::rows_of(p.rejected, cpu_policy()).end == 9);
  CHECK(dpo::detail::rows_of(p.rejected, cuda_policy(11, true)).begin == 0);
  CHECK(dpo::detail::rows_of(p.rejected, cuda_policy(11, true)).end == 11);
  view_t none = b.padded();
  none.chosen.seq_len = 0;
  CHECK_FALSE(dpo::detail::has_rows(none.chosen, cpu_policy()));
  CHECK(dpo::cpu::detail::has_rows(b.padded().chosen));
}

TEST_CASE("core: gradient buffers, and the CPU wrapper's message", "[core][check]") {
  batch b;
  float* z = b.logits.data();
  float* g = b.grad.data();
  const std::int64_t S = batch::S;
  const std::vector<std::pair<dpo::pair_grad_view<float>, std::string>> cases = {
      {{nullptr, S, g, S}, "grad.chosen is null"},
      {{g, S, nullptr, S}, "grad.rejected is null"},
      {{g, 3, g, S}, "grad.chosen_stride = 3 is invalid: must be >= vocab = 4"},
      {{g, S, g, 2}, "grad.rejected_stride = 2 is invalid: must be >= vocab = 4"},
      {{z + 1, S, z + 1, S},
       "grad.chosen overlaps the logits without being the logits buffer itself (same pointer "
       "and stride): unsupported aliasing"},
      {{z, batch::V, z, batch::V}, "grad.chosen overlaps the logits"},
      {{z + 2 * batch::T * S, S, g, S}, "grad.chosen overlaps the logits"},  // rejected's rows
  };
  for (const auto& c : cases) {
    for (const check_policy& p : {cpu_policy(), cuda_policy(batch::rows, true)}) {
      const view_t v = b.padded();
      const std::string core = dpo::detail::check_grad(v, c.first, p);
      INFO("core: " << core);
      CHECK(core.find(c.second) == 0);
    }
    const view_t v = b.padded();
    const std::string core = dpo::detail::check_grad(v, c.first, cpu_policy());
    CHECK(thrown([&] { dpo::cpu::detail::check_grad(v, c.first); }) == "dpo: " + core);
  }
  // Separate buffers: the two gradients must not share rows.
  std::vector<float> zr(b.logits), gr(b.grad);
  view_t sep = dpo::separate_pairs(z, b.labels.data(), zr.data(), b.labels.data(), 2, 3, 4, S);
  CHECK(dpo::detail::check_grad(sep, {g, S, gr.data(), S}, cpu_policy()) == "");
  CHECK(dpo::detail::check_grad(sep, {g, S, g + S, S}, cpu_policy()) ==
        "grad.chosen and grad.rejected overlap: unsupported aliasing");
  CHECK(dpo::detail::check_grad(sep, {g, S, g, S}, cuda_policy(-1, true)) ==
        "grad.chosen and grad.rejected overlap: unsupported aliasing");
  // Packed: with num_rows only, the chosen gradient may cover every row of the buffer, yet
  // the two sides of one packed buffer (same cu_seqlens, disjoint sequences) are disjoint.
  const view_t p = b.packed();
  CHECK(dpo::detail::check_grad(p, {g, S, g, S}, cuda_policy(batch::rows, true)) == "");
  CHECK(dpo::detail::check_grad(p, {g, S, g, S}, cpu_policy()) == "");
  CHECK(dpo::detail::check_grad(p, {g, S, z, S}, cuda_policy(batch::rows, true)) ==
        dpo::detail::check_grad(p, {g, S, z, S}, cpu_policy()));
}

TEST_CASE("core: sequence_logps_backward's arguments, and the CPU entry point", "[core][check]") {
  batch b;
  const dpo::token_view<float, std::int64_t> v = b.padded().chosen;
  std::vector<double> lse(batch::rows, 0.0), sg(2, 1.0);
  float* z = b.logits.data();
  float* g = b.grad.data();
  const std::int64_t S = batch::S;
  struct seq_case {
    const double* lse;
    const double* sg;
    float* grad;
    std::int64_t stride;
    const char* message;
  };
  const std::vector<seq_case> cases = {
      {nullptr, sg.data(), g, S, "row_lse is null"},
      {lse.data(), sg.data(), nullptr, S, "grad is null"},
      {lse.data(), sg.data(), g, 3, "grad_stride = 3 is invalid: must be >= vocab = 4"},
      {lse.data(), sg.data(), z + S, S,
       "grad overlaps the logits without being the logits buffer itself (same pointer and "
       "stride): unsupported aliasing"},
      {lse.data(), sg.data(), z, batch::V, "grad overlaps the logits"},
  };
  for (const seq_case& c : cases) {
    const std::string core = dpo::detail::check_seq_grad(v, c.lse, c.sg, c.grad, c.stride, cpu_policy());
    INFO("core: " << core);
    CHECK(core.find(c.message) == 0);
    CHECK(dpo::detail::check_seq_grad(v, c.lse, c.sg, c.grad, c.stride,
                                      cuda_policy(batch::rows, true)) == core);
    CHECK(thrown([&] { dpo::cpu::sequence_logps_backward(v, c.lse, c.sg, c.grad, c.stride); }) ==
          "dpo: " + core);
  }
  CHECK(dpo::detail::check_seq_grad(v, lse.data(), nullptr, g, S, cpu_policy()) ==
        "seq_grad is null");
  CHECK(dpo::detail::check_seq_grad(v, lse.data(), sg.data(), z, S, cpu_policy()) == "");
  // A size query checks the stride only.
  CHECK(dpo::detail::check_seq_grad<float, std::int64_t>(v, nullptr, nullptr, nullptr, S,
                                                         cuda_policy(-1, false)) == "");
}

TEST_CASE("core: reference, pair log-probs and scalar checks", "[core][check]") {
  const double x = -1.0;
  const dpo::loss_config cfg;
  CHECK(dpo::detail::check_reference(cfg, nullptr, &x, cpu_policy()) ==
        "ref_chosen_logps is null (needed unless reference_free)");
  CHECK(dpo::detail::check_reference(cfg, &x, nullptr, cpu_policy()) ==
        "ref_rejected_logps is null (needed unless reference_free)");
  dpo::loss_config free = cfg;
  free.reference_free = true;
  CHECK(dpo::detail::check_reference(free, nullptr, nullptr, cpu_policy()) == "");

  dpo::pair_logps_in in;
  in.num_pairs = 1;
  in.chosen_logps = &x;
  in.rejected_logps = &x;
  CHECK(dpo::detail::check_logps_in(in, cfg, cpu_policy()) ==
        "ref_chosen_logps is null (needed unless reference_free)");
  CHECK(thrown([&] { dpo::cpu::dpo_loss(in, cfg); }) ==
        "dpo: " + dpo::detail::check_logps_in(in, cfg, cpu_policy()));
  in.num_pairs = 0;
  CHECK(dpo::detail::check_logps_in(in, cfg, cpu_policy()) ==
        "num_pairs = 0 is invalid: must be >= 1");
  CHECK(dpo::detail::check_logps_in(in, cfg, cuda_policy(-1, false)) ==
        "num_pairs = 0 is invalid: must be in [1, 2^31)");

  CHECK(dpo::detail::check_finite(1.0, "grad_output") == "");
  CHECK(dpo::detail::check_finite(INFINITY, "grad_output") ==
        "grad_output = inf is invalid: must be finite");
  CHECK(dpo::detail::check_unit(1.0, "ld_alpha") == "");
  CHECK(dpo::detail::check_unit(1.5, "ld_alpha") == "ld_alpha = 1.5 is invalid: must be in [0, 1]");
  CHECK(dpo::detail::check_unit(NAN, "ld_alpha").find("ld_alpha = ") == 0);

  batch b;
  const view_t p = b.padded();
  view_t r = p;
  r.chosen.num_seqs = r.rejected.num_seqs = 1;
  CHECK(dpo::detail::check_reference_pairs(p, r) == "ref_logits.num_pairs = 1 != logits.num_pairs = 2");
  CHECK(dpo::detail::check_reference_pairs(p, p) == "");
}
