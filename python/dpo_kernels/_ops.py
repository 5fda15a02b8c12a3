# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Autograd formulas and fake (meta) kernels of the torch.ops.dpo_kernels operators.

The operators themselves are defined in C++ (TORCH_LIBRARY in csrc/ops.cpp) with CPU (and,
when built, CUDA) kernels. Registering the autograd formulas and fake kernels here makes
them differentiable and traceable by torch.compile(fullgraph=True): the fake kernels compute
output shapes, dtypes and strides without touching data, so no op forces a host sync.
"""
from __future__ import annotations

import torch

from . import _C

ops = torch.ops.dpo_kernels

#: Names of the entries of the `metrics` output of dpo_forward, TRL's logging keys: the
#: library's metrics table (DPO_METRICS in include/dpo/core/metrics.hpp), read from the extension.
METRIC_NAMES = tuple(_C.metric_names)
assert len(METRIC_NAMES) == _C.num_metrics

#: Rows of the `pair_values` output of dpo_forward.
PAIR_VALUE_NAMES = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "losses", "weights")

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: TRL's loss type names the ops accept (the library's table, read from the extension).
LOSS_TYPES = tuple(_C.loss_types)

#: The loss configuration arguments of pair_loss, pair_loss_backward and dpo_forward, in schema
#: order, as ``(name, schema type, default)``: the extension's table (DPO_CONFIG_FIELDS in
#: csrc/common.h), from which the op schemas are generated too.
CONFIG_FIELDS = tuple(_C.config_fields)
CONFIG_NAMES = tuple(name for name, _, _ in CONFIG_FIELDS)


def _arg_positions(op) -> dict:
    """Argument name -> position in ``op``'s schema."""
    return {a.name: i for i, a in enumerate(op.default._schema.arguments)}


def _config_slice(op) -> slice:
    """Where the config arguments sit among ``op``'s (checked against CONFIG_NAMES)."""
    names = [a.name for a in op.default._schema.arguments]
    start = names.index(CONFIG_NAMES[0])
    if tuple(names[start:start + len(CONFIG_NAMES)]) != CONFIG_NAMES:
        raise ImportError(f"dpo_kernels: the schema of {op} does not hold the config fields {CONFIG_NAMES} in order")
    return slice(start, start + len(CONFIG_NAMES))


def whole(name: str, t, process_group=None):
    """``t`` as a plain tensor: a DTensor (FSDP2's sharded parameter, or any DTensor) gathered
    whole with ``full_tensor()``, which is differentiable (the gradient returns to the
    DTensor, with its placements); None and plain tensors as they are. With ``process_group``
    (the ops' own vocabulary sharding, Megatron's row split) a DTensor is refused: its
    placements need not be that split."""
    if t is None or not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if process_group is not None:
        raise TypeError(f"{name} is a DTensor and process_group is given: pass this rank's rows as a plain tensor "
                        f"({name}.to_local()) with their vocab_range")
    return t.full_tensor()


def check_devices(*named) -> None:
    """Raises unless every tensor of the ``(name, tensor or None)`` pairs is a tensor on the
    device of the first one. The dispatcher picks one kernel for a call with mixed devices:
    a ``meta`` tensor among CPU ones routes it to the fake kernel (uninitialised outputs), a
    CUDA one among CPU ones to the CUDA kernel, whose error names the wrong argument."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if first is None:
            first = (name, t)
        elif t.device != first[1].device:
            raise ValueError(
                f"{name} is on {t.device} but {first[0]} is on {first[1].device}: "
                "all tensor arguments must be on one device"
            )


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if logits.dtype not in _FLOATING:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, T, V] or [N, V], got shape {tuple(logits.shape)}")


def cu_seqlens_seqs(cu_seqlens: torch.Tensor) -> int:
    """S of ``cu_seqlens [S + 1]``, its shape checked as the kernels check it (make_layout), so
    that a fake kernel (and Python code sizing outputs by it) raises their ValueError naming
    the argument instead of an IndexError on a 0-d tensor."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {list(cu_seqlens.shape)}")
    return cu_seqlens.shape[0] - 1


