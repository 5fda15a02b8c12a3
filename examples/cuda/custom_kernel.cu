// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Using dpo's block-level building blocks in your own kernel: a token-level cross-entropy
// with a z-loss term, forward and backward, that never materializes the softmax. One block
// per row: block_row_stats reads the row once (log-sum-exp, entropy, argmax), and
// block_row_grad writes coef * (onehot(y) - softmax) in place. The z-loss gradient
// (2 * zw * lse * softmax) folds into the same write because it is also a multiple of the
// softmax: d/dz [coef * (lse - z_y) + zw * lse^2] = (coef + 2 zw lse) softmax - coef onehot.
//
// Build: part of the CMake project (target dpo_example_custom_kernel). Runs only with a
// device; prints a note and exits 0 without one.
#include <cstdio>
#include <vector>

#include <dpo/cuda/block.cuh>

namespace {

constexpr int block = 256;

/// Per row: loss = -logp(y) + zw * lse^2, and the gradient of mean loss in place.
__global__ void ce_zloss_kernel(__nv_bfloat16* logits, const int* labels, std::int64_t vocab,
                                std::int64_t stride, float zw, float inv_rows, float* loss,
                                float* entropy) {
  const std::int64_t row = blockIdx.x;
  __nv_bfloat16* z = logits + row * stride;  // 64-bit offset: rows x stride may pass 2^31
  const int y = labels[row];
  const auto st = dpo::cuda::block_row_stats<block>(z, vocab);
  const float lse = st.logsumexp();
  if (threadIdx.x == 0) {
    loss[row] = lse - __bfloat162float(z[y]) + zw * lse * lse;
    entropy[row] = st.entropy();
  }
  // block_row_grad writes c * (onehot - softmax); here the softmax weight is
  // (inv_rows + 2 zw lse) and the one-hot weight inv_rows, so write with c = -(softmax
  // weight) and fix the label column's one-hot share after a barrier.
  __syncthreads();  // z[y] was read above, before the in-place write
  const float w = inv_rows * (1.0f + 2.0f * zw * lse);
  dpo::cuda::block_row_grad<block>(z, z, vocab, lse, -w, -1);
  __syncthreads();
  if (threadIdx.x == 0) {
    // The label column holds w * p_y; the one-hot term subtracts inv_rows.
    z[y] = __float2bfloat16_rn(__bfloat162float(z[y]) - inv_rows);
  }
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  const std::int64_t rows = 64, vocab = 32003;
  std::vector<__nv_bfloat16> h(static_cast<std::size_t>(rows * vocab));
  for (std::size_t i = 0; i < h.size(); ++i)
    h[i] = __float2bfloat16_rn(static_cast<float>((i * 2654435761u) % 1000) / 250.0f - 2.0f);
  std::vector<int> lab(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) lab[r] = static_cast<int>((r * 7919) % vocab);
  __nv_bfloat16* d_logits = nullptr;
  int* d_labels = nullptr;
  float* d_out = nullptr;
  cudaMalloc(&d_logits, h.size() * sizeof(__nv_bfloat16));
  cudaMalloc(&d_labels, lab.size() * sizeof(int));
  cudaMalloc(&d_out, 2 * rows * sizeof(float));
  cudaMemcpy(d_logits, h.data(), h.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice);
  cudaMemcpy(d_labels, lab.data(), lab.size() * sizeof(int), cudaMemcpyHostToDevice);
  ce_zloss_kernel<<<static_cast<unsigned>(rows), block>>>(d_logits, d_labels, vocab, vocab, 1e-4f,
                                                          1.0f / rows, d_out, d_out + rows);
  std::vector<float> out(static_cast<std::size_t>(2 * rows));
  const cudaError_t e = cudaMemcpy(out.data(), d_out, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    std::printf("error: %s\n", cudaGetErrorString(e));
    return 1;
  }
  double mean = 0;
  for (std::int64_t r = 0; r < rows; ++r) mean += out[r] / rows;
  std::printf("mean loss %.6f, entropy of row 0 %.6f\n", mean, out[rows]);
  cudaFree(d_logits);
  cudaFree(d_labels);
  cudaFree(d_out);
  return 0;
}
