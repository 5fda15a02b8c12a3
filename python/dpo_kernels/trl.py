# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""One-line switches that make TRL's trainers use dpo_kernels.

:func:`patch_chunked_logprobs` replaces TRL's chunked LM head (``ChunkedLogProbFunction``,
which ``trl.trainer.utils.add_fused_lm_head`` wires into every model DPOTrainer, SFTTrainer,
GRPOTrainer, RLOOTrainer and KTOTrainer train) with :func:`dpo_kernels.linear_logprobs`::

    import dpo_kernels.trl
    dpo_kernels.trl.patch_chunked_logprobs()      # or: with dpo_kernels.trl.patch_chunked_logprobs(): ...
    trainer = trl.DPOTrainer(...); trainer.train()

Tested with TRL 1.16. The head runs on CPU and CUDA tensors (on CUDA: cuBLASLt GEMMs, no host
synchronisation; docs/python_linear.md, "CUDA"); the patch never falls back to TRL's head.

:class:`FusedDPOTrainer` goes further: a ``trl.DPOTrainer`` whose whole loss is
:func:`dpo_kernels.dpo_loss_from_hidden` (the backbone's hidden states and the LM head's
weight, never the logits; the loss, TRL's metrics and the head's gradients in one call)::

    from dpo_kernels.trl import FusedDPOTrainer
    trainer = FusedDPOTrainer(model=..., ref_model=..., args=DPOConfig(...), ...)   # as DPOTrainer
"""
from __future__ import annotations

import functools
import importlib
import threading
import types
import warnings

import torch

from . import _C, _config
from ._linear import OPTIONAL_OUTPUTS, autocast_dtype, check_workspace_bytes, linear_logprobs

__all__ = ["ChunkedLogProbFunction", "FusedDPOTrainer", "patch_chunked_logprobs", "unpatch_chunked_logprobs",
           "is_patched"]

#: TRL versions the patch and FusedDPOTrainer are tested with (major.minor).
TESTED_TRL = ("1.16",)


def _import_trl(what: str, check_version: bool, bypass: str):
    """TRL, after checking that its version is one of TESTED_TRL (unless `check_version` is false)."""
    try:
        trl = importlib.import_module("trl")
    except ImportError as e:
        raise ImportError(f"{what} needs TRL (pip install trl)") from e
    version = getattr(trl, "__version__", "?")
    if check_version and ".".join(version.split(".")[:2]) not in TESTED_TRL:
        raise RuntimeError(
            f"{what} is tested with TRL {', '.join(TESTED_TRL)}, found {version}: TRL's internals it relies on may "
            f"have changed. {bypass}"
        )
    return trl


# Where TRL keeps a reference to its function: (module, attribute). trainer.utils looks its
# `_ChunkedLogProbFunction` up at call time, so replacing it there reroutes every fused head.
_TARGETS = (
    ("trl.trainer.utils", "_ChunkedLogProbFunction"),
    ("trl.kernels", "ChunkedLogProbFunction"),
    ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
)


class ChunkedLogProbFunction:
    """A drop-in for ``trl.kernels.ChunkedLogProbFunction``: ``apply`` takes TRL's arguments
    and returns its five outputs, computed by :func:`dpo_kernels.linear_logprobs`.
    ``chunk_size`` (TRL's vocabulary tile width) is accepted and not used: the library picks its
    chunks from its workspace budget. The targets are scored as given (TRL's callers pass
    only valid ones); an out-of-range target raises ValueError instead of giving garbage."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        return linear_logprobs(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                               outputs, ignore_index=_NO_IGNORE)


# TRL's function has no ignore index: a value no int64 target can hold turns ours off.
_NO_IGNORE = -(2**63)

_lock = threading.Lock()
_originals: dict | None = None


def is_patched() -> bool:
    """Whether TRL's chunked head is currently replaced."""
    return _originals is not None


#: Handles of the current patch not yet undone, and the patch's generation (bumped by every
#: full restore, so a handle of an earlier patch cannot undo a later one).
_holders = 0
_generation = 0


class _Patch:
    """What :func:`patch_chunked_logprobs` returns: undoes the patch as a context manager.

    Handles nest: TRL's head comes back when the last handle of the patch is undone (an inner
    ``with patch_chunked_logprobs():`` does not undo an outer one); each handle undoes once."""

    def __init__(self):
        self._generation = _generation
        self._active = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def undo(self) -> None:
        global _holders
        with _lock:
            if not self._active or self._generation != _generation:
                return
            self._active = False
            _holders -= 1
            if _holders == 0:
                _restore()


def patch_chunked_logprobs(check_version: bool = True) -> _Patch:
    """Replaces TRL's ``ChunkedLogProbFunction`` with :class:`ChunkedLogProbFunction` (ours)
    wherever TRL refers to it. Idempotent: a second call while patched only adds a handle.
    Returns a handle: ``with patch_chunked_logprobs():`` (or ``handle.undo()``) releases it, and
    TRL's head comes back when every handle is released (nested uses keep the outer patch);
    :func:`unpatch_chunked_logprobs` restores it at once.

    Raises ImportError when TRL is missing or lacks the function (e.g. TRL < 1.16), and, with
    ``check_version``, RuntimeError on a TRL version the patch was not tested with."""
    global _originals
    trl = _import_trl("dpo_kernels.trl.patch_chunked_logprobs", check_version,
                      "Pass check_version=False to patch anyway.")
    version = getattr(trl, "__version__", "?")
    global _holders
    with _lock:
        if _originals is not None:
            _holders += 1
            return _Patch()
        found = {}
        for mod_name, attr in _TARGETS:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            if hasattr(mod, attr):
                found[(mod_name, attr)] = getattr(mod, attr)
        if ("trl.trainer.utils", "_ChunkedLogProbFunction") not in found:
            raise ImportError(
                f"TRL {version} has no trl.trainer.utils._ChunkedLogProbFunction: nothing to patch "
                f"(tested with TRL {', '.join(TESTED_TRL)})"
            )
        for (mod_name, attr) in found:
            setattr(importlib.import_module(mod_name), attr, ChunkedLogProbFunction)
        _originals = found
        _holders = 1
        return _Patch()


def _restore() -> None:
    """Puts TRL's functions back (with _lock held); the handles of this patch become no-ops."""
    global _originals, _holders, _generation
    if _originals is None:
        return
    for (mod_name, attr), original in _originals.items():
        setattr(importlib.import_module(mod_name), attr, original)
    _originals = None
    _holders = 0
    _generation += 1


def unpatch_chunked_logprobs() -> None:
    """Restores TRL's own ``ChunkedLogProbFunction`` now, whatever handles are open (they become
    no-ops). A no-op when not patched."""
    with _lock:
        _restore()


# ---------------------------------------------------------------------------------------------
# FusedDPOTrainer

#: Batch keys that are not model inputs (TRL 1.16's DPOTrainer drops the same ones).
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})

