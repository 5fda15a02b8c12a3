# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels of the fused-head ops (csrc/cuda_linear.cu) against the CPU kernels on the
same inputs: dk.linear_logprobs (every optional output, transforms, int32 / int64 targets,
ignore_index rows, bias or none) and dk.dpo_loss_from_hidden (several loss types, reference
from log-probs and from ref_hidden, padded and packed), their gradients, CUDA-graph capture of
a training step, torch.compile(fullgraph=True), opcheck, the Liger drop-in, and device errors.
The CPU kernels are themselves checked against float64 references (test_linear.py,
test_dpo_from_hidden.py). Skipped without a GPU and a CUDA build of dpo_kernels."""
import pytest
import torch

import dpo_kernels as dk
from dpo_kernels._ops import CONFIG_FIELDS
from test_dpo_from_hidden import CASES, TRANSFORM_KEYS, logits_of
from test_dpo_from_hidden import make as make_pairs
from test_cuda import value_errors_with_device_checks
from test_linear import make as make_head

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dk.cuda_built()), reason="needs a GPU and a CUDA build of dpo_kernels"
)

#: Relative tolerance (to the largest magnitude, at least 1) of CUDA against CPU: the same
#: inputs, the logits in fp32 (fp64 for fp64) on both, different GEMMs and summation orders.
#: bf16: the CUDA head rounds dZ to bf16 for its tensor-core GEMMs and both round the results
#: to bf16, so gradients differ by a few bf16 ulps.
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
CONFIG_DEFAULTS = tuple(d for _, _, d in CONFIG_FIELDS)


def close(got, want, rtol, what):
    assert got.device.type == "cuda", f"{what}: on {got.device}"
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                                f"{want.dtype}{tuple(want.shape)}"
    got, want = got.detach().cpu().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    tol = rtol * max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    assert err <= tol, f"{what}: max error {err} > {tol}"


def leaves(tensors, device):
    return [None if t is None else t.detach().to(device).clone().requires_grad_() for t in tensors]


# ---- linear_logprobs ---------------------------------------------------------------------------


def head_step(h, w, b, y, device, kw, g_lp, g_ent):
    """linear_logprobs on `device` with every output, then backward of
    sum(g_lp * log_probs) + sum(g_ent * entropy): (outputs, grads)."""
    hh, ww, bb = leaves((h, w, b), device)
    outs = dk.linear_logprobs(hh, ww, bb, y.to(device), **kw)
    loss = (outs[0] * g_lp.to(device)).sum() + (outs[1] * g_ent.to(device)).sum()
    loss.backward()
    return outs, [t.grad for t in (hh, ww, bb) if t is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, softcap=2.5, logit_scale=1.3),
                                dict(workspace_bytes=1 << 16)], ids=["plain", "transforms", "small_budget"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("int32", [False, True])
def test_linear_logprobs_matches_cpu(dtype, kw, bias, int32):
    h, w, b, y = make_head(N=67, H=40, V=1000, dtype=dtype, bias=bias, seed=1)
    y[5::7] = -100  # ignored rows
    if int32:
        y = y.int()
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(2, 67, generator=g, dtype=torch.float64).to(dk._linear._result_dtype(dtype))
    cpu, cpu_grads = head_step(h, w, b, y, "cpu", kw, g_lp, g_ent)
    gpu, gpu_grads = head_step(h, w, b, y, "cuda", kw, g_lp, g_ent)
    rtol = RTOL[dtype]
    for name, a, e in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), gpu, cpu):
        close(a, e, rtol if dtype != torch.bfloat16 else 2e-4, name)  # fp32 logits from the same bf16 inputs
    # is_top1: equal except on rows whose two largest logits are closer than the two GEMMs'
    # rounding (both compute the logits in fp32, fp64 for fp64, from the same inputs).
    top1, want = gpu[4].cpu(), cpu[4]
    tr = {k: kw[k] for k in TRANSFORM_KEYS if k in kw}
    z = logits_of(h.double(), w.double(), None if b is None else b.double(), **tr)
    gap = z.topk(2, -1).values.diff(dim=-1).abs()[:, 0]
    differs = top1 != want
    assert (gap[differs] < 1e-4 * (1 + z.abs().max())).all(), \
        f"is_top1 differs on rows {differs.nonzero().flatten().tolist()} with gaps {gap[differs].tolist()}"
    assert not top1[y == -100].any()
    for name, a, e in zip(("hidden", "weight", "bias"), gpu_grads, cpu_grads):
        close(a, e, rtol, f"grad of {name}")


def test_linear_logprobs_subsets_of_outputs_and_no_grad():
    h, w, b, y = make_head(N=20, H=16, V=300, seed=3)
    for outputs in ((), ("entropy",), ("mean_logits", "is_top1"), ("log_sum_sq_probs",)):
        cpu = dk.linear_logprobs(h, w, b, y, outputs=outputs)
        gpu = dk.linear_logprobs(h.cuda(), w.cuda(), b.cuda(), y.cuda(), outputs=outputs)
        for a, e in zip(gpu, cpu):
            assert (a is None) == (e is None)
            if a is not None and a.dtype != torch.bool:
                close(a, e, RTOL[torch.float32], f"{outputs}")
            elif a is not None:
                assert torch.equal(a.cpu(), e)
    # Only weight requires grad: dHidden is not computed, dWeight matches.
    ww = [w.clone().requires_grad_(), w.cuda().requires_grad_()]
    for wt, dev in zip(ww, ("cpu", "cuda")):
        dk.linear_logprobs(h.to(dev), wt, b.to(dev), y.to(dev), outputs=())[0].sum().backward()
    close(ww[1].grad, ww[0].grad, RTOL[torch.float32], "grad of weight")


def test_linear_logprobs_bad_target_is_reported_on_the_device():
    h, w, b, y = make_head(N=8, H=8, V=50, seed=4)
    y[3] = 77
    lp, ent, *_ = dk.linear_logprobs(h.cuda(), w.cuda(), b.cuda(), y.cuda())
    assert torch.isnan(lp).all().item() and torch.isnan(ent).all().item()  # nothing written


def test_linear_bad_target_raises_with_opt_in_check():
    msgs = value_errors_with_device_checks(
        "import torch, dpo_kernels as dk\n"
        "h = torch.randn(4, 8, device='cuda'); w = torch.randn(50, 8, device='cuda')\n"
        "y = torch.tensor([1, 2, 77, 3], device='cuda')\n"
        "hh, yy = torch.randn(2, 3, 8, device='cuda'), torch.full((2, 3), 60, device='cuda')\n"
        "r = torch.zeros(1, device='cuda', dtype=torch.float64)\n",
        ["dk.linear_logprobs(h, w, None, y)", "dk.dpo_loss_from_hidden(hh, w, yy, r, r)"])
    assert msgs[0] is not None and "targets[2] = 77" in msgs[0] and "outside" in msgs[0], msgs
    assert msgs[1] is not None and "labels" in msgs[1] and "outside" in msgs[1], msgs


def test_device_and_dtype_mismatches_name_the_argument():
    h, w, b, y = (t.cuda() for t in make_head(N=6, H=4, V=9))
    with pytest.raises(ValueError, match="weight is on cpu"):
        dk.linear_logprobs(h, w.cpu(), b, y)
    with pytest.raises(ValueError, match="targets is on cpu"):
        dk.linear_logprobs(h, w, b, y.cpu())
    with pytest.raises(ValueError, match="bias is on cpu"):
        torch.ops.dpo_kernels.linear_logprobs(h, w, b.cpu(), y, 1.0, None, 1.0, True, False, False, False, -100,
                                              1 << 20)
    with pytest.raises(TypeError, match="weight has dtype"):
        torch.ops.dpo_kernels.linear_logprobs(h, w.double(), b, y, 1.0, None, 1.0, True, False, False, False, -100,
                                              1 << 20)
    (hp, wp, bp), yp, _, (rc, rr) = make_pairs(9, dtype=torch.float32)
    hp, wp, bp, yp = hp.cuda(), wp.cuda(), bp.cuda(), yp.cuda()
    with pytest.raises(ValueError, match="reference_chosen_logps is on cpu"):
        dk.dpo_loss_from_hidden(hp, wp, yp, rc, rr.cuda(), bias=bp)
    with pytest.raises(ValueError, match="ref_hidden is on cpu"):
        dk.dpo_loss_from_hidden(hp, wp, yp, ref_hidden=hp.cpu(), bias=bp)
    with pytest.raises(ValueError, match="cu_seqlens is on cpu"):
        dk.dpo_loss_from_hidden(hp.reshape(-1, hp.shape[-1]), wp, yp.reshape(-1), rc.cuda(), rr.cuda(),
                                cu_seqlens=torch.tensor([0, 2, 4, 6, 8, 10, 12]))


# The sharded head on CUDA (process_group, vocab_range): test_cuda_distributed_head.py.


# ---- dpo_loss_from_hidden ----------------------------------------------------------------------


def pair_inputs(seed, dtype, packed):
    (h, w, b), y, (rh, rw, rb), (rc, rr) = make_pairs(seed, dtype=dtype)
    cu = None
    if packed:
        P2, T = y.shape
        lens = [T - (s % 2) for s in range(P2)]
        pack = lambda x: torch.cat([x[s, :n] for s, n in enumerate(lens)] + [x[0, :2]])  # noqa: E731
        h, rh, y = pack(h), pack(rh), pack(y)
        cu = torch.tensor([0] + lens).cumsum(0)
    return (h, w, b), y, (rh, rw, rb), (rc, rr), cu


def loss_step(inputs, device, case, ref_mode, workspace_bytes=None):
    (h, w, b), y, (rh, rw, rb), (rc, rr), cu = inputs
    kw = dict(CASES[case])
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    hh, ww, bb = leaves((h, w, b), device)
    if ref_mode == "hidden":
        ref = dict(ref_hidden=mv(rh), ref_weight=mv(rw), ref_bias=mv(rb))
        args = ()
    else:
        ref, args = {}, (mv(rc), mv(rr))
    loss, metrics, pairs = dk.dpo_loss_from_hidden(hh, ww, mv(y), *args, bias=bb, cu_seqlens=mv(cu),
                                                   return_pair_values=True, workspace_bytes=workspace_bytes,
                                                   **ref, **kw)
    (2.5 * loss).backward()
    return loss, metrics, pairs, (hh.grad, ww.grad, bb.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["sigmoid", "ipo", "combination", "aot_four_pass", "wpo", "ld_alpha", "transforms"])
@pytest.mark.parametrize("ref_mode", ["logps", "hidden"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_dpo_loss_from_hidden_matches_cpu(dtype, case, ref_mode, packed):
    inputs = pair_inputs(10, dtype, packed)
    cpu = loss_step(inputs, "cpu", case, ref_mode)
    gpu = loss_step(inputs, "cuda", case, ref_mode)
    # Sequence sums of bf16 rows: both in fp64 from fp32 logits; pair math in fp64.
    rtol = RTOL[dtype] if dtype != torch.bfloat16 else 2e-4
    close(gpu[0], cpu[0], rtol, "loss")
    for name in cpu[1]:
        close(gpu[1][name], cpu[1][name], rtol, name)
    for name in cpu[2]:
        close(gpu[2][name], cpu[2][name], rtol, name)
    for name, a, e in zip(("hidden", "weight", "bias"), gpu[3], cpu[3]):
        close(a, e, RTOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("workspace_bytes", [4096, 1 << 30], ids=["small", "large"])
def test_dpo_loss_from_hidden_budgets(workspace_bytes):
    """A budget too small for a pair's rows over the whole vocab (four passes) and a large one
    (three): the same numbers as the CPU."""
    inputs = pair_inputs(11, torch.float32, False)
    cpu = loss_step(inputs, "cpu", "sigmoid", "logps", workspace_bytes)
    gpu = loss_step(inputs, "cuda", "sigmoid", "logps", workspace_bytes)
    close(gpu[0], cpu[0], RTOL[torch.float32], "loss")
    for name, a, e in zip(("hidden", "weight", "bias"), gpu[3], cpu[3]):
        close(a, e, RTOL[torch.float32], f"grad of {name}")


def test_dpo_loss_from_hidden_bad_label_gives_nan_loss():
    (h, w, b), y, _, (rc, rr), _ = pair_inputs(12, torch.float32, False)
    y[1, 3] = 500
    loss, metrics = dk.dpo_loss_from_hidden(h.cuda(), w.cuda(), y.cuda(), rc.cuda(), rr.cuda(), bias=b.cuda())
    assert torch.isnan(loss).item()


# ---- graphs, compile, opcheck ------------------------------------------------------------------


def test_cuda_graph_capture_of_a_training_step():
    """One step (the fused DPO loss and a linear_logprobs term, backward into hidden, weight and
    bias) captured in a CUDA graph: replays give the eager step's values on new inputs."""
    (h, w, b), y, _, (rc, rr), _ = pair_inputs(13, torch.float32, False)
    (h2, _, _), _, _, _, _ = pair_inputs(14, torch.float32, False)
    hh, ww, bb = (t.cuda().requires_grad_() for t in (h, w, b))
    y, rc, rr = y.cuda(), rc.cuda(), rr.cuda()
    flat_y = y.reshape(-1)

    def step():
        loss, _ = dk.dpo_loss_from_hidden(hh, ww, y, rc, rr, bias=bb)
        lp, ent, *_ = dk.linear_logprobs(hh.reshape(-1, hh.shape[-1]), ww, bb, flat_y, outputs=("entropy",))
        total = loss + 1e-3 * lp.sum() - 1e-3 * ent.sum()
        total.backward()
        return total.detach()

    def eager(x):
        with torch.no_grad():
            hh.copy_(x)
        for t in (hh, ww, bb):
            t.grad = None
        total = step()
        return total.clone(), [t.grad.clone() for t in (hh, ww, bb)]

    want = eager(h2.cuda())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up off the capture
        for _ in range(2):
            eager(h.cuda())
    torch.cuda.current_stream().wait_stream(s)
    for t in (hh, ww, bb):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = step()
    with torch.no_grad():
        hh.copy_(h2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(total, want[0], rtol=0, atol=0)  # deterministic kernels
    for a, e in zip((hh.grad, ww.grad, bb.grad), want[1]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_compile_fullgraph_on_cuda_matches_eager():
    torch._dynamo.reset()
    (h, w, b), y, (rh, _, _), (rc, rr), _ = pair_inputs(15, torch.float32, False)
    y, rc, rr, rh = y.cuda(), rc.cuda(), rr.cuda(), rh.cuda()

    def f(hh, ww, bb):
        loss, metrics = dk.dpo_loss_from_hidden(hh, ww, y, rc, rr, bias=bb, loss_type="ipo")
        ref_loss, _ = dk.dpo_loss_from_hidden(hh, ww, y, bias=bb, ref_hidden=rh)
        lp, ent, lssp, mean, top1 = dk.linear_logprobs(hh.reshape(-1, hh.shape[-1]), ww, bb, y.reshape(-1))
        return loss + ref_loss + 1e-3 * (lp.sum() - ent.sum()), metrics["rewards/margins"], lssp + mean, top1

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (compiled, f):
        hh, ww, bb = leaves((h, w, b), "cuda")
        out = fn(hh, ww, bb)
        out[0].backward()
        results.append((out, (hh.grad, ww.grad, bb.grad)))
    (got, got_g), (want, want_g) = results
    for a, e in zip(got, want):
        if a.dtype == torch.bool:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_opcheck_on_cuda():
    hd, wd, bd, y = (t.cuda() for t in make_head(N=5, H=4, V=9, dtype=torch.float64))
    y = y % 9
    for flags in ((True, True, True, True), (False, False, False, False), (True, False, True, False)):
        args = (hd.clone().requires_grad_(), wd.clone().requires_grad_(), bd.clone().requires_grad_(), y, 1.0, None,
                1.0, *flags, -100, 1 << 20)
        torch.library.opcheck(torch.ops.dpo_kernels.linear_logprobs.default, args)
    saved = torch.ops.dpo_kernels.linear_logprobs(hd, wd, bd, y, 1.0, None, 1.0, True, False, False, False, -100,
                                                  1 << 20)[5]
    g = torch.randn(5, dtype=torch.float64, device="cuda")
    torch.library.opcheck(torch.ops.dpo_kernels.linear_logprobs_backward.default,
                          (g, g, hd, wd, bd, y, saved, 1.0, None, 1.0, -100, True, True, True, 1 << 20),
                          test_utils=("test_schema", "test_faketensor"))
    (h, w, b), y, (rh, _, _), (rc, rr) = make_pairs(16)
    h, w, b, y, rh, rc, rr = (t.cuda() for t in (h, w, b, y, rh, rc, rr))
    for refs in ((rc, rr, None), (None, None, rh)):
        args = (h.clone().requires_grad_(), w, b, y, None, *refs, None, None, 1.0, None, 1.0, -100,
                *CONFIG_DEFAULTS, True, True, False, False, 1 << 20)
        torch.library.opcheck(torch.ops.dpo_kernels.linear_dpo.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fused_linear_dpo_loss_on_cuda_matches_cpu():
    """The Liger drop-in (dk.FusedLinearDPOLoss) on CUDA tensors, with and without a reference
    head, summed and averaged log-probs, against the same module on the CPU."""
    (h, w, b), y, (rh, rw, rb), _ = make_pairs(17, dtype=torch.float32)
    for ref, average in ((False, False), (True, False), (True, True)):
        outs = []
        for dev in ("cpu", "cuda"):
            loss_fn = dk.FusedLinearDPOLoss(beta=0.2, compute_nll_loss=True, use_ref_model=ref,
                                            average_log_prob=average)
            hh, ww, bb = leaves((h, w, b), dev)
            kw = dict(ref_input=rh.to(dev), ref_weight=rw.to(dev), ref_bias=rb.to(dev)) if ref else {}
            loss, aux = loss_fn(ww, hh, y.to(dev), bb, **kw)
            loss.backward()
            outs.append((loss, aux, (hh.grad, ww.grad, bb.grad)))
        (lc, ac, gc), (lg, ag, gg) = outs
        close(lg, lc, RTOL[torch.float32], "loss")
        for i, (a, e) in enumerate(zip(ag, ac)):
            close(a, e, RTOL[torch.float32], f"aux[{i}]")
        for name, a, e in zip(("hidden", "weight", "bias"), gg, gc):
            close(a, e, RTOL[torch.float32], f"grad of {name}")
