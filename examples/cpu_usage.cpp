// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU API in one page: a batch of preference pairs in TRL's padded layout, reference
// log-probs computed once, the fused forward pass (loss and metrics), and the gradient with
// respect to the logits written in place. Build: link dpo::dpo; include <dpo/dpo.hpp>.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <dpo/dpo.hpp>
#include <vector>

int main() {
  // P = 2 pairs, each sequence padded to T = 4 logits rows, vocabulary V = 6.
  const std::int64_t P = 2, T = 4, V = 6;
  const std::int64_t rows = 2 * P * T;

  // TRL's layout: one buffer of 2P sequences, sequences [0, P) chosen and [P, 2P) rejected.
  // Logits are already shifted (row t scores label t). Labels are -100 on prompt and padding
  // rows; only the others (the completion tokens) count.
  const std::vector<std::int64_t> labels = {
      -100, 2, 3, -100,     // pair 0, chosen:   prompt row, 2 completion tokens, padding
      -100, -100, 1, 5,     // pair 1, chosen:   2 prompt rows, 2 completion tokens
      -100, 4, 4, -100,     // pair 0, rejected
      -100, -100, 0, -100,  // pair 1, rejected: 1 completion token
  };
  // The policy's logits [rows, V], row-major; here just some numbers. A float buffer of any
  // row stride >= V works (bf16, fp16 and double too); this one is dense, stride V.
  std::vector<float> logits(rows * V);
  for (std::int64_t i = 0; i < rows * V; ++i) logits[i] = 0.5f * std::sin(0.7f * i);
  // The reference model's logits, same layout and labels.
  std::vector<float> ref_logits(rows * V);
  for (std::int64_t i = 0; i < rows * V; ++i) ref_logits[i] = 0.5f * std::sin(0.7f * i + 0.3f);

  try {
    const auto policy = dpo::padded_pairs(logits.data(), labels.data(), /*num_seqs=*/2 * P,
                                          /*seq_len=*/T, /*vocab=*/V, /*row_stride=*/V);
    const auto reference = dpo::padded_pairs(ref_logits.data(), labels.data(), 2 * P, T, V, V);

    // Reference sequence log-probs, once per data set in practice (the reference is frozen).
    // ld_alpha = 1: no LD-DPO length weighting (use the loss config's value when it is on).
    std::vector<double> ref_chosen(P), ref_rejected(P);
    dpo::cpu::pair_logps(reference, /*ld_alpha=*/1.0, ref_chosen.data(), ref_rejected.data());

    dpo::loss_config cfg;  // TRL's defaults: sigmoid loss, beta 0.1
    cfg.beta = 0.1;
    dpo::cpu::options opt;
    opt.num_threads = 2;  // results are bitwise identical for any thread count

    // Forward: one read of the logits gives the loss, per-pair values and TRL's metrics.
    const dpo::cpu::forward_result r =
        dpo::cpu::dpo_forward(policy, ref_chosen.data(), ref_rejected.data(), cfg, opt);
    std::printf("loss %.6f\n", r.loss);
    for (std::int64_t i = 0; i < P; ++i)
      std::printf("pair %lld: pi_c %.4f pi_r %.4f rho_c %.4f rho_r %.4f reward margin %.6f\n",
                  static_cast<long long>(i), r.chosen_logps[i], r.rejected_logps[i],
                  ref_chosen[i], ref_rejected[i], r.chosen_rewards[i] - r.rejected_rewards[i]);
    const dpo::cpu::metrics& m = r.metrics;
    std::printf("rewards/margins %.6f  rewards/accuracies %.2f  entropy %.4f  "
                "mean_token_accuracy %.2f\n",
                m.rewards_margins, m.rewards_accuracies, m.entropy, m.mean_token_accuracy);

    // Backward, in place: dLoss/dlogits overwrites the logits (same pointer and stride for
    // both sides of the concatenated buffer). Masked rows become exact zeros. Backpropagate
    // this buffer through the model's output layer.
    const dpo::pair_grad_view<float> grad{logits.data(), V, logits.data(), V};
    dpo::cpu::dpo_backward(policy, r, grad, /*grad_output=*/1.0, opt);

    // Each completion row's gradient is coef * (onehot(label) - softmax), so it sums to 0.
    double worst = 0;
    for (std::int64_t row = 0; row < rows; ++row) {
      double sum = 0;
      for (std::int64_t v = 0; v < V; ++v) sum += logits[row * V + v];
      worst = std::fmax(worst, std::fabs(sum));
    }
    std::printf("dLoss/dlogits[row 1] =");
    for (std::int64_t v = 0; v < V; ++v) std::printf(" %+.6f", logits[1 * V + v]);
    std::printf("\nlargest |row sum| of the gradient %.2e\n", worst);
    return worst < 1e-6 ? 0 : 1;
  } catch (const dpo::error& e) {
    // Bad shapes, labels or configuration: the message names the argument and its value,
    // and nothing was written.
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
