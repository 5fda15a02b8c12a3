# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels of the dpo_kernels ops against the CPU kernels on random inputs: every
dtype, loss type, layout (padded with a gap between sequences, contiguous, packed) and the
in-place backward; device-side label errors; CUDA-graph capture. Skipped without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import dpo_kernels as dk
from dpo_kernels._ops import ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dk.cuda_built()), reason="needs a GPU and a CUDA build of dpo_kernels"
)

P, T, V = 3, 7, 37
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "cpo", "orpo")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: (rtol, atol) of CUDA vs CPU: same inputs, different exp / summation order; results in the
#: logits' dtype (gradients) round differently near half-ulps.
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 1e-5), torch.bfloat16: (2e-2, 2e-3),
       torch.float16: (4e-3, 5e-4)}


def config(loss_type="sigmoid", **kw):
    c = dict(loss_type=loss_type, loss_weights=[], beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, discopop_tau=0.05, use_weighting=False, ld_alpha=1.0,
             reference_free=False, cdpo_smoothing=False, simpo_gamma=0.5, cpo_alpha=1.0, cpo_base="sigmoid")
    if loss_type == "exo_pair":
        c["label_smoothing"] = 1e-3  # exo_pair needs 0 < label_smoothing < 1
    c.update(kw)
    return tuple(c.values())


