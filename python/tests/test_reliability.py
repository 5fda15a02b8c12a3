# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""Misuse of the public functions (issue 16): every bad input raises a TypeError / ValueError /
RuntimeError naming the argument, before anything is written; inplace_backward and double
backward never give a silently wrong gradient; empty packed and padded batches agree."""
import random

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels._ops import ops

P, T, V = 2, 5, 7
CONFIG = ("sigmoid", [], 0.1, 0.0, "reverse_kl", 0.5, 0.05, False, 1.0, False, False, 0.5, 1.0, "sigmoid")


def make(P=P, T=T, V=V, gap=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2 * P, T + 1, V, generator=g, dtype=torch.float64).to(dtype)
    logits = full[:, :-1] if gap else full[:, :-1].contiguous()
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, 0] = -100
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 5 - 1
    rr = -torch.rand(P, generator=g, dtype=torch.float64) * 5 - 1
    return logits, labels, rc, rr


# ---- 2. inplace_backward ------------------------------------------------------------------------

def test_inplace_backward_bumps_version_so_other_saved_uses_raise():
    logits, labels, rc, rr = make()
    base = logits.clone().requires_grad_()
    x = base * 1.0
    extra = (x ** 2).sum()  # saves x for its backward
    loss, _ = dk.dpo_loss_from_logits(x, labels, rc, rr, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + extra).backward()


def test_inplace_backward_version_counter_changes():
    logits, labels, rc, rr = make()
    x = logits.clone().requires_grad_() * 1.0
    v0 = x._version
    dk.dpo_loss_from_logits(x, labels, rc, rr, inplace_backward=True)[0].backward()
    assert x._version > v0


def test_inplace_op_bumps_version_and_rejected_call_does_not():
    logits, labels, rc, rr = make()
    z = logits.clone()
    _, _, _, lse, coef = ops.dpo_forward(z, labels, None, rc, rr, None, -100, *CONFIG, True, False)
    g = torch.tensor(1.0, dtype=torch.float64)
    v0 = z._version
    with pytest.raises(ValueError, match="grad_loss"):
        ops.dpo_backward_(torch.ones(2, dtype=torch.float64), z, labels, None, lse, coef, -100)
    assert z._version == v0
    torch.testing.assert_close(z, logits, rtol=0, atol=0)
    ops.dpo_backward_(g, z, labels, None, lse, coef, -100)
    assert z._version > v0


def test_inplace_backward_second_backward_raises():
    logits, labels, rc, rr = make()
    base = logits.clone().requires_grad_()
    x = base * 1.0
    loss, _ = dk.dpo_loss_from_logits(x, labels, rc, rr, inplace_backward=True)
    loss.backward(retain_graph=True)
    first = base.grad.clone()
    with pytest.raises(RuntimeError, match="inplace_backward=True.*second backward"):
        loss.backward()
    torch.testing.assert_close(base.grad, first, rtol=0, atol=0)  # nothing accumulated
    ref = logits.clone().requires_grad_()
    dk.dpo_loss_from_logits(ref, labels, rc, rr)[0].backward()
    torch.testing.assert_close(first, ref.grad, rtol=0, atol=0)


def test_inplace_backward_refuses_leaf():
    logits, labels, rc, rr = make()
    leaf = logits.clone().requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        dk.dpo_loss_from_logits(leaf, labels, rc, rr, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        ops.dpo_forward(leaf, labels, None, rc, rr, None, -100, *CONFIG, True, True)
    with pytest.raises(ValueError, match="inplace_backward.*view of one"):
        dk.dpo_loss_from_logits(leaf[:, :], labels, rc, rr, inplace_backward=True)
    torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0)
    assert leaf.grad is None
    # A leaf that needs no gradient is fine: nothing runs backward into it.
    dk.dpo_loss_from_logits(logits.clone(), labels, rc, rr, inplace_backward=True)


def test_inplace_backward_refuses_leaf_under_compile():
    torch._dynamo.reset()
    logits, labels, rc, rr = make()
    leaf = logits.clone().requires_grad_()
    fn = torch.compile(lambda z: dk.dpo_loss_from_logits(z, labels, rc, rr, inplace_backward=True)[0],
                       backend="aot_eager")
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        fn(leaf)
    torch.testing.assert_close(leaf.detach(), logits, rtol=0, atol=0)


def test_inplace_backward_legitimate_use_unchanged():
    logits, labels, rc, rr = make()
    base = logits.clone().requires_grad_()
    h = base * 2.0
    dk.dpo_loss_from_logits(h, labels, rc, rr, inplace_backward=True)[0].backward()
    ref = logits.clone().requires_grad_()
    dk.dpo_loss_from_logits(ref * 2.0, labels, rc, rr)[0].backward()
    torch.testing.assert_close(base.grad, ref.grad, rtol=0, atol=0)


def test_inplace_backward_under_compile_with_graph_input():
    # The logits enter the compiled region from outside (an LM head run eagerly).
    torch._dynamo.reset()
    logits, labels, rc, rr = make(dtype=torch.float32)
    rc, rr = rc.float(), rr.float()
    fn = torch.compile(lambda z: dk.dpo_loss_from_logits(z, labels, rc, rr, inplace_backward=True)[0],
                       fullgraph=True, backend="aot_eager")
    base = logits.clone().requires_grad_()
    fn(base * 1.0).backward()
    ref = logits.clone().requires_grad_()
    dk.dpo_loss_from_logits(ref * 1.0, labels, rc, rr)[0].backward()
    torch.testing.assert_close(base.grad, ref.grad)


# ---- 3. devices ------------------------------------------------------------------------------

def _calls(logits, labels, rc, rr, cu=None):
    """(function, kwargs) of every public function with every tensor argument filled."""
    N = logits.shape[0] * logits.shape[1]
    packed = dict(logits=logits.reshape(N, -1), labels=labels.reshape(N),
                  cu_seqlens=torch.arange(0, N + 1, logits.shape[1]) if cu is None else cu)
    lens = torch.full((rc.shape[0],), 3.0, dtype=torch.float64)
    return [
        (dk.sequence_logps, dict(logits=logits, labels=labels)),
        (dk.sequence_logps, packed),
        (dk.dpo_loss, dict(policy_chosen_logps=rc + 0.5, policy_rejected_logps=rr - 0.5,
                           reference_chosen_logps=rc, reference_rejected_logps=rr,
                           chosen_lengths=lens, rejected_lengths=lens, weights=torch.ones_like(rc))),
        (dk.dpo_loss_from_logits, dict(logits=logits, labels=labels, reference_chosen_logps=rc,
                                       reference_rejected_logps=rr)),
        (dk.dpo_loss_from_logits, dict(packed, reference_chosen_logps=rc, reference_rejected_logps=rr)),
        (dk.dpo_loss_from_logits, dict(logits=logits, labels=labels, ref_logits=logits + 0.1)),
    ]


def test_every_tensor_argument_on_meta_is_named():
    logits, labels, rc, rr = make()
    for fn, kwargs in _calls(logits, labels, rc, rr):
        for name, t in kwargs.items():
            if not isinstance(t, torch.Tensor):
                continue
            bad = dict(kwargs, **{name: t.to("meta")})
            with pytest.raises(ValueError, match=f"{name} is on meta"):
                fn(**bad)


def test_direct_op_calls_with_meta_are_named():
    logits, labels, rc, rr = make()
    with pytest.raises(ValueError, match="labels is on meta"):
        ops.sequence_logps(logits, labels.to("meta"), None, -100, False)
    with pytest.raises(ValueError, match="reference_rejected_logps is on meta"):
        ops.dpo_forward(logits, labels, None, rc, rr.to("meta"), None, -100, *CONFIG, True, False)
    with pytest.raises(ValueError, match="weights is on meta"):
        ops.pair_loss(rc, rr, rc, rr, None, None, torch.ones(P, device="meta"), *CONFIG)


def test_all_meta_is_shape_inference():
    logits, labels, rc, rr = make()
    loss, _ = dk.dpo_loss_from_logits(logits.to("meta"), labels.to("meta"), rc.to("meta"), rr.to("meta"))
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_cuda_mix_is_named():
    logits, labels, rc, rr = make()
    for fn, kwargs in _calls(logits.cuda(), labels.cuda(), rc.cuda(), rr.cuda(), None):
        kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        for name, t in kwargs.items():
            if isinstance(t, torch.Tensor):
                with pytest.raises(ValueError, match=f"{name} is on cpu"):
                    fn(**dict(kwargs, **{name: t.cpu()}))


# ---- 7. double backward ---------------------------------------------------------------------------

def _first_order_graphs():
    logits, labels, rc, rr = make()
    z = logits.clone().requires_grad_()
    pc = (rc + 0.3).requires_grad_()
    pr = (rr - 0.3).requires_grad_()
    return [
        ("dpo_loss_from_logits", z, lambda: dk.dpo_loss_from_logits(z, labels, rc, rr)[0]),
        ("sequence_logps", z, lambda: dk.sequence_logps(z, labels).sum()),
        ("dpo_loss", pc, lambda: dk.dpo_loss(pc, pr, rc, rr)[0].mean()),
    ]


@pytest.mark.parametrize("case", range(3))
def test_double_backward_raises(case):
    name, x, f = _first_order_graphs()[case]
    (g,) = torch.autograd.grad(f(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"dpo_kernels.{name}: double backward is not supported"):
        torch.autograd.grad(g.pow(2).sum(), x)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_create_graph_first_order_still_right():
    logits, labels, rc, rr = make()
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    (g1,) = torch.autograd.grad(dk.dpo_loss_from_logits(z1, labels, rc, rr)[0], z1, create_graph=True)
    (g2,) = torch.autograd.grad(dk.dpo_loss_from_logits(z2, labels, rc, rr)[0], z2)
    torch.testing.assert_close(g1.detach(), g2, rtol=0, atol=0)


# ---- 8. missing reference log-probs ---------------------------------------------------------------

def test_missing_reference_names_python_argument():
    logits, labels, rc, rr = make()
    with pytest.raises(ValueError, match="reference_chosen_logps is None"):
        dk.dpo_loss_from_logits(logits, labels)
    with pytest.raises(ValueError, match="reference_rejected_logps is None"):
        dk.dpo_loss_from_logits(logits, labels, rc)
    with pytest.raises(ValueError, match="reference_chosen_logps is None"):
        dk.dpo_loss(rc, rr, None, rr)
    with pytest.raises(ValueError, match="reference_rejected_logps is None"):
        dk.dpo_loss(rc, rr, rc, None)
    dk.dpo_loss(rc, rr, None, None, "simpo")  # reference-free losses need none
    dk.dpo_loss(rc, rr, None, None, reference_free=True)


def test_pair_loss_dtypes_as_dpo_loss_from_logits():
    # dk.dpo_loss takes what dpo_loss_from_logits takes: floating reference log-probs and
    # weights (an int or bool one is a TypeError naming it, not a silent conversion); lengths
    # are token counts, integer or floating, never bool.
    _, _, rc, rr = make()
    P = rc.shape[0]
    for name, kw in (("reference_chosen_logps", dict(reference_chosen_logps=rc.long())),
                     ("reference_rejected_logps", dict(reference_rejected_logps=torch.zeros(P, dtype=torch.bool))),
                     ("weights", dict(weights=torch.ones(P, dtype=torch.int64))),
                     ("chosen_lengths", dict(chosen_lengths=torch.ones(P, dtype=torch.bool)))):
        args = dict(reference_chosen_logps=rc, reference_rejected_logps=rr, loss_type="ipo")
        args.update(kw)
        with pytest.raises(TypeError, match=name):
            dk.dpo_loss(rc, rr, **args)
    ints = dk.dpo_loss(rc, rr, rc - 1, rr - 1, "ipo", chosen_lengths=torch.full((P,), 7),
                       rejected_lengths=torch.full((P,), 5, dtype=torch.int32))[0]
    floats = dk.dpo_loss(rc, rr, rc - 1, rr - 1, "ipo", chosen_lengths=torch.full((P,), 7.0),
                         rejected_lengths=torch.full((P,), 5.0))[0]
    torch.testing.assert_close(ints, floats, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["chosen_lengths", "rejected_lengths"])
@pytest.mark.parametrize("bad", [-3.0, -0.5, float("nan"), float("inf"), float("-inf")])
def test_pair_loss_lengths_must_be_finite_counts(name, bad):
    # A negative or non-finite token count is refused by name (it used to be clamped to 1, or
    # to give a NaN loss); 0, an empty completion, counts as 1 where it divides.
    _, _, rc, rr = make()
    P = rc.shape[0]
    for loss_type in ("ipo", "simpo"):
        lengths = dict(chosen_lengths=torch.full((P,), 3.0), rejected_lengths=torch.full((P,), 4.0))
        lengths[name] = torch.tensor([3.0] + [bad] * (P - 1), dtype=torch.float64)
        ref = (None, None) if loss_type == "simpo" else (rc - 1, rr - 1)
        with pytest.raises(ValueError, match=rf"{name}\[1\] = .* is invalid: a token count must be finite and >= 0"):
            dk.dpo_loss(rc, rr, *ref, loss_type, **lengths)
        pc, pr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
        losses = dk.dpo_loss(pc, pr, *ref, loss_type, chosen_lengths=torch.full((P,), 3.0),
                             rejected_lengths=torch.full((P,), 4.0))[0]
        grad = torch.ones_like(losses)
        with pytest.raises(ValueError, match=name):  # the backward op checks its inputs alike
            ops.pair_loss_backward(grad, pc, pr, *ref, lengths["chosen_lengths"], lengths["rejected_lengths"], None,
                                   loss_type, [], 0.1, 0.0, "reverse_kl", 0.5, 0.05, False, 1.0, False, False, 0.5, 1.0,
                                   "sigmoid")
    zero = dk.dpo_loss(rc, rr, rc - 1, rr - 1, "ipo", chosen_lengths=torch.tensor([0.0] * P),
                       rejected_lengths=torch.tensor([2.0] * P))[0]
    one = dk.dpo_loss(rc, rr, rc - 1, rr - 1, "ipo", chosen_lengths=torch.tensor([1.0] * P),
                      rejected_lengths=torch.tensor([2.0] * P))[0]
    torch.testing.assert_close(zero, one, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", ["sigmoid", "aot"]])
def test_pair_loss_weights_refused_with_losses_that_sort_pairs(loss_type):
    # aot / aot_unpaired sort the pairs: weights W_i would weigh sorted positions, not pairs
    # (use_weighting is refused for the same reason); the backward (whose own upstream weights
    # are sorted positions, correctly) still works without them.
    _, _, rc, rr = make(P=4)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="weights is not supported with loss_type aot"):
        dk.dpo_loss(rc, rr, rc - 1, rr - 1, loss_type, weights=w)
    pc = rc.clone().requires_grad_()
    losses = dk.dpo_loss(pc, rr, rc - 1, rr - 1, loss_type)[0]
    (losses * torch.arange(1.0, 5.0, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(pc.grad).all()
    dk.dpo_loss(rc, rr, rc - 1, rr - 1, "sigmoid", weights=w)  # per-pair weights are fine elsewhere


# ---- 9. hyperparameter types ----------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,exc", [
    (None, TypeError), (3, TypeError), ({"sigmoid"}, TypeError), (["sigmoid", 3], TypeError),
    (["sigmoid", ""], ValueError), ("sigmoid,", ValueError), (",sigmoid", ValueError),
    ("sigmoid,,ipo", ValueError), ("", ValueError), ([], ValueError), (["sigmoid", " "], ValueError),
    (["sigmoid,ipo"], ValueError),
])
def test_bad_loss_type_names_argument_and_allowed_values(loss_type, exc):
    logits, labels, rc, rr = make()
    for call in (lambda: dk.dpo_loss_from_logits(logits, labels, rc, rr, loss_type=loss_type),
                 lambda: dk.dpo_loss(rc, rr, rc, rr, loss_type)):
        with pytest.raises(exc, match=r"loss_type.*sigmoid, hinge, ipo"):
            call()


def test_empty_loss_type_entry_rejected_by_the_op():
    rc = torch.zeros(P, dtype=torch.float64)
    for bad in ("sigmoid,", "sigmoid,,ipo", " , "):
        with pytest.raises(ValueError, match="loss_type.*empty"):
            ops.pair_loss(rc, rc, rc, rc, None, None, None, bad, *CONFIG[1:])


@pytest.mark.parametrize("name,value,exc", [
    ("beta", None, TypeError), ("beta", "0.1", TypeError), ("beta", True, TypeError),
    ("beta", float("nan"), ValueError), ("label_smoothing", float("inf"), ValueError),
    ("f_alpha_divergence_coef", float("inf"), ValueError), ("discopop_tau", None, TypeError),
    ("simpo_gamma", float("-inf"), ValueError), ("cpo_alpha", "1", TypeError),
    ("loss_weights", [None], TypeError), ("loss_weights", [float("nan")], ValueError),
    ("loss_weights", "1.0", TypeError), ("f_divergence_type", None, TypeError), ("cpo_base", 1, TypeError),
    ("reference_free", "False", TypeError), ("cdpo_smoothing", None, TypeError),
    ("use_weighting", 1, TypeError), ("ld_alpha", "0.5", TypeError), ("ld_alpha", float("nan"), ValueError),
    ("compute_metrics", None, TypeError), ("inplace_backward", "yes", TypeError),
    ("return_pair_values", 0, TypeError), ("ignore_index", 1.5, TypeError), ("ignore_index", None, TypeError),
    ("ignore_index", True, TypeError),
])
def test_bad_hyperparameter_types_name_the_argument(name, value, exc):
    logits, labels, rc, rr = make()
    with pytest.raises(exc, match=name.split("[")[0]):
        dk.dpo_loss_from_logits(logits, labels, rc, rr, **{name: value})
    pair_args = ("beta", "label_smoothing", "f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "cpo_alpha",
                 "loss_weights", "f_divergence_type", "cpo_base", "reference_free", "cdpo_smoothing")
    if name in pair_args:
        with pytest.raises(exc, match=name):
            dk.dpo_loss(rc, rr, rc, rr, **{name: value})


def test_bad_sequence_logps_arguments():
    logits, labels, _, _ = make()
    with pytest.raises(TypeError, match="average"):
        dk.sequence_logps(logits, labels, average="no")
    with pytest.raises(TypeError, match="ignore_index"):
        dk.sequence_logps(logits, labels, ignore_index=None)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        dk.sequence_logps(logits, labels.tolist())


# ---- 10. ignore_index range ---------------------------------------------------------------------------

@pytest.mark.parametrize("gap", [True, False])
def test_ignore_index_out_of_range(gap):
    logits, labels, rc, rr = make(gap=gap)
    y32 = labels.int()
    with pytest.raises(ValueError, match=r"ignore_index = 1099511627776 is outside the range of int32 labels"):
        dk.dpo_loss_from_logits(logits, y32, rc, rr, ignore_index=2**40)
    with pytest.raises(ValueError, match=r"ignore_index = 1099511627776 is outside the range of int32 labels"):
        dk.sequence_logps(logits, y32, ignore_index=2**40)
    with pytest.raises(ValueError, match="ignore_index.*outside the range of int64"):
        dk.dpo_loss_from_logits(logits, labels, rc, rr, ignore_index=2**70)
    with pytest.raises(ValueError, match="ignore_index.*outside the range of int64"):
        dk.sequence_logps(logits, labels, ignore_index=-(2**63) - 1)
    # The op itself (C++) checks int32 labels too.
    with pytest.raises(ValueError, match="ignore_index = 1099511627776 is outside the range of int32 labels"):
        ops.sequence_logps(logits, y32, None, 2**40, False)
    # In range is fine, with either label dtype (it then matches no label here).
    dk.sequence_logps(logits, labels.clamp(min=0), ignore_index=2**40)
    dk.sequence_logps(logits, y32.clamp(min=0), ignore_index=-(2**31))


# ---- 11. empty batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [0, 4])
def test_packed_zero_sequences_like_padded_zero_batch(N):
    z = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(N, dtype=torch.long)
    cu = torch.tensor([0])
    zp = torch.randn(0, T, V, dtype=torch.float64, requires_grad=True)
    padded = dk.sequence_logps(zp, torch.zeros(0, T, dtype=torch.long))
    for average in (False, True):
        out = dk.sequence_logps(z, y, cu_seqlens=cu, average=average)
        assert out.shape == padded.shape == (0,) and out.dtype == padded.dtype
        out.sum().backward()
        assert z.grad.shape == z.shape and z.grad.eq(0).all()
        z.grad = None
    logps, lse = ops.sequence_logps(z, y, cu, -100, False)
    assert lse.shape == (N,)
    grad = ops.sequence_logps_backward(torch.zeros(0, dtype=torch.float64), z.detach(), y, cu, lse, -100, False)
    assert grad.shape == (N, V) and grad.eq(0).all()
    torch.library.opcheck(ops.sequence_logps, (z, y, cu, -100, True))
    torch.library.opcheck(ops.sequence_logps_backward,
                          (torch.zeros(0, dtype=torch.float64), z.detach(), y, cu, lse, -100, False))
    with pytest.raises(ValueError, match="cu_seqlens"):
        dk.sequence_logps(z, y, cu_seqlens=torch.tensor([N + 1]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        dk.sequence_logps(z, y, cu_seqlens=torch.tensor([-1]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        dk.sequence_logps(z, y, cu_seqlens=torch.zeros(0, dtype=torch.long))
    # The loss needs pairs in either layout, with the same message.
    rc = torch.zeros(0, dtype=torch.float64)
    for kwargs in (dict(logits=z, labels=y, cu_seqlens=cu), dict(logits=zp, labels=torch.zeros(0, T, dtype=torch.long))):
        with pytest.raises(ValueError, match="logits holds 0 sequences"):
            dk.dpo_loss_from_logits(reference_chosen_logps=rc, reference_rejected_logps=rc, **kwargs)


def test_packed_zero_sequences_under_compile():
    torch._dynamo.reset()
    z = torch.randn(3, V)
    y = torch.zeros(3, dtype=torch.long)
    out = torch.compile(lambda a: dk.sequence_logps(a, y, cu_seqlens=torch.tensor([0])), fullgraph=True,
                        backend="aot_eager")(z)
    assert out.shape == (0,)


# ---- fuzz: bad inputs of every class at every public function -----------------------------------------

BAD_LOSS_TYPES = [None, 3, 1.5, ["sigmoid", ""], "sigmoid,", ",", "", [], ["nope"], "sigmoid,nope", [None],
                  b"sigmoid", {"sigmoid": 1.0}]
BAD_IGNORE_INDEX = [2**40, 2**63, 2**70, -(2**63) - 1, 1.0, None, "x", True]


def _snapshot(kwargs):
    return {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def _unchanged(kwargs, snap):
    for k, before in snap.items():
        torch.testing.assert_close(kwargs[k].detach(), before, rtol=0, atol=0, equal_nan=True, msg=f"{k} was modified")


@pytest.mark.parametrize("seed", range(60))
def test_fuzz_bad_inputs_raise_clear_errors_and_write_nothing(seed):
    rng = random.Random(seed)
    gap = rng.random() < 0.5
    logits, labels, rc, rr = make(gap=gap, seed=seed)
    if rng.random() < 0.5:
        labels = labels.int()
    calls = _calls(logits, labels, rc, rr)
    fn, kwargs = calls[rng.randrange(len(calls))]
    kind = rng.choice(["meta", "loss_type", "ignore_index", "leaf"])
    if kind == "meta":
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        name = rng.choice(names)
        kwargs = dict(kwargs, **{name: kwargs[name].to("meta")})
        exc, match = ValueError, f"{name} is on meta"
    elif kind == "loss_type" and fn is not dk.sequence_logps:
        kwargs = dict(kwargs, loss_type=rng.choice(BAD_LOSS_TYPES))
        exc, match = (TypeError, ValueError), "loss_type"
    elif kind == "ignore_index" and fn is not dk.dpo_loss:
        value = rng.choice(BAD_IGNORE_INDEX)
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            kwargs = dict(kwargs, labels=kwargs["labels"].int())
        kwargs = dict(kwargs, ignore_index=value)
        exc, match = (TypeError, ValueError), "ignore_index"
    else:
        if fn is not dk.dpo_loss_from_logits:
            fn, kwargs = calls[3]
        kwargs = dict(kwargs, logits=kwargs["logits"].detach().clone().requires_grad_(), inplace_backward=True)
        exc, match = ValueError, "inplace_backward.*leaf"
    snap = _snapshot(kwargs)
    versions = {k: v._version for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=match):
        fn(**kwargs)
    _unchanged(kwargs, snap)
    assert versions == {k: v._version for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            assert v.grad is None


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_on_pairs_without_rows_has_an_empty_gradient(layout):
    """Logits with zero rows (padded T = 0, packed N = 0 with cu_seqlens [0, 0, 0]): the
    forward gives the loss of zero log-probs, and the backward an empty gradient (an empty
    tensor's data pointer is null: the row state must not be required there)."""
    V = 8
    rc, rr = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64)
    if layout == "padded":
        z, y, kw = torch.zeros(2, 0, V), torch.zeros(2, 0, dtype=torch.long), {}
    else:
        z, y, kw = torch.zeros(0, V), torch.zeros(0, dtype=torch.long), {"cu_seqlens": torch.tensor([0, 0, 0])}
    x = z.clone().requires_grad_()
    loss, _ = dk.dpo_loss_from_logits(x, y, rc, rr, beta=0.1, **kw)
    # -logsigmoid(beta * ((0 - rc) - (0 - rr)))
    want = -torch.nn.functional.logsigmoid(torch.tensor(0.1 * ((0 + 1.0) - (0 + 2.0)), dtype=torch.float64))
    assert abs(float(loss.detach()) - float(want)) <= 1e-6 * abs(float(want))
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("upstream", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_non_finite_upstream_gradient_propagates(upstream, inplace):
    # A NaN / inf upstream gradient flows into the logits' gradient, as through any torch op and
    # as on CUDA (which reads it on the device), instead of raising in backward: NaN (or +-inf)
    # on completion rows, zeros on masked rows (0 * inf = 0, the library's times()).
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 11, generator=g)
    labels = torch.randint(0, 11, (4, 5), generator=g)
    labels[:, :2] = -100
    z = logits.clone() if inplace else logits.clone().requires_grad_()
    if inplace:
        z = (z * 1.0).requires_grad_()
        base = z * 1.0
    else:
        base = z
    loss, _ = dk.dpo_loss_from_logits(base, labels, torch.zeros(2), torch.zeros(2), inplace_backward=inplace)
    loss.backward(torch.tensor(upstream))
    masked = labels == -100
    grad = z.grad
    assert torch.all(grad[masked] == 0)
    rows = grad[~masked]
    if upstream != upstream:
        assert torch.isnan(rows).all()
    else:
        assert not torch.isnan(rows).all() and torch.isinf(rows).any()


