# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Fused Direct Preference Optimization kernels as PyTorch operators.

Differentiable ops, registered with torch.library (namespace ``dpo_kernels``), with
fake kernels so they run under ``torch.compile(fullgraph=True)`` and CUDA graphs:

- :func:`sequence_logps` -- per-sequence sums (or means) of label log-probs, fused backward.
- :func:`dpo_loss` -- TRL's classic pair-level ``dpo_loss`` from sequence log-probs.
- :func:`dpo_loss_from_logits` -- the whole DPO loss and TRL's logged metrics from the
  policy logits of the concatenated ``[chosen; rejected]`` batch, in one read of the logits
  (plus one read and one write for the gradient, optionally in place).
- :func:`dpo_loss_from_hidden` -- the same from the last hidden states and the LM head,
  never forming the ``[rows, V]`` logits (CPU and CUDA).

Losses follow TRL 1.x's DPOTrainer (semantics: `docs/losses.md <../../docs/losses.md>`_, a
path relative to this file), with TRL's argument names. Invalid arguments raise
``ValueError`` (bad values, shapes, devices) or ``TypeError`` (dtypes, argument types) with a
message naming the argument, before anything is written. The gradients are first order
only: differentiating one again (after ``create_graph=True``) raises a ``RuntimeError``.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from . import _C
from ._linear import OPTIONAL_OUTPUTS, linear_logprobs
from ._linear import _check_device as _check_head_device
from ._linear import autocast_dtype as _autocast_dtype
from ._linear import autocast_like_linear as _autocast_like_linear
from ._linear import check_workspace_bytes as _check_workspace_bytes
from ._linear_dpo import DEFAULT_CUDA_LINEAR_DPO_WORKSPACE_BYTES, DEFAULT_LINEAR_DPO_WORKSPACE_BYTES
from ._ops import (CONFIG_FIELDS, LOSS_TYPES, METRIC_NAMES, PAIR_VALUE_NAMES, check_devices, check_inplace_target,
                   cu_seqlens_seqs, ops, whole)
from . import _shard_ops  # noqa: F401  (the fake kernels of the sharded ops: torch.compile)
from .liger import FusedLinearDPOLoss  # Liger-Kernel's LigerFusedLinearDPOLoss drop-in (liger.py)

__all__ = [
    "sequence_logps",
    "dpo_loss",
    "dpo_loss_from_logits",
    "dpo_loss_from_hidden",
    "linear_logprobs",
    "FusedLinearDPOLoss",
    "OPTIONAL_OUTPUTS",
    "METRIC_NAMES",
    "PAIR_VALUE_NAMES",
    "LOSS_TYPES",
    "cuda_built",
]

#: The library's version (include/dpo/version.hpp, compiled into the extension).
__version__ = _C.__version__


