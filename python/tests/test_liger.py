# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dk.FusedLinearDPOLoss (python/dpo_kernels/liger.py) against Liger-Kernel 0.8.5's own
LigerFusedLinearDPOLoss, run on the CPU (its chunked losses are plain torch there; compiled=False,
so no inductor build): every loss type Liger supports, with and without a reference model,
average_log_prob both ways, compute_nll_loss both ways, with and without bias, on batches with
masked (ignore_index) prompt and padding tokens. Compared: the loss, every element of the
returned tuple, and the gradients of _input, lin_weight and bias, fp32, to a relative error of
RTOL = 1e-5 (max |ours - liger| / max |liger| per tensor; the logits means relative to the logits'
scale; the loss alternatively within LOSS_ATOL = 1e-6 absolute, see assert_matches). Plus: the
precomputed reference log-probs path against the reference-model path, our extra loss types
against dk.dpo_loss_from_hidden, bad inputs, torch.compile(fullgraph=True)."""
import pytest
import torch

import dpo_kernels as dk
from dpo_kernels.liger import LIGER_LOSS_TYPES

# Liger's package imports on a CPU-only machine (its Triton kernels are never launched here);
# a failure to import is a test failure, not a skip.
from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

P, T, H, V = 3, 7, 16, 37
RTOL = 1e-5
LOSS_ATOL = 1e-6
IGNORE = -100
NAMES = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
         "chosen_rewards", "rejected_rewards")

#: Liger's label_smoothing requirements: exo_pair needs > 0, robust [0, 0.5); the others ignore it.
SMOOTHING = {"exo_pair": 0.1, "robust": 0.2}


def make(seed=0, ignore_index=IGNORE):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    h, rh = randn(2 * P, T, H), randn(2 * P, T, H)
    w, rw = randn(V, H, scale=2 / H**0.5), randn(V, H, scale=2 / H**0.5)
    b, rb = randn(V, scale=0.5), randn(V, scale=0.5)
    y = torch.randint(0, V, (2 * P, T), generator=g)
    for s in range(2 * P):  # a prompt of 1 to 3 tokens, trailing padding on some; >= 2 completion tokens each
        y[s, : 1 + s % 3] = ignore_index
        y[s, T - (s % 2) * 2:] = ignore_index
    return (h, w, b), y, (rh, rw, rb)


def rel_err(a, e):
    a, e = a.detach().double(), e.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp(min=1e-30)).item()


def run(module, weight, hidden, target, bias, ref=(), ref_kw=None, liger=False):
    """loss, the 7 outputs and the gradients of hidden, weight, bias (None without bias)."""
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bb = None if bias is None else bias.clone().requires_grad_()
    loss, outs = module(ww, hh, target, bb, *ref, **(ref_kw or {}))
    loss.backward()
    assert len(outs) == len(NAMES)
    return loss, outs, (hh.grad, ww.grad, None if bb is None else bb.grad)


def assert_matches(ours, theirs, logits_scale):
    (l0, o0, g0), (l1, o1, g1) = ours, theirs
    assert l0.shape == l1.shape == () and l0.dtype == l1.dtype == torch.float32
    # The loss: relative, or 1e-6 absolute (LOSS_ATOL) for small losses that are differences of
    # larger terms: Liger's own fp32 round-off then exceeds 1e-5 relative (robust, eps 0.2, loss 0.05:
    # Liger 1.5e-5 from the float64 value, ours 2.6e-6).
    errs = {"loss": min(rel_err(l0, l1), abs(l0.item() - l1.item()) / LOSS_ATOL * RTOL)}
    for name, a, e in zip(NAMES, o0, o1):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert not a.requires_grad, name
        # The logits means are sums of P*T*V logits of either sign: relative to the logits' scale.
        errs[name] = rel_err(a, e) if "logits" not in name else (a.double() - e.double()).abs().item() / logits_scale
    for name, a, e in zip(("d_input", "d_weight", "d_bias"), g0, g1):
        assert (a is None) == (e is None), name
        if a is not None:
            errs[name] = rel_err(a, e)
    bad = {k: v for k, v in errs.items() if not v <= RTOL}
    assert not bad, f"relative errors above {RTOL}: {bad}"


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("compute_nll_loss", [False, True], ids=["", "nll"])
@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("use_ref_model", [True, False], ids=["ref", "noref"])
@pytest.mark.parametrize("loss_type", LIGER_LOSS_TYPES)
def test_matches_liger(loss_type, use_ref_model, average_log_prob, compute_nll_loss, with_bias):
    (h, w, b), y, (rh, rw, rb) = make(seed=len(loss_type))
    kw = dict(loss_type=loss_type, use_ref_model=use_ref_model, average_log_prob=average_log_prob,
              compute_nll_loss=compute_nll_loss, label_smoothing=SMOOTHING.get(loss_type, 0.0), beta=0.5, alpha=0.7)
    bias = b if with_bias else None
    ref = (rh, rw, rb if with_bias else None) if use_ref_model else ()
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **kw), w, h, y, bias, ref)
    ours = run(dk.FusedLinearDPOLoss(**kw), w, h, y, bias, ref)
    assert_matches(ours, theirs, logits_scale=(h @ w.T).abs().mean().item())


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_ignore_index_and_chunking(chunk_size):
    # A non-default ignore_index, and a Liger chunk_size that groups pairs (ours ignores it).
    (h, w, b), y, (rh, rw, rb) = make(seed=5, ignore_index=-1)
    kw = dict(ignore_index=-1, chunk_size=chunk_size, compute_nll_loss=True)
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **kw), w, h, y, b, (rh, rw, rb))
    ours = run(dk.FusedLinearDPOLoss(**kw), w, h, y, b, (rh, rw, rb))
    assert_matches(ours, theirs, logits_scale=(h @ w.T).abs().mean().item())


def reference_logps(rh, rw, rb, y, average):
    """The reference model's sequence log-probs, eagerly in float64 (summed or averaged)."""
    z = rh.double() @ rw.double().T + (0 if rb is None else rb.double())
    mask = y != IGNORE
    lp = (torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    if average:
        lp = lp / mask.sum(-1)
    return lp.float()


@pytest.mark.parametrize("average_log_prob", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "sppo_hard", "ipo", "aot"])
def test_precomputed_reference(loss_type, average_log_prob):
    # Liger cannot take precomputed reference log-probs; ours takes them as call keywords and
    # must give what the reference-model path gives when fed the same log-probs.
    (h, w, b), y, (rh, rw, rb) = make(seed=11)
    module = dk.FusedLinearDPOLoss(loss_type=loss_type, average_log_prob=average_log_prob, compute_nll_loss=True)
    rl = reference_logps(rh, rw, rb, y, average_log_prob)
    from_model = run(module, w, h, y, b, (rh, rw, rb))
    given = run(module, w, h, y, b, ref_kw=dict(ref_chosen_logps=rl[:P], ref_rejected_logps=rl[P:]))
    assert_matches(given, from_model, logits_scale=1.0)


