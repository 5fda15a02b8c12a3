# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""dk.linear_logprobs (the fused LM head) against a float64 eager reference, against TRL's own
ChunkedLogProbFunction (its torch fallback on the CPU), finite differences (gradcheck) at tiny
shapes, torch.compile(fullgraph=True), opcheck, autocast, and bad inputs."""
import pytest
import torch

import dpo_kernels as dk

OUT = dk.OPTIONAL_OUTPUTS


def make(N=37, H=24, V=300, dtype=torch.float32, bias=True, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    # Make every third label the argmax, so is_top1 is true on some rows.
    z = h @ w.T + (b if bias else 0)
    y[::3] = z[::3].argmax(-1)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(h), cast(w), cast(b), y


def reference(h, w, b, y, temperature=1.0, softcap=None, logit_scale=1.0, ignore_index=-100):
    """Everything in float64 from the inputs, with autograd."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = y != ignore_index
    yy = y.clamp(0, z.shape[1] - 1)
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, yy[:, None])[:, 0]
    ent = -(p * logp_all).sum(-1)
    lssp = torch.logsumexp(2 * logp_all, -1)
    mean = z.mean(-1)
    top1 = z.argmax(-1) == yy
    zero = torch.zeros((), dtype=torch.float64)
    return (torch.where(valid, logp, zero), torch.where(valid, ent, zero), torch.where(valid, lssp, zero),
            torch.where(valid, mean, zero), top1 & valid)


TRANSFORMS = [dict(), dict(temperature=0.7), dict(softcap=2.5), dict(logit_scale=1.6),
              dict(temperature=1.3, softcap=4.0, logit_scale=0.8)]


def close(got, want, rtol, what):
    got = got.double()
    want = want.double()
    diff = (got - want).abs()
    err = diff.max().item()
    tol = rtol * max(want.abs().max().item(), 1.0)
    if not err <= tol:  # the entry and both values, to tell a bad row from a bad reference
        i = diff.flatten().argmax().item() if diff.numel() else 0
        assert err <= tol, (f"{what}: max error {err} > {tol} at entry {i}: got "
                            f"{got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}")


@pytest.mark.parametrize("dtype,rtol,grtol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 2e-6, 2e-5),
                                              (torch.bfloat16, 2e-5, 1e-2)])
@pytest.mark.parametrize("tr", TRANSFORMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_against_float64_reference(dtype, rtol, grtol, tr, bias):
    h, w, b, y = make(dtype=dtype, bias=bias)
    y[5] = -100
    y[11] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if bias else None
    got = dk.linear_logprobs(hh, ww, bb, y, **tr, workspace_bytes=60_000)  # several row and vocab chunks
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for t in got[:4]:
        assert t.dtype == out_dtype and t.shape == (h.shape[0],)
    assert got[4].dtype == torch.bool
    rh, rw = h.double().requires_grad_(), w.double().requires_grad_()
    rb = b.double().requires_grad_() if bias else None
    want = reference(rh, rw, rb, y, **tr)
    for name, a, e in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), got, want):
        close(a, e.detach(), rtol, name)
    assert torch.equal(got[4], want[4])
    ga = torch.linspace(-1, 1, h.shape[0], dtype=torch.float64)
    gb = torch.linspace(0.5, -0.7, h.shape[0], dtype=torch.float64)
    ((got[0].double() * ga).sum() + (got[1].double() * gb).sum()).backward()
    ((want[0] * ga).sum() + (want[1] * gb).sum()).backward()
    close(hh.grad, rh.grad, grtol, "d hidden")
    close(ww.grad, rw.grad, grtol, "d weight")
    assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
    assert hh.grad[5].abs().max() == 0 and hh.grad[11].abs().max() == 0
    if bias:
        close(bb.grad, rb.grad, grtol, "d bias")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_repeated_calls_are_bitwise_identical(dtype):
    """The head is deterministic (docs/linear.md): the same inputs give bitwise the same
    outputs and gradients, call after call, whichever pool thread runs which tile."""
    h, w, b, y = make(dtype=dtype, bias=True)
    y[5] = -100
    ga = torch.linspace(-1, 1, h.shape[0], dtype=torch.float64)
    gb = torch.linspace(0.5, -0.7, h.shape[0], dtype=torch.float64)

    def run():
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        got = dk.linear_logprobs(hh, ww, bb, y, softcap=4.0, workspace_bytes=60_000)
        ((got[0].double() * ga).sum() + (got[1].double() * gb).sum()).backward()
        return [t.detach() for t in got] + [hh.grad, ww.grad, bb.grad]

    first = run()
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "d hidden", "d weight", "d bias")
    for k in range(20):
        for name, a, e in zip(names, run(), first):
            assert torch.equal(a, e), f"call {k + 2}: {name} differs from the first call's by up to " \
                                      f"{(a.double() - e.double()).abs().max().item()}"


@pytest.mark.parametrize("tr", TRANSFORMS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "plain")
def test_gradcheck_float64(tr):
    h, w, b, y = make(N=5, H=3, V=7, dtype=torch.float64, scale=2.0)
    h.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    def f(h, w, b):
        lp, ent, *_ = dk.linear_logprobs(h, w, b, y, **tr, outputs=("entropy",))
        return lp, ent

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)