#: The metrics DPOTrainer logs as token-weighted means over the completion tokens (of both sides
#: for entropy, of one side for the others), in its order.
_TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def logit_transforms(config) -> dict:
    """``softcap`` and ``logit_scale`` of :func:`dpo_kernels.dpo_loss_from_hidden` for a
    transformers model config, read as TRL 1.16's fused LM head reads them:
    ``final_logit_softcapping``; ``logit_scale``, else ``output_multiplier``, else
    ``lm_head_multiplier``, else ``logits_scaling`` (its inverse, except for HyperCLOVA X);
    absent means 1."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text, name, None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / text.logits_scaling
    return {"softcap": getattr(text, "final_logit_softcapping", None), "logit_scale": 1.0 if scale is None else scale}


def _full(t):
    """A DTensor parameter (FSDP2) gathered whole, differentiably; any other tensor as is."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _add_head_forward(model) -> None:
    """Lets ``model(..., dpo_kernels_head=fn)`` run the backbone and return
    ``fn(last_hidden_state, lm_head.weight, lm_head.bias, **logit_transforms)``: the loss is
    computed INSIDE the model's forward, so a DDP/FSDP wrapper sees the LM head used by its
    output (``find_unused_parameters`` finds it; FSDP has it gathered). Without the keyword,
    the previous forward runs unchanged (generation and TRL's own fused head keep working)."""
    if getattr(model, "_dpo_kernels_head", False):
        return
    previous = model.forward
    transforms = logit_transforms(model.config)

    @functools.wraps(type(model).forward)
    def forward(self, *args, dpo_kernels_head=None, **kwargs):
        if dpo_kernels_head is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        return dpo_kernels_head(hidden, _full(head.weight), _full(head.bias), **transforms)

    model.forward = types.MethodType(forward, model)
    model._dpo_kernels_head = True


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head runs in: autocast's when it is on (TRL's head runs under it), else hidden's."""
    return autocast_dtype(hidden) or hidden.dtype


def _reference_head(hidden, weight, bias, softcap, logit_scale):
    """The reference model's head inputs in its compute dtype, with its OWN logit transforms
    (its config's, as TRL's head reads them for the reference model)."""
    dtype = _compute_dtype(hidden)
    return (hidden[:, :-1].to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
            {"softcap": softcap, "logit_scale": logit_scale})


