// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The smallest real use of the installed library: the DPO loss and its gradient for two
// preference pairs in TRL's padded layout. Exits non-zero unless both are finite.
#include <dpo/dpo.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  constexpr std::int64_t pairs = 2, seq_len = 3, vocab = 5;
  constexpr std::int64_t rows = 2 * pairs * seq_len;
  std::vector<float> logits(rows * vocab);
  for (std::size_t i = 0; i < logits.size(); ++i)
    logits[i] = static_cast<float>(std::sin(0.7 * static_cast<double>(i)));
  // Row 0 of every sequence is prompt (ignore_index); the rest are completion tokens.
  const std::vector<std::int64_t> labels = {-100, 1, 2, -100, 3, 4, -100, 0, 1, -100, 2, 2};
  const std::vector<double> ref_chosen = {-3.5, -3.0}, ref_rejected = {-3.2, -3.4};

  const auto batch = dpo::padded_pairs(logits.data(), labels.data(), 2 * pairs, seq_len, vocab,
                                       vocab);
  const dpo::loss_config cfg = dpo::loss_config::of(dpo::loss_type::sigmoid);
  std::vector<float> grad(logits.size());
  const dpo::pair_grad_view<float> g{grad.data(), vocab, grad.data(), vocab};
  const dpo::cpu::forward_result r = dpo::cpu::dpo_forward_backward(
      batch, ref_chosen.data(), ref_rejected.data(), cfg, g);

  bool ok = std::isfinite(r.loss) && r.losses.size() == pairs;
  for (float x : grad) ok = ok && std::isfinite(x);
  std::printf("dpo %d.%d.%d: loss %.6f, reward margin %.6f: %s\n", DPO_VERSION_MAJOR,
              DPO_VERSION_MINOR, DPO_VERSION_PATCH, r.loss, r.metrics.rewards_margins,
              ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
