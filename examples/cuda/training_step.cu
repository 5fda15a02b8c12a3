// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// A DPO training step on device buffers through the dpo::cuda host API, three ways:
//   dpo_step          forward, then the backward in place from the state in the workspace;
//   dpo_step_rows     the per-row state kept by the caller instead, so the forward's
//                     workspace is free before the backward (the PyTorch ops' schema);
//   dpo_step_ref      the reference model's logits instead of its log-probs.
// main() runs them on a small random batch and checks that they agree: the first two
// bitwise, and the third bitwise with dpo_step given pair_logps of the same reference logits.
//
// Build: part of the CMake project (target dpo_example_training_step). With a device it runs
// there; without one it prints a note and exits 0. The test suite also builds this file
// against the CUDA emulator (tests/cuda/emu) and runs it on the CPU, so CI runs it too.
#include <dpo/cuda/dpo.cuh>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

using bf16 = __nv_bfloat16;

// Error handling trimmed to a macro for brevity: print the status, return its code.
#define DPO_TRY(call)                              \
  do {                                             \
    const dpo::cuda::status s_ = (call);           \
    if (!s_) {                                     \
      std::fprintf(stderr, "%s\n", s_.message);    \
      return s_.code;                              \
    }                                              \
  } while (0)
#define CUDA_TRY(call)                                                  \
  do {                                                                  \
    const cudaError_t e_ = (call);                                      \
    if (e_ != cudaSuccess) {                                            \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));  \
      return e_;                                                        \
    }                                                                   \
  } while (0)

/// The two-phase pattern of every dpo::cuda call, as dpo_step below spells it out: `call(ws,
/// bytes)` with a null workspace (the size query), then on a workspace of that size, then the
/// device-error check; frees the workspace.
template <class Call>
cudaError_t with_workspace(const Call& call, cudaStream_t stream) {
  std::size_t bytes = 0;
  DPO_TRY(call(nullptr, bytes));
  void* d_ws = nullptr;
  CUDA_TRY(cudaMalloc(&d_ws, bytes));
  DPO_TRY(call(d_ws, bytes));
  DPO_TRY(dpo::cuda::read_device_error(d_ws, stream));
  return cudaFree(d_ws);
}

/// One step, TRL's concatenated layout ([2P, T, V] bf16 logits: P chosen then P rejected
/// sequences; labels [2P, T] with -100 on prompt and padding), the gradient written over the
/// logits. d_* are device pointers the trainer owns.
cudaError_t dpo_step(bf16* d_logits, const std::int64_t* d_labels, std::int64_t P, std::int64_t T,
                     std::int64_t V, const double* d_ref_chosen, const double* d_ref_rejected,
                     double* d_loss, dpo::cuda::metrics* d_metrics, cudaStream_t stream) {
  const auto policy = dpo::padded_pairs(static_cast<const bf16*>(d_logits), d_labels, 2 * P, T, V, V);
  const dpo::loss_config cfg;  // sigmoid, beta 0.1 (TRL's defaults)
  dpo::cuda::forward_outputs out;
  out.loss = d_loss;  // every output is optional; null ones are not written
  out.metrics = d_metrics;
  const dpo::cuda::options opt;

  // 1. Size query: checks the arguments, launches nothing. (In a trainer, size the workspace
  //    once for the largest batch and reuse it: the size depends only on the shapes.)
  std::size_t bytes = 0;
  DPO_TRY(dpo::cuda::dpo_forward(nullptr, bytes, policy, d_ref_chosen, d_ref_rejected, cfg, out, opt,
                                 stream));
  void* d_ws = nullptr;
  CUDA_TRY(cudaMalloc(&d_ws, bytes));

  // 2. Forward: one read of the logits; the per-row state stays in the workspace.
  DPO_TRY(dpo::cuda::dpo_forward(d_ws, bytes, policy, d_ref_chosen, d_ref_rejected, cfg, out, opt,
                                 stream));
  // 3. Backward in place: same views, options and workspace; grad_output null means 1.
  const dpo::pair_grad_view<bf16> grad{d_logits, V, d_logits, V};
  DPO_TRY(dpo::cuda::dpo_backward(d_ws, bytes, policy, grad, /*grad_output=*/nullptr, opt, stream));

  // 4. Optional: errors only the device can see (a label outside [0, V), ...). Synchronizes.
  DPO_TRY(dpo::cuda::read_device_error(d_ws, stream));
  return cudaFree(d_ws);
}

