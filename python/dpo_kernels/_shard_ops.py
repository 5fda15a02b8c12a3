# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Fake (meta) kernels of the sharded building blocks: the ``shard_*`` ops of csrc/shard.cpp,
the ``linear_shard_*`` ops of csrc/linear.cpp and the ``linear_dpo_shard_*`` ops of
csrc/linear_dpo.cpp, which dpo_kernels/distributed.py chains with collectives.

They give each output's shape, dtype and device exactly as the CPU and CUDA kernels return
them, without reading data, so torch.compile(fullgraph=True) traces the vocabulary- and
context-parallel paths (docs/distributed.md). The ops have no autograd formula of their own:
distributed.py's autograd.Functions call them (the backward ops in their backward).
"""
from __future__ import annotations

import torch

from . import _C
from ._ops import METRIC_NAMES, PAIR_VALUE_NAMES, _logits_grad_fake, _view_seq_len, cu_seqlens_seqs

_FIELDS = len(_C.shard_fields)
_SEQ_FIELDS = len(_C.seq_fields)
_F64 = torch.float64


def _view_rows(logits):
    """row_layout::view_rows() of make_layout (csrc/ops.cpp): [N, V] rows as they are, padded
    [B, T, V] B sequences of the view's seq_len rows (more than T for a strided view)."""
    if logits.dim() == 2:
        return logits.shape[0]
    B, T = logits.shape[0], logits.shape[1]
    return B * (_view_seq_len(logits) if B > 0 and T > 0 else T)


def _num_seqs(t, cu_seqlens):
    """make_layout's / lower_hidden's num_seqs: cu_seqlens' S, else a 3-D tensor's B, else one."""
    if cu_seqlens is not None:
        return cu_seqlens_seqs(cu_seqlens)
    return t.shape[0] if t.dim() == 3 else 1


def _records(t, rows):
    return t.new_empty((rows,), dtype=_F64), t.new_empty((rows, _FIELDS), dtype=_F64)


def _seq_sums(t, cu_seqlens):
    return t.new_empty((_SEQ_FIELDS, _num_seqs(t, cu_seqlens)), dtype=_F64)


def _head_grads(hidden_shape, hidden, weight, bias, need_hidden, need_weight, need_bias):
    """(dHidden, dWeight, dBias) of the head backwards (head.h): each [0] of its dtype when not
    needed (dBias also without a bias)."""
    need_bias = need_bias and bias is not None
    return (
        hidden.new_empty(hidden_shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty((weight.shape[0],) if need_bias else (0,)),
    )


# ---- logits shards (csrc/shard.cpp, cuda_shard.cu) ------------------------------------------------


@torch.library.register_fake("dpo_kernels::shard_partials")
def _shard_partials_fake(logits, labels, cu_seqlens, ignore_index, vocab_start, vocab_size, metrics):
    return _records(logits, _view_rows(logits))


@torch.library.register_fake("dpo_kernels::shard_rebase")
def _shard_rebase_fake(row_max, records):
    return records.new_empty(records.shape)


@torch.library.register_fake("dpo_kernels::shard_sequence_partials")
def _shard_sequence_partials_fake(logits, labels, cu_seqlens, row_max, records, ignore_index, vocab_start,
                                  vocab_size, ld_alpha, paired, metrics):
    return _seq_sums(logits, cu_seqlens)


@torch.library.register_fake("dpo_kernels::shard_pair_stage")
def _shard_pair_stage_fake(seq_totals, reference_chosen_logps, reference_rejected_logps, *config_and_metrics):
    P = seq_totals.shape[1] // 2
    return (
        seq_totals.new_empty((), dtype=_F64),
        seq_totals.new_empty((len(METRIC_NAMES),), dtype=_F64),
        seq_totals.new_empty((len(PAIR_VALUE_NAMES), P), dtype=_F64),
        seq_totals.new_empty((2 * P,), dtype=_F64),
        seq_totals.new_empty((), dtype=_F64),
    )


@torch.library.register_fake("dpo_kernels::shard_backward")
def _shard_backward_fake(seq_grad, nll_token_grad, logits, *rest):
    return _logits_grad_fake(logits)


# ---- head shards (csrc/linear.cpp, linear_dpo.cpp, cuda_linear_shard.cu) ---------------------------


@torch.library.register_fake("dpo_kernels::linear_shard_partials")
def _linear_shard_partials_fake(hidden, *rest):
    return _records(hidden, hidden.shape[0])


@torch.library.register_fake("dpo_kernels::linear_shard_values")
def _linear_shard_values_fake(row_max, records, targets, ignore_index, vocab_size, entropy, log_sum_sq_probs,
                              mean_logits, is_top1):
    N = targets.shape[0]

    def vec(flag, dtype=_F64):
        return targets.new_empty((N if flag else 0,), dtype=dtype)

    return vec(True), vec(entropy), vec(log_sum_sq_probs), vec(mean_logits), vec(is_top1, torch.bool)


@torch.library.register_fake("dpo_kernels::linear_shard_backward")
def _linear_shard_backward_fake(grad_logps, grad_entropy, hidden, weight, bias, targets, row_max, records, entropy,
                                temperature, softcap, logit_scale, ignore_index, vocab_start, vocab_size, need_hidden,
                                need_weight, need_bias, workspace_bytes):
    return _head_grads(hidden.shape, hidden, weight, bias, need_hidden, need_weight, need_bias)


def _hidden_rows(hidden, cu_seqlens):
    """lower_hidden's rows: [N, H] packed rows, or the 2P * T rows of [2P, T, H]."""
    return hidden.shape[0] if cu_seqlens is not None else hidden.shape[0] * hidden.shape[1]


@torch.library.register_fake("dpo_kernels::linear_dpo_shard_partials")
def _linear_dpo_shard_partials_fake(hidden, weight, bias, labels, cu_seqlens, *rest):
    return _records(hidden, _hidden_rows(hidden, cu_seqlens))


@torch.library.register_fake("dpo_kernels::linear_dpo_shard_sequences")
def _linear_dpo_shard_sequences_fake(hidden, labels, cu_seqlens, *rest):
    return _seq_sums(hidden, cu_seqlens)


@torch.library.register_fake("dpo_kernels::linear_dpo_shard_backward")
def _linear_dpo_shard_backward_fake(seq_grad, nll_token_grad, hidden, weight, bias, labels, cu_seqlens, row_max,
                                    records, temperature, softcap, logit_scale, ignore_index, vocab_start, vocab_size,
                                    ld_alpha, need_hidden, need_weight, need_bias, workspace_bytes):
    return _head_grads(hidden.shape, hidden, weight, bias, need_hidden, need_weight, need_bias)