@pytest.mark.parametrize("kw", [
    dict(loss_type="ipo"),
    dict(loss_type="simpo", use_ref_model=False),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", use_weighting=True, ld_alpha=0.5),
    dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], compute_nll_loss=True, alpha=0.5),
], ids=["ipo", "simpo", "fdiv_wpo_ld", "mpo"])
def test_extra_loss_types_are_the_fused_op(kw):
    # The types Liger lacks run on dk.dpo_loss_from_hidden with the same configuration (the NLL
    # term being its sft term, weight alpha).
    (h, w, b), y, (rh, rw, rb) = make(seed=3)
    module = dk.FusedLinearDPOLoss(**kw)
    ref = (rh, rw, rb) if module.use_ref_model else ()
    ours = run(module, w, h, y, b, ref)
    cfg = {k: v for k, v in kw.items() if k not in ("use_ref_model", "compute_nll_loss", "alpha")}
    if kw.get("compute_nll_loss"):
        cfg["loss_type"], cfg["loss_weights"] = cfg["loss_type"] + ["sft"], cfg["loss_weights"] + [kw["alpha"]]
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    refkw = dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb) if module.use_ref_model else dict(reference_free=True)
    loss, metrics, pairs = dk.dpo_loss_from_hidden(hh, ww, y, bias=bb, return_pair_values=True, **refkw, **cfg)
    loss.backward()
    assert torch.equal(ours[0], loss)
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(ours[1][NAMES.index(name)], pairs[name]), name
    if kw.get("compute_nll_loss"):
        assert torch.equal(ours[1][4], metrics["nll_loss"])
    for a, e in zip(ours[2], (hh.grad, ww.grad, bb.grad)):
        assert torch.equal(a, e)


