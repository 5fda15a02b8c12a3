# Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
"""The rank side of test_distributed.py for the fused LM head on a weight shard: one gloo
process group of four CPU ranks runs every scenario (linear_logprobs and
dpo_loss_from_hidden on even and uneven vocabulary shards of the weight, context slices
padded and packed, both together, bad input), each against the single-process op on the full
head and batch, which every rank also computes. dHidden is compared after the op's own
all-reduce; dWeight / dBias rows of the shard after the test's sum over the context group
(the data-parallel gradient sum a trainer does)."""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import dpo_kernels
from dist_worker import CONFIGS, P, T, batch, close, expect_error, groups, leave, packed, same

H = 16


def head(V: int, seed: int, dtype=torch.float32):
    """hidden [2P, T, H], weight [V, H], bias [V], and batch()'s labels and reference log-probs."""
    _, labels, ref_c, ref_r = batch(V, seed)
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(2 * P, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.2).to(dtype)
    return hidden, weight, bias, labels, ref_c, ref_r


def ref_head(hidden, weight, bias, seed: int):
    """A reference model near the policy: its hidden states, weight and bias perturbed."""
    g = torch.Generator().manual_seed(seed)
    return tuple((t + 0.1 * torch.randn(t.shape, generator=g).to(t.dtype)) for t in (hidden, weight, bias))


def logit_size(hidden, weight, bias):
    """The mean |logit|: a mean logit is a sum of terms that cancel, so its rounding error
    scales with them, not with the mean (dist_worker.close's `floor`)."""
    return float((hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().T + bias.double()).abs().mean())


def leaf(t):
    return t.detach().clone().requires_grad_()


def hidden_close(name, got, want, exact, rel=1e-6):
    """dHidden against the single-process op's (`want`) within `rel` of its largest magnitude;
    or, where the two differ by more, no further from the float64 op's (`exact`) than twice
    the single-process op is. Each element of dHidden is a sum over the vocabulary of terms
    that cancel (coef * (p - onehot) * W), computed in float32 in an order that depends on
    the shards: the two float32 results can differ by more than 1e-6 while both are as
    accurate as float32 allows."""
    got, want, exact = got.double(), want.double(), exact.double()
    if want.numel() == 0:  # a rank holding no row: an empty gradient of hidden's shape
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        return
    scale = float(exact.abs().max().clamp_min(1e-300))
    diff = float((got - want).abs().max()) / scale
    err, own = float((got - exact).abs().max()) / scale, float((want - exact).abs().max()) / scale
    assert diff <= rel or err <= 2 * own, (f"{name}: max relative difference {diff:.3e} > {rel:.1e} from the "
                                           f"single-process op, and error {err:.3e} > 2 x its {own:.3e} against float64")


def grads_close(name, got, want, cp=None):
    """A shard's weight / bias gradient (summed over `cp`, the context group) against the
    unsharded one's rows."""
    got = got.clone()
    if cp is not None:
        dist.all_reduce(got, group=cp)
    close(name, got, want, floor=float(want.abs().max()))


