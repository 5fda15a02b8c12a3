# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dpo_kernels against TRL's own DPOTrainer loss computation (trl.DPOTrainer.compute_loss on a
tiny random Llama built in code, see trl_harness.py): the loss, every logged metric and the
gradient with respect to the logits, for every loss type TRL supports and the f-divergences,
in fp32 to 1e-5 relative."""
import pytest
import torch

trl = pytest.importorskip("trl")

import dpo_kernels as dk  # noqa: E402
import trl_harness  # noqa: E402
from conftest import TRL_REPORT  # noqa: E402

RTOL = 1e-5

# Each case (trl_harness.CASES) is run once through TRL and compared with the fused op
# (reference logits and reference log-probs) and with sequence_logps + dpo_loss.
CASES = trl_harness.CASES

_OURS_KEYS = {
    "loss_type", "loss_weights", "beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
    "discopop_tau", "use_weighting", "ld_alpha",
}


def rel(a, b, floor=1e-4):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / max(b.abs().max().item(), floor)).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def trl_case(request):
    return request.param, trl_harness.run_trl(**CASES[request.param])


def _ours(case, r, use_ref_logits=True):
    cfg = {k: v for k, v in CASES[case].items() if k in _OURS_KEYS}
    z = r["logits"].clone().requires_grad_()
    kwargs = dict(cfg)
    if use_ref_logits:
        kwargs["ref_logits"] = r["ref_logits"]
        loss, metrics = dk.dpo_loss_from_logits(z, r["labels"], **kwargs)
    else:
        ref = dk.sequence_logps(r["ref_logits"], r["labels"])
        rc, rr = ref.chunk(2)
        loss, metrics = dk.dpo_loss_from_logits(z, r["labels"], rc, rr, **kwargs)
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, z.grad


def test_fused_matches_trl(trl_case):
    case, r = trl_case
    loss, metrics, grad = _ours(case, r)
    e_loss = rel(loss, r["loss"])
    e_metrics = max(rel(metrics[k], v) for k, v in r["metrics"].items())
    missing = set(r["metrics"]) - set(metrics)
    e_grad = rel(grad, r["grad"])
    TRL_REPORT.setdefault(case, {}).update(loss=e_loss, metrics=e_metrics, grad=e_grad)
    assert not missing, f"metrics TRL logs that we do not: {missing}"
    assert e_loss < RTOL, f"{case}: loss {loss.item()} vs TRL {r['loss'].item()}"
    bad = {k: (metrics[k], v) for k, v in r["metrics"].items() if rel(metrics[k], v) >= RTOL}
    assert not bad, f"{case}: metrics differ (ours, TRL): {bad}"
    assert e_grad < RTOL, f"{case}: gradient relative error {e_grad}"


def test_fused_with_reference_logps_matches_trl(trl_case):
    case, r = trl_case
    if CASES[case].get("ld_alpha") is not None:
        pytest.skip("LD-DPO reference log-probs are length-weighted: covered by the ref_logits path")
    loss, metrics, grad = _ours(case, r, use_ref_logits=False)
    assert rel(loss, r["loss"]) < RTOL
    assert rel(grad, r["grad"]) < RTOL
    for k, v in r["metrics"].items():
        assert rel(metrics[k], v) < RTOL, (k, metrics[k], v)


def test_pair_level_matches_trl(trl_case):
    case, r = trl_case
    cfg = dict(CASES[case])
    if cfg.get("use_weighting") or cfg.get("ld_alpha") is not None:
        pytest.skip("WPO weights and LD-DPO need the token-level op")
    z = r["logits"].clone().requires_grad_()
    labels = r["labels"]
    logps = dk.sequence_logps(z, labels)
    pc, pr = logps.chunk(2)
    ref = dk.sequence_logps(r["ref_logits"], labels)
    rc, rr = ref.chunk(2)
    lengths = (labels != -100).sum(-1).float()
    lc, lr = lengths.chunk(2)
    losses, cr, rj = dk.dpo_loss(
        pc, pr, rc, rr, cfg.pop("loss_type"), cfg.pop("beta", 0.1), cfg.pop("label_smoothing", 0.0),
        chosen_lengths=lc, rejected_lengths=lr, **cfg,
    )
    loss = losses.mean()
    loss.backward()
    e_loss, e_grad = rel(loss.detach(), r["loss"]), rel(z.grad, r["grad"])
    TRL_REPORT.setdefault(case, {}).update(pair_loss=e_loss, pair_grad=e_grad)
    assert e_loss < RTOL and e_grad < RTOL, (e_loss, e_grad)
    assert rel(cr.mean(), r["metrics"]["rewards/chosen"]) < RTOL
    assert rel(rj.mean(), r["metrics"]["rewards/rejected"]) < RTOL


def test_trl_sft_with_use_weighting_quirk():
    """TRL 1.16 cannot combine sft with use_weighting: it multiplies the expanded (stride 0)
    scalar sft loss in place. Ours computes nll * mean(W) per losses.md. Documented here so a
    TRL fix is noticed."""
    try:
        trl_harness.run_trl(loss_type=["sft"], use_weighting=True)
    except RuntimeError as e:
        assert "single memory location" in str(e) or "in-place" in str(e)
    else:
        pytest.skip("TRL now supports sft with use_weighting: add it to CASES")