def _num_seqs(logits: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    if logits.dim() == 3:
        return logits.shape[0]
    return cu_seqlens_seqs(cu_seqlens) if cu_seqlens is not None else 1


def _view_seq_len(logits: torch.Tensor):
    """Rows per sequence of the kernels' view of padded logits: make_layout's rule (csrc/common.h
    view_seq_len), evaluated by the extension on the fake tensor's sizes and strides (ints, or
    SymInts under dynamic shapes)."""
    return _C.view_seq_len(logits.shape, logits.stride())


# ---- no double backward ---------------------------------------------------------------------


class _NoDoubleBackward(torch.autograd.Function):
    """The identity on a gradient computed under ``create_graph=True``, whose own backward
    raises. The backward kernels have no derivative: without this node autograd would treat
    their results as constants and a second-order gradient would silently be None or miss
    terms. The node's inputs include the op's differentiable inputs, so any later backward
    that needs a derivative through this gradient reaches it."""

    @staticmethod
    def forward(ctx, op, grad, *inputs):
        ctx.op = op
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"dpo_kernels.{ctx.op}: double backward is not supported: the gradient computed with "
            "create_graph=True cannot be differentiated again (its backward kernel has no derivative)"
        )


def _first_order_only(op, grads, inputs):
    """``grads`` unchanged unless the backward runs with ``create_graph=True`` and some of
    ``inputs`` requires grad; then each gradient goes through :class:`_NoDoubleBackward`."""
    if not torch.is_grad_enabled():
        return grads
    tracked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not tracked:
        return grads
    return tuple(g if g is None else _NoDoubleBackward.apply(op, g, *tracked) for g in grads)


# ---- sequence_logps -----------------------------------------------------------------------


@torch.library.register_fake("dpo_kernels::sequence_logps")
def _sequence_logps_fake(logits, labels, cu_seqlens, ignore_index, average):
    check_devices(("logits", logits), ("labels", labels), ("cu_seqlens", cu_seqlens))
    _check_logits(logits)
    out = _result_dtype(logits.dtype)
    S = _num_seqs(logits, cu_seqlens)
    # row_lse is float64 whatever the logits' dtype: the backward reads its low part.
    return logits.new_empty((S,), dtype=out), logits.new_empty(logits.shape[:-1], dtype=torch.float64)


def _logits_grad_fake(logits):
    """The gradient the C++ backwards return for ``logits``: it has the C++ view's row
    indexing, a strided [B, T, V] view of [B, k, V] when the input's sequences sit k > T rows
    apart (``_view_seq_len``); [N, V] as the input for packed rows."""
    if logits.dim() == 2:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    B, T, V = logits.shape
    k = _view_seq_len(logits)
    return torch.empty_strided((B, T, V), (k * V, V, 1), dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("dpo_kernels::sequence_logps_backward")
def _sequence_logps_backward_fake(grad, logits, labels, cu_seqlens, row_lse, ignore_index, average):
    return _logits_grad_fake(logits)


def _sequence_logps_setup(ctx, inputs, output):
    logits, labels, cu_seqlens, ignore_index, average = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, labels, cu_seqlens, output[1])
    ctx.ignore_index = ignore_index
    ctx.average = average


def _sequence_logps_backward(ctx, grad_logps, _grad_lse):
    logits, labels, cu_seqlens, row_lse = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        with torch.no_grad():
            grad = ops.sequence_logps_backward(
                grad_logps, logits, labels, cu_seqlens, row_lse, ctx.ignore_index, ctx.average
            )
        (grad,) = _first_order_only("sequence_logps", (grad,), (logits, grad_logps))
    return grad, None, None, None, None