class _FusedLoss:
    """What the policy's forward runs on its hidden states: dpo_loss_from_hidden with the
    trainer's config and reference, returning ``(loss, metrics, pair_values)``.

    `reference`: the precomputed log-probs, or ``ref_head`` = the reference model's (hidden,
    weight, bias, transforms). That head goes into the fused call when it matches the policy's
    (dtype, shapes, logit transforms); otherwise (a reference in another dtype, with its own
    softcap or scale, or another hidden size) its log-probs are computed first, by the library
    in its own dtype and transforms (LD-DPO weighted alike), and passed as log-probs."""

    def __init__(self, labels, reference: dict, config: dict):
        self.labels, self.reference, self.config = labels, reference, config

    def __call__(self, hidden, weight, bias, softcap, logit_scale):
        from . import dpo_loss_from_hidden

        dtype = _compute_dtype(hidden)
        hidden, weight = hidden[:, :-1].to(dtype), weight.to(dtype)
        reference = self.reference
        if "ref_head" in reference:
            ref_hidden, ref_weight, ref_bias, ref_transforms = reference["ref_head"]
            if (ref_hidden.dtype == dtype and ref_hidden.shape == hidden.shape and ref_weight.shape == weight.shape
                    and ref_transforms == {"softcap": softcap, "logit_scale": logit_scale}):
                reference = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
            else:
                reference = self._reference_logps(ref_hidden, ref_weight, ref_bias, ref_transforms)
        return dpo_loss_from_hidden(
            hidden, weight, self.labels, bias=None if bias is None else bias.to(dtype),
            softcap=softcap, logit_scale=logit_scale, return_pair_values=True, **reference, **self.config,
        )

    def _reference_logps(self, ref_hidden, ref_weight, ref_bias, transforms) -> dict:
        from . import dpo_loss_from_hidden

        P = self.labels.shape[0] // 2
        zeros = torch.zeros(P, dtype=torch.float64, device=ref_hidden.device)
        with torch.no_grad():
            pairs = dpo_loss_from_hidden(
                ref_hidden, ref_weight, self.labels, zeros, zeros, bias=ref_bias, **transforms,
                ld_alpha=self.config["ld_alpha"], compute_metrics=False, return_pair_values=True,
                workspace_bytes=self.config["workspace_bytes"])[2]
        return {"reference_chosen_logps": pairs["chosen_logps"], "reference_rejected_logps": pairs["rejected_logps"]}


