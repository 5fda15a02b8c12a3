# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Regression tests of issue 16 through the PyTorch ops (CPU):

1. loss_type=["aot", "aot_unpaired"] (either order) is the weighted sum of the two terms,
   each sorting its own keys, as TRL's formulas give it;
2. tied maxima at large magnitudes: log-probs and gradients equal torch.log_softmax's;
3. a -inf rejected label logit gives the limit (a finite loss and gradient), not NaN.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dpo_kernels as dk
from eager import eager_logps


def batch(P=4, T=3, V=5, seed=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * P, T, V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, 0] = -100  # a prompt token per sequence
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 6 - 2
    rr = -torch.rand(P, generator=g, dtype=torch.float64) * 6 - 2
    return logits, labels, rc, rr


def trl_aot(pc, pr, rc, rr, unpaired, beta=0.1, eps=0.0):
    """TRL's aot / aot_unpaired (docs/losses.md), each sorting its own keys."""
    if unpaired:
        a, b = pc - rc, pr - rr
    else:
        a, b = pc - pr, rc - rr
    delta = torch.sort(a).values - torch.sort(b).values
    x = beta * delta
    return (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean()


# ---- 1. aot with aot_unpaired ---------------------------------------------------------------

@pytest.mark.parametrize("order", [["aot", "aot_unpaired"], ["aot_unpaired", "aot"]])
def test_aot_with_aot_unpaired_from_logits_is_the_sum_of_the_terms(order):
    logits, labels, rc, rr = batch()
    P = rc.numel()
    eps = 0.1
    pi = eager_logps(logits, labels)
    want = trl_aot(pi[:P], pi[P:], rc, rr, False, eps=eps) + trl_aot(pi[:P], pi[P:], rc, rr, True, eps=eps)

    def run(loss_type):
        z = logits.clone().requires_grad_()
        loss, _ = dk.dpo_loss_from_logits(z, labels, rc, rr, loss_type=loss_type, label_smoothing=eps)
        loss.backward()
        return loss.detach(), z.grad

    loss, grad = run(order)
    la, ga = run("aot")
    lu, gu = run("aot_unpaired")
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, la + lu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ga + gu, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("order", [["aot", "aot_unpaired"], ["aot_unpaired", "aot"]])
def test_aot_with_aot_unpaired_pair_level_is_the_weighted_sum_of_the_terms(order):
    g = torch.Generator().manual_seed(17)
    P = 7
    pc, pr, rc, rr = (-torch.rand(P, generator=g, dtype=torch.float64) * 30 - 5 for _ in range(4))
    weights = {"aot": 0.7, "aot_unpaired": 0.4}

    def run(loss_type, loss_weights):
        c = pc.clone().requires_grad_()
        r = pr.clone().requires_grad_()
        losses, _, _ = dk.dpo_loss(c, r, rc, rr, loss_type=loss_type, label_smoothing=0.1, loss_weights=loss_weights)
        loss = losses.mean()
        loss.backward()
        return loss.detach(), c.grad, r.grad

    loss, gc, gr = run(order, [weights[t] for t in order])
    la, gca, gra = run("aot", None)
    lu, gcu, gru = run("aot_unpaired", None)
    torch.testing.assert_close(loss, 0.7 * la + 0.4 * lu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, 0.7 * gca + 0.4 * gcu, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gr, 0.7 * gra + 0.4 * gru, rtol=1e-12, atol=1e-14)
    want = 0.7 * trl_aot(pc, pr, rc, rr, False, eps=0.1) + 0.4 * trl_aot(pc, pr, rc, rr, True, eps=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


# ---- 2. tied maxima at large magnitudes -----------------------------------------------------

def tied_maxima(big, dtype=torch.float64):
    """Two one-row sequences whose rows have four tied maxima at `big` (columns 0, 2, 3, 5
    of 7, the others |big| lower): softmax 0.25 on each maximum at any magnitude."""
    low = big - abs(big) * (2 if big > 0 else 1)
    row = torch.full((7,), low, dtype=torch.float64)
    row[[0, 2, 3, 5]] = big
    logits = row.expand(2, 1, 7).clone().to(dtype)
    labels = torch.tensor([[2], [0]])
    return logits, labels


@pytest.mark.parametrize("big", [1e5, 1e7, 1e17, -1e17, 1e300])
def test_tied_maxima_sequence_logps_forward_and_backward_match_log_softmax(big):
    logits, labels = tied_maxima(big)
    z = logits.clone().requires_grad_()
    got = dk.sequence_logps(z, labels)
    seq_grad = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    (got * seq_grad).sum().backward()
    ref = logits.clone().requires_grad_()
    want = eager_logps(ref, labels)
    (want * seq_grad).sum().backward()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(got.detach(), torch.full((2,), math.log(0.25), dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(z.grad, ref.grad, rtol=0, atol=1e-15)
    # The chosen row of -logp: -0.75 at the label, 0.25 at the other maxima, row sum 0.
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([0.25, 0, -0.75, 0.25, 0, 0.25, 0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert abs(float(z.grad[0, 0].sum())) <= 1e-15


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e5), (torch.float32, 1e7), (torch.float32, -1e7),
                                       (torch.bfloat16, 1e6), (torch.float16, 3e4)])
def test_tied_maxima_sequence_logps_low_precision_backward_is_exact(dtype, big):
    """The saved row_lse stays float64 for every logits dtype: a float32 copy loses the low
    part the backward adds back (-0.632 instead of -0.75 at fp32 1e7 before the fix)."""
    logits, labels = tied_maxima(big, dtype)
    z = logits.clone().requires_grad_()
    got = dk.sequence_logps(z, labels)
    (got * torch.tensor([-1.0, 0.5])).sum().backward()
    torch.testing.assert_close(got.detach().double(), torch.full((2,), math.log(0.25), dtype=torch.float64),
                               rtol=0, atol=1e-6)
    want = torch.tensor([0.25, 0, -0.75, 0.25, 0, 0.25, 0], dtype=torch.float64)
    torch.testing.assert_close(z.grad[0, 0].double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("big", [1e5, 1e7, 1e17, -1e17, 1e300])
def test_tied_maxima_dpo_loss_from_logits_match_log_softmax(big):
    logits, labels = tied_maxima(big)
    zero = torch.zeros(1, dtype=torch.float64)
    z = logits.clone().requires_grad_()
    loss, _, pair = dk.dpo_loss_from_logits(z, labels, zero, zero, loss_type="sft", return_pair_values=True)
    loss.backward()
    ref = logits.clone().requires_grad_()
    want = -torch.log_softmax(ref[0, 0], -1)[2]  # sft: the chosen token's cross-entropy
    want.backward()
    torch.testing.assert_close(pair["chosen_logps"], torch.full((1,), math.log(0.25), dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(pair["rejected_logps"], torch.full((1,), math.log(0.25), dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(z.grad, ref.grad, rtol=0, atol=1e-15)
    assert abs(float(z.grad[0, 0].sum())) <= 1e-15


# ---- 3. a -inf rejected label logit ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neg_inf_rejected_label_logit_gives_the_limit(dtype):
    logits, labels, rc, rr = batch(P=3, T=4, V=9, seed=18, dtype=dtype)
    P = rc.numel()
    row = P + 1  # rejected sequence of pair 1
    t = int((labels[row] >= 0).nonzero()[0])
    logits[row, t, labels[row, t]] = -math.inf
    z = logits.clone().requires_grad_()
    loss, _, pair = dk.dpo_loss_from_logits(z, labels, rc, rr, return_pair_values=True)
    loss.backward()
    assert pair["rejected_logps"][1] == -math.inf
    assert torch.isfinite(loss)
    assert torch.isfinite(pair["losses"]).all()
    assert pair["losses"][1] == 0  # -log_sigmoid(+inf), TRL's value
    assert torch.isfinite(z.grad).all()
    assert z.grad[row].eq(0).all()  # the saturated pair passes no gradient
    # The other pairs as TRL's sigmoid loss gives them.
    pi = eager_logps(logits, labels)
    x = 0.1 * ((pi[:P] - rc) - (pi[P:] - rr))
    want = -F.logsigmoid(x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pair["losses"].double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.double(), want.mean(), rtol=tol, atol=tol)
