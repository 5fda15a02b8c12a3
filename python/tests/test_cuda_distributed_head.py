# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels of the fused head's vocabulary-shard ops (csrc/cuda_linear_shard.cu)
against their CPU kernels on the same inputs: linear_shard_partials / linear_shard_values /
linear_shard_backward (per token) and linear_dpo_shard_partials / linear_dpo_shard_sequences /
linear_dpo_shard_backward (DPO from hidden states), each on 2 and 3 shards (V = 1001 unevenly
over 3), every dtype, bias or none, padded and packed, LD-DPO, metrics, and a bad label (NaN
outputs, zero gradients, nothing written); then dk.linear_logprobs and dk.dpo_loss_from_hidden
with a world-size-1 process_group on CUDA against the unsharded CUDA ops. The CPU kernels are
themselves checked against the single-process ops (test_distributed.py). Skipped without a GPU
and a CUDA build of dpo_kernels."""
import os

import pytest
import torch
import torch.distributed as dist

import dpo_kernels as dk
from test_dpo_from_hidden import CASES
from test_dpo_from_hidden import make as make_pairs
from test_linear import make as make_head

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dk.cuda_built()), reason="needs a GPU and a CUDA build of dpo_kernels"
)

ops = torch.ops.dpo_kernels
#: Relative tolerance (to the largest magnitude, at least 1) of CUDA against CPU: the same
#: inputs, fp32 logits (fp64 for fp64) on both, different GEMMs and summation orders; bf16
#: gradients differ by a few bf16 ulps (the CUDA head rounds dZ to bf16 for its GEMMs).
RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
VALUE_RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SPLITS = {"2": (0, 150, 300), "3": (0, 40, 170, 300)}
TR = (1.0, None, 1.0)  # temperature, softcap, logit_scale
WS = 1 << 22
STATE = ("row_max", "records")
GRADS = ("dhidden", "dweight", "dbias")


def close(got, want, rtol, what):
    """got (CUDA) against want (CPU): the same shape and dtype, non-finite entries equal
    (the records' -inf maxima), the finite ones within rtol of the largest magnitude."""
    assert got.device.type == "cuda", f"{what}: on {got.device}"
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    got, want = got.detach().cpu().double(), want.detach().double()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: finite entries differ"
    assert torch.equal(got[~fin], want[~fin]), f"{what}: non-finite entries differ"
    g, w = got[fin], want[fin]
    err = (g - w).abs().max().item() if g.numel() else 0.0
    tol = rtol * max(w.abs().max().item() if w.numel() else 0.0, 1.0)
    assert err <= tol, f"{what}: max error {err} > {tol}"


def both(op, args, n_tensors, names, rtol, what):
    """op on the CPU and on CUDA (its first n_tensors arguments moved there), each output
    named in `names` compared; returns the CPU's outputs."""
    want = op(*args)
    got = op(*cuda(*args[:n_tensors]), *args[n_tensors:])
    for name, a, x in zip(names, got, want):
        close(a, x, rtol, f"{what} {name}")
    return want


def combined(parts):
    """The two vocabulary all-reduces on the host: phase 1's (row_max, records) of every shard
    combined as MAX, shard_rebase, SUM would (CPU ops)."""
    row_max = torch.stack([m for m, _ in parts]).amax(0)
    records = sum(ops.shard_rebase(row_max, r) for _, r in parts)
    return row_max, records


def cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


# ---- per token -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s}shards")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_token_shard_ops_match_cpu(dtype, split, bias):
    h, w, b, y = make_head(N=41, H=24, V=300, dtype=dtype, bias=bias, seed=5)
    y[3::7] = -100
    cuts = SPLITS[split]
    shards = [(s, e) for s, e in zip(cuts, cuts[1:])]
    cpu_parts, rtol = [], RTOL[dtype]
    for s, e in shards:
        args = (h, w[s:e], None if b is None else b[s:e], y, *TR, -100, s, 300, True, WS)
        cpu_parts.append(both(ops.linear_shard_partials, args, 4, STATE, VALUE_RTOL[dtype], f"partials [{s}, {e})"))
    m, r = combined(cpu_parts)
    want = ops.linear_shard_values(m, r, y, -100, 300, True, True, True, True)
    got = ops.linear_shard_values(*cuda(m, r, y), -100, 300, True, True, True, True)
    for name, a, x in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), got, want):
        close(a, x, 1e-12, f"linear_shard_values {name}")
    assert torch.equal(got[4].cpu(), want[4])
    g = torch.Generator().manual_seed(6)
    gl, ge = torch.randn(2, 41, generator=g, dtype=torch.float64)
    for s, e in shards:
        args = (gl, ge, h, w[s:e], None if b is None else b[s:e], y, m, r, want[1], *TR, -100, s, 300, True, True,
                bias, WS)
        both(ops.linear_shard_backward, args, 9, GRADS, rtol, f"backward [{s}, {e})")


