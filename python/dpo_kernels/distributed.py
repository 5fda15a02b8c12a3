# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Vocabulary-parallel (tensor-parallel LM head) and context-parallel sequence_logps and
dpo_loss_from_logits over torch.distributed (docs/distributed.md).

The kernels are the library's sharded building blocks (include/dpo/cpu/shard.hpp, the
``shard_*`` ops, whose fake kernels are in _shard_ops.py); the collectives between them are
functional all-reduces (``torch.distributed._functional_collectives.all_reduce``, out of
place) on the given groups, issued here and waited at once in eager mode:

* vocabulary group (``process_group``): one MAX all-reduce of ``[rows]`` doubles (each row's
  max over the shards) and one SUM all-reduce of ``[rows, len(SHARD_FIELDS)]`` doubles (the
  rows' partial sums, shifted to the global max in between);
* context group (``cp_group``): one SUM all-reduce of the per-sequence sums
  (``[2, S]`` for sequence_logps, ``[len(SEQ_FIELDS), 2P]`` for the DPO loss).

The backward needs no collective: every rank holds the global row statistics and sequence
gradients after the forward, and writes the gradient of its own logits shard. With an explicit
``vocab_range`` one more (tiny) all-gather learns the global vocabulary and checks that the
ranks' ranges tile it.

torch.compile(fullgraph=True) traces all of it (the same code: the functional collectives go
into the graph), with two differences, since a graph can neither read a tensor on the host
nor catch a kernel's error (docs/distributed.md, "torch.compile"): ``vocab_range`` is not
all-gathered in the graph, the global vocabulary comes from an earlier eager call on this rank
with the same group, range and shard width, whatever the rows (a ValueError without one); and
with ``cp_group`` a rank whose slice a kernel rejects raises out of the graph before the
context all-reduce (its peers wait there until that process exits or the group times out);
the all-reduce still carries the rejected count, read in the graph as on CUDA (NaN sums),
never on the host.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import _C
from ._ops import CONFIG_NAMES, _first_order_only, ops

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


def _check_groups(process_group, cp_group) -> None:
    """ValueError naming the argument for a group that is not a ProcessGroup (torch's own errors,
    e.g. "Group x is not registered", name neither)."""
    for name, group in (("process_group", process_group), ("cp_group", cp_group)):
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__} "
                             f"{group!r}")


