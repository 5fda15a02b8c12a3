# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The fused LM-head op (issue 13): :func:`linear_logprobs`, its fake kernel and autograd.

The operator ``torch.ops.dpo_kernels.linear_logprobs`` runs the library's linear head (CPU:
csrc/linear.cpp on include/dpo/cpu/linear.hpp; CUDA: csrc/cuda_linear.cu on
kernels/dpo/cuda/linear.cuh, cuBLASLt GEMMs on PyTorch's handle and current stream): per-token log-probs of ``hidden @ weight.T +
bias`` through TRL's logit transforms, one chunk of logits at a time, never the whole
``[N, V]`` logits. The backward recomputes the chunks (``linear_logprobs_backward``) and is a
plain autograd node, so DDP / FSDP hooks fire as for any op.
"""
from __future__ import annotations

import numbers

import torch

from ._ops import _first_order_only, ops, whole

#: TRL's optional per-token outputs, in the order :func:`linear_logprobs` returns them after
#: the log-probs (``trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS``).
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

#: The default workspace budget of the head (bytes): 256 MiB, the C++ default.
DEFAULT_WORKSPACE_BYTES = 256 << 20

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_head(hidden, weight, bias, targets, sharded: bool = False) -> None:
    """The shape / dtype / device checks of the op, shared by the eager wrapper and the fake
    kernel (so torch.compile rejects what eager rejects). Messages name the argument.
    `sharded` (a vocab_range): an empty weight shard is left to the ranges' all-gather, which
    refuses it on every rank of the group (raising here, on this rank only, would leave the
    others waiting in that all-gather)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dtype not in _FLOATING:
        raise TypeError(f"hidden must be float32, float64, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOATING:
        raise TypeError(f"weight must be float32, float64, bfloat16 or float16, got {weight.dtype}")
    if bias is not None and bias.dtype not in _FLOATING:
        raise TypeError(f"bias must be float32, float64, bfloat16 or float16, got {bias.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} (shape {tuple(weight.shape)}) but hidden has "
            f"{hidden.shape[1]} (shape {tuple(hidden.shape)})"
        )
    if weight.shape[0] < 1 and not sharded:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [{weight.shape[0]}] to match weight, got {tuple(bias.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets must have shape [{hidden.shape[0]}] to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("targets", targets)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}: all must be on one device")


#: The device types with a kernel of the fused-head ops ("meta": shape inference).
HEAD_DEVICES = ("cpu", "cuda", "meta")


def autocast_dtype(t: torch.Tensor):
    """The dtype ``torch.autocast`` runs a linear layer in on ``t``'s device when it is on there,
    else None (also on devices without autocast, e.g. meta)."""
    device = t.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_like_linear(t, dtype):
    """``t`` as ``nn.Linear``'s matmul sees it under autocast to ``dtype``: float32 / float16 /
    bfloat16 tensors cast (differentiably), float64 and non-floating ones (and None) as they are."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _check_device(hidden: torch.Tensor, what: str = "dpo_kernels.linear_logprobs") -> None:
    """NotImplementedError for tensors on a device without a kernel of the fused head. CUDA
    tensors in a build without CUDA get the op's own NotImplementedError (dpo_kernels.cuda_built())."""
    if hidden.device.type not in HEAD_DEVICES:
        raise NotImplementedError(
            f"{what}: the fused LM head has no {hidden.device.type} kernel (tensors on {hidden.device}); it runs on "
            "the CPU and on CUDA"
        )


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value < float("inf")):
        raise ValueError(f"{name} = {value} is invalid: must be finite and > 0")
    return value


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_workspace_bytes(value, optional: bool = False):
    """A workspace budget as the ops take it: a positive int their int64 argument holds (None
    too when `optional`). Larger ints would reach the op's schema conversion, whose error
    ("Expected a value of type 'int' ... found type 'int'") says nothing useful."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= _INT64_MAX:
        raise ValueError(f"workspace_bytes = {value!r} is invalid: must be {'None or ' if optional else ''}a positive "
                         f"int (bytes), at most 2**63 - 1")
    return int(value)


def _outputs(outputs) -> tuple:
    if isinstance(outputs, str):
        outputs = (outputs,)
    try:
        names = tuple(outputs)
    except TypeError:
        raise TypeError(f"outputs must be a tuple of names, got {type(outputs).__name__}") from None
    for n in names:
        # "log_probs" is always computed; TRL's add_fused_lm_head passes it among the names.
        if n not in OPTIONAL_OUTPUTS and n != "log_probs":
            raise ValueError(f"outputs: unknown name {n!r}; give any of {OPTIONAL_OUTPUTS} (or 'log_probs')")
    return tuple(n in names for n in OPTIONAL_OUTPUTS)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs=OPTIONAL_OUTPUTS,
    *,
    ignore_index: int = -100,
    workspace_bytes: int | None = None,
    process_group=None,
    vocab_range: tuple[int, int] | None = None,
):
    """Per-token log-probs of ``targets`` under ``softmax(o(hidden @ weight.T + bias))``, and
    TRL's optional per-token outputs, without materialising the ``[N, V]`` logits.

    The contract of TRL 1.16's ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets,
    temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` without its
    ``chunk_size`` (the chunks follow from ``workspace_bytes`` here): see docs/python_linear.md.

    Args:
        hidden: ``[N, H]`` float32 / float64 / bfloat16 / float16.
        weight: ``[V, H]`` (``nn.Linear`` layout); cast to the compute dtype (below) if it differs.
        bias: ``[V]`` or None.
        targets: ``[N]`` int64 / int32, each in ``[0, V)`` or ``ignore_index``.
        temperature, softcap, logit_scale: ``o(u) = softcap * tanh(logit_scale * u / softcap) /
            temperature`` (no tanh when ``softcap`` is None), TRL's order. Finite and > 0.
        outputs: which of ``("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")`` to
            compute (``"log_probs"`` may be listed and is always computed).
        ignore_index: rows whose target equals it get 0 in every output (False for is_top1)
            and no gradient. TRL's function has no such value (its callers clamp or drop them).
        workspace_bytes: the head's workspace budget (default 256 MiB).
        process_group: the tensor-parallel ``torch.distributed`` group over which the head's
            vocabulary is sharded (Megatron's column-parallel head): ``weight`` ``[V_local, H]``
            (and ``bias``) hold this rank's rows, ``hidden`` and ``targets`` (global token
            ids) are the same on every rank, and every rank gets the same outputs. Two
            all-reduces in the forward, one (the ``[N, H]`` dHidden sum) in the backward;
            docs/distributed.md. CPU or CUDA tensors (the CUDA kernels have not yet run on a GPU);
            eager mode only.
        vocab_range: ``(start, end)``, this rank's rows of the global head, for uneven shards;
            default ``[rank * V_local, (rank + 1) * V_local)``. Per-token outputs need no
            context-parallel group: each rank scores its own rows.

    Returns:
        ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]``, None
        when not requested: float32 (float64 for float64 inputs), is_top1 bool. log_probs and
        entropy carry gradients to hidden, weight and bias (the entropy's is
        ``-p (log p + H)`` per logit); the other three are not differentiable.

    Under ``torch.autocast`` the head runs in the autocast dtype (hidden, weight and bias are
    cast, as TRL does); the outputs stay float32 and the gradients come back in the inputs'
    dtypes. CPU and CUDA tensors (CUDA: no host synchronisation, capturable in CUDA graphs; a
    target outside ``[0, V)`` found on the device gives NaN outputs instead of an exception
    unless ``DPO_KERNELS_CHECK_DEVICE_ERRORS=1``: docs/python_linear.md). Raises TypeError /
    ValueError naming the argument, NotImplementedError for tensors on another device. A
    DTensor ``hidden``, ``weight`` or ``bias`` (FSDP2) is gathered whole with ``full_tensor()``
    (differentiably); with ``process_group`` it is refused (pass ``to_local()`` and
    ``vocab_range``).
    """
    hidden, weight, bias = (whole(n, t, process_group) for n, t in (("hidden", hidden), ("weight", weight),
                                                                     ("bias", bias)))
    _check_head(hidden, weight, bias, targets, sharded=vocab_range is not None)
    _check_device(hidden)
    temperature = _positive("temperature", temperature)
    logit_scale = _positive("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _positive("softcap", softcap)
    flags = _outputs(outputs)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # int64's range whatever the targets' dtype: a value no int32 target holds matches none
    # (TRL's drop-in passes such a value to turn the ignore index off).
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index = {ignore_index} is outside the range of int64 [{_INT64_MIN}, {_INT64_MAX}]")
    workspace_bytes = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else check_workspace_bytes(workspace_bytes)
    compute = autocast_dtype(hidden) or hidden.dtype
    hidden = hidden.to(compute)
    weight = weight.to(compute)
    if bias is not None:
        bias = bias.to(compute)
    if process_group is not None or vocab_range is not None:
        from . import distributed

        res = distributed.linear_logprobs(hidden, weight, bias, targets, (temperature, softcap, logit_scale), flags,
                                          int(ignore_index), int(workspace_bytes), process_group, vocab_range)
    else:
        res = ops.linear_logprobs(
            hidden, weight, bias, targets, temperature, softcap, logit_scale, *flags, int(ignore_index),
            int(workspace_bytes)
        )
    log_probs, entropy, lssp, mean, top1 = res[:5]
    # Not differentiable (TRL marks them so): detached, so they never require grad.
    return (
        log_probs,
        entropy if flags[0] else None,
        lssp.detach() if flags[1] else None,
        mean.detach() if flags[2] else None,
        top1 if flags[3] else None,
    )


# ---- fake kernels and autograd -----------------------------------------------------------------


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dpo_kernels::linear_logprobs")
def _linear_logprobs_fake(hidden, weight, bias, targets, temperature, softcap, logit_scale, entropy, lssp, mean,
                          top1, ignore_index, workspace_bytes):
    _check_head(hidden, weight, bias, targets)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"weight and bias must have hidden's dtype {hidden.dtype}")
    N = hidden.shape[0]
    out = _result_dtype(hidden.dtype)

    def vec(flag, dtype=out):
        return hidden.new_empty((N if flag else 0,), dtype=dtype)

    return (vec(True), vec(entropy), vec(lssp), vec(mean), vec(top1, torch.bool),
            hidden.new_empty((2 if entropy else 1, N), dtype=torch.float64))


@torch.library.register_fake("dpo_kernels::linear_logprobs_backward")
def _linear_logprobs_backward_fake(grad_logps, grad_entropy, hidden, weight, bias, targets, saved, temperature,
                                   softcap, logit_scale, ignore_index, need_hidden, need_weight, need_bias,
                                   workspace_bytes):
    need_bias = need_bias and bias is not None
    return (
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty(bias.shape if need_bias else (0,)),
    )


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, softcap, logit_scale, entropy, *_rest = inputs
    ignore_index, workspace_bytes = inputs[11], inputs[12]
    # The entropy is often computed for logging only: without this, autograd would hand the
    # backward a zero gradient for it and the backward would compute a no-op term.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[2:])
    if not entropy:
        ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, weight, bias, targets, output[5])
    ctx.params = (temperature, softcap, logit_scale, ignore_index)
    ctx.entropy = entropy
    ctx.workspace_bytes = workspace_bytes


def _linear_backward(ctx, grad_logps, grad_entropy, *_):
    n_inputs = 13
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if not ctx.entropy:
        grad_entropy = None
    if (grad_logps is None and grad_entropy is None) or not (need_h or need_w or need_b):
        return (None,) * n_inputs
    hidden, weight, bias, targets, saved = ctx.saved_tensors
    temperature, softcap, logit_scale, ignore_index = ctx.params
    with torch.no_grad():
        gh, gw, gb = ops.linear_logprobs_backward(
            grad_logps, grad_entropy, hidden, weight, bias, targets, saved, temperature, softcap, logit_scale,
            ignore_index, need_h, need_w, need_b and bias is not None, ctx.workspace_bytes,
        )
    grads = (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None)
    tracked = [t for t in (hidden, weight, bias, grad_logps, grad_entropy) if t is not None]
    grads = _first_order_only("linear_logprobs", grads, tracked)
    return grads + (None,) * (n_inputs - 3)


torch.library.register_autograd("dpo_kernels::linear_logprobs", _linear_backward, setup_context=_linear_setup)
