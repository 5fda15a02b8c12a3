# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""A drop-in for Liger-Kernel 0.8.5's ``LigerFusedLinearDPOLoss`` (issue 13, item 4).

:class:`FusedLinearDPOLoss` takes Liger's constructor arguments, Liger's call
``(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)`` and
returns Liger's structure::

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
           nll_loss, chosen_rewards, rejected_rewards) = loss_fn(lm_head.weight, hidden, target)

computed by :func:`dpo_kernels.dpo_loss_from_hidden` (the library's fused LM head: the
``[rows, V]`` logits never exist, the gradients of ``_input``, ``lin_weight`` and ``bias``
come out of the forward call). It is an adapter, not a second implementation: the only
arithmetic here is Liger's logits means (an exact closed form, below) and, for
``average_log_prob=True`` (which the fused op does not have: it sums log-probs, as TRL does),
the per-sequence averages of :func:`dpo_kernels.linear_logprobs`'s token log-probs fed to
:func:`dpo_kernels.dpo_loss`.

What it adds to Liger (python/README.md, "Migrating from Liger"):

- every loss type of the library (``dpo_kernels.LOSS_TYPES``: ipo, aot, sigmoid_norm, simpo,
  ... and weighted combinations) and its hyperparameters, as keyword-only constructor
  arguments named as in :func:`dpo_kernels.dpo_loss_from_hidden`;
- precomputed reference log-probs (TRL's ``precompute_ref_log_probs``): the keyword-only call
  arguments ``ref_chosen_logps`` / ``ref_rejected_logps`` instead of ``ref_input``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Sequence

import torch

import dpo_kernels as _dk  # the package's functions, looked up at call time (it imports this module)

__all__ = ["FusedLinearDPOLoss"]

#: The loss types of Liger 0.8.5's ``LigerFusedLinearDPOLoss`` (its ``_SUPPORTED_LOSS_TYPES``);
#: each has the same per-pair formula here (docs/losses.md).
LIGER_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                    "apo_down", "discopop")

#: Loss types whose term carries its own token-weighted NLL: they need the token counts the fused
#: op keeps, so they are refused with ``average_log_prob=True`` (which runs on sequence averages).
_NLL_TYPES = ("sft", "cpo", "orpo")


