# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""DPO from hidden states (issue 13, item 3): the fake kernel and autograd of the operator
``torch.ops.dpo_kernels.linear_dpo`` (csrc/linear_dpo.cpp); the public function is
:func:`dpo_kernels.dpo_loss_from_hidden`.

The operator runs the library's one-call path, ``dpo::cpu::linear_dpo`` on the CPU
(csrc/linear_dpo.cpp) and ``dpo::cuda::linear_dpo`` on CUDA (csrc/cuda_linear.cu): the loss,
the metrics and the gradients of hidden, weight and bias come out of one forward call (three or
four passes over the weight; docs/linear.md, docs/cuda.md). There is no autograd inside the forward; the
backward returns the saved gradients times the upstream gradient of the loss.
"""
from __future__ import annotations

import torch

from ._ops import CONFIG_FIELDS, METRIC_NAMES, PAIR_VALUE_NAMES, _first_order_only, cu_seqlens_seqs

#: The default workspace budget (bytes) of DPO from hidden states: 768 MiB, the C++ default
#: (dpo::cpu::default_linear_dpo_workspace_bytes).
DEFAULT_LINEAR_DPO_WORKSPACE_BYTES = 768 << 20
#: The default on CUDA tensors: 1022 MiB, dpo::cuda's default_linear_workspace_bytes
#: (kernels/dpo/cuda/linear.cuh), the least that holds one TRL pair of 2 x 1024 rows at
#: V = 128256 in one three-pass chunk while the whole workspace stays under 1 GiB.
DEFAULT_CUDA_LINEAR_DPO_WORKSPACE_BYTES = 1022 << 20

_N_CONFIG = len(CONFIG_FIELDS)
# linear_dpo's arguments: 14 before the config, the config, then compute_metrics, need_hidden,
# need_weight, need_bias, workspace_bytes.
_N_INPUTS = 14 + _N_CONFIG + 5


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("dpo_kernels::linear_dpo")
def _linear_dpo_fake(hidden, weight, bias, labels, cu_seqlens, *rest):
    need_hidden, need_weight, need_bias = rest[-4:-1]
    if cu_seqlens is not None:
        seqs = cu_seqlens_seqs(cu_seqlens)
    else:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be 3-D [2P, T, H] (or 2-D [N, H] with cu_seqlens), got shape "
                             f"{tuple(hidden.shape)}")
        seqs = hidden.shape[0]
    P = seqs // 2
    out = _result_dtype(hidden.dtype)
    need_bias = need_bias and bias is not None
    return (
        hidden.new_empty((), dtype=out),
        hidden.new_empty((len(METRIC_NAMES),), dtype=out),
        hidden.new_empty((len(PAIR_VALUE_NAMES), P), dtype=out),
        hidden.new_empty(hidden.shape if need_hidden else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        weight.new_empty(bias.shape if need_bias else (0,)),
    )


def _linear_dpo_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    need_hidden, need_weight, need_bias = inputs[-4:-1]
    ctx.need = (need_hidden, need_weight, need_bias and inputs[2] is not None)
    ctx.save_for_backward(output[3], output[4], output[5], inputs[0], inputs[1], inputs[2])


def _linear_dpo_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * _N_INPUTS
    gh, gw, gb, hidden, weight, bias = ctx.saved_tensors
    grads = []
    for k, (need, computed, g) in enumerate(zip(ctx.needs_input_grad[:3], ctx.need, (gh, gw, gb))):
        if need and not computed:
            raise RuntimeError(
                f"dpo_loss_from_hidden: the gradient of {('hidden', 'weight', 'bias')[k]} is needed but the forward "
                "did not compute it (it ran without grad mode, or before the tensor required grad)")
        grads.append(g * grad_loss.to(g.dtype) if need else None)
    grads = _first_order_only("dpo_loss_from_hidden", tuple(grads),
                              [t for t in (hidden, weight, bias, grad_loss) if t is not None])
    return grads + (None,) * (_N_INPUTS - 3)


torch.library.register_autograd("dpo_kernels::linear_dpo", _linear_dpo_backward, setup_context=_linear_dpo_setup)