#: The loss types TRL 1.16's DPOTrainer implements (trl/trainer/dpo_trainer.py), the ones
#: FusedDPOTrainer accepts.
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _trainer_class():
    """Builds FusedDPOTrainer (a subclass of trl.DPOTrainer, so TRL is imported only when used)."""
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    class FusedDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` whose loss is :func:`dpo_kernels.dpo_loss_from_hidden`.

        Takes DPOTrainer's arguments and DPOConfig's fields; trains and logs as DPOTrainer does
        (the same loss for every ``loss_type`` / ``loss_weights`` / f-divergence / WPO /
        LD-DPO, the same metrics, within fp32 rounding), but the loss, the metrics and the
        gradients of the last hidden states and of the LM head's weight and bias come from one
        call on the backbone's hidden states and the head's weight: the ``[rows, V]`` logits
        are never built, and TRL's per-token log-prob tensors and their autograd graph are
        not either. The reference is the reference model's hidden states and head (run
        without grad), or TRL's precomputed reference log-probs
        (``precompute_ref_log_probs=True``; precomputed by TRL's own head, or by ours under
        :func:`patch_chunked_logprobs`). Logit transforms (``final_logit_softcapping``,
        ``logit_scale`` and its aliases) are read from each model's config as TRL reads them; a
        reference model with other transforms, another dtype or another hidden size than the
        policy's is scored by the library on its own head first (one more GEMM pass, no
        logits), its log-probs then passed to the policy's call.

        The hook is the public ``Trainer.compute_loss``; it reads DPOTrainer's attributes
        (``loss_types``, ``_metrics``, ...), so the class checks TRL's version at
        construction: RuntimeError on a version outside ``TESTED_TRL`` unless
        ``check_trl_version=False``.

        Extra keyword arguments: ``check_trl_version`` (default True), ``workspace_bytes``
        (the fused head's workspace budget, default 768 MiB on the CPU, 1022 MiB on CUDA).

        Loss types: TRL's DPOTrainer's (``TRL_DPO_LOSS_TYPES``); any other name is a ValueError
        at construction (TRL raises at its first step). Dropout: the reference model's forward
        runs before the policy's (TRL's runs after it), so with dropout on
        (``disable_dropout=False``) in a reference model left in train mode the two trainers
        draw other masks; with TRL's default ``disable_dropout=True`` they match.

        Not supported (NotImplementedError at construction): PEFT models / ``peft_config``,
        vision-language models, a MoE router auxiliary loss (set ``router_aux_loss_coef=0``), and
        context or sequence parallelism.

        One case runs TRL's own loss: with ``ipo`` or ``sigmoid_norm``, a batch with a
        completion token at position 0 (an empty prompt, or ``keep_end`` truncation of the
        whole prompt). Those losses divide by TRL's completion length, which counts that token
        although no logit scores it, and the library counts the scored tokens; so such a batch
        goes to ``DPOTrainer.compute_loss`` (TRL's chunked head, or ours under
        :func:`patch_chunked_logprobs`), with a warning the first time. Like
        :func:`dpo_kernels.dpo_loss_from_hidden`, the head runs on CPU and CUDA models.
        """

        def __init__(self, *args, check_trl_version: bool = True, workspace_bytes: int | None = None, **kwargs):
            _import_trl("dpo_kernels.trl.FusedDPOTrainer", check_trl_version,
                        "Pass check_trl_version=False to try it anyway, or use TRL's DPOTrainer.")
            if kwargs.get("peft_config") is not None:
                raise NotImplementedError("FusedDPOTrainer does not support PEFT (peft_config) yet: use "
                                          "trl.DPOTrainer, optionally with dpo_kernels.trl.patch_chunked_logprobs()")
            super().__init__(*args, **kwargs)
            from accelerate.utils import is_peft_model

            unsupported = [
                (is_peft_model(self.model), "PEFT models"),
                (self._is_vlm or self._is_vision_dataset, "vision-language models"),
                (self.aux_loss_enabled, "a MoE router auxiliary loss (set router_aux_loss_coef=0 in DPOConfig)"),
            ]
            pc = self.accelerator.parallelism_config
            for name in ("cp_size", "sp_size"):
                unsupported.append((pc is not None and (getattr(pc, name, 1) or 1) > 1, f"{name} > 1"))
            for bad, what in unsupported:
                if bad:
                    raise NotImplementedError(f"FusedDPOTrainer does not support {what} yet: use trl.DPOTrainer")
            # What DPOTrainer trains, nothing more: TRL raises "Unknown loss type" at its first step
            # for any other name (the library's reference-free simpo / cpo / orpo included, whose
            # own hyperparameters DPOConfig cannot set), so a config TRL refuses is refused here.
            for t in self.loss_types:
                if t not in TRL_DPO_LOSS_TYPES:
                    raise ValueError(
                        f"loss_type {t!r} is not one of TRL's DPOTrainer loss types ({', '.join(TRL_DPO_LOSS_TYPES)}), "
                        "which FusedDPOTrainer trains as DPOTrainer does; the library's other losses (simpo, cpo, "
                        "orpo) are available through dpo_kernels.dpo_loss_from_hidden")
            self._dk_workspace_bytes = workspace_bytes
            self._dk_warned_lengths = False
            # The configuration as the fused loss will read it, checked now (TRL's DPOConfig
            # accepts what the library refuses, e.g. a label_smoothing sigmoid ignores), before
            # the models' forwards are wrapped rather than at the first training step.
            config = self._dk_config()
            check_workspace_bytes(config.pop("workspace_bytes"), optional=True)
            _C.check_config(*_config(**config))
            _add_head_forward(self.model)
            if self.ref_model is not None:
                _add_head_forward(self.accelerator.unwrap_model(self.ref_model))

        def _dk_config(self) -> dict:
            return dict(
                loss_type=self.loss_types, loss_weights=self.loss_weights, beta=self.beta,
                label_smoothing=self.label_smoothing, f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.args.discopop_tau,
                use_weighting=self.use_weighting, ld_alpha=self.ld_alpha, workspace_bytes=self._dk_workspace_bytes,
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            model_kwargs["use_cache"] = False
            completion_mask = inputs["completion_mask"]
            if self._dk_needs_trl_lengths(completion_mask):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:].contiguous()
            if self.precompute_ref_logps:
                reference = {"reference_chosen_logps": inputs["ref_chosen_logps"],
                             "reference_rejected_logps": inputs["ref_rejected_logps"]}
            else:
                # Under the mixed-precision autocast that accelerate puts around the models'
                # forwards: it wrapped the reference's before _add_head_forward wrapped it again.
                with torch.no_grad(), self.accelerator.autocast(), \
                        disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                    reference = {"ref_head": self.ref_model(**model_kwargs, dpo_kernels_head=_reference_head)}
            # Through the (possibly DDP-wrapped) model: the loss is its forward's output.
            with self.accelerator.autocast():
                loss, metrics, pairs = model(**model_kwargs,
                                             dpo_kernels_head=_FusedLoss(labels, reference, self._dk_config()))
            self._dk_log(mode, inputs, metrics, pairs)
            if return_outputs:
                warnings.warn(
                    "`return_outputs=True` (the logits for `compute_metrics`) needs an extra forward pass: "
                    "FusedDPOTrainer never builds the logits.", FutureWarning, stacklevel=2)
                with torch.no_grad():
                    return loss, model(**model_kwargs)
            return loss

        def _dk_needs_trl_lengths(self, completion_mask) -> bool:
            """ipo and sigmoid_norm divide by TRL's completion length, the unshifted completion
            mask's count, which includes a completion token at position 0 (an empty prompt, or
            ``truncation_mode="keep_end"`` cutting the whole prompt) that no logit scores; the
            library counts the scored tokens. Such a batch is TRL's to compute, on every process
            if any has one: the two paths gather different metrics, so the processes must agree
            (one host read per step, and one all-gather with several processes, for these loss
            types only)."""
            length_losses = [t for t in self.loss_types if t in ("ipo", "sigmoid_norm")]
            if not length_losses:
                return False
            at_zero = completion_mask[:, 0].any().reshape(1)
            if self.accelerator.num_processes > 1:
                at_zero = self.accelerator.gather(at_zero.int()).bool()
            if not bool(at_zero.any()):
                return False
            if not self._dk_warned_lengths:
                self._dk_warned_lengths = True
                warnings.warn(
                    f"FusedDPOTrainer: loss_type {length_losses[0]!r} divides by TRL's completion length, which "
                    "counts a completion token at position 0 (an empty prompt, or truncation_mode='keep_end' that "
                    "cut the whole prompt) although no logit scores it; dpo_kernels counts only the scored tokens. "
                    "Batches with such a completion run DPOTrainer's own loss (its head, its memory) so that they "
                    "train as DPOTrainer does. Keep a prompt token in every example (e.g. "
                    "truncation_mode='keep_start') to run every batch on the fused head.",
                    RuntimeWarning, stacklevel=3)
            return True

        def _dk_log(self, mode, inputs, metrics, pairs):
            """Appends DPOTrainer's metrics, reduced over the processes as DPOTrainer reduces them:
            token-weighted means for the token metrics, means over all pairs for the rewards and
            log-probs."""
            acc = self.accelerator
            shift = inputs["completion_mask"][:, 1:]
            chosen, rejected = shift.chunk(2, dim=0)
            counts = (shift.sum(), chosen.sum(), rejected.sum(), chosen.sum())
            local = torch.stack([x for k, n in zip(_TOKEN_METRICS, counts)
                                 for x in (metrics[k].double() * n, n.double())])
            token_sums = acc.gather(local).view(-1, 2 * len(_TOKEN_METRICS)).sum(0).tolist()
            pair = torch.stack([pairs[k] for k in ("chosen_rewards", "rejected_rewards", "chosen_logps",
                                                   "rejected_logps")])
            cr, rr, cl, rl = acc.gather(pair.T.contiguous()).T.double()
            token = {k: (token_sums[2 * i] / token_sums[2 * i + 1] if token_sums[2 * i + 1] > 0 else 0.0)
                     for i, k in enumerate(_TOKEN_METRICS)}
            if mode == "train":
                num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += num_tokens // self._tp_size
            log = self._metrics[mode]
            log["entropy"].append(token["entropy"])
            log["num_tokens"] = [self._total_train_tokens]
            for k in _TOKEN_METRICS[1:]:
                log[k].append(token[k])
            values = torch.stack([cr.mean(), rr.mean(), (cr > rr).double().mean(), (cr - rr).mean(), cl.mean(),
                                  rl.mean()]).tolist()
            for k, v in zip(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                             "logps/chosen", "logps/rejected"), values):
                log[k].append(v)

    FusedDPOTrainer.__module__ = __name__
    FusedDPOTrainer.__qualname__ = "FusedDPOTrainer"
    return FusedDPOTrainer


_trainer = None


def __getattr__(name):
    # FusedDPOTrainer subclasses trl.DPOTrainer: built on first access, so importing this module
    # needs no TRL.
    global _trainer
    if name == "FusedDPOTrainer":
        if _trainer is None:
            _trainer = _trainer_class()
        return _trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