def _scalar(value):
    """A hyperparameter as Liger reads it: a one-element tensor (e.g. a scheduled beta) as its
    Python number; anything else unchanged, for the package's checks to judge."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        return value.item()
    return value


def _liger_flag(name: str, value) -> bool:
    """A flag as Liger reads it (truthiness): a bool, or an int / one-element tensor 0 or 1."""
    value = _scalar(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return _dk._flag(name, value)


def _tensor(name: str, t, optional: bool = False):
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}")
    return t


class FusedLinearDPOLoss(torch.nn.Module):
    """Liger's fused linear DPO loss on the library's fused LM head.

    Args (Liger 0.8.5's, same defaults):
        ignore_index: the label of masked tokens (prompt, padding).
        beta: the DPO temperature.
        alpha: the weight of the NLL term when ``compute_nll_loss``.
        compute_nll_loss: add ``alpha * NLL``, the mean cross-entropy over all chosen
            non-masked tokens of the batch (the library's ``sft`` term with weight ``alpha``).
        compiled, chunk_size: accepted for compatibility (checked: a bool, an int >= 1) and not
            used: the op is compiled C++ and picks its chunks from ``workspace_bytes``.
        use_ref_model: the loss compares with a reference (``ref_input`` and its head, or the
            precomputed ``ref_chosen_logps`` / ``ref_rejected_logps`` of the call); False
            sets the reference log-probs to 0 (``reference_free``) and ignores ``ref_input``,
            ``ref_weight`` and ``ref_bias``, as Liger does.
        average_log_prob: sequence log-probs (policy and reference) are per-token means
            instead of sums. Runs on :func:`dpo_kernels.linear_logprobs` +
            :func:`dpo_kernels.dpo_loss` (see the module docstring); not with use_weighting,
            ld_alpha or the NLL-carrying types sft, cpo, orpo. A sequence without tokens
            averages to 0 (Liger: NaN).
        loss_type: one of Liger's (LIGER_LOSS_TYPES) or any of ``dpo_kernels.LOSS_TYPES``, or
            a list of them combined with ``loss_weights``.
        label_smoothing, discopop_tau: as in Liger (and TRL). A label_smoothing that the loss
            type does not read raises ValueError (Liger ignores it).

    Keyword-only (the library's, as in :func:`dpo_kernels.dpo_loss_from_hidden`):
        loss_weights, f_divergence_type, f_alpha_divergence_coef, use_weighting (WPO),
        ld_alpha (LD-DPO), cdpo_smoothing, simpo_gamma, cpo_alpha, cpo_base, workspace_bytes;
        kept in the dict attribute ``options``.

    As Liger's, the attributes (``beta``, ``alpha``, ``loss_type``, ...) are read at every call
    (and checked then: ValueError / TypeError naming the attribute), so a schedule may set them.

    Call: ``forward(lin_weight [V, H], _input [2P, T, H], target [2P, T], bias=None,
    ref_input=None, ref_weight=None, ref_bias=None, *, ref_chosen_logps=None,
    ref_rejected_logps=None)``. Rows ``[0, P)`` are the chosen sequences, ``[P, 2P)`` the
    rejected ones; row t of ``_input`` scores ``target[:, t]`` (no shift, as Liger). The
    reference head defaults to the policy's (``lin_weight``, ``bias``) when ``ref_weight`` is
    None; with ``ref_weight`` given, ``ref_bias=None`` means no bias (Liger's meaning).
    ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[P]``, summed, or averaged with
    ``average_log_prob``, as the policy's) replace ``ref_input``. A reference model with a head
    of its own in another dtype (``ref_input``, ``ref_weight``, ``ref_bias`` of one dtype) is
    scored in that dtype, as Liger scores it. Under ``torch.autocast`` every floating input is
    cast to autocast's dtype first (bf16 hidden states with an fp32 ``lin_weight``, as Liger's
    matmuls run), the gradients coming back in each input's dtype.

    Returns ``(loss, (chosen_logps [P], rejected_logps [P], chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards [P], rejected_rewards [P]))``: ``loss``
    differentiable w.r.t. ``_input``, ``lin_weight`` and ``bias``; the rest detached. The
    logits means are Liger's: the sum of the side's logits over ALL ``P * T`` rows (masked ones
    included) and the vocabulary, over ``P * T * V``. ``nll_loss`` is 0 without
    ``compute_nll_loss``. Rewards are ``beta * (logps - ref_logps)``. CPU and CUDA, as
    :func:`dpo_kernels.dpo_loss_from_hidden`.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        loss_weights: Sequence[float] | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        cdpo_smoothing: bool = False,
        simpo_gamma: float = 0.5,
        cpo_alpha: float = 1.0,
        cpo_base: str = "sigmoid",
        workspace_bytes: int | None = None,
    ):
        super().__init__()
        # Liger's attributes, read at every call (a schedule may change beta or alpha in between).
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau
        #: The library's options (keyword-only arguments), also read at every call.
        self.options = dict(loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                            f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
                            ld_alpha=ld_alpha, cdpo_smoothing=cdpo_smoothing, simpo_gamma=simpo_gamma,
                            cpo_alpha=cpo_alpha, cpo_base=cpo_base, workspace_bytes=workspace_bytes)
        # Check the whole configuration now, as Liger checks its own in the constructor: the
        # arguments, and their combination (unknown loss type, a label_smoothing the type does
        # not read, ...) by the pair-level op on one tiny pair.
        fused, pair, _, flags, _ = self._config()
        z = torch.zeros(1)
        ref = z if flags["use_ref_model"] else None
        _dk.dpo_loss(z, z, ref, ref, **pair)
        # And the fused op's configuration, with what only it reads (ld_alpha's range, ...).
        _dk._C.check_config(*_dk._config(**fused))

    def _config(self) -> tuple:
        """``(fused, pair, workspace_bytes, flags, alpha)``: the keywords of :func:`dpo_kernels.dpo_loss_from_hidden`
        (with compute_nll_loss's ``sft`` term of weight alpha) and of :func:`dpo_kernels.dpo_loss`
        (without it: the averaged path adds the NLL itself), the four flags as bools and alpha,
        from the current attributes, checked by the package's own checks (their messages name
        the argument). Hyperparameters may be one-element tensors and flags ints 0 / 1, as
        Liger reads them."""
        o = self.options
        _dk._ignore_index(self.ignore_index, None)
        flags = {name: _liger_flag(name, getattr(self, name))
                 for name in ("compute_nll_loss", "compiled", "use_ref_model", "average_log_prob")}
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
            raise ValueError(f"chunk_size = {c!r} is invalid: must be an int >= 1 (it is not used)")
        wb = _dk._check_workspace_bytes(o["workspace_bytes"], optional=True)
        names = _dk._loss_types(self.loss_type).split(",")
        weights = None if o["loss_weights"] is None else _dk._real_list("loss_weights", o["loss_weights"])
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type names {len(names)} types")
        pair = dict(
            loss_type=names, loss_weights=weights, beta=_dk._real("beta", _scalar(self.beta)),
            label_smoothing=_dk._real("label_smoothing", _scalar(self.label_smoothing)),
            discopop_tau=_dk._real("discopop_tau", _scalar(self.discopop_tau)),
            f_divergence_type=_dk._name("f_divergence_type", o["f_divergence_type"]),
            f_alpha_divergence_coef=_dk._real("f_alpha_divergence_coef", o["f_alpha_divergence_coef"]),
            cdpo_smoothing=_dk._flag("cdpo_smoothing", o["cdpo_smoothing"]),
            simpo_gamma=_dk._real("simpo_gamma", o["simpo_gamma"]), cpo_alpha=_dk._real("cpo_alpha", o["cpo_alpha"]),
            cpo_base=_dk._name("cpo_base", o["cpo_base"]), reference_free=not flags["use_ref_model"],
        )
        alpha = _dk._real("alpha", _scalar(self.alpha))
        fused = dict(pair, use_weighting=_dk._flag("use_weighting", o["use_weighting"]),
                     ld_alpha=None if o["ld_alpha"] is None else _dk._real("ld_alpha", o["ld_alpha"]))
        if flags["compute_nll_loss"]:  # Liger's loss + alpha * NLL(chosen) is the library's sft term
            fused["loss_type"] = names + ["sft"]
            fused["loss_weights"] = (weights or [1.0] * len(names)) + [alpha]
        if flags["average_log_prob"]:
            if fused["use_weighting"] or fused["ld_alpha"] is not None:
                raise ValueError("average_log_prob=True does not combine with use_weighting or ld_alpha (token-level "
                                 "weightings of summed log-probs)")
            bad = [n for n in names if n in _NLL_TYPES]
            if bad:
                raise ValueError(f"loss_type {bad[0]!r} does not combine with average_log_prob=True (its NLL needs "
                                 "token counts); use compute_nll_loss=True for Liger's NLL term")
        return fused, pair, wb, flags, alpha

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, use_ref_model={self.use_ref_model}, "
                f"average_log_prob={self.average_log_prob}, compute_nll_loss={self.compute_nll_loss}, "
                f"alpha={self.alpha}, ignore_index={self.ignore_index}")

    # ---- the call -------------------------------------------------------------------------

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, *,
                ref_chosen_logps=None, ref_rejected_logps=None):
        _tensor("lin_weight", lin_weight)
        _tensor("_input", _input)
        _tensor("target", target)
        for name, t in (("bias", bias), ("ref_input", ref_input), ("ref_weight", ref_weight), ("ref_bias", ref_bias),
                        ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            _tensor(name, t, optional=True)
        fused, pair, workspace_bytes, flags, alpha = self._config()
        if not flags["use_ref_model"]:  # Liger ignores the reference model's arguments then
            ref_input = ref_weight = ref_bias = None
        # A DTensor (FSDP2's sharded head, or any DTensor) gathered whole once, differentiably, as
        # the ops would gather it: every use below (the ops, the logits means) sees plain tensors.
        lin_weight, _input, bias, ref_input, ref_weight, ref_bias = (
            _dk.whole(n, t) for n, t in (("lin_weight", lin_weight), ("_input", _input), ("bias", bias),
                                         ("ref_input", ref_input), ("ref_weight", ref_weight), ("ref_bias", ref_bias)))
        compute = _dk._autocast_dtype(_input)
        if compute is not None:  # under autocast the matmuls run in its dtype (float64 stays), as Liger's do
            lin_weight, _input, bias, ref_input, ref_weight, ref_bias = (
                _dk._autocast_like_linear(t, compute) for t in (lin_weight, _input, bias, ref_input, ref_weight, ref_bias))
        _check_call(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, ref_chosen_logps,
                    ref_rejected_logps)
        ref = self._reference(flags["use_ref_model"], ref_input, ref_weight, ref_bias, ref_chosen_logps,
                              ref_rejected_logps)
        if flags["average_log_prob"]:
            loss, logps, rewards, nll = self._averaged(lin_weight, _input, target, bias, ref, pair, workspace_bytes,
                                                       flags["compute_nll_loss"], alpha)
        else:
            loss, logps, rewards, nll = self._fused(lin_weight, _input, target, bias, ref, fused, workspace_bytes,
                                                    flags["compute_nll_loss"])
        means = _logits_means(lin_weight, _input, bias)
        return loss, (logps[0], logps[1], means[0], means[1], nll, rewards[0], rewards[1])

    def _reference(self, use_ref_model, ref_input, ref_weight, ref_bias, ref_chosen_logps,
                   ref_rejected_logps) -> dict:
        """The reference source as keywords: {} (none), {ref_hidden, ref_weight, ref_bias} or
        {reference_chosen_logps, reference_rejected_logps}. Without use_ref_model the
        reference model's arguments were dropped (Liger ignores them); precomputed log-probs
        (not Liger's) are refused then."""
        if not use_ref_model:
            for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                if t is not None:
                    raise ValueError(f"{name} is given but use_ref_model=False (the reference log-probs are 0): "
                                     "construct with use_ref_model=True or leave it None")
            return {}
        logps = (ref_chosen_logps, ref_rejected_logps)
        if any(t is not None for t in logps):
            if ref_input is not None:
                raise ValueError("ref_input and ref_chosen_logps / ref_rejected_logps are both given: pass the "
                                 "reference model's hidden states or its precomputed log-probs, not both")
            for name, t in zip(("ref_chosen_logps", "ref_rejected_logps"), logps):
                if t is None:
                    raise ValueError(f"{name} is None but its counterpart is given: pass both precomputed reference "
                                     "log-probs")
            if ref_weight is not None or ref_bias is not None:
                raise ValueError("ref_weight / ref_bias are given with precomputed reference log-probs: leave them None")
            return dict(reference_chosen_logps=ref_chosen_logps.detach(),
                        reference_rejected_logps=ref_rejected_logps.detach())
        if ref_input is None:
            raise ValueError("ref_input is None but use_ref_model=True: pass the reference model's hidden states "
                             "(ref_input, with ref_weight / ref_bias), or precomputed ref_chosen_logps and "
                             "ref_rejected_logps, or construct with use_ref_model=False")
        if ref_weight is None and ref_bias is not None:
            raise ValueError("ref_bias is given without ref_weight: pass the reference head's weight too")
        return dict(ref_hidden=ref_input.detach(), ref_weight=None if ref_weight is None else ref_weight.detach(),
                    ref_bias=None if ref_bias is None else ref_bias.detach())

    def _fused(self, lin_weight, _input, target, bias, ref, config, workspace_bytes, compute_nll_loss):
        """Sums of log-probs: one call of the fused op (loss, gradients, pair values, NLL)."""
        loss, metrics, pairs = _dk.dpo_loss_from_hidden(
            _input, lin_weight, target, ref.get("reference_chosen_logps"), ref.get("reference_rejected_logps"),
            bias=bias, ref_hidden=ref.get("ref_hidden"), ref_weight=ref.get("ref_weight"), ref_bias=ref.get("ref_bias"),
            ignore_index=self.ignore_index, compute_metrics=False, return_pair_values=True,
            workspace_bytes=workspace_bytes, **config)
        nll = metrics["nll_loss"] if compute_nll_loss else torch.zeros_like(loss).detach()
        return (loss, (pairs["chosen_logps"], pairs["rejected_logps"]),
                (pairs["chosen_rewards"], pairs["rejected_rewards"]), nll)

    def _averaged(self, lin_weight, _input, target, bias, ref, config, workspace_bytes, compute_nll_loss, alpha):
        """Per-token means: the fused head's token log-probs, averaged per sequence, into the
        pair-level op; the NLL from the same token log-probs."""
        P = _input.shape[0] // 2
        tokens, counts = self._token_logps(_input, lin_weight, bias, target, workspace_bytes)
        logps = tokens.sum(-1) / counts
        if "ref_hidden" in ref:
            with torch.no_grad():
                rw = lin_weight if ref["ref_weight"] is None else ref["ref_weight"]
                rb = bias if ref["ref_weight"] is None else ref["ref_bias"]
                rt, _ = self._token_logps(ref["ref_hidden"], rw.detach(), None if rb is None else rb.detach(), target,
                                          workspace_bytes)
                rlogps = rt.sum(-1) / counts
            rc, rr = rlogps[:P], rlogps[P:]
        else:
            rc, rr = ref.get("reference_chosen_logps"), ref.get("reference_rejected_logps")
        losses, chosen_rewards, rejected_rewards = _dk.dpo_loss(logps[:P], logps[P:], rc, rr, **config)
        loss = losses.mean()
        nll = -tokens[:P].sum() / (target[:P] != self.ignore_index).sum().clamp(min=1).to(tokens.dtype)
        if compute_nll_loss:
            loss = loss + alpha * nll
        else:
            nll = torch.zeros_like(loss)
        detached = logps.detach()
        return loss, (detached[:P], detached[P:]), (chosen_rewards, rejected_rewards), nll.detach()

    def _token_logps(self, hidden, weight, bias, target, workspace_bytes):
        """``[2P, T]`` token log-probs (0 on masked tokens) and ``[2P]`` token counts (>= 1)."""
        B, T, H = hidden.shape
        # The inputs already have the dtypes autocast gives a matmul (forward() cast them; float64
        # stays): no second cast here (linear_logprobs would cast float64 too, as TRL's head does).
        device = hidden.device.type
        with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext():
            lp = _dk.linear_logprobs(hidden.reshape(B * T, H), weight, bias, target.reshape(B * T), outputs=(),
                                     ignore_index=self.ignore_index, workspace_bytes=workspace_bytes)[0]
        counts = (target != self.ignore_index).sum(-1).clamp(min=1).to(lp.dtype)
        return lp.view(B, T), counts


def _check_call(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, ref_chosen_logps,
                ref_rejected_logps) -> None:
    """Shapes, dtypes and devices of a call, named as in Liger's call (the ops would name their
    own arguments: hidden, weight, labels). Label values are checked by the ops (ValueError
    naming ``labels`` / ``targets``, i.e. ``target``)."""
    _dk.check_devices(("_input", _input), ("lin_weight", lin_weight), ("target", target), ("bias", bias),
                      ("ref_input", ref_input), ("ref_weight", ref_weight), ("ref_bias", ref_bias),
                      ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps))
    if _input.dim() != 3 or _input.shape[0] % 2 or _input.shape[0] == 0:
        raise ValueError(f"_input must be [2P, T, H] (P >= 1 chosen rows, then P rejected), got shape "
                         f"{tuple(_input.shape)}")
    if _input.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"_input must be float32, float64, bfloat16 or float16, got {_input.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(_input.shape[:2]):
        raise ValueError(f"target must have shape {tuple(_input.shape[:2])} to match _input {tuple(_input.shape)}, "
                         f"got {tuple(target.shape)}")
    for wname, w, bname, b in (("lin_weight", lin_weight, "bias", bias), ("ref_weight", ref_weight, "ref_bias", ref_bias)):
        if w is None:
            continue
        if w.dim() != 2 or w.shape[1] != _input.shape[2] or w.shape[0] < 1:
            raise ValueError(f"{wname} must be [V, H] with H = {_input.shape[2]} (_input's last size), got shape "
                             f"{tuple(w.shape)}")
        if wname == "ref_weight" and w.shape[0] != lin_weight.shape[0]:
            raise ValueError(f"ref_weight has vocabulary {w.shape[0]} but lin_weight has {lin_weight.shape[0]}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{bname} must have shape [{w.shape[0]}] to match {wname}, got {tuple(b.shape)}")
    # The policy's head in _input's dtype; the reference's in ref_input's, which may differ when
    # it has a head of its own (scored in its own dtype, as Liger does); under autocast all
    # were cast to autocast's dtype before.
    for name, t in (("lin_weight", lin_weight), ("bias", bias)):
        if t is not None and t.dtype != _input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but _input has {_input.dtype}: they must match (or run "
                            "under torch.autocast)")
    if ref_input is not None:
        own = ref_weight is not None
        head = "ref_weight" if own else "lin_weight (the reference's head when ref_weight is None)"
        for name, t in ((head, ref_weight if own else lin_weight), ("ref_bias", ref_bias)):
            if t is not None and t.dtype != ref_input.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but ref_input has {ref_input.dtype}: they must match")
        if ref_input.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"ref_input must be float32, float64, bfloat16 or float16, got {ref_input.dtype}")
    elif ref_weight is not None and ref_bias is not None and ref_bias.dtype != ref_weight.dtype:
        raise TypeError(f"ref_bias has dtype {ref_bias.dtype} but ref_weight has {ref_weight.dtype}: they must match")
    if ref_input is not None and ref_input.shape != _input.shape:
        raise ValueError(f"ref_input must have _input's shape {tuple(_input.shape)}, got {tuple(ref_input.shape)}")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is not None and tuple(t.shape) != (_input.shape[0] // 2,):
            raise ValueError(f"{name} must have shape [P] = [{_input.shape[0] // 2}], got {tuple(t.shape)}")
        if t is not None and t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _logits_means(weight, hidden, bias):
    """Liger's chosen / rejected logits means: each side's logits summed over its ``P * T``
    rows and the vocabulary, over ``P * T * V``. Exactly, without logits:
    ``sum_{r,v} (h_r . w_v + b_v) = (sum_r h_r) . (sum_v w_v) + rows * sum_v b_v``."""
    with torch.no_grad():
        P, V = hidden.shape[0] // 2, weight.shape[0]
        rows = P * hidden.shape[1]
        w_sum = weight.detach().sum(0).double()
        h_sum = hidden.detach().reshape(2, rows, hidden.shape[-1]).sum(1).double()  # [chosen, rejected] rows summed
        total = h_sum @ w_sum
        if bias is not None:
            total = total + rows * bias.detach().sum().double()
        out = (total / (rows * V)).to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        return out[0], out[1]
