// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Host-side interface of the CUDA test harness (harness.cu, compiled by nvcc), so the
// Catch2 tests compile with g++ and never include CUDA headers. Logits travel as raw bytes
// of the element type; the tests decode them with Eigen's half / bfloat16.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dpo/core/layout.hpp"
#include "dpo/core/loss.hpp"
#include "dtype.hpp"

namespace dpo_cuda_test {

/// Number of CUDA devices; 0 when there is none or the driver cannot be used.
int device_count();
/// Name of device 0 and its free / total memory in bytes.
std::string device_name();
std::size_t free_device_memory();


enum class mode {
  forward_backward,   // dpo_forward_backward (grad_output 1)
  forward_then_backward,  // dpo_forward, then dpo_backward with a device grad_output
  forward_only,       // dpo_forward
  sequence_logps,     // over all 2P sequences as one view
  pair_logps,
  backward_only,      // dpo_backward on a fresh workspace (no forward state)
  backward_rows,      // dpo_forward with row_lse / row_coef outputs, then dpo_backward_rows
};

/// One call of the CUDA API on host data. The layout is TRL's concatenated one (2P sequences,
/// chosen first): padded when cu_seqlens is empty, packed otherwise.
struct case_in {
  dtype type = dtype::bf16;
  bool labels64 = true;
  mode run = mode::forward_backward;
  std::int64_t num_seqs = 2;  // 2P (an odd value tests the check)
  std::int64_t seq_len = 0;
  std::int64_t seq_stride = 0;            // padded: token_view::seq_stride of both sides
  std::int64_t vocab = 0;
  std::int64_t row_stride = 0;
  std::int64_t rows = 0;                  // rows of the logits buffer
  std::vector<std::int64_t> cu_seqlens;   // empty: padded
  std::vector<unsigned char> logits;      // rows * row_stride elements of `type`
  std::vector<std::int64_t> labels;       // rows
  std::vector<std::uint8_t> mask;         // empty: no mask
  std::int64_t ignore_index = -100;
  std::vector<double> ref_chosen, ref_rejected;  // P each (empty: null pointers)
  // Reference logits (the reference-logits overloads, in the modes forward_backward,
  // forward_then_backward and forward_only): empty for none, else the layout of `logits`,
  // with ref_labels when given (rows entries) and the policy's labels otherwise.
  std::vector<unsigned char> ref_logits;
  std::vector<std::int64_t> ref_labels;
  std::int64_t ref_num_seqs = 0;          // the reference view's 2P (0: num_seqs)
  bool ref_f32 = false;                   // ref_logits are fp32 (a bf16 policy only): mixed dtypes
  dpo::loss_config cfg;
  bool metrics = true;
  bool in_place = false;
  std::int64_t grad_stride = 0;           // out of place: the gradient's row stride
  std::int64_t grad_offset = 0;           // out of place: elements before the first grad row
  double grad_output = 1.0;
  double ld_alpha = 1.0;                  // pair_logps
  // Argument-error injection.
  bool null_labels = false;
  bool null_ref = false;                  // also nulls the reference logits pointer
  bool small_workspace = false;
  bool grad_overlaps = false;             // grad = logits shifted by one row
  bool give_num_rows = true;              // packed: set options.num_rows
  int workspace_fill = 0xa5;              // the workspace's bytes before the call
};

struct case_out {
  int status_code = 0;  // cudaError_t of the call (0: success)
  std::string message;
  int device_error = 0;  // device_error_code read back from the workspace
  std::string device_message;
  double loss = 0;
  std::vector<double> metrics;  // 11: rewards chosen, rejected, margins, accuracies, then as dpo::metrics
  std::vector<double> losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps,
      chosen_tokens, rejected_tokens, weights, grad_chosen, grad_rejected;
  double nll_token_grad = 0;
  std::vector<double> sums;             // sequence_logps / pair_logps (chosen then rejected)
  std::vector<std::int64_t> counts;     // sequence_logps
  std::vector<double> token_logps;      // sequence_logps
  std::vector<unsigned char> grad;      // the gradient buffer (or the logits, in place)
  bool outputs_untouched = false;       // every output still holds its poison value
};

/// Runs one case. Outputs are poisoned with NaN before the call.
case_out run_case(const case_in& in);

/// The rows x vocab > 2^31 case (bf16, 16640 rows x 129280): padded, 8 pairs x 1040 rows,
/// logits filled on the device. Returns false when the device lacks the memory.
struct large_out {
  std::int64_t rows = 0, vocab = 0, seq_len = 0, num_seqs = 0;
  std::vector<std::int64_t> labels;
  std::vector<double> sums;                   // sequence_logps of all sequences
  std::vector<double> ref_chosen, ref_rejected;  // what the fused call was given
  std::vector<double> chosen_logps, rejected_logps, grad_chosen, grad_rejected;
  double loss = 0;
  std::vector<std::int64_t> checked_rows;     // rows copied back
  std::vector<std::uint16_t> logits_rows;     // their logits before the backward (bf16 bits)
  std::vector<std::uint16_t> grad_rows;       // their gradient (in place)
  std::vector<std::int64_t> seq_checked;      // sequences whose rows are all copied back
  std::vector<std::uint16_t> seq_logits;      // logits of those sequences
};
bool run_large(large_out* out);

/// dpo::cuda::dpo_loss on host arrays (empty vector: null pointer). Fills loss, metrics,
/// the per-pair vectors and nll_token_grad of case_out.
struct loss_case {
  dpo::loss_config cfg;
  std::vector<double> chosen, rejected, ref_chosen, ref_rejected, chosen_tokens,
      rejected_tokens, weights;
};
case_out run_dpo_loss(const loss_case& in);

/// Captures dpo_forward_backward (and sequence_logps) on a stream into a CUDA graph, replays
/// it twice and compares with a direct call, bitwise. Returns "" on success, else what failed.
std::string graph_capture_check();

/// dpo::cuda::sequence_logps with its row_lse output over all num_seqs sequences of `in` as
/// one view (padded when cu_seqlens is empty, then sequence s starts at row s * seq_stride,
/// seq_stride 0 meaning seq_len; packed otherwise), then sequence_logps_backward with
/// seq_grad (num_seqs entries) into the gradient buffer of `in`: the logits when in_place,
/// else a buffer of grad_offset + rows * grad_stride elements poisoned with 0xff bytes.
/// status_code / message / device_error are the first failure's; sums, counts, token_logps
/// (rows entries) and row_lse (rows entries) start as NaN; grad is the gradient buffer.
struct sequence_out : case_out {
  std::vector<double> row_lse;
};
sequence_out run_sequence_case(const case_in& in, std::int64_t seq_stride,
                               const std::vector<double>& seq_grad);

/// The status message of dpo::cuda's host argument checks, which read no memory: so the
/// views may hold host pointers. check_pairs(view, "logits") then, when grad != null,
/// check_grad, with options::num_rows = num_rows; "" when both pass.
/// Row state (row_lse / row_coef, indexed by the logits buffer's row) on layouts where the
/// sides would share entries: each call's status message, and whether the row state, the
/// loss and the gradient kept their fill (nothing written).
struct row_state_out {
  std::string forward_shared;          // dpo_forward, separate_pairs over the same rows
  std::string forward_backward_shared; // dpo_forward_backward, the same
  std::string rows_shared;             // dpo_backward_rows, the same
  std::string rows_separate;           // dpo_backward_rows, two logits buffers
  bool untouched = false;
};
row_state_out row_state_errors();

/// Forward outputs that overlap each other or the call's inputs (logits rows, labels,
/// reference log-probs or logits, the gradient, the workspace) on dpo_forward (both
/// overloads), dpo_forward_backward (both) and dpo_loss (outputs among themselves and the
/// workspace): each case's description ("call: A on B") and status message ("" if it
/// passed), whether every byte of every buffer kept its value, and the message of dpo_loss
/// with out.chosen_logps on in.chosen_logps (allowed: its inputs are copied first).
struct output_alias_out {
  struct named { std::string what, message; };
  std::vector<named> cases;
  bool untouched = false;
  std::string loss_in_place;
};
output_alias_out output_alias_errors();

/// The logits gradients on the other inputs of dpo_backward, dpo_backward_rows,
/// dpo_forward_backward and sequence_logps_backward (labels, cu_seqlens, row state, seq_grad,
/// grad_output, reference log-probs, the workspace), and sequence_logps / pair_logps outputs
/// on each other or their inputs: each case "call: A on B" and the status message;
/// untouched: no buffer changed; loss_in_place: the status of a valid in-place call.
output_alias_out logits_alias_errors();

/// read_device_error's message after calls that have nothing to compute (sequence_logps of
/// no sequence, sequence_logps_backward of a view without rows), on a workspace that held
/// `garbage` bytes (0xa5 fill) or a previous call's label error: empty when they clear it.
std::string empty_call_error(bool backward, bool previous_error);

std::string check_message(const dpo::pair_view<float, std::int64_t>& view,
                          const dpo::pair_grad_view<float>* grad, std::int64_t num_rows);

}  // namespace dpo_cuda_test