# ---- audit: bad cu_seqlens shapes, eager and compiled --------------------------------------------------

_BAD_CU = {"0-d": lambda: torch.tensor(0), "empty": lambda: torch.zeros(0, dtype=torch.long)}


def _packed_calls(cu):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, V, generator=g), torch.randint(0, V, (8,), generator=g)
    h, w = torch.randn(8, 4, generator=g), torch.randn(V, 4, generator=g)
    rc = torch.zeros(1)
    return {
        "sequence_logps": lambda: dk.sequence_logps(z, y, cu_seqlens=cu),
        "dpo_loss_from_logits": lambda: dk.dpo_loss_from_logits(z, y, rc, rc, cu_seqlens=cu)[0],
        "dpo_loss_from_hidden": lambda: dk.dpo_loss_from_hidden(h, w, y, rc, rc, cu_seqlens=cu)[0],
        "dpo_loss_from_hidden(ref head in its dtype)": lambda: dk.dpo_loss_from_hidden(
            h, w, y, ref_hidden=h.double(), ref_weight=w.double(), cu_seqlens=cu)[0],
    }


@pytest.mark.parametrize("call", list(_packed_calls(None)))
@pytest.mark.parametrize("bad", list(_BAD_CU))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bad_cu_seqlens_shape_names_the_argument(call, bad, compiled):
    # A 0-d or empty cu_seqlens: the kernels' ValueError, also from the fake kernels under
    # torch.compile (which wraps it) and from the reference-head path that sizes its zeros by
    # it; never an IndexError on its shape.
    cu = _BAD_CU[bad]()
    fn = _packed_calls(cu)[call]
    if compiled:
        if "ref head" in call:
            pytest.skip("eager-only path (a call of its own, under no_grad)")
        torch._dynamo.reset()
        compiled_fn = torch.compile(lambda: fn(), fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception, match=r"cu_seqlens must be 1-D") as info:
            compiled_fn()
        assert not isinstance(info.value, IndexError)
    else:
        with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D"):
            fn()