/// The same step with the per-row state kept by the caller (d_row_lse, d_row_coef: 2P * T
/// doubles each, one per row of the logits buffer): the forward's workspace can be freed or
/// reused before the backward, which needs only a small one of its own.
cudaError_t dpo_step_rows(bf16* d_logits, const std::int64_t* d_labels, std::int64_t P,
                          std::int64_t T, std::int64_t V, const double* d_ref_chosen,
                          const double* d_ref_rejected, double* d_loss, double* d_row_lse,
                          double* d_row_coef, cudaStream_t stream) {
  const auto policy = dpo::padded_pairs(static_cast<const bf16*>(d_logits), d_labels, 2 * P, T, V, V);
  const dpo::loss_config cfg;
  dpo::cuda::forward_outputs out;
  out.loss = d_loss;
  out.row_lse = d_row_lse;
  out.row_coef = d_row_coef;
  const dpo::cuda::options opt;

  // The forward's workspace is freed here, before the backward's is allocated.
  const cudaError_t e = with_workspace(
      [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::dpo_forward(ws, bytes, policy, d_ref_chosen, d_ref_rejected, cfg, out, opt,
                                      stream);
      },
      stream);
  if (e != cudaSuccess) return e;
  const dpo::pair_grad_view<bf16> grad{d_logits, V, d_logits, V};
  return with_workspace(
      [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::dpo_backward_rows(ws, bytes, policy, d_row_lse, d_row_coef, grad, nullptr,
                                            opt, stream);
      },
      stream);
}

/// The step with the reference model's logits (same layout and labels) instead of its
/// log-probs: dpo_forward_backward runs the reference pass, the policy's forward and the
/// backward in place, on one workspace (two reads of the policy logits, one of the
/// reference's, one write).
cudaError_t dpo_step_ref(bf16* d_logits, const bf16* d_ref_logits, const std::int64_t* d_labels,
                         std::int64_t P, std::int64_t T, std::int64_t V, double* d_loss,
                         cudaStream_t stream) {
  const auto policy = dpo::padded_pairs(static_cast<const bf16*>(d_logits), d_labels, 2 * P, T, V, V);
  const auto reference = dpo::padded_pairs(d_ref_logits, d_labels, 2 * P, T, V, V);
  const dpo::loss_config cfg;
  dpo::cuda::forward_outputs out;
  out.loss = d_loss;
  const dpo::pair_grad_view<bf16> grad{d_logits, V, d_logits, V};
  const dpo::cuda::options opt;

  return with_workspace(
      [&](void* ws, std::size_t& bytes) {
        return dpo::cuda::dpo_forward_backward(ws, bytes, policy, reference, cfg, out, grad, opt,
                                               stream);
      },
      stream);
}

// ---- the demonstration ---------------------------------------------------------------------

/// A small random batch on the device.
struct batch {
  std::int64_t P = 2, T = 24, V = 1031;  // V odd: rows are not 16-byte aligned
  std::vector<bf16> logits, ref_logits;
  std::vector<std::int64_t> labels;
  bf16* d_logits = nullptr;
  bf16* d_ref_logits = nullptr;
  std::int64_t* d_labels = nullptr;
  double* d_out = nullptr;  // loss, ref log-probs [2P], metrics, row state [2 * 2PT]

  std::size_t elems() const { return static_cast<std::size_t>(2 * P * T * V); }
  cudaError_t upload() {
    CUDA_TRY(cudaMemcpy(d_logits, logits.data(), elems() * sizeof(bf16), cudaMemcpyHostToDevice));
    return cudaSuccess;
  }
  std::vector<bf16> download() const {
    std::vector<bf16> h(elems());
    cudaMemcpy(h.data(), d_logits, elems() * sizeof(bf16), cudaMemcpyDeviceToHost);
    return h;
  }
};

double read_double(const double* d) {
  double h = 0;
  cudaMemcpy(&h, d, sizeof(double), cudaMemcpyDeviceToHost);
  return h;
}