def _all_reduce(t, op, group):
    """The all-reduce (`op`: "sum" or "max") of `t` over `group`, out of place: one functional
    collective (torch.distributed._functional_collectives), which torch.compile traces into
    the graph and eager mode runs at once (waited here, so the result is a plain tensor)."""
    out = funcol.all_reduce(t, op, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def vocab_shard(logits: torch.Tensor, process_group, vocab_range) -> tuple[int, int]:
    """``(start, vocab)``: this rank's first column and the global vocabulary size.

    Without ``vocab_range`` the shard is Megatron's ``[rank * V_local, (rank + 1) * V_local)``
    of ``world * V_local`` columns (every rank must hold the same ``V_local`` and rows: the
    caller's contract, not checked, since checking costs a collective and a host
    synchronisation). With ``vocab_range=(start, end)`` (``end - start`` must be the logits'
    last dimension) the ranks all-gather their ranges and every rank checks that they tile
    ``[0, V)`` without gap or overlap and that the ranks agree on the rows, so a bad range or
    shape raises on every rank. Under torch.compile the global vocabulary is the one an eager
    call on this rank found for the same group, range and shard width (ValueError if none did).
    """
    V_local = logits.shape[-1]
    return _shard(V_local, logits.shape[:-1].numel(), logits.device, process_group, vocab_range, "logits'")


#: The global vocabularies every vocab_range an eager call has checked on this rank was part
#: of, by (the group's ranks, start, end, shard width): what a compiled call reads, since it
#: can neither all-gather the ranges nor read them on the host inside the graph. More than one
#: (this rank's range the same in two tilings, e.g. (0, 4) of V = 10 and of V = 12) leaves a
#: compiled call unable to tell which holds: it raises rather than guess.
_CHECKED_RANGES: dict = {}


def _shard(V_local, rows, device, process_group, vocab_range, what):
    """vocab_shard for a shard of V_local columns (logits) or weight rows (the head) over `rows`
    rows of `what` (a possessive for the messages)."""
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
    if not all(-(2**63) <= x < 2**63 for x in vocab_range):
        raise ValueError(f"vocab_range = {tuple(vocab_range)} is outside the range of int64")
    # Not keyed by the rows, which vary from batch to batch (packed sequences): one entry per
    # range, so the cache does not grow over a run, and a compiled call with new shapes needs
    # no new eager call (the ranks agreeing on the rows is then the caller's contract, as
    # without vocab_range).
    key = (tuple(dist.get_process_group_ranks(process_group)), start, end, V_local)
    if torch.compiler.is_compiling():
        vocabs = _CHECKED_RANGES.get(key, ())
        if len(vocabs) > 1:
            raise ValueError(
                f"vocab_range = {tuple(vocab_range)} (shard width {V_local}) was checked on this rank as part of "
                f"global vocabularies of {sorted(vocabs)} columns: under torch.compile the ranks' ranges cannot be "
                "all-gathered, so a compiled call cannot tell which holds; call it eagerly, or give each vocabulary "
                "its own process_group")
        if not vocabs:
            raise ValueError(
                f"vocab_range = {tuple(vocab_range)} has not been checked on this rank: under torch.compile the "
                "ranks' ranges cannot be all-gathered and checked inside the graph: run one eager call with the same "
                "process_group, vocab_range and shard width on every rank first (it checks the ranges; the compiled "
                "call then uses the global vocabulary it found)")
        (vocab,) = vocabs
        return start, vocab
    # One all-gather of (start, end, width, rows): every rank checks every rank's values.
    mine = torch.tensor([start, end, V_local, rows], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    ranges = [tuple(int(x) for x in r.tolist()) for r in gathered]
    # Every rank checks every rank's range, so a bad one raises everywhere (no rank is left
    # waiting in the next collective).
    cols = "logits have" if what == "logits'" else "weight has"
    for k, (s, e, width, n) in enumerate(ranges):
        if e - s != width:
            raise ValueError(f"vocab_range = ({s}, {e}) of rank {k} holds {e - s} columns but its {cols} {width}")
        # An empty shard is refused here, on every rank, rather than by that rank's kernel
        # alone (which would leave its peers waiting in the next collective).
        if width < 1:
            raise ValueError(f"vocab_range = ({s}, {e}) of rank {k} is empty: every rank of process_group must hold "
                             f"at least one column of the vocabulary (its {cols} {width})")
        if n != ranges[0][3]:
            raise ValueError(f"the ranks of process_group disagree on the {what} rows: rank 0 has {ranges[0][3]}, "
                             f"rank {k} has {n}; every rank must hold the same rows (its own columns of them)")
    pos = 0
    for s, e, _, _ in sorted(ranges):
        if s != pos:
            raise ValueError(f"the ranks' vocab_range values {[r[:2] for r in ranges]} (in rank order) do not tile "
                             "[0, V) without gap or overlap: each range must start where another one ends")
        pos = e
    _CHECKED_RANGES.setdefault(key, set()).add(pos)
    return start, pos


def _combined_records(logits, labels, cu_seqlens, ignore_index, start, vocab, group, metrics):
    """Phase 1 on the shard and the two vocabulary all-reduces: (row_max, records), global."""
    row_max, records = ops.shard_partials(logits, labels, cu_seqlens, ignore_index, start, vocab, metrics)
    return _combine(row_max, records, group)


def _combine(row_max, records, group):
    """The two vocabulary all-reduces around shard_rebase: phase 1's (row_max, records) of
    every rank of `group` combined into the rows' global ones."""
    if group is not None:
        row_max = _all_reduce(row_max, "max", group)
    records = ops.shard_rebase(row_max, records)
    if group is not None:
        records = _all_reduce(records, "sum", group)
    return row_max, records


def _num_seqs(logits, cu_seqlens):
    if logits.dim() == 3:
        return logits.shape[0]
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1


def head_num_seqs(hidden, cu_seqlens):
    """The sequences of a hidden-state layout: [2P, T, H] padded, or [N, H] packed by cu_seqlens."""
    return hidden.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


#: What a context rank's own input can raise (its checks and kernels): caught, counted in the
#: context all-reduce and re-raised, so that its peers raise too instead of waiting for it.
_REJECTED = (ValueError, TypeError)


def _context_sum(buf, group, error):
    """The context group's all-reduce of `buf`, with one more element that counts the ranks
    whose own rows were rejected (`error`: this rank's ValueError / TypeError or None). A
    context rank's labels (shapes, dtypes) are its own, so a bad one is found on that rank
    only: it still takes part in the all-reduce, and then every rank raises (this one its own
    error, unchanged) instead of its peers waiting for it."""
    # new_full, not new_tensor: a fill on the device, no copy from host memory (a sync on CUDA).
    flat = torch.cat([buf.reshape(-1), buf.new_full((1,), 0.0 if error is None else 1.0)])
    flat = _all_reduce(flat, "sum", group)
    if error is not None:
        raise error
    if flat.is_cuda or torch.compiler.is_compiling():
        # No host synchronisation on the device (nor a host read in a compiled graph): a
        # rejected peer makes the sums (so the loss and metrics) NaN here instead of raising;
        # the rejected rank itself raised above.
        return torch.where(flat[-1] > 0, torch.nan, flat[:-1]).view_as(buf)
    bad = int(flat[-1].item())
    if bad:
        raise ValueError(f"{bad} rank(s) of cp_group rejected their input (their own error says which argument); "
                         "this rank's input was valid")
    return flat[:-1].view_as(buf)


def reject_before_context(error, cp_group, num_seqs, fields, device):
    """Raises `error`, this rank's ValueError / TypeError found before its first context
    all-reduce (its vocab_range check, which its whole vocabulary group shares, or the checks
    of a reference head in its own dtype), after taking part in that all-reduce as a rejected
    rank ([fields, num_seqs] zeros and the count, the peers' buffer), so that its cp_group
    peers (in other vocabulary groups) raise too instead of waiting for it. Without cp_group,
    or in a compiled graph (which cannot catch the error), it raises at once."""
    if cp_group is None or not isinstance(cp_group, dist.ProcessGroup) or torch.compiler.is_compiling():
        raise error
    _context_sum(torch.zeros(fields, num_seqs, dtype=torch.float64, device=device), cp_group, error)
    raise error  # _context_sum raised it


def _shard_or_reject(shard, cp, num_seqs, fields, device):
    """shard() (vocab_shard or _head_shard); a rejection is told to the context group first."""
    if cp is None or torch.compiler.is_compiling():
        return shard()
    try:
        return shard()
    except _REJECTED as e:
        reject_before_context(e, cp, num_seqs, fields, device)


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
        except _REJECTED as e:
            if cp is None:
                raise
            error, seq = e, torch.zeros(len(SEQ_FIELDS), _num_seqs(logits, cu_seqlens), dtype=torch.float64,
                                        device=logits.device)
        two = torch.stack((seq[_LOGPS], seq[_TOKENS]))  # no index tensor to copy to the device
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
        # As the unsharded ops: a gradient taken with create_graph=True raises when
        # differentiated again (the backward kernel has no derivative) instead of dropping terms.
        return _first_order_only("sequence_logps", (out,), (logits,)) + (None,) * 8


def _check_reference_logps(ref, name, num_seqs):
    """A reference log-prob vector against the pairs of this rank's layout: floating, [P]
    (shard_pair_stage checks it too, but after the context all-reduce: this check runs
    before it, so that a bad one raises on every context rank)."""
    if ref is None or num_seqs < 2 or num_seqs % 2:
        return  # absent, or a layout the kernels reject themselves
    if not ref.is_floating_point():
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {ref.dtype}")
    if ref.dim() != 1 or ref.shape[0] != num_seqs // 2:
        raise ValueError(f"{name} must have shape [{num_seqs // 2}], got {list(ref.shape)}")


def _pair_forward(rows_and_seq, num_seqs, cp, ref_c, ref_r, config, compute_metrics, device):
    """The DPO forward around a shard's phase 1 and 2 (`rows_and_seq()`: the vocabulary
    collectives inside; returns row_max, records and the [len(SEQ_FIELDS), 2P] sums): the
    context all-reduce (with the count of ranks whose slice was rejected) and the pair stage.
    Returns (row_max, records, loss, metrics, pair_values, seq_grad, nll_token_grad)."""
    error = row_max = records = None
    try:
        if cp is not None:
            _check_reference_logps(ref_c, "reference_chosen_logps", num_seqs)
            _check_reference_logps(ref_r, "reference_rejected_logps", num_seqs)
        row_max, records, seq = rows_and_seq()
    except _REJECTED as e:
        if cp is None:
            raise
        error, seq = e, torch.zeros(len(SEQ_FIELDS), num_seqs, dtype=torch.float64, device=device)
    if cp is not None:
        seq = _context_sum(seq, cp, error)
    return (row_max, records) + tuple(ops.shard_pair_stage(seq, ref_c, ref_r, *config, compute_metrics))


def _pair_outputs(ctx, dtype, loss, m, pairs):
    out = _result_dtype(dtype)
    m, pairs = m.to(out), pairs.to(out)
    ctx.mark_non_differentiable(m, pairs)
    return loss.to(out), m, pairs


class _ShardedDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, cu_seqlens, ref_c, ref_r, ignore_index, start, vocab, tp, cp, config,
                compute_metrics):
        ld_alpha = config[_LD_ALPHA]
        metrics = compute_metrics or config[_USE_WEIGHTING]

        def rows_and_seq():
            row_max, records = _combined_records(logits, labels, cu_seqlens, ignore_index, start, vocab, tp, metrics)
            seq = ops.shard_sequence_partials(logits, labels, cu_seqlens, row_max, records, ignore_index, start,
                                              vocab, ld_alpha, True, metrics)
            return row_max, records, seq

        row_max, records, loss, m, pairs, seq_grad, nll = _pair_forward(
            rows_and_seq, _num_seqs(logits, cu_seqlens), cp, ref_c, ref_r, config, compute_metrics, logits.device)
        ctx.save_for_backward(logits, labels, cu_seqlens, row_max, records, seq_grad, nll)
        ctx.args = (ignore_index, start, vocab, ld_alpha)
        return _pair_outputs(ctx, logits.dtype, loss, m, pairs)

    @staticmethod
    def backward(ctx, grad_loss, _m, _p):
        logits, labels, cu_seqlens, row_max, records, seq_grad, nll = ctx.saved_tensors
        ignore_index, start, vocab, ld_alpha = ctx.args
        g = grad_loss.to(torch.float64)
        out = ops.shard_backward(seq_grad * g, nll * g, logits, labels, cu_seqlens, row_max, records, ignore_index,
                                 start, vocab, ld_alpha, True)
        return _first_order_only("dpo_loss_from_logits", (out,), (logits,)) + (None,) * 11


# ---- the fused LM head on a weight shard [V_local, H] (dpo/cpu/linear_shard.hpp) ---------------
#
# Forward: phase 1 (one GEMM pass over the weight shard), the MAX and SUM all-reduces over the
# tensor-parallel group, phase 2 (and for DPO the context group's SUM and the pair stage).
# Backward: the shard-local backward gives dWeight / dBias of the shard's rows and this
# rank's PARTIAL dHidden, summed by ONE all-reduce over the tensor-parallel group (Megatron's
# column-parallel head: the all-reduce of the input gradient); none without a group.


def _sum_hidden_grad(gh, tp):
    if tp is not None and gh.numel():
        gh = _all_reduce(gh, "sum", tp)
    return gh


class _ShardedHeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transforms, flags, ignore_index, workspace_bytes, start, vocab,
                tp):
        row_max, records = ops.linear_shard_partials(hidden, weight, bias, targets, *transforms, ignore_index, start,
                                                     vocab, any(flags), workspace_bytes)
        row_max, records = _combine(row_max, records, tp)
        logps, ent, lssp, mean, top1 = ops.linear_shard_values(row_max, records, targets, ignore_index, vocab, *flags)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, records, ent)
        ctx.args = (transforms, ignore_index, workspace_bytes, start, vocab, tp, flags[0])
        out = _result_dtype(hidden.dtype)
        res = (logps.to(out), ent.to(out), lssp.to(out), mean.to(out), top1)
        ctx.mark_non_differentiable(*res[2:])
        if not flags[0]:
            ctx.mark_non_differentiable(res[1])
        return res

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_):
        hidden, weight, bias, targets, row_max, records, ent = ctx.saved_tensors
        transforms, ignore_index, workspace_bytes, start, vocab, tp, entropy = ctx.args
        if not entropy:
            grad_entropy = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if (grad_logps is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return (None,) * 3 + none
        gh, gw, gb = ops.linear_shard_backward(
            grad_logps, grad_entropy, hidden, weight, bias, targets, row_max, records,
            ent if grad_entropy is not None else None, *transforms, ignore_index, start, vocab, need_h, need_w,
            need_b and bias is not None, workspace_bytes)
        # Every rank of the group runs this backward (its outputs feed the same loss), so the
        # all-reduce is entered by all of them.
        gh = _sum_hidden_grad(gh, tp) if need_h else None
        grads = (gh, gw if need_w else None, gb if need_b and bias is not None else None)
        return _first_order_only("linear_logprobs", grads, (hidden, weight, bias)) + none


class _ShardedHeadDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, cu_seqlens, ref_c, ref_r, transforms, ignore_index,
                workspace_bytes, start, vocab, tp, cp, config, compute_metrics):
        ld_alpha = config[_LD_ALPHA]
        metrics = compute_metrics or config[_USE_WEIGHTING]

        def rows_and_seq():
            row_max, records = ops.linear_dpo_shard_partials(hidden, weight, bias, labels, cu_seqlens, *transforms,
                                                             ignore_index, start, vocab, metrics, workspace_bytes)
            row_max, records = _combine(row_max, records, tp)
            seq = ops.linear_dpo_shard_sequences(hidden, labels, cu_seqlens, row_max, records, ignore_index, start,
                                                 start + weight.shape[0], vocab, ld_alpha, metrics)
            return row_max, records, seq

        num_seqs = head_num_seqs(hidden, cu_seqlens)
        row_max, records, loss, m, pairs, seq_grad, nll = _pair_forward(
            rows_and_seq, num_seqs, cp, ref_c, ref_r, config, compute_metrics, hidden.device)
        ctx.save_for_backward(hidden, weight, bias, labels, cu_seqlens, row_max, records, seq_grad, nll)
        ctx.args = (transforms, ignore_index, workspace_bytes, start, vocab, tp, ld_alpha)
        return _pair_outputs(ctx, hidden.dtype, loss, m, pairs)

    @staticmethod
    def backward(ctx, grad_loss, _m, _p):
        hidden, weight, bias, labels, cu_seqlens, row_max, records, seq_grad, nll = ctx.saved_tensors
        transforms, ignore_index, workspace_bytes, start, vocab, tp, ld_alpha = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_loss.to(torch.float64)
        gh, gw, gb = ops.linear_dpo_shard_backward(
            seq_grad * g, nll * g, hidden, weight, bias, labels, cu_seqlens, row_max, records, *transforms,
            ignore_index, start, vocab, ld_alpha, need_h, need_w, need_b and bias is not None, workspace_bytes)
        gh = _sum_hidden_grad(gh, tp) if need_h else None
        grads = (gh, gw if need_w else None, gb if need_b and bias is not None else None)
        return _first_order_only("dpo_loss_from_hidden", grads, (hidden, weight, bias)) + (None,) * 13


