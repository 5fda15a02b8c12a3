# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Eager PyTorch references the op tests compare against (conftest puts this folder on sys.path)."""
import torch


def eager_logps(logits, labels):
    """Per-sequence sums of the label log-probs over rows whose label is not -100, in float64."""
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (labels != -100)).sum(-1)