def _trl():
    trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    return trl_kernels.ChunkedLogProbFunction


@pytest.mark.parametrize("outputs", [OUT, ("entropy",), (), ("mean_logits", "is_top1"), ("log_sum_sq_probs",)])
@pytest.mark.parametrize("tr", [dict(), dict(temperature=0.7, softcap=3.0, logit_scale=1.2)], ids=["plain", "all"])
def test_against_trl_function(outputs, tr):
    """TRL's own ChunkedLogProbFunction (torch fallback on the CPU), fp32: outputs, which are
    None, and the gradients of the log-probs and the entropy."""
    trl_fn = _trl()
    h, w, b, y = make(N=29, H=16, V=260)
    temperature = tr.get("temperature", 1.0)
    softcap, scale = tr.get("softcap"), tr.get("logit_scale", 1.0)
    res = {}
    for who in ("trl", "ours"):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        if who == "trl":
            out = trl_fn.apply(hh, ww, bb, y, temperature, 64, softcap, scale, outputs)
        else:
            out = dk.linear_logprobs(hh, ww, bb, y, temperature, softcap, scale, outputs)
        loss = out[0].sum() * 0.3
        if out[1] is not None:
            loss = loss - out[1].mean()
        loss.backward()
        res[who] = (out, hh.grad, ww.grad, bb.grad)
    (to, *tg), (oo, *og) = res["trl"], res["ours"]
    for name, a, e in zip(("log_probs",) + OUT, oo, to):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert a.requires_grad == e.requires_grad, name
        if e.dtype == torch.bool:
            assert torch.equal(a, e), name
        else:
            close(a, e, 1e-5, name)
    for name, a, e in zip(("d hidden", "d weight", "d bias"), og, tg):
        close(a, e, 1e-5, name)


def test_only_entropy_or_only_logp_carries_gradient():
    h, w, b, y = make(N=9, H=8, V=40, dtype=torch.float64)
    for pick in (0, 1):
        hh = h.clone().requires_grad_()
        out = dk.linear_logprobs(hh, w, b, y, outputs=("entropy",))
        out[pick].sum().backward()
        rh = h.clone().requires_grad_()
        ref = reference(rh, w, b, y)
        ref[pick].sum().backward()
        close(hh.grad, rh.grad, 1e-12, f"output {pick}")
    # The non-differentiable outputs.
    out = dk.linear_logprobs(h.clone().requires_grad_(), w, b, y)
    assert out[0].requires_grad and out[1].requires_grad
    assert not any(t.requires_grad for t in out[2:])