def cuda_built() -> bool:
    """Whether the extension was compiled with the CUDA kernels."""
    return bool(_C.cuda_built())


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    average: bool = False,
    *,
    cu_seqlens: torch.Tensor | None = None,
    process_group=None,
    vocab_range: tuple[int, int] | None = None,
    cp_group=None,
) -> torch.Tensor:
    """Per-sequence log-probabilities of the labels under softmax(logits).

    Args:
        logits: ``[B, T, V]`` (B padded sequences) or ``[N, V]`` (packed rows; one sequence
            unless ``cu_seqlens`` is given), float32/float64/bfloat16/float16, already shifted
            (row t scores label t). Any strides with a unit vocabulary stride are read in place,
            including ``logits[:, :-1]`` of a contiguous tensor; others are copied.
        labels: ``[B, T]`` or ``[N]``, int64 or int32; ``ignore_index`` marks tokens that
            count 0 (prompt, padding). Other labels must lie in ``[0, V)``.
        ignore_index: the masked label value (TRL: -100).
        average: divide each sum by its number of completion tokens (clamped to >= 1).
        cu_seqlens: for ``[N, V]`` logits, ``[S + 1]`` row offsets of S packed sequences
            (S = 0 gives an empty result, as padded logits with B = 0).
        process_group: the tensor-parallel ``torch.distributed`` group across which the
            vocabulary is sharded: ``logits`` holds this rank's columns, ``labels`` are global
            token ids. Two all-reduces per call (docs/distributed.md). CPU or CUDA tensors
            (CUDA: no host synchronization).
        vocab_range: ``(start, end)``, this rank's columns, for uneven shards; default
            Megatron's ``[rank * V_local, (rank + 1) * V_local)``. Costs one all-gather.
        cp_group: the context-parallel group: ``logits`` / ``labels`` / ``cu_seqlens`` hold
            this rank's rows of every sequence; one more all-reduce of ``[2, S]`` doubles.
            Every rank of both groups returns the same log-probs; the gradient is that of
            the rank's own logits.

    Returns:
        ``[S]`` log-probs, accumulated in fp32 per row and fp64 across rows, returned as
        float32 (float64 for float64 logits), never in the logits' half precision.
        Differentiable w.r.t. ``logits``: the backward writes
        ``g_s * (onehot(y) - softmax(z))`` per completion row and exact zeros elsewhere, in
        one read of the logits. Deterministic.
    """
    check_devices(("logits", logits), ("labels", labels), ("cu_seqlens", cu_seqlens))
    ignore_index = _ignore_index(ignore_index, labels)
    average = _flag("average", average)
    if process_group is not None or vocab_range is not None or cp_group is not None:
        from . import distributed

        return distributed.sequence_logps(logits, labels, cu_seqlens, ignore_index, average, process_group,
                                          vocab_range, cp_group)
    logps, _ = ops.sequence_logps(logits, labels, cu_seqlens, ignore_index, average)
    return logps


# Python-side argument checks: each raises TypeError / ValueError naming the argument before
# anything reaches the ops (whose schema conversions would otherwise produce torch's own
# messages, or accept a str or None through float() / bool() / str()).

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} = {v} is invalid: must be finite")
    return v


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _name(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    return value


def _ignore_index(value, labels) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    lo, hi, kind = _INT64_MIN, _INT64_MAX, "int64"
    if isinstance(labels, torch.Tensor) and labels.dtype == torch.int32:
        lo, hi, kind = _INT32_MIN, _INT32_MAX, "int32 labels"
    if not lo <= v <= hi:
        raise ValueError(f"ignore_index = {v} is outside the range of {kind} [{lo}, {hi}]")
    return v


def _loss_types(loss_type: str | Sequence[str]) -> str:
    allowed = ", ".join(LOSS_TYPES)
    if isinstance(loss_type, str):
        names = loss_type.split(",")
    elif isinstance(loss_type, (list, tuple)):
        names = list(loss_type)
    else:
        raise TypeError(
            f"loss_type must be a loss type name or a list of them, got {type(loss_type).__name__} "
            f"{loss_type!r}; allowed: {allowed}"
        )
    if not names:
        raise ValueError(f"loss_type is empty: give at least one of {allowed}")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"loss_type entries must be str, got {type(n).__name__} {n!r}; allowed: {allowed}")
        if not n.strip() or "," in n:
            raise ValueError(f"loss_type {loss_type!r} has an empty or comma-separated entry {n!r}; allowed: {allowed}")
    return ",".join(n.strip() for n in names)