def sequence_logps(logits, labels, cu_seqlens, ignore_index, average, process_group, vocab_range, cp_group):
    """dpo_kernels.sequence_logps with ``process_group`` / ``vocab_range`` / ``cp_group``."""
    _check_groups(process_group, cp_group)
    start, vocab = _shard_or_reject(lambda: vocab_shard(logits, process_group, vocab_range), cp_group,
                                    _num_seqs(logits, cu_seqlens), 2, logits.device)
    return _ShardedLogps.apply(logits, labels, cu_seqlens, ignore_index, average, start, vocab, process_group,
                               cp_group)


def dpo_loss_from_logits(logits, labels, ref_c, ref_r, cu_seqlens, ignore_index, config, compute_metrics,
                         process_group, vocab_range, cp_group):
    """The loss, metrics and pair values of dpo_loss_from_logits on a shard (arguments checked by the caller)."""
    _check_groups(process_group, cp_group)
    if cp_group is not None and config[_LD_ALPHA] != 1.0:
        raise ValueError(f"ld_alpha = {config[_LD_ALPHA]} is unsupported with cp_group: LD-DPO weights a token by "
                         "its position in the whole sequence, which a context slice does not know")
    start, vocab = _shard_or_reject(lambda: vocab_shard(logits, process_group, vocab_range), cp_group,
                                    _num_seqs(logits, cu_seqlens), len(SEQ_FIELDS), logits.device)
    return _ShardedDPO.apply(logits, labels, cu_seqlens, ref_c, ref_r, ignore_index, start, vocab, process_group,
                             cp_group, config, compute_metrics)