# ---- audit: ints past int64 for workspace_bytes / ignore_index of the fused head ------------------------

def _head_calls(**kw):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, 5, generator=g), torch.randn(V, 5, generator=g)
    y = torch.randint(0, V, (4, 3), generator=g)
    rc = torch.zeros(2)
    return {
        "linear_logprobs": lambda: dk.linear_logprobs(h.reshape(12, 5), w, None, y.reshape(12), **kw),
        "dpo_loss_from_hidden": lambda: dk.dpo_loss_from_hidden(h, w, y, rc, rc, **kw),
        "FusedLinearDPOLoss": lambda: dk.FusedLinearDPOLoss(
            **{k: v for k, v in kw.items() if k == "ignore_index"},
            **{k: v for k, v in kw.items() if k == "workspace_bytes"})(w, h, y, ref_chosen_logps=rc,
                                                                       ref_rejected_logps=rc),
    }


@pytest.mark.parametrize("call", list(_head_calls()))
@pytest.mark.parametrize("name,value", [
    ("workspace_bytes", 2**63), ("workspace_bytes", 2**70), ("workspace_bytes", -1),
    ("ignore_index", 2**63), ("ignore_index", -(2**63) - 1),
])
def test_head_int_arguments_past_int64_name_the_argument(call, name, value):
    # Not torch's schema error ("Expected a value of type 'int' ... found type 'int'"), and for
    # FusedLinearDPOLoss already in the constructor.
    with pytest.raises(ValueError, match=rf"{name} = {value} is (invalid|outside the range of int64)"):
        _head_calls(**{name: value})[call]()