def _real_list(name: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return [_real(f"{name}[{k}]", v) for k, v in enumerate(value)]
    raise TypeError(f"{name} must be None or a list of numbers, got {type(value).__name__}")


#: Checks of a config argument, by its schema type (CONFIG_FIELDS); loss_type also takes a list.
_CONFIG_CHECKS = {"str": _name, "float": _real, "bool": _flag, "float[]": _real_list}
_CONFIG_SPECIAL = {"loss_type": lambda _, value: _loss_types(value)}
#: Config arguments whose None (the public functions' default) means the table's default:
#: no loss weights (1 each), ld_alpha = 1 (LD-DPO off).
_NONE_MEANS_DEFAULT = ("loss_weights", "ld_alpha")
assert set(_NONE_MEANS_DEFAULT) | set(_CONFIG_SPECIAL) <= {name for name, _, _ in CONFIG_FIELDS}


def _config(**given) -> tuple:
    """The ops' config arguments, checked, in schema order, from keyword arguments named as in
    CONFIG_FIELDS; a field not given takes the table's default."""
    unknown = set(given) - {name for name, _, _ in CONFIG_FIELDS}
    if unknown:
        raise AssertionError(f"not config fields: {sorted(unknown)}")
    out = []
    for name, kind, default in CONFIG_FIELDS:
        value = given.get(name, default)
        if value is None and name in _NONE_MEANS_DEFAULT:
            value = default
        out.append(_CONFIG_SPECIAL.get(name, _CONFIG_CHECKS[kind])(name, value))
    return tuple(out)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    loss_weights: Sequence[float] | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    reference_free: bool = False,
    cdpo_smoothing: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    cpo_base: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's pair-level DPO loss from sequence log-probs: ``(losses, chosen_rewards, rejected_rewards)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` policy sequence log-probs (any
            float dtype; the math runs in float64).
        reference_chosen_logps, reference_rejected_logps: ``[P]`` reference log-probs (None
            for the reference-free losses simpo, cpo, orpo, or with ``reference_free``). They
            get no gradient.
        loss_type: a TRL loss name or a list of them, combined as ``sum_k w_k mean(loss_k)``
            with ``loss_weights`` (default 1 each): sigmoid, hinge, ipo, exo_pair, nca_pair,
            robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop,
            sft, sigmoid_norm; and the reference-free simpo, cpo, orpo.
        chosen_lengths, rejected_lengths: ``[P]`` completion-token counts, needed by ipo,
            sigmoid_norm, simpo, orpo and by sft's NLL (None counts 1 token each): finite and
            >= 0 (ValueError naming the argument; on CUDA their values are not read, as that
            would synchronise), counted as 1 below 1 where they divide.
        weights: ``[P]`` per-pair weights W_i (e.g. WPO), treated as constants. Refused with
            aot / aot_unpaired, which sort pairs (their loss entries are sorted positions).
        Other arguments: TRL's DPOConfig fields of the same names; ``cdpo_smoothing`` applies
            ``label_smoothing`` to sigmoid as TRL <= 0.28 did.

    Returns:
        ``losses [P]`` (``losses.mean()`` is the batch loss; for aot / aot_unpaired entry i
        is sorted position i, as in TRL; sft adds the batch NLL to every entry),
        ``chosen_rewards``, ``rejected_rewards`` (``beta * (pi - rho)``, detached, as TRL
        logs them). float32, or float64 for float64 inputs. ``losses`` is differentiable
        w.r.t. the policy log-probs for any upstream gradient.
    """
    check_devices(
        ("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
        ("reference_chosen_logps", reference_chosen_logps), ("reference_rejected_logps", reference_rejected_logps),
        ("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths), ("weights", weights),
    )
    config = _config(
        loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, reference_free=reference_free, cdpo_smoothing=cdpo_smoothing,
        simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, cpo_base=cpo_base,
    )
    return ops.pair_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_lengths, rejected_lengths, weights, *config,
    )


def dpo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    reference_free: bool = False,
    cdpo_smoothing: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    cpo_base: str = "sigmoid",
    compute_metrics: bool = True,
    inplace_backward: bool = False,
    return_pair_values: bool = False,
    process_group=None,
    vocab_range: tuple[int, int] | None = None,
    cp_group=None,
):
    """The DPO loss and TRL's logged metrics, fused, from the policy logits.

    Args:
        logits: policy logits of TRL's concatenated batch, already shifted:
            ``[2P, T, V]`` (sequences ``[0, P)`` chosen, ``[P, 2P)`` rejected) or packed
            ``[N, V]`` with ``cu_seqlens [2P + 1]``. float32/float64/bfloat16/float16, any
            strides with a unit vocabulary stride (``logits[:, :-1]`` is read in place).
        labels: ``[2P, T]`` / ``[N]`` int64 or int32, ``ignore_index`` on prompt and padding.
        reference_chosen_logps, reference_rejected_logps: ``[P]`` reference sequence
            log-probs (summed; LD-DPO weighted like the policy when ``ld_alpha`` is set).
        ref_logits: instead of reference log-probs, the reference model's logits (same
            shape and labels, any floating dtype: read once in their own dtype, forward
            only, exactly as :func:`sequence_logps` would read them).
        loss_type, loss_weights, beta, label_smoothing, f_divergence_type,
            f_alpha_divergence_coef, discopop_tau, use_weighting (WPO), ld_alpha (LD-DPO;
            None disables it): TRL DPOConfig's fields and defaults. The sft term is the mean
            cross-entropy over all chosen completion tokens.
        compute_metrics: also compute entropy, mean logits and token accuracy (same pass,
            a little more arithmetic). Without it those metrics are 0.
        inplace_backward: the backward pass overwrites ``logits`` with its gradient instead
            of allocating one (saves a logits-sized buffer). The logits' values are then lost,
            so nothing else may read them after backward: the backward bumps their version
            counter, so autograd raises if another op saved them for its own backward; a
            second backward through the loss (``retain_graph=True``) raises; a leaf tensor
            that requires grad is refused (ValueError). Needs logits without gaps between
            sequences (e.g. contiguous, not ``logits[:, :-1]``).
        return_pair_values: also return a dict of per-pair tensors (PAIR_VALUE_NAMES).
        process_group, vocab_range, cp_group: vocabulary and context parallelism, as in
            :func:`sequence_logps` (docs/distributed.md): ``logits`` holds this rank's
            vocabulary shard (of this rank's rows with ``cp_group``); every rank gets the same
            loss and metrics and the gradient of its own shard. Collectives: two all-reduces
            over ``process_group``, one of ``[7, 2P]`` doubles over ``cp_group``; none in the
            backward. Not with ``ref_logits`` (pass reference log-probs, e.g. from the sharded
            :func:`sequence_logps`) nor ``inplace_backward``; ``ld_alpha`` not with
            ``cp_group``. CPU or CUDA tensors (CUDA: the pair stage on the device, no host
            synchronization).

    Returns:
        ``(loss, metrics)``: the scalar loss (float32; float64 for float64 logits),
        differentiable w.r.t. ``logits``, and a dict of detached 0-d tensors keyed by TRL's
        metric names (METRIC_NAMES). With ``return_pair_values``, a third dict.
        Deterministic; no host synchronisation.
    """
    check_devices(
        ("logits", logits), ("labels", labels), ("reference_chosen_logps", reference_chosen_logps),
        ("reference_rejected_logps", reference_rejected_logps), ("ref_logits", ref_logits), ("cu_seqlens", cu_seqlens),
    )
    ignore_index = _ignore_index(ignore_index, labels)
    config = _config(
        loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha, reference_free=reference_free,
        cdpo_smoothing=cdpo_smoothing, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, cpo_base=cpo_base,
    )
    compute_metrics = _flag("compute_metrics", compute_metrics)
    if _flag("inplace_backward", inplace_backward):
        check_inplace_target(logits)
    return_pair_values = _flag("return_pair_values", return_pair_values)
    if process_group is not None or vocab_range is not None or cp_group is not None:
        if ref_logits is not None:
            raise ValueError("ref_logits is not supported with process_group / cp_group: pass reference_chosen_logps "
                             "and reference_rejected_logps (e.g. from sequence_logps with the same groups)")
        if inplace_backward:
            raise ValueError("inplace_backward=True is not supported with process_group / cp_group")
        from . import distributed

        loss, metrics, pair_values = distributed.dpo_loss_from_logits(
            logits, labels, reference_chosen_logps, reference_rejected_logps, cu_seqlens, ignore_index, config,
            compute_metrics, process_group, vocab_range, cp_group)
    else:
        loss, metrics, pair_values, _, _ = ops.dpo_forward(
            logits, labels, cu_seqlens, reference_chosen_logps, reference_rejected_logps, ref_logits, ignore_index,
            *config, compute_metrics, inplace_backward,
        )
    named = {name: metrics[i] for i, name in enumerate(METRIC_NAMES)}
    if return_pair_values:
        return loss, named, {name: pair_values[i] for i, name in enumerate(PAIR_VALUE_NAMES)}
    return loss, named


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    reference_free: bool = False,
    cdpo_smoothing: bool = False,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    cpo_base: str = "sigmoid",
    compute_metrics: bool = True,
    inplace_backward: bool = False,
    return_pair_values: bool = False,
    process_group=None,
    vocab_range: tuple[int, int] | None = None,
    cp_group=None,
    workspace_bytes: int | None = None,
):
    """The DPO loss and TRL's logged metrics straight from the policy's last hidden states and
    LM head, without the ``[rows, V]`` logits: :func:`dpo_loss_from_logits` on
    ``logits = o(hidden @ weight.T + bias)``, ``o(u) = softcap * tanh(logit_scale * u /
    softcap) / temperature`` (no tanh when ``softcap`` is None; TRL's order).

    Args:
        hidden: the policy's last hidden states of TRL's concatenated batch, already aligned
            with ``labels`` as logits are (pass ``hidden[:, :-1]`` with ``labels[:, 1:]``: row
            t scores label t): ``[2P, T, H]`` (sequences ``[0, P)`` chosen, ``[P, 2P)``
            rejected) or packed ``[N, H]`` with ``cu_seqlens [2P + 1]``.
            float32/float64/bfloat16/float16; a non-contiguous view is copied once.
        weight: ``[V, H]`` (``nn.Linear`` layout), hidden's dtype. bias: ``[V]`` or None.
            Under ``torch.autocast`` (CPU or CUDA) hidden, weight and bias (and the reference
            head) are cast to autocast's dtype first, differentiably, as ``nn.Linear`` would
            be: e.g. bf16 hidden states with an fp32 ``lm_head.weight``; the gradients come
            back in each input's own dtype.
        labels: ``[2P, T]`` / ``[N]`` int64 or int32, in ``[0, V)`` or ``ignore_index``.
        reference_chosen_logps, reference_rejected_logps: ``[P]`` reference sequence log-probs,
            as for :func:`dpo_loss_from_logits`.
        ref_hidden, ref_weight, ref_bias: instead, the reference model's hidden states (hidden's
            shape and labels) and head: ``ref_weight`` with ``ref_bias`` (None: no bias, as in
            Liger), or without ``ref_weight`` the policy's ``weight`` and ``bias`` (then
            ``ref_bias`` must be None: ValueError); forward only, no gradient. Same transforms as the policy. A reference head of its own in
            another dtype than the policy's (``ref_hidden``, ``ref_weight`` and ``ref_bias``
            of one dtype, e.g. a bf16 reference model for an fp32 policy) is scored in that
            dtype by a call of its own (no logits either), whose log-probs then go into the
            policy's call as reference log-probs.
        temperature, softcap, logit_scale: the logit transforms (finite, > 0; softcap None).
        loss_type ... cpo_base, compute_metrics, return_pair_values: as for
            :func:`dpo_loss_from_logits`. ``inplace_backward`` is accepted for a uniform
            signature but must stay False (there are no logits to overwrite).
        process_group, vocab_range, cp_group: the head sharded over the vocabulary
            (Megatron's column-parallel head: ``weight [V_local, H]`` and ``bias`` hold this
            rank's rows, ``hidden`` and ``labels`` (global ids) are the same on the group's
            ranks) and/or context parallelism (``hidden`` / ``labels`` / ``cu_seqlens`` hold
            this rank's rows of every sequence), as for :func:`dpo_loss_from_logits`. Every
            rank gets the same loss and metrics; hidden's gradient is summed over
            ``process_group`` in the backward (one all-reduce of hidden's size); weight's and
            bias' are this rank's rows, from this rank's tokens (sum them over ``cp_group``
            as data-parallel gradients are). Collectives: two all-reduces over
            ``process_group`` and one of ``[7, 2P]`` doubles over ``cp_group`` in the forward;
            with ``ref_hidden`` (this rank's rows, its head sharded as the policy's: the
            same rows of ``ref_weight`` / ``ref_bias``) the same three again for the
            reference. ``ld_alpha`` not with ``cp_group``. The gradients are computed in the backward (three passes over the
            weight shard there, one in the forward). CPU or CUDA tensors (NCCL there; the CUDA
            kernels have not yet run on a GPU); eager mode only.
        workspace_bytes: the workspace budget of the fused head (default 768 MiB on the CPU,
            1022 MiB on CUDA: three passes at 2 x 1024-token pairs, V = 128256); the chunk
            size and the three- or four-pass plan follow from it (docs/linear.md).

    Returns:
        ``(loss, metrics)`` (and the pair-values dict with ``return_pair_values``) as
        :func:`dpo_loss_from_logits`. ``loss`` is differentiable w.r.t. hidden, weight and bias:
        their gradients are computed in the forward call (only for those that require grad
        while grad mode is on) and scaled by the upstream gradient in the backward. CPU and
        CUDA tensors (CUDA: no host synchronisation, capturable in CUDA graphs; packed batches
        run four passes there, as ``cu_seqlens`` is not read back to the host; a label outside
        ``[0, V)`` found on the device gives a NaN loss instead of an exception unless
        ``DPO_KERNELS_CHECK_DEVICE_ERRORS=1``: docs/python_linear.md). Deterministic for a
        given device and budget, and independent of the thread count. A DTensor ``hidden`` /
        ``weight`` / ``bias`` / ``ref_*`` (FSDP2) is gathered whole with ``full_tensor()``
        (differentiably); with ``process_group`` it is refused (pass ``to_local()`` and
        ``vocab_range``).
    """
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = (
        whole(n, t, process_group) for n, t in (("hidden", hidden), ("weight", weight), ("bias", bias),
                                                ("ref_hidden", ref_hidden), ("ref_weight", ref_weight),
                                                ("ref_bias", ref_bias)))
    check_devices(
        ("hidden", hidden), ("weight", weight), ("bias", bias), ("labels", labels),
        ("reference_chosen_logps", reference_chosen_logps), ("reference_rejected_logps", reference_rejected_logps),
        ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias), ("cu_seqlens", cu_seqlens),
    )
    if ref_bias is not None and ref_weight is None:  # it would be ignored: the policy's head is the reference's
        raise ValueError("ref_bias is given without ref_weight: the reference head is the policy's (weight and bias) "
                         "when ref_weight is None; pass the reference head's ref_weight too")
    _check_head_device(hidden, "dpo_loss_from_hidden")
    autocast = _autocast_dtype(hidden)
    if autocast is not None:  # nn.Linear's dtypes under autocast, for the policy and the reference head
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias = (
            _autocast_like_linear(t, autocast) for t in (hidden, weight, bias, ref_hidden, ref_weight, ref_bias))
    ignore_index = _ignore_index(ignore_index, labels)
    config = _config(
        loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha, reference_free=reference_free,
        cdpo_smoothing=cdpo_smoothing, simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, cpo_base=cpo_base,
    )
    compute_metrics = _flag("compute_metrics", compute_metrics)
    return_pair_values = _flag("return_pair_values", return_pair_values)
    if _flag("inplace_backward", inplace_backward):
        raise ValueError("inplace_backward=True is meaningless for dpo_loss_from_hidden: there are no logits to "
                         "overwrite (the gradients are hidden-sized)")
    temperature = _real("temperature", temperature)
    logit_scale = _real("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _real("softcap", softcap)
    if workspace_bytes is None:
        workspace_bytes = (DEFAULT_CUDA_LINEAR_DPO_WORKSPACE_BYTES if hidden.device.type == "cuda"
                           else DEFAULT_LINEAR_DPO_WORKSPACE_BYTES)
    else:
        workspace_bytes = _check_workspace_bytes(workspace_bytes)
    if (ref_hidden is not None and ref_weight is not None and reference_chosen_logps is None
            and reference_rejected_logps is None and ref_hidden.dtype != hidden.dtype
            and ref_weight.dtype == ref_hidden.dtype and (ref_bias is None or ref_bias.dtype == ref_hidden.dtype)
            and ref_hidden.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        # A reference head in its own dtype: its log-probs from a call of its own, in that dtype
        # (LD-DPO weighted alike), then into the policy's call as reference log-probs.
        try:
            if ref_hidden.shape != hidden.shape:
                raise ValueError(f"ref_hidden must have hidden's shape {list(hidden.shape)}, got "
                                 f"{list(ref_hidden.shape)}")
            # The call of its own would check ref_weight / ref_bias as its weight / bias (naming
            # them so) and take a reference head over another vocabulary: refused, as on the
            # same-dtype path.
            if ref_weight.dim() != 2 or (weight.dim() == 2 and ref_weight.shape != weight.shape):
                raise ValueError(f"ref_weight must have weight's shape {list(weight.shape)} (the reference head over "
                                 f"the same vocabulary and hidden size), got {list(ref_weight.shape)}")
            if ref_bias is not None and list(ref_bias.shape) != [ref_weight.shape[0]]:
                raise ValueError(f"ref_bias must have shape [{ref_weight.shape[0]}] to match ref_weight "
                                 f"{list(ref_weight.shape)}, got {list(ref_bias.shape)}")
        except ValueError as e:
            if cp_group is None:
                raise
            # This rank's own reference head: its context peers are told through the all-reduce
            # they are about to enter (the reference call's), as on the same-dtype path.
            from . import distributed

            distributed.reject_before_context(e, cp_group, distributed.head_num_seqs(hidden, cu_seqlens),
                                              len(distributed.SEQ_FIELDS), hidden.device)
        # Sized without indexing a bad shape: the call below raises the kernels' error for it.
        P = (cu_seqlens_seqs(cu_seqlens) if cu_seqlens is not None else labels.shape[0] if labels.dim() else 0) // 2
        zeros = torch.zeros(max(P, 0), dtype=torch.float64, device=hidden.device)
        with torch.no_grad():
            pairs = dpo_loss_from_hidden(
                ref_hidden, ref_weight, labels, zeros, zeros, bias=ref_bias, cu_seqlens=cu_seqlens,
                temperature=temperature, softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                ld_alpha=ld_alpha, compute_metrics=False, return_pair_values=True, process_group=process_group,
                vocab_range=vocab_range, cp_group=cp_group, workspace_bytes=workspace_bytes)[2]
        reference_chosen_logps, reference_rejected_logps = pairs["chosen_logps"], pairs["rejected_logps"]
        ref_hidden = ref_weight = ref_bias = None
    if process_group is not None or vocab_range is not None or cp_group is not None:
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias are given without ref_hidden")
        from . import distributed

        loss, metrics, pair_values = distributed.dpo_loss_from_hidden(
            hidden, weight, bias, labels, reference_chosen_logps, reference_rejected_logps, cu_seqlens,
            (temperature, softcap, logit_scale), ignore_index, config, compute_metrics, int(workspace_bytes),
            process_group, vocab_range, cp_group, None if ref_hidden is None else (ref_hidden, ref_weight, ref_bias))
    else:
        grad = torch.is_grad_enabled()
        need = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        loss, metrics, pair_values, _, _, _ = ops.linear_dpo(
            hidden, weight, bias, labels, cu_seqlens, reference_chosen_logps, reference_rejected_logps, ref_hidden,
            ref_weight, ref_bias, temperature, softcap, logit_scale, ignore_index, *config, compute_metrics, *need,
            int(workspace_bytes),
        )
    named = {name: metrics[i] for i, name in enumerate(METRIC_NAMES)}
    if return_pair_values:
        return loss, named, {name: pair_values[i] for i, name in enumerate(PAIR_VALUE_NAMES)}
    return loss, named