def test_attributes_are_read_at_each_call():
    # Liger's module reads its attributes at every call (a beta schedule sets loss_fn.beta).
    (h, w, b), y, (rh, rw, rb) = make(seed=9)
    module, fresh = dk.FusedLinearDPOLoss(beta=0.1, compute_nll_loss=True), dk.FusedLinearDPOLoss(beta=0.3, alpha=0.5,
                                                                                                   compute_nll_loss=True)
    module.beta, module.alpha = 0.3, 0.5
    a, e = run(module, w, h, y, b, (rh, rw, rb)), run(fresh, w, h, y, b, (rh, rw, rb))
    assert torch.equal(a[0], e[0]) and all(torch.equal(x, z) for x, z in zip(a[2], e[2]))
    module.beta = float("inf")
    with pytest.raises(ValueError, match="beta"):
        module(w, h, y, b, rh, rw, rb)


def test_upstream_gradient_scales():
    (h, w, b), y, (rh, rw, rb) = make(seed=4)
    for average in (False, True):
        module = dk.FusedLinearDPOLoss(average_log_prob=average)
        one = run(module, w, h, y, b, (rh, rw, rb))
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        loss, _ = module(ww, hh, y, bb, rh, rw, rb)
        (2.5 * loss).backward()
        for a, e in zip((hh.grad, ww.grad, bb.grad), one[2]):
            # The fused op scales its saved gradients (exact); the averaged path backpropagates
            # 2.5 through autograd (rounding differs element-wise): relative to the tensor's max.
            assert rel_err(a, 2.5 * e) <= (0 if not average else 1e-6)


BAD_CALLS = [
    (TypeError, "lin_weight", lambda m, h, w, y, r: m(w.numpy(), h, y, None, *r)),
    (TypeError, "_input", lambda m, h, w, y, r: m(w, [h], y, None, *r)),
    (TypeError, "ref_bias", lambda m, h, w, y, r: m(w, h, y, None, r[0], r[1], 1.0)),
    (ValueError, "_input", lambda m, h, w, y, r: m(w, h[0], y, None, *r)),
    (ValueError, "_input", lambda m, h, w, y, r: m(w, h[:3], y[:3], None, *r)),
    (ValueError, "target", lambda m, h, w, y, r: m(w, h, y[:, 1:], None, *r)),
    (ValueError, "ref_input", lambda m, h, w, y, r: m(w, h, y)),
    (ValueError, "ref_bias", lambda m, h, w, y, r: m(w, h, y, None, r[0], None, r[2])),
    (ValueError, "both given", lambda m, h, w, y, r: m(w, h, y, None, r[0], ref_chosen_logps=y[:P, 0].float(),
                                                       ref_rejected_logps=y[P:, 0].float())),
    (ValueError, "ref_rejected_logps", lambda m, h, w, y, r: m(w, h, y, ref_chosen_logps=y[:P, 0].float())),
    (ValueError, "lin_weight", lambda m, h, w, y, r: m(w[:, 1:], h, y, None, *r)),
    (ValueError, "ref_weight", lambda m, h, w, y, r: m(w, h, y, None, r[0], r[1][1:], None)),
    (ValueError, "bias", lambda m, h, w, y, r: m(w, h, y, r[2][1:], *r)),
    (ValueError, "ref_input", lambda m, h, w, y, r: m(w, h, y, None, r[0][:, 1:], r[1], r[2])),
    (ValueError, "ref_chosen_logps", lambda m, h, w, y, r: m(w, h, y, ref_chosen_logps=y[:, 0].float(),
                                                             ref_rejected_logps=y[P:, 0].float())),
    (TypeError, "lin_weight", lambda m, h, w, y, r: m(w.double(), h, y, None, *r)),
    (TypeError, "_input", lambda m, h, w, y, r: m(w, h.int(), y, None, *r)),
    (TypeError, "target", lambda m, h, w, y, r: m(w, h, y.float(), None, *r)),
    # Label values are checked by the ops, which call the labels "labels" / "targets".
    (ValueError, "labels|targets", lambda m, h, w, y, r: m(w, h, y.clamp(max=V + 3) + 3, None, *r)),
]


