# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""One-line switches that make TRL's trainers use dpo_kernels.

:func:`patch_chunked_logprobs` replaces TRL's chunked LM head (``ChunkedLogProbFunction``,
which ``trl.trainer.utils.add_fused_lm_head`` wires into every model DPOTrainer, SFTTrainer,
GRPOTrainer, RLOOTrainer and KTOTrainer train) with :func:`dpo_kernels.linear_logprobs`::

    import dpo_kernels.trl
    dpo_kernels.trl.patch_chunked_logprobs()      # or: with dpo_kernels.trl.patch_chunked_logprobs(): ...
    trainer = trl.DPOTrainer(...); trainer.train()

Tested with TRL 1.16. The head runs on the CPU only for now: CUDA tensors raise
NotImplementedError (the patch never falls back silently).
"""
from __future__ import annotations

import importlib
import threading

from ._linear import OPTIONAL_OUTPUTS, linear_logprobs

__all__ = ["ChunkedLogProbFunction", "patch_chunked_logprobs", "unpatch_chunked_logprobs", "is_patched"]

#: TRL versions the patch is tested with (major.minor).
TESTED_TRL = ("1.16",)

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


class _Patch:
    """What :func:`patch_chunked_logprobs` returns: undoes the patch as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch_chunked_logprobs()
        return False

    def undo(self) -> None:
        unpatch_chunked_logprobs()


def patch_chunked_logprobs(check_version: bool = True) -> _Patch:
    """Replaces TRL's ``ChunkedLogProbFunction`` with :class:`ChunkedLogProbFunction` (ours)
    wherever TRL refers to it. Idempotent. Returns a handle: ``with patch_chunked_logprobs():``
    undoes the patch on exit; :func:`unpatch_chunked_logprobs` undoes it explicitly.

    Raises ImportError when TRL is missing or lacks the function (e.g. TRL < 1.16), and, with
    ``check_version``, RuntimeError on a TRL version the patch was not tested with."""
    global _originals
    try:
        trl = importlib.import_module("trl")
    except ImportError as e:
        raise ImportError("dpo_kernels.trl.patch_chunked_logprobs needs TRL (pip install trl)") from e
    version = getattr(trl, "__version__", "?")
    if check_version and ".".join(version.split(".")[:2]) not in TESTED_TRL:
        raise RuntimeError(
            f"dpo_kernels.trl.patch_chunked_logprobs is tested with TRL {', '.join(TESTED_TRL)}, found {version}: "
            "TRL's chunked head may have changed contract. Pass check_version=False to patch anyway."
        )
    with _lock:
        if _originals is not None:
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
    return _Patch()


def unpatch_chunked_logprobs() -> None:
    """Restores TRL's own ``ChunkedLogProbFunction``. A no-op when not patched."""
    global _originals
    with _lock:
        if _originals is None:
            return
        for (mod_name, attr), original in _originals.items():
            setattr(importlib.import_module(mod_name), attr, original)
        _originals = None