def test_token_shard_uneven_1001():
    h, w, b, y = make_head(N=19, H=16, V=1001, dtype=torch.float32, seed=7)
    parts = []
    for s, e in ((0, 200), (200, 650), (650, 1001)):
        args = (h, w[s:e], b[s:e], y, *TR, -100, s, 1001, False, WS)
        want = ops.linear_shard_partials(*args)
        got = ops.linear_shard_partials(*cuda(*args[:4]), *args[4:])
        close(got[1], want[1], VALUE_RTOL[torch.float32], f"records [{s}, {e})")
        parts.append(got)
    # The CUDA partials combined on the device give the unsharded CUDA log-probs.
    row_max = torch.stack([m for m, _ in parts]).amax(0)
    records = sum(ops.shard_rebase(row_max.cpu(), r.cpu()) for _, r in parts)
    lp = ops.linear_shard_values(row_max, records.cuda(), y.cuda(), -100, 1001, False, False, False, False)[0]
    whole = dk.linear_logprobs(*cuda(h, w, b, y), outputs=())[0]
    close(lp.float(), whole, 1e-5, "log_probs against the unsharded CUDA head")


def test_token_shard_bad_label_writes_nothing():
    h, w, b, y = make_head(N=8, H=8, V=50, seed=8)
    y[3] = 77
    m, r = ops.linear_shard_partials(*cuda(h, w[:20], b[:20], y), *TR, -100, 0, 50, True, WS)
    assert torch.isnan(m).all().item() and torch.isnan(r).all().item()
    gh, gw, gb = ops.linear_shard_backward(torch.ones(8, dtype=torch.float64).cuda(), None,
                                           *cuda(h, w[:20], b[:20], y, torch.zeros(8, dtype=torch.float64),
                                                 torch.zeros(8, len(dk.distributed.SHARD_FIELDS),
                                                             dtype=torch.float64)),
                                           None, *TR, -100, 0, 50, True, True, True, WS)
    assert not gh.any().item() and not gw.any().item() and not gb.any().item()


def test_token_shard_arguments_name_the_argument():
    h, w, b, y = cuda(*make_head(N=6, H=4, V=9))
    with pytest.raises(ValueError, match="vocab_shard"):
        ops.linear_shard_partials(h, w, b, y, *TR, -100, 5, 9, True, WS)  # [5, 14) past the vocabulary
    m = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="row_max is on cpu"):
        ops.linear_shard_values(m, torch.zeros(6, len(dk.distributed.SHARD_FIELDS), dtype=torch.float64).cuda(), y,
                                -100, 9, False, False, False, False)


# ---- DPO from hidden states ------------------------------------------------------------------