torch.library.register_autograd(
    "dpo_kernels::sequence_logps", _sequence_logps_backward, setup_context=_sequence_logps_setup
)

# ---- pair-level loss ------------------------------------------------------------------------

_PAIR_LOSS_ARGS = len(_arg_positions(ops.pair_loss))
_PAIR_LOSS_CONFIG = _config_slice(ops.pair_loss)  # the last arguments, as in pair_loss_backward

_PAIR_ARG_NAMES = (
    "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
    "chosen_lengths", "rejected_lengths", "weights",
)


@torch.library.register_fake("dpo_kernels::pair_loss")
def _pair_loss_fake(pc, pr, rc, rr, lc, lr, w, *config):
    check_devices(*zip(_PAIR_ARG_NAMES, (pc, pr, rc, rr, lc, lr, w)))
    _C.check_config(*config)
    _C.check_references(*config, rc is not None, rr is not None)
    P = pc.shape[0]
    out = _result_dtype(pc.dtype)
    return tuple(pc.new_empty((P,), dtype=out) for _ in range(3))


@torch.library.register_fake("dpo_kernels::pair_loss_backward")
def _pair_loss_backward_fake(g, pc, pr, rc, rr, lc, lr, w, *config):
    _C.check_config(*config)
    P = pc.shape[0]
    return pc.new_empty((P,)), pr.new_empty((P,))


def _pair_loss_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(*inputs[:_PAIR_LOSS_CONFIG.start])
    ctx.config = inputs[_PAIR_LOSS_CONFIG]


def _pair_loss_backward(ctx, grad_losses, _gc, _gr):
    tensors = ctx.saved_tensors
    with torch.no_grad():
        gc, gr = ops.pair_loss_backward(grad_losses, *tensors, *ctx.config)
    gc, gr = _first_order_only("dpo_loss", (gc, gr), (tensors[0], tensors[1], grad_losses))
    return (gc, gr) + (None,) * (_PAIR_LOSS_ARGS - 2)


torch.library.register_autograd("dpo_kernels::pair_loss", _pair_loss_backward, setup_context=_pair_loss_setup)

# ---- fused loss from logits -------------------------------------------------------------------

_DPO_FORWARD_ARG = _arg_positions(ops.dpo_forward)
_DPO_FORWARD_CONFIG = _config_slice(ops.dpo_forward)


@torch.library.register_fake("dpo_kernels::dpo_forward")
def _dpo_forward_fake(*args):
    logits, labels, cu_seqlens, rc, rr, ref_logits = args[:6]
    config = args[_DPO_FORWARD_CONFIG]
    check_devices(("logits", logits), ("labels", labels), ("cu_seqlens", cu_seqlens),
                  ("reference_chosen_logps", rc), ("reference_rejected_logps", rr), ("ref_logits", ref_logits))
    _check_logits(logits)
    if ref_logits is not None:
        _check_logits(ref_logits, "ref_logits")  # any floating dtype: the reference pass reads its own
        if ref_logits.shape != logits.shape:
            raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                             f"got {tuple(ref_logits.shape)}")
    _C.check_config(*config)
    _C.check_references(*config, rc is not None or ref_logits is not None,
                        rr is not None or ref_logits is not None)
    S = _num_seqs(logits, cu_seqlens)
    if S % 2 != 0 or S < 2:
        raise ValueError(f"logits holds {S} sequences: the concatenated layout needs an even number 2P >= 2")
    P = S // 2
    out = _result_dtype(logits.dtype)
    return (
        logits.new_empty((), dtype=out),
        logits.new_empty((len(METRIC_NAMES),), dtype=out),
        logits.new_empty((len(PAIR_VALUE_NAMES), P), dtype=out),
        logits.new_empty(logits.shape[:-1], dtype=torch.float64),
        logits.new_empty(logits.shape[:-1], dtype=torch.float64),
    )


