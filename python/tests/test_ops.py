# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""torch.library.opcheck, float64 gradcheck, torch.compile(fullgraph=True) forward+backward,
layouts, dtypes and error messages of the dpo_kernels ops (CPU)."""
import pytest
import torch
import torch.nn.functional as F

import dpo_kernels as dk
from dpo_kernels._ops import ops
from eager import eager_logps

torch.manual_seed(0)
P, T, V = 3, 6, 11


def make(dtype=torch.float64, P=P, T=T, V=V, gap=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2 * P, T + 1, V, generator=g, dtype=torch.float64).to(dtype)
    logits = full[:, :-1] if gap else full[:, :-1].contiguous()
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    for i in range(2 * P):
        labels[i, : 1 + i % 2] = -100  # prompt
        labels[i, T - (i % 3):] = -100  # padding
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 10 - 5
    rr = -torch.rand(P, generator=g, dtype=torch.float64) * 10 - 5
    return logits, labels, rc, rr


CONFIG = ("sigmoid", [], 0.1, 0.0, "reverse_kl", 0.5, 0.05, False, 1.0, False, False, 0.5, 1.0, "sigmoid")


# ---- opcheck ---------------------------------------------------------------------------------

def test_opcheck_sequence_logps():
    logits, labels, _, _ = make()
    logits.requires_grad_()
    torch.library.opcheck(ops.sequence_logps, (logits, labels, None, -100, False))
    torch.library.opcheck(ops.sequence_logps, (logits.detach().contiguous().float(), labels.int(), None, -100, True))


def test_opcheck_sequence_logps_backward():
    # The gradient of logits[:, :-1] is a strided view (the fake kernel must say so), of a
    # contiguous tensor a plain one; packed rows outside every sequence get zeros.
    for gap in (True, False):
        logits, labels, _, _ = make(gap=gap)
        for average in (False, True):
            _, lse = ops.sequence_logps(logits, labels, None, -100, average)
            g = torch.randn(2 * P, dtype=torch.float64)
            torch.library.opcheck(ops.sequence_logps_backward, (g, logits, labels, None, lse, -100, average))
    logits, labels, _, _ = make(gap=False)
    z = torch.cat([torch.randn(2, V, dtype=logits.dtype), logits.reshape(-1, V), torch.randn(1, V, dtype=logits.dtype)])
    y = torch.cat([torch.zeros(2, dtype=labels.dtype), labels.reshape(-1), torch.zeros(1, dtype=labels.dtype)])
    cu = torch.arange(2, 2 + 2 * P * T + 1, T)
    _, lse = ops.sequence_logps(z, y, cu, -100, True)
    grad = ops.sequence_logps_backward(torch.ones(2 * P, dtype=torch.float64), z, y, cu, lse, -100, True)
    assert grad[:2].eq(0).all() and grad[-1:].eq(0).all()
    torch.library.opcheck(ops.sequence_logps_backward, (torch.ones(2 * P, dtype=torch.float64), z, y, cu, lse, -100, True))


def test_opcheck_pair_loss():
    pc = torch.randn(P, dtype=torch.float64, requires_grad=True)
    pr = torch.randn(P, dtype=torch.float64, requires_grad=True)
    rc, rr = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    lens = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    torch.library.opcheck(ops.pair_loss, (pc, pr, rc, rr, lens, lens, None) + CONFIG)
    cfg = ("ipo,sft",) + ([0.5, 1.0],) + CONFIG[2:]
    torch.library.opcheck(ops.pair_loss, (pc, pr, rc, rr, lens, lens, None) + cfg)


@pytest.mark.parametrize("ref", ["logps", "logits"])
def test_opcheck_dpo_forward(ref):
    logits, labels, rc, rr = make()
    logits.requires_grad_()
    refs = (rc, rr, None) if ref == "logps" else (None, None, torch.randn(logits.shape, dtype=torch.float64))
    torch.library.opcheck(ops.dpo_forward, (logits, labels, None) + refs + (-100,) + CONFIG + (True, False))


def test_opcheck_backward_ops():
    logits, labels, rc, rr = make()
    _, _, _, lse, coef = ops.dpo_forward(logits, labels, None, rc, rr, None, -100, *CONFIG, True, False)
    g = torch.tensor(1.5, dtype=torch.float64)
    torch.library.opcheck(ops.dpo_backward, (g, logits, labels, None, lse, coef, -100))
    z = logits.contiguous().clone()
    torch.library.opcheck(ops.dpo_backward_, (g, z, labels, None, lse, coef, -100),
                          test_utils=("test_schema", "test_faketensor"))


# ---- gradcheck (float64) -----------------------------------------------------------------------

def test_gradcheck_sequence_logps():
    logits, labels, _, _ = make(P=2, T=4, V=5)
    logits = logits.detach().requires_grad_()
    for average in (False, True):
        assert torch.autograd.gradcheck(lambda z: dk.sequence_logps(z, labels, average=average), (logits,))


@pytest.mark.parametrize("loss_type,extra", [
    ("sigmoid", {}), ("ipo", {}), ("exo_pair", {"label_smoothing": 0.01}), ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}), ("discopop", {}), ("sigmoid_norm", {}), (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
    ("simpo", {}), ("orpo", {}), ("cpo", {}),
])
def test_gradcheck_dpo_loss(loss_type, extra):
    g = torch.Generator().manual_seed(1)
    pc = (-torch.rand(4, generator=g, dtype=torch.float64) * 3 - 1).requires_grad_()
    pr = (-torch.rand(4, generator=g, dtype=torch.float64) * 3 - 1).requires_grad_()
    rc = -torch.rand(4, generator=g, dtype=torch.float64) * 3 - 1
    rr = -torch.rand(4, generator=g, dtype=torch.float64) * 3 - 1
    lens = torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    ref_free = loss_type in ("simpo", "orpo", "cpo")

    def f(a, b):
        return dk.dpo_loss(a, b, None if ref_free else rc, None if ref_free else rr, loss_type,
                           chosen_lengths=lens, rejected_lengths=lens, **extra)[0]
    # A non-uniform upstream gradient exercises the full vector-Jacobian product.
    assert torch.autograd.gradcheck(f, (pc, pr))


@pytest.mark.parametrize("cfg", [
    dict(), dict(loss_type="ipo"), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3]),
    dict(ld_alpha=0.5), dict(f_divergence_type="js_divergence"),
    dict(loss_type="aot_unpaired"),
])
def test_gradcheck_dpo_loss_from_logits(cfg):
    # (use_weighting is left out: WPO weights are constants, as in TRL, so the analytic
    # gradient deliberately differs from the numerical one; test_trl_parity covers it.)
    logits, labels, rc, rr = make(P=2, T=4, V=5)
    logits = logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: dk.dpo_loss_from_logits(z, labels, rc, rr, **cfg)[0], (logits,))


# ---- torch.compile(fullgraph=True) -----------------------------------------------------------

def test_every_public_op_is_pt2_compliant():
    """Every dpo_kernels op but the private (underscore) GEMM probes carries
    torch.Tag.pt2_compliant_tag, the promise torch.compile and torch.export rely on: each has
    a fake kernel and passes torch.library.opcheck (the opcheck tests here, in
    test_linear*.py and in test_distributed_compile.py)."""
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("dpo_kernels::") and not n.split("::", 1)[1].startswith("_"))
    assert len(names) >= 21 and "shard_partials" in names and "linear_dpo" in names, names
    untagged = [n for n in names if torch.Tag.pt2_compliant_tag not in getattr(ops, n).default.tags]
    assert not untagged, f"ops without pt2_compliant_tag: {untagged}"


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    logits, labels, rc, rr = make(dtype=torch.float32)

    def step(z, ref_logits):
        loss, metrics = dk.dpo_loss_from_logits(z, labels, ref_logits=ref_logits, loss_type=["sigmoid", "sft"],
                                                loss_weights=[1.0, 0.5])
        lp = dk.sequence_logps(z, labels)
        losses, cr, rj = dk.dpo_loss(*lp.chunk(2), rc.float(), rr.float(), "ipo",
                                     chosen_lengths=torch.ones(P), rejected_lengths=torch.ones(P))
        return loss + 0.1 * losses.mean(), metrics["rewards/margins"]

    ref_logits = logits.detach() + 0.1
    z1 = logits.detach().clone().requires_grad_()
    z2 = logits.detach().clone().requires_grad_()
    eager = step(z1, ref_logits)
    eager[0].backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(z2, ref_logits)
    compiled[0].backward()
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(z2.grad, z1.grad)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    logits, labels, rc, rr = make(dtype=torch.float32, gap=False)
    fn = torch.compile(lambda z: dk.dpo_loss_from_logits(z, labels, rc, rr)[0], fullgraph=True)
    z1 = logits.detach().clone().requires_grad_()
    z2 = logits.detach().clone().requires_grad_()
    fn(z1).backward()
    dk.dpo_loss_from_logits(z2, labels, rc, rr)[0].backward()
    torch.testing.assert_close(z1.grad, z2.grad)


# ---- semantics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_sequence_logps_dtypes(dtype, label_dtype):
    logits, labels, _, _ = make(dtype=dtype)
    out = dk.sequence_logps(logits, labels.to(label_dtype))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}[dtype]
    torch.testing.assert_close(out.double(), eager_logps(logits, labels), rtol=tol, atol=tol)


def test_layouts_agree():
    logits, labels, rc, rr = make()
    z_gap = logits.detach().requires_grad_()  # logits[:, :-1] view, read in place
    z_cont = logits.detach().contiguous().requires_grad_()
    z_t = logits.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # sequence-major
    N = 2 * P * T
    cu = torch.arange(0, N + 1, T)
    z_packed = logits.detach().reshape(N, V).requires_grad_()
    results = []
    for z, kw, lab in ((z_gap, {}, labels), (z_cont, {}, labels), (z_t, {}, labels),
                       (z_packed, {"cu_seqlens": cu}, labels.reshape(N))):
        loss, m = dk.dpo_loss_from_logits(z, lab, rc, rr, **kw)
        loss.backward()
        results.append((loss, m["entropy"], z.grad.reshape(2 * P, T, V)))
    for loss, ent, g in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(ent, results[0][1], rtol=0, atol=0)
        torch.testing.assert_close(g, results[0][2], rtol=0, atol=0)


def test_inplace_backward_overwrites_logits_with_gradient():
    logits, labels, rc, rr = make(gap=False)
    base = logits.detach().clone().requires_grad_()
    h = base * 1.0  # a non-leaf, as the output of an LM head would be
    loss, _ = dk.dpo_loss_from_logits(h, labels, rc, rr, inplace_backward=True)
    loss.backward()
    ref = logits.detach().clone().requires_grad_()
    dk.dpo_loss_from_logits(ref, labels, rc, rr)[0].backward()
    torch.testing.assert_close(base.grad, ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(h.detach(), ref.grad, rtol=0, atol=0)  # the buffer now holds the gradient


def test_inplace_backward_rejects_gapped_logits():
    logits, labels, rc, rr = make(gap=True)
    # A gapped non-leaf (the shifted slice of an LM head's output); a leaf is refused earlier.
    z = (logits._base.detach().requires_grad_() * 1.0)[:, :-1]
    loss, _ = dk.dpo_loss_from_logits(z, labels, rc, rr, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        loss.backward()


def test_pair_values_and_metrics_match_eager():
    logits, labels, rc, rr = make()
    loss, m, pv = dk.dpo_loss_from_logits(logits, labels, rc, rr, beta=0.2, return_pair_values=True)
    pi = eager_logps(logits, labels)
    pc, pr = pi.chunk(2)
    torch.testing.assert_close(pv["chosen_logps"], pc)
    torch.testing.assert_close(pv["chosen_rewards"], 0.2 * (pc - rc))
    expected = -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, expected)
    mask = labels != -100
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(m["entropy"], ent[mask].mean())
    torch.testing.assert_close(m["rewards/accuracies"], ((pc - rc) > (pr - rr)).double().mean())


def test_dpo_loss_matches_formula():
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    losses, cr, rj = dk.dpo_loss(pc, pr, rc, rr, "hinge", beta=0.3)
    torch.testing.assert_close(losses, torch.relu(1 - 0.3 * ((pc - rc) - (pr - rr))))
    torch.testing.assert_close(cr, 0.3 * (pc - rc))
    assert not cr.requires_grad


def test_deterministic_across_threads():
    logits, labels, rc, rr = make(dtype=torch.float32, P=4, T=16, V=3000)
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        z = logits.detach().clone().requires_grad_()
        loss, _ = dk.dpo_loss_from_logits(z, labels, rc, rr)
        loss.backward()
        outs.append((loss, z.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(loss_type="nope"), ValueError, "not a known loss type"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.6), ValueError, "label_smoothing"),
    (dict(label_smoothing=0.1), ValueError, "no effect"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), ValueError, "not supported"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_type="aot", use_weighting=True), ValueError, "use_weighting"),
    (dict(ld_alpha=1.5), ValueError, "ld_alpha"),
])
def test_bad_hyperparameters(kwargs, exc, match):
    logits, labels, rc, rr = make()
    with pytest.raises(exc, match=match):
        dk.dpo_loss_from_logits(logits, labels, rc, rr, **kwargs)
    pair_kwargs = {k: v for k, v in kwargs.items() if k not in ("use_weighting", "ld_alpha")}
    if pair_kwargs == kwargs:
        with pytest.raises(exc, match=match):
            dk.dpo_loss(rc, rr, rc, rr, **pair_kwargs)


def test_inplace_backward_under_compile():
    torch._dynamo.reset()
    logits, labels, rc, rr = make(dtype=torch.float32, gap=False)
    w = torch.randn(V, V, requires_grad=True)

    def step(h):
        return dk.dpo_loss_from_logits(h @ w, labels, rc, rr, inplace_backward=True)[0]

    h = logits.detach()
    torch.compile(step, fullgraph=True)(h).backward()
    g_compiled = w.grad.clone()
    w.grad = None
    dk.dpo_loss_from_logits(h @ w, labels, rc, rr)[0].backward()
    torch.testing.assert_close(g_compiled, w.grad)


def test_bad_inputs():
    logits, labels, rc, rr = make()
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        dk.dpo_loss_from_logits(logits, labels.float(), rc, rr)
    with pytest.raises(TypeError, match="logits must be float"):
        dk.sequence_logps(labels, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        dk.dpo_loss_from_logits(logits, labels[:, :-1], rc, rr)
    with pytest.raises(ValueError, match=r"reference_chosen_logps must have shape \[3\]"):
        dk.dpo_loss_from_logits(logits, labels, rc[:2], rr)
    with pytest.raises(ValueError, match="even number"):
        dk.dpo_loss_from_logits(logits[:5], labels[:5], rc, rr)
    with pytest.raises(ValueError, match="reference_chosen_logps is None"):
        dk.dpo_loss_from_logits(logits, labels)
    bad = labels.clone()
    bad[1, 3] = V + 2
    with pytest.raises(ValueError, match="outside"):
        dk.dpo_loss_from_logits(logits, bad, rc, rr)
    with pytest.raises(ValueError, match="3-D|\\[B, T, V\\]"):
        dk.sequence_logps(logits[0, 0], labels[0, 0])
    with pytest.raises(ValueError, match="grad|shape"):
        dk.dpo_loss(rc, rr[:2], rc, rr)
    with pytest.raises(ValueError, match="not both"):
        dk.dpo_loss_from_logits(logits, labels, rc, rr, ref_logits=logits.detach())
    with pytest.raises(ValueError, match="ref_logits must have the shape of logits"):
        dk.dpo_loss_from_logits(logits, labels, ref_logits=logits.detach()[:, :-1])
    with pytest.raises(ValueError, match="grad_loss must hold one value"):
        ops.dpo_backward(torch.ones(2), logits.detach(), labels, None, torch.zeros(labels.shape),
                         torch.zeros(labels.shape), -100)


@pytest.mark.parametrize("policy_dtype,ref_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                                    (torch.float16, torch.float32), (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_ref_logits_of_another_dtype_are_read_as_they_are(policy_dtype, ref_dtype, packed, ld_alpha):
    # The reference pass reads ref_logits in their own dtype: the same loss, metrics, pair values
    # and gradient as passing the reference's own log-probs (LD-DPO weighted alike: the pair
    # values of a call with the reference as the policy), never the reference rounded to the
    # policy's dtype (which moves each log-prob by ~0.01-0.2 here).
    g = torch.Generator().manual_seed(11)
    P, T, V = 3, 40, 97
    full = 8 * torch.randn(2 * P, T, V, generator=g, dtype=torch.float64)
    ref_full = full + 2 * torch.randn(full.shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :4] = -100
    labels[1, 30:] = -100  # a shorter sequence, so that LD-DPO weighs something
    cu = None
    z, ref = full.to(policy_dtype), ref_full.to(ref_dtype)
    if packed:
        z, ref, labels = z.reshape(-1, V), ref.reshape(-1, V), labels.reshape(-1)
        cu = torch.arange(0, 2 * P + 1) * T
    kw = dict(cu_seqlens=cu, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=ld_alpha)
    zeros = torch.zeros(P, dtype=torch.float64)
    own = dk.dpo_loss_from_logits(ref, labels, zeros, zeros, return_pair_values=True, **kw)[2]
    rc, rr = own["chosen_logps"].double(), own["rejected_logps"].double()
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    loss1, m1, p1 = dk.dpo_loss_from_logits(z1, labels, ref_logits=ref, return_pair_values=True, **kw)
    loss2, m2, p2 = dk.dpo_loss_from_logits(z2, labels, rc, rr, return_pair_values=True, **kw)
    # The log-probs' route rounds the reference log-probs to the result dtype (float32 but for
    # float64 reference logits): one rounding of values ~-200 apart.
    tol = dict(rtol=1e-9, atol=1e-9) if ref_dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)
    assert loss1.dtype == loss2.dtype
    torch.testing.assert_close(loss1, loss2, **tol)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], **tol, msg=k)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], **tol, msg=k)
    (loss1 * 1.7).backward()
    (loss2 * 1.7).backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad.double(), rtol=1e-2 if z.element_size() == 2 else 1e-5,
                               atol=1e-6)
    # Not the reference rounded to the policy's dtype (where that dtype is the narrower one):
    # that moves the rewards by far more than the tolerance.
    if torch.finfo(policy_dtype).eps > torch.finfo(ref_dtype).eps:
        p3 = dk.dpo_loss_from_logits(z.detach(), labels, ref_logits=ref.to(policy_dtype), return_pair_values=True,
                                     **kw)[2]
        assert (p3["chosen_rewards"] - p1["chosen_rewards"]).abs().max() > 20 * tol["atol"]


def test_ref_logits_must_be_floating():
    z = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    with pytest.raises(TypeError, match="ref_logits must be float32, float64, bfloat16 or float16"):
        dk.dpo_loss_from_logits(z, y, ref_logits=torch.zeros(2, 5, 11, dtype=torch.int64))