int run() {
  batch b;
  std::uint64_t state = 12345;
  const auto uniform = [&] {  // in [0, 1)
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(state >> 40) / 16777216.0f;
  };
  b.logits.resize(b.elems());
  b.ref_logits.resize(b.elems());
  for (std::size_t i = 0; i < b.elems(); ++i) {
    b.logits[i] = __float2bfloat16_rn(8.0f * uniform() - 4.0f);
    b.ref_logits[i] = __float2bfloat16_rn(8.0f * uniform() - 4.0f);
  }
  b.labels.resize(static_cast<std::size_t>(2 * b.P * b.T));
  for (std::size_t r = 0; r < b.labels.size(); ++r) {
    const std::int64_t t = static_cast<std::int64_t>(r) % b.T;
    b.labels[r] = t < 4 || t >= b.T - 2 ? -100 : static_cast<std::int64_t>(uniform() * b.V);
  }
  const std::int64_t N = 2 * b.P * b.T;
  CUDA_TRY(cudaMalloc(&b.d_logits, b.elems() * sizeof(bf16)));
  CUDA_TRY(cudaMalloc(&b.d_ref_logits, b.elems() * sizeof(bf16)));
  CUDA_TRY(cudaMalloc(&b.d_labels, b.labels.size() * sizeof(std::int64_t)));
  const std::size_t metric_slots = sizeof(dpo::cuda::metrics) / sizeof(double);
  CUDA_TRY(cudaMalloc(&b.d_out, (1 + 2 * b.P + metric_slots + 2 * N) * sizeof(double)));
  CUDA_TRY(cudaMemcpy(b.d_ref_logits, b.ref_logits.data(), b.elems() * sizeof(bf16), cudaMemcpyHostToDevice));
  CUDA_TRY(cudaMemcpy(b.d_labels, b.labels.data(), b.labels.size() * sizeof(std::int64_t),
                      cudaMemcpyHostToDevice));
  double* d_loss = b.d_out;
  double* d_ref = b.d_out + 1;  // [chosen P, rejected P]
  auto* d_metrics = reinterpret_cast<dpo::cuda::metrics*>(d_ref + 2 * b.P);
  double* d_rows = d_ref + 2 * b.P + metric_slots;

  // The reference log-probs, from the reference logits.
  {
    const auto reference = dpo::padded_pairs(static_cast<const bf16*>(b.d_ref_logits), b.d_labels,
                                             2 * b.P, b.T, b.V, b.V);
    CUDA_TRY(with_workspace(
        [&](void* ws, std::size_t& bytes) {
          return dpo::cuda::pair_logps(ws, bytes, reference, 1.0, d_ref, d_ref + b.P);
        },
        0));
  }

  CUDA_TRY(b.upload());
  CUDA_TRY(dpo_step(b.d_logits, b.d_labels, b.P, b.T, b.V, d_ref, d_ref + b.P, d_loss, d_metrics, 0));
  const double loss1 = read_double(d_loss);
  dpo::cuda::metrics m{};
  CUDA_TRY(cudaMemcpy(&m, d_metrics, sizeof(m), cudaMemcpyDeviceToHost));
  const std::vector<bf16> grad1 = b.download();

  CUDA_TRY(b.upload());
  CUDA_TRY(dpo_step_rows(b.d_logits, b.d_labels, b.P, b.T, b.V, d_ref, d_ref + b.P, d_loss, d_rows,
                         d_rows + N, 0));
  const double loss2 = read_double(d_loss);
  const std::vector<bf16> grad2 = b.download();

  CUDA_TRY(b.upload());
  CUDA_TRY(dpo_step_ref(b.d_logits, b.d_ref_logits, b.d_labels, b.P, b.T, b.V, d_loss, 0));
  const double loss3 = read_double(d_loss);
  const std::vector<bf16> grad3 = b.download();

  double gnorm = 0;
  for (const bf16& g : grad1) gnorm += static_cast<double>(__bfloat162float(g)) * __bfloat162float(g);
  std::printf("loss %.6f  reward margin %.6f  reward accuracy %.2f  entropy %.4f  |grad| %.3e\n",
              loss1, m.rewards_margins, m.rewards_accuracies, m.entropy, std::sqrt(gnorm));
  const auto same = [](const std::vector<bf16>& a, const std::vector<bf16>& c) {
    return std::memcmp(a.data(), c.data(), a.size() * sizeof(bf16)) == 0;
  };
  const bool ok = std::isfinite(loss1) && gnorm > 0 && loss2 == loss1 && loss3 == loss1 &&
                  same(grad2, grad1) && same(grad3, grad1);
  std::printf("workspace state, caller's row state, reference logits: %s\n",
              ok ? "the same loss and gradient, bitwise" : "MISMATCH");
  cudaFree(b.d_logits);
  cudaFree(b.d_ref_logits);
  cudaFree(b.d_labels);
  cudaFree(b.d_out);
  return ok ? 0 : 1;
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  return run();
}