def _head_shard(hidden, weight, process_group, vocab_range):
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    return _shard(weight.shape[0], rows, weight.device, process_group, vocab_range, "hidden states'")


def linear_logprobs(hidden, weight, bias, targets, transforms, flags, ignore_index, workspace_bytes, process_group,
                    vocab_range):
    """dpo_kernels.linear_logprobs on a weight shard (arguments checked and cast by the caller):
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] ([0] when not
    requested), the same on every rank."""
    _check_groups(process_group, None)
    start, vocab = _head_shard(hidden, weight, process_group, vocab_range)
    return _ShardedHeadLogps.apply(hidden, weight, bias, targets, transforms, flags, ignore_index, workspace_bytes,
                                   start, vocab, process_group)


def _reference_from_hidden(policy, ref, labels, cu_seqlens, transforms, ignore_index, ld_alpha, workspace_bytes,
                           start, vocab, tp, cp):
    """The reference's sequence log-probs ([P] chosen, [P] rejected; LD-DPO weighted as the
    policy's) from its hidden states on this rank's rows of its head, forward only: phase 1
    and 2 as for the policy, with the same collectives (MAX and SUM over `tp`, SUM of the
    per-sequence sums over `cp`, which counts rejected ranks as _pair_forward's). `policy`:
    (hidden, weight, bias), which `ref` (ref_hidden, ref_weight, ref_bias) is checked against
    first, inside what the context all-reduce counts."""
    hidden = policy[0]
    error = None
    with torch.no_grad():
        try:
            ref_hidden, ref_weight, ref_bias = _check_reference_head(*policy, *ref)
            row_max, records = ops.linear_dpo_shard_partials(ref_hidden, ref_weight, ref_bias, labels, cu_seqlens,
                                                             *transforms, ignore_index, start, vocab, False,
                                                             workspace_bytes)
            row_max, records = _combine(row_max, records, tp)
            seq = ops.linear_dpo_shard_sequences(ref_hidden, labels, cu_seqlens, row_max, records, ignore_index, start,
                                                 start + ref_weight.shape[0], vocab, ld_alpha, False)
        except _REJECTED as e:
            if cp is None:
                raise
            num_seqs = head_num_seqs(hidden, cu_seqlens)
            error, seq = e, torch.zeros(len(SEQ_FIELDS), num_seqs, dtype=torch.float64, device=hidden.device)
        if cp is not None:
            seq = _context_sum(seq, cp, error)
    logps = seq[_LOGPS]
    P = logps.shape[0] // 2
    return logps[:P].contiguous(), logps[P:].contiguous()