@torch.library.register_fake("dpo_kernels::dpo_backward")
def _dpo_backward_fake(grad_loss, logits, labels, cu_seqlens, row_lse, row_coef, ignore_index):
    return _logits_grad_fake(logits)


@torch.library.register_fake("dpo_kernels::dpo_backward_")
def _dpo_backward_inplace_fake(grad_loss, logits, labels, cu_seqlens, row_lse, row_coef, ignore_index):
    return None


def _dpo_backward_inplace_version(keyset, grad_loss, logits, *rest):
    # What PyTorch's own in-place ops (and torch.library.custom_op) do: a new version of the
    # mutated tensor, so autograd raises if some node saved the old one for its backward.
    # After the call: a rejected call writes nothing and leaves the version alone.
    ops.dpo_backward_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, grad_loss, logits, *rest)
    torch.autograd.graph.increment_version(logits)


_lib = torch.library.Library("dpo_kernels", "IMPL")
_lib.impl("dpo_backward_", _dpo_backward_inplace_version, "ADInplaceOrView", with_keyset=True)


def _dpo_forward_setup(ctx, inputs, output):
    logits, labels, cu_seqlens = inputs[:3]
    ignore_index = inputs[_DPO_FORWARD_ARG["ignore_index"]]
    ctx.inplace = inputs[_DPO_FORWARD_ARG["inplace_backward"]]
    if ctx.inplace:
        check_inplace_target(logits, tracing_ok=True)
    ctx.overwritten = False
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(logits, labels, cu_seqlens, output[3], output[4])
    ctx.ignore_index = ignore_index


def check_inplace_target(logits: torch.Tensor, tracing_ok: bool = False) -> None:
    """inplace_backward=True writes the gradient into the logits: refuse a leaf that requires
    grad, or a view of one (its data would become its own gradient). With ``tracing_ok`` (the
    autograd formula) it is skipped while torch.compile traces the forward, where every graph
    input looks like a leaf; the public function has checked the caller's tensor by then."""
    compiling = torch.compiler.is_compiling()
    if tracing_ok and compiling:
        return
    leaf = logits.is_leaf and logits.requires_grad
    if not leaf and not compiling:
        base = logits._base
        leaf = base is not None and base.is_leaf and base.requires_grad
    if leaf:
        raise ValueError(
            "inplace_backward=True needs logits computed by an op (e.g. the LM head's output), not a "
            "leaf tensor that requires grad or a view of one: the backward would overwrite the leaf's "
            "data with its gradient. Use inplace_backward=False."
        )


def _dpo_forward_backward(ctx, grad_loss, *_):
    if not ctx.needs_input_grad[0]:
        return (None,) * len(_DPO_FORWARD_ARG)
    if ctx.inplace and ctx.overwritten:
        raise RuntimeError(
            "dpo_loss_from_logits(inplace_backward=True): a backward pass already overwrote the logits "
            "with their gradient, so a second backward through this loss (retain_graph=True) cannot run. "
            "Use inplace_backward=False to backpropagate more than once."
        )
    logits, labels, cu_seqlens, row_lse, row_coef = ctx.saved_tensors
    with torch.no_grad():
        if ctx.inplace:
            # Bumps the logits' version (its ADInplaceOrView kernel): autograd then raises if
            # another node saved them for its own backward (it would read the gradient).
            ops.dpo_backward_(grad_loss, logits, labels, cu_seqlens, row_lse, row_coef, ctx.ignore_index)
            ctx.overwritten = True
            grad = logits
        else:
            grad = ops.dpo_backward(grad_loss, logits, labels, cu_seqlens, row_lse, row_coef, ctx.ignore_index)
    (grad,) = _first_order_only("dpo_loss_from_logits", (grad,), (logits, grad_loss))
    return (grad,) + (None,) * (len(_DPO_FORWARD_ARG) - 1)


torch.library.register_autograd("dpo_kernels::dpo_forward", _dpo_forward_backward, setup_context=_dpo_forward_setup)