def check_dpo(tag, cfg, full, local, cols, rows, tp=None, cp=None, vocab_range=None, transforms=None, ref=None):
    """The sharded dpo_loss_from_hidden on `local` (this rank's (hidden, labels, cu_seqlens))
    and weight rows `cols` against the unsharded op on `full`. ref: (ref_hidden, ref_weight,
    ref_bias, this rank's rows of ref_hidden): the reference from hidden states instead of
    full's log-probs, its head sharded as the policy's."""
    hidden, weight, bias, labels, ref_c, ref_r, cu = full
    transforms = transforms or {}
    kw = kw64 = kw_local = {}
    if ref is not None:
        rh, rw, rb, rh_local = ref
        ref_c = ref_r = None
        kw = dict(ref_hidden=rh, ref_weight=rw, ref_bias=rb)
        kw64 = dict(ref_hidden=rh.double(), ref_weight=rw.double(), ref_bias=rb.double())
        kw_local = dict(ref_hidden=rh_local, ref_weight=rw[cols], ref_bias=rb[cols])
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    want_loss, want_m, want_pv = dpo_kernels.dpo_loss_from_hidden(
        h, w, labels, ref_c, ref_r, bias=b, cu_seqlens=cu, return_pair_values=True, **kw, **transforms, **cfg)
    want_loss.backward()
    h64 = leaf(hidden.double())
    dpo_kernels.dpo_loss_from_hidden(h64, weight.double(), labels, ref_c, ref_r, bias=bias.double(), cu_seqlens=cu,
                                     **kw64, **transforms, **cfg)[0].backward()
    z, y, lcu = local
    lh, lw, lb = leaf(z), leaf(weight[cols]), leaf(bias[cols])
    loss, metrics, pv = dpo_kernels.dpo_loss_from_hidden(
        lh, lw, y, ref_c, ref_r, bias=lb, cu_seqlens=lcu, return_pair_values=True, process_group=tp, cp_group=cp,
        vocab_range=vocab_range, **kw_local, **transforms, **cfg)
    loss.backward()
    name = f"{tag} {cfg}"
    close(f"{name} loss", loss.detach(), want_loss.detach())
    # A reward is beta * (logp - reference logp), a difference of sequence sums that nearly
    # cancel (more so with a reference model near the policy): its float32 error scales with
    # beta * |logp|, not with the reward (as a mean logit's with the logits).
    lp = max(float(want_pv[k].abs().max()) for k in ("chosen_logps", "rejected_logps"))
    reward_floor = cfg.get("beta", 0.1) * lp
    for k in want_m:
        floor = (logit_size(hidden, weight, bias) if k.startswith("logits/")
                 else reward_floor if k in ("rewards/chosen", "rewards/rejected", "rewards/margins") else 1e-12)
        close(f"{name} {k}", metrics[k], want_m[k], floor=floor)
    for k in want_pv:
        close(f"{name} {k}", pv[k], want_pv[k], floor=reward_floor if k.endswith("_rewards") else 1e-12)
    hidden_close(f"{name} dhidden", lh.grad, rows(h.grad), rows(h64.grad))
    grads_close(f"{name} dweight", lw.grad, w.grad[cols], cp)
    grads_close(f"{name} dbias", lb.grad, b.grad[cols], cp)


def check_logprobs(tag, full, cols, tp, vocab_range=None):
    """linear_logprobs with every optional output and the backward of log-probs and entropy."""
    hidden, weight, bias, labels = full
    hs, ys = hidden.reshape(-1, H), labels.reshape(-1)
    wl = torch.linspace(-1, 2, ys.numel())
    we = torch.linspace(0.5, -0.5, ys.numel())
    kw = dict(temperature=0.8, softcap=5.0)
    h, w, b = leaf(hs), leaf(weight), leaf(bias)
    want = dpo_kernels.linear_logprobs(h, w, b, ys, **kw)
    ((want[0] * wl).sum() + (want[1] * we).sum()).backward()
    h64 = leaf(hs.double())
    exact = dpo_kernels.linear_logprobs(h64, weight.double(), bias.double(), ys, **kw)
    ((exact[0] * wl.double()).sum() + (exact[1] * we.double()).sum()).backward()
    lh, lw, lb = leaf(hs), leaf(weight[cols]), leaf(bias[cols])
    got = dpo_kernels.linear_logprobs(lh, lw, lb, ys, process_group=tp, vocab_range=vocab_range, **kw)
    ((got[0] * wl).sum() + (got[1] * we).sum()).backward()
    for name, g, e in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), got, want):
        assert g.dtype == e.dtype, f"{tag} {name}: dtype {g.dtype} != {e.dtype}"
        g, e = g.detach(), e.detach()
        floor = logit_size(hidden, weight, bias) if name == "mean_logits" else float(e.abs().max()) * 1e-3
        close(f"{tag} {name}", g, e, floor=floor)
    assert torch.equal(got[4], want[4]), f"{tag} is_top1 differs"
    hidden_close(f"{tag} logprobs dhidden", lh.grad, h.grad, h64.grad)
    grads_close(f"{tag} logprobs dweight", lw.grad, w.grad[cols])
    grads_close(f"{tag} logprobs dbias", lb.grad, b.grad[cols])


