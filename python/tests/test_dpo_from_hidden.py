# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dk.dpo_loss_from_hidden (DPO straight from hidden states, csrc/linear_dpo.cpp) against
dk.dpo_loss_from_logits fed the float64 logits o(hidden @ weight.T + bias), for several loss
types and both reference modes: the loss, every metric, the pair values and the gradients of
hidden, weight and bias; finite differences (gradcheck) at a tiny shape; bad inputs."""
import pytest
import torch

import dpo_kernels as dk

P, T, H, V = 3, 6, 8, 13


def transform(z, temperature=1.0, softcap=None, logit_scale=1.0):
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logits_of(h, w, b, **tr):
    z = h @ w.T
    if b is not None:
        z = z + b
    return transform(z, **tr)


def make(seed=0, P=P, T=T, H=H, V=V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (2 * P, T), generator=g)
    # A prompt of 1 or 2 tokens, and trailing padding on some sequences (each keeps >= 1 token).
    for s in range(2 * P):
        y[s, : 1 + s % 2] = -100
        y[s, T - (s % 3):] = -100
    rh = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64)
    rw = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5
    rb = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 10
    rr = -torch.rand(P, generator=g, dtype=torch.float64) * 10
    cast = lambda t: t.to(dtype)  # noqa: E731
    return tuple(map(cast, (h, w, b))), y, tuple(map(cast, (rh, rw, rb))), (rc, rr)


CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo": dict(loss_type="ipo", beta=0.3),
    "combination": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[1.0, 0.5, 0.3]),
    "aot_four_pass": dict(loss_type="aot"),
    "wpo": dict(loss_type="sigmoid", use_weighting=True),
    "wpo_sft": dict(loss_type=["sigmoid", "sft"], use_weighting=True),
    "ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    "robust_smoothing": dict(loss_type="robust", label_smoothing=0.1),
    "transforms": dict(loss_type="sigmoid", temperature=0.7, softcap=3.0, logit_scale=1.3),
}
TRANSFORM_KEYS = ("temperature", "softcap", "logit_scale")


def run_both(case, ref_mode, seed=0, workspace_bytes=None, packed=False):
    (h, w, b), y, (rh, rw, rb), (rc, rr) = make(seed)
    kw = dict(CASES[case])
    tr = {k: kw[k] for k in TRANSFORM_KEYS if k in kw}
    cfg = {k: v for k, v in kw.items() if k not in TRANSFORM_KEYS}
    cu = None
    if packed:
        # The completion-carrying rows of each sequence, packed back to back (with 2 gap rows
        # at the end that belong to no sequence).
        lens = [T - (s % 2) for s in range(2 * P)]
        h = torch.cat([h[s, :n] for s, n in enumerate(lens)] + [h[0, :2]])
        rh = torch.cat([rh[s, :n] for s, n in enumerate(lens)] + [rh[0, :2]])
        y = torch.cat([y[s, :n] for s, n in enumerate(lens)] + [y[0, :2]])
        cu = torch.tensor([0] + lens).cumsum(0)

    def leaves():
        return [t.detach().clone().requires_grad_() for t in (h, w, b)]

    # Ours.
    hh, ww, bb = leaves()
    if ref_mode == "precomputed":
        ref = dict(reference_chosen_logps=rc, reference_rejected_logps=rr)
        ref_l = ref
    else:
        ref = dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
        ref_l = dict(ref_logits=logits_of(rh, rw, rb, **tr))
    ours = dk.dpo_loss_from_hidden(hh, ww, y, bias=bb, cu_seqlens=cu, return_pair_values=True,
                                   workspace_bytes=workspace_bytes, **ref, **tr, **cfg)
    ours[0].backward()
    # The logits path, autograd through the float64 head.
    hl, wl, bl = leaves()
    theirs = dk.dpo_loss_from_logits(logits_of(hl, wl, bl, **tr), y, cu_seqlens=cu, return_pair_values=True,
                                     **ref_l, **cfg)
    theirs[0].backward()
    return ours, theirs, (hh.grad, ww.grad, bb.grad), (hl.grad, wl.grad, bl.grad)


def assert_same(ours, theirs, g_ours, g_theirs):
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    assert ours[0].dtype == torch.float64
    for name in dk.METRIC_NAMES:
        torch.testing.assert_close(ours[1][name], theirs[1][name], **tol, msg=lambda m: f"metric {name}: {m}")
    for name in dk.PAIR_VALUE_NAMES:
        torch.testing.assert_close(ours[2][name], theirs[2][name], **tol, msg=lambda m: f"pair value {name}: {m}")
    for name, a, e in zip(("hidden", "weight", "bias"), g_ours, g_theirs):
        assert a is not None, name
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("ref_mode", ["precomputed", "ref_hidden"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_logits_path(case, ref_mode):
    assert_same(*run_both(case, ref_mode))


@pytest.mark.parametrize("case", ["sigmoid", "aot_four_pass", "combination"])
def test_small_workspace_chunks(case):
    # A budget of a few rows: many chunks (and four passes where a pair does not fit).
    assert_same(*run_both(case, "precomputed", workspace_bytes=4096))


@pytest.mark.parametrize("case", ["sigmoid", "ipo", "aot_four_pass"])
@pytest.mark.parametrize("ref_mode", ["precomputed", "ref_hidden"])
def test_packed(case, ref_mode):
    assert_same(*run_both(case, ref_mode, packed=True))


def test_upstream_gradient_scales():
    (h, w, b), y, _, (rc, rr) = make(1)
    grads = []
    for scale in (1.0, -2.5):
        hh, ww, bb = (t.detach().clone().requires_grad_() for t in (h, w, b))
        loss, _ = dk.dpo_loss_from_hidden(hh, ww, y, rc, rr, bias=bb)
        (loss * scale).backward()
        grads.append((hh.grad, ww.grad, bb.grad))
    for a, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, -2.5 * e, rtol=1e-12, atol=1e-14)


def test_only_required_gradients():
    (h, w, b), y, _, (rc, rr) = make(2)
    ww = w.clone().requires_grad_()
    loss, _ = dk.dpo_loss_from_hidden(h, ww, y, rc, rr, bias=b)
    loss.backward()
    assert ww.grad is not None and ww.grad.shape == w.shape
    with torch.no_grad():
        loss2, m = dk.dpo_loss_from_hidden(h, ww, y, rc, rr, bias=b)
    assert not loss2.requires_grad
    torch.testing.assert_close(loss2, loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("ref_mode", ["precomputed", "ref_hidden"])
def test_gradcheck(loss_type, ref_mode):
    (h, w, b), y, (rh, rw, rb), (rc, rr) = make(3, P=1, T=3, H=3, V=4)
    ref = dict(reference_chosen_logps=rc, reference_rejected_logps=rr) if ref_mode == "precomputed" else \
        dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
    y = y.clone()
    y[:, 1:] = y[:, 1:].clamp(min=0)  # two completion tokens per sequence

    def f(hh, ww, bb):
        return dk.dpo_loss_from_hidden(hh, ww, y, bias=bb, loss_type=loss_type, softcap=2.0, **ref)[0]

    args = tuple(t.clone().requires_grad_() for t in (h, w, b))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_float32_close_to_float64():
    (h, w, b), y, _, (rc, rr) = make(4)
    l64, m64 = dk.dpo_loss_from_hidden(h, w, y, rc, rr, bias=b)
    l32, m32 = dk.dpo_loss_from_hidden(h.float(), w.float(), y, rc.float(), rr.float(), bias=b.float())
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-6)


def test_opcheck():
    (h, w, b), y, _, (rc, rr) = make(5)
    from dpo_kernels._ops import CONFIG_FIELDS
    config = [d for _, _, d in CONFIG_FIELDS]
    args = (h.requires_grad_(), w, b, y, None, rc, rr, None, None, None, 1.0, None, 1.0, -100, *config, True,
            True, False, False, 1 << 20)
    torch.library.opcheck(torch.ops.dpo_kernels.linear_dpo.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_inputs_name_the_argument():
    (h, w, b), y, (rh, rw, rb), (rc, rr) = make(6)
    call = lambda **kw: dk.dpo_loss_from_hidden(  # noqa: E731
        kw.pop("hidden", h), kw.pop("weight", w), kw.pop("labels", y),
        kw.pop("rc", rc), kw.pop("rr", rr), **{"bias": b, **kw})
    with pytest.raises(ValueError, match="hidden must be 3-D"):
        call(hidden=h[0])
    with pytest.raises(ValueError, match="labels must have shape"):
        call(labels=y[:, 1:])
    with pytest.raises(ValueError, match="weight has hidden size"):
        call(weight=w[:, 1:])
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=b[1:])
    with pytest.raises(TypeError, match="weight has dtype"):
        call(weight=w.float())
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        call(rc=None)
    with pytest.raises(ValueError, match="reference_rejected_logps must have shape"):
        call(rr=rr[1:])
    with pytest.raises(ValueError, match="ref_hidden must have hidden's shape"):
        call(rc=None, rr=None, ref_hidden=rh[:, 1:])
    with pytest.raises(ValueError, match="ref_weight has vocabulary"):
        call(rc=None, rr=None, ref_hidden=rh, ref_weight=rw[1:], ref_bias=rb[1:])
    with pytest.raises(ValueError, match="not both"):
        call(ref_hidden=rh)
    # Without ref_weight the reference head is the policy's, bias included: a ref_bias alone
    # would be ignored (the Python wrapper refuses it, and so does the operator itself).
    with pytest.raises(ValueError, match="ref_bias is given without ref_weight"):
        call(rc=None, rr=None, ref_hidden=rh, ref_bias=rb)
    from dpo_kernels._ops import CONFIG_FIELDS
    config = [d for _, _, d in CONFIG_FIELDS]
    with pytest.raises(ValueError, match="ref_bias is given without ref_weight"):
        torch.ops.dpo_kernels.linear_dpo(h, w, b, y, None, None, None, rh, None, rb, 1.0, None, 1.0, -100, *config,
                                         True, False, False, False, 1 << 20)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        call(softcap=-1.0)
    with pytest.raises(ValueError, match="even number"):
        call(hidden=h[:3], labels=y[:3])
    with pytest.raises(ValueError, match="label"):
        bad = y.clone()
        bad[0, -1] = V
        call(labels=bad)
    with pytest.raises(ValueError, match="inplace_backward"):
        call(inplace_backward=True)
    with pytest.raises(ValueError, match="process_group"):
        call(process_group=object())
    with pytest.raises(ValueError, match="workspace_bytes"):
        call(workspace_bytes=0)
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="nope")
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(hidden=h.reshape(-1, H), labels=y.reshape(-1), cu_seqlens=torch.tensor([0, 3, 2, 8, 9, 10, 12]))


@pytest.mark.skipif(not torch.cuda.is_available() or dk.cuda_built(),
                    reason="needs a GPU with a CPU-only build (CUDA builds run the loss: test_cuda_linear.py)")
def test_cuda_not_implemented_without_a_cuda_build():
    (h, w, b), y, _, (rc, rr) = make(7)
    with pytest.raises(NotImplementedError, match="without CUDA"):
        dk.dpo_loss_from_hidden(h.cuda(), w.cuda(), y.cuda(), rc.cuda(), rr.cuda(), bias=b.cuda())


def test_compile_fullgraph():
    (h, w, b), y, _, (rc, rr) = make(8)

    def f(hh, ww, bb):
        loss, m = dk.dpo_loss_from_hidden(hh, ww, y, rc, rr, bias=bb, loss_type="ipo")
        return loss, m["rewards/accuracies"]

    args = [t.clone().requires_grad_() for t in (h, w, b)]
    loss, acc = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    loss.backward()
    eager = [t.clone().requires_grad_() for t in (h, w, b)]
    loss_e, acc_e = f(*eager)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e, rtol=0, atol=0)
    torch.testing.assert_close(acc, acc_e, rtol=0, atol=0)
    for a, e in zip(args, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=0)


def test_autocast_runs_the_head_in_autocasts_dtype():
    # Mixed precision: bf16 hidden states from the backbone, the fp32 master lm_head.weight. Under
    # torch.autocast the call is the one on both cast to bf16 (as nn.Linear's matmul would be),
    # bitwise; each gradient comes back in its input's dtype. Without autocast the dtypes must match.
    (h, w, b), y, (rh, rw, rb), (rc, rr) = make(11, dtype=torch.float32)
    hb = h.bfloat16()
    for ref in (dict(reference_chosen_logps=rc, reference_rejected_logps=rr),
                dict(ref_hidden=rh.bfloat16(), ref_weight=rw, ref_bias=rb)):
        hh, ww, bb = hb.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = dk.dpo_loss_from_hidden(hh, ww, y, bias=bb, **ref)
        loss.backward()
        assert (hh.grad.dtype, ww.grad.dtype, bb.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
        h2, w2, b2 = hb.clone().requires_grad_(), w.bfloat16().requires_grad_(), b.bfloat16().requires_grad_()
        cast = {k: (v.bfloat16() if k.startswith("ref_") else v) for k, v in ref.items()}
        want, want_metrics = dk.dpo_loss_from_hidden(h2, w2, y, bias=b2, **cast)
        want.backward()
        assert torch.equal(loss, want)
        for name in dk.METRIC_NAMES:
            assert torch.equal(metrics[name], want_metrics[name]), name
        assert torch.equal(hh.grad, h2.grad)
        assert torch.equal(ww.grad, w2.grad.float()) and torch.equal(bb.grad, b2.grad.float())
    with pytest.raises(TypeError, match="weight has dtype"):
        dk.dpo_loss_from_hidden(hb, w, y, rc, rr)


@pytest.mark.parametrize("ref_dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_reference_head_in_its_own_dtype(ref_dtype, packed, ld_alpha):
    # An fp32 policy with a reference model of its own head in another dtype (Liger scores its
    # reference in its own dtype too): the reference is read in that dtype, so the result is the
    # call with the reference's own log-probs (from the same op in that dtype, LD-DPO weighted
    # alike) passed as reference log-probs, bitwise.
    (h, w, b), y, (rh, rw, rb), _ = make(12, dtype=torch.float32)
    cu = None
    if packed:
        h, rh, y = h.reshape(-1, H), rh.reshape(-1, H), y.reshape(-1)
        cu = torch.arange(0, 2 * P * T + 1, T)
    rh, rw, rb = (t.to(ref_dtype) for t in (rh, rw, rb))
    kw = dict(cu_seqlens=cu, ld_alpha=ld_alpha, loss_type=["sigmoid", "sft"], return_pair_values=True,
              softcap=4.0)
    zeros = torch.zeros(P, dtype=torch.float64)
    ref = dk.dpo_loss_from_hidden(rh, rw, y, zeros, zeros, bias=rb, **kw)[2]
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = dk.dpo_loss_from_hidden(hh, ww, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, **kw)
    got[0].backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = dk.dpo_loss_from_hidden(h2, w2, y, ref["chosen_logps"], ref["rejected_logps"], bias=b, **kw)
    want[0].backward()
    assert torch.equal(got[0], want[0])
    for name in dk.METRIC_NAMES:
        assert torch.equal(got[1][name], want[1][name]), name
    for name in dk.PAIR_VALUE_NAMES:
        assert torch.equal(got[2][name], want[2][name]), name
    assert torch.equal(hh.grad, h2.grad) and torch.equal(ww.grad, w2.grad)
    # Rounding the reference to the policy's dtype would move its log-probs (fp64: values fp32
    # cannot hold; bf16: it is exact), so the fp64 case also shows the reference's own dtype is read.
    if ref_dtype == torch.float64:
        rounded = dk.dpo_loss_from_hidden(h, w, y, bias=b, ref_hidden=rh.float(), ref_weight=rw.float(),
                                          ref_bias=rb.float(), **kw)
        assert not torch.equal(rounded[2]["chosen_rewards"], got[2]["chosen_rewards"])
    with pytest.raises(ValueError, match="ref_hidden must have hidden's shape"):
        dk.dpo_loss_from_hidden(h, w, y, bias=b, ref_hidden=rh[..., 1:] if not packed else rh[1:], ref_weight=rw,
                                ref_bias=rb, **kw)
    with pytest.raises(TypeError):  # the reference head's own tensors must share its dtype
        dk.dpo_loss_from_hidden(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw.float(), ref_bias=rb, **kw)


def test_autocast_leaves_float64_alone():
    # Autocast never casts float64 (nn.Linear on float64 stays float64): neither do we.
    (h, w, b), y, _, (rc, rr) = make(13)
    want, _ = dk.dpo_loss_from_hidden(h, w, y, rc, rr, bias=b)
    averaged = dict(ref_chosen_logps=rc / 4, ref_rejected_logps=rr / 4)
    want_avg, _ = dk.FusedLinearDPOLoss(average_log_prob=True)(w, h, y, b, **averaged)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = dk.dpo_loss_from_hidden(h, w, y, rc, rr, bias=b)
        module, _ = dk.FusedLinearDPOLoss()(w, h, y, b, ref_chosen_logps=rc, ref_rejected_logps=rr)
        module_avg, _ = dk.FusedLinearDPOLoss(average_log_prob=True)(w, h, y, b, **averaged)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert module.dtype == torch.float64
    assert module_avg.dtype == torch.float64 and torch.equal(module_avg, want_avg)