@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("error,name,call", BAD_CALLS, ids=[f"{e.__name__}-{n}-{i}" for i, (e, n, _) in enumerate(BAD_CALLS)])
def test_bad_calls(error, name, call, average):
    (h, w, b), y, (rh, rw, rb) = make(seed=6)
    with pytest.raises(error, match=name):
        call(dk.FusedLinearDPOLoss(average_log_prob=average), h, w, y, (rh, rw, rb))


def test_reference_arguments_without_reference_model():
    # Liger ignores ref_input / ref_weight / ref_bias when use_ref_model=False, and so do we (a
    # training loop may pass them whatever the flag); our precomputed log-probs are refused then.
    (h, w, b), y, (rh, rw, rb) = make(seed=6)
    kw = dict(use_ref_model=False, beta=0.5)
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **kw), w, h, y, b, (rh, rw, rb))
    ours = run(dk.FusedLinearDPOLoss(**kw), w, h, y, b, (rh, rw, rb))
    assert_matches(ours, theirs, logits_scale=(h @ w.T).abs().mean().item())
    plain = run(dk.FusedLinearDPOLoss(**kw), w, h, y, b)
    assert torch.equal(ours[0], plain[0])
    with pytest.raises(ValueError, match="ref_chosen_logps.*use_ref_model=False"):
        dk.FusedLinearDPOLoss(**kw)(w, h, y, b, ref_chosen_logps=y[:P, 0].float(), ref_rejected_logps=y[P:, 0].float())


