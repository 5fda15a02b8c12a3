# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Vocabulary-parallel (tensor-parallel LM head) and context-parallel sequence_logps and
dpo_loss_from_logits over torch.distributed (docs/distributed.md).

The kernels are the library's sharded building blocks (include/dpo/cpu/shard.hpp, the
``shard_*`` ops); the collectives between them are ``torch.distributed.all_reduce`` calls on
the given groups, issued here, on the current stream:

* vocabulary group (``process_group``): one MAX all-reduce of ``[rows]`` doubles (each row's
  max over the shards) and one SUM all-reduce of ``[rows, len(SHARD_FIELDS)]`` doubles (the
  rows' partial sums, shifted to the global max in between);
* context group (``cp_group``): one SUM all-reduce of the per-sequence sums
  (``[2, S]`` for sequence_logps, ``[len(SEQ_FIELDS), 2P]`` for the DPO loss).

The backward needs no collective: every rank holds the global row statistics and sequence
gradients after the forward, and writes the gradient of its own logits shard. With an explicit
``vocab_range`` one more (tiny) all-gather learns the global vocabulary and checks that the
ranks' ranges tile it. Eager mode only: torch.compile would need functional collectives
(not done).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _C
from ._ops import CONFIG_NAMES, ops

#: Fields of a row's shard record, in buffer order (DPO_SHARD_FIELDS of include/dpo/core/shard.hpp).
SHARD_FIELDS = tuple(_C.shard_fields)
#: Fields of the per-sequence sums combined over the context group (DPO_SEQ_FIELDS).
SEQ_FIELDS = tuple(_C.seq_fields)

_TOKENS = SEQ_FIELDS.index("tokens")
_LOGPS = SEQ_FIELDS.index("logps")
_LD_ALPHA = CONFIG_NAMES.index("ld_alpha")
_USE_WEIGHTING = CONFIG_NAMES.index("use_weighting")


def _group_info(group):
    return dist.get_rank(group), dist.get_world_size(group)


def vocab_shard(logits: torch.Tensor, process_group, vocab_range) -> tuple[int, int]:
    """``(start, vocab)``: this rank's first column and the global vocabulary size.

    Without ``vocab_range`` the shard is Megatron's ``[rank * V_local, (rank + 1) * V_local)``
    of ``world * V_local`` columns (every rank must hold the same ``V_local``: the caller's
    contract, not checked). With ``vocab_range=(start, end)`` (``end - start`` must be the
    logits' last dimension) the ranks all-gather their ranges and every rank checks that they
    tile ``[0, V)`` without gap or overlap, so a bad range raises on every rank.
    """
    V_local = logits.shape[-1]
    if process_group is None:
        if vocab_range is not None:
            raise ValueError("vocab_range needs process_group (the tensor-parallel group that holds the other shards)")
        return 0, V_local
    rank, world = _group_info(process_group)
    if vocab_range is None:
        return rank * V_local, world * V_local
    if (not isinstance(vocab_range, (tuple, list)) or len(vocab_range) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in vocab_range)):
        raise TypeError(f"vocab_range must be a pair of ints (start, end), got {vocab_range!r}")
    start, end = vocab_range
    rows = logits.numel() // max(V_local, 1)
    # One all-gather of (start, end, width, rows): every rank checks every rank's values.
    mine = torch.tensor([start, end, V_local, rows], dtype=torch.int64, device=logits.device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    ranges = [tuple(int(x) for x in r.tolist()) for r in gathered]
    # Every rank checks every rank's range, so a bad one raises everywhere (no rank is left
    # waiting in the next collective).
    for k, (s, e, width, n) in enumerate(ranges):
        if e - s != width:
            raise ValueError(f"vocab_range = ({s}, {e}) of rank {k} holds {e - s} columns but its logits have "
                             f"{width}")
        if n != ranges[0][3]:
            raise ValueError(f"the ranks of process_group disagree on the logits' rows: rank 0 has {ranges[0][3]}, "
                             f"rank {k} has {n}; every rank must hold the same rows (its own columns of them)")
    pos = 0
    for s, e, _, _ in sorted(ranges):
        if s != pos:
            raise ValueError(f"the ranks' vocab_range values {[r[:2] for r in ranges]} (in rank order) do not tile "
                             "[0, V) without gap or overlap: each range must start where another one ends")
        pos = e
    return start, pos


def _combined_records(logits, labels, cu_seqlens, ignore_index, start, vocab, group, metrics):
    """Phase 1 on the shard and the two vocabulary all-reduces: (row_max, records), global."""
    row_max, records = ops.shard_partials(logits, labels, cu_seqlens, ignore_index, start, vocab, metrics)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    records = ops.shard_rebase(row_max, records)
    if group is not None:
        dist.all_reduce(records, op=dist.ReduceOp.SUM, group=group)
    return row_max, records


def _num_seqs(logits, cu_seqlens):
    if logits.dim() == 3:
        return logits.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1


def _context_sum(buf, group, error):
    """The context group's all-reduce of `buf`, with one more element that counts the ranks
    whose own rows were rejected (`error`: this rank's ValueError or None). A context rank's
    labels are its own, so a bad one is found on that rank only: it still takes part in the
    all-reduce, and then every rank raises instead of its peers waiting for it."""
    flat = torch.cat([buf.reshape(-1), buf.new_tensor([0.0 if error is None else 1.0])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    bad = int(flat[-1].item())
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{bad} rank(s) of cp_group rejected their input (their own error says which argument); "
                         "this rank's input was valid")
    return flat[:-1].view_as(buf)


def _result_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ShardedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, cu_seqlens, ignore_index, average, start, vocab, tp, cp):
        error = None
        try:
            row_max, records = _combined_records(logits, labels, cu_seqlens, ignore_index, start, vocab, tp, False)
            seq = ops.shard_sequence_partials(logits, labels, cu_seqlens, row_max, records, ignore_index, start,
                                              vocab, 1.0, False, False)
        except ValueError as e:
            if cp is None:
                raise
            error, seq = e, torch.zeros(len(SEQ_FIELDS), _num_seqs(logits, cu_seqlens), dtype=torch.float64)
        two = seq[[_LOGPS, _TOKENS]].contiguous()
        if cp is not None:
            two = _context_sum(two, cp, error)
        sums, counts = two[0], two[1]
        logps = sums / counts.clamp_min(1) if average else sums
        ctx.save_for_backward(logits, labels, cu_seqlens, row_max, records, counts)
        ctx.args = (ignore_index, average, start, vocab)
        return logps.to(_result_dtype(logits.dtype))

    @staticmethod
    def backward(ctx, grad):
        logits, labels, cu_seqlens, row_max, records, counts = ctx.saved_tensors
        ignore_index, average, start, vocab = ctx.args
        g = grad.to(torch.float64)
        if average:
            g = g / counts.clamp_min(1)
        out = ops.shard_backward(g, g.new_zeros(()), logits, labels, cu_seqlens, row_max, records, ignore_index,
                                 start, vocab, 1.0, False)
        return (out,) + (None,) * 8


class _ShardedDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, cu_seqlens, ref_c, ref_r, ignore_index, start, vocab, tp, cp, config,
                compute_metrics):
        ld_alpha = config[_LD_ALPHA]
        metrics = compute_metrics or config[_USE_WEIGHTING]
        error = None
        try:
            row_max, records = _combined_records(logits, labels, cu_seqlens, ignore_index, start, vocab, tp, metrics)
            seq = ops.shard_sequence_partials(logits, labels, cu_seqlens, row_max, records, ignore_index, start,
                                              vocab, ld_alpha, True, metrics)
        except ValueError as e:
            if cp is None:
                raise
            error, seq = e, torch.zeros(len(SEQ_FIELDS), _num_seqs(logits, cu_seqlens), dtype=torch.float64)
        if cp is not None:
            seq = _context_sum(seq, cp, error)
        loss, m, pairs, seq_grad, nll = ops.shard_pair_stage(seq, ref_c, ref_r, *config, compute_metrics)
        ctx.save_for_backward(logits, labels, cu_seqlens, row_max, records, seq_grad, nll)
        ctx.args = (ignore_index, start, vocab, ld_alpha)
        out = _result_dtype(logits.dtype)
        m, pairs = m.to(out), pairs.to(out)
        ctx.mark_non_differentiable(m, pairs)
        return loss.to(out), m, pairs

    @staticmethod
    def backward(ctx, grad_loss, _m, _p):
        logits, labels, cu_seqlens, row_max, records, seq_grad, nll = ctx.saved_tensors
        ignore_index, start, vocab, ld_alpha = ctx.args
        g = grad_loss.to(torch.float64)
        out = ops.shard_backward(seq_grad * g, nll * g, logits, labels, cu_seqlens, row_max, records, ignore_index,
                                 start, vocab, ld_alpha, True)
        return (out,) + (None,) * 11


def sequence_logps(logits, labels, cu_seqlens, ignore_index, average, process_group, vocab_range, cp_group):
    """dpo_kernels.sequence_logps with ``process_group`` / ``vocab_range`` / ``cp_group``."""
    start, vocab = vocab_shard(logits, process_group, vocab_range)
    return _ShardedLogps.apply(logits, labels, cu_seqlens, ignore_index, average, start, vocab, process_group,
                               cp_group)


def dpo_loss_from_logits(logits, labels, ref_c, ref_r, cu_seqlens, ignore_index, config, compute_metrics,
                         process_group, vocab_range, cp_group):
    """The loss, metrics and pair values of dpo_loss_from_logits on a shard (arguments checked by the caller)."""
    if cp_group is not None and config[_LD_ALPHA] != 1.0:
        raise ValueError(f"ld_alpha = {config[_LD_ALPHA]} is unsupported with cp_group: LD-DPO weights a token by "
                         "its position in the whole sequence, which a context slice does not know")
    start, vocab = vocab_shard(logits, process_group, vocab_range)
    return _ShardedDPO.apply(logits, labels, cu_seqlens, ref_c, ref_r, ignore_index, start, vocab, process_group,
                             cp_group, config, compute_metrics)