def packed_inputs(h, y):
    """The pairs' rows packed back to back (lengths T - s % 2) with 2 gap rows at the end."""
    P2, T = y.shape
    lens = [T - (s % 2) for s in range(P2)]
    pack = lambda x: torch.cat([x[s, :n] for s, n in enumerate(lens)] + [x[0, :2]])  # noqa: E731
    return pack(h), pack(y), torch.tensor([0] + lens).cumsum(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", ["2", "3", "1001"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("ld_alpha,metrics", [(1.0, True), (0.5, False)], ids=["metrics", "ld_alpha"])
def test_pair_shard_ops_match_cpu(dtype, split, layout, ld_alpha, metrics):
    V = 1001 if split == "1001" else 300
    cuts = (0, 200, 650, 1001) if split == "1001" else SPLITS[split]
    (h, w, b), y, _, _ = make_pairs(11, V=V, dtype=dtype)
    cu = None
    if layout == "packed":
        h, y, cu = packed_inputs(h, y)
    shards = list(zip(cuts, cuts[1:]))
    rtol = RTOL[dtype]
    parts = []
    for k, (s, e) in enumerate(shards):
        bb = b[s:e] if k != 1 else None  # a shard without bias too
        args = (h, w[s:e], bb, y, cu, *TR, -100, s, V, metrics, WS)
        parts.append(both(ops.linear_dpo_shard_partials, args, 5, STATE, VALUE_RTOL[dtype], f"partials [{s}, {e})"))
    m, r = combined(parts)
    seq_args = (-100, cuts[0], cuts[1], V, ld_alpha, metrics)
    want = ops.linear_dpo_shard_sequences(h, y, cu, m, r, *seq_args)
    got = ops.linear_dpo_shard_sequences(*cuda(h, y, cu, m, r), *seq_args)
    close(got, want, 1e-12, "linear_dpo_shard_sequences")
    P2 = want.shape[1]
    g = torch.Generator().manual_seed(12)
    seq_grad, nll = torch.randn(P2, generator=g, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    for k, (s, e) in enumerate(shards):
        bb = b[s:e] if k != 1 else None
        args = (seq_grad, nll, h, w[s:e], bb, y, cu, m, r, *TR, -100, s, V, ld_alpha, True, True, bb is not None, WS)
        both(ops.linear_dpo_shard_backward, args, 9, GRADS, rtol, f"backward [{s}, {e})")


def test_pair_shard_bad_label_writes_nothing():
    (h, w, b), y, _, _ = make_pairs(13, dtype=torch.float32)
    V = w.shape[0]
    y[1, 3] = V + 5
    m, r = ops.linear_dpo_shard_partials(*cuda(h, w[:20], b[:20], y), None, *TR, -100, 0, V, True, WS)
    assert torch.isnan(m).all().item() and torch.isnan(r).all().item()
    rows = y.numel()
    zm, zr = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, len(dk.distributed.SHARD_FIELDS),
                                                                 dtype=torch.float64)
    seq = ops.linear_dpo_shard_sequences(*cuda(h, y), None, *cuda(zm, zr), -100, 0, 20, V, 1.0, True)
    assert torch.isnan(seq).all().item()
    gh, gw, gb = ops.linear_dpo_shard_backward(*cuda(torch.ones(y.shape[0], dtype=torch.float64),
                                                     torch.tensor(0.5, dtype=torch.float64), h, w[:20], b[:20], y),
                                               None, *cuda(zm, zr), *TR, -100, 0, V, 1.0, True, True, True, WS)
    assert not gh.any().item() and not gw.any().item() and not gb.any().item()


# ---- the public ops with a world-size-1 process_group on CUDA --------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A one-rank gloo group (CUDA tensors all-reduce through it), when the logits path's
    shard_rebase and shard_pair_stage have CUDA kernels too (csrc/cuda_shard.cu)."""
    probe = torch.zeros(1, dtype=torch.float64, device="cuda")
    try:
        ops.shard_rebase(probe, torch.zeros(1, len(dk.distributed.SHARD_FIELDS), dtype=torch.float64, device="cuda"))
    except NotImplementedError as e:
        pytest.skip(f"shard_rebase has no CUDA kernel in this build ({e}); the sharded ops need it")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a default process group exists already in this process")
    init = os.path.join(tmp_path_factory.mktemp("pg"), "init")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def grads_of(fn, leaves):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    return outs, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("vocab_range", [None, (0, 300)], ids=["megatron", "vocab_range"])
def test_linear_logprobs_world_one_matches_unsharded(group, dtype, vocab_range):
    h, w, b, y = cuda(*make_head(N=29, H=24, V=300, dtype=dtype, seed=14))
    y[2::5] = -100
    g = torch.Generator().manual_seed(15)
    gl, ge = (t.cuda() for t in torch.randn(2, 29, generator=g, dtype=torch.float64))

    def run(hh, ww, bb, **kw):
        outs = dk.linear_logprobs(hh, ww, bb, y, **kw)
        ((outs[0].double() * gl).sum() + (outs[1].double() * ge).sum()).backward()
        return outs

    want, gwant = grads_of(lambda *t: run(*t), (h, w, b))
    got, ggot = grads_of(lambda *t: run(*t, process_group=group, vocab_range=vocab_range), (h, w, b))
    for name, a, x in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), got, want):
        close(a, x, 1e-5, name)
    for name, a, x in zip(("hidden", "weight", "bias"), ggot, gwant):
        close(a, x, RTOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("case", ["sigmoid", "wpo", "ld_alpha", "transforms"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dpo_loss_from_hidden_world_one_matches_unsharded(group, case, layout):
    (h, w, b), y, _, (rc, rr) = make_pairs(16, dtype=torch.float32)
    cu = None
    if layout == "packed":
        h, y, cu = packed_inputs(h, y)
    h, w, b, y, cu, rc, rr = cuda(h, w, b, y, cu, rc, rr)
    kw = dict(CASES[case])

    def run(hh, ww, bb, **extra):
        loss, metrics, pairs = dk.dpo_loss_from_hidden(hh, ww, y, rc, rr, bias=bb, cu_seqlens=cu,
                                                       return_pair_values=True, **kw, **extra)
        (2.5 * loss).backward()
        return loss, metrics, pairs

    want, gwant = grads_of(lambda *t: run(*t), (h, w, b))
    got, ggot = grads_of(lambda *t: run(*t, process_group=group), (h, w, b))
    close(got[0], want[0], 1e-5, "loss")
    for k, v in want[1].items():
        close(got[1][k], v, 1e-5, f"metric {k}")
    for name, a, x in zip(("hidden", "weight", "bias"), ggot, gwant):
        close(a, x, RTOL[torch.float32], f"grad of {name}")