def run(rank: int, world: int, init_file: str) -> None:
    g2, r2, gx, rx, three = groups(rank, world, init_file)
    soft = dict(softcap=4.0, temperature=0.9)

    # Weight shards, Megatron's even split over 2 ranks (V = 1000), padded and packed.
    V = 1000
    hidden, weight, bias, labels, ref_c, ref_r = head(V, 1)
    cols = slice(r2 * V // 2, (r2 + 1) * V // 2)
    check_logprobs("tp2", (hidden, weight, bias, labels), cols, g2)
    for k, cfg in enumerate(CONFIGS):
        check_dpo("tp2", cfg, (hidden, weight, bias, labels, ref_c, ref_r, None), (hidden, labels, None), cols, same,
                  tp=g2, transforms=soft if k % 2 else None)
    ph, py, pcu = packed(hidden, labels)
    for cfg in CONFIGS[:4]:
        check_dpo("tp2 packed", cfg, (ph, weight, bias, py, ref_c, ref_r, pcu), (ph, py, pcu), cols, same, tp=g2)
    # The reference from its hidden states and its own head, sharded as the policy's.
    rh, rw, rb = ref_head(hidden, weight, bias, 11)
    for cfg in CONFIGS:
        check_dpo("tp2 ref_hidden", cfg, (hidden, weight, bias, labels, ref_c, ref_r, None), (hidden, labels, None),
                  cols, same, tp=g2, transforms=soft, ref=(rh, rw, rb, rh))
    prh, _, _ = packed(rh, labels)
    check_dpo("tp2 packed ref_hidden", CONFIGS[1], (ph, weight, bias, py, ref_c, ref_r, pcu), (ph, py, pcu), cols,
              same, tp=g2, ref=(prh, rw, rb, prh))
    expect_error("ref_weight width", lambda: dpo_kernels.dpo_loss_from_hidden(
        hidden, weight[cols], labels, ref_hidden=rh, ref_weight=rw, process_group=g2), "sharded as the policy's")

    # Uneven shards over 3 ranks via vocab_range (V = 1001); rank 3 sits this one out.
    if rank < 3:
        V = 1001
        hidden, weight, bias, labels, ref_c, ref_r = head(V, 2)
        bounds = [0, 200, 650, V]
        cols = slice(bounds[rank], bounds[rank + 1])
        vr = (bounds[rank], bounds[rank + 1])
        check_logprobs("tp3 uneven", (hidden, weight, bias, labels), cols, three, vocab_range=vr)
        for cfg in CONFIGS:
            check_dpo("tp3 uneven", cfg, (hidden, weight, bias, labels, ref_c, ref_r, None), (hidden, labels, None),
                      cols, same, tp=three, vocab_range=vr)
        rh, rw, rb = ref_head(hidden, weight, bias, 12)
        check_dpo("tp3 uneven ref_hidden", CONFIGS[0], (hidden, weight, bias, labels, ref_c, ref_r, None),
                  (hidden, labels, None), cols, same, tp=three, vocab_range=vr, ref=(rh, rw, rb, rh))
        hd, wd, bd, yd, cd, rd = head(V, 3, torch.float64)
        check_dpo("tp3 fp64", CONFIGS[0], (hd, wd, bd, yd, cd, rd, None), (hd, yd, None), cols, same, tp=three,
                  vocab_range=vr)
        # Bad input raises on every rank, no hang: a label past the global vocabulary ...
        bad = labels.clone()
        bad[0, 3] = V
        expect_error("label", lambda: dpo_kernels.dpo_loss_from_hidden(
            hidden, weight[cols], bad, ref_c, ref_r, process_group=three, vocab_range=vr), "outside [0, vocab = 1001)")
        expect_error("logprobs label", lambda: dpo_kernels.linear_logprobs(
            hidden.reshape(-1, H), weight[cols], None, bad.reshape(-1), process_group=three, vocab_range=vr),
            "outside [0, vocab = 1001)")
        # ... ranges that overlap ...
        wrong = [(0, 200), (150, 600), (600, 1001)][rank]
        expect_error("vocab_range", lambda: dpo_kernels.dpo_loss_from_hidden(
            hidden, weight[wrong[0]:wrong[1]], labels, ref_c, ref_r, process_group=three, vocab_range=wrong),
            "do not tile")
        # ... a range whose width is not the weight shard's ...
        short = (bounds[rank], bounds[rank + 1] - (rank == 1))
        expect_error("width", lambda: dpo_kernels.dpo_loss_from_hidden(
            hidden, weight[cols], labels, ref_c, ref_r, process_group=three, vocab_range=short), "holds")
        # ... and ranks that disagree on the batch's rows.
        n = 2 * P - (2 if rank == 2 else 0)
        expect_error("rows", lambda: dpo_kernels.dpo_loss_from_hidden(
            hidden[:n], weight[cols], labels[:n], ref_c[:n // 2], ref_r[:n // 2], process_group=three,
            vocab_range=vr), "disagree on the hidden states' rows")

    # Context parallelism over 2 ranks: rank k holds rows [k T/2, (k+1) T/2) of every sequence.
    V = 300
    hidden, weight, bias, labels, ref_c, ref_r = head(V, 4)
    t0, t1 = rx * T // 2, (rx + 1) * T // 2
    rows = lambda g: g[:, t0:t1]  # noqa: E731
    local = (hidden[:, t0:t1].contiguous(), labels[:, t0:t1].contiguous(), None)
    full = (hidden, weight, bias, labels, ref_c, ref_r, None)
    for cfg in CONFIGS[:7]:  # LD-DPO needs whole sequences
        check_dpo("cp2", cfg, full, local, slice(0, V), rows, cp=gx)
    expect_error("cp ld_alpha", lambda: dpo_kernels.dpo_loss_from_hidden(
        local[0], weight, local[1], ref_c, ref_r, cp_group=gx, ld_alpha=0.5), "ld_alpha")
    # A bad label in one context rank's slice only: that rank names it, its peer raises too.
    bad = local[1].clone()
    if rx == 1:
        bad[1, 0] = V + 5
    expect_error("cp label", lambda: dpo_kernels.dpo_loss_from_hidden(local[0], weight, bad, ref_c, ref_r, cp_group=gx),
                 "outside [0, vocab = 300)" if rx == 1 else "rank(s) of cp_group rejected")

    # A context rank holding no row (context rank 1: padded [2P, 0, H], packed with every
    # slice empty): empty tensors (null data pointers); the same loss and gradients.
    e0, e1 = (0, T) if rx == 0 else (T, T)
    erows = lambda g: g[:, e0:e1]  # noqa: E731
    elocal = (hidden[:, e0:e1].contiguous(), labels[:, e0:e1].contiguous(), None)
    for cfg in (CONFIGS[0], CONFIGS[2], CONFIGS[6]):
        check_dpo("cp2 empty rank", cfg, full, elocal, slice(0, V), erows, cp=gx)
    ph, py, pcu = packed(hidden, labels)
    eidx = torch.arange(int(pcu[-1])) if rx == 0 else torch.zeros(0, dtype=torch.long)
    ecu = pcu if rx == 0 else torch.zeros_like(pcu)
    check_dpo("cp2 packed empty rank", CONFIGS[0], (ph, weight, bias, py, ref_c, ref_r, pcu),
              (ph[eidx], py[eidx], ecu), slice(0, V), lambda g: g[eidx], cp=gx)

    # Vocabulary x context: 2 x 2 (vocabulary group {0,1}/{2,3}, context group {0,2}/{1,3}).
    cols = slice(r2 * V // 2, (r2 + 1) * V // 2)
    for cfg in (CONFIGS[0], CONFIGS[2], CONFIGS[6]):
        check_dpo("tp2 x cp2", cfg, full, local, cols, rows, tp=g2, cp=gx, transforms=soft)
    check_dpo("tp2 x cp2 empty rank", CONFIGS[0], full, elocal, cols, erows, tp=g2, cp=gx, transforms=soft)
    rh, rw, rb = ref_head(hidden, weight, bias, 13)
    for cfg in (CONFIGS[0], CONFIGS[3]):
        check_dpo("cp2 ref_hidden", cfg, full, local, slice(0, V), rows, cp=gx, ref=(rh, rw, rb, rows(rh).contiguous()))
        check_dpo("tp2 x cp2 ref_hidden", cfg, full, local, cols, rows, tp=g2, cp=gx, transforms=soft,
                  ref=(rh, rw, rb, rows(rh).contiguous()))

    # Context parallelism of packed sequences over 3 ranks (some slices empty).
    if rank < 3:
        ph, py, pcu = packed(hidden, labels)
        idx, lcu = [], [0]
        for s in range(2 * P):
            a, b = int(pcu[s]), int(pcu[s + 1])
            lo, hi = a + (b - a) * rank // 3, a + (b - a) * (rank + 1) // 3
            idx.extend(range(lo, hi))
            lcu.append(lcu[-1] + hi - lo)
        idx_t = torch.tensor(idx, dtype=torch.long)
        for cfg in CONFIGS[:4]:
            check_dpo("cp3 packed", cfg, (ph, weight, bias, py, ref_c, ref_r, pcu), (ph[idx_t], py[idx_t],
                      torch.tensor(lcu)), slice(0, V), lambda g: g[idx_t], cp=three)
    leave()


def mismatch(rank: int, init_file: str, op: str) -> None:
    """Two ranks whose inputs disagree on the rows, with Megatron's default shards (no
    vocab_range, so nothing checks the shapes: the caller's contract). The first all-reduce
    then has different sizes on the two ranks: gloo aborts the process, NCCL would fail at
    the group's timeout; either way the job ends instead of hanging. `op`: "head"
    (linear_logprobs on a weight shard) or "logits" (sequence_logps on a logits shard)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=10))
    hidden, weight, bias, labels, _, _ = head(100, 5)
    n = 2 * P * T - (4 if rank == 1 else 0)
    h, y, w = hidden.reshape(-1, H)[:n], labels.reshape(-1)[:n], weight[rank * 50:(rank + 1) * 50]
    if op == "head":
        dpo_kernels.linear_logprobs(h, w, None, y, process_group=dist.group.WORLD)
    else:
        dpo_kernels.sequence_logps(h @ w.T, y, process_group=dist.group.WORLD)
    print(f"rank {rank}: no error", flush=True)


def mismatch_main(op: str) -> None:
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(mismatch, args=(os.path.join(d, "init"), op), nprocs=2, join=True)


def dtensor(rank: int, world: int, init_file: str) -> None:
    """FSDP2 holds the head's weight as a DTensor sharded by rows: the ops gather it whole
    (full_tensor, differentiable) and match the plain call, its gradient returning to the
    DTensor's shard; with process_group a DTensor is refused with a clear error."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    V = 301
    hidden, weight, bias, labels, ref_c, ref_r = head(V, 5)
    # The Liger drop-in too (summed and averaged log-probs): its logits means read the head as well.
    for op in ("logprobs", "dpo", "liger", "liger_average"):
        w, b = leaf(weight), leaf(bias)
        dw = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        db = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()

        def call(w, b):
            if op == "logprobs":
                lp, ent, *_ = dpo_kernels.linear_logprobs(hidden.reshape(-1, H), w, b, labels.reshape(-1).clamp_min(0))
                return lp.sum() + 0.5 * ent.sum(), ()
            if op.startswith("liger"):
                m = dpo_kernels.FusedLinearDPOLoss(use_ref_model=False, average_log_prob=op == "liger_average")
                loss, aux = m(w, hidden, labels, b)
                return loss, aux
            return dpo_kernels.dpo_loss_from_hidden(hidden, w, labels, ref_c, ref_r, bias=b)[0], ()

        (want, want_aux), (got, got_aux) = call(w, b), call(dw, db)
        want.backward()
        got.backward()
        assert torch.equal(got.detach(), want.detach()), f"dtensor {op}: {got} != {want}"
        for k, (g, e) in enumerate(zip(got_aux, want_aux)):
            assert type(g) is torch.Tensor and torch.equal(g, e), f"dtensor {op}: output {k} {g} != {e}"
        for name, d, p in (("weight", dw, w), ("bias", db, b)):
            assert type(d.grad).__name__ == "DTensor", f"dtensor {op}: {name}.grad is {type(d.grad).__name__}"
            assert torch.equal(d.grad.full_tensor(), p.grad), f"dtensor {op}: {name}.grad differs"
    dw = distribute_tensor(weight, mesh, [Shard(0)])
    try:
        dpo_kernels.dpo_loss_from_hidden(hidden, dw, labels, ref_c, ref_r, process_group=dist.group.WORLD)
        raise AssertionError("dtensor with process_group: no TypeError")
    except TypeError as e:
        assert "weight is a DTensor and process_group is given" in str(e), str(e)
    leave()


#: The collective timeout of rejections(): a rank left waiting fails the test in seconds
#: (gloo raises at the timeout) instead of hanging it.
REJECTION_TIMEOUT = 20


def rejections(rank: int, world: int, init_file: str) -> None:
    """Bad input on one rank only (3 ranks: context group {0, 1}, vocabulary group of all
    three): every rank of the group raises at once, the bad one its own error (type kept),
    its peers a ValueError saying a peer failed; none waits for the collective timeout."""
    import time

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=REJECTION_TIMEOUT))
    torch.set_num_threads(1)
    cp = dist.new_group([0, 1])
    V = 7
    hidden, weight, bias, labels, ref_c, ref_r = head(V, 5)
    t0, t1 = (0, 3) if rank == 0 else (3, T)
    h, y = hidden[:, t0:t1].contiguous(), labels[:, t0:t1].contiguous()

    def expect(tag, fn, bad_type, needle, bad_rank=1):
        start = time.monotonic()
        try:
            fn()
        except (ValueError, TypeError) as e:
            took = time.monotonic() - start
            assert took < REJECTION_TIMEOUT / 2, f"{tag}: rank {rank} raised after {took:.1f} s (a wait)"
            if rank == bad_rank:
                assert type(e) is bad_type, f"{tag}: rank {rank} raised {type(e).__name__}: {e}"
                assert needle in str(e), f"{tag}: rank {rank}: message {e!s} lacks {needle!r}"
            else:
                assert type(e) is ValueError and "rank(s) of cp_group rejected" in str(e), (
                    f"{tag}: rank {rank} raised {type(e).__name__}: {e}")
            return
        raise AssertionError(f"{tag}: rank {rank} raised nothing")

    if rank < 2:
        def hidden_loss(hh=h, yy=y, rc=ref_c, rr=ref_r, **kw):
            return dpo_kernels.dpo_loss_from_hidden(hh, weight, yy, rc, rr, cp_group=cp, **kw)

        odd = lambda good, bad: bad if rank == 1 else good  # noqa: E731
        expect("ref_hidden shape", lambda: hidden_loss(rc=None, rr=None, ref_hidden=odd(h, h[:, :1].contiguous())),
               ValueError, "ref_hidden has shape")
        expect("ref_hidden dtype", lambda: hidden_loss(rc=None, rr=None, ref_hidden=odd(h, h.double())), TypeError,
               "ref_hidden has dtype")
        # A reference head in its own dtype (bf16 for an fp32 policy) takes a call of its own:
        # its checks raised on the bad rank only, leaving its context peer waiting.
        hb, wb = h.bfloat16(), weight.bfloat16()
        expect("ref_hidden shape, bf16 reference head", lambda: hidden_loss(
            rc=None, rr=None, ref_hidden=odd(hb, hb[:, :1].contiguous()), ref_weight=wb), ValueError,
            "ref_hidden must have hidden's shape")
        expect("ref_weight shape, bf16 reference head", lambda: hidden_loss(
            rc=None, rr=None, ref_hidden=hb, ref_weight=odd(wb, wb[:-1].contiguous())), ValueError,
            "ref_weight must have weight's shape")
        expect("int16 labels (hidden)", lambda: hidden_loss(yy=odd(y, y.to(torch.int16))), TypeError, "labels must be int64 or int32")
        expect("float64 hidden, float32 weight", lambda: hidden_loss(hh=odd(h, h.double())), TypeError, "dtype")
        expect("reference log-probs shape (hidden)", lambda: hidden_loss(rc=odd(ref_c, torch.zeros(P + 1))),
               ValueError, "reference_chosen_logps must have shape")
        z = (h @ weight.T).contiguous()
        expect("int16 labels (logits)", lambda: dpo_kernels.dpo_loss_from_logits(
            z, odd(y, y.to(torch.int16)), ref_c, ref_r, cp_group=cp), TypeError, "labels must be int64 or int32")
        expect("int16 labels (sequence_logps)", lambda: dpo_kernels.sequence_logps(
            z, odd(y, y.to(torch.int16)), cp_group=cp), TypeError, "labels must be int64 or int32")
        expect("reference log-probs shape (logits)", lambda: dpo_kernels.dpo_loss_from_logits(
            z, y, ref_c, odd(ref_r, torch.zeros(P, 1)), cp_group=cp), ValueError,
            "reference_rejected_logps must have shape")

    # Vocabulary x context: rank 0 holds the whole vocabulary (a group of one) of context slice
    # 0, ranks 1 and 2 split it for slice 1 with an empty range on rank 2. Ranks 1 and 2 refuse
    # the ranges after their all-gather; rank 1 tells its context peer, rank 0, which waited in
    # the context all-reduce until the job's timeout.
    solo, pair = dist.new_group([0]), dist.new_group([1, 2])
    tp, vr = (solo, (0, V)) if rank == 0 else (pair, [(0, V), (V, V)][rank - 1])
    cp2 = cp if rank < 2 else None
    hs, ys = (h, y) if rank < 2 else (hidden[:, 3:].contiguous(), labels[:, 3:].contiguous())
    zs = hs @ weight[vr[0]:vr[1]].T
    tpcp = {
        "dpo_loss_from_hidden": lambda: dpo_kernels.dpo_loss_from_hidden(
            hs, weight[vr[0]:vr[1]], ys, ref_c, ref_r, process_group=tp, vocab_range=vr, cp_group=cp2),
        "dpo_loss_from_logits": lambda: dpo_kernels.dpo_loss_from_logits(
            zs, ys, ref_c, ref_r, process_group=tp, vocab_range=vr, cp_group=cp2),
        "sequence_logps": lambda: dpo_kernels.sequence_logps(zs, ys, process_group=tp, vocab_range=vr, cp_group=cp2),
    }
    for name, fn in tpcp.items():
        if rank == 0:
            expect(f"empty shard, tp x cp {name}", fn, ValueError, "", bad_rank=1)
            continue
        start = time.monotonic()
        try:
            fn()
        except ValueError as err:
            assert time.monotonic() - start < REJECTION_TIMEOUT / 2, f"tp x cp {name}: rank {rank} waited"
            assert f"vocab_range = ({V}, {V}) of rank 1 is empty" in str(err), f"tp x cp {name}: {err}"
        else:
            raise AssertionError(f"tp x cp {name}: rank {rank} raised nothing")

    # An empty vocabulary shard (ranges (0, 3), (3, 3), (3, 7)): refused on every rank after
    # the ranges' all-gather, before any other collective.
    s, e = [(0, 3), (3, 3), (3, 7)][rank]
    z = hidden @ weight.T
    calls = {
        "linear_logprobs": lambda: dpo_kernels.linear_logprobs(
            hidden.reshape(-1, H), weight[s:e], None, labels.reshape(-1).clamp_min(0), process_group=dist.group.WORLD,
            vocab_range=(s, e)),
        "dpo_loss_from_hidden": lambda: dpo_kernels.dpo_loss_from_hidden(
            hidden, weight[s:e], labels, ref_c, ref_r, process_group=dist.group.WORLD, vocab_range=(s, e)),
        "dpo_loss_from_logits": lambda: dpo_kernels.dpo_loss_from_logits(
            z[..., s:e].contiguous(), labels, ref_c, ref_r, process_group=dist.group.WORLD, vocab_range=(s, e)),
        "sequence_logps": lambda: dpo_kernels.sequence_logps(
            z[..., s:e].contiguous(), labels, process_group=dist.group.WORLD, vocab_range=(s, e)),
    }
    for name, fn in calls.items():
        start = time.monotonic()
        try:
            fn()
        except ValueError as err:
            assert time.monotonic() - start < REJECTION_TIMEOUT / 2, f"empty shard {name}: rank {rank} waited"
            assert "vocab_range = (3, 3) of rank 1 is empty" in str(err), f"empty shard {name}: {err}"
        else:
            raise AssertionError(f"empty shard {name}: rank {rank} raised nothing")
    leave()
