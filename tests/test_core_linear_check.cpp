// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The linear head's argument checks of dpo/core/linear_check.hpp called directly: each rule
// gives the CPU head's message, word for word (dpo::cpu::linear_logps throws "dpo: " + the
// same text), so the CPU head can call the core checks too; the CUDA head (dpo/cuda/linear.cuh)
// already does, with CUDA's policy (labels on the device, no pointers in a size query).
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "catch.hpp"
#include "dpo/core/linear_check.hpp"
#include "dpo/cpu/linear.hpp"

namespace {

using view_t = dpo::cpu::linear_view<float, std::int64_t>;
using dpo::detail::check_linear_view;
using dpo::detail::cpu_policy;
using dpo::detail::cuda_policy;

struct head {
  static constexpr std::int64_t N = 4, H = 3, V = 5;
  std::vector<float> hidden = std::vector<float>(N * H, 0.25f), weight = std::vector<float>(V * H, 0.5f),
                     bias = std::vector<float>(V, 0.0f);
  std::vector<std::int64_t> labels = {0, 4, -100, 2};
  view_t view() {
    view_t v;
    v.hidden = hidden.data();
    v.rows = N;
    v.hidden_cols = v.hidden_stride = v.weight_cols = v.weight_stride = H;
    v.weight = weight.data();
    v.vocab = V;
    v.bias = bias.data();
    v.bias_size = V;
    v.labels = labels.data();
    return v;
  }
};

/// The CPU head's message for `v` ("" when it accepts it).
std::string cpu_message(const view_t& v) {
  std::vector<double> lp(static_cast<std::size_t>(v.rows > 0 ? v.rows : 1)), lse(lp.size());
  try {
    dpo::cpu::linear_logps(v, lp.data(), nullptr, lse.data());
  } catch (const dpo::error& e) {
    const std::string m = e.what();
    return m.rfind("dpo: ", 0) == 0 ? m.substr(5) : m;
  }
  return "";
}

}  // namespace

TEST_CASE("core linear checks: every rule gives the CPU head's message", "[core][linear]") {
  const std::vector<std::function<void(view_t&)>> breaks = {
      [](view_t& v) { v.rows = -1; },
      [](view_t& v) { v.hidden_cols = 0; },
      [](view_t& v) { v.weight_cols = 2; },
      [](view_t& v) { v.vocab = 0; },
      [](view_t& v) { v.hidden_stride = 2; },
      [](view_t& v) { v.weight_stride = 2; },
      [](view_t& v) { v.weight = nullptr; },
      [](view_t& v) { v.bias_size = 4; },
      [](view_t& v) { v.bias_size = 0; },
      [](view_t& v) { v.bias = nullptr; },
      [](view_t& v) { v.transforms.scale = 0; },
      [](view_t& v) { v.transforms.softcap = -2; },
      [](view_t& v) { v.transforms.temperature = std::nan(""); },
      [](view_t& v) { v.hidden = nullptr; },
      [](view_t& v) { v.labels = nullptr; },
      [](view_t& v) { const_cast<std::int64_t*>(v.labels)[3] = 5; },
  };
  for (std::size_t k = 0; k < breaks.size(); ++k) {
    head h;
    view_t v = h.view();
    breaks[k](v);
    const std::string core = check_linear_view(v, cpu_policy());
    INFO("rule " << k << ": core '" << core << "'");
    CHECK(!core.empty());
    CHECK(core == cpu_message(v));
  }
  head h;
  view_t v = h.view();
  CHECK(check_linear_view(v, cpu_policy()).empty());
  CHECK(cpu_message(v).empty());
}

TEST_CASE("core linear checks: CUDA's policy leaves labels to the device and pointers to the call",
          "[core][linear]") {
  head h;
  view_t v = h.view();
  h.labels[3] = 5;  // out of range: only a host policy sees it
  CHECK(check_linear_view(v, cuda_policy(-1, true)).empty());
  CHECK(check_linear_view(v, cpu_policy()).find("labels[3] = 5") != std::string::npos);
  // A size query: no pointers yet, but a bias of the wrong length is still a size error.
  v.hidden = nullptr;
  v.weight = nullptr;
  v.bias = nullptr;
  v.labels = nullptr;
  CHECK(check_linear_view(v, cuda_policy(-1, false)).empty());
  v.bias_size = 3;
  CHECK(check_linear_view(v, cuda_policy(-1, false)) ==
        "bias_size = 3 != vocab = 5: the bias must have one entry per vocab row");
}

TEST_CASE("core linear checks: CUDA's policy refuses rows or vocab whose offsets overflow int64", "[core][linear]") {
  // The audit's probe: rows = 2^62 with hidden_stride = 3 was accepted, and the aliasing
  // checks' byte ranges and the kernels' row offsets overflowed (undefined; wrapped ranges).
  head h;
  view_t v = h.view();
  v.rows = std::int64_t{1} << 62;
  CHECK(check_linear_view(v, cuda_policy(-1, true)) == "rows = 4611686018427387904 x hidden_stride = 3 overflows int64");
  CHECK(check_linear_view(v, cuda_policy(-1, false)) == "rows = 4611686018427387904 x hidden_stride = 3 overflows int64");
  v = h.view();
  v.weight_stride = std::int64_t{1} << 62;
  CHECK(check_linear_view(v, cuda_policy(-1, true)) ==
        "vocab = 5 x weight_stride = 4611686018427387904 overflows int64");
  // The largest products that fit are accepted.
  v = h.view();
  v.rows = INT64_MAX / 3;
  v.labels = nullptr;  // device data: not read
  v.hidden = nullptr;
  CHECK(check_linear_view(v, cuda_policy(-1, false)).empty());
}

TEST_CASE("core linear checks: outputs may overlap neither inputs nor each other", "[core][linear]") {
  std::vector<double> buf(20);
  using dpo::detail::named_range;
  using dpo::detail::range_of;
  const named_range ins[1] = {range_of(buf.data(), 1, 5, 5, "labels")};
  const named_range ok[2] = {range_of(buf.data() + 5, 1, 5, 5, "logps"), range_of(buf.data() + 10, 1, 5, 5, "lse")};
  CHECK(dpo::detail::check_no_overlap(ok, 2, ins, 1).empty());
  const named_range on_input[1] = {range_of(buf.data() + 4, 1, 5, 5, "logps")};
  CHECK(dpo::detail::check_no_overlap(on_input, 1, ins, 1) == "logps overlaps labels: outputs may not alias inputs");
  const named_range together[2] = {range_of(buf.data() + 5, 1, 5, 5, "logps"), range_of(buf.data() + 9, 1, 5, 5, "lse")};
  CHECK(dpo::detail::check_no_overlap(together, 2, ins, 1) == "logps overlaps lse: unsupported aliasing");
}
