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

# (DPOConfig fields). Each case is run once through TRL and compared with the fused op
# (reference logits and reference log-probs) and with sequence_logps + dpo_loss.
CASES = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "hinge": dict(loss_type=["hinge"]),
    "ipo": dict(loss_type=["ipo"]),
    "exo_pair": dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    "nca_pair": dict(loss_type=["nca_pair"]),
    "robust": dict(loss_type=["robust"], label_smoothing=0.1),
    "bco_pair": dict(loss_type=["bco_pair"]),
    "sppo_hard": dict(loss_type=["sppo_hard"]),
    "aot": dict(loss_type=["aot"], label_smoothing=0.1),
    "aot_unpaired": dict(loss_type=["aot_unpaired"], label_smoothing=0.1),
    "apo_zero": dict(loss_type=["apo_zero"]),
    "apo_down": dict(loss_type=["apo_down"]),
    "discopop": dict(loss_type=["discopop"], beta=0.5),
    "sft": dict(loss_type=["sft"]),
    "sigmoid_norm": dict(loss_type=["sigmoid_norm"], beta=2.0),
    "sigmoid/forward_kl": dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    "sigmoid/js_divergence": dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    "sigmoid/alpha_divergence": dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence"),
    "ipo/alpha_divergence(0.3)": dict(
        loss_type=["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3
    ),
    "sigmoid_norm/forward_kl": dict(loss_type=["sigmoid_norm"], f_divergence_type="forward_kl", beta=2.0),
    "hinge/js_divergence": dict(loss_type=["hinge"], f_divergence_type="js_divergence"),
    "exo_pair/forward_kl": dict(loss_type=["exo_pair"], f_divergence_type="forward_kl", label_smoothing=0.01),
    "robust/js_divergence": dict(loss_type=["robust"], f_divergence_type="js_divergence", label_smoothing=0.2),
    "discopop/alpha_divergence(0.8)": dict(
        loss_type=["discopop"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.8, beta=0.5
    ),
    "mpo(sigmoid,bco_pair,sft)": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "sigmoid+use_weighting(WPO)": dict(loss_type=["sigmoid"], use_weighting=True),
    "ipo+use_weighting(WPO)": dict(loss_type=["ipo"], use_weighting=True),
    "sigmoid+ld_alpha=0.5": dict(loss_type=["sigmoid"], ld_alpha=0.5),
    "ipo+ld_alpha=0.3": dict(loss_type=["ipo"], ld_alpha=0.3),
    "apo_zero+sft+ld_alpha=0.5": dict(loss_type=["apo_zero", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
}

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
