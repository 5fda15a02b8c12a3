// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The two C++ steps with NCCL that docs/distributed.md shows (a weight shard of the fused
// head, and a logits shard with shard_check), as functions the build compiles with nvcc when
// nccl.h is found, so that the page's calls stay valid: tests/CMakeLists.txt checks that the
// page quotes each body verbatim (between the BEGIN and END lines; hence unindented). Never
// run here: the real step is tested through the same calls in test_cuda_shard.cpp and
// test_cuda_shard_linear.cpp, with the collectives on the host.
#include <cuda_bf16.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>

#include "dpo/cuda/linear_shard.cuh"
#include "dpo/cuda/shard.cuh"

namespace dpo_docs {

void head_shard_step(const __nv_bfloat16* w_shard, const __nv_bfloat16* b_shard, const __nv_bfloat16* hidden,
                     const std::int64_t* labels, std::int64_t V, std::int64_t start, std::int64_t end, std::int64_t N,
                     std::int64_t H, void* ws, std::size_t bytes, cublasLtHandle_t lt,
                     const dpo::cuda::linear_options& opt, double* records, double* row_max, double* logp,
                     double* lse, double* entropy, const double* grad_logps,
                     const dpo::linear_grads<__nv_bfloat16, __nv_bfloat16>& grads, ncclComm_t tp_comm,
                     cudaStream_t stream) {
// BEGIN head_shard_step
// rank t of the tensor-parallel group: weight rows [start, end) of a vocabulary of V.
dpo::linear_head<__nv_bfloat16> head = dpo::make_linear_head(w_shard, end - start, H, H, b_shard);
auto view = dpo::linear_view_of(hidden, N, H, head, labels);           // labels: global ids
const dpo::vocab_shard sh{V, start, end};
dpo::cuda::linear_chunking ch;
dpo::cuda::linear_workspace_size(view, opt, &ch);                      // ch.workspace_bytes
dpo::cuda::linear_shard_partials(ws, bytes, lt, view, sh, records, row_max, true, opt, stream);
ncclAllReduce(row_max, row_max, N, ncclFloat64, ncclMax, tp_comm, stream);
dpo::cuda::shard_rebase(0, N, row_max, records, stream);
ncclAllReduce(records, records, N * dpo::shard_fields, ncclFloat64, ncclSum, tp_comm, stream);
dpo::cuda::linear_shard_logps(view, V, row_max, records, {logp, lse, entropy}, stream);
// ... the loss; then its gradient per token, grad_logps [N] (e.g. seq_grad[s] on sequence s's rows):
dpo::cuda::linear_shard_backward(ws, bytes, lt, view, sh, row_max, records, grad_logps, nullptr, nullptr,
                                 grads, opt, stream);                   // grads.hidden: this rank's partial
ncclAllReduce(grads.hidden, grads.hidden, N * H, ncclBfloat16, ncclSum, tp_comm, stream);
// END head_shard_step
}

void logits_shard_step(const dpo::pair_view<__nv_bfloat16, std::int64_t>& pairs, std::int64_t V, std::int64_t start,
                       std::int64_t end, std::int64_t rows, std::int64_t P, void* check_ws, double* records,
                       double* row_max, double* seq, void* stage_ws, std::size_t stage_bytes, const double* ref_c,
                       const double* ref_r, const dpo::loss_config& cfg, const dpo::forward_outputs& out,
                       double* seq_grad, void* bwd_ws, std::size_t bwd_bytes,
                       const dpo::pair_grad_view<__nv_bfloat16>& grads, ncclComm_t tp_comm, cudaStream_t stream) {
// BEGIN logits_shard_step
// rank t of the tensor-parallel group, logits columns [start, end) of a vocabulary of V
// (pairs: a dpo::pair_view over the shard's logits, vocab = end - start, labels global ids).
const dpo::vocab_shard sh{V, start, end};
dpo::cuda::options opt;
opt.num_rows = rows;                                                   // packed pairs
std::size_t check_bytes = 0;
dpo::cuda::shard_check(nullptr, check_bytes, pairs, sh, opt);          // size query
dpo::cuda::shard_check(check_ws, check_bytes, pairs, sh, opt, stream);
opt.error_word = dpo::cuda::shard_error_word(check_ws);               // gates the calls below
for (const auto& side : {pairs.chosen, pairs.rejected})                // one array, both sides
  dpo::cuda::shard_partials(side, sh, records, row_max, opt, stream);
ncclAllReduce(row_max, row_max, rows, ncclFloat64, ncclMax, tp_comm, stream);
dpo::cuda::shard_rebase(0, rows, row_max, records, stream);
ncclAllReduce(records, records, rows * dpo::shard_fields, ncclFloat64, ncclSum, tp_comm, stream);
dpo::cuda::shard_pair_partials(pairs, sh, row_max, records, row_max, records, cfg.ld_alpha, seq, opt, stream);
// (context parallelism: ncclAllReduce of seq, [seq_fields, 2P], over the context group)
dpo::cuda::shard_pair_stage(stage_ws, stage_bytes, P, seq, ref_c, ref_r, cfg, true, out, seq_grad, stream);
dpo::cuda::shard_backward(bwd_ws, bwd_bytes, pairs, sh, row_max, records, row_max, records, seq_grad,
                          out.nll_token_grad, cfg.ld_alpha, grads, nullptr, opt, stream);
// later, off the hot path: dpo::cuda::read_device_error(check_ws, stream) names a bad label.
// END logits_shard_step
}

}  // namespace dpo_docs