def test_autocast_matches_trl():
    """Under CPU autocast (bf16) the head runs on bf16 inputs as TRL's does; outputs fp32,
    gradients in the inputs' dtype (fp32). TRL rounds each logits tile to bf16 (its product's
    dtype) where ours keeps the products in fp32: both are compared with the float64 reference
    of the bf16-rounded inputs, and ours must be the closer."""
    trl_fn = _trl()
    h, w, b, y = make(N=17, H=16, V=130)
    res = {}
    for who in ("trl", "ours"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if who == "trl":
                out = trl_fn.apply(hh, ww, None, y, 1.0, 64, None, 1.0, OUT)
            else:
                out = dk.linear_logprobs(hh, ww, None, y)
        (out[0].sum() + out[1].sum()).backward()
        res[who] = out, hh.grad, ww.grad
    rh = h.bfloat16().double().requires_grad_()
    rw = w.bfloat16().double().requires_grad_()
    want = reference(rh, rw, None, y)
    (want[0].sum() + want[1].sum()).backward()
    (oo, ogh, ogw), (to, tgh, tgw) = res["ours"], res["trl"]
    for a, e in zip(oo, to):
        assert a.dtype == e.dtype
    assert ogh.dtype == torch.float32 and ogw.dtype == torch.float32
    for k, name in ((0, "log_probs"), (1, "entropy"), (2, "log_sum_sq_probs"), (3, "mean_logits")):
        close(oo[k], want[k].detach(), 2e-5, name)
        assert (oo[k].double() - want[k]).abs().max() <= (to[k].double() - want[k]).abs().max(), name
    # The gradients are rounded to bf16 (the dtype the head ran in), then cast back.
    close(ogh, rh.grad, 1e-2, "d hidden")
    close(ogw, rw.grad, 1e-2, "d weight")
    close(ogh, tgh, 3e-2, "d hidden vs TRL")


def test_ignore_index_rows_and_empty():
    h, w, b, y = make(N=6, H=4, V=9)
    y[2] = -100
    hn = h.clone()
    hn[2] = float("nan")  # an ignored row is never read
    out = dk.linear_logprobs(hn.requires_grad_(), w, b, y)
    for t in out[:4]:
        assert t[2] == 0 and torch.isfinite(t).all()
    assert not out[4][2]
    (out[0].sum() + out[1].sum()).backward()
    assert torch.isfinite(hn.grad).all() and hn.grad[2].abs().max() == 0
    e = dk.linear_logprobs(h[:0], w, b, y[:0])
    assert e[0].shape == (0,)


def test_torch_compile_fullgraph_and_opcheck():
    h, w, b, y = make(N=11, H=8, V=50)

    def f(h, w, b, y):
        lp, ent, lssp, mean, top1 = dk.linear_logprobs(h, w, b, y, 0.9, 3.0, 1.1)
        return (lp * 2).sum() - ent.sum() + lssp.sum() * 0 + mean.sum() * 0, top1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    loss, top1 = compiled(hh, ww, bb, y)
    loss.backward()
    rh, rw, rb = (t.clone().requires_grad_() for t in (h, w, b))
    rloss, rtop1 = f(rh, rw, rb, y)
    rloss.backward()
    assert torch.equal(top1, rtop1)
    close(loss.detach(), rloss.detach(), 1e-6, "loss")
    for a, e in ((hh.grad, rh.grad), (ww.grad, rw.grad), (bb.grad, rb.grad)):
        close(a, e, 1e-6, "grad")
    hd, wd, bd, _ = make(N=5, H=4, V=9, dtype=torch.float64)
    for flags in ((True, True, True, True), (False, False, False, False), (True, False, True, False)):
        args = (hd.clone().requires_grad_(), wd.clone().requires_grad_(), bd.clone().requires_grad_(), y[:5] % 9,
                1.0, None, 1.0, *flags, -100, 1 << 20)
        torch.library.opcheck(torch.ops.dpo_kernels.linear_logprobs.default, args)


def test_bad_inputs_name_the_argument():
    h, w, b, y = make(N=6, H=4, V=9)
    cases = [
        (ValueError, "hidden", dict(hidden=h[0])),
        (ValueError, "weight", dict(weight=w[:, :3])),
        (ValueError, "bias", dict(bias=b[:4])),
        (ValueError, "targets", dict(targets=y[:3])),
        (TypeError, "targets", dict(targets=y.float())),
        (TypeError, "hidden", dict(hidden=h.int())),
        (TypeError, "weight", dict(weight=[1.0])),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "temperature", dict(temperature=float("nan"))),
        (ValueError, "softcap", dict(softcap=0.0)),
        (ValueError, "logit_scale", dict(logit_scale=float("inf"))),
        (ValueError, "outputs", dict(outputs=("entropy", "logits"))),
        (ValueError, "targets[", dict(targets=torch.full_like(y, 9))),
        (ValueError, "workspace_bytes", dict(workspace_bytes=0)),
        (ValueError, "workspace_bytes", dict(workspace_bytes=64)),
        (ValueError, "weight is on meta", dict(weight=w.to("meta"))),
    ]
    base = dict(hidden=h, weight=w, bias=b, targets=y)
    for exc, needle, change in cases:
        kw = {**base, **change}
        with pytest.raises(exc, match=needle.replace("[", r"\[")):
            dk.linear_logprobs(**kw)


@pytest.mark.skipif(not torch.cuda.is_available() or dk.cuda_built(),
                    reason="needs a GPU with a CPU-only build (CUDA builds run the head: test_cuda_linear.py)")
def test_cuda_tensors_raise_not_implemented_without_a_cuda_build():
    h, w, b, y = (t.cuda() for t in make(N=4, H=4, V=8))
    with pytest.raises(NotImplementedError, match="without CUDA"):
        dk.linear_logprobs(h, w, b, y)


def test_strided_inputs_and_int32_targets():
    h, w, b, y = make(N=13, H=10, V=70, dtype=torch.float64)
    want = dk.linear_logprobs(h, w, b, y)
    wide = torch.zeros(13, 16, dtype=torch.float64)
    wide[:, 3:13] = h
    wt = w.T.contiguous().T  # column-major: copied to rows by the op
    got = dk.linear_logprobs(wide[:, 3:13], wt, b, y.int())
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    hh = wide[:, 3:13].clone().requires_grad_()
    dk.linear_logprobs(hh, w, b, y)[0].sum().backward()
    rh = h.clone().requires_grad_()
    reference(rh, w, b, y)[0].sum().backward()
    close(hh.grad, rh.grad, 1e-12, "d hidden (strided)")


def test_meta_tensors_infer_shapes():
    # "meta" is a device with a kernel of the head (shape inference, as the fake kernels): the
    # autocast query must not be asked of it (torch has no autocast for meta and raised).
    h = torch.randn(6, 8, device="meta", requires_grad=True)
    w = torch.randn(11, 8, device="meta")
    t = torch.zeros(6, dtype=torch.long, device="meta")
    lp, ent, lss, mean, top1 = dk.linear_logprobs(h, w, None, t)
    assert lp.device.type == "meta" and tuple(lp.shape) == (6,) and lp.dtype == torch.float32
    assert tuple(ent.shape) == (6,) and tuple(top1.shape) == (6,)
    loss, _ = dk.dpo_loss_from_hidden(h.view(2, 3, 8), w, t.view(2, 3), torch.zeros(1, device="meta"),
                                      torch.zeros(1, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()