# ---- audit: a reference head in its own dtype is checked against the policy's head -----------------------

@pytest.mark.parametrize("bad", ["vocab+1", "vocab-1", "hidden-1", "1-D", "ref_bias"])
def test_reference_head_of_its_own_dtype_checked_against_the_policy_head(bad):
    # ref_hidden / ref_weight / ref_bias in another dtype than the policy's are scored by a call
    # of their own: a head over another vocabulary must not be taken (a silently different
    # loss for a larger one), and errors must name ref_weight / ref_bias, not weight / bias.
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, 5, generator=g), torch.randn(V, 5, generator=g)
    y = torch.randint(0, V - 1, (4, 3), generator=g)
    rw, rb = w.double(), None
    if bad == "vocab+1":
        rw = torch.cat([rw, rw[:1]])
    elif bad == "vocab-1":
        rw = rw[:-1]
    elif bad == "hidden-1":
        rw = rw[:, :-1]
    elif bad == "1-D":
        rw = rw[0]
    else:
        rb = torch.zeros(V + 1, dtype=torch.float64)
    x, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    name = "ref_bias" if bad == "ref_bias" else "ref_weight"
    with pytest.raises(ValueError, match=rf"^{name} must have"):
        dk.dpo_loss_from_hidden(x, wx, y, ref_hidden=h.double(), ref_weight=rw, ref_bias=rb)
    assert x.grad is None and wx.grad is None


# ---- audit: FusedLinearDPOLoss checks the fused op's configuration when constructed -----------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(ld_alpha=2.0), "ld_alpha = 2 is invalid"), (dict(ld_alpha=-0.5), "ld_alpha = -0.5 is invalid"),
    (dict(ld_alpha=1.5, compute_nll_loss=True), "ld_alpha = 1.5 is invalid"),
])
def test_fused_linear_dpo_loss_constructor_checks_the_fused_config(kwargs, match):
    # Not only at the first call: the constructor checks the whole configuration, as Liger's.
    with pytest.raises(ValueError, match=match):
        dk.FusedLinearDPOLoss(**kwargs)


@pytest.mark.parametrize("average", [False, True], ids=["summed", "averaged"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_fused_linear_dpo_loss_reference_logps_dtype_named_as_in_the_call(average, dtype):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 3, 5, generator=g), torch.randn(V, 5, generator=g)
    y = torch.randint(0, V, (4, 3), generator=g)
    with pytest.raises(TypeError, match="^ref_chosen_logps must be float32"):
        dk.FusedLinearDPOLoss(average_log_prob=average)(w, h, y, ref_chosen_logps=torch.zeros(2, dtype=dtype),
                                                        ref_rejected_logps=torch.zeros(2))