def make(dtype, seed=0, P=P, T=T, V=V):
    g = torch.Generator().manual_seed(seed)
    full = (3 * torch.randn(2 * P, T + 1, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    for i in range(2 * P):
        labels[i, : 1 + i % 2] = -100
        labels[i, T - (i % 3):] = -100
    rc = -torch.rand(P, generator=g, dtype=torch.float64) * 10 - 5
    rr = -torch.rand(P, generator=g, dtype=torch.float64) * 10 - 5
    return full, labels, rc, rr


def layouts(full, labels, device="cpu"):
    """(name, logits, labels, cu_seqlens) of one batch in each layout, on `device`, from the
    same values on every device. Built there, not moved: .cuda() of the strided "gap" view
    would be a contiguous copy, and the CUDA kernels would never see a gap."""
    g = torch.Generator().manual_seed(99)
    full, labels = full.to(device), labels.to(device)
    gap = full[:, :-1]
    cont = gap.contiguous()
    N = 2 * P * T
    # Packed with rows before the first and after the last sequence (never read, zero gradient).
    before, after = (torch.randn(n, V, generator=g, dtype=torch.float64).to(full.dtype).to(device) for n in (2, 3))
    packed = torch.cat([before, cont.reshape(N, V), after])
    zeros = torch.zeros(2, dtype=labels.dtype, device=device)
    plab = torch.cat([zeros, labels.reshape(N), zeros, zeros[:1]])
    cu = torch.arange(2, N + 3, T, device=device)
    return [("gap", gap, labels, None), ("contiguous", cont, labels, None), ("packed", packed, plab, cu)]


def both_layouts(full, labels):
    """Pairs of (CPU, CUDA) layouts of the same batch; the CUDA gap view is strided too."""
    cpu, dev = layouts(full, labels), layouts(full, labels, "cuda")
    assert not dev[0][1].is_contiguous() and dev[0][1].stride() == cpu[0][1].stride()
    return zip(cpu, dev)


def cuda(x):
    return None if x is None else x.cuda()


def close(actual, expected, dtype, msg=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def forward_both(host, dev, rc, rr, ref_logits, cfg, metrics=True):
    """dpo_forward of one layout on the CPU and on CUDA: host and dev are (z, y, cu)."""
    args = (-100,) + cfg + (metrics, False)
    out_c = ops.dpo_forward(*host, rc, rr, ref_logits, *args)
    out_d = ops.dpo_forward(*dev, cuda(rc), cuda(rr), cuda(ref_logits), *args)
    return out_c, out_d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_forward_backward_match_cpu(dtype, loss_type):
    full, labels, rc, rr = make(dtype)
    cfg = config(loss_type)
    for (name, z, y, cu), (_, z_d, y_d, cu_d) in both_layouts(full, labels):
        cpu, dev = forward_both((z, y, cu), (z_d, y_d, cu_d), rc, rr, None, cfg)
        for k, what in enumerate(("loss", "metrics", "pair_values", "row_lse", "row_coef")):
            assert dev[k].dtype == cpu[k].dtype and dev[k].shape == cpu[k].shape, (name, what)
            assert dev[k].device.type == "cuda", f"{what} not on cuda"
            close(dev[k], cpu[k], torch.float64 if dtype == torch.float64 else torch.float32,
                  f"{loss_type} {name} {what}")
        go = torch.tensor(0.7, dtype=cpu[0].dtype)
        g_cpu = ops.dpo_backward(go, z, y, cu, cpu[3], cpu[4], -100)
        g_dev = ops.dpo_backward(go.cuda(), z_d, y_d, cu_d, dev[3], dev[4], -100)
        assert g_dev.shape == g_cpu.shape and g_dev.stride() == g_cpu.stride() and g_dev.dtype == g_cpu.dtype
        close(g_dev.double(), g_cpu.double(), dtype, f"{loss_type} {name} grad")
        if name != "gap":  # in place: the logits buffer becomes the gradient
            zc, zd = z.clone(), z_d.clone()
            ops.dpo_backward_(go, zc, y, cu, cpu[3], cpu[4], -100)
            ops.dpo_backward_(go.cuda(), zd, y_d, cu_d, dev[3], dev[4], -100)
            close(zd.double(), zc.double(), dtype, f"{loss_type} {name} in-place grad")
            torch.testing.assert_close(zd, g_dev.reshape(zd.shape), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [config("sigmoid", ld_alpha=0.5), config("ipo,sft", loss_weights=[0.5, 1.0]),
                                 config("sigmoid", use_weighting=True), config("apo_zero", reference_free=True)])
def test_dpo_forward_options_and_ref_logits_match_cpu(dtype, cfg):
    full, labels, rc, rr = make(dtype, seed=1)
    for (name, z, y, cu), dev_layout in both_layouts(full, labels):
        ref_logits = (z.double() + 0.3 * torch.randn(z.shape, dtype=torch.float64)).to(dtype)
        for refs in ((rc, rr, None), (None, None, ref_logits)):
            cpu, dev = forward_both((z, y, cu), dev_layout[1:], *refs, cfg)
            tol = torch.float64 if dtype == torch.float64 else torch.float32
            for k in range(5):
                close(dev[k], cpu[k], tol, f"{name} ref_logits={refs[2] is not None} output {k}")


@pytest.mark.parametrize("policy_dtype,ref_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                                    (torch.float16, torch.bfloat16)])
def test_ref_logits_of_another_dtype_match_cpu(policy_dtype, ref_dtype):
    # The CUDA reference pass reads ref_logits in their own dtype, as the CPU's does.
    full, labels, rc, rr = make(policy_dtype, seed=3)
    for (name, z, y, cu), dev_layout in both_layouts(full, labels):
        ref_logits = (z.double() + 0.3 * torch.randn(z.shape, dtype=torch.float64)).to(ref_dtype)
        cpu, dev = forward_both((z, y, cu), dev_layout[1:], None, None, ref_logits, config("sigmoid", ld_alpha=0.5))
        for k in range(5):
            close(dev[k], cpu[k], torch.float32, f"{name} output {k}")


def test_metrics_off_matches_cpu():
    full, labels, rc, rr = make(torch.float32, seed=2)
    z, y = full[:, :-1], labels
    cpu, dev = forward_both((z, y, None), (full.cuda()[:, :-1], y.cuda(), None), rc, rr, None, config(),
                            metrics=False)
    for k in range(5):
        close(dev[k], cpu[k], torch.float32, f"output {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_and_backward_match_cpu(dtype, label_dtype, average):
    full, labels, _, _ = make(dtype, seed=3)
    for (name, z, y, cu), (_, z_d, y_d, cu_d) in both_layouts(full, labels.to(label_dtype)):
        lp_c, lse_c = ops.sequence_logps(z, y, cu, -100, average)
        lp_d, lse_d = ops.sequence_logps(z_d, y_d, cu_d, -100, average)
        assert lp_d.dtype == lp_c.dtype and lse_d.shape == lse_c.shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        close(lp_d, lp_c, acc, f"{name} logps")
        close(lse_d, lse_c, acc, f"{name} row_lse")
        g = torch.randn(lp_c.shape, dtype=lp_c.dtype)
        gz_c = ops.sequence_logps_backward(g, z, y, cu, lse_c, -100, average)
        gz_d = ops.sequence_logps_backward(g.cuda(), z_d, y_d, cu_d, lse_d, -100, average)
        assert gz_d.shape == gz_c.shape and gz_d.stride() == gz_c.stride() and gz_d.dtype == gz_c.dtype
        close(gz_d.double(), gz_c.double(), dtype, f"{name} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_pair_loss_and_backward_match_cpu(dtype, loss_type):
    g = torch.Generator().manual_seed(4)
    n = 9
    pc, pr, rc, rr = (-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1).to(dtype) for _ in range(4))
    lc, lr = (torch.randint(1, 30, (n,), generator=g).to(dtype) for _ in range(2))
    w = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    cfg = config(loss_type)
    for weights in (None, w):
        args = (pc, pr, rc, rr, lc, lr, weights)
        out_c = ops.pair_loss(*args, *cfg)
        out_d = ops.pair_loss(*(cuda(a) for a in args), *cfg)
        for a, b in zip(out_d, out_c):
            close(a, b, dtype, f"{loss_type} pair_loss")
        u = torch.randn(n, dtype=out_c[0].dtype)
        gc = ops.pair_loss_backward(u, *args, *cfg)
        gd = ops.pair_loss_backward(u.cuda(), *(cuda(a) for a in args), *cfg)
        for a, b in zip(gd, gc):
            assert a.dtype == b.dtype
            close(a, b, dtype, f"{loss_type} pair_loss_backward")


def test_autograd_api_matches_cpu():
    full, labels, rc, rr = make(torch.float32, seed=5)
    z = full[:, :-1].contiguous()
    zc = z.clone().requires_grad_()
    zd = z.cuda().requires_grad_()
    lc, mc = dk.dpo_loss_from_logits(zc, labels, rc, rr)
    ld, md = dk.dpo_loss_from_logits(zd, labels.cuda(), rc.cuda(), rr.cuda())
    lc.backward()
    ld.backward()
    close(ld, lc, torch.float32, "loss")
    close(zd.grad, zc.grad, torch.float32, "grad")


def test_cuda_graph_capture():
    full, labels, rc, rr = make(torch.float32, seed=6)
    z, y, rc, rr = full[:, :-1].contiguous().cuda(), labels.cuda(), rc.cuda(), rr.cuda()
    args = (-100,) + config() + (True, False)
    go = torch.ones((), device="cuda")
    eager = ops.dpo_forward(z, y, None, rc, rr, None, *args)
    eager_g = ops.dpo_backward(go, z, y, None, eager[3], eager[4], -100)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up the allocator pools off the capture
        ops.dpo_forward(z, y, None, rc, rr, None, *args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.dpo_forward(z, y, None, rc, rr, None, *args)
        grad = ops.dpo_backward(go, z, y, None, out[3], out[4], -100)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out[0], eager[0], rtol=0, atol=0)  # deterministic kernels
    torch.testing.assert_close(grad, eager_g, rtol=0, atol=0)


def test_bad_label_is_reported_on_the_device_not_raised():
    full, labels, rc, rr = make(torch.float32, seed=7)
    labels[0, 3] = V + 5
    out = ops.dpo_forward(full[:, :-1].cuda(), labels.cuda(), None, rc.cuda(), rr.cuda(), None, -100, *config(),
                          True, False)
    assert torch.isnan(out[0]).item()  # nothing written: NaN loss, zero row state
    assert not out[4].any().item()


def value_errors_with_device_checks(setup, calls):
    """Runs `setup`, then each of `calls` (one statement each), in a fresh interpreter with
    DPO_KERNELS_CHECK_DEVICE_ERRORS=1 (read once per process): each call's ValueError message,
    or None where it raised none."""
    guarded = "try:\n    {}\n    print('no error')\nexcept ValueError as e:\n    print('ValueError', e)\n"
    script = setup + "".join(guarded.format(c) for c in calls)
    env = dict(os.environ, DPO_KERNELS_CHECK_DEVICE_ERRORS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ValueError", "no error"))]
    assert len(lines) == len(calls), out.stdout + out.stderr
    return [ln if ln.startswith("ValueError") else None for ln in lines]


def test_bad_label_raises_with_opt_in_check():
    (msg,) = value_errors_with_device_checks(
        "import torch, dpo_kernels\n"
        "from dpo_kernels._ops import ops\n"
        "z = torch.randn(2, 4, 5, device='cuda'); y = torch.full((2, 4), 9, device='cuda')\n"
        "r = torch.zeros(1, device='cuda', dtype=torch.float64)\n",
        ["ops.dpo_forward(z, y, None, r, r, None, -100, 'sigmoid', [], 0.1, 0.0, 'reverse_kl', 0.5, 0.05, False, 1.0,"
         " False, False, 0.5, 1.0, 'sigmoid', True, False)"])
    assert msg is not None and "labels" in msg and "outside" in msg, msg


def test_argument_errors_raise_value_error():
    z = torch.randn(3, 4, 5, device="cuda")
    y = torch.zeros(3, 4, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="even number"):
        ops.dpo_forward(z, y, None, None, None, None, -100, *config(reference_free=True), True, False)
    with pytest.raises(ValueError, match="loss_type"):
        ops.pair_loss(*(torch.randn(2, device="cuda") for _ in range(4)), None, None, None, *config("nope"))
    z2, y2 = z[:2], y[:2]
    with pytest.raises(ValueError, match="ref_logits is on cpu but logits is on cuda"):
        ops.dpo_forward(z2, y2, None, None, None, z2.cpu(), -100, *config(), True, False)
    with pytest.raises(ValueError, match="not both"):
        r = torch.zeros(1, device="cuda")
        ops.dpo_forward(z2, y2, None, r, r, z2, -100, *config(), True, False)


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph_on_cuda_matches_eager(inplace):
    """torch.compile(fullgraph=True) of the ops on CUDA tensors: the fake kernels' shapes and
    strides must match the CUDA kernels' (the gap layout's strided gradient included)."""
    torch._dynamo.reset()
    full, labels, rc, rr = make(torch.float32, seed=8)
    base = full.cuda()
    y, rc, rr = labels.cuda(), rc.cuda(), rr.cuda()

    def step(z):
        loss, metrics = dk.dpo_loss_from_logits(z, y, rc, rr, inplace_backward=inplace)
        lp = dk.sequence_logps(z.detach(), y)
        return loss, metrics["rewards/margins"], lp

    def leaf():
        # The gap layout (TRL's logits[:, :-1]) where it is allowed: not with inplace_backward.
        x = base.clone() if not inplace else base[:, :-1].contiguous()
        x.requires_grad_(True)
        return x, (x[:, :-1] if not inplace else x)

    x1, z1 = leaf()
    eager = step(z1)
    (g1,) = torch.autograd.grad(eager[0], x1)
    x2, z2 = leaf()
    compiled = torch.compile(step, fullgraph=True)(z2)
    (g2,) = torch.autograd.grad(compiled[0], x2)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g2, g1)