def _check_reference_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias):
    """ref_hidden / ref_weight / ref_bias against the policy's (the shapes a rank holds: the
    reference head is sharded as the policy's, over the same vocab_range)."""
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has {tuple(hidden.shape)}: the "
                         "reference's hidden states must be this rank's rows of the same batch")
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but hidden has {hidden.dtype}")
    if ref_weight is None:  # the policy's head, as the single-process op
        ref_weight, ref_bias = weight, bias
    if ref_weight.shape != weight.shape:
        raise ValueError(f"ref_weight has shape {tuple(ref_weight.shape)} but weight has {tuple(weight.shape)}: with "
                         "process_group the reference head must be sharded as the policy's (the same vocab_range)")
    if ref_weight.dtype != hidden.dtype:
        raise TypeError(f"ref_weight has dtype {ref_weight.dtype} but ref_hidden has {hidden.dtype}")
    if ref_bias is not None and (ref_bias.dim() != 1 or ref_bias.shape[0] != weight.shape[0]):
        raise ValueError(f"ref_bias has shape {tuple(ref_bias.shape)}: must be [{weight.shape[0]}] (this rank's rows "
                         "of the reference head's bias)")
    return ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


def dpo_loss_from_hidden(hidden, weight, bias, labels, ref_c, ref_r, cu_seqlens, transforms, ignore_index, config,
                         compute_metrics, workspace_bytes, process_group, vocab_range, cp_group, ref=None):
    """The loss, metrics and pair values of dpo_loss_from_hidden on a weight shard and/or a
    context slice (arguments checked by the caller). ref: (ref_hidden, ref_weight, ref_bias)
    instead of ref_c / ref_r, sharded as the policy's (ref_weight None: the policy's head)."""
    _check_groups(process_group, cp_group)
    if cp_group is not None and config[_LD_ALPHA] != 1.0:
        raise ValueError(f"ld_alpha = {config[_LD_ALPHA]} is unsupported with cp_group: LD-DPO weights a token by "
                         "its position in the whole sequence, which a context slice does not know")
    num_seqs = head_num_seqs(hidden, cu_seqlens)
    start, vocab = _shard_or_reject(lambda: _head_shard(hidden, weight, process_group, vocab_range), cp_group,
                                    num_seqs, len(SEQ_FIELDS), hidden.device)
    if ref is not None:
        ref_c, ref_r = _reference_from_hidden((hidden, weight, bias), ref, labels, cu_seqlens, transforms, ignore_index,
                                              config[_LD_ALPHA], workspace_bytes, start, vocab, process_group,
                                              cp_group)
    return _ShardedHeadDPO.apply(hidden, weight, bias, labels, cu_seqlens, ref_c, ref_r, transforms, ignore_index,
                                 workspace_bytes, start, vocab, process_group, cp_group, config, compute_metrics)