@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
def test_autocast_with_an_fp32_head(average):
    # Mixed precision: bf16 hidden states and an fp32 lm_head.weight under torch.autocast, where
    # Liger runs (autocast casts its matmuls). Ours is then the call on bf16 copies, bitwise, with
    # each gradient in its input's dtype as Liger's; its loss is Liger's to bf16 rounding (Liger
    # also rounds the logits to bf16; ours accumulates them in fp32).
    (h, w, b), y, (rh, rw, rb) = make(seed=9)
    hb, rhb = h.bfloat16(), rh.bfloat16()
    kw = dict(average_log_prob=average, beta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(dk.FusedLinearDPOLoss(**kw), w, hb, y, b, (rhb, rw, rb))
        theirs = run(LigerFusedLinearDPOLoss(compiled=False, **kw), w, hb, y, b, (rhb, rw, rb))
    cast = run(dk.FusedLinearDPOLoss(**kw), w.bfloat16(), hb, y, b.bfloat16(), (rhb, rw.bfloat16(), rb.bfloat16()))
    assert torch.equal(ours[0], cast[0])
    for a, e in zip(ours[1], cast[1]):
        assert torch.equal(a, e)
    assert [g.dtype for g in ours[2]] == [g.dtype for g in theirs[2]] == [torch.bfloat16, torch.float32, torch.float32]
    for a, e in zip(ours[2], cast[2]):
        assert torch.equal(a, e.to(a.dtype))
    assert abs(ours[0].item() - theirs[0].item()) <= 2e-2 * abs(theirs[0].item())


@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
def test_reference_model_in_another_dtype(average):
    # A float64 reference model (input, weight and bias) for a float32 policy: Liger scores the
    # reference in its own dtype, and so do we (the fused op's separate reference call).
    (h, w, b), y, (rh, rw, rb) = make(seed=10)
    ref = tuple(t.double() for t in (rh, rw, rb))
    kw = dict(average_log_prob=average, beta=0.5)
    theirs = run(LigerFusedLinearDPOLoss(compiled=False, **kw), w, h, y, b, ref)
    ours = run(dk.FusedLinearDPOLoss(**kw), w, h, y, b, ref)
    assert_matches(ours, theirs, logits_scale=(h @ w.T).abs().mean().item())
    # bf16: the same as passing the reference's own bf16 log-probs (precomputed), bitwise.
    refb = tuple(t.bfloat16() for t in (rh, rw, rb))
    got = run(dk.FusedLinearDPOLoss(**kw), w, h, y, b, refb)
    module = dk.FusedLinearDPOLoss(**kw)
    with torch.no_grad():
        _, outs = module(refb[1], refb[0], y, refb[2], refb[0], refb[1], refb[2])
    want = run(module, w, h, y, b, ref_kw=dict(ref_chosen_logps=outs[0], ref_rejected_logps=outs[1]))
    assert torch.equal(got[0], want[0])
    for a, e in zip(got[2], want[2]):
        assert torch.equal(a, e)
    with pytest.raises(TypeError, match="ref_weight has dtype"):
        dk.FusedLinearDPOLoss(**kw)(w, h, y, b, ref[0], rw, rb)


def test_hyperparameters_as_liger_reads_them():
    # A one-element tensor (a scheduled beta) and int flags, which Liger accepts.
    (h, w, b), y, (rh, rw, rb) = make(seed=11)
    want = run(dk.FusedLinearDPOLoss(beta=0.25, alpha=0.5, compute_nll_loss=True), w, h, y, b, (rh, rw, rb))
    got = run(dk.FusedLinearDPOLoss(beta=torch.tensor(0.25), alpha=torch.tensor(0.5), compute_nll_loss=1,
                                    use_ref_model=1), w, h, y, b, (rh, rw, rb))
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("error,name,kw", [
    (ValueError, "loss_type", dict(loss_type="nope")),
    (TypeError, "loss_type", dict(loss_type=3)),
    (ValueError, "beta", dict(beta=float("nan"))),
    (TypeError, "beta", dict(beta="0.1")),
    (TypeError, "alpha", dict(alpha=None)),
    (TypeError, "compute_nll_loss", dict(compute_nll_loss=2)),
    (TypeError, "beta", dict(beta=torch.tensor([0.1, 0.2]))),
    (TypeError, "use_ref_model", dict(use_ref_model="yes")),
    (TypeError, "ignore_index", dict(ignore_index=1.5)),
    (ValueError, "chunk_size", dict(chunk_size=0)),
    (ValueError, "label_smoothing", dict(loss_type="exo_pair")),
    (ValueError, "label_smoothing", dict(loss_type="robust", label_smoothing=0.5)),
    (ValueError, "label_smoothing", dict(loss_type="sigmoid", label_smoothing=0.1)),
    (ValueError, "loss_weights", dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])),
    (ValueError, "average_log_prob", dict(loss_type="orpo", use_ref_model=False, average_log_prob=True)),
    (ValueError, "average_log_prob", dict(use_weighting=True, average_log_prob=True)),
    (ValueError, "workspace_bytes", dict(workspace_bytes=0)),
])
def test_bad_constructor(error, name, kw):
    with pytest.raises(error, match=name):
        dk.FusedLinearDPOLoss(**kw)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
def test_compile_fullgraph(average):
    # The module under torch.compile(fullgraph=True) (the ops' fake kernels and autograd formulas
    # in a graph) gives eager's loss, outputs and gradients bitwise.
    (h, w, b), y, (rh, rw, rb) = make(seed=8)
    module = dk.FusedLinearDPOLoss(average_log_prob=average, compute_nll_loss=True)
    compiled = run(torch.compile(module, fullgraph=True, backend="aot_eager"), w, h, y, b, (rh, rw, rb))
    eager = run(module, w, h, y, b, (rh, rw, rb))
    for name, a, e in zip(("loss",) + NAMES + ("d_input", "d_weight", "d_bias"),
                          (compiled[0], *compiled[1], *compiled[2]), (eager[0], *eager[1], *eager[2])):
        assert torch.equal(a, e), name
